"""`tunekit export`: a run in the shape a server wants.

    export_run(run_dir, out, fmt, dtype, max_shard_size, overwrite) -> out

  merged   LoRA/QLoRA: `tunekit merge` (QLoRA into the dequantized NF4 base, logit-checked) with --max-shard-size;
           full: the consolidated model from final/, re-saved in --dtype and shards. Either way the tokenizer keeps
           the chat template used in training and README.md is a model card built from config.yaml + summary.json.
  adapter  adapter_config.json + adapter_model.safetensors and nothing else: the directory layout that peft's
           PeftModel.from_pretrained and vLLM's multi-LoRA serving (`--lora-modules name=DIR`) load.

Like merge, export writes into OUT.tmp and renames, and refuses an existing OUT unless overwrite.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tunekit import rundir
from tunekit.errors import UserError
from tunekit.merge import (
    ADAPTER_FILES,
    DTYPES,
    Run,
    check_out,
    default_dtype,
    load_base_config,
    load_run_tokenizer,
    merge_run,
    open_run,
    save_model,
    staged_dir,
)

METHOD_TEXT = {
    "full": "full fine-tuning (every weight trained, DeepSpeed ZeRO)",
    "lora": "LoRA (low-rank adapters on a frozen base), merged into the base",
    "qlora": "QLoRA (low-rank adapters on a frozen 4-bit NF4 base), merged into the base",
}


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "merged", dtype: str | None = None,
               max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Export the run as `fmt` ("merged" or "adapter") into OUT; returns OUT.

    Raises UserError: not a finished run, no adapter (adapter format, or merged for a LoRA run), base not found,
    OUT exists without overwrite, failed merge check.
    """
    run = open_run(run_dir)
    if fmt == "adapter":
        return export_adapter(run, out, dtype, overwrite)
    if run.config.method == "full":
        return export_full(run, out, dtype, max_shard_size, overwrite)
    return merge_run(run_dir, out, dtype=dtype, base="dequantized", overwrite=overwrite, max_shard_size=max_shard_size)


def export_adapter(run: Run, out: str | os.PathLike, dtype: str | None, overwrite: bool) -> Path:
    """Copy the adapter (optionally cast to dtype) into OUT: exactly adapter_config.json + adapter_model.safetensors."""
    if not run.has_adapter:
        hint = " (a full fine-tuning run has no adapter: use --format merged)" if run.config.method == "full" else ""
        raise UserError(f"{run.final}: no adapter to export (needs {' + '.join(ADAPTER_FILES)}){hint}")
    out_dir = check_out(out, run, overwrite)
    load_base_config(run.config)  # an adapter is only usable with its base: fail now if it is gone
    with staged_dir(out_dir, overwrite) as tmp:
        shutil.copy2(run.final / "adapter_config.json", tmp / "adapter_config.json")
        weights = run.final / "adapter_model.safetensors"
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
    trust = run.config.model.trust_remote_code
    save_dtype = dtype or default_dtype(run.config, AutoConfig.from_pretrained(run.final, trust_remote_code=trust))
    model = AutoModelForCausalLM.from_pretrained(run.final, dtype=DTYPES[save_dtype], trust_remote_code=trust,
                                                 use_safetensors=True)
    tokenizer = load_run_tokenizer(run)
    with staged_dir(out_dir, overwrite) as tmp:
        save_model(model, tokenizer, tmp, max_shard_size)
        rundir.write_text_atomically(tmp / "README.md", model_card(run))
    print(f"model: {out_dir} ({save_dtype})")
    return out_dir


# ---------------------------------------------------------------- the model card


SUMMARY_LABELS = {  # summary.json key -> label, in the card's order; other scalar fields follow
    "steps": "optimizer steps",
    "train_loss_first": "train loss (first logged)",
    "train_loss_last": "train loss (last logged)",
    "eval_loss": "eval loss",
    "task_metric_before": "task metric before",
    "task_metric_after": "task metric after",
    "trainable_params": "trainable parameters",
    "total_params": "total parameters",
    "tokens_seen": "tokens seen",
    "wall_seconds": "wall time (s)",
}
SUMMARY_SKIP = {"method", "final_dir", "data", "task_metric_name"}


