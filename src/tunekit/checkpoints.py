"""Checkpoint directories, for all three backends (a ZeRO-3 checkpoint is the Trainer's directory with DeepSpeed's
shards in it). Pure functions and file operations; `callbacks.ConservativeCheckpointCallback` connects them to the
Trainer.

  retention  `retained_checkpoints`: the top-k by a logged metric plus the last n; the best and the newest always.
             Applied right after every save, so a checkpoint is deleted as soon as it is no longer needed.
  atomicity  the Trainer writes checkpoint-N/ file by file. `tunekit_complete.json` is written LAST (temp file,
             fsync, rename) and lists every file with its size; a directory without a valid marker is an
             interrupted save: resume never picks it and the next run removes it. Deletion removes the marker first.
  resume     `resume_target`: which checkpoint `--resume` means (what is verified on resume is in resume.py).
             A resumed run applies today's retention rule before it trains (`ConservativeCheckpointCallback`), so a
             tighter keep_top_k / keep_last_n frees the disk at once, never deleting the checkpoint resumed from.
  disk       before each save, free space is checked against the previous checkpoint's size (or, for the first, an
             estimate from the weights and optimizer state): a clear UserError instead of a full disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

from tunekit.errors import UserError

MARKER_NAME = "tunekit_complete.json"  # written last into checkpoint-N/: the save finished
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DISK_HEADROOM = 1.10  # a save may need 10% more than the previous one (tokenizer files, growing state)


# ---------------------------------------------------------------- retention rule (pure)


def rank_by_metric(records: list[tuple[int, float | None]], greater_is_better: bool = False) -> list[int]:
    """Steps of `records` [(step, metric or None)] that have a metric, best first.

    Ties go to the earlier step (it reached the value first, as the Trainer's own best_metric does). A missing or
    NaN metric is not ranked.
    """
    ranked = [(value, step) for step, value in records if value is not None and not math.isnan(value)]
    ranked.sort(key=lambda item: (-item[0] if greater_is_better else item[0], item[1]))
    return [step for _, step in ranked]


def retained_checkpoints(records: list[tuple[int, float | None]], keep_top_k: int, keep_last_n: int,
                         greater_is_better: bool = False) -> set[int]:
    """Steps to keep among `records` [(step, metric or None)], one record per checkpoint.

    Kept: the `keep_last_n` newest; the `keep_top_k` best by metric (`rank_by_metric`: ties to the earlier step);
    and always the newest and the best, even with keep_top_k=0 or keep_last_n=0 (the one to continue from, the one
    to deploy). A checkpoint without the metric survives only while it is among the last n (or the newest).
    Applying this after every save gives the same survivors as applying it once to the whole history: a checkpoint
    that drops out of the last n or the top k never comes back.
    """
    if not records:
        return set()
    newest_first = sorted((step for step, _ in records), reverse=True)
    keep = set(newest_first[:max(keep_last_n, 1)])
    keep.update(rank_by_metric(records, greater_is_better)[:max(keep_top_k, 1)])
    return keep


def metric_value(metrics: dict, name: str) -> float | None:
    """`name` (or `eval_<name>`, the Trainer's prefix) from a step's logged values; None when not logged."""
    for key in (name, f"eval_{name}"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def logged_at_step(log_history: list[dict], step: int) -> dict[str, float]:
    """Every numeric value logged at `step` (training loss, eval_loss, eval_general_loss, ...), merged."""
    values: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step") == step:
            values.update({k: float(v) for k, v in entry.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
    return values


# ---------------------------------------------------------------- checkpoint directories


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a directory named checkpoint-N, else None."""
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_marker(checkpoint: str | os.PathLike) -> dict | None:
    """The completion marker of `checkpoint`, or None when the save did not finish.

    Valid only when it parses, names the directory's step, and every file it lists is there with its recorded size
    (so a half-deleted or truncated directory is not mistaken for a checkpoint).
    """
    path = Path(checkpoint)
    try:
        marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step = checkpoint_step(path)
    if not isinstance(marker, dict) or (step is not None and marker.get("step") != step):
        return None
    for name, size in marker.get("files", {}).items():
        try:
            if (path / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def checkpoint_dirs(output_dir: str | os.PathLike) -> dict[int, Path]:
    """step -> checkpoint-N directory in `output_dir`, complete or not."""
    root = Path(output_dir)
    if not root.is_dir():
        return {}
    found = {checkpoint_step(p): p for p in root.iterdir() if p.is_dir()}
    return {step: path for step, path in found.items() if step is not None}


def complete_checkpoints(output_dir: str | os.PathLike) -> dict[int, tuple[Path, dict]]:
    """step -> (directory, marker) for every checkpoint in `output_dir` whose save finished."""
    result = {}
    for step, path in checkpoint_dirs(output_dir).items():
        marker = read_marker(path)
        if marker is not None:
            result[step] = (path, marker)
    return dict(sorted(result.items()))


def incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N directories without a valid marker: interrupted saves (or deletions)."""
    return [path for _, path in sorted(checkpoint_dirs(output_dir).items()) if read_marker(path) is None]


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `output_dir` whose save finished, or None. Interrupted saves are never returned."""
    done = complete_checkpoints(output_dir)
    return done[max(done)][0] if done else None


def resume_target(output_dir: str, resume: str | None) -> Path | None:
    """The checkpoint `--resume` means: None (fresh run), the latest complete one ('latest'; 'auto': or None when
    there is none, a fresh start), or the path given.

    Raises UserError when there is none, when the path is not a complete tunekit checkpoint, or when output_dir
    already holds complete checkpoints newer than it (resuming would write a second history over them).
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_complete_checkpoint(output_dir)
    if resume == "latest":
        target = latest_complete_checkpoint(output_dir)
        if target is None:
            broken = ", ".join(p.name for p in incomplete_checkpoints(output_dir))
            note = f" ({broken}: save interrupted)" if broken else ""
            raise UserError(f"--resume: no complete checkpoint in {output_dir}{note}")
        return target
    target = Path(resume)
    if not target.is_dir():
        raise UserError(f"--resume: checkpoint not found: {resume}")
    marker = read_marker(target)
    if marker is None:
        raise UserError(f"--resume: {resume} is not a complete checkpoint (no valid {MARKER_NAME}: its save was "
                        "interrupted, or tunekit did not write it); resume from an earlier one")
    newer = [p.name for step, (p, _) in complete_checkpoints(output_dir).items() if step > marker["step"]]
    if newer:
        raise UserError(f"--resume: {output_dir} already has checkpoints after step {marker['step']} "
                        f"({', '.join(newer)}); resuming from {resume} would overwrite them — move them away first")
    return target


def write_json_durably(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` so that a crash leaves either the old file or the complete new one.

    Temp file in the same directory, fsync, rename, fsync the directory (the rename itself must reach the disk).
    Generic (markers here, resume points in resume.py): a candidate for the run-directory module's writer.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(checkpoint: Path, step: int, metrics: dict[str, float], learning_rate: float | None,
                 trainable_dtypes: dict[str, str] | None = None) -> dict:
    """Mark `checkpoint` complete: its step, the values logged at that step, the learning rate, the dtype of each
    trainable parameter in memory (the saved files may not say: see `resume.restore_trainable_dtypes`), every
    file's size."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and not p.name.startswith(f".{MARKER_NAME}")}
    marker = {"step": step, "metrics": metrics, "learning_rate": learning_rate,
              "trainable_dtypes": trainable_dtypes or {},
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
    write_json_durably(checkpoint / MARKER_NAME, marker)
    return marker


def delete_checkpoint(checkpoint: Path) -> None:
    """Remove a checkpoint, marker first: a deletion cut short leaves an incomplete directory, never a broken
    one that looks complete."""
    try:
        (checkpoint / MARKER_NAME).unlink()
        _fsync_dir(checkpoint)
    except FileNotFoundError:
        pass
    shutil.rmtree(checkpoint, ignore_errors=True)


# ---------------------------------------------------------------- disk space (pure but for the sizes)


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def estimate_checkpoint_bytes(model, optimizer, optimizer_shards: int = 1, deepspeed: bool = False) -> int:
    """A first checkpoint's size before any exists: saved weights + optimizer state (+ ZeRO's fp32 master copy).

    Saved weights are the trainable ones for an adapter (PEFT saves only those), all of them otherwise; ZeRO-3
    partitioned parameters count their full size (ds_numel). `optimizer_shards`: processes whose optimizer state
    lands in the checkpoint (the world size under ZeRO, 1 under DDP where rank 0 saves it).
    """
    adapter_only = hasattr(model, "peft_config")
    weights = master = 0
    for param in model.parameters():
        if adapter_only and not param.requires_grad:
            continue
        numel = getattr(param, "ds_numel", param.numel())
        weights += numel * param.element_size()
        master += numel * 4 if param.requires_grad else 0
    return weights + _optimizer_state_bytes(optimizer) * optimizer_shards + (master if deepspeed else 0)


def optimizer_state(optimizer) -> dict:
    """The torch optimizer's per-parameter state {param: {name: tensor}} under its wrappers ({} when hidden)."""
    for _ in range(3):  # AcceleratedOptimizer -> DeepSpeed optimizer -> torch optimizer
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            return state
        optimizer = getattr(optimizer, "optimizer", None)
    return {}


def _optimizer_state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for per_param in optimizer_state(optimizer).values()
               if isinstance(per_param, dict) for t in per_param.values() if hasattr(t, "element_size"))


def human_bytes(count: float) -> str:
    """5.5e9 -> '5.5 GB', 999 -> '999 B' (decimal units). Not report.format_bytes ('5.50 GB', never B/KB): the disk
    error's wording is pinned by tests/test_checkpoints.py, and the report's table by its own."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def free_space_problem(needed_bytes: int, free_bytes: int, where: str) -> str | None:
    """None when `free_bytes` can hold a checkpoint of `needed_bytes` with DISK_HEADROOM, else the error message."""
    wanted = int(needed_bytes * DISK_HEADROOM)
    if free_bytes >= wanted:
        return None
    return (f"not enough disk space for the next checkpoint: it needs ~{human_bytes(wanted)}, only "
            f"{human_bytes(free_bytes)} free on {where}; free some space, lower checkpoints.keep_top_k / "
            "keep_last_n, or move output_dir (turn the check off with checkpoints.check_free_disk: false)")
