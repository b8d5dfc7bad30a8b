"""The baseline tunekit is measured against: a plain, hand-written TRL SFTTrainer + peft LoRA script (or, with
--method full, a plain full fine-tune: every weight trains, no peft, no DeepSpeed), what a user writes without
tunekit. Alpaca jsonl -> prompt/completion rows, completion-only loss, no eval, fp32 on CPU.

    python scripts/plain_trl_sft.py --out /tmp/plain --steps 40 --result /tmp/plain.json [--method full]

bench_trl.py passes it the settings of configs/tiny-lora.yaml (rank, alpha, targets, lr, batch, steps, max_length,
seed, schedule), bench_full.py those of configs/tiny-full-zero3.yaml, so both runs train the same model on the same
data the same way. The only lines a user would not write are the --result JSON at the end (benchmark bookkeeping).
"""

from __future__ import annotations

import argparse
import json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/tiny-base")
    p.add_argument("--data", default="artifacts/demo-data/train.jsonl", help="alpaca jsonl (instruction/input/output)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="full: every weight trains (no peft)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--num-proc", type=int, default=None, help="dataset preparation processes (TRL's dataset_num_proc)")
    p.add_argument("--prepare-only", action="store_true", help="stop once SFTTrainer has prepared the dataset")
    p.add_argument("--result", default=None, help="write tokens/runtime/loss here as JSON (for the benchmark)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)

    def to_prompt_completion(row):
        # The standard Alpaca prompt; bos first, as the base was pretrained. TRL appends eos to the completion.
        if row.get("input"):
            prompt = f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
        else:
            prompt = f"### Instruction:\n{row['instruction']}\n\n### Response:\n"
        return {"prompt": tokenizer.bos_token + prompt, "completion": row["output"]}

    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names, num_proc=args.num_proc)

    training_args = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup,  # a float in [0, 1) is a ratio of the steps
        max_length=args.max_length,
        completion_only_loss=True,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; not needed for a model this size
        optim="adamw_torch",
        use_cpu=True,
        bf16=False,  # SFTConfig defaults to bf16, which fails on CPU
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to="none",
        seed=args.seed,
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=args.num_proc,
    )
    peft_config = None if args.method == "full" else LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets if args.targets == "all-linear" else args.targets.split(","),
        bias="none", task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)  # tokenizes the dataset (datasets.map, cached)
    if args.prepare_only:  # benchmark bookkeeping: the data benchmark times preparation alone
        print(f"prepared {len(trainer.train_dataset)} rows")
        return 0
    result = trainer.train()
    trainer.save_model(f"{args.out}/final")

    if args.result:  # benchmark bookkeeping, not part of the recipe
        with open(args.result, "w") as handle:
            json.dump({"tokens_seen": trainer.state.num_input_tokens_seen,
                       "train_runtime": result.metrics["train_runtime"], "train_loss": result.training_loss,
                       "steps": trainer.state.global_step}, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
