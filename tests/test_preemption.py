"""Preemption: a stop signal becomes one complete checkpoint and exit 75; `--resume auto` finishes the run with the
weights of an uninterrupted one; a resume applies today's retention first; a stalled rank ends the job within
training.ddp_timeout.

Runs that are signalled go through WRAPPER (`tunekit train` plus a test-only pacing callback): it writes the step in
progress to PROGRESS_DIR/rank{R} at each step's start, can sleep there (so a signal sent from outside lands inside a
known step) and can send a signal to its own process at a chosen step, or before the training loop. Pacing changes
no number: the weights are compared with an unpaced run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tunekit import rundir
from tunekit.checkpoints import MARKER_NAME, latest_complete_checkpoint, read_marker, write_marker
from tunekit.cli import main
from tunekit.config import TrainingConfig
from tunekit.errors import UserError
from tunekit.preemption import EXIT_PREEMPTED, received_signal, stop_signals

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"

WRAPPER = """
import os, signal, sys, time
from pathlib import Path
import transformers
import tunekit.train
from tunekit.cli import main

pace = float(os.environ.get("TK_PACE_SECONDS", "0"))
progress = Path(os.environ["TK_PROGRESS_DIR"]) if os.environ.get("TK_PROGRESS_DIR") else None
self_signal = os.environ.get("TK_SELF_SIGNAL")  # "SIGUSR1@5": at the start of step 5; "SIGTERM@before": before training
rank = int(os.environ.get("RANK", "0"))

def send_self(name):
    os.kill(os.getpid(), getattr(signal, name))

class Pace(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1  # the step now in progress
        if progress is not None:
            tmp = progress / f".rank{rank}.tmp"
            tmp.write_text(f"{step} {os.getpid()}")
            os.replace(tmp, progress / f"rank{rank}")
        if self_signal and self_signal.split("@")[1] == str(step):
            send_self(self_signal.split("@")[0])
        time.sleep(pace)

build = tunekit.train.build_callbacks
tunekit.train.build_callbacks = lambda *a, **k: build(*a, **k) + [Pace()]
if self_signal and self_signal.endswith("@before"):
    build_trainer = tunekit.train.build_trainer
    def signalled_build_trainer(*a, **k):
        send_self(self_signal.split("@")[0])
        return build_trainer(*a, **k)
    tunekit.train.build_trainer = signalled_build_trainer
code = main(sys.argv[1:])
if progress is not None:
    (progress / f"exit.rank{rank}").write_text(str(code))
sys.exit(code)
"""


# ---------------------------------------------------------------- config, handler, run directory (fast)


def test_stop_signals_and_ddp_timeout_are_validated():
    assert TrainingConfig().stop_signals == ["SIGTERM", "SIGUSR1"] and TrainingConfig().ddp_timeout is None
    assert TrainingConfig(stop_signals=[]).stop_signals == []
    for bad, message in ((["SIGKILL"], "cannot be caught"), (["SIGSTOP"], "cannot be caught"),
                         (["TERM"], "not a signal name"), (["SIG_DFL"], "not a signal name")):
        with pytest.raises(ValueError, match=message):
            TrainingConfig(stop_signals=bad)
    with pytest.raises(ValueError):
        TrainingConfig(ddp_timeout=0)


def test_the_handler_only_records_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR1)
    with stop_signals(["SIGTERM", "SIGUSR1"]):
        assert received_signal() is None
        os.kill(os.getpid(), signal.SIGUSR1)  # no exception, no exit: only recorded
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert received_signal() == signal.SIGUSR1  # the first one
    assert signal.getsignal(signal.SIGUSR1) is before


def test_stop_callback_saves_on_a_signal_and_evaluates_on_the_time_budget(capsys):
    from transformers import TrainerControl

    from tunekit.callbacks import StopCallback

    state = SimpleNamespace(global_step=3, max_steps=8, is_world_process_zero=True)
    callback = StopCallback()
    with stop_signals(["SIGUSR1"]):
        control = callback.on_step_end(None, state, TrainerControl())
        assert not (control.should_save or control.should_training_stop) and callback.stopped is None
        os.kill(os.getpid(), signal.SIGUSR1)
        control = callback.on_step_end(None, state, TrainerControl())
    # Saved at this step, no evaluation added (one runs only when the step had one scheduled anyway).
    assert control.should_save and control.should_training_stop and not control.should_evaluate
    assert callback.stopped == (signal.SIGUSR1, 3)
    assert "SIGUSR1 received: saving checkpoint-3 and stopping" in capsys.readouterr().err
    # At the last step the run ends normally (final save, summary): not a stop to resume from.
    last, callback = SimpleNamespace(global_step=8, max_steps=8, is_world_process_zero=True), StopCallback()
    with stop_signals(["SIGUSR1"]):
        os.kill(os.getpid(), signal.SIGUSR1)
        callback.on_step_end(None, last, TrainerControl())
    assert callback.stopped is None
    # The time budget: stop, evaluate and save.
    callback = StopCallback(max_seconds=1e-9)
    callback.on_train_begin(None, state, TrainerControl())
    control = callback.on_step_end(None, state, TrainerControl())
    assert control.should_save and control.should_training_stop and control.should_evaluate
    assert callback.stopped is None


def test_max_over_ranks_is_the_values_themselves_in_one_process():
    from tunekit.distributed import max_over_ranks

    assert max_over_ranks([0, 15, 1]) == [0, 15, 1]


def test_ddp_timeout_reaches_the_trainer_arguments_and_groups_made_later(tmp_path, tiny_base, monkeypatch):
    """SFTConfig.ddp_timeout (the world group the Trainer makes on GPU) and torch's default for groups made without
    a timeout (DeepSpeed's copy of the world group; the world group on the CPU DDP path)."""
    import torch.distributed.distributed_c10d as c10d

    from tunekit import config as config_mod
    from tunekit.backends.common import training_arguments

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # restored after the test
        monkeypatch.setattr(c10d, name, getattr(c10d, name))

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": "lora", "output_dir": str(tmp_path / "out"),
                                    "model": {"name_or_path": str(tiny_base)},
                                    "data": {"sources": [{"path": str(tmp_path / "t.jsonl"), "format": "alpaca"}]},
                                    "training": {"ddp_timeout": 42}}))
    args = training_arguments(config_mod.load(path, check_paths=False))
    assert args.ddp_timeout == 42 and args.ddp_timeout_delta.total_seconds() == 42
    assert c10d._get_default_timeout(c10d.Backend("gloo")).total_seconds() == 42


