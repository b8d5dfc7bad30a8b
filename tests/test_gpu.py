"""GPU-only checks: what only a CUDA device can show. Skipped without one (and in CI).

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py -v -s` (-s shows the measured numbers each check prints);
docs/gpu-checks.md lists every check with the outcome it expects. One test per check; each prints a JSON line with
its numbers, so a failing bound says by how much.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GB = 1e9


def write_config(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"output_dir: {tmp_path / name}\n{body}")
    return path


def tiny_config(tmp_path, tiny_base, demo_data, method: str, precision: str, extra: str = "") -> Path:
    """The tiny test base on the demo task: 30 steps, one save."""
    return write_config(tmp_path, method, (
        f"method: {method}\nmodel:\n  name_or_path: {tiny_base}\n{extra}"
        f"data:\n  sources:\n    - path: {demo_data['train']}\n      format: alpaca\n  eval_path: {demo_data['eval']}\n"
        f"  max_seq_len: 64\n  cache_dir: {tmp_path / 'cache'}\n"
        f"training:\n  max_steps: 30\n  precision: {precision}\n  learning_rate: 1.0e-3\n"
        f"checkpoints:\n  save_steps: 30\neval:\n  task_samples: 16\n"
    ))


def train_config(path: Path) -> dict:
    from tunekit import config as config_mod
    from tunekit.train import train

    return train(config_mod.load(path))


# ---------------------------------------------------------------- training on CUDA


def test_qlora_on_cuda_uses_4bit_and_learns(tmp_path, tiny_base, demo_data):
    summary = train_config(tiny_config(tmp_path, tiny_base, demo_data, "qlora", "bf16"))
    assert summary["quantized_modules"] > 0
    assert summary["train_loss_last"] < summary["train_loss_first"]


def test_lora_bf16_on_cuda_learns(tmp_path, tiny_base, demo_data):
    summary = train_config(tiny_config(tmp_path, tiny_base, demo_data, "lora", "bf16"))
    assert summary["train_loss_last"] < summary["train_loss_first"]


# ---------------------------------------------------------------- item 2: flash_attention_2 where flash-attn is installed


def test_flash_attention_2_trains_where_flash_attn_is_installed(tmp_path, tiny_base, demo_data):
    """The example configs' kernel: in the Docker image (flash-attn installed) the pre-check passes and the run uses
    it; without the package the same config is refused in one line (tests/test_gpu_seams_ops.py on CPU)."""
    from tunekit.attention import attention_problem_here, flash_attn_installed
    from tunekit.rundir import read_resolved

    if not flash_attn_installed():
        pytest.skip("flash-attn not installed (the Docker image installs it)")
    assert attention_problem_here("flash_attention_2", probe_cuda=True) is None
    path = tiny_config(tmp_path, tiny_base, demo_data, "lora", "bf16", extra="  attn_implementation: flash_attention_2\n")
    summary = train_config(path)
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert read_resolved(tmp_path / "lora").attn_implementation == "flash_attention_2"


# ---------------------------------------------------------------- item 13: estimate vs CUDA memory, like with like


def mid_base(tmp_path: Path, tiny_base: Path) -> Path:
    """A ~100M-parameter Llama (random weights, the tiny base's tokenizer): big enough that the estimated tensors,
    not fixed costs of the allocator (cuBLAS workspaces, tens of MB), decide the peak."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path / "mid-base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def long_text_rows(path: Path, rows: int = 64, words: int = 1500) -> Path:
    """Text rows far longer than max_seq_len: every row is truncated to exactly max_seq_len, the shape the
    activation estimate assumes (unpacked shorter rows would make it an upper bound)."""
    rng = random.Random(0)
    vocab = ["the", "model", "learns", "a", "short", "answer", "from", "each", "example", "and", "then", "repeats"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n"
                            for _ in range(rows)))
    return path


