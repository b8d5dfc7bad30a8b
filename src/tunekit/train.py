"""The training recipe: validate → estimate → data → backend → train → save → summarize.

`train(config)` is the whole story in one screen; each step is a named helper below it. The same function runs in a
single process (`tunekit train`) and in every rank under `accelerate launch -m tunekit train` (DeepSpeed/DDP):
steps that write files happen on the main process only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import set_seed

from tunekit import preemption, rundir
from tunekit.backends import deepspeed, full, lora
from tunekit.backends.common import (check_launch, count_params, keep_checkpointing_kwargs, layer_by_layer,
                                     load_tokenizer, resolve_settings, training_arguments)
from tunekit.callbacks import TunekitTrainer, build_callbacks, peak_memory_bytes, stopped_on_signal
from tunekit.config import RunConfig
from tunekit.data import read_rows
from tunekit.distributed import check_shared_output_dir, is_rank_zero
from tunekit.errors import UserError
from tunekit.preference import PREFERENCE_KEYS, build_preference_trainer, held_out_logps
from tunekit.preference import summary_fields as preference_fields
from tunekit.prepare import prepare_data
from tunekit.report import start_plotter, write_report

# method -> function(config, tokenizer) -> model ready to train. QLoRA is LoRA with a 4-bit base.
BACKENDS = {"full": full.build_model, "lora": lora.build_model, "qlora": lora.build_model}


def train(config: RunConfig, overwrite: bool = False, resume: str | None = None, force: bool = False) -> dict:
    """Run one fine-tuning job; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    started = time.time()
    if resume == "auto" and (finished := rundir.finished_summary(config.output_dir)) is not None:
        return report_finished(config, finished)  # a requeued job whose run already ended: nothing to do
    rundir.check_output_dir(config.output_dir, overwrite, resume, config)
    check_launch(config)  # several GPUs and no launcher: refused before anything loads
    check_trackers(config)
    checkpoint = resume_checkpoint(config, resume)  # a bad --resume fails before anything is loaded
    preflight = run_preflight(config, force)
    as_written, config = config, deepspeed.resolve_stage(config, preflight["zero"])  # stage auto: chosen for here
    deepspeed.check_resumed_stage(as_written, config, checkpoint)  # a checkpoint resumes under the set-up it had
    config = with_ddp_timeout(config, preflight)  # null: long enough for this model's save
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)  # all data errors surface here, before anything is written
    args = training_arguments(config, deepspeed.deepspeed_config(config))  # before the model: ZeRO-3 shards at load
    set_seed(config.training.seed)  # LoRA init and new-token rows draw from the RNG (its start seed is random)
    model = BACKENDS[config.method](config, tokenizer)
    model.config.use_cache = False  # no KV cache in training; without one, packed rows get per-example attention
    if args.process_index == 0:
        rundir.create(as_written, resolve_settings(config, args, model), overwrite, resume)
    plotter = start_plotter() if args.process_index == 0 else None  # matplotlib loads in its own process, meanwhile
    check_shared_output_dir(config.output_dir)  # every rank sees rank 0's output_dir, or every rank refuses
    metric_before = task_metric(model, tokenizer, data, config)  # base weights, before any DeepSpeed engine
    pairs_before = held_out_logps(model, data, config)  # dpo/orpo: the base's (reference's) held-out log-probs
    trainer = build_trainer(config, args, model, tokenizer, data, checkpoint)
    preemption.check_before_training(config.output_dir, args.process_index == 0)  # a stop signal so far: exit 75
    trainer.train(resume_from_checkpoint=checkpoint)
    preemption.finish(config.output_dir, stopped_on_signal(trainer), trainer.is_world_process_zero())
    final_dir = save_final(trainer, tokenizer, config)
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    metric_after = task_metric(model, tokenizer, data, config)
    pairs = (pairs_before, held_out_logps(model, data, config))
    summary = summarize(config, trainer, data, preflight, metric_before, metric_after, eval_loss, started, final_dir,
                        pairs)
    if trainer.is_world_process_zero():
        rundir.write_json(Path(config.output_dir) / "summary.json", summary)
        write_run_report(config, trainer, summary, plotter)
        print_summary(summary)
    return summary


