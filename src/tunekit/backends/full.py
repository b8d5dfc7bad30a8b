"""Full fine-tuning: every weight trains, sharded with DeepSpeed ZeRO (stage 3 by default).

The DeepSpeed config is generated from the run config (or read from the user's JSON/dict) with batch, accumulation,
clipping and precision left as "auto", so the Trainer fills them from the training section and the two can never
disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunekit.backends.common import from_pretrained, resize_for_new_tokens
from tunekit.config import RunConfig


def deepspeed_config(config: RunConfig) -> dict | None:
    """The DeepSpeed config dict for this run, or None when the run does not use DeepSpeed."""
    section = config.deepspeed
    if section is None:
        return None
    if isinstance(section.config, dict):
        return dict(section.config)
    if isinstance(section.config, str):
        return json.loads(Path(section.config).read_text())
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
            # final/ must hold one consolidated safetensors model, not only ZeRO shards.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if section.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
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


def build_model(config: RunConfig, tokenizer):
    """The full model, every parameter trainable (under ZeRO-3 it is partitioned as it loads)."""
    model = from_pretrained(config)
    resize_for_new_tokens(model, tokenizer)
    model.config.use_cache = False  # the KV cache is useless in training and wastes memory
    return model


def summary_fields(config: RunConfig, trainer) -> dict:
    if config.deepspeed is None:
        return {}
    ds = deepspeed_config(config) or {}
    return {"zero_stage": ds.get("zero_optimization", {}).get("stage", 0)}
