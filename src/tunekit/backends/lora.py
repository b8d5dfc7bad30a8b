"""LoRA and QLoRA: a frozen base (full precision, or 4-bit NF4 for QLoRA) plus trainable low-rank adapters.

QLoRA is not a second backend: it is this one with a quantization config on the load and
`prepare_model_for_kbit_training` before the adapters go on.
"""

from __future__ import annotations

import torch

from tunekit.backends.common import from_pretrained, resize_for_new_tokens, zero_stage
from tunekit.config import LoraRunConfig, QloraRunConfig, RunConfig, where
from tunekit.errors import UserError, first_line
from tunekit.lora_targets import peft_targets, unmatched_targets


def build_model(config: LoraRunConfig, tokenizer):
    """The peft model ready for training: base loaded (quantized for qlora), embeddings resized, adapters attached."""
    from peft import LoraConfig, get_peft_model

    check_zero3_new_tokens(config)
    extra = {"quantization_config": quantization_config(config)} if config.method == "qlora" else {}
    model = from_pretrained(config, **extra)
    new_token_ids = resize_for_new_tokens(model, tokenizer, config.model.add_tokens)
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        if count_quantized_modules(model) == 0:  # else QLoRA would silently train LoRA on a full-precision base
            raise UserError(f"{where(config, 'method')}: qlora: bitsandbytes quantized none of {type(model).__name__}'s "
                            "layers (transformers' 4-bit loading replaces only plain nn.Linear and Conv1D, and this "
                            "architecture uses its own Linear class); use method lora")

        # Casts norms to fp32 and enables input grads so checkpointed 4-bit layers still backpropagate.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    missing = unmatched_targets([name for name, _ in model.named_modules()], config.lora.target_modules)
    if missing:
        raise UserError(f"{where(config, 'lora.target_modules')}: {missing} not found in "
                        f"{config.model.name_or_path}; all-linear adapts every linear layer whatever it is called")
    target_modules, target_parameters = peft_targets(model, config.lora.target_modules)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.lora_alpha,
        # peft's parameter adapters (fused MoE experts) refuse dropout: built without it, then set_dropout below.
        lora_dropout=config.lora.dropout if target_parameters is None else 0.0,
        target_modules=target_modules,
        target_parameters=target_parameters,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens(model, new_token_ids) if config.lora.train_new_token_embeddings else None,
    )
    autocast = autocast_adapters(zero_stage(config), quantized=config.method == "qlora")
    model = get_peft_model(model, lora, autocast_adapter_dtype=autocast)
    if target_parameters is not None:
        set_dropout(model, config.lora.dropout)
    head = model.get_output_embeddings()
    if type(head).__name__ == "TrainableTokensWrapper" and "bias" not in head.__dict__:
        # TRL's fused LM-head loss reads lm_head.weight (the wrapper returns base + trained rows, with gradient) and
        # lm_head.bias, which the wrapper does not forward: give it the wrapped layer's (None for Llama-style heads).
        head.bias = head.original_module.bias
    return model


def set_dropout(model, p: float) -> None:
    """lora.dropout on every module adapter of the peft `model` (not on parameter adapters: peft's ParamWrapper
    cannot apply dropout to a weight delta). Dropout acts in training only, so the saved adapter (lora_dropout 0
    in its config) merges and serves the same."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    if p == 0:
        return
    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(p)


def autocast_adapters(zero_stage: int | None, quantized: bool) -> bool:
    """peft's `autocast_adapter_dtype`: whether LoRA adapters next to a bf16/fp16 base are upcast to fp32.

    False under ZeRO-3 with a non-quantized base (TRL's own rule, sft_trainer.py, applied when TRL builds the peft
    model; tunekit builds it, so it applies the rule here): ZeRO-3 all-gathers each module's persistent parameters
    into one buffer of the first parameter's dtype, so fp32 adapters beside a bf16 base fail at the first step
    (DeepSpeed#8072), and DeepSpeed's bf16 optimizer keeps fp32 master weights of them anyway. True otherwise: peft
    builds fp32 adapters — what then trains is decided downstream: DDP keeps them fp32; under ZeRO 1/2 with bf16
    DeepSpeed's engine casts them to bf16 beside an fp32 master copy; with a 4-bit base TRL casts trainable
    parameters to bf16 (estimate.memory.adapter_bytes counts each case). With an fp32 base all give fp32 adapters.
    """
    return not (zero_stage == 3 and not quantized)


def trainable_tokens(model, token_ids: list[int]) -> dict[str, list[int]] | None:
    """peft `trainable_token_indices` for the new tokens' rows: {module name: ids}, or None when there are none.

    New vocabulary rows train as peft "trainable tokens" (a [n_new, hidden] delta on those rows only; every other
    row stays frozen and bit-identical), so adding tokens does not need full fine-tuning. The input embedding always;
    an untied output embedding (lm_head) too, or the model could read the new tokens but never learn to emit them.
    With tied embeddings peft ties the lm_head rows to the embedding's by itself.
    """
    if not token_ids:
        return None
    names = {module: name for name, module in model.named_modules()}
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and not getattr(model.config, "tie_word_embeddings", False):
        layers.append(output)
    return {names[layer]: list(token_ids) for layer in layers}


def check_zero3_new_tokens(config: LoraRunConfig) -> None:
    """Refuse (UserError) training new token rows under ZeRO-3: peft's trainable tokens read the embedding weight
    directly, which ZeRO-3 leaves as a size-0 shard outside its hooks (and peft gathers it on CUDA only)."""
    zero3 = config.deepspeed is not None and config.deepspeed.zero_stage() == 3
    if zero3 and config.model.add_tokens and config.lora.train_new_token_embeddings:
        raise UserError("model.add_tokens: new token rows cannot be trained under deepspeed stage 3 with LoRA; use "
                        "deepspeed stage 2 (adapters are small, sharding them gains little) or set "
                        "lora.train_new_token_embeddings: false")


def quantization_config(config: QloraRunConfig):
    """NF4 (or FP4) 4-bit base with double quantization; raises UserError when bitsandbytes cannot load."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # ImportError, or a broken native library
        raise UserError(f"method: qlora needs bitsandbytes, which cannot load here: {first_line(exc)}") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.qlora.quant_type,
        bnb_4bit_use_double_quant=config.qlora.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.qlora.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )


def summary_fields(config: RunConfig, trainer) -> dict:
    """qlora: how many layers really hold 4-bit weights."""
    if config.method != "qlora":
        return {}
    return {"quantized_modules": count_quantized_modules(trainer.model)}


def count_quantized_modules(model) -> int:
    """Layers whose weight is stored 4-bit: bitsandbytes Linear4bit instances (not peft's LoRA wrappers of them,
    which share the class name and would count every layer twice)."""
    import bitsandbytes as bnb

    return sum(1 for module in model.modules() if isinstance(module, bnb.nn.Linear4bit))
