"""Before training: probe this machine (its GPU and the job's process count, or host RAM) and refuse a run that
cannot fit.

The pre-flight checks the run that is about to start, so it uses what is really here: the memory of this process's
GPU and the launcher's WORLD_SIZE. The config's preflight.gpus / preflight.gpu_memory_gb are for planning with
`tunekit estimate` only: a config written for 8 GPUs, or pinned to 24 GB, must not change the verdict on the
machine that actually runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tunekit.config import RunConfig
from tunekit.errors import UserError
from tunekit.estimate.formatting import advice, gb
from tunekit.estimate.job import estimate
from tunekit.estimate.memory import GB


@dataclass(frozen=True)
class Machine:
    """What the run will train on: device "cuda" or "cpu", processes (GPUs) in the job, and GB per GPU (CUDA) or of
    host RAM shared by the processes (CPU)."""

    device: str
    processes: int
    memory_gb: float


def preflight_check(config: RunConfig, device: str = "cuda", force: bool = False, machine: Machine | None = None,
                    **estimate_kwargs: Any) -> dict:
    """Estimate the run for this machine; raise UserError when it cannot fit (unless `force` or the config allows it),
    or when the attention kernel cannot run this model (`backends.common.attention_refusal`).

    machine: what the run trains on (default: probe_hardware(device)). On CPU the processes share host RAM, so the
    job's total is compared with the machine's physical memory. Returns the estimate (print it with format_estimate).
    """
    from tunekit.backends.common import attention_refusal

    refusal = attention_refusal(config)  # a kernel the model cannot run, or packing it cannot keep apart: refused
    if refusal:                          # before the data is tokenized (from_pretrained checks again, with the load)
        raise UserError(refusal)
    machine = machine or probe_hardware(device)
    result = estimate(config, gpus=machine.processes, gpu_memory_gb=machine.memory_gb, device=machine.device,
                      **estimate_kwargs)
    if not result["fits"] and config.preflight.refuse_if_too_big and not force:
        have = gb(result["gpu_memory_bytes"])
        need = gb(result["needed_bytes"])
        where = f"{need} of host RAM (have {have})" if machine.device == "cpu" else (
            f"{need} per GPU ({result['gpus']} GPU(s) of {have})")
        tips = "; ".join(advice(result)) or "use a smaller model"
        raise UserError(f"the estimate says this {config.method} run needs {where}: {tips} "
                        "(--force starts anyway; `tunekit estimate` shows the breakdown)")
    return result


def probe_hardware(device: str = "cuda") -> Machine:
    """This machine as the run about to start sees it (see machine); "cuda" falls back to "cpu" without a GPU."""
    cuda = device_memory_gb = None
    if device == "cuda":
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            from tunekit.backends.common import gpu_memory_bytes  # the GPU this process trains on (LOCAL_RANK's)

            device_memory_gb = gpu_memory_bytes() / GB
    return machine(cuda_available=bool(cuda), device_memory_gb=device_memory_gb,
                   world_size=os.environ.get("WORLD_SIZE"), host_memory_gb=_host_memory_bytes() / GB)


def machine(*, cuda_available: bool, device_memory_gb: float | None, world_size: str | int | None,
            host_memory_gb: float) -> Machine:
    """The Machine a run trains on, from explicit probe results (pure: the seam tests drive).

    Processes: WORLD_SIZE, the number of processes a launcher (torchrun, accelerate, deepspeed) actually started,
    all nodes together; without a launcher one (a plain `tunekit train` trains on one GPU, or one CPU process).
    Memory: the training GPU's total memory, or without CUDA the host RAM all processes share.
    """
    processes = int(world_size) if world_size else 1
    if cuda_available:
        return Machine("cuda", processes, float(device_memory_gb))
    return Machine("cpu", processes, host_memory_gb)


def _host_memory_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
