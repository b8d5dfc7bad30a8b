"""The callbacks every backend shares, each a thin adapter from a Trainer event to a pure function.

Checkpoints, for all three backends (a ZeRO-3 checkpoint is the Trainer's directory with DeepSpeed's shards in it):
  retention  `retained_checkpoints`: the top-k by a logged metric plus the last n; the best and the newest always.
             Applied right after every save, so a checkpoint is deleted as soon as it is no longer needed.
  atomicity  the Trainer writes checkpoint-N/ file by file. `tunekit_complete.json` is written LAST (temp file,
             fsync, rename) and lists every file with its size; a directory without a valid marker is an
             interrupted save: resume never picks it and the next run removes it. Deletion removes the marker first.
  disk       before each save, free space is checked against the previous checkpoint's size (or, for the first, an
             estimate from the weights and optimizer state): a clear UserError instead of a full disk.
  resume     `ResumeVerifier` records, on the first step after each save, digests of the weights and optimizer
             state, of the RNG states and of the token ids of the next batch; on resume it compares the restored
             step, learning rate, weights, RNG and the batch actually drawn with that record and fails loudly on any
             difference. The Trainer's own restore (rng_state*.pth, skip of the trained batches, seeded sampler)
             makes a resumed CPU run bit-identical to an uninterrupted one; the verifier proves it each time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from tunekit.config import CheckpointsConfig, RunConfig
from tunekit.errors import UserError

MARKER_NAME = "tunekit_complete.json"  # written last into checkpoint-N/: the save finished
RESUME_POINT_NAME = "tunekit_resume_point.rank{rank}.json"  # per process: state, RNG, next batch after a save
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DISK_HEADROOM = 1.10  # a save may need 10% more than the previous one (tokenizer files, growing state)


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, else the process's max resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


class MemoryLog(TrainerCallback):
    """Adds peak_memory_bytes to every logged entry (the report plots it)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history:
            state.log_history[-1]["peak_memory_bytes"] = peak_memory_bytes()


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
    """The checkpoint `--resume` means: None (fresh run), the latest complete one ('latest'), or the path given.

    Raises UserError when there is none, when the path is not a complete tunekit checkpoint, or when output_dir
    already holds complete checkpoints newer than it (resuming would write a second history over them).
    """
    if resume is None:
        return None
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
    """Write `data` to `path` so that a crash leaves either the old file or the complete new one.

    Temp file in the same directory, fsync, rename, fsync the directory (the rename itself must reach the disk).
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
    trainable parameter in memory (the saved files may not say: see `restore_trainable_dtypes`), every file's size."""
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


# ---------------------------------------------------------------- digests for resume verification


