"""Preemption-safe training: a stop signal becomes one complete checkpoint and exit code 75.

A cluster scheduler warns a job before it kills it: Slurm sends SIGTERM on preemption and at the time limit (and
any signal `--signal=[B:]SIG@SECONDS` names, that many seconds earlier), `scancel --signal=USR1` reaches chosen
tasks. Unhandled, SIGTERM kills each process wherever it is and every step since the last checkpoint is lost.

  handler    `stop_signals` installs handlers for training.stop_signals that record the first signal and nothing
             else. Raising from a handler would end one rank in the middle of a collective and leave the others
             waiting in it until the collective timeout (training.ddp_timeout).
  agreement  `callbacks.StopCallback.on_step_end`: one small all-reduce per optimizer step of [signal, out of
             time] (the max_seconds budget rides along: one collective per step, not two). Every rank reads the
             same answer, whether the signal reached every process (the launcher forwards SIGTERM) or only one
             (SIGUSR1 to a single worker).
  checkpoint should_save + should_training_stop at that step: the Trainer saves checkpoint-N,
             callbacks.ConservativeCheckpointCallback writes the completion marker last and prunes (retention
             always keeps the newest complete checkpoint, so never this one).
  exit       `finish` writes OUTPUT_DIR/stopped.json and raises `Preempted`: no final save, evaluation or task
             metric (there is no time for them); `tunekit train` exits EXIT_PREEMPTED and `--resume auto` continues.
             A signal before the training loop starts stops the run the same way, with no checkpoint.

Launchers: under `accelerate launch` the torch elastic agent catches SIGTERM (TORCHELASTIC_SIGNALS_TO_HANDLE,
default SIGTERM,SIGINT,SIGHUP,SIGQUIT), forwards it to every worker and SIGKILLs them after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30): that must cover one step and one save. The agent itself dies
on SIGUSR1 unless TORCHELASTIC_SIGNALS_TO_HANDLE adds it: send SIGUSR1 to the workers only. The launcher's own exit
code after a stop is 1, not 75 (measured: docs/launching.md): a job script reads OUTPUT_DIR/stopped.json.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunekit.distributed import barrier, max_over_ranks
from tunekit.rundir import STOPPED_NAME

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later" - distinct from 0 (done), 1 (crash), 2 (user error)

_received: dict = {}  # the first stop signal since `stop_signals` installed the handlers: {"signum", "at"}


class Preempted(Exception):
    """Training stopped on a signal; `checkpoint` (None when it stopped before the first step) is complete."""

    def __init__(self, signal_name: str, step: int | None, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = (f"at step {step}: {checkpoint} is complete" if checkpoint is not None
                 else "before training started: no checkpoint written")
        super().__init__(f"stopped by {signal_name} {where}; rerun with --resume auto to continue "
                         f"(exit code {EXIT_PREEMPTED})")


def _record(signum: int, frame) -> None:
    # Only record: no raise (see the module doc), no print (the main thread may be inside a print to the same
    # stream, and a buffered writer refuses re-entry).
    _received.setdefault("signum", signum)
    _received.setdefault("at", time.time())


@contextmanager
def stop_signals(names: list[str]) -> Iterator[None]:
    """Record the first of `names` (e.g. ["SIGTERM", "SIGUSR1"]) received while inside; the previous handlers are
    restored on exit (a test process or another caller keeps its own). Imports nothing heavy: install it first."""
    _received.clear()
    previous = {}
    for name in names:
        signum = getattr(signal, name)
        previous[signum] = signal.signal(signum, _record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()  # a later run in this process starts unsignalled


def ignore_until_exit(names: list[str]) -> None:
    """After a stop: ignore `names` for the rest of this process. The elastic agent SIGTERMs the workers still
    tearing down as soon as the first one exits; ignored, each still exits with EXIT_PREEMPTED (not -15)."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def received_signal() -> int | None:
    """This process's first stop signal since the handlers were installed, or None."""
    return _received.get("signum")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def check_before_training(output_dir: str, is_main: bool) -> None:
    """Raise Preempted on every rank (stopped.json written by the main process) when any rank got a stop signal
    before the training loop: nothing to save yet. Collective: every rank calls it at the same point."""
    signum = max_over_ranks([received_signal() or 0])[0]
    if not signum:
        return
    if is_main:
        write_stopped(output_dir, signum, None, None)
    barrier()
    raise Preempted(signal_name(signum), None, None)


def finish(output_dir: str, stopped: tuple[int, int] | None, is_main: bool) -> None:
    """After `trainer.train()`: return when training was not stopped by a signal; else raise Preempted on every
    rank once the main process has written stopped.json. Collective when stopped (every rank agreed to stop).

    `stopped`: (signal number, step) from `callbacks.stopped_on_signal`; checkpoint-STEP was saved at that step.
    """
    if stopped is None:
        return
    from tunekit.checkpoints import read_marker

    signum, step = stopped
    checkpoint = Path(output_dir) / f"checkpoint-{step}"
    if is_main:
        if read_marker(checkpoint) is None:  # the save failed without raising: a bug, not a stop to resume from
            raise RuntimeError(f"stopped by {signal_name(signum)} but {checkpoint} is not complete")
        write_stopped(output_dir, signum, step, checkpoint)
    barrier()  # no rank exits (and has the launcher tear the others down) before stopped.json is written
    raise Preempted(signal_name(signum), step, checkpoint)


def write_stopped(output_dir: str, signum: int, step: int | None, checkpoint: Path | None) -> None:
    """OUTPUT_DIR/stopped.json, atomically (a job script may read it to decide to requeue); skipped when output_dir
    does not exist yet (a signal before the run directory was made). rundir.create removes it when a run starts."""
    from tunekit.checkpoints import write_json_durably

    if not Path(output_dir).is_dir():
        return
    write_json_durably(Path(output_dir) / STOPPED_NAME, {
        "signal": signal_name(signum), "step": step, "checkpoint": str(checkpoint) if checkpoint else None,
        "exit_code": EXIT_PREEMPTED, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
