"""The padding report of `prepare`/`inspect-data` (tunekit.prepare.padding_report): the expected padding share of
the Trainer's batches, computed exactly from the cached lengths, equals a direct count over every batch order; the
packing suggestion appears only above PACKING_SUGGEST_SHARE and never for preference pairs."""

import itertools
import re

import numpy as np
import pytest

from test_data import make_config, tokenizer, write_jsonl  # noqa: F401 - tokenizer is a fixture
from test_preference_data import pair_config
from tunekit import prepare


def brute_force_slots(lengths, batch_size: int) -> float:
    """Mean over every order of the examples of sum(batch rows x batch's longest), batches cut as the Trainer cuts a
    permutation (the last one short)."""
    totals = []
    for order in itertools.permutations(lengths):
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        totals.append(sum(len(b) * max(b) for b in batches))
    return sum(totals) / len(totals)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 9])
def test_expected_slots_equal_the_mean_over_every_batch_order(batch_size):
    lengths = [5, 1, 9, 9, 2, 30, 4]  # ties, a long one, a short last batch for most batch sizes
    assert prepare.expected_slots(lengths, batch_size) == pytest.approx(brute_force_slots(lengths, batch_size))


def report_numbers(report: str) -> tuple[float, float]:
    """(padding slots, all slots) from the report's 'padding: ... N of M per epoch' line."""
    pad, slots = re.search(r"are padding: ([\d,]+) of ([\d,]+) per epoch", report).groups()
    return float(pad.replace(",", "")), float(slots.replace(",", ""))


def sft_rows(answer_words: list[int]) -> list[dict]:
    return [{"prompt": "Say", "completion": " ".join(["word"] * n)} for n in answer_words]


def test_the_reported_share_is_the_direct_count_over_the_train_rows(tiny_base, tmp_path, tokenizer):
    """Lengths read from the Arrow offsets are the train rows' own lengths, in train order; the report's slots are
    expected_slots over them and its padding is slots minus the rows' real tokens."""
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows([1, 2, 3, 40, 5, 60, 2, 9]))  # 8! orders for the direct count
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}],
                      training={"per_device_train_batch_size": 3}, max_seq_len=256, eval_fraction=0.0)
    prepared = prepare.prepare_data(cfg, tokenizer, log=lambda line: None)
    direct = [len(example["input_ids"]) for example in prepared.train]
    assert prepare.padded_lengths(prepared.train).tolist() == direct and len(direct) == 8
    report = "\n".join(prepare.padding_lines(prepared, cfg))
    pad, slots = report_numbers(report)
    assert slots == round(brute_force_slots(direct, 3))
    assert pad == round(brute_force_slots(direct, 3) - sum(direct))


def test_packing_is_suggested_above_the_threshold_and_not_below(tiny_base, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows([1]))
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}],
                      training={"per_device_train_batch_size": 8}, max_seq_len=128)
    skewed = np.array([4] * 56 + [100] * 8)  # most batches padded to 100
    even = np.array([50] * 60 + [60] * 4)
    for lengths in (skewed, even):
        share = 1 - lengths.sum() / prepare.expected_slots(lengths, 8)
        report = prepare.padding_report(lengths, int(lengths.sum()), cfg)
        assert f"{share:.1%} of the token slots" in report
        assert ("data.packing: true" in report) == (share >= prepare.PACKING_SUGGEST_SHARE)
    assert 1 - skewed.sum() / prepare.expected_slots(skewed, 8) >= prepare.PACKING_SUGGEST_SHARE  # both sides seen
    assert 1 - even.sum() / prepare.expected_slots(even, 8) < prepare.PACKING_SUGGEST_SHARE


def test_with_packing_on_the_fill_is_of_the_rows_trl_packs(tiny_base, tmp_path, tokenizer, monkeypatch):
    from trl.data_utils import pack_dataset

    path = write_jsonl(tmp_path / "d.jsonl", sft_rows([1, 2, 3, 20, 5, 30, 2, 1, 9, 3, 1]))
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}],
                      max_seq_len=64, packing=True)
    prepared = prepare.prepare_data(cfg, tokenizer, log=lambda line: None)
    rows = len(pack_dataset(prepared.train, 64, strategy="bfd"))  # what SFTTrainer packs
    real = sum(len(example["input_ids"]) for example in prepared.train)
    report = "\n".join(prepare.padding_lines(prepared, cfg))
    assert f"in {rows:,} rows of 64 tokens, {real / (rows * 64):.1%} filled" in report
    assert "suggestion" not in report
    # Past PACK_COUNT_MAX_TOKENS no packing pass runs: the bound ceil(tokens / max_seq_len), which TRL cannot beat.
    monkeypatch.setattr(prepare, "PACK_COUNT_MAX_TOKENS", 0)
    bound = -(-real // 64)
    assert bound <= rows
    assert f"in at least {bound:,} rows of 64 tokens, at most {real / (bound * 64):.1%} filled" in \
        "\n".join(prepare.padding_lines(prepared, cfg))


def test_pairs_are_padded_to_the_longest_sequence_and_packing_is_never_suggested(tiny_base, tmp_path, tokenizer):
    rows = [{"prompt": "Q", "chosen": " ".join(["yes"] * c), "rejected": " ".join(["no"] * r)}
            for c, r in [(1, 60), (2, 1), (1, 1), (3, 2), (1, 2), (2, 1), (1, 1), (70, 1)]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}], max_seq_len=128)
    prepared = prepare.prepare_data(cfg, tokenizer, log=lambda line: None)
    longest = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in prepared.train]
    real = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in prepared.train)
    assert prepare.padded_lengths(prepared.train).tolist() == longest
    report = "\n".join(prepare.padding_lines(prepared, cfg))
    pad, slots = report_numbers(report)
    expected = 2 * brute_force_slots(longest, cfg.training.per_device_train_batch_size)  # two sequences a pair
    assert (pad, slots) == (round(expected - real), round(expected))
    assert (pad / slots) >= prepare.PACKING_SUGGEST_SHARE and "packing" not in report
