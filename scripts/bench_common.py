"""What every benchmark section shares: running one training job in a child process and measuring it from outside,
medians, markdown tables, and the machine's description.

A child is measured by the parent, the same way for tunekit and for the plain TRL script:
  time to first step  child start (Popen) -> the Trainer's first log line (logging_first_step: printed right after
                      optimizer step 1), in seconds. Includes interpreter start, imports, data and model loading.
  peak memory         ru_maxrss from os.wait4 on the child: the largest resident set of the child and of every
                      descendant it waited for (under `accelerate launch`: the largest rank), in bytes.
  throughput          from the Trainer's own log lines, which carry the cumulative `train_runtime` (s) and
                      `num_input_tokens_seen` (non-padding tokens): whole-run tokens/s, and steady-state tokens/s
                      between the first and the last log line (step 1's warm-up left out).
Nothing here imports torch: the parent stays small and the sections can import it only where they need it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: children run from here (configs use relative paths)
PYTHON = sys.executable
TINY_BASE = "artifacts/tiny-base"
DEMO_DATA = "artifacts/demo-data"
# Trainer log lines look like "{'loss': '3.32', ..., 'train_runtime': '2.029', ...}" (values formatted as strings).
LOG_LINE = re.compile(r"(\{'(?:loss|train_runtime)'.*\})")
# Issue 14's step-throughput target against the plain TRL script on the tiny base, LoRA and full: ahead of Axolotl,
# which measured 1.4-1.5x TRL's step on a model of this kind.
THROUGHPUT_GOAL = 1.6
# What turns tunekit's extras off so that a run does only what a plain TRL script does: no eval set, no generation
# metric before/after, no rank spectrum, no forgetting monitor, no intermediate checkpoints (the Trainer still saves
# one at the last step, as a plain script with the default save_steps=500 does too).
TUNEKIT_LEAN = [
    "eval.task_metric=none", "data.eval_path=null", "data.eval_fraction=0", "eval.rank_spectrum=false",
    "eval.general=null", "checkpoints.save_steps=1000000",
]


@dataclass
class ChildRun:
    """One measured child process."""

    returncode: int
    wall_s: float  # child start -> exit
    first_step_s: float | None  # child start -> first Trainer log line
    peak_rss_bytes: int  # largest resident set of the child or any waited-for descendant
    cpu_s: float = 0.0  # user + system CPU seconds of the child and its waited-for descendants
    logs: list[dict] = field(default_factory=list)  # Trainer log dicts, in order, values converted to numbers
    log_path: Path | None = None

    def train_logs(self) -> list[dict]:
        """Per-step log lines (those with a loss), which carry cumulative train_runtime and tokens."""
        return [entry for entry in self.logs if "loss" in entry and "train_runtime" in entry]

    def final(self) -> dict:
        """The Trainer's closing line (train_runtime, train_loss, num_input_tokens_seen)."""
        return next((e for e in reversed(self.logs) if "train_loss" in e), {})

    def tokens_per_s(self) -> float | None:
        """Non-padding tokens / train_runtime over the whole run (step 1 included, as the Trainer reports it)."""
        end = self.final()
        if not end.get("train_runtime"):
            return None
        return end["num_input_tokens_seen"] / end["train_runtime"]

    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s between the first and the last per-step log line: step 1 (allocation, warm-up) left out."""
        logs = self.train_logs()
        if len(logs) < 2:
            return None
        first, last = logs[0], logs[-1]
        seconds = last["train_runtime"] - first["train_runtime"]
        return (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / seconds if seconds > 0 else None


def child_env(threads: int, **extra: str) -> dict[str, str]:
    """Environment for a child: `threads` OpenMP/torch threads, unbuffered output (for the first-step timestamp),
    no tokenizer thread pool, no network trackers, DeepSpeed's compiled op cached in the repository."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
    )
    env.update(extra)
    return env


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float = 600) -> ChildRun:
    """Run `cmd` from the repository root, teeing its merged stdout/stderr to `log_path`; measure it (see module doc).

    Raises RuntimeError (with the log's tail) when the child fails or runs past `timeout_s`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_step: list[float] = []
    logs: list[dict] = []

    def read() -> None:
        with open(log_path, "wb") as sink:
            for raw in proc.stdout:  # one line per newline; tqdm's \r redraws stay inside a line
                # Seconds since the child started, so that a slow start-up can be read off the log.
                sink.write(f"[{time.perf_counter() - started:7.2f}] ".encode() + raw)
                match = LOG_LINE.search(raw.decode("utf-8", "replace"))
                if match:
                    if not first_step:
                        first_step.append(time.perf_counter() - started)
                    logs.append(_parse_log(match.group(1)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child (and its waited-for descendants) only
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    reader.join()
    run = ChildRun(proc.returncode, wall, first_step[0] if first_step else None, usage.ru_maxrss * 1024,
                   usage.ru_utime + usage.ru_stime, logs, log_path)
    if run.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{' '.join(cmd)} exited {run.returncode} (log {log_path}):\n{tail}")
    return run


def _parse_log(text: str) -> dict:
    """A Trainer log dict with its string-formatted numbers turned back into floats."""
    try:
        raw = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {}
    out = {}
    for key, value in raw.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def tunekit_cmd(config: str, overrides: list[str], launcher: list[str] | None = None) -> list[str]:
    """`python -m tunekit train CONFIG --overwrite --set ...`, or the same under a launcher prefix (accelerate)."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    head = launcher if launcher is not None else [PYTHON]
    return [*head, "-m", "tunekit", "train", config, "--overwrite", *sets]


