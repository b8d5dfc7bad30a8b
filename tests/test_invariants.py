"""Invariants: setups that must be equivalent give equal results, on the real training path (no magic numbers).

In-process, tiny base, LoRA, fp32, each run through `tunekit.cli.main(["train", ...])` with the trainer that
`tunekit.train.build_trainer` makes recorded as it trains (every micro-batch as collated, the loss each training step
returned, the gradients the optimizer was handed, the trained weights). Three runs over the same 8 examples of
unequal length (one epoch per optimizer step, two steps):
  "8x1"     per_device_train_batch_size 8, gradient_accumulation_steps 1 (one padded batch)
  "1x8"     batch 1, accumulation 8 (no padding; the loss is normalized by the loss tokens of all 8 micro-batches)
  "packed"  data.packing: all 8 examples in one padding-free row with per-example position_ids, batch 1
and then: 8x1 == 1x8 (loss, gradients, weights), packed == 8x1 (the same), and the labels the data pipeline wrote
reach the model unchanged in all three.

Last, 2-process ZeRO-3 through the shipped launcher: a run killed after its checkpoint and resumed ends with the
weights of an uninterrupted run.

Tolerances (fp32; what differs between the setups is only the order of floating-point sums: a padded batch of 8 vs
single rows, one packed row vs 8). Measured on this machine, with the tolerance and why:
  step loss      ~5e-7 absolute   tolerance 1e-5: the loss is ~5 (fp32 epsilon 1.2e-7 relative), a sum of ~200 terms
  gradients      ~2.5e-7 of the largest element   tolerance 1e-5 of it, for the same reason
  weights        8x1 vs 1x8 ~7e-4 x lr, packed ~1e-4 x lr   tolerance 1e-2 x lr: Adam divides each gradient by
                 sqrt(v) + 1e-8, so an element whose gradient is ~1e-8 (here down to 4e-9) turns a 1e-14 rounding
                 difference into a visible one; a real difference moves a weight by ~lr per step
Each comparison also checks that the mistake it guards against would be far outside the tolerance here: a mean per
micro-batch instead of per loss token gives a loss 0.16 away; a packed row with positions running across examples
(attention across examples) 0.6 away.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import tunekit.train
from tunekit.cli import main
from tunekit.data import IGNORE_INDEX

LOSS_TOL = 1e-5  # absolute, on a mean token loss of ~5
GRAD_TOL = 1e-5  # max |difference| / max |gradient element|
LEARNING_RATE = 1e-3
WEIGHT_TOL = 1e-2 * LEARNING_RATE  # max |difference| of a trained weight (see the docstring: Adam near its eps)
STEPS = 2  # the second step runs on weights the first step moved (LoRA B is 0 at init: A's gradient is 0 at step 1)

# 8 alpaca examples whose loss-token counts differ ~10x, so a per-micro-batch mean would weight them very differently.
WORDS = "the cat dog sat on mat and ran to a big red blue house tree sun moon".split()
EXAMPLES = [
    {"instruction": f"Repeat the words{' carefully' * (i % 3)}", "input": " ".join(WORDS[i:i + 2]),
     "output": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + 4 * i))}
    for i in range(8)
]


@dataclass
class Run:
    examples: list[dict]  # the data pipeline's output: input_ids, labels
    batches: list[tuple[int, dict]] = field(default_factory=list)  # (step, collated micro-batch)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, what training_step returned)
    grads: list[dict] = field(default_factory=list)  # per step: name -> gradient handed to the optimizer
    weights: dict = field(default_factory=dict)  # name -> trainable weight after the last step
    naive_packing_loss: float | None = None  # the packed row's loss with positions running across examples
    packed_loss: float | None = None  # the same forward with per-example positions (as trained)

    def step_loss(self, step: int) -> float:
        return sum(loss for s, loss in self.losses if s == step)


def record(run_holder: dict):
    """A build_trainer that records what the trainer does into run_holder["run"]."""
    from transformers import TrainerCallback

    real_build = tunekit.train.build_trainer

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            run_holder["run"].grads.append(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

        def on_train_end(self, args, state, control, model=None, **kwargs):
            run_holder["run"].weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def build(config, args, model, tokenizer, data, *rest, **kwargs):
        trainer = real_build(config, args, model, tokenizer, data, *rest, **kwargs)
        run = run_holder["run"] = Run(examples=data.train.to_list())
        real_step = trainer.training_step

        def training_step(model, inputs, *step_args, **step_kwargs):
            step = trainer.state.global_step
            run.batches.append((step, {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}))
            if step == 0 and "position_ids" in inputs and run.packed_loss is None:
                with torch.no_grad():  # before the update: the model the step's loss is computed with
                    ids, labels, positions = inputs["input_ids"], inputs["labels"], inputs["position_ids"]
                    run.packed_loss = model(input_ids=ids, position_ids=positions, labels=labels).loss.item()
                    naive = torch.arange(ids.shape[1]).unsqueeze(0)
                    run.naive_packing_loss = model(input_ids=ids, position_ids=naive, labels=labels).loss.item()
            loss = real_step(model, inputs, *step_args, **step_kwargs)
            run.losses.append((step, loss.item()))
            return loss

        trainer.training_step = training_step
        trainer.add_callback(Capture())
        return trainer

    return build


SETUPS = {"8x1": (8, 1, False), "1x8": (1, 8, False), "packed": (1, 1, True)}


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("invariants")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in EXAMPLES))
    result = {}
    for name, (batch, accumulation, packing) in SETUPS.items():
        config = {
            "method": "lora",
            "output_dir": str(root / name),
            "model": {"name_or_path": str(tiny_base)},
            # max_seq_len: all 8 examples fit one packed row, so the packed step sees the same examples as the others
            "data": {"sources": [{"path": str(train), "format": "alpaca"}], "eval_fraction": 0, "max_seq_len": 512,
                     "packing": packing, "cache_dir": str(root / "cache")},
            "lora": {"dropout": 0.0},  # dropout masks would be drawn differently for each batch layout
            "training": {"max_steps": STEPS, "per_device_train_batch_size": batch,
                         "gradient_accumulation_steps": accumulation, "learning_rate": LEARNING_RATE,
                         "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "precision": "fp32", "logging_steps": 1},
            "checkpoints": {"save_steps": 1000},
            "eval": {"task_metric": "none", "rank_spectrum": False},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        holder: dict = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tunekit.train, "build_trainer", record(holder))
            assert main(["train", str(path)]) == 0
        result[name] = holder["run"]
    return result


def max_diff(a: dict, b: dict, relative: bool = False) -> float:
    """max |a - b| over every tensor (divided by the largest |a| element when relative)."""
    assert a.keys() == b.keys()
    scale = max(t.abs().max().item() for t in a.values()) if relative else 1.0
    return max((a[k] - b[k]).abs().max().item() for k in a) / scale


def assert_same_training(run: Run, reference: Run) -> dict:
    """Step losses, gradients and final weights equal within the tolerances; returns the measured differences."""
    measured = {
        "loss": max(abs(run.step_loss(s) - reference.step_loss(s)) for s in range(STEPS)),
        "grad": max(max_diff(reference.grads[s], run.grads[s], relative=True) for s in range(STEPS)),
        "weight": max_diff(reference.weights, run.weights),
    }
    assert len(run.grads) == len(reference.grads) == STEPS
    assert measured["loss"] <= LOSS_TOL and measured["grad"] <= GRAD_TOL and measured["weight"] <= WEIGHT_TOL, measured
    print(f"measured: {measured}")
    return measured


def loss_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal LM loss counts: labels shift left by one, so position 0 never counts."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def test_batch_8_equals_batch_1_with_accumulation_8(runs):
    for name, micro_batches, rows in (("8x1", 1, 8), ("1x8", 8, 1)):  # the layouts really differ
        assert [b["input_ids"].shape[0] for _, b in runs[name].batches] == [rows] * micro_batches * STEPS
    assert_same_training(runs["1x8"], runs["8x1"])
    # The test can fail: a mean per micro-batch (instead of over the 8 micro-batches' loss tokens) would give a loss
    # this far from the token mean. Each 1x8 micro-batch returned sum_i / N (N = all 8 examples' loss tokens).
    micro = [(loss, loss_tokens(batch["labels"])) for (_, batch), (_, loss) in zip(runs["1x8"].batches, runs["1x8"].losses)][:8]
    total = sum(n for _, n in micro)
    mean_of_means = sum(loss * total / n for loss, n in micro) / len(micro)
    assert abs(mean_of_means - runs["1x8"].step_loss(0)) > 100 * LOSS_TOL


def test_a_packed_step_equals_the_padded_step(runs):
    packed = runs["packed"]
    # Each step is one row holding all 8 examples: the same examples as the padded step.
    assert len(packed.batches) == STEPS and all(b["input_ids"].shape[0] == 1 for _, b in packed.batches)
    assert [int((b["position_ids"] == 0).sum()) for _, b in packed.batches] == [len(EXAMPLES)] * STEPS
    assert_same_training(packed, runs["8x1"])
    # The test can fail: the same packed row with positions running on across examples (naive concatenation, or
    # attention across examples) gives another loss.
    assert abs(packed.naive_packing_loss - packed.packed_loss) > 100 * LOSS_TOL
    assert abs(packed.packed_loss - packed.step_loss(0)) <= LOSS_TOL


def example_pieces(batch: dict, pad_id: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example in a collated micro-batch, checking what surrounds them: padding carries
    label -100 and attention 0; a padding-free row restarts position_ids at 0 for each example."""
    pieces = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        if "position_ids" in batch:  # packed: one row, examples back to back
            positions = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for start, end in zip(starts, starts[1:]):
                assert positions[start:end] == list(range(end - start))
                pieces.append((ids[start:end], labels[start:end]))
        else:
            length = int(batch["attention_mask"][row].sum())
            assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (len(ids) - length)
            assert set(ids[length:]) <= {pad_id} and set(labels[length:]) <= {IGNORE_INDEX}
            pieces.append((ids[:length], labels[:length]))
    return pieces


