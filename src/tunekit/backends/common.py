"""What every backend shares: the tokenizer, the device/precision decision, load arguments and the trainer arguments.

A backend (full.py, lora.py) only decides how the model is built; the training arguments, data, callbacks and the
save path are the same for all three methods.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tunekit.config import RunConfig
from tunekit.errors import UserError


def on_gpu() -> bool:
    return torch.cuda.is_available()


def precision(config: RunConfig) -> str:
    """fp32 | bf16 | fp16 after resolving 'auto': bf16 on a GPU that supports it, fp32 on CPU (CPU autocast bf16 is
    slower than fp32 for these small matmuls and the CPU stack verified fp32)."""
    wanted = config.training.precision
    if wanted == "auto":
        return "bf16" if on_gpu() and torch.cuda.is_bf16_supported() else "fp32"
    if wanted == "fp16" and not on_gpu():
        raise UserError("training.precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return wanted


def weights_dtype(config: RunConfig) -> torch.dtype:
    """dtype the (trainable or frozen) weights are loaded in."""
    if config.model.dtype != "auto":
        return getattr(torch, config.model.dtype)
    # LoRA/QLoRA: the frozen base can sit in bf16 (adapters stay fp32). Full FT keeps fp32 master weights and lets
    # mixed precision (or DeepSpeed's bf16) do the half-precision compute.
    if config.method != "full" and precision(config) == "bf16":
        return torch.bfloat16
    return torch.float32


def load_tokenizer(config: RunConfig):
    """The run's tokenizer, with a pad token (eos when it has none) and the config's new tokens added."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            config.model.name_or_path, trust_remote_code=config.model.trust_remote_code, revision=config.model.revision
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {config.model.name_or_path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if config.model.add_tokens:
        tokenizer.add_tokens(config.model.add_tokens)
    return tokenizer


def load_kwargs(config: RunConfig) -> dict[str, Any]:
    """from_pretrained keyword arguments shared by every method: safetensors only, no remote code unless asked."""
    kwargs: dict[str, Any] = {
        "dtype": weights_dtype(config),
        "trust_remote_code": config.model.trust_remote_code,
        "use_safetensors": True,  # never unpickle .bin weights
        "revision": config.model.revision,
    }
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    return kwargs


def from_pretrained(config: RunConfig, **extra: Any):
    """AutoModelForCausalLM.from_pretrained with our defaults; load failures become one-line UserErrors."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(config.model.name_or_path, **load_kwargs(config), **extra)
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load {config.model.name_or_path}: {str(exc).splitlines()[0]}") from None


def resize_for_new_tokens(model, tokenizer) -> list[int]:
    """Grow the embeddings to the tokenizer's size; return the ids of the new rows (empty when nothing was added)."""
    old_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old_size:
        return []
    # mean_resizing: new rows start at the mean embedding, so untrained new tokens don't dominate the softmax.
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return list(range(old_size, len(tokenizer)))


def training_arguments(config: RunConfig, deepspeed_config: dict | None = None):
    """TRL SFTConfig for any method. Must be built BEFORE from_pretrained under ZeRO-3 so weights shard at load."""
    from trl import SFTConfig

    mode = precision(config)
    t, c = config.training, config.checkpoints
    has_eval = config.data.eval_path is not None or config.data.eval_fraction > 0
    return SFTConfig(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        bf16=mode == "bf16",
        fp16=mode == "fp16",
        use_cpu=not on_gpu(),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=c.save_steps,
        save_strategy="steps",
        save_steps=c.save_steps,
        save_total_limit=None,  # retention is ours (callbacks.CheckpointRetention): top-k by metric + last n
        report_to=[r for r in config.logging.report_to if r != "none"] or "none",
        run_name=config.logging.run_name or os.path.basename(os.path.normpath(config.output_dir)),
        include_num_input_tokens_seen="non_padding",
        # data: already tokenized, masked and truncated by tunekit.data; TRL only packs.
        max_length=config.data.max_seq_len,
        packing=config.data.packing,
        packing_strategy="bfd",  # best-fit packing with per-example position_ids: no attention across examples
        padding_free=config.data.packing,
        dataset_num_proc=None,
        completion_only_loss=None,
        deepspeed=deepspeed_config,
        accelerator_config={"use_configured_state": True} if deepspeed_config is not None else None,
        disable_tqdm=False,
        save_only_model=False,
        ddp_find_unused_parameters=False if config.method != "full" else None,
    )


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned params report their full size via ds_numel."""
    trainable = total = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        if param.__class__.__name__ == "Params4bit":
            numel *= 2  # two 4-bit values per stored uint8
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total
