"""The model's shape: parameter counts and module sizes from its config alone, built on the meta device.

Where the config comes from, first match wins, and only the last one may touch the network:
  `tunekit:NAME` (or a bare shipped NAME)     src/tunekit/model_configs/NAME.json
  a local path                                its config.json
  a hub id listed in HUB_IDS                  the shipped config with the same module shapes (offline)
  any other hub id                            the local hub cache; else, unless huggingface_hub is offline, one request
torch and transformers are imported inside the functions that build the model, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tunekit.config import LoraConfig
from tunekit.errors import UserError, first_line

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
SHIPPED_PREFIX = "tunekit:"  # `model.name_or_path: tunekit:llama-3-8b` -> model_configs/llama-3-8b.json

# Hub ids (lower case: the hub matches ids case-insensitively) whose config.json builds exactly the modules of a
# shipped config. The instruct/chat variants differ from their base only in token ids, dtype or norm epsilon, none of
# which changes a shape. Not listed on purpose: Llama 3.1+ and Mistral v0.2+ (other RoPE/window settings, and v0.3
# a larger vocabulary) and the 7B/13B CodeLlamas (vocabulary 32016): their configs are not these files.
HUB_IDS = {
    "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama/meta-llama-3-70b": "llama-3-70b",
    "meta-llama/meta-llama-3-70b-instruct": "llama-3-70b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-2-13b-hf": "llama-2-13b",
    "meta-llama/llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "meta-llama/llama-2-70b-chat-hf": "llama-2-70b",
    "mistralai/mistral-7b-v0.1": "mistral-7b",
    "mistralai/mistral-7b-instruct-v0.1": "mistral-7b",
    "codellama/codellama-34b-hf": "codellama-34b",
    "codellama/codellama-34b-instruct-hf": "codellama-34b",
}


def shipped_model_configs() -> list[str]:
    """Short names of the architecture configs shipped in src/tunekit/model_configs/ (use as `tunekit:NAME`)."""
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def shipped_name(name_or_path: str) -> str | None:
    """The shipped config NAME that `name_or_path` stands for (`tunekit:NAME`, a bare NAME that is not a local path,
    or a hub id in HUB_IDS), else None. Raises UserError for `tunekit:NAME` with no such file."""
    if name_or_path.startswith(SHIPPED_PREFIX):
        name = name_or_path.removeprefix(SHIPPED_PREFIX)
        if not (MODEL_CONFIG_DIR / f"{name}.json").is_file():
            raise UserError(f"no shipped model config '{name}' (have: {', '.join(shipped_model_configs())})")
        return name
    if Path(name_or_path).exists():
        return None  # a local directory or file always wins
    if (MODEL_CONFIG_DIR / f"{name_or_path}.json").is_file():
        return name_or_path
    return HUB_IDS.get(name_or_path.lower())


def resolve_model_config(name_or_path: str) -> str:
    """A shipped config's path when `name_or_path` stands for one (see shipped_name), else `name_or_path` unchanged."""
    name = shipped_name(name_or_path)
    return str(MODEL_CONFIG_DIR / f"{name}.json") if name else name_or_path


def shape_source(name_or_path: str) -> str:
    """Where the shape of `name_or_path` comes from, for the estimate's output ("shipped config llama-3-8b")."""
    name = shipped_name(name_or_path)
    if name is not None and name_or_path.lower() in HUB_IDS:
        return f"shipped config {name} (same modules as hub id {name_or_path}; nothing downloaded)"
    if name is not None:
        return f"shipped config {name}"
    return f"local config {name_or_path}" if Path(name_or_path).exists() else f"hub config {name_or_path}"


