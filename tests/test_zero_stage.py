"""`deepspeed.stage: auto` (estimate/stage.py): the rule on the byte model, the pre-flight line, and what `tunekit
train` runs with it — the plain Trainer in one process, DDP under a DeepSpeed launcher — against the same run under
ZeRO-3."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunekit import config as config_mod
from tunekit.errors import UserError
from tunekit.estimate import GB, Machine, format_estimate, preflight_check
from tunekit.estimate.stage import Rung, choose_zero, ladder, needed_bytes

REPO = Path(__file__).resolve().parents[1]


def parse(method: str = "full", model: str = "tunekit:llama-3-8b", output_dir: str = "out", **sections):
    """A run config (validated, no files read) on a shipped model shape."""
    source = {"path": "train.jsonl", "format": "alpaca", "max_examples": 1000}
    return config_mod.parse({"method": method, "output_dir": output_dir, "model": {"name_or_path": model},
                             "data": {"sources": [source], "max_seq_len": 1024},
                             "training": {"per_device_train_batch_size": 1, "gradient_checkpointing": True},
                             **sections})


def key(zero: dict) -> Rung:
    return Rung(zero["deepspeed"], zero["stage"], zero["offload_optimizer"], zero["offload_param"])


# ---------------------------------------------------------------- the ladder


def test_ladder_order_by_process_count_method_and_device():
    assert ladder(1, 3) == [Rung(False, None), Rung(True, 2, True), Rung(True, 3, True, True)]
    assert ladder(8, 3) == [Rung(False, None), Rung(True, 1), Rung(True, 2), Rung(True, 3), Rung(True, 3, True),
                            Rung(True, 3, True, True)]
    assert ladder(8, 2) == [Rung(False, None), Rung(True, 1), Rung(True, 2), Rung(True, 2, True)]  # QLoRA: no ZeRO-3
    assert ladder(1, 2) == [Rung(False, None), Rung(True, 2, True)]
    assert ladder(2, 3, "cpu") == [Rung(False, None), Rung(True, 1), Rung(True, 2), Rung(True, 3)]  # no host to offload to
    assert ladder(1, 3, "cpu") == [Rung(False, None)]


@pytest.mark.parametrize("method, gpus", [("full", 1), ("full", 8), ("lora", 8), ("qlora", 8)])
def test_auto_picks_the_lowest_rung_that_fits(method, gpus):
    """Whatever the memory: the chosen rung fits and every rung below it does not (or nothing fits, and it says so)."""
    config = parse(method, deepspeed={"stage": "auto"})
    rungs = ladder(gpus, config.MAX_ZERO_STAGE)
    chosen = set()
    for memory_gb in (8, 12, 16, 24, 32, 40, 48, 64, 80, 141, 200, 400):
        zero = choose_zero(config, gpus, memory_gb)
        chosen.add(key(zero))
        assert zero["auto"] and key(zero) in rungs
        below = rungs[:rungs.index(key(zero))]
        assert all(needed_bytes(config, rung, gpus) > memory_gb * GB for rung in below)
        assert zero["needed_bytes"] == needed_bytes(config, key(zero), gpus)
        if zero["fits"]:
            assert zero["needed_bytes"] <= memory_gb * GB
        else:
            assert key(zero) == rungs[-1] and "nothing fits" in zero["reason"]
    assert len(chosen) > 1  # the memory range really moves the choice
    assert all(r.stage is None or r.stage <= config.MAX_ZERO_STAGE for r in chosen)


def test_one_process_runs_the_plain_trainer_when_it_fits_else_offloads_and_says_so():
    config = parse("full", model="tunekit:llama-2-7b", deepspeed={"stage": "auto"})
    plain = choose_zero(config, 1, 141)  # 7B x 16 B/param (fp32 weights, gradients, Adam) + activations: an H200
    assert key(plain) == Rung(False, None) and plain["fits"] and "nothing to shard" in plain["reason"]
    offload = choose_zero(config, 1, 80)
    assert key(offload) == Rung(True, 2, True) and offload["fits"]
    assert "ZeRO-Offload" in offload["reason"] and "no DeepSpeed (plain Trainer) needs" in offload["reason"]


def test_an_explicit_stage_or_a_user_config_stays_as_given():
    for ds in ({"stage": 3}, {"stage": 0}, {"stage": 2, "offload_optimizer": True},
               {"config": {"zero_optimization": {"stage": 1}}}):
        zero = choose_zero(parse("full", deepspeed=ds), 8, 80)
        assert zero["deepspeed"] and not zero["auto"] and zero["reason"] == "as configured"
        assert zero["stage"] == ds.get("stage", 1) and zero["offload_optimizer"] == ds.get("offload_optimizer", False)
    lora = choose_zero(parse("lora"), 8, 80)  # no deepspeed section: no DeepSpeed, as written
    assert key(lora) == Rung(False, None) and not lora["auto"]


def test_qlora_auto_never_picks_zero3():
    config = parse("qlora", model="tunekit:llama-3-70b", deepspeed={"stage": "auto"})
    for gpus in (1, 2, 8):
        for memory_gb in (24, 48, 80):
            assert (choose_zero(config, gpus, memory_gb)["stage"] or 0) <= 2


def test_preflight_table_and_estimate_carry_the_choice():
    config = parse("full")  # full's default section: stage auto
    result = preflight_check(config, machine=Machine("cuda", 8, 80.0), force=True)
    assert result["zero"] == choose_zero(config, 8, 80.0)
    assert result["assumptions"]["zero_stage"] == result["zero"]["stage"] == 1
    text = format_estimate(result)
    assert f"deepspeed    {result['zero']['label']} (stage auto: 8 processes:" in text


def test_nothing_fits_is_refused_by_the_preflight():
    config = parse("full", model="tunekit:llama-3-70b")
    zero = choose_zero(config, 1, 24)
    assert not zero["fits"] and "nothing fits" in zero["reason"]
    with pytest.raises(UserError, match="the estimate says this full run needs"):
        preflight_check(config, machine=Machine("cuda", 1, 24.0))


def test_a_checkpoint_resumes_only_under_the_set_up_that_wrote_it(tmp_path):
    from tunekit import rundir
    from tunekit.backends.deepspeed import check_resumed_stage, resolve_stage

    config = parse("full", output_dir=str(tmp_path))
    record = dict(precision="bf16", load_dtype="bfloat16", world_size=1, attn_implementation="sdpa", device="cuda",
                  versions={})
    rundir.write_json(tmp_path / rundir.RESOLVED_NAME, rundir.Resolved(zero_stage=None, **record).model_dump())
    plain = resolve_stage(config, choose_zero(config, 1, 200))  # written by the plain Trainer (room to spare)
    offload = resolve_stage(config, choose_zero(config, 1, 80))  # requeued onto a smaller GPU: ZeRO-Offload
    assert plain.deepspeed is None and offload.deepspeed.zero_stage() == 2
    check_resumed_stage(config, plain, "ckpt")  # the same choice: fine
    check_resumed_stage(config, offload, None)  # a fresh start: anything goes
    with pytest.raises(UserError, match=r"--resume: ckpt was written under no DeepSpeed \(1 process\(es\)\), but "
                                        r"deepspeed.stage auto chose ZeRO stage 2 here; resume on 1 process"):
        check_resumed_stage(config, offload, "ckpt")
    rundir.write_json(tmp_path / rundir.RESOLVED_NAME, rundir.Resolved(zero_stage=2, **record).model_dump())
    with pytest.raises(UserError, match="set deepspeed.stage: 2"):
        check_resumed_stage(config, plain, "ckpt")
    written = parse("full", output_dir=str(tmp_path), deepspeed={"stage": 3})
    check_resumed_stage(written, written, "ckpt")  # an explicit stage is the user's call (as before auto)


# ---------------------------------------------------------------- what train runs


def overrides(tiny_base, demo_data, tmp_path, steps: int = 6) -> list[str]:
    values = {"model.name_or_path": tiny_base, "data.sources.0.path": demo_data["train"],
              "data.eval_path": demo_data["eval"], "data.cache_dir": tmp_path / "cache", "training.max_steps": steps,
              "checkpoints.save_steps": steps, "training.logging_steps": 1, "eval.task_samples": 8,
              "eval.max_new_tokens": 4, "eval.general": Path(tiny_base) / "general_eval.jsonl"}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


# Two trains in one process, as a notebook or a sweep would: ZeRO-3 first (it leaves DeepSpeed's process-wide state
# behind), then stage auto, which must run the plain Trainer all the same.
SEQUENCE = """
import sys
from tunekit.cli import main
out, args = sys.argv[1], sys.argv[2:]
assert main(["train", "configs/tiny-full-zero3.yaml", *args, "--set", f"output_dir={out}/zero3"]) == 0
assert main(["train", "configs/tiny-full-zero3.yaml", *args, "--set", "deepspeed.stage=auto",
             "--set", f"output_dir={out}/auto"]) == 0
