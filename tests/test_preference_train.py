"""Preference tuning for real on the tiny base: DPO and ORPO under LoRA through `tunekit train` (held-out preference
before/after, report, checkpoint ranking by reward margin, forgetting monitor), DPO full fine-tuning under ZeRO-3 on
2 processes (the reference model sharded too), the precomputed reference giving the losses the live one gives, the
held-out metric agreeing with TRL's own scoring, resume, and `tunekit merge` of a DPO adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_backends_full import launch
from tunekit.cli import main
from tunekit.preference import PREFERENCE_KEYS, pair_logps, preference_accuracy


@pytest.fixture(scope="module")
def learnable_pairs(tmp_path_factory) -> dict[str, Path]:
    """String pairs the 0.2M-parameter test base can learn to prefer within tens of steps (the preference fixture's
    reversal it cannot: that task needs the demo preset, tests/test_preference_task.py): prompt "Reverse the
    digits.\nDIGITS\n", chosen = the digits reversed then " done", rejected = the digits copied. The chosen answer is
    longer and ends in a word the base never puts there, so the base prefers the rejected one on every pair
    (accuracy 0 before); the preference (say " done", not stop) carries over to held-out digits."""
    import random

    root = tmp_path_factory.mktemp("learnable-pairs")
    rng, seen, rows = random.Random(0), set(), []
    while len(rows) < 288:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        if digits not in seen:
            seen.add(digits)
            rows.append({"prompt": f"Reverse the digits.\n{digits}\n", "chosen": f"{digits[::-1]} done",
                         "rejected": digits})
    paths = {"eval": root / "eval.jsonl", "train": root / "train.jsonl"}
    for name, part in (("eval", rows[:32]), ("train", rows[32:])):
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in part))
    return paths


def write_config(root: Path, tiny_base, pairs: dict, method: str = "lora", objective: str = "dpo", steps: int = 40,
                 learning_rate: float = 1e-3, sections: str = "", training: str = "", eval_: str = "") -> Path:
    """A preference run of the tiny base on `pairs` ({"train", "eval"} jsonl paths). The learning rate is far above
    DPO's defaults (5e-6 LoRA, 5e-7 full), which are for real models and real runs."""
    path = root / "run.yaml"
    path.write_text(
        f"method: {method}\nobjective: {objective}\noutput_dir: {root / 'run'}\nmodel:\n  name_or_path: {tiny_base}\n"
        f"data:\n  sources:\n    - path: {pairs['train']}\n      format: preference\n"
        f"  eval_path: {pairs['eval']}\n  max_seq_len: 64\n  cache_dir: {root / 'cache'}\n"
        f"training:\n  max_steps: {steps}\n  learning_rate: {learning_rate}\n  per_device_train_batch_size: 8\n"
        f"  per_device_eval_batch_size: 16\n  logging_steps: 5\n{training}"
        f"checkpoints:\n  save_steps: {steps // 2}\n  metric: rewards/margins\n  greater_is_better: true\n"
        f"eval:\n  task_samples: 32\n  max_new_tokens: 4\n{eval_}{sections}")
    return path


def read_config_base(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]["name_or_path"]


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def log_history(run: Path, step: int) -> list[dict]:
    return json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


