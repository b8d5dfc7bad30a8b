"""Preference pairs (format preference) through the shared data pipeline: row checks named by FILE:LINE, tokens cut
where the SFT paths cut them (the scored answer tokens are exactly the SFT loss tokens of the same conversation),
truncation and drops counted, the cache, mixing, the eval split, `prepare` and `inspect-data`."""

from __future__ import annotations

import json

import pytest

from test_chat_templates import FAMILIES, base_bpe, tokenizers  # noqa: F401 - fixtures: every family's template
from test_data import tokenizer, write_jsonl  # noqa: F401 - tokenizer is a fixture (the tiny base's)
from tunekit import data, prepare
from tunekit.chat import render
from tunekit.config import RunConfig
from tunekit.errors import UserError

GOOD = {"prompt": "Say hi to Bob:", "chosen": " hi Bob", "rejected": " bye Bob"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


CHAT_GOOD = {"prompt": [user("hello")], "chosen": [assistant("hi there")], "rejected": [assistant("go away")]}


def pair_config(tiny_base, tmp_path, sources, objective="dpo", **data_fields) -> RunConfig:
    return RunConfig.model_validate({
        "method": "lora", "objective": objective,
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tiny_base)},
        "data": {"sources": sources, "cache_dir": str(tmp_path / "cache"), **data_fields},
    })


def entries(tmp_path) -> int:
    return len(list((tmp_path / "cache").glob("*/meta.json")))


# ---------------------------------------------------------------- bad rows


