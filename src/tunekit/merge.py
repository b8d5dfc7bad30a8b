"""`tunekit merge`: fold a run's LoRA/QLoRA adapter into its base and save a standalone model, then prove it.

    merge_run(run_dir, out, dtype, base, overwrite) -> out

The result (safetensors shards + tokenizer with the training chat template + generation config + README.md model card
+ merge_check.json) loads with `AutoModelForCausalLM.from_pretrained` alone: no peft, no bitsandbytes, no
quantization_config. The recipe reads like its steps:

    open the run → refuse a bad --out early → what training resolved → pick the check inputs
    → merge (LoRA, or QLoRA into either base) → logit check → write into OUT.tmp → rename to OUT

What "auto" stood for in training (load dtype, precision, attention) comes from the run's resolved.json, not from
this machine: a QLoRA run trained on a bf16 GPU and merged on a CPU is re-quantized from bf16, as in training.

QLoRA is never re-quantized after merging: rounding the merged weights back to NF4 throws away most of the adapter's
update (the CPU stack measured a 0.06 logit shift from that alone) and ships a silently degraded model. The default
merges into the *dequantized* NF4 weights the adapter was trained against (saved at 16/32 bit); `--base original`
merges into the original full-precision weights instead. Both are merged and compared with the trained model
(4-bit base + adapter) so the user sees what each choice costs; the chosen one is saved.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunekit import rundir
from tunekit.config import RunConfig, looks_local
from tunekit.errors import UserError, first_line
from tunekit.modelcard import model_card
from tunekit.rundir import ADAPTER_FILES, Resolved, Run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Logit-check tolerance, relative to the largest |logit| of the reference (floor 1.0), by saved dtype.
# fp32: merging W + (alpha/r)·B@A changes the sum order only; measured 2e-7 on the tiny model, 1e-4 leaves room for
#   deep models whose rounding accumulates over many layers.
# bf16: 8 mantissa bits, so every weight rounds by up to 2^-9 ≈ 0.2% and every activation again in a bf16 forward;
#   a logit of 30 is itself only representable to ±0.06. 5% of the largest logit catches a wrong merge (a missing
#   or doubled adapter moves logits by the adapter's whole effect) without failing on rounding.
# fp16: 11 mantissa bits (8x finer than bf16), hence 1%.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}

CHECK_PROMPTS = 4  # inputs the logit check runs
CHECK_MAX_TOKENS = 128  # per input: bounds the reference logits kept in memory (4 x 128 x vocab floats)
FALLBACK_PROMPTS = [  # when the run's data files are gone (or on a hub): a fixed, varied set
    "The quick brown fox jumps over the lazy dog. The dog did not move.",
    "### Instruction:\nName three colors.\n\n### Response:\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Question: What is the capital of France?\nAnswer: Paris.",
]


@dataclass
class CheckInputs:
    """Token ids the logit check runs (each [1, seq]) and their text, as recorded in merge_check.json."""

    ids: list[torch.Tensor]
    texts: list[str]
    source: str  # where the texts came from: a data file, or "fixed"


@dataclass
class Merged:
    """The merged model to save, and what the logit check measured."""

    model: Any
    check: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the command


def merge_run(run_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None, base: str = "dequantized",
              overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """Merge the run's adapter into its base, check logits, write OUT; returns OUT.

    dtype: fp32|bf16|fp16 or None (`default_dtype`: the dtype the run trained its base in).
    base: QLoRA only — "dequantized" (the NF4 weights trained against) or "original" (full-precision weights).
    Raises UserError: not a finished run, no adapter (incl. full runs), base/tokenizer/adapter cannot be loaded,
    OUT exists without overwrite, check failed.
    """
    return merge(rundir.open_run(run_dir), out, dtype, base, overwrite, max_shard_size)


def merge(run: Run, out: str | os.PathLike, dtype: str | None = None, base: str = "dequantized",
          overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """merge_run on an opened run (export's merged format comes here too)."""
    if not run.has_adapter:
        hint = " (a full fine-tuning run: its final/ already is a standalone model; use `tunekit export`)" \
            if run.config.method == "full" else ""
        raise UserError(f"{run.final}: no adapter to merge (needs {' + '.join(ADAPTER_FILES)}){hint}")
    out_dir = rundir.check_out(out, run, overwrite)
    trained = training_settings(run)
    base_config = load_base_config(run.config)
    check_adapter(run)  # a broken adapter fails now, before the base loads
    save_dtype = dtype or default_dtype(run, base_config)
    tokenizer = load_run_tokenizer(run)
    inputs = check_inputs(run.config, tokenizer)
    plan = merge_plan(torch.cuda.is_available(), trained, save_dtype, run.config.method)
    merged = merge_adapter(run, trained, tokenizer, inputs, save_dtype, base, plan)
    merged.check["trained_with"] = run.resolved.model_dump(mode="json") if run.resolved is not None else None
    merged.check["merged_with"] = {"device": plan.device,
                                   "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
                                   "versions": rundir.library_versions()}
    print(format_check(merged.check))
    if not merged.check["passed"]:
        raise UserError(f"merge check failed: {merged.check['failure']}; nothing written to {out_dir}")
    with rundir.staged_dir(out_dir, overwrite) as tmp:
        save_model(merged.model, tokenizer, tmp, max_shard_size)
        rundir.write_json(tmp / "merge_check.json", merged.check)
        rundir.write_text_atomically(tmp / "README.md", str(model_card(run, merged.check)))
    print(f"merged model: {out_dir} ({save_dtype}, base: {merged.check['base']})")
    return out_dir


# ---------------------------------------------------------------- training's record, and loading (shared with export)


def training_settings(run: Run) -> Resolved:
    """What "auto" stood for where the run trained (its resolved.json). A run written before tunekit recorded it
    gets the old derivation on this machine, with a one-line warning: a bf16 GPU run merged on a CPU then loads and
    re-quantizes its base from fp32 rather than from the bf16 it trained on."""
    if run.resolved is not None:
        return run.resolved
    from tunekit.backends.common import precision, weights_dtype

    print(f"warning: {run.dir}: no {rundir.RESOLVED_NAME} (a run from an earlier tunekit): precision, load dtype and "
          "attention are re-derived on this machine and may differ from training", file=sys.stderr)
    config = run.config
    try:
        mode, load_dtype = precision(config), weights_dtype(config)
    except UserError:  # precision fp16 asked for on a machine without CUDA: the base loaded in fp32 there too
        mode, load_dtype = "fp32", torch.float32
    return Resolved(precision=mode, load_dtype=str(load_dtype).removeprefix("torch."),
                    zero_stage=run.summary.get("zero_stage"), world_size=run.summary.get("world_size") or 1,
                    attn_implementation=None if config.model.attn_implementation == "auto"  # the model's default
                    else config.model.attn_implementation, device="not recorded", versions={})


def training_load_dtype(trained: Resolved) -> torch.dtype:
    """The dtype training loaded the base in (QLoRA: before quantizing it; NF4 codes and scales depend on it)."""
    return getattr(torch, trained.load_dtype)


@dataclass(frozen=True)
class MergePlan:
    """Where and in what precision the merge check runs: the reference (QLoRA: the trained 4-bit model) and the merge
    on one device, in one compute dtype, so that their difference is the merge's and not the hardware's."""

    device: str  # "cuda" or "cpu"
    load_dtype: torch.dtype  # the dtype training loaded the base in: QLoRA quantizes from it, the merge starts from it
    compute_dtype: torch.dtype  # reference forward (4-bit matmuls and the other modules) and the merge arithmetic


def merge_plan(cuda_available: bool, trained: Resolved, save_dtype: str, method: str) -> MergePlan:
    """The MergePlan for a run trained as `trained` records, saved as `save_dtype`, on a machine with or without CUDA.

    Device: QLoRA where bitsandbytes puts the 4-bit reference (the GPU whenever CUDA is visible), and the merge with
    it; LoRA on the CPU (its reference is the unmerged model inside the merge itself, wherever that runs, and the CPU
    needs no GPU memory for an fp32 copy). Compute dtype: fp32 for an fp32 save (its 1e-4 tolerance leaves no room
    for 16-bit rounding on either side) and on the CPU; on a GPU a 16-bit save computes in that dtype (half the
    memory of fp32; the 16-bit tolerances cover its rounding). Load dtype: the one training recorded.
    """
    device = "cuda" if cuda_available and method == "qlora" else "cpu"
    compute = torch.float32 if device == "cpu" or save_dtype == "fp32" else DTYPES[save_dtype]
    return MergePlan(device, training_load_dtype(trained), compute)


def default_dtype(run: Run, stored_config) -> str:
    """fp32|bf16|fp16 to save in when --dtype is not given.

    model.dtype when the run set one. Else, from the run's record: LoRA/QLoRA save in the dtype training loaded the
    base in (a bf16 base trained on a GPU ships bf16; fp32 would double the size, not restore precision the
    trained model never had); a full run's load dtype is always fp32 (master weights), but what it saved into
    final/ is its compute precision (DeepSpeed's bf16/fp16 runs save their 16-bit copies), so that. A run without a
    record keeps the old rule: the dtype `stored_config` (the base's, or final/'s) says the checkpoint is stored in.
    """
    config = run.config
    if config.model.dtype != "auto":
        return DTYPE_NAMES[config.model.dtype]
    if run.resolved is not None:
        return run.resolved.precision if config.method == "full" else DTYPE_NAMES[run.resolved.load_dtype]
    stored = getattr(stored_config, "dtype", None) or getattr(stored_config, "torch_dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return DTYPE_NAMES.get(stored, "fp32")


def check_attention(trained: Resolved) -> str | None:
    """The attention kernel to load the base with: the one training used, except a CUDA-only kernel on a machine
    without CUDA (then sdpa: same weights, and the check compares merged and unmerged under the same kernel)."""
    attn = trained.attn_implementation
    if attn is not None and attn.startswith("flash_attention") and not torch.cuda.is_available():
        print(f"note: the run trained with {attn}, which needs a CUDA GPU; the merge check runs sdpa", file=sys.stderr)
        return "sdpa"
    return attn


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Any exception a library raises in this block becomes one UserError line: `what` (which names the user's file
    or directory) and the first line of the library's message. Only around loads of the user's files (a corrupt
    safetensors file, an unknown model_type, a broken adapter_config.json): our own bugs keep their traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{what}: {first_line(exc)}") from None


def load_base_config(config: RunConfig):
    """The base model's transformers config; UserError (one line) when the base cannot be found or read."""
    from transformers import AutoConfig

    name = config.model.name_or_path
    if looks_local(name) and not Path(name).is_dir():
        raise UserError(f"base model not found: {name} (model.name_or_path in the run's config.yaml)")
    with loading(f"base model {name}: cannot load its config"):
        return AutoConfig.from_pretrained(name, trust_remote_code=config.model.trust_remote_code,
                                          revision=config.model.revision)


def check_adapter(run: Run) -> None:
    """final/'s adapter as peft and safetensors read it: the config parses, the weights' header is whole (a
    truncated file fails here). UserError (one line) when not; cheap, so it runs before the base loads."""
    from peft import PeftConfig
    from safetensors import safe_open

    with loading(f"adapter {run.final / 'adapter_config.json'}: cannot load"):
        PeftConfig.from_pretrained(run.final)
    weights = run.final / "adapter_model.safetensors"
    with loading(f"adapter {weights}: cannot read"), safe_open(str(weights), framework="pt"):
        pass


def load_run_tokenizer(run: Run):
    """The tokenizer saved in final/: the training one, with its chat template and any added tokens."""
    from transformers import AutoTokenizer

    with loading(f"tokenizer in {run.final}: cannot load"):
        return AutoTokenizer.from_pretrained(run.final, trust_remote_code=run.config.model.trust_remote_code)


def save_model(model, tokenizer, out_dir: Path, max_shard_size: str) -> None:
    """safetensors shards (+ index when several) + config + generation config + tokenizer (chat template kept). The
    generation config stops at the template's end of turn as well as at eos (`stop_generation_config`)."""
    from tunekit.backends.common import stop_generation_config

    model.generation_config = stop_generation_config(model, tokenizer)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- the check inputs


def check_inputs(config: RunConfig, tokenizer, count: int = CHECK_PROMPTS) -> CheckInputs:
    """A few real examples from the run's data, tokenized exactly as training did (prompt and completion), or the
    fixed FALLBACK_PROMPTS when the data is not a readable local file.

    Prefers data.eval_path; else the first source shuffled with data.seed, whose head is the held-out split that
    prepare_data makes with data.eval_fraction (not that it matters for the check: any real text will do).
    """
    from tunekit import data as data_mod

    def encode(text_pieces: list[tuple[str, bool]]) -> list[int]:
        return data_mod.tokenize(text_pieces, tokenizer, min(config.data.max_seq_len, CHECK_MAX_TOKENS),
                                 completion_only=True)["input_ids"]

    first = config.data.sources[0]
    path = config.data.eval_path or first.path
    if looks_local(path) and Path(path).is_file():
        try:
            rows = data_mod.read_rows(path, first.format)
        except UserError:
            rows = []
        if config.data.eval_path is None:
            rows = rows[:]
            random.Random(config.data.seed).shuffle(rows)
        pieces = [data_mod.segments(row, first.format, tokenizer) for row in rows[:count]]
        if pieces:
            ids = [encode(p) for p in pieces]
            texts = ["".join(text for text, _ in p) for p in pieces]
            return CheckInputs([torch.tensor([row]) for row in ids], texts, path)
    ids = [encode([(text, True)]) for text in FALLBACK_PROMPTS[:count]]
    return CheckInputs([torch.tensor([row]) for row in ids], list(FALLBACK_PROMPTS[:count]), "fixed")


@torch.no_grad()
def logits_of(model, inputs: CheckInputs) -> list[torch.Tensor]:
    """fp32 logits [1, seq, vocab] for each check input (one at a time: no padding to get wrong)."""
    model.eval()
    device = next(model.parameters()).device  # a 4-bit base may sit on the GPU
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in inputs.ids]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------- merging


def merge_adapter(run: Run, trained: Resolved, tokenizer, inputs: CheckInputs, save_dtype: str, base: str,
                  plan: MergePlan | None = None) -> Merged:
    """Merge and check. LoRA: one merge into the base as trained. QLoRA: both bases, the other one first (then freed),
    so only one full-precision copy of the model is alive at a time besides the 4-bit reference.
    trained: the run's resolved settings (load dtype, attention); plan: where and how (default: merge_plan here)."""
    attn = check_attention(trained)
    plan = plan or merge_plan(torch.cuda.is_available(), trained, save_dtype, run.config.method)
    compute = str(plan.compute_dtype).removeprefix("torch.")
    if run.config.method != "qlora":
        model, diffs = merge_into(run, tokenizer, inputs, save_dtype, attn, packed=None, reference=None, plan=plan)
        check = check_record(inputs, save_dtype, "original", diffs["vs_trained"], reference_kind=f"adapter model "
                             f"(base in {compute} + adapter, unmerged)", gate=diffs["vs_trained"], scale=diffs["scale"])
        return Merged(model, check)

    reference, packed = quantized_reference(run, tokenizer, inputs, plan, attn)
    results: dict[str, dict] = {}
    for choice in [c for c in ("dequantized", "original") if c != base] + [base]:
        model, results[choice] = merge_into(run, tokenizer, inputs, save_dtype, attn,
                                            packed=packed if choice == "dequantized" else None,
                                            reference=reference, plan=plan)
        if choice != base:
            del model  # only the chosen merge is kept
    chosen = results[base]
    # dequantized: the merge must reproduce the trained model. original: it cannot (the base differs by the NF4
    # rounding, by design), so the gate is the merge itself (merged vs unmerged original + adapter) and the
    # difference from the trained model is reported as the cost of the choice.
    gate = chosen["vs_trained"] if base == "dequantized" else chosen["merge_only"]
    check = check_record(inputs, save_dtype, base, chosen["vs_trained"],
                         reference_kind=f"trained model: 4-bit NF4 base + adapter ({compute} compute, {plan.device})",
                         gate=gate, scale=chosen["scale"])
    check["qlora"] = {name: {key: r[key] for key in ("vs_trained", "merge_only")} for name, r in results.items()}
    check["quantized_from"] = trained.load_dtype  # the dtype the 4-bit base was quantized from, as in training
    return Merged(model, check)


def merge_into(run: Run, tokenizer, inputs: CheckInputs, save_dtype: str, attn: str | None, packed: dict | None,
               reference: list[torch.Tensor] | None, plan: MergePlan) -> tuple[Any, dict]:
    """Load the base on plan.device in plan.compute_dtype (with `packed`: first in the dtype training loaded it in, so
    the layers that were not quantized hold training's values, then the dequantized NF4 values in place of those
    Linear weights), apply the adapter, record its unmerged logits, merge_and_unload, cast to save_dtype; returns
    (model, diffs). Cast once, after the sum.

    diffs: merge_only (merged vs this base + adapter), vs_trained (merged vs `reference`, or vs the unmerged model
    when reference is None: for LoRA they are the same thing), scale (largest |reference logit|).
    """
    dtype = plan.load_dtype if packed is not None else plan.compute_dtype
    model = load_base(run.config, tokenizer, dtype, attn, device=plan.device).to(plan.compute_dtype)
    if packed is not None:
        import bitsandbytes.functional as bnbf
        from transformers.pytorch_utils import Conv1D

        with torch.no_grad():
            for name, (data, quant_state) in packed.items():  # [out, in] each, in the dtype it was quantized from
                layer = model.get_submodule(name)
                weight = bnbf.dequantize_4bit(data, quant_state)
                # GPT-2's Conv1D stores [in, out]; bitsandbytes quantized its transpose (transformers' bnb loader).
                layer.weight.copy_(weight.T if isinstance(layer, Conv1D) else weight)
    model = load_adapter(model, run)
    unmerged = logits_of(model, inputs)
    model = model.merge_and_unload()
    model = model.to(DTYPES[save_dtype])
    merged = logits_of(model, inputs)
    reference = reference if reference is not None else unmerged
    return model, {
        "merge_only": max_abs_diff(merged, unmerged),
        "vs_trained": max_abs_diff(merged, reference),
        "scale": max(t.abs().max().item() for t in reference),
    }


def load_base(config: RunConfig, tokenizer, dtype: torch.dtype, attn: str | None, quantization_config=None,
              device: str = "cpu"):
    """The run's base, loaded as training did (same from_pretrained arguments, the attention kernel it ran) onto
    `device` ("cuda": the current GPU), embeddings grown to the run's tokenizer: with added tokens the adapter carries
    the resized embed_tokens/lm_head and needs matching shapes."""
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if device == "cuda":  # (bitsandbytes alone would pick the GPU for a 4-bit load; a plain load would stay on CPU)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    name = config.model.name_or_path
    with loading(f"base model {name}: cannot load"):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, revision=config.model.revision,
                                                     trust_remote_code=config.model.trust_remote_code,
                                                     use_safetensors=True, **kwargs)
    if config.model.add_tokens and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # New rows' values do not matter: peft saved the resized embed_tokens/lm_head and loads them over these.
        # Only when training grew them (backends.common.resize_for_new_tokens): a tokenizer that is larger than the
        # embeddings by itself (Qwen2's class adds <|endoftext|> to a tokenizer without it) was trained at the base's
        # size, and random extra rows would differ between the check's reference and the merge.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