def test_each_objective_gets_its_trl_config_with_the_same_trainer_settings(tmp_path, tiny_base, learnable_pairs):
    from trl import DPOConfig, SFTConfig
    from trl.experimental.orpo import ORPOConfig

    from tunekit import config as config_mod
    from tunekit.backends.common import training_arguments

    def arguments(objective: str, sections: str = ""):
        root = tmp_path / objective
        root.mkdir(exist_ok=True)
        return training_arguments(config_mod.load(write_config(root, tiny_base, learnable_pairs, objective=objective,
                                                               sections=sections)))

    dpo = arguments("dpo", "dpo:\n  beta: 0.3\n  loss_type: robust\n  label_smoothing: 0.1\n"
                           "  reference: precomputed\n")
    orpo = arguments("orpo", "orpo:\n  beta: 0.2\n")
    assert type(dpo) is DPOConfig and type(orpo) is ORPOConfig
    assert (dpo.beta, dpo.loss_type, dpo.label_smoothing, dpo.precompute_ref_log_probs) == (0.3, ["robust"], 0.1, True)
    assert orpo.beta == 0.2 and dpo.max_length == orpo.max_length == 64 and not dpo.padding_free
    # The Trainer settings are built once (backends.common.trainer_settings): what an SFT run of the same schedule
    # gets, apart from the run name (each config here has its own output_dir).
    sft_config = config_mod.load(write_config(tmp_path / "dpo", tiny_base, learnable_pairs))
    sft_config = sft_config.model_copy(update={"objective": "sft", "dpo": None})
    sft = training_arguments(sft_config)
    assert type(sft) is SFTConfig
    for name in ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "lr_scheduler_type", "warmup_steps", "optim", "seed", "bf16", "fp16", "gradient_checkpointing",
                 "gradient_checkpointing_kwargs", "logging_steps", "eval_strategy", "eval_steps", "save_steps",
                 "save_total_limit", "include_num_input_tokens_seen", "ddp_timeout"):
        if name != "learning_rate":
            assert getattr(dpo, name) == getattr(orpo, name) == getattr(sft, name), name
    assert dpo.learning_rate == orpo.learning_rate == 1e-3  # as written (the default would be the objective's)


@pytest.fixture(scope="module")
def dpo_lora_run(tmp_path_factory, tiny_base, learnable_pairs) -> Path:
    root = tmp_path_factory.mktemp("dpo-lora")
    general = Path(tiny_base) / "general_eval.jsonl"  # the forgetting monitor watches DPO runs too
    assert main(["train", str(write_config(root, tiny_base, learnable_pairs, eval_=f"  general: {general}\n"))]) == 0
    return root / "run"


def test_dpo_lora_raises_held_out_preference_and_reports_it(dpo_lora_run):
    from safetensors.torch import load_file

    summary = read_summary(dpo_lora_run)
    assert summary["objective"] == "dpo" and summary["method"] == "lora" and summary["steps"] == 40
    assert set(PREFERENCE_KEYS) <= set(summary) and summary["preference_pairs_scored"] == 32
    history = log_history(dpo_lora_run, 40)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1: the policy still is the reference
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all("peak_memory_bytes" in entry for entry in history)  # PeakMemoryLog on the DPO trainer too
    # Trained: the adapter moved (lora_B starts at zero) and the held-out pairs flipped toward the chosen answers.
    adapter = load_file(dpo_lora_run / "final" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in adapter.items())
    assert summary["preference_accuracy_before"] < 0.2 and summary["preference_accuracy_after"] > 0.8
    # The reference is the base with the adapter off: no second adapter (TRL's "ref" copy) in the model or final/.
    base = load_file(Path(read_config_base(dpo_lora_run)) / "model.safetensors")
    assert summary["total_params"] - summary["trainable_params"] == sum(t.numel() for t in base.values())
    assert not (dpo_lora_run / "final" / "ref").exists() and not any(".ref." in name for name in adapter)
    assert summary["reward_margin_after"] > 0 and summary["reward_accuracy_after"] == 1.0
    # Our held-out score is TRL's: the evaluation at the last step (the same 32 pairs, the same weights; reference =
    # the base with the adapter off) logged the mean margin summary_fields computed from pair_logps.
    last_eval = [entry for entry in history if "eval_rewards/margins" in entry][-1]
    assert last_eval["step"] == 40
    assert summary["reward_margin_after"] == pytest.approx(last_eval["eval_rewards/margins"], rel=1e-4, abs=1e-5)
    # Checkpoints ranked by the DPO metric (checkpoints.metric rewards/margins -> eval_rewards/margins, higher best).
    assert summary["best_checkpoint"] is not None and summary["best_checkpoint"] in summary["kept_checkpoints"]
    assert summary["general_loss_base"] is not None  # the forgetting monitor ran at each evaluation
    assert any("eval_general_loss" in entry for entry in history)
    report = (dpo_lora_run / "report.md").read_text()
    assert "## Preference" in report and "![preference](preference.png)" in report and "## Forgetting" in report
    assert (dpo_lora_run / "preference.png").is_file()