def test_the_default_ddp_timeout_covers_rank_zeros_checkpoint_write():
    """null ddp_timeout: a few minutes for what saves quickly; for a model whose save takes longer, twice rank 0's
    write (the other ranks wait for it in a barrier), which ZeRO shortens by splitting the optimizer state."""
    from tunekit.estimate.checkpoint import (MIN_DDP_TIMEOUT_S, checkpoint_bytes, default_ddp_timeout,
                                             write_seconds)

    def rank0(params, method="full", deepspeed=True, world=8, trainable=None):
        return checkpoint_bytes(params, trainable or params, method=method, weight_bytes=2, adam_bytes=8,
                                deepspeed=deepspeed, world=world, rank0_only=True)

    assert default_ddp_timeout(rank0(8e9, "lora", trainable=40e6)) == MIN_DDP_TIMEOUT_S
    big = rank0(70e9, world=64)  # the consolidated bf16 weights plus 1/64 of Adam + master
    assert big == 70e9 * 2 + 70e9 * 12 / 64
    assert default_ddp_timeout(big) >= 2 * write_seconds(big) > MIN_DDP_TIMEOUT_S
    assert default_ddp_timeout(big) % 60 == 0
    assert rank0(8e9, deepspeed=False) == checkpoint_bytes(8e9, 8e9, method="full", weight_bytes=2, adam_bytes=8,
                                                           deepspeed=False)  # DDP: rank 0 writes everything
    assert rank0(8e9, world=8) < checkpoint_bytes(8e9, 8e9, method="full", weight_bytes=2, adam_bytes=8,
                                                  deepspeed=True)


