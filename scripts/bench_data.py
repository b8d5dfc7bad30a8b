"""Data preparation at scale: tunekit's Arrow pipeline vs plain TRL's own SFTTrainer preparation, same rows.

    [BENCH_DATA_ROWS=200000] python scripts/bench_data.py [--workdir DIR]

The data: scripts/make_alpaca_rows.py's deterministic alpaca set (200,000 rows, ~58M tokens with the tiny base's
tokenizer), max_seq_len 512, completion-only loss. Each variant is a child process measured from outside
(scripts/bench_common.py: wall clock, peak RSS of the largest process, CPU seconds of the whole process tree):
  tunekit prepare      `tunekit prepare` (read + check + tokenize + cache), data.num_proc 1 and 2, on an empty cache
                       (cold), then again on the cache it wrote (warm)
  plain TRL            scripts/plain_trl_sft.py --prepare-only: load_dataset("json") + alpaca -> prompt/completion
                       map + SFTTrainer's own tokenization (dataset_num_proc 1 and 2), on an empty datasets cache
                       (cold) and then on that cache (warm). Both include interpreter start, imports and tokenizer
                       load, so the ratio compares like with like.
  2-process launch     `accelerate launch` (2 CPU processes) of `tunekit prepare` on an empty cache: one process
                       tokenizes, the other waits; CPU seconds of the whole tree vs one process alone.
  training RSS         `tunekit train` (LoRA, 5 steps) on the warm cache of 20,000 rows and of all the rows: peak RSS
                       should not grow with the dataset beyond the memory map's touched pages.
One run per variant (a cold 200k preparation takes minutes); the paired ratios are of runs made back to back.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from bench_common import (
    PYTHON, ROOT, TINY_BASE, TUNEKIT_LEAN, Section, child_env, fmt, main_for, mb, progress, ratio, run_child, table,
    tunekit_cmd,
)

ROWS = int(os.environ.get("BENCH_DATA_ROWS", 200_000))  # fewer for a quick check of the script itself
SMALL_ROWS = 20_000
MAX_SEQ_LEN = 512
DEFAULT_REPEATS = 1
# Prepare the data of CONFIG (argv[1], warm cache), read 1,000 random training examples, print RssAnon/RssFile (MB).
HOLD_PROBE = """
import random, sys
from tunekit import config as config_mod
from tunekit.backends.common import load_tokenizer
from tunekit.prepare import prepare_data
config = config_mod.load(sys.argv[1])
train = prepare_data(config, load_tokenizer(config), log=lambda line: None).train
for index in random.Random(0).sample(range(len(train)), 1000):
    train[index]
