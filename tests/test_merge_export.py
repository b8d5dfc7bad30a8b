"""merge and export on real tiny LoRA/QLoRA runs: the results reload with plain transformers/peft and give the
adapter model's logits; the QLoRA merge prefers the base the adapter was trained against; errors are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tunekit.cli import main

FP32_TOLERANCE = 1e-4  # merging only reorders a sum: the CPU stack measured 2e-7 on a tiny model


def data_paths(demo_data) -> dict[str, Path]:
    """The demo task's files, whether the fixture gives write_demo_task's dict or its directory."""
    if isinstance(demo_data, dict):
        return {k: Path(v) for k, v in demo_data.items()}
    return {"train": Path(demo_data) / "train.jsonl", "eval": Path(demo_data) / "eval.jsonl"}


def train_run(tmp_path_factory, tiny_base, demo_data, method: str, extra: str = "") -> Path:
    """A 4-step run of the tiny base (no checkpoints, eval at the end only)."""
    root = tmp_path_factory.mktemp(method)
    paths = data_paths(demo_data)
    config = root / "run.yaml"
    config.write_text(
        f"method: {'qlora' if method == 'qlora' else 'lora'}\noutput_dir: {root / 'run'}\n"
        f"model:\n  name_or_path: {tiny_base}\n{extra}"
        f"data:\n  sources:\n    - path: {paths['train']}\n      format: alpaca\n      max_examples: 64\n"
        f"  eval_path: {paths['eval']}\n  max_seq_len: 64\n  cache_dir: {root / 'cache'}\n"
        "training:\n  max_steps: 4\n  per_device_train_batch_size: 4\n  per_device_eval_batch_size: 16\n"
        "  logging_steps: 1\n  learning_rate: 0.01\n"  # large: the adapter must move logits visibly in 4 steps
        "checkpoints:\n  save_steps: 100\neval:\n  task_metric: none\n  rank_spectrum: false\n"
    )
    assert main(["train", str(config)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base, demo_data):
    return train_run(tmp_path_factory, tiny_base, demo_data, "lora")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_base, demo_data):
    return train_run(tmp_path_factory, tiny_base, demo_data, "qlora")


# ---------------------------------------------------------------- helpers


def sample_ids(run: Path) -> torch.Tensor:
    """[2, seq] token ids: text the check never saw, through the run's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    rows = tokenizer(["### Instruction:\nReverse the words.\n\n### Input:\ncat dog sun\n\n### Response:\n",
                      "The old boat sailed past the red house near the river."], add_special_tokens=False)["input_ids"]
    length = min(map(len, rows))
    return torch.tensor([row[:length] for row in rows])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def adapter_model(run: Path, quantized: bool = False):
    """The trained model as peft loads it: base (+ 4-bit for QLoRA, computing in fp32) + the run's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    base_path = yaml.safe_load((run / "config.yaml").read_text())["model"]["name_or_path"]
    extra = {}
    if quantized:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **extra)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(run / "final")))  # added tokens: peft loads the rows
    for module in base.modules():  # bitsandbytes' CPU eval path multiplies in bf16; training computes as set
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, run / "final")


def load_plain(path: Path):
    """Load an exported directory with transformers alone and check nothing peft/bnb-specific is in it."""
    from transformers import AutoModelForCausalLM

    assert not (path / "adapter_config.json").exists()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    return model


def merge(run: Path, out: Path, *args: str) -> dict:
    assert main(["merge", str(run), "--out", str(out), *args]) == 0
    return json.loads((out / "merge_check.json").read_text())


# ---------------------------------------------------------------- LoRA


def test_lora_merge_reloads_without_peft_and_matches_the_adapter_model(lora_run, tmp_path):
    check = merge(lora_run, tmp_path / "merged")
    assert check["passed"] and check["dtype"] == "fp32" and check["max_abs_diff"] <= FP32_TOLERANCE
    assert check["prompts_source"].endswith("eval.jsonl") and len(check["prompts"]) == 4
    merged = load_plain(tmp_path / "merged")
    ids = sample_ids(lora_run)
    trained = adapter_model(lora_run)
    reference = logits(trained, ids)
    with trained.disable_adapter():
        base = logits(trained, ids)
    reference_merged = logits(merged, ids)
    # the adapter changed the model (else equality would prove nothing), and the merge reproduces the change
    assert (reference - base).abs().max() > 100 * FP32_TOLERANCE
    assert (reference_merged - reference).abs().max() <= FP32_TOLERANCE
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    print(f"\nLoRA fp32 merge: check {check['max_abs_diff']:.3g}, reload "
          f"{(reference_merged - reference).abs().max():.3g}")


def test_lora_bf16_merge_is_within_its_looser_tolerance(lora_run, tmp_path):
    check = merge(lora_run, tmp_path / "merged", "--dtype", "bf16")
    assert check["passed"] and check["dtype"] == "bf16" and FP32_TOLERANCE < check["max_abs_diff"] <= check["tolerance"]
    merged = load_plain(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    print(f"\nLoRA bf16 merge: {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g})")


def test_merge_with_added_tokens_grows_the_vocabulary(tmp_path_factory, tiny_base, demo_data, tmp_path):
    run = train_run(tmp_path_factory, tiny_base, demo_data, "lora-tokens",
                    extra='  add_tokens: ["<|tool|>", "<|think|>"]\n')
    adapter_config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter_config["trainable_token_indices"]
    check = merge(run, tmp_path / "merged")
    assert check["passed"]
    merged = load_plain(tmp_path / "merged")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base_vocabulary = len(AutoTokenizer.from_pretrained(tiny_base))
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == base_vocabulary + 2
    ids = torch.tensor([tokenizer("<|tool|> cat <|think|> dog", add_special_tokens=False)["input_ids"]])
    assert (logits(merged, ids) - logits(adapter_model(run), ids)).abs().max() <= FP32_TOLERANCE


# ---------------------------------------------------------------- QLoRA


def test_qlora_merge_into_the_dequantized_base_reproduces_the_trained_model(qlora_run, tmp_path):
    check = merge(qlora_run, tmp_path / "dequantized")
    assert check["base"] == "dequantized" and check["passed"]
    diffs = check["qlora"]
    # the dequantized NF4 weights are what the adapter was trained against; the original weights differ from them
    # by the NF4 rounding, which the merge cannot undo
    assert diffs["dequantized"]["vs_trained"] < diffs["original"]["vs_trained"]
    assert diffs["dequantized"]["vs_trained"] <= FP32_TOLERANCE < diffs["original"]["vs_trained"]
    ids = sample_ids(qlora_run)
    trained = logits(adapter_model(qlora_run, quantized=True), ids)
    reloaded = logits(load_plain(tmp_path / "dequantized"), ids)
    assert (reloaded - trained).abs().max() <= FP32_TOLERANCE

    original = merge(qlora_run, tmp_path / "original", "--base", "original")
    assert original["base"] == "original" and original["passed"]  # gated on the merge itself, cost reported
    assert original["max_abs_diff"] == pytest.approx(diffs["original"]["vs_trained"], rel=1e-3)
    assert (logits(load_plain(tmp_path / "original"), ids) - trained).abs().max() > FP32_TOLERANCE
    print(f"\nQLoRA merge vs trained model: dequantized {diffs['dequantized']['vs_trained']:.3g}, "
          f"original {diffs['original']['vs_trained']:.3g}")


# ---------------------------------------------------------------- export


def test_export_adapter_is_exactly_the_peft_vllm_layout(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--out", str(out), "--format", "adapter"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    exported = PeftModel.from_pretrained(base, out)
    ids = sample_ids(lora_run)
    assert torch.equal(logits(exported, ids), logits(adapter_model(lora_run), ids))

    from safetensors import safe_open

    assert main(["export", str(lora_run), "--out", str(tmp_path / "bf16"), "--format", "adapter", "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "bf16" / "adapter_model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}


def test_export_merged_shards_keeps_the_chat_template_and_writes_a_model_card(lora_run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--out", str(out), "--format", "merged", "--max-shard-size", "200KB"]) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    ids = sample_ids(lora_run)
    assert (logits(load_plain(out), ids) - logits(adapter_model(lora_run), ids)).abs().max() <= FP32_TOLERANCE

    tokenizer = AutoTokenizer.from_pretrained(out)
    trained_with = AutoTokenizer.from_pretrained(lora_run / "final")
    assert tokenizer.chat_template and tokenizer.chat_template == trained_with.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        trained_with.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    card = (out / "README.md").read_text()
    summary = json.loads((lora_run / "summary.json").read_text())
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["base_model"] and front_matter["library_name"] == "transformers"
    assert "lora" in front_matter["tags"]
    for section in ("## Base model", "## Method and hyperparameters", "## Data", "## Results", "## Merge check"):
        assert section in card
    assert f"| eval loss | {summary['eval_loss']:.4g} |" in card
    assert f"| train loss (last logged) | {summary['train_loss_last']:.4g} |" in card
    assert "| lora r | 16 |" in card and "eval.jsonl" in card
    # huggingface_hub reads the card back: the metadata block is its own format, not hand-written YAML
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data
    assert data.library_name == "transformers" and data.tags == ["tunekit", "lora", "sft"]
    # the training setup comes from resolved.json: what "auto" stood for and the versions that trained it
    resolved = json.loads((lora_run / "resolved.json").read_text())
    assert "## Training setup" in card and f"| precision | {resolved['precision']} |" in card
    assert f"transformers {resolved['versions']['transformers']}" in card
    assert f"| precision | auto ({resolved['precision']}) |" in card
    check = json.loads((out / "merge_check.json").read_text())
    assert check["trained_with"] == resolved and check["merged_with"]["versions"]["torch"] == torch.__version__


def test_export_of_a_full_run_resaves_its_consolidated_model(tiny_base, tmp_path):
    """A full run's final/ (faked from the tiny base: no DeepSpeed needed) exports as is, in bf16 on request."""
    run = tmp_path / "full-run"
    shutil.copytree(tiny_base, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "method": "full", "output_dir": str(run), "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": [{"path": "train.jsonl", "format": "alpaca"}]}}))
    (run / "summary.json").write_text(json.dumps({"method": "full", "steps": 3, "eval_loss": 1.25}))
    assert main(["merge", str(run), "--out", str(tmp_path / "m")]) == 2  # nothing to merge
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    model = load_plain(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert "| eval loss | 1.25 |" in (tmp_path / "out" / "README.md").read_text()
    assert main(["export", str(run), "--out", str(tmp_path / "a"), "--format", "adapter"]) == 2


# ---------------------------------------------------------------- errors and idempotence


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run-copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    return copy


def assert_one_error_line(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and all(word in err[-1] for word in words), err


def test_a_run_without_an_adapter_is_refused(lora_run, tmp_path, capsys):
    run = copy_run(lora_run, tmp_path)
    (run / "final" / "adapter_model.safetensors").unlink()
    for command in (["merge"], ["export", "--format", "adapter"], ["export"]):
        assert main([command[0], str(run), "--out", str(tmp_path / "out"), *command[1:]]) == 2
        assert_one_error_line(capsys, "no adapter")
    assert not (tmp_path / "out").exists()


def test_an_adapter_whose_base_is_gone_is_refused(lora_run, tmp_path, capsys):
    run = copy_run(lora_run, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(tmp_path / "no-such-base")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for command in (["merge"], ["export", "--format", "adapter"]):
        assert main([command[0], str(run), "--out", str(tmp_path / "out"), *command[1:]]) == 2
        assert_one_error_line(capsys, "base model not found", "no-such-base")
    assert not (tmp_path / "out").exists()


def test_merging_twice_refuses_then_replaces_atomically(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    merge(lora_run, out)
    first = (out / "model.safetensors").read_bytes()
    (out / "marker").write_text("mine")
    assert main(["merge", str(lora_run), "--out", str(out)]) == 2
    assert_one_error_line(capsys, "already exists", "--overwrite")
    assert (out / "marker").read_text() == "mine"
    assert main(["export", str(lora_run), "--out", str(out), "--format", "adapter"]) == 2
    assert main(["merge", str(lora_run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "marker").exists() and (out / "model.safetensors").read_bytes() == first  # deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no .tmp/.old left behind
    assert main(["merge", str(lora_run), "--out", str(lora_run), "--overwrite"]) == 2  # never the run itself
    assert_one_error_line(capsys, "would overwrite the run")


def test_a_failed_check_writes_nothing(lora_run, tmp_path, capsys, monkeypatch):
    import tunekit.merge

    monkeypatch.setattr(tunekit.merge, "max_abs_diff", lambda a, b: 1.0)  # as if the merge went wrong
    assert main(["merge", str(lora_run), "--out", str(tmp_path / "merged")]) == 2
    assert_one_error_line(capsys, "merge check failed", "tolerance")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- what training resolved (resolved.json)


def write_resolved(run: Path, **changes) -> dict:
    """Rewrite the run's resolved.json with `changes` (as if it had trained elsewhere); returns the record."""
    from tunekit import rundir

    record = json.loads((run / "resolved.json").read_text()) if (run / "resolved.json").is_file() else {
        "precision": "fp32", "load_dtype": "float32", "zero_stage": None, "world_size": 1,
        "attn_implementation": "sdpa", "device": "cpu", "versions": rundir.library_versions()}
    record.update(changes)
    rundir.write_json(run / "resolved.json", rundir.Resolved(**record).model_dump(mode="json"))
    return record


def test_qlora_merge_requantizes_from_the_load_dtype_training_recorded(qlora_run, tmp_path, monkeypatch):
    """A QLoRA run that trained on a bf16 GPU, merged on this CPU: the 4-bit base is quantized from bf16 as in
    training (this machine alone would say fp32), and the merge is saved in bf16."""
    import tunekit.merge

    run = copy_run(qlora_run, tmp_path)
    write_resolved(run, precision="bf16", load_dtype="bfloat16", attn_implementation="eager",
                   device="cuda (NVIDIA H100 80GB HBM3)")
    loads = []
    load_base = tunekit.merge.load_base

    def spy(config, tokenizer, dtype, attn, quantization_config=None, device="cpu"):
        loads.append((dtype, attn, quantization_config is not None))
        return load_base(config, tokenizer, dtype, attn, quantization_config, device)

    monkeypatch.setattr(tunekit.merge, "load_base", spy)
    check = merge(run, tmp_path / "merged")
    assert (torch.bfloat16, "eager", True) in loads  # the 4-bit reference, quantized from bf16
    assert all(attn == "eager" for _, attn, _ in loads)  # the attention training ran
    assert check["passed"] and check["quantized_from"] == "bfloat16" and check["dtype"] == "bf16"
    assert check["trained_with"]["device"].startswith("cuda")
    assert load_plain(tmp_path / "merged").dtype == torch.bfloat16


def test_a_run_without_a_resolved_record_merges_with_one_warning(lora_run, tmp_path, capsys):
    """A run written by the previous release (no resolved.json): the old derivation, and a warning that says so."""
    run = copy_run(lora_run, tmp_path)
    (run / "resolved.json").unlink()
    capsys.readouterr()
    check = merge(run, tmp_path / "merged")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "resolved.json" in warnings[0], warnings
    assert check["passed"] and check["dtype"] == "fp32" and check["trained_with"] is None
    assert "Not recorded" in (tmp_path / "merged" / "README.md").read_text()


def fake_full_run(root: Path, tiny_base: Path, resolved: dict | None = None) -> Path:
    """A full run's directory with final/ faked from the tiny base (no DeepSpeed needed)."""
    from tunekit import rundir

    run = root / "full-run"
    shutil.copytree(tiny_base, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "method": "full", "output_dir": str(run), "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": [{"path": "train.jsonl", "format": "alpaca"}]}}))
    (run / "summary.json").write_text(json.dumps({"method": "full", "steps": 3, "eval_loss": 1.25}))
    if resolved is not None:
        rundir.write_json(run / "resolved.json", rundir.Resolved(**resolved).model_dump(mode="json"))
    return run


def test_a_full_run_exports_in_its_compute_precision_not_its_fp32_master_weights(tiny_base, tmp_path):
    """A full run loads fp32 master weights whatever its precision; under DeepSpeed bf16 final/ holds the 16-bit
    copies, so the default export dtype is the precision the run recorded (not fp32, not this machine's)."""
    from tunekit import rundir

    run = fake_full_run(tmp_path, tiny_base, {
        "precision": "bf16", "load_dtype": "float32", "zero_stage": 3, "world_size": 8,
        "attn_implementation": "sdpa", "device": "cuda (NVIDIA H100 80GB HBM3)", "versions": rundir.library_versions()})
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    assert load_plain(tmp_path / "out").dtype == torch.bfloat16
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| precision | auto (bf16) |" in card and "| deepspeed zero stage | 3 |" in card
    assert "| processes (world size) | 8 |" in card and "| effective batch (sequences) | 64 |" in card


@pytest.mark.parametrize("method, resolved, model_dtype, stored, expected", [
    ("lora", {"load_dtype": "bfloat16", "precision": "bf16"}, "auto", "float32", "bf16"),  # trained on a bf16 base
    ("qlora", {"load_dtype": "float32", "precision": "fp32"}, "auto", "bfloat16", "fp32"),  # CPU run: fp32 base
    ("full", {"load_dtype": "float32", "precision": "bf16"}, "auto", "float32", "bf16"),  # fp32 masters, bf16 saved
    ("full", {"load_dtype": "float32", "precision": "fp32"}, "auto", "bfloat16", "fp32"),
    ("lora", {"load_dtype": "bfloat16", "precision": "bf16"}, "float16", "float32", "fp16"),  # the run said so
    ("lora", None, "auto", "bfloat16", "bf16"),  # no record: the old rule, the checkpoint's stored dtype
    ("full", None, "auto", None, "fp32"),
])
def test_default_save_dtype(method, resolved, model_dtype, stored, expected):
    from types import SimpleNamespace

    from tunekit import config as config_mod
    from tunekit import rundir
    from tunekit.merge import default_dtype

    config = config_mod.parse({"method": method, "output_dir": "run",
                               "model": {"name_or_path": "base", "dtype": model_dtype},
                               "data": {"sources": [{"path": "train.jsonl", "format": "alpaca"}]}})
    record = None if resolved is None else rundir.Resolved(
        **resolved, zero_stage=None, world_size=1, attn_implementation="sdpa", device="cpu", versions={})
    run = rundir.Run(Path("run"), config, {}, record, Path("run/final"))
    assert default_dtype(run, SimpleNamespace(dtype=stored)) == expected


# ---------------------------------------------------------------- strict input: not a run, or files that do not load


def assert_refused(capsys, out: Path, argv: list[str], *words: str, only_line: bool = True) -> str:
    """The command exits 2 with one `error:` line on stderr (naming `words`), and --out was not created."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), err
    assert "Traceback" not in err
    if only_line:
        assert lines == errors, err
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    return errors[0]


COMMANDS = [["merge"], ["export"], ["export", "--format", "adapter"]]


def lora_run_dir(root: Path, base: str, final: bool = True, **changes) -> Path:
    """A LoRA run directory as tunekit writes it (config.yaml, summary.json), without training: these runs are
    refused before anything is loaded."""
    run = root / "run"
    config = {"method": "lora", "output_dir": str(run), "model": {"name_or_path": base},
              "data": {"sources": [{"path": "train.jsonl", "format": "alpaca"}]}, **changes}
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "summary.json").write_text("{}")
    if final:
        (run / "final").mkdir()
    return run


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("case, words", [
    ("missing", ["no such run directory"]),
    ("a file", ["a file, not a run directory"]),
    ("no config.yaml", ["not a tunekit run directory (no config.yaml)"]),
    ("invalid config.yaml", ["config.yaml:", "training.max_steps"]),
    ("no final/", ["no final/ directory"]),
    ("invalid resolved.json", ["resolved.json", "not a valid tunekit record"]),
])
def test_a_directory_that_is_not_a_finished_run_is_refused(tiny_base, tmp_path, capsys, command, case, words):
    if case == "missing":
        run = tmp_path / "no-such-run"
    elif case == "a file":
        run = tmp_path / "run.yaml"
        run.write_text("method: lora\n")
    elif case == "no config.yaml":
        run = lora_run_dir(tmp_path, str(tiny_base))
        (run / "config.yaml").unlink()
    elif case == "invalid config.yaml":
        run = lora_run_dir(tmp_path, str(tiny_base), training={"max_steps": 0})
    elif case == "no final/":
        run = lora_run_dir(tmp_path, str(tiny_base), final=False)
    else:
        run = lora_run_dir(tmp_path, str(tiny_base))
        (run / "resolved.json").write_text('{"precision": "bf16"')
    out = tmp_path / "out"
    assert_refused(capsys, out, [command[0], str(run), "--out", str(out), *command[1:]], *words)


def broken_copy(source: Path, dest: Path, name: str, breakage: str) -> Path:
    """Copy a directory and break one of its files: "unknown model_type", "truncated" or "not json"."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    path = dest / name
    if breakage == "unknown model_type":
        config = json.loads(path.read_text())
        config["model_type"] = "no-such-architecture"
        path.write_text(json.dumps(config))
    elif breakage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a download or copy that stopped half way
    else:
        path.write_text('{"peft_type": "LORA", "r": ')
    return dest


def point_at_base(run: Path, base: Path) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(base)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("broken, breakage, commands, words", [
    # the base model (model.name_or_path): its config.json, its weights
    ("base", ("config.json", "unknown model_type"), COMMANDS, ["base model", "no-such-architecture"]),
    ("base", ("model.safetensors", "truncated"), COMMANDS[:2], ["base model", "cannot load", "deserializing header"]),
    # final/: the adapter's config and weights, the tokenizer
    ("final", ("adapter_config.json", "not json"), COMMANDS, ["adapter_config.json", "cannot load"]),
    ("final", ("adapter_model.safetensors", "truncated"), COMMANDS, ["adapter", "deserializing header"]),
    ("final", ("tokenizer.json", "not json"), COMMANDS[:2], ["tokenizer in", "cannot load"]),
], ids=lambda value: value[1] if isinstance(value, tuple) else None)
def test_a_file_a_library_cannot_load_is_one_error_line(lora_run, tiny_base, tmp_path, capsys, broken, breakage,
                                                         commands, words):
    name, how = breakage
    if broken == "base":
        run = copy_run(lora_run, tmp_path)
        point_at_base(run, broken_copy(tiny_base, tmp_path / "base", name, how))
    else:
        run = tmp_path / "run"
        shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoint-*", "final"))
        broken_copy(lora_run / "final", run / "final", name, how)
    out = tmp_path / "out"
    for command in commands:
        assert_refused(capsys, out, [command[0], str(run), "--out", str(out), *command[1:]], *words, only_line=False)


@pytest.mark.parametrize("name, how, words", [
    ("config.json", "unknown model_type", ["model in", "final", "no-such-architecture"]),
    ("model.safetensors", "truncated", ["model in", "final", "deserializing header"]),
])
def test_a_full_run_whose_final_model_does_not_load_is_one_error_line(tiny_base, tmp_path, capsys, name, how, words):
    run = fake_full_run(tmp_path, tiny_base)
    shutil.rmtree(run / "final")
    broken_copy(tiny_base, run / "final", name, how)
    out = tmp_path / "out"
    assert_refused(capsys, out, ["export", str(run), "--out", str(out)], *words, only_line=False)



# ---------------------------------------------------------------- where the merge check runs (issue 17)


def resolved(load_dtype: str = "bfloat16"):
    from tunekit import rundir

    return rundir.Resolved(precision="bf16", load_dtype=load_dtype, zero_stage=None, world_size=1,
                           attn_implementation="sdpa", device="cuda (NVIDIA A100-SXM4-80GB)", versions={})


@pytest.mark.parametrize("cuda, method, save, device, compute", [
    # A GPU machine: the 4-bit reference lands on the GPU (bitsandbytes), so the merge runs there too, in the save
    # dtype's precision (fp32 for an fp32 save: its 1e-4 tolerance cannot absorb bf16 rounding on either side).
    (True, "qlora", "fp32", "cuda", torch.float32),
    (True, "qlora", "bf16", "cuda", torch.bfloat16),
    (True, "qlora", "fp16", "cuda", torch.float16),
    (False, "qlora", "bf16", "cpu", torch.float32),  # CPU: fp32 arithmetic, as before
    (True, "lora", "fp32", "cpu", torch.float32),  # LoRA: its reference is the unmerged model in the same merge
    (True, "lora", "bf16", "cpu", torch.float32),
])
def test_merge_plan_runs_the_reference_and_the_merge_on_one_device_in_one_dtype(cuda, method, save, device, compute):
    from tunekit.merge import MergePlan, merge_plan

    assert merge_plan(cuda, resolved(), save, method) == MergePlan(device, torch.bfloat16, compute)
    assert merge_plan(cuda, resolved("float32"), save, method).load_dtype == torch.float32  # training's record


def test_qlora_trained_in_bf16_merges_to_fp32_within_the_fp32_tolerance(qlora_run, tmp_path):
    """A run quantized from bf16 (as on a GPU), merged with --dtype fp32: the reference used to compute through its
    bf16 embeddings/norms/lm_head (hidden states rounded to bf16 at every 4-bit layer) while the merge ran in fp32,
    and the check failed its own 1e-4 tolerance. Both now compute in fp32 from training's bf16 values."""
    run = copy_run(qlora_run, tmp_path)
    write_resolved(run, precision="bf16", load_dtype="bfloat16")
    check = merge(run, tmp_path / "merged", "--dtype", "fp32")
    assert check["passed"] and check["dtype"] == "fp32" and check["quantized_from"] == "bfloat16"
    assert check["merged_with"]["device"] == "cpu" and check["merged_with"]["compute_dtype"] == "float32"