def count_params(model_config_path_or_dir: str | Path, lora_cfg: LoraConfig | None = None, method: str = "lora",
                 add_tokens: int = 0, revision: str | None = None) -> dict[str, Any]:
    """Parameter counts and the shapes the byte model needs, from the model's config (built on the meta device).

    Returns a dict ("shape") with: params (base model, adapter excluded), trainable_params (all for full; LoRA A/B of
    the adapters peft puts on for lora.target_modules, plus new token rows for lora/qlora),
    lora_params, new_token_params, linear_params (Linear weights except lm_head: what bitsandbytes quantizes),
    matmul_params (params that do a matmul per token: all but a lookup-only input embedding), largest_module_params,
    lora_input_features (sum of in_features over adapted Linears, all layers), the architecture numbers
    hidden_size, num_layers, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size,
    gated_mlp, tied_embeddings, model_type, attn_implementation (the model's default kernel), adapted / not_adapted
    (the pre-flight's "LoRA adapts ..." line) and source (where the config came from, see shape_source).
    Raises UserError when the config cannot be read or a name in lora.target_modules matches no module.
    """
    lora_cfg = lora_cfg if lora_cfg is not None else LoraConfig()
    name = str(model_config_path_or_dir)
    source = resolve_model_config(name)
    train_new_tokens = lora_cfg.train_new_token_embeddings
    targets = lora_cfg.target_modules if lora_cfg.all_linear else tuple(lora_cfg.target_modules)
    shape = dict(_model_shape(source, revision, targets, lora_cfg.r, add_tokens, train_new_tokens))
    if method != "full" and shape["unmatched_targets"]:
        raise UserError(
            f"lora.target_modules: {shape['unmatched_targets']} not found in {name} "
            f"(its Linear names: {', '.join(shape['linear_names'])})"
        )
    if method == "full":
        shape["trainable_params"] = shape["params"]
    else:
        shape["trainable_params"] = shape["lora_params"] + shape["new_token_params"]
    shape["source"] = shape_source(name)
    return shape


def load_hf_config(source: str, revision: str | None = None):
    """transformers' config for a local path or a hub id, without waiting on an unreachable hub.

    A hub id is read from the local hub cache first. If it is not there: with huggingface_hub offline
    (HF_HUB_OFFLINE=1) that is the end; online, one request for its config.json, no retries (huggingface_hub's own
    download retries a failing network for ~25 s). Raises UserError (one line) when the config cannot be had.
    """
    if Path(source).exists():
        return _from_pretrained(source)
    from huggingface_hub import constants

    try:
        return _from_pretrained(source, revision=revision, local_files_only=True)
    except UserError:  # not in the hub cache (or not a hub id): decided below
        pass
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model.name_or_path: cannot read a model config from {source!r}: no such local directory, not in the hub cache, "
                        f"and huggingface_hub is offline (HF_HUB_OFFLINE); {_alternatives()}")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:  # one HEAD request (no retries): an unreachable hub fails it at once, or after HF_HUB_ETAG_TIMEOUT (10 s)
        get_hf_file_metadata(hf_hub_url(source, "config.json", revision=revision), retry_on_errors=False)
    except Exception as exc:  # noqa: BLE001 - unreachable, unknown repo, gated: all "cannot read", one line
        raise UserError(f"model.name_or_path: cannot read a model config from {source!r}: no such local directory, and its hub request "
                        f"failed ({first_line(exc)}); {_alternatives()}") from None
    return _from_pretrained(source, revision=revision)


