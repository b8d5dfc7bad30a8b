"""`deepspeed.stage: auto`: the ZeRO set-up that fits this job, from the byte model (memory.py) and nothing else.

The rule, for the run's method on `gpus` processes of `gpu_memory_gb` each:
  one process   the plain Trainer (no DeepSpeed: there is nothing to shard, and its engine only costs time) when it
                fits; else ZeRO-Offload: stage 2 with the optimizer states in host RAM, then stage 3 with the weights
                there too (slower steps, but the run fits).
  several       the lowest rung that fits per device, in the order DDP (no DeepSpeed: every rank holds everything),
                ZeRO 1 (optimizer states sharded), 2 (+ gradients), 3 (+ weights), then CPU offload (optimizer, then
                parameters).
A stage above the method's `MAX_ZERO_STAGE` (QLoRA: 2) is never tried; on CPU (the processes share host RAM) there
is no host memory to offload to, so the offload rungs are not tried either. When no rung fits, the last one tried is
returned with fits False: the pre-flight then refuses with the estimate's advice. A stage the config names (or a
user DeepSpeed config) is returned as given, and a LoRA/QLoRA config without a `deepspeed` section runs without it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from tunekit.config import CONFIG_CLASSES, DeepSpeedConfig, RunConfig
from tunekit.estimate.settings import config_shape, memory_settings, must_fit, zero_settings
from tunekit.estimate.memory import GB, memory_bytes


class Rung(NamedTuple):
    """One set-up auto may choose: DeepSpeed or not, the ZeRO stage (None without DeepSpeed), the offloads."""

    deepspeed: bool
    stage: int | None
    offload_optimizer: bool = False
    offload_param: bool = False


def ladder(processes: int, max_stage: int, device: str = "cuda") -> list[Rung]:
    """The rungs auto tries, cheapest first (see the module docstring)."""
    rungs = [Rung(False, None)]
    if processes > 1:  # ZeRO without offload only helps when there is something to shard over
        rungs += [Rung(True, stage) for stage in range(1, max_stage + 1)]
    if device == "cuda":
        rungs.append(Rung(True, min(2, max_stage) if processes == 1 else max_stage, offload_optimizer=True))
        if max_stage >= 3:
            rungs.append(Rung(True, 3, offload_optimizer=True, offload_param=True))
    return rungs


def label(rung: Rung, processes: int) -> str:
    """How a rung reads in the pre-flight table: "no DeepSpeed", "DDP", "ZeRO-2 + optimizer offload", ..."""
    if not rung.deepspeed:
        return "DDP (no DeepSpeed)" if processes > 1 else "no DeepSpeed (plain Trainer)"
    offloaded = [name for name, on in (("optimizer", rung.offload_optimizer), ("parameter", rung.offload_param)) if on]
    return f"ZeRO-{rung.stage}" + (f" + {' and '.join(offloaded)} offload" if offloaded else "")


def needed_bytes(config: RunConfig, rung: Rung, gpus: int, device: str = "cuda", method: str | None = None) -> float:
    """What must fit under `rung` (estimate.memory_bytes): bytes per GPU, or on CPU the job's total."""
    method = method or config.method
    shape = config_shape(config, method)
    settings = memory_settings(config, method, device, shape["attn_implementation"], rung)
    return must_fit(memory_bytes(shape, gpus=gpus, **settings), device)


def choose_zero(config: RunConfig, gpus: int, gpu_memory_gb: float, device: str = "cuda",
                method: str | None = None) -> dict[str, Any]:
    """The DeepSpeed set-up `config` runs with on `gpus` processes (GPUs) of `gpu_memory_gb` each (device "cpu": the
    processes share that much host RAM).

    Returns {"deepspeed": bool, "stage": int | None, "offload_optimizer": bool, "offload_param": bool, "fits": bool,
    "reason": str, "auto": bool, "label": str, "needed_bytes": float} — stage None without DeepSpeed; needed_bytes is
    what must fit (per GPU; on CPU the job's total). method: the run as another method (the estimate's alternatives
    at the same batch); default the config's. Raises UserError when the model's config cannot be read.
    """
    method = method or config.method
    ds = config.deepspeed or (DeepSpeedConfig() if method == "full" else None)  # full's default section is auto
    max_stage = CONFIG_CLASSES[method].MAX_ZERO_STAGE
    memory = gpu_memory_gb * GB

    def needed(rung: Rung) -> float:
        return needed_bytes(config, rung, gpus, device, method)

    def result(rung: Rung, reason: str, auto: bool, need: float | None = None) -> dict[str, Any]:
        need = needed(rung) if need is None else need
        return {"deepspeed": rung.deepspeed, "stage": rung.stage, "offload_optimizer": rung.offload_optimizer,
                "offload_param": rung.offload_param, "fits": need <= memory, "reason": reason, "auto": auto,
                "label": label(rung, gpus), "needed_bytes": need}

    if ds is None:
        return result(Rung(False, None), "as configured: no deepspeed section", auto=False)
    if not ds.chooses_stage:
        stage, offload_optimizer, offload_param = zero_settings(ds)
        # An alternative method keeps the run's stage where it can (QLoRA: at most 2).
        rung = Rung(True, min(stage, max_stage), offload_optimizer, offload_param and min(stage, max_stage) >= 3)
        return result(rung, "as configured", auto=False)

    processes = f"{gpus} process{'es' if gpus > 1 else ''}"
    scope = "in all" if device == "cpu" else "per GPU"
    tried = []
    rungs = ladder(gpus, max_stage, device)
    for rung in rungs:
        need = needed(rung)
        tried.append(f"{label(rung, gpus)} needs {need / GB:.1f} GB")
        if need <= memory:
            break
    have = f"{gpu_memory_gb:.1f} GB {scope}"
    if need > memory:
        reason = f"{processes}: nothing fits {have} ({'; '.join(tried)})"
    elif not rung.deepspeed:
        why = "nothing to shard" if gpus == 1 else "every rank holds the whole model"
        reason = f"{processes}: {tried[-1]} of {have} ({why})"
    else:
        reason = f"{processes}: {'; '.join(tried[:-1])}, more than {have}; {tried[-1]}"
        if rung.offload_optimizer:
            reason += " (ZeRO-Offload: states in host RAM, slower steps)"
    return result(rung, reason, auto=True, need=need)
