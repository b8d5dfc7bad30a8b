"""The pre-flight estimate: parameter counts from real module shapes, the byte model against the seeds' tables,
sharding and checkpointing invariants, time/cost arithmetic, the refusal, and the CLI.

Seeds' table (000_76aa4ad8d2f7d3ce): 7B full ~98 GB (14 B/param: bf16 weights + fp32 grads + Adam m,v; it leaves out
the fp32 master copy), LoRA ~15-18 GB, QLoRA ~8-10 GB. Models are built on the meta device: no weights, offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunekit import config as config_mod
from tunekit.cli import main
from tunekit.config import LoraConfig, RunConfig, TrainingConfig
from tunekit.errors import UserError
from tunekit import estimate as est
from tunekit.estimate import preflight as preflight_mod

REPO = Path(__file__).resolve().parents[1]

GB = est.GB

# Published parameter counts of the shipped configs (HF model cards / `sum(p.numel())` on the real checkpoints).
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "codellama-34b": 33_743_970_304,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
}


def run_config(method: str, model: str = "tunekit:llama-2-7b", **training) -> RunConfig:
    """A RunConfig without touching the filesystem (validate, not load: no path checks)."""
    return config_mod.parse({
        "method": method,
        "output_dir": "out",
        "model": {"name_or_path": model},
        "data": {"sources": [{"path": "train.jsonl", "format": "alpaca", "max_examples": 50_000}], "max_seq_len": 512},
        "training": {"per_device_train_batch_size": 1, "gradient_checkpointing": True, **training},
    })


def mem(shape_name: str, method: str, **settings):
    shape = est.count_params(f"tunekit:{shape_name}", LoraConfig(), method)
    defaults = dict(method=method, micro_batch=1, seq_len=512, gradient_checkpointing=True, lora_dropout=0.05)
    return shape, est.memory_bytes(shape, **{**defaults, **settings})


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_every_shipped_config_builds_with_its_published_size(name):
    assert name in est.shipped_model_configs()
    assert est.count_params(f"tunekit:{name}", LoraConfig(), "full")["params"] == PUBLISHED_PARAMS[name]


def test_every_shipped_config_is_listed():
    assert set(est.shipped_model_configs()) == set(PUBLISHED_PARAMS)


def test_lora_trainable_params_on_llama3_8b():
    # r * (in + out) per adapted Linear, all 7 projections, 32 layers.
    r16 = est.count_params("tunekit:llama-3-8b", LoraConfig(r=16), "lora")
    assert r16["trainable_params"] == 41_943_040
    # The seed prints "Trainable: 83,886,080 / 8,114,147,328" under its r=16 config: that is the r=32 count
    # (peft's get_peft_model gives 41,943,040 for r=16), so the seed's printout is off by its rank.
    r32 = est.count_params("tunekit:llama-3-8b", LoraConfig(r=32), "lora")
    assert r32["trainable_params"] == 83_886_080
    assert r32["params"] + r32["trainable_params"] == 8_114_147_328
    assert est.count_params("tunekit:llama-3-8b", LoraConfig(r=16), "full")["trainable_params"] == 8_030_261_248


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny")
    LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False).save_pretrained(path)
    return path


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], config_mod.ALL_LINEAR, ["mlp.down_proj"]])
def test_lora_count_matches_peft(tiny_dir, targets):
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    shape = est.count_params(tiny_dir, LoraConfig(r=4, target_modules=targets), "lora")
    assert (shape["params"], shape["trainable_params"]) == (total, trainable)


def test_add_tokens_grow_embedding_and_untied_head(tiny_dir):
    base = est.count_params(tiny_dir, LoraConfig(), "lora")
    grown = est.count_params(tiny_dir, LoraConfig(), "lora", add_tokens=5)
    assert grown["params"] - base["params"] == 2 * 5 * 64  # embed_tokens and lm_head rows
    assert grown["trainable_params"] - base["trainable_params"] == 2 * 5 * 64  # peft trainable token rows


def test_unknown_targets_and_names_are_user_errors(tiny_dir):
    with pytest.raises(UserError, match=r"\['query'\] not found"):
        est.count_params(tiny_dir, LoraConfig(target_modules=["q_proj", "query"]), "lora")
    with pytest.raises(UserError, match="no shipped model config"):
        est.count_params("tunekit:gpt-9", LoraConfig(), "lora")


# ---------------------------------------------------------------- the seeds' memory table


def test_full_7b_matches_the_seed_accounting_plus_master_weights():
    shape, m = mem("llama-2-7b", "full", gpus=1, zero_stage=3)
    job, n = m["job"], shape["params"]
    master = n * est.BYTES_PER_PARAM_MASTER
    # The seed's 14 B/param (2 weights + 4 grads + 8 Adam) gives 94 GB for the real 6.74B ("~98 GB" for 7.0B) ...
    assert job["weights"] + job["gradients"] + job["optimizer"] - master == 14 * n
    assert 90 * GB < 14 * n < 100 * GB
    # ... and the fp32 master copy mixed precision keeps adds 4 B/param: 121 GB of states.
    assert 115 * GB < job["weights"] + job["gradients"] + job["optimizer"] < 125 * GB
    assert job["total"] > 98 * GB + job["activations"]


def test_lora_7b_within_the_seeds_15_to_18_gb():
    # Seed: "Total: approximately 15-16 GB" (r=16 on q,v) and "~18 GB" in its table. We adapt all 7 projections
    # (40M params, fp32 with fp32 grads and Adam: 0.64 GB) and add activations and a CUDA context.
    _, m = mem("llama-2-7b", "lora")
    assert 14 * GB < m["job"]["total"] < 19 * GB
    _, qv = mem("llama-2-7b", "lora", gpus=1)
    assert qv["job"]["weights"] > 13.4 * GB  # the frozen bf16 base


def test_qlora_7b_within_the_seeds_5_to_10_gb():
    _, m = mem("llama-2-7b", "qlora")
    assert 5 * GB < m["job"]["total"] < 10 * GB


def test_qlora_weights_against_lora_weights():
    shape, qlora = mem("llama-2-7b", "qlora")
    _, lora = mem("llama-2-7b", "lora")
    # The 4-bit layers: 0.5 B + 0.127 bits of double-quant constants per param, vs 2 B in bf16: under a third.
    four_bit = shape["linear_params"] * (est.BYTES_PER_PARAM_NF4 + est.BYTES_PER_PARAM_NF4_CONSTANTS_DOUBLE_QUANT)
    assert four_bit < shape["linear_params"] * est.BYTES_PER_PARAM_BF16 / 3
    # Whole weights: embeddings, lm_head and norms are not quantized and prepare_model_for_kbit_training upcasts them
    # to fp32, so the ratio is ~1/3 for Llama-2's 32K vocabulary and only ~1/2 for Llama-3's 128K.
    assert qlora["job"]["weights"] < lora["job"]["weights"] / 2.5
    _, qlora3 = mem("llama-3-8b", "qlora")
    _, lora3 = mem("llama-3-8b", "lora")
    assert qlora3["job"]["weights"] < lora3["job"]["weights"] / 2


def test_double_quant_constants_are_0_127_bits_per_param():
    assert est.BYTES_PER_PARAM_NF4_CONSTANTS_DOUBLE_QUANT * 8 == pytest.approx(0.127, abs=1e-3)
    shape, double = mem("llama-2-7b", "qlora", double_quant=True)
    _, single = mem("llama-2-7b", "qlora", double_quant=False)
    saved = single["job"]["weights"] - double["job"]["weights"]
    assert saved / shape["linear_params"] * 8 == pytest.approx(0.5 - 0.127, abs=1e-3)  # ~0.37 bits/param saved


def test_70b_qlora_fits_one_80gb_gpu_and_full_needs_many():
    shape, q = mem("llama-2-70b", "qlora")
    assert q["per_device"]["total"] < 80 * GB  # the QLoRA paper's point: 65-70B on one GPU
    full = est.count_params("tunekit:llama-2-70b", LoraConfig(), "full")
    needed = est.min_gpus(full, 80 * GB, method="full", zero_stage=3, micro_batch=1, seq_len=512,
                          gradient_checkpointing=True)
    assert needed is not None and needed >= 12  # the seed: "12x A100 80GB"


# ---------------------------------------------------------------- invariants


def test_zero3_shards_states_over_gpus():
    _, one = mem("llama-3-8b", "full", gpus=1, zero_stage=3)
    _, eight = mem("llama-3-8b", "full", gpus=8, zero_stage=3)
    for key in ("weights", "gradients", "optimizer"):
        assert eight["per_device"][key] == pytest.approx(eight["job"][key] / 8)
        assert eight["job"][key] == pytest.approx(one["job"][key])
    # Every GPU runs its own micro-batch: activations are per device, the job has 8 of them.
    assert eight["per_device"]["activations"] == one["per_device"]["activations"]
    assert eight["job"]["activations"] == pytest.approx(8 * one["job"]["activations"])


@pytest.mark.parametrize("stage, sharded", [(0, set()), (1, {"optimizer"}), (2, {"optimizer", "gradients"}),
                                            (3, {"optimizer", "gradients", "weights"})])
def test_zero_stages_shard_what_they_say(stage, sharded):
    _, single = mem("llama-2-7b", "full", gpus=1, zero_stage=stage)
    _, four = mem("llama-2-7b", "full", gpus=4, zero_stage=stage)
    for key in ("weights", "gradients", "optimizer"):
        if key in sharded:  # a quarter on each GPU, the job holds one copy
            assert four["per_device"][key] == pytest.approx(single["job"][key] / 4)
            assert four["job"][key] == pytest.approx(single["job"][key])
        else:  # replicated: every GPU holds it all
            assert four["per_device"][key] == pytest.approx(single["job"][key])
            assert four["job"][key] == pytest.approx(4 * single["job"][key])


def test_offload_moves_states_to_host():
    _, m = mem("llama-2-7b", "full", gpus=2, zero_stage=3, offload_optimizer=True, offload_param=True)
    assert m["per_device"]["optimizer"] == m["per_device"]["weights"] == 0
    assert m["cpu_offload"] > 90 * GB


def test_gradient_checkpointing_lowers_activations():
    for method in ("full", "lora", "qlora"):
        _, on = mem("llama-3-8b", method, micro_batch=4, seq_len=2048, gradient_checkpointing=True)
        _, off = mem("llama-3-8b", method, micro_batch=4, seq_len=2048, gradient_checkpointing=False)
        assert on["job"]["activations"] < off["job"]["activations"] / 3


def test_activations_grow_with_tokens_and_logits_with_vocab():
    _, short = mem("llama-3-8b", "lora", micro_batch=1, seq_len=512, gradient_checkpointing=False)
    _, long = mem("llama-3-8b", "lora", micro_batch=2, seq_len=512, gradient_checkpointing=False)
    assert long["job"]["activations"] == pytest.approx(2 * short["job"]["activations"])
    # Mistral-7B has Llama-3-8B's layer shapes and a 32K instead of 128K vocabulary. TRL's fused LM head holds one
    # [tokens, 32768] bf16 tile, never the logits: the vocabularies differ only by that tile's width (32768 vs 32000).
    _, mistral = mem("mistral-7b", "lora", micro_batch=1, seq_len=512, gradient_checkpointing=False)
    assert short["job"]["activations"] - mistral["job"]["activations"] == pytest.approx(512 * (32_768 - 32_000) * 2)
    # Full logits (a loss without the fused head): bf16 logits + the loss's fp32 copy + fp32 log-softmax = 10 bytes
    # per vocabulary entry and token.
    _, short = mem("llama-3-8b", "lora", micro_batch=1, seq_len=512, gradient_checkpointing=False, fused_lm_head=False)
    _, mistral = mem("mistral-7b", "lora", micro_batch=1, seq_len=512, gradient_checkpointing=False,
                     fused_lm_head=False)
    assert short["job"]["activations"] - mistral["job"]["activations"] == pytest.approx(512 * (128_256 - 32_000) * 10)


def test_eight_bit_optimizer_quarters_adam_states():
    _, adam = mem("llama-2-7b", "lora", optim="adamw_torch")
    _, eight = mem("llama-2-7b", "lora", optim="paged_adamw_8bit")
    assert eight["job"]["optimizer"] == pytest.approx(adam["job"]["optimizer"] / 4)


def test_every_configurable_optimizer_has_a_state_size():
    assert set(est.ADAM_BYTES_PER_PARAM) == set(TrainingConfig.model_fields["optim"].annotation.__args__)


def test_cpu_runs_fp32_without_master_weights():
    shape, cpu = mem("llama-2-7b", "full", device="cpu", precision="fp32")
    assert cpu["job"]["weights"] == 4 * shape["params"]
    assert cpu["job"]["optimizer"] == 8 * shape["params"]  # Adam only: the fp32 weights are the master


# ---------------------------------------------------------------- estimate(), time and cost


def test_estimate_keys_and_json():
    result = est.estimate(run_config("lora"), gpus=1, gpu_memory_gb=24)
    for key in ("method", "params", "trainable_params", "bytes", "per_device_total", "gpus", "gpu_memory_bytes",
                "fits", "tokens", "train_hours", "cost_usd", "assumptions"):
        assert key in result
    assert set(result["bytes"]) == {"weights", "gradients", "optimizer", "activations", "overhead", "total"}
    assert result["fits"] is True
    json.dumps(result)  # serializable as is


def test_equal_token_budgets_cost_the_same():
    # batch 1 x accumulation 8 == batch 8 x accumulation 1 in tokens, time and cost; only activations differ.
    a = est.estimate(run_config("lora", max_steps=100, gradient_accumulation_steps=8), gpus=1)
    b = est.estimate(run_config("lora", max_steps=100, per_device_train_batch_size=8), gpus=1)
    assert a["tokens"] == b["tokens"] == 100 * 8 * 512
    assert a["cost_usd"] == pytest.approx(b["cost_usd"])
    assert a["bytes"]["activations"] < b["bytes"]["activations"]


def test_time_and_cost_arithmetic():
    result = est.estimate(run_config("full", max_steps=10, gradient_checkpointing=False), gpus=4)
    assert result["tokens"] == 10 * 1 * 1 * 4 * 512
    shape = est.count_params("tunekit:llama-2-7b", LoraConfig(), "full")
    # 6N per token, plus a small attention term at 512 tokens.
    assert result["flops"] == pytest.approx(6 * shape["matmul_params"] * result["tokens"], rel=0.02)
    assert result["gpu_hours"] == pytest.approx(result["train_hours"] * 4)
    assert result["cost_usd"] == pytest.approx(result["gpu_hours"] * 3.0)
    given = est.estimate(run_config("full", max_steps=10), gpus=4, tokens_per_second=1000.0)
    assert given["train_hours"] == pytest.approx(given["tokens"] / 1000 / 3600)


def test_lora_costs_fewer_flops_than_full():
    full = est.estimate(run_config("full"), gpus=8)
    lora = est.estimate(run_config("lora"), gpus=8)
    qlora = est.estimate(run_config("qlora"), gpus=8)
    assert full["tokens"] == lora["tokens"] == 47_500 * 512  # max_examples less the 5% eval split, 1 epoch
    assert lora["flops"] < full["flops"] < 1.5 * lora["flops"]  # 8N vs 6N + adapters with checkpointing
    assert qlora["train_hours"] > lora["train_hours"]  # dequantization


def test_examples_counted_from_local_jsonl(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join('{"instruction": "a", "output": "b"}\n' for _ in range(200)))
    config = run_config("lora")
    config.data.sources[0].path = str(data)
    config.data.sources[0].max_examples = None
    assert est.count_examples(config) == 190  # 5% held out for eval
    config.data.sources[0].path = "org/hub-dataset"
    result = est.estimate(config, gpus=1)
    assert result["tokens"] is None and result["cost_usd"] is None


def test_examples_are_counted_without_parsing_the_data(tmp_path):
    # The estimate counts rows cheaply (tunekit.data.count_rows: JSONL lines, a parquet footer; a JSON file is one
    # document, read whole); checking every row is the data preparation's job, done once.
    wrapped = tmp_path / "train.json"
    wrapped.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}] * 40}))
    config = run_config("lora")
    config.data.sources[0].path, config.data.sources[0].max_examples = str(wrapped), None
    assert est.count_examples(config) == 38  # 5% held out for eval
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"instruction": "a", "output": "b"}\n\n' * 40)  # blank lines are not examples
    config.data.sources[0].path = str(lines)
    assert est.count_examples(config) == 38
    config.data.sources[0].max_examples = 20
    assert est.count_examples(config) == 19


def test_examples_counted_equal_the_examples_training_sees(tiny_base, tmp_path):
    # Two sources mixed 1:3 by weight with an eval split off the first: count_examples must give the size of the
    # training set prepare_data builds (short examples, so truncation drops none).
    from transformers import AutoTokenizer

    from tunekit.prepare import prepare_data

    alpaca, completions = tmp_path / "a.jsonl", tmp_path / "b.json"
    alpaca.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(50)))
    completions.write_text(json.dumps([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(70)]))
    config = config_mod.parse({
        "method": "lora", "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": [{"path": str(alpaca), "format": "alpaca"},
                             {"path": str(completions), "format": "prompt_completion", "weight": 3}],
                 "eval_fraction": 0.1, "max_seq_len": 64, "cache_dir": str(tmp_path / "cache")},
    })
    trained = len(prepare_data(config, AutoTokenizer.from_pretrained(tiny_base)).train)
    assert trained < 50 + 70 - 5  # the weights did bind: not every row was used
    assert est.count_examples(config) == trained


def test_format_estimate_is_one_screen():
    text = est.format_estimate(est.estimate(run_config("qlora"), gpus=1, gpu_memory_gb=24))
    assert "fits" in text and " GB" in text and "$" in text
    assert len(text.splitlines()) <= 25


# ---------------------------------------------------------------- preflight


def test_preflight_refuses_what_cannot_fit(monkeypatch):
    monkeypatch.setattr(preflight_mod, "_host_memory_bytes", lambda: 8 * GB)
    config = run_config("lora")  # a 7B in fp32 on CPU: ~28 GB of weights
    with pytest.raises(UserError, match="needs .* GB of host RAM"):
        est.preflight_check(config, device="cpu")
    assert est.preflight_check(config, device="cpu", force=True)["fits"] is False
    config.preflight.refuse_if_too_big = False
    assert est.preflight_check(config, device="cpu")["fits"] is False


def test_preflight_accepts_what_fits(tiny_dir, monkeypatch):
    monkeypatch.setattr(preflight_mod, "_host_memory_bytes", lambda: 8 * GB)
    result = est.preflight_check(run_config("lora", model=str(tiny_dir)), device="cpu")
    assert result["fits"] is True and result["assumptions"]["precision"] == "fp32"


def test_preflight_error_is_one_line_with_advice(monkeypatch):
    monkeypatch.setattr(preflight_mod, "_host_memory_bytes", lambda: 8 * GB)
    config = run_config("lora", gradient_checkpointing=False, per_device_train_batch_size=16)
    with pytest.raises(UserError) as info:
        est.preflight_check(config, device="cpu")
    assert "\n" not in str(info.value) and "gradient_checkpointing" in str(info.value)


# ---------------------------------------------------------------- config and CLI


def write_config(tmp_path: Path, method: str = "lora", model: str = "tunekit:llama-3-8b") -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join('{"instruction": "q", "output": "a"}\n' for _ in range(1000)))
    path = tmp_path / "run.yaml"
    path.write_text(
        f"method: {method}\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: \"{model}\"\n"
        f"data:\n  sources:\n    - path: {data}\n      format: alpaca\n  max_seq_len: 1024\n"
        "training:\n  per_device_train_batch_size: 2\n  gradient_checkpointing: true\n"
    )
    return path


def test_shipped_name_passes_config_path_checks(tmp_path):
    assert config_mod.load(write_config(tmp_path)).model.name_or_path == "tunekit:llama-3-8b"


def test_cli_estimate_json(tmp_path, capsys):
    assert main(["estimate", str(write_config(tmp_path)), "--gpus", "2", "--gpu-memory", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "lora" and result["params"] == 8_030_261_248
    assert result["trainable_params"] == 41_943_040
    assert result["gpus"] == 2 and result["gpu_memory_bytes"] == 40 * GB
    assert result["bytes"]["total"] == pytest.approx(sum(v for k, v in result["bytes"].items() if k != "total"))
    assert result["tokens"] == 950 * 1024  # 1000 lines, 5% eval, 1 epoch, max_seq_len tokens each


def test_cli_estimate_table(tmp_path, capsys):
    assert main(["estimate", str(write_config(tmp_path, method="full")), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    # stage auto on 8 x 80 GB: DDP would need the 18 B/param of all 8B weights per GPU; ZeRO-1 shards the optimizer.
    assert "full on tunekit:llama-3-8b" in out and "ZeRO stage 1" in out
    assert "deepspeed    ZeRO-1 (stage auto: 8 processes: DDP (no DeepSpeed) needs" in out
    path = write_config(tmp_path, method="full")
    path.write_text(path.read_text() + "deepspeed:\n  stage: 3\n")
    assert main(["estimate", str(path), "--gpus", "8", "--json"]) == 0
    zero = json.loads(capsys.readouterr().out)["zero"]
    assert (zero["deepspeed"], zero["stage"], zero["auto"], zero["reason"]) == (True, 3, False, "as configured")


def test_cli_estimate_unknown_model_is_exit_2(tmp_path, capsys):
    assert main(["estimate", str(write_config(tmp_path, model="tunekit:nope"))]) == 2
    assert "no shipped model config" in capsys.readouterr().err


# ---------------------------------------------------------------- offline: hub ids whose shape tunekit ships


def test_hub_id_table_agrees_with_the_shipped_files():
    # Each shipped file's own hub id (its _name_or_path) resolves to it; each table entry names a shipped file.
    for name in est.shipped_model_configs():
        hub_id = json.loads((est.MODEL_CONFIG_DIR / f"{name}.json").read_text())["_name_or_path"]
        assert est.shipped_name(hub_id) == name
    assert set(est.HUB_IDS.values()) <= set(est.shipped_model_configs())
    assert all(hub_id == hub_id.lower() for hub_id in est.HUB_IDS)  # looked up lower-cased


@pytest.fixture
def hub_forbidden(monkeypatch):
    """huggingface_hub offline (HF_HUB_OFFLINE), and the one request the estimate could make is a test failure."""
    import huggingface_hub
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError("the estimate asked the hub")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refuse)


@pytest.mark.parametrize("hub_id, name", [
    ("meta-llama/Meta-Llama-3-8B", "llama-3-8b"),
    ("META-LLAMA/meta-llama-3-8b-instruct", "llama-3-8b"),  # the hub matches ids case-insensitively
    ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
    ("mistralai/Mistral-7B-Instruct-v0.1", "mistral-7b"),
    ("codellama/CodeLlama-34b-hf", "codellama-34b"),
])
def test_known_hub_ids_resolve_to_the_shipped_shape(hub_forbidden, hub_id, name):
    shape = est.count_params(hub_id, LoraConfig(), "lora")
    assert shape["params"] == PUBLISHED_PARAMS[name]
    assert shape["source"].startswith(f"shipped config {name} ")


def test_a_local_directory_wins_over_the_table(tiny_dir, tmp_path, monkeypatch):
    local = tmp_path / "meta-llama" / "Meta-Llama-3-8B"
    local.mkdir(parents=True)
    (local / "config.json").write_text((tiny_dir / "config.json").read_text())
    monkeypatch.chdir(tmp_path)
    shape = est.count_params("meta-llama/Meta-Llama-3-8B", LoraConfig(), "lora")
    assert shape["params"] == est.count_params(tiny_dir, LoraConfig(), "lora")["params"]
    assert shape["source"] == "local config meta-llama/Meta-Llama-3-8B"


def test_unknown_hub_id_offline_is_one_line_without_a_request(hub_forbidden):
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as info:
        est.count_params("someone/not-shipped-7b", LoraConfig(), "lora")
    assert "\n" not in str(info.value) and "tunekit:llama-3-8b" in str(info.value)


def hubless_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a machine with no hub: not declared offline, and every connection to the hub refused
    (port 9 on localhost), with an empty hub cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))
    return env


def test_readme_estimate_example_runs_without_a_hub(tmp_path):
    command = "tunekit estimate configs/examples/llama3-8b-lora.yaml --gpus 1 --gpu-memory 80"
    assert command in (REPO / "README.md").read_text()
    done = subprocess.run([sys.executable, "-m", "tunekit", *command.split()[1:]], cwd=REPO, env=hubless_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("lora on meta-llama/Meta-Llama-3-8B (llama), 1 x 80.0 GB GPU")
    assert "shape: shipped config llama-3-8b (same modules as hub id meta-llama/Meta-Llama-3-8B" in done.stdout
    assert "fits: " in done.stdout
    assert "127.0.0.1" not in done.stderr and "Retry" not in done.stderr  # no request was even tried


def test_unknown_hub_id_with_no_hub_fails_after_one_request(tmp_path):
    config = write_config(tmp_path, model="someone/x-7b")
    done = subprocess.run([sys.executable, "-m", "tunekit", "estimate", str(config)], env=hubless_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    # One line, nothing else: no retry warnings (huggingface_hub's own download retries for ~25 s), no traceback.
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: model.name_or_path: cannot read a model config from 'someone/x-7b': no such local directory, "
                                  "and its hub request failed (ConnectError")


# ---------------------------------------------------------------- configs without a LoRA section, DeepSpeed settings


def raw_config(method: str, **sections) -> dict:
    source = {"path": "train.jsonl", "format": "alpaca", "max_examples": 1000}
    return {"method": method, "output_dir": "out", "model": {"name_or_path": "tunekit:llama-2-7b"},
            "data": {"sources": [source], "max_seq_len": 512},
            "training": {"per_device_train_batch_size": 1, "gradient_checkpointing": True}, **sections}


@pytest.mark.parametrize("stage", ["auto", 3])
def test_full_run_alternatives_equal_those_runs_estimated_directly(stage):
    # A full config has no lora/qlora section: its LoRA and QLoRA rows are the default-LoRA runs under the same
    # DeepSpeed section (auto chooses for each method; an explicit stage is capped at QLoRA's highest).
    full = config_mod.parse(raw_config("full", **({} if stage == "auto" else {"deepspeed": {"stage": stage}})))
    assert not hasattr(full, "lora") and full.deepspeed.zero_stage() == stage
    alternatives = est.estimate(full, gpus=8)["alternatives"]
    for method in ("lora", "qlora"):
        written = stage if stage == "auto" else min(stage, config_mod.CONFIG_CLASSES[method].MAX_ZERO_STAGE)
        direct = est.estimate(config_mod.parse(raw_config(method, deepspeed={"stage": written})), gpus=8)
        assert alternatives[method]["zero_stage"] == direct["assumptions"]["zero_stage"]
        assert alternatives[method]["zero"] == direct["zero"]["label"]
        assert alternatives[method]["needed_bytes"] == pytest.approx(direct["needed_bytes"])
        assert alternatives[method]["needed_bytes"] == pytest.approx(direct["alternatives"][method]["needed_bytes"])


def test_users_deepspeed_config_gives_stage_and_offload(tmp_path):
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    generated = est.estimate(config_mod.parse(raw_config("full", deepspeed={"stage": 2, "offload_optimizer": True})),
                             gpus=4)
    for given in (ds, str(path)):  # inline or a JSON file: the same as the generated section that says so
        result = est.estimate(config_mod.parse(raw_config("full", deepspeed={"config": given})), gpus=4)
        assert result["assumptions"]["zero_stage"] == 2
        assert result["per_device"]["optimizer"] == 0 and result["cpu_offload_bytes"] > 0
        assert result["per_device"] == generated["per_device"]


# ---------------------------------------------------------------- the loss head, adapters, the machine (issue 17)


def test_the_fused_head_constants_are_trls():
    # The estimate counts TRL's chunked loss by these tile sizes: an upgrade that changes them must fail here.
    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    assert est.FUSED_HEAD_TOKEN_CHUNK == chunked_logprob.TOKEN_CHUNK_SIZE
    assert est.FUSED_HEAD_VOCAB_CHUNK == trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def test_fused_head_counts_one_logits_tile_not_the_logits():
    shape = est.count_params("tunekit:llama-3-8b", LoraConfig(), "lora")

    def head(vocab: int, tokens: int = 8192, **kwargs) -> float:
        return est.lm_head_bytes({**shape, "vocab_size": vocab}, tokens=tokens, act_bytes=2, base_trains=False,
                                 **kwargs)

    # The logits term of the fused path IS the chunk term: beyond 32768 entries the vocabulary costs nothing more,
    # below it the one [4096, vocab] bf16 tile shrinks with it; the [tokens, vocab] logits never appear.
    assert head(128_256) == head(32_768) == head(200_000)
    assert head(32_768) - head(16_384) == 4096 * (32_768 - 16_384) * 2
    assert head(32_768, tokens=1000) - head(16_384, tokens=1000) == 1000 * (32_768 - 16_384) * 2  # fewer tokens
    # Without Triton (CPU) the torch fold's fp32 temporaries come per tile element too.
    assert head(32_768, triton=False) - head(32_768) == 4096 * 32_768 * est.memory.FUSED_HEAD_TORCH_FOLD_BYTES
    # A loss on full logits: 10 B per token and vocabulary entry (bf16 logits, fp32 copy, fp32 log-softmax).
    assert head(128_256, fused=False) - head(32_000, fused=False) == 8192 * (128_256 - 32_000) * 10
    # What the old estimate charged the QLoRA example (4 x 2048 tokens, 128K vocabulary) and no longer does.
    assert head(128_256, fused=False) - head(128_256) > 10e9


def test_adapter_bytes_follow_what_trl_peft_and_deepspeed_do():
    lora = est.adapter_bytes("lora", compute_bytes=2, deepspeed=False, optim="adamw_torch")
    assert lora == {"weights": 4, "gradients": 4, "optimizer": 8}  # peft's fp32 adapters, no master copy
    qlora = est.adapter_bytes("qlora", compute_bytes=2, deepspeed=False, optim="adamw_torch")
    assert qlora == {"weights": 2, "gradients": 2, "optimizer": 4}  # TRL's bf16 cast; torch Adam states in bf16
    assert est.adapter_bytes("qlora", compute_bytes=4, deepspeed=False, optim="paged_adamw_8bit")["weights"] == 2
    assert est.adapter_bytes("qlora", compute_bytes=2, deepspeed=False, optim="paged_adamw_32bit")["optimizer"] == 8
    for method in ("lora", "qlora"):  # DeepSpeed bf16: compute-dtype weights, fp32 master + gradients + states
        assert est.adapter_bytes(method, compute_bytes=2, deepspeed=True, optim="adamw_torch") == {
            "weights": 2, "gradients": 4, "optimizer": 12}


def test_qlora_adapters_are_bf16_under_the_trainer_as_counted(tiny_base, demo_data, tmp_path):
    """tunekit builds the PeftModel itself, yet TRL's SFTTrainer still casts a 4-bit model's trainable parameters to
    bf16 (is_loaded_in_4bit reaches the base through peft): the estimate's 2 B per adapter weight is what runs."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from tunekit.backends import lora
    from tunekit.backends.common import training_arguments
    from tunekit.callbacks import TunekitTrainer

    config = config_mod.load(REPO / "configs/tiny-qlora.yaml", [
        f"model.name_or_path={tiny_base}", f"data.sources.0.path={demo_data['train']}",
        f"data.eval_path={demo_data['eval']}", f"output_dir={tmp_path / 'run'}", "logging.report_to=[none]",
        f"eval.general={demo_data['text']}"])  # the shipped path exists only after `make tiny`; CI runs from a clone
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 2, "labels": [[-100, 2, 3, 4]] * 2})
    trainer = TunekitTrainer(model=lora.build_model(config, tokenizer), args=training_arguments(config),
                             train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)
    sizes = {p.element_size() for p in trainer.model.parameters() if p.requires_grad}
    counted = est.adapter_bytes("qlora", compute_bytes=4, deepspeed=False, optim=config.training.optim)  # CPU: fp32
    assert sizes == {counted["weights"]} == {2}


