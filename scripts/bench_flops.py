"""Hardware utilisation of full fine-tuning: achieved FLOP/s against this CPU's measured fp32 matmul peak.

    python scripts/bench_flops.py [--repeats 1] [--threads 1] [--workdir DIR]

1. Peak: torch.matmul of two 2048x2048 fp32 matrices (2*2048^3 FLOPs each), timed repeatedly with `--threads` torch
   threads and with every core; the best repeat is the peak (what the machine can do when nothing else runs).
   Measured before and after the training runs, since the machine's load changes.
2. A random-init Llama of ~27M parameters (hidden 512, 8 layers, SwiGLU 1408, the tiny base's tokenizer): the
   largest that keeps this section near 1.5 minutes on one core. Full fine-tuning of it with `tunekit train`
   (configs/tiny-full-zero3.yaml's deepspeed.stage 3 with a world of one process; bench_full.py has stage auto), 2 packed rows of
   256 tokens per step, fp32, on the base's general-text file; and again with deepspeed.stage 0, which keeps the
   DeepSpeed engine but drops ZeRO-3's per-module gather/release hooks (what sharding costs on one process).
3. The same model and batch shape in a bare PyTorch loop (forward, backward, AdamW step): what PyTorch itself reaches
   here, so a gap can be put on tunekit/DeepSpeed or on the hardware.
Achieved FLOP/s = estimate.training_flops (6N per token for N matmul weights, plus attention) x steady-state
tokens/s (step 1 left out). MFU = achieved / peak at the same thread count.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import (
    TINY_BASE, Section, child_env, json_child, main_for, median, progress, run_child, table, tunekit_cmd,
)

CONFIG = "configs/tiny-full-zero3.yaml"
MODEL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8}
SEQ_LEN, ROWS = 256, 2  # tokens per packed row, rows per step
STEPS = 8
MATMUL_N = 2048
DEFAULT_REPEATS = 1


# ---------------------------------------------------------------- children (torch is imported only in these)


def matmul_child(threads: int, reps: int = 12) -> dict:
    """GFLOP/s of a fp32 MATMUL_N^3 matmul with `threads` threads: best and median of `reps` timed repeats."""
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    for _ in range(2):  # warm-up: page in, spin up the thread pool
        torch.matmul(a, b)
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * MATMUL_N**3 / (time.perf_counter() - started) / 1e9)
    rates.sort()
    return {"threads": threads, "best": rates[-1], "median": rates[len(rates) // 2]}


def build_child(out_dir: str, data_path: str) -> dict:
    """Save the random-init model (with the tiny base's tokenizer) to `out_dir`; return its shape and FLOPs/token."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunekit.data import read_rows, segments, tokenize
    from tunekit.estimate import count_params, training_flops

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=MODEL["num_attention_heads"],
                         max_position_embeddings=2 * SEQ_LEN, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **MODEL)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shape = count_params(out_dir, method="full")
    # Packed rows attend within each example only: the attention term uses the mean example length.
    lengths = [len(tokenize(segments(row, "text", tokenizer), tokenizer, SEQ_LEN, False)["input_ids"])
               for row in read_rows(data_path, "text")]
    mean_len = sum(lengths) / len(lengths)
    per_token = {
        "packed": training_flops(shape, method="full", tokens=1, seq_len=round(mean_len), gradient_checkpointing=False),
        "causal": training_flops(shape, method="full", tokens=1, seq_len=SEQ_LEN, gradient_checkpointing=False),
    }
    return {"params": shape["params"], "matmul_params": shape["matmul_params"], "mean_example_tokens": mean_len,
            "flops_per_token": per_token}


