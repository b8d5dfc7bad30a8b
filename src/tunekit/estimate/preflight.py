"""Before training: probe this machine (GPUs and their memory, or host RAM) and refuse a run that cannot fit."""

from __future__ import annotations

import os
from typing import Any

from tunekit.config import RunConfig
from tunekit.errors import UserError
from tunekit.estimate.formatting import advice, gb
from tunekit.estimate.job import estimate
from tunekit.estimate.memory import GB


def preflight_check(config: RunConfig, device: str = "cuda", force: bool = False, **estimate_kwargs: Any) -> dict:
    """Estimate the run for this machine; raise UserError when it cannot fit (unless `force` or the config allows it).

    The machine comes from probe_hardware; on CPU the processes share host RAM, so the job's total is compared with
    the machine's physical memory. Returns the estimate (print it with format_estimate).
    """
    device, gpus, memory_gb = probe_hardware(config, device)
    result = estimate(config, gpus=gpus, gpu_memory_gb=memory_gb, device=device, **estimate_kwargs)
    if not result["fits"] and config.preflight.refuse_if_too_big and not force:
        have = gb(result["gpu_memory_bytes"])
        need = gb(result["needed_bytes"])
        where = f"{need} of host RAM (have {have})" if device == "cpu" else (
            f"{need} per GPU ({result['gpus']} GPU(s) of {have})")
        tips = "; ".join(advice(result)) or "use a smaller model"
        raise UserError(f"the estimate says this {config.method} run needs {where}: {tips} "
                        "(--force starts anyway; `tunekit estimate` shows the breakdown)")
    return result


def probe_hardware(config: RunConfig, device: str = "cuda") -> tuple[str, int, float]:
    """(device, GPUs or processes, GB: per GPU, or the host RAM they share) here; "cuda" falls back to "cpu".

    CUDA: preflight.gpus, else WORLD_SIZE, else the visible GPUs; the first one's memory (or preflight.gpu_memory_gb).
    CPU: preflight.gpus or WORLD_SIZE processes (else 1), sharing the machine's physical memory.
    """
    # Under a launcher (torchrun, accelerate, deepspeed) WORLD_SIZE is the number of processes actually started.
    world_size = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None
    gpus, memory_gb = config.preflight.gpus or world_size, config.preflight.gpu_memory_gb
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            memory_gb = memory_gb or torch.cuda.get_device_properties(0).total_memory / GB
            return device, gpus or torch.cuda.device_count(), memory_gb
        device = "cpu"  # no GPU visible: the run will train on CPU
    return device, gpus or 1, _host_memory_bytes() / GB


def _host_memory_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