def test_train_preflight_uses_the_real_gpu_and_world_size_not_the_configs_plan(monkeypatch):
    import torch

    class Props:
        total_memory = 80 * GB

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: seen.append(index) or Props())
    monkeypatch.setenv("WORLD_SIZE", "16")  # 4 nodes x 4 GPUs
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert est.probe_hardware("cuda") == est.Machine("cuda", 16, 80.0) and seen == [3]
    monkeypatch.delenv("WORLD_SIZE")  # a plain `tunekit train`: one process, one GPU
    monkeypatch.delenv("LOCAL_RANK")
    assert est.probe_hardware("cuda") == est.Machine("cuda", 1, 80.0)
    # The config's planning values change nothing: 64 GPUs of 1000 GB would make a 70B full run fit.
    config = run_config("full", model="tunekit:llama-3-70b")
    config.preflight.gpus, config.preflight.gpu_memory_gb = 64, 1000
    with pytest.raises(UserError, match=r"per GPU \(1 GPU\(s\) of 80"):
        est.preflight_check(config)
    assert est.machine(cuda_available=False, device_memory_gb=None, world_size="2", host_memory_gb=64) == \
        est.Machine("cpu", 2, 64)


def example(method: str):
    return config_mod.load(REPO / f"configs/examples/llama3-8b-{method}.yaml")