def model_card(run: Run, check: dict[str, Any] | None = None) -> str:
    """README.md: YAML front matter (base_model, library_name, tags) then base model, method and key
    hyperparameters, data, final metrics from summary.json, the merge check, and how to load it."""
    config = run.config.redacted()  # plain values, secret-looking ones replaced
    method = config["method"]
    base = config["model"]["name_or_path"]
    name = run.dir.resolve().name
    lines = [
        "---",
        f"base_model: {_yaml_scalar(base)}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {tag}" for tag in ("tunekit", method, "sft")],
        "---",
        "",
        f"# {name}",
        "",
        f"A fine-tune of `{base}` by {METHOD_TEXT[method]}, made with tunekit. A standalone model: it loads with "
        "`transformers` alone (no peft, no bitsandbytes).",
        "",
        "## Base model",
        "",
        f"- `{base}`" + (f" at revision `{config['model']['revision']}`" if config["model"]["revision"] else ""),
    ]
    if config["model"]["add_tokens"]:
        lines.append(f"- tokens added during training: {', '.join(f'`{t}`' for t in config['model']['add_tokens'])}")
    lines += ["", "## Method and hyperparameters", "", "| setting | value |", "|---|---|",
              *[f"| {key} | {_cell(value)} |" for key, value in hyperparameters(run).items()]]
    lines += ["", "## Data", "", *data_section(run)]
    lines += ["", "## Results", "", "From the run's summary.json.", "", "| metric | value |", "|---|---|",
              *[f"| {label} | {_cell(value)} |" for label, value in final_metrics(run.summary).items()]]
    if check is not None:
        lines += ["", "## Merge check", "",
                  f"Logits of this model vs the {check['reference']} on {len(check['prompts'])} prompts from "
                  f"{check['prompts_source']}: max abs difference **{check['max_abs_diff']:.3g}** "
                  f"(tolerance {check['tolerance']:.3g}, {check['dtype']}, merged into the {check['base']} base)."]
        for choice, diffs in check.get("qlora", {}).items():
            lines.append(f"- {choice} base: {diffs['vs_trained']:.3g} vs the trained model")
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "path/to/this/directory"',
              "tokenizer = AutoTokenizer.from_pretrained(path)  # carries the chat template used in training",
              "model = AutoModelForCausalLM.from_pretrained(path)",
              'messages = [{"role": "user", "content": "Hello"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))", "```", ""]
    return "\n".join(lines)


def hyperparameters(run: Run) -> dict[str, Any]:
    """The settings that define the run, flat and in reading order."""
    c = run.config
    t = c.training
    world = run.summary.get("world_size") or 1
    values: dict[str, Any] = {
        "method": c.method,
        "learning_rate": c.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_ratio": t.warmup_ratio,
        "max_steps" if t.max_steps > 0 else "num_train_epochs": t.max_steps if t.max_steps > 0 else t.num_train_epochs,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "effective batch (sequences)": t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
        "max_seq_len": c.data.max_seq_len,
        "packing": c.data.packing,
        "completion_only_loss": c.data.completion_only_loss,
        "weight_decay": t.weight_decay,
        "optim": t.optim,
        "precision": t.precision,
        "seed": t.seed,
    }
    if c.method in ("lora", "qlora"):
        values.update({"lora r": c.lora.r, "lora alpha": c.lora.lora_alpha, "lora dropout": c.lora.dropout,
                       "lora target_modules": ", ".join(c.lora.target_modules)})
    if c.method == "qlora":
        values.update({"4-bit quant_type": c.qlora.quant_type, "double_quant": c.qlora.double_quant,
                       "compute_dtype": c.qlora.compute_dtype})
    if c.deepspeed is not None:
        values["deepspeed zero stage"] = c.deepspeed.stage if c.deepspeed.config is None else "user config"
    return values


def data_section(run: Run) -> list[str]:
    """Sources (format, weight, examples and tokens from summary.json) and the eval split."""
    c = run.config.data
    stats = run.summary.get("data") or {}
    lines = ["| source | format | weight | examples | tokens | token share |", "|---|---|---|---|---|---|"]
    for source in c.sources:
        s = stats.get(source.path, {})
        lines.append(f"| `{source.path}` | {source.format} | {_cell(source.weight)} | {_cell(s.get('examples'))} | "
                     f"{_cell(s.get('tokens'))} | {_cell(s.get('token_share'))} |")
    held_out = f"`{c.eval_path}`" if c.eval_path else (f"{c.eval_fraction:.0%} of the first source" if c.eval_fraction
                                                         else "none")
    return lines + ["", f"Eval: {held_out}. Max sequence length {c.max_seq_len} tokens."]


def final_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Label -> value: the headline metrics first, then any other scalar the run recorded (e.g. forgetting)."""
    metrics = {label: summary[key] for key, label in SUMMARY_LABELS.items() if summary.get(key) is not None}
    if summary.get("task_metric_name"):
        metrics = {k.replace("task metric", summary["task_metric_name"]): v for k, v in metrics.items()}
    for key, value in summary.items():
        if key not in SUMMARY_LABELS and key not in SUMMARY_SKIP and isinstance(value, (int, float, str, bool)):
            metrics[key] = value
    return metrics


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _yaml_scalar(text: str) -> str:
    import yaml

    return yaml.safe_dump(text, default_style=None).strip().removesuffix("...").strip()
