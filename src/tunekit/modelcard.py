"""The README.md model card that merge and export write next to a model.

    model_card(run, check=None) -> huggingface_hub.ModelCard

The metadata block is huggingface_hub's `ModelCardData` (base_model, library_name, pipeline_tag, tags: what the Hub
indexes); the body is built from the run directory: config.yaml (method, hyperparameters, data), resolved.json (what
"auto" stood for in training, the library versions that trained it), summary.json (results) and, after a merge, the
logit check. Nothing here loads a model.
"""

from __future__ import annotations

from typing import Any

from tunekit.config import LoraRunConfig, QloraRunConfig
from tunekit.rundir import Run

METHOD_TEXT = {
    "full": "full fine-tuning (every weight trained, DeepSpeed ZeRO)",
    "lora": "LoRA (low-rank adapters on a frozen base), merged into the base",
    "qlora": "QLoRA (low-rank adapters on a frozen 4-bit NF4 base), merged into the base",
}
SUMMARY_LABELS = {  # summary.json key -> label, in the card's order; other scalar fields follow
    "steps": "optimizer steps",
    "train_loss_first": "train loss (first logged)",
    "train_loss_last": "train loss (last logged)",
    "eval_loss": "eval loss",
    "task_metric_before": "task metric before",
    "task_metric_after": "task metric after",
    "preference_pairs_scored": "held-out preference pairs scored",
    "preference_accuracy_before": "preference accuracy before (chosen more likely than rejected)",
    "preference_accuracy_after": "preference accuracy after",
    "reward_margin_after": "reward margin after (implicit reward vs the base)",
    "reward_accuracy_after": "reward accuracy after (chosen gained more than rejected)",
    "trainable_params": "trainable parameters",
    "total_params": "total parameters",
    "tokens_seen": "tokens seen",
    "wall_seconds": "wall time (s)",
}
SUMMARY_SKIP = {"method", "objective", "final_dir", "data", "task_metric_name"}  # method, objective: in the settings
# What trained the model, after the method: config.objective -> text.
OBJECTIVE_TEXT = {
    "sft": "supervised fine-tuning (SFT)",
    "dpo": "Direct Preference Optimization (DPO) on chosen/rejected pairs",
    "orpo": "Odds Ratio Preference Optimization (ORPO) on chosen/rejected pairs",
}
CARD_VERSIONS = ("tunekit", "torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes")  # in the card
# The Hub's model-card layout: the metadata block, then the markdown body.
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


def model_card(run: Run, check: dict[str, Any] | None = None):
    """The card: metadata, then base model, method and key hyperparameters, the training setup, data, final metrics
    from summary.json, the merge check (when `check`), and how to load it. `str(card)` is README.md."""
    from huggingface_hub import ModelCard, ModelCardData

    config = run.config
    data = ModelCardData(base_model=config.model.name_or_path, library_name="transformers",
                         pipeline_tag="text-generation", tags=["tunekit", config.method, config.objective])
    return ModelCard.from_template(data, template_str=TEMPLATE, body=card_body(run, check))


def card_body(run: Run, check: dict[str, Any] | None) -> str:
    config = run.config
    base = config.model.name_or_path
    lines = [
        f"# {run.dir.resolve().name}",
        "",
        f"A fine-tune of `{base}` by {METHOD_TEXT[config.method]}, made with tunekit. Objective: "
        f"{objective_text(config)}. A standalone model: it loads with `transformers` alone (no peft, no bitsandbytes).",
        "",
        "## Base model",
        "",
        f"- `{base}`" + (f" at revision `{config.model.revision}`" if config.model.revision else ""),
    ]
    if config.model.add_tokens:
        lines.append(f"- tokens added during training: {', '.join(f'`{t}`' for t in config.model.add_tokens)}")
    lines += ["", "## Method and hyperparameters", "", *table(("setting", "value"), hyperparameters(run))]
    lines += ["", "## Training setup", "", *training_setup(run)]
    lines += ["", "## Data", "", *data_section(run)]
    lines += ["", "## Results", "", "From the run's summary.json.", "",
              *table(("metric", "value"), final_metrics(run.summary))]
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


def objective_text(config) -> str:
    """What trained the model, with the objective's strength: "Direct Preference Optimization (...), beta 0.1"."""
    text = OBJECTIVE_TEXT[config.objective]
    if config.objective == "dpo":
        return f"{text}, beta {config.dpo.beta:g} ({config.dpo.loss_type} loss)"
    if config.objective == "orpo":
        return f"{text}, beta (lambda) {config.orpo.beta:g}"
    return text


def hyperparameters(run: Run) -> dict[str, Any]:
    """The settings that define the run, flat and in reading order ("auto" shown with what it stood for)."""
    c, resolved = run.config, run.resolved
    t = c.training
    world = resolved.world_size if resolved is not None else (run.summary.get("world_size") or 1)
    values: dict[str, Any] = {
        "method": c.method,
        "objective": c.objective,
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
        "precision": f"auto ({resolved.precision})" if t.precision == "auto" and resolved is not None else t.precision,
        "seed": t.seed,
    }
    if c.objective == "dpo":
        values.update({"dpo beta": c.dpo.beta, "dpo loss_type": c.dpo.loss_type, "dpo reference": c.dpo.reference})
        if c.dpo.label_smoothing:
            values["dpo label_smoothing"] = c.dpo.label_smoothing
    elif c.objective == "orpo":
        values["orpo beta (lambda)"] = c.orpo.beta
    if isinstance(c, LoraRunConfig):
        values.update({"lora r": c.lora.r, "lora alpha": c.lora.lora_alpha, "lora dropout": c.lora.dropout,
                       "lora target_modules": c.lora.describe_targets()})
    if isinstance(c, QloraRunConfig):
        values.update({"4-bit quant_type": c.qlora.quant_type, "double_quant": c.qlora.double_quant,
                       "compute_dtype": c.qlora.compute_dtype})
    if resolved is not None and resolved.zero_stage is not None:
        values["deepspeed zero stage"] = resolved.zero_stage
    elif c.deepspeed is not None:  # a run from before resolved.json: its summary's record, else what the config says
        values["deepspeed zero stage"] = run.summary.get(
            "zero_stage", c.deepspeed.stage if c.deepspeed.config is None else "user config")
    return values


def training_setup(run: Run) -> list[str]:
    """What "auto" stood for where the run trained, and the library versions that trained it (resolved.json)."""
    r = run.resolved
    if r is None:
        return ["Not recorded: the run was written by a tunekit release before resolved.json."]
    rows = {"device": r.device, "processes (world size)": r.world_size, "precision": r.precision,
            "weights loaded as": r.load_dtype,
            "deepspeed zero stage": r.zero_stage if r.zero_stage is not None else "none",
            "attention": r.attn_implementation}
    versions = ", ".join(f"{name} {r.versions[name]}" for name in ("python", *CARD_VERSIONS) if name in r.versions)
    return [*table(("setting", "value"), rows), "", f"Trained with {versions}."]


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


def table(header: tuple[str, str], rows: dict[str, Any]) -> list[str]:
    """A two-column markdown table."""
    return [f"| {header[0]} | {header[1]} |", "|---|---|",
            *[f"| {key} | {_cell(value)} |" for key, value in rows.items()]]


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
