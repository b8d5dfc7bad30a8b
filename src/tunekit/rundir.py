"""The run directory: refuse to clobber, write what ran, the summary, and read them back.

Layout:  OUTPUT_DIR/config.yaml    the config exactly as run (after --set), schema version included
                    resolved.json  what "auto" stood for on the machine that ran it (`Resolved`), library versions
                    checkpoint-*/  final/  summary.json  report.md  *.png
                    stopped.json   only after a stop on a signal (preemption.py): signal, step, checkpoint

`tunekit train --resume auto` (a requeued job's one command line) asks `finished_summary` (done: nothing to do) and
`check_auto_resume` (a tunekit run, or nothing, in output_dir); checkpoints.resume_target then picks the checkpoint.
merge and export open a finished run here (`open_run` -> `Run`), refuse a bad --out (`check_out`) and write OUT
through a staged directory (`staged_dir`): this module owns run directories, so they need not import each other.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunekit import config as config_mod
from tunekit.checkpoints import complete_checkpoints, latest_complete_checkpoint
from tunekit.config import RunConfig
from tunekit.errors import UserError, first_line

RESOLVED_NAME = "resolved.json"
STOPPED_NAME = "stopped.json"  # written by preemption.py when a signal stopped the run; removed when a run starts
# Distributions whose versions decide what a run did (numerics, defaults, file formats), in resolved.json.
VERSIONED = ("tunekit", "torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes",
             "datasets", "safetensors", "tokenizers")


class Resolved(BaseModel):
    """What the config's "auto" values and the launcher decided for this run, as it ran (resolved.json).

    merge and export read these instead of re-deriving them on another machine: a QLoRA run trained in bf16 on a
    GPU and merged on a CPU must be re-quantized from the bf16 weights it was trained from, not from fp32.
    """

    model_config = ConfigDict(extra="forbid")

    precision: str = Field(description="Mixed precision the Trainer ran: fp32 | bf16 | fp16.")
    load_dtype: str = Field(description="dtype the base weights were loaded in: float32 | bfloat16 | float16.")
    zero_stage: int | None = Field(description="DeepSpeed ZeRO stage that ran; None without DeepSpeed.")
    world_size: int = Field(description="Training processes (GPUs) in the job.")
    ddp_timeout: int | None = Field(None, description="Seconds a collective waited for the other ranks at most.")
    attn_implementation: str | None = Field(description="Attention kernel the loaded model uses.")
    device: str = Field(description="cpu, or cuda with the first GPU's name.")
    versions: dict[str, str] = Field(description="Library versions that ran (python too).")


def library_versions() -> dict[str, str]:
    """python and each VERSIONED distribution's installed version ("not installed" when absent)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def read_resolved(run_dir: str | os.PathLike) -> Resolved | None:
    """The run's resolved record, or None for a run written before tunekit recorded one."""
    path = Path(run_dir) / RESOLVED_NAME
    if not path.is_file():
        return None
    try:
        return Resolved.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a valid tunekit record ({first_line(exc)})") from None


def check_output_dir(output_dir: str, overwrite: bool, resume: str | None,
                     config: RunConfig | None = None) -> None:
    """Refuse a non-empty output_dir unless --overwrite or --resume, and --resume of a directory that holds no run;
    never writes to the disk. `config`: the run's, for --resume auto (see `check_auto_resume`)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir: {output_dir} exists and is not a directory")
    if resume == "auto":
        check_auto_resume(path, config)
        return
    if resume == "latest" and not (path / "config.yaml").is_file():
        raise UserError(f"--resume: nothing to resume in {output_dir} (no tunekit run there); drop --resume to start")
    if resume is None and not overwrite and path.is_dir() and any(path.iterdir()):
        raise UserError(f"output_dir: {output_dir} is not empty; pass --overwrite to replace it or --resume to continue it")


def check_auto_resume(path: Path, config: RunConfig | None) -> None:
    """--resume auto may continue or restart only a tunekit run: refuse a non-empty directory without config.yaml,
    and one with no complete checkpoint (a run that died before its first save, restarted from scratch) whose
    config.yaml is not this config (a different run that --overwrite should replace knowingly)."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not (path / "config.yaml").is_file():
        raise UserError(f"--resume auto: {path} is not empty and holds no tunekit run (no config.yaml); "
                        "--resume auto never replaces it")
    if config is None or latest_complete_checkpoint(path) is not None:
        return
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume auto: {path / 'config.yaml'}: unreadable ({first_line(exc)})") from None
    changed = _changed_keys(saved, config.model_dump(mode="json"))
    if changed:
        raise UserError(f"--resume auto: {path} holds a run of another config with no checkpoint to resume "
                        f"({', '.join(changed[:3])} differ); pass --overwrite to replace it")


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "(config)"]
    changed = []
    for name in sorted(set(a) | set(b), key=str):
        changed += _changed_keys(a.get(name), b.get(name), f"{prefix}.{name}" if prefix else str(name))
    return changed


