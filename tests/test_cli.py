"""The CLI: fast start without torch, and bad input → one `error:` line, exit 2, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunekit.cli import COMMANDS, build_parser, main


def run_config(tmp_path, tiny_base, data_lines: str, fmt: str = "alpaca", extra: str = "") -> Path:
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(data_lines)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"method: lora\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_base}\n"
        f"data:\n  sources:\n    - path: {data_file}\n      format: {fmt}\n  cache_dir: {tmp_path / 'cache'}\n{extra}"
    )
    return path


GOOD_ROW = json.dumps({"instruction": "Repeat a", "input": "", "output": "a"}) + "\n"


def test_dispatch_table_covers_every_subcommand():
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(subcommands) == set(COMMANDS)


def test_help_and_validate_do_not_import_torch(tmp_path, tiny_base):
    config = run_config(tmp_path, tiny_base, GOOD_ROW * 5)
    code = (
        "import sys; from tunekit.cli import main; "
        f"rc = main(['validate', {str(config)!r}]); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "is a valid lora config" in result.stdout
    result = subprocess.run([sys.executable, "-m", "tunekit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.parametrize(
    "lines, fmt, extra, expected",
    [
        (GOOD_ROW + "{not json}\n", "alpaca", "", r"train.jsonl:2: bad JSON line"),
        (json.dumps({"instruction": "x"}) + "\n", "alpaca", "", r"train.jsonl:1: missing field 'output'"),
        ("", "alpaca", "", r"train.jsonl: no examples \(empty file\)"),
        (GOOD_ROW, "chat", "", r"train.jsonl:1: missing field 'messages' for format 'chat' \(this row looks like format 'alpaca'\)"),
        (GOOD_ROW, "alpaca", "lora:\n  rank: 8\n", r"run.yaml:\d+: lora.rank: unknown key 'rank'"),
        (GOOD_ROW, "alpaca", "training:\n  learning_rate: -1\n", r"run.yaml:\d+: training.learning_rate: Input should be greater than 0"),
    ],
)
def test_bad_input_gives_one_error_line_and_writes_nothing(tmp_path, tiny_base, capsys, lines, fmt, extra, expected):
    config = run_config(tmp_path, tiny_base, lines, fmt, extra)
    assert main(["train", str(config)]) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1
    assert __import__("re").search(expected, err_lines[0]), err_lines[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_dir_is_never_clobbered(tmp_path, tiny_base, capsys):
    config = run_config(tmp_path, tiny_base, GOOD_ROW * 5)
    precious = tmp_path / "out" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("user data")
    assert main(["train", str(config)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert precious.read_text() == "user data"


def test_a_real_process_prints_no_traceback(tmp_path, tiny_base):
    config = run_config(tmp_path, tiny_base, GOOD_ROW, extra="lora:\n  r: 0\n")
    result = subprocess.run([sys.executable, "-m", "tunekit", "train", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "lora.r" in result.stderr
    assert not (tmp_path / "out").exists()
