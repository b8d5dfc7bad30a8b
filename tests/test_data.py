"""The shared data pipeline on the tiny base's real tokenizer: formats, loss masks, truncation, mixing, eval split,
cache, bad files."""

import json
from pathlib import Path

import pytest

from tunekit import data, prepare
from tunekit.config import RunConfig
from tunekit.errors import UserError


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_config(tiny_base, tmp_path, sources, training=None, **data_fields) -> RunConfig:
    return RunConfig.model_validate({
        "method": "lora",
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": sources, "cache_dir": str(tmp_path / "cache"), **data_fields},
        **({"training": training} if training else {}),
    })


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def loss_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != data.IGNORE_INDEX])


def prompt_labels(example) -> list[int]:
    """Labels before the first loss-carrying token."""
    first = next(i for i, l in enumerate(example["labels"]) if l != data.IGNORE_INDEX)
    return example["labels"][:first]


FORMAT_ROWS = {
    "alpaca": {"instruction": "Repeat the word", "input": "apple", "output": "apple apple"},
    "prompt_completion": {"prompt": "Say hi to Bob:", "completion": " hi Bob"},
    "chat": {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]},
    "text": {"text": "the cat sat on the mat"},
}
EXPECTED_LOSS_TEXT = {"alpaca": "apple apple", "prompt_completion": " hi Bob", "chat": "hi there", "text": "the cat sat on the mat"}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_every_format_masks_the_prompt_and_trains_the_end_token(fmt, tokenizer):
    example = data.tokenize(data.segments(FORMAT_ROWS[fmt], fmt, tokenizer), tokenizer, 256, completion_only=True)
    assert example["input_ids"][0] == tokenizer.bos_token_id
    # A chat template may render a separator after the end-of-turn token inside the assistant turn (ours: "\n").
    assert loss_text(example, tokenizer).startswith(EXPECTED_LOSS_TEXT[fmt] + tokenizer.eos_token)
    if fmt != "text":
        labels = prompt_labels(example)
        assert labels and all(l == data.IGNORE_INDEX for l in labels)  # the prompt carries no loss
    assert tokenizer.eos_token_id in [l for l in example["labels"] if l != data.IGNORE_INDEX]


def test_chat_masks_match_the_templates_generation_markers(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo there"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]
    example = data.tokenize(data.segments({"messages": messages}, "chat", tokenizer), tokenizer, 256, True)
    reference = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"] == list(reference["input_ids"])
    assert [l != data.IGNORE_INDEX for l in example["labels"]] == [bool(m) for m in reference["assistant_masks"]]


def test_completion_only_off_trains_everything(tokenizer):
    example = data.tokenize(data.segments(FORMAT_ROWS["alpaca"], "alpaca", tokenizer), tokenizer, 256, completion_only=False)
    assert example["labels"][1:] == example["input_ids"][1:]  # all but the prepended bos


def test_truncation_is_counted_and_fully_truncated_examples_are_dropped(tiny_base, tmp_path, tokenizer):
    rows = [{"prompt": "word " * 40, "completion": "end"}, {"prompt": "short", "completion": " yes"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}],
                      max_seq_len=16, eval_fraction=0)
    prepared = prepare.prepare_data(cfg, tokenizer)
    stats = prepared.stats[str(path)]
    assert stats["truncated"] == 1 and stats["tokens_cut"] > 0 and stats["dropped_no_loss_tokens"] == 1
    assert len(prepared.train) == 1 and all(len(ids) <= 16 for ids in prepared.train["input_ids"])


def test_mixing_follows_the_weights(tiny_base, tmp_path, tokenizer):
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(190)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general text {i}"} for i in range(1000)])
    cfg = make_config(tiny_base, tmp_path, [
        {"path": str(task), "format": "prompt_completion", "weight": 0.95},
        {"path": str(general), "format": "text", "weight": 0.05},  # the seeds' "mix 5-10% general data"
    ], eval_fraction=0)
    prepared = prepare.prepare_data(cfg, tokenizer)
    counts = {path: s["examples"] for path, s in prepared.stats.items()}
    assert counts == {str(task): 190, str(general): 10}  # every task example used; general drawn to 5%
    assert len(prepared.train) == 200
    assert abs(sum(s["token_share"] for s in prepared.stats.values()) - 1) < 1e-9


