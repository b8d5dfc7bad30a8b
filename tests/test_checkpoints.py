"""Checkpoint retention, completion markers, resume targets and the disk check — pure parts, no training.

The real runs (retention on a tiny run's own log history, kill-and-resume, crash during a save) are in test_resume.py.
"""

import json
import random

import pytest

from tunekit.checkpoints import (
    MARKER_NAME,
    complete_checkpoints,
    delete_checkpoint,
    estimate_checkpoint_bytes,
    free_space_problem,
    incomplete_checkpoints,
    latest_complete_checkpoint,
    logged_at_step,
    metric_value,
    rank_by_metric,
    read_marker,
    resume_target,
    retained_checkpoints,
    write_marker,
)
from tunekit.errors import UserError
from tunekit.resume import restore_trainable_dtypes, state_digest, trainable_dtypes


def keep(losses, top_k, last_n, greater=False):
    """retained_checkpoints on eval values logged at steps 10, 20, 30, ... (None: no eval at that step)."""
    return retained_checkpoints([(10 * (i + 1), v) for i, v in enumerate(losses)], top_k, last_n, greater)


# ---------------------------------------------------------------- the retention rule


def test_top_k_by_loss_plus_last_n():
    #            10   20   30   40   50   60
    losses = [2.0, 1.0, 1.5, 0.9, 1.2, 1.3]
    assert keep(losses, top_k=2, last_n=1) == {40, 20, 60}
    assert keep(losses, top_k=2, last_n=2) == {40, 20, 50, 60}
    assert keep(losses, top_k=3, last_n=1) == {40, 20, 50, 60}


def test_overlap_between_best_and_newest_keeps_no_extra():
    assert keep([3.0, 2.0, 1.0], top_k=1, last_n=1) == {30}
    assert keep([3.0, 2.0, 1.0], top_k=2, last_n=1) == {20, 30}


def test_ties_go_to_the_earlier_step():
    losses = [1.0, 0.5, 0.7, 0.5, 0.9]  # 20 and 40 tie for best
    assert rank_by_metric([(10 * (i + 1), v) for i, v in enumerate(losses)]) == [20, 40, 30, 50, 10]
    assert keep(losses, top_k=1, last_n=1) == {20, 50}
    assert keep(losses, top_k=2, last_n=1) == {20, 40, 50}


def test_missing_evals_survive_only_among_the_last_n():
    #            10   20    30   40    50
    losses = [1.0, None, 0.8, None, None]
    assert keep(losses, top_k=1, last_n=1) == {30, 50}  # 20, 40: no metric, not among the last 1
    assert keep(losses, top_k=1, last_n=2) == {30, 40, 50}
    assert keep([None, None, None], top_k=3, last_n=1) == {30}  # nothing ranked: only the newest
    assert keep([1.0, float("nan"), 2.0], top_k=1, last_n=1) == {10, 30}  # NaN is not a metric


def test_keep_top_k_zero_still_keeps_the_best_and_the_newest():
    assert keep([2.0, 0.5, 1.0, 1.5], top_k=0, last_n=1) == {20, 40}
    assert keep([2.0, 0.5, 1.0, 1.5], top_k=0, last_n=2) == {20, 30, 40}
    assert keep([2.0, 0.5, 1.0, 1.5], top_k=0, last_n=0) == {20, 40}  # the newest even with last_n=0


def test_greater_is_better():
    accuracy = [0.1, 0.6, 0.4, 0.6, 0.2]
    assert keep(accuracy, top_k=1, last_n=1, greater=True) == {20, 50}  # tie 20/40: the earlier
    assert keep(accuracy, top_k=3, last_n=1, greater=True) == {20, 40, 30, 50}


def test_empty_history_keeps_nothing():
    assert retained_checkpoints([], 3, 2) == set()


def test_pruning_after_every_save_equals_the_rule_on_the_whole_history():
    """The callback prunes after each save over the survivors; the result must be the rule on all records."""
    rng = random.Random(0)
    for _ in range(300):
        n, top_k, last_n, greater = rng.randint(1, 12), rng.randint(0, 4), rng.randint(1, 3), rng.random() < 0.5
        records = [(10 * (i + 1), rng.choice([None, round(rng.uniform(0, 2), 1)])) for i in range(n)]
        alive: list[tuple[int, float | None]] = []
        for record in records:
            alive.append(record)
            kept = retained_checkpoints(alive, top_k, last_n, greater)
            alive = [r for r in alive if r[0] in kept]
        assert {s for s, _ in alive} == retained_checkpoints(records, top_k, last_n, greater), (records, top_k, last_n)


