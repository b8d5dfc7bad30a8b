"""Thin glue between the Trainer and the pure parts: each callback turns a Trainer event into calls of
checkpoints.py (retention, markers, disk check), resume.py (record and verify), preemption.py (stop signals) and
distributed.py (agreement).

Logging: every value tunekit measures goes through `Trainer.log`, so it reaches the trackers (wandb, tensorboard),
the console and `state.log_history` (the run report, checkpoint markers) alike. `PeakMemoryLog.log` (in front of
each objective's TRL trainer) adds the peak memory to every entry; callbacks that measure at an evaluation
(forgetting.py, spectrum.py) are handed the trainer's `log` by `train.build_trainer`.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from tunekit.checkpoints import (
    complete_checkpoints,
    delete_checkpoint,
    directory_bytes,
    estimate_checkpoint_bytes,
    free_space_problem,
    incomplete_checkpoints,
    latest_complete_checkpoint,
    logged_at_step,
    metric_value,
    rank_by_metric,
    retained_checkpoints,
    write_marker,
)
from tunekit.config import CheckpointsConfig, RunConfig
from tunekit.distributed import barrier, gather_object, max_over_ranks
from tunekit.errors import UserError
from tunekit.preemption import received_signal, signal_name
from tunekit.resume import ResumeVerifier, current_learning_rate, trainable_dtypes


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, else the process's max resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


class PeakMemoryLog:
    """`peak_memory_bytes` in every logged entry (the report plots it; trackers chart it). Put in front of the TRL
    trainer class of each objective (TunekitTrainer here; the DPO and ORPO trainers in preference.py), so this one
    `log` runs first and then the TRL trainer's own.

    Why in `log` and not a callback: `Trainer.log` appends the entry to state.log_history, then calls each
    callback's on_log in registration order, the trackers first (they are registered before any user callback). A
    value added in our on_log reaches the history but never a tracker; `log` is the one place a value reaches both.
    Nor can a callback log memory as an entry of its own during training: SFTTrainer.log (DPO's and ORPO's alike)
    folds its averaged metrics (token accuracy, entropy, rewards) into whichever entry is logged next, so that entry
    would take them from the loss entry.
    """

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["peak_memory_bytes"] = peak_memory_bytes()  # in place, as the parents do: evaluate() returns this dict
        super().log(logs, start_time)


@contextmanager
def loss_positions_only():
    """TRL's fused LM head (trl 1.16) projects only the positions that carry loss on Triton devices, and every
    position elsewhere: on a compiling backend (Neuron) a varying row count would recompile the kernel every batch.
    Eager CPU compiles nothing, so let it score loss positions only too. With completion-only loss most positions are
    prompt or padding (85% of the demo data's slots) and the head was a quarter of a tiny model's CPU step. Each
    position's log-prob is computed by the same tiles either way; only float summation order in the head's weight
    gradient can differ (tests/test_performance.py). A TRL without this switch keeps its own behaviour."""
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    try:
        yield
    finally:
        trl_utils._use_triton = use_triton


class TunekitTrainer(PeakMemoryLog, SFTTrainer):
    """TRL's SFTTrainer with `peak_memory_bytes` in every logged entry (PeakMemoryLog) and TRL's per-step token
    metrics opt-in (`token_metrics`, from logging.token_metrics).

    Off, each step skips what only feeds those metrics: the fused LM head's entropy and top-1 over the vocabulary
    (per token, every tile) and compute_loss's cross-rank gathers of entropy, accuracy and token count, each ending
    in a `.item()` host sync. The loss is TRL's plain-path formula, term for term, so what trains is the same
    (tests/test_performance.py). Any other loss path TRL has (compute_loss_func, label smoothing, a non-nll
    loss_type, Ulysses sequence parallelism) keeps TRL's own compute_loss and its metrics.

    Either way the fused head scores only the positions that carry loss (`loss_positions_only`), and the Trainer's
    FLOP count takes the parameter count once (`floating_point_ops`).
    """

    def __init__(self, *args, token_metrics: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._flop_parameters: int | None = None  # floating_point_ops
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        self.token_metrics = token_metrics or not (
            self.compute_loss_func is None and self.label_smoother is None and self.args.loss_type == "nll"
            and not (parallelism is not None and parallelism.sp_backend == "deepspeed" and parallelism.sp_enabled))
        if not self.token_metrics:
            from accelerate.utils import is_peft_model
            from trl.trainer.utils import add_fused_lm_head

            # SFTTrainer.__init__ patched the head with outputs=(log_probs, entropy, is_top1). Patch it again with
            # log_probs only: the new forward takes every fused call and hands any other (generation) to TRL's.
            add_fused_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's total_flos term, as it computes it (6 x input tokens x non-embedding parameters), with the
        parameter count taken once: the Trainer's walks every parameter on every step (2 ms of a 70 ms tiny step)
        and the count does not change during a run."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_parameters is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_parameters

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with loss_positions_only():
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.token_metrics:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's plain path (SFTTrainer.compute_loss, trl 1.16) without its metrics.
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True  # MoE: the model then returns outputs.aux_loss
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)  # log_probs: 0 where ignored
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP then averages the gradients
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        if return_outputs:  # the logits, for compute_metrics: an extra forward, as TRL does
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------- the callbacks


class ConservativeCheckpointCallback(TrainerCallback):
    """Completion markers, retention (top-k by metric + last n) and the free-disk check, on every backend.

    Needs `save_total_limit=None` (retention is ours). File operations happen on the process that saves
    (`args.should_save`: rank 0, or each node's first process with save_on_each_node), after a barrier so every
    rank has finished writing its shard, optimizer partition and RNG file.
    """

    def __init__(self, settings: CheckpointsConfig, resume_from: str | os.PathLike | None = None):
        self.settings = settings
        self.resume_from = Path(resume_from) if resume_from else None
        self.output_dir: Path | None = None
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.output_dir = Path(args.output_dir)
        if args.should_save:
            for path in incomplete_checkpoints(self.output_dir):
                print(f"warning: removing incomplete checkpoint {path} (its save was interrupted)", file=sys.stderr)
                shutil.rmtree(path, ignore_errors=True)
            if self.resume_from is not None:
                # Today's rule before the first step: a resume with a tighter keep_top_k / keep_last_n (the disk
                # error's advice) frees the space now, not after the next save it was short of.
                self.prune(keep=state.global_step)

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
        problems = [p for p in gather_object(problem) if p]  # all ranks stop or none: a lone raise hangs the rest
        if problems:
            raise UserError(f"step {state.global_step}: {problems[0]}")

    def on_save(self, args, state, control, model=None, lr_scheduler=None, optimizer=None, **kwargs):
        barrier()  # the Trainer's save ends with per-rank files (rng_state_{rank}.pth): wait for all of them
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

    def prune(self, keep: int | None = None) -> None:
        """Delete the complete checkpoints the retention rule drops; never step `keep` (the one resumed from) nor
        the newest (the rule always keeps it: a stop on a signal relies on that)."""
        found = self.records()
        kept = retained_checkpoints([(step, value) for step, (_, value) in found.items()], self.settings.keep_top_k,
                                    self.settings.keep_last_n, self.settings.greater_is_better)
        if keep is not None:
            kept.add(keep)
        for step, (path, _) in found.items():
            if step not in kept:
                delete_checkpoint(path)

    def summary_fields(self) -> dict:
        """best_checkpoint (by the metric; None without one) and kept_checkpoints (oldest first), as paths."""
        if self.output_dir is None:
            return {}
        found = self.records()
        ranked = rank_by_metric([(step, value) for step, (_, value) in found.items()], self.settings.greater_is_better)
        return {"best_checkpoint": str(found[ranked[0]][0]) if ranked else None,
                "kept_checkpoints": [str(path) for path, _ in found.values()]}


class StopCallback(TrainerCallback):
    """The one per-step stop agreement (one small all-reduce): a stop signal on any rank, or training.max_seconds.

    Signal (preemption.py): save at this step and stop; evaluated only when this step had an evaluation scheduled
    anyway, so the checkpoint is the one an uninterrupted run would write and no time is spent that the scheduler
    may not give. `stopped`: (signal number, step) once that happened; train.py then exits (preemption.finish).
    Out of time (compare --budget seconds): stop, evaluate and save. Every rank reads its own clock and signal;
    the element-wise maximum over ranks decides, so all ranks stop together.
    """

    def __init__(self, max_seconds: float | None = None) -> None:
        self.max_seconds = max_seconds
        self.started = time.monotonic()
        self.stopped: tuple[int, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        out_of_time = self.max_seconds is not None and time.monotonic() - self.started >= self.max_seconds
        signum, out_of_time = max_over_ranks([received_signal() or 0, int(out_of_time)])
        if signum and state.global_step < state.max_steps:  # at the last step the run ends (and saves) anyway
            self.stopped = (signum, state.global_step)
            control.should_training_stop = control.should_save = True
            if state.is_world_process_zero:
                print(f"{signal_name(signum)} received: saving checkpoint-{state.global_step} and stopping",
                      file=sys.stderr, flush=True)
        elif out_of_time:
            control.should_training_stop = control.should_save = control.should_evaluate = True
        return control


def stopped_on_signal(trainer) -> tuple[int, int] | None:
    """(signal number, step) when the trainer's StopCallback stopped training on a signal, else None."""
    return next((c.stopped for c in trainer.callback_handler.callbacks if isinstance(c, StopCallback)), None)


def build_callbacks(config: RunConfig, tokenizer,
                    resume_from: str | os.PathLike | None = None) -> list[TrainerCallback]:
    """The callbacks every run gets. `resume_from`: the checkpoint this run resumes from (checked on resume).

    The stop agreement comes first so that the checkpoint callback sees (and disk-checks) the save it asks for.
    """
    t = config.training
    stop = [StopCallback(t.max_seconds)] if t.stop_signals or t.max_seconds else []  # else no per-step collective
    return [*stop, ConservativeCheckpointCallback(config.checkpoints, resume_from), ResumeVerifier(resume_from)]