def check_trackers(config: RunConfig) -> None:
    """wandb online with no credentials would fail after the model loads (or hang on a prompt): refuse up front."""
    if "wandb" not in config.logging.report_to:
        return
    mode = os.environ.get("WANDB_MODE", "").lower()
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc_text()
    if mode not in ("offline", "disabled", "dryrun") and not has_key:
        raise UserError("logging.report_to: wandb has no API key here; set WANDB_API_KEY (never in the config) "
                        "or WANDB_MODE=offline to log locally")


def _netrc_text() -> str:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return path.read_text(errors="ignore") if path.is_file() else ""


def run_preflight(config: RunConfig, force: bool) -> dict:
    """Memory/cost estimate for this machine, printed once; refuses (UserError) when it cannot fit unless --force."""
    from tunekit.backends.common import on_gpu
    from tunekit.estimate import format_estimate, preflight_check

    result = preflight_check(config, device="cuda" if on_gpu() else "cpu", force=force)
    if is_rank_zero():
        print(format_estimate(result))
    return result


def with_ddp_timeout(config: RunConfig, preflight: dict) -> RunConfig:
    """`config` with training.ddp_timeout null replaced by the default sized from this run's checkpoint (the other
    ranks wait in a barrier while rank 0 writes it: estimate.checkpoint.default_ddp_timeout)."""
    if config.training.ddp_timeout is not None:
        return config
    from tunekit.estimate.checkpoint import default_ddp_timeout, run_checkpoint

    checkpoint = run_checkpoint(config, preflight["zero"], preflight["device"], preflight["gpus"])
    training = config.training.model_copy(update={"ddp_timeout": default_ddp_timeout(checkpoint["rank0_bytes"])})
    return config.model_copy(update={"training": training})


def task_metric(model, tokenizer, data, config: RunConfig) -> float | None:
    """Held-out generation metric (exact match) or None when the config turns it off or there are no prompts.
    Under ZeRO-3 every rank generates its share on the sharded weights, gathered one module at a time."""
    if config.eval.task_metric == "none" or not data.eval_pairs:
        return None
    from tunekit.evaluate import exact_match

    with layer_by_layer(model):  # ZeRO-3 before training: our per-module gathers; after it: the engine's hooks
        return exact_match(model, tokenizer, data.eval_pairs, max_new_tokens=config.eval.max_new_tokens,
                           batch_size=config.training.per_device_eval_batch_size)


def build_trainer(config: RunConfig, args, model, tokenizer, data, resume_from: str | None = None):
    """The objective's TRL trainer (sft: SFTTrainer; dpo / orpo: preference.build_preference_trainer), peak memory
    in every log entry, with tunekit's callbacks after the trackers."""
    callbacks = build_callbacks(config, tokenizer, resume_from) + insight_callbacks(config, model, tokenizer)
    if config.preference:
        trainer = build_preference_trainer(config, args, model, tokenizer, data, callbacks)
    else:
        trainer = TunekitTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                 processing_class=tokenizer, callbacks=callbacks,
                                 token_metrics=config.logging.token_metrics)
    keep_checkpointing_kwargs(trainer)  # TRL switches PEFT + ZeRO-3 to reentrant checkpointing; ours is non-reentrant
    # Callbacks that measure at an evaluation (forgetting, rank spectrum) have a `log` slot: their values go through
    # Trainer.log, the one way into both log_history and the trackers (see callbacks.PeakMemoryLog).
    for callback in callbacks:
        if hasattr(callback, "log"):
            callback.log = trainer.log
    return trainer


def insight_callbacks(config: RunConfig, model, tokenizer) -> list:
    """The rank-spectrum watch (LoRA/QLoRA) and the forgetting monitor (when eval.general names a file)."""
    from tunekit.forgetting import ForgettingCallback, general_loss
    from tunekit.spectrum import RankSpectrumCallback

    callbacks = []
    if config.method != "full" and config.eval.rank_spectrum:
        callbacks.append(RankSpectrumCallback())
    if config.eval.general:
        texts = [row["text"] for row in read_rows(config.eval.general, "text")]
        batch = config.training.per_device_eval_batch_size
        # The base model's loss on general text, before any update: the reference a rise is measured against.
        with layer_by_layer(model):
            base_loss = general_loss(model, tokenizer, texts, config.data.max_seq_len, batch)
        callbacks.append(ForgettingCallback(tokenizer, texts, base_loss, config.eval.forgetting_threshold,
                                            config.data.max_seq_len, batch))
    return callbacks


