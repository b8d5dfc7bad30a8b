"""The CUDA-only decisions of the backends, on their CPU seams (issue 17, items 1, 4, 7, 8, 10).

Each decision is a pure function of explicit facts (is there a GPU, how many, which launcher variables, which ZeRO
stage, which precision), tested for every branch here; the load path is then driven with the machine's facts
patched (`on_gpu`, `device_count`, flash availability) to show it uses the decision. What only a real GPU can show is
in tests/test_gpu.py.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_backends_full import make_config
from tunekit import config as config_mod
from tunekit.backends import common, lora
from tunekit.cli import main
from tunekit.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def load(tmp_path, tiny_base, method="lora", extra="", overrides=()):
    return config_mod.load(make_config(tmp_path, tiny_base, method, extra), list(overrides))


@pytest.fixture
def fake_gpu(monkeypatch):
    """This process sees one CUDA GPU (as far as tunekit's decisions ask), no launcher, 80 GB."""
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(common, "gpu_memory_bytes", lambda: 80 * 10**9, raising=False)  # raising: the old code had none
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.setenv(name, "x")  # recorded, so the deletion below is undone after the test
        monkeypatch.delenv(name)
    return monkeypatch


def capture_from_pretrained(monkeypatch) -> dict:
    """Replace AutoModelForCausalLM.from_pretrained; return the dict its keyword arguments are written to."""
    from transformers import AutoModelForCausalLM

    seen: dict = {}

    def fake(name, **kwargs):
        seen.update(kwargs)
        return "model"

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    return seen


# ---------------------------------------------------------------- 1. weights load onto the process's GPU


@pytest.mark.parametrize("cuda, stage, rank, expected", [
    (True, None, 0, {"": 0}),   # LoRA/QLoRA, one GPU or DDP
    (True, None, 3, {"": 3}),   # DDP rank 3: its own GPU, the Trainer's cuda:LOCAL_RANK
    (True, 1, 1, {"": 1}),      # ZeRO 1/2: every rank holds the whole model
    (True, 2, 0, {"": 0}),
    (True, 3, 0, None),         # ZeRO-3 partitions at load (transformers refuses a device_map there)
    (False, None, 0, None),     # CPU
    (False, 2, 1, None),
])
def test_device_map_puts_the_whole_model_on_this_process_gpu_unless_zero3(cuda, stage, rank, expected):
    assert common.device_map(cuda, stage, rank) == expected


def test_the_load_path_passes_the_device_map(tmp_path, tiny_base, fake_gpu):
    seen = capture_from_pretrained(fake_gpu)
    fake_gpu.setenv("LOCAL_RANK", "1")
    common.from_pretrained(load(tmp_path, tiny_base, "lora"))
    assert seen["device_map"] == {"": 1}
    seen.clear()
    common.from_pretrained(load(tmp_path, tiny_base, "full", "deepspeed:\n  stage: 2\n"))
    assert seen["device_map"] == {"": 1}
    seen.clear()
    common.from_pretrained(load(tmp_path, tiny_base, "lora", "deepspeed:\n  stage: 3\n"))
    assert "device_map" not in seen


def test_on_cpu_the_load_has_no_device_map(tmp_path, tiny_base, monkeypatch):
    seen = capture_from_pretrained(monkeypatch)
    common.from_pretrained(load(tmp_path, tiny_base, "lora"))
    assert "device_map" not in seen


# ---------------------------------------------------------------- 4. process-group set-up without a launcher


@pytest.mark.parametrize("deepspeed, cuda, gpus, env, group_of_one, gloo", [
    (True, False, 0, {}, True, True),                                  # plain `tunekit train`, CPU: today's path
    (True, False, 0, {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, True),  # accelerate launch on CPU
    (True, True, 1, {}, True, False),                                  # plain `tunekit train`, one GPU: a group of one
    (True, True, 8, {"LOCAL_RANK": "0", "WORLD_SIZE": "8"}, False, False),  # launched: the Trainer's own nccl set-up
    (True, True, 8, {"WORLD_SIZE": "8"}, False, False),
    (False, True, 1, {}, False, False),                                # LoRA on one GPU: no group needed
    (False, True, 8, {"LOCAL_RANK": "0", "WORLD_SIZE": "8"}, False, False),  # DDP under a launcher
    (False, False, 0, {}, False, False),
])
def test_process_setup_for_each_launch(deepspeed, cuda, gpus, env, group_of_one, gloo):
    assert common.process_setup(deepspeed, cuda, gpus, env) == common.ProcessSetup(group_of_one, gloo)


@pytest.mark.parametrize("deepspeed, launcher", [(True, "single-node-8gpu-zero3.yaml"),
                                                 (False, "single-node-8gpu-ddp.yaml")])
def test_several_gpus_without_a_launcher_are_refused_with_the_launch_line(deepspeed, launcher):
    with pytest.raises(UserError) as raised:
        common.process_setup(deepspeed, True, 4, {"PATH": "/usr/bin"})
    message = str(raised.value)
    assert "\n" not in message
    assert f"accelerate launch --config_file configs/accelerate/{launcher} --num_processes 4 -m tunekit train" \
        in message
    assert (REPO / "configs" / "accelerate" / launcher).is_file()


def test_one_gpu_deepspeed_run_without_a_launcher_gets_a_group_of_one(fake_gpu):
    for name in ("LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        fake_gpu.setenv(name, "x")
        fake_gpu.delenv(name)
    assert common.set_up_processes({"zero_optimization": {"stage": 3}}) is False  # the Trainer builds the state
    import os

    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_train_refuses_several_gpus_before_loading_anything(tmp_path, tiny_base, fake_gpu, capsys):
    fake_gpu.setattr(torch.cuda, "device_count", lambda: 2)
    import tunekit.train

    fake_gpu.setattr(tunekit.train, "load_tokenizer", lambda config: pytest.fail("loaded a tokenizer"))
    assert main(["train", str(make_config(tmp_path, tiny_base, "lora"))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 GPUs are visible to one process" in errors[0]
    assert "configs/accelerate/single-node-8gpu-ddp.yaml --num_processes 2" in errors[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 7. LoRA adapters under ZeRO-3, checkpointing kwargs


@pytest.mark.parametrize("stage, quantized, autocast", [(3, False, False), (3, True, True), (2, False, True),
                                                       (1, False, True), (None, False, True), (None, True, True)])
def test_adapters_keep_the_base_dtype_only_under_zero3(stage, quantized, autocast):
    assert lora.autocast_adapters(stage, quantized) is autocast


@pytest.mark.parametrize("stage, adapter_dtype", [(3, torch.bfloat16), (2, torch.float32)])
def test_lora_adapters_on_a_bf16_base_are_bf16_under_zero3(tmp_path, tiny_base, stage, adapter_dtype):
    from tunekit.backends.common import load_tokenizer

    config = load(tmp_path, tiny_base, "lora", f"deepspeed:\n  stage: {stage}\n", ["model.dtype=bfloat16"])
    model = lora.build_model(config, load_tokenizer(config))  # no Trainer arguments yet: loads whole, not sharded
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == adapter_dtype for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)


def test_non_reentrant_checkpointing_is_put_back_on_the_model(tmp_path, tiny_base):
    """TRL sets use_reentrant=True for PEFT + ZeRO-3 before the Trainer enables checkpointing; the kwargs that reach
    the model's layers must be ours again (the 2-process ZeRO-3 test in test_backends_lora.py runs the real path)."""
    from tunekit.backends.common import load_tokenizer

    config = load(tmp_path, tiny_base, "lora")
    model = lora.build_model(config, load_tokenizer(config))
    trl_kwargs = {"use_reentrant": True}
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=trl_kwargs)  # what the Trainer did
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(gradient_checkpointing=True,
                                                                gradient_checkpointing_kwargs=trl_kwargs))
    common.keep_checkpointing_kwargs(trainer)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False} for m in layers)
    assert trainer.args.gradient_checkpointing_kwargs == trainer.args.activation_checkpointing_kwargs \
        == {"use_reentrant": False}


# ---------------------------------------------------------------- 8. precision and load dtype


@pytest.mark.parametrize("wanted, cuda, native, expected", [
    ("auto", True, True, "bf16"),     # A100/H100
    ("auto", True, False, "fp32"),    # V100/T4: bf16 only emulated
    ("auto", False, False, "fp32"),   # CPU
    ("bf16", False, False, "bf16"),   # asked for: kept
    ("fp16", True, False, "fp16"),
])
def test_resolve_precision(wanted, cuda, native, expected):
    assert common.resolve_precision(wanted, cuda, native) == expected


def test_fp16_without_a_gpu_is_refused():
    with pytest.raises(UserError, match="training.precision: fp16 needs a CUDA GPU"):
        common.resolve_precision("fp16", False, False)


def test_auto_precision_does_not_count_emulated_bf16(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    # A V100: bf16 "supported" only when emulation counts (torch's default).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert common.precision(load(tmp_path, tiny_base, "lora")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert common.precision(load(tmp_path, tiny_base, "lora")) == "bf16"


@pytest.mark.parametrize("method, model_dtype, mode, deepspeed, expected", [
    ("full", "auto", "bf16", True, torch.bfloat16),   # DeepSpeed casts to bf16 before its fp32 master copy anyway
    ("full", "auto", "fp16", True, torch.float16),
    ("full", "auto", "fp32", True, torch.float32),
    ("full", "float32", "bf16", True, torch.float32),  # model.dtype, when set, wins
    ("lora", "auto", "bf16", False, torch.bfloat16),
    ("lora", "auto", "fp16", False, torch.float32),    # fp16 AMP keeps fp32 weights
    ("qlora", "auto", "bf16", False, torch.bfloat16),
    ("lora", "auto", "fp32", True, torch.float32),
])
def test_load_dtype(method, model_dtype, mode, deepspeed, expected):
    assert common.load_dtype(method, model_dtype, mode, deepspeed) == expected


@pytest.mark.parametrize("stage", [2, 3])
def test_full_under_deepspeed_bf16_loads_bf16(tmp_path, tiny_base, stage):
    config = load(tmp_path, tiny_base, "full", f"deepspeed:\n  stage: {stage}\n", ["training.precision=bf16"])
    assert common.weights_dtype(config) == torch.bfloat16
    assert common.weights_dtype(load(tmp_path, tiny_base, "full")) == torch.float32  # CPU auto: fp32


# ---------------------------------------------------------------- 10. attention kernel for packed rows


def test_cpu_or_no_packing_keeps_the_configured_kernel():
    for cuda, packing in ((False, True), (True, False)):
        for attn in (None, "sdpa", "eager"):
            choice = common.choose_attention(cuda, packing, attn, True, True, 64, 4096, 80 * 10**9)
            assert choice == common.AttentionChoice(attn)


def test_packing_on_a_gpu_picks_flash_attention_when_it_can():
    flash = common.AttentionChoice("flash_attention_2")
    assert common.choose_attention(True, True, None, True, True, 8, 2048, 80 * 10**9) == flash
    # Asked for: kept (cli refuses it where flash-attn is missing).
    assert common.choose_attention(True, True, "flash_attention_2", False, True, 8, 2048) == flash


@pytest.mark.parametrize("attn, flash, half, why", [
    (None, False, True, "flash-attn is not installed"),
    (None, True, False, "flash attention needs bf16/fp16 weights"),
    ("sdpa", True, True, "model.attn_implementation is sdpa"),
])
def test_packing_with_sdpa_on_a_gpu_warns_with_the_mask_size(attn, flash, half, why):
    choice = common.choose_attention(True, True, attn, flash, half, 8, 2048, 80 * 10**9)
    assert choice.implementation == attn and choice.refusal is None
    # 8 rows x 2048 tokens = one row of 16384 tokens: a 16384^2 mask at 3 B/element = 0.81 GB.
    assert "16384x16384 mask" in choice.warning and "0.81 GB" in choice.warning and why in choice.warning
    assert "\n" not in choice.warning


def test_a_packed_mask_larger_than_the_gpu_is_refused():
    choice = common.choose_attention(True, True, None, False, True, 64, 4096, 80 * 10**9)  # 262144^2 x 3 B = 206 GB
    assert choice.warning is None and "206.16 GB, more than the GPU's 80 GB" in choice.refusal


def test_the_load_path_uses_the_chosen_kernel(tmp_path, tiny_base, fake_gpu, capsys):
    import transformers.utils

    seen = capture_from_pretrained(fake_gpu)
    packed = ["data.packing=true", "training.precision=bf16"]
    fake_gpu.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    common.from_pretrained(load(tmp_path, tiny_base, "lora", overrides=packed))
    assert seen["attn_implementation"] == "flash_attention_2" and seen["dtype"] == torch.bfloat16
    assert capsys.readouterr().err == ""

    seen.clear()
    fake_gpu.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    common.from_pretrained(load(tmp_path, tiny_base, "lora", overrides=packed))
    assert seen["attn_implementation"] == "sdpa"  # the default, with a warning
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.search(r"data.packing: sdpa attention .* mask", warnings[0])

    fake_gpu.setattr(common, "gpu_memory_bytes", lambda: 10**6)
    with pytest.raises(UserError, match="more than the GPU's"):
        common.from_pretrained(load(tmp_path, tiny_base, "lora", overrides=packed))

    seen.clear()  # written in the config: kept, even where flash attention is installed
    fake_gpu.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    fake_gpu.setattr(common, "gpu_memory_bytes", lambda: 80 * 10**9)
    common.from_pretrained(load(tmp_path, tiny_base, "lora", overrides=[*packed, "model.attn_implementation=sdpa"]))
    assert seen["attn_implementation"] == "sdpa" and "is sdpa" in capsys.readouterr().err
