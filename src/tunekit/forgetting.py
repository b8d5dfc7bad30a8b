"""Catastrophic forgetting monitor: the loss on general text, before and during training.

The seeds: full fine-tuning on a narrow distribution "will become very good at your task and progressively worse at
everything else". The cheapest early signal is the causal-LM loss on a fixed sample of general text (`eval.general`):
the train recipe measures it on the base model before training, `ForgettingCallback` measures it at every evaluation,
and `forgetting_flag` compares the two against `eval.forgetting_threshold`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (pads); the HF convention


def _encode(tokenizer, text: str, max_seq_len: int) -> list[int]:
    """[bos] + tokens + [eos], cut to max_seq_len tokens (bos/eos only where the tokenizer has them)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids[:max_seq_len]


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


# Token rows projected through lm_head at a time: the largest logits tensor general_loss builds is
# [LOSS_CHUNK_TOKENS, vocab] (plus its fp32 copy and the loss's log-softmax): 1024 x 128K vocabulary x 10 B = 1.3 GB,
# where the whole batch's logits were 8 x 2048 x 128K x (2 + 4 + 4) B = 21 GB at eval batch 8.
LOSS_CHUNK_TOKENS = 1024


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside `model` (peft's LoRA layers are injected into it, so it runs the adapter)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_transform(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the CausalLM's own forward does to lm_head's output before returning logits: Cohere's logit_scale,
    Granite's logits_scaling, Gemma-2/3's final_logit_softcapping (identity for Llama/Mistral)."""
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def chunked_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[float, int]:
    """(sum of the causal-LM cross entropy in nats, predicted tokens) of one batch, never holding its whole logits.

    The backbone runs once on [B, T]; its hidden states at the positions whose next token is labelled (labels not
    IGNORE_INDEX) go through lm_head `chunk_tokens` rows at a time, each chunk's logits upcast to fp32 (bf16 logits
    would round the sum) and scored, then freed. The model's forward would have built [B, T, V] logits.
    """
    lm = _causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:].to(hidden.device)  # position t predicts token t+1: [B, T-1]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # [N, H], [N]
    head, transform = lm.get_output_embeddings(), _output_transform(lm.config)
    total = 0.0
    for start in range(0, targets.numel(), chunk_tokens):
        logits = transform(head(hidden[start:start + chunk_tokens])).float()  # [<= chunk_tokens, V]
        total += F.cross_entropy(logits, targets[start:start + chunk_tokens], reduction="sum").item()
    return total, int(targets.numel())


def general_loss(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_seq_len: int, batch_size: int,
                 chunk_tokens: int = LOSS_CHUNK_TOKENS) -> float:
    """Mean per-token causal-LM loss (nats) of `model` on `texts`, every token weighted equally across texts.

    Each text becomes [bos] + tokens + [eos] (cut to max_seq_len); batches are right-padded with labels -100 and an
    attention mask of 0 on the pads. The loss is summed over all predicted tokens and divided by their count, so a
    long text weighs more than a short one (unlike a mean of per-batch means). The logits are built `chunk_tokens`
    token rows at a time (chunked_loss_sum), so memory does not grow with batch x length x vocabulary. Runs under
    no_grad in eval mode (dropout off) and restores the model's previous mode. Under ZeRO-3 every rank must call it
    with the same texts: the forward gathers parameters collectively. Raises ValueError when the texts hold no
    predictable token.
    """
    encoded = [ids for ids in (_encode(tokenizer, text, max_seq_len) for text in texts) if len(ids) >= 2]
    if not encoded:
        raise ValueError("general_loss: no text has two or more tokens to predict from")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start : start + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
                for row, ids in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    labels[row, : len(ids)] = torch.tensor(ids)
                    attention_mask[row, : len(ids)] = 1
                loss, tokens = chunked_loss_sum(model, input_ids.to(device), attention_mask.to(device), labels,
                                                chunk_tokens)
                total_loss, total_tokens = total_loss + loss, total_tokens + tokens
    finally:
        model.train(was_training)
    return total_loss / total_tokens


def forgetting_flag(base_loss: float, losses: Sequence[tuple[int, float]], threshold: float) -> dict:
    """Compare the general loss during training with the base model's.

    Returns {"base_loss", "last_loss", "max_loss", "relative_rise", "max_relative_rise", "threshold", "flagged",
    "message"}. relative_rise = last_loss / base_loss - 1. `flagged` is decided on the LAST loss, not the max: the
    last evaluation describes the model that is saved, and a spike the run recovered from is not forgetting in what
    ships (the max is still reported so the spike stays visible). With no losses, nothing is flagged and the loss
    fields are None. Raises ValueError when base_loss is not positive.
    """
    if base_loss <= 0:
        raise ValueError(f"base_loss must be positive, got {base_loss}")
    result = {"base_loss": base_loss, "threshold": threshold, "last_loss": None, "max_loss": None,
              "relative_rise": None, "max_relative_rise": None, "flagged": False}
    if not losses:
        result["message"] = "no general-text evaluation was recorded"
        return result
    last_step, last_loss = losses[-1]
    max_loss = max(loss for _, loss in losses)
    rise = last_loss / base_loss - 1
    result.update(last_loss=last_loss, max_loss=max_loss, relative_rise=rise, max_relative_rise=max_loss / base_loss - 1,
                  flagged=rise > threshold)
    if result["flagged"]:
        result["message"] = (
            f"general-text loss rose {rise:+.1%} over the base model ({base_loss:.4f} → {last_loss:.4f} at step "
            f"{last_step}), above the {threshold:.0%} threshold: likely catastrophic forgetting. Mix 5-10% general "
            "text into the training data, lower the learning rate, or train fewer epochs"
        )
    else:
        result["message"] = (
            f"general-text loss {rise:+.1%} vs the base model ({base_loss:.4f} → {last_loss:.4f} at step {last_step}), "
            f"within the {threshold:.0%} threshold"
        )
    return result


class ForgettingCallback(TrainerCallback):
    """At each evaluation: `general_loss` on the general texts, recorded as (step, loss) in `history`.

    The value is logged as `eval_general_loss` through `log`, the Trainer's own `log` (handed over by
    train.build_trainer once the Trainer exists): the Trainer logs its evaluation metrics before on_evaluate fires,
    and only `Trainer.log` reaches both `state.log_history` (the report, checkpoint markers) and the trackers (wandb,
    tensorboard). It is also added to the evaluation's `metrics` dict, so later callbacks and `evaluate()`'s caller
    see it. Every rank computes (ZeRO-3 forward is collective) and logs, as every rank runs `Trainer.log`.
    `result()` is `forgetting_flag`.
    """

    def __init__(self, tokenizer, texts: Sequence[str], base_loss: float, threshold: float, max_seq_len: int,
                 batch_size: int = 8) -> None:
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.base_loss = base_loss
        self.threshold = threshold
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.history: list[tuple[int, float]] = []
        self.log: Callable[[dict[str, float]], None] | None = None  # Trainer.log, set by train.build_trainer
        self._warned = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        model = kwargs.get("model")
        if model is None:
            return
        if self.log is None:
            raise RuntimeError("ForgettingCallback.log is not set: give it the Trainer's log (train.build_trainer)")
        loss = general_loss(model, self.tokenizer, self.texts, self.max_seq_len, self.batch_size)
        self.history.append((state.global_step, loss))
        if metrics is not None:
            metrics["eval_general_loss"] = loss
        # The model is in eval mode here (evaluation set it; general_loss restores it), so SFTTrainer.log adds only
        # its eval averages, already emptied by the evaluation's own entry: this entry is just the loss (+ step,
        # epoch, tokens seen, peak memory).
        self.log({"eval_general_loss": loss})
        verdict = self.result()
        if state.is_world_process_zero:
            logger.info("step %d: %s", state.global_step, verdict["message"])
            if verdict["flagged"] and not self._warned:
                self._warned = True
                logger.warning("step %d: %s", state.global_step, verdict["message"])

    def result(self) -> dict:
        """`forgetting_flag(base_loss, history, threshold)` for the evaluations so far."""
        return forgetting_flag(self.base_loss, self.history, self.threshold)

    def summary_fields(self) -> dict:
        """What summary.json records: general-text loss before and after, and whether forgetting was flagged."""
        verdict = self.result()
        return {"general_loss_base": verdict["base_loss"], "general_loss_last": verdict["last_loss"],
                "forgetting_flagged": verdict["flagged"]}
