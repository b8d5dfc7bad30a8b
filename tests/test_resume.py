"""Checkpoints on real tiny LoRA runs: retention from the run's own log, kill-and-resume, a crash during a save.

One uninterrupted reference run (8 steps, a checkpoint every 2, eval at each) is compared with:
  * a run SIGKILLed mid-training after checkpoint-4 (stalled inside step 5, so the kill point is deterministic),
    then `--resume`d: its final adapter must equal the reference's exactly;
  * a run SIGKILLed inside the save of checkpoint-6 (after the weights and optimizer, before the RNG state, trainer
    state and marker): resume must ignore checkpoint-6, continue from checkpoint-4, and also end equal.
The killed runs are subprocesses (`python -c WRAPPER`), started together; the rest runs in-process via `cli.main`.
"""

import json
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from tunekit.checkpoints import MARKER_NAME, latest_complete_checkpoint, retained_checkpoints
from tunekit.cli import main

MAX_STEPS, SAVE_STEPS, TOP_K, LAST_N = 8, 2, 2, 1

# Runs `tunekit train ARGS...` but stalls (after touching FLAG) at STEP: inside the Trainer's save ("save": after the
# weights and optimizer, before the RNG state and trainer_state.json) or at the end of a training step ("step").
WRAPPER = """
import sys, time
from pathlib import Path
import transformers
import tunekit.train
from tunekit.cli import main

where, step, flag = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

def stall():
    flag.write_text("stalled")
    time.sleep(600)

if where == "save":
    original = transformers.Trainer._save_rng_state
    def slow_save(self, output_dir):
        if self.state.global_step == step:
            stall()
        return original(self, output_dir)
    transformers.Trainer._save_rng_state = slow_save
else:
    class Stall(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                stall()
    build = tunekit.train.build_callbacks
    tunekit.train.build_callbacks = lambda *a, **k: build(*a, **k) + [Stall()]
sys.exit(main(["train", *sys.argv[4:]]))
"""


