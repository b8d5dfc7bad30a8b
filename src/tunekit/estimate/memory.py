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
# LoRA adapter weights without DeepSpeed: peft's get_peft_model upcasts LoRA A/B (and trainable token rows) to fp32
# (autocast_adapter_dtype=True), so they are fp32 and need no separate master copy. QLoRA and DeepSpeed differ: see
# adapter_bytes.
BYTES_PER_PARAM_ADAPTER = BYTES_PER_PARAM_FP32
# QLoRA: peft's prepare_model_for_kbit_training casts every parameter that is not 4-bit (embeddings, lm_head, norms)
# to fp32. For Llama-3-8B that is 1.05B params: 4.2 GB, more than its 4-bit layers (3.6 GB). (DeepSpeed's bf16/fp16
# engine casts them back to the compute dtype: see memory_bytes.)
BYTES_PER_PARAM_QLORA_UNQUANTIZED = BYTES_PER_PARAM_FP32
# Optimizers whose m and v take the parameter's own dtype (torch.optim.AdamW: zeros_like(param)); bitsandbytes'
# 32-bit and 8-bit optimizers keep fp32 or uint8 states whatever the parameter's dtype.
STATES_IN_PARAM_DTYPE = {"adamw_torch", "adamw_torch_fused"}

# ---------------------------------------------------------------- the loss: TRL's fused LM head
# TRL 1.16's SFTTrainer patches the model with a fused LM head (trl.trainer.utils.add_fused_lm_head, applied for
# every model, on every device) and computes the loss from it unless label smoothing, a compute_loss_func or DeepSpeed
# sequence parallelism asks for full logits (tunekit uses none of them). Its ChunkedLogProbFunction
# (trl/kernels/chunked_logprob.py) projects the hidden states through lm_head one [4096 tokens x 32768 vocabulary]
# tile at a time into a single reused buffer, folds each tile into per-token online-logsumexp statistics and keeps
# only those; backward recomputes the tiles. The [tokens, vocab] logits never exist.
FUSED_HEAD_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
FUSED_HEAD_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# Without Triton (CPU) the tiles are folded by torch ops whose fp32 temporaries stay alive together: measured on CPU
# (ru_maxrss, 2048 x 8192 tiles) 13.6 B per tile element beyond the tile in forward, 29.5 B in backward (y, z, log p,
# p, the gradient and the is-target mask at once). On CUDA the Triton kernels work in registers: the tile only.
FUSED_HEAD_TORCH_FOLD_BYTES = 30
# Per-token fp32 vectors the fused head keeps (running max, sum of exp, target logit, entropy statistics, top-1 test:
# seven in forward; log-normalizer and entropy saved for backward).
FUSED_HEAD_TOKEN_STATS = 7

# ---------------------------------------------------------------- overhead
# CUDA context + cuBLAS/cuDNN workspaces: 0.5-1 GB per process on A100/H100 with torch 2.x.
CUDA_CONTEXT_BYTES = 0.8e9
# On CPU the fixed cost is the interpreter with torch/transformers/trl imported (~0.4-0.8 GB RSS, CPU-STACK.md).
CPU_RUNTIME_BYTES = 0.6e9
# The caching allocator rarely packs perfectly: ~10% of what the tensors themselves need.
ALLOCATOR_FRAGMENTATION = 0.10
# ZeRO-3 gathers a module's full weights before using it and holds its full gradient until the reduce-scatter:
# the largest module (the embedding or lm_head for big vocabularies, else one decoder layer) x2, in compute dtype.
# The task metric's generation and the forgetting monitor's loss gather the same way, one module at a time, before
# and after training (backends.common.layer_by_layer): no whole-model copy per device to count.
ZERO3_GATHER_FACTOR = 2



def reference_forward_bytes(shape: dict, *, tokens: int, act_bytes: int, triton: bool = True) -> float:
    """Working memory of the DPO reference's forward over `tokens` tokens (chosen + rejected): it runs under no_grad
    after the policy's forward, so it saves nothing for backward and holds one layer's tensors at a time, like a
    checkpointed recompute: the residual stream and that layer's activations (counted as a frozen layer saves them,
    an upper bound), then the fused head's logits tile (TRL scores the reference through the same fused head).
    Counted on top of the policy's activations: an upper bound, as the policy's backward starts after it ends."""
    per_layer = activation_bytes({**shape, "num_layers": 1}, micro_batch=1, seq_len=tokens, act_bytes=act_bytes,
                                 gradient_checkpointing=False, base_trains=False, lora_input_bytes=0,
                                 eager_attention=False, fused_lm_head=True, triton=triton)
    return tokens * act_bytes * shape["hidden_size"] + per_layer


