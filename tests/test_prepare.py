"""The Arrow pipeline (tunekit.prepare): masks identical to the per-example pipeline it replaced, a cache keyed by
exactly what changes tokens, one tokenizing process under a launcher, streaming with mixing, the mask audit."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from test_data import make_config, tokenizer, write_jsonl  # noqa: F401 - tokenizer is a fixture
from tunekit import prepare
from tunekit.config import RunConfig
from tunekit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "fixtures" / "masks_before_arrow.json"


def golden_groups() -> dict:
    """(format, max_seq_len, completion_only_loss) -> cases written by the per-example pipeline before Arrow."""
    groups = defaultdict(list)
    for case in json.loads(GOLDEN.read_text())["cases"]:
        groups[(case["format"], case["max_seq_len"], case["completion_only_loss"])].append(case)
    return groups


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("key", sorted(golden_groups()), ids=lambda key: "-".join(map(str, key)))
def test_the_arrow_pipeline_gives_the_old_pipelines_tokens_and_masks(key, workers, tiny_base, tmp_path, tokenizer,
                                                                     monkeypatch):
    """Every format, truncated or not, completion-only or not, in one or two tokenizing processes: input_ids and
    labels equal, example by example, what the pipeline before Arrow wrote (tests/fixtures, commit 77bec4d)."""
    fmt, max_seq_len, completion_only = key
    cases = golden_groups()[key]
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [case["row"] for case in cases])
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": fmt}], max_seq_len=max_seq_len,
                      completion_only_loss=completion_only, num_proc=workers)
    monkeypatch.setattr(prepare, "ROWS_PER_WORKER", 1)  # two workers even for a few dozen rows
    logs = []
    source = prepare.load_source(str(path), fmt, "train", None, tokenizer, cfg, log=logs.append)
    assert any(f"in {workers} worker process" in line for line in logs)
    assert len(source.meta["token_files"]) == workers
    assert len(source.tokens) == len(cases)
    for case, example in zip(cases, source.tokens):
        assert example["input_ids"] == case["input_ids"]
        assert example["labels"] == case["labels"]
        assert example["tokens_cut"] == case["tokens_cut"]


def entries(tmp_path) -> int:
    return len(list((tmp_path / "cache").glob("*/meta.json")))


def test_the_cache_key_covers_what_changes_tokens_and_nothing_else(tiny_base, tmp_path, tokenizer):
    import copy

    rows = [{"instruction": f"Repeat {i}", "input": "", "output": f"{i} {i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    sources = [{"path": str(path), "format": "alpaca"}]
    base = make_config(tiny_base, tmp_path, sources, max_seq_len=64)
    prepare.prepare_data(base, tokenizer)
    assert entries(tmp_path) == 1

    # Nothing that only selects, orders or trains misses the cache.
    for fields in ({"seed": 3}, {"eval_fraction": 0.2}, {"packing": True}, {"num_proc": 2}):
        prepare.prepare_data(make_config(tiny_base, tmp_path, sources, max_seq_len=64, **fields), tokenizer)
    prepare.prepare_data(make_config(tiny_base, tmp_path, [{**sources[0], "weight": 3.0}], max_seq_len=64,
                                     training={"learning_rate": 1e-3}), tokenizer)
    copy_of_file = tmp_path / "copy.jsonl"
    copy_of_file.write_bytes(path.read_bytes())  # same bytes elsewhere: same tokens
    prepare.prepare_data(make_config(tiny_base, tmp_path, [{"path": str(copy_of_file), "format": "alpaca"}],
                                     max_seq_len=64), tokenizer)
    assert entries(tmp_path) == 1

    # Each thing that changes tokens or masks misses it.
    expected = 1
    for fields in ({"max_seq_len": 32}, {"max_seq_len": 64, "completion_only_loss": False}):
        prepare.prepare_data(make_config(tiny_base, tmp_path, sources, **fields), tokenizer)
        expected += 1
        assert entries(tmp_path) == expected
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = tokenizer.chat_template.replace("<|assistant|>", "<|user|>")
    prepare.prepare_data(base, templated)
    assert entries(tmp_path) == expected + 1
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<new_token>"])
    prepare.prepare_data(base, grown)
    assert entries(tmp_path) == expected + 2
    write_jsonl(path, rows[:-1] + [{"instruction": "Repeat x", "input": "", "output": "x x"}])  # one row edited
    prepare.prepare_data(base, tokenizer)
    assert entries(tmp_path) == expected + 3
    capped = make_config(tiny_base, tmp_path, [{**sources[0], "max_examples": 10}], max_seq_len=64)
    prepare.prepare_data(capped, tokenizer)
    assert entries(tmp_path) == expected + 4


def test_a_cached_run_reads_the_memory_map_not_python_lists(tiny_base, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(50)])
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "text"}], eval_fraction=0.1)
    prepared = prepare.prepare_data(cfg, tokenizer)
    for split in (prepared.train, prepared.eval):
        assert split.column_names == ["input_ids", "labels"]
        assert split.cache_files and all(Path(f["filename"]).is_relative_to(tmp_path / "cache") for f in split.cache_files)
        assert split._indices is not None  # split, mix and shuffle are an index mapping over the files
    assert len(prepared.train) + len(prepared.eval) == 50


def task_and_general(tiny_base, tmp_path, sizes: tuple[int, int], weights: tuple[float, float], **fields):
    """(task file, general file, config mixing them by `weights`): prompt_completion "q{i}:" -> " task{i}", and
    text "general text {i}", the seeds' task + general-data mix."""
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"q{i}:", "completion": f" task{i}"} for i in range(sizes[0])])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general text {i}"} for i in range(sizes[1])])
    cfg = make_config(tiny_base, tmp_path, [
        {"path": str(task), "format": "prompt_completion", "weight": weights[0]},
        {"path": str(general), "format": "text", "weight": weights[1]},
    ], **fields)
    return task, general, cfg


