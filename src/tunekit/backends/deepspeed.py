"""DeepSpeed ZeRO for every method: the stage `auto` chose, the config the Trainer gets, and what the run reports.

A full run's `deepspeed` section defaults to `stage: auto`; LoRA/QLoRA runs use DeepSpeed when their config has a
section (multi-GPU adapters). `resolve_stage` replaces auto with what `estimate.stage.choose_zero` picked for this
machine in the pre-flight: no section at all (the plain Trainer: one process, or DDP) or a concrete stage and
offloads. The DeepSpeed config is then generated from that section, or is the user's inline dict /
JSON file (read by `DeepSpeedConfig.user_config`, the one reader). Batch size, accumulation, clipping and precision
are "auto" in it, so the Trainer fills them from the training section; a user config that writes a number there must
agree with the training section or the run stops before loading the model. Which stage a method may use is
`RunConfig.check_zero_stage` (QLoRA: at most 2), nowhere else.
"""

from __future__ import annotations

import os

from tunekit.backends.common import on_gpu, precision
from tunekit.config import RunConfig
from tunekit.errors import UserError


def resolve_stage(config: RunConfig, zero: dict) -> RunConfig:
    """`config` with `deepspeed.stage: auto` replaced by `zero` (a `choose_zero` result): without a `deepspeed`
    section when the choice is no DeepSpeed, else with the chosen stage and offloads. Any other config is returned
    as is. A copy: the config as written (auto) is what config.yaml records; resolved.json records what ran."""
    section = config.deepspeed
    if section is None or not section.chooses_stage:
        return config
    if not zero["deepspeed"]:
        return config.model_copy(update={"deepspeed": None})
    chosen = section.model_copy(update={"stage": zero["stage"], "offload_optimizer": zero["offload_optimizer"],
                                        "offload_param": zero["offload_param"]})
    return config.model_copy(update={"deepspeed": chosen})


def check_resumed_stage(as_written: RunConfig, chosen: RunConfig, checkpoint: str | None) -> None:
    """Refuse (UserError) resuming a `stage: auto` run under another set-up than the one that wrote its checkpoints
    (resolved.json's zero_stage): a requeued job that lands on a machine where auto chooses differently (fewer or
    smaller GPUs) would otherwise fail deep inside the checkpoint load (a plain Trainer checkpoint has no DeepSpeed
    engine state; ZeRO stages lay the optimizer state out differently)."""
    from tunekit.rundir import read_resolved

    section = as_written.deepspeed
    if checkpoint is None or section is None or not section.chooses_stage:
        return
    resolved = read_resolved(as_written.output_dir)
    now = chosen.deepspeed.zero_stage() if chosen.deepspeed is not None else None
    if resolved is None or resolved.zero_stage == now:
        return

    def setup(stage: int | None) -> str:
        return "no DeepSpeed" if stage is None else f"ZeRO stage {stage}"

    fix = (f"set deepspeed.stage: {resolved.zero_stage}" if resolved.zero_stage is not None else
           f"resume on {resolved.world_size} process(es) with the memory it had")
    raise UserError(f"--resume: {checkpoint} was written under {setup(resolved.zero_stage)} ({resolved.world_size} "
                    f"process(es)), but deepspeed.stage auto chose {setup(now)} here; {fix}")


def deepspeed_config(config: RunConfig) -> dict | None:
    """The DeepSpeed config dict for this run (its stage resolved: `resolve_stage`), or None when the run does not
    use DeepSpeed.

    Raises UserError (naming the key) when a user config cannot be read, has no ZeRO section, sets a stage the
    method cannot use, turns off the consolidated save under stage 3, or disagrees with the training section.
    """
    section = config.deepspeed
    if section is None:
        return None
    if section.chooses_stage:
        raise ValueError("deepspeed.stage is auto: resolve it for this machine first (resolve_stage)")
    ds = section.user_config()  # a copy: filled in below; deepspeed.stage / offload_* only shape the generated one
    if ds is None:
        ds = generated_config(config)
    zero = ds["zero_optimization"]  # user_config and the schema checked it names a stage 0-3
    try:
        config.check_zero_stage(int(zero["stage"]))  # config.load checked it too; a config built in code was not
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if zero["stage"] == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            # Without it the Trainer saves size-0 placeholder tensors (the known "empty adapter" failure).
            raise UserError("deepspeed.config: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true "
                            "(final/ must hold real weights, not ZeRO-3 placeholders)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    check_agrees_with_training(ds, config)
    ds.setdefault("zero_allow_untested_optimizer", True)  # the Trainer's torch AdamW, when no optimizer section
    return ds


def generated_config(config: RunConfig) -> dict:
    """tunekit's DeepSpeed config from the `deepspeed` section: ZeRO stage, optional CPU offload, the rest "auto"."""
    section = config.deepspeed
    zero: dict = {
        "stage": section.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if section.stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # final/ must hold one consolidated safetensors model (or a real adapter), not ZeRO shards.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    pin = on_gpu()  # pinned host memory speeds host<->GPU copies; on a CPU-only machine there is no GPU to copy to
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if section.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        # The Trainer supplies torch AdamW (no optimizer section); DeepSpeed must accept a client optimizer.
        "zero_allow_untested_optimizer": True,
    }


def check_agrees_with_training(ds: dict, config: RunConfig) -> None:
    """A number where tunekit writes "auto" must equal what the training section says (else: UserError)."""
    t = config.training
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    mode = precision(config)
    expected = {
        "train_micro_batch_size_per_gpu": (t.per_device_train_batch_size, "training.per_device_train_batch_size"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, "training.gradient_accumulation_steps"),
        "gradient_clipping": (t.max_grad_norm, "training.max_grad_norm"),
        "train_batch_size": (t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size,
                             f"per_device_train_batch_size x gradient_accumulation_steps x {world_size} processes"),
        "bf16.enabled": (mode == "bf16", f"training.precision ({mode})"),
        "fp16.enabled": (mode == "fp16", f"training.precision ({mode})"),
    }
    for key, (want, source) in expected.items():
        node: object = ds
        for part in key.split("."):
            node = node.get(part, "auto") if isinstance(node, dict) else "auto"
        if node != "auto" and node != want:
            raise UserError(f"deepspeed.config: {key} is {node!r} but {source} gives {want!r}; "
                            "write \"auto\" there and tunekit fills it from the training section")


def summary_fields(config: RunConfig, trainer) -> dict:
    """Under DeepSpeed: the ZeRO stage that ran and, for stage 3, the share of the weights this rank held.

    zero3_local_param_fraction is sum(local shard sizes) / sum(full sizes) on rank 0: ~1/world_size when the weights
    really were partitioned (slightly more: each shard is padded to a multiple of world_size), 1.0 if not.
    """
    ds = getattr(trainer.args, "hf_deepspeed_config", None)  # the config the Trainer ran, "auto" values filled
    if config.deepspeed is None or ds is None:
        return {}
    stage = int(ds.config["zero_optimization"]["stage"])
    fields: dict = {"zero_stage": stage}
    fraction = local_param_fraction(trainer.model) if stage == 3 else None
    if fraction is not None:
        fields["zero3_local_param_fraction"] = fraction
    return fields


def local_param_fraction(model) -> float | None:
    """sum(this rank's ZeRO-3 shard sizes) / sum(full sizes) of `model`'s parameters, to 4 decimals; None when they
    are not ZeRO-3 partitioned (no ds_tensor)."""
    params = list(model.parameters())
    if not params or not all(hasattr(p, "ds_tensor") for p in params):
        return None
    return round(sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params), 4)
