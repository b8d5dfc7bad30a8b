"""Forgetting monitor: general-text loss equals the token-weighted reference, the flag rule, the callback; and
trackers receive what tunekit logs (eval_general_loss, LoRA effective ranks, peak memory) in a real tiny run."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback, TrainerState

from tunekit.checkpoints import MARKER_NAME
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


def full_logits_loss(model, tokenizer, texts, max_seq_len: int, batch_size: int) -> float:
    """general_loss as it was before chunking: the model's own forward, whole [B, T, V] logits, one fp32 copy."""
    from tunekit.forgetting import IGNORE_INDEX, _encode

    encoded = [_encode(tokenizer, text, max_seq_len) for text in texts]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), IGNORE_INDEX)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = labels[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            logits = model.eval()(input_ids=input_ids, attention_mask=mask).logits
            targets = labels[:, 1:].reshape(-1)
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            total += F.cross_entropy(shifted, targets, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def largest_head_output(model, run) -> int:
    """Elements of the largest tensor lm_head returned while `run()` ran (every logits tensor passes through it)."""
    sizes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
    try:
        run()
    finally:
        handle.remove()
    return max(sizes)


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
def test_chunked_general_loss_equals_the_full_logits_loss_and_bounds_the_logits(chunk):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    texts = TEXTS * 3  # 6 texts, 2 batches of 4 and 2 rows, 8-24 predicted tokens each
    expected = full_logits_loss(model, tokenizer, texts, 64, 4)
    losses = []
    largest = largest_head_output(model, lambda: losses.append(general_loss(model, tokenizer, texts, 64, 4, chunk)))
    assert losses[0] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # Memory seam: no logits tensor holds more than chunk rows of the vocabulary (full logits: 4 x 20 x 100).
    assert largest <= chunk * model.config.vocab_size


def test_chunked_general_loss_runs_the_adapter_and_the_models_logit_transform():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = tiny_tokenizer()
    lora = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert general_loss(lora, tokenizer, TEXTS, 64, 2, 3) == pytest.approx(
        full_logits_loss(lora, tokenizer, TEXTS, 64, 2), rel=1e-6)
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=100,
                                           final_logit_softcapping=0.5))  # a small cap: the transform shows
    assert general_loss(gemma, tokenizer, TEXTS, 64, 2, 3) == pytest.approx(
        full_logits_loss(gemma, tokenizer, TEXTS, 64, 2), rel=1e-6)


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


def test_callback_records_history_metrics_and_logs_through_the_trainer():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    base = general_loss(model, tokenizer, TEXTS, max_seq_len=64, batch_size=2)
    callback = ForgettingCallback(tokenizer, TEXTS, base_loss=base, threshold=0.1, max_seq_len=64, batch_size=2)
    state, metrics = TrainerState(global_step=7, epoch=0.5), {"eval_loss": 1.0}
    with pytest.raises(RuntimeError, match="log is not set"):  # unwired, it would measure and tell no one
        callback.on_evaluate(SimpleNamespace(), state, None, model=model, metrics=metrics)
    logged = []
    callback.log = logged.append  # Trainer.log in a run (it adds step and epoch, and appends to log_history)
    callback.on_evaluate(SimpleNamespace(), state, None, model=model, metrics=metrics)
    assert callback.history == [(7, pytest.approx(base))]
    assert metrics["eval_general_loss"] == pytest.approx(base)
    assert logged == [{"eval_general_loss": pytest.approx(base)}]
    assert state.log_history == []  # only Trainer.log writes the history: what it holds, the trackers were sent
    assert not callback.result()["flagged"]


class Tracker(TrainerCallback):
    """Stands where wandb and tensorboard stand: built by the Trainer from report_to, before any callback of ours.
    Keeps a copy of what each on_log hands it, as a tracker sends it then."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


def test_trackers_receive_every_value_tunekit_logs(tmp_path, tiny_base, demo_data, monkeypatch):
    """A real tiny LoRA run with the forgetting monitor and the rank spectrum: a tracker in the integrations' slot
    gets eval_general_loss, the LoRA effective ranks and peak_memory_bytes, and exactly the entries of log_history."""
    import transformers.trainer

    import tunekit.train
    from tunekit.cli import main
    from tunekit.forgetting import ForgettingCallback
    from tunekit.spectrum import RankSpectrumCallback

    tracker, built = Tracker(), []
    monkeypatch.setattr(transformers.trainer, "get_reporting_integration_callbacks", lambda report_to: [tracker])
    build = tunekit.train.build_trainer
    monkeypatch.setattr(tunekit.train, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "method": "lora", "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": [{"path": str(demo_data["train"]), "format": "alpaca", "max_examples": 64}],
                 "eval_path": str(demo_data["eval"]), "max_seq_len": 64},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1},
        "checkpoints": {"save_steps": 2},  # evaluation at steps 2 and 4, then the recipe's final evaluate()
        "eval": {"task_metric": "none", "general": str(Path(tiny_base) / "general_eval.jsonl"), "rank_spectrum": True},
        "logging": {"token_metrics": True},  # SFTTrainer's train-time averages, checked below
    }))
    assert main(["train", str(config)]) == 0
    trainer = built[0]
    order = [type(callback) for callback in trainer.callback_handler.callbacks]
    assert order.index(Tracker) < min(order.index(ForgettingCallback), order.index(RankSpectrumCallback))

    # What the tracker was sent is what the history holds, entry for entry (the history adds only "step").
    assert tracker.logged == [{k: v for k, v in entry.items() if k != "step"} for entry in trainer.state.log_history]
    assert all(isinstance(logs["peak_memory_bytes"], int) and logs["peak_memory_bytes"] > 0 for logs in tracker.logged)
    general = [logs["eval_general_loss"] for logs in tracker.logged if "eval_general_loss" in logs]
    assert len(general) == 3 and all(math.isfinite(value) for value in general)
    ranks = [logs for logs in tracker.logged if any(key.startswith("eval_lora_effective_rank_") for key in logs)]
    assert len(ranks) == 3
    # Our entries are logged in eval mode: SFTTrainer's train-time averages stay in the training-loss entries.
    assert all("mean_token_accuracy" in logs for logs in tracker.logged if "loss" in logs)
    assert not any("mean_token_accuracy" in logs for logs in tracker.logged if "eval_general_loss" in logs)
    # The checkpoint marker (ranking) and the summary (report) see the same values.
    marker = json.loads((tmp_path / "out" / "checkpoint-4" / MARKER_NAME).read_text())
    assert marker["metrics"]["eval_general_loss"] == pytest.approx(general[1])
    assert "peak_memory_bytes" in marker["metrics"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["general_loss_last"] == pytest.approx(general[-1])
