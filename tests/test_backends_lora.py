"""LoRA and QLoRA for real on the tiny base: a 4-bit base that trains, LoRA under ZeRO-3 on 2 processes whose saved
adapter holds the real weights, new vocabulary rows trained without full fine-tuning, and bad input."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_backends_full import REPO, fixture_overrides, launch, make_config
from tunekit import config as config_mod
from tunekit.backends import lora
from tunekit.backends.common import load_tokenizer
from tunekit.cli import main


def read_summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_every_method_has_a_backend():
    from tunekit.train import BACKENDS

    assert set(BACKENDS) == set(config_mod.METHODS)


# ---------------------------------------------------------------- QLoRA


@pytest.mark.slow
def test_qlora_base_is_4bit_and_loss_falls(tmp_path, tiny_base, demo_data):
    import bitsandbytes as bnb

    args = ["train", str(REPO / "configs/tiny-qlora.yaml"), *fixture_overrides(tmp_path, tiny_base, demo_data, steps=12),
            "--set", "eval.task_metric=none", "--set", "eval.general="]
    assert main(args) == 0
    summary = read_summary(tmp_path / "run")
    assert summary["train_loss_last"] < summary["train_loss_first"]

    # Every linear projection of every decoder layer is a 4-bit bitsandbytes layer (lm_head stays full precision).
    config = config_mod.load(REPO / "configs/tiny-qlora.yaml", [a for a in args[2:] if a != "--set"])
    model = lora.build_model(config, load_tokenizer(config))
    n_layers = model.config.num_hidden_layers
    expected = n_layers * 7  # all-linear on the tiny Llama: q, k, v, o, gate, up and down projections
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert summary["quantized_modules"] == lora.count_quantized_modules(model) == len(quantized) == expected
    for module in quantized:
        weight = module.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8
        assert weight.numel() * 2 == module.in_features * module.out_features  # two 4-bit codes per byte
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantization
        assert not weight.requires_grad
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)  # the adapters


def test_qlora_without_bitsandbytes_is_one_error_line(tmp_path, tiny_base, capsys, monkeypatch):
    config = make_config(tmp_path, tiny_base, "qlora")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    assert main(["train", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: method: qlora needs bitsandbytes, which cannot load here")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- LoRA under ZeRO-3, 2 processes

# Runs `tunekit train ...` under the launcher, then (collectively: every rank enters) gathers the trainable
# weights the way DeepSpeed holds them after training and writes rank 0's copy to OUT, with the shard sizes.
PROBE = """
import sys
import deepspeed, torch
import tunekit.train
from tunekit.cli import main

out = sys.argv[1]
save_final = tunekit.train.save_final

def save_final_then_gather(trainer, tokenizer, config):
    final_dir = save_final(trainer, tokenizer, config)
    named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    local = sum(p.ds_tensor.numel() for _, p in named)
    # The kwargs activation checkpointing really runs with, per checkpointed layer.
    checkpointing = [m._gradient_checkpointing_func.keywords for m in trainer.model.modules()
                     if getattr(m, "gradient_checkpointing", False)]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        if trainer.is_world_process_zero():
            torch.save({"weights": {name: p.detach().clone() for name, p in named}, "local": local,
                        "full": sum(p.ds_numel for _, p in named), "checkpointing": checkpointing}, out)
    return final_dir

tunekit.train.save_final = save_final_then_gather
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_lora_zero3_two_processes_saves_the_real_adapter(tmp_path, tiny_base, demo_data):
    probe, gathered_path = tmp_path / "probe.py", tmp_path / "gathered.pt"
    probe.write_text(PROBE)
    launch(tmp_path, [str(probe), str(gathered_path), "train", "configs/tiny-lora.yaml",
                      *fixture_overrides(tmp_path, tiny_base, demo_data, steps=12),
                      "--set", "deepspeed.stage=3", "--set", "eval.task_metric=none", "--set", "eval.general=",
                      "--set", "training.gradient_checkpointing=true"])
    run = tmp_path / "run"
    summary = read_summary(run)
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2
    assert summary["train_loss_last"] < summary["train_loss_first"]

    gathered = torch.load(gathered_path)
    # Non-reentrant checkpointing trained under ZeRO-3 with frozen base weights (TRL would switch it to reentrant).
    assert gathered["checkpointing"] and all(kw == {"use_reentrant": False} for kw in gathered["checkpointing"])
    assert gathered["local"] < 0.6 * gathered["full"]  # the adapters themselves were sharded over the 2 ranks
    # peft names the saved tensors without the adapter name ("default").
    expected = {name.replace(".default", ""): value for name, value in gathered["weights"].items()}
    saved = load_file(run / "final" / "adapter_model.safetensors")
    assert set(saved) == set(expected) and len(saved) > 0
    r = json.loads((run / "final" / "adapter_config.json").read_text())["r"]
    for name, tensor in saved.items():
        assert tensor.dim() == 2 and r in tensor.shape and min(tensor.shape) > 0, (name, tensor.shape)
        assert torch.equal(tensor, expected[name]), name
    # Trained, not the initial adapter (peft starts every lora_B at zero).
    assert all(tensor.abs().sum() > 0 for name, tensor in saved.items() if "lora_B" in name)