def quantized_reference(run: Run, tokenizer, inputs: CheckInputs, plan: MergePlan,
                        attn: str | None) -> tuple[list[torch.Tensor], dict[str, tuple]]:
    """The trained QLoRA model's logits (4-bit base + adapter) and its packed NF4 weights, {module: (data, state)}.

    The base is quantized exactly as in training (backends.lora.quantization_config, from plan.load_dtype, the dtype
    training loaded it in: NF4 codes and scales depend on the values quantized), on plan.device, except that it
    computes in plan.compute_dtype, as the merge does: the 4-bit matmuls (the compute dtype sets only the dtype of the
    matmuls, not the stored weights) and every layer that is not 4-bit (embeddings, norms, lm_head: cast from the load
    dtype, their values unchanged). Else its rounding would blur the comparison we want to make. Its 4-bit layers
    multiply as training's do (_training_matmul), not through bitsandbytes' inference kernels. The packed weights
    (~0.5 byte/param) are kept rather than dequantized copies (4 bytes/param): merge_into dequantizes them one layer
    at a time.
    """
    from bitsandbytes.nn import Linear4bit, Params4bit

    from tunekit.backends.lora import quantization_config

    qconfig = quantization_config(run.config)
    qconfig.bnb_4bit_compute_dtype = plan.compute_dtype
    model = load_base(run.config, tokenizer, plan.load_dtype, attn, quantization_config=qconfig, device=plan.device)
    with torch.no_grad():
        for param in model.parameters():
            if not isinstance(param, Params4bit) and param.dtype != plan.compute_dtype:
                param.data = param.data.to(plan.compute_dtype)
    packed = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            packed[name] = (module.weight.data, module.weight.quant_state)
            module.forward = _training_matmul(module, plan.compute_dtype)
    if not packed:
        raise UserError(f"{run.dir}: a qlora run, but loading its base 4-bit gave no Linear4bit layers")
    model = load_adapter(model, run)
    reference = logits_of(model, inputs)
    del model
    return reference, packed