BAD_ROWS = [  # (line 2 of the file, after a good row; the expected "key: problem")
    ({"prompt": "p", "rejected": "r"}, r"chosen: missing field for format 'preference'$"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, r"rejected: missing field for format 'preference'$"),
    ({"chosen": "c", "rejected": "r"}, r"prompt: missing field for format 'preference' \(a pair whose prompt is "
                                       r"inside chosen/rejected, TRL's implicit prompt, needs it split out\)$"),
    ({"prompt": "p", "completion": "c"}, r"chosen: missing field for format 'preference' "
                                         r"\(this row looks like format 'prompt_completion'\)$"),
    ({"messages": [user("hi"), assistant("yo")]}, r"prompt: missing field for format 'preference' "
                                                  r"\(this row looks like format 'chat'\)$"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"},
     r"chosen: expected a string or a list of chat messages, got number$"),
    ({"prompt": {"role": "user", "content": "hi"}, "chosen": "c", "rejected": "r"},
     r"prompt: expected a string or a list of chat messages, got object$"),
    ({"prompt": "p", "chosen": [assistant("a")], "rejected": [assistant("b")]},
     r"chosen: chat messages, but prompt is a string: prompt, chosen and rejected must be all strings or all chat "
     r"messages$"),
    ({"prompt": [user("p")], "chosen": [assistant("a")], "rejected": "b"},
     r"rejected: a string, but prompt is chat messages: "),
    ({"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     r"prompt: empty list of messages: a chat prompt needs at least a user turn$"),
    ({"prompt": [user("p")], "chosen": [], "rejected": [assistant("b")]},
     r"chosen: empty list of messages: an answer needs at least one assistant message$"),
    ({"prompt": [user("p"), assistant("a")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     r"prompt\[1\].role: a chat prompt ends with a user turn, got \"assistant\"$"),
    ({"prompt": [user("p"), {"role": "tool", "content": "12:00"}], "chosen": [assistant("a")],
      "rejected": [assistant("b")]}, r"prompt\[1\].role: \"tool\" is not used in a preference prompt; expected one of "
                                     r"system, user, assistant$"),
    ({"prompt": [{"role": "usr", "content": "p"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     r"prompt\[0\].role: unknown role \"usr\" \(did you mean 'user'\?\)"),
    ({"prompt": ["p"], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     r"prompt\[0\]: expected a \{role, content\} object, got string$"),
    ({"prompt": [user("p")], "chosen": [user("a")], "rejected": [assistant("b")]},
     r"chosen\[0\].role: expected \"assistant\" \(an answer\), got \"user\"$"),
    ({"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [{"role": "assistant"}]},
     r"rejected\[0\].content: missing$"),
    ({"prompt": [user("p")], "chosen": [{"role": "assistant", "content": ["a"]}], "rejected": [assistant("b")]},
     r"chosen\[0\].content: expected a string, got array$"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"},
     r"rejected: chosen and rejected are identical: the pair teaches nothing$"),
    ({"prompt": [user("p")], "chosen": [assistant("same")], "rejected": [{**assistant("same"), "weight": 0}]},
     r"rejected: chosen and rejected are identical: the pair teaches nothing$"),  # extra keys render nothing
    (["p", "c", "r"], r"expected a JSON object, got array$"),
]


@pytest.mark.parametrize("row, problem", BAD_ROWS, ids=[f"bad-{i}" for i in range(len(BAD_ROWS))])
def test_a_bad_pair_is_named_by_file_line_and_key_and_nothing_is_written(row, problem, tiny_base, tmp_path,
                                                                         tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}])
    with pytest.raises(UserError, match=rf"^{path}:2: {problem}"):
        prepare.prepare_data(cfg, tokenizer)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_a_bad_json_line_and_a_bad_eval_file_are_named_too(tiny_base, tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"prompt": "p", "chosen": "c",\n')
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}])
    with pytest.raises(UserError, match=rf"^{path}:3: bad JSON line"):
        prepare.prepare_data(cfg, tokenizer)
    train = write_jsonl(tmp_path / "train.jsonl", [{**GOOD, "chosen": f" hi {i}"} for i in range(5)])
    held = write_jsonl(tmp_path / "held.jsonl", [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(train), "format": "preference"}], eval_path=str(held))
    with pytest.raises(UserError, match=rf"^{held}:2: rejected: chosen and rejected are identical"):
        prepare.prepare_data(cfg, tokenizer)
    assert not (tmp_path / "out").exists()


def test_the_cli_prints_one_error_line_and_exits_2(tiny_base, tmp_path, capsys):
    from tunekit.cli import main

    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD, {**GOOD, "chosen": [assistant("x")]}])
    config = tmp_path / "run.yaml"
    config.write_text(f"method: lora\nobjective: dpo\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: "
                      f"{tiny_base}\ndata:\n  sources:\n    - path: {path}\n      format: preference\n"
                      f"  cache_dir: {tmp_path / 'cache'}\n")
    assert main(["prepare", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}:3: chosen: chat messages, but prompt is a string: prompt, chosen and rejected "
                      "must be all strings or all chat messages"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_other_formats_recognize_a_pair():
    assert data.check_row(GOOD, "prompt_completion") == \
        "completion: missing field for format 'prompt_completion' (this row looks like format 'preference')"
    assert data.check_row(CHAT_GOOD, "chat") == \
        "messages: missing field for format 'chat' (this row looks like format 'preference')"
    assert data.check_row(GOOD, "preference") is None and data.check_row(CHAT_GOOD, "preference") is None


def test_a_template_that_renders_the_prompt_differently_per_answer_is_named_by_line(tiny_base, tmp_path, tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)  # the tiny template, plus a header that depends on the last message
    odd.chat_template = "{% if messages[-1]['content'] == 'no' %}NO {% endif %}" + tokenizer.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_GOOD, {**CHAT_GOOD, "rejected": [assistant("no")]}])
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}], eval_fraction=0)
    with pytest.raises(UserError, match=rf"^{path}:2: prompt: the chat template of \S+ renders the prompt differently "
                                        r"before chosen and before rejected"):
        prepare.prepare_data(cfg, odd)
    assert entries(tmp_path) == 0 and not list((tmp_path / "cache").glob("*.tmp-*"))


# ---------------------------------------------------------------- tokens: the SFT paths' cut, one scored answer


def sft(messages_or_row, fmt: str, tokenizer) -> dict:
    row = {"messages": messages_or_row} if fmt == "chat" else messages_or_row
    return data.tokenize(data.segments(row, fmt, tokenizer), tokenizer, 1 << 20, completion_only=True)


def test_string_pairs_tokenize_as_prompt_completion(tokenizer):
    rows = [GOOD, {"prompt": "", "chosen": "x y", "rejected": "z"}, {"prompt": "Q: 2+2?\nA:", "chosen": " 4",
                                                                     "rejected": " 5 or so"}]
    columns = data.encode_pairs([data.pair_pieces(row, tokenizer) for row in rows], tokenizer, 1 << 20)
    for index, row in enumerate(rows):
        prompt = columns["prompt_ids"][index]
        for name in ("chosen", "rejected"):
            answer = columns[f"{name}_ids"][index]
            reference = sft({"prompt": row["prompt"], "completion": row[name]}, "prompt_completion", tokenizer)
            assert prompt + answer == reference["input_ids"]
            assert [label != data.IGNORE_INDEX for label in reference["labels"]] == \
                [False] * len(prompt) + [True] * len(answer)
            assert tokenizer.decode(prompt + answer) == tokenizer.bos_token + row["prompt"] + row[name] + \
                tokenizer.eos_token
        assert columns["loss_tokens"][index] == len(columns["chosen_ids"][index]) + len(columns["rejected_ids"][index])
        assert columns["prompt_tokens"][index] == len(prompt) - 1  # the prepended bos is not the user's prompt