def test_estimate_matches_cuda_memory_like_with_like(tmp_path, tiny_base):
    """Each measured quantity against the estimate's matching part (the old check compared the allocator's peak,
    which holds no CUDA context, with a total that includes 0.8 GB of it):

      max_memory_allocated   tensors only            vs  per_device total - overhead
      max_memory_reserved    + allocator caching     vs  per_device total - CUDA context
      device used - reserved the CUDA context        vs  CUDA_CONTEXT_BYTES (needs a GPU no other process uses)
    """
    from tunekit import config as config_mod
    from tunekit.estimate import CUDA_CONTEXT_BYTES, estimate

    base = mid_base(tmp_path, tiny_base)
    data = long_text_rows(tmp_path / "long.jsonl")
    path = write_config(tmp_path, "mem", (
        f"method: lora\nmodel:\n  name_or_path: {base}\n"
        f"data:\n  sources:\n    - path: {data}\n      format: text\n  eval_fraction: 0\n  max_seq_len: 512\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
        "training:\n  max_steps: 5\n  precision: bf16\n  per_device_train_batch_size: 8\n  learning_rate: 1.0e-4\n"
        "checkpoints:\n  save_steps: 1000\neval:\n  task_metric: none\n  rank_spectrum: false\n"
    ))
    config = config_mod.load(path)
    per_device = estimate(config, gpus=1, device="cuda")["per_device"]
    torch.cuda.empty_cache()  # earlier tests' cached blocks must not count as this run's reservation
    torch.cuda.reset_peak_memory_stats()
    train_config(path)
    free, total = torch.cuda.mem_get_info()
    measured = {
        "allocated": torch.cuda.max_memory_allocated(),
        "reserved": torch.cuda.max_memory_reserved(),
        "context": (total - free) - torch.cuda.memory_reserved(),
    }
    estimated = {
        "allocated": per_device["total"] - per_device["overhead"],
        "reserved": per_device["total"] - CUDA_CONTEXT_BYTES,
        "context": CUDA_CONTEXT_BYTES,
    }
    ratios = {key: measured[key] / estimated[key] for key in measured}
    print(json.dumps({"measured_gb": {k: v / GB for k, v in measured.items()},
                      "estimated_gb": {k: v / GB for k, v in estimated.items()}, "ratio": ratios,
                      "buckets_gb": {k: v / GB for k, v in per_device.items()}}))
    assert 0.67 < ratios["allocated"] < 1.5, ratios
    assert 0.67 < ratios["reserved"] < 1.5, ratios
    assert 0.25 < ratios["context"] < 4, ratios  # 0.3-1.5 GB by GPU, driver and the libraries loaded


# ---------------------------------------------------------------- item 9: shared output_dir check over NCCL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_shared_output_dir_check_over_nccl(tmp_path):
    """The CPU test's two ranks (tests/test_gpu_seams_ops.py, gloo) on NCCL, where gather_object goes through the
    GPUs: a shared output_dir passes, a per-rank directory is refused by both ranks with the same line, no hang."""
    from test_gpu_seams_ops import run_two_ranks

    outputs = run_two_ranks(tmp_path, backend="nccl")
    assert [o["shared"] for o in outputs] == [None, None]
    assert outputs[0]["not_shared"] and outputs[0]["not_shared"] == outputs[1]["not_shared"]


# ---------------------------------------------------------------- item 12: the Docker image's CUDA stack


@pytest.mark.skipif(os.environ.get("TUNEKIT_IMAGE") != "1", reason="only inside the tunekit Docker image")
def test_docker_image_has_its_cuda_stack():
    """torch built for the image's CUDA 12.8, flash-attn importable on this GPU, DeepSpeed's CPU Adam prebuilt."""
    from deepspeed.git_version_info import installed_ops

    assert torch.version.cuda.startswith("12.8"), torch.version.cuda
    import flash_attn  # noqa: F401 - the CUDA extension loads against this torch

    assert installed_ops.get("cpu_adam"), installed_ops


# ---------------------------------------------------------------- items 1, 4, 7, 8, 10: placement, launch, dtypes, attention