# ---------------------------------------------------------------- new tokens under LoRA


@pytest.mark.slow
def test_lora_trains_new_token_rows_and_leaves_old_rows_alone(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    new_token = "<|tool|>"
    data = tmp_path / "tool.jsonl"
    with open(data, "w") as f:
        for words in ("cat dog", "red sun", "big tree", "blue moon") * 16:
            f.write(json.dumps({"instruction": "Call the tool on the words.", "input": words,
                                "output": f"{new_token} {words}"}) + "\n")
    args = ["train", str(REPO / "configs/tiny-lora.yaml"), "--set", f"model.name_or_path={tiny_base}",
            "--set", f"model.add_tokens=['{new_token}']", "--set", f"data.sources.0.path={data}",
            "--set", "data.eval_path=", "--set", "data.eval_fraction=0", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f"output_dir={tmp_path / 'run'}", "--set", "training.max_steps=8", "--set", "training.logging_steps=2",
            "--set", "checkpoints.save_steps=8", "--set", "eval.task_metric=none", "--set", "eval.general="]
    assert main(args) == 0
    final = tmp_path / "run" / "final"
    summary = read_summary(tmp_path / "run")
    assert summary["train_loss_last"] < summary["train_loss_first"]

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    old_rows = base.get_input_embeddings().weight.shape[0]
    tokenizer = load_tokenizer(config_mod.load(REPO / "configs/tiny-lora.yaml", [a for a in args[2:] if a != "--set"]))
    new_id = tokenizer.convert_tokens_to_ids(new_token)
    assert new_id == old_rows  # appended: one new row
    indices = json.loads((final / "adapter_config.json").read_text())["trainable_token_indices"]
    assert indices == {"model.embed_tokens": [new_id], "lm_head": [new_id]}

    saved = load_file(final / "adapter_model.safetensors")
    originals = {"model.embed_tokens": base.get_input_embeddings().weight.detach().clone(),  # [old_rows, hidden]
                 "lm_head": base.get_output_embeddings().weight.detach().clone()}
    for module, original in originals.items():
        frozen = saved[f"base_model.model.{module}.token_adapter.base_layer.weight"]  # [old_rows + 1, hidden]
        delta = saved[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]  # [1, hidden]: the new row
        assert torch.equal(frozen[:old_rows], original)  # old rows: bit-identical to the base
        assert not torch.allclose(delta[0], frozen[new_id], atol=1e-4)  # new row: moved from its initial value

    # Reload: a resized base plus the saved adapter gives the trained rows, old rows untouched.
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reloaded = PeftModel.from_pretrained(base, final)
    for module, weight in (("model.embed_tokens", reloaded.get_input_embeddings().weight),
                           ("lm_head", reloaded.get_output_embeddings().weight)):
        delta = saved[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]
        assert torch.equal(weight[new_id], delta[0])
        assert torch.equal(weight[:old_rows], originals[module])


def test_new_tokens_under_lora_zero3_are_refused(tmp_path, tiny_base):
    from tunekit.errors import UserError

    config = config_mod.load(make_config(tmp_path, tiny_base, "lora", "deepspeed:\n  stage: 3\n"), ["model.add_tokens=['<|x|>']"])
    with pytest.raises(UserError, match=re.escape("model.add_tokens: new token rows cannot be trained under deepspeed stage 3")):
        lora.check_zero3_new_tokens(config)
    lora.check_zero3_new_tokens(config_mod.load(make_config(tmp_path, tiny_base, "lora", "deepspeed:\n  stage: 2\n"),
                                                ["model.add_tokens=['<|x|>']"]))  # stage 2: allowed
