"""Every method on every family: tiny random-init models of 13 architectures (tiny.ARCHITECTURES), each saved to disk
with a locally trained tokenizer and driven through the real `tunekit train / merge / export`.

What differs between families and has broken us before: module names (Phi-3's fused qkv_proj, GPT-NeoX's
query_key_value, Starcoder2's c_fc), GPT-2's Conv1D, Qwen3-MoE's experts fused into 3-D parameters, Gemma 2 without
sdpa, Falcon's mask that ignores packed position_ids, and chat templates whose turn ends with a token that is not eos.
A transformers release that renames a module or changes one of these shows up here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from tunekit import tiny
from tunekit.cli import main
from tunekit.config import LoraConfig
from tunekit.estimate import count_params

FAMILIES = list(tiny.ARCHITECTURES)
# QLoRA and full fine-tuning on a subset: a fused-qkv model, a Conv1D model, the MoE model, and plain Llama; QLoRA
# also on Qwen2, whose tokenizer class loads one token more than its embeddings have rows (the merge must not grow
# them: training did not).
SUBSET = ["phi3", "gpt2", "qwen3_moe", "llama", "qwen2"]
FULL_SUBSET = ["phi3", "gpt2", "qwen3_moe"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("arch")


@pytest.fixture(scope="module")
def tokenizer():
    """One small byte-level BPE tokenizer (300 tokens) shared by every family; build_tiny_architecture copies it and
    adds the family's end-of-turn token."""
    return tiny.train_tokenizer(tiny.generate_corpus(30_000, 0), vocab_size=300, model_max_length=256)


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    path = workdir / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in tiny.demo_examples(12)))
    return path


@pytest.fixture(scope="module")
def base(workdir, tokenizer):
    """family -> its saved tiny model (built on first use)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny.build_tiny_architecture(family, workdir / f"base-{family}", tokenizer)
        return built[family]

    return get


def write_config(path: Path, method: str, model: Path, data: Path, out: Path, extra: str = "") -> Path:
    """The default config a new user writes (nothing about the architecture), made small: 2 steps of 2 rows."""
    path.write_text(
        f"method: {method}\noutput_dir: {out}\nmodel:\n  name_or_path: {model}\n"
        f"data:\n  sources:\n    - {{path: {data}, format: alpaca}}\n  eval_fraction: 0\n  max_seq_len: 128\n"
        "training: {max_steps: 2, per_device_train_batch_size: 2, logging_steps: 1}\n"
        f"eval: {{task_metric: none, rank_spectrum: false}}\n{extra}")
    return path


def expected_stop_ids(model_dir: Path) -> list[int]:
    """eos and, when the family's template ends turns with another token, that token's id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    end_of_turn = tiny.ARCHITECTURES[model_dir.name.removeprefix("base-")][2]
    ids = [tok.eos_token_id]
    if end_of_turn not in (None, tok.eos_token):
        ids.append(tok.convert_tokens_to_ids(end_of_turn))
    return ids


