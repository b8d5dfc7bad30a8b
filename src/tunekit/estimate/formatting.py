"""The estimate as text: one screen of buckets, fit, time and cost, and what would make a run that does not fit fit."""

from __future__ import annotations

from tunekit.estimate.memory import GB


def gb(value: float) -> str:
    """Bytes as "12.3 GB" (1e9 bytes)."""
    return f"{value / GB:.1f} GB"


def advice(result: dict) -> list[str]:
    """What would make a run that does not fit fit, biggest lever first."""
    if result["fits"]:
        return []
    tips = []
    per_device, assumptions = result["per_device"], result["assumptions"]
    if per_device["activations"] > 0.25 * per_device["total"]:
        if not assumptions["gradient_checkpointing"]:
            tips.append("enable training.gradient_checkpointing")
        tips.append("lower training.per_device_train_batch_size (raise gradient_accumulation_steps) or data.max_seq_len")
    for method, alt in result["alternatives"].items():
        if method != result["method"] and alt["fits"]:
            tips.append(f"use method {method} ({gb(alt['needed_bytes'])})")
    own = result["alternatives"][result["method"]]
    if own["gpus_needed"] and own["gpus_needed"] > result["gpus"]:
        same_stage = own["zero_stage"] == result["assumptions"]["zero_stage"] or result["zero"]["auto"]
        tips.append(f"use {own['gpus_needed']} GPUs" + ("" if same_stage else f" with deepspeed.stage {own['zero_stage']}"))
    return tips


def format_estimate(result: dict) -> str:
    """One screen: the buckets per GPU and for the job, fit, time and cost, the other methods, the assumptions."""
    a = result["assumptions"]
    share = result["trainable_params"] / result["params"]
    on_gpu = result["device"] == "cuda"
    where = (f"{result['gpus']} x {gb(result['gpu_memory_bytes'])} GPU" if on_gpu
             else f"{result['gpus']} process(es) sharing {gb(result['gpu_memory_bytes'])} RAM")
    lines = [
        f"{result['method']} on {result['model']} ({result['model_type']}), {where}",
        f"params {result['params']:,}   trainable {result['trainable_params']:,} ({share:.2%})",
        f"shape: {result['shape_source']}",
        *([f"lora adapts: {result['adapted']}; not adapted: {result['not_adapted'] or 'nothing'}"]
          if result.get("adapted") else []),
        "",
        f"  {'':<13}{'per GPU':>10}{'all GPUs':>11}",
    ]
    notes = {
        "activations": f"micro-batch {a['micro_batch']} x {a['seq_len']} tokens, checkpointing "
                       f"{'on' if a['gradient_checkpointing'] else 'off'}",
        "optimizer": a["optimizer"] + (" + fp32 master" if a["master_weights"] else ""),
        "overhead": a["overhead"],
        "weights": f"ZeRO stage {a['zero_stage']}" if a["zero_stage"] else (
            "fp32 under autocast (the plain Trainer's own master copy)"
            if result["method"] == "full" and not result["zero"]["deepspeed"] and a["precision"] != "fp32" else ""),
    }
    if a.get("objective", "sft") != "sft":
        notes["activations"] += ", x2 sequences (chosen + rejected)"
    if a.get("reference"):
        notes["reference"] = f"dpo.reference {a['reference']}"
        if a["reference"].startswith("model"):
            notes["activations"] += " + the reference's no-grad forward"
    for key in ("weights", "reference", "gradients", "optimizer", "activations", "overhead", "total"):
        if key not in result["per_device"]:  # reference: only DPO has one
            continue
        per_device, job = gb(result["per_device"][key]), gb(result["bytes"][key])
        lines.append(f"  {key:<13}{per_device:>10}{job:>11}  {notes.get(key, '')}")
    if result["cpu_offload_bytes"]:
        lines.append(f"  {'cpu offload':<13}{'':>10}{gb(result['cpu_offload_bytes']):>11}  host memory")
    zero = result["zero"]
    lines.append(f"  {'deepspeed':<13}{zero['label']}" + (f" (stage auto: {zero['reason']})" if zero["auto"] else
                                                          f" ({zero['reason']})"))
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    scope = "per GPU" if on_gpu else "in all"
    lines += ["", f"{verdict}: {gb(result['needed_bytes'])} {scope} of {gb(result['gpu_memory_bytes'])}"]
    lines += [f"  to fit: {tip}" for tip in advice(result)]
    if result["tokens"] is None:
        lines.append(f"time/cost: {a['tokens']}")
    else:
        lines.append(f"time: {result['tokens'] / 1e6:,.1f}M tokens -> {result['train_hours']:.2f} h on {result['gpus']} "
                     f"GPU(s) = {result['gpu_hours']:.1f} GPU-h -> ${result['cost_usd']:,.2f} "
                     f"at ${a['usd_per_gpu_hour']:g}/GPU-h")
        lines.append(f"  tokens: {a['tokens']}")
        if a.get("reference_time"):
            lines.append(f"  reference: {a['reference_time']}")
        lines.append(f"  throughput: {a['throughput']}")
    lines.append("per method, same batch:")
    for method, alt in result["alternatives"].items():
        if not on_gpu:
            needs = "fits" if alt["fits"] else "does not fit"
        elif alt["gpus_needed"] is None:
            needs = "fits on no number of these GPUs"
        else:
            plural = "s" if alt["gpus_needed"] > 1 else ""
            needs = f"needs {alt['gpus_needed']} GPU{plural} with {alt['zero']}"
        lines.append(f"  {method:<6}{gb(alt['needed_bytes']):>10} {scope} here; {needs}")
    return "\n".join(lines)