CONVERSATIONS = [  # (prompt, chosen, rejected)
    ([user("What is the capital of France?")], [assistant("Paris is the capital of France.")],
     [assistant("Rome.\nIt has been the capital since 1871.")]),
    ([{"role": "system", "content": "You are a terse geography tutor."}, user("What is the capital of France?"),
      assistant("Paris is the capital of France."), user("And of Italy?")],
     [assistant("Rome.\nIt has been the capital since 1871.")], [assistant("The Tiber river runs through Rome.")]),
]


def check_chat_pair(tokenizer, prompt, chosen, rejected, system_ok=True):
    """The invariants, per answer: prompt_ids + answer_ids are the SFT chat path's tokens of prompt + answer up to
    the end of its scored span, the answer is exactly the span SFT scores for that turn, what follows (template
    filler) is unscored in SFT too, the text is the rendered conversation, and the prompt is what generation starts
    from (the template's generation prompt)."""
    if not system_ok:
        prompt = [message for message in prompt if message["role"] != "system"]
    pieces = data.pair_pieces({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer)
    columns = data.encode_pairs([pieces], tokenizer, 1 << 20)
    prompt_ids = columns["prompt_ids"][0]
    for answer, answer_ids in ((chosen, columns["chosen_ids"][0]), (rejected, columns["rejected_ids"][0])):
        reference = sft(prompt + answer, "chat", tokenizer)
        scored = [label != data.IGNORE_INDEX for label in reference["labels"]]
        n = len(prompt_ids) + len(answer_ids)
        assert reference["input_ids"][:n] == prompt_ids + answer_ids
        assert scored[len(prompt_ids):n] == [True] * len(answer_ids)  # the answer: all of the last turn's loss
        assert not any(scored[n:])  # the filler after the end-of-turn token is not scored by SFT either
        assert not scored[len(prompt_ids) - 1]  # the answer starts where SFT's loss starts
        rendered = render(tokenizer, prompt + answer)
        bos = tokenizer.bos_token or ""
        expected = rendered if rendered.startswith(bos) else bos + rendered  # encode's bos rule, as SFT
        assert expected.startswith(tokenizer.decode(prompt_ids + answer_ids))
        assert tokenizer.decode(reference["input_ids"]) == expected
    generation = render(tokenizer, prompt, add_generation_prompt=True)
    assert tokenizer.decode(prompt_ids) in (generation, (tokenizer.bos_token or "") + generation)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_pairs_score_exactly_the_sft_assistant_mask(conversation, tokenizer):
    check_chat_pair(tokenizer, *CONVERSATIONS[conversation])


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_pairs_on_every_familys_template(tokenizers, name):
    """The same invariants on the real templates of the major families: Llama 3 (strips content), Qwen 3 (an empty
    think block in the last turn), Gemma (no system role), Mistral/Llama 2 (no generation prompt: the cue is
    " [/INST]"), Phi-3 (eos after the last turn)."""
    for prompt, chosen, rejected in CONVERSATIONS:
        check_chat_pair(tokenizers[name], prompt, chosen, rejected, system_ok=FAMILIES[name].system)


def test_an_answer_of_several_assistant_messages_is_one_scored_run(tokenizer):
    chosen = [assistant("first part"), assistant("second part")]
    pieces = data.pair_pieces({"prompt": [user("go")], "chosen": chosen, "rejected": [assistant("no")]}, tokenizer)
    columns = data.encode_pairs([pieces], tokenizer, 1 << 20)
    text = tokenizer.decode(columns["chosen_ids"][0])
    assert text.startswith("first part" + tokenizer.eos_token) and text.endswith("second part" + tokenizer.eos_token)
    assert tokenizer.decode(columns["prompt_ids"][0] + columns["chosen_ids"][0]) == \
        render(tokenizer, [user("go"), *chosen]).rstrip("\n")


def test_segments_of_a_pair_are_prompt_and_chosen(tokenizer):
    """What the merge check and any SFT-shaped caller get from a pair: the prompt unscored, the chosen answer scored."""
    assert data.segments(GOOD, "preference", tokenizer) == [("Say hi to Bob:", False), (" hi Bob<|end|>", True)]
    assert data.eval_pair(GOOD, "preference", tokenizer) == ("Say hi to Bob:", " hi Bob")
    assert data.eval_pair(CHAT_GOOD, "preference", tokenizer) == \
        (render(tokenizer, CHAT_GOOD["prompt"], add_generation_prompt=True), "hi there")


# ---------------------------------------------------------------- the pipeline


def test_truncation_cuts_answers_and_drops_pairs_whose_prompt_fills_the_window(tiny_base, tmp_path, tokenizer, capsys):
    long_prompt = {"prompt": "word " * 40, "chosen": " yes", "rejected": " no"}
    long_answer = {"prompt": "Say:", "chosen": " word" * 40, "rejected": " no"}
    rows = [long_prompt, long_answer, GOOD]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}], max_seq_len=24,
                      eval_fraction=0)
    prepared = prepare.prepare_data(cfg, tokenizer)
    stats = prepared.stats[str(path)]
    assert stats["examples"] == 3 and stats["dropped_no_loss_tokens"] == 1 and stats["truncated"] == 2
    assert "1 of 3 pairs have a prompt that fills data.max_seq_len=24" in capsys.readouterr().out
    assert prepared.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert len(prepared.train) == 2
    full = data.encode_pairs([data.pair_pieces(long_answer, tokenizer)], tokenizer, 1 << 20)
    for pair in prepared.train:
        assert len(pair["prompt_ids"]) + len(pair["chosen_ids"]) <= 24
        assert len(pair["prompt_ids"]) + len(pair["rejected_ids"]) <= 24
        if pair["prompt_ids"] == full["prompt_ids"][0]:  # the long answer: its start kept, the rest cut
            assert pair["chosen_ids"] == full["chosen_ids"][0][:24 - len(pair["prompt_ids"])]
            assert pair["rejected_ids"] == full["rejected_ids"][0]
            cut = len(full["chosen_ids"][0]) - len(pair["chosen_ids"])
    source = prepare.load_source(str(path), "preference", "train", None, tokenizer, cfg, log=lambda line: None)
    columns = prepare.token_columns(source.tokens)
    assert columns["tokens_cut"][1] == cut
    assert stats["tokens"] == sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                  for p in prepared.train)
    assert stats["loss_tokens"] == sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in prepared.train)

    cfg = pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}], max_seq_len=4,
                      eval_fraction=0)
    with pytest.raises(UserError, match=r"no example has a token that carries loss: every example was cut at "
                                        r"data.max_seq_len=4"):
        prepare.prepare_data(cfg, tokenizer)


