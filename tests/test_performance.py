"""What the per-step cuts must not change: a fixed-seed run trains exactly as before (issue 14).

logging.token_metrics off (the default) skips TRL's per-step entropy and token accuracy over the vocabulary and
their cross-rank gathers; the loss is TRL's plain-path formula, so the losses and the final weights are bit-equal
to a run with the metrics on (TRL's own compute_loss)."""

import pytest
import yaml
from safetensors.torch import load_file

# TRL's per-step metrics: computed only with logging.token_metrics on (num_tokens is the gathered token count).
TOKEN_METRICS = ("mean_token_accuracy", "entropy", "num_tokens")


def run(tmp_path, tiny_base, demo_data, monkeypatch, method: str, token_metrics: bool) -> tuple[list[dict], dict]:
    """(log_history, final weights by file and name) of a 4-step run with evaluation at steps 2 and 4."""
    import tunekit.train
    from tunekit.cli import main

    built = []
    build = tunekit.train.build_trainer
    monkeypatch.setattr(tunekit.train, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    out = tmp_path / f"{method}-{token_metrics}"
    config = tmp_path / f"{method}-{token_metrics}.yaml"
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
