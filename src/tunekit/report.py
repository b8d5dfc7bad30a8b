"""The run report: PNG plots and a `report.md` beside the checkpoints, readable without any tracking service.

`write_report` takes what the train recipe already has — the summary dict, the Trainer's `state.log_history`, the
rank-spectrum history and the forgetting verdict — and writes `loss.png`, `lr.png`, `memory.png` (when memory was
logged), `spectrum.png` (LoRA runs) and `report.md`. Every section is optional: a full fine-tuning run has no
spectrum, a run without eval has no eval curve. The plots are drawn by a child interpreter (draw_plots): matplotlib
(Agg, no display) never enters the training process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

MEMORY_KEYS = ("memory_bytes", "peak_memory_bytes")
PLOT_NAMES = ("loss.png", "lr.png", "memory.png", "preference.png", "spectrum.png")
CHECKPOINT_KEYS = ("kept_checkpoints", "best_checkpoint")
ADVICE = {"collapsed": "consider a lower r", "flat": "consider a higher r", "ok": "-"}


# ---------------------------------------------------------------- log history


def metric_curve(log_history: Sequence[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) for every log entry that has `key` (Trainer entries carry "step"), in log order."""
    return [(int(entry.get("step", 0)), float(entry[key])) for entry in log_history if entry.get(key) is not None]


def loss_curve(log_history: Sequence[dict]) -> list[tuple[int, float]]:
    """Training loss per logging step (the Trainer logs it as "loss"; the final "train_loss" is a run average)."""
    return metric_curve(log_history, "loss")


# ---------------------------------------------------------------- formatting


def format_bytes(count: float) -> str:
    """1.5e9 → '1.50 GB', 3e6 → '3.0 MB' (decimal units, like the estimate)."""
    if abs(count) >= 1e9:
        return f"{count / 1e9:.2f} GB"
    return f"{count / 1e6:.1f} MB"


def format_seconds(seconds: float) -> str:
    """75 → '75.0 s (1m 15s)'; under a minute just '12.3 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
    return f"{seconds:.1f} s ({clock})"


def format_value(key: str, value) -> str:
    """A summary value for the table: losses to 4 decimals, *_bytes in MB/GB, seconds/runtime with minutes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"`{value}`" if isinstance(value, str) and ("/" in value or "\\" in value) else str(value)
    name = key.lower()
    if name.endswith("bytes"):
        return format_bytes(value)
    if name.endswith(("seconds", "runtime")) and "per_" not in name:  # not rates like tokens_per_second
        return format_seconds(value)
    if "loss" in name or "perplexity" in name:
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- plots


def _plot_lines(path: Path, title: str, ylabel: str, series: dict[str, list[tuple[int, float]]],
                hlines: dict[str, float] | None = None, logy: bool = False) -> Path | None:
    """One figure of step-indexed lines (skipping empty series); None when there is nothing to draw."""
    return _plot_panels(path, [(title, ylabel, series, hlines, logy)])


def _plot_panels(path: Path, panels: list[tuple]) -> Path | None:
    """Side-by-side panels of step-indexed lines, each (title, ylabel, series, hlines, logy) as `_plot_lines` takes
    them; empty series and panels are skipped. None when there is nothing to draw."""
    panels = [(title, ylabel, {label: points for label, points in series.items() if points}, hlines, logy)
              for title, ylabel, series, hlines, logy in panels]
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (title, ylabel, series, hlines, logy) in zip(axes[0], panels):
        for label, points in series.items():
            steps, values = zip(*points)
            # A lone point (one eval) would be invisible as a line: mark every point of sparse series.
            ax.plot(steps, values, label=label, marker="o" if len(points) <= 20 else None, markersize=3)
        for label, value in (hlines or {}).items():
            ax.axhline(value, linestyle="--", color="gray", label=label)
        if logy:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def spectrum_plot_data(last_spectra: dict[str, list[float]] | None) -> dict | None:
    """What the spectrum plot draws, from `RankSpectrumCallback.last_spectra`: each layer type's singular values
    (one list per module) and the verdict thresholds. Computed in the training process, which has tunekit.spectrum
    (torch) imported already; the plotting child then needs neither."""
    from tunekit.spectrum import COLLAPSED_FRACTION, FLAT_FRACTION, layer_type

    groups: dict[str, list[list[float]]] = {}
    for name, values in (last_spectra or {}).items():
        if any(values):  # adapters still at init (B = 0) have nothing to show on a log scale
            groups.setdefault(layer_type(name), []).append(list(values))
    return {"groups": groups, "collapsed": COLLAPSED_FRACTION, "flat": FLAT_FRACTION} if groups else None