def torch_loop_child(model_dir: str, steps: int) -> dict:
    """Steady-state tokens/s of forward + backward + AdamW on ROWS x SEQ_LEN tokens (step 1 left out)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(5, model.config.vocab_size, (ROWS, SEQ_LEN))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"tokens_per_s": ROWS * SEQ_LEN * (steps - 1) / sum(times[1:]), "step_s": times}


CHILDREN = {"matmul": lambda a: matmul_child(int(a[0])), "build": lambda a: build_child(a[0], a[1]),
            "loop": lambda a: torch_loop_child(a[0], int(a[1]))}


def child(workdir: Path, name: str, kind: str, args: list[str], threads: int) -> dict:
    return json_child(__file__, kind, args, child_env(threads), workdir / f"{name}.log")


# ---------------------------------------------------------------- the section


def run_section(workdir: Path, repeats: int, threads: int) -> Section:
    import os

    cores = os.cpu_count() or 1
    data_path = f"{TINY_BASE}/general_eval.jsonl"
    model_dir = workdir / "flops-model"
    thread_counts = sorted({threads, cores})
    peaks: dict[int, list[dict]] = {t: [] for t in thread_counts}
    progress("flops: matmul peak")
    for t in thread_counts:
        peaks[t].append(child(workdir, f"matmul-{t}-a", "matmul", [str(t)], t))
    progress("flops: building the model")
    built = child(workdir, "build", "build", [str(model_dir), data_path], threads)

    overrides = [
        f"model.name_or_path={model_dir}", f"data.sources=[{{path: {data_path}, format: text}}]",
        "data.eval_path=null", "data.eval_fraction=0", f"data.max_seq_len={SEQ_LEN}", "data.packing=true",
        f"training.per_device_train_batch_size={ROWS}", f"training.max_steps={STEPS}",
        f"training.logging_steps={STEPS}",  # logs at step 1 and the last: steady state in between, no extra syncs
        "training.learning_rate=1.0e-4", "eval.task_metric=none", "eval.general=null",
        "checkpoints.save_steps=1000000",
    ]
    variants = {"zero3": [], "zero0": [], "loop": []}
    for i in range(repeats):
        for stage in (3, 0):
            progress(f"flops: tunekit full FT, ZeRO stage {stage}, run {i + 1}/{repeats}")
            out = workdir / f"full-z{stage}-{i}"
            run = run_child(tunekit_cmd(CONFIG, [*overrides, f"deepspeed.stage={stage}", f"output_dir={out}"]),
                            child_env(threads), workdir / f"{out.name}.log")
            variants[f"zero{stage}"].append(run.steady_tokens_per_s())
        progress(f"flops: bare PyTorch loop run {i + 1}/{repeats}")
        variants["loop"].append(child(workdir, f"loop-{i}", "loop", [str(model_dir), str(STEPS)], threads)["tokens_per_s"])
    progress("flops: matmul peak again")
    for t in thread_counts:
        peaks[t].append(child(workdir, f"matmul-{t}-b", "matmul", [str(t)], t))

    peak = {t: max(p["best"] for p in runs) for t, runs in peaks.items()}
    flops = built["flops_per_token"]
    packed = f"{ROWS} packed rows x {SEQ_LEN}"
    runs = [
        (f"tunekit full FT: DeepSpeed ZeRO-3, 1 process, {packed}", median(variants["zero3"]), flops["packed"]),
        (f"tunekit full FT: deepspeed.stage 0 (no sharding hooks), {packed}", median(variants["zero0"]),
         flops["packed"]),
        (f"bare PyTorch loop: same model, {ROWS} x {SEQ_LEN} causal, AdamW", median(variants["loop"]), flops["causal"]),
    ]
    rows = []
    for label, tps, per_token in runs:
        achieved = tps * per_token if tps else None
        rows.append([label, tps, per_token / 1e6, achieved / 1e9 if achieved else None, peak[threads],
                     f"{100 * achieved / (peak[threads] * 1e9):.1f}%" if achieved else "–"])
    peak_rows = [[t, median([p["median"] for p in peaks[t]]), peak[t]] for t in thread_counts]
    body = "\n".join([
        f"Model: Llama, {built['params'] / 1e6:.1f}M parameters ({built['matmul_params'] / 1e6:.1f}M in matmuls), "
        f"hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, random init, fp32; {STEPS} steps, "
        f"{repeats} run(s); threads per process: {threads}. Packed rows hold examples of "
        f"{built['mean_example_tokens']:.0f} tokens on average (attention FLOPs counted per example).",
        "",
        table(["run", "tokens/s (steady)", "MFLOP/token", "achieved GFLOP/s", f"peak GFLOP/s ({threads} thr)",
               "MFU"], rows),
        "",
        f"Matmul peak (fp32 {MATMUL_N}x{MATMUL_N}, GFLOP/s; before and after the runs, best repeat = peak):",
        "",
        table(["threads", "median repeat", "best repeat (peak)"], peak_rows),
    ])
    return Section("Hardware utilisation (full fine-tuning FLOP/s vs matmul peak)", body)


def main(argv: list[str] | None = None) -> int:
    return main_for(run_section, __doc__.splitlines()[0], DEFAULT_REPEATS, argv, CHILDREN)


if __name__ == "__main__":
    sys.exit(main())