def fake_run(root: Path, steps: list[int], metrics: dict[int, float] | None = None) -> Path:
    """A run directory with config.yaml and complete checkpoint-N directories (a file and a marker each)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text("method: lora\n")
    for step in steps:
        checkpoint = root / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "weights.bin").write_bytes(b"x" * step)
        logged = {"eval_loss": metrics[step]} if metrics and step in metrics else {}
        write_marker(checkpoint, step, logged, 1e-3)
    return root


def test_resume_auto_decides_from_the_directory(tmp_path, tiny_base):
    from tunekit.checkpoints import resume_target

    config_path = tmp_path / "run.yaml"
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    config_path.write_text(yaml.safe_dump({"method": "lora", "output_dir": str(tmp_path / "out"),
                                           "model": {"name_or_path": str(tiny_base)},
                                           "data": {"sources": [{"path": str(data), "format": "alpaca"}]}}))
    from tunekit import config as config_mod

    config = config_mod.load(config_path)
    out = tmp_path / "out"
    # Nothing there: a fresh start.
    rundir.check_output_dir(str(out), False, "auto", config)
    assert resume_target(str(out), "auto") is None
    # Not a tunekit run: never replaced.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no tunekit run"):
        rundir.check_output_dir(str(out), False, "auto", config)
    (out / "notes.txt").unlink()
    # A run of this config that died before its first checkpoint (an interrupted one is no checkpoint): restarted.
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    (out / "checkpoint-3").mkdir()
    rundir.check_output_dir(str(out), False, "auto", config)
    assert resume_target(str(out), "auto") is None and rundir.finished_summary(out) is None
    # ...but a run of another config is not restarted over.
    other = config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 7})})
    with pytest.raises(UserError, match=r"another config .*training.max_steps"):
        rundir.check_output_dir(str(out), False, "auto", other)
    # A complete checkpoint: resumed from (a changed config is allowed then: the resume checks verify the rest).
    fake_run(out, [4])
    rundir.check_output_dir(str(out), False, "auto", other)
    assert resume_target(str(out), "auto") == out / "checkpoint-4"
    # Finished: final/ and summary.json at the newest checkpoint's step...
    (out / "final").mkdir()
    (out / "summary.json").write_text(json.dumps({"steps": 4}))
    assert rundir.finished_summary(out) == {"steps": 4}
    assert main(["train", str(config_path), "--resume", "auto"]) == 0
    # ...unless a complete checkpoint is newer than it (a later run continued past it).
    fake_run(out, [6])
    assert rundir.finished_summary(out) is None


def test_resume_prunes_to_todays_retention_before_training_never_the_resumed_checkpoint(tmp_path):
    from tunekit.callbacks import ConservativeCheckpointCallback
    from tunekit.config import CheckpointsConfig

    # eval_loss: 2 is the best, 6 the worst; 8 is the newest (resumed from), with no metric.
    run = fake_run(tmp_path / "run", [2, 4, 6, 8], {2: 1.0, 4: 2.0, 6: 3.0})
    args = SimpleNamespace(output_dir=str(run), should_save=True)
    tight = CheckpointsConfig(keep_top_k=0, keep_last_n=1)
    callback = ConservativeCheckpointCallback(tight, resume_from=run / "checkpoint-8")
    callback.on_train_begin(args, SimpleNamespace(global_step=8), None)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8"]  # best + newest
    # The checkpoint resumed from survives even when the rule alone would drop it (not the newest here).
    run = fake_run(tmp_path / "run2", [2, 4, 6], {2: 1.0, 4: 2.0, 6: 3.0})
    callback = ConservativeCheckpointCallback(tight, resume_from=run / "checkpoint-4")
    args = SimpleNamespace(output_dir=str(run), should_save=True)
    callback.on_train_begin(args, SimpleNamespace(global_step=4), None)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # A fresh run prunes nothing before training.
    run = fake_run(tmp_path / "run3", [2, 4, 6], {2: 1.0, 4: 2.0, 6: 3.0})
    ConservativeCheckpointCallback(tight).on_train_begin(SimpleNamespace(output_dir=str(run), should_save=True),
                                                         SimpleNamespace(global_step=0), None)
    assert len(list(run.glob("checkpoint-*"))) == 3


# ---------------------------------------------------------------- one process, LoRA: signal, exit 75, resume auto

MAX_STEPS, SAVE_STEPS, STOP_STEP = 8, 2, 5


@pytest.fixture(scope="module")
def lora_config(tiny_base, demo_data, tmp_path_factory):
    """lora_config(name) -> a LoRA run config writing to OUTPUT/name (eval at every save, so retention has a
    metric; dropout on, so the RNG state matters)."""
    root = tmp_path_factory.mktemp("lora-runs")

    def make(name: str) -> Path:
        config = {
            "method": "lora", "output_dir": str(root / name), "model": {"name_or_path": str(tiny_base)},
            "data": {"sources": [{"path": str(demo_data["train"]), "format": "alpaca", "max_examples": 128}],
                     "eval_fraction": 0.1, "max_seq_len": 64, "cache_dir": str(root / "cache")},
            "training": {"max_steps": MAX_STEPS, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
                         "logging_steps": 1, "learning_rate": 3e-3},
            "checkpoints": {"save_steps": SAVE_STEPS, "keep_top_k": 2, "keep_last_n": 2},
            "eval": {"task_metric": "none", "rank_spectrum": False},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make


def run_wrapped(tmp_path: Path, argv: list[str], **env) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, str(wrapper), *argv], env=full_env, capture_output=True, text=True,
                          timeout=600)


def output_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["output_dir"])


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    adapter = run / "final" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run / "final" / "model.safetensors"))


def test_one_process_signal_saves_the_step_exits_75_and_resume_auto_ends_equal(lora_config, tmp_path, monkeypatch,
                                                                              capsys):
    import tunekit.train

    reference = lora_config("reference")
    assert main(["train", str(reference)]) == 0
    resolved = json.loads((output_dir(reference) / "resolved.json").read_text())
    assert resolved["ddp_timeout"] == 300  # null: the default, sized for a tiny model's save; recorded as run

    config = lora_config("signalled")
    run = output_dir(config)
    started = time.monotonic()
    result = run_wrapped(tmp_path, ["train", str(config)], TK_SELF_SIGNAL=f"SIGTERM@{STOP_STEP}")
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    print(f"one process: SIGTERM in step {STOP_STEP} -> exit {result.returncode} "
          f"({time.monotonic() - started:.1f} s with start-up)")
    assert f"SIGTERM received: saving checkpoint-{STOP_STEP} and stopping" in result.stderr
    assert f"stopped by SIGTERM at step {STOP_STEP}" in result.stderr and "--resume auto" in result.stderr
    # One complete checkpoint at the signalled step (0 steps lost); no final save, summary or report.
    assert latest_complete_checkpoint(run) == run / f"checkpoint-{STOP_STEP}"
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    stopped = json.loads((run / "stopped.json").read_text())
    assert stopped["signal"] == "SIGTERM" and stopped["step"] == STOP_STEP and stopped["exit_code"] == 75
    assert stopped["checkpoint"] == str(run / f"checkpoint-{STOP_STEP}")
    kept = {p.name for p in run.glob("checkpoint-*")}
    assert kept == {"checkpoint-2", "checkpoint-4", f"checkpoint-{STOP_STEP}"}  # top-2 by eval_loss + last 2

    # Resume with a tighter retention (the disk error's advice): applied before the first resumed step.
    from transformers import TrainerCallback

    seen = []

    class SeeCheckpoints(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not seen:
                seen.append({p.name for p in run.glob("checkpoint-*")})

    build = tunekit.train.build_callbacks
    monkeypatch.setattr(tunekit.train, "build_callbacks", lambda *a, **k: build(*a, **k) + [SeeCheckpoints()])
    markers = {step: read_marker(run / f"checkpoint-{step}") for step in (2, 4)}
    best = min((2, 4), key=lambda step: markers[step]["metrics"]["eval_loss"])
    assert main(["train", str(config), "--resume", "auto", "--set", "checkpoints.keep_top_k=0",
                 "--set", "checkpoints.keep_last_n=1"]) == 0
    assert seen == [{f"checkpoint-{best}", f"checkpoint-{STOP_STEP}"}]
    out = capsys.readouterr().out
    assert f"resume verified: step {STOP_STEP}" in out
    assert not (run / "stopped.json").exists()  # it described the stop, and the run has moved on
    assert max_abs_diff(final_weights(run), final_weights(output_dir(reference))) == 0.0

    # Requeued once more: the run has finished, nothing to do.
    assert main(["train", str(config), "--resume", "auto"]) == 0
    assert f"the run already finished at step {MAX_STEPS}" in capsys.readouterr().out


def test_a_signal_before_training_stops_with_75_and_no_checkpoint_then_resume_auto_starts(lora_config, tmp_path,
                                                                                         capsys):
    config = lora_config("early")
    run = output_dir(config)
    result = run_wrapped(tmp_path, ["train", str(config), "--set", "training.max_steps=2"],
                         TK_SELF_SIGNAL="SIGUSR1@before")
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    assert "stopped by SIGUSR1 before training started: no checkpoint written" in result.stderr
    assert not list(run.glob("checkpoint-*"))
    assert json.loads((run / "stopped.json").read_text())["step"] is None
    # The directory holds this config's run with no checkpoint: --resume auto starts it from scratch.
    assert main(["train", str(config), "--set", "training.max_steps=2", "--resume", "auto"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


# ---------------------------------------------------------------- two processes, ZeRO-3: both delivery paths

ZERO3_STEPS, ZERO3_SAVE, SIGNAL_AFTER = 16, 4, 6  # signal once step SIGNAL_AFTER is in progress


def zero3_config(tmp_path: Path, tiny_base, demo_data, name: str, **training) -> Path:
    """Full fine-tuning with an explicit ZeRO-3 section (the test must not depend on what stage `auto` picks)."""
    config = {
        "method": "full", "output_dir": str(tmp_path / name), "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": [{"path": str(demo_data["train"]), "format": "alpaca"}], "eval_fraction": 0,
                 "max_seq_len": 64, "cache_dir": str(tmp_path / "cache")},
        "deepspeed": {"stage": 3},
        "training": {"max_steps": ZERO3_STEPS, "per_device_train_batch_size": 4, "logging_steps": 1,
                     "learning_rate": 3e-4, **training},
        "checkpoints": {"save_steps": ZERO3_SAVE},
        "eval": {"task_metric": "none"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="60")  # the agent's grace before SIGKILL: one step and one save
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_launch(tmp_path: Path, name: str, argv: list[str], **env) -> subprocess.Popen:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    log = open(tmp_path / f"{name}.log", "w")  # a file, not a pipe nobody reads while we wait
    command = [str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu-2proc-zero3.yaml", str(wrapper),
               *argv]
    return subprocess.Popen(command, cwd=REPO, env=launch_env(**env), stdout=log, stderr=subprocess.STDOUT)


def log_tail(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()[-5000:]


def wait_for_step(process: subprocess.Popen, progress: Path, step: int, timeout: float = 400) -> dict[int, tuple]:
    """Wait until every rank has step `step` (or later) in progress; returns rank -> (step, pid)."""
    deadline = time.time() + timeout
    while True:
        found = {}
        for path in progress.glob("rank*"):
            text = path.read_text().split()
            found[int(path.name[4:])] = (int(text[0]), int(text[1]))
        if len(found) == 2 and min(s for s, _ in found.values()) >= step:
            return found
        assert process.poll() is None, f"the run ended early (exit {process.returncode})"
        assert time.time() < deadline, "the run did not reach the step"
        time.sleep(0.02)


def alive(process) -> bool:
    """A psutil.Process still running (a zombie or a vanished one is not)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_leftovers(processes: list[subprocess.Popen], pids: list[int]) -> None:
    for pid in pids:  # a stopped process must be continued to die of anything but SIGKILL; SIGKILL takes it anyway
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_two_processes_stop_together_on_one_workers_usr1_or_the_launchers_term_and_resume_equal(
        tmp_path, tiny_base, demo_data):
    """SIGUSR1 to rank 1 only (rank 0 never sees it: the all-reduce tells it), and SIGTERM to `accelerate launch`
    (the elastic agent forwards it to both workers). Both leave a complete checkpoint at the step in progress (or the
    next), exit 75 in every worker, and `--resume auto` ends with the weights of the uninterrupted run."""
    import psutil

    pace = {"TK_PACE_SECONDS": 0.4}
    runs = {}
    for name in ("usr1", "term"):
        progress = tmp_path / f"progress-{name}"
        progress.mkdir()
        config = zero3_config(tmp_path, tiny_base, demo_data, name)
        runs[name] = (config, progress, start_launch(tmp_path, name, ["train", str(config)], TK_PROGRESS_DIR=progress,
                                                     **pace))
    reference = start_launch(tmp_path, "reference", ["train", str(zero3_config(tmp_path, tiny_base, demo_data,
                                                                                "reference"))])
    measured, pids, sent, workers = {}, [], {}, {}
    try:
        for name, (config, progress, process) in runs.items():  # both signalled while mid-run
            ranks = wait_for_step(process, progress, SIGNAL_AFTER)
            pids += [pid for _, pid in ranks.values()]
            workers[name] = [psutil.Process(pid) for _, pid in ranks.values()]
            measured[name] = {"in_progress": max(step for step, _ in ranks.values())}
            sent[name] = time.monotonic()
            if name == "usr1":
                os.kill(ranks[1][1], signal.SIGUSR1)  # rank 1 only
            else:
                process.send_signal(signal.SIGTERM)  # the launcher: its agent forwards SIGTERM to both workers
        deadline = time.time() + 300
        while any("launcher_code" not in m for m in measured.values()) and time.time() < deadline:
            for name, (config, progress, process) in runs.items():
                m = measured[name]
                if "worker_exit_s" not in m and not any(alive(w) for w in workers[name]):
                    m["worker_exit_s"] = round(time.monotonic() - sent[name], 1)
                if "launcher_code" not in m and process.poll() is not None:
                    m["launcher_code"] = process.returncode
                    m["launcher_exit_s"] = round(time.monotonic() - sent[name], 1)
            time.sleep(0.05)
        for name, (config, progress, process) in runs.items():
            files = {rank: progress / f"exit.rank{rank}" for rank in (0, 1)}  # not our children: codes from files
            measured[name]["worker_codes"] = {rank: int(f.read_text()) if f.exists() else None
                                              for rank, f in files.items()}
        assert reference.wait(timeout=600) == 0, log_tail(tmp_path, "reference")
    finally:
        kill_leftovers([process for _, _, process in runs.values()] + [reference], pids)

    expected = final_weights(tmp_path / "reference")
    for name, (config, progress, _) in runs.items():
        run, m = output_dir(config), measured[name]
        stopped = json.loads((run / "stopped.json").read_text())
        m["checkpoint_step"] = stopped["step"]
        m["steps_lost"] = m["in_progress"] - stopped["step"]  # <= 0: nothing trained was lost
        print(f"{name}: {m}")
        assert m["worker_codes"] == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, (m, log_tail(tmp_path, name))
        assert stopped["signal"] == ("SIGUSR1" if name == "usr1" else "SIGTERM") and stopped["exit_code"] == 75
        assert stopped["step"] in (m["in_progress"], m["in_progress"] + 1), m
        assert latest_complete_checkpoint(run) == run / f"checkpoint-{stopped['step']}"
        assert (run / f"checkpoint-{stopped['step']}" / MARKER_NAME).is_file() and not (run / "final").exists()

        resumed = start_launch(tmp_path, f"{name}-resumed", ["train", str(config), "--resume", "auto"])
        assert resumed.wait(timeout=600) == 0, log_tail(tmp_path, f"{name}-resumed")
        assert f"resume verified: step {stopped['step']}" in (tmp_path / f"{name}-resumed.log").read_text()
        diff = max_abs_diff(final_weights(run), expected)
        print(f"{name}: max |resumed - uninterrupted| = {diff:.3g}")
        assert diff <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["zero3", "ddp"])
