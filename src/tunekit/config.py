"""The run config: one YAML file, validated once by this pydantic schema, then passed around as a `RunConfig`.

Every field carries its own doc (the `description`), HF names are used where HF has one, and method-specific settings
live only in that method's section. `load(path, overrides)` turns every validation problem into one `UserError` line
that names the file, the line and the dotted key. This module must not import torch (`tunekit validate` stays fast).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (  # noqa: F401  (SecretStr: the type any future secret field must have; a test checks it)
    BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_serializer,
    model_validator,
)

from tunekit.errors import UserError

SCHEMA_VERSION = 2  # 2: each method has only its own sections (1 wrote lora/qlora into every config.yaml)
METHODS = ("full", "lora", "qlora")
OBJECTIVES = ("sft", "dpo", "orpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo")  # they train on preference pairs (data format `preference`)
# (objective, method) -> the default peak LR.
# sft: the seeds' guidance: full FT 1e-5..5e-5 (higher risks forgetting), LoRA 1e-4..3e-4 (the adapter starts at zero
# and must move fast).
# dpo: far lower, because the loss pushes log-prob ratios without bound: 5e-7 full (Zephyr-7B-beta, HF alignment
# handbook recipes/zephyr-7b-beta/dpo/config_full.yaml), 5e-6 LoRA/QLoRA (the handbook's config_qlora.yaml).
# orpo: one stage that also carries the SFT loss: 8e-6 (ORPO paper, Mistral-ORPO; the handbook's ORPO recipes use
# 5e-6..8e-6), 10x that for adapters, which start at zero.
DEFAULT_LR = {
    ("sft", "full"): 2e-5, ("sft", "lora"): 2e-4, ("sft", "qlora"): 2e-4,
    ("dpo", "full"): 5e-7, ("dpo", "lora"): 5e-6, ("dpo", "qlora"): 5e-6,
    ("orpo", "full"): 8e-6, ("orpo", "lora"): 8e-5, ("orpo", "qlora"): 8e-5,
}
# lora.target_modules default, with peft's meaning: every nn.Linear and Conv1D (GPT-2) except the output head, and
# (tunekit's addition) MoE experts stored as fused 3-D parameters. Names differ across families (Llama q_proj,
# GPT-NeoX query_key_value, Phi-3 qkv_proj, GPT-2 c_attn), so a list of names fits only some of them.
ALL_LINEAR = "all-linear"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class Section(BaseModel):
    """Base for every section: unknown keys are errors, defaults are validated too, and no number may be inf/nan
    (`learning_rate: .inf` is a typo, not a setting)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelConfig(Section):
    name_or_path: str = Field(description="Local directory (or hub id, when a hub is reachable) of the base model.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off: it executes arbitrary code.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for training. auto: bfloat16 on a GPU that supports it, else float32."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. auto: what transformers picks for the architecture (sdpa where the model "
        "supports it, else eager; Gemma 2: eager), or flash_attention_2 for packed rows on a GPU where it is installed. "
        "A kernel the model does not support is an error."
    )
    add_tokens: list[str] = Field(
        default_factory=list,
        description="New tokens to add to the vocabulary. Embeddings are resized and, under LoRA/QLoRA, the new rows are trained.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when loading from a hub.")

    @field_validator("attn_implementation", mode="before")
    @classmethod
    def _null_is_auto(cls, value: Any) -> Any:
        return "auto" if value is None else value  # schema <= 2 wrote null for "transformers' default"


class SourceConfig(Section):
    path: str = Field(description="A local .json/.jsonl/.parquet/.csv file, or a hub dataset name.")
    format: Literal["alpaca", "chat", "prompt_completion", "text", "preference"] = Field(
        description="alpaca: instruction/input/output; chat: messages rendered with the chat template; "
        "prompt_completion: prompt/completion; text: raw text (loss on every token); preference: prompt/chosen/"
        "rejected pairs, as strings or chat messages (objective dpo or orpo)."
    )
    weight: float = Field(1.0, gt=0, description="Relative share of this source in the mixed training set (by examples).")
    split: str = Field("train", description="Split to read when `path` is a hub dataset.")
    max_examples: int | None = Field(None, gt=0, description="Read at most this many examples from the source.")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1, description="Training sources, mixed by `weight`.")
    eval_path: str | None = Field(None, description="Held-out eval file, in the format of the first source.")
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="When no eval_path: fraction of the first source held out for eval (0 disables eval)."
    )
    max_seq_len: int = Field(512, gt=0, description="Tokens per example; longer examples are truncated (and counted).")
    packing: bool = Field(False, description="Pack several examples per row (no attention across examples).")
    completion_only_loss: bool = Field(True, description="Loss only on completion/assistant tokens, not on prompts.")
    cache_dir: str | None = Field(
        None, description="Tokenized-data cache (Arrow, memory-mapped); default $TUNEKIT_DATA_CACHE or ~/.cache/tunekit/data. "
        "On a cluster: a shared path prepares once per job, a node-local one once per node."
    )
    num_proc: int | None = Field(
        None, ge=1, description="Worker processes that tokenize; default: the cores this process may use."
    )
    streaming: bool = Field(
        False, description="Read and tokenize on the fly, for data larger than the node's disk or memory. Needs "
        "training.max_steps; eval comes from eval_path only; sources mix by weight in expectation."
    )
    seed: int = Field(0, description="Seed for the eval split and the mixing draw.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval_path is not None and "eval_fraction" in self.model_fields_set and self.eval_fraction > 0:
            raise ValueError("data.eval_fraction: not used when data.eval_path is given (the eval set is that file)")
        if self.streaming and "eval_fraction" in self.model_fields_set and self.eval_fraction > 0:
            raise ValueError("data.eval_fraction: a streamed source has no known size to hold a fraction of; "
                             "set data.eval_path (or eval_fraction: 0)")
        if self.eval_path is not None or self.streaming:
            self.eval_fraction = 0.0  # what ran: nothing held out of the first source (config.yaml says so)
        return self


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="Adapter rank. Seeds: 4-8 simple/small data, 16-32 instruction tuning, 64-128 large domain data.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator (scale = alpha/r). Default 2*r: alpha == r trains slowly.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        ALL_LINEAR, description="Modules to adapt. all-linear: every linear layer except the output head, whatever the "
        "architecture names it (and MoE experts stored as fused parameters); or a list of module names "
        "(q_proj, v_proj, ...: a name matches a module whose dotted name ends with it)."
    )
    train_new_token_embeddings: bool = Field(
        True, description="With model.add_tokens: train the new embedding rows (peft trainable tokens)."
    )

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list adapts nothing; use all-linear or name the modules")
        return value

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r

    @property
    def all_linear(self) -> bool:
        return self.target_modules == ALL_LINEAR

    def describe_targets(self) -> str:
        """The targets as a reader wants them: "all linear layers" or "q_proj, v_proj"."""
        return "all linear layers" if self.all_linear else ", ".join(self.target_modules)


class QloraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bits/param saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype the 4-bit weights are dequantized to for matmuls.")


class DpoConfig(Section):
    """objective: dpo (TRL's DPOTrainer): the policy learns to raise the chosen answer's log-probability ratio over a
    frozen reference above the rejected one's."""

    beta: float = Field(0.1, gt=0, description="KL strength: higher keeps the policy closer to the reference "
                        "(DPO paper and TRL: 0.1; IPO's tau for loss_type ipo).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down"] = Field(
        "sigmoid", description="sigmoid: the DPO paper's loss; ipo: bounded (less overfitting on noisy pairs); "
        "hinge: SLiC; robust: label-noise robust (set label_smoothing); apo_zero/apo_down: anchored (APO).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust (and cDPO): assumed share of flipped labels.")
    reference: Literal["model", "precomputed"] = Field("model", description=(
        "model: the reference scores each batch beside the policy (full: a second, frozen copy, ZeRO-3-sharded like "
        "the policy; LoRA/QLoRA: the base with the adapter disabled, no copy). precomputed: its log-probs are "
        "computed once over the data before training, so no reference runs during it (full: the copy is freed)."))

    @model_validator(mode="after")
    def _smoothing_has_a_loss(self) -> DpoConfig:
        if self.label_smoothing > 0 and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"dpo.label_smoothing: only loss_type sigmoid (cDPO) or robust use it "
                             f"(loss_type is {self.loss_type})")
        return self


class OrpoConfig(Section):
    """objective: orpo (TRL's ORPOTrainer): SFT on the chosen answer plus an odds-ratio penalty on the rejected one,
    in one stage and without a reference model."""

    beta: float = Field(0.1, gt=0, description="lambda: weight of the odds-ratio term beside the NLL on the chosen "
                        "answer (ORPO paper: 0.1).")


