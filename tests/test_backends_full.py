"""DeepSpeed ZeRO (backends/deepspeed.py, every method) and full fine-tuning under ZeRO-3: the generated/user DeepSpeed
config, and the real thing with 2 processes.

The 2-process run goes through the shipped launcher config exactly as a user types it
(`accelerate launch --config_file configs/accelerate/cpu-2proc-zero3.yaml -m tunekit train configs/tiny-full-zero3.yaml`),
with only the paths and step count overridden to point at the test fixtures.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunekit import config as config_mod
from tunekit.backends import deepspeed as ds_backend
from tunekit.cli import main
from tunekit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def make_config(tmp_path, tiny_base, method="full", extra: str = "") -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "Repeat: a b", "input": "", "output": "a b"}) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"method: {method}\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_base}\n"
                    f"data:\n  sources:\n    - path: {data}\n      format: alpaca\n  eval_fraction: 0\n"
                    f"  cache_dir: {tmp_path / 'cache'}\n{extra}")
    return path


# ---------------------------------------------------------------- the DeepSpeed config


def test_full_defaults_to_stage_auto_and_zero3_saves_consolidated(tmp_path, tiny_base):
    from tunekit.estimate.stage import choose_zero

    config = config_mod.load(make_config(tmp_path, tiny_base))
    assert config.deepspeed.stage == "auto"
    with pytest.raises(ValueError, match="deepspeed.stage is auto"):  # never generated before the machine decides
        ds_backend.deepspeed_config(config)
    # One process: the plain Trainer, no DeepSpeed config at all; config.yaml keeps "auto" (the original is untouched).
    alone = ds_backend.resolve_stage(config, choose_zero(config, 1, 80))
    assert alone.deepspeed is None and ds_backend.deepspeed_config(alone) is None and config.deepspeed.stage == "auto"
    # A stage auto chose is generated exactly like the same stage written in the config.
    zero3 = {"deepspeed": True, "stage": 3, "offload_optimizer": False, "offload_param": False}
    chosen = ds_backend.resolve_stage(config, zero3)
    written = config_mod.load(make_config(tmp_path, tiny_base, extra="deepspeed:\n  stage: 3\n"))
    assert ds_backend.deepspeed_config(chosen) == ds_backend.deepspeed_config(written)
    assert ds_backend.resolve_stage(written, {"deepspeed": False}) is written  # an explicit stage stays as given
    ds = ds_backend.deepspeed_config(chosen)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    # Everything the training section decides is left to the Trainer, so the two cannot disagree.
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"


def test_offload_and_stage_come_from_the_deepspeed_section(tmp_path, tiny_base):
    extra = "deepspeed:\n  stage: 3\n  offload_optimizer: true\n  offload_param: true\n"
    zero = ds_backend.deepspeed_config(config_mod.load(make_config(tmp_path, tiny_base, extra=extra)))["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    extra = "deepspeed:\n  stage: 2\n"
    zero = ds_backend.deepspeed_config(config_mod.load(make_config(tmp_path, tiny_base, "lora", extra)))["zero_optimization"]
    assert zero["stage"] == 2 and "stage3_gather_16bit_weights_on_model_save" not in zero
    assert ds_backend.deepspeed_config(config_mod.load(make_config(tmp_path, tiny_base, "lora"))) is None


def test_a_user_config_inline_or_json_is_used_as_given(tmp_path, tiny_base):
    user = {"zero_optimization": {"stage": 3, "overlap_comm": False}, "train_micro_batch_size_per_gpu": 8,
            "gradient_clipping": "auto"}
    inline = config_mod.load(make_config(tmp_path, tiny_base, extra=f"deepspeed:\n  config: {json.dumps(user)}\n"))
    json_path = tmp_path / "ds.json"
    json_path.write_text(json.dumps(user))
    from_file = config_mod.load(make_config(tmp_path, tiny_base, extra=f"deepspeed:\n  config: {json_path}\n"))
    for config in (inline, from_file):
        ds = ds_backend.deepspeed_config(config)
        assert ds["zero_optimization"]["overlap_comm"] is False and ds["train_micro_batch_size_per_gpu"] == 8
        # Filled in: final/ must hold real weights.
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in inline.deepspeed.config["zero_optimization"]


@pytest.mark.parametrize("user, message", [
    ({"train_micro_batch_size_per_gpu": 4}, r"deepspeed.config: train_micro_batch_size_per_gpu is 4 but "
                                            r"training.per_device_train_batch_size gives 8"),
    ({"gradient_clipping": 0.5}, r"deepspeed.config: gradient_clipping is 0.5 but training.max_grad_norm gives 1.0"),
    ({"bf16": {"enabled": True}}, r"deepspeed.config: bf16.enabled is True but training.precision \(fp32\)"),
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
     r"deepspeed.config: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true"),
    ({"zero_optimization": {"overlap_comm": True}}, r"deepspeed.config: (\S*ds.json: )?no zero_optimization.stage"),
])
@pytest.mark.parametrize("where", ["inline", "json"])
def test_a_user_config_that_disagrees_is_refused(tmp_path, tiny_base, user, message, where):
    user = {"zero_optimization": {"stage": 3}, **user}
    if where == "json":
        (tmp_path / "ds.json").write_text(json.dumps(user))
    given = json.dumps(user) if where == "inline" else tmp_path / "ds.json"
    # Refused when the config is loaded (a missing stage) or when the DeepSpeed config is built (the rest): before
    # any model is loaded either way.
    with pytest.raises(UserError, match=message):
        config = config_mod.load(make_config(tmp_path, tiny_base, extra=f"deepspeed:\n  config: {given}\n"))
        ds_backend.deepspeed_config(config)


@pytest.mark.parametrize("method, deepspeed, expected", [
    ("qlora", "deepspeed:\n  stage: 3\n", r"^error: .*run.yaml:\d+: deepspeed.stage: ZeRO stage 3 conflicts with method qlora"),
    ("qlora", 'deepspeed:\n  config: {"zero_optimization": {"stage": 3}}\n',
     r"^error: .*run.yaml:\d+: deepspeed.config: ZeRO stage 3 conflicts with method qlora"),
    ("qlora", "deepspeed:\n  config: STAGE3_JSON\n",
     r"^error: .*run.yaml:\d+: deepspeed.config: ZeRO stage 3 conflicts with method qlora"),
    ("full", "deepspeed:\n  config: BAD_JSON\n", r"^error: .*run.yaml:\d+: deepspeed.config: .*ds.json:1: DeepSpeed JSON does not parse"),
])
def test_bad_deepspeed_input_is_one_error_line(tmp_path, tiny_base, capsys, method, deepspeed, expected):
    bad_json = tmp_path / "ds.json"
    bad_json.write_text('{"zero_optimization": {"stage": 3,}}')
    (tmp_path / "stage3.json").write_text('{"zero_optimization": {"stage": 3}}')
    deepspeed = deepspeed.replace("BAD_JSON", str(bad_json)).replace("STAGE3_JSON", str(tmp_path / "stage3.json"))
    config = make_config(tmp_path, tiny_base, method, deepspeed)
    assert main(["train", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), errors

    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the real thing: 2 processes, ZeRO-3


def launch_env(tmp_path) -> dict:
    """What `make test` and docs/launching.md set: one thread per process (10x faster on CPU), DeepSpeed's compiled
    op cached in the repo's .cache (it takes ~60 s to build the first time), no tracker."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    return env


