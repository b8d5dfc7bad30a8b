"""What every backend shares: the tokenizer, the device/precision decision, load arguments and the trainer arguments.

A backend (full.py, lora.py) only decides how the model is built; the training arguments, data, callbacks and the
save path are the same for all three methods.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch

from tunekit.config import RunConfig
from tunekit.errors import UserError, first_line


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
    except Exception as exc:  # noqa: BLE001 - whatever the library raises on a user's files is one line for the user
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {config.model.name_or_path}: "
                        f"{first_line(exc)}") from None
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
    except Exception as exc:  # noqa: BLE001 - unknown model_type, corrupt safetensors, bad config.json, no weights...
        raise UserError(f"model.name_or_path: cannot load {config.model.name_or_path}: {first_line(exc)}") from None



def resize_for_new_tokens(model, tokenizer, new_tokens: list[str]) -> list[int]:
    """Grow the embeddings to the tokenizer's size when it outgrew them; return the ids of `new_tokens` (the rows a
    LoRA run trains). Empty when nothing was asked for.

    A token that already had a row (a reserved token, or a vocabulary padded past the tokenizer's size) is trained
    too: its row was never trained for the meaning the user is about to give it.
    """
    if not new_tokens:
        return []
    # num_embeddings, not weight.shape: under ZeRO-3 the local weight is a size-0 placeholder.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # mean_resizing: new rows start at the mean embedding, so untrained new tokens don't dominate the softmax.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return sorted(set(tokenizer.convert_tokens_to_ids(new_tokens)))


def cpu_deepspeed_state(deepspeed_config: dict | None) -> bool:
    """On CPU under DeepSpeed, set up the process group ourselves; return True when it did (the Trainer must then use it).

    Left alone, the Trainer treats `use_cpu` as "no DeepSpeed" and builds a one-process state, and DeepSpeed then fails
    in from_pretrained with "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size".
    A DeepSpeed-flavoured PartialState on gloo, created first, is what both then use. A plain `tunekit train` (no
    launcher) gets a one-process group so the same code path runs. On a GPU the Trainer's own set-up is right.
    """
    if deepspeed_config is None or on_gpu():
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if "LOCAL_RANK" not in os.environ:  # not started by a launcher: a group of one on this machine
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    PartialState(backend="gloo")
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_arguments(config: RunConfig, deepspeed_config: dict | None = None):
    """TRL SFTConfig for any method. Must be built BEFORE from_pretrained under ZeRO-3 so weights shard at load."""
    from trl import SFTConfig

    use_configured_state = cpu_deepspeed_state(deepspeed_config)
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
        save_total_limit=None,  # retention is ours (callbacks.ConservativeCheckpointCallback): top-k by metric + last n
        report_to=[r for r in config.logging.report_to if r != "none"] or "none",
        run_name=config.logging.run_name or os.path.basename(os.path.normpath(config.output_dir)),
        include_num_input_tokens_seen="non_padding",
        # data: already tokenized, masked and truncated by tunekit.data; TRL only packs.
        max_length=config.data.max_seq_len,
        packing=config.data.packing,
        # tunekit.data already truncated, masked and dropped loss-less examples: TRL's own pass would only redo it
        # (uncached, on every run). With packing TRL must still run it, to pack.
        dataset_kwargs={"skip_prepare_dataset": not config.data.packing},
        packing_strategy="bfd",  # best-fit packing with per-example position_ids: no attention across examples
        padding_free=config.data.packing,
        dataset_num_proc=None,
        completion_only_loss=None,
        deepspeed=deepspeed_config,
        accelerator_config={"use_configured_state": True} if use_configured_state else None,
        disable_tqdm=False,
        save_only_model=False,
        ddp_find_unused_parameters=False if config.method != "full" else None,
    )


def resolve_settings(config: RunConfig, args, model):
    """The `rundir.Resolved` record of this run: what "auto" became here, read from the objects that run it.

    args: the built SFTConfig (its world size and DeepSpeed config); model: the loaded (peft) model.
    """
    from tunekit.rundir import Resolved, library_versions

    ds = getattr(args, "hf_deepspeed_config", None)  # set by the Trainer's arguments when DeepSpeed runs
    stage = int(ds.config["zero_optimization"]["stage"]) if ds is not None else None
    device = f"cuda ({torch.cuda.get_device_name(0)})" if on_gpu() else "cpu"
    return Resolved(
        precision=precision(config),
        load_dtype=str(weights_dtype(config)).removeprefix("torch."),
        zero_stage=stage,
        world_size=args.world_size,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        device=device,
        versions=library_versions(),
    )


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. A peft model counts itself (its count knows ZeRO-3's size-0 shards and
    bitsandbytes' two 4-bit values per stored byte); a full model has neither 4-bit weights nor adapters, only the
    ZeRO-3 shards, whose full size is ds_numel."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


@contextmanager
def full_weights(model):
    """Inside this block the model can run forward/generate on every rank, whatever ZeRO did to its weights.

    Under ZeRO-3 each rank holds 1/world_size of every weight (the rest are size-0 placeholders). Once the DeepSpeed
    engine exists, its hooks gather each layer just before it runs, so nothing is needed. Before that (the base
    model's task metric and general loss), there are no hooks: the whole model is gathered on every rank for the
    block, which costs one full copy of the weights per device. Collective: every rank must enter, and every rank
    must then run the same number of forward passes (transformers' generate syncs ranks under ZeRO-3 by itself).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or hasattr(model, "ds_id"):  # ds_id: the engine's hooks are on this module
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield
