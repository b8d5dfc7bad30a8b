"""LoRA and QLoRA: a frozen base (full precision, or 4-bit NF4 for QLoRA) plus trainable low-rank adapters.

QLoRA is not a second backend: it is this one with a quantization config on the load and
`prepare_model_for_kbit_training` before the adapters go on.
"""

from __future__ import annotations

import torch

from tunekit.backends.common import from_pretrained, resize_for_new_tokens
from tunekit.config import RunConfig
from tunekit.errors import UserError


def build_model(config: RunConfig, tokenizer):
    """The peft model ready for training: base loaded (quantized for qlora), embeddings resized, adapters attached."""
    from peft import LoraConfig, get_peft_model

    extra = {"quantization_config": quantization_config(config)} if config.method == "qlora" else {}
    model = from_pretrained(config, **extra)
    new_token_ids = resize_for_new_tokens(model, tokenizer)
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and enables input grads so checkpointed 4-bit layers still backpropagate.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    missing = [name for name in config.lora.target_modules if not any(n.endswith("." + name) for n, _ in model.named_modules())]
    if missing:
        raise UserError(f"lora.target_modules: {missing} not found in {config.model.name_or_path}")
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.lora_alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        # New vocabulary rows train as peft "trainable tokens" (a small delta on those rows only): no full FT needed.
        trainable_token_indices=new_token_ids if (new_token_ids and config.lora.train_new_token_embeddings) else None,
    )
    return get_peft_model(model, lora)


def quantization_config(config: RunConfig):
    """NF4 (or FP4) 4-bit base with double quantization; raises UserError when bitsandbytes cannot load."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # ImportError, or a broken native library
        raise UserError(f"method: qlora needs bitsandbytes, which cannot load here: {str(exc).splitlines()[0]}") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.qlora.quant_type,
        bnb_4bit_use_double_quant=config.qlora.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.qlora.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )


def summary_fields(config: RunConfig, trainer) -> dict:
    """qlora: how many Linear layers really are 4-bit (bitsandbytes Linear4bit)."""
    if config.method != "qlora":
        return {}
    return {"quantized_modules": sum(1 for m in trainer.model.modules() if type(m).__name__ == "Linear4bit")}
