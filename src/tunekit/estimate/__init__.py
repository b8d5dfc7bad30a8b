"""Pre-flight: will this run fit, how long will it take, what will it cost — from the model's config alone.

One module per concern, each a set of plain functions:
  shapes.py      where the model's config comes from (shipped, local, hub id known offline, hub) and count_params,
                 which builds the model on the meta device (no weights, no download) and reads the real module shapes
  memory.py      the byte model: pure arithmetic on a shape, bytes per bucket, per GPU and summed over the job's GPUs
  cost.py        tokens (from max_steps or the data, read with tunekit.data) -> FLOPs -> hours -> USD
  settings.py    a RunConfig's shape (config_shape) and memory_bytes arguments for one DeepSpeed set-up
  stage.py       deepspeed.stage auto: choose_zero, the cheapest set-up that fits (no DeepSpeed/DDP, ZeRO 1-3, offload)
  job.py         estimate(config): a RunConfig mapped onto the three above, for its method and the other two
  formatting.py  format_estimate and advice: one screen of text
  preflight.py   preflight_check, which `tunekit train` calls before loading anything, and the hardware probe
                 (the real GPU and WORLD_SIZE; `machine` is its pure core)
`recommend.py` reuses memory_bytes, min_gpus and training_flops with a shape guessed from a parameter count, so both
commands share one byte model. The names below are the package's public surface (`from tunekit.estimate import X`).
"""

from tunekit.estimate.cost import (
    DEFAULT_MFU,
    DEFAULT_USD_PER_GPU_HOUR,
    PEAK_TFLOPS_A100_BF16,
    QLORA_THROUGHPUT_FACTOR,
    count_examples,
    training_flops,
    training_hours,
    training_tokens,
)
from tunekit.estimate.formatting import advice, format_estimate
from tunekit.estimate.job import estimate
from tunekit.estimate.settings import config_shape, lora_settings
from tunekit.estimate.memory import (
    ADAM_BYTES_PER_PARAM,
    ALLOCATOR_FRAGMENTATION,
    BYTES_PER_PARAM_ADAPTER,
    BYTES_PER_PARAM_BF16,
    BYTES_PER_PARAM_FP32,
    BYTES_PER_PARAM_GRAD,
    BYTES_PER_PARAM_MASTER,
    BYTES_PER_PARAM_NF4,
    BYTES_PER_PARAM_NF4_CONSTANTS,
    BYTES_PER_PARAM_NF4_CONSTANTS_DOUBLE_QUANT,
    BYTES_PER_PARAM_QLORA_UNQUANTIZED,
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    FUSED_HEAD_TOKEN_CHUNK,
    FUSED_HEAD_VOCAB_CHUNK,
    GB,
    PRECISION_BYTES,
    ZERO3_GATHER_FACTOR,
    activation_bytes,
    adapter_bytes,
    lm_head_bytes,
    memory_bytes,
    min_gpus,
)
from tunekit.estimate.preflight import Machine, machine, preflight_check, probe_hardware
from tunekit.estimate.shapes import (
    HUB_IDS,
    MODEL_CONFIG_DIR,
    SHIPPED_PREFIX,
    count_params,
    resolve_model_config,
    shape_source,
    shipped_model_configs,
    shipped_name,
)

__all__ = [
    "ADAM_BYTES_PER_PARAM", "ALLOCATOR_FRAGMENTATION", "BYTES_PER_PARAM_ADAPTER", "BYTES_PER_PARAM_BF16",
    "BYTES_PER_PARAM_FP32", "BYTES_PER_PARAM_GRAD", "BYTES_PER_PARAM_MASTER", "BYTES_PER_PARAM_NF4",
    "BYTES_PER_PARAM_NF4_CONSTANTS", "BYTES_PER_PARAM_NF4_CONSTANTS_DOUBLE_QUANT",
    "BYTES_PER_PARAM_QLORA_UNQUANTIZED", "CPU_RUNTIME_BYTES", "CUDA_CONTEXT_BYTES", "DEFAULT_MFU",
    "DEFAULT_USD_PER_GPU_HOUR", "DTYPE_BYTES", "FUSED_HEAD_TOKEN_CHUNK", "FUSED_HEAD_VOCAB_CHUNK", "GB", "HUB_IDS",
    "MODEL_CONFIG_DIR", "Machine", "PEAK_TFLOPS_A100_BF16", "PRECISION_BYTES", "QLORA_THROUGHPUT_FACTOR",
    "SHIPPED_PREFIX", "ZERO3_GATHER_FACTOR", "activation_bytes", "adapter_bytes", "advice", "config_shape",
    "count_examples", "count_params", "estimate", "format_estimate", "lm_head_bytes", "lora_settings", "machine",
    "memory_bytes", "min_gpus", "preflight_check", "probe_hardware", "resolve_model_config", "shape_source",
    "shipped_model_configs", "shipped_name", "training_flops", "training_hours", "training_tokens",
]
