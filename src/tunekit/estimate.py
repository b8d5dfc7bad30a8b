"""Pre-flight: will this run fit, how long will it take, what will it cost — from the model's config alone.

Three layers, each a plain function:
  count_params(...)   builds the model on the meta device (no weights, no download) and reads the real module shapes
  memory_bytes(...)   pure arithmetic on that shape: bytes per bucket, per GPU and summed over the job's GPUs
  estimate(config)    maps a RunConfig onto both, then tokens -> FLOPs -> hours -> USD
`preflight_check` is what `tunekit train` calls before loading anything; `recommend.py` reuses `memory_bytes`,
`min_gpus` and `training_flops` with a shape guessed from a parameter count, so both commands share one byte model.

Units: bytes everywhere inside; "GB" is 1e9 bytes (as in the seeds' tables, where 7B x 2 B = 14 GB). A GPU sold as
"80 GB" really has 80 GiB = 85.9e9 bytes: treating it as 80e9 leaves a ~7% margin that we do not count on.
torch and transformers are imported inside count_params only, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from tunekit.config import LoraConfig, PreflightConfig, RunConfig
from tunekit.errors import UserError

GB = 1e9
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
SHIPPED_PREFIX = "tunekit:"  # `model.name_or_path: tunekit:llama-3-8b` -> model_configs/llama-3-8b.json

# ---------------------------------------------------------------- bytes per parameter
BYTES_PER_PARAM_FP32 = 4
BYTES_PER_PARAM_BF16 = 2  # fp16 too
BYTES_PER_PARAM_NF4 = 0.5  # bitsandbytes packs two 4-bit codes into one uint8
NF4_BLOCKSIZE = 64  # weights per quantization block (one absmax each)
DOUBLE_QUANT_BLOCKSIZE = 256  # absmax values per second-level block under double quantization
# One fp32 absmax per 64 weights: 4/64 = 0.0625 B/param (0.5 bits).
BYTES_PER_PARAM_NF4_CONSTANTS = BYTES_PER_PARAM_FP32 / NF4_BLOCKSIZE
# Double quant: the absmax itself stored as 8-bit codes (1 B per 64 weights) plus one fp32 constant per 256 absmax
# values: 8/64 + 32/(64*256) = 0.127 bits/param. (The per-tensor fp32 offset is a few bytes: ignored.)
BYTES_PER_PARAM_NF4_CONSTANTS_DOUBLE_QUANT = (
    1 / NF4_BLOCKSIZE + BYTES_PER_PARAM_FP32 / (NF4_BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE)
)
# Mixed precision keeps an fp32 master copy of every trained weight (DeepSpeed's bf16/fp16 optimizers; the ZeRO paper
# counts it in the "K=12" optimizer bytes). The seeds' 98 GB for 7B leaves it out.
BYTES_PER_PARAM_MASTER = BYTES_PER_PARAM_FP32
# The gradient the optimizer steps on is fp32 (DeepSpeed's BF16_Optimizer accumulates in fp32; ZeRO-3 keeps a bf16
# partition and makes an fp32 copy per optimizer sub-group of up to 1e9 elements, i.e. the whole partition up to ~8B/GPU).
BYTES_PER_PARAM_GRAD = BYTES_PER_PARAM_FP32
# Adam's m and v. fp32: 4 B each. bitsandbytes 8-bit (and paged 8-bit) AdamW: 1 B each (block constants ignored).
# paged_adamw_32bit is full size: paging only lets the states spill to CPU under pressure, we count them on the GPU.
ADAM_BYTES_PER_PARAM = {
    "adamw_torch": 2 * BYTES_PER_PARAM_FP32,
    "adamw_torch_fused": 2 * BYTES_PER_PARAM_FP32,
    "paged_adamw_32bit": 2 * BYTES_PER_PARAM_FP32,
    "adamw_8bit": 2 * 1,
    "paged_adamw_8bit": 2 * 1,
}
# peft upcasts LoRA A/B (and trainable token rows) to fp32 (get_peft_model's autocast_adapter_dtype=True), so the
# adapter's weights are fp32 and need no separate master copy.
BYTES_PER_PARAM_ADAPTER = BYTES_PER_PARAM_FP32
# QLoRA: peft's prepare_model_for_kbit_training casts every parameter that is not 4-bit (embeddings, lm_head, norms)
# to fp32. For Llama-3-8B that is 1.05B params: 4.2 GB, more than its 4-bit layers (3.6 GB).
BYTES_PER_PARAM_QLORA_UNQUANTIZED = BYTES_PER_PARAM_FP32

# ---------------------------------------------------------------- overhead
# CUDA context + cuBLAS/cuDNN workspaces: 0.5-1 GB per process on A100/H100 with torch 2.x.
CUDA_CONTEXT_BYTES = 0.8e9
# On CPU the fixed cost is the interpreter with torch/transformers/trl imported (~0.4-0.8 GB RSS, CPU-STACK.md).
CPU_RUNTIME_BYTES = 0.6e9
# The caching allocator rarely packs perfectly: ~10% of what the tensors themselves need.
ALLOCATOR_FRAGMENTATION = 0.10
# ZeRO-3 gathers a module's full weights before using it and holds its full gradient until the reduce-scatter:
# the largest module (the embedding or lm_head for big vocabularies, else one decoder layer) x2, in compute dtype.
ZERO3_GATHER_FACTOR = 2

# ---------------------------------------------------------------- throughput
# A100 dense bf16 peak; 40% model-FLOPs utilization is what well-tuned fine-tuning reaches (the MFU reported by
# e.g. Megatron/torchtitan for 7-70B is 35-55%; short SFT sequences and LoRA's small matmuls do worse, not better).
PEAK_TFLOPS_A100_BF16 = 312.0
DEFAULT_MFU = 0.40
# QLoRA dequantizes every 4-bit weight on each forward and backward matmul: ~30% slower than bf16 LoRA per token
# (the QLoRA paper and bitsandbytes' own benchmarks report 1.2-1.4x).
QLORA_THROUGHPUT_FACTOR = 0.7

# The config's price default, for recommend (which has no config).
DEFAULT_USD_PER_GPU_HOUR = PreflightConfig.model_fields["usd_per_gpu_hour"].default

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------- the model's shape


def shipped_model_configs() -> list[str]:
    """Short names of the architecture configs shipped in src/tunekit/model_configs/ (use as `tunekit:NAME`)."""
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def resolve_model_config(name_or_path: str) -> str:
    """`tunekit:NAME` (or a bare shipped NAME that is not a local path) -> that config.json; anything else unchanged."""
    name = name_or_path.removeprefix(SHIPPED_PREFIX)
    shipped = MODEL_CONFIG_DIR / f"{name}.json"
    if name_or_path.startswith(SHIPPED_PREFIX):
        if not shipped.is_file():
            raise UserError(f"no shipped model config '{name}' (have: {', '.join(shipped_model_configs())})")
        return str(shipped)
    if shipped.is_file() and not Path(name_or_path).exists():
        return str(shipped)
    return name_or_path


def count_params(model_config_path_or_dir: str | Path, lora_cfg: LoraConfig | None = None, method: str = "lora",
                 add_tokens: int = 0) -> dict[str, Any]:
    """Parameter counts and the shapes the byte model needs, from the model's config (built on the meta device).

    Returns a dict ("shape") with: params (base model, adapter excluded), trainable_params (all for full; LoRA A/B of
    every Linear/Embedding matched by lora.target_modules, r*(in+out) each, plus new token rows for lora/qlora),
    lora_params, new_token_params, linear_params (Linear weights except lm_head: what bitsandbytes quantizes),
    matmul_params (params that do a matmul per token: all but a lookup-only input embedding), largest_module_params,
    lora_input_features (sum of in_features over adapted Linears, all layers), and the architecture numbers
    hidden_size, num_layers, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size,
    gated_mlp, tied_embeddings, model_type.
    Raises UserError when the config cannot be read or a name in lora.target_modules matches no module.
    """
    lora_cfg = lora_cfg if lora_cfg is not None else LoraConfig()
    source = resolve_model_config(str(model_config_path_or_dir))
    train_new_tokens = lora_cfg.train_new_token_embeddings
    shape = dict(_model_shape(source, tuple(lora_cfg.target_modules), lora_cfg.r, add_tokens, train_new_tokens))
    if method != "full" and shape["unmatched_targets"]:
        raise UserError(
            f"lora.target_modules: {shape['unmatched_targets']} not found in {model_config_path_or_dir} "
            f"(its Linear names: {', '.join(shape['linear_names'])})"
        )
    if method == "full":
        shape["trainable_params"] = shape["params"]
    else:
        shape["trainable_params"] = shape["lora_params"] + shape["new_token_params"]
    return shape


@functools.lru_cache(maxsize=16)
def _model_shape(source: str, targets: tuple[str, ...], r: int, add_tokens: int, train_new_tokens: bool) -> dict[str, Any]:
    """Build the model on the meta device once per (config, LoRA targets, rank) and walk its modules."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - any failure here is "cannot read the config", for the user to fix
        raise UserError(
            f"cannot read a model config from {source!r} ({type(exc).__name__}); the estimate needs a local model "
            f"directory or a shipped config: {', '.join(SHIPPED_PREFIX + n for n in shipped_model_configs())}"
        ) from None
    hidden = hf_config.hidden_size
    # New tokens grow the embedding (and an untied lm_head) by exactly add_tokens rows (resize without padding).
    hf_config.vocab_size = hf_config.vocab_size + add_tokens
    with torch.device("meta"):  # shapes only: no memory, no init cost, no download
        model = AutoModelForCausalLM.from_config(hf_config)

    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    tied = output_emb is not None and output_emb.weight is input_emb.weight
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    # The decoder layers: the ModuleList as long as the config's layer count (model.model.layers for Llama).
    n_layers = hf_config.num_hidden_layers
    layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), [])

    module_names = [name for name, _ in model.named_modules()]

    def adapted(name: str) -> bool:
        # peft's matching for a list of names: the full name or its last dotted part equals a target.
        return any(name == t or name.endswith("." + t) for t in targets)

    lora_params = linear_params = lora_input_features = 0
    linear_names: set[str] = set()
    gated = False
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output_emb:
            linear_params += module.weight.numel()  # the bias (if any) stays in compute dtype under bitsandbytes
            linear_names.add(name.rsplit(".", 1)[-1])
            gated = gated or name.endswith("gate_proj")
            if adapted(name):
                lora_params += r * (module.in_features + module.out_features)  # A: r x in, B: out x r
                lora_input_features += module.in_features
        elif isinstance(module, nn.Embedding) and adapted(name):
            lora_params += r * (module.num_embeddings + module.embedding_dim)
    # peft trainable tokens: a (new rows x hidden) delta on the input embedding, and on an untied lm_head too (a new
    # token must be predictable, not only readable).
    new_token_params = add_tokens * hidden * (1 if tied else 2) if train_new_tokens else 0
    layer_params = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    heads = hf_config.num_attention_heads
    return {
        "model_type": hf_config.model_type,
        "params": params,
        "lora_params": lora_params,
        "new_token_params": new_token_params,
        "linear_params": linear_params,
        "matmul_params": params - (0 if tied else input_emb.weight.numel()),
        "largest_module_params": max(layer_params, input_emb.weight.numel(),
                                     output_emb.weight.numel() if output_emb is not None else 0),
        "lora_input_features": lora_input_features,
        "linear_names": sorted(linear_names),
        # Like the LoRA backend, every target must name a module (peft itself only fails when none matches).
        "unmatched_targets": [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)],
        "hidden_size": hidden,
        "num_layers": hf_config.num_hidden_layers,
        "intermediate_size": getattr(hf_config, "intermediate_size", None) or 4 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(hf_config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(hf_config, "head_dim", None) or hidden // heads,
        "vocab_size": hf_config.vocab_size,
        "gated_mlp": gated,
        "tied_embeddings": tied,
    }


