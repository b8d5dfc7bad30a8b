"""Full, LoRA or QLoRA? The seeds' decision rules, made consistent, on the estimate's byte and FLOP model.

The seed's `recommend_fine_tuning_method` computed GPU counts and hours it never used, ignored `task_specific` and
the budget, and let rule order decide silently. Here each rule either orders the methods (objective, variants) or
excludes one with a stated reason (hardware, budget); the recommendation is the first method left.
Memory, GPU counts, hours and cost come from the estimate's byte model (estimate/memory.py: memory_bytes, min_gpus)
and time model (estimate/cost.py: training_flops, training_hours) on a Llama-shaped model guessed from the parameter
count, so `recommend` and `estimate` agree. No torch import here.
"""

from __future__ import annotations

from typing import Any

from tunekit.config import METHODS, LoraConfig
from tunekit.errors import UserError
from tunekit.estimate.cost import (
    DEFAULT_MFU,
    DEFAULT_USD_PER_GPU_HOUR,
    PEAK_TFLOPS_A100_BF16,
    training_flops,
    training_hours,
)
from tunekit.estimate.memory import BYTES_PER_PARAM_ADAPTER, BYTES_PER_PARAM_BF16, GB, memory_bytes, min_gpus

OBJECTIVES = ("instruction", "domain_knowledge", "task_specific")
# Seed: "more than 10M high-quality training examples for a specific task: consider full fine-tuning; below 1M,
# PEFT methods typically match or approach full fine-tuning quality".
FULL_FT_MIN_EXAMPLES = 10_000_000
# Seed rule 3: more than 3 variants of one base strongly favours adapters (one base + small files, hot-swappable).
MAX_VARIANTS_FOR_FULL = 3
# Seed (001): under ~500M parameters LoRA's memory savings matter little and full FT is straightforward.
SMALL_MODEL_PARAMS = 0.5e9

# Cost assumptions: the seeds' cost table is "50K examples, 3 epochs"; 512 tokens is a typical instruction example.
EPOCHS = 3
AVG_TOKENS_PER_EXAMPLE = 512
# Fit assumptions: the smallest step that must fit is one row of the longest length (2048 tokens) with gradient
# checkpointing on; a larger batch comes from gradient accumulation, not memory.
FIT_MICRO_BATCH = 1
FIT_SEQ_LEN = 2048
# A Llama-3-style 128K vocabulary: its fp32 logits are a real share of activation memory, so assume the big one.
VOCAB_SIZE = 128_256
# How each method is laid out over several GPUs in tunekit: full under ZeRO-3; LoRA shards its frozen base with
# ZeRO-3 only when one GPU cannot hold it; QLoRA cannot shard 4-bit weights, so each GPU needs the whole base.
ZERO_STAGE = {"full": 3, "lora": 3, "qlora": 0}


