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


def test_lora_targets_and_attention_values(tmp_path):
    listed = config_mod.load(write_config(tmp_path, GOOD + "lora:\n  target_modules: [c_attn, c_proj]\n"))
    assert listed.lora.target_modules == ["c_attn", "c_proj"] and listed.lora.describe_targets() == "c_attn, c_proj"
    with pytest.raises(UserError, match=r"lora.target_modules: an empty list adapts nothing"):
        config_mod.load(write_config(tmp_path, GOOD + "lora:\n  target_modules: []\n"))
    old = config_mod.load(write_config(tmp_path, GOOD.replace("  name_or_path:", "  attn_implementation: null\n"
                                                                              "  name_or_path:")))
    assert old.model.attn_implementation == "auto"  # null meant "transformers' default" before auto existed
    # Where a key was written is kept for checks that run later, and is not part of the config's value.
    path = write_config(tmp_path, GOOD)
    config = config_mod.load(path, ["data.packing=true"])
    assert config_mod.where(config, "model.name_or_path") == f"{path}:4: model.name_or_path"
    assert config_mod.where(config, "data.packing") == "--set data.packing=true: data.packing"
    assert config == config_mod.parse(config.model_dump(mode="json"))


def test_defaults_follow_the_seeds(tmp_path):
    cfg = config_mod.load(write_config(tmp_path, GOOD))
    assert cfg.lora.r == 16 and cfg.lora.lora_alpha == 32 and cfg.lora.dropout == 0.05
    assert cfg.lora.target_modules == "all-linear" and cfg.lora.all_linear  # peft's meaning: every family's names
    assert cfg.model.attn_implementation == "auto"  # transformers' choice for the architecture
    assert cfg.learning_rate == 2e-4
    assert cfg.training.lr_scheduler_type == "cosine" and cfg.training.warmup_ratio == 0.03
    assert cfg.model.trust_remote_code is False
    full = config_mod.load(write_config(tmp_path, GOOD.replace("method: lora", "method: full")))
    assert full.learning_rate == 2e-5
    # Full FT defaults to the ZeRO set-up that fits the machine (estimate/stage.py): no DeepSpeed in one process.
    assert full.deepspeed is not None and full.deepspeed.stage == "auto"


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


def _fields(model, prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, config_mod.BaseModel):
                yield from _fields(arg, prefix + name + ".")


def test_no_field_holds_a_plain_text_secret():
    """config.yaml is written exactly as run (no redaction pass that could mangle `add_tokens`): that is safe only
    while no field can hold a secret in plain text. A future key/token field must be a pydantic SecretStr, which
    model_dump writes as '**********'."""
    secret_words = {"token", "key", "secret", "password", "apikey"}
    for cls in config_mod.CONFIG_CLASSES.values():
        for dotted, field in _fields(cls):
            last_word = dotted.rsplit(".", 1)[-1].lower().split("_")[-1]  # api_key, hub_token, wandb_secret
            if last_word in secret_words:
                assert field.annotation is config_mod.SecretStr, f"{dotted} looks like a secret but is plain text"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("method: lora", "method: full") + ("data:", "lora:\n  r: 8\ndata:"),
         ":5: lora: not used by method full (only by lora, qlora)"),
        (("data:", "qlora:\n  quant_type: fp4\ndata:"), ":5: qlora: not used by method lora (only by qlora)"),
        (("output_dir:", "method: full\noutput_dir:"), ":2: method: written twice (first at line 1)"),
        (("data:", "training:\n  seed: 1\ntraining:\n  seed: 2\ndata:"), ":7: training: written twice (first at line 5)"),
        (("data:", "training:\n  seed: 1\n  seed: 2\ndata:"), ":7: training.seed: written twice (first at line 6)"),
        (("data:", "training:\n  max_steps: -5\ndata:"), ":6: training.max_steps: must be -1 (run num_train_epochs) or at least 1"),
        (("data:", "training:\n  max_steps: 0\ndata:"), ":6: training.max_steps: must be -1"),
        (("data:", "training:\n  learning_rate: .inf\ndata:"), ":6: training.learning_rate: Input should be a finite number"),
        (("data:", "training:\n  max_grad_norm: .nan\ndata:"), ":6: training.max_grad_norm: Input should be a finite number"),
        (("data:", "deepspeed:\n  stage: 2\n  config: {{zero_optimization: {{stage: 2}}}}\ndata:"),
         ":6: deepspeed.stage: not used when deepspeed.config is given"),
        (("data:", "deepspeed:\n  config: {{train_batch_size: 8}}\ndata:"),
         ":6: deepspeed.config: no zero_optimization.stage in the DeepSpeed config"),
        (("data:", "deepspeed:\n  stage: 2\n  offload_param: true\ndata:"), ":7: deepspeed.offload_param: needs deepspeed.stage 3"),
        (("data:", "deepspeed:\n  offload_optimizer: true\ndata:"),
         ":6: deepspeed.offload_optimizer: needs an explicit deepspeed.stage (auto offloads by itself"),
        (("data:", "deepspeed:\n  stage: 4\ndata:"), ":6: deepspeed.stage: "),
    ],
)
def test_what_the_method_does_not_use_and_what_yaml_would_hide_are_errors(tmp_path, edit, expected):
    text = GOOD
    for old, new in zip(edit[::2], edit[1::2]):
        text = text.replace(old, new, 1)
    with pytest.raises(UserError) as info:
        config_mod.load(write_config(tmp_path, text))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_eval_fraction_next_to_eval_path_is_an_error(tmp_path):
    text = GOOD + "  eval_path: {data}\n  eval_fraction: 0.1\n"
    with pytest.raises(UserError, match=r":10: data.eval_fraction: not used when data.eval_path is given"):
        config_mod.load(write_config(tmp_path, text))
    assert config_mod.load(write_config(tmp_path, GOOD + "  eval_path: {data}\n")).data.eval_path is not None