@pytest.mark.parametrize("name", list(SETUPS))
def test_labels_from_the_data_pipeline_reach_the_model_unchanged(runs, name, tiny_base):
    from transformers import AutoTokenizer

    run = runs[name]
    pad_id = AutoTokenizer.from_pretrained(tiny_base).pad_token_id
    written = sorted((e["input_ids"], e["labels"]) for e in run.examples)
    # Completion-only masks are in what the pipeline wrote: every prompt (bos + instruction) carries -100.
    assert all(labels[:8] == [IGNORE_INDEX] * 8 and set(labels) != {IGNORE_INDEX} for _, labels in written)
    for step in range(STEPS):  # each step is one epoch: every example exactly once, labels aligned with input_ids
        seen = [piece for s, batch in run.batches if s == step for piece in example_pieces(batch, pad_id)]
        assert sorted(seen) == written


# ---------------------------------------------------------------- resume under 2-process ZeRO-3

ZERO3_STEPS, ZERO3_SAVE = 4, 2  # killed after step 3: step 3 is lost, the resume restarts from checkpoint-2
# Runs `tunekit ARGS...` in every rank, but at the end of step STEP writes FLAG_DIR/rank<N> (its pid) and stalls,
# as a job stalls before a node dies: the test then SIGKILLs every rank. Patched on transformers' CallbackHandler, so
# it needs nothing from tunekit's internals.
STALL_WRAPPER = """
import os, sys, time
from pathlib import Path
from transformers.trainer_callback import CallbackHandler
from tunekit.cli import main

step, flags = int(sys.argv[1]), Path(sys.argv[2])
on_step_end = CallbackHandler.on_step_end

def stall_at_step(self, args, state, control, **kwargs):
    if state.global_step == step:
        (flags / f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
        time.sleep(600)
    return on_step_end(self, args, state, control, **kwargs)

CallbackHandler.on_step_end = stall_at_step
sys.exit(main(sys.argv[3:]))
"""


