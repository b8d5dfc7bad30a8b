"""LoRA rank spectrum: are the adapters using the rank they were given?

The seeds: "validate your rank choice by looking at the singular value spectrum of your trained LoRA matrices. If most
singular values are near zero, you have higher rank than needed. If the distribution is flat, you may need higher
rank." Each adapter's update is ΔW = scaling·B@A (B: [out, r], A: [r, in]); its singular values are computed from two
thin QRs and an r×r SVD, so a 4096×4096 projection costs O((out+in)·r²), never the out×in product.

Pure functions (`singular_values`, `effective_rank`, `adapter_spectra`, `summarize_spectra`) carry the logic;
`RankSpectrumCallback` only connects them to the Trainer's evaluations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Verdict thresholds on effective_rank / r (mean over the modules of one layer type). Below COLLAPSED_FRACTION the
# update lives in a few directions: the rank is set higher than the task needs. Above FLAT_FRACTION every direction
# carries about the same energy: the adapter may want more rank than it has.
COLLAPSED_FRACTION = 0.25
FLAT_FRACTION = 0.90
# An adapter whose singular values sum to less than this is still at its init (peft zeroes B): not yet a spectrum.
ZERO_TOLERANCE = 1e-12


def singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of scaling·B@A, descending, shape [r], float32 on the CPU.

    lora_A: [r, in], lora_B: [out, r] (conv adapters are flattened to these shapes). With B = Qb·Rb and Aᵀ = Qa·Ra
    (thin QR, Q orthonormal), B@A = Qb·(Rb·Raᵀ)·Qaᵀ, so the singular values of B@A are those of the small core Rb·Raᵀ.
    When out or in is smaller than r the missing values are exact zeros (padded so the result always has r entries).
    """
    rank = lora_A.shape[0]
    a = lora_A.detach().reshape(rank, -1).float()  # [r, in]
    b = lora_B.detach().reshape(lora_B.shape[0], -1).float()  # [out, r]
    if b.shape[1] != rank:
        raise ValueError(f"lora_B has {b.shape[1]} columns but lora_A has {rank} rows")
    r_b = torch.linalg.qr(b, mode="reduced").R  # [min(out, r), r]
    r_a = torch.linalg.qr(a.T, mode="reduced").R  # [min(in, r), r]
    core = r_b @ r_a.T  # [min(out, r), min(in, r)]
    values = torch.linalg.svdvals(core) * abs(float(scaling))
    padded = torch.zeros(rank, dtype=torch.float32)
    padded[: values.numel()] = values.cpu()
    return padded


