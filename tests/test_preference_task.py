"""The tiny preference task (tiny.write_preference_task): its files, and where the tiny base starts on it.

chosen = the digits reversed (the demo task's answer), rejected = the digits copied (the sister task the base was
pretrained on). On the demo base (artifacts/tiny-base) the base prefers the copy on 48 of 64 held-out pairs
(preference accuracy 0.25); the test preset is too small to have learned to copy, so here we only check that it
gives the chosen answer no head start.
"""

from __future__ import annotations

import json

import pytest

from tunekit import tiny
from tunekit.cli import main
from tunekit.data import alpaca_prompt


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def digits_of(row: dict) -> str:
    """The input digits of a string or chat row."""
    text = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    return text.split("### Input:\n")[-1].split("\n")[0] if isinstance(row["prompt"], str) else text.split("\n")[-1]


def test_string_rows_have_the_format_and_the_demo_prompt(preference_data):
    train, eval_ = read(preference_data["train"]), read(preference_data["eval"])
    assert len(train) == 256 and len(eval_) == 32
    for row in train + eval_:
        assert set(row) == {"prompt", "chosen", "rejected"}
        digits = digits_of(row)
        # the demo task's own prompt text, used as written; the answers differ (distinct digits)
        assert row["prompt"] == alpaca_prompt({"instruction": tiny.DEMO_INSTRUCTION, "input": digits})
        assert row["chosen"] == digits[::-1] and row["rejected"] == digits and row["chosen"] != row["rejected"]
        assert digits.isdigit() and tiny.MIN_DIGITS <= len(digits) <= tiny.MAX_DIGITS


def test_chat_rows_hold_the_same_pairs_as_messages(preference_data):
    for split in ("train", "eval"):
        strings, chat = read(preference_data[split]), read(preference_data[f"chat_{split}"])
        assert len(strings) == len(chat)
        for s, c in zip(strings, chat):
            assert c["prompt"] == [{"role": "user", "content": f"{tiny.DEMO_INSTRUCTION}\n{digits_of(s)}"}]
            assert c["chosen"] == [{"role": "assistant", "content": s["chosen"]}]
            assert c["rejected"] == [{"role": "assistant", "content": s["rejected"]}]


def test_train_and_eval_inputs_are_disjoint_and_distinct(preference_data):
    train = [digits_of(r) for r in read(preference_data["train"])]
    eval_ = [digits_of(r) for r in read(preference_data["eval"])]
    assert len(set(train)) == len(train) and len(set(eval_)) == len(eval_)
    assert not set(train) & set(eval_)


def test_deterministic_in_seed_and_eval_independent_of_n_train(tmp_path):
    a = tiny.write_preference_task(tmp_path / "a", n_train=20, n_eval=5, seed=3)
    b = tiny.write_preference_task(tmp_path / "b", n_train=20, n_eval=5, seed=3)
    assert all(a[name].read_bytes() == b[name].read_bytes() for name in a)
    more = tiny.write_preference_task(tmp_path / "more", n_train=50, n_eval=5, seed=3)
    assert more["eval"].read_bytes() == a["eval"].read_bytes()  # the held-out pairs do not move with n_train
    other = tiny.write_preference_task(tmp_path / "other", n_train=20, n_eval=5, seed=4)
    assert other["eval"].read_bytes() != a["eval"].read_bytes()


def test_build_tiny_demo_data_writes_the_preference_files(tiny_base, tmp_path, capsys):
    # tiny_base is already built for this preset and seed: build-tiny reuses it and only writes the data.
    assert main(["build-tiny", "--out", str(tiny_base), "--preset", "test", "--demo-data", str(tmp_path)]) == 0
    assert len(read(tmp_path / "preference-train.jsonl")) == 2000
    assert len(read(tmp_path / "preference-eval.jsonl")) == 64
    assert "preference data:" in capsys.readouterr().out


def test_the_test_base_gives_the_chosen_answer_no_head_start(tiny_base, preference_data):
    """Held-out preference accuracy of the untrained test base (summed log-prob of chosen + eos > rejected + eos) is
    at most 0.6 (measured 0.44): a rise after DPO is the training's doing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.preference import pair_logps, preference_accuracy

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # The contract's tokens: bos + prompt as written; each answer ends with eos.
    pairs = [{"prompt_ids": [tok.bos_token_id] + ids(r["prompt"]), "chosen_ids": ids(r["chosen"]) + [tok.eos_token_id],
              "rejected_ids": ids(r["rejected"]) + [tok.eos_token_id]} for r in read(preference_data["eval"])]
    chosen, rejected = pair_logps(model, pairs, batch_size=16)
    assert chosen.shape == rejected.shape == (32,)
    assert bool(torch.isfinite(chosen).all() and torch.isfinite(rejected).all())
    assert preference_accuracy(chosen, rejected) <= 0.6


@pytest.mark.parametrize("name", ["tiny-dpo.yaml", "tiny-orpo.yaml"])
def test_tiny_preference_configs_point_at_the_build_tiny_files(name):
    from pathlib import Path

    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())
    assert raw["model"]["name_or_path"] == "artifacts/tiny-base"
    assert raw["data"]["sources"][0] == {"path": "artifacts/demo-data/preference-train.jsonl", "format": "preference"}
    assert raw["data"]["eval_path"] == "artifacts/demo-data/preference-eval.jsonl"


@pytest.mark.parametrize("name, says", [("tiny-dpo.yaml", "Direct Preference Optimization (DPO) on chosen/rejected "
                                         "pairs, beta 0.1 (sigmoid loss)"),
                                        ("tiny-orpo.yaml", "(ORPO) on chosen/rejected pairs, beta (lambda) 0.1")])
def test_model_card_names_the_objective_and_its_beta(name, says, tmp_path):
    from pathlib import Path

    from tunekit import config as config_mod
    from tunekit.modelcard import model_card
    from tunekit.rundir import Run

    config = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / name, check_paths=False)
    summary = {"objective": config.objective, "preference_accuracy_before": 0.25, "preference_accuracy_after": 0.95}
    card = str(model_card(Run(tmp_path, config, summary, None, tmp_path)))
    assert says in card and f"- {config.objective}\n" in card  # the body, and the Hub tag
    assert f"| objective | {config.objective} |" in card
    assert "| preference accuracy before (chosen more likely than rejected) | 0.25 |" in card
