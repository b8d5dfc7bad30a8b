"""The byte model: memory of one training run from a shape (see shapes.py), pure arithmetic, no I/O.

Units: bytes everywhere inside; "GB" is 1e9 bytes (as in the seeds' tables, where 7B x 2 B = 14 GB). A GPU sold as
"80 GB" really has 80 GiB = 85.9e9 bytes: treating it as 80e9 leaves a ~7% margin that we do not count on.
"""

from __future__ import annotations

from typing import Any

GB = 1e9
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # training.precision -> bytes per activation/compute value
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # model.dtype -> bytes per frozen base weight

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
