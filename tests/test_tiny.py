"""The tiny base builder (test preset) and the demo task files; exact_match on the tiny base."""

from __future__ import annotations

import json
import os

import pytest

from tunekit import tiny
from tunekit.data import alpaca_prompt

SAMPLE = "### Instruction:\nRepeat the digits.\n\n### Input:\n3815\n\n### Response:\n3815"


@pytest.fixture(scope="module")
def fresh_build():
    """(model, tokenizer) of the test preset trained again in this process, seed 0 — never read from any cache."""
    model, tokenizer, _, _ = tiny.train_base("test", seed=0)
    return model, tokenizer


def _ids(tokenizer, text: str):
    import torch

    return torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_same_seed_gives_identical_weights(tiny_base, fresh_build):
    """The fixture's build (maybe from another process or session) and a fresh one agree bit for bit."""
    from safetensors.torch import load_file

    saved = load_file(tiny_base / "model.safetensors")
    fresh = fresh_build[0].state_dict()
    assert set(saved) == set(fresh)
    assert all((saved[name] == fresh[name]).all() for name in saved)


def test_reload_from_the_path_is_exact(tiny_base, fresh_build):
    """from_pretrained gives the in-memory model's logits exactly, and the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = fresh_build
    loaded = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    loaded_tok = AutoTokenizer.from_pretrained(tiny_base)
    assert loaded.config.tie_word_embeddings is False
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert loaded_tok(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert (loaded_tok.bos_token, loaded_tok.eos_token, loaded_tok.pad_token) == (tiny.BOS, tiny.EOS, tiny.PAD)
    assert loaded_tok.padding_side == "right"
    ids = _ids(tokenizer, SAMPLE)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_tokenizer_adds_no_special_tokens_itself(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids = tok("cat dog")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(tok(SAMPLE)["input_ids"]) == SAMPLE  # byte-level: the round trip is lossless


def test_chat_template_masks_assistant_content_and_end_token_only(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    messages = [{"role": "user", "content": "Reverse the digits.\n3815"},
                {"role": "assistant", "content": "5183"},
                {"role": "user", "content": "Now the words.\ncat dog"},
                {"role": "assistant", "content": "dog cat"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == tok.bos_token_id and len(mask) == len(ids)
    masked = [i for i, m in zip(ids, mask) if m]
    end = tok.eos_token_id
    expected = (tok("5183", add_special_tokens=False)["input_ids"] + [end]
                + tok("dog cat", add_special_tokens=False)["input_ids"] + [end])
    assert masked == expected
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Reverse the digits" in unmasked and "3815" in unmasked and "cat dog" in unmasked
    assert "<|user|>" in unmasked
    assert "<|assistant|>" in unmasked  # the role header is prompt, not target
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_cached_build_is_returned_without_rebuilding(tiny_base, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("rebuilt a cached base")

    monkeypatch.setattr(tiny, "train_base", no_training)
    mtime = os.stat(tiny_base / "model.safetensors").st_mtime_ns
    assert tiny.build_tiny_base(tiny_base, preset="test", seed=0) == tiny_base
    assert os.stat(tiny_base / "model.safetensors").st_mtime_ns == mtime
    # A different seed is a different build: not a cache hit.
    assert tiny.is_cached(tiny_base, "test", 0) and not tiny.is_cached(tiny_base, "test", 1)


def test_an_unfinished_build_is_not_taken_for_a_finished_one(tmp_path, tiny_base):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(tiny_base, half)
    (half / tiny.STAMP_NAME).unlink()  # the stamp is written last: without it the build did not finish
    assert not tiny.is_cached(half, "test", 0)
    assert not tiny.is_cached(tmp_path / "missing", "test", 0)


def test_build_artifacts_describe_themselves(tiny_base):
    stamp = json.loads((tiny_base / tiny.STAMP_NAME).read_text())
    assert stamp["preset"] == "test" and stamp["seed"] == 0 and stamp["hash"] == tiny.build_hash("test", 0)
    lines = [json.loads(line) for line in (tiny_base / tiny.GENERAL_EVAL_NAME).read_text().splitlines()]
    assert len(lines) == tiny.PRESETS["test"]["general_eval_lines"] and all(line["text"] for line in lines)
    assert not list(tiny_base.parent.glob(f"{tiny_base.name}.tmp-*"))


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny preset"):
        tiny.build_tiny_base(tmp_path / "x", preset="huge")


def test_demo_task_files_are_valid_and_train_eval_disjoint(demo_data):
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in demo_data.items()}
    assert len(rows["train"]) == 256 and len(rows["eval"]) == 32
    for row in rows["train"] + rows["eval"]:
        assert set(row) == {"instruction", "input", "output"}
        assert row["output"] == row["input"][::-1] and row["input"].isdigit()  # the task: reverse the digits
    assert not {r["input"] for r in rows["train"]} & {r["input"] for r in rows["eval"]}
    first = rows["train"][0]
    prompt = alpaca_prompt(first)
    assert rows["chat"][0]["messages"][0]["role"] == "user"
    assert rows["chat"][0]["messages"][1] == {"role": "assistant", "content": first["output"]}
    assert rows["prompt_completion"][0] == {"prompt": prompt, "completion": first["output"]}
    assert rows["text"][0] == {"text": prompt + first["output"]}
    assert len(rows["chat"]) == len(rows["prompt_completion"]) == len(rows["text"]) == 16


def test_demo_task_is_deterministic(tmp_path):
    a = tiny.write_demo_task(tmp_path / "a", n_train=20, n_eval=5, seed=3)
    b = tiny.write_demo_task(tmp_path / "b", n_train=20, n_eval=5, seed=3)
    assert all(a[name].read_bytes() == b[name].read_bytes() for name in a)


def test_exact_match_plain_and_peft_model_agree(tiny_base):
    """The model's own greedy outputs score 1.0, wrong answers 0.0; padding side and train mode are restored; a fresh
    LoRA (B = 0, so the same function) scores the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.evaluate import exact_match, generate_completions

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.train()
    prompts = [alpaca_prompt({"instruction": "Repeat the digits.", "input": d}) for d in ("381", "905172", "46")]
    got = generate_completions(model, tok, prompts, max_new_tokens=8, batch_size=2)  # 2: a batch with padding
    # Left padding does not change what a prompt generates: one at a time gives the same answers.
    assert got == [generate_completions(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert exact_match(model, tok, list(zip(prompts, got)), max_new_tokens=8, batch_size=2) == 1.0
    assert exact_match(model, tok, [(p, "\u2603 not this") for p in prompts], max_new_tokens=8) == 0.0
    assert exact_match(model, tok, []) == 0.0
    assert model.training and tok.padding_side == "right"
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert exact_match(lora, tok, list(zip(prompts, got)), max_new_tokens=8, batch_size=2) == 1.0


def test_pretraining_examples_go_through_the_data_pipeline(tiny_base):
    """Sister-task rows are encoded like fine-tuning data: bos + prompt (no loss) + answer + <|end|> (loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    record = {"instruction": "Repeat the digits.", "input": "3815", "output": "3815"}
    ids, labels = tiny.encode_alpaca(tok, record)
    answer = tok("3815", add_special_tokens=False)["input_ids"]
    assert len(answer) == 4  # one token per digit: a digit is the same token in the input and the answer
    assert ids[0] == tok.bos_token_id and ids[-5:] == answer + [tok.eos_token_id]
    assert [label for label in labels if label != -100] == answer + [tok.eos_token_id]
    assert tok.decode(ids[1:-5]) == alpaca_prompt(record)


def test_chat_prompts_that_start_with_bos_get_no_second_one(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.evaluate import generate_completions

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    chat = tok.apply_chat_template([{"role": "user", "content": "Repeat the digits.\n381"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.startswith(tiny.BOS)
    assert generate_completions(model, tok, [chat], max_new_tokens=6) == \
        generate_completions(model, tok, [chat[len(tiny.BOS):]], max_new_tokens=6)


@pytest.mark.parametrize("n, world", [(7, 2), (8, 2), (1, 3), (5, 8), (0, 2), (10, 1)])
def test_shard_gives_every_rank_the_same_count_and_unshard_restores_the_order(n, world):
    from tunekit.evaluate import shard, unshard

    items = [f"prompt {i}" for i in range(n)]
    shards = [shard(items, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # ZeRO-3: every rank runs as many generate calls and decode steps
    assert len(shards[0]) == -(-n // world)
    assert unshard(shards, n) == items  # results come back in the original order, the padding dropped
    assert all(item in items for s in shards for item in s)  # padding repeats a real prompt


TWO_RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from tunekit.evaluate import exact_match

dist.init_process_group("gloo")
base, cases_path, out = sys.argv[1:]
pairs = [tuple(p) for p in json.load(open(cases_path))]
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base)
rows, generate = [], model.generate
model.generate = lambda **kw: rows.append(len(kw["input_ids"])) or generate(**kw)
score = exact_match(model, tok, pairs, max_new_tokens=6, batch_size=2)
with open(f"{out}/rank{dist.get_rank()}.json", "w") as handle:
    json.dump({"score": score, "rows": sum(rows), "calls": len(rows)}, handle)
dist.barrier()  # gloo aborts ('terminate called without an active exception') if a peer leaves first
dist.destroy_process_group()
# The abort can still come from gloo's threads at interpreter teardown (seen in CI, ~1 run in 20): the results are
# written, so leave without running the C++ static destructors.
import os; os._exit(0)
"""


def test_exact_match_over_two_processes_splits_the_prompts_and_scores_like_one(tiny_base, tmp_path):
    """2 CPU processes (torchrun, gloo): each generates only its half (4 of 7, the last padded with a repeat), both
    return the score one process gets."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.evaluate import exact_match, generate_completions

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    prompts = [alpaca_prompt({"instruction": "Repeat the digits.", "input": d})
               for d in ("381", "905172", "46", "7", "2222", "13", "580")]
    got = generate_completions(model, tok, prompts, max_new_tokens=6, batch_size=2)
    pairs = [(p, g if i % 3 else "\u2603 wrong") for i, (p, g) in enumerate(zip(prompts, got))]  # 4 of 7 right
    single = exact_match(model, tok, pairs, max_new_tokens=6, batch_size=2)
    assert single == pytest.approx(4 / 7)
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (tmp_path / "script.py").write_text(TWO_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "script.py"), str(tiny_base), str(tmp_path / "pairs.json"), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["score"] for r in ranks] == [single, single]
    assert [r["rows"] for r in ranks] == [4, 4]  # not 7 each: ceil(7 / 2), one padding row on rank 1
    assert ranks[0]["calls"] == ranks[1]["calls"] == 2  # equal generate calls: what ZeRO-3's synced decoding needs