def _plot_spectrum(path: Path, spectrum: dict, spectra_history: Sequence[dict] | None) -> Path:
    """Left: singular values by index per layer type at the last eval (mean over modules, min–max band, log y).
    Right: effective rank / r per layer type over the evaluations, with the verdict thresholds.
    spectrum: spectrum_plot_data's dict."""
    groups = spectrum["groups"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, members in sorted(groups.items()):
        rank = min(len(values) for values in members)
        columns = [[values[i] for values in members] for i in range(rank)]  # [r][modules]
        index = list(range(1, rank + 1))
        mean = [sum(column) / len(column) for column in columns]
        line = left.plot(index, mean, marker="o", markersize=3, label=f"{kind} ({len(members)} modules)")[0]
        left.fill_between(index, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(), alpha=0.2)
    left.set_yscale("log", nonpositive="mask")  # exact zeros (rank > min(in, out)) are dropped, not -inf
    left.set(title="LoRA singular values of scaling·B@A (last eval)", xlabel="index", ylabel="singular value")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for kind in sorted({kind for entry in spectra_history or () for kind in entry["summary"]}):
        points = [(entry["step"], entry["summary"][kind]["fraction"]) for entry in spectra_history
                  if kind in entry["summary"]]
        steps, fractions = zip(*points)
        right.plot(steps, fractions, marker="o", markersize=3, label=kind)
    right.axhline(spectrum["collapsed"], linestyle="--", color="gray")
    right.axhline(spectrum["flat"], linestyle="--", color="gray")
    right.set(title="effective rank / r (dashed: collapsed, flat)", xlabel="step", ylabel="fraction of r", ylim=(0, 1.05))
    right.grid(alpha=0.3)
    if spectra_history:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def start_plotter() -> subprocess.Popen:
    """The child interpreter that draws a run's plots (`python -m tunekit.report`, see draw_plots). Started early by
    the train recipe, its matplotlib import (~0.4 s) runs beside the training process's start-up; it then waits for
    one job on stdin (none: it exits)."""
    return subprocess.Popen([sys.executable, "-m", "tunekit.report"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def draw_plots(output_dir: Path, log_history: Sequence[dict], spectra_history: Sequence[dict] | None = None,
               last_spectra: dict | None = None, forgetting: dict | None = None,
               plotter: subprocess.Popen | None = None) -> list[Path]:
    """write_plots in a child interpreter (`plotter`, or one started now), the data as JSON on its stdin, so matplotlib
    never enters the training process: importing it and drawing were the last thing to raise the run's peak resident
    memory (+20 MB on the tiny base, after training). Returns the paths written, in PLOT_NAMES order."""
    plotter = plotter or start_plotter()
    job = {"output_dir": str(output_dir), "log_history": list(log_history), "spectra_history": spectra_history,
           "spectrum": spectrum_plot_data(last_spectra), "forgetting": forgetting}
    _, errors = plotter.communicate(json.dumps(job))  # the log history is JSON already (trainer_state.json)
    if plotter.returncode != 0:
        raise RuntimeError(f"drawing the plots in {output_dir} failed:\n{errors[-3000:]}")
    return [output_dir / name for name in PLOT_NAMES if (output_dir / name).exists()]  # write_plots removed stale ones


def write_plots(output_dir: Path, log_history: Sequence[dict], spectra_history: Sequence[dict] | None = None,
                spectrum: dict | None = None, forgetting: dict | None = None) -> list[Path]:
    """Write whichever of loss.png, lr.png, memory.png, preference.png, spectrum.png have data; returns the paths
    written. spectrum: spectrum_plot_data's dict."""
    base = forgetting.get("base_loss") if forgetting else None
    plots = [
        _plot_lines(
            output_dir / "loss.png", "Loss", "loss (nats/token)",
            {"train loss": loss_curve(log_history), "eval loss": metric_curve(log_history, "eval_loss"),
             "general-text loss": metric_curve(log_history, "eval_general_loss")},
            hlines={"base model general-text loss": base} if base is not None else None,
        ),
        _plot_lines(output_dir / "lr.png", "Learning rate", "learning rate",
                    {"learning rate": metric_curve(log_history, "learning_rate")}),
        _plot_lines(
            output_dir / "memory.png", "Memory", "GB",
            {key: [(step, value / 1e9) for step, value in metric_curve(log_history, key)] for key in MEMORY_KEYS},
        ),
    ]
    # Preference runs (TRL's DPO/ORPO log rewards/* in training, eval_rewards/* at each evaluation): the implicit
    # reward margin chosen - rejected, and the share of pairs where it is positive.
    plots.append(_plot_panels(output_dir / "preference.png", [
        ("Reward margin (chosen - rejected)", "margin", {
            "train": metric_curve(log_history, "rewards/margins"),
            "eval": metric_curve(log_history, "eval_rewards/margins")}, {"zero": 0.0}, False),
        ("Reward accuracy", "share of pairs", {
            "train": metric_curve(log_history, "rewards/accuracies"),
            "eval": metric_curve(log_history, "eval_rewards/accuracies")}, None, False),
    ]))
    if spectrum:
        plots.append(_plot_spectrum(output_dir / "spectrum.png", spectrum, spectra_history))
    written = [path for path in plots if path is not None]
    for name in PLOT_NAMES:  # a plot from an earlier report whose data is gone now would mislead
        if output_dir / name not in written:
            (output_dir / name).unlink(missing_ok=True)
    return written


# ---------------------------------------------------------------- markdown


def _summary_section(summary: dict) -> list[str]:
    rows = [(key, value) for key, value in summary.items()
            if key not in CHECKPOINT_KEYS and not isinstance(value, (dict, list, tuple)) and value is not None]
    if not rows:
        return []
    lines = ["## Summary", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {format_value(key, value)} |" for key, value in rows]
    zero = summary.get("zero")
    if isinstance(zero, dict) and zero.get("label"):  # the DeepSpeed set-up (deepspeed.stage auto) and why
        lines.append(f"| deepspeed | {zero['label']}: {zero.get('reason', '')} |")
    return lines + [""]


def _spectrum_section(spectra_history: Sequence[dict] | None, last_spectra: dict | None) -> list[str]:
    """Table of the last evaluation's per-layer-type summary, with advice per verdict."""
    if spectra_history:
        step, summary = spectra_history[-1]["step"], spectra_history[-1]["summary"]
    elif last_spectra:
        from tunekit.spectrum import summarize_spectra

        step, summary = None, summarize_spectra(last_spectra)
    else:
        return []
    from tunekit.spectrum import COLLAPSED_FRACTION, FLAT_FRACTION

    when = f" at step {step}" if step is not None else ""
    lines = [
        "## LoRA rank spectrum", "",
        f"Entropy effective rank of each adapter's update scaling·B@A{when}, averaged per layer type. "
        f"collapsed: below {COLLAPSED_FRACTION:.0%} of r (rank higher than the task needs); "
        f"flat: above {FLAT_FRACTION:.0%} of r (the rank may be too low).", "",
    ]
    if not summary:
        return lines + ["Every adapter is still at its initialization (B = 0): no spectrum yet.", ""]
    lines += ["| layer type | r | effective rank | verdict | advice |", "| --- | --- | --- | --- | --- |"]
    for kind, item in summary.items():
        lines.append(f"| {kind} | {item['r']} | {item['effective_rank']:.2f} | {item['verdict']} | "
                     f"{ADVICE.get(item['verdict'], '-')} |")
    return lines + [""]


def _forgetting_section(forgetting: dict | None) -> list[str]:
    if not forgetting:
        return []
    status = "**FLAGGED**" if forgetting.get("flagged") else "ok"
    threshold = forgetting.get("threshold")
    lines = [
        "## Forgetting", "",
        "Causal-LM loss on general text (`eval.general`): the base model before training vs the last evaluation.", "",
        "| | |", "| --- | --- |",
        f"| base general loss | {_loss(forgetting.get('base_loss'))} |",
        f"| last general loss | {_loss(forgetting.get('last_loss'))} |",
        f"| max general loss | {_loss(forgetting.get('max_loss'))} |",
        f"| relative rise (last) | {_percent(forgetting.get('relative_rise'))} |",
        f"| threshold | {'-' if threshold is None else f'{threshold:.0%}'} |",
        f"| status | {status} |", "",
    ]
    if forgetting.get("message"):
        lines += [forgetting["message"], ""]
    return lines


def _preference_section(summary: dict) -> list[str]:
    """Held-out preference accuracy before/after and the reward margin (objective dpo/orpo: summary keys from
    preference.summary_fields); nothing for other runs."""
    if "preference_accuracy_before" not in summary:
        return []

    def share(key: str) -> str:
        value = summary.get(key)
        return "-" if value is None else f"{value:.1%}"

    margin = summary.get("reward_margin_after")
    lines = [
        "## Preference", "",
        f"Held-out pairs scored: {summary.get('preference_pairs_scored', 0)}. Accuracy: the share of pairs whose chosen "
        "answer has the higher log-probability; reward: the log-probability gain over the base model (the "
        "reference), times beta for DPO (1 for ORPO, in nats).", "",
        "| | before | after |", "| --- | --- | --- |",
        f"| preference accuracy | {share('preference_accuracy_before')} | {share('preference_accuracy_after')} |",
        f"| reward margin (chosen - rejected) | - | {'-' if margin is None else f'{margin:.4f}'} |",
        f"| reward accuracy | - | {share('reward_accuracy_after')} |", "",
    ]
    return lines


def _checkpoints_section(summary: dict) -> list[str]:
    kept, best = summary.get("kept_checkpoints"), summary.get("best_checkpoint")
    if not kept and not best:
        return []
    lines = ["## Checkpoints", ""]
    if best:
        lines.append(f"Best: `{best}`")
        lines.append("")
    for path in kept or ():
        lines.append(f"- `{path}`" + (" (best)" if path == best else ""))
    return lines + [""]


def write_report(output_dir: str | Path, summary: dict, log_history: Sequence[dict],
                 spectra_history: Sequence[dict] | None = None, last_spectra: dict | None = None,
                 forgetting: dict | None = None, plotter: subprocess.Popen | None = None) -> Path:
    """Write the plots and `report.md` into `output_dir` (created if missing); returns the report.md path.

    summary: the run's summary dict (method, losses, *_bytes, *_seconds, kept_checkpoints, best_checkpoint, ...).
    log_history: the Trainer's `state.log_history` (entries with "step" and "loss", "eval_loss", "learning_rate",
    "eval_general_loss", "memory_bytes"/"peak_memory_bytes" as they occur). spectra_history / last_spectra: from
    `RankSpectrumCallback` (history / last_spectra). forgetting: `forgetting_flag(...)`'s dict. Rewriting is harmless:
    every file is replaced. plotter: start_plotter's child, when the caller started one early.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(output_dir, log_history, spectra_history, last_spectra, forgetting, plotter)
    method = summary.get("method")
    title = f"# Training report: {method} — `{output_dir}`" if method else f"# Training report — `{output_dir}`"
    lines = [title, ""]
    lines += _summary_section(summary)
    if plots:
        lines += ["## Plots", ""] + [f"![{path.stem}]({path.name})" for path in plots] + [""]
    else:
        lines += ["## Plots", "", "Nothing was logged to plot.", ""]
    lines += _preference_section(summary)
    lines += _spectrum_section(spectra_history, last_spectra)
    lines += _forgetting_section(forgetting)
    lines += _checkpoints_section(summary)
    path = output_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


if __name__ == "__main__":  # start_plotter's child: load matplotlib now, then draw one job from stdin
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported while the training process starts up)

    text = sys.stdin.read()
    if text:  # nothing: the run ended without a report (an error, a stop signal)
        job = json.loads(text)
        write_plots(Path(job.pop("output_dir")), **job)