def effective_rank(sv: Sequence[float] | torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp(H(p)) with p = sv / sum(sv), H the Shannon entropy in nats.

    Returns a float in [1, len(sv)]: 1.0 for a rank-1 update, len(sv) when all values are equal; 0.0 when every
    value is zero (an untrained adapter has no spectrum).
    """
    values = [abs(float(v)) for v in (sv.tolist() if isinstance(sv, torch.Tensor) else sv)]
    total = sum(values)
    if total <= ZERO_TOLERANCE:
        return 0.0
    entropy = -sum(v / total * math.log(v / total) for v in values if v > 0)  # 0·log 0 = 0
    return math.exp(entropy)


def _lora_layers(model: torch.nn.Module, adapter: str) -> Iterable[tuple[str, torch.nn.Module]]:
    """(name, peft LoraLayer) for every module that carries `adapter` as a lora_A/lora_B pair (linear or conv)."""
    from peft.tuners.lora import LoraLayer  # peft only where adapters exist

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A and adapter in module.lora_B:
            yield name, module


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full tensors for the block: ZeRO-3 partitions parameters (they carry `ds_id` and hold a 0-size shard),
    so gather them — a collective, every rank must enter it in the same order. A no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only under ZeRO-3, where it is already loaded

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def adapter_spectra(model: torch.nn.Module, adapter: str = "default") -> dict[str, list[float]]:
    """Singular values of every LoRA update in a peft model: {module name: [r] floats, descending}.

    Names drop peft's `base_model.model.` wrapper prefix (e.g. `model.layers.0.self_attn.q_proj`). Under ZeRO-3 every
    rank must call this (the gathers are collective); every rank gets the same result. Returns {} for a model
    without LoRA layers (full fine-tuning).
    """
    spectra = {}
    for name, layer in _lora_layers(model, adapter):
        weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        with _gathered([weight_a, weight_b]):
            values = singular_values(weight_a, weight_b, layer.scaling[adapter])
        spectra[name.removeprefix("base_model.model.")] = values.tolist()
    return spectra


def layer_type(module_name: str) -> str:
    """`model.layers.3.self_attn.q_proj` → `q_proj`: the last name component groups modules across layers."""
    return module_name.rsplit(".", 1)[-1]


def verdict(fraction: float) -> str:
    """'collapsed', 'flat' or 'ok' for a mean effective_rank / r (see COLLAPSED_FRACTION, FLAT_FRACTION)."""
    if fraction < COLLAPSED_FRACTION:
        return "collapsed"
    if fraction > FLAT_FRACTION:
        return "flat"
    return "ok"


def summarize_spectra(spectra: dict[str, Sequence[float]]) -> dict[str, dict]:
    """Per layer type: {"r", "effective_rank" (mean over modules), "fraction" (mean effective_rank/r), "verdict",
    "modules" (how many were averaged), "untrained" (how many were skipped because B@A is still zero)}.

    Adapters still at their init (peft starts B at zero, so every singular value is 0) are skipped; a layer type with
    only such adapters is left out. "r" is the largest rank of the type (rank_pattern may give modules different r);
    the verdict uses each module's own r through the mean fraction.
    """
    groups: dict[str, list[Sequence[float]]] = {}
    for name, values in spectra.items():
        groups.setdefault(layer_type(name), []).append(values)
    summary = {}
    for kind, members in sorted(groups.items()):
        trained = [values for values in members if sum(abs(float(v)) for v in values) > ZERO_TOLERANCE]
        if not trained:
            continue
        ranks = [effective_rank(values) for values in trained]
        fraction = sum(rank / len(values) for rank, values in zip(ranks, trained)) / len(trained)
        summary[kind] = {
            "r": max(len(values) for values in trained),
            "effective_rank": sum(ranks) / len(ranks),
            "fraction": fraction,
            "verdict": verdict(fraction),
            "modules": len(trained),
            "untrained": len(members) - len(trained),
        }
    return summary


class RankSpectrumCallback(TrainerCallback):
    """At each evaluation: the LoRA spectra of the model, summarized per layer type.

    `history` holds {"step", "summary"} per evaluation and `last_spectra` the full spectra of the latest one (for
    the report's plot). The mean effective rank of each layer type is logged as `eval_lora_effective_rank_<type>`
    through `log`, the Trainer's own `log` (handed over by train.build_trainer): the one way into both
    `state.log_history` and the trackers. Warns once per (layer type, verdict) when a type is collapsed or flat. At
    train end, rank 0 writes `<output_dir>/spectrum.json` with both. Every rank computes (ZeRO-3 gathers are
    collective) and logs, as every rank runs `Trainer.log`.
    """

    def __init__(self, adapter: str = "default") -> None:
        self.adapter = adapter
        self.history: list[dict] = []
        self.last_spectra: dict[str, list[float]] = {}
        self.log: Callable[[dict[str, float]], None] | None = None  # Trainer.log, set by train.build_trainer
        self._warned: set[tuple[str, str]] = set()

    def summary_fields(self) -> dict:
        """Effective rank and verdict per layer type at the last evaluation (empty before any)."""
        if not self.history:
            return {}
        last = self.history[-1]["summary"]
        return {"lora_effective_rank": {kind: round(item["effective_rank"], 2) for kind, item in last.items()},
                "lora_rank_verdict": {kind: item["verdict"] for kind, item in last.items()}}

    def on_evaluate(self, args, state, control, **kwargs):
        model = kwargs.get("model")
        if model is None:
            return
        spectra = adapter_spectra(model, self.adapter)
        if not spectra:  # full fine-tuning: nothing to watch
            return
        if self.log is None:
            raise RuntimeError("RankSpectrumCallback.log is not set: give it the Trainer's log (train.build_trainer)")
        summary = summarize_spectra(spectra)
        self.last_spectra = spectra
        self.history.append({"step": state.global_step, "summary": summary})
        if summary:  # empty while every adapter is still at its init
            # In eval mode (see forgetting.ForgettingCallback): SFTTrainer.log adds nothing of its own to this entry.
            self.log({f"eval_lora_effective_rank_{kind}": item["effective_rank"] for kind, item in summary.items()})
        if state.is_world_process_zero:
            self._report(state.global_step, summary)

    def _report(self, step: int, summary: dict[str, dict]) -> None:
        ranks = ", ".join(f"{kind} {item['effective_rank']:.1f}/{item['r']}" for kind, item in summary.items())
        logger.info("step %d: LoRA effective rank %s", step, ranks)
        for kind, item in summary.items():
            key = (kind, item["verdict"])
            if item["verdict"] == "ok" or key in self._warned:
                continue
            self._warned.add(key)
            if item["verdict"] == "collapsed":
                advice = f"below {COLLAPSED_FRACTION:.0%} of r: the rank is higher than the task needs, consider a lower r"
            else:
                advice = f"above {FLAT_FRACTION:.0%} of r: every direction is used, consider a higher r"
            logger.warning(
                "step %d: LoRA %s effective rank %.1f of r=%d is %s (%s)",
                step, kind, item["effective_rank"], item["r"], item["verdict"], advice,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.history:
            self.save(Path(args.output_dir) / "spectrum.json")

    def save(self, path: Path) -> Path:
        """Write {"history", "last_spectra"} as JSON to `path`; returns it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"history": self.history, "last_spectra": self.last_spectra}, indent=1))
        return path
