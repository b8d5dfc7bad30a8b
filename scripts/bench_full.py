"""tunekit full fine-tuning in one process (deepspeed.stage auto: the plain Trainer) vs a plain hand-written TRL full
fine-tune (scripts/plain_trl_sft.py --method full), identical settings; and the same tunekit run under ZeRO-3 (what a
one-process full run was before stage auto).

    python scripts/bench_full.py [--repeats 5] [--threads 1] [--workdir DIR]

All three train configs/tiny-full-zero3.yaml's model, data and settings (lr, schedule, batch, max_length, seed,
steps), fp32 on CPU. tunekit runs with its extras off (no eval, task metric or forgetting monitor), since the plain
script does none of them. Runs alternate tunekit auto, plain, tunekit ZeRO-3, tunekit auto, ... so load drift on a
shared machine hits all three; ratios are medians over the runs made back to back. Goal (issue 13): tunekit's step
throughput >= 0.9x the plain script's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_common import (
    PYTHON, ROOT, THROUGHPUT_GOAL, TUNEKIT_LEAN, ChildRun, Section, child_env, fmt, goal, main_for, median, progress,
    ratio, run_child, spread, table, tunekit_cmd,
)

CONFIG = "configs/tiny-full-zero3.yaml"
STEPS = 60  # ~0.1 s a step on one core: a few seconds of training, start-up is the rest
DEFAULT_REPEATS = 5
VARIANTS = ("auto", "plain", "zero3")


def plain_args(config) -> list[str]:
    """scripts/plain_trl_sft.py flags that reproduce the tunekit config's settings (full: no LoRA flags)."""
    t = config.training
    return [
        "--method", "full", "--model", config.model.name_or_path, "--data", config.data.sources[0].path,
        "--lr", str(config.learning_rate), "--scheduler", t.lr_scheduler_type, "--warmup", str(t.warmup_ratio),
        "--batch", str(t.per_device_train_batch_size), "--steps", str(t.max_steps),
        "--max-length", str(config.data.max_seq_len), "--seed", str(t.seed), "--logging-steps", str(t.logging_steps),
    ]


def steady_steps_per_s(run: ChildRun, logging_steps: int) -> float | None:
    """Optimizer steps/s between the first per-step log line (step 1: logging_first_step) and the last (step
    logging_steps x (lines - 1)): step 1's warm-up left out."""
    logs = run.train_logs()
    if len(logs) < 2:
        return None
    steps = logging_steps * (len(logs) - 1) - 1
    seconds = logs[-1]["train_runtime"] - logs[0]["train_runtime"]
    return steps / seconds if seconds > 0 else None


def run_section(workdir: Path, repeats: int, threads: int) -> Section:
    from tunekit.config import load

    overrides = [*TUNEKIT_LEAN, f"training.max_steps={STEPS}"]
    config = load(ROOT / CONFIG, [*overrides, "deepspeed.stage=auto"])
    t = config.training
    assert config.data.sources[0].format == "alpaca" and len(config.data.sources) == 1, "the plain script reads alpaca"
    assert t.gradient_accumulation_steps == 1 and t.optim == "adamw_torch" and not t.gradient_checkpointing
    assert t.weight_decay == 0.0 and t.max_grad_norm == 1.0, "the plain script keeps SFTConfig's defaults for these"
    env = child_env(threads)
    runs: dict[str, list[ChildRun]] = {name: [] for name in VARIANTS}
    zero: dict[str, dict] = {}
    for i in range(repeats):
        for name in VARIANTS:
            out = workdir / f"{name}-{i}"
            progress(f"full: {name} run {i + 1}/{repeats}")
            if name == "plain":
                cmd = [PYTHON, "scripts/plain_trl_sft.py", *plain_args(config), "--out", str(out),
                       "--result", str(workdir / f"plain-{i}.json")]
            else:
                stage = "auto" if name == "auto" else "3"
                cmd = tunekit_cmd(CONFIG, [*overrides, f"deepspeed.stage={stage}", f"output_dir={out}"])
            runs[name].append(run_child(cmd, env, workdir / f"{name}-{i}.log"))
            if name != "plain":
                summary = json.loads((out / "summary.json").read_text())
                zero[name] = summary["zero"]
                assert (summary.get("zero_stage") == 3) == (name == "zero3"), summary.get("zero_stage")

    def metric(name: str, get) -> list[float | None]:
        return [get(run) for run in runs[name]]

    metrics = [
        ("steps/s, steady state (after step 1)", lambda r: steady_steps_per_s(r, t.logging_steps)),
        ("samples/s, whole run (Trainer's train_samples_per_second)", lambda r: r.final().get("train_samples_per_second")),
        ("tokens/s, steady state (after step 1)", lambda r: r.steady_tokens_per_s()),
        ("time to first step (s, process start -> step 1 logged)", lambda r: r.first_step_s),
        ("wall time (s, process start -> exit)", lambda r: r.wall_s),
        ("peak RSS (MB)", lambda r: r.peak_rss_bytes / 1e6),
        ("train loss, last logged step", lambda r: r.train_logs()[-1]["loss"] if r.train_logs() else None),
    ]
    rows, ratios, zero3_vs_plain = [], [], []  # each metric's median paired auto / plain and ZeRO-3 / plain, in order
    for label, get in metrics:
        auto, plain, zero3 = (metric(name, get) for name in VARIANTS)
        auto_ratios = [ratio(a, b) for a, b in zip(auto, plain)]
        zero3_ratios = [ratio(a, b) for a, b in zip(zero3, plain)]
        rows.append([label, median(auto), median(plain), median(zero3), median(auto_ratios), spread(auto_ratios),
                     median(zero3_ratios)])
        ratios.append(median(auto_ratios))
        zero3_vs_plain.append(median(zero3_ratios))
    steps_ratio, wall_ratio, rss_ratio, zero3_ratio = ratios[0], ratios[4], ratios[5], zero3_vs_plain[0]
    body = "\n".join([
        f"{STEPS} full fine-tuning steps on `{config.model.name_or_path}` (every weight trains, fp32, lr "
        f"{config.learning_rate:g} {t.lr_scheduler_type}, batch {t.per_device_train_batch_size}, max_length "
        f"{config.data.max_seq_len}, seed {t.seed}), completion-only loss, no eval, one process. {repeats} runs of "
        "each, alternating; medians, and the median of the ratios of runs made back to back. tunekit auto chose: "
        f"{zero.get('auto', {}).get('label')} ({zero.get('auto', {}).get('reason')}).",
        "",
        table(["metric", "tunekit (stage auto)", "plain TRL", "tunekit (ZeRO-3)", "auto / plain",
               "range of paired ratios", "ZeRO-3 / plain"], rows),
        "",
        goal("step throughput (steps/s, steady; median of paired ratios)", steps_ratio, THROUGHPUT_GOAL)
        + f" (ZeRO-3 in one process, the old default: {fmt(zero3_ratio)}×)",
        goal("wall time", wall_ratio, 1.0, higher_is_better=False),
        goal("peak RSS", rss_ratio, 1.0, higher_is_better=False),
    ])
    return Section("tunekit full fine-tuning (one process) vs plain TRL full fine-tune", body)


def main(argv: list[str] | None = None) -> int:
    return main_for(run_section, __doc__.splitlines()[0], DEFAULT_REPEATS, argv)


if __name__ == "__main__":
    sys.exit(main())
