"""Preference tuning (objective dpo | orpo) on TRL's trainers, fed the pairs tunekit already tokenized; and the
held-out preference metric.

The data pipeline (prepare.py) gives datasets of `prompt_ids`, `chosen_ids`, `rejected_ids` (every chosen/rejected
token scored, no prompt token). TRL's trainers would tokenize strings again; here they only receive tokens:
- DPO (trl DPOTrainer): its `_prepare_dataset` is a pass-through (its collator already reads those three columns).
  Reference: LoRA/QLoRA none (the adapter disabled: the base, no second copy; see TunekitDPOTrainer); full: a
  second, frozen model from the same loader (backends/full.py), built after the training arguments so ZeRO-3 shards
  it at load like the policy; `dpo.reference: precomputed`: TRL scores the data with the policy before any update,
  no copy. The TRL configs (DPOConfig, ORPOConfig) are built by backends.common.training_arguments.
- ORPO (trl.experimental.orpo ORPOTrainer): gets the columns its `tokenize_row` would have produced
  (`orpo_columns`), and its `tokenize_row` is a pass-through.
The trainers themselves (losses, logging, reference handling, DeepSpeed wrapping) are TRL's, unchanged.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer

from tunekit.backends.deepspeed import local_param_fraction
from tunekit.callbacks import PeakMemoryLog
from tunekit.config import RunConfig
from tunekit.data import IGNORE_INDEX
from tunekit.prepare import PAIR_COLUMNS

# summary.json keys of a preference run (summary_fields), in the order the summary prints them.
PREFERENCE_KEYS = ("preference_pairs_scored", "preference_accuracy_before", "preference_accuracy_after",
                   "reward_margin_after", "reward_accuracy_after")


class TunekitDPOTrainer(PeakMemoryLog, DPOTrainer):
    """TRL's DPOTrainer on tunekit's tokens (no re-tokenization), peak memory in every log entry.

    LoRA/QLoRA: given a peft model (tunekit builds it), TRL adds a "ref" adapter, a copy of the fresh adapter, and
    scores the reference through it. A fresh adapter changes nothing (its B matrices are zero; trainable token rows
    start as copies), so the copy is the base at the cost of a second adapter: in memory, in the parameter count and
    in final/ (peft saves every adapter). It is deleted here, before any optimizer or DeepSpeed engine exists, and
    TRL then scores the reference with the adapter disabled (trl.trainer.utils.use_adapter(None)).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")  # never active: "default" stays the active, trained adapter

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # tunekit.prepare already tokenized, masked and truncated: keep only the columns the collator reads.
        return dataset.select_columns(PAIR_COLUMNS)


def orpo_trainer(**kwargs):
    """TRL's ORPOTrainer fed `orpo_columns` (its tokenize_row's output, built from tunekit's tokens), peak memory in
    every log entry. ORPO lives in trl.experimental, which warns on import: imported here, for orpo runs only."""
    from trl.experimental.orpo import ORPOTrainer

    class TunekitORPOTrainer(PeakMemoryLog, ORPOTrainer):
        def tokenize_row(self, feature, model=None) -> dict:
            return {}  # the columns are there already (orpo_columns); map() keeps them as they are

        def _track_num_input_tokens(self, inputs):
            # The Trainer counts `input_ids`, which ORPO batches do not have (chosen_/rejected_ columns instead):
            # count both sequences' real tokens, as DPO's input_ids (chosen and rejected rows) are counted.
            if self.args.include_num_input_tokens_seen == "no":
                return
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    return TunekitORPOTrainer(**kwargs)