def test_mixing_is_exact_and_the_eval_split_is_disjoint(tiny_base, tmp_path, tokenizer):
    task, general, cfg = task_and_general(tiny_base, tmp_path, (200, 1000), (0.95, 0.05), eval_fraction=0.05)
    prepared = prepare.prepare_data(cfg, tokenizer)
    assert {path: s["examples"] for path, s in prepared.stats.items()} == {str(task): 190, str(general): 10}
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prepared.train["input_ids"]]
    assert len(texts) == len(set(texts)) == 200  # no example repeated
    held = {tokenizer.decode(ids, skip_special_tokens=True) for ids in prepared.eval["input_ids"]}
    assert len(held) == 10 and not held & set(texts)
    assert {prompt for prompt, _ in prepared.eval_pairs} <= {text.split(" ")[0] for text in held}


def test_every_token_carrying_loss_under_completion_only_stops_the_run(tiny_base, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "", "completion": f"answer {i}"} for i in range(5)])
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}], eval_fraction=0)
    with pytest.raises(UserError, match=r"^data.sources\[0\]: \S+pc.jsonl: every token carries loss although "
                                        r"data.completion_only_loss is on: the prompt is never masked"):
        prepare.prepare_data(cfg, tokenizer)
    # the same rows with completion_only_loss off are what the user asked for
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}], eval_fraction=0,
                      completion_only_loss=False)
    assert len(prepare.prepare_data(cfg, tokenizer).train) == 5


def test_an_empty_loss_mask_stops_the_run_and_names_the_cause():
    import numpy as np

    cfg = RunConfig.model_validate({"method": "lora", "output_dir": "/tmp/x", "model": {"name_or_path": "m"},
                                    "data": {"sources": [{"path": "c.jsonl", "format": "chat"}]}})
    rows = np.arange(3)
    columns = {"tokens": np.array([9, 9, 9]), "tokens_cut": np.array([0, 0, 0]), "loss_tokens": np.zeros(3, int),
               "prompt_tokens": np.array([8, 8, 8])}
    with pytest.raises(UserError, match=r"^data.sources\[0\]: c.jsonl: no example has a token that carries loss: "
                                        r"the loss mask is empty"):
        prepare.audit_masks("data.sources[0]", "c.jsonl", "chat", columns, rows, cfg)
    columns["loss_tokens"] = np.array([0, 1, 1])  # one example truncated to nothing: dropped, not an error
    prepare.audit_masks("data.sources[0]", "c.jsonl", "chat", columns, rows, cfg)