@pytest.mark.parametrize("method, gpus, fits, zero", [
    # LoRA/QLoRA examples have no deepspeed section: the plain Trainer on one GPU, DDP on several.
    ("lora", 1, True, "no DeepSpeed (plain Trainer)"), ("qlora", 1, True, "no DeepSpeed (plain Trainer)"),
    ("lora", 8, True, "DDP (no DeepSpeed)"), ("qlora", 8, True, "DDP (no DeepSpeed)"),
    # Full fine-tuning of 8B (stage auto) cannot fit one 80 GB GPU on the GPU alone by any honest count: 32 GB fp32
    # weights + 32 GB fp32 gradients + 64 GB Adam states for the plain Trainer. auto offloads the optimizer states
    # (ZeRO-Offload, 96 GB of host RAM). On 8 GPUs (the example's header and launch line) ZeRO-1 is the lowest that
    # fits: the 12 B/param of fp32 master and Adam states sharded, bf16 weights and fp32 gradients replicated.
    ("full", 1, True, "ZeRO-2 + optimizer offload"), ("full", 8, True, "ZeRO-1"),
])
def test_example_configs_on_80gb_gpus(method, gpus, fits, zero):
    config = example(method)
    result = est.preflight_check(config, machine=est.Machine("cuda", gpus, 80.0), force=True)
    assert result["fits"] is fits, est.format_estimate(result)
    assert result["zero"]["label"] == zero and result["zero"]["fits"] is fits
    if method == "qlora":  # pinned to 24 GB for planning: `train` on an 80 GB GPU must not read that
        assert config.preflight.gpu_memory_gb == 24 and result["gpu_memory_bytes"] == 80 * GB
    if method == "full":
        assert config.preflight.gpus == 8  # the example states its GPU count