# ---------------------------------------------------------------- bytes


def activation_bytes(shape: dict, *, micro_batch: int, seq_len: int, act_bytes: int, gradient_checkpointing: bool,
                     base_trains: bool, lora_input_bytes: float, eager_attention: bool) -> float:
    """Bytes autograd keeps for backward, for one micro-batch of micro_batch x seq_len tokens (a decoder-only LM).

    Counted per token and layer from what each op saves (HF Llama-style layer, SDPA attention):
      two RMSNorm inputs, upcast to fp32 and saved by pow/mul                      8h
      SDPA: q, k, v after RoPE and its output (+ an fp32 logsumexp per head)       a(2*q_dim + 2*kv_dim)
      SwiGLU: gate output, SiLU output, up output (inputs of SiLU and the product)  3aI (2aI without a gate)
      inputs of q/k/v, o_proj, gate/up, down_proj: kept only to form weight
        gradients, so only when the base trains (full FT)                            a(2h + q_dim + I)
      LoRA: lora_A's own copy of each adapted input (+1-byte dropout mask)           lora_input_bytes * sum(in)
      eager attention: the fp32 softmax and its compute-dtype copy                  (4 + a) * heads * seq_len
    plus the head: the final norm's fp32 input, and the logits: compute-dtype logits, the loss's fp32 upcast and the
    fp32 log-softmax (V x 10 bytes per token in bf16: 5.1 GB for 4096 tokens at Llama-3's 128K vocabulary).
    Gradient checkpointing keeps only each layer's input (a*h per token) and recomputes one layer at a time.
    """
    h, n_layers, inter = shape["hidden_size"], shape["num_layers"], shape["intermediate_size"]
    q_dim = shape["num_attention_heads"] * shape["head_dim"]
    kv_dim = shape["num_key_value_heads"] * shape["head_dim"]
    tokens = micro_batch * seq_len
    norms = 2 * h * BYTES_PER_PARAM_FP32
    attention = act_bytes * (2 * q_dim + 2 * kv_dim)
    mlp = act_bytes * (3 if shape["gated_mlp"] else 2) * inter
    linear_inputs = act_bytes * (2 * h + q_dim + inter) if base_trains else 0
    lora = lora_input_bytes * shape["lora_input_features"] / n_layers
    eager = (BYTES_PER_PARAM_FP32 + act_bytes) * shape["num_attention_heads"] * seq_len if eager_attention else 0
    per_layer = tokens * (norms + attention + mlp + linear_inputs + lora + eager)
    upcast = BYTES_PER_PARAM_FP32 if act_bytes < BYTES_PER_PARAM_FP32 else 0  # no copy when logits are already fp32
    logits = tokens * shape["vocab_size"] * (act_bytes + upcast + BYTES_PER_PARAM_FP32)
    head = tokens * (BYTES_PER_PARAM_FP32 * h + (act_bytes * h if base_trains else 0)) + logits
    if gradient_checkpointing:
        return n_layers * tokens * act_bytes * h + per_layer + head
    return n_layers * per_layer + head