def test_a_row_the_chat_template_refuses_is_named_by_its_line(tiny_base, tmp_path, tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (  # the tiny template, but refusing a system message as Gemma 2's does
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "system", "content": "be brief"}, *good["messages"]]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "chat"}], eval_fraction=0)
    with pytest.raises(UserError, match=rf"^{path}:4: .*System role not supported$"):
        prepare.prepare_data(cfg, strict)
    assert entries(tmp_path) == 0 and not list((tmp_path / "cache").glob("*.tmp-*"))


def test_streaming_mixes_by_weight_and_trains(tiny_base, tmp_path, tokenizer):
    _, _, cfg = task_and_general(tiny_base, tmp_path, (3000, 3000), (3, 1), training={"max_steps": 2}, streaming=True)
    assert cfg.data.eval_fraction == 0
    prepared = prepare.prepare_data(cfg, tokenizer)
    assert entries(tmp_path) == 0  # nothing tokenized ahead
    from itertools import islice

    drawn = [tokenizer.decode(e["input_ids"]) for e in islice(iter(prepared.train), 2000)]
    share = sum("task" in text for text in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.04  # 3:1 by weight, in expectation (binomial sd ~0.01)
    assert all(set(e) == {"input_ids", "labels"} for e in islice(iter(prepared.train), 5))


def test_streaming_needs_max_steps_and_no_eval_fraction(tmp_path):
    from tunekit import config as config_mod

    base = {"method": "lora", "output_dir": str(tmp_path / "o"), "model": {"name_or_path": "m"},
            "data": {"sources": [{"path": "a.jsonl", "format": "text"}], "streaming": True}}
    with pytest.raises(Exception, match="data.streaming: a stream has no length"):
        config_mod.parse(base)
    with pytest.raises(Exception, match="data.eval_fraction: a streamed source has no known size"):
        config_mod.parse({**base, "training": {"max_steps": 5},
                          "data": {**base["data"], "eval_fraction": 0.1}})


@pytest.mark.slow
def test_a_two_process_launch_tokenizes_once(tiny_base, tmp_path):
    """`accelerate launch` with 2 processes on a cold cache: one process tokenizes, the other waits and loads it."""
    rows = [{"instruction": f"Repeat {i}", "input": "", "output": f"{i} {i}"} for i in range(3000)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"method: lora\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_base}\n"
                      f"data:\n  sources:\n    - path: {path}\n      format: alpaca\n  cache_dir: {tmp_path / 'cache'}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
              "configs/accelerate/cpu-2proc-zero3.yaml", "-m", "tunekit", "prepare", str(config)]
    result = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).splitlines()
    tokenized = [line for line in lines if ": tokenizing 3,000 examples" in line]
    hits = [line for line in lines if "cache hit (3,000 examples, tokenized by rank" in line]
    assert len(tokenized) == 1 and len(hits) == 1, lines
    assert entries(tmp_path) == 1
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["prepared_by"].startswith("rank ") and meta["prepared_by"] in hits[0]


def test_prepare_prints_the_per_source_table(tiny_base, tmp_path, capsys):
    from tunekit.cli import main

    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Repeat {i}", "output": f"{i}"} for i in range(40)])
    config = tmp_path / "run.yaml"
    config.write_text(f"method: lora\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_base}\n"
                      f"data:\n  sources:\n    - path: {path}\n      format: alpaca\n  cache_dir: {tmp_path / 'cache'}\n")
    assert main(["prepare", str(config)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("source"))
    assert header.split() == ["source", "examples", "tokens", "loss", "tok", "share", "truncated", "dropped"]
    row = next(line.split() for line in out.splitlines() if line.split() and line.split()[0].endswith("a.jsonl"))
    assert row[1] == "38" and row[4] == "100.0%"  # 40 minus the 5% eval hold-out (2)
    assert not (tmp_path / "out").exists()  # prepare writes only the cache
