"""Time and cost: tokens the run will see -> training FLOPs -> wall-clock hours -> USD. Pure arithmetic, except
count_examples, which counts the rows of local data files (tunekit.data.count_rows)."""

from __future__ import annotations

from tunekit.config import PreflightConfig, RunConfig

# A100 dense bf16 peak; 40% model-FLOPs utilization is what well-tuned fine-tuning reaches (the MFU reported by
# e.g. Megatron/torchtitan for 7-70B is 35-55%; short SFT sequences and LoRA's small matmuls do worse, not better).
PEAK_TFLOPS_A100_BF16 = 312.0
DEFAULT_MFU = 0.40
# QLoRA dequantizes every 4-bit weight on each forward and backward matmul: ~30% slower than bf16 LoRA per token
# (the QLoRA paper and bitsandbytes' own benchmarks report 1.2-1.4x).
QLORA_THROUGHPUT_FACTOR = 0.7

# The config's price default, for recommend (which has no config).
DEFAULT_USD_PER_GPU_HOUR = PreflightConfig.model_fields["usd_per_gpu_hour"].default


def training_flops(shape: dict, *, method: str, tokens: float, seq_len: int, gradient_checkpointing: bool,
                   reference_tokens: float = 0.0) -> float:
    """Training FLOPs for `tokens` tokens, plus a no-grad forward over `reference_tokens` (DPO's reference model).

    A matmul with N weights costs 2N FLOPs per token forward and 4N backward (2N for the input gradient, 2N for the
    weight gradient): full FT = 6N per token. LoRA freezes the base: no weight gradients for it, but the input
    gradients still flow through every layer: 2N + 2N = 4N, plus 6 N_trainable for the adapters. Gradient
    checkpointing repeats the forward: +2N (+2 N_trainable). Attention scores and values add 4*seq*q_dim per token and
    layer forward, halved for the causal mask, tripled for forward + backward (+1 with checkpointing). The reference
    forward costs what a forward costs: 2N per token plus attention's forward share.
    """
    n_matmul, n_trainable = shape["matmul_params"], shape["trainable_params"]
    recompute = 1 if gradient_checkpointing else 0
    q_dim = shape["num_attention_heads"] * shape["head_dim"]
    attention = 2 * shape["num_layers"] * seq_len * q_dim * (3 + recompute)
    if method == "full":
        per_token = 2 * n_matmul * (3 + recompute) + attention
    else:
        per_token = 2 * n_matmul * (2 + recompute) + 2 * n_trainable * (3 + recompute) + attention
    forward_per_token = 2 * n_matmul + attention / (3 + recompute)
    return per_token * tokens + forward_per_token * reference_tokens


def sequences_per_example(config: RunConfig) -> int:
    """Sequences one training example puts through the model: 2 for a preference pair (chosen and rejected), else 1."""
    return 2 if config.preference else 1


def step_flops(config: RunConfig, shape: dict, tokens: float) -> float:
    """Training FLOPs for `tokens` tokens the policy trains on (both sequences of a pair counted), plus DPO's
    reference forward over the same tokens when the reference model runs beside training (precomputed: a one-off
    pass before training, not part of any step)."""
    live_reference = config.objective == "dpo" and config.dpo.reference == "model"
    return training_flops(shape, method=config.method, tokens=tokens, seq_len=config.data.max_seq_len,
                          gradient_checkpointing=config.training.gradient_checkpointing,
                          reference_tokens=tokens if live_reference else 0.0)


def training_hours(flops: float, *, method: str, gpus: int, peak_tflops: float = PEAK_TFLOPS_A100_BF16,
                   mfu: float = DEFAULT_MFU) -> float:
    """Wall-clock hours for `flops` on `gpus` GPUs at `mfu` of `peak_tflops` each (QLoRA at QLORA_THROUGHPUT_FACTOR)."""
    flops_per_second = gpus * peak_tflops * 1e12 * mfu * (QLORA_THROUGHPUT_FACTOR if method == "qlora" else 1.0)
    return flops / flops_per_second / 3600


def count_examples(config: RunConfig) -> int | None:
    """Training examples the run will draw, None when a source cannot be counted without downloading it.

    Each local file is counted without parsing it (tunekit.data.count_rows: lines of a JSONL file, a parquet
    footer), up to its max_examples; a source that is not a local file counts as its max_examples (unknown without
    one); the first source gives up its eval split and the sources are mixed by weight with tunekit.prepare's own
    rule. Examples that truncation leaves without loss tokens are still counted (unknown before tokenizing).
    """
    from tunekit.data import count_rows
    from tunekit.prepare import mix_counts

    data = config.data
    sizes = []
    for index, source in enumerate(data.sources):
        rows = count_rows(source.path, source.split, source.max_examples)
        if rows is None:
            rows = source.max_examples  # a hub dataset (or a file not written yet): at most this many
        if not rows:
            return None
        if index == 0 and data.eval_path is None and data.eval_fraction > 0:
            rows -= min(rows, max(1, int(rows * data.eval_fraction)))  # prepare's hold-out: at least one example
        sizes.append(rows)
    if not all(sizes):
        return None
    return sum(mix_counts(sizes, [source.weight for source in data.sources]))


def training_tokens(config: RunConfig, gpus: int, examples: int | None = None,
                    avg_tokens_per_example: float | None = None) -> tuple[float | None, str]:
    """Tokens the run will process, and how they were counted (for the assumptions). A preference example is a pair:
    its chosen and its rejected sequence each run through the model (max_seq_len bounds each)."""
    t = config.training
    sequences = sequences_per_example(config)
    pair = " x 2 (chosen + rejected)" if config.preference else ""
    if t.max_steps > 0:
        rows = t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * gpus
        tokens = rows * sequences * config.data.max_seq_len
        return tokens, ("max_steps x micro-batch x grad accumulation x GPUs" + pair
                        + " x max_seq_len (an upper bound: full rows)")
    if examples is None:
        examples = count_examples(config)
    if examples is None:
        return None, "unknown: data not local (set training.max_steps or data.sources[].max_examples)"
    per_example = avg_tokens_per_example or config.data.max_seq_len
    how = f"{examples:,} examples x {t.num_train_epochs:g} epochs{pair} x {per_example:g} tokens"
    if avg_tokens_per_example is None:
        how += " (max_seq_len: an upper bound, examples are usually shorter)"
    return examples * t.num_train_epochs * sequences * per_example, how


def reference_tokens(config: RunConfig, tokens: float, examples: int | None = None,
                     avg_tokens_per_example: float | None = None) -> tuple[float, str | None]:
    """Tokens DPO's reference model runs a no-grad forward over, and how (None: no reference, sft and orpo).

    reference model: every training token again (`tokens`, from training_tokens). precomputed: one pass over the
    training pairs before training (TRL scores the whole train split, whatever max_steps); when the data cannot be
    counted, `tokens` stands in for it."""
    if config.objective != "dpo":
        return 0.0, None
    if config.dpo.reference == "model":
        return tokens, "model: a no-grad reference forward beside every training batch"
    if examples is None:
        examples = count_examples(config)
    if examples is None:
        return tokens, "precomputed: one forward pass over the data before training (size unknown: counted as the run's tokens)"
    per_example = avg_tokens_per_example or config.data.max_seq_len
    return examples * 2 * per_example, (f"precomputed: one forward pass over {examples:,} pairs before training, "
                                        "no reference during it")
