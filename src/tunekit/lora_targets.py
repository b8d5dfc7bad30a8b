"""What LoRA adapts on a model: peft's targets for `lora.target_modules` (used by the backend that builds the adapters
and by the estimate that counts them on the meta device, so both see the same layers)."""

from __future__ import annotations

from tunekit.config import ALL_LINEAR


def peft_targets(model, target_modules: str | list[str]) -> tuple[str | list[str], list[str] | None]:
    """peft's (target_modules, target_parameters) for lora.target_modules on `model`.

    all-linear is peft's own "all-linear" (every nn.Linear and Conv1D but the output head, whatever the family calls
    them) plus the MoE experts that transformers 5 stores as fused 3-D parameters ([experts, out, in]: Qwen3-MoE's
    and Mixtral's mlp.experts.gate_up_proj / down_proj), which no Linear holds: peft adapts them as parameters,
    rank r per expert. Left out, an MoE model would train only its attention. A list of names is passed as it is.
    """
    if target_modules != ALL_LINEAR:
        return list(target_modules), None
    fused = sorted({_layer_relative(name) for name, param in model.named_parameters()
                    if param.dim() == 3 and name.rsplit(".", 1)[-1] != "weight"})
    return ALL_LINEAR, fused or None


def _layer_relative(name: str) -> str:
    """model.layers.0.mlp.experts.gate_up_proj -> mlp.experts.gate_up_proj: one target for every layer (peft matches
    target_parameters by suffix)."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbered[-1] + 1:]) if numbered else name


def unmatched_targets(module_names: list[str], target_modules: str | list[str]) -> list[str]:
    """The names in an explicit target list that match no module (peft's rule: the full dotted name or its tail after
    a dot). peft itself fails only when none matches; tunekit wants every name to mean something. all-linear: none."""
    if target_modules == ALL_LINEAR:
        return []
    return [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
