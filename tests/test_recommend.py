"""The method recommender: every objective, the hardware and budget exclusions, variants, the seed's own example,
agreement with the estimate package, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunekit.cli import main
from tunekit.config import LoraConfig
from tunekit.errors import UserError
from tunekit import estimate as est
from tunekit.recommend import format_recommendation, recommend, shape_from_size

SEED_EXAMPLE = dict(model_size_b=13, gpus=2, gpu_memory_gb=80, examples=200_000, objective="instruction",
                    variants=5, budget_usd=1000)


def test_seed_example_is_lora():
    result = recommend(**SEED_EXAMPLE)
    assert result["recommendation"] == "lora" and result["feasible"]
    assert set(result["gpus_needed"]) == set(result["cost_usd"]) == set(result["hours"]) == {"full", "lora", "qlora"}
    # 13B full FT: ~234 GB of states (18 B/param) does not fit 2 x 80 GB; LoRA's 26 GB base fits one GPU.
    assert result["gpus_needed"]["full"] > 2 and result["gpus_needed"]["lora"] == 1
    assert "full" in result["excluded"]
    text = " ".join(result["reasons"])
    assert "Instruction" in text and "5 variants" in text and "you have 2" in text
    assert result["cost_usd"]["lora"] < 1000


def test_cli_recommend_json_seed_example(capsys):
    argv = ["recommend", "--model-size", "13", "--gpus", "2", "--gpu-memory", "80", "--examples", "200000",
            "--objective", "instruction", "--variants", "5", "--budget", "1000", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recommendation"] == "lora" and result["reasons"]


def test_cli_recommend_table(capsys):
    argv = ["recommend", "--model-size", "7", "--gpus", "1", "--examples", "50000", "--objective", "task_specific"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("recommendation: LORA") and "reasons:" in out


def test_instruction_prefers_lora_even_when_full_fits():
    result = recommend(7, 8, examples=50_000, objective="instruction")
    assert result["gpus_needed"]["full"] <= 8 and result["recommendation"] == "lora"


def test_domain_knowledge_prefers_full_when_it_fits():
    result = recommend(7, 8, examples=1_000_000, objective="domain_knowledge")
    assert result["recommendation"] == "full"


def test_domain_knowledge_without_hardware_falls_back_with_reasons():
    result = recommend(70, 1, examples=50_000, objective="domain_knowledge")
    assert result["recommendation"] == "qlora" and result["feasible"]
    assert {"full", "lora"} <= set(result["excluded"])
    assert any("you have 1" in reason for reason in result["reasons"])


@pytest.mark.parametrize("examples, expected", [(20_000_000, "full"), (100_000, "lora")])
def test_task_specific_turns_on_dataset_size(examples, expected):
    assert recommend(7, 8, examples=examples, objective="task_specific")["recommendation"] == expected


def test_task_specific_huge_data_without_hardware_is_lora():
    assert recommend(7, 1, examples=20_000_000, objective="task_specific")["recommendation"] == "lora"


def test_many_variants_favour_adapters_with_storage_numbers():
    few = recommend(7, 8, examples=1_000_000, objective="domain_knowledge", variants=3)
    many = recommend(7, 8, examples=1_000_000, objective="domain_knowledge", variants=10)
    assert few["recommendation"] == "full" and many["recommendation"] == "lora"
    # 10 x 14 GB models vs one 14 GB base + 10 adapters
    assert many["storage_gb"]["full"] == pytest.approx(140)
    assert 14 < many["storage_gb"]["lora"] < 20
    assert any("10 variants" in reason and "140 GB" in reason for reason in many["reasons"])


def test_budget_excludes_what_costs_too_much():
    free = recommend(7, 8, examples=1_000_000, objective="domain_knowledge")
    budget = (free["cost_usd"]["full"] + free["cost_usd"]["lora"]) / 2  # between LoRA's and full's cost
    tight = recommend(7, 8, examples=1_000_000, objective="domain_knowledge", budget_usd=budget)
    assert tight["recommendation"] == "lora" and tight["feasible"]
    assert "budget" in tight["excluded"]["full"]
    assert any("over the" in reason for reason in tight["reasons"])


def test_nothing_in_budget_picks_the_cheapest_that_fits():
    result = recommend(7, 8, examples=1_000_000, objective="instruction", budget_usd=1)
    assert not result["feasible"]
    assert result["recommendation"] == min(result["cost_usd"], key=result["cost_usd"].get)


def test_nothing_fits_recommends_qlora_and_says_so():
    result = recommend(405, 1, gpu_memory_gb=24, examples=10_000, objective="instruction")
    assert result["recommendation"] == "qlora" and not result["feasible"]
    assert result["gpus_needed"]["qlora"] is None  # 4-bit weights are not sharded: one GPU must hold them
    assert "Nothing fits" in result["reasons"][-1]


def test_costs_follow_flops():
    result = recommend(13, 8, examples=200_000, objective="instruction")
    cost, hours = result["cost_usd"], result["gpu_hours"]
    assert cost["lora"] < cost["full"] < 1.5 * cost["lora"]  # 8N vs 6N+ per token with checkpointing
    assert cost["qlora"] > cost["lora"]  # dequantization makes QLoRA slower per token
    assert cost["full"] == pytest.approx(hours["full"] * est.DEFAULT_USD_PER_GPU_HOUR)


def test_guessed_shape_agrees_with_the_real_llama3_configs():
    # recommend guesses a Llama shape from the size; on Llama-3 sizes it should match estimate on the real config.
    settings = dict(micro_batch=1, seq_len=2048, gradient_checkpointing=True, lora_dropout=0.05)
    for name, size in (("llama-3-8b", 8.03e9), ("llama-3-70b", 70.55e9)):
        for method in ("full", "lora", "qlora"):
            real = est.memory_bytes(est.count_params(f"tunekit:{name}", LoraConfig(), method), method=method, **settings)
            guess = est.memory_bytes(shape_from_size(size, method), method=method, **settings)
            assert guess["job"]["total"] == pytest.approx(real["job"]["total"], rel=0.05)


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="objective"):
        recommend(7, 1, examples=10, objective="chat")
    with pytest.raises(UserError):
        recommend(7, 0, examples=10, objective="instruction")


def test_format_recommendation():
    text = format_recommendation(recommend(**SEED_EXAMPLE))
    assert text.startswith("recommendation: LORA") and "excluded" in text and "$" in text


def test_recommend_does_not_import_torch():
    code = "import sys, tunekit.recommend; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
