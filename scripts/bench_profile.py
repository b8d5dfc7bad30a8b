"""Where a LoRA step's time goes: tunekit and the plain TRL script under cProfile, side by side.

    python scripts/bench_profile.py [--threads 1] [--workdir DIR]

Both run bench_trl.py's workload (configs/tiny-lora.yaml's settings on the tiny base, tunekit with its extras off)
for STEPS steps inside cProfile, one after the other; each part of the training loop is the inclusive time of the
functions that do it, in milliseconds per step. cProfile adds a cost to every Python call, so read the shares and
the tunekit - plain differences rather than absolute step times (bench_trl.py has those, unprofiled).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import (
    PYTHON, ROOT, TUNEKIT_LEAN, Section, child_env, fmt, main_for, progress, run_child, table, tunekit_cmd,
)
from bench_trl import CONFIG, plain_args

STEPS = 60

# (part of the loop, [(file suffix, function name)]): inclusive cProfile time of every listed function, summed.
# Nested parts (the head inside forward) are listed under their parent and not subtracted from it.
PARTS = [
    ("training loop (all steps)", [("transformers/trainer.py", "_inner_training_loop")]),
    ("forward + loss", [("tunekit/callbacks.py", "compute_loss"), ("trl/trainer/sft_trainer.py", "compute_loss")]),
    ("  of which LoRA layers (base matmul, dropout, A, B)", [("peft/tuners/lora/layer.py", "forward")]),
    ("    of which LoRA dropout", [("~", "<built-in method torch.dropout>")]),
    ("  of which LM head + log-softmax (fused, tiled)", [("trl/kernels/chunked_logprob.py", "forward")]),
    ("backward", [("accelerate/accelerator.py", "backward")]),
    ("  of which LM head backward", [("trl/kernels/chunked_logprob.py", "backward")]),
    ("optimizer step + lr schedule", [("torch/optim/lr_scheduler.py", "wrapper")]),
    ("gradient clipping", [("transformers/trainer.py", "_clip_grad_norm")]),
    ("next batch (collate, pad)", [("transformers/trainer.py", "get_batch_samples")]),
    ("FLOP count (total_flos)", [("transformers/trainer.py", "floating_point_ops"),
                                 ("tunekit/callbacks.py", "floating_point_ops")]),
    ("model.train() each step", [("torch/nn/modules/module.py", "train")]),
    ("logging, callbacks", [("transformers/trainer.py", "_maybe_log_save_evaluate"),
                            ("transformers/trainer_callback.py", "on_step_end")]),
]

# Runs `tunekit train` or the plain script in-process under cProfile; dumps the stats to argv[1].
PROFILED = """
import cProfile, runpy, sys
out, argv = sys.argv[1], sys.argv[2:]
sys.argv = argv
profiler = cProfile.Profile()
try:
    profiler.runcall(runpy.run_path if argv[0].endswith(".py") else runpy.run_module, argv[0], run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
profiler.dump_stats(out)
"""


def part_seconds(stats_path: Path) -> dict[str, float]:
    """Inclusive seconds of each PARTS entry in one cProfile dump."""
    import pstats

    stats = pstats.Stats(str(stats_path)).stats  # {(file, line, function): (calls, prim, tottime, cumtime, callers)}
    seconds = {}
    for label, functions in PARTS:
        seconds[label] = sum(
            cumtime for (file, _, function), (_, _, _, cumtime, _) in stats.items()
            for suffix, name in functions
            if function == name and (file.endswith(suffix) or suffix == "~" and file == "~")
            # module.py's train() and the trainers' train() share the name: only the nn.Module one is per step
            and not (name == "train" and "transformers" in file))
    return seconds


def run_section(workdir: Path, repeats: int, threads: int) -> Section:
    from tunekit.config import load

    overrides = [*TUNEKIT_LEAN, f"training.max_steps={STEPS}"]
    config = load(ROOT / CONFIG, overrides)
    env = child_env(threads)
    progress("profile: tunekit LoRA under cProfile")
    tunekit = tunekit_cmd(CONFIG, [*overrides, f"output_dir={workdir / 'tunekit'}"])[2:]  # without `python -m`
    run_child([PYTHON, "-c", PROFILED, str(workdir / "tunekit.prof"), *tunekit], env, workdir / "tunekit.log")
    progress("profile: plain TRL script under cProfile")
    plain = ["scripts/plain_trl_sft.py", *plain_args(config), "--out", str(workdir / "plain")]
    run_child([PYTHON, "-c", PROFILED, str(workdir / "plain.prof"), *plain], env, workdir / "plain.log")

    parts = {name: part_seconds(workdir / f"{name}.prof") for name in ("tunekit", "plain")}
    per_step = {name: {label: 1000 * s / STEPS for label, s in seconds.items()} for name, seconds in parts.items()}
    total = {name: per_step[name]["training loop (all steps)"] for name in per_step}
    rows = []
    for label, _ in PARTS:
        a, b = per_step["tunekit"][label], per_step["plain"][label]
        rows.append([label, a, f"{100 * a / total['tunekit']:.0f}%", b, f"{100 * b / total['plain']:.0f}%", a - b])
    body = "\n".join([
        f"{STEPS} LoRA steps of bench_trl.py's workload (`{CONFIG}`, extras off) inside cProfile, one run each; "
        "milliseconds per step, inclusive (a part includes the parts indented under it). cProfile slows every "
        "Python call, so the absolute times are above the unprofiled ones; the shares and differences are what to read.",
        "",
        table(["part of the step", "tunekit ms", "share", "plain TRL ms", "share", "tunekit − plain ms"],
              [[row[0].replace("  ", "&nbsp;&nbsp;"), fmt(row[1]), row[2], fmt(row[3]), row[4], fmt(row[5])]
               for row in rows]),
    ])
    return Section("Where a LoRA step's time goes (cProfile)", body)


def main(argv: list[str] | None = None) -> int:
    return main_for(run_section, __doc__.splitlines()[0], 1, argv)


if __name__ == "__main__":
    sys.exit(main())