def memory_bytes(shape: dict, *, method: str, gpus: int = 1, device: str = "cuda", precision: str = "bf16",
                 base_dtype_bytes: int | None = None, optim: str = "adamw_torch", zero_stage: int = 0,
                 offload_optimizer: bool = False, offload_param: bool = False, micro_batch: int = 1,
                 seq_len: int = 2048, gradient_checkpointing: bool = False, lora_dropout: float = 0.0,
                 double_quant: bool = True, attn_implementation: str | None = "sdpa") -> dict[str, Any]:
    """Memory of one training run, by bucket: {"per_device": {...}, "job": {...}, "cpu_offload": bytes}.

    Buckets: weights, gradients, optimizer (Adam m/v + fp32 master), activations, overhead, total. "per_device" is
    one GPU (or process); "job" sums all `gpus` of them (a sharded bucket counts once, a replicated one `gpus` times).
    ZeRO shards the optimizer from stage 1, gradients from stage 2, weights at stage 3; stage 0 is plain data
    parallelism (every GPU holds everything). Offloaded buckets move to "cpu_offload" (host memory).
    """
    compute_bytes = PRECISION_BYTES[precision]
    mixed = compute_bytes < BYTES_PER_PARAM_FP32
    adam = ADAM_BYTES_PER_PARAM[optim]
    n_params, n_trainable = shape["params"], shape["trainable_params"]
    if method == "full":
        weights = n_params * compute_bytes
        gradients = n_params * BYTES_PER_PARAM_GRAD
        optimizer = n_params * (adam + (BYTES_PER_PARAM_MASTER if mixed else 0))
    else:
        if method == "qlora":
            quantized = shape["linear_params"]
            constants = BYTES_PER_PARAM_NF4_CONSTANTS_DOUBLE_QUANT if double_quant else BYTES_PER_PARAM_NF4_CONSTANTS
            unquantized = n_params - quantized  # embeddings, lm_head, norms
            base = quantized * (BYTES_PER_PARAM_NF4 + constants) + unquantized * BYTES_PER_PARAM_QLORA_UNQUANTIZED
        else:
            base = n_params * (base_dtype_bytes or compute_bytes)
        weights = base + n_trainable * BYTES_PER_PARAM_ADAPTER
        gradients = n_trainable * BYTES_PER_PARAM_GRAD
        optimizer = n_trainable * adam  # the adapter is already fp32: no master copy

    shard = {"weights": zero_stage >= 3, "gradients": zero_stage >= 2, "optimizer": zero_stage >= 1}
    job = {"weights": weights, "gradients": gradients, "optimizer": optimizer}
    per_device = {key: value / gpus if shard[key] else value for key, value in job.items()}
    job = {key: value if shard[key] else value * gpus for key, value in job.items()}
    cpu_offload = 0.0
    for key, offloaded in (("optimizer", offload_optimizer), ("weights", offload_param and zero_stage >= 3)):
        if offloaded:
            cpu_offload += job[key]
            per_device[key] = job[key] = 0.0

    # peft casts each adapted input to the fp32 adapter dtype, applies dropout, and lora_A saves its input: a new
    # tensor whenever the cast or dropout made one (re-cast to bf16 under autocast), plus dropout's 1-byte mask.
    lora_input_bytes = 0.0
    if method != "full" and (mixed or lora_dropout > 0):
        lora_input_bytes = compute_bytes + (1 if lora_dropout > 0 else 0)
    per_device["activations"] = activation_bytes(
        shape, micro_batch=micro_batch, seq_len=seq_len, act_bytes=compute_bytes,
        gradient_checkpointing=gradient_checkpointing, base_trains=method == "full",
        lora_input_bytes=lora_input_bytes, eager_attention=attn_implementation == "eager",
    )
    tensors = sum(per_device.values())
    gather = ZERO3_GATHER_FACTOR * shape["largest_module_params"] * compute_bytes if zero_stage >= 3 and gpus > 1 else 0
    runtime = CUDA_CONTEXT_BYTES if device == "cuda" else CPU_RUNTIME_BYTES
    per_device["overhead"] = runtime + gather + ALLOCATOR_FRAGMENTATION * tensors
    per_device["total"] = sum(per_device.values())
    job["activations"] = per_device["activations"] * gpus  # every GPU runs its own micro-batch
    job["overhead"] = per_device["overhead"] * gpus
    job["total"] = sum(job.values())
    return {"per_device": per_device, "job": job, "cpu_offload": cpu_offload}