class DeepSpeedConfig(Section):
    config: dict[str, Any] | str | None = Field(
        None, description="A DeepSpeed config: inline dict or path to a JSON file. Default: generated ZeRO config."
    )
    stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="ZeRO stage when tunekit generates the config. auto: chosen at train time from this "
        "machine (estimate/stage.py): one process -> no DeepSpeed when it fits; several -> the lowest of DDP, ZeRO "
        "1, 2, 3 that fits per GPU, then CPU offload.")
    offload_optimizer: bool = Field(False, description="Offload optimizer states to CPU memory (auto offloads "
                                    "only when nothing else fits).")
    offload_param: bool = Field(False, description="Offload parameters to CPU memory (stage 3 only).")

    @model_validator(mode="after")
    def _generated_or_given(self) -> DeepSpeedConfig:
        # stage/offload_* only shape the generated config: next to a user's config they would be silently ignored.
        shaping = sorted(self.model_fields_set & {"stage", "offload_optimizer", "offload_param"})
        if self.config is not None and shaping:
            raise ValueError(f"deepspeed.{shaping[0]}: not used when deepspeed.config is given "
                             "(set it inside that DeepSpeed config instead)")
        if self.chooses_stage and (self.offload_optimizer or self.offload_param):
            # auto offloads only as its last rung; a forced offload is a stage decision, so it names the stage.
            name = "offload_optimizer" if self.offload_optimizer else "offload_param"
            raise ValueError(f"deepspeed.{name}: needs an explicit deepspeed.stage (auto offloads by itself, only "
                             "when nothing else fits)")
        if self.config is None and self.offload_param and self.stage != 3:
            raise ValueError("deepspeed.offload_param: needs deepspeed.stage 3")
        if isinstance(self.config, dict):
            _zero_section(self.config, "deepspeed.config")
        return self

    @model_serializer(mode="wrap")
    def _dump_what_runs(self, handler) -> dict[str, Any]:
        # With a user config, stage/offload_* do not run (and may not be written): config.yaml must load back.
        data = handler(self)
        if self.config is not None:
            for name in ("stage", "offload_optimizer", "offload_param"):
                data.pop(name, None)
        return data

    def user_config(self) -> dict[str, Any] | None:
        """The user's DeepSpeed config (a copy of the inline dict, or the JSON file parsed), or None when tunekit
        generates it. Raises UserError naming the file (and line) when it cannot be read or parsed."""
        if self.config is None:
            return None
        if isinstance(self.config, dict):
            return json.loads(json.dumps(self.config))  # a deep copy: callers fill in "auto" values
        try:
            parsed = json.loads(Path(self.config).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"deepspeed.config: cannot read {self.config}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"deepspeed.config: {self.config}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"deepspeed.config: {self.config}:{exc.lineno}: DeepSpeed JSON does not parse: {exc.msg}") from None
        if not isinstance(parsed, dict):
            raise UserError(f"deepspeed.config: {self.config}: expected a JSON object")
        _zero_section(parsed, f"deepspeed.config: {self.config}", error=UserError)
        return parsed

    @property
    def chooses_stage(self) -> bool:
        """True when tunekit picks the stage for the machine (`stage: auto`, no user DeepSpeed config)."""
        return self.config is None and self.stage == "auto"

    def zero_stage(self) -> int | Literal["auto"]:
        """The ZeRO stage this section runs: the user config's zero_optimization.stage, else `stage` ("auto" until
        `backends.deepspeed.resolve_stage` replaces it with the stage chosen for the machine)."""
        user = self.user_config()
        return int(user["zero_optimization"]["stage"]) if user is not None else self.stage


