"""`tunekit compare A.yaml B.yaml --budget flops|seconds|steps`: two runs at equal compute, side by side.

The seeds warn that "full FT vs LoRA" at equal steps is unfair: a full step does more compute. Here each config gets
its own step count so both spend the same budget (training FLOPs by the estimate's formula, wall-clock seconds, or
plain steps); each run is its own process (clean peak memory), and the report states the FLOPs actually spent.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from tunekit import config as config_mod
from tunekit import rundir
from tunekit.errors import UserError

ROWS = [  # (summary key, label)
    ("method", "method"), ("steps", "steps"), ("tokens_seen", "tokens"), ("train_flops", "training FLOPs"),
    ("wall_seconds", "wall time"), ("peak_memory_bytes", "peak memory"), ("trainable_params", "trainable params"),
    ("train_loss_last", "train loss (last)"), ("eval_loss", "eval loss"), ("general_loss_last", "general-text loss"),
    ("task_metric_before", "task metric before"), ("task_metric_after", "task metric after"),
]


def compare(config_a: str, config_b: str, budget: str = "flops", amount: float | None = None, out: str = "runs/compare",
            overrides: list[str] | None = None, overwrite: bool = False, launcher: str | None = None) -> Path:
    """Run both configs to the same budget; write OUT/compare.md and OUT/compare.json; return the report path."""
    out_dir = Path(out)
    rundir.check_output_dir(str(out_dir), overwrite, None)
    configs = [config_mod.load(path, overrides or ()) for path in (config_a, config_b)]
    steps, seconds = plan_steps(configs, budget, amount)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for label, path, cfg, max_steps in zip("ab", (config_a, config_b), configs, steps):
        run_dir = out_dir / f"{label}-{cfg.method}"
        sets = [*(overrides or ()), f"output_dir={run_dir}", f"training.max_steps={max_steps}"]
        if seconds is not None:
            sets.append(f"training.max_seconds={seconds}")
        command = [*shlex.split(launcher or ""), *([] if launcher else [sys.executable]), "-m", "tunekit", "train",
                   path, "--overwrite", *[arg for item in sets for arg in ("--set", item)]]
        print(f"[compare] {label}: {' '.join(command)}", flush=True)
        if subprocess.run(command).returncode != 0:
            raise UserError(f"compare: run {label} ({path}) failed; see its output above")
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["train_flops"] = spent_flops(cfg, summary)
        summaries.append(summary)
    report = write_comparison(out_dir, budget, amount, (config_a, config_b), summaries)
    print(report.read_text())
    return report


def flops_per_step(cfg: config_mod.RunConfig) -> float:
    """Training FLOPs of one optimizer step at full sequence length (the estimate's formula; a preference pair is two
    sequences)."""
    from tunekit.estimate.cost import sequences_per_example

    t = cfg.training
    rows = t.per_device_train_batch_size * t.gradient_accumulation_steps * sequences_per_example(cfg)
    return _flops(cfg, rows * cfg.data.max_seq_len)


def spent_flops(cfg: config_mod.RunConfig, summary: dict) -> float:
    """FLOPs the run actually spent: the formula applied to the tokens it really saw."""
    return _flops(cfg, summary.get("tokens_seen") or 0)


def _flops(cfg: config_mod.RunConfig, tokens: float) -> float:
    from tunekit.estimate import config_shape
    from tunekit.estimate.cost import step_flops

    return step_flops(cfg, config_shape(cfg), tokens)  # DPO: + the reference model's forward over the same tokens


def plan_steps(configs: list, budget: str, amount: float | None) -> tuple[list[int], float | None]:
    """Steps for each run (and a time limit for --budget seconds). Default amount: config A's own max_steps."""
    base_steps = configs[0].training.max_steps
    if budget == "seconds":
        if amount is None:
            raise UserError("compare --budget seconds needs --amount SECONDS")
        return [c.training.max_steps for c in configs], amount  # each keeps its schedule; the clock stops it
    if amount is None and base_steps <= 0:
        raise UserError(f"compare: {budget} budget needs --amount or training.max_steps in the first config")
    if budget == "steps":
        steps = int(amount) if amount is not None else base_steps
        return [steps, steps], None
    per_step = [flops_per_step(c) for c in configs]
    total = amount if amount is not None else per_step[0] * base_steps
    return [max(1, round(total / f)) for f in per_step], None


def write_comparison(out_dir: Path, budget: str, amount, paths, summaries: list[dict]) -> Path:
    from tunekit.report import format_value

    lines = [f"# Equal-compute comparison ({budget} budget{f' = {amount:g}' if amount else ''})", "",
             f"| | A: `{paths[0]}` | B: `{paths[1]}` |", "|---|---|---|"]
    for key, label in ROWS:
        lines.append(f"| {label} | {format_value(key, summaries[0].get(key))} | {format_value(key, summaries[1].get(key))} |")
    ratio = (summaries[1]["train_flops"] / summaries[0]["train_flops"]) if summaries[0]["train_flops"] else float("nan")
    lines += ["", f"FLOPs spent B/A = {ratio:.2f} (1.00 is a fair comparison at a FLOPs budget).",
              "FLOPs follow the estimate's formula: full 6N per token, LoRA 4N + 6N_trainable (frozen base: no weight "
              "gradients), plus attention.", ""]
    report = out_dir / "compare.md"
    rundir.write_text_atomically(report, "\n".join(lines))
    rundir.write_json(out_dir / "compare.json", {"budget": budget, "amount": amount, "configs": list(paths),
                                                  "summaries": summaries})
    return report