def test_eval_split_is_held_out_and_gives_metric_prompts(tiny_base, tmp_path, tokenizer):
    rows = [{"instruction": f"Repeat {i}", "input": "", "output": f"{i}"} for i in range(100)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "alpaca"}], eval_fraction=0.1)
    prepared = prepare.prepare_data(cfg, tokenizer)
    assert len(prepared.eval) == 10 and len(prepared.train) == 90
    train_texts = {tokenizer.decode(ids) for ids in prepared.train["input_ids"]}
    assert not any(prompt in text for prompt, _ in prepared.eval_pairs for text in train_texts)
    prompt, expected = prepared.eval_pairs[0]
    assert prompt.startswith("### Instruction:\nRepeat ") and prompt.endswith("### Response:\n")


def test_tokenization_is_cached(tiny_base, tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(20)])
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "text"}], eval_fraction=0)
    first = prepare.prepare_data(cfg, tokenizer)
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(prepare, "encode_rows", must_not_run)
    monkeypatch.setattr(data, "encode", must_not_run)
    second = prepare.prepare_data(cfg, tokenizer)
    assert second.train["input_ids"] == first.train["input_ids"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_file_types_load_the_same_rows(tmp_path, fmt):
    import datasets

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{fmt}")(str(path))
    assert data.read_rows(str(path), "prompt_completion") == rows


@pytest.mark.parametrize(
    "content, fmt, expected",
    [
        ('{"text": "ok"}\n{"text": broken}\n', "text", r"bad.jsonl:2: bad JSON line"),
        ('{"instruction": "x"}\n', "alpaca", r"bad.jsonl:1: output: missing field for format 'alpaca'"),
        ("", "text", r"bad.jsonl: no examples \(empty file\)"),
        ('{"prompt": "p", "completion": "c"}\n', "chat", r"messages: missing field.*looks like format 'prompt_completion'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "chat", r"bad.jsonl:1: chat example has no assistant"),
        # field values of the wrong type, named by key (an object `output` used to train on its Python repr)
        ('{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": {"a": 1}}\n', "alpaca",
         r"^[^ ]*bad.jsonl:2: output: expected a string, got object$"),
        ('{"instruction": 3, "output": "y"}\n', "alpaca", r"bad.jsonl:1: instruction: expected a string, got number$"),
        ('{"instruction": "x", "input": ["a"], "output": "y"}\n', "alpaca", r"bad.jsonl:1: input: expected a string, got array$"),
        ('{"prompt": "p", "completion": true}\n', "prompt_completion", r"bad.jsonl:1: completion: expected a string, got boolean$"),
        ('{"text": ["a", "b"]}\n', "text", r"bad.jsonl:1: text: expected a string, got array$"),
        ('{"messages": {"role": "user"}}\n', "chat", r"bad.jsonl:1: messages: expected a list of \{role, content\} objects, got object$"),
        ('{"messages": ["hi", "yo"]}\n', "chat", r"bad.jsonl:1: messages\[0\]: expected a \{role, content\} object, got string$"),
        ('{"messages": [{"role": "user"}]}\n', "chat", r"bad.jsonl:1: messages\[0\].content: missing$"),
        ('{"messages": [{"from": "human", "value": "hi"}]}\n', "chat", r"messages\[0\]: 'from'/'value' is the ShareGPT layout"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]}\n', "chat",
         r"bad.jsonl:1: messages\[1\].role: unknown role \"asistant\" \(did you mean 'assistant'\?\); "
         r"expected one of system, user, assistant, tool$"),
        ('{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n', "chat",
         r"messages\[0\].role: unknown role \"human\" \(did you mean 'user'\?\)"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text"}]}]}\n',
         "chat", r"bad.jsonl:1: messages\[1\].content: expected a string, got array$"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}]}\n',
         "chat", r"bad.jsonl:1: messages\[1\].content: expected a string, got null$"),
        # blank lines are skipped, but the error names the line in the file, not the example's index
        ('{"text": "a"}\n\n\n{"text": 5}\n', "text", r"bad.jsonl:4: text: expected a string, got number$"),
    ],
)
def test_malformed_data_is_named_by_file_and_line(tmp_path, content, fmt, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=expected):
        data.read_rows(str(path), fmt)


def test_inspect_data_marks_loss_tokens_and_reports_shares(tiny_base, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Repeat x", "input": "", "output": "x"}] * 10)
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "alpaca"}], eval_fraction=0.2)
    report = prepare.inspect_data(cfg, num_samples=1)
    assert "«x<|end|>»" in report
    assert "end token '<|end|>' carries loss in 8/8 sampled examples" in report
    assert "100.0%" in report


