"""`tunekit slurm`: an sbatch script for a run that survives its time limit and preemption, resuming by itself.

The script (render_sbatch) starts one srun task per node; each task is `accelerate launch` of that node's
processes, rank 0 on the first host of the allocation, all running `tunekit train CONFIG --resume auto` (the same
command line on every start: a fresh run the first time, the newest complete checkpoint after a requeue, nothing
once the run has finished). How a stop works, by cause:

  time limit    `--signal=B:USR1@GRACE` wakes the batch shell GRACE seconds before the end. Its trap sends SIGTERM to
                the job's steps (`scancel --signal=TERM JOB`: every process of the step, launcher and workers);
                the ranks agree to stop at the next optimizer step, write one complete checkpoint and exit 75. The
                shell waits for the step, then requeues the job (`scontrol requeue`) unless the run finished.
  preemption,   Slurm itself sends SIGTERM to every process of the job (then SIGKILL after the cluster's GraceTime
  scancel       or KillWait): the workers save the same way; the shell only waits. A preempted job with PreemptMode
                REQUEUE is requeued by Slurm; a cancelled one stays cancelled.

Measured on Slurm 22.05 (tests/test_slurm.py runs the whole cycle under a real slurmctld/slurmd):
  - `kill -TERM <srun pid>` is the wrong forward: srun answers its own SIGTERM by SIGKILLing its tasks ("srun:
    forcing job termination"), which would cut the save short. `scancel --signal=TERM JOB` signals only the steps
    (not the batch shell, not srun), and a step saving for 40 s after it is not killed (no KillWait escalation).
  - srun's forwarded signals and scancel's reach every process of the step, not only the task it started.
  - A requeued job becomes eligible again 120 s after the requeue (Slurm's fixed delay; Reason=BeginTime).
  - `--signal` fires up to 60 s early (Slurm checks the timers once a minute): early is harmless here.
The launcher (torch elastic agent) forwards SIGTERM to its workers and SIGKILLs those still alive
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (default 30): the script sets it to the grace period. SIGTERM is among
the signals the agent handles by default (TORCHELASTIC_SIGNALS_TO_HANDLE); SIGUSR1 is not (the agent would die of
it, leaving its workers), which is why the shell forwards SIGTERM rather than the USR1 it received.

Pure functions (grace_seconds, render_sbatch, parse_time) plus plan_job, which reads the model's
shape for the estimate, and write_sbatch, the one writer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import sys
from pathlib import Path

from tunekit.errors import UserError
from tunekit.estimate.checkpoint import ASSUMED_WRITE_BYTES_PER_S

# Agreeing on the stop (one all-reduce per step), the marker, fsyncs, and the launcher noticing its workers left.
STOP_MARGIN_S = 30
MIN_GRACE_S = 60
MAX_GRACE_S = 65535  # sbatch --signal's sig_time is at most 65535 s
FORWARDED_SIGNAL = "SIGTERM"  # what the batch shell sends the steps; Slurm itself sends SIGTERM at preemption
_JOB_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """Everything render_sbatch needs; plan_job fills it from a validated config and the command-line options."""

    config_path: str  # absolute
    overrides: tuple[str, ...]  # the user's --set items, then the pinned DeepSpeed choice
    output_dir: str  # absolute: the run directory the shell checks for "finished"
    nodes: int
    processes_per_node: int
    gpus: bool  # False: CPU processes (gloo)
    grace_s: int
    grace_why: str  # one comment line: how grace_s was computed
    deepspeed_why: str  # one comment line: the run's DeepSpeed choice
    fits: bool  # choose_zero's verdict: False -> `tunekit train` will refuse to start there (pre-flight)
    chdir: str  # absolute: the config's relative paths resolve from here, as when it was validated
    log_dir: str  # relative to chdir or absolute
    python: str  # the interpreter that has tunekit (the script's default; TUNEKIT_PYTHON overrides it at run time)
    job_name: str
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    port: int | None = None  # None: 20000 + job id % 20000, so jobs sharing a node do not collide

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


def parse_time(text: str) -> int:
    """Seconds in a Slurm time limit: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds. Raises UserError for anything else."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise UserError(f"--time {text}: not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    days, first, second, third = match.groups()
    numbers = [int(part) for part in (first, second, third) if part is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(numbers) == 1:  # MM
        total = numbers[0] * 60
    elif len(numbers) == 2:  # MM:SS
        total = numbers[0] * 60 + numbers[1]
    else:  # HH:MM:SS
        total = numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    if total <= 0:
        raise UserError(f"--time {text}: must be longer than 0")
    return total


def grace_seconds(save_bytes: float, step_s: float, write_bytes_per_s: float = ASSUMED_WRITE_BYTES_PER_S) -> int:
    """Seconds between the warning signal and the kill that one save needs: finish the current step, write
    `save_bytes`, stop; rounded up to 10 s, at least MIN_GRACE_S. Raises UserError past Slurm's limit."""
    needed = save_bytes / write_bytes_per_s + step_s + STOP_MARGIN_S
    grace = max(MIN_GRACE_S, int(math.ceil(needed / 10.0)) * 10)
    if grace > MAX_GRACE_S:
        raise UserError(f"a checkpoint of {save_bytes / 1e9:.0f} GB needs ~{grace} s to save at the assumed "
                        f"{write_bytes_per_s / 1e6:.0f} MB/s: more than sbatch --signal allows ({MAX_GRACE_S} s)")
    return grace


def plan_job(config, config_path: str, overrides: tuple[str, ...] | list[str], *, nodes: int,
             gpus_per_node: int | None, processes_per_node: int | None, cpu: bool, gpu_memory_gb: float | None,
             time: str | None = None, partition: str | None = None, account: str | None = None,
             job_name: str | None = None, chdir: str | None = None, log_dir: str = "logs",
             port: int | None = None, python: str | None = None) -> SlurmJob:
    """The job for a validated `config` (tunekit.config.RunConfig): checks the options, chooses the DeepSpeed setup
    (tunekit.estimate.stage.choose_zero) and the grace period from the estimate's checkpoint size. Raises UserError
    for options that cannot work."""
    from tunekit.checkpoints import human_bytes
    from tunekit.estimate import config_shape
    from tunekit.estimate.checkpoint import run_checkpoint
    from tunekit.estimate.cost import sequences_per_example, step_flops, training_hours

    if nodes < 1:
        raise UserError(f"--nodes {nodes}: must be at least 1")
    if cpu:
        if gpus_per_node is not None:
            raise UserError("--gpus-per-node: not with --cpu (use --processes-per-node)")
        per_node = processes_per_node or 1
    else:
        if gpus_per_node is None:
            raise UserError("--gpus-per-node is required (or --cpu --processes-per-node N for CPU nodes)")
        if processes_per_node is not None:
            raise UserError("--processes-per-node: only with --cpu (on GPU nodes it is --gpus-per-node)")
        per_node = gpus_per_node
    if per_node < 1:
        raise UserError(f"--{'processes' if cpu else 'gpus'}-per-node {per_node}: must be at least 1")
    if port is not None and not 1024 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 1024 and 65535")
    stop_signals = config.training.stop_signals
    if FORWARDED_SIGNAL not in stop_signals:
        raise UserError(f"training.stop_signals: {stop_signals} lacks {FORWARDED_SIGNAL}, which Slurm sends at the "
                        "time limit and on preemption (the job would die without a checkpoint)")
    name = job_name or Path(config_path).stem
    if not _JOB_NAME.fullmatch(name):
        raise UserError(f"--job-name {name!r}: use letters, digits, '.', '_' and '-' only")
    workdir = Path(chdir or os.getcwd()).resolve()
    if not workdir.is_dir():
        raise UserError(f"--chdir {workdir}: not a directory")
    device = "cpu" if cpu else "cuda"
    world = nodes * per_node

    choice, pins = _deepspeed_choice(config, world, gpu_memory_gb, device)

    # Grace: the estimate's checkpoint size at the assumed write speed, plus one optimizer step.
    shape = config_shape(config)
    t = config.training
    checkpoint = run_checkpoint(config, choice, device, world)
    save = checkpoint["bytes"]
    step_s = 0.0
    if device == "cuda":  # GPU time from FLOPs (estimate/cost.py's A100 rule); no such model for CPU nodes
        rows = t.per_device_train_batch_size * t.gradient_accumulation_steps * world * sequences_per_example(config)
        flops = step_flops(config, shape, rows * config.data.max_seq_len)  # DPO: + the reference's forward
        step_s = training_hours(flops, method=config.method, gpus=world) * 3600
    grace = grace_seconds(save, step_s)
    grace_why = (f"checkpoint ~{human_bytes(save)} ({checkpoint['what']}) at an assumed {ASSUMED_WRITE_BYTES_PER_S / 1e6:.0f} "
                 f"MB/s = {save / ASSUMED_WRITE_BYTES_PER_S:.0f} s, + one step (~{step_s:.0f} s"
                 f"{', unknown on CPU' if device == 'cpu' else ''}) + {STOP_MARGIN_S} s to stop -> {grace} s "
                 f"(at least {MIN_GRACE_S})")
    if time is not None:
        limit = parse_time(time)
        if limit < grace + MIN_GRACE_S:
            raise UserError(f"--time {time}: {limit} s leaves no training time once the {grace} s grace period "
                            f"for the save is reserved (at least {grace + MIN_GRACE_S} s)")

    output_dir = Path(config.output_dir)
    return SlurmJob(
        config_path=str(Path(config_path).resolve()), overrides=tuple(overrides) + pins,
        output_dir=str(output_dir if output_dir.is_absolute() else workdir / output_dir),
        nodes=nodes, processes_per_node=per_node, gpus=not cpu, grace_s=grace, grace_why=grace_why,
        deepspeed_why=_describe_choice(choice, world), fits=bool(choice["fits"]), chdir=str(workdir),
        log_dir=log_dir, python=python or sys.executable, job_name=name, time=time, partition=partition,
        account=account, port=port,
    )


def _deepspeed_choice(config, world: int, gpu_memory_gb: float | None, device: str) -> tuple[dict, tuple[str, ...]]:
    """choose_zero's answer for this job, and the --set items that pin it for every (re)start: a ZeRO checkpoint
    only resumes under the stage that wrote it, and a requeued job may land on other hardware."""
    from tunekit.estimate.stage import choose_zero

    memory = gpu_memory_gb or config.preflight.gpu_memory_gb or 80.0
    choice = choose_zero(config, world, memory, device=device)
    ds = config.deepspeed
    pins: tuple[str, ...] = ()
    if ds is not None and ds.chooses_stage and choice["deepspeed"]:
        pins = (f"deepspeed.stage={choice['stage']}",)
        if choice.get("offload_optimizer"):
            pins += ("deepspeed.offload_optimizer=true",)
        if choice.get("offload_param"):
            pins += ("deepspeed.offload_param=true",)
    return choice, pins


def _describe_choice(choice: dict, world: int) -> str:
    """One line: the set-up and choose_zero's reason ("16 processes: DDP needs ..., ZeRO-1 needs ...")."""
    if not choice["deepspeed"]:
        setup = "no DeepSpeed (" + ("DDP" if world > 1 else "one process") + ")"
    else:
        offload = [name for name in ("offload_optimizer", "offload_param") if choice.get(name)]
        setup = f"DeepSpeed ZeRO-{choice['stage']}" + (f" + {', '.join(offload)}" if offload else "")
    if choice.get("auto") and not choice["deepspeed"]:
        # a full config always has a deepspeed section: `--set` cannot say "none"; auto decides it at each start
        setup += " (stage auto, not pinned: decided again at each start)"
    reason = choice.get("reason") or ""
    return f"{setup}; {reason}" if reason else setup


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script for `job` (bash; `bash -n` clean)."""
    q = shlex.quote
    sbatch = [f"--job-name={job.job_name}", f"--nodes={job.nodes}",
              "--ntasks-per-node=1  # one launcher per node; it starts that node's processes"]
    if job.gpus:
        sbatch.append(f"--gpus-per-node={job.processes_per_node}")
    for option, value in (("time", job.time), ("partition", job.partition), ("account", job.account)):
        if value is not None:
            sbatch.append(f"--{option}={value}")
    sbatch += [
        f"--chdir={job.chdir}  # the config's relative paths resolve from here",
        f"--output={job.log_dir}/%x-%j.out  # one log per job, across its requeues",
        "--open-mode=append  # a requeued start appends instead of truncating",
        "--requeue",
        f"--signal=B:USR1@{job.grace_s}  # the time-limit warning, to this shell only",
    ]
    train = ["-m", "tunekit", "train", job.config_path]
    for item in job.overrides:
        train += ["--set", item]
    train += ["--resume", "auto"]
    if job.world_size == 1:  # nothing to launch: one process, Slurm's SIGTERM reaches it directly
        launch = ['exec "$TUNEKIT_PYTHON" ' + " ".join(q(part) for part in train)]
    else:
        # --multi_gpu starts the processes (torchrun); the run config decides DeepSpeed and its stage, and the run
        # sets up gloo itself on CPU. machine_rank: this node's index in the allocation (one task per node).
        launch = [
            'exec "$TUNEKIT_PYTHON" -m accelerate.commands.launch --multi_gpu',
            f"--num_machines {job.nodes} --num_processes {job.world_size}",
            '--machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_PROCESS_IP" '
            '--main_process_port "$MAIN_PROCESS_PORT"',
            "--rdzv_backend static --same_network --mixed_precision no --dynamo_backend no",
            " ".join(q(part) for part in train),
        ]
    launch_body = " \\\n    ".join(launch)
    port = str(job.port) if job.port is not None else "$((20000 + SLURM_JOB_ID % 20000))"
    hardware = (f"{job.nodes} node(s) x {job.processes_per_node} GPU(s)" if job.gpus
                else f"{job.nodes} CPU node(s) x {job.processes_per_node} process(es)")
    cpu_env = ("export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # CPU processes: one thread each, or they fight over "
               "the cores") if not job.gpus else None
    lines = [
        "#!/bin/bash",
        f"# Written by `tunekit slurm` for {job.config_path}: {hardware}, {job.world_size} process(es) in all.",
        "# Submit with `sbatch THIS_FILE`. Every (re)start runs the same command with --resume auto: fresh the first",
        "# time, from the newest complete checkpoint after a requeue, nothing once the run has finished.",
        f"# The run's DeepSpeed setup: {job.deepspeed_why}",
        f"# Grace for one save: {job.grace_why}",
        *[f"#SBATCH {line}" for line in sbatch],
        "",
        "set -u",
        "# The launcher forwards a stop signal to its workers and SIGKILLs those still running this many seconds later",
        "# (default 30): they get the whole grace period to write the checkpoint.",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={job.grace_s}",
        cpu_env,
        f"export TUNEKIT_PYTHON=${{TUNEKIT_PYTHON:-{q(job.python)}}}  # the Python environment that has tunekit",
        f"OUTPUT_DIR={q(job.output_dir)}",
        "# Rank 0's node is the allocation's first host: every node's launcher meets there.",
        'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MAIN_PROCESS_PORT={port}",
        "export MAIN_PROCESS_IP MAIN_PROCESS_PORT",
        "",
        "launch_node() {  # the srun task on each node",
        f"  {launch_body}",
        "}",
        "export -f launch_node",
        "",
        'stop=""',
        "on_usr1() {",
        '  stop=USR1',
        f'  echo "tunekit-slurm: SIGUSR1 at $(date -u +%T): the time limit is at most {job.grace_s} s away; '
        'stopping the run at its next step"',
        "  # SIGTERM to the training processes through Slurm. Not `kill -TERM $step`: srun answers its own SIGTERM by",
        "  # SIGKILLing its tasks.",
        '  scancel --signal=TERM "$SLURM_JOB_ID"',
        "}",
        "on_term() {",
        '  [ -n "$stop" ] || stop=TERM',
        '  echo "tunekit-slurm: SIGTERM at $(date -u +%T): the job is ending (preempted, cancelled or out of time); '
        'the training processes got it too and save"',
        "}",
        "trap on_usr1 USR1",
        "trap on_term TERM",
        "",
        'echo "tunekit-slurm: job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} at $(date -u +%FT%TZ) '
        'on $SLURM_JOB_NODELIST (rank 0: $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT)"',
        "# --kill-on-bad-exit=0: a node that stops first must not take down nodes still writing checkpoint shards.",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c launch_node &",
        "step=$!",
        "# A trapped signal interrupts `wait` (status > 128) while the step runs on: wait again until it has exited.",
        'while :; do',
        '  wait "$step"; rc=$?',
        '  kill -0 "$step" 2>/dev/null || break',
        "done",
        'if [ "$rc" -gt 128 ]; then wait "$step" 2>/dev/null; last=$?; [ "$last" -eq 127 ] || rc=$last; fi',
        "# The launcher exits 1 after a stop as after a crash (its workers exit 75): the run directory decides.",
        'echo "tunekit-slurm: step exited with $rc at $(date -u +%T)"',
        "",
        "finished() {  # final/ + summary.json and no newer checkpoint: the rule --resume auto uses",
        '  "$TUNEKIT_PYTHON" -c \'import sys; from tunekit.rundir import finished_summary; '
        'sys.exit(0 if finished_summary(sys.argv[1]) else 1)\' "$OUTPUT_DIR"',
        "}",
        'if finished; then echo "tunekit-slurm: the run finished: $OUTPUT_DIR"; exit 0; fi',
        'if [ "$stop" = USR1 ]; then',
        '  echo "tunekit-slurm: requeueing job $SLURM_JOB_ID: the next start resumes from the newest complete '
        'checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '  echo "tunekit-slurm: scontrol requeue failed: resubmit this script (it resumes with --resume auto)"',
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """The --out path, refused (UserError) when it exists without `overwrite`, is a directory, or its folder is
    missing. Called before anything else so that a refused command writes nothing."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out}: is a directory")
    if path.exists() and not overwrite:
        raise UserError(f"--out {out}: exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise UserError(f"--out {out}: folder {path.parent} does not exist")
    return path


def write_sbatch(text: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the script to `out` atomically (temp file + rename); returns the path. Raises UserError as check_out."""
    from tunekit.rundir import write_text_atomically

    path = check_out(out, overwrite)
    write_text_atomically(path, text)
    return path
