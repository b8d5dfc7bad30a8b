"""tunekit vs the plain TRL script and a bare PyTorch loop on the 27M model, LoRA and full fine-tuning.

    [BENCH_SCALE_STEPS=16] python scripts/bench_scale.py [--repeats 3] [--threads 1] [--workdir DIR]

The model is bench_flops.py's random-init ~27M-parameter Llama (the tiny base's tokenizer), built once per section
by bench_flops' own build child. Both methods train the demo alpaca data at batch 8, max_length 128, fp32, one
process, completion-only loss, no eval, for STEPS steps: LoRA with configs/tiny-lora.yaml's settings (r 16, alpha 32,
all linear projections, lr 2e-3 cosine), full with configs/tiny-full-zero3.yaml's (lr 3e-4 cosine) and
deepspeed.stage auto (one process: the plain Trainer). Three variants per method, alternating run by run:
  tunekit     `tunekit train` with its extras off (bench_common.TUNEKIT_LEAN)
  plain TRL   scripts/plain_trl_sft.py with the same settings (bench_trl.plain_args / bench_full.plain_args)
  bare loop   the batches tunekit trains (its tokens, loss mask and order: tunekit.prepare and the Trainer's seeded
              sampler), padded to the batch's longest, through model(input_ids, attention_mask, labels) with HF's
              own loss, backward, clip_grad_norm_(max_grad_norm), AdamW and lr scheduler step, zero_grad; LoRA: the
              model wrapped by peft get_peft_model with the same LoraConfig, AdamW over the adapter weights. No
              Trainer, no logging: what PyTorch itself reaches on these batches.
Tokens/s are non-pad tokens per second in the steady state (step 1 left out); ratios are medians over the runs made
back to back. Goals (issue 14): tunekit >= 1.0x plain TRL, >= 0.85x the bare loop; wall time and peak RSS <= plain.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bench_flops
import bench_full
import bench_trl
from bench_common import (
    PYTHON, ROOT, TINY_BASE, TUNEKIT_LEAN, Section, child_env, fmt, goal, json_child, main_for, median, progress,
    ratio, run_child, spread, table, tunekit_cmd,
)

STEPS = int(os.environ.get("BENCH_SCALE_STEPS", 16))  # ~0.6 s a step on one core; fewer for a quick check
BATCH = 8
DEFAULT_REPEATS = 3
# method -> (config, plain_trl_sft.py flags from a loaded config, tunekit overrides of its own)
METHODS = {
    "LoRA": ("configs/tiny-lora.yaml", bench_trl.plain_args, []),
    "full": ("configs/tiny-full-zero3.yaml", bench_full.plain_args, ["deepspeed.stage=auto"]),
}
VARIANTS = ("tunekit", "plain", "bare")


# ---------------------------------------------------------------- the bare loop (a child: torch is imported only here)


def bare_loop_child(config_path: str, overrides: list[str]) -> dict:
    """Steady-state non-pad tokens/s of a hand-written loop over the batches the tunekit run of `config_path` +
    `overrides` trains (step 1 left out); also the per-step seconds, the tokens trained and the per-step losses."""
    import math
    import time

    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    from tunekit.backends.common import load_tokenizer
    from tunekit.config import load
    from tunekit.data import IGNORE_INDEX
    from tunekit.prepare import prepare_data

    config = load(ROOT / config_path, overrides)
    t = config.training
    tokenizer = load_tokenizer(config)
    train = prepare_data(config, tokenizer, log=lambda *_: None).train  # tunekit's tokens and masks (its cache)
    # The Trainer's order: accelerate's SeedableRandomSampler draws torch.randperm with a generator seeded data_seed,
    # which tunekit sets to training.seed.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(t.seed)).tolist()
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(config.model.name_or_path, dtype=torch.float32)
    model.config.use_cache = False
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
            target_modules="all-linear" if lora.all_linear else lora.target_modules))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=t.weight_decay)
    # The Trainer's schedule (warmup: ceil(ratio x steps), TrainingArguments.get_warmup_steps), so losses compare.
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
                              num_training_steps=t.max_steps)
    batch_size = t.per_device_train_batch_size
    seconds, tokens, losses = [], [], []
    for step in range(t.max_steps):
        started = time.perf_counter()
        rows = train[order[step * batch_size:(step + 1) * batch_size]]  # {"input_ids": [[...]], "labels": [[...]]}
        width = max(len(ids) for ids in rows["input_ids"])  # padded to the batch's longest, on the right
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in rows["input_ids"]])
        labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in rows["labels"]])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows["input_ids"]])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - started)
        tokens.append(int(attention_mask.sum()))
    return {"tokens_per_s": sum(tokens[1:]) / sum(seconds[1:]), "tokens": sum(tokens), "step_s": seconds,
            "losses": losses}


CHILDREN = {"loop": lambda a: bare_loop_child(a[0], a[1:])}


# ---------------------------------------------------------------- the section


def run_section(workdir: Path, repeats: int, threads: int) -> Section:
    from tunekit.config import load

    progress("scale: building the 27M model")
    model_dir = workdir / "scale-model"
    built = json_child(bench_flops.__file__, "build", [str(model_dir), f"{TINY_BASE}/general_eval.jsonl"],
                       child_env(threads), workdir / "build.log")
    shared = [
        *TUNEKIT_LEAN, f"model.name_or_path={model_dir}", f"training.per_device_train_batch_size={BATCH}",
        f"training.max_steps={STEPS}", f"training.logging_steps={STEPS}",  # logs step 1 and the last: no syncs between
    ]
    env = child_env(threads)
    configs = {method: load(ROOT / path, [*shared, *own]) for method, (path, _, own) in METHODS.items()}
    for config in configs.values():
        t = config.training
        assert config.data.sources[0].format == "alpaca" and len(config.data.sources) == 1, "plain reads alpaca"
        assert t.gradient_accumulation_steps == 1 and t.optim == "adamw_torch" and not t.gradient_checkpointing
        assert config.data.max_seq_len == 128 and not config.data.packing
    runs = {(method, name): [] for method in METHODS for name in VARIANTS}  # dicts of one run's numbers
    for i in range(repeats):
        for method, (config_path, plain_args, own) in METHODS.items():
            overrides, config = [*shared, *own], configs[method]
            for name in VARIANTS:
                out, log = workdir / f"{method}-{name}-{i}", workdir / f"{method}-{name}-{i}.log"
                progress(f"scale: {method} {name} run {i + 1}/{repeats}")
                if name == "bare":
                    loop = json_child(__file__, "loop", [config_path, *overrides], env, log)
                    # The Trainer's last log line (logging_steps = STEPS) holds the mean loss of steps 2..STEPS.
                    losses = loop["losses"][1:]
                    runs[method, name].append({"tokens_per_s": loop["tokens_per_s"], "tokens": loop["tokens"],
                                               "loss": sum(losses) / len(losses)})
                    continue
                cmd = (tunekit_cmd(config_path, [*overrides, f"output_dir={out}"]) if name == "tunekit" else
                       [PYTHON, "scripts/plain_trl_sft.py", *plain_args(config), "--out", str(out)])
                run = run_child(cmd, env, log)
                runs[method, name].append({
                    "tokens_per_s": run.steady_tokens_per_s(), "wall_s": run.wall_s, "rss_mb": run.peak_rss_bytes / 1e6,
                    "loss": run.train_logs()[-1]["loss"], "tokens": run.final().get("num_input_tokens_seen")})

    def values(method: str, name: str, key: str) -> list[float | None]:
        return [run.get(key) for run in runs[method, name]]

    def paired(method: str, key: str, other: str) -> list[float | None]:
        return [ratio(a, b) for a, b in zip(values(method, "tunekit", key), values(method, other, key))]

    rows, goals = [], []
    for method in METHODS:
        for label, key, others in (("tokens/s, steady state (after step 1)", "tokens_per_s", ("plain", "bare")),
                                   ("wall time (s, process start -> exit)", "wall_s", ("plain",)),
                                   ("peak RSS (MB)", "rss_mb", ("plain",)),
                                   ("train loss, mean of steps 2..last", "loss", ()),
                                   ("non-pad tokens trained", "tokens", ())):
            ratios = [paired(method, key, other) if other in others else [] for other in ("plain", "bare")]
            show = {"rss_mb": whole, "tokens": whole, "loss": lambda v: fmt(v, 4)}.get(key, fmt)  # 4: as logged
            rows.append([f"{method}: {label}", *(show(median(values(method, name, key))) for name in VARIANTS),
                         *(cell for r in ratios for cell in (median(r), spread(r)))])
        throughput = f"{method} throughput (tokens/s, steady; median of paired ratios)"
        goals += [
            goal(throughput, median(paired(method, "tokens_per_s", "plain")), 1.0),
            goal(throughput, median(paired(method, "tokens_per_s", "bare")), 0.85, versus="the bare loop"),
            goal(f"{method} wall time", median(paired(method, "wall_s", "plain")), 1.0, higher_is_better=False),
            goal(f"{method} peak RSS", median(paired(method, "rss_mb", "plain")), 1.0, higher_is_better=False),
        ]
    lora, full = configs["LoRA"], configs["full"]
    body = "\n".join([
        f"Model: Llama, {built['params'] / 1e6:.1f}M parameters, random init (bench_flops.py's), the tiny base's "
        f"tokenizer. {STEPS} steps of batch {BATCH} from {lora.data.sources[0].path}, max_length "
        f"{lora.data.max_seq_len}, fp32, one process, {threads} thread(s), completion-only loss, no eval. LoRA: "
        f"r={lora.lora.r}, alpha={lora.lora.lora_alpha:g}, {lora.lora.describe_targets()}, lr "
        f"{lora.learning_rate:g} {lora.training.lr_scheduler_type}; full: lr {full.learning_rate:g} "
        f"{full.training.lr_scheduler_type}, deepspeed.stage auto. {repeats} run(s) of each, alternating; medians, "
        "and the median (range) of the ratios of runs made back to back. The bare loop trains tunekit's own batches "
        "at the same lr schedule (its loss should match tunekit's); plain TRL draws other batches (no data.seed "
        "pre-shuffle).",
        "",
        table(["metric", "tunekit", "plain TRL", "bare loop", "tunekit / plain", "range", "tunekit / bare", "range"],
              rows),
        "",
        *goals,
    ])
    return Section("tunekit vs plain TRL and a bare PyTorch loop on the 27M model", body)


def whole(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    return main_for(run_section, __doc__.splitlines()[0], DEFAULT_REPEATS, argv, CHILDREN)


if __name__ == "__main__":
    sys.exit(main())