def test_a_stopped_rank_ends_the_job_with_an_error_within_the_ddp_timeout(tmp_path, tiny_base, demo_data, setup):
    """SIGSTOP one worker mid-training: the other waits in a collective (ZeRO-3: a parameter all-gather; DDP on CPU,
    whose group transformers makes without ddp_timeout and so gets tunekit's default: the buffer broadcast) for
    training.ddp_timeout seconds, fails, and the launcher tears the job down instead of hanging. The elastic agent's teardown after a
    failed worker waits a fixed 30 s before it SIGKILLs the stopped one (torch 2.13 `_stop_workers` ignores
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which only the signal path honours)."""
    timeout, grace = 20, 30
    progress = tmp_path / "progress"
    progress.mkdir()
    config = zero3_config(tmp_path, tiny_base, demo_data, "stalled", ddp_timeout=timeout, max_steps=40)
    if setup == "ddp":  # LoRA without a deepspeed section: DDP over the launcher's two processes
        text = yaml.safe_load(config.read_text())
        del text["deepspeed"]
        config.write_text(yaml.safe_dump({**text, "method": "lora", "eval": {"task_metric": "none",
                                                                             "rank_spectrum": False}}))
    process = start_launch(tmp_path, "stalled", ["train", str(config)], TK_PROGRESS_DIR=progress,
                           TK_PACE_SECONDS=0.2)
    pids = []
    try:
        ranks = wait_for_step(process, progress, 3)
        pids = [pid for _, pid in ranks.values()]
        os.kill(ranks[1][1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = process.wait(timeout=timeout + grace + 120)
        elapsed = time.monotonic() - stopped_at
    finally:
        kill_leftovers([process], pids)
    log = (tmp_path / "stalled.log").read_text()
    print(f"{setup}: rank 1 SIGSTOPped: launcher exit {code} after {elapsed:.1f} s "
          f"(ddp_timeout {timeout} s, teardown {grace} s)")
    assert code != 0, log[-5000:]
    assert f"Timed out waiting {timeout * 1000}ms" in log  # the collective's timeout is training.ddp_timeout
    assert elapsed < timeout + grace + 30, log[-5000:]
