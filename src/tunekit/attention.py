"""Can the config's attention kernel run on this machine? Decided before anything loads, without importing torch.

`flash_attention_2` needs the flash-attn package (a CUDA extension built against one torch/CUDA/python) and a CUDA
GPU. Without either, `from_pretrained` raises an ImportError deep in transformers after the tokenizer and the data
are ready; `attention_problem` says so in one line instead. `tunekit validate` warns (the config may be meant for
another machine), `tunekit train` refuses (exit 2, nothing created).
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version

FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"


def attention_problem(attn: str | None, flash_installed: bool, cuda_available: bool | None) -> str | None:
    """None when attention kernel `attn` can run here, else the one-line reason (`model.attn_implementation: ...`).

    `cuda_available` None means "not known" (validate does not import torch): only the package is judged then.
    Without a GPU the package does not matter (flash-attn has no CPU kernel), so that reason comes first.
    """
    if attn != "flash_attention_2":
        return None
    if cuda_available is False:
        return ("model.attn_implementation: flash_attention_2 needs a CUDA GPU, none is visible here; use auto")
    if not flash_installed:
        return (f"model.attn_implementation: flash_attention_2 needs the flash-attn package ({FLASH_ATTN_INSTALL}), "
                "not installed here; use auto")
    return None


def attention_problem_here(attn: str | None, probe_cuda: bool) -> str | None:
    """`attention_problem` with this machine's facts. probe_cuda=False keeps torch out (validate); torch is imported
    only when `attn` is flash_attention_2."""
    if attn != "flash_attention_2":
        return None
    return attention_problem(attn, flash_attn_installed(), cuda_available() if probe_cuda else None)


def flash_attn_installed() -> bool:
    """True when the flash-attn distribution provides the `flash_attn` module. Finds it without importing it (an
    import would load torch and the CUDA extension); flash-attn-4 also ships a `flash_attn` module, so the
    distribution's name is checked too, as transformers does."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        version("flash-attn")
    except PackageNotFoundError:
        return False
    return True


def cuda_available() -> bool:
    """torch's answer (imports torch: only for `train`, which imports it anyway)."""
    import torch

    return torch.cuda.is_available()