def zero3_args(tiny_base, demo_data, cache: Path, out: Path, script: list[str]) -> list[str]:
    """What follows `accelerate launch --config_file configs/accelerate/cpu-2proc-zero3.yaml`: SCRIPT (`-m tunekit`, or
    a wrapper) `train configs/tiny-full-zero3.yaml`, pointed at the fixtures: no eval, no generation metric, a
    checkpoint every ZERO3_SAVE steps."""
    overrides = {"model.name_or_path": tiny_base, "data.sources.0.path": demo_data["train"], "data.eval_path": "null",
                 "data.eval_fraction": 0, "data.cache_dir": cache, "output_dir": out,
                 "training.max_steps": ZERO3_STEPS, "checkpoints.save_steps": ZERO3_SAVE, "training.logging_steps": 1,
                 "eval.task_metric": "none", "eval.general": "null"}
    return [*script, "train", "configs/tiny-full-zero3.yaml", *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]


@pytest.mark.slow
def test_resume_under_two_process_zero3_ends_equal_to_an_uninterrupted_run(tmp_path, tiny_base, demo_data):
    from safetensors.torch import load_file
    from test_backends_full import ACCELERATE, REPO, launch, launch_env

    cache, flags, wrapper = tmp_path / "cache", tmp_path / "flags", tmp_path / "stall.py"
    flags.mkdir()
    wrapper.write_text(STALL_WRAPPER)

    def start(name: str, script: list[str]) -> subprocess.Popen:
        command = [str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu-2proc-zero3.yaml",
                   *zero3_args(tiny_base, demo_data, cache, tmp_path / name, script)]
        log = open(tmp_path / f"{name}.log", "w")  # a file, not a pipe nobody reads while we wait (it would fill)
        return subprocess.Popen(command, cwd=REPO, env=launch_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)

    def log_tail(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-4000:]

    # Started together (their start-ups overlap): the uninterrupted reference, and the run that will be killed.
    reference = start("reference", ["-m", "tunekit"])
    killed = start("killed", [str(wrapper), str(ZERO3_SAVE + 1), str(flags)])
    try:
        deadline = time.time() + 300
        while len(list(flags.glob("rank*"))) < 2:
            assert killed.poll() is None and time.time() < deadline, f"no stall:\n{log_tail('killed')}"
            time.sleep(0.1)
        time.sleep(0.2)  # both pids written
        for flag in flags.glob("rank*"):  # every rank dies at once, mid-run, with step 3 done and not saved
            os.kill(int(flag.read_text()), signal.SIGKILL)
        assert killed.wait(timeout=120) != 0
        assert reference.wait(timeout=600) == 0, log_tail("reference")
    finally:
        for process in (reference, killed):
            if process.poll() is None:
                process.kill()
                process.wait()
        for flag in flags.glob("rank*"):
            try:
                os.kill(int(flag.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    run = tmp_path / "killed"
    assert (run / f"checkpoint-{ZERO3_SAVE}").is_dir() and not (run / "final").exists()
    resumed = launch(tmp_path, zero3_args(tiny_base, demo_data, cache, run, ["-m", "tunekit"]) + ["--resume"])
    assert f"resume verified: step {ZERO3_SAVE}" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == ZERO3_STEPS

    # Same data order, RNG, scheduler and fp32 master weights: the same sums in the same order on the same 2 ranks,
    # so the weights are equal bit for bit (tolerance 0: any drift means some state was lost or not restored).
    final = load_file(run / "final" / "model.safetensors")
    expected = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    base = load_file(Path(tiny_base) / "model.safetensors")
    assert final.keys() == expected.keys()
    diff = max((final[k] - expected[k]).abs().max().item() for k in final)
    moved = max((expected[k] - base[k]).abs().max().item() for k in expected)
    print(f"max |resumed - uninterrupted| = {diff:.3g}; training moved weights by up to {moved:.3g}")
    assert diff == 0.0 and moved > 0