# ---------------------------------------------------------------- preference objectives (dpo, orpo)

def preference_config(method: str, objective: str, reference: str | None = None, **extra) -> RunConfig:
    """run_config's 7B run with preference data and `objective` (dpo: dpo.reference as given)."""
    raw = {
        "method": method, "output_dir": "out", "objective": objective,
        "model": {"name_or_path": "tunekit:llama-2-7b"},
        "data": {"sources": [{"path": "pairs.jsonl", "format": "preference", "max_examples": 50_000}],
               "max_seq_len": 512},
        "training": {"per_device_train_batch_size": 1, "gradient_checkpointing": True},
        **extra,
    }
    if reference is not None:
        raw["dpo"] = {"reference": reference}
    return config_mod.parse(raw)


@pytest.mark.parametrize("stage, gpus", [(0, 1), (2, 8), (3, 8)])
def test_dpo_full_reference_is_one_frozen_weight_copy_sharded_like_the_policy(stage, gpus):
    kwargs = dict(zero_stage=stage, gpus=gpus, deepspeed=True)
    shape, orpo = mem("llama-2-7b", "full", pairs=True, **kwargs)  # the same pairs, no reference
    _, dpo = mem("llama-2-7b", "full", pairs=True, reference="model", **kwargs)
    for key in ("weights", "gradients", "optimizer"):  # no gradients or optimizer state for the reference
        assert dpo["per_device"][key] == orpo["per_device"][key]
    share = shape["params"] * est.BYTES_PER_PARAM_BF16 / (gpus if stage == 3 else 1)  # TRL: ZeRO-3 or stage 0
    assert dpo["per_device"]["reference"] == pytest.approx(share)
    assert dpo["job"]["reference"] == pytest.approx(shape["params"] * est.BYTES_PER_PARAM_BF16 * (1 if stage == 3
                                                                                                  else gpus))
    assert dpo["per_device"]["activations"] > orpo["per_device"]["activations"]  # the reference's forward
    assert "reference" not in orpo["per_device"]  # sft and orpo have no reference line


