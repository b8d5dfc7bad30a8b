"""The `tunekit` command: `main(argv) -> int`, one small function per subcommand.

Nothing heavy is imported here: torch/transformers are imported inside the commands that need them, so
`tunekit --help` and `tunekit validate` start in well under a second. User mistakes arrive as `UserError` and are
printed once as `error: ...` with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from tunekit.errors import UserError


def cmd_train(args: argparse.Namespace) -> int:
    config = _load(args)
    from tunekit.attention import attention_problem_here

    problem = attention_problem_here(config.model.attn_implementation, probe_cuda=True)
    if problem:  # before anything loads or is created: from_pretrained would raise an ImportError much later
        raise UserError(problem)
    from tunekit.preemption import EXIT_PREEMPTED, Preempted, ignore_until_exit, stop_signals

    # Handlers first (this imports nothing heavy): a stop signal from here on ends the run cleanly with exit 75.
    with stop_signals(config.training.stop_signals):
        from tunekit.train import train  # heavy imports only now that the config is known to be valid

        try:
            train(config, overwrite=args.overwrite, resume=args.resume, force=args.force)
            return 0
        except Preempted as stop:
            preempted = stop
    ignore_until_exit(config.training.stop_signals)
    from tunekit.distributed import is_rank_zero

    if is_rank_zero():  # every rank stopped at the same step: one line per job
        print(preempted, file=sys.stderr)
    return EXIT_PREEMPTED


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    from tunekit.attention import attention_problem_here

    problem = attention_problem_here(config.model.attn_implementation, probe_cuda=False)  # no torch here
    if problem:  # a warning: the config may be meant for a GPU machine; `train` refuses it here
        print(f"warning: {problem}", file=sys.stderr)
    print(f"ok: {args.config} is a valid {config.method} config (output_dir: {config.output_dir})")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    config = _load(args)
    import time

    from tunekit.backends.common import load_tokenizer
    from tunekit.prepare import data_table, padding_lines, prepare_data

    started = time.time()
    prepared = prepare_data(config, load_tokenizer(config))
    print(data_table(prepared.stats, preference=config.preference))
    for line in padding_lines(prepared, config):
        print(line)
    print(f"prepared in {time.time() - started:.1f} s; training with this config reuses the cache")
    return 0


def cmd_inspect_data(args: argparse.Namespace) -> int:
    config = _load(args)
    from tunekit.prepare import inspect_data

    print(inspect_data(config, num_samples=args.samples))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    config = _load(args)
    from tunekit.estimate import estimate, format_estimate

    result = estimate(config, gpus=args.gpus, gpu_memory_gb=args.gpu_memory)
    print(json.dumps(result, indent=2) if args.json else format_estimate(result))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from tunekit.recommend import format_recommendation, recommend

    result = recommend(
        model_size_b=args.model_size,
        gpus=args.gpus,
        gpu_memory_gb=args.gpu_memory,
        examples=args.examples,
        objective=args.objective,
        variants=args.variants,
        budget_usd=args.budget,
    )
    print(json.dumps(result, indent=2) if args.json else format_recommendation(result))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tunekit.merge import merge_run

    merge_run(args.run_dir, args.out, dtype=args.dtype, base=args.base, overwrite=args.overwrite)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunekit.export import export_run

    export_run(
        args.run_dir, args.out, fmt=args.format, dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunekit.compare import compare

    compare(args.config_a, args.config_b, budget=args.budget, amount=args.amount, out=args.out,
            overrides=args.set, overwrite=args.overwrite, launcher=args.launcher)
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from tunekit.tiny import build_tiny_base, write_demo_task, write_preference_task

    base = build_tiny_base(args.out, preset=args.preset, force=args.force)
    print(f"tiny base: {base}")
    if args.demo_data:
        paths = write_demo_task(args.demo_data)
        print("demo data: " + ", ".join(f"{name}={path}" for name, path in paths.items()))
        paths = write_preference_task(args.demo_data)
        print("preference data: " + ", ".join(f"{name}={path}" for name, path in paths.items()))
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunekit.slurm import check_out, plan_job, render_sbatch, write_sbatch

    if args.out is not None:
        check_out(args.out, args.overwrite)  # before anything else: a refused command writes nothing
    config = _load(args)
    job = plan_job(config, args.config, args.set or (), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   processes_per_node=args.processes_per_node, cpu=args.cpu, gpu_memory_gb=args.gpu_memory,
                   time=args.time, partition=args.partition, account=args.account, job_name=args.job_name,
                   chdir=args.chdir, log_dir=args.log_dir, port=args.port)
    if not job.fits:  # written anyway (the user may plan for other hardware), but said before anything is queued
        print(f"warning: the run does not fit: {job.deepspeed_why}; its pre-flight will refuse to start",
              file=sys.stderr)
    text = render_sbatch(job)
    # Slurm does not create the log folder: without it the job fails before its first line, with no log at all.
    (Path(job.chdir) / job.log_dir).mkdir(parents=True, exist_ok=True)
    if args.out is None:
        sys.stdout.write(text)
    else:
        path = write_sbatch(text, args.out, args.overwrite)
        print(f"wrote {path} (grace {job.grace_s} s; {job.deepspeed_why}); submit with: sbatch {path}")
    return 0


def _load(args: argparse.Namespace):
    from tunekit import config as config_mod

    config = config_mod.load(args.config, args.set or ())
    for message in config_mod.trap_warnings(config):
        print(f"warning: {message}", file=sys.stderr)
    return config


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. training.max_steps=20")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunekit", description="Fine-tune language models: full (ZeRO-3), LoRA, QLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="validate, estimate, train, save, summarize",
                       epilog="exit codes: 0 done, 1 crash, 2 user error, 75 stopped by a signal "
                              "(training.stop_signals) with a complete checkpoint: rerun with --resume auto")
    _add_config(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output_dir")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT|auto",
                   help="resume from the latest valid checkpoint in output_dir, or from CHECKPOINT; 'auto': resume "
                        "when there is a checkpoint, start when there is none, do nothing when the run finished "
                        "(a requeued job's one command line)")
    p.add_argument("--force", action="store_true", help="start even when the memory estimate says it will not fit")

    p = sub.add_parser("validate", help="check a config without importing torch")
    _add_config(p)

    p = sub.add_parser("prepare", help="tokenize and cache the data (e.g. on a CPU node before the GPU job)")
    _add_config(p)

    p = sub.add_parser("inspect-data", help="render samples with loss tokens marked; report token shares")
    _add_config(p)
    p.add_argument("--samples", type=int, default=3, help="samples to render")

    p = sub.add_parser("estimate", help="memory, time and cost before a run")
    _add_config(p)
    p.add_argument("--gpus", type=int, default=None, help="GPUs to shard over (default: config preflight.gpus or 1)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GB per GPU (default: config preflight or 80)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("recommend", help="full, LoRA or QLoRA? the seeds' decision rules")
    p.add_argument("--model-size", type=float, required=True, help="billions of parameters")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--examples", type=int, required=True, help="training examples")
    p.add_argument("--objective", choices=["instruction", "domain_knowledge", "task_specific"], required=True)
    p.add_argument("--variants", type=int, default=1, help="fine-tuned variants to serve")
    p.add_argument("--budget", type=float, default=None, help="training budget in USD")
    p.add_argument("--json", action="store_true")

    for name, help_text in (("merge", "merge a run's adapter into its base"), ("export", "export a run for serving")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run_dir")
        p.add_argument("--out", required=True)
        p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="saved dtype (default: the run's)")
        p.add_argument("--overwrite", action="store_true")
        if name == "merge":
            p.add_argument("--base", choices=["dequantized", "original"], default="dequantized",
                           help="QLoRA: merge into the dequantized NF4 weights (trained against) or the original ones")
        else:
            p.add_argument("--format", choices=["merged", "adapter"], default="merged")
            p.add_argument("--max-shard-size", default="5GB")

    p = sub.add_parser("compare", help="two configs at equal compute, side by side")
    p.add_argument("config_a")
    p.add_argument("config_b")
    p.add_argument("--budget", choices=["flops", "seconds", "steps"], default="flops")
    p.add_argument("--amount", type=float, default=None, help="budget amount (default: config_a's full run)")
    p.add_argument("--out", required=True, help="directory for both runs and the comparison report")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to both configs")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--launcher", default=None,
                   help="command prefix for the runs, e.g. 'accelerate launch --config_file configs/accelerate/cpu-2proc-zero3.yaml'")

    p = sub.add_parser("slurm", help="an sbatch script: checkpoint before the time limit or preemption, requeue, "
                       "resume (docs/cluster.md)")
    _add_config(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--cpu", action="store_true", help="CPU nodes (gloo): --processes-per-node processes per node")
    p.add_argument("--processes-per-node", type=int, default=None, help="with --cpu (default 1)")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="GB per GPU for the DeepSpeed choice; with --cpu the host RAM the processes share "
                   "(default: config preflight or 80)")
    p.add_argument("--time", default=None, help="time limit, as sbatch --time (e.g. 24:00:00)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default=None, help="default: the config file's name")
    p.add_argument("--chdir", default=None, help="the job's working directory (default: here)")
    p.add_argument("--log-dir", default="logs", help="per-job logs, relative to --chdir (default: logs)")
    p.add_argument("--port", type=int, default=None, help="rank 0's port (default: 20000 + job id %% 20000)")
    p.add_argument("--out", default=None, help="write the script here (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("build-tiny", help="build the tiny local base model (and demo data) used by demo and tests")
    p.add_argument("--out", default="artifacts/tiny-base")
    p.add_argument("--preset", choices=["demo", "test"], default="demo")
    p.add_argument("--demo-data", default=None, metavar="DIR",
                   help="also write the demo task's and the preference task's train/eval files here")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "validate": cmd_validate,
    "prepare": cmd_prepare,
    "inspect-data": cmd_inspect_data,
    "estimate": cmd_estimate,
    "recommend": cmd_recommend,
    "merge": cmd_merge,
    "export": cmd_export,
    "compare": cmd_compare,
    "slurm": cmd_slurm,
    "build-tiny": cmd_build_tiny,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