def test_a_training_set_truncated_to_nothing_is_a_clear_error(tiny_base, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 40, "completion": " end"}] * 3)
    cfg = make_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}],
                      max_seq_len=8, eval_fraction=0)
    with pytest.raises(UserError, match=r"^data.sources\[0\]: \S+long.jsonl: no example has a token that carries loss: "
                                        r"every example was cut at data.max_seq_len=8 before its completion; raise it$"):
        prepare.prepare_data(cfg, tokenizer)


def test_chat_accepts_system_and_tool_roles(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "time?"},
                {"role": "assistant", "content": "checking"}, {"role": "tool", "content": "12:00"},
                {"role": "assistant", "content": "noon", "weight": 1}]  # extra keys pass through to the template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    rows = data.read_rows(str(path), "chat")
    example = data.tokenize(data.segments(rows[0], "chat", tokenizer), tokenizer, 256, True)
    assert "checking" in loss_text(example, tokenizer) and "noon" in loss_text(example, tokenizer)
    assert "12:00" not in loss_text(example, tokenizer)


def test_a_conversation_the_chat_template_refuses_is_one_error_line(tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)  # a template like Gemma 2's, which raises on a system message
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}]}
    with pytest.raises(UserError, match=r"^the chat template of \S+ refuses a conversation starting 'be brief': "
                                        r"System role not supported$"):
        data.segments(row, "chat", strict)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path, suffix):
    good, bad = "caf\u00e9".encode(), "caf\u00e9".encode("latin-1")  # b"caf\xc3\xa9" vs b"caf\xe9"
    contents = {
        "jsonl": b'{"text": "' + good + b'"}\n{"text": "ok"}\n{"text": "' + bad + b'"}\n',
        "json": b'[\n  {"text": "' + good + b'"},\n  {"text": "' + bad + b'"}\n]\n',
        "csv": b"text\n" + good + b"\nok\n" + bad + b"\n",
    }
    line = {"jsonl": 3, "json": 3, "csv": 4}[suffix]
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(contents[suffix])
    with pytest.raises(UserError, match=rf"^[^ ]*latin1.{suffix}:{line}: not UTF-8 \(byte 0xe9 at column \d+\); "):
        data.read_rows(str(path), "text")


def test_a_utf8_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n')
    assert data.read_rows(str(path), "text") == [{"text": "a"}]


def test_errors_in_a_json_list_name_the_line_of_the_example(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": "p", "completion": {"text": "c"}}]
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps({"version": 1, "data": rows}, indent=2))  # each example spans 4 lines
    line = path.read_text().splitlines().index("    {", 1 + 4 * 3) + 1
    with pytest.raises(UserError, match=rf"pretty.json:{line}: completion: expected a string, got object$"):
        data.read_rows(str(path), "prompt_completion")


def test_csv_cells_are_read_as_the_text_written(tmp_path):
    """No number or "NA" guessing (pandas would turn "007" into 7 and "NA" into a missing value); empty is missing."""
    path = tmp_path / "rows.csv"
    path.write_text('instruction,input,output\nReverse 700,,007\nSay NA,x,NA\n"two\nlines",,1.50\n')
    assert data.read_rows(str(path), "alpaca") == [
        {"instruction": "Reverse 700", "input": None, "output": "007"},
        {"instruction": "Say NA", "input": "x", "output": "NA"},
        {"instruction": "two\nlines", "input": None, "output": "1.50"},
    ]
    path.write_text("prompt,completion\np,c\np,c,extra\n")
    with pytest.raises(UserError, match=r"rows.csv:3: 3 cells, but the header names 2$"):
        data.read_rows(str(path), "prompt_completion")


def test_a_parquet_file_the_library_cannot_read_is_one_error_line(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(UserError, match=r"^[^ ]*broken.parquet: cannot read parquet file: [^\n]+$"):
        data.read_rows(str(path), "text")


def test_bad_data_stops_train_before_anything_is_created(tiny_base, tmp_path, capsys):
    from tunekit.cli import main

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": "caf\xe9"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"method: lora\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_base}\n"
                      f"data:\n  sources:\n    - path: {path}\n      format: alpaca\n  cache_dir: {tmp_path / 'cache'}\n")
    assert main(["train", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}:2: not UTF-8 (byte 0xe9 at column 36); save the file as UTF-8"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