def build_fallback_tiny(root: Path) -> tuple[Path, Path]:
    """A random-init 2-layer Llama, a byte-level BPE tokenizer and 400 Alpaca rows (when no tiny_base fixture)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = torch.Generator().manual_seed(0)
    words = "the cat dog sat on mat and ran to a big red blue house tree sun moon".split()

    def phrase(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=rng).tolist())

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([phrase(12) for _ in range(500)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|pad|>", "<|begin|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
                                        pad_token="<|pad|>")
    base = root / "base"
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                                 eos_token_id=2, pad_token_id=0)).save_pretrained(base)
    train = root / "train.jsonl"
    rows = [{"instruction": "Repeat: " + (p := phrase(4)), "input": "", "output": p} for _ in range(400)]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return base, train


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    """(base model dir, alpaca train file): the suite's tiny_base/demo_data fixtures when conftest has them."""
    try:
        base = request.getfixturevalue("tiny_base")
        data = request.getfixturevalue("demo_data")
        return Path(base), Path(data["train"])
    except pytest.FixtureLookupError:
        return build_fallback_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def make_config(tiny, tmp_path_factory):
    """make_config(name) -> path of a run config writing to a fresh output_dir `name` (same data cache for all)."""
    root = tmp_path_factory.mktemp("runs")
    base, train = tiny

    def make(name: str, **checkpoints) -> Path:
        config = {
            "method": "lora",
            "output_dir": str(root / name),
            "model": {"name_or_path": str(base)},
            "data": {"sources": [{"path": str(train), "format": "alpaca", "max_examples": 200}],
                     "eval_fraction": 0.1, "max_seq_len": 64, "cache_dir": str(root / "cache")},
            # a high LR so that eval losses move; lora dropout (default 0.05) makes the RNG state matter
            "training": {"max_steps": MAX_STEPS, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 20,
                         "logging_steps": 1, "learning_rate": 3e-3},
            "checkpoints": {"save_steps": SAVE_STEPS, "keep_top_k": TOP_K, "keep_last_n": LAST_N, **checkpoints},
            "eval": {"task_metric": "none", "rank_spectrum": False},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make


@pytest.fixture(scope="module")
def killed_runs(make_config, tmp_path_factory):
    """name -> run stalled (then SIGKILLed by `kill_when_stalled`): "killed" at the end of step 5, "crashed"
    inside the save of checkpoint-6. Started together, before the reference run, so that their start-ups overlap."""
    flags = tmp_path_factory.mktemp("flags")
    runs = {}
    for name, (where, step) in {"killed": ("step", 5), "crashed": ("save", 6)}.items():
        config, flag = make_config(name), flags / name
        process = subprocess.Popen([sys.executable, "-c", WRAPPER, where, str(step), str(flag), str(config)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[name] = (config, process, flag)
    yield runs
    for _, process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def reference(make_config, killed_runs):
    """The uninterrupted run's output_dir."""
    config = make_config("reference")
    assert main(["train", str(config)]) == 0
    return output_dir(config)


def kill_when_stalled(run: tuple) -> Path:
    """Wait until the subprocess stalls at its kill point, SIGKILL it; returns its config."""
    config, process, flag = run
    deadline = time.time() + 300
    while not flag.exists():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the run ended before its kill point:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    return config


def output_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["output_dir"])


def final_adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def rule_from_log(run: Path) -> set[str]:
    """The checkpoint names the retention rule keeps, computed from the run's own log history."""
    history = json.loads((run / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    saves = range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)
    eval_loss = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    assert set(eval_loss) == set(saves)  # eval runs at every save
    keep = retained_checkpoints([(step, eval_loss[step]) for step in saves], TOP_K, LAST_N, False)
    return {f"checkpoint-{step}" for step in keep}


def surviving(run: Path) -> set[str]:
    return {path.name for path in run.glob("checkpoint-*")}


def test_surviving_checkpoints_follow_the_rule_on_the_runs_own_log(reference):
    assert surviving(reference) == rule_from_log(reference)
    for name in surviving(reference):
        assert (reference / name / MARKER_NAME).is_file()
    summary = json.loads((reference / "summary.json").read_text())
    assert {Path(p).name for p in summary["kept_checkpoints"]} == rule_from_log(reference)
    history = json.loads((reference / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    best = min((e["eval_loss"], e["step"]) for e in history if "eval_loss" in e and e["step"] % SAVE_STEPS == 0)
    assert Path(summary["best_checkpoint"]).name == f"checkpoint-{best[1]}"


def test_killed_run_resumes_to_the_same_final_weights(reference, killed_runs, capsys):
    config = kill_when_stalled(killed_runs["killed"])  # step 5 done in memory, never saved
    run = output_dir(config)
    assert not (run / "final").exists()
    assert latest_complete_checkpoint(run) == run / "checkpoint-4"

    assert main(["train", str(config), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume verified: step 4, lr " in out and "weights+optimizer ok, rng ok, next batch ok (4x" in out
    assert max_abs_diff(final_adapter(run), final_adapter(reference)) == 0.0
    assert surviving(run) == rule_from_log(run) == surviving(reference)

    # Resuming the finished run would make the Trainer train one step past max_steps: refused instead.
    assert main(["train", str(config), "--resume"]) == 2
    assert f"checkpoint-{MAX_STEPS} is at step {MAX_STEPS}, the run's last step" in capsys.readouterr().err


def test_crash_during_a_save_is_never_resumed_from(reference, killed_runs, capsys):
    from transformers.trainer_utils import get_last_checkpoint

    config = kill_when_stalled(killed_runs["crashed"])  # inside the save of checkpoint-6
    run = output_dir(config)
    broken = run / "checkpoint-6"
    assert (broken / "adapter_model.safetensors").is_file() and not (broken / MARKER_NAME).exists()
    assert get_last_checkpoint(str(run)) == str(broken)  # what the Trainer alone would have resumed from
    assert latest_complete_checkpoint(run) == run / "checkpoint-4"

    assert main(["train", str(config), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"removing incomplete checkpoint {broken}" in captured.err
    assert "resume verified: step 4, lr " in captured.out
    assert max_abs_diff(final_adapter(run), final_adapter(reference)) == 0.0
    assert (run / "checkpoint-6").exists() == (reference / "checkpoint-6").exists()
    assert surviving(run) == rule_from_log(run)


def test_resume_fails_loudly_when_the_data_order_changed(reference, make_config, capsys):
    """A reference checkpoint resumed with another seed (data_seed follows it): not the recorded next batch."""
    import shutil

    config = make_config("reshuffled")
    run = output_dir(config)
    step = min(int(name.split("-")[1]) for name in surviving(reference))
    assert step < MAX_STEPS
    shutil.copytree(reference / f"checkpoint-{step}", run / f"checkpoint-{step}")
    shutil.copy(reference / "config.yaml", run / "config.yaml")  # a run directory: --resume refuses anything else
    assert main(["train", str(config), "--resume", "--set", "training.seed=7"]) == 2
    err = capsys.readouterr().err
    assert f"error: resume check failed (checkpoint-{step}): the next batch differs" in err


def test_full_disk_stops_before_the_save_with_a_clear_error(make_config, monkeypatch, capsys):
    import shutil

    config = make_config("full-disk")
    run = output_dir(config)
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        return usage(10**9, 10**9 - 500, 500) if str(path).startswith(str(run)) else real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    assert main(["train", str(config), "--set", "training.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "error: step 2: not enough disk space for the next checkpoint" in err and "only 500 B free" in err
    assert not list(run.glob("checkpoint-*"))