def report_finished(config: RunConfig, summary: dict) -> dict:
    """--resume auto on a run that already ended: say so (once per job) and return its summary."""
    if is_rank_zero():
        print(f"{config.output_dir}: the run already finished at step {summary['steps']} (final/ and summary.json); "
              "nothing to resume")
    return summary


def resume_checkpoint(config: RunConfig, resume: str | None) -> str | None:
    """None (fresh run), the newest complete checkpoint in output_dir ('latest'; 'auto': None when there is none),
    or the path given (checked)."""
    from tunekit.checkpoints import resume_target

    target = resume_target(config.output_dir, resume)
    return str(target) if target is not None else None


def save_final(trainer, tokenizer, config: RunConfig) -> Path:
    """OUTPUT_DIR/final: the adapter (LoRA/QLoRA) or the consolidated model (full), plus the tokenizer and a
    generation config that stops at the chat template's end of turn as well as at eos.

    Written under a temporary name and renamed, so a crash mid-save never leaves a `final/` that looks complete.
    """
    from tunekit.backends.common import stop_generation_config

    final_dir = Path(config.output_dir) / "final"
    tmp_dir = Path(config.output_dir) / "final.tmp"
    trainer.save_model(str(tmp_dir))  # collective under ZeRO-3: every rank must call it
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp_dir))
        stop_generation_config(trainer.model, tokenizer).save_pretrained(str(tmp_dir))
        if final_dir.exists():
            import shutil

            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def summarize(config: RunConfig, trainer, data, preflight, metric_before, metric_after, eval_loss, started,
              final_dir, pairs=(None, None)) -> dict:
    """The run's headline numbers, as written to summary.json. pairs: the held-out pairs' log-probs before and after
    training (dpo/orpo: preference.held_out_logps)."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    runtime = next((e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e), None)
    trainable, total = count_params(trainer.model)
    summary = {
        "method": config.method,
        "objective": config.objective,
        "steps": trainer.state.global_step,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "eval_loss": eval_loss,
        "task_metric_name": None if config.eval.task_metric == "none" else config.eval.task_metric,
        "task_metric_before": metric_before,
        "task_metric_after": metric_after,
        "trainable_params": trainable,
        "total_params": total,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": trainer.state.num_input_tokens_seen / runtime if runtime else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "wall_seconds": time.time() - started,
        "world_size": trainer.args.world_size,
        "final_dir": str(final_dir),
        "data": data.stats,
    }
    summary.update(deepspeed.summary_fields(config, trainer))
    summary.update(lora.summary_fields(config, trainer))
    summary.update(preference_fields(config, trainer, *pairs))
    for callback in trainer.callback_handler.callbacks:
        summary.update(getattr(callback, "summary_fields", dict)())
    summary["estimated_peak_bytes_per_device"] = preflight.get("per_device_total")
    summary["zero"] = preflight.get("zero")  # the DeepSpeed set-up chosen for this machine, and why (choose_zero)
    return summary


def write_run_report(config: RunConfig, trainer, summary: dict, plotter=None) -> None:
    from tunekit.forgetting import ForgettingCallback
    from tunekit.spectrum import RankSpectrumCallback

    extras = {}
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, RankSpectrumCallback):
            extras.update(spectra_history=callback.history, last_spectra=callback.last_spectra)
        if isinstance(callback, ForgettingCallback):
            extras["forgetting"] = callback.result()
    write_report(config.output_dir, summary, trainer.state.log_history, plotter=plotter, **extras)


def print_summary(summary: dict) -> None:
    def fmt(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    keys = ["method", "objective", "steps", "train_loss_first", "train_loss_last", "eval_loss", "task_metric_before",
            "task_metric_after", *PREFERENCE_KEYS, "trainable_params", "total_params", "tokens_per_second",
            "peak_memory_bytes", "wall_seconds", "final_dir"]
    print("\n".join(f"  {key:<26} {fmt(summary.get(key))}" for key in keys if key in summary))
