"""What the per-step cuts must not change: a fixed-seed run trains exactly as before (issue 14).

logging.token_metrics off (the default) skips TRL's per-step entropy and token accuracy over the vocabulary and
their cross-rank gathers; the loss is TRL's plain-path formula, so the losses and the final weights are bit-equal
to a run with the metrics on (TRL's own compute_loss).

On CPU the fused LM head scores only the positions that carry loss (callbacks.loss_positions_only), as TRL does on
GPUs: each position's log-prob comes from the same tiles, so the run matches TRL's score-every-position head up to
float summation order."""

import contextlib

import pytest
import torch
import yaml
from safetensors.torch import load_file

# TRL's per-step metrics: computed only with logging.token_metrics on (num_tokens is the gathered token count).
TOKEN_METRICS = ("mean_token_accuracy", "entropy", "num_tokens")


def run(tmp_path, tiny_base, demo_data, monkeypatch, method: str, token_metrics: bool,
        positions_only: bool = True) -> tuple[list[dict], dict]:
    """(log_history, final weights by file and name) of a 4-step run with evaluation at steps 2 and 4."""
    import tunekit.callbacks
    import tunekit.train
    from tunekit.cli import main

    built = []
    build = tunekit.train.build_trainer
    monkeypatch.setattr(tunekit.train, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    if not positions_only:  # TRL's own CPU behaviour: the head scores every position; the Trainer's FLOP count
        from transformers import Trainer

        monkeypatch.setattr(tunekit.callbacks, "loss_positions_only", contextlib.nullcontext)
        monkeypatch.setattr(tunekit.callbacks.TunekitTrainer, "floating_point_ops", Trainer.floating_point_ops)
    out = tmp_path / f"{method}-{token_metrics}-{positions_only}"
    config = tmp_path / f"{method}-{token_metrics}-{positions_only}.yaml"
    config.write_text(yaml.safe_dump({
        "method": method, "output_dir": str(out), "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": [{"path": str(demo_data["train"]), "format": "alpaca", "max_examples": 32}],
                 "eval_path": str(demo_data["eval"]), "max_seq_len": 64, "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1},
        "checkpoints": {"save_steps": 2},
        "eval": {"task_metric": "none", "rank_spectrum": False},
        "logging": {"token_metrics": token_metrics},
    }))
    assert main(["train", str(config)]) == 0
    weights = {path.name: load_file(path) for path in sorted((out / "final").glob("*.safetensors"))}
    assert weights
    return built[0].state.log_history, weights


@pytest.mark.parametrize("method", ["lora", "full"])
def test_token_metrics_off_trains_exactly_as_on(tmp_path, tiny_base, demo_data, monkeypatch, method):
    on, on_weights = run(tmp_path, tiny_base, demo_data, monkeypatch, method, True)
    off, off_weights = run(tmp_path, tiny_base, demo_data, monkeypatch, method, False)

    def losses(history, key):
        return [(entry["step"], entry[key]) for entry in history if key in entry]

    assert len(losses(on, "loss")) == 4 and len(losses(on, "eval_loss")) >= 2
    for key in ("loss", "eval_loss", "grad_norm", "train_loss"):
        assert losses(off, key) == losses(on, key), key  # exact: the same floats, step by step
    assert off_weights.keys() == on_weights.keys()
    for file, tensors in on_weights.items():
        assert tensors.keys() == off_weights[file].keys()
        for name, tensor in tensors.items():
            assert tensor.equal(off_weights[file][name]), f"{file}: {name}"

    def logged(history):
        return {key for entry in history for key in entry}

    assert {*TOKEN_METRICS, "eval_mean_token_accuracy", "eval_entropy"} <= logged(on)
    assert not {*TOKEN_METRICS, *(f"eval_{key}" for key in TOKEN_METRICS)} & logged(off)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_head_scores_loss_positions_only_and_trains_as_trl(tmp_path, tiny_base, demo_data, monkeypatch, method):
    """The head's rows drop to the loss positions (prompt and padding are most of a batch), and the run matches
    TRL's score-every-position head: same losses and weights up to float summation order (LoRA, whose head is
    frozen, came out bit-equal; full fine-tuning sums the head's weight gradient over fewer rows)."""
    import trl.trainer.utils as trl_utils

    rows = {True: [], False: []}
    function = trl_utils._ChunkedLogProbFunction

    class CountingHead:  # the same autograd function, its row count recorded
        @staticmethod
        def apply(hidden, *args):
            rows[positions_only].append(hidden.shape[0])
            return function.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingHead)
    results = {}
    for positions_only in (True, False):  # True first: run() leaves the head switched off behind it
        results[positions_only] = run(tmp_path, tiny_base, demo_data, monkeypatch, method, False, positions_only)
    assert rows[True] and len(rows[True]) == len(rows[False])
    assert sum(rows[True]) < 0.7 * sum(rows[False])  # completion-only loss: prompts are not scored
    (every, every_weights), (only, only_weights) = results[False], results[True]
    assert [entry["total_flos"] for entry in only if "total_flos" in entry] == [
        entry["total_flos"] for entry in every if "total_flos" in entry] != []  # the FLOP count, taken once
    for key in ("loss", "eval_loss", "grad_norm"):
        expected = [entry[key] for entry in every if key in entry]
        assert len(expected) >= 2 and [entry[key] for entry in only if key in entry] == pytest.approx(expected, rel=1e-5)
    for file, tensors in every_weights.items():
        for name, tensor in tensors.items():
            assert torch.allclose(only_weights[file][name], tensor, rtol=1e-4, atol=1e-6), f"{file}: {name}"
