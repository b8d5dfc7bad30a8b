"""Shared fixtures: the tiny local base model (built once, cached across sessions) and the demo task's files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """Path of the "test" preset tiny base, built on first use (~10-20 s) and reused while its build hash matches.

    The cache lives in $TUNEKIT_TEST_CACHE, else <repo>/.cache/test-tiny-base (git-ignored)."""
    from tunekit.tiny import build_tiny_base

    cache = Path(os.environ.get("TUNEKIT_TEST_CACHE", REPO / ".cache" / "test-tiny-base"))
    return build_tiny_base(cache, preset="test", seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """The demo task written small into a tmp dir: {"train", "eval", "chat", "prompt_completion", "text"} -> path.

    Session-scoped (module fixtures build runs from it); tests must not modify these files."""
    from tunekit.tiny import write_demo_task

    return write_demo_task(tmp_path_factory.mktemp("demo-data"), n_train=256, n_eval=32, n_variants=16)


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory) -> dict[str, Path]:
    """The tiny preference task written small into a tmp dir: {"train", "eval", "chat_train", "chat_eval"} -> path
    (string rows, then chat rows; 256 train and 32 eval pairs). Session-scoped; tests must not modify these files."""
    from tunekit.tiny import write_preference_task

    return write_preference_task(tmp_path_factory.mktemp("preference-data"), n_train=256, n_eval=32)


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Tests never touch the user's caches or a tracker: tokenization cache in tmp, wandb offline, and DeepSpeed's
    compiled op kept in the repo cache (compiling it costs ~60 s)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNEKIT_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    yield
    mp.undo()