"""


@pytest.mark.slow
def test_one_process_auto_runs_without_deepspeed_and_trains_what_zero3_trains(tmp_path, tiny_base, demo_data):
    import torch
    from safetensors.torch import load_file

    from test_backends_full import launch_env

    script = tmp_path / "sequence.py"
    script.write_text(SEQUENCE)
    subprocess.run([sys.executable, str(script), str(tmp_path), *overrides(tiny_base, demo_data, tmp_path)],
                   cwd=REPO, env=launch_env(tmp_path), check=True, timeout=600, capture_output=True)
    zero3, auto = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("zero3", "auto"))
    assert zero3["zero_stage"] == 3 and zero3["zero"]["reason"] == "as configured"
    # auto in one process: no DeepSpeed engine at all, the choice and its reason recorded...
    assert "zero_stage" not in auto and auto["zero"]["deepspeed"] is False and auto["zero"]["auto"] is True
    assert "nothing to shard" in auto["zero"]["reason"]
    resolved = json.loads((tmp_path / "auto" / "resolved.json").read_text())
    assert resolved["zero_stage"] is None and resolved["world_size"] == 1
    assert "stage: auto" in (tmp_path / "auto" / "config.yaml").read_text()  # config.yaml: as written
    # ...and the same model as ZeRO-3 (fp32 on CPU): the same losses, metrics and final weights.
    for name in ("train_loss_first", "train_loss_last", "eval_loss", "general_loss_base", "general_loss_last"):
        assert auto[name] == pytest.approx(zero3[name], rel=1e-5), name
    assert auto["task_metric_before"] == zero3["task_metric_before"]
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("zero3", "auto"))
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert all(t.dtype == torch.float32 for t in b.values())


@pytest.mark.slow
def test_auto_under_a_deepspeed_launcher_runs_ddp(tmp_path, tiny_base, demo_data):
    """cpu-2proc-zero3.yaml sets ACCELERATE_USE_DEEPSPEED in both ranks; auto picks DDP for the tiny model, and the
    run says so and trains as DDP over the 2 processes (no DeepSpeed engine built from the launcher's defaults)."""
    from test_backends_full import launch

    result = launch(tmp_path, ["-m", "tunekit", "train", "configs/tiny-full-zero3.yaml",
                               *overrides(tiny_base, demo_data, tmp_path), "--set", "deepspeed.stage=auto",
                               "--set", f"output_dir={tmp_path / 'run'}"])
    assert "launcher is configured for DeepSpeed, but this run trains without it" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and "zero_stage" not in summary
    assert summary["zero"]["deepspeed"] is False and summary["zero"]["reason"].startswith("2 processes: DDP")
    assert summary["steps"] == 6 and summary["task_metric_after"] is not None
