"""What is recorded at save and verified at resume.

`ResumeVerifier` records, on the first step after each save, digests of the weights and optimizer state, of the RNG
states and of the token ids of the next batch; on resume it compares the restored step, learning rate, weights, RNG
and the batch actually drawn with that record and fails loudly on any difference. The Trainer's own restore
(rng_state*.pth, skip of the trained batches, seeded sampler) makes a resumed CPU run bit-identical to an
uninterrupted one; the verifier proves it each time. Which checkpoint `--resume` means is `checkpoints.resume_target`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path

from transformers import TrainerCallback

from tunekit.checkpoints import MARKER_NAME, optimizer_state, read_marker, write_json_durably
from tunekit.errors import UserError

RESUME_POINT_NAME = "tunekit_resume_point.rank{rank}.json"  # per process: state, RNG, next batch after a save


# ---------------------------------------------------------------- what is recorded: digests, dtypes, learning rate


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


# ---------------------------------------------------------------- the callback


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