def min_gpus(shape: dict, memory_per_gpu_bytes: float, max_gpus: int = 4096, **settings: Any) -> int | None:
    """Fewest GPUs on which `memory_bytes(shape, gpus=n, **settings)` fits per device; None if no count does.

    Without ZeRO stage 3 the weights are replicated, so adding GPUs cannot make the model itself fit.
    """
    n = 1
    while n <= max_gpus:
        if memory_bytes(shape, gpus=n, **settings)["per_device"]["total"] <= memory_per_gpu_bytes:
            return n
        if settings.get("zero_stage", 0) == 0:
            return None
        n += 1 if n < 64 else 8  # beyond 64, whole 8-GPU nodes
    return None


# ---------------------------------------------------------------- time and cost


def training_flops(shape: dict, *, method: str, tokens: float, seq_len: int, gradient_checkpointing: bool) -> float:
    """Training FLOPs for `tokens` tokens.

    A matmul with N weights costs 2N FLOPs per token forward and 4N backward (2N for the input gradient, 2N for the
    weight gradient): full FT = 6N per token. LoRA freezes the base: no weight gradients for it, but the input
    gradients still flow through every layer: 2N + 2N = 4N, plus 6 N_trainable for the adapters. Gradient
    checkpointing repeats the forward: +2N (+2 N_trainable). Attention scores and values add 4*seq*q_dim per token and
    layer forward, halved for the causal mask, tripled for forward + backward (+1 with checkpointing).
    """
    n_matmul, n_trainable = shape["matmul_params"], shape["trainable_params"]
    recompute = 1 if gradient_checkpointing else 0
    q_dim = shape["num_attention_heads"] * shape["head_dim"]
    attention = 2 * shape["num_layers"] * seq_len * q_dim * (3 + recompute)
    if method == "full":
        per_token = 2 * n_matmul * (3 + recompute) + attention
    else:
        per_token = 2 * n_matmul * (2 + recompute) + 2 * n_trainable * (3 + recompute) + attention
    return per_token * tokens