status = open('/proc/self/status').read()
print('HELD', *(int(status.split(key + ':')[1].split()[0]) // 1024 for key in ('RssAnon', 'RssFile')))
"""


def data_file(workdir: Path, rows: int) -> Path:
    path = workdir / f"alpaca-{rows}.jsonl"
    if not path.exists():
        progress(f"generating {rows:,} rows")
        sys.path.insert(0, str(ROOT / "scripts"))
        import make_alpaca_rows

        make_alpaca_rows.main([str(path), "--rows", str(rows)])
    return path


def prepare_config(workdir: Path, data: Path, cache: Path, num_proc: int) -> Path:
    config = workdir / f"prepare-{data.stem}-{cache.name}-{num_proc}.yaml"
    config.write_text(
        f"method: lora\noutput_dir: {workdir / 'unused'}\nmodel:\n  name_or_path: {ROOT / TINY_BASE}\n"
        f"data:\n  sources:\n    - path: {data}\n      format: alpaca\n  cache_dir: {cache}\n"
        f"  max_seq_len: {MAX_SEQ_LEN}\n  eval_fraction: 0\n  num_proc: {num_proc}\n")
    return config


def tunekit_prepare(workdir: Path, data: Path, cache: Path, num_proc: int, threads: int, launcher=None):
    config = prepare_config(workdir, data, cache, num_proc)
    head = launcher if launcher is not None else [PYTHON]
    return run_child([*head, "-m", "tunekit", "prepare", str(config)], child_env(threads),
                     workdir / "logs" / f"tunekit-{cache.name}-{num_proc}-{len(list((workdir / 'logs').glob('*')))}.log",
                     timeout_s=3600)


def trl_prepare(workdir: Path, data: Path, hf_cache: Path, num_proc: int, threads: int):
    cmd = [PYTHON, "scripts/plain_trl_sft.py", "--model", TINY_BASE, "--data", str(data), "--out",
           str(workdir / "trl-out"), "--max-length", str(MAX_SEQ_LEN), "--prepare-only", "--num-proc", str(num_proc)]
    env = child_env(threads, HF_DATASETS_CACHE=str(hf_cache))
    return run_child(cmd, env, workdir / "logs" / f"trl-{hf_cache.name}-{len(list((workdir / 'logs').glob('*')))}.log",
                     timeout_s=3600)


def run_section(workdir: Path, repeats: int, threads: int, rows: int = ROWS) -> Section:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    data = data_file(workdir, rows)
    results = {}
    for num_proc in (1, 2):
        cache, hf_cache = workdir / f"cache-{num_proc}", workdir / f"hf-cache-{num_proc}"
        for path in (cache, hf_cache):
            shutil.rmtree(path, ignore_errors=True)
        progress(f"tunekit prepare, {num_proc} process(es), cold")
        results["tunekit", num_proc, "cold"] = tunekit_prepare(workdir, data, cache, num_proc, threads)
        progress(f"plain TRL preparation, {num_proc} process(es), cold")
        results["trl", num_proc, "cold"] = trl_prepare(workdir, data, hf_cache, num_proc, threads)
        progress(f"tunekit prepare, {num_proc} process(es), warm")
        results["tunekit", num_proc, "warm"] = tunekit_prepare(workdir, data, cache, num_proc, threads)
        progress(f"plain TRL preparation, {num_proc} process(es), warm")
        results["trl", num_proc, "warm"] = trl_prepare(workdir, data, hf_cache, num_proc, threads)

    rows_out = []
    for num_proc in (1, 2):
        for state in ("cold", "warm"):
            ours, theirs = results["tunekit", num_proc, state], results["trl", num_proc, state]
            rows_out.append([f"{num_proc}", state, fmt(ours.wall_s), fmt(theirs.wall_s),
                             fmt(ratio(ours.wall_s, theirs.wall_s)), mb(ours.peak_rss_bytes),
                             mb(theirs.peak_rss_bytes)])
    body = [f"{rows:,} alpaca rows ({data.stat().st_size / 1e6:,.0f} MB of JSONL), max_seq_len {MAX_SEQ_LEN}, "
            "tiny base tokenizer. Wall seconds of the whole child process (start, imports, tokenizer, data).", "",
            table(["processes", "cache", "tunekit prepare (s)", "plain TRL (s)", "tunekit / TRL",
                   "tunekit peak RSS (MB)", "TRL peak RSS (MB)"], rows_out)]

    progress("2-process launch of tunekit prepare, cold")
    launch_cache = workdir / "cache-launch"
    shutil.rmtree(launch_cache, ignore_errors=True)
    accelerate = [str(Path(PYTHON).with_name("accelerate")), "launch", "--config_file",
                  "configs/accelerate/cpu-2proc-zero3.yaml"]
    launched = tunekit_prepare(workdir, data, launch_cache, 1, threads, launcher=accelerate)
    single = results["tunekit", 1, "cold"]
    log = launched.log_path.read_text(errors="replace")
    body += ["", table(["cold prepare", "wall (s)", "CPU s (whole process tree)", "processes that tokenized"], [
        ["1 process", fmt(single.wall_s), fmt(single.cpu_s), "1"],
        ["2-process launch", fmt(launched.wall_s), fmt(launched.cpu_s), str(log.count(": tokenizing "))],
    ]), "", f"CPU seconds, 2-process launch / one process: {fmt(ratio(launched.cpu_s, single.cpu_s))} "
        "(the waiting process sleeps on the lock; its imports and tokenizer load are the difference)."]

    progress("training RSS on the warm caches")
    small = data_file(workdir, SMALL_ROWS) if rows > SMALL_ROWS else data
    train_rows, peaks = [], []
    for label, path in ((f"{min(rows, SMALL_ROWS):,} rows", small), (f"{rows:,} rows", data)):
        cache = workdir / "cache-train"
        tunekit_prepare(workdir, path, cache, 2, threads)
        overrides = [f"model.name_or_path={TINY_BASE}", f"data.sources.0.path={path}", f"data.cache_dir={cache}",
                     f"data.max_seq_len={MAX_SEQ_LEN}", "training.max_steps=5", "training.logging_steps=1",
                     f"output_dir={workdir / 'train-run'}", *TUNEKIT_LEAN]
        run = run_child(tunekit_cmd("configs/tiny-lora.yaml", overrides), child_env(threads),
                        workdir / "logs" / f"train-{path.stem}.log", timeout_s=1800)
        train_rows.append([label, fmt(run.wall_s), mb(run.peak_rss_bytes)])
        peaks.append(run.peak_rss_bytes)
    body += ["", table(["training on the prepared cache", "wall (s)", "peak RSS (MB)"], train_rows),
             "", f"peak RSS, {rows:,} rows / {min(rows, SMALL_ROWS):,} rows: {fmt(ratio(peaks[-1], peaks[0]))}"]

    progress("memory of a process holding the prepared data")
    held = []
    for label, path in ((f"{min(rows, SMALL_ROWS):,} rows", small), (f"{rows:,} rows", data)):
        config = prepare_config(workdir, path, workdir / "cache-train", 1)
        probe = run_child([PYTHON, "-c", HOLD_PROBE, str(config)], child_env(threads),
                          workdir / "logs" / f"hold-{path.stem}.log")
        numbers = probe.log_path.read_text().split("HELD ")[1].split()
        held.append([label, *numbers])
    body += ["", "A process that prepares the data (warm cache) and reads 1,000 random training examples, as the "
             "trainer does: anonymous memory is what it holds itself; file-backed memory is the memory map's pages "
             "it touched (page cache, shared and reclaimable).", "",
             table(["prepared data", "anonymous RSS (MB)", "file-backed RSS (MB)"], held)]
    return Section(title=f"data preparation: {rows:,} rows, tunekit vs plain TRL", body="\n".join(body))


if __name__ == "__main__":
    sys.exit(main_for(run_section, __doc__.splitlines()[0], DEFAULT_REPEATS))
