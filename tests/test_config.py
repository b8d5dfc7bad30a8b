"""Config schema: defaults from the seeds, one-line errors naming file:line and key, every shipped config loads."""

from pathlib import Path

import pytest
import yaml

from tunekit import config as config_mod
from tunekit.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path, text: str, model_dir=None, data_file=None) -> Path:
    model_dir = model_dir or tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    if data_file is None:
        data_file = tmp_path / "train.jsonl"
        data_file.write_text('{"text": "hello"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(text.format(model=model_dir, data=data_file, out=tmp_path / "out"))
    return path


GOOD = """\
method: lora
output_dir: {out}
model:
  name_or_path: {model}
data:
  sources:
    - path: {data}
      format: text
"""


def test_defaults_follow_the_seeds(tmp_path):
    cfg = config_mod.load(write_config(tmp_path, GOOD))
    assert cfg.lora.r == 16 and cfg.lora.lora_alpha == 32 and cfg.lora.dropout == 0.05
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.learning_rate == 2e-4
    assert cfg.training.lr_scheduler_type == "cosine" and cfg.training.warmup_ratio == 0.03
    assert cfg.model.trust_remote_code is False
    full = config_mod.load(write_config(tmp_path, GOOD.replace("method: lora", "method: full")))
    assert full.learning_rate == 2e-5
    assert full.deepspeed is not None and full.deepspeed.stage == 3  # full FT defaults to ZeRO-3


def test_overrides_reach_the_listed_keys(tmp_path):
    path = write_config(tmp_path, GOOD)
    cfg = config_mod.load(path, [
        "output_dir=/tmp/elsewhere", "training.max_steps=7", "training.seed=3", "checkpoints.save_steps=2",
        "checkpoints.keep_top_k=1", "checkpoints.keep_last_n=4", f"model.name_or_path={tmp_path / 'model'}",
    ])
    assert (cfg.output_dir, cfg.training.max_steps, cfg.training.seed) == ("/tmp/elsewhere", 7, 3)
    assert (cfg.checkpoints.save_steps, cfg.checkpoints.keep_top_k, cfg.checkpoints.keep_last_n) == (2, 1, 4)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("method: lora", "method: lorra"), ":1: method: Input should be 'full', 'lora' or 'qlora'"),
        (("format: text", "format: text\n      wieght: 2"), ":9: data.sources.0.wieght: unknown key 'wieght' (did you mean 'weight'?)"),
        (("data:", "lora:\n  r: 0\ndata:"), ":6: lora.r: Input should be greater than 0"),
        (("data:", "lora:\n  r: many\ndata:"), ":6: lora.r: Input should be a valid integer"),
        (("data:", "training:\n  learning_rate: 0\ndata:"), ":6: training.learning_rate: Input should be greater than 0"),
        (("data:", "trainig:\n  seed: 1\ndata:"), ":5: trainig: unknown key 'trainig' (did you mean 'training'?)"),
        (("method: lora\n", ""), "run.yaml: method: required key is missing"),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path, edit, expected):
    path = write_config(tmp_path, GOOD.replace(*edit))
    with pytest.raises(UserError) as info:
        config_mod.load(path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_paths_are_named(tmp_path):
    path = write_config(tmp_path, GOOD, data_file=tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=r"run.yaml:7: data.sources.0.path: data file not found: .*nope.jsonl"):
        config_mod.load(path)
    path = write_config(tmp_path, GOOD.replace("{model}", "{model}/missing"))
    with pytest.raises(UserError, match=r"run.yaml:4: model.name_or_path: model directory not found"):
        config_mod.load(path)


def test_set_errors_point_at_the_override(tmp_path):
    path = write_config(tmp_path, GOOD)
    with pytest.raises(UserError, match=r"^--set lora.r=-2: lora.r: Input should be greater than 0"):
        config_mod.load(path, ["lora.r=-2"])
    with pytest.raises(UserError, match="expected dotted.key=value"):
        config_mod.load(path, ["lora.r"])


def test_trap_warnings(tmp_path):
    cfg = config_mod.load(write_config(tmp_path, GOOD.replace("data:", "lora:\n  r: 8\n  alpha: 8\ntraining:\n  learning_rate: 2.0e-5\ndata:")))
    messages = config_mod.trap_warnings(cfg)
    assert any("alpha == lora.r" in m for m in messages)
    assert any("full fine-tuning range" in m for m in messages)
    assert config_mod.trap_warnings(config_mod.load(write_config(tmp_path, GOOD))) == []


def test_secrets_are_redacted():
    assert config_mod.redact({"logging": {"api_key": "abc", "project": "p"}, "hub_token": "t", "n": 1}) == {
        "logging": {"api_key": "<redacted>", "project": "p"}, "hub_token": "<redacted>", "n": 1,
    }


def test_qlora_with_zero3_is_refused(tmp_path):
    path = write_config(tmp_path, GOOD.replace("method: lora", "method: qlora") + "deepspeed:\n  stage: 3\n")
    with pytest.raises(UserError, match="deepspeed.stage: 3 conflicts with method qlora"):
        config_mod.load(path)


def test_bad_deepspeed_json_is_named(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3,}}')
    path = write_config(tmp_path, GOOD.replace("method: lora", "method: full") + f"deepspeed:\n  config: {ds}\n")
    with pytest.raises(UserError, match=r"run.yaml:10: deepspeed.config: .*ds.json:1: DeepSpeed JSON does not parse"):
        config_mod.load(path)


RUN_CONFIGS = sorted(p for p in (REPO / "configs").glob("**/*.yaml") if "accelerate" not in p.parts)


def test_configs_are_shipped():
    assert {"demo.yaml", "tiny-lora.yaml", "tiny-qlora.yaml", "tiny-full-zero3.yaml"} <= {p.name for p in RUN_CONFIGS}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path):
    config = config_mod.load(path, check_paths=False)
    assert config.method in config_mod.METHODS and yaml.safe_load(path.read_text())["method"] == config.method
