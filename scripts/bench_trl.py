"""tunekit LoRA vs a plain hand-written TRL SFTTrainer script (scripts/plain_trl_sft.py), identical settings.

    python scripts/bench_trl.py [--repeats 3] [--threads 1] [--workdir DIR]

Both train configs/tiny-lora.yaml's model, data and settings (rank, alpha, targets, lr, schedule, batch, max_length,
seed, steps). tunekit runs with its extras off (no eval, task metric, rank spectrum or forgetting monitor), since the
plain script does none of them; its pre-flight estimate stays on (it is part of every `tunekit train`) and its cost
is reported on its own line. Runs alternate tunekit, plain, tunekit, ... so load drift on a shared machine hits both;
ratios are the median over those pairs. Goals (issue 14): tunekit >= 1.6x the plain script's tokens/s, no more
start-up time, wall time or peak RSS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_common import (
    PYTHON, ROOT, THROUGHPUT_GOAL, TUNEKIT_LEAN, Section, child_env, fmt, goal, main_for, median, progress, ratio,
    run_child, spread, table, tunekit_cmd,
)

CONFIG = "configs/tiny-lora.yaml"
STEPS = 40  # ~0.25 s a step on one core: 10 s of training, start-up is the rest
DEFAULT_REPEATS = 3

# A child that imports what `tunekit train` imports, then times only the pre-flight estimate (seconds, on stdout).
PREFLIGHT_TIMER = """
import sys, time
import tunekit.train
from tunekit.config import load
from tunekit.estimate import preflight_check
config = load(sys.argv[1], sys.argv[2:])
started = time.perf_counter()
preflight_check(config, device="cpu", force=True)
print("PREFLIGHT_SECONDS", time.perf_counter() - started)
"""


def plain_args(config) -> list[str]:
    """scripts/plain_trl_sft.py flags that reproduce the tunekit config's settings."""
    t, lora = config.training, config.lora
    return [
        "--model", config.model.name_or_path, "--data", config.data.sources[0].path,
        "--r", str(lora.r), "--alpha", str(lora.lora_alpha), "--dropout", str(lora.dropout),
        # all-linear is peft's own string (a list would be joined letter by letter); tunekit's all-linear adds only
        # fused MoE experts, which a Llama has none of.
        "--targets", "all-linear" if lora.all_linear else ",".join(lora.target_modules), "--lr", str(config.learning_rate),
        "--scheduler", t.lr_scheduler_type, "--warmup", str(t.warmup_ratio), "--batch", str(t.per_device_train_batch_size),
        "--steps", str(t.max_steps), "--max-length", str(config.data.max_seq_len), "--seed", str(t.seed),
        "--logging-steps", str(t.logging_steps),
    ]


def run_section(workdir: Path, repeats: int, threads: int) -> Section:
    from tunekit.config import load

    overrides = [*TUNEKIT_LEAN, f"training.max_steps={STEPS}"]
    config = load(ROOT / CONFIG, overrides)
    assert config.data.sources[0].format == "alpaca" and len(config.data.sources) == 1, "the plain script reads alpaca"
    assert config.training.gradient_accumulation_steps == 1 and config.training.optim == "adamw_torch"
    env = child_env(threads)
    runs: dict[str, list] = {"tunekit": [], "plain": []}
    for i in range(repeats):
        out = workdir / f"tunekit-{i}"
        progress(f"trl: tunekit LoRA run {i + 1}/{repeats}")
        run = run_child(tunekit_cmd(CONFIG, [*overrides, f"output_dir={out}"]), env, workdir / f"tunekit-{i}.log")
        runs["tunekit"].append((run, json.loads((out / "summary.json").read_text())))
        out = workdir / f"plain-{i}"
        progress(f"trl: plain TRL script run {i + 1}/{repeats}")
        cmd = [PYTHON, "scripts/plain_trl_sft.py", *plain_args(config), "--out", str(out),
               "--result", str(workdir / f"plain-{i}.json")]
        run = run_child(cmd, env, workdir / f"plain-{i}.log")
        runs["plain"].append((run, json.loads((workdir / f"plain-{i}.json").read_text())))

    progress("trl: timing the pre-flight estimate alone")
    timer = run_child([PYTHON, "-c", PREFLIGHT_TIMER, CONFIG, *overrides], env, workdir / "preflight.log")
    preflight_s = float(timer.log_path.read_text().split("PREFLIGHT_SECONDS")[-1].split()[0])

    def metric(name: str, get) -> list[float | None]:
        return [get(run, result) for run, result in runs[name]]

    metrics = [
        ("tokens/s, whole run (non-pad tokens / train_runtime)", lambda r, s: r.tokens_per_s()),
        ("tokens/s, steady state (after step 1)", lambda r, s: r.steady_tokens_per_s()),
        ("time to first step (s, process start -> step 1 logged)", lambda r, s: r.first_step_s),
        ("wall time (s, process start -> exit)", lambda r, s: r.wall_s),
        ("peak RSS (MB)", lambda r, s: r.peak_rss_bytes / 1e6),
        ("train loss, last logged step", lambda r, s: r.train_logs()[-1]["loss"] if r.train_logs() else None),
    ]
    rows, ratios = [], []  # ratios: each metric's median paired ratio, in metrics' order
    for label, get in metrics:
        a, b = metric("tunekit", get), metric("plain", get)
        pair_ratios = [ratio(x, y) for x, y in zip(a, b)]
        rows.append([label, median(a), median(b), median(pair_ratios), spread(pair_ratios)])
        ratios.append(median(pair_ratios))
    rows.append(["of which tunekit's pre-flight estimate (s)", preflight_s, "–", "–", ""])
    tokens = metric("tunekit", lambda r, s: s["tokens_seen"]), metric("plain", lambda r, s: s["tokens_seen"])
    throughput, first_step, wall, rss = ratios[0], ratios[2], ratios[3], ratios[4]
    first_step_delta = median(metric("tunekit", lambda r, s: r.first_step_s)) - median(
        metric("plain", lambda r, s: r.first_step_s))
    goals = [
        goal("step throughput (tokens/s, whole run; median of paired ratios)", throughput, THROUGHPUT_GOAL),
        goal("start-up (time to first step)", first_step, 1.0, higher_is_better=False)
        + f" ({first_step_delta:+.2f} s, medians)",
        goal("wall time", wall, 1.0, higher_is_better=False),
        goal("peak RSS", rss, 1.0, higher_is_better=False),
    ]
    body = "\n".join([
        f"{STEPS} LoRA steps on `{config.model.name_or_path}` (r={config.lora.r}, alpha={config.lora.lora_alpha:g}, "
        f"all linear projections, lr {config.learning_rate:g} {config.training.lr_scheduler_type}, batch "
        f"{config.training.per_device_train_batch_size}, max_length {config.data.max_seq_len}, seed "
        f"{config.training.seed}), completion-only loss, no eval. {repeats} runs each, alternating; medians. "
        f"Non-pad tokens trained per run: tunekit {fmt(median(tokens[0]))}, plain {fmt(median(tokens[1]))} "
        "(tunekit shuffles its examples with data.seed before the Trainer's own shuffle, so the batches differ).",
        "",
        table(["metric", "tunekit", "plain TRL", "tunekit / plain", "range of paired ratios"], rows),
        "",
        *goals,
    ])
    return Section("tunekit LoRA vs plain TRL script", body)


def main(argv: list[str] | None = None) -> int:
    return main_for(run_section, __doc__.splitlines()[0], DEFAULT_REPEATS, argv)


if __name__ == "__main__":
    sys.exit(main())