def shape_from_size(params: float, method: str, lora: LoraConfig | None = None) -> dict[str, Any]:
    """A Llama-shaped stand-in for a model of `params` parameters, in count_params' format.

    Llama proportions: depth = width/128 (8B: 4096/32, 70B: 8192/80), SwiGLU MLP 3.5x wide, head_dim 128, four
    query heads per KV head, untied embeddings. Width solves params = layers * 13 h^2 + 2 * vocab * h.
    """
    lora = lora if lora is not None else LoraConfig()
    low, high = 16.0, 1e6
    for _ in range(100):  # bisection: the parameter count grows monotonically with the width
        h = (low + high) / 2
        low, high = (h, high) if h / 128 * 13 * h * h + 2 * VOCAB_SIZE * h < params else (low, h)
    hidden = max(64, int(h))
    layers = max(1, round(hidden / 128))
    heads = max(1, hidden // 128)
    head_dim = hidden // heads
    kv = max(1, heads // 4) * head_dim
    inter = int(3.5 * hidden)
    embeddings = min(2 * VOCAB_SIZE * hidden, params)
    # (in_features, out_features) of each projection in one decoder layer.
    linears = {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    names = list(linears) if lora.all_linear else lora.target_modules  # all-linear: every projection of the layer
    adapted = [linears[name] for name in names if name in linears]
    lora_params = layers * lora.r * sum(i + o for i, o in adapted)
    return {
        "model_type": "llama (shape guessed from size)",
        "params": int(params),
        "lora_params": lora_params,
        "new_token_params": 0,
        "trainable_params": int(params) if method == "full" else lora_params,
        "linear_params": int(params - embeddings),
        "matmul_params": int(params - embeddings / 2),  # the input embedding is a lookup, the lm_head a matmul
        "largest_module_params": int(max((params - embeddings) / layers, embeddings / 2)),
        "lora_input_features": layers * sum(i for i, _ in adapted),
        "hidden_size": hidden,
        "num_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv // head_dim,
        "head_dim": head_dim,
        "vocab_size": VOCAB_SIZE,
        "gated_mlp": True,
        "tied_embeddings": False,
    }


def recommend(model_size_b: float, gpus: int, gpu_memory_gb: float = 80.0, *, examples: int, objective: str,
              variants: int = 1, budget_usd: float | None = None,
              usd_per_gpu_hour: float = DEFAULT_USD_PER_GPU_HOUR, epochs: float = EPOCHS,
              avg_tokens_per_example: int = AVG_TOKENS_PER_EXAMPLE) -> dict[str, Any]:
    """Recommend "full", "lora" or "qlora" for fine-tuning a `model_size_b`-billion model on `gpus` GPUs.

    Returns {"recommendation", "feasible" (False when even the pick does not fit the GPUs or the budget),
    "reasons" (list of sentences), "gpus_needed", "memory_gb" (one GPU, unsharded), "gpu_hours", "hours" (wall, on
    the GPUs it would use), "cost_usd", "storage_gb", "excluded" ({method: reason}), "assumptions"}; the per-method
    values are dicts keyed "full", "lora", "qlora". Raises UserError on impossible inputs.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
    if model_size_b <= 0 or gpus < 1 or gpu_memory_gb <= 0 or examples < 1 or variants < 1:
        raise UserError("model size, GPUs, GPU memory, examples and variants must all be positive")
    params = model_size_b * 1e9
    memory = gpu_memory_gb * GB
    lora = LoraConfig()  # tunekit's defaults: r=16 on every linear projection, dropout 0.05
    tokens = examples * epochs * avg_tokens_per_example

    gpus_needed, memory_gb, gpu_hours, hours, cost = {}, {}, {}, {}, {}
    shapes = {method: shape_from_size(params, method, lora) for method in METHODS}
    for method, shape in shapes.items():
        settings = dict(
            method=method, device="cuda", precision="bf16", optim="adamw_torch", micro_batch=FIT_MICRO_BATCH,
            seq_len=FIT_SEQ_LEN, gradient_checkpointing=True, lora_dropout=lora.dropout, double_quant=True,
        )
        gpus_needed[method] = min_gpus(shape, memory, zero_stage=ZERO_STAGE[method], **settings)
        memory_gb[method] = memory_bytes(shape, gpus=1, **settings)["job"]["total"] / GB
        flops = training_flops(shape, method=method, tokens=tokens, seq_len=avg_tokens_per_example,
                               gradient_checkpointing=True)
        gpu_hours[method] = training_hours(flops, method=method, gpus=1)  # GPU-hours: the same on any GPU count
        # Wall time: data parallel over all the GPUs you have, or over the count the method needs.
        hours[method] = gpu_hours[method] / max(gpus, gpus_needed[method] or gpus)
        cost[method] = gpu_hours[method] * usd_per_gpu_hour

    # Storage: a full FT variant is a whole bf16 model; a LoRA variant is an fp32 adapter on one shared base.
    base_gb = params * BYTES_PER_PARAM_BF16 / GB
    full_gb = variants * base_gb
    adapters_gb = variants * shapes["lora"]["lora_params"] * BYTES_PER_PARAM_ADAPTER / GB

    order, reasons = _order_by_objective(objective, examples, model_size_b)
    if variants > MAX_VARIANTS_FOR_FULL:
        order = [m for m in order if m != "full"] + ["full"]
        reasons.append(
            f"{variants} variants: full fine-tuning stores {variants} x {base_gb:.0f} GB = {full_gb:.0f} GB of models; "
            f"LoRA stores one {base_gb:.0f} GB base + {variants} x {adapters_gb / variants * 1000:.0f} MB adapters = "
            f"{base_gb + adapters_gb:.1f} GB, and the adapters hot-swap on one server."
        )
        if objective == "domain_knowledge":
            reasons.append("For new knowledge plus many variants: full fine-tune once on the domain corpus, "
                           "then train the variants as LoRA adapters on that model.")

    excluded = {}
    for method in METHODS:
        if gpus_needed[method] is None:
            excluded[method] = (f"{method} does not fit: it needs {memory_gb[method]:.0f} GB on one GPU "
                                f"(4-bit weights cannot be sharded) and a GPU has {gpu_memory_gb:g} GB.")
        elif gpus_needed[method] > gpus:
            excluded[method] = (f"{method} needs {gpus_needed[method]} x {gpu_memory_gb:g} GB GPUs "
                                f"({memory_gb[method]:.0f} GB unsharded) but you have {gpus}.")
    fitting = [m for m in METHODS if m not in excluded]
    if budget_usd is not None:
        for method in fitting:
            if cost[method] > budget_usd:
                excluded[method] = (f"{method} costs ~${cost[method]:,.0f} ({gpu_hours[method]:,.0f} GPU-h), "
                                    f"over the ${budget_usd:,.0f} budget.")
    reasons += [excluded[m] for m in order if m in excluded]

    choices = [m for m in order if m not in excluded]
    feasible = bool(choices)
    if choices:
        pick = choices[0]
        if pick != order[0]:
            reasons.append(f"{pick} is the best method left after the exclusions above.")
    elif fitting:  # everything that fits is over budget: the cheapest of those, flagged
        pick = min(fitting, key=lambda m: cost[m])
        reasons.append(f"Nothing fits the budget: {pick} is the cheapest method that fits (~${cost[pick]:,.0f}).")
    else:  # nothing fits the hardware: QLoRA needs the least memory
        pick = "qlora"
        reasons.append(f"Nothing fits {gpus} x {gpu_memory_gb:g} GB: QLoRA needs the least memory "
                       f"({memory_gb['qlora']:.0f} GB on one GPU); use GPUs with more memory.")

    return {
        "recommendation": pick,
        "feasible": feasible,
        "reasons": reasons,
        "gpus_needed": gpus_needed,
        "memory_gb": memory_gb,
        "gpu_hours": gpu_hours,
        "hours": hours,
        "cost_usd": cost,
        "storage_gb": {
            "full": full_gb,
            "lora": base_gb + adapters_gb,
        },
        "excluded": excluded,
        "inputs": {"model_size_b": model_size_b, "gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "examples": examples,
                   "objective": objective, "variants": variants, "budget_usd": budget_usd},
        "assumptions": {
            "tokens": f"{examples:,} examples x {epochs:g} epochs x {avg_tokens_per_example} tokens = {tokens / 1e6:,.0f}M",
            "fit": f"micro-batch {FIT_MICRO_BATCH} x {FIT_SEQ_LEN} tokens, gradient checkpointing, bf16, AdamW fp32 "
                   f"states; full and LoRA shard with ZeRO-3, QLoRA holds the 4-bit base on every GPU",
            "lora": f"r={lora.r} on {lora.describe_targets()}",
            "shape": f"Llama-like: hidden {shapes['full']['hidden_size']}, {shapes['full']['num_layers']} layers, "
                     f"vocab {VOCAB_SIZE:,}",
            "throughput": f"{DEFAULT_MFU:.0%} MFU of {PEAK_TFLOPS_A100_BF16:g} TFLOP/s per GPU (QLoRA 30% slower)",
            "usd_per_gpu_hour": usd_per_gpu_hour,
        },
    }


def _order_by_objective(objective: str, examples: int, model_size_b: float) -> tuple[list[str], list[str]]:
    """Methods best-first for the objective, with the reason (the seeds' rule 1)."""
    if objective == "instruction":
        return ["lora", "qlora", "full"], [
            "Instruction following is a behavioural change, genuinely low-rank: LoRA matches or approaches full "
            "fine-tuning quality at a fraction of the memory, and cannot forget (the base is frozen)."
        ]
    if objective == "domain_knowledge":
        return ["full", "lora", "qlora"], [
            "New factual knowledge needs broad weight updates: LoRA's low-rank constraint limits how much is "
            "absorbed (it learns the style, not the facts), so full fine-tuning comes first."
        ]
    if examples > FULL_FT_MIN_EXAMPLES:
        return ["full", "lora", "qlora"], [
            f"A narrow task with {examples:,} examples (> {FULL_FT_MIN_EXAMPLES:,}): at this scale LoRA's rank "
            "becomes the bottleneck and full fine-tuning's higher ceiling pays off."
        ]
    reasons = [
        f"A narrow task with {examples:,} examples (<= {FULL_FT_MIN_EXAMPLES:,}): PEFT typically matches full "
        "fine-tuning here (below ~1M examples almost always), at a fraction of the memory."
    ]
    if model_size_b * 1e9 < SMALL_MODEL_PARAMS:
        reasons.append("The model is under 0.5B parameters: full fine-tuning is also cheap here, if LoRA falls short.")
    return ["lora", "qlora", "full"], reasons


def format_recommendation(result: dict) -> str:
    """The pick, a per-method table (GPUs needed, memory, time, cost, why excluded) and the reasons."""
    i = result["inputs"]
    budget = f", budget ${i['budget_usd']:,.0f}" if i["budget_usd"] is not None else ""
    verdict = result["recommendation"].upper() + ("" if result["feasible"] else "  (does not fit all constraints)")
    lines = [
        f"recommendation: {verdict}",
        f"  for {i['model_size_b']:g}B params, {i['gpus']} x {i['gpu_memory_gb']:g} GB GPUs, {i['examples']:,} examples, "
        f"{i['objective']}, {i['variants']} variant(s){budget}",
        "",
        f"  {'method':<7}{'GPUs':>6}{'1-GPU GB':>10}{'GPU-h':>9}{'hours':>8}{'cost':>10}",
    ]
    for method in METHODS:
        needed = result["gpus_needed"][method]
        cost = f"${result['cost_usd'][method]:,.0f}"
        mark = "  excluded" if method in result["excluded"] else ""
        lines.append(
            f"  {method:<7}{needed if needed is not None else '-':>6}{result['memory_gb'][method]:>10.1f}"
            f"{result['gpu_hours'][method]:>9.1f}{result['hours'][method]:>8.1f}{cost:>10}{mark}"
        )
    lines += ["", "reasons:"] + [f"  - {reason}" for reason in result["reasons"]]
    lines += ["", "assumptions:"] + [f"  {key}: {value}" for key, value in result["assumptions"].items()]
    return "\n".join(lines)