def test_dpo_full_reference_under_the_plain_trainer_is_fp32_like_its_weights():
    _, dpo = mem("llama-2-7b", "full", pairs=True, reference="model", deepspeed=False)
    assert dpo["per_device"]["reference"] == dpo["per_device"]["weights"]


def test_dpo_reference_offloads_with_the_parameters():
    shape, dpo = mem("llama-2-7b", "full", pairs=True, reference="model", zero_stage=3, gpus=8,
                     offload_optimizer=True, offload_param=True)
    assert dpo["per_device"]["reference"] == 0
    # host memory: the policy's and the reference's bf16 weights, Adam's m and v and the fp32 master copy
    assert dpo["cpu_offload"] == pytest.approx(shape["params"] * (
        2 * est.BYTES_PER_PARAM_BF16 + est.ADAM_BYTES_PER_PARAM["adamw_torch"] + est.BYTES_PER_PARAM_MASTER))


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_precomputed_reference_costs_no_memory_during_training(method):
    _, orpo = mem("llama-2-7b", method, pairs=True)
    _, pre = mem("llama-2-7b", method, pairs=True, reference="precomputed")
    assert pre["per_device"]["reference"] == 0
    assert {k: v for k, v in pre["per_device"].items() if k != "reference"} == orpo["per_device"]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_dpo_reference_is_the_base_without_its_adapter(method):
    _, orpo = mem("llama-2-7b", method, pairs=True)
    _, dpo = mem("llama-2-7b", method, pairs=True, reference="model")
    assert dpo["per_device"]["reference"] == 0  # no weight bytes: the adapter is disabled, not a second copy
    for key in ("weights", "gradients", "optimizer"):
        assert dpo["per_device"][key] == orpo["per_device"][key]
    assert dpo["per_device"]["activations"] > orpo["per_device"]["activations"]  # but a second, no-grad forward


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_pairs_cost_the_activations_of_twice_the_sequences(method, checkpointing):
    _, pairs = mem("llama-2-7b", method, pairs=True, micro_batch=2, gradient_checkpointing=checkpointing)
    _, doubled = mem("llama-2-7b", method, micro_batch=4, gradient_checkpointing=checkpointing)
    assert pairs["per_device"]["activations"] == doubled["per_device"]["activations"]


