"""`tunekit export`: a run in the shape a server wants.

    export_run(run_dir, out, fmt, dtype, max_shard_size, overwrite) -> out

  merged   LoRA/QLoRA: `tunekit merge` (QLoRA into the dequantized NF4 base, logit-checked) with --max-shard-size;
           full: the consolidated model from final/, re-saved in --dtype and shards. Either way the tokenizer keeps
           the chat template used in training and README.md is a model card (modelcard.py) built from the run
           directory: config.yaml, resolved.json and summary.json.
  adapter  adapter_config.json + adapter_model.safetensors and nothing else: the directory layout that peft's
           PeftModel.from_pretrained and vLLM's multi-LoRA serving (`--lora-modules name=DIR`) load.

Like merge, export writes into OUT.tmp and renames, and refuses an existing OUT unless overwrite.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tunekit import rundir
from tunekit.errors import UserError
from tunekit.merge import (
    DTYPES,
    check_adapter,
    default_dtype,
    load_base_config,
    load_run_tokenizer,
    loading,
    merge,
    save_model,
    training_settings,
)
from tunekit.modelcard import model_card
from tunekit.rundir import ADAPTER_FILES, Run, check_out, staged_dir


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "merged", dtype: str | None = None,
               max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Export the run as `fmt` ("merged" or "adapter") into OUT; returns OUT.

    Raises UserError: not a finished run, no adapter (adapter format, or merged for a LoRA run), the base, model,
    tokenizer or adapter cannot be loaded, OUT exists without overwrite, failed merge check.
    """
    run = rundir.open_run(run_dir)
    if fmt == "adapter":
        return export_adapter(run, out, dtype, overwrite)
    if run.config.method == "full":
        return export_full(run, out, dtype, max_shard_size, overwrite)
    return merge(run, out, dtype=dtype, base="dequantized", overwrite=overwrite, max_shard_size=max_shard_size)


def export_adapter(run: Run, out: str | os.PathLike, dtype: str | None, overwrite: bool) -> Path:
    """Copy the adapter (optionally cast to dtype) into OUT: exactly adapter_config.json + adapter_model.safetensors."""
    if not run.has_adapter:
        hint = " (a full fine-tuning run has no adapter: use --format merged)" if run.config.method == "full" else ""
        raise UserError(f"{run.final}: no adapter to export (needs {' + '.join(ADAPTER_FILES)}){hint}")
    out_dir = check_out(out, run, overwrite)
    load_base_config(run.config)  # an adapter is only usable with its base: fail now if it is gone
    check_adapter(run)  # ...and with files peft and safetensors can read
    weights = run.final / "adapter_model.safetensors"
    with staged_dir(out_dir, overwrite) as tmp:
        shutil.copy2(run.final / "adapter_config.json", tmp / "adapter_config.json")
        if dtype is None:
            shutil.copy2(weights, tmp / weights.name)
        else:
            cast_safetensors(weights, tmp / weights.name, dtype)
    for note in adapter_notes(run, weights):
        print(f"note: {note}", file=sys.stderr)
    print(f"adapter: {out_dir} (base: {run.config.model.name_or_path})")
    return out_dir


def cast_safetensors(src: Path, dst: Path, dtype: str) -> None:
    """Re-save src with its floating tensors cast to dtype (peft's key names and metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors = {key: t.to(DTYPES[dtype]) if t.is_floating_point() else t for key, t in tensors.items()}
    save_file(tensors, str(dst), metadata=metadata)


def adapter_notes(run: Run, weights: Path) -> list[str]:
    """What the user must know to serve this adapter correctly."""
    from safetensors import safe_open

    notes = []
    with safe_open(str(weights), framework="pt") as handle:
        rows = {handle.get_slice(key).get_shape()[0] for key in handle.keys() if "lora_" not in key
                and key.endswith(".weight")}
    if rows:
        notes.append(f"the adapter carries whole embedding/lm_head layers ({max(rows)} rows: the vocabulary grew during "
                     f"training): resize the base's embeddings to {max(rows)} before PeftModel.from_pretrained, and "
                     f"use the tokenizer in {run.final}; vLLM's LoRA serving does not support adapters that add tokens "
                     "(vllm-project/vllm#23540, #36501): use --format merged for vLLM")
    if run.config.method == "qlora":
        notes.append("trained against the 4-bit NF4 base: serve it on that base quantized the same way, or expect the "
                     "difference `tunekit merge --base original` reports")
    return notes


def export_full(run: Run, out: str | os.PathLike, dtype: str | None, max_shard_size: str, overwrite: bool) -> Path:
    """A full fine-tuning run's consolidated final/ model, re-saved in dtype and shards, with tokenizer and card."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (run.final / "config.json").is_file():
        raise UserError(f"{run.final}: no consolidated model (config.json) to export")
    out_dir = check_out(out, run, overwrite)
    training_settings(run)  # warns when the run has no record (the dtype then comes from final/config.json)
    trust = run.config.model.trust_remote_code
    with loading(f"model in {run.final}: cannot load"):
        stored = AutoConfig.from_pretrained(run.final, trust_remote_code=trust)
    save_dtype = dtype or default_dtype(run, stored)
    with loading(f"model in {run.final}: cannot load"):
        # No attention kernel: nothing runs forward here, the weights are only re-saved.
        model = AutoModelForCausalLM.from_pretrained(run.final, dtype=DTYPES[save_dtype], trust_remote_code=trust,
                                                     use_safetensors=True)
    tokenizer = load_run_tokenizer(run)
    with staged_dir(out_dir, overwrite) as tmp:
        save_model(model, tokenizer, tmp, max_shard_size)
        rundir.write_text_atomically(tmp / "README.md", str(model_card(run)))
    print(f"model: {out_dir} ({save_dtype})")
    return out_dir