LAUNCH_VARS = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tunekit_train(path: Path, gpus: str | None = "0", probe: Path | None = None, out: Path | None = None):
    """`tunekit train PATH` in a fresh process, as a user types it (no launcher variables), on GPU `gpus` (None: all
    visible). With `probe`: run that script instead (it gets OUT and the CLI arguments)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    command = [sys.executable, str(probe), str(out)] if probe else [sys.executable, "-m", "tunekit"]
    return subprocess.run([*command, "train", str(path)], env=env, capture_output=True, text=True, timeout=900)


def run_config(tmp_path, tiny_base, demo_data, name: str, method: str, sections: str, model_extra: str = "") -> Path:
    """A tiny run with extra top-level sections (deepspeed:, and training:/data: written in full by the caller)."""
    return write_config(tmp_path, name, (
        f"method: {method}\nmodel:\n  name_or_path: {tiny_base}\n{model_extra}"
        f"data:\n  sources:\n    - path: {demo_data['train']}\n      format: alpaca\n  eval_path: {demo_data['eval']}\n"
        f"  max_seq_len: 64\n  cache_dir: {tmp_path / 'cache'}\n{sections}"
        f"checkpoints:\n  save_steps: 30\neval:\n  task_samples: 16\n"
    ))


# Records, at the final save (after training), the dtypes of the trainable weights and the kwargs activation
# checkpointing runs with, then saves as usual.
PROBE = """
import json, sys
import tunekit.train
from tunekit.cli import main

out, save_final = sys.argv[1], tunekit.train.save_final

def probe(trainer, tokenizer, config):
    facts = {"trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
             "checkpointing": [m._gradient_checkpointing_func.keywords for m in trainer.model.modules()
                               if getattr(m, "gradient_checkpointing", False)]}
    if trainer.is_world_process_zero():
        open(out, "w").write(json.dumps(facts))
    return save_final(trainer, tokenizer, config)