def training_hours(flops: float, *, method: str, gpus: int, peak_tflops: float = PEAK_TFLOPS_A100_BF16,
                   mfu: float = DEFAULT_MFU) -> float:
    """Wall-clock hours for `flops` on `gpus` GPUs at `mfu` of `peak_tflops` each (QLoRA at QLORA_THROUGHPUT_FACTOR)."""
    flops_per_second = gpus * peak_tflops * 1e12 * mfu * (QLORA_THROUGHPUT_FACTOR if method == "qlora" else 1.0)
    return flops / flops_per_second / 3600


def count_examples(config: RunConfig) -> int | None:
    """Training examples from the local data files (line counts: cheap), capped by max_examples; None if unknown.

    Sources are summed (mixing weights ignored) and the eval split of the first source is taken off.
    """
    total = 0
    for index, source in enumerate(config.data.sources):
        rows = _count_rows(Path(source.path))
        if source.max_examples is not None:
            rows = source.max_examples if rows is None else min(rows, source.max_examples)
        if rows is None:
            return None
        if index == 0 and config.data.eval_path is None:
            rows -= int(rows * config.data.eval_fraction)
        total += rows
    return total


def _count_rows(path: Path) -> int | None:
    if not path.is_file():
        return None  # a hub dataset: unknown without downloading it
    if path.suffix in (".jsonl", ".csv"):
        with path.open("rb") as handle:
            lines = sum(1 for line in handle if line.strip())
        return lines - 1 if path.suffix == ".csv" else lines  # a CSV's first line is its header
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return len(data) if isinstance(data, list) else None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def training_tokens(config: RunConfig, gpus: int, examples: int | None = None,
                    avg_tokens_per_example: float | None = None) -> tuple[float | None, str]:
    """Tokens the run will process, and how they were counted (for the assumptions)."""
    t = config.training
    if t.max_steps > 0:
        rows = t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * gpus
        tokens = rows * config.data.max_seq_len
        return tokens, "max_steps x micro-batch x grad accumulation x GPUs x max_seq_len (an upper bound: full rows)"
    if examples is None:
        examples = count_examples(config)
    if examples is None:
        return None, "unknown: data not local (set training.max_steps or data.sources[].max_examples)"
    per_example = avg_tokens_per_example or config.data.max_seq_len
    how = f"{examples:,} examples x {t.num_train_epochs:g} epochs x {per_example:g} tokens"
    if avg_tokens_per_example is None:
        how += " (max_seq_len: an upper bound, examples are usually shorter)"
    return examples * t.num_train_epochs * per_example, how


