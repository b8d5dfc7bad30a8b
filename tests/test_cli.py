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
        (json.dumps({"instruction": "x"}) + "\n", "alpaca", "", r"train.jsonl:1: output: missing field for format 'alpaca'"),
        ("", "alpaca", "", r"train.jsonl: no examples \(empty file\)"),
        (GOOD_ROW, "chat", "", r"train.jsonl:1: messages: missing field for format 'chat' \(this row looks like format 'alpaca'\)"),
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


def _one_error_line(capsys) -> str:
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, err_lines
    return err_lines[0]


@pytest.mark.parametrize("method, section, expected", [
    ("full", "lora:\n  r: 8\n", r"run.yaml:\d+: lora: not used by method full"),
    ("lora", "qlora:\n  quant_type: fp4\n", r"run.yaml:\d+: qlora: not used by method lora"),
])
def test_a_section_the_method_does_not_use_stops_the_run(tmp_path, tiny_base, capsys, method, section, expected):
    config = run_config(tmp_path, tiny_base, GOOD_ROW * 5, extra=section)
    config.write_text(config.read_text().replace("method: lora", f"method: {method}"))
    assert main(["train", str(config)]) == 2
    assert __import__("re").search(expected, _one_error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_resume_with_nothing_to_resume_and_output_dir_that_is_a_file(tmp_path, tiny_base, capsys):
    config = run_config(tmp_path, tiny_base, GOOD_ROW * 5)
    assert main(["train", str(config), "--resume"]) == 2
    assert "--resume: nothing to resume in" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").write_text("a user's file")
    assert main(["train", str(config)]) == 2
    assert "output_dir: " in _one_error_line(capsys) and (tmp_path / "out").read_text() == "a user's file"


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                         "model_type": "no-such-arch"})),
     "cannot read a model config"),  # the pre-flight estimate reads config.json first
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "cannot load"),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), "cannot load a tokenizer"),
])
def test_library_errors_while_loading_the_users_model_are_one_line(tmp_path, tiny_base, capsys, damage, expected):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_base, model_dir)
    damage(model_dir)
    config = run_config(tmp_path, model_dir, GOOD_ROW * 5, extra="training:\n  max_steps: 1\n")
    assert main(["train", str(config)]) == 2
    line = _one_error_line(capsys)
    assert "model.name_or_path: " in line and expected in line, line
    assert not (tmp_path / "out").exists()


def test_the_run_directory_says_what_ran(tmp_path, tiny_base):
    """config.yaml is the config as run (add_tokens listed, --set applied); resolved.json names what "auto" became."""
    import yaml

    from tunekit import rundir

    config = run_config(tmp_path, tiny_base, GOOD_ROW * 24, extra=(
        "model:\n  name_or_path: {base}\n  add_tokens: ['<tool>', '</tool>']\n"
        "training:\n  max_steps: 2\n  per_device_train_batch_size: 2\n"
        "eval:\n  task_metric: none\n  rank_spectrum: false\ncheckpoints:\n  save_steps: 2\n"
    ).format(base=tiny_base))
    config.write_text(config.read_text().replace(f"model:\n  name_or_path: {tiny_base}\n", "", 1))
    assert main(["train", str(config), "--set", "training.seed=7"]) == 0
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["model"]["add_tokens"] == ["<tool>", "</tool>"] and saved["training"]["seed"] == 7
    assert "qlora" not in saved and "lora" in saved
    resolved = rundir.read_resolved(tmp_path / "out")
    assert (resolved.precision, resolved.load_dtype, resolved.zero_stage, resolved.world_size) == \
        ("fp32", "float32", None, 1)
    assert resolved.attn_implementation == "sdpa" and resolved.device == "cpu"
    import torch
    import transformers

    assert resolved.versions["torch"] == torch.__version__.split("+")[0] or resolved.versions["torch"] == torch.__version__
    assert resolved.versions["transformers"] == transformers.__version__