tunekit.train.save_final = probe
sys.exit(main(sys.argv[2:]))
"""


# ---------------------------------------------------------------- item 1: weights load onto the process's GPU


def test_base_model_metric_and_general_loss_run_on_the_gpu(tmp_path, tiny_base, demo_data, monkeypatch):
    """LoRA and QLoRA load straight onto cuda:LOCAL_RANK: the base task metric and general loss (before the Trainer
    exists) run on the GPU, not the CPU."""
    import tunekit.train
    from tunekit import config as config_mod
    from tunekit.backends import lora
    from tunekit.backends.common import load_tokenizer

    seen = []
    real = tunekit.train.task_metric
    monkeypatch.setattr(tunekit.train, "task_metric",
                        lambda model, *a, **k: seen.append(next(model.parameters()).device.type) or real(model, *a, **k))
    summary = train_config(tiny_config(tmp_path, tiny_base, demo_data, "lora", "bf16"))
    print(json.dumps({"metric_devices": seen}))
    assert seen and seen[0] == "cuda" and summary["task_metric_before"] is not None
    config = config_mod.load(tiny_config(tmp_path, tiny_base, demo_data, "qlora", "bf16"))
    model = lora.build_model(config, load_tokenizer(config))
    assert {p.device.type for p in model.parameters()} == {"cuda"}  # 4-bit weights quantized on the GPU


# ---------------------------------------------------------------- item 4: plain `tunekit train` on a GPU machine


@pytest.mark.parametrize("method, stage", [("full", 3), ("full", 2), ("lora", 2)])
def test_plain_train_under_deepspeed_on_one_gpu_forms_a_group_of_one(tmp_path, tiny_base, demo_data, method, stage):
    """No launcher, DeepSpeed config, one GPU: a one-process nccl group (no MPI discovery), the run finishes."""
    path = run_config(tmp_path, tiny_base, demo_data, f"{method}{stage}", method,
                      f"deepspeed:\n  stage: {stage}\ntraining:\n  max_steps: 30\n  precision: bf16\n"
                      "  learning_rate: 1.0e-4\n")
    result = tunekit_train(path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / f"{method}{stage}" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["zero_stage"] == stage
    assert summary["train_loss_last"] < summary["train_loss_first"]


def test_plain_train_with_several_gpus_is_refused_with_the_launch_line(tmp_path, tiny_base, demo_data):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 visible GPUs")
    result = tunekit_train(tiny_config(tmp_path, tiny_base, demo_data, "lora", "bf16"), gpus=None)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1
    assert "accelerate launch --config_file configs/accelerate/single-node-8gpu-ddp.yaml" in errors[0]
    assert not (tmp_path / "lora").exists()  # refused before anything was created or loaded


# ---------------------------------------------------------------- item 7: LoRA under ZeRO-3 in bf16


def test_lora_zero3_bf16_keeps_bf16_adapters_and_non_reentrant_checkpointing(tmp_path, tiny_base, demo_data):
    """Adapters in the base's bf16 (fp32 ones beside a bf16 base fail ZeRO-3's coalesced all-gather at the first
    step), and activation checkpointing runs non-reentrant although TRL switches it to reentrant."""
    probe, out = tmp_path / "probe.py", tmp_path / "facts.json"
    probe.write_text(PROBE)
    path = run_config(tmp_path, tiny_base, demo_data, "lora3", "lora",
                      "deepspeed:\n  stage: 3\ntraining:\n  max_steps: 30\n  precision: bf16\n  learning_rate: 1.0e-3\n"
                      "  gradient_checkpointing: true\n")
    result = tunekit_train(path, probe=probe, out=out)
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads(out.read_text())
    print(json.dumps(facts))
    assert facts["trainable_dtypes"] == ["torch.bfloat16"]
    assert facts["checkpointing"] and all(kw == {"use_reentrant": False} for kw in facts["checkpointing"])
    summary = json.loads((tmp_path / "lora3" / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["train_loss_last"] < summary["train_loss_first"]


# ---------------------------------------------------------------- item 8: full FT loads in the training precision


def test_full_zero2_bf16_loads_bf16_with_the_same_losses_as_an_fp32_load(tmp_path, tiny_base, demo_data):
    """auto precision is bf16 on a native-bf16 GPU; full FT under DeepSpeed bf16 loads bf16 (resolved.json), and the
    losses equal those of an fp32 load (the engine casts to bf16 before its fp32 master copy either way)."""
    from tunekit.backends.common import bf16_native
    from tunekit.rundir import read_resolved

    native = torch.cuda.get_device_capability()[0] >= 8
    assert bf16_native() is native  # emulated bf16 (V100/T4) is not counted
    if not native:
        pytest.skip("needs native bf16")
    losses = {}
    for name, model_extra in (("auto", ""), ("fp32", "  dtype: float32\n")):
        path = run_config(tmp_path, tiny_base, demo_data, name, "full",
                          "deepspeed:\n  stage: 2\ntraining:\n  max_steps: 20\n  learning_rate: 1.0e-4\n", model_extra)
        result = tunekit_train(path)
        assert result.returncode == 0, result.stderr[-4000:]
        resolved = read_resolved(tmp_path / name)
        assert resolved.precision == "bf16"
        assert resolved.load_dtype == ("bfloat16" if name == "auto" else "float32")
        history = json.loads((tmp_path / name / "summary.json").read_text())
        losses[name] = (history["train_loss_first"], history["train_loss_last"])
    print(json.dumps(losses))
    assert losses["auto"][0] == pytest.approx(losses["fp32"][0], rel=1e-3)
    assert losses["auto"][1] == pytest.approx(losses["fp32"][1], rel=2e-2)


# ---------------------------------------------------------------- item 10: packing picks flash attention's varlen kernel


def test_packing_on_a_gpu_uses_flash_attention_with_the_same_losses(tmp_path, tiny_base, demo_data):
    """attn_implementation left at its default + packing on a GPU: flash_attention_2 when installed (recorded in
    resolved.json), losses equal to sdpa's; without flash-attn: one warning line with the mask size."""
    from tunekit.attention import flash_attn_installed
    from tunekit.rundir import read_resolved

    runs = {"auto": "", "sdpa": "  attn_implementation: sdpa\n"}
    losses, stderr = {}, {}
    for name, model_extra in runs.items():
        path = run_config(tmp_path, tiny_base, demo_data, name, "lora",
                          "training:\n  max_steps: 20\n  precision: bf16\n  learning_rate: 1.0e-3\n"
                          "  per_device_train_batch_size: 8\n", model_extra)
        path.write_text(path.read_text().replace("  max_seq_len: 64\n", "  max_seq_len: 64\n  packing: true\n"))
        result = tunekit_train(path)
        assert result.returncode == 0, result.stderr[-4000:]
        stderr[name] = result.stderr
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        losses[name] = summary["train_loss_first"]
    print(json.dumps(losses))
    assert "data.packing: sdpa attention over packed rows builds a" in stderr["sdpa"]  # asked for: kept, with numbers
    if flash_attn_installed():
        assert read_resolved(tmp_path / "auto").attn_implementation == "flash_attention_2"
        assert "data.packing:" not in stderr["auto"]
        assert losses["auto"] == pytest.approx(losses["sdpa"], rel=1e-2)  # same loss, another kernel
    else:
        assert read_resolved(tmp_path / "auto").attn_implementation == "sdpa"
        assert "flash-attn is not installed" in stderr["auto"]