# ---------------------------------------------------------------- the estimate of a config


def _settings(config: RunConfig, method: str, device: str) -> dict[str, Any]:
    """memory_bytes keyword arguments for `config` run as `method` (alternatives keep batch, length, optimizer)."""
    t = config.training
    if t.precision != "auto":
        precision = t.precision
    else:
        precision = "bf16" if device == "cuda" else "fp32"  # auto: bf16 on a GPU, fp32 on CPU
    model_dtype = config.model.dtype
    base_dtype_bytes = DTYPE_BYTES[model_dtype] if model_dtype != "auto" else PRECISION_BYTES[precision]
    stage, offload_optimizer, offload_param = _zero_settings(config)
    if method == "full" and config.deepspeed is None:
        stage = 3  # full FT always runs under DeepSpeed, ZeRO-3 by default
    if method == "qlora":
        stage = min(stage, 2)  # 4-bit weights cannot be ZeRO-3 sharded
        offload_param = False
    return {
        "method": method, "device": device, "precision": precision, "base_dtype_bytes": base_dtype_bytes,
        "optim": t.optim, "zero_stage": stage, "offload_optimizer": offload_optimizer, "offload_param": offload_param,
        "micro_batch": t.per_device_train_batch_size, "seq_len": config.data.max_seq_len,
        "gradient_checkpointing": t.gradient_checkpointing, "lora_dropout": config.lora.dropout,
        "double_quant": config.qlora.double_quant, "attn_implementation": config.model.attn_implementation,
    }


def _zero_settings(config: RunConfig) -> tuple[int, bool, bool]:
    """ZeRO stage and offload flags: from a user's DeepSpeed config when given, else from the deepspeed section."""
    ds = config.deepspeed
    if ds is None:
        return 0, False, False
    raw = ds.config
    if isinstance(raw, str):
        raw = json.loads(Path(raw).read_text())
    if isinstance(raw, dict):
        zero = raw.get("zero_optimization", {})
        device_of = lambda key: (zero.get(key) or {}).get("device", "none")  # noqa: E731
        return int(zero.get("stage", 0)), device_of("offload_optimizer") != "none", device_of("offload_param") != "none"
    return ds.stage, ds.offload_optimizer, ds.offload_param