def test_pair_logps_score_only_the_answer_and_accuracy_counts_strict_wins(tiny_base):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    assert preference_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(1 / 3)
    assert preference_accuracy(torch.tensor([]), torch.tensor([])) == 0.0
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    pairs = Dataset.from_list([{"prompt_ids": [0, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
                               {"prompt_ids": [0, 5], "chosen_ids": [6], "rejected_ids": [7, 8, 9]}])
    chosen, rejected = pair_logps(base, pairs, batch_size=1)
    assert chosen.dtype == rejected.dtype == torch.float32 and chosen.shape == rejected.shape == (2,)
    with torch.no_grad():  # log p(7 | 0 5 6) + log p(8 | 0 5 6 7): the answer's tokens only
        logps = torch.log_softmax(base(torch.tensor([[0, 5, 6, 7, 8]])).logits.float(), -1)[0]
    assert chosen[0].item() == pytest.approx((logps[2, 7] + logps[3, 8]).item(), abs=1e-5)
    # Padding in a batch changes nothing.
    batched = pair_logps(base, pairs, batch_size=4)
    assert batched[0].tolist() == pytest.approx(chosen.tolist(), abs=1e-5)
    assert batched[1].tolist() == pytest.approx(rejected.tolist(), abs=1e-5)


def test_merge_of_a_dpo_adapter_passes_the_logit_check(dpo_lora_run, tmp_path):
    assert main(["merge", str(dpo_lora_run), "--out", str(tmp_path / "merged")]) == 0
    check = json.loads((tmp_path / "merged" / "merge_check.json").read_text())
    assert check["passed"] and check["max_abs_diff"] <= 1e-4


def test_orpo_lora_trains_on_the_pairs(tmp_path, tiny_base, learnable_pairs, dpo_lora_run):
    config = write_config(tmp_path, tiny_base, learnable_pairs, objective="orpo", learning_rate=5e-3)
    assert main(["train", str(config)]) == 0
    summary = read_summary(tmp_path / "run")
    assert summary["objective"] == "orpo" and summary["steps"] == 40
    assert set(PREFERENCE_KEYS) <= set(summary) and summary["preference_pairs_scored"] == 32
    assert math.isfinite(summary["train_loss_first"]) and summary["train_loss_last"] < summary["train_loss_first"]
    # ORPO: NLL on the chosen answer plus the odds-ratio term; the held-out chosen answers gained on the rejected.
    assert summary["reward_margin_after"] > 0 and summary["reward_accuracy_after"] > 0.8
    assert summary["preference_accuracy_after"] > summary["preference_accuracy_before"]
    assert any("log_odds_ratio" in entry for entry in log_history(tmp_path / "run", 40))  # TRL's ORPO logs
    # Tokens seen: both sequences of every pair, as DPO counts them (same pairs, seed and steps: the same batches).
    assert summary["tokens_seen"] == read_summary(dpo_lora_run)["tokens_seen"] > 0


@pytest.mark.slow
def test_dpo_qlora_trains_the_adapter_on_a_4bit_base(tmp_path, tiny_base, learnable_pairs):
    """QLoRA is the LoRA path plus a 4-bit base: the reference is that quantized base with the adapter off."""
    config = write_config(tmp_path, tiny_base, learnable_pairs, method="qlora", steps=20,
                          eval_="  task_metric: none\n  rank_spectrum: false\n")
    assert main(["train", str(config)]) == 0
    summary = read_summary(tmp_path / "run")
    assert summary["method"] == "qlora" and summary["quantized_modules"] > 0
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["reward_margin_after"] > 0 and summary["reward_accuracy_after"] > 0.8


def dpo_losses(root: Path, tiny_base, pairs, reference: str) -> list[float]:
    """Training losses of 4 logged steps of DPO under LoRA with `dpo.reference: reference`."""
    root.mkdir()
    config = write_config(root, tiny_base, pairs, steps=4, learning_rate=1e-2,
                          sections=f"dpo:\n  reference: {reference}\n",
                          eval_="  task_metric: none\n  rank_spectrum: false\n")
    config.write_text(config.read_text().replace("logging_steps: 5", "logging_steps: 1"))
    assert main(["train", str(config)]) == 0
    return [entry["loss"] for entry in log_history(root / "run", 4) if "loss" in entry]


def test_precomputed_reference_gives_the_losses_of_the_live_reference(tmp_path, tiny_base, preference_data):
    """LoRA: the live reference is the base with the adapter off, run beside every step; precomputed, TRL scores
    the data with it once before training. The same reference log-probs, so the same losses at every step (not
    only at the first, where both are log 2: the policy still is the reference)."""
    live = dpo_losses(tmp_path / "live", tiny_base, preference_data, "model")
    precomputed = dpo_losses(tmp_path / "precomputed", tiny_base, preference_data, "precomputed")
    assert len(live) == len(precomputed) == 4 and live[0] == pytest.approx(math.log(2), abs=1e-5)
    assert max(abs(loss - math.log(2)) for loss in live) > 1e-3  # the policy moved: the reference matters
    assert precomputed == pytest.approx(live, abs=1e-5)


@pytest.mark.slow
def test_dpo_full_zero3_two_processes_shards_the_reference_and_moves_the_margin(tmp_path, tiny_base, learnable_pairs):
    """Full DPO under ZeRO-3 on 2 CPU processes, the reference a second model sharded like the policy; then the same
    run with `dpo.reference: precomputed` (no second model: TRL scores the data with the policy before the first
    update) must give the same losses and held-out numbers."""

    def run(name: str, reference: str) -> dict:
        root = tmp_path / name
        root.mkdir()
        config = write_config(root, tiny_base, learnable_pairs, method="full", steps=20, learning_rate=1e-4,
                              sections=f"deepspeed:\n  stage: 3\ndpo:\n  reference: {reference}\n",
                              eval_="  rank_spectrum: false\n")
        launch(root, ["-m", "tunekit", "train", str(config)])
        return read_summary(root / "run")

    summary = run("model", "model")
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["steps"] == 20
    # Policy and reference both sharded: rank 0 held ~half of each (padding makes it a little more than 1/2), so
    # the reference is not a whole copy per rank.
    assert 0.5 <= summary["zero3_local_param_fraction"] < 0.55
    assert 0.5 <= summary["reference_local_param_fraction"] < 0.55
    assert summary["preference_pairs_scored"] == 32  # split over the 2 ranks, gathered
    assert summary["reward_margin_after"] > 0 and summary["reward_accuracy_after"] > 0.8
    assert summary["train_loss_last"] < summary["train_loss_first"] == pytest.approx(math.log(2), abs=1e-4)

    precomputed = run("precomputed", "precomputed")
    assert "reference_local_param_fraction" not in precomputed  # no reference model at all
    for key in ("train_loss_last", "eval_loss", "reward_margin_after", "preference_accuracy_after"):
        assert precomputed[key] == pytest.approx(summary[key], rel=1e-4, abs=1e-5), key


def test_a_dpo_run_resumed_from_its_checkpoint_ends_where_the_uninterrupted_one_did(tmp_path, tiny_base,
                                                                                     learnable_pairs, capsys):
    """8 steps, a checkpoint at 4; the same run cut back to checkpoint-4 (later checkpoint, final/ and summary gone,
    as after a kill) and `--resume`d ends with the same adapter: DPO's state (policy, optimizer, data order; the
    reference is the base, not saved) is all in the checkpoint."""
    import shutil

    from safetensors.torch import load_file

    whole = write_config(tmp_path, tiny_base, learnable_pairs, steps=8, learning_rate=1e-2,
                         eval_="  task_metric: none\n  rank_spectrum: false\n")
    assert main(["train", str(whole)]) == 0
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "run", cut / "run")
    for name in ("checkpoint-8", "final"):
        shutil.rmtree(cut / "run" / name)
    (cut / "run" / "summary.json").unlink()
    resumed = cut / "run.yaml"
    resumed.write_text(whole.read_text().replace(str(tmp_path / "run"), str(cut / "run")))
    capsys.readouterr()
    assert main(["train", str(resumed), "--resume"]) == 0
    assert "resume verified: step 4" in capsys.readouterr().out
    expected = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    got = load_file(cut / "run" / "final" / "adapter_model.safetensors")
    assert set(got) == set(expected) and all(torch.equal(got[name], expected[name]) for name in expected)