def rng_digest() -> str:
    """Short sha256 of this process's Python, NumPy, torch CPU (and current CUDA device) RNG states."""
    import numpy as np
    import torch

    digest = hashlib.sha256(repr(random.getstate()).encode())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    digest.update(keys.tobytes() + repr((kind, pos, has_gauss, cached)).encode())
    digest.update(torch.random.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        digest.update(torch.cuda.get_rng_state().numpy().tobytes())
    return digest.hexdigest()[:16]


def batch_digest(input_ids) -> str:
    """Short sha256 of a batch's token ids and shape: equal digests mean the same examples in the same order."""
    tensor = input_ids.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
    digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def trainable_dtypes(model) -> dict[str, str]:
    """name -> dtype of every trainable parameter, as training holds it in memory."""
    return {name: str(p.dtype).removeprefix("torch.") for name, p in model.named_parameters() if p.requires_grad}


def restore_trainable_dtypes(model, optimizer, dtypes: dict[str, str]) -> list[str]:
    """Cast trainable parameters (and their optimizer moments) back to the recorded `dtypes`; returns those changed.

    Why: TRL keeps QLoRA adapters in bf16 (the paper's recipe) and saves them so, but the Trainer's resume reloads
    them with PEFT's `load_adapter`, which upcasts adapters to fp32, and the optimizer's load then casts the moments
    to fp32 too: training would continue at another precision. The values are unchanged by the round trip (bf16 ->
    fp32 is exact), so casting back restores the saved state exactly.
    """
    import torch

    state = optimizer_state(optimizer)
    changed = []
    for name, param in model.named_parameters():
        wanted = dtypes.get(name)
        if not param.requires_grad or wanted is None or str(param.dtype).removeprefix("torch.") == wanted:
            continue
        dtype = getattr(torch, wanted)
        param.data = param.data.to(dtype)  # same Parameter object: the optimizer's references stay valid
        moments = state.get(param, {})
        for key, value in moments.items():
            if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                moments[key] = value.to(dtype)
        changed.append(name)
    return changed


def state_digest(model, optimizer) -> str:
    """Short sha256 of the trainable weights and their optimizer state: each tensor's name, dtype, shape, float64
    sum and sum of absolute values, reduced where the tensor lives (one small transfer, no copy of the model)."""
    import torch

    state, names, sums = optimizer_state(optimizer), [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensors = [(name, param)] + [(f"{name}.{key}", value) for key, value in sorted(state.get(param, {}).items())
                                     if torch.is_tensor(value)]
        for label, tensor in tensors:
            names.append(f"{label}:{str(tensor.dtype).removeprefix('torch.')}:{tuple(tensor.shape)}")
            sums.append(torch.stack([tensor.detach().sum(dtype=torch.float64),
                                     tensor.detach().abs().sum(dtype=torch.float64)]).cpu())
    digest = hashlib.sha256("\n".join(names).encode())
    if sums:
        digest.update(torch.stack(sums).numpy().tobytes())
    return digest.hexdigest()[:16]


def current_learning_rate(lr_scheduler, optimizer) -> float | None:
    """The learning rate the next optimizer step will use."""
    try:
        return float(lr_scheduler.get_last_lr()[0])
    except (AttributeError, IndexError, TypeError):
        groups = getattr(optimizer, "param_groups", None)
        return float(groups[0]["lr"]) if groups else None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def _gather(obj) -> list:
    """`obj` from every process (just [obj] in a single process)."""
    if not _distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- the callbacks


class ConservativeCheckpointCallback(TrainerCallback):
    """Completion markers, retention (top-k by metric + last n) and the free-disk check, on every backend.

    Needs `save_total_limit=None` (retention is ours). File operations happen on the process that saves
    (`args.should_save`: rank 0, or each node's first process with save_on_each_node), after a barrier so every
    rank has finished writing its shard, optimizer partition and RNG file.
    """

    def __init__(self, settings: CheckpointsConfig):
        self.settings = settings
        self.output_dir: Path | None = None
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.output_dir = Path(args.output_dir)
        if args.should_save:
            for path in incomplete_checkpoints(self.output_dir):
                print(f"warning: removing incomplete checkpoint {path} (its save was interrupted)", file=sys.stderr)
                shutil.rmtree(path, ignore_errors=True)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # DefaultFlowCallback ran first: should_save now says whether the Trainer saves after this step.
        if not (control.should_save and self.settings.check_free_disk):
            return
        latest = latest_complete_checkpoint(args.output_dir)
        if latest is not None:
            needed = directory_bytes(latest)
        else:
            deepspeed = bool(getattr(args, "deepspeed", None))
            needed = estimate_checkpoint_bytes(model, optimizer, args.world_size if deepspeed else 1, deepspeed)
        problem = free_space_problem(needed, shutil.disk_usage(args.output_dir).free, args.output_dir)
        problems = [p for p in _gather(problem) if p]  # every rank stops, or none: a lone raise would hang the rest
        if problems:
            raise UserError(f"step {state.global_step}: {problems[0]}")

    def on_save(self, args, state, control, model=None, lr_scheduler=None, optimizer=None, **kwargs):
        _barrier()  # the Trainer's save ends with per-rank files (rng_state_{rank}.pth): wait for all of them
        if not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        logged = logged_at_step(state.log_history, state.global_step)
        write_marker(checkpoint, state.global_step, logged, current_learning_rate(lr_scheduler, optimizer),
                     trainable_dtypes(model) if model is not None else None)
        evaluated = sorted(key for key in logged if key.startswith("eval_"))
        if evaluated and metric_value(logged, self.settings.metric) is None and not self._warned:
            self._warned = True  # a typo in checkpoints.metric would otherwise silently turn top-k off
            print(f"warning: checkpoints.metric {self.settings.metric!r} was not logged by the evaluation at step "
                  f"{state.global_step} ({', '.join(evaluated)}): checkpoints are kept by recency only",
                  file=sys.stderr)
        self.prune()

    def records(self) -> dict[int, tuple[Path, float | None]]:
        """step -> (directory, metric) of the complete checkpoints on disk (markers carry metrics across resumes)."""
        return {step: (path, metric_value(marker.get("metrics", {}), self.settings.metric))
                for step, (path, marker) in complete_checkpoints(self.output_dir).items()}

    def prune(self) -> None:
        found = self.records()
        keep = retained_checkpoints([(step, value) for step, (_, value) in found.items()], self.settings.keep_top_k,
                                    self.settings.keep_last_n, self.settings.greater_is_better)
        for step, (path, _) in found.items():
            if step not in keep:
                delete_checkpoint(path)

    def summary_fields(self) -> dict:
        """best_checkpoint (by the metric; None without one) and kept_checkpoints (oldest first), as paths."""
        if self.output_dir is None:
            return {}
        found = self.records()
        ranked = rank_by_metric([(step, value) for step, (_, value) in found.items()], self.settings.greater_is_better)
        return {"best_checkpoint": str(found[ranked[0]][0]) if ranked else None,
                "kept_checkpoints": [str(path) for path, _ in found.values()]}


class ResumeMismatchError(UserError):
    """The state restored from a checkpoint is not the one the original run had at that point."""


class ResumeVerifier(TrainerCallback):
    """Records the resume point after each save; on resume, proves the restored state is the recorded one.

    Recording (every process, its own file): at the first step after a save, the digests of the weights and
    optimizer state (`state_digest`, still the saved ones) and of the RNG states at on_step_begin, and the digest of
    the first micro-batch's input_ids (seen by a forward pre-hook on the model, since callbacks are not given the
    batch) go to checkpoint-N/tunekit_resume_point.rank{R}.json.
    Verifying (`resume_from` set): at on_train_begin the global step and learning rate against the marker (and the
    trainable dtypes restored, see `restore_trainable_dtypes`); at the first on_step_begin the weights/optimizer and
    RNG digests; at the first training forward the batch digest. Any difference raises ResumeMismatchError before
    the step updates a weight. A record the original run did not reach (killed between the save and its next step)
    is reported as not recorded. Under DeepSpeed the weights and optimizer belong to its engine and are not digested.
    """

    def __init__(self, resume_from: str | os.PathLike | None = None):
        self.resume_from = Path(resume_from) if resume_from else None
        self._hook = None
        self._pending: Path | None = None  # checkpoint whose resume point is still to be recorded
        self._point: dict | None = None  # being recorded: waits for the next training forward
        self._expected: dict | None = None  # resuming: the recorded point still to be checked
        self._verified: list[str] = []
        self._main, self._rank = True, 0

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, optimizer=None, **kwargs):
        self._main, self._rank = state.is_world_process_zero, args.process_index
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        if self.resume_from is None:
            return
        where = self.resume_from.name
        marker = read_marker(self.resume_from)
        if marker is None:
            raise ResumeMismatchError(f"resume check failed: {self.resume_from} has no valid {MARKER_NAME}")
        if state.global_step != marker["step"]:
            raise ResumeMismatchError(f"resume check failed ({where}): the Trainer restored global step "
                                      f"{state.global_step}, the checkpoint was written at step {marker['step']}")
        if state.global_step >= state.max_steps:  # the Trainer would run one more step past the end
            raise ResumeMismatchError(f"--resume: {where} is at step {state.global_step}, the run's last step "
                                      f"(max_steps {state.max_steps}): nothing left to train")
        lr, recorded = current_learning_rate(lr_scheduler, optimizer), marker.get("learning_rate")
        if recorded is not None and (lr is None or not math.isclose(lr, recorded, rel_tol=1e-9, abs_tol=1e-15)):
            raise ResumeMismatchError(f"resume check failed ({where}): learning rate after loading is {lr}, the "
                                      f"original run had {recorded} at step {marker['step']} — did the schedule "
                                      "(max_steps, warmup, scheduler type, learning rate) change?")
        self._verified = [f"step {state.global_step}", f"lr {lr:.6g}" if lr is not None else "lr n/a"]
        if not getattr(args, "deepspeed", None) and model is not None:  # DeepSpeed restores its own engine state
            changed = restore_trainable_dtypes(model, optimizer, marker.get("trainable_dtypes", {}))
            if changed:
                self._verified.append(f"{len(changed)} trainable tensors recast to their training dtype")
        point_file = self.resume_from / RESUME_POINT_NAME.format(rank=args.process_index)
        try:
            self._expected = json.loads(point_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._expected = None
            self._report("weights, rng and next batch not recorded (the original run stopped before its next step)")

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        deepspeed = bool(getattr(args, "deepspeed", None))
        if self._pending is not None:
            self._point = {"step": state.global_step, "rng": rng_digest(),
                           "state": None if deepspeed or model is None else state_digest(model, optimizer)}
        if self._expected is not None and "checked" not in self._expected:
            where, step = self.resume_from.name, state.global_step + 1
            recorded = self._expected.get("state")
            if recorded is not None and not deepspeed and state_digest(model, optimizer) != recorded:
                raise ResumeMismatchError(
                    f"resume check failed ({where}): the weights or optimizer state restored for step {step} differ "
                    "from the ones the original run had (a file reloaded at another dtype, or a different model?)")
            if rng_digest() != self._expected["rng"]:
                raise ResumeMismatchError(
                    f"resume check failed ({where}): the RNG state at step {step} differs from the original run's "
                    "(rng_state*.pth missing, or a different number of processes?)")
            self._expected["checked"] = True
            self._verified.append("weights+optimizer ok" if recorded is not None and not deepspeed
                                  else "weights+optimizer not checked (DeepSpeed)")

    def on_save(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:  # after the last save there is no next batch to record
            self._pending = Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_forward(self, module, args, kwargs):
        if not module.training or (self._point is None and self._expected is None):
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None
        digest, shape = batch_digest(input_ids), list(input_ids.shape)
        if self._point is not None:
            if self._pending.is_dir():  # pruning never removes the newest, but a rerun may have
                write_json_durably(self._pending / RESUME_POINT_NAME.format(rank=self._rank),
                                   {**self._point, "next_batch": digest, "next_batch_shape": shape})
            self._point = self._pending = None
        if self._expected is not None:
            if digest != self._expected["next_batch"]:
                expected = self._expected
                raise ResumeMismatchError(
                    f"resume check failed ({self.resume_from.name}): the next batch differs from the one the "
                    f"original run trained on at step {expected['step'] + 1} (recorded {expected['next_batch']} "
                    f"{expected.get('next_batch_shape')}, got {digest} {shape}): the data order changed — "
                    "different data, seed, batch size or number of processes?")
            shape_text = "x".join(str(n) for n in shape)
            self._report(f"rng ok, next batch ok ({shape_text} tokens, sha256 {digest})")
            self._expected = None
        return None

    def _report(self, tail: str) -> None:
        if self._main:
            print(f"resume verified: {', '.join(self._verified)}, {tail}", flush=True)


class StopAfterSeconds(TrainerCallback):
    """training.max_seconds: stop, evaluate and save once the training clock passes the budget (compare --budget seconds).

    Every rank reads its own clock; under DeepSpeed/DDP rank 0's decision is broadcast so all ranks stop together.
    """

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.started = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        out_of_time = _gather(time.monotonic() - self.started >= self.max_seconds)[0]
        if out_of_time:
            control.should_training_stop = control.should_save = control.should_evaluate = True
        return control


def build_callbacks(config: RunConfig, tokenizer,
                    resume_from: str | os.PathLike | None = None) -> list[TrainerCallback]:
    """The callbacks every run gets. `resume_from`: the checkpoint this run resumes from (checked on resume).

    The time budget comes first so that the checkpoint callback sees (and disk-checks) the save it asks for.
    """
    budget = [StopAfterSeconds(config.training.max_seconds)] if config.training.max_seconds else []
    return [*budget, MemoryLog(), ConservativeCheckpointCallback(config.checkpoints), ResumeVerifier(resume_from)]
