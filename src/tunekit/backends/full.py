"""Full fine-tuning: every weight trains, sharded with DeepSpeed ZeRO (stage 3 by default).

This module only builds the model; the DeepSpeed config it trains under is backends/deepspeed.py (shared with
LoRA/QLoRA runs that have a `deepspeed` section).
"""

from __future__ import annotations

from tunekit.backends.common import from_pretrained, resize_for_new_tokens
from tunekit.config import RunConfig


def build_model(config: RunConfig, tokenizer):
    """The full model, every parameter trainable (under ZeRO-3 it is partitioned as it loads)."""
    model = from_pretrained(config)
    resize_for_new_tokens(model, tokenizer, config.model.add_tokens)
    model.config.use_cache = False  # the KV cache is useless in training and wastes memory
    return model