def test_prepared_pairs_are_cached_and_the_format_is_in_the_key(tiny_base, tmp_path, tokenizer, monkeypatch):
    """Tokenized in two worker processes (the same tokens as in one), then read back from the cache."""
    rows = [{**GOOD, "chosen": f" hi {i}", "completion": f" hi {i}"} for i in range(20)]  # readable both ways
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}], eval_fraction=0,
                      num_proc=2)
    with monkeypatch.context() as patched:
        patched.setattr(prepare, "ROWS_PER_WORKER", 1)  # two workers even for 20 rows
        first = prepare.prepare_data(cfg, tokenizer)
    assert entries(tmp_path) == 1
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["workers"] == 2 and len(meta["token_files"]) == 2
    in_one = data.encode_pairs([data.pair_pieces(row, tokenizer) for row in rows], tokenizer, cfg.data.max_seq_len)
    assert sorted(first.train["chosen_ids"]) == sorted(in_one["chosen_ids"])

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    with monkeypatch.context() as patched:
        patched.setattr(prepare, "encode_rows", must_not_run)
        patched.setattr(data, "encode_pairs", must_not_run)
        second = prepare.prepare_data(cfg, tokenizer)
        # eval_fraction only selects rows: still the same entry
        prepare.prepare_data(pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "preference"}],
                                         eval_fraction=0.1), tokenizer)
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert second.train[name] == first.train[name]
    # The same bytes read as prompt_completion for SFT: another entry.
    prepare.prepare_data(pair_config(tiny_base, tmp_path, [{"path": str(path), "format": "prompt_completion"}],
                                     objective="sft", eval_fraction=0), tokenizer)
    assert entries(tmp_path) == 2