def _zero_section(ds: dict, where: str, error: type[Exception] = ValueError) -> dict:
    """ds["zero_optimization"], checked to name a stage 0-3 (raises `error` naming `where` otherwise)."""
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise error(f"{where}: no zero_optimization.stage in the DeepSpeed config")
    if zero["stage"] not in (0, 1, 2, 3) or isinstance(zero["stage"], bool):
        raise error(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3 (got {zero['stage']!r})")
    return zero


class TrainingConfig(Section):
    learning_rate: float | None = Field(None, gt=0, description="Peak LR. Default: 2e-5 for full, 2e-4 for LoRA/QLoRA.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the mixed training set (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps (>= 1); -1 means run num_train_epochs.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Micro-batch size per device.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Eval batch size per device.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"] = Field(
        "cosine", description="LR schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent in linear warmup (seeds: 3%).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~20-40% slower.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw_torch", description="Optimizer (transformers name). paged_adamw_8bit is the QLoRA paper's choice."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision. auto: bf16 on a GPU that supports it, fp32 on CPU."
    )
    seed: int = Field(42, description="Seed for init, dropout and data order.")
    logging_steps: int = Field(10, gt=0, description="Log train loss every this many steps.")
    max_seconds: float | None = Field(None, gt=0, description="Stop (and save) after this many seconds of training (compare --budget seconds).")
    stop_signals: list[str] = Field(default_factory=lambda: ["SIGTERM", "SIGUSR1"], description=(
        "Signals that stop training cleanly: every rank stops at the next optimizer step, one complete checkpoint "
        "is saved there and `tunekit train` exits 75 (rerun with --resume auto). [] turns this off."))
    ddp_timeout: int | None = Field(None, gt=0, description=(
        "Seconds a collective may wait for the other ranks before the job fails with an error (a stalled or lost "
        "rank ends the job instead of hanging it). Must cover the slowest step, evaluation and save. Default: 300, "
        "or twice rank 0's estimated checkpoint write at 200 MB/s when longer (resolved.json records it)."))

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (run num_train_epochs) or at least 1")
        return value

    @field_validator("stop_signals")
    @classmethod
    def _catchable_signals(cls, value: list[str]) -> list[str]:
        import signal  # the standard library's names; no torch here

        for name in value:
            if name in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"{name} cannot be caught; use SIGTERM or SIGUSR1")
            if not name.startswith("SIG") or name.startswith("SIG_") or not hasattr(signal, name):
                raise ValueError(f"{name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        return list(dict.fromkeys(value))


class CheckpointsConfig(Section):
    save_steps: int = Field(500, gt=0, description="Save (and evaluate) every this many optimizer steps.")
    keep_top_k: int = Field(3, ge=0, description="Keep the k best checkpoints by `metric`.")
    keep_last_n: int = Field(2, ge=1, description="Also keep the n newest checkpoints (the newest is always kept).")
    metric: str = Field("eval_loss", description="Logged metric that ranks checkpoints.")
    greater_is_better: bool = Field(False, description="Direction of `metric`.")
    check_free_disk: bool = Field(True, description="Before each save, refuse to start it if the disk cannot hold it.")


class EvalConfig(Section):
    task_metric: Literal["exact_match", "none"] = Field(
        "exact_match", description="Generation metric on held-out prompts, before and after training."
    )
    task_samples: int = Field(64, gt=0, description="Held-out examples scored by the task metric.")
    max_new_tokens: int = Field(32, gt=0, description="Generation length for the task metric.")
    general: str | None = Field(None, description="General-text eval file (format text): its loss is the forgetting monitor.")
    forgetting_threshold: float = Field(0.10, ge=0, description="Flag forgetting when general loss rises by more than this fraction over the base model's.")
    rank_spectrum: bool = Field(True, description="LoRA/QLoRA: record singular values of B@A at each eval.")


class LoggingConfig(Section):
    report_to: list[Literal["none", "wandb", "tensorboard"]] = Field(
        default_factory=lambda: ["none"], description="Trackers; several at once. wandb honours WANDB_MODE=offline."
    )
    project: str = Field("tunekit", description="Tracker project name.")
    run_name: str | None = Field(None, description="Tracker run name; default: output_dir's name.")
    token_metrics: bool = Field(False, description=(
        "Log TRL's per-step token accuracy and entropy over the vocabulary (objective sft). Off: each step skips "
        "that vocabulary-wide work and its cross-rank gathers; the loss and what trains are the same."))


class PreflightConfig(Section):
    gpus: int | None = Field(None, gt=0, description=(
        "GPUs `tunekit estimate` plans for (default 1). Not used by `train`: its pre-flight counts the processes the "
        "launcher started (WORLD_SIZE)."))
    gpu_memory_gb: float | None = Field(None, gt=0, description=(
        "GB per GPU `tunekit estimate` plans for (default 80). Not used by `train`: its pre-flight reads the memory "
        "of the GPU it trains on."))
    refuse_if_too_big: bool = Field(True, description="Refuse to start a run the estimate says cannot fit.")
    usd_per_gpu_hour: float = Field(3.0, ge=0, description="Price for the cost estimate (seeds: A100 ~$3/h).")


class Origins(dict):
    """Where each key of a loaded config was written. Not part of the config's value: two configs with equal settings
    are equal wherever they were read from (pydantic compares private attributes too)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Origins)

    __hash__ = None  # type: ignore[assignment]


class RunConfig(Section):
    """What every method shares. A config is always one of the per-method classes below (`parse` picks it by
    `method`); a section the method does not use is an error, so `lora:` under `method: full` cannot be written."""

    # The highest ZeRO stage the method can run: the one place method-specific DeepSpeed limits live.
    MAX_ZERO_STAGE: ClassVar[int] = 3

    schema_version: int = Field(SCHEMA_VERSION, description="Config schema version (written by tunekit into saved configs).")
    method: Literal["full", "lora", "qlora"] = Field(description="full (every weight), lora, or qlora (4-bit NF4 base + LoRA).")
    output_dir: str = Field(description="Run directory: config, checkpoints, final/, summary.json, report.md.")
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    preflight: PreflightConfig = Field(default_factory=PreflightConfig)
    deepspeed: DeepSpeedConfig | None = Field(None, description="DeepSpeed ZeRO (multi-GPU adapters). Optional for lora/qlora.")
    objective: Literal["sft", "dpo", "orpo"] = Field("sft", description=(
        "sft: supervised (loss on the answers); dpo / orpo: preference tuning on prompt/chosen/rejected pairs "
        "(data format preference), settings in the section of the same name."))
    dpo: DpoConfig | None = Field(None, description="objective dpo's settings (only that objective accepts them).")
    orpo: OrpoConfig | None = Field(None, description="objective orpo's settings (only that objective accepts them).")
    # dotted key path -> where it was written ("FILE:LINE" or "--set KEY=VALUE"), filled by `load`: checks that can
    # only run later (they need the model) still name the line, as `where` gives it.
    _origins: Origins = PrivateAttr(default_factory=lambda: Origins())

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(f"written by a newer tunekit (schema {value} > {SCHEMA_VERSION})")
        return value

    @model_validator(mode="after")
    def _streaming_has_an_end(self) -> RunConfig:
        if self.data.streaming and self.training.max_steps < 1:
            raise ValueError("data.streaming: a stream has no length to count epochs in; set training.max_steps")
        return self

    @model_validator(mode="after")
    def _objective_has_its_data(self) -> RunConfig:
        for name in PREFERENCE_OBJECTIVES:
            if getattr(self, name) is not None and self.objective != name:
                raise ValueError(f"{name}: only objective {name} uses this section (objective is {self.objective}); "
                                 f"remove it or set objective: {name}")
        if self.objective in PREFERENCE_OBJECTIVES and getattr(self, self.objective) is None:
            setattr(self, self.objective, DpoConfig() if self.objective == "dpo" else OrpoConfig())  # what ran
        preference = self.objective in PREFERENCE_OBJECTIVES
        for index, source in enumerate(self.data.sources):
            if (source.format == "preference") != preference:
                needs = (f"objective {self.objective} trains on pairs: format must be preference" if preference else
                         f"preference pairs need objective dpo or orpo (objective is {self.objective})")
                raise ValueError(f"data.sources.{index}.format: {needs}")
        if preference and self.data.packing:
            raise ValueError(f"data.packing: objective {self.objective} scores each chosen/rejected sequence whole; "
                             "packing is for objective sft")
        if preference and self.data.streaming:
            raise ValueError(f"data.streaming: objective {self.objective} reads its pairs into the cache (not "
                             "streamed) in this version; set data.streaming: false")
        return self

    @property
    def preference(self) -> bool:
        """True for the objectives that train on preference pairs (dpo, orpo)."""
        return self.objective in PREFERENCE_OBJECTIVES

    @model_validator(mode="after")
    def _zero_stage_fits_method(self) -> RunConfig:
        if self.deepspeed is not None and not isinstance(self.deepspeed.config, str):  # a JSON file: _check_paths
            stage = self.deepspeed.zero_stage()
            if stage != "auto":  # auto chooses within MAX_ZERO_STAGE
                self.check_zero_stage(stage)
        return self

    def check_zero_stage(self, stage: int) -> None:
        """Raise ValueError ("deepspeed.stage: ...") when the method cannot run under ZeRO `stage`."""
        if stage > self.MAX_ZERO_STAGE:
            key = "deepspeed.stage" if self.deepspeed is None or self.deepspeed.config is None else "deepspeed.config"
            # bitsandbytes 4-bit weights cannot be partitioned by ZeRO-3's zero.Init in these versions.
            raise ValueError(f"{key}: ZeRO stage {stage} conflicts with method {self.method} (4-bit weights cannot "
                             f"be ZeRO-3 sharded); use stage {self.MAX_ZERO_STAGE} or drop deepspeed")

    @property
    def learning_rate(self) -> float:
        if self.training.learning_rate is not None:
            return self.training.learning_rate
        return DEFAULT_LR[(self.objective, self.method)]


class FullRunConfig(RunConfig):
    """Full fine-tuning: every weight trains; the ZeRO stage is chosen for the machine unless the section says one
    (one process: the plain Trainer when it fits)."""

    method: Literal["full"] = Field(description="full: every weight trains (the ZeRO stage that fits by default).")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig,
                                       description="DeepSpeed ZeRO; default stage auto (no DeepSpeed in one process "
                                       "when it fits).")


class LoraRunConfig(RunConfig):
    """LoRA: a frozen base plus trainable low-rank adapters."""

    method: Literal["lora"] = Field(description="lora: low-rank adapters on a frozen base.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")


class QloraRunConfig(LoraRunConfig):
    """QLoRA: the LoRA path with the frozen base stored 4-bit (NF4)."""

    MAX_ZERO_STAGE: ClassVar[int] = 2
    method: Literal["qlora"] = Field(description="qlora: LoRA on a 4-bit NF4 base.")
    qlora: QloraConfig = Field(default_factory=QloraConfig, description="4-bit quantization settings.")


# method -> its config class: which sections exist is decided here and nowhere else.
CONFIG_CLASSES: dict[str, type[RunConfig]] = {"full": FullRunConfig, "lora": LoraRunConfig, "qlora": QloraRunConfig}
# section -> the methods that use it, for sections not every method has ("lora: not used by method full").
SECTION_METHODS = {name: tuple(m for m, cls in CONFIG_CLASSES.items() if name in cls.model_fields)
                   for cls in CONFIG_CLASSES.values() for name in cls.model_fields
                   if not all(name in other.model_fields for other in CONFIG_CLASSES.values())}


def sections_of(method: str) -> list[str]:
    """Top-level keys a config of `method` may hold."""
    return list(CONFIG_CLASSES[method].model_fields)


def parse(raw: Any) -> RunConfig:
    """Validate a config mapping (as read from YAML) into its method's class. Raises pydantic ValidationError, or
    ValueError for a missing/unknown method (`load` turns both into one-line UserErrors)."""
    if not isinstance(raw, dict):
        raise ValueError("(top level): the config must be a YAML mapping of sections")
    method = raw.get("method")
    if method is None:
        raise ValueError(f"method: required key is missing (one of {', '.join(METHODS)})")
    if method not in CONFIG_CLASSES:
        raise ValueError(f"method: Input should be 'full', 'lora' or 'qlora' (got {method!r})")
    return CONFIG_CLASSES[method].model_validate(raw)


# ---------------------------------------------------------------- loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True,
         saved_by_tunekit: bool = False) -> RunConfig:
    """Read, override (`dotted.key=value`), validate and return the config.

    Raises UserError with one line `FILE:LINE: KEY: problem` (or `--set KEY=VALUE: KEY: problem`) for anything wrong,
    including a key written twice (YAML would silently keep the last one).
    Relative paths inside the config (model, data, deepspeed json) stay as written: they resolve from the cwd.
    check_paths=False validates the schema only (shipped configs whose model/data are built later).
    saved_by_tunekit: a run directory's config.yaml, upgraded from older schema versions (`_upgrade`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: the config is not UTF-8 text") from None
    try:
        origins = {key: f"{path}:{line}" for key, line in _key_lines(yaml.compose(text), str(path)).items()}
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the config must be a YAML mapping of sections")
    origins[()] = str(path)
    if saved_by_tunekit:
        _upgrade(raw)
    for item in overrides:
        key = _apply_override(raw, item)
        origins = {k: v for k, v in origins.items() if k[: len(key)] != key}
        for end in range(1, len(key) + 1):  # sections the override created are written there too
            origins.setdefault(key[:end], f"--set {item}")
        origins[key] = f"--set {item}"
    try:
        config = parse(raw)
    except ValidationError as exc:
        raise UserError(_describe(exc, origins, CONFIG_CLASSES[raw["method"]])) from None
    except ValueError as exc:  # no or unknown method
        key, message = str(exc).split(": ", 1)
        raise UserError(f"{_origin((key,), origins)}: {key}: {message}") from None
    if check_paths:
        _check_paths(config, origins)
    config._origins = Origins(origins)
    return config


def where(config: RunConfig, key: str) -> str:
    """`FILE:LINE: key` (or `--set ITEM: key`) for dotted `key` of a config read by `load`: the prefix of a one-line
    UserError raised after loading. Just `key` for a config built in code."""
    loc = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    origin = _origin(loc, config._origins)
    return f"{origin}: {key}" if origin else key


def _upgrade(raw: dict) -> None:
    """A config.yaml that tunekit wrote with schema 1 holds default lora/qlora sections for every method (tunekit
    put them there, not the user): drop the ones its method does not use, so old runs still merge and export."""
    if raw.get("schema_version") == 1 and raw.get("method") in CONFIG_CLASSES:
        for name in [key for key in raw if key not in CONFIG_CLASSES[raw["method"]].model_fields]:
            if name in SECTION_METHODS:
                del raw[name]
        raw["schema_version"] = SCHEMA_VERSION


def _apply_override(raw: dict, item: str) -> tuple:
    """`training.max_steps=20` → raw['training']['max_steps'] = 20 (the value parsed as YAML); returns the key path."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected dotted.key=value")
    key, value = item.split("=", 1)
    node: Any = raw
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                where = ".".join(map(str, parts[:depth]))
                raise UserError(f"--set {key}: {where} is a list of {len(node)} entries; address one by index 0-{len(node) - 1}")
        elif not isinstance(node, dict):
            raise UserError(f"--set {key}: {'.'.join(map(str, parts[:depth]))} is a value, not a section")
        if depth < len(parts) - 1:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise UserError(f"--set {item}: the value is not valid YAML") from None
    return tuple(parts)


def _key_lines(node: yaml.Node | None, where: str, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every dotted key path (list items by index) to its 1-based line in the YAML file.

    Raises UserError on a key written twice in one mapping: YAML keeps the last and silently drops the first.
    """
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            line = key_node.start_mark.line + 1
            if path in lines:
                raise UserError(f"{where}:{line}: {'.'.join(map(str, path))}: written twice (first at line "
                                f"{lines[path]}); YAML would silently keep only the last one")
            lines[path] = line
            lines.update(_key_lines(value_node, where, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[prefix + (index,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, where, prefix + (index,)))
    return lines


def _origin(loc: tuple, origins: dict[tuple, str]) -> str:
    """Where `loc` was written: FILE:LINE of its deepest existing prefix (a missing key points at its section)."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    return ""


DOTTED_KEY = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*$")


def _describe(exc: ValidationError, origins: dict[tuple, str], model: type[RunConfig]) -> str:
    """One line for the first validation error: file:line: dotted.key: what is wrong."""
    error = exc.errors()[0]
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and "[" in part))
    key = ".".join(str(part) for part in loc) or "(top level)"
    where = _origin(loc, origins)
    kind = error["type"]
    method = model.model_fields["method"].annotation.__args__[0]
    if kind == "extra_forbidden" and len(loc) == 1 and loc[0] in SECTION_METHODS:
        users = ", ".join(SECTION_METHODS[loc[0]])
        message = f"not used by method {method} (only by {users}); remove the section or change method"
    elif kind == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'" + _did_you_mean(loc, model)
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = error["msg"].removeprefix("Value error, ")
        if "input" in error and not isinstance(error["input"], (dict, list)):
            message += f" (got {error['input']!r})"
        named, _, rest = message.partition(": ")
        names_a_dotted_key = bool(rest) and DOTTED_KEY.match(named) is not None and "." in named
        if names_a_dotted_key or (not loc and rest):
            # rules spanning several keys name the key they blame first: "deepspeed.stage: ..."
            key, message = named, rest
            where = _origin(tuple(int(p) if p.isdigit() else p for p in key.split(".")), origins)
    more = len(exc.errors()) - 1
    suffix = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {key}: {message}{suffix}"


def _section_for(loc: tuple, model: type[BaseModel]) -> type[BaseModel] | None:
    """Walk the schema along `loc` (minus its last key) to find the model that rejected the key."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            for candidate in candidates:
                for arg in getattr(candidate, "__args__", ()):
                    if isinstance(arg, type) and issubclass(arg, BaseModel):
                        nested.append(arg)
        if not nested:
            return None
        model = nested[0]
    return model


def _did_you_mean(loc: tuple, model: type[BaseModel]) -> str:
    section = _section_for(loc, model)
    if section is None:
        return ""
    match = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_paths(config: RunConfig, origins: dict[tuple, str]) -> None:
    """Local files the config names must exist (hub names are left to the loaders)."""

    def fail(loc: tuple, message: str) -> None:
        raise UserError(f"{_origin(loc, origins)}: {'.'.join(map(str, loc))}: {message}")

    if looks_local(config.model.name_or_path) and not Path(config.model.name_or_path).is_dir():
        fail(("model", "name_or_path"), f"model directory not found: {config.model.name_or_path}")
    for index, source in enumerate(config.data.sources):
        if looks_local(source.path) and not Path(source.path).is_file():
            fail(("data", "sources", index, "path"), f"data file not found: {source.path}")
    for loc, value in ((("data", "eval_path"), config.data.eval_path), (("eval", "general"), config.eval.general)):
        if value is not None and not Path(value).is_file():
            fail(loc, f"data file not found: {value}")
    if config.deepspeed is not None and isinstance(config.deepspeed.config, str):
        if not Path(config.deepspeed.config).is_file():
            fail(("deepspeed", "config"), f"DeepSpeed JSON not found: {config.deepspeed.config}")
        try:
            config.check_zero_stage(config.deepspeed.zero_stage())
        except (UserError, ValueError) as exc:
            fail(("deepspeed", "config"), str(exc).removeprefix("deepspeed.config: "))


def looks_local(name: str) -> bool:
    """A path (./x, /x, x/y/z, a data file by its suffix, or anything that exists) rather than a hub id 'org/name'."""
    if name.lower().endswith(DATA_SUFFIXES):
        return True
    if name.startswith("tunekit:"):  # a shipped architecture config (src/tunekit/model_configs/), for estimates only
        return False
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1


def trap_warnings(config: RunConfig) -> list[str]:
    """Known traps from the seeds: legal, but usually a mistake. Returned as messages (the CLI prints them)."""
    messages = []
    uses_lora = isinstance(config, LoraRunConfig)
    if uses_lora and config.lora.alpha is not None and config.lora.alpha == config.lora.r:
        messages.append(
            f"lora.alpha == lora.r ({config.lora.r}): scale 1.0 trains slowly; the usual choice is alpha = 2*r"
        )
    if config.objective == "sft" and uses_lora and config.training.learning_rate is not None \
            and config.training.learning_rate < 5e-5:
        messages.append(
            f"training.learning_rate {config.training.learning_rate:g} is in the full fine-tuning range; "
            "LoRA adapters start at zero and usually need 1e-4..3e-4"
        )
    if config.objective == "sft" and config.method == "full" and config.training.learning_rate is not None \
            and config.training.learning_rate > 1e-4:
        messages.append(
            f"training.learning_rate {config.training.learning_rate:g} is high for full fine-tuning "
            "(seeds: 1e-5..5e-5); it risks catastrophic forgetting"
        )
    if config.objective == "dpo" and config.training.learning_rate is not None \
            and config.training.learning_rate > 10 * DEFAULT_LR[("dpo", config.method)]:
        messages.append(
            f"training.learning_rate {config.training.learning_rate:g} is high for DPO (default "
            f"{DEFAULT_LR[('dpo', config.method)]:g} for {config.method}): the loss has no floor, and a high rate "
            "drives the chosen and rejected log-probabilities down together"
        )
    if config.objective == "sft" and config.method == "full" and len(config.data.sources) == 1 \
            and config.data.sources[0].format != "text":
        messages.append(
            "full fine-tuning on one narrow source: mix 5-10% general text (a second data.sources entry) "
            "to limit catastrophic forgetting"
        )
    return messages