def activation_bytes(shape: dict, *, micro_batch: int, seq_len: int, act_bytes: int, gradient_checkpointing: bool,
                     base_trains: bool, lora_input_bytes: float, eager_attention: bool, fused_lm_head: bool = True,
                     triton: bool = True, head_input_bytes: int | None = None) -> float:
    """Bytes autograd keeps for backward, for one micro-batch of micro_batch x seq_len tokens (a decoder-only LM),
    plus the loss head's working memory at its backward (when everything else is still held).

    Counted per token and layer from what each op saves (HF Llama-style layer, SDPA attention):
      two RMSNorm inputs, upcast to fp32 and saved by pow/mul                      8h
      SDPA: q, k, v after RoPE and its output (+ an fp32 logsumexp per head)       a(2*q_dim + 2*kv_dim)
      SwiGLU: gate output, SiLU output, up output (inputs of SiLU and the product)  3aI (2aI without a gate)
      inputs of q/k/v, o_proj, gate/up, down_proj: kept only to form weight
        gradients, so only when the base trains (full FT)                            a(2h + q_dim + I)
      LoRA: lora_A's own copy of each adapted input (+1-byte dropout mask)           lora_input_bytes * sum(in)
      eager attention: the fp32 softmax and its compute-dtype copy                  (4 + a) * heads * seq_len
    plus the head (lm_head_bytes). Gradient checkpointing keeps only each layer's input (a*h per token) and
    recomputes one layer at a time. fused_lm_head/triton/head_input_bytes: see lm_head_bytes.
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
    head = lm_head_bytes(shape, tokens=tokens, act_bytes=act_bytes, base_trains=base_trains,
                         fused=fused_lm_head, triton=triton, head_input_bytes=head_input_bytes)
    if gradient_checkpointing:
        return n_layers * tokens * act_bytes * h + per_layer + head
    return n_layers * per_layer + head


def lm_head_bytes(shape: dict, *, tokens: int, act_bytes: int, base_trains: bool, fused: bool = True,
                  triton: bool = True, head_input_bytes: int | None = None) -> float:
    """Bytes of the final norm, lm_head and loss for `tokens` tokens: what they save for backward plus their
    working memory at its peak (the head's backward, when every other activation is still held).

    Always: the final norm's fp32 input (4h per token), and its compute-dtype output when the norm's weight trains.
    fused (TRL's fused LM head, see FUSED_HEAD_*): its own copy of the hidden states it projects (head_input_bytes*h
    per token: the compute dtype, or fp32 for QLoRA, whose fp32 final norm weight promotes its output), the per-token
    fp32 statistics, and in backward the fp32 hidden-state gradient (4h per token), the fp32 lm_head weight gradient
    when the base trains (V*h*4), and ONE logits tile of min(tokens, 4096) x min(V, 32768) in the compute dtype
    (+FUSED_HEAD_TORCH_FOLD_BYTES per element where `triton` is False: CPU). On CUDA only the labelled positions
    are projected; all tokens are counted (packed rows are nearly all labelled).
    not fused (a plain Trainer's loss): the lm_head input when it trains, and the full [tokens, V] logits: compute-
    dtype logits, the loss's fp32 upcast and the fp32 log-softmax (10 bytes per vocabulary entry and token in bf16).
    """
    h, vocab = shape["hidden_size"], shape["vocab_size"]
    norm = tokens * (BYTES_PER_PARAM_FP32 * h + (act_bytes * h if base_trains else 0))
    if not fused:
        upcast = BYTES_PER_PARAM_FP32 if act_bytes < BYTES_PER_PARAM_FP32 else 0  # no copy when already fp32
        return norm + tokens * vocab * (act_bytes + upcast + BYTES_PER_PARAM_FP32)
    head_input_bytes = head_input_bytes or act_bytes
    saved = tokens * (head_input_bytes * h + FUSED_HEAD_TOKEN_STATS * BYTES_PER_PARAM_FP32)
    tile = min(tokens, FUSED_HEAD_TOKEN_CHUNK) * min(vocab, FUSED_HEAD_VOCAB_CHUNK)
    working = (tokens * BYTES_PER_PARAM_FP32 * h
               + (vocab * h * BYTES_PER_PARAM_FP32 if base_trains else 0)
               + tile * (act_bytes + (0 if triton else FUSED_HEAD_TORCH_FOLD_BYTES)))
    return norm + saved + working


def adapter_bytes(method: str, *, compute_bytes: int, deepspeed: bool, optim: str) -> dict[str, float]:
    """Bytes per trainable adapter parameter (LoRA A/B, trainable token rows): {"weights", "gradients", "optimizer"}.

    What the code does, by case:
      DeepSpeed in bf16/fp16 (any stage): its engine casts every float parameter to the compute dtype (ZeRO-3: the
        adapters are built in the base's dtype, autocast_adapter_dtype=False) and its optimizer keeps an fp32 master
        copy and fp32 gradients; Adam's states live on the fp32 master.
      QLoRA without DeepSpeed: TRL's SFTTrainer casts every trainable parameter of a 4-bit model to bf16 (also when
        the PeftModel was built by tunekit: `is_loaded_in_4bit` reaches the base through peft's getattr), so weights
        and gradients are 2 B; torch's AdamW keeps m and v in the parameter's dtype, bitsandbytes' do not.
      LoRA without DeepSpeed (or DeepSpeed in fp32): peft's fp32 adapters, fp32 gradients and states, no master.
    """
    mixed = compute_bytes < BYTES_PER_PARAM_FP32
    fp32_adam = ADAM_BYTES_PER_PARAM[optim]
    if deepspeed and mixed:
        return {"weights": compute_bytes, "gradients": BYTES_PER_PARAM_GRAD,
                "optimizer": fp32_adam + BYTES_PER_PARAM_MASTER}
    if method == "qlora":
        states = fp32_adam
        if optim in STATES_IN_PARAM_DTYPE:  # m and v in bf16, like the parameter
            states = fp32_adam * BYTES_PER_PARAM_BF16 / BYTES_PER_PARAM_FP32
        return {"weights": BYTES_PER_PARAM_BF16, "gradients": BYTES_PER_PARAM_BF16, "optimizer": states}
    return {"weights": BYTES_PER_PARAM_ADAPTER, "gradients": BYTES_PER_PARAM_FP32, "optimizer": fp32_adam}


def memory_bytes(shape: dict, *, method: str, gpus: int = 1, device: str = "cuda", precision: str = "bf16",
                 base_dtype_bytes: int | None = None, optim: str = "adamw_torch", zero_stage: int = 0,
                 offload_optimizer: bool = False, offload_param: bool = False, micro_batch: int = 1,
                 seq_len: int = 2048, gradient_checkpointing: bool = False, lora_dropout: float = 0.0,
                 double_quant: bool = True, attn_implementation: str | None = "sdpa", deepspeed: bool | None = None,
                 fused_lm_head: bool = True, pairs: bool = False, reference: str | None = None) -> dict[str, Any]:
    """Memory of one training run, by bucket: {"per_device": {...}, "job": {...}, "cpu_offload": bytes}.

    Buckets: weights, gradients, optimizer (Adam m/v + fp32 master), activations, overhead, total, and for DPO
    (`reference` not None) reference. "per_device" is
    one GPU (or process); "job" sums all `gpus` of them (a sharded bucket counts once, a replicated one `gpus` times).
    ZeRO shards the optimizer from stage 1, gradients from stage 2, weights at stage 3; stage 0 is plain data
    parallelism (every GPU holds everything). Offloaded buckets move to "cpu_offload" (host memory).
    deepspeed: whether DeepSpeed runs (None: when zero_stage > 0, and for full). A full run without it (the plain
    Trainer: `deepspeed.stage: auto` on one process) keeps fp32 weights under autocast, which are also the master
    copy. fused_lm_head: TRL's chunked loss (True, what tunekit's SFTTrainer runs) or full logits (lm_head_bytes).
    pairs: preference objectives (dpo, orpo) run chosen and rejected in one batch: 2 x micro_batch sequences.
    reference: DPO's reference model, "model" or "precomputed" (None: sft, orpo: there is none). "model": full
    fine-tuning holds a frozen copy of the weights (DeepSpeed's engine casts it to the compute dtype, the plain
    Trainer keeps the load dtype; no gradients, no optimizer state; sharded at ZeRO-3 and offloaded with the
    parameters, whole on every rank otherwise); LoRA/QLoRA's reference is the base with the adapter disabled (no
    bytes); either way its no-grad forward adds reference_forward_bytes. "precomputed": the log-probs are computed
    once before training, so no reference is held or run during it (reference bucket 0).
    """
    compute_bytes = PRECISION_BYTES[precision]
    mixed = compute_bytes < BYTES_PER_PARAM_FP32
    deepspeed = (zero_stage > 0 or method == "full") if deepspeed is None else deepspeed
    adam = ADAM_BYTES_PER_PARAM[optim]
    n_params, n_trainable = shape["params"], shape["trainable_params"]
    head_input_bytes = compute_bytes
    if method == "full":
        # DeepSpeed casts the weights to the compute dtype and keeps an fp32 master copy in the optimizer; the plain
        # Trainer loads fp32 (backends.common.load_dtype) and autocasts, so its weights are their own master copy.
        weights = n_params * (compute_bytes if deepspeed else BYTES_PER_PARAM_FP32)
        gradients = n_params * BYTES_PER_PARAM_GRAD
        optimizer = n_params * (adam + (BYTES_PER_PARAM_MASTER if mixed and deepspeed else 0))
    else:
        if method == "qlora":
            quantized = shape["linear_params"]
            constants = BYTES_PER_PARAM_NF4_CONSTANTS_DOUBLE_QUANT if double_quant else BYTES_PER_PARAM_NF4_CONSTANTS
            # Embeddings, lm_head, norms: fp32 after prepare_model_for_kbit_training, unless DeepSpeed's bf16/fp16
            # engine casts them back. An fp32 final norm promotes its output, the fused head's input, to fp32.
            unquantized_bytes = compute_bytes if deepspeed and mixed else BYTES_PER_PARAM_QLORA_UNQUANTIZED
            head_input_bytes = unquantized_bytes
            base = (quantized * (BYTES_PER_PARAM_NF4 + constants)
                    + (n_params - quantized) * unquantized_bytes)
        else:
            base = n_params * (base_dtype_bytes or compute_bytes)
        adapter = adapter_bytes(method, compute_bytes=compute_bytes, deepspeed=deepspeed, optim=optim)
        weights = base + n_trainable * adapter["weights"]
        gradients = n_trainable * adapter["gradients"]
        optimizer = n_trainable * adapter["optimizer"]

    shard = {"weights": zero_stage >= 3, "gradients": zero_stage >= 2, "optimizer": zero_stage >= 1,
             "reference": zero_stage >= 3}  # TRL prepares the reference with the policy's ZeRO-3, else stage 0
    job = {"weights": weights, "gradients": gradients, "optimizer": optimizer}
    if reference is not None:
        holds_copy = reference == "model" and method == "full"
        job["reference"] = n_params * (compute_bytes if deepspeed else BYTES_PER_PARAM_FP32) if holds_copy else 0.0
    per_device = {key: value / gpus if shard[key] else value for key, value in job.items()}
    job = {key: value if shard[key] else value * gpus for key, value in job.items()}
    cpu_offload = 0.0
    offload_weights = offload_param and zero_stage >= 3
    for key, offloaded in (("optimizer", offload_optimizer), ("weights", offload_weights),
                           ("reference", offload_weights and reference is not None)):
        if offloaded:
            cpu_offload += job[key]
            per_device[key] = job[key] = 0.0

    # peft casts each adapted input to the adapter's dtype and applies dropout; lora_A saves its input: a new tensor
    # whenever the cast or dropout made one (re-cast to the compute dtype under autocast), plus dropout's 1-byte mask.
    lora_input_bytes = 0.0
    if method != "full":
        adapter_dtype_bytes = adapter["weights"]
        if lora_dropout > 0 or adapter_dtype_bytes != compute_bytes:
            lora_input_bytes = (compute_bytes if mixed else adapter_dtype_bytes) + (1 if lora_dropout > 0 else 0)
    sequences = micro_batch * (2 if pairs else 1)  # a preference batch is [chosen..., rejected...]
    per_device["activations"] = activation_bytes(
        shape, micro_batch=sequences, seq_len=seq_len, act_bytes=compute_bytes,
        gradient_checkpointing=gradient_checkpointing, base_trains=method == "full",
        lora_input_bytes=lora_input_bytes, eager_attention=attn_implementation == "eager",
        fused_lm_head=fused_lm_head, triton=device == "cuda", head_input_bytes=head_input_bytes,
    )
    if reference == "model":
        per_device["activations"] += reference_forward_bytes(shape, tokens=sequences * seq_len,
                                                             act_bytes=compute_bytes, triton=device == "cuda")
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
