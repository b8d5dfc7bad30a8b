"""Packing (best-fit, per-example attention) vs padded batches on a dataset with skewed lengths.

    python scripts/bench_packing.py [--repeats 3] [--threads 1] [--workdir DIR]

The dataset: 80% short examples (the demo task, ~38 tokens) and 20% long ones (a few paragraphs of the base's
general text, ~130-230 tokens), alpaca format, max_seq_len 256. LoRA (configs/tiny-lora.yaml's settings) with
`data.packing` off, then on. Padded batches hold 16 examples and are padded to their longest; packed rows hold 256
tokens, and the packed batch has as many rows as make ~16 examples per step. Both make the same number of optimizer
steps (as many as one epoch of the shorter of the two allows), so they see about the same examples and only the
layout differs.

Reported: real (non-pad) tokens per second (goal: packed >= 1.5x padded), and the held-out loss of both trained
adapters, computed the same way for both (token-weighted mean over completion tokens, padded batches) next to the
base model's loss and the seed-to-seed spread. A forward-pass check on the same eval set shows packing has no
cross-example attention: one packed row with per-example position_ids gives the padded loss; the same row with
continuous positions (naive concatenation) does not.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

from bench_common import (
    PYTHON, TINY_BASE, TUNEKIT_LEAN, Section, child_env, fmt, main_for, median, progress, ratio, run_child,
    spread, table, tunekit_cmd,
)

CONFIG = "configs/tiny-lora.yaml"
MAX_SEQ_LEN = 256
N_TRAIN, N_EVAL = 200, 48
LONG_SHARE = 0.2
PADDED_BATCH = 16  # examples per padded batch (configs/tiny-lora.yaml's batch)
SEEDS = (42, 43, 44)
DEFAULT_REPEATS = 3


def skewed_examples(n: int, seed: int) -> list[dict]:
    """`n` alpaca records: LONG_SHARE long general-text ones (3-5 paragraphs), the rest short demo-task ones."""
    from tunekit import tiny

    rng = random.Random(f"skew-{seed}")
    short = tiny.demo_examples(n, seed=seed)
    corpus = tiny.generate_corpus(400 * n, seed=seed + 1)
    records = []
    for i in range(n):
        if rng.random() < LONG_SHARE:
            text = " ".join(rng.sample(corpus, rng.randint(3, 5)))
            records.append({"instruction": "Write a short story.", "input": "", "output": text})
        else:
            records.append(short[i])
    return records


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run_section(workdir: Path, repeats: int, threads: int) -> Section:
    train_path = write_jsonl(workdir / "skew_train.jsonl", skewed_examples(N_TRAIN, seed=1))
    eval_path = write_jsonl(workdir / "skew_eval.jsonl", skewed_examples(N_EVAL, seed=2))
    env = child_env(threads)
    # Both runs make the same number of optimizer steps of ~PADDED_BATCH examples each: with a dozen steps the
    # held-out loss follows the number of updates (13 vs 12 steps moves it by ~0.01-0.03), which would hide what
    # packing itself does. Rows a best-fit packing fills ~completely: total tokens / MAX_SEQ_LEN.
    progress("packing: token count of the training set")
    counted = run_child([PYTHON, __file__, "--count-child", train_path], env, workdir / "count.log")
    total_tokens = json.loads(counted.log_path.read_text().split("COUNT_RESULT")[-1].strip().splitlines()[0])["tokens"]
    rows = total_tokens / MAX_SEQ_LEN
    packed_batch = max(1, round(PADDED_BATCH * rows / N_TRAIN))
    n_steps = min(math.ceil(N_TRAIN / PADDED_BATCH), math.floor(rows / packed_batch))  # no run starts a 2nd epoch
    base = [*TUNEKIT_LEAN, f"data.sources=[{{path: {train_path}, format: alpaca}}]", f"data.max_seq_len={MAX_SEQ_LEN}",
            f"training.max_steps={n_steps}", "training.logging_steps=4"]
    runs: dict[str, list] = {"padded": [], "packed": []}
    for i in range(repeats):
        seed = SEEDS[i % len(SEEDS)] + (i // len(SEEDS)) * 100
        for variant in ("padded", "packed"):
            batch = PADDED_BATCH if variant == "padded" else packed_batch
            out = workdir / f"{variant}-{i}"
            progress(f"packing: {variant} run {i + 1}/{repeats} (seed {seed}, batch {batch}, {n_steps} steps)")
            overrides = [*base, f"data.packing={str(variant == 'packed').lower()}", f"training.seed={seed}",
                         f"training.per_device_train_batch_size={batch}", f"output_dir={out}"]
            run = run_child(tunekit_cmd(CONFIG, overrides), env, workdir / f"{variant}-{i}.log")
            runs[variant].append((run, json.loads((out / "summary.json").read_text()), out / "final"))

    progress("packing: held-out loss of every adapter, and the cross-example attention check")
    adapters = {f"{variant}-{i}": str(final) for variant, items in runs.items() for i, (_, _, final) in enumerate(items)}
    spec = workdir / "eval_spec.json"
    packed_overrides = [*base, "data.packing=true", f"training.per_device_train_batch_size={packed_batch}",
                        f"output_dir={workdir / 'trainer-batch-check'}"]
    spec.write_text(json.dumps({"base": TINY_BASE, "eval_path": eval_path, "max_seq_len": MAX_SEQ_LEN,
                                "adapters": adapters, "leak_check": adapters["packed-0"], "config": CONFIG,
                                "packed_overrides": packed_overrides}))
    child = run_child([PYTHON, __file__, "--eval-child", str(spec)], env, workdir / "eval.log")
    losses = json.loads(child.log_path.read_text().split("EVAL_RESULT")[-1].strip().splitlines()[0])

    def per_run(variant: str, get) -> list:
        return [get(run, summary) for run, summary, _ in runs[variant]]

    tps = {v: per_run(v, lambda r, s: r.tokens_per_s()) for v in runs}
    steady = {v: per_run(v, lambda r, s: r.steady_tokens_per_s()) for v in runs}
    steps = {v: per_run(v, lambda r, s: s["steps"]) for v in runs}
    tokens = {v: per_run(v, lambda r, s: s["tokens_seen"]) for v in runs}
    runtime = {v: per_run(v, lambda r, s: r.final().get("train_runtime")) for v in runs}
    held_out = {v: [losses["adapters"][f"{v}-{i}"] for i in range(repeats)] for v in runs}
    pair = lambda a, b: [ratio(x, y) for x, y in zip(a, b)]  # noqa: E731
    speedup = median(pair(tps["packed"], tps["padded"]))
    padded_slots = PADDED_BATCH * MAX_SEQ_LEN
    rows = [
        ["batch (examples or rows per step)", f"{PADDED_BATCH} examples", f"{packed_batch} rows of {MAX_SEQ_LEN}", "", ""],
        ["optimizer steps", median(steps["padded"]), median(steps["packed"]), "", ""],
        ["real tokens trained", median(tokens["padded"]), median(tokens["packed"]), "", ""],
        ["train_runtime (s)", median(runtime["padded"]), median(runtime["packed"]),
         median(pair(runtime["packed"], runtime["padded"])), spread(pair(runtime["packed"], runtime["padded"]))],
        ["real tokens/s, whole run", median(tps["padded"]), median(tps["packed"]), speedup,
         spread(pair(tps["packed"], tps["padded"]))],
        ["real tokens/s, steady state", median(steady["padded"]), median(steady["packed"]),
         median(pair(steady["packed"], steady["padded"])), spread(pair(steady["packed"], steady["padded"]))],
        ["held-out loss after training", median(held_out["padded"]), median(held_out["packed"]), "", ""],
    ]
    diffs = [b - a for a, b in zip(held_out["padded"], held_out["packed"])]  # packed - padded, same seed
    seed_spread = {v: max(x) - min(x) for v, x in held_out.items()}
    leak, batch_check = losses["leak_check"], losses["trainer_batch"]
    body = "\n".join([
        f"{N_TRAIN} training examples ({LONG_SHARE:.0%} long), max_seq_len {MAX_SEQ_LEN}, {n_steps} LoRA steps "
        f"(at most one epoch), "
        f"{repeats} seeds ({', '.join(str(SEEDS[i % len(SEEDS)]) for i in range(repeats))}), medians; ratios are "
        f"packed / padded over runs with the same seed. Held-out set: {N_EVAL} examples of the same mix. "
        f"Padded batch capacity {padded_slots} token slots; packed {packed_batch * MAX_SEQ_LEN}.",
        "",
        table(["", "padded", "packed", "packed / padded", "range of paired ratios"], rows),
        "",
        f"- speed-up goal (packed ≥ 1.5× padded real tokens/s): {fmt(speedup)}× — "
        + ("met" if speedup and speedup >= 1.5 else "NOT met"),
        f"- held-out loss (completion tokens): base model {fmt(losses['base'], 4)}; after training padded "
        f"{', '.join(f'{x:.4f}' for x in held_out['padded'])} and packed "
        f"{', '.join(f'{x:.4f}' for x in held_out['packed'])} (seeds in order). Packed − padded, same seed: "
        f"{', '.join(f'{d:+.4f}' for d in diffs)} (median {median(diffs):+.4f}); seed-to-seed spread "
        f"padded {seed_spread['padded']:.4f}, packed {seed_spread['packed']:.4f}; training moved the loss by "
        f"{losses['base'] - median(held_out['padded']):.3f}.",
        f"- cross-example attention check (trained packed adapter, {leak['examples']} held-out examples in one row): "
        f"padded-batch loss {leak['padded']:.6f}, packed row with per-example positions {leak['packed']:.6f} "
        f"(|Δ| {abs(leak['packed'] - leak['padded']):.1e}), naive concatenation {leak['concatenated']:.6f} "
        f"(|Δ| {abs(leak['concatenated'] - leak['padded']):.1e}): "
        + ("no leakage" if abs(leak["packed"] - leak["padded"]) < 1e-4 else "LEAKAGE") + ".",
        f"- the same in the Trainer's own packed batch (TRL's padding-free collator, {batch_check['examples']} "
        f"examples in one row of {batch_check['tokens']} tokens): loss as trained {batch_check['packed']:.6f}, "
        f"examples run one at a time {batch_check['separate']:.6f} (|Δ| "
        f"{abs(batch_check['packed'] - batch_check['separate']):.1e}).",
    ])
    return Section("Packing vs padded batches (skewed lengths)", body)


# ---------------------------------------------------------------- the eval child (torch is imported only here)


def eval_child(spec_path: str) -> int:
    """Print EVAL_RESULT {json}: held-out loss of the base and of every adapter, and the leakage check."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.data import IGNORE_INDEX, read_rows, segments, tokenize

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    # The same tokens and loss mask the training pipeline makes.
    examples = [tokenize(segments(row, "alpaca", tokenizer), tokenizer, spec["max_seq_len"], True)
                for row in read_rows(spec["eval_path"], "alpaca")]

    def load(adapter: str | None):
        model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter) if adapter else model
        return model.eval()

    def nll_sum(logits, labels) -> tuple[float, int]:
        """Summed next-token NLL over labelled positions; logits [T, V], labels [T] (shifted here)."""
        logits, labels = logits[:-1], labels[1:]
        keep = labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[keep].double(), labels[keep], reduction="sum")
        return loss.item(), int(keep.sum())

    @torch.no_grad()
    def padded_loss(model, batch_size: int = 8) -> float:
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (width - len(e["input_ids"])) for e in chunk])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk])
            labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits
            for row in range(len(chunk)):
                s, n = nll_sum(logits[row], labels[row])
                total, count = total + s, count + n
        return total / count

    @torch.no_grad()
    def row_loss(model, restart_positions: bool) -> float:
        """All examples in one row, as padding-free packing feeds them: per-example position_ids, no mask."""
        ids = torch.tensor([[t for e in examples for t in e["input_ids"]]])
        labels = torch.tensor([t for e in examples for t in e["labels"]])  # each example starts with bos (-100)
        if restart_positions:
            positions = torch.tensor([[p for e in examples for p in range(len(e["input_ids"]))]])
        else:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
        logits = model(input_ids=ids, position_ids=positions).logits[0]
        s, n = nll_sum(logits, labels)
        return s / n

    result = {"base": padded_loss(load(None)), "adapters": {}}
    for name, adapter in spec["adapters"].items():
        result["adapters"][name] = padded_loss(load(adapter))
    model = load(spec["leak_check"])
    model.config.use_cache = False  # as in training: packed rows get per-example attention only without a cache
    # Enough examples that the concatenation fits the base's positions (512).
    limit = max_positions = model.config.max_position_embeddings
    kept, used = [], 0
    for e in examples:
        if used + len(e["input_ids"]) > limit:
            break
        kept.append(e)
        used += len(e["input_ids"])
    examples[:] = kept
    result["leak_check"] = {"examples": len(kept), "padded": padded_loss(model),
                            "packed": row_loss(model, restart_positions=True),
                            "concatenated": row_loss(model, restart_positions=False), "max_positions": max_positions}
    result["trainer_batch"] = trainer_batch_check(model, spec["config"], spec["packed_overrides"], nll_sum)
    print("EVAL_RESULT " + json.dumps(result))
    return 0


