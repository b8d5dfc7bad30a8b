"""A run config's settings as the byte model (memory.py) takes them: the model's shape for the run's method, the
memory_bytes keyword arguments for a DeepSpeed set-up, and which total must fit. Shared by job.py (the estimate) and
stage.py (deepspeed.stage auto), which builds on them and is used by job.py."""

from __future__ import annotations

from typing import Any

from tunekit.config import DeepSpeedConfig, LoraConfig, LoraRunConfig, QloraConfig, QloraRunConfig, RunConfig
from tunekit.estimate.memory import DTYPE_BYTES, PRECISION_BYTES
from tunekit.estimate.shapes import count_params


def lora_settings(config: RunConfig) -> LoraConfig:
    """The run's LoRA section, or the defaults for a full run (whose LoRA/QLoRA alternatives the estimate shows)."""
    return config.lora if isinstance(config, LoraRunConfig) else LoraConfig()


def config_shape(config: RunConfig, method: str | None = None) -> dict[str, Any]:
    """count_params for the run's model as `method` (default the run's own), with its LoRA settings and new tokens."""
    return count_params(config.model.name_or_path, lora_settings(config), method or config.method,
                        len(config.model.add_tokens), config.model.revision)


def memory_settings(config: RunConfig, method: str, device: str, default_attn: str, zero) -> dict[str, Any]:
    """memory_bytes keyword arguments for `config` run as `method` (alternatives keep batch, length, optimizer).
    default_attn: the kernel model.attn_implementation auto loads for this model (the shape's attn_implementation).
    zero: the DeepSpeed set-up it runs with (a `stage.choose_zero` result or a `stage.Rung`: deepspeed, stage,
    offload_optimizer, offload_param)."""
    t = config.training
    if t.precision != "auto":
        precision = t.precision
    else:
        precision = "bf16" if device == "cuda" else "fp32"  # auto: bf16 on a GPU, fp32 on CPU
    model_dtype = config.model.dtype
    base_dtype_bytes = DTYPE_BYTES[model_dtype] if model_dtype != "auto" else PRECISION_BYTES[precision]
    zero = zero._asdict() if hasattr(zero, "_asdict") else zero
    qlora = config.qlora if isinstance(config, QloraRunConfig) else QloraConfig()
    return {
        "method": method, "device": device, "precision": precision, "base_dtype_bytes": base_dtype_bytes,
        "optim": t.optim, "zero_stage": zero["stage"] or 0, "offload_optimizer": zero["offload_optimizer"],
        "offload_param": zero["offload_param"],
        "micro_batch": t.per_device_train_batch_size, "seq_len": config.data.max_seq_len,
        "gradient_checkpointing": t.gradient_checkpointing, "lora_dropout": lora_settings(config).dropout,
        "double_quant": qlora.double_quant,
        "attn_implementation": default_attn if config.model.attn_implementation == "auto" else config.model.attn_implementation,
        "deepspeed": zero["deepspeed"],
        # dpo / orpo: chosen and rejected in one batch; DPO also scores (or precomputed) a frozen reference
        "pairs": config.preference, "reference": config.dpo.reference if config.objective == "dpo" else None,
    }


def zero_settings(ds: DeepSpeedConfig) -> tuple[int, bool, bool]:
    """ZeRO stage and offload flags of a section that names its stage: from a user's DeepSpeed config when given,
    else from the deepspeed section."""
    user = ds.user_config()
    if user is None:
        return ds.stage, ds.offload_optimizer, ds.offload_param
    zero = user["zero_optimization"]  # present: the config's validation checked it

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") != "none"

    return ds.zero_stage(), offloaded("offload_optimizer"), offloaded("offload_param")


def must_fit(mem: dict, device: str) -> float:
    """What must fit `gpu_memory_bytes`: one GPU's share; on CPU all processes share host RAM, so the job's total."""
    return mem["job"]["total"] if device == "cpu" else mem["per_device"]["total"]
