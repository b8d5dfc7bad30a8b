"""Full fine-tuning: every weight trains, sharded with DeepSpeed ZeRO (stage 3 by default).

The DeepSpeed config is generated from the run config, or read from the user's inline dict / JSON file. Batch size,
accumulation, clipping and precision are "auto" in it, so the Trainer fills them from the training section; a user
config that writes a number there must agree with the training section or the run stops before loading the model.
The same config serves LoRA/QLoRA runs that have a `deepspeed` section (multi-GPU adapters).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from tunekit.backends.common import from_pretrained, on_gpu, precision, resize_for_new_tokens
from tunekit.config import RunConfig
from tunekit.errors import UserError


def deepspeed_config(config: RunConfig) -> dict | None:
    """The DeepSpeed config dict for this run, or None when the run does not use DeepSpeed.

    Raises UserError (naming the key) when a user config does not parse, has no ZeRO section, sets a stage the
    method cannot use, turns off the consolidated save under stage 3, or disagrees with the training section.
    """
    section = config.deepspeed
    if section is None:
        return None
    if section.config is None:
        return generated_config(config)
    # deepspeed.stage / offload_* only shape the generated config: the user's config says its own.
    ds = copy.deepcopy(section.config) if isinstance(section.config, dict) else _read_json(section.config)
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise UserError("deepspeed.config: no zero_optimization.stage in the DeepSpeed config")
    if config.method == "qlora" and zero["stage"] == 3:
        raise UserError("deepspeed.config: zero_optimization.stage 3 conflicts with method qlora "
                        "(4-bit weights cannot be ZeRO-3 sharded); use stage 2")
    if zero["stage"] == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            # Without it the Trainer saves size-0 placeholder tensors (the known "empty adapter" failure).
            raise UserError("deepspeed.config: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true "
                            "(final/ must hold real weights, not ZeRO-3 placeholders)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    _check_agrees_with_training(ds, config)
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


def _read_json(path: str) -> dict:
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"deepspeed.config: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"deepspeed.config: {path}:{exc.lineno}: DeepSpeed JSON does not parse: {exc.msg}") from None
    if not isinstance(ds, dict):
        raise UserError(f"deepspeed.config: {path}: expected a JSON object")
    return ds


def _check_agrees_with_training(ds: dict, config: RunConfig) -> None:
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


def build_model(config: RunConfig, tokenizer):
    """The full model, every parameter trainable (under ZeRO-3 it is partitioned as it loads)."""
    model = from_pretrained(config)
    resize_for_new_tokens(model, tokenizer, config.model.add_tokens)
    model.config.use_cache = False  # the KV cache is useless in training and wastes memory
    return model


def summary_fields(config: RunConfig, trainer) -> dict:
    """Under DeepSpeed: the ZeRO stage that ran and, for stage 3, the share of the weights this rank held.

    zero3_local_param_fraction is sum(local shard sizes) / sum(full sizes) on rank 0: ~1/world_size when the weights
    really were partitioned (slightly more: each shard is padded to a multiple of world_size), 1.0 if not.
    """
    ds = getattr(trainer.args, "hf_deepspeed_config", None)
    if config.deepspeed is None or ds is None:
        return {}
    stage = int(ds.config.get("zero_optimization", {}).get("stage", 0))
    fields: dict = {"zero_stage": stage}
    params = list(trainer.model.parameters())
    if stage == 3 and params and all(hasattr(p, "ds_tensor") for p in params):
        local = sum(p.ds_tensor.numel() for p in params)
        fields["zero3_local_param_fraction"] = round(local / sum(p.ds_numel for p in params), 4)
    return fields