def trainer_batch_check(model, config_path: str, overrides: list[str], nll_sum) -> dict:
    """The first batch the packed run's Trainer trains on (TRL's padding-free collator: one flattened row with
    position_ids): its loss from model(**batch), as in training, vs the same examples run one at a time."""
    import torch

    from tunekit.backends.common import load_tokenizer, training_arguments
    from tunekit.config import load
    from tunekit.data import prepare_data
    from tunekit.train import build_trainer

    config = load(config_path, overrides)
    tokenizer = load_tokenizer(config)
    trainer = build_trainer(config, training_arguments(config), model, tokenizer, prepare_data(config, tokenizer))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        packed = model(**batch).loss.item()  # mean over the batch's label tokens
        ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        total, count = 0.0, 0
        for start, end in zip(starts[:-1], starts[1:]):
            s, n = nll_sum(model(input_ids=ids[start:end].unsqueeze(0)).logits[0], labels[start:end])
            total, count = total + s, count + n
    return {"examples": len(starts) - 1, "tokens": len(positions), "packed": packed, "separate": total / count}


def count_child(train_path: str) -> int:
    """Print COUNT_RESULT {"tokens": N}: the training set's tokens as the pipeline makes them (bos, eos, truncation)."""
    from transformers import AutoTokenizer

    from tunekit.data import read_rows, segments, tokenize

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    tokens = sum(len(tokenize(segments(row, "alpaca", tokenizer), tokenizer, MAX_SEQ_LEN, True)["input_ids"])
                 for row in read_rows(train_path, "alpaca"))
    print("COUNT_RESULT " + json.dumps({"tokens": tokens}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--count-child"]:
        return count_child(argv[1])
    if argv[:1] == ["--eval-child"]:
        return eval_child(argv[1])
    return main_for(run_section, __doc__.splitlines()[0], DEFAULT_REPEATS, argv)


if __name__ == "__main__":
    sys.exit(main())
