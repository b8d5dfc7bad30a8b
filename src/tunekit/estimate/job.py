"""The estimate of one run config: its settings mapped onto the shape (shapes.py), the byte model (memory.py) and
time/cost (cost.py), for the configured method and, at the same batch, for the other two."""

from __future__ import annotations

from typing import Any

from tunekit.config import CONFIG_CLASSES, RunConfig
from tunekit.errors import UserError
from tunekit.estimate.cost import (
    DEFAULT_MFU,
    PEAK_TFLOPS_A100_BF16,
    QLORA_THROUGHPUT_FACTOR,
    reference_tokens,
    training_flops,
    training_hours,
    training_tokens,
)
from tunekit.estimate.memory import (
    ADAM_BYTES_PER_PARAM,
    ALLOCATOR_FRAGMENTATION,
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    GB,
    memory_bytes,
    min_gpus,
)
from tunekit.estimate.settings import config_shape, memory_settings, must_fit
from tunekit.estimate.stage import Rung, choose_zero, label


def estimate(config: RunConfig, gpus: int | None = None, gpu_memory_gb: float | None = None,
             tokens_per_second: float | None = None, *, device: str = "cuda", examples: int | None = None,
             avg_tokens_per_example: float | None = None, peak_tflops: float = PEAK_TFLOPS_A100_BF16,
             mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Memory, time and cost of `config` on `gpus` GPUs of `gpu_memory_gb` each (device "cuda"; "cpu": processes
    sharing host RAM). The only I/O: the model's config (see shapes.py) and, when `examples` is None, the local data
    files.

    Returns a JSON-serializable dict: model, model_type, shape_source, method, params, trainable_params, adapted and
    not_adapted (LoRA/QLoRA: module and parameter names within a layer; None for full), bytes (summed
    over the job's GPUs), per_device, per_device_total, gpus, gpu_memory_bytes, fits, cpu_offload_bytes, tokens,
    flops, train_hours (wall), gpu_hours, cost_usd (None when tokens are unknown), alternatives (the same run as each
    method), assumptions. Time: `tokens_per_second` (the whole job's) when given, else FLOPs at `mfu` of
    `peak_tflops` per GPU. Raises UserError when the model's config cannot be read.
    """
    gpus = gpus or config.preflight.gpus or 1
    memory_gb = gpu_memory_gb or config.preflight.gpu_memory_gb or 80.0
    memory = memory_gb * GB
    shape = config_shape(config)
    shapes = {config.method: shape}
    for method in {"full", "lora", "qlora"} - {config.method}:
        try:
            shapes[method] = config_shape(config, method)
        except UserError:  # a full run gets LoRA's default target names, which this architecture may not have
            pass

    zero = choose_zero(config, gpus, memory_gb, device)  # deepspeed.stage auto: what fits here
    settings = memory_settings(config, config.method, device, shape["attn_implementation"], zero)
    mem = memory_bytes(shape, gpus=gpus, **settings)

    tokens, tokens_how = training_tokens(config, gpus, examples, avg_tokens_per_example)
    seq_for_attention = avg_tokens_per_example or config.data.max_seq_len
    flops = hours = gpu_hours = cost = None
    reference_how = None
    if tokens is not None:
        ref_tokens, reference_how = reference_tokens(config, tokens, examples, avg_tokens_per_example)
        flops = training_flops(shape, method=config.method, tokens=tokens, seq_len=int(seq_for_attention),
                               gradient_checkpointing=settings["gradient_checkpointing"], reference_tokens=ref_tokens)
        if tokens_per_second:
            hours = tokens / tokens_per_second / 3600
        else:
            hours = training_hours(flops, method=config.method, gpus=gpus, peak_tflops=peak_tflops, mfu=mfu)
        gpu_hours = hours * gpus
        cost = gpu_hours * config.preflight.usd_per_gpu_hour

    alternatives = {}
    for method in (m for m in ("full", "lora", "qlora") if m in shapes):
        alt_zero = zero if method == config.method else choose_zero(config, gpus, memory_gb, device, method)
        alt_settings = memory_settings(config, method, device, shape["attn_implementation"], alt_zero)
        alt = memory_bytes(shapes[method], gpus=gpus, **alt_settings)
        needed_gpus = None  # on CPU more processes share the same RAM: adding them never helps
        if device == "cuda":
            if not alt_zero["fits"] and alt_zero["auto"]:
                # auto on more GPUs: the most sharded stage without offload (what auto picks when it must shard).
                alt_settings.update(zero_stage=CONFIG_CLASSES[method].MAX_ZERO_STAGE, deepspeed=True,
                                    offload_optimizer=False, offload_param=False)
            needed_gpus = min_gpus(shapes[method], memory, **alt_settings)
            if needed_gpus is None and method == "lora" and alt_settings["zero_stage"] < 3:
                # Replicas cannot fit a base that one GPU cannot hold; ZeRO-3 can shard it.
                alt_settings["zero_stage"], alt_settings["deepspeed"] = 3, True
                needed_gpus = min_gpus(shapes[method], memory, **alt_settings)
        alternatives[method] = {
            "per_device_total": alt["per_device"]["total"],
            "needed_bytes": must_fit(alt, device),
            "fits": must_fit(alt, device) <= memory,
            "gpus_needed": needed_gpus,
            "zero_stage": alt_settings["zero_stage"],
            "zero": label(Rung(alt_settings["deepspeed"], alt_settings["zero_stage"] if alt_settings["deepspeed"]
                               else None, alt_settings["offload_optimizer"], alt_settings["offload_param"]), gpus),
        }

    return {
        "model": config.model.name_or_path,
        "model_type": shape["model_type"],
        "shape_source": shape["source"],
        "method": config.method,
        "device": device,
        "params": shape["params"],
        "trainable_params": shape["trainable_params"],
        # what LoRA/QLoRA adapts and which weight matrices it leaves frozen (names within a layer), for one line
        "adapted": shape["adapted"] if config.method != "full" else None,
        "not_adapted": shape["not_adapted"] if config.method != "full" else None,
        "bytes": mem["job"],
        "per_device": mem["per_device"],
        "per_device_total": mem["per_device"]["total"],
        "cpu_offload_bytes": mem["cpu_offload"],
        "gpus": gpus,
        "gpu_memory_bytes": memory,
        "needed_bytes": must_fit(mem, device),
        "fits": must_fit(mem, device) <= memory,
        "tokens": tokens,
        "flops": flops,
        "train_hours": hours,
        "gpu_hours": gpu_hours,
        "cost_usd": cost,
        "alternatives": alternatives,
        "zero": zero,  # the DeepSpeed set-up this run gets here, and why (stage.choose_zero)
        "assumptions": {
            "gb": "1e9 bytes",
            "precision": settings["precision"],
            "base_weights_bytes_per_param": settings["base_dtype_bytes"] if config.method == "lora" else None,
            "optimizer": f"{settings['optim']}: {ADAM_BYTES_PER_PARAM[settings['optim']]} B/param for Adam m+v",
            # DeepSpeed's mixed precision keeps an fp32 master copy; the plain Trainer's fp32 weights are their own.
            "master_weights": config.method == "full" and settings["precision"] != "fp32" and zero["deepspeed"],
            "zero_stage": settings["zero_stage"],
            "micro_batch": settings["micro_batch"],
            "seq_len": settings["seq_len"],
            "gradient_checkpointing": settings["gradient_checkpointing"],
            "overhead": f"{(CUDA_CONTEXT_BYTES if device == 'cuda' else CPU_RUNTIME_BYTES) / GB:.1f} GB runtime per "
                        f"process + {ALLOCATOR_FRAGMENTATION:.0%} fragmentation"
                        + (" + ZeRO-3 gathered module" if settings["zero_stage"] >= 3 and gpus > 1 else ""),
            "tokens": tokens_how,
            "objective": config.objective,
            # DPO's reference (None: sft and orpo have none): what is held (the "reference" bucket), what it costs in time
            "reference": reference_note(config),
            "reference_time": reference_how,
            "flops_per_token": "6N full, 4N + 6N_trainable LoRA/QLoRA (+2N with checkpointing) + attention"
                               + (" + 2N per reference token" if reference_how else ""),
            "throughput": (f"{tokens_per_second:g} tokens/s (given)" if tokens_per_second else
                           f"{mfu:.0%} MFU of {peak_tflops:g} TFLOP/s per GPU (A100 bf16 dense)"
                           + (f", x{QLORA_THROUGHPUT_FACTOR} for 4-bit dequantization"
                              if config.method == "qlora" else "")),
            "usd_per_gpu_hour": config.preflight.usd_per_gpu_hour,
        },
    }


def reference_note(config: RunConfig) -> str | None:
    """What DPO's reference model holds in memory, for the estimate's reference line (None: sft and orpo have none)."""
    if config.objective != "dpo":
        return None
    if config.dpo.reference == "precomputed":
        return "precomputed: log-probs scored before training, nothing held"
    if config.method == "full":
        return "model: a frozen copy of the weights, no grads or optimizer state (sharded only at ZeRO-3)"
    return "model: the base with the adapter disabled, no copy (a second no-grad forward)"