def test_max_steps_accepts_minus_one_and_positive(tmp_path):
    for steps in (-1, 1, 50):
        assert config_mod.load(write_config(tmp_path, GOOD), [f"training.max_steps={steps}"]).training.max_steps == steps


@pytest.mark.parametrize("item, expected", [
    ("training.max_stepz=5", "--set training.max_stepz=5: training.max_stepz: unknown key 'max_stepz' (did you mean 'max_steps'?)"),
    ("trainin.seed=1", "--set trainin.seed=1: trainin: unknown key 'trainin'"),
    ("lora.r=8", None),
    ("qlora.quant_type=fp4", "--set qlora.quant_type=fp4: qlora: not used by method lora"),
    ("data.sources.3.path=x.jsonl", "--set data.sources.3.path: data.sources is a list of 1 entries"),
    ("method.name=x", "--set method.name: method is a value, not a section"),
    ("training.learning_rate=.inf", "--set training.learning_rate=.inf: training.learning_rate: Input should be a finite number"),
])
def test_set_on_unknown_or_unusable_keys(tmp_path, item, expected):
    path = write_config(tmp_path, GOOD)
    if expected is None:
        assert config_mod.load(path, [item]).lora.r == 8
        return
    with pytest.raises(UserError) as info:
        config_mod.load(path, [item])
    assert str(info.value).startswith(expected), str(info.value)


def test_each_method_gets_only_its_sections(tmp_path):
    full = config_mod.load(write_config(tmp_path, GOOD.replace("method: lora", "method: full")))
    qlora = config_mod.load(write_config(tmp_path, GOOD.replace("method: lora", "method: qlora")))
    lora = config_mod.load(write_config(tmp_path, GOOD))
    assert not hasattr(full, "lora") and not hasattr(full, "qlora") and full.deepspeed.stage == "auto"
    assert hasattr(lora, "lora") and not hasattr(lora, "qlora") and lora.deepspeed is None
    assert qlora.qlora.quant_type == "nf4" and qlora.MAX_ZERO_STAGE == 2 and lora.MAX_ZERO_STAGE == 3


def test_qlora_with_zero3_is_refused(tmp_path):
    path = write_config(tmp_path, GOOD.replace("method: lora", "method: qlora") + "deepspeed:\n  stage: 3\n")
    with pytest.raises(UserError, match="deepspeed.stage: ZeRO stage 3 conflicts with method qlora"):
        config_mod.load(path)
    ds = tmp_path / "ds3.json"  # the same rule, from a user's DeepSpeed JSON
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    path = write_config(tmp_path, GOOD.replace("method: lora", "method: qlora") + f"deepspeed:\n  config: {ds}\n")
    with pytest.raises(UserError, match=r"run.yaml:10: deepspeed.config: ZeRO stage 3 conflicts with method qlora"):
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


def test_the_readme_config_example_validates(tmp_path):
    """The README's annotated config is what users copy first: it must be a legal config of its method."""
    readme = (REPO / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme.yaml"
    path.write_text(example)
    assert config_mod.load(path, check_paths=False).method == "lora"


def test_a_run_saved_by_schema_1_still_loads(tmp_path):
    """The first release wrote default lora/qlora sections into every run's config.yaml: those runs stay readable
    (merge/export), while a user's config with a foreign section is still refused."""
    text = GOOD.replace("method: lora", "schema_version: 1\nmethod: full") + "lora:\n  r: 16\nqlora:\n  quant_type: nf4\n"
    path = write_config(tmp_path, text)
    with pytest.raises(UserError, match="lora: not used by method full"):
        config_mod.load(path)
    upgraded = config_mod.load(path, saved_by_tunekit=True)
    assert upgraded.method == "full" and upgraded.schema_version == config_mod.SCHEMA_VERSION


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_yaml_as_written_loads_back_equal(tmp_path, path):
    """A run writes config.yaml with every default filled in; reading it back (resume, merge, export) must give the
    same config — a rule against a foreign or unused key must not reject what tunekit itself wrote."""
    variants = [config_mod.load(path, check_paths=False)]
    raw = variants[0].model_dump(mode="json")  # the same run with a user DeepSpeed config and an eval file
    raw["deepspeed"] = {"config": {"zero_optimization": {"stage": 2}}}
    raw["data"]["eval_path"] = "eval.jsonl"
    del raw["data"]["eval_fraction"]
    variants.append(config_mod.parse(raw))
    for config in variants:
        saved = tmp_path / "config.yaml"
        saved.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        assert config_mod.load(saved, check_paths=False, saved_by_tunekit=True) == config
