"""The run directory: refuse to clobber, write the resolved config, the summary, and read them back.

Layout:  OUTPUT_DIR/config.yaml  checkpoint-*/  final/  summary.json  report.md  *.png
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from tunekit.config import RunConfig
from tunekit.errors import UserError


def check_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> None:
    """Refuse a non-empty output_dir unless --overwrite or --resume; never touches the disk."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir: {output_dir} exists and is not a directory")
    if resume is None and not overwrite and path.is_dir() and any(path.iterdir()):
        raise UserError(f"output_dir: {output_dir} is not empty; pass --overwrite to replace it or --resume to continue it")


def create(config: RunConfig, overwrite: bool, resume: str | None) -> Path:
    """Make (or, with --overwrite, empty) the run directory and write config.yaml with secrets redacted."""
    path = Path(config.output_dir)
    if overwrite and resume is None and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path / "config.yaml", yaml.safe_dump(config.redacted(), sort_keys=False))
    return path


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a per-process temp name and rename: a crash or a concurrent rank never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def load_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """(config, summary) of a finished run; UserError when the directory is not a tunekit run."""
    path = Path(run_dir)
    config_file, summary_file = path / "config.yaml", path / "summary.json"
    if not config_file.is_file():
        raise UserError(f"{run_dir}: not a tunekit run directory (no config.yaml)")
    config = RunConfig.model_validate(yaml.safe_load(config_file.read_text()))
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return config, summary
