"""What every backend shares: the tokenizer, the device/precision decision, load arguments and the trainer arguments.

A backend (full.py, lora.py) only decides how the model is built; the training arguments, data, callbacks and the
save path are the same for all three methods.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch

from tunekit.config import RunConfig
from tunekit.distributed import is_rank_zero, set_default_timeout
from tunekit.errors import UserError, first_line


def on_gpu() -> bool:
    return torch.cuda.is_available()


def bf16_native() -> bool:
    """A GPU with bf16 in hardware (compute capability 8.0+). torch's default also counts emulated bf16 (V100, T4:
    it runs, without bf16 tensor cores), which 'auto' must not pick."""
    return on_gpu() and torch.cuda.is_bf16_supported(including_emulation=False)


def precision(config: RunConfig) -> str:
    """fp32 | bf16 | fp16 for this run on this machine (`resolve_precision` with this machine's facts)."""
    return resolve_precision(config.training.precision, on_gpu(), bf16_native())


def resolve_precision(wanted: str, cuda_available: bool, bf16_native: bool) -> str:
    """fp32 | bf16 | fp16 after resolving 'auto': bf16 on a GPU with native bf16, fp32 elsewhere (CPU autocast bf16 is
    slower than fp32 for these small matmuls and the CPU stack verified fp32). Raises UserError for fp16 without a
    GPU."""
    if wanted == "auto":
        return "bf16" if cuda_available and bf16_native else "fp32"
    if wanted == "fp16" and not cuda_available:
        raise UserError("training.precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return wanted


def weights_dtype(config: RunConfig) -> torch.dtype:
    """dtype the (trainable or frozen) weights are loaded in (`load_dtype` for this run on this machine)."""
    return load_dtype(config.method, config.model.dtype, precision(config), config.deepspeed is not None)


def load_dtype(method: str, model_dtype: str, mode: str, deepspeed: bool) -> torch.dtype:
    """dtype from_pretrained loads the weights in, from the method, model.dtype, the resolved precision `mode` and
    whether DeepSpeed runs.

    LoRA/QLoRA: the frozen base sits in bf16 when training in bf16 (the adapters' dtype: `lora.autocast_adapters`).
    Full FT under DeepSpeed in half precision: the engine casts every weight to that precision before it builds the
    optimizer, whose fp32 master copy is made from those half-precision values (ZeRO 1/2: the optimizer's fp32
    partitions; ZeRO-3: zero.Init already stores the shards in the config's dtype). Loading fp32 first would only
    cost 4 B/param of host RAM per rank (32 GB x 8 ranks for an 8B model) for the same numbers. Full FT in fp32 (or
    without DeepSpeed, which the schema does not allow today) loads fp32.
    """
    if model_dtype != "auto":
        return getattr(torch, model_dtype)
    if method != "full" and mode == "bf16":
        return torch.bfloat16
    if method == "full" and deepspeed and mode in ("bf16", "fp16"):
        return torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.float32


def zero_stage(config: RunConfig) -> int | None:
    """The ZeRO stage this run uses, or None without DeepSpeed."""
    return config.deepspeed.zero_stage() if config.deepspeed is not None else None


def local_rank() -> int:
    """This process's GPU index on its node: LOCAL_RANK, set by every launcher (and by `process_setup` for a run of
    one process under DeepSpeed); 0 for a plain single-process run."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_map(cuda_available: bool, zero_stage: int | None, local_rank: int) -> dict[str, int] | None:
    """from_pretrained's device_map: the whole model on this process's GPU, or None (load on the CPU).

    On a GPU the weights must be there from the start: the base model's task metric and general-text loss run
    before the Trainer moves the model (hours of CPU generation for an 8B model, and flash attention refuses CPU
    tensors), and bitsandbytes quantizes on the device it loads to. The index is the Trainer's own device
    (cuda:LOCAL_RANK), so it sees one device that is its own and does not treat the model as split. None under
    ZeRO-3 (zero.Init partitions the weights as they load; transformers refuses a device_map there) and on CPU.
    """
    if not cuda_available or zero_stage == 3:
        return None
    return {"": local_rank}


# sdpa's boolean mask (1 B/element) and the additive bias the CUDA kernel makes of it (2 B/element in bf16/fp16).
SDPA_MASK_BYTES_PER_ELEMENT = 3


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """What `choose_attention` decided: the attn_implementation to load with (None: the model's default kernel), a
    one-line warning to print, or a one-line refusal (raise it as a UserError)."""

    implementation: str | None
    warning: str | None = None
    refusal: str | None = None


def choose_attention(cuda_available: bool, packing: bool, attn: str | None, flash_available: bool, half_weights: bool,
                     micro_batch: int, max_seq_len: int, device_memory_bytes: int | None = None,
                     default_kernel: str = "sdpa") -> AttentionChoice:
    """The attention kernel for this run, from explicit facts. attn None: model.attn_implementation is auto;
    flash_available: flash-attn is installed AND the model supports it; default_kernel: what the model loads
    without a choice (sdpa, or eager for models without sdpa support such as Gemma 2).

    Packing is padding-free in TRL: a micro-batch of B rows of L tokens is flattened into one row of B*L tokens with
    per-example position_ids. flash attention's varlen kernel reads the example boundaries and costs O(B*L); sdpa (and
    eager) need a [1, 1, B*L, B*L] mask that keeps examples apart, quadratic in the micro-batch
    (`SDPA_MASK_BYTES_PER_ELEMENT` bytes per element). So on a GPU with packing, when model.attn_implementation is
    auto: flash attention when it is available and the weights are bf16/fp16 (it has no fp32 kernel; losses are the
    same, only the kernel changes). Otherwise (or when sdpa/eager is asked for) a warning with the mask's size, or a
    refusal when that mask alone exceeds the device's memory. On CPU, or without packing, the config's setting is
    kept as it is (the CPU tests rely on sdpa's packed mask).
    """
    if not cuda_available or not packing or attn == "flash_attention_2":
        return AttentionChoice(attn)
    if attn is None and flash_available and half_weights:
        return AttentionChoice("flash_attention_2")
    tokens = micro_batch * max_seq_len
    mask_bytes = tokens * tokens * SDPA_MASK_BYTES_PER_ELEMENT
    kernel = attn or default_kernel
    if attn is not None:
        why = f"model.attn_implementation is {attn}"
    else:
        why = "flash-attn is not installed" if not flash_available else "flash attention needs bf16/fp16 weights"
    numbers = (f"data.packing: {kernel} attention over packed rows builds a {tokens}x{tokens} mask in every forward "
               f"({micro_batch} rows x {max_seq_len} tokens flattened into one row): {mask_bytes / 1e9:.2f} GB")
    if device_memory_bytes is not None and mask_bytes > device_memory_bytes:
        return AttentionChoice(attn, refusal=f"{numbers}, more than the GPU's {device_memory_bytes / 1e9:.0f} GB "
                                               f"({why}); use flash_attention_2 or a smaller per_device_*_batch_size")
    return AttentionChoice(attn, warning=f"{numbers} ({why}); flash_attention_2 would not need it")


def attention_for(config: RunConfig) -> AttentionChoice:
    """`choose_attention` with this run's settings, this machine's facts and what the model's class supports; the
    implementation is always a concrete kernel (auto resolved the way transformers resolves it), and the refusal
    includes `attention_refusal`'s."""
    from transformers.utils import is_flash_attn_2_available

    hf_config = model_config_or_none(config)
    kernels = supported_kernels(model_class(hf_config) if hf_config is not None else None)
    requested = config.model.attn_implementation
    cuda, packing, t = on_gpu(), config.data.packing, config.training
    choice = choose_attention(
        cuda, packing, None if requested == "auto" else requested,
        cuda and "flash_attention_2" in kernels and is_flash_attn_2_available(),
        half_weights=weights_dtype(config) in (torch.bfloat16, torch.float16),
        micro_batch=max(t.per_device_train_batch_size, t.per_device_eval_batch_size),
        max_seq_len=config.data.max_seq_len,
        device_memory_bytes=gpu_memory_bytes() if cuda and packing else None,
        default_kernel=default_kernel(kernels),
    )
    if choice.implementation is None:
        choice = dataclasses.replace(choice, implementation=default_kernel(kernels))
    refusal = attention_refusal(config, choice.implementation)
    return dataclasses.replace(choice, refusal=refusal) if refusal else choice


def attention_refusal(config: RunConfig, kernel: str | None = None) -> str | None:
    """The one-line refusal (naming the config line) when the model cannot run as configured, else None:
    - a kernel the architecture does not support (Gemma 2 has no sdpa: transformers would raise deep inside
      from_pretrained, after the data is ready);
    - packing with an sdpa/eager `kernel` on an architecture whose mask lets packed examples attend to each other
      (`packing_leaks`: Falcon in transformers 5). kernel None: the one that will load, where it is already known
      without the GPU's facts (the requested one, or auto's default on CPU); on a GPU auto may still pick flash
      attention, and `attention_for` checks again with the kernel it chose.
    Needs no GPU and loads no weights: the pre-flight calls it before the data is tokenized.
    """
    from transformers import __version__ as transformers_version

    from tunekit.config import where

    hf_config = model_config_or_none(config)
    if hf_config is None:
        return None
    cls = model_class(hf_config)
    kernels = supported_kernels(cls)
    name = cls.__name__ if cls is not None else hf_config.model_type
    requested = config.model.attn_implementation
    if requested != "auto" and requested not in kernels:
        return (f"{where(config, 'model.attn_implementation')}: {name} does not support {requested} attention "
                f"(transformers {transformers_version}; it supports {', '.join(kernels)}); use auto")
    if kernel is None:
        kernel = requested if requested != "auto" else (None if on_gpu() else default_kernel(kernels))
    if config.data.packing and kernel in ("sdpa", "eager") and packing_leaks(hf_config, kernel):
        return (f"{where(config, 'data.packing')}: {name} lets packed examples attend to each other under {kernel} "
                f"attention (transformers {transformers_version} builds its mask without the per-example "
                "position_ids); set data.packing: false")
    return None


def default_kernel(kernels: tuple[str, ...]) -> str:
    """What transformers loads when no kernel is asked for: sdpa where the model supports it, else eager."""
    return "sdpa" if "sdpa" in kernels else "eager"


def model_config_or_none(config: RunConfig):
    """The base model's transformers config (a shipped `tunekit:` config too), or None when it cannot be read here:
    remote code, an unreachable hub. Then the attention checks are skipped and from_pretrained has the last word."""
    from tunekit.estimate.shapes import load_hf_config, resolve_model_config

    if config.model.trust_remote_code:
        return None
    try:
        return load_hf_config(resolve_model_config(config.model.name_or_path), config.model.revision)
    except UserError:
        return None


def model_class(hf_config):
    """The class AutoModelForCausalLM builds for `hf_config`, or None for an architecture it does not map."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping.get(type(hf_config), None)


def supported_kernels(cls) -> tuple[str, ...]:
    """Attention kernels the model class declares (its _supports_* flags, read by from_pretrained); all three when
    the class is unknown."""
    if cls is None:
        return ("eager", "sdpa", "flash_attention_2")
    return ("eager",) + (("sdpa",) if cls._supports_sdpa else ()) + (("flash_attention_2",) if cls._supports_flash_attn
                                                                      else ())


TWIN_HEAD_DIM = 8  # the probe model's sizes: heads x 8 hidden, 2 layers, 64-token vocabulary, 4 experts
TWIN_VOCAB = 64


def packing_leaks(hf_config, kernel: str) -> bool:
    """True when packed rows of this architecture let one example attend to another under `kernel` (sdpa/eager).

    Whether a model keeps packed examples apart is a property of its modeling code (its mask must be built from the
    per-example position_ids TRL's padding-free collator passes), not of its weights. So a random-init twin of the
    architecture, a few thousand parameters built from the same config class (`twin_config`), runs two short
    examples packed into one row and the second one alone: their logits must agree. ~20 ms on a CPU. False when the
    twin cannot be built (an architecture whose config does not shrink this way): from_pretrained decides then.
    """
    from transformers import AutoModelForCausalLM

    try:
        twin = twin_config(hf_config)
        # Its random init must not draw from the global RNG: this runs after set_seed, before the LoRA init.
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(twin, dtype=torch.float32, attn_implementation=kernel).eval()
    except Exception:  # noqa: BLE001 - the probe is best effort; the tests cover every family we ship for
        return False
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(1, TWIN_VOCAB, (1, n), generator=generator) for n in (6, 5))
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]  # per-example positions, as TRL packs them
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
    return (packed[0, 6:] - alone[0]).abs().max().item() > 1e-4


def twin_config(hf_config):
    """A copy of `hf_config` shrunk to a few thousand parameters: at most 4 heads of TWIN_HEAD_DIM, 2 layers (one of
    each of the first two layer types: sliding and full attention both run), 16-wide MLPs, at most 4 experts."""
    import copy

    twin = copy.deepcopy(hf_config)
    heads = min(getattr(twin, "num_attention_heads", 2) or 2, 4)
    sets = {"vocab_size": TWIN_VOCAB, "num_attention_heads": heads, "hidden_size": heads * TWIN_HEAD_DIM,
            "num_hidden_layers": min(twin.num_hidden_layers, 2), "use_cache": False}
    for key in ("num_key_value_heads", "num_kv_heads"):
        if getattr(twin, key, None):
            sets[key] = 2 if heads % 2 == 0 else 1
    if vars(twin).get("head_dim"):  # a stored field (Falcon's is a read-only property)
        sets["head_dim"] = TWIN_HEAD_DIM
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "n_inner"):
        if getattr(twin, key, None):
            sets[key] = 16
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(twin, key, None):
            sets[key] = min(getattr(twin, key), 4)
    if getattr(twin, "num_experts_per_tok", None):
        sets["num_experts_per_tok"] = min(twin.num_experts_per_tok, 2)
    types = getattr(twin, "layer_types", None)
    if types:
        firsts = sorted({kind: index for index, kind in reversed(list(enumerate(types)))}.values())[:2]
        sets["layer_types"] = ([types[i] for i in firsts] * 2)[:sets["num_hidden_layers"]]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(twin, key, None), int):
            sets[key] = 0  # the embedding's padding_idx must fit the small vocabulary
    for key, value in sets.items():
        setattr(twin, key, value)
    return twin


def gpu_memory_bytes() -> int:
    """Total memory of this process's GPU (cuda:LOCAL_RANK, the device the Trainer and `device_map` use)."""
    return torch.cuda.get_device_properties(local_rank()).total_memory


def load_tokenizer(config: RunConfig):
    """The run's tokenizer, with a pad token (eos when it has none) and the config's new tokens added."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            config.model.name_or_path, trust_remote_code=config.model.trust_remote_code, revision=config.model.revision
        )
    except Exception as exc:  # noqa: BLE001 - whatever the library raises on a user's files is one line for the user
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {config.model.name_or_path}: "
                        f"{first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if config.model.add_tokens:
        tokenizer.add_tokens(config.model.add_tokens)
    return tokenizer


def load_kwargs(config: RunConfig, attn_implementation: str | None = None) -> dict[str, Any]:
    """from_pretrained keyword arguments shared by every method: safetensors only, no remote code unless asked, on
    this process's GPU unless ZeRO-3 shards the load (`device_map`), with the attention kernel `attention_for` chose."""
    kwargs: dict[str, Any] = {
        "dtype": weights_dtype(config),
        "trust_remote_code": config.model.trust_remote_code,
        "use_safetensors": True,  # never unpickle .bin weights
        "revision": config.model.revision,
    }
    placement = device_map(on_gpu(), zero_stage(config), local_rank())
    if placement is not None:
        kwargs["device_map"] = placement
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def from_pretrained(config: RunConfig, **extra: Any):
    """AutoModelForCausalLM.from_pretrained with our defaults; load failures become one-line UserErrors, and so does
    an attention kernel that cannot fit (`attention_for`; its warning is printed once, by rank 0)."""
    from transformers import AutoModelForCausalLM

    attention = attention_for(config)
    if attention.refusal:
        raise UserError(attention.refusal)
    if attention.warning and is_rank_zero():
        print(f"warning: {attention.warning}", file=sys.stderr)
    try:
        return AutoModelForCausalLM.from_pretrained(config.model.name_or_path,
                                                    **load_kwargs(config, attention.implementation), **extra)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, corrupt safetensors, bad config.json, no weights...
        raise UserError(f"model.name_or_path: cannot load {config.model.name_or_path}: {first_line(exc)}") from None


def stop_generation_config(model, tokenizer):
    """A copy of `model`'s generation config (a peft model: its base's) whose eos_token_id holds the model's own eos
    ids, the tokenizer's eos and the chat template's end-of-turn token (`chat.end_of_turn_token`), in that order.

    Chat templates end an assistant turn with their own token (Llama 3 <|eot_id|>, ChatML <|im_end|>, Gemma
    <end_of_turn>, Phi-3 <|end|>), which is often not eos: a model fine-tuned on chat learns to emit it, and generate
    (and vLLM, which reads generation_config.json) must stop there, not run on into a made-up next turn.
    """
    import copy

    from tunekit.chat import end_of_turn_token

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.generation_config)
    own = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    end = end_of_turn_token(tokenizer)
    candidates = [*own, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end) if end is not None else None]
    ids = list(dict.fromkeys(i for i in candidates if i is not None and i != tokenizer.unk_token_id))
    config.eos_token_id = ids if len(ids) > 1 else (ids[0] if ids else None)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    config._from_model_config = False  # ours now: generate must not rebuild it from config.json's single eos
    return config


def resize_for_new_tokens(model, tokenizer, new_tokens: list[str]) -> list[int]:
    """Grow the embeddings to the tokenizer's size when it outgrew them; return the ids of `new_tokens` (the rows a
    LoRA run trains). Empty when nothing was asked for.

    A token that already had a row (a reserved token, or a vocabulary padded past the tokenizer's size) is trained
    too: its row was never trained for the meaning the user is about to give it.
    """
    if not new_tokens:
        return []
    # num_embeddings, not weight.shape: under ZeRO-3 the local weight is a size-0 placeholder.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # mean_resizing: new rows start at the mean embedding, so untrained new tokens don't dominate the softmax.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return sorted(set(tokenizer.convert_tokens_to_ids(new_tokens)))


LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")  # set by accelerate launch, torchrun, deepspeed and srun wrappers


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
    """How this process joins (or forms) a process group, decided by `process_setup`.

    group_of_one: not started by a launcher but DeepSpeed runs: set the environment a launcher would (RANK 0 of
        WORLD_SIZE 1 on 127.0.0.1), so the set-up below takes the launched path instead of MPI discovery.
    gloo_state: CPU under DeepSpeed: build a DeepSpeed-flavoured PartialState on gloo ourselves and have the Trainer
        use it (left alone, the Trainer treats `use_cpu` as "no DeepSpeed" and DeepSpeed then fails in
        from_pretrained with "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
        world_size"). On a GPU the Trainer's own set-up is the launched one: with LOCAL_RANK set and DeepSpeed on,
        accelerate's PartialState starts nccl through deepspeed.comm (auto_mpi_discovery=False).
    """

    group_of_one: bool = False
    gloo_state: bool = False


def process_setup(uses_deepspeed: bool, cuda_available: bool, visible_gpus: int,
                  env: Mapping[str, str]) -> ProcessSetup:
    """The process-group set-up for this process, from explicit facts (`env`: the environment variables).

    Raises UserError, before anything loads, for several visible GPUs without a launcher: one process would leave
    all but one idle, and TRL refuses the nn.DataParallel the Trainer would wrap the model in (after the load).
    Without DeepSpeed nothing is needed: a single process runs without a group, a launched one gets the Trainer's.
    """
    launched = any(name in env for name in LAUNCHER_ENV)
    if cuda_available and visible_gpus > 1 and not launched:
        launcher = "single-node-8gpu-zero3.yaml" if uses_deepspeed else "single-node-8gpu-ddp.yaml"
        raise UserError(f"tunekit train: {visible_gpus} GPUs are visible to one process; start one process per GPU "
                        f"with `accelerate launch --config_file configs/accelerate/{launcher} --num_processes "
                        f"{visible_gpus} -m tunekit train CONFIG` (docs/launching.md), or make one GPU visible with "
                        "CUDA_VISIBLE_DEVICES=0")
    if not uses_deepspeed:
        return ProcessSetup()
    return ProcessSetup(group_of_one=not launched, gloo_state=not cuda_available)


def check_launch(config: RunConfig) -> None:
    """Refuse (UserError) a launch `process_setup` refuses on this machine; call it before anything loads."""
    process_setup(config.deepspeed is not None, on_gpu(), torch.cuda.device_count(), os.environ)


def set_up_processes(deepspeed_config: dict | None, timeout_seconds: int = 1800) -> bool:
    """Apply `process_setup` for this machine; return True when a PartialState was configured here (the Trainer must
    then use it). `timeout_seconds`: its collectives' timeout (training.ddp_timeout; the Trainer's own set-up takes
    it from SFTConfig.ddp_timeout)."""
    setup = process_setup(deepspeed_config is not None, on_gpu(), torch.cuda.device_count(), os.environ)
    if deepspeed_config is None:
        turn_off_deepspeed()
    if setup.group_of_one:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    # torch's default for groups made without a timeout: DeepSpeed's copy of the world group (ZeRO's gradient
    # reduce-scatter), and the world group on the CPU DDP path, which TrainingArguments makes without its
    # ddp_timeout (transformers 5.23 _setup_devices, use_cpu). The other paths pass ddp_timeout explicitly.
    set_default_timeout(timeout_seconds)
    if not setup.gloo_state:
        return False
    from datetime import timedelta

    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=timedelta(seconds=timeout_seconds))  # -> deepspeed.init_distributed(timeout)
    return True


def turn_off_deepspeed() -> None:
    """For a run without DeepSpeed (stage auto chose the plain Trainer or DDP; LoRA without a section), undo what
    would still turn it on:
    - a DeepSpeed launcher (accelerate's distributed_type DEEPSPEED, e.g. configs/accelerate/cpu-2proc-zero3.yaml)
      sets ACCELERATE_USE_DEEPSPEED=true in every rank: TrainingArguments would then build a DeepSpeed engine from
      the launcher's defaults, not from this run's choice. The run goes on as DDP over the launcher's processes.
    - a ZeRO-3 run earlier in this process leaves transformers' zero3 flag on (a weak reference the finished
      Trainer's arguments may still hold): from_pretrained would partition the weights with zero.Init.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
        if is_rank_zero():
            print("note: the launcher is configured for DeepSpeed, but this run trains without it (deepspeed.stage "
                  "auto chose DDP, or there is no deepspeed section): running as DDP over its processes",
                  file=sys.stderr)
    unset_hf_deepspeed_config()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_arguments(config: RunConfig, deepspeed_config: dict | None = None):
    """The TRL config of this run's objective (SFTConfig, DPOConfig or ORPOConfig) for any method: the Trainer
    settings every objective shares (`trainer_settings`) plus the objective's own. Must be built BEFORE
    from_pretrained under ZeRO-3 so weights shard at load (a full DPO run's reference model too)."""
    from tunekit.estimate.checkpoint import MIN_DDP_TIMEOUT_S

    timeout = config.training.ddp_timeout or MIN_DDP_TIMEOUT_S  # null: train.with_ddp_timeout sizes it for a run
    use_configured_state = set_up_processes(deepspeed_config, timeout)
    shared = trainer_settings(config, deepspeed_config, use_configured_state, timeout)
    if config.objective == "sft":
        from trl import SFTConfig

        return SFTConfig(
            **shared,
            # data: already tokenized, masked and truncated by tunekit.data; TRL only packs.
            max_length=config.data.max_seq_len,
            packing=config.data.packing,
            # tunekit.data already truncated, masked and dropped loss-less examples: TRL's own pass would only redo
            # it (uncached, on every run). With packing TRL must still run it, to pack.
            dataset_kwargs={"skip_prepare_dataset": not config.data.packing},
            packing_strategy="bfd",  # best-fit packing with per-example position_ids: no attention across examples
            padding_free=config.data.packing,
            dataset_num_proc=None,
            completion_only_loss=None,
        )
    return preference_arguments(config, shared)


def preference_arguments(config: RunConfig, shared: dict[str, Any]):
    """DPOConfig / ORPOConfig for `config.objective` from the Trainer settings every objective shares
    (backends.common.trainer_settings) plus the objective's section. No packing; sequences are already truncated to
    data.max_seq_len (max_length only repeats it)."""
    if config.objective == "dpo":
        from trl import DPOConfig

        dpo = config.dpo
        return DPOConfig(
            **shared,
            beta=dpo.beta,
            loss_type=[dpo.loss_type],
            label_smoothing=dpo.label_smoothing,
            precompute_ref_log_probs=dpo.reference == "precomputed",
            max_length=config.data.max_seq_len,
            truncation_mode="keep_start",
            padding_free=False,
            dataset_num_proc=None,
        )
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(
        **shared,
        beta=config.orpo.beta,
        max_length=config.data.max_seq_len,
        remove_unused_columns=False,  # ORPO's collator reads its own columns (else it turns this off with a warning)
        dataset_num_proc=None,
    )


def trainer_settings(config: RunConfig, deepspeed_config: dict | None, use_configured_state: bool,
                     timeout: int) -> dict[str, Any]:
    """transformers.TrainingArguments keywords every objective shares: schedule, batch, precision, logging,
    evaluation and saving cadence, DeepSpeed and the process group."""
    mode = precision(config)
    t, c = config.training, config.checkpoints
    has_eval = config.data.eval_path is not None or config.data.eval_fraction > 0
    return dict(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        bf16=mode == "bf16",
        fp16=mode == "fp16",
        use_cpu=not on_gpu(),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS) if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=c.save_steps,
        save_strategy="steps",
        save_steps=c.save_steps,
        save_total_limit=None,  # retention is ours (callbacks.ConservativeCheckpointCallback): top-k by metric + last n
        report_to=[r for r in config.logging.report_to if r != "none"] or "none",
        run_name=config.logging.run_name or os.path.basename(os.path.normpath(config.output_dir)),
        include_num_input_tokens_seen="non_padding",
        deepspeed=deepspeed_config,
        accelerator_config={"use_configured_state": True} if use_configured_state else None,
        disable_tqdm=False,
        save_only_model=False,
        ddp_find_unused_parameters=False if config.method != "full" else None,
        ddp_timeout=timeout,  # the process group's collective timeout (GPU DDP and DeepSpeed)
    )


# Non-reentrant activation checkpointing (torch's recommendation). TRL 1.16 forces use_reentrant=True for a PEFT model
# under ZeRO-3 (sft_trainer.py, "PEFT + DeepSpeed ZeRO-3 requires reentrant checkpointing") to dodge DeepSpeed#4332:
# the recompute re-partitioned frozen weights to shape [0]. DeepSpeed 0.19.8 (requirements/cpu.txt) keeps frozen
# weights gathered during a recompute (partitioned_param_coordinator.py, in_checkpoint_recompute); the 2-process LoRA
# ZeRO-3 test trains with it. Older DeepSpeed keeps TRL's reentrant switch.
CHECKPOINTING_KWARGS = {"use_reentrant": False}
RECOMPUTE_SAFE_DEEPSPEED = "0.19.8"


def keep_checkpointing_kwargs(trainer) -> None:
    """Undo TRL's switch to use_reentrant=True: put CHECKPOINTING_KWARGS back in the arguments and re-enable
    checkpointing on the model with them (the Trainer enabled it in __init__, with TRL's kwargs). No-op when
    checkpointing is off, the kwargs already are ours, or DeepSpeed predates RECOMPUTE_SAFE_DEEPSPEED."""
    from importlib.metadata import version

    from packaging.version import Version

    args = trainer.args
    if not args.gradient_checkpointing or (args.gradient_checkpointing_kwargs or {}) == CHECKPOINTING_KWARGS:
        return
    if Version(version("deepspeed")) < Version(RECOMPUTE_SAFE_DEEPSPEED):
        return
    kwargs = dict(CHECKPOINTING_KWARGS)
    args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(kwargs))