def test_dpo_estimate_names_the_reference_and_counts_its_forward():
    sft_like = est.estimate(preference_config("full", "orpo"), gpus=8, gpu_memory_gb=80)
    dpo = est.estimate(preference_config("full", "dpo", "model"), gpus=8, gpu_memory_gb=80)
    pre = est.estimate(preference_config("full", "dpo", "precomputed"), gpus=8, gpu_memory_gb=80)
    sft = est.estimate(run_config("full"), gpus=8, gpu_memory_gb=80)  # the same 50,000 rows as single sequences
    assert dpo["tokens"] == sft_like["tokens"] == 2 * sft["tokens"]  # pairs: chosen + rejected sequences
    ratio = (dpo["flops"] - sft_like["flops"]) / sft_like["flops"]
    assert ratio == pytest.approx(2 / 8, rel=0.02)  # a 2N forward per token beside 6N + 2N (checkpointing); ~attention
    assert pre["flops"] == pytest.approx(dpo["flops"])  # one epoch: the precompute pass is the same tokens once
    assert pre["per_device"]["reference"] == 0 and dpo["per_device"]["reference"] > 0
    assert sft_like["assumptions"]["reference"] is None and "reference" not in sft_like["bytes"]
    text = est.format_estimate(dpo)
    assert "  reference " in text and "frozen copy" in text and "x2 sequences" in text
    assert "precomputed" in est.format_estimate(pre)
    json.dumps(dpo)