def test_metric_lookup_accepts_the_eval_prefix():
    history = [{"loss": 2.0, "step": 10}, {"eval_loss": 1.5, "eval_acc": 0.3, "step": 10}, {"loss": 1.9, "step": 11}]
    logged = logged_at_step(history, 10)
    assert logged == {"loss": 2.0, "eval_loss": 1.5, "eval_acc": 0.3}
    assert metric_value(logged, "eval_loss") == 1.5 and metric_value(logged, "acc") == 0.3
    assert metric_value(logged_at_step(history, 11), "eval_loss") is None


# ---------------------------------------------------------------- markers, completeness, resume targets


def fake_checkpoint(root, step, complete=True, loss=None):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (path / "optimizer.pt").write_bytes(b"o" * 200)
    if complete:
        write_marker(path, step, {} if loss is None else {"eval_loss": loss}, 1e-4)
    return path


def test_marker_lists_every_file_and_is_written_atomically(tmp_path):
    path = fake_checkpoint(tmp_path, 5, loss=1.25)
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["step"] == 5 and marker["metrics"] == {"eval_loss": 1.25} and marker["learning_rate"] == 1e-4
    assert marker["files"] == {"adapter_model.safetensors": 100, "optimizer.pt": 200}
    assert not list(tmp_path.rglob(".*.tmp"))
    assert read_marker(path) == marker


def test_a_directory_without_a_valid_marker_is_incomplete(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # the save was killed before the marker
    truncated = fake_checkpoint(tmp_path, 8)
    (truncated / "optimizer.pt").write_bytes(b"o" * 10)  # a file no longer matches its recorded size
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / MARKER_NAME).write_text("{not json")
    assert list(complete_checkpoints(tmp_path)) == [2, 4]
    assert [p.name for p in incomplete_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8", "checkpoint-10"]
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_marker_of_another_step_is_not_valid(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    path.rename(tmp_path / "checkpoint-30")
    assert read_marker(tmp_path / "checkpoint-30") is None


def test_delete_checkpoint_removes_marker_and_directory(tmp_path):
    path = fake_checkpoint(tmp_path, 2)
    delete_checkpoint(path)
    assert not path.exists()


def test_resume_target(tmp_path):
    out = tmp_path / "run"
    assert resume_target(str(out), None) is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        resume_target(str(out), "latest")
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4)
    fake_checkpoint(out, 6, complete=False)
    assert resume_target(str(out), "latest") == out / "checkpoint-4"
    assert resume_target(str(out), str(out / "checkpoint-4")) == out / "checkpoint-4"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resume_target(str(out), str(out / "checkpoint-6"))
    with pytest.raises(UserError, match="checkpoint not found"):
        resume_target(str(out), str(out / "checkpoint-99"))
    with pytest.raises(UserError, match=r"after step 2 \(checkpoint-4\).*overwrite"):
        resume_target(str(out), str(out / "checkpoint-2"))


def test_resume_latest_names_interrupted_saves(tmp_path):
    fake_checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(UserError, match="checkpoint-2: save interrupted"):
        resume_target(str(tmp_path), "latest")


# ---------------------------------------------------------------- disk space


def test_free_space_problem_message():
    assert free_space_problem(1_000_000, 2_000_000, "/data") is None
    message = free_space_problem(5_000_000_000, 1_000_000_000, "/data/run")
    assert "needs ~5.5 GB" in message and "only 1.0 GB free on /data/run" in message


def test_first_checkpoint_estimate_counts_weights_and_optimizer_state():
    import torch

    model = torch.nn.Linear(10, 10)  # 110 fp32 params = 440 bytes
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 10)).sum().backward()
    optimizer.step()
    # weights 440 + Adam exp_avg and exp_avg_sq 880 + two scalar fp32 step counters 8
    assert estimate_checkpoint_bytes(model, optimizer) == 440 + 880 + 8


# ---------------------------------------------------------------- restored state


def test_an_upcast_on_reload_is_detected_and_undone():
    """TRL trains QLoRA adapters in bf16; the Trainer's reload upcasts them (and the optimizer moments) to fp32."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].weight.requires_grad_(False)  # a frozen base weight: neither recorded nor digested
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(3, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    dtypes, saved = trainable_dtypes(model), state_digest(model, optimizer)
    assert dtypes == {"0.bias": "bfloat16", "1.weight": "bfloat16", "1.bias": "bfloat16"}

    for param in model.parameters():  # what a reload does: same values, wider dtype
        if param.requires_grad:
            param.data = param.data.float()
            for key in ("exp_avg", "exp_avg_sq"):
                optimizer.state[param][key] = optimizer.state[param][key].float()
    assert state_digest(model, optimizer) != saved
    assert sorted(restore_trainable_dtypes(model, optimizer, dtypes)) == ["0.bias", "1.bias", "1.weight"]
    assert state_digest(model, optimizer) == saved
    assert restore_trainable_dtypes(model, optimizer, dtypes) == []