def test_two_preference_sources_mix_by_weight_with_a_held_out_split(tiny_base, tmp_path, tokenizer, preference_data):
    """The tiny task's string pairs and its chat pairs mixed 3:1, eval held out of the first source."""
    strings, chats = str(preference_data["train"]), str(preference_data["chat_train"])
    cfg = pair_config(tiny_base, tmp_path, [{"path": strings, "format": "preference", "weight": 3},
                                            {"path": chats, "format": "preference", "weight": 1}],
                      eval_fraction=0.125, max_seq_len=256)
    prepared = prepare.prepare_data(cfg, tokenizer)
    assert {path: s["examples"] for path, s in prepared.stats.items()} == {strings: 224, chats: 75}  # 224 / 3
    assert len(prepared.train) == 299 and len(prepared.eval) == 32
    assert abs(sum(s["token_share"] for s in prepared.stats.values()) - 1) < 1e-9
    for split in (prepared.train, prepared.eval):
        assert split.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    decoded = [tokenizer.decode(pair["prompt_ids"]) for pair in prepared.train]
    assert sum(text.startswith(tokenizer.bos_token + "<|user|>") for text in decoded) == 75  # the chat pairs
    train_prompts = {tokenizer.decode(pair["prompt_ids"], skip_special_tokens=True) for pair in prepared.train}
    held_prompts = {tokenizer.decode(pair["prompt_ids"], skip_special_tokens=True) for pair in prepared.eval}
    assert len(held_prompts) == 32 and not held_prompts & train_prompts
    assert len(prepared.eval_pairs) == min(32, cfg.eval.task_samples)
    held_rows = {row["prompt"]: row["chosen"] for row in data.read_rows(strings, "preference")}
    for prompt, chosen in prepared.eval_pairs:
        assert held_rows[prompt] == chosen and prompt in held_prompts


def test_a_chat_eval_file_gives_generation_prompts(tiny_base, tmp_path, tokenizer, preference_data):
    cfg = pair_config(tiny_base, tmp_path, [{"path": str(preference_data["chat_train"]), "format": "preference"}],
                      eval_path=str(preference_data["chat_eval"]))
    prepared = prepare.prepare_data(cfg, tokenizer)
    assert len(prepared.train) == 256 and len(prepared.eval) == 32
    rows = data.read_rows(str(preference_data["chat_eval"]), "preference")
    prompt, chosen = prepared.eval_pairs[0]
    assert prompt == render(tokenizer, rows[0]["prompt"], add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert chosen == rows[0]["chosen"][0]["content"]
    first = prepared.eval[0]
    assert tokenizer.decode(first["prompt_ids"]) == prompt
    assert tokenizer.decode(first["chosen_ids"]) == chosen + tokenizer.eos_token


def test_inspect_data_and_prepare_show_pairs_with_scored_tokens_marked(tiny_base, tmp_path, capsys):
    from tunekit.cli import main

    rows = [{"prompt": [user(f"Reverse {i}{i + 1}")], "chosen": [assistant(f"{i + 1}{i}")],
             "rejected": [assistant(f"{i}{i + 1}")]} for i in range(1, 9)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"method: lora\nobjective: dpo\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: "
                      f"{tiny_base}\ndata:\n  sources:\n    - path: {path}\n      format: preference\n"
                      f"  cache_dir: {tmp_path / 'cache'}\n  eval_fraction: 0.25\n")
    assert main(["inspect-data", str(config), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- pair ") == 2
    header = next(line for line in out.splitlines() if line.startswith("--- pair 1"))
    assert header.endswith("; «...» = scored)")
    shown = out.split("--- pair 1", 1)[1].split("--- pair 2", 1)[0].split("\n")
    prompt = "\n".join(shown[shown.index("prompt:") + 1:shown.index("chosen:")])
    assert prompt.startswith("<|begin|><|user|>\nReverse ") and prompt.endswith("<|assistant|>\n")
    assert "«" not in prompt
    digits = prompt.split("Reverse ")[1].split("<|end|>")[0]
    chosen, rejected = shown[shown.index("chosen:") + 1], shown[shown.index("rejected:") + 1]
    assert chosen == f"«{digits[::-1]}<|end|>»" and rejected == f"«{digits}<|end|>»"
    assert "end token '<|end|>' is scored in both answers of 6/6 sampled pairs" in out
    assert "eval: 2 pairs, 2 prompts for the task metric" in out

    assert main(["prepare", str(config)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("source"))
    assert header.split() == ["source", "pairs", "tokens", "scored", "tok", "share", "truncated", "dropped"]
    row = next(line.split() for line in out.splitlines() if line.split() and line.split()[0].endswith("pairs.jsonl"))
    assert row[1] == "6" and row[4] == "100.0%"
    assert not (tmp_path / "out").exists()
