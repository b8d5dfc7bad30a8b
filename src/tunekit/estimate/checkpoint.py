"""What one checkpoint writes, and how long that takes: the Slurm grace period (slurm.py) and the default collective
timeout (training.ddp_timeout: null) are both sized from it, before anything loads.

Bytes come from the model's shape (settings.config_shape) and the DeepSpeed set-up that runs (stage.choose_zero):
  full       every weight (its load dtype), Adam's m and v per weight, and under DeepSpeed its fp32 master copy
  LoRA/QLoRA the adapter (fp32; the compute dtype under DeepSpeed's mixed precision) and the same state for it
Rank 0 writes the model's weights alone (ZeRO-3 gathers them to it); the optimizer state is split over the ranks
under ZeRO (stage >= 1), all on rank 0 without it. Time is bytes at ASSUMED_WRITE_BYTES_PER_S.
"""

from __future__ import annotations

import math
from typing import Any

from tunekit.config import RunConfig
from tunekit.estimate.memory import ADAM_BYTES_PER_PARAM, BYTES_PER_PARAM_MASTER, PRECISION_BYTES
from tunekit.estimate.settings import config_shape, memory_settings

# One node's sustained write to the shared filesystem the run directory lives on. 200 MB/s is deliberately low (NFS
# over 10 GbE reaches ~1 GB/s, a Lustre client 1-5 GB/s): a save that outlasts the Slurm grace period loses the
# whole interval since the last checkpoint, and one that outlasts the collective timeout kills the job.
ASSUMED_WRITE_BYTES_PER_S = 200e6
MIN_DDP_TIMEOUT_S = 300  # a few minutes: a stalled rank ends the job that soon (torch's own default is 30 min)
DDP_TIMEOUT_SAVE_FACTOR = 2  # the other ranks wait in a barrier while rank 0 writes: twice its estimated write


def checkpoint_bytes(params: float, trainable_params: float, *, method: str, weight_bytes: float, adam_bytes: float,
                     deepspeed: bool, world: int = 1, rank0_only: bool = False) -> float:
    """Bytes one checkpoint writes, summed over ranks; `rank0_only`: what rank 0 writes by itself (the weights plus
    its share of the optimizer state: 1/world under DeepSpeed's ZeRO, all of it without)."""
    master = BYTES_PER_PARAM_MASTER if deepspeed else 0
    if method == "full":
        weights, state = params * weight_bytes, params * (adam_bytes + master)
    else:
        weights, state = trainable_params * (weight_bytes if deepspeed else 4), trainable_params * (adam_bytes + master)
    if rank0_only and deepspeed:
        state /= world
    return weights + state


def run_checkpoint(config: RunConfig, zero: dict[str, Any], device: str, world: int) -> dict[str, Any]:
    """The checkpoint of `config` under `zero` (a choose_zero result) on `world` processes: {"bytes" (all ranks),
    "rank0_bytes", "what" (what it holds, for a comment)}. Reads only the model's config (its shape)."""
    shape = config_shape(config)
    settings = memory_settings(config, config.method, device, shape["attn_implementation"], zero)
    # full saves the weights in their load dtype; an adapter trains in the compute dtype
    weight_bytes = (settings["base_dtype_bytes"] if config.method == "full"
                    else PRECISION_BYTES[settings["precision"]])
    deepspeed = bool(zero["deepspeed"])
    kwargs = dict(method=config.method, weight_bytes=weight_bytes, adam_bytes=ADAM_BYTES_PER_PARAM[settings["optim"]],
                  deepspeed=deepspeed, world=world)
    master = " + fp32 master" if deepspeed else ""
    what = f"weights + Adam state{master}" if config.method == "full" else f"adapter + its Adam state{master}"
    return {"bytes": checkpoint_bytes(shape["params"], shape["trainable_params"], **kwargs),
            "rank0_bytes": checkpoint_bytes(shape["params"], shape["trainable_params"], rank0_only=True, **kwargs),
            "what": what}


def write_seconds(nbytes: float) -> float:
    """Seconds to write `nbytes` at the assumed bandwidth."""
    return nbytes / ASSUMED_WRITE_BYTES_PER_S


def default_ddp_timeout(rank0_bytes: float) -> int:
    """training.ddp_timeout when the config leaves it null: MIN_DDP_TIMEOUT_S, or twice rank 0's estimated write of
    one checkpoint when that is longer (a 70B full save must not be mistaken for a hung rank), in whole minutes."""
    seconds = max(MIN_DDP_TIMEOUT_S, DDP_TIMEOUT_SAVE_FACTOR * write_seconds(rank0_bytes))
    return int(math.ceil(seconds / 60.0)) * 60