def test_precomputed_reference_is_one_pass_over_the_data_whatever_the_epochs():
    one = est.estimate(preference_config("lora", "dpo", "precomputed"), gpus=1, gpu_memory_gb=80)
    three = est.estimate(preference_config("lora", "dpo", "precomputed", **{"training": {
        "per_device_train_batch_size": 1, "gradient_checkpointing": True, "num_train_epochs": 3}}),
        gpus=1, gpu_memory_gb=80)
    orpo3 = est.estimate(preference_config("lora", "orpo", **{"training": {
        "per_device_train_batch_size": 1, "gradient_checkpointing": True, "num_train_epochs": 3}}),
        gpus=1, gpu_memory_gb=80)
    orpo1 = est.estimate(preference_config("lora", "orpo"), gpus=1, gpu_memory_gb=80)
    assert three["flops"] - orpo3["flops"] == pytest.approx(one["flops"] - orpo1["flops"])


def test_choose_zero_sees_the_reference():
    from tunekit.estimate.stage import choose_zero

    orpo = choose_zero(preference_config("full", "orpo"), 2, 80)
    dpo = choose_zero(preference_config("full", "dpo", "model"), 2, 80)
    assert (orpo["stage"], dpo["stage"]) == (2, 3)  # the whole reference copy on each rank does not fit at ZeRO-2
    assert choose_zero(preference_config("full", "dpo", "precomputed"), 2, 80)["stage"] == 2
