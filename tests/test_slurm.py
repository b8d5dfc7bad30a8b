"""`tunekit slurm`: the rendered sbatch script, its refusals, and the whole preemption cycle under a real Slurm.

The real-Slurm tests start Debian's munged, slurmctld and slurmd for one node in a tmp dir (installing slurm-wlm and
munge with apt-get when missing and we are root; TUNEKIT_TEST_NO_APT=1 forbids that) and skip, saying why, where the
daemons cannot start. The end-to-end test runs the generated script: 2 CPU processes fine-tune the tiny base under
ZeRO-3 (per-rank checkpoint shards), the batch shell gets the time-limit warning (SIGUSR1, sent with `scancel
--batch` at a chosen step rather than by the clock), the run checkpoints and stops, the script requeues the job,
the second start resumes and finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tunekit import cli
from tunekit.estimate.checkpoint import checkpoint_bytes
from tunekit.slurm import MIN_GRACE_S, grace_seconds, parse_time

def write_config(root: Path, base: Path | str, train: Path, name: str = "run", method: str = "lora",
                 **sections) -> Path:
    config = {
        "method": method,
        "output_dir": str(root / name),
        "model": {"name_or_path": str(base)},
        "data": {"sources": [{"path": str(train), "format": "alpaca", "max_examples": 200}],
                 "max_seq_len": 64, "cache_dir": str(root / "cache")},
        "training": {"max_steps": 20, "per_device_train_batch_size": 4},
        "eval": {"task_metric": "none", "rank_spectrum": False},
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_config(tiny_base, demo_data, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("slurm-config"), tiny_base, demo_data["train"])


def render(capsys, *argv: str) -> str:
    assert cli.main(["slurm", *argv]) == 0
    return capsys.readouterr().out


def bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the rendered script


def test_script_wires_every_node_to_rank_zero_and_stops_cleanly(tiny_config, tmp_path, capsys):
    text = render(capsys, str(tiny_config), "--nodes", "2", "--gpus-per-node", "8", "--time", "24:00:00",
                  "--partition", "gpu", "--account", "lab", "--chdir", str(tmp_path))
    bash_n(text, tmp_path)
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=24:00:00", "--partition=gpu",
                   "--account=lab", "--requeue", "--open-mode=append", "--output=logs/%x-%j.out",
                   f"--chdir={tmp_path.resolve()}"):
        assert any(line.split()[1] == option for line in sbatch), option
    grace = int(next(line for line in sbatch if "--signal=" in line).split("@")[1].split()[0])
    assert f"--signal=B:USR1@{grace}" in text and grace >= MIN_GRACE_S
    assert f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace}" in text  # the agent must not SIGKILL a saving worker
    # rank 0 = the allocation's first host; each node's rank = its index in the allocation
    assert 'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert '--machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_PROCESS_IP"' in text
    assert "--num_machines 2 --num_processes 16" in text
    assert f"-m tunekit train {tiny_config.resolve()} --resume auto" in text
    # the forward goes through Slurm (srun turns its own SIGTERM into SIGKILL), the requeue only after the step
    code = [line.split("#")[0] for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text and not any("kill -TERM" in line for line in code)
    assert text.index('wait "$step"') < text.index('scontrol requeue "$SLURM_JOB_ID"')
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c launch_node &" in text
    assert "OMP_NUM_THREADS" not in text  # GPU nodes
    assert (tmp_path / "logs").is_dir()  # Slurm does not create it: a job without it fails with no log at all


def test_cpu_mode_and_overrides_reach_the_train_command(tiny_config, tmp_path, capsys):
    text = render(capsys, str(tiny_config), "--nodes", "1", "--cpu", "--processes-per-node", "2",
                  "--set", "training.max_steps=7", "--chdir", str(tmp_path), "--port", "29555")
    bash_n(text, tmp_path)
    assert "--gpus-per-node" not in text and "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in text
    assert "--num_machines 1 --num_processes 2" in text and "MAIN_PROCESS_PORT=29555" in text
    assert "--set training.max_steps=7 --resume auto" in text


def test_one_process_runs_tunekit_without_a_launcher(tiny_config, tmp_path, capsys):
    text = render(capsys, str(tiny_config), "--nodes", "1", "--gpus-per-node", "1", "--chdir", str(tmp_path))
    bash_n(text, tmp_path)
    assert "accelerate" not in text.split("launch_node() {")[1].split("}")[0]
    assert f'exec "$TUNEKIT_PYTHON" -m tunekit train {tiny_config.resolve()} --resume auto' in text


def test_grace_grows_with_model_size_and_pins_the_zero_stage(tiny_base, demo_data, tmp_path, capsys):
    graces, texts = {}, {}
    for name, model in (("tiny", tiny_base), ("8b", "meta-llama/Meta-Llama-3-8B"),
                        ("70b", "meta-llama/Meta-Llama-3-70B")):
        config = write_config(tmp_path, model, demo_data["train"], name=name, method="full",
                              deepspeed={"stage": "auto"})
        texts[name] = render(capsys, str(config), "--nodes", "2", "--gpus-per-node", "8", "--chdir", str(tmp_path))
        graces[name] = int(texts[name].split("--signal=B:USR1@")[1].split()[0])
    assert graces["tiny"] == MIN_GRACE_S < graces["8b"] < graces["70b"]
    # 8B full: 14 B/param (bf16 weights, fp32 Adam m+v, fp32 master): ~112 GB at 200 MB/s, ~10 minutes
    assert graces["8b"] >= 600
    # a requeue must resume under the stage that wrote the checkpoint: auto's choice is pinned in the command
    assert "--set deepspeed.stage=" in texts["70b"].split("launch_node() {")[1]
    assert "DeepSpeed ZeRO-" in texts["70b"]


def test_pure_rules():
    assert grace_seconds(0, 0) == MIN_GRACE_S
    assert grace_seconds(100e9, 5) > grace_seconds(10e9, 5) > MIN_GRACE_S
    assert grace_seconds(10e9, 5) % 10 == 0
    full = checkpoint_bytes(8e9, 8e9, method="full", weight_bytes=2, adam_bytes=8, deepspeed=True)
    lora = checkpoint_bytes(8e9, 20e6, method="lora", weight_bytes=2, adam_bytes=8, deepspeed=False)
    assert full == 8e9 * 14 and lora == 20e6 * 12
    assert [parse_time(t) for t in ("30", "30:15", "2:00:00", "1-0", "1-2:03", "1-2:03:04")] == \
        [1800, 1815, 7200, 86400, 93780, 93784]


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "error: --nodes 0: must be at least 1"),
    (["--nodes", "1"], "error: --gpus-per-node is required"),
    (["--nodes", "1", "--cpu", "--gpus-per-node", "2"], "error: --gpus-per-node: not with --cpu"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "1:00"], "error: --time 1:00: 60 s leaves no training time"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "soon"], "error: --time soon: not a Slurm time"),
    (["--nodes", "1", "--gpus-per-node", "8", "--set", "training.stop_signals=[SIGUSR1]"],
     "error: training.stop_signals: ['SIGUSR1'] lacks SIGTERM"),
    (["--nodes", "1", "--gpus-per-node", "8", "--job-name", "a b"], "error: --job-name 'a b'"),
])
def test_bad_inputs_exit_2_and_write_nothing(tiny_config, tmp_path, capsys, argv, message):
    out = tmp_path / "job.sbatch"
    assert cli.main(["slurm", str(tiny_config), *argv, "--chdir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(message), err
    assert not out.exists() and not (tmp_path / "logs").exists()


def test_out_is_never_overwritten_without_overwrite(tiny_config, tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    out.write_text("mine\n")
    argv = ["slurm", str(tiny_config), "--nodes", "1", "--gpus-per-node", "1", "--chdir", str(tmp_path),
            "--out", str(out)]
    assert cli.main(argv) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert cli.main([*argv[:-2], "--out", str(tmp_path / "missing" / "job.sbatch")]) == 2
    assert cli.main([*argv, "--overwrite"]) == 0
    assert out.read_text().startswith("#!/bin/bash") and "sbatch" in capsys.readouterr().out
    assert not list(tmp_path.glob(".job.sbatch.*"))  # the atomic write left no temp file


# ---------------------------------------------------------------- the script's decisions, with stand-ins for Slurm

STUBS = {
    # srun: run the task once, as node 0 (the exported launch_node function travels in the environment)
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\nSLURM_NODEID=0 exec "$@"',
    "scontrol": 'if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> "$FAKE/calls"; fi',
    "scancel": 'echo "scancel $*" >> "$FAKE/calls"; kill -TERM "$(cat "$FAKE/train.pid")"',
    # the Python: `-c` is the script's "finished?" check; anything else is the training step
    "python": ('if [ "$1" = -c ]; then exit "${FAKE_FINISHED:-1}"; fi\necho $$ > "$FAKE/train.pid"\n'
               'trap \'echo "train got TERM" >> "$FAKE/calls"; exit 75\' TERM\n'
               'for i in $(seq 60); do sleep 0.05; done\nexit "${FAKE_STEP_RC:-0}"'),
}


@pytest.fixture
def fake_slurm(tiny_config, tmp_path, capsys):
    """run(signal=None, **env) -> (exit code, calls): the generated script run by bash with stand-ins for srun,
    scontrol, scancel and the Python; `signal` is sent to the batch shell once the training step runs."""
    import signal as signals

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    assert cli.main(["slurm", str(tiny_config), "--nodes", "1", "--gpus-per-node", "2", "--chdir", str(tmp_path),
                     "--out", str(script)]) == 0
    capsys.readouterr()

    def run(signal: str | None = None, **env: str) -> tuple[int, list[str]]:
        fake = tmp_path / "fake"
        shutil.rmtree(fake, ignore_errors=True)
        fake.mkdir()
        full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(fake),
                    "TUNEKIT_PYTHON": str(bin_dir / "python"), "SLURM_JOB_ID": "123",
                    "SLURM_JOB_NODELIST": "node1", **env}
        process = subprocess.Popen(["bash", str(script)], env=full_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        if signal:
            _wait_for((fake / "train.pid").exists, 10, "the fake training step")
            process.send_signal(getattr(signals, signal))
        process.communicate(timeout=30)
        calls = (fake / "calls").read_text().splitlines() if (fake / "calls").exists() else []
        return process.returncode, calls

    return run


def test_time_limit_warning_forwards_sigterm_then_requeues(fake_slurm):
    assert fake_slurm("SIGUSR1") == (0, ["scancel --signal=TERM 123", "train got TERM", "scontrol requeue 123"])


def test_no_requeue_when_the_run_finished_or_slurm_ends_the_job(fake_slurm):
    assert fake_slurm("SIGUSR1", FAKE_FINISHED="0")[1] == ["scancel --signal=TERM 123", "train got TERM"]
    # SIGTERM to the shell: preemption or scancel. Slurm signalled the training itself (not here) and requeues a
    # preempted job itself: the script forwards nothing and requeues nothing.
    assert "scontrol requeue 123" not in fake_slurm("SIGTERM", FAKE_STEP_RC="75")[1]


def test_a_crash_without_a_signal_fails_the_job(fake_slurm):
    assert fake_slurm(FAKE_STEP_RC="3") == (3, [])
    assert fake_slurm() == (0, [])


# ---------------------------------------------------------------- a real Slurm, one node


def _run(cmd: list[str], env: dict, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_slurm_installed() -> str | None:
    """None when munged/slurmctld/slurmd/sbatch are there (installed here with apt-get when missing and allowed),
    else why not."""
    needed = ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"]
    if all(Path(p).exists() for p in needed) and shutil.which("sbatch"):
        return None
    if os.environ.get("TUNEKIT_TEST_NO_APT"):
        return "slurm-wlm/munge are not installed and TUNEKIT_TEST_NO_APT forbids installing them"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and cannot be (needs root and apt-get: Debian/Ubuntu)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    return None


def _job(jobid: str, env: dict) -> dict[str, str]:
    """scontrol show job's Key=Value pairs (empty once the job is gone)."""
    result = _run(["scontrol", "show", "job", "-o", jobid], env, check=False)
    return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm on this machine: the environment (SLURM_CONF) its commands need. Skips with the reason when
    the daemons cannot be installed or started; stops the daemons it started (by their pid files) at the end."""
    why = _ensure_slurm_installed()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root here (SlurmdUser=root, no privilege separation set up)")
    # Not under pytest's tmp dir: munged wants every folder above its socket searchable by all (pytest's are 0700),
    # and its key readable by root alone.
    root = Path(tempfile.mkdtemp(prefix="tunekit-slurm-"))
    root.chmod(0o755)
    for name in ("state", "spool", "log", "run", "key"):
        (root / name).mkdir(mode=0o755)
    (root / "key").chmod(0o700)
    key = root / "key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=tunekit-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
        f"AuthInfo=socket={root}/run/munge.sock,cred_expire=10",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        # what works in a container without systemd/cgroup delegation
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MinJobAge=600",  # keep finished jobs visible to scontrol
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = []

    def log_tail() -> str:
        return " | ".join(line for p in sorted((root / "log").glob("*.log"))
                          for line in p.read_text(errors="replace").splitlines()[-3:])

    try:
        starts = [
            ("munged", ["/usr/sbin/munged", f"--socket={root}/run/munge.sock", f"--key-file={key}",
                        f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                        f"--seed-file={root}/run/munge.seed"], root / "run" / "munged.pid"),
            ("slurmctld", ["/usr/sbin/slurmctld", "-i"], root / "run" / "slurmctld.pid"),
            ("slurmd", ["/usr/sbin/slurmd"], root / "run" / "slurmd.pid"),
        ]
        for name, cmd, pid_file in starts:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                pytest.skip(f"{name} did not start (exit {result.returncode}): "
                            f"{(result.stderr or result.stdout).strip()[:300]} {log_tail()}")
            pid_files.append(pid_file)
            _wait_for(pid_file.exists, 10, f"{name}'s pid file")

        def node_idle() -> bool:
            out = _run(["sinfo", "-h", "-o", "%T"], env, check=False).stdout
            return "idle" in out

        try:
            _wait_for(node_idle, 30, "the node to come up idle")
        except AssertionError:
            pytest.skip(f"the Slurm node did not come up: {log_tail()}")
        yield env
    finally:
        for pid_file in reversed(pid_files):  # only the daemons this fixture started
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (OSError, ValueError):
                pass
        for pid_file in pid_files:  # gone once their pid files are: the next Slurm test may reuse the node name
            try:
                _wait_for(lambda: not pid_file.exists(), 15, f"{pid_file.name} to go")
            except AssertionError:
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_local_slurm_signals_the_batch_shell(slurm, tmp_path):
    """The harness: a batch job runs, and `scancel --batch --signal=USR1` (what `--signal=B:USR1@N` sends at
    N s before the limit) reaches its trap."""
    script = tmp_path / "trivial.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --output=%x-%j.out\n"
                      "trap 'echo got USR1; exit 0' USR1\necho started\nfor i in $(seq 300); do sleep 0.1; done\n")
    jobid = _run(["sbatch", "--parsable", f"--chdir={tmp_path}", str(script)], slurm).stdout.strip()
    log = tmp_path / f"trivial.sbatch-{jobid}.out"
    _wait_for(lambda: log.exists() and "started" in log.read_text(), 30, "the job to start")
    _run(["scancel", "--batch", "--signal=USR1", jobid], slurm)
    _wait_for(lambda: _job(jobid, slurm).get("JobState") == "COMPLETED", 30, "the job to complete")
    assert "got USR1" in log.read_text()


E2E_STEPS, E2E_SAVE = 200, 50


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_resumes_and_finishes(slurm, tiny_base, demo_data, tmp_path, capsys):
    config = write_config(tmp_path, tiny_base, demo_data["train"], method="full", deepspeed={"stage": 3},
                          training={"max_steps": E2E_STEPS, "per_device_train_batch_size": 4, "logging_steps": 50},
                          checkpoints={"save_steps": E2E_SAVE})
    script = tmp_path / "job.sbatch"
    assert cli.main(["slurm", str(config), "--nodes", "1", "--cpu", "--processes-per-node", "2",
                     "--chdir", str(tmp_path), "--out", str(script)]) == 0
    capsys.readouterr()
    assert "DeepSpeed ZeRO-3; as configured" in script.read_text()
    run = tmp_path / "run"
    env = {**slurm, "OMP_NUM_THREADS": "1"}
    jobid = _run(["sbatch", "--parsable", str(script)], env).stdout.strip()
    log = tmp_path / "logs" / f"run-{jobid}.out"
    try:
        # The time-limit warning at a chosen moment: once the first checkpoint is complete, mid-training.
        first = run / f"checkpoint-{E2E_SAVE}" / "tunekit_complete.json"
        _wait_for(first.exists, 180, f"checkpoint-{E2E_SAVE}", interval=0.1)
        _run(["scancel", "--batch", "--signal=USR1", jobid], env)

        # Stopped with a complete checkpoint at the step it stopped, then requeued by the script.
        def requeued() -> dict | None:
            job = _job(jobid, env)
            return job if job.get("Restarts") == "1" and (run / "stopped.json").exists() else None

        _wait_for(requeued, 90, "the job to stop and be requeued")
        stopped = json.loads((run / "stopped.json").read_text())
        assert stopped["exit_code"] == 75 and stopped["signal"] == "SIGTERM", stopped
        assert E2E_SAVE < stopped["step"] < E2E_STEPS
        checkpoint = Path(stopped["checkpoint"])
        assert checkpoint.name == f"checkpoint-{stopped['step']}"  # saved at the signalled step: no step lost
        assert (checkpoint / "tunekit_complete.json").exists()
        assert len(list(checkpoint.glob("global_step*/*optim_states.pt"))) == 2  # both ranks' ZeRO shards

        _wait_for(lambda: _job(jobid, env).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 150,
                  "the requeued job to finish")
        job = _job(jobid, env)
        text = log.read_text(errors="replace")  # two processes draw progress bars into it
        assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, text[-3000:])
    except BaseException:
        _run(["scancel", jobid], env, check=False)
        raise
    assert f"tunekit-slurm: requeueing job {jobid}" in text
    assert f"tunekit-slurm: job {jobid} start 1 " in text
    assert f"resume verified: step {stopped['step']}," in text  # resumed where it stopped: 0 steps lost
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == E2E_STEPS and summary["world_size"] == 2 and (run / "final").is_dir()
    assert "tunekit-slurm: the run finished" in text