def orpo_columns(dataset):
    """The columns ORPOTrainer.tokenize_row makes (and its DPODataCollatorWithPadding pads), from tunekit's pairs:
    prompt_input_ids / prompt_attention_mask, and for chosen and rejected: {side}_input_ids (prompt + answer),
    {side}_attention_mask, {side}_labels (-100 on the prompt). Other columns are dropped."""
    if dataset is None:
        return None

    def columns(row: dict) -> dict:
        prompt = row["prompt_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = row[f"{side}_ids"]
            out[f"{side}_input_ids"] = prompt + answer
            out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
        return out

    # In memory: token lists of a few thousand pairs; no cache file for the ranks to race on.
    return dataset.map(columns, remove_columns=dataset.column_names, keep_in_memory=True,
                       desc="ORPO columns")


def build_preference_trainer(config: RunConfig, args, model, tokenizer, data, callbacks: list):
    """The DPO or ORPO trainer of this run (config.objective), on data.train / data.eval."""
    if config.objective == "dpo":
        return TunekitDPOTrainer(model=model, ref_model=reference_model(config, tokenizer), args=args,
                                 train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                                 callbacks=callbacks)
    return orpo_trainer(model=model, args=args, train_dataset=orpo_columns(data.train),
                        eval_dataset=orpo_columns(data.eval), processing_class=tokenizer, callbacks=callbacks)


def reference_model(config: RunConfig, tokenizer):
    """DPO's frozen reference, or None when TRL needs none: LoRA/QLoRA (the base is the policy with its adapter
    disabled) and `dpo.reference: precomputed` (TRL scores the data with the policy before the first update).

    Full: the base loaded again by the same loader, after the training arguments exist, so under ZeRO-3 it is
    partitioned as it loads (1/world_size per rank, like the policy; TRL then wraps it in a ZeRO-3 inference engine).
    """
    if config.method != "full" or config.dpo.reference == "precomputed":
        return None
    from transformers import set_seed

    from tunekit.backends import full

    set_seed(config.training.seed)  # the policy's load drew from this seed: new-token rows start equal in both
    reference = full.build_model(config, tokenizer)
    reference.requires_grad_(False)
    return reference.eval()


# ---------------------------------------------------------------- the held-out metric


def pair_logps(model, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair of `dataset` (prompt_ids / chosen_ids / rejected_ids): the summed log-probability of chosen_ids and of
    rejected_ids given prompt_ids, as two fp32 tensors of shape [n].

    Collective under a process group: each rank scores its `evaluate.shard` of the pairs (every rank the same number
    of forwards, which ZeRO-3 needs; call it inside `layer_by_layer`) and every rank returns all n scores, in order.
    Each forward holds [2 * batch_size, longest sequence, vocabulary] logits.
    """
    from tunekit.evaluate import across_ranks

    rows = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in dataset]
    device = next(model.parameters()).device

    def score(mine: list) -> list[tuple[float, float]]:
        was_training = model.training
        model.eval()
        scores: list[tuple[float, float]] = []
        try:
            with torch.no_grad():
                for start in range(0, len(mine), batch_size):
                    chunk = mine[start:start + batch_size]
                    chosen = [(p, c) for p, c, _ in chunk]
                    rejected = [(p, r) for p, _, r in chunk]
                    summed = _answer_logps(model, chosen + rejected, device)  # [2b]: chosen rows, then rejected
                    scores += list(zip(summed[:len(chunk)].tolist(), summed[len(chunk):].tolist()))
        finally:
            model.train(was_training)
        return scores

    every = across_ranks(rows, score)
    return (torch.tensor([c for c, _ in every], dtype=torch.float32),
            torch.tensor([r for _, r in every], dtype=torch.float32))


def _answer_logps(model, sequences: list[tuple[list[int], list[int]]], device) -> torch.Tensor:
    """Summed log-probability of each (prompt, answer)'s answer tokens, one right-padded forward: shape [len]."""
    length = max(len(p) + len(a) for p, a in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    scored = torch.zeros(len(sequences), length, dtype=torch.bool)  # True on answer tokens
    attention = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, (prompt, answer) in enumerate(sequences):
        ids = prompt + answer
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        scored[i, len(prompt):len(ids)] = True
    input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits  # [n, L, V]
    # Token t is predicted at position t-1.
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * scored[:, 1:]).sum(dim=1).float().cpu()


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share (0..1) of pairs whose chosen score is strictly above the rejected one; 0.0 for no pairs."""
    if chosen.numel() == 0:
        return 0.0
    return (chosen > rejected).float().mean().item()


def held_out_logps(model, data, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`pair_logps` of the first eval.task_samples held-out pairs (data.eval), or None for objective sft or without
    held-out pairs. Collective (see pair_logps)."""
    if not config.preference or data.eval is None or len(data.eval) == 0:
        return None
    from tunekit.backends.common import layer_by_layer

    pairs = data.eval.select(range(min(config.eval.task_samples, len(data.eval))))
    with layer_by_layer(model):  # ZeRO-3 before training: per-module gathers; after it: the engine's hooks
        return pair_logps(model, pairs, config.training.per_device_eval_batch_size)


def summary_fields(config: RunConfig, trainer, before, after) -> dict:
    """The preference keys of summary.json (none for objective sft).

    preference_accuracy_before / _after: share of held-out pairs whose chosen answer has the higher log-probability,
    under the base (the reference) and under the trained policy. reward_margin_after: DPO's implicit reward margin
    against that reference, beta * mean[(after_c - before_c) - (after_r - before_r)] (ORPO has no reference beta: 1,
    in nats); reward_accuracy_after: share of pairs where that reward is higher for chosen. Under ZeRO-3 with a
    reference model: reference_local_param_fraction, the share of the reference's weights rank 0 held (~1/world).
    """
    if not config.preference:
        return {}
    fields: dict = {"preference_pairs_scored": 0 if before is None else int(before[0].numel()),
                    "preference_accuracy_before": None, "preference_accuracy_after": None,
                    "reward_margin_after": None, "reward_accuracy_after": None}
    if before is not None and after is not None:
        beta = config.dpo.beta if config.objective == "dpo" else 1.0
        chosen_reward, rejected_reward = after[0] - before[0], after[1] - before[1]
        fields.update(preference_accuracy_before=preference_accuracy(*before),
                      preference_accuracy_after=preference_accuracy(*after),
                      reward_margin_after=beta * (chosen_reward - rejected_reward).mean().item(),
                      reward_accuracy_after=preference_accuracy(chosen_reward, rejected_reward))
    reference = getattr(trainer, "ref_model", None)
    fraction = local_param_fraction(reference) if reference is not None else None
    if fraction is not None:
        fields["reference_local_param_fraction"] = fraction
    return fields