# ---------------------------------------------------------------- items 3, 5, 11: pre-flight, forgetting monitor, merge


def test_preflight_reads_the_real_gpu_not_the_config(tmp_path, tiny_base, demo_data):
    """During train the planning values (preflight.gpus / gpu_memory_gb) give way to the device and WORLD_SIZE."""
    from tunekit import config as config_mod
    from tunekit.estimate import preflight_check

    path = tiny_config(tmp_path, tiny_base, demo_data, "qlora", "bf16", extra="")
    path.write_text(path.read_text() + "preflight:\n  gpus: 64\n  gpu_memory_gb: 1\n")
    result = preflight_check(config_mod.load(path))
    print(json.dumps({"gpus": result["gpus"], "gpu_memory_bytes": result["gpu_memory_bytes"]}))
    assert result["gpus"] == int(os.environ.get("WORLD_SIZE", 1))
    assert result["gpu_memory_bytes"] == torch.cuda.get_device_properties(0).total_memory


def test_general_loss_chunked_on_cuda_equals_full_logits_and_stays_small(tiny_base, demo_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.forgetting import general_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).cuda()
    texts = [json.loads(line)["text"] for line in Path(demo_data["text"]).read_text().splitlines()][:32]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    chunked = general_loss(model, tokenizer, texts, 128, 8, chunk_tokens=64)
    peak = torch.cuda.max_memory_allocated() - base
    whole = general_loss(model, tokenizer, texts, 128, 8, chunk_tokens=10**9)
    print(json.dumps({"chunked": chunked, "whole": whole, "peak_bytes": peak}))
    assert peak < 64 * model.config.vocab_size * 10 + 50e6
    assert chunked == pytest.approx(whole, rel=1e-3)


def test_qlora_merge_fp32_on_the_gpu_passes_its_tolerance(tmp_path, tiny_base, demo_data):
    """The 4-bit reference and the merge run on the same device from the recorded dtype (fp32 save included)."""
    from tunekit.cli import main

    train_config(tiny_config(tmp_path, tiny_base, demo_data, "qlora", "bf16"))
    assert main(["merge", str(tmp_path / "qlora"), "--out", str(tmp_path / "m32"), "--dtype", "fp32"]) == 0
    check = json.loads((tmp_path / "m32" / "merge_check.json").read_text())
    print(json.dumps({k: check[k] for k in ("max_abs_diff", "tolerance", "quantized_from")}))
    assert check["passed"] and check["quantized_from"] == "bfloat16"
    assert main(["merge", str(tmp_path / "qlora"), "--out", str(tmp_path / "m16")]) == 0
