"""The callbacks every backend shares, each a thin adapter from a Trainer event to a pure function."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from transformers import TrainerCallback

from tunekit.config import RunConfig


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, else the process's max resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


class MemoryLog(TrainerCallback):
    """Adds peak_memory_bytes to every logged entry (the report plots it)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history:
            state.log_history[-1]["peak_memory_bytes"] = peak_memory_bytes()


def latest_complete_checkpoint(output_dir: str) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    return Path(last) if last else None


def build_callbacks(config: RunConfig, tokenizer) -> list[TrainerCallback]:
    return [MemoryLog()]