def launch(tmp_path, command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/cpu-2proc-zero3.yaml COMMAND`, from the repo root."""
    result = subprocess.run(
        [str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu-2proc-zero3.yaml", *command],
        cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def fixture_overrides(tmp_path, tiny_base, demo_data, steps: int) -> list[str]:
    """--set overrides that point a shipped tiny config at the test fixtures and keep it short."""
    return ["--set", f"model.name_or_path={tiny_base}", "--set", f"data.sources.0.path={demo_data['train']}",
            "--set", f"data.eval_path={demo_data['eval']}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f"output_dir={tmp_path / 'run'}", "--set", f"training.max_steps={steps}",
            "--set", f"checkpoints.save_steps={steps}", "--set", f"training.logging_steps={max(1, steps // 4)}",
            "--set", "eval.task_samples=8",
            "--set", "eval.max_new_tokens=4", "--set", f"eval.general={Path(tiny_base) / 'general_eval.jsonl'}"]


# Runs `tunekit train ...` under the launcher with every module's forward watched while the task metric and the
# general-text loss run: the most parameter elements whole (ZeRO-3 status AVAILABLE) on this rank at any forward,
# before the engine exists ("before") and after training ("after"), written to OUT.RANK.json.
GATHER_PROBE = """
import json, sys
import torch.distributed as dist
import tunekit.evaluate, tunekit.forgetting
from tunekit.cli import main

out = sys.argv[1]
record = {"before": 0, "after": 0, "calls": [], "largest_module": 0, "whole": 0}

def measured(function):
    def wrapper(model, *args, **kwargs):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        params = list(model.parameters())
        phase = "after" if hasattr(model, "ds_id") else "before"  # ds_id: the engine's hooks are on the model
        record["calls"].append(phase)
        record["whole"] = sum(p.ds_numel for p in params)
        record["largest_module"] = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in model.modules())

        def watch(module, *_):
            whole = sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)
            record[phase] = max(record[phase], whole)

        handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(watch), m.register_forward_hook(watch))]
        try:
            return function(model, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
    return wrapper

tunekit.evaluate.exact_match = measured(tunekit.evaluate.exact_match)
tunekit.forgetting.general_loss = measured(tunekit.forgetting.general_loss)
code = main(sys.argv[2:])
json.dump(record, open(f"{out}.{dist.get_rank()}.json", "w"))
sys.exit(code)
"""


@pytest.mark.slow
def test_full_zero3_two_processes_shards_learns_and_saves_a_loadable_model(tmp_path, tiny_base, demo_data):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    steps = 16
    probe = tmp_path / "probe.py"
    probe.write_text(GATHER_PROBE)
    launch(tmp_path, [str(probe), str(tmp_path / "gathered"), "train", "configs/tiny-full-zero3.yaml",
                      *fixture_overrides(tmp_path, tiny_base, demo_data, steps)])
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["steps"] == steps
    assert summary["zero"]["stage"] == 3 and summary["zero"]["reason"] == "as configured"
    assert summary["train_loss_last"] < summary["train_loss_first"]
    # The task metric and the forgetting monitor ran under ZeRO-3 (generation on sharded weights, both ranks)...
    assert summary["task_metric_before"] is not None and summary["task_metric_after"] is not None
    assert summary["general_loss_base"] is not None
    # ...with no whole copy of the model on either rank before training: our hooks gather one module's own
    # parameters at a time, so at most the largest module (here the 1068 x 128 embedding, 1/8 of the model) is
    # whole. After training the engine's hooks gather per module too, but keep up to stage3_max_live_parameters
    # (1e9 elements by DeepSpeed's default) cached: for this 1M-parameter model that is all of it.
    for rank in (0, 1):
        gathered = json.loads((tmp_path / f"gathered.{rank}.json").read_text())
        assert {"before", "after"} <= set(gathered["calls"])
        assert 0 < gathered["before"] <= gathered["largest_module"] < gathered["whole"] / 4, gathered
        assert 0 < gathered["after"] <= gathered["whole"]
    # The scores are the ones a single process gets on whole weights: the base model's before training, the saved
    # model's after (8 prompts split over the 2 ranks).
    from transformers import AutoTokenizer

    from tunekit.data import eval_pair, read_rows
    from tunekit.evaluate import exact_match
    from tunekit.forgetting import general_loss

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    pairs = [eval_pair(row, "alpaca", tokenizer) for row in read_rows(str(demo_data["eval"]), "alpaca")][:8]
    trained = AutoModelForCausalLM.from_pretrained(run / "final")
    assert exact_match(trained, tokenizer, pairs, max_new_tokens=4, batch_size=8) == summary["task_metric_after"]
    original = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert exact_match(original, tokenizer, pairs, max_new_tokens=4, batch_size=8) == summary["task_metric_before"]
    texts = [row["text"] for row in read_rows(str(Path(tiny_base) / "general_eval.jsonl"), "text")]
    base_loss = general_loss(original, tokenizer, texts, 128, 8)  # tiny-full-zero3.yaml: max_seq_len 128, eval batch 8
    assert summary["general_loss_base"] == pytest.approx(base_loss, rel=1e-6)

    # Sharded: rank 0 held ~half of every weight while training (padding makes it a little more than 1/2)...
    assert 0.5 <= summary["zero3_local_param_fraction"] < 0.55
    # ...and each rank's optimizer checkpoint holds half of the fp32 master weights, not all of them.
    n_params = summary["total_params"]
    shards = sorted((run / f"checkpoint-{steps}" / f"global_step{steps}").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=False)
        assert state["optimizer_state_dict"]["partition_count"] == 2
        held = sum(t.numel() for t in state["optimizer_state_dict"]["fp32_flat_groups"])
        assert n_params / 2 <= held < n_params / 2 + 1024

    # final/ is one consolidated safetensors model, equal to what DeepSpeed's own consolidation gives...
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = load_file(run / "final" / "model.safetensors")
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run / f"checkpoint-{steps}"))
    assert set(saved) <= set(consolidated)
    for name, tensor in saved.items():
        assert tensor.numel() > 0 and torch.equal(tensor, consolidated[name]), name
    # ...that from_pretrained loads whole, trained away from the base.
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert sum(p.numel() for p in model.parameters()) == n_params
    trained, original = dict(model.named_parameters()), dict(base.named_parameters())
    assert all(trained[name].shape == original[name].shape for name in original)
    assert any(not torch.equal(trained[name], original[name]) for name in original)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
