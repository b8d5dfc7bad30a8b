"""Trackers (wandb offline, clear refusal online without a key) and the equal-compute comparison."""

import json
from pathlib import Path

import pytest

from tunekit.cli import main


def tiny_config(tmp_path, tiny_base, demo_data, name="run.yaml", method="lora", extra="") -> Path:
    path = tmp_path / name
    path.write_text(
        f"method: {method}\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_base}\n"
        f"data:\n  sources:\n    - path: {demo_data['train']}\n      format: alpaca\n  eval_path: {demo_data['eval']}\n"
        f"  max_seq_len: 64\ntraining:\n  max_steps: 4\n  per_device_train_batch_size: 4\n  logging_steps: 1\n"
        f"checkpoints:\n  save_steps: 4\neval:\n  task_samples: 4\n  max_new_tokens: 4\n{extra}"
    )
    return path


def test_wandb_offline_logs_locally_and_writes_no_key(tmp_path, tiny_base, demo_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-that-must-not-leak-0123456789")
    config = tiny_config(tmp_path, tiny_base, demo_data, extra="logging:\n  report_to: [wandb, tensorboard]\n")
    assert main(["train", str(config)]) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run was written"
    assert list((tmp_path / "out").rglob("events.out.tfevents*")), "no tensorboard events"
    for path in [*tmp_path.rglob("*.yaml"), *tmp_path.rglob("*.json"), *(tmp_path / "out").rglob("*.md")]:
        assert "secret-key-that-must-not-leak" not in path.read_text(errors="ignore"), path


def test_wandb_online_without_key_fails_fast(tmp_path, tiny_base, demo_data, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    config = tiny_config(tmp_path, tiny_base, demo_data, extra="logging:\n  report_to: [wandb]\n")
    assert main(["train", str(config)]) == 2
    assert "logging.report_to: wandb has no API key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_gives_both_runs_the_same_flops(tmp_path, tiny_base, demo_data):
    a = tiny_config(tmp_path, tiny_base, demo_data, "a.yaml", extra="lora:\n  r: 4\n")
    b = tiny_config(tmp_path, tiny_base, demo_data, "b.yaml", extra="lora:\n  r: 64\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--budget", "flops", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    flops = [s["train_flops"] for s in result["summaries"]]
    assert all(s["steps"] >= 1 for s in result["summaries"])
    # Same tokens per step, so equal FLOPs means the step counts differ at most by rounding (r=64 costs more per step).
    assert abs(flops[1] / flops[0] - 1) < 0.35
    assert "Equal-compute comparison" in (out / "compare.md").read_text()


def test_a_preference_step_costs_two_sequences_and_dpo_adds_the_reference_forward(tiny_base):
    """--budget flops and the Slurm grace count a pair as two sequences, and DPO's live reference as one more
    forward over them: orpo = 2 x sft; dpo with a precomputed reference = orpo; dpo with a live one = that + forward."""
    from tunekit.compare import flops_per_step
    from tunekit.config import parse
    from tunekit.estimate import config_shape
    from tunekit.estimate.cost import training_flops

    def config(objective: str, fmt: str, **section):
        raw = {"method": "lora", "output_dir": "unused", "objective": objective, "model": {"name_or_path": str(tiny_base)},
               "data": {"sources": [{"path": "unused.jsonl", "format": fmt}], "max_seq_len": 64}}
        if section:
            raw[objective] = section
        return parse(raw)

    sft = flops_per_step(config("sft", "alpaca"))
    orpo = flops_per_step(config("orpo", "preference"))
    precomputed = flops_per_step(config("dpo", "preference", reference="precomputed"))
    live = config("dpo", "preference")
    assert orpo == pytest.approx(2 * sft) and precomputed == pytest.approx(orpo)
    tokens = 8 * 2 * 64  # default micro-batch 8, two sequences of max_seq_len
    forward = training_flops(config_shape(live), method="lora", tokens=0, seq_len=64, gradient_checkpointing=False,
                             reference_tokens=tokens)
    assert forward > 0 and flops_per_step(live) == pytest.approx(orpo + forward)
