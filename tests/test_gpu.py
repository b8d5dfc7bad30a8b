"""GPU-only checks (CUDA QLoRA, bf16 full/LoRA, memory estimate vs CUDA peak). Skipped without a CUDA device.

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py`; docs/gpu-checks.md says what each one proves.
"""

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def train_tiny(tmp_path, tiny_base, demo_data, method: str, precision: str) -> dict:
    from tunekit import config as config_mod
    from tunekit.train import train

    path = tmp_path / f"{method}.yaml"
    path.write_text(
        f"method: {method}\noutput_dir: {tmp_path / method}\nmodel:\n  name_or_path: {tiny_base}\n"
        f"data:\n  sources:\n    - path: {demo_data['train']}\n      format: alpaca\n  eval_path: {demo_data['eval']}\n"
        f"  max_seq_len: 64\n  cache_dir: {tmp_path / 'cache'}\n"
        f"training:\n  max_steps: 30\n  precision: {precision}\n  learning_rate: 1.0e-3\n"
        f"checkpoints:\n  save_steps: 30\neval:\n  task_samples: 16\n"
    )
    return train(config_mod.load(path))


def test_qlora_on_cuda_uses_4bit_and_learns(tmp_path, tiny_base, demo_data):
    summary = train_tiny(tmp_path, tiny_base, demo_data, "qlora", "bf16")
    assert summary["quantized_modules"] > 0
    assert summary["train_loss_last"] < summary["train_loss_first"]


def test_lora_bf16_on_cuda_learns_and_estimate_brackets_the_peak(tmp_path, tiny_base, demo_data):
    summary = train_tiny(tmp_path, tiny_base, demo_data, "lora", "bf16")
    assert summary["train_loss_last"] < summary["train_loss_first"]
    estimated, measured = summary["estimated_peak_bytes_per_device"], summary["peak_memory_bytes"]
    print(json.dumps({"estimated": estimated, "measured": measured}))
    # A tiny model is dominated by the CUDA context the estimate adds as overhead: only check the order of magnitude.
    assert 0.1 < measured / estimated < 10
