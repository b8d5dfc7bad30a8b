"""Run report: plots and report.md from a synthetic log history, with and without optional sections."""

import sys

import pytest

from tunekit.forgetting import forgetting_flag
from tunekit.report import format_value, loss_curve, metric_curve, start_plotter, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_log_history(with_eval: bool = True, with_memory: bool = False) -> list[dict]:
    """Shaped like Trainer.state.log_history: train entries every step, eval every 5, the final train summary."""
    history = []
    for step in range(1, 21):
        entry = {"loss": 3.0 - 0.1 * step, "learning_rate": 2e-4 * min(1.0, step / 3), "grad_norm": 1.0,
                 "epoch": step / 20, "step": step}
        if with_memory:
            entry.update(memory_bytes=1.2e9 + step * 1e6, peak_memory_bytes=2.0e9)
        history.append(entry)
        if with_eval and step % 5 == 0:
            history.append({"eval_loss": 2.5 - 0.05 * step, "eval_runtime": 0.5, "step": step})
            history.append({"eval_general_loss": 2.0 + 0.02 * step, "step": step})
    history.append({"train_runtime": 42.0, "train_loss": 2.0, "step": 20})
    return history


SUMMARY = {
    "method": "lora", "final_train_loss": 1.012345, "final_eval_loss": 1.5, "train_runtime": 3725.0,
    "peak_memory_bytes": 2.5e9, "trainable_params": 1234567, "kept_checkpoints": ["out/checkpoint-10", "out/checkpoint-20"],
    "best_checkpoint": "out/checkpoint-10",
}


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_curves_from_log_history():
    history = synthetic_log_history()
    assert loss_curve(history)[:2] == [(1, 2.9), (2, 2.8)] and len(loss_curve(history)) == 20
    assert [step for step, _ in metric_curve(history, "eval_loss")] == [5, 10, 15, 20]


def test_full_report_with_every_section(tmp_path):
    spectra = {f"model.layers.{i}.self_attn.{kind}": values for i in range(2)
               for kind, values in (("q_proj", [10.0] + [1e-4] * 7), ("v_proj", [1.0] * 8))}
    from tunekit.spectrum import summarize_spectra

    spectra_history = [{"step": 10, "summary": summarize_spectra(spectra)}, {"step": 20, "summary": summarize_spectra(spectra)}]
    forgetting = forgetting_flag(2.0, [(10, 2.2), (20, 2.4)], threshold=0.10)
    path = write_report(tmp_path / "run", SUMMARY, synthetic_log_history(with_memory=True), spectra_history, spectra,
                        forgetting)
    assert path == tmp_path / "run" / "report.md"
    for name in ("loss.png", "lr.png", "memory.png", "spectrum.png"):
        assert_png(tmp_path / "run" / name)
    text = path.read_text()
    for heading in ("# Training report: lora", "## Summary", "## Plots", "## LoRA rank spectrum", "## Forgetting",
                    "## Checkpoints"):
        assert heading in text
    assert "![loss](loss.png)" in text and "![spectrum](spectrum.png)" in text
    assert "| final_train_loss | 1.0123 |" in text and "| peak_memory_bytes | 2.50 GB |" in text
    assert "1h 02m" in text  # 3725 s
    assert "| q_proj | 8 | " in text and "collapsed | consider a lower r" in text and "flat | consider a higher r" in text
    assert "**FLAGGED**" in text and "+20.0%" in text and "10%" in text
    assert "- `out/checkpoint-10` (best)" in text and "- `out/checkpoint-20`" in text


def test_minimal_report_full_ft_without_eval(tmp_path):
    summary = {"method": "full", "final_train_loss": 1.0,
               "zero": {"label": "ZeRO-1", "reason": "8 processes: DDP (no DeepSpeed) needs 149.3 GB, more than 80.0 GB "
                                                  "per GPU; ZeRO-1 needs 74.2 GB"}}
    path = write_report(tmp_path, summary, synthetic_log_history(with_eval=False))
    assert_png(tmp_path / "loss.png") and assert_png(tmp_path / "lr.png")
    assert not (tmp_path / "memory.png").exists() and not (tmp_path / "spectrum.png").exists()
    text = path.read_text()
    assert "## Summary" in text
    assert "| deepspeed | ZeRO-1: 8 processes: DDP (no DeepSpeed) needs 149.3 GB" in text  # the stage auto chose, and why
    for absent in ("LoRA rank spectrum", "Forgetting", "Checkpoints", "FLAGGED"):
        assert absent not in text


def test_forgetting_ok_and_empty_history(tmp_path):
    forgetting = forgetting_flag(2.0, [(10, 2.05)], threshold=0.10)
    text = write_report(tmp_path, {}, [], forgetting=forgetting).read_text()
    assert "## Forgetting" in text and "| status | ok |" in text and "FLAGGED" not in text
    assert "Nothing was logged to plot." in text and not (tmp_path / "loss.png").exists()


def test_untrained_spectrum_and_stale_plots(tmp_path):
    (tmp_path / "memory.png").write_bytes(b"old")
    zero = {"model.layers.0.self_attn.q_proj": [0.0] * 4}
    text = write_report(tmp_path, {"method": "lora"}, synthetic_log_history(), [{"step": 0, "summary": {}}], zero).read_text()
    assert "still at its initialization" in text
    assert not (tmp_path / "spectrum.png").exists() and not (tmp_path / "memory.png").exists()


def test_value_formatting():
    assert format_value("eval_loss", 0.123456) == "0.1235"
    assert format_value("checkpoint_bytes", 3e6) == "3.0 MB"
    assert format_value("train_runtime", 12.34) == "12.3 s"
    assert format_value("train_samples_per_second", 12.3456) == "12.35"
    assert format_value("steps", 1200) == "1,200"
    assert format_value("output_dir", "runs/a") == "`runs/a`"


def test_plots_are_drawn_outside_the_training_process(tmp_path):
    """matplotlib never enters the training process (it raised the run's peak memory): the plots come from
    start_plotter's child, started early and handed the job at the end; a child handed no job exits quietly."""
    loaded_before = "matplotlib.pyplot" in sys.modules
    plotter = start_plotter()
    path = write_report(tmp_path, SUMMARY, synthetic_log_history(with_memory=True), plotter=plotter)
    assert plotter.returncode == 0
    for name in ("loss.png", "lr.png", "memory.png"):
        assert_png(tmp_path / name)
    assert "![memory](memory.png)" in path.read_text()
    assert ("matplotlib.pyplot" in sys.modules) == loaded_before
    idle = start_plotter()
    assert idle.communicate("")[1] == "" and idle.returncode == 0


def test_a_failing_plot_child_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="drawing the plots"):
        write_report(tmp_path, SUMMARY, [{"step": 1, "loss": "not a number"}, {"step": 2, "loss": 1.0}])
