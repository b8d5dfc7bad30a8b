"""LoRA rank spectrum: exact singular values of known products, verdicts, a real peft model, the callback."""

import contextlib
import json
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerState

from tunekit import spectrum
from tunekit.spectrum import (
    RankSpectrumCallback,
    adapter_spectra,
    effective_rank,
    singular_values,
    summarize_spectra,
)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] with orthonormal columns (rows >= cols)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q.float()


def known_product(values: list[float], out_features: int = 48, in_features: int = 40):
    """A, B with B@A = U·diag(values)·Vᵀ: singular values exactly `values`."""
    rank = len(values)
    u, v = orthonormal(out_features, rank, seed=1), orthonormal(in_features, rank, seed=2)
    return v.T.contiguous(), u * torch.tensor(values)  # A [r, in], B [out, r]


def tiny_lora_model(r: int = 4):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(config), lora)


def randomize_b(model) -> None:
    """peft starts B at zero; a trained adapter has a non-zero B."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()


def test_singular_values_of_a_known_product_times_scaling():
    values = [5.0, 3.0, 1.0, 0.5]
    lora_a, lora_b = known_product(values)
    result = singular_values(lora_a, lora_b, scaling=2.0)
    assert result.dtype == torch.float32 and result.shape == (4,)
    torch.testing.assert_close(result, torch.tensor(values) * 2.0, atol=1e-5, rtol=0)


def test_singular_values_match_the_full_svd_and_accept_bf16():
    generator = torch.Generator().manual_seed(3)
    lora_a, lora_b = torch.randn(8, 30, generator=generator), torch.randn(20, 8, generator=generator)
    expected = torch.linalg.svdvals(0.5 * lora_b @ lora_a)[:8]
    torch.testing.assert_close(singular_values(lora_a, lora_b, 0.5), expected, atol=1e-4, rtol=1e-5)
    assert singular_values(lora_a.bfloat16(), lora_b.bfloat16(), 0.5).dtype == torch.float32


def test_rank_larger_than_a_dimension_pads_exact_zeros():
    generator = torch.Generator().manual_seed(4)
    result = singular_values(torch.randn(8, 5, generator=generator), torch.randn(20, 8, generator=generator), 1.0)
    assert result.shape == (8,) and torch.all(result[5:] == 0) and torch.all(result[:5] > 0)


def test_effective_rank_of_rank_one_equal_values_and_zero():
    lora_a, lora_b = known_product([4.0, 0.0, 0.0, 0.0])
    assert effective_rank(singular_values(lora_a, lora_b, 1.0)) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank([2.0] * 8) == pytest.approx(8.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    assert 1.0 < effective_rank([3.0, 1.0]) < 2.0


@pytest.mark.parametrize(
    ("values", "expected"),
    [([10.0, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4], "collapsed"),
     ([1.0] * 8, "flat"),
     ([4.0, 3.0, 2.0, 1.0, 0.2, 0.1, 0.05, 0.01], "ok")],
)
def test_verdicts(values, expected):
    summary = summarize_spectra({"model.layers.0.self_attn.q_proj": values, "model.layers.1.self_attn.q_proj": values})
    assert summary["q_proj"]["verdict"] == expected
    assert summary["q_proj"]["r"] == 8 and summary["q_proj"]["modules"] == 2
    assert summary["q_proj"]["effective_rank"] == pytest.approx(effective_rank(values))


def test_untrained_adapters_are_skipped():
    summary = summarize_spectra({
        "layers.0.q_proj": [0.0] * 4, "layers.1.q_proj": [1.0, 1.0, 1.0, 1.0], "layers.0.v_proj": [0.0] * 4,
    })
    assert list(summary) == ["q_proj"]
    assert summary["q_proj"]["modules"] == 1 and summary["q_proj"]["untrained"] == 1
    assert summarize_spectra({}) == {}


def test_adapter_spectra_on_a_peft_model():
    model = tiny_lora_model(r=4)
    untrained = adapter_spectra(model)
    assert all(sum(values) == 0 for values in untrained.values())  # B starts at zero
    randomize_b(model)
    spectra = adapter_spectra(model)
    assert sorted(spectra) == sorted(
        f"model.layers.{i}.self_attn.{kind}" for i in range(2) for kind in ("q_proj", "v_proj")
    )
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = torch.linalg.svdvals(delta.detach())[:4]
    torch.testing.assert_close(torch.tensor(spectra["model.layers.1.self_attn.v_proj"]), expected, atol=1e-5, rtol=1e-5)
    assert set(summarize_spectra(spectra)) == {"q_proj", "v_proj"}
    assert adapter_spectra(model.base_model.model, adapter="other") == {}


def test_zero3_partitioned_parameters_are_gathered(monkeypatch):
    """Parameters with `ds_id` are read inside deepspeed.zero.GatheredParameters (faked: no process group here)."""
    gathered = []

    @contextlib.contextmanager
    def fake_gather(params, modifier_rank=None):
        gathered.append((len(params), modifier_rank))
        yield

    fake = types.ModuleType("deepspeed")
    fake.zero = SimpleNamespace(GatheredParameters=fake_gather)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = tiny_lora_model()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.ds_id = 0
    assert len(adapter_spectra(model)) == 4
    assert gathered == [(2, None)] * 4


def test_callback_records_history_logs_warns_once_and_writes_json(tmp_path, caplog):
    model = tiny_lora_model(r=8)
    with torch.no_grad():  # a rank-1 update in every adapter: effective rank 1 of 8, collapsed
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
                param[:, 0] = 1.0
    callback, state, logged = RankSpectrumCallback(), TrainerState(), []
    with pytest.raises(RuntimeError, match="log is not set"):  # unwired, it would measure and tell no one
        callback.on_evaluate(SimpleNamespace(), state, None, model=model, metrics={})
    callback.log = logged.append  # Trainer.log in a run: to log_history and the trackers
    for step in (10, 20):
        state.global_step = step
        with caplog.at_level("WARNING", logger=spectrum.__name__):
            callback.on_evaluate(SimpleNamespace(), state, None, model=model, metrics={})
    assert [entry["step"] for entry in callback.history] == [10, 20]
    assert logged == [{"eval_lora_effective_rank_q_proj": pytest.approx(1.0, abs=1e-3),
                       "eval_lora_effective_rank_v_proj": pytest.approx(1.0, abs=1e-3)}] * 2
    assert state.log_history == []  # only Trainer.log writes the history
    assert callback.history[-1]["summary"]["q_proj"]["verdict"] == "collapsed"
    assert len(callback.last_spectra) == 4
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 2  # q_proj and v_proj, once each across both evaluations
    callback.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), state, None, model=model)
    saved = json.loads((tmp_path / "spectrum.json").read_text())
    assert saved["history"][0]["step"] == 10 and len(saved["last_spectra"]) == 4
    assert math.isclose(saved["history"][1]["summary"]["v_proj"]["effective_rank"], 1.0, abs_tol=1e-3)