def _from_pretrained(source: str, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here is "cannot read the config", for the user to fix
        hint = "" if Path(source).is_dir() else f"; {_alternatives()}"  # a local model: its own error is the news
        raise UserError(f"model.name_or_path: cannot read a model config from {source!r} ({first_line(exc)}){hint}") from None


def _alternatives() -> str:
    return ("the estimate needs a local model directory, a shipped config "
            f"({', '.join(SHIPPED_PREFIX + n for n in shipped_model_configs())}) or a hub id with a shipped shape "
            "(e.g. meta-llama/Meta-Llama-3-8B)")


@functools.lru_cache(maxsize=16)
def _model_shape(source: str, revision: str | None, targets: str | tuple[str, ...], r: int, add_tokens: int,
                 train_new_tokens: bool) -> dict[str, Any]:
    """Build the model on the meta device once per (config, LoRA targets, rank) and walk its modules; the adapters are
    put on by peft itself (on the meta device too), so their count is peft's, for every architecture."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from tunekit.lora_targets import unmatched_targets

    hf_config = load_hf_config(source, revision)
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
    layer_params = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    largest_module = max(layer_params, input_emb.weight.numel(), output_emb.weight.numel() if output_emb is not None else 0)

    linear_params = 0
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        # bitsandbytes quantizes nn.Linear and GPT-2's Conv1D (transposed), never the output head.
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output_emb:
            linear_params += module.weight.numel()  # the bias (if any) stays in compute dtype under bitsandbytes
            linear_names.add(name.rsplit(".", 1)[-1])
    unmatched = unmatched_targets(module_names, targets if isinstance(targets, str) else list(targets))
    adapters = _adapters(model, targets, r) if not unmatched else {"lora_params": 0, "lora_input_features": 0,
                                                                    "adapted": "", "not_adapted": ""}
    # peft trainable tokens: a (new rows x hidden) delta on the input embedding, and on an untied lm_head too (a new
    # token must be predictable, not only readable).
    new_token_params = add_tokens * hidden * (1 if tied else 2) if train_new_tokens else 0
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or getattr(hf_config, "num_kv_heads", None) or heads
    every_name = module_names + [name for name, _ in model.named_parameters()]
    return {
        "model_type": hf_config.model_type,
        "params": params,
        "lora_params": adapters["lora_params"],
        "new_token_params": new_token_params,
        "linear_params": linear_params,
        "matmul_params": params - (0 if tied else input_emb.weight.numel()),
        "largest_module_params": largest_module,
        "lora_input_features": adapters["lora_input_features"],
        "linear_names": sorted(linear_names),
        # Like the LoRA backend, every target must name a module (peft itself only fails when none matches).
        "unmatched_targets": unmatched,
        "adapted": adapters["adapted"],
        "not_adapted": adapters["not_adapted"],
        "attn_implementation": model.config._attn_implementation,  # what "auto" loads (Gemma 2: eager)
        "hidden_size": hidden,
        "num_layers": hf_config.num_hidden_layers,
        "intermediate_size": (getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None)
                              or getattr(hf_config, "ffn_hidden_size", None) or 4 * hidden),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": getattr(hf_config, "head_dim", None) or hidden // heads,
        "vocab_size": hf_config.vocab_size,
        "gated_mlp": any(name.endswith(("gate_proj", "gate_up_proj", "w1")) for name in every_name),
        "tied_embeddings": tied,
    }


def _adapters(model, targets: str | tuple[str, ...], r: int) -> dict[str, Any]:
    """LoRA on the meta-device `model` as the backend puts it on (tunekit.lora_targets.peft_targets), counted: adapter
    parameters, the in_features of every adapted Linear (their inputs are what LoRA keeps for backward) and two
    lists for the pre-flight: what is adapted and which weight matrices are not."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from tunekit.lora_targets import peft_targets

    # Weight matrices (2-D and up: Linear, Conv1D, embeddings, fused experts, routers), before peft wraps them.
    matrices = {_short(name.removesuffix(".weight")) for name, p in model.named_parameters() if p.dim() >= 2}
    target_modules, target_parameters = peft_targets(model, targets if isinstance(targets, str) else list(targets))
    peft_model = get_peft_model(model, PeftLoraConfig(r=r, target_modules=target_modules,
                                                      target_parameters=target_parameters, task_type="CAUSAL_LM"))
    lora_params = sum(p.numel() for name, p in peft_model.named_parameters() if ".lora_" in name)
    adapted, in_features = set(target_parameters or []), 0  # already layer-relative names
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            adapted.add(_short(name))
            base = module.get_base_layer()
            if isinstance(base, (nn.Linear, Conv1D)):  # Conv1D stores its weight [in, out]
                in_features += base.weight.shape[0] if isinstance(base, Conv1D) else base.in_features
    return {"lora_params": lora_params, "lora_input_features": in_features,
            "adapted": ", ".join(sorted(adapted)), "not_adapted": ", ".join(sorted(matrices - adapted))}


def _short(name: str) -> str:
    """A module's name without its model prefix and layer index: model.layers.3.self_attn.q_proj -> self_attn.q_proj,
    lm_head -> lm_head (the same name in every layer is one entry of the pre-flight's lists)."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    tail = parts[numbered[0] + 1:] if numbered else parts[-1:]
    return ".".join(part for part in tail if part not in ("base_layer", "parametrizations", "original"))