def _training_matmul(module, compute_dtype: torch.dtype):
    """A Linear4bit forward that computes as training did: bitsandbytes' training path (MatMul4Bit) dequantizes the
    weight to the dtype it was quantized from, then multiplies in the compute dtype. Its inference paths do not: the
    fused gemm_4bit dequantizes straight to the input's dtype (fp32 values where training used bf16-rounded ones:
    1e-3 per layer on the tiny model), and the CPU AVX512-BF16 path repacks the weight and multiplies in bf16."""
    import bitsandbytes.functional as bnbf

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(compute_dtype)  # [out, in]
        bias = module.bias.to(compute_dtype) if module.bias is not None else None
        return torch.nn.functional.linear(x.to(compute_dtype), weight, bias).to(x.dtype)

    return forward


def load_adapter(model, run: Run):
    """final/'s adapter on `model` (peft); UserError (one line) when its files cannot be loaded."""
    from peft import PeftModel

    with loading(f"adapter in {run.final}: cannot load"):
        return PeftModel.from_pretrained(model, run.final)


# ---------------------------------------------------------------- the record


def check_record(inputs: CheckInputs, save_dtype: str, base: str, diff: float, reference_kind: str, gate: float,
                 scale: float) -> dict[str, Any]:
    """merge_check.json: what was compared, the max abs logit difference, the tolerance and the verdict."""
    tolerance = RELATIVE_TOLERANCE[save_dtype] * max(1.0, scale)
    passed = gate <= tolerance
    record = {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "tolerance_rule": f"{RELATIVE_TOLERANCE[save_dtype]:g} x max(1, largest |reference logit| = {scale:.4g})",
        "passed": passed,
        "dtype": save_dtype,
        "base": base,
        "reference": reference_kind,
        "prompts_source": inputs.source,
        "positions": sum(ids.shape[1] for ids in inputs.ids),
        "prompts": [text[:200] for text in inputs.texts],
    }
    if not passed:
        record["failure"] = f"max abs logit difference {gate:.3g} > tolerance {tolerance:.3g} ({save_dtype})"
    return record


def format_check(check: dict[str, Any]) -> str:
    """A short table: one row per base choice (QLoRA) or one row (LoRA)."""
    lines = [f"merge check: {len(check['prompts'])} prompts ({check['prompts_source']}), {check['positions']} "
             f"positions, saved as {check['dtype']}, tolerance {check['tolerance']:.3g}",
             f"  {'base':<20}{'max |Δ logit| vs trained':>26}{'merge only':>14}"]
    diff = check["max_abs_diff"]
    rows = check.get("qlora") or {check["base"]: {"vs_trained": diff, "merge_only": diff}}
    for name, diffs in rows.items():
        mark = " (saved)" if name == check["base"] else ""
        lines.append(f"  {name + mark:<20}{diffs['vs_trained']:>26.3e}{diffs['merge_only']:>14.3e}")
    lines.append("  " + ("ok" if check["passed"] else "FAILED: " + check["failure"]))
    return "\n".join(lines)
