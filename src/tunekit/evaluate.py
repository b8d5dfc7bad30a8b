"""Task metrics computed by generating from a model (plain or peft-wrapped).

Under DDP/DeepSpeed every rank runs the metric: each generates only its share of the prompts (`shard`), and the
completions are gathered back into the original order (`unshard`), so the score is the one a single process gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s share of `items`: a contiguous block of ceil(n / world), the last blocks padded with repeats of
    the last item so that every rank gets the same count (under ZeRO-3 generate is collective: every rank must run the
    same number of generate calls and decode steps, see transformers' `synced_gpus`). Empty for no items."""
    if not items:
        return []
    per_rank = -(-len(items) // world)  # ceil
    return [items[min(i, len(items) - 1)] for i in range(rank * per_rank, (rank + 1) * per_rank)]


def unshard(per_rank: Sequence[Sequence[T]], n: int) -> list[T]:
    """Inverse of `shard`: the ranks' results (in rank order) back in the items' order, padding dropped."""
    return [item for block in per_rank for item in block][:n]


def generate_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                         batch_size: int = 16) -> list[str]:
    """Return the greedy completion of each prompt: the new tokens up to (not including) eos, decoded and stripped.

    Each prompt is tokenized without special tokens and bos is put first explicitly, as in the training data (unless
    the prompt text already starts with it, as chat templates render it). Batches are left-padded so every row's new
    tokens start at the same column. The tokenizer's padding side and the model's training mode are restored."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    completions: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                ids = [([bos] if bos is not None and not text.startswith(tokenizer.bos_token) else []) + row
                       for text, row in zip(chunk, tokenizer(chunk, add_special_tokens=False)["input_ids"])]
                batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")  # left-padded [b, max_prompt_len]
                input_ids = batch["input_ids"].to(device)
                out = model.generate(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad, use_cache=True)  # training turns the cache off
                for row in out[:, input_ids.shape[1]:].tolist():  # new tokens only
                    if eos in row:
                        row = row[: row.index(eos)]
                    completions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def distributed_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                            batch_size: int = 16) -> list[str]:
    """generate_completions of every prompt, each rank generating only its `shard`; every rank returns all of them,
    in order. Collective under a process group: every rank must call it with the same prompts."""
    return across_ranks(prompts, lambda mine: generate_completions(model, tokenizer, mine, max_new_tokens, batch_size))


def across_ranks(items: Sequence[T], work) -> list:
    """work(this rank's `shard` of items) -> one result per item of the shard; every rank returns the results of all
    items, in order (one process: work(items)). Collective under a process group: every rank must call it with the
    same items, and `work` runs the same number of steps on every rank (shard pads the last blocks)."""
    from tunekit.distributed import gather_object, is_distributed

    rank, world = 0, 1
    if is_distributed():
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    return unshard(gather_object(work(shard(items, rank, world))), len(items))


def exact_match(model, tokenizer, pairs: Sequence[tuple[str, str]], max_new_tokens: int = 32,
                batch_size: int = 16) -> float:
    """Return the fraction (0..1) of (prompt, expected) pairs whose greedy completion equals expected.strip(); under a
    process group the prompts are split across ranks (see distributed_completions) and every rank returns the score.

    Returns 0.0 for no pairs."""
    if not pairs:
        return 0.0
    got = distributed_completions(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    return sum(g == expected.strip() for g, (_, expected) in zip(got, pairs)) / len(pairs)
