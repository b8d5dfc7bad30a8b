"""Forgetting monitor: general-text loss equals the token-weighted reference, the flag rule, the callback."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerState

from tunekit.forgetting import ForgettingCallback, forgetting_flag, general_loss

WORDS = "the cat sat on a mat and dog ran to red blue house tree sky".split()
TEXTS = ["the cat sat on the mat", "a dog ran to the red house and the cat sat on a blue tree under the sky"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ids 0-3 special, then WORDS; offline and exact."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100)
    return LlamaForCausalLM(config)


def reference_loss(model, tokenizer, texts) -> float:
    """Each text alone, unpadded: per-token cross entropy summed over both texts / token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            logits = model.eval()(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
            per_token = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")  # [T-1]
            total, count = total + per_token.sum().item(), count + per_token.numel()
    return total / count


def test_general_loss_is_the_token_weighted_mean_and_restores_train_mode():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    model.train()
    loss = general_loss(model, tokenizer, TEXTS, max_seq_len=64, batch_size=2)  # one padded batch
    assert model.training
    assert math.isfinite(loss)
    expected = reference_loss(model, tokenizer, TEXTS)
    assert loss == pytest.approx(expected, rel=1e-5)
    # Batch size does not change a token-weighted mean (a mean of per-batch means would differ here).
    assert general_loss(model, tokenizer, TEXTS, max_seq_len=64, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_general_loss_truncates_to_max_seq_len_and_rejects_empty_input():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    cut = general_loss(model, tokenizer, [TEXTS[1]], max_seq_len=5, batch_size=4)
    ids = [tokenizer.bos_token_id, *tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]][:5]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    assert cut == pytest.approx(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item(), rel=1e-5)
    with pytest.raises(ValueError):
        general_loss(model, tokenizer, [], max_seq_len=8, batch_size=2)


def test_forgetting_flag_above_and_below_threshold():
    flagged = forgetting_flag(2.0, [(10, 2.1), (20, 2.5)], threshold=0.10)
    assert flagged["flagged"] and flagged["relative_rise"] == pytest.approx(0.25)
    assert flagged["last_loss"] == 2.5 and flagged["max_loss"] == 2.5 and "forgetting" in flagged["message"]
    calm = forgetting_flag(2.0, [(10, 2.1), (20, 2.15)], threshold=0.10)
    assert not calm["flagged"] and calm["relative_rise"] == pytest.approx(0.075)


def test_forgetting_flag_uses_the_last_loss_not_a_recovered_spike():
    recovered = forgetting_flag(2.0, [(10, 3.0), (20, 2.05)], threshold=0.10)
    assert not recovered["flagged"]
    assert recovered["max_loss"] == 3.0 and recovered["max_relative_rise"] == pytest.approx(0.5)


def test_forgetting_flag_edge_cases():
    empty = forgetting_flag(2.0, [], threshold=0.1)
    assert not empty["flagged"] and empty["last_loss"] is None
    with pytest.raises(ValueError):
        forgetting_flag(0.0, [(1, 1.0)], threshold=0.1)


def test_callback_records_history_metrics_and_log_history():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    base = general_loss(model, tokenizer, TEXTS, max_seq_len=64, batch_size=2)
    callback = ForgettingCallback(tokenizer, TEXTS, base_loss=base, threshold=0.1, max_seq_len=64, batch_size=2)
    state, metrics = TrainerState(global_step=7, epoch=0.5), {"eval_loss": 1.0}
    callback.on_evaluate(SimpleNamespace(), state, None, model=model, metrics=metrics)
    assert callback.history == [(7, pytest.approx(base))]
    assert metrics["eval_general_loss"] == pytest.approx(base)
    assert state.log_history == [{"eval_general_loss": pytest.approx(base), "step": 7, "epoch": 0.5}]
    assert not callback.result()["flagged"]