def json_child(script: str, kind: str, args: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run `script --child KIND ARGS...` (a child function of that script, dispatched by main_for) and return the
    JSON it printed after CHILD_RESULT."""
    run = run_child([PYTHON, script, "--child", kind, *args], env, log_path)
    return json.loads(run.log_path.read_text().split("CHILD_RESULT")[-1].strip().splitlines()[0])


def read_summary(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())


# ---------------------------------------------------------------- numbers and tables


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values) -> str:
    """'min-max' of the repeats, for the reader to judge the noise."""
    values = [v for v in values if v is not None]
    return f"{min(values):.3g}–{max(values):.3g}" if len(values) > 1 else ""


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def goal(label: str, value: float | None, target: float, higher_is_better: bool = True,
         versus: str = "plain") -> str:
    """One goal line of a section, for a tunekit / `versus` ratio: '- label goal (≥ 1.6× plain): 1.27× — NOT met'."""
    met = value is not None and (value >= target if higher_is_better else value <= target)
    return (f"- {label} goal ({'≥' if higher_is_better else '≤'} {target:g}× {versus}): {fmt(value, 4)}× — "
            + ("met" if met else "NOT met"))


def mb(nbytes: float | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 1e6:,.0f}"


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; cells are formatted with `fmt` unless already strings."""
    cells = [[cell if isinstance(cell, str) else fmt(cell) for cell in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's printable result: a title, markdown tables and notes."""

    title: str
    body: str
    seconds: float = 0.0

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body}\n\n_section time: {self.seconds:.0f} s_\n"


# ---------------------------------------------------------------- the machine


def machine_description(threads: int) -> str:
    """CPU model, cores, memory, load, and the library versions (read without importing torch)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    versions = []
    from importlib import metadata

    for name in ("torch", "transformers", "trl", "peft", "deepspeed", "bitsandbytes", "accelerate"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    load = os.getloadavg()
    try:
        stamp = json.loads((ROOT / TINY_BASE / "tunekit_tiny.json").read_text())
        base = f"{TINY_BASE} build {stamp.get('hash')} ({stamp.get('parameters', 0) / 1e6:.2f}M parameters)"
    except (OSError, ValueError):
        base = f"{TINY_BASE} (no build stamp)"
    return (f"- CPU: {model}, {os.cpu_count()} logical cores, {mem:.1f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}\n"
            f"- {', '.join(versions)}\n"
            f"- threads per training process: {threads} (OMP_NUM_THREADS); load average at start "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} cores\n"
            f"- tiny base: {base}")


# ---------------------------------------------------------------- command line


def common_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (medians are reported)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                        help="OpenMP threads per training process (default 1, or $BENCH_THREADS): on a small shared "
                             "machine 2 threads per process collapse under contention; use all cores when idle")
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temporary directory, removed)")
    return parser


class Workdir:
    """A scratch directory for the runs: the one given (kept), or a temporary one removed on exit."""

    def __init__(self, path: str | None):
        self.keep = path is not None
        self.path = Path(path) if path else Path(tempfile.mkdtemp(prefix="tunekit-bench-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def check_tiny_base() -> None:
    """The sections train on the tiny base and demo data that `make tiny` builds; say so instead of a traceback."""
    missing = [p for p in (TINY_BASE, DEMO_DATA + "/train.jsonl") if not (ROOT / p).exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing: run `make tiny` first")


def main_for(run_section, description: str, default_repeats: int, argv: list[str] | None = None,
             children: dict | None = None) -> int:
    """The `main` of a section script run alone: parse the common flags, run, print the section. With `--child KIND
    ARGS...` it runs `children[KIND](ARGS)` instead and prints its JSON result after CHILD_RESULT (see json_child)."""
    argv = sys.argv[1:] if argv is None else argv
    if children and argv[:1] == ["--child"]:
        print("CHILD_RESULT " + json.dumps(children[argv[1]](argv[2:])))
        return 0
    args = common_args(description).parse_args(argv)
    check_tiny_base()
    with Workdir(args.workdir) as workdir:
        print(machine_description(args.threads) + "\n")
        section = timed(run_section, workdir, args.repeats or default_repeats, args.threads)
        print(section.markdown())
    return 0


def timed(run_section, workdir: Path, repeats: int, threads: int) -> Section:
    """Run one section; time it, and flag it when the tiny base was rebuilt meanwhile (its runs then mix two bases)."""
    started, base_before = time.perf_counter(), base_fingerprint()
    section = run_section(workdir, repeats, threads)
    section.seconds = time.perf_counter() - started
    if base_fingerprint() != base_before:
        warning = (f"WARNING: {TINY_BASE} was rebuilt while this section ran (by `make tiny` elsewhere): its runs "
                   "may mix two different bases; run it again.")
        progress(warning)
        section.body += f"\n\n**{warning}**"
    return section


def base_fingerprint() -> str | None:
    """The tiny base's build hash and weights' mtime: changes whenever the base is rebuilt."""
    try:
        stamp = json.loads((ROOT / TINY_BASE / "tunekit_tiny.json").read_text())
        return f"{stamp.get('hash')}@{(ROOT / TINY_BASE / 'model.safetensors').stat().st_mtime_ns}"
    except (OSError, ValueError):
        return None


def progress(message: str) -> None:
    """One line on stderr, so that stdout holds only the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