def estimate(config: RunConfig, gpus: int | None = None, gpu_memory_gb: float | None = None,
             tokens_per_second: float | None = None, *, device: str = "cuda", examples: int | None = None,
             avg_tokens_per_example: float | None = None, peak_tflops: float = PEAK_TFLOPS_A100_BF16,
             mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Memory, time and cost of `config` on `gpus` GPUs of `gpu_memory_gb` each (device "cuda"; "cpu": processes
    sharing host RAM). The only I/O: the model's config (and line counts of local data files when `examples` is None).

    Returns a JSON-serializable dict: method, params, trainable_params, bytes (summed over the job's GPUs),
    per_device, per_device_total, gpus, gpu_memory_bytes, fits, cpu_offload_bytes, tokens, flops, train_hours (wall),
    gpu_hours, cost_usd (None when tokens are unknown), alternatives (the same run as each method), assumptions.
    Time: `tokens_per_second` (the whole job's) when given, else FLOPs at `mfu` of `peak_tflops` per GPU.
    """
    gpus = gpus or config.preflight.gpus or 1
    memory_gb = gpu_memory_gb or config.preflight.gpu_memory_gb or 80.0
    memory = memory_gb * GB
    add_tokens = len(config.model.add_tokens)
    shape = count_params(config.model.name_or_path, config.lora, config.method, add_tokens)
    shapes = {config.method: shape}
    for method in {"full", "lora", "qlora"} - {config.method}:
        try:
            shapes[method] = count_params(config.model.name_or_path, config.lora, method, add_tokens)
        except UserError:  # a full run's (unused) lora.target_modules may not fit this architecture: no LoRA rows
            pass
    settings = _settings(config, config.method, device)
    mem = memory_bytes(shape, gpus=gpus, **settings)

    tokens, tokens_how = training_tokens(config, gpus, examples, avg_tokens_per_example)
    seq_for_attention = avg_tokens_per_example or config.data.max_seq_len
    flops = hours = gpu_hours = cost = None
    if tokens is not None:
        flops = training_flops(shape, method=config.method, tokens=tokens, seq_len=int(seq_for_attention),
                               gradient_checkpointing=settings["gradient_checkpointing"])
        if tokens_per_second:
            hours = tokens / tokens_per_second / 3600
        else:
            hours = training_hours(flops, method=config.method, gpus=gpus, peak_tflops=peak_tflops, mfu=mfu)
        gpu_hours = hours * gpus
        cost = gpu_hours * config.preflight.usd_per_gpu_hour

    alternatives = {}
    for method in (m for m in ("full", "lora", "qlora") if m in shapes):
        alt_settings = _settings(config, method, device)
        alt = memory_bytes(shapes[method], gpus=gpus, **alt_settings)
        needed_gpus = None  # on CPU more processes share the same RAM: adding them never helps
        if device == "cuda":
            needed_gpus = min_gpus(shapes[method], memory, **alt_settings)
            if needed_gpus is None and method == "lora" and alt_settings["zero_stage"] < 3:
                # Replicas cannot fit a base that one GPU cannot hold; ZeRO-3 can shard it.
                alt_settings["zero_stage"] = 3
                needed_gpus = min_gpus(shapes[method], memory, **alt_settings)
        alternatives[method] = {
            "per_device_total": alt["per_device"]["total"],
            "needed_bytes": _needed(alt, device),
            "fits": _needed(alt, device) <= memory,
            "gpus_needed": needed_gpus,
            "zero_stage": alt_settings["zero_stage"],
        }

    return {
        "model": config.model.name_or_path,
        "model_type": shape["model_type"],
        "method": config.method,
        "device": device,
        "params": shape["params"],
        "trainable_params": shape["trainable_params"],
        "bytes": mem["job"],
        "per_device": mem["per_device"],
        "per_device_total": mem["per_device"]["total"],
        "cpu_offload_bytes": mem["cpu_offload"],
        "gpus": gpus,
        "gpu_memory_bytes": memory,
        "needed_bytes": _needed(mem, device),
        "fits": _needed(mem, device) <= memory,
        "tokens": tokens,
        "flops": flops,
        "train_hours": hours,
        "gpu_hours": gpu_hours,
        "cost_usd": cost,
        "alternatives": alternatives,
        "assumptions": {
            "gb": "1e9 bytes",
            "precision": settings["precision"],
            "base_weights_bytes_per_param": settings["base_dtype_bytes"] if config.method == "lora" else None,
            "optimizer": f"{settings['optim']}: {ADAM_BYTES_PER_PARAM[settings['optim']]} B/param for Adam m+v",
            "master_weights": config.method == "full" and settings["precision"] != "fp32",
            "zero_stage": settings["zero_stage"],
            "micro_batch": settings["micro_batch"],
            "seq_len": settings["seq_len"],
            "gradient_checkpointing": settings["gradient_checkpointing"],
            "overhead": f"{(CUDA_CONTEXT_BYTES if device == 'cuda' else CPU_RUNTIME_BYTES) / GB:.1f} GB runtime per "
                        f"process + {ALLOCATOR_FRAGMENTATION:.0%} fragmentation"
                        + (" + ZeRO-3 gathered module" if settings["zero_stage"] >= 3 and gpus > 1 else ""),
            "tokens": tokens_how,
            "flops_per_token": "6N full, 4N + 6N_trainable LoRA/QLoRA (+2N with checkpointing) + attention",
            "throughput": (f"{tokens_per_second:g} tokens/s (given)" if tokens_per_second else
                           f"{mfu:.0%} MFU of {peak_tflops:g} TFLOP/s per GPU (A100 bf16 dense)"
                           + (f", x{QLORA_THROUGHPUT_FACTOR} for 4-bit dequantization"
                              if config.method == "qlora" else "")),
            "usd_per_gpu_hour": config.preflight.usd_per_gpu_hour,
        },
    }


def _needed(mem: dict, device: str) -> float:
    """What must fit `gpu_memory_bytes`: one GPU's share; on CPU all processes share host RAM, so the job's total."""
    return mem["job"]["total"] if device == "cpu" else mem["per_device"]["total"]


def _gb(value: float) -> str:
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
            tips.append(f"use method {method} ({_gb(alt['needed_bytes'])})")
    own = result["alternatives"][result["method"]]
    if own["gpus_needed"] and own["gpus_needed"] > result["gpus"]:
        same_stage = own["zero_stage"] == result["assumptions"]["zero_stage"]
        tips.append(f"use {own['gpus_needed']} GPUs" + ("" if same_stage else f" with deepspeed.stage {own['zero_stage']}"))
    return tips


def format_estimate(result: dict) -> str:
    """One screen: the buckets per GPU and for the job, fit, time and cost, the other methods, the assumptions."""
    a = result["assumptions"]
    share = result["trainable_params"] / result["params"]
    on_gpu = result["device"] == "cuda"
    where = (f"{result['gpus']} x {_gb(result['gpu_memory_bytes'])} GPU" if on_gpu
             else f"{result['gpus']} process(es) sharing {_gb(result['gpu_memory_bytes'])} RAM")
    lines = [
        f"{result['method']} on {result['model']} ({result['model_type']}), {where}",
        f"params {result['params']:,}   trainable {result['trainable_params']:,} ({share:.2%})",
        "",
        f"  {'':<13}{'per GPU':>10}{'all GPUs':>11}",
    ]
    notes = {
        "activations": f"micro-batch {a['micro_batch']} x {a['seq_len']} tokens, checkpointing "
                       f"{'on' if a['gradient_checkpointing'] else 'off'}",
        "optimizer": a["optimizer"] + (" + fp32 master" if a["master_weights"] else ""),
        "overhead": a["overhead"],
        "weights": f"ZeRO stage {a['zero_stage']}" if a["zero_stage"] else "",
    }
    for key in ("weights", "gradients", "optimizer", "activations", "overhead", "total"):
        per_device, job = _gb(result["per_device"][key]), _gb(result["bytes"][key])
        lines.append(f"  {key:<13}{per_device:>10}{job:>11}  {notes.get(key, '')}")
    if result["cpu_offload_bytes"]:
        lines.append(f"  {'cpu offload':<13}{'':>10}{_gb(result['cpu_offload_bytes']):>11}  host memory")
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    scope = "per GPU" if on_gpu else "in all"
    lines += ["", f"{verdict}: {_gb(result['needed_bytes'])} {scope} of {_gb(result['gpu_memory_bytes'])}"]
    lines += [f"  to fit: {tip}" for tip in advice(result)]
    if result["tokens"] is None:
        lines.append(f"time/cost: {a['tokens']}")
    else:
        lines.append(f"time: {result['tokens'] / 1e6:,.1f}M tokens -> {result['train_hours']:.2f} h on {result['gpus']} "
                     f"GPU(s) = {result['gpu_hours']:.1f} GPU-h -> ${result['cost_usd']:,.2f} "
                     f"at ${a['usd_per_gpu_hour']:g}/GPU-h")
        lines.append(f"  tokens: {a['tokens']}")
        lines.append(f"  throughput: {a['throughput']}")
    lines.append("per method, same batch:")
    for method, alt in result["alternatives"].items():
        if not on_gpu:
            needs = "fits" if alt["fits"] else "does not fit"
        elif alt["gpus_needed"] is None:
            needs = "fits on no number of these GPUs"
        else:
            plural = "s" if alt["gpus_needed"] > 1 else ""
            needs = f"needs {alt['gpus_needed']} GPU{plural} at ZeRO stage {alt['zero_stage']}"
        lines.append(f"  {method:<6}{_gb(alt['needed_bytes']):>10} {scope} here; {needs}")
    return "\n".join(lines)


# ---------------------------------------------------------------- before training


def preflight_check(config: RunConfig, device: str = "cuda", force: bool = False, **estimate_kwargs: Any) -> dict:
    """Estimate the run for this machine; raise UserError when it cannot fit (unless `force` or the config allows it).

    CUDA: preflight.gpus, else WORLD_SIZE, else the visible GPUs; the first one's memory (or preflight.gpu_memory_gb).
    CPU: the processes share host RAM, so the job's total is compared with the machine's physical memory.
    Returns the estimate (print it with format_estimate).
    """
    # Under a launcher (torchrun, accelerate, deepspeed) WORLD_SIZE is the number of processes actually started.
    world_size = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None
    gpus, memory_gb = config.preflight.gpus or world_size, config.preflight.gpu_memory_gb
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            gpus = gpus or torch.cuda.device_count()
            memory_gb = memory_gb or torch.cuda.get_device_properties(0).total_memory / GB
        else:
            device = "cpu"
    if device == "cpu":
        gpus = gpus or 1
        memory_gb = _host_memory_bytes() / GB
    result = estimate(config, gpus=gpus, gpu_memory_gb=memory_gb, device=device, **estimate_kwargs)
    if not result["fits"] and config.preflight.refuse_if_too_big and not force:
        have = _gb(result["gpu_memory_bytes"])
        need = _gb(result["needed_bytes"])
        where = f"{need} of host RAM (have {have})" if device == "cpu" else (
            f"{need} per GPU ({result['gpus']} GPU(s) of {have})")
        tips = "; ".join(advice(result)) or "use a smaller model"
        raise UserError(f"the estimate says this {config.method} run needs {where}: {tips} "
                        "(--force starts anyway; `tunekit estimate` shows the breakdown)")
    return result


def _host_memory_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