def finished_summary(output_dir: str | os.PathLike) -> dict | None:
    """The summary of the run in output_dir when it finished (final/ and summary.json, no complete checkpoint newer
    than its last step), else None. What --resume auto checks first: a requeued job that already finished does
    nothing."""
    path = Path(output_dir)
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (path / "final").is_dir() or not (path / "config.yaml").is_file() or not isinstance(summary, dict):
        return None
    steps = summary.get("steps")
    if not isinstance(steps, int) or any(step > steps for step in complete_checkpoints(path)):
        return None
    return summary


def create(config: RunConfig, resolved: Resolved, overwrite: bool, resume: str | None) -> Path:
    """Make (or, with --overwrite, empty) the run directory; write config.yaml exactly as run and resolved.json.

    No redaction pass: the schema has no plain-text secret field (a test keeps it so), and a filter matching "token"
    in key names once replaced `model.add_tokens` with '<redacted>' — the run directory must say what ran.
    """
    path = Path(config.output_dir)
    if overwrite and resume is None and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    write_json(path / RESOLVED_NAME, resolved.model_dump(mode="json"))
    (path / STOPPED_NAME).unlink(missing_ok=True)  # describes the last stop; this run has not stopped
    return path


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a per-process temp name and rename: a crash or a concurrent rank never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def load_run(run_dir: str | os.PathLike) -> tuple[RunConfig, dict[str, Any]]:
    """(config, summary) of a finished run; UserError (one line) when the directory is not a tunekit run."""
    path = Path(run_dir)
    config_file, summary_file = path / "config.yaml", path / "summary.json"
    if not path.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not config_file.is_file():
        raise UserError(f"{run_dir}: not a tunekit run directory (no config.yaml)")
    try:
        config = config_mod.load(config_file, check_paths=False, saved_by_tunekit=True)
        summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    except (ValueError, OSError) as exc:  # JSON/UTF-8 errors are ValueErrors
        raise UserError(f"{summary_file}: unreadable run summary: {first_line(exc)}") from None
    if not isinstance(summary, dict):
        raise UserError(f"{summary_file}: not a tunekit run summary (expected a JSON object)")
    return config, summary


# ---------------------------------------------------------------- a finished run, and writing beside it (merge, export)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft saves into final/


@dataclass
class Run:
    """A finished run as merge/export read it: config, summary, the resolved record (None for a run written before
    tunekit recorded one) and its final/ directory."""

    dir: Path
    config: RunConfig
    summary: dict[str, Any]
    resolved: Resolved | None
    final: Path

    @property
    def has_adapter(self) -> bool:
        return all((self.final / name).is_file() for name in ADAPTER_FILES)


def open_run(run_dir: str | os.PathLike) -> Run:
    """The finished run at run_dir. UserError (one line) when it is not one: missing, a file, no config.yaml, a
    config.yaml or resolved.json that does not validate, or no final/ (the run did not finish)."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{run_dir}: a file, not a run directory")
    config, summary = load_run(path)
    final = path / "final"
    if not final.is_dir():
        raise UserError(f"{run_dir}: no final/ directory (the run did not finish); nothing to merge or export")
    return Run(path, config, summary, read_resolved(path), final)


def check_out(out: str | os.PathLike, run: Run, overwrite: bool) -> Path:
    """--out as a Path; UserError when it exists (unless overwrite) or when replacing it would delete the run.
    Touches nothing: call it before any slow work, so a bad --out fails in a second."""
    out_dir = Path(out)
    resolved, run_resolved = out_dir.resolve(), run.dir.resolve()
    if resolved == run_resolved or resolved in run_resolved.parents or resolved == run.final.resolve() \
            or run.final.resolve() in resolved.parents:
        raise UserError(f"--out {out}: would overwrite the run itself; choose a directory outside {run.dir}/final")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: already exists; pass --overwrite to replace it")
    return out_dir


@contextmanager
def staged_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield OUT.tmp to write into; on success it replaces OUT (the old OUT is removed only once the new one is in
    place), on any error it is removed and OUT is left as it was."""
    out_dir = out_dir.resolve()  # siblings of "." or "x/" need a real name
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted merge/export
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        if not overwrite and any(out_dir.iterdir()):  # someone wrote OUT meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"--out {out_dir}: appeared while writing; pass --overwrite to replace it")
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