def stop_ids(directory: Path) -> list[int]:
    eos = json.loads((directory / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def base_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


# ---------------------------------------------------------------- LoRA on every family


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_merges_and_exports_with_the_default_config(family, base, data, workdir, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = base(family)
    run = workdir / f"lora-{family}"
    config = write_config(workdir / f"lora-{family}.yaml", "lora", model_dir, data, run)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "lora adapts: " in out  # the pre-flight says what is adapted and what is not, in one line
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_loss_first"] is not None

    # The estimate's counts are the real model's (base) and peft's (adapters), with no table of families.
    shape = count_params(model_dir, LoraConfig(), "lora")
    assert shape["params"] == base_params(model_dir)
    assert shape["trainable_params"] == summary["trainable_params"]

    assert main(["merge", str(run), "--out", str(run / "merged")]) == 0
    assert json.loads((run / "merged" / "merge_check.json").read_text())["passed"]
    assert main(["export", str(run), "--out", str(run / "adapter"), "--format", "adapter"]) == 0
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    # generate (and vLLM) stop at the template's end of turn as well as at eos: final/ and the merged model say so.
    expected = expected_stop_ids(model_dir)
    assert set(expected) <= set(stop_ids(run / "final")) and set(expected) <= set(stop_ids(run / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    loaded = merged.generation_config.eos_token_id
    assert set(expected) <= set(loaded if isinstance(loaded, list) else [loaded])
    # "auto" attention is what transformers picks for the family (Gemma 2 has no sdpa).
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["attn_implementation"] == ("eager" if family == "gemma2" else "sdpa")


def test_fused_moe_experts_are_adapted(base, data, workdir):
    """Qwen3-MoE keeps its experts as [experts, out, in] parameters, no Linear: all-linear adapts them too."""
    run = workdir / "lora-qwen3_moe"
    if not (run / "final").is_dir():
        assert main(["train", str(write_config(workdir / "moe.yaml", "lora", base("qwen3_moe"), data, run))]) == 0
    with safe_open(str(run / "final" / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert any("experts" in key and "lora_A" in key for key in keys), keys
    shape = count_params(base("qwen3_moe"), LoraConfig())
    assert "mlp.experts.gate_up_proj" in shape["adapted"] and "mlp.gate" in shape["not_adapted"]  # router frozen

    # peft refuses dropout on parameter adapters: the Linear adapters still get lora.dropout (0.05 by default).
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    from tunekit.backends import lora
    from tunekit.backends.common import load_tokenizer
    from tunekit.config import load

    config = load(write_config(workdir / "moe-build.yaml", "lora", base("qwen3_moe"), data, workdir / "unused"))
    model = lora.build_model(config, load_tokenizer(config))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert any(isinstance(m, ParamWrapper) for m in layers)
    assert {m.lora_dropout["default"].p for m in layers if not isinstance(m, ParamWrapper)} == {0.05}


def test_an_explicit_name_list_still_works_and_a_wrong_name_is_one_line(base, data, workdir, capsys):
    extra = "lora:\n  target_modules: [query_key_value]\n"
    config = write_config(workdir / "neox-names.yaml", "lora", base("gpt_neox"), data, workdir / "neox-names", extra)
    assert main(["train", str(config)]) == 0
    bad = write_config(workdir / "bad-names.yaml", "lora", base("phi3"), data, workdir / "bad-names",
                       "lora:\n  target_modules: [q_proj]\n")
    capsys.readouterr()
    assert main(["train", str(bad)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "['q_proj'] not found" in errors[0], errors
    assert not (workdir / "bad-names").exists()


# ---------------------------------------------------------------- new tokens on non-Llama families


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])  # tied (Conv1D) and untied embeddings
def test_new_tokens_train_and_merge(family, base, data, workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = workdir / f"tokens-{family}"
    extra = "  add_tokens: ['<|tool|>', '<|call|>']\n"
    config = write_config(workdir / f"tokens-{family}.yaml", "lora", base(family), data, run)
    config.write_text(config.read_text().replace("data:\n", extra + "data:\n", 1))
    assert main(["train", str(config)]) == 0
    assert main(["merge", str(run), "--out", str(run / "merged")]) == 0
    assert json.loads((run / "merged" / "merge_check.json").read_text())["passed"]
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert merged.get_input_embeddings().num_embeddings == len(tokenizer) == 300 + 2


# ---------------------------------------------------------------- QLoRA on a subset


@pytest.mark.parametrize("family", SUBSET)
def test_qlora_trains_on_a_4bit_base_and_merges(family, base, data, workdir):
    run = workdir / f"qlora-{family}"
    assert main(["train", str(write_config(workdir / f"qlora-{family}.yaml", "qlora", base(family), data, run))]) == 0
    assert json.loads((run / "summary.json").read_text())["quantized_modules"] > 0
    assert main(["merge", str(run), "--out", str(run / "merged")]) == 0
    assert json.loads((run / "merged" / "merge_check.json").read_text())["passed"]
    assert set(expected_stop_ids(base(family))) <= set(stop_ids(run / "merged"))


def test_qlora_refuses_an_architecture_bitsandbytes_leaves_unquantized(base, data, workdir, capsys):
    """Falcon's FalconLinear is not a plain nn.Linear, so transformers' 4-bit loader quantizes nothing: QLoRA would
    silently be LoRA on a full-precision base."""
    config = write_config(workdir / "qlora-falcon.yaml", "qlora", base("falcon"), data, workdir / "qlora-falcon")
    assert main(["train", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "quantized none of FalconForCausalLM's layers" in errors[0], errors
    assert errors[0].startswith(f"error: {config}:1: method: ")
    assert not (workdir / "qlora-falcon").exists()


# ---------------------------------------------------------------- full fine-tuning on a subset (own processes)

@pytest.mark.slow
def test_full_fine_tuning_and_export(base, data, workdir):
    """Full FT in one CPU process (deepspeed.stage auto: the plain Trainer). Every train and export runs in its own
    process, as a user runs them (and as when full FT ran under ZeRO-3, whose process-wide state outlives a run)."""
    runs = {family: workdir / f"full-{family}" for family in FULL_SUBSET}
    for family, run in runs.items():
        config = write_config(workdir / f"full-{family}.yaml", "full", base(family), data, run)
        subprocess.run([sys.executable, "-m", "tunekit", "train", str(config)], check=True, timeout=600)
        subprocess.run([sys.executable, "-m", "tunekit", "export", str(run), "--out", str(run / "export")],
                       check=True, timeout=300)
    for family, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["trainable_params"] == summary["total_params"] == base_params(base(family))
        expected = set(expected_stop_ids(base(family)))
        assert expected <= set(stop_ids(run / "final")) and expected <= set(stop_ids(run / "export"))
        assert (run / "export" / "model.safetensors").is_file()


# ---------------------------------------------------------------- attention


def test_a_kernel_the_model_cannot_run_is_one_line_naming_the_config_line(base, data, workdir, capsys):
    config = write_config(workdir / "gemma2-sdpa.yaml", "lora", base("gemma2"), data, workdir / "gemma2-sdpa")
    config.write_text(config.read_text().replace("data:\n", "  attn_implementation: sdpa\ndata:\n", 1))
    assert main(["train", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {config}:5: model.attn_implementation: Gemma2ForCausalLM does not support sdpa "
                      f"attention (transformers {transformers.__version__}; it supports eager, "
                      "flash_attention_2); use auto"]
    assert not (workdir / "gemma2-sdpa").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_examples_stay_apart_except_where_refused(family, base):
    """The packing probe on each family's real modeling code: only Falcon (transformers 5.x) lets packed examples see
    each other, so only Falcon refuses data.packing. A release that fixes or breaks another family shows here."""
    from transformers import AutoConfig

    from tunekit.backends.common import model_class, packing_leaks

    hf_config = AutoConfig.from_pretrained(base(family))
    kernel = "sdpa" if model_class(hf_config)._supports_sdpa else "eager"
    rng = torch.random.get_rng_state()
    assert packing_leaks(hf_config, kernel) == (family == "falcon")
    assert torch.equal(rng, torch.random.get_rng_state())  # it runs after set_seed: the LoRA init must not move


def test_packing_on_falcon_is_refused_before_anything_is_created(base, data, workdir, capsys):
    config = write_config(workdir / "falcon-packed.yaml", "lora", base("falcon"), data, workdir / "falcon-packed")
    assert main(["train", str(config), "--set", "data.packing=true"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --set data.packing=true: data.packing: "
                                                     "FalconForCausalLM lets packed examples attend"), errors
    assert not (workdir / "falcon-packed").exists()


# ---------------------------------------------------------------- the generation config, from templates directly


@pytest.mark.parametrize("end_of_turn", ["<|im_end|>", "<|eot_id|>"])
def test_stop_tokens_are_eos_and_the_templates_end_of_turn(end_of_turn, tokenizer):
    import copy

    from transformers import GenerationConfig

    from tunekit.backends.common import stop_generation_config

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([end_of_turn], special_tokens=True)
    tok.chat_template = tiny.turn_template(end_of_turn)

    class Model:  # only its generation config is read
        generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)

    config = stop_generation_config(Model(), tok)
    assert config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids(end_of_turn)]
    assert Model.generation_config.eos_token_id == tok.eos_token_id  # a copy: the model's own is untouched
    tok.chat_template = tiny.CHAT_TEMPLATE  # a template that ends turns with eos adds nothing
    assert stop_generation_config(Model(), tok).eos_token_id == tok.eos_token_id