def resolve_settings(config: RunConfig, args, model):
    """The `rundir.Resolved` record of this run: what "auto" became here, read from the objects that run it.

    args: the built SFTConfig (its world size and DeepSpeed config); model: the loaded (peft) model.
    """
    from tunekit.rundir import Resolved, library_versions

    ds = getattr(args, "hf_deepspeed_config", None)  # set by the Trainer's arguments when DeepSpeed runs
    stage = int(ds.config["zero_optimization"]["stage"]) if ds is not None else None
    device = f"cuda ({torch.cuda.get_device_name(0)})" if on_gpu() else "cpu"
    return Resolved(
        precision=precision(config),
        load_dtype=str(weights_dtype(config)).removeprefix("torch."),
        zero_stage=stage,
        world_size=args.world_size,
        ddp_timeout=args.ddp_timeout,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        device=device,
        versions=library_versions(),
    )


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. A peft model counts itself (its count knows ZeRO-3's size-0 shards and
    bitsandbytes' two 4-bit values per stored byte); a full model has neither 4-bit weights nor adapters, only the
    ZeRO-3 shards, whose full size is ds_numel."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


@contextmanager
def layer_by_layer(model):
    """Inside this block the model can run forward/generate on every rank, whatever ZeRO did to its weights, without
    a whole copy of them on any rank.

    Under ZeRO-3 each rank holds 1/world_size of every weight (the rest are size-0 placeholders). Before training
    (the base model's task metric and general loss) no engine hooks exist yet: for the block, every module gets a
    forward pre-hook that gathers only its own parameters (`parameters(recurse=False)`, e.g. one q_proj's weight)
    and a forward hook that releases them, so at most the largest module is whole at any time, as in training
    (estimate.memory.ZERO3_GATHER_FACTOR). After training the DeepSpeed engine's own hooks on the model already
    gather module by module (with prefetch), and nothing is done here; so also inside a training-time evaluation.
    Collective: every rank must enter, and every rank must then run the same number of forward passes (generate
    keeps the ranks in step with transformers' synced_gpus; evaluate.shard gives each rank the same prompt count).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or hasattr(model, "ds_id"):  # no sharding, or the engine's hooks are on
        yield
        return
    import deepspeed

    handles = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        open_gathers: list = []  # a stack: a module re-entered inside its own forward keeps its first gather

        def gather(module, args, own=own, open_gathers=open_gathers):
            context = deepspeed.zero.GatheredParameters(own) if not open_gathers else None
            if context is not None:
                context.__enter__()
            open_gathers.append(context)

        def release(module, args, output, open_gathers=open_gathers):
            context = open_gathers.pop()
            if context is not None:
                context.__exit__(None, None, None)  # back to this rank's shard

        handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
