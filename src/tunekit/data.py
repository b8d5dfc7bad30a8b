"""The one data pipeline every backend uses: read → check → split → mix → tokenize with loss masks → cache.

Every example becomes a list of (text, carries_loss) segments, tokenized segment by segment, so that the loss mask
is exact and the same for all four formats:
  alpaca             "### Instruction: ... ### Response:\n" (no loss) + output + eos (loss)
  prompt_completion  prompt (no loss) + completion + eos (loss)
  text               text + eos (loss everywhere)
  chat               the tokenizer's chat template; each assistant turn (with its end-of-turn token) carries loss
The result is a `datasets.Dataset` with `input_ids` and `labels` (-100 where no loss), already truncated to
`data.max_seq_len`; TRL's SFTTrainer takes it as is and packs it when `data.packing` is on.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunekit.config import RunConfig, SourceConfig, looks_local
from tunekit.errors import UserError, first_line
from tunekit.rundir import write_text_atomically

IGNORE_INDEX = -100  # label value that the loss skips
CACHE_VERSION = 2  # bump when tokenization changes, so stale caches are not reused
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class PreparedData:
    """What the trainer needs: tokenized splits, the task metric's held-out prompts, and per-source statistics."""

    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    eval_pairs: list[tuple[str, str]] = field(default_factory=list)  # (prompt text, expected completion)
    stats: dict[str, dict] = field(default_factory=dict)  # source path -> counts and token share


# ---------------------------------------------------------------- reading and checking

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what the major templates render (Llama 3, Qwen 2+, Mistral)
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # ShareGPT, Gemma
STRING_FIELDS = {  # format -> fields that must be strings when present (required ones are checked for presence first)
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "chat": (),
}


def read_rows(path: str, fmt: str, split: str = "train", max_examples: int | None = None) -> list[dict]:
    """Rows of a local JSON/JSONL/Parquet/CSV file (or a hub dataset), each checked for `fmt`'s fields.

    Raises UserError `FILE:LINE: problem` (`FILE row N` for parquet and hub datasets) for bytes that are not UTF-8,
    a bad JSON line, a missing field or one of the wrong type, or an empty file; whatever `datasets` raises while
    loading a parquet file or a hub dataset becomes one such line too.
    """
    if not looks_local(path):
        rows, where = _read_hub(path, split), (lambda i: f"{path} row {i + 1}")
    else:
        suffix = Path(path).suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise UserError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .parquet or .csv)")
        try:
            rows, where = readers[suffix](path)
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    if not rows:
        raise UserError(f"{path}: no examples (empty file)")
    for index, row in enumerate(rows):
        if (problem := check_row(row, fmt)) is not None:
            raise UserError(f"{where(index)}: {problem}")
    return rows[:max_examples] if max_examples else rows


# Each reader returns (rows, where): where(i) names row i for an error message, "FILE:LINE" when the file has lines.
# Text files are opened as utf-8-sig: UTF-8, with the byte-order mark some editors write skipped.


def _read_jsonl(path: str) -> tuple[list, Callable[[int], str]]:
    rows, lines = [], []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: bad JSON line: {exc.msg}") from None
            lines.append(number)
    return rows, lambda i: f"{path}:{lines[i]}"


def _read_json(path: str) -> tuple[list, Callable[[int], str]]:
    text = Path(path).read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: bad JSON: {exc.msg}") from None
    if isinstance(data, dict):  # {"data": [...]}-style files
        lists = [value for value in data.values() if isinstance(value, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of examples")
    return data, lambda i: f"{path}:{_json_example_lines(text)[i]}"  # lines found only when an error needs one


def _json_example_lines(text: str) -> list[int]:
    """Line of the start of each example in a valid JSON file holding a list (or an object with one list value)."""
    decoder, space = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    pos = space.match(text).end()
    if text[pos] == "{":  # walk "key": value pairs up to the list
        pos = space.match(text, pos + 1).end()
        while True:
            _, pos = decoder.raw_decode(text, pos)  # the key
            pos = space.match(text, space.match(text, pos).end() + 1).end()  # past ':'
            if text[pos] == "[":
                break
            _, pos = decoder.raw_decode(text, pos)
            pos = space.match(text, space.match(text, pos).end() + 1).end()  # past ','
    lines, line, counted = [], 1, 0
    pos = space.match(text, pos + 1).end()  # past '['
    while text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
        pos = space.match(text, pos).end()
        pos = space.match(text, pos + 1).end() if text[pos] == "," else pos
    return lines


def _read_csv(path: str) -> tuple[list, Callable[[int], str]]:
    """Every cell as the text written (no number or "NA" guessing); an empty cell is a missing value."""
    rows, lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        for cells in reader:
            if not cells:
                continue  # blank line
            if len(cells) > len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(cells)} cells, but the header names {len(header)}")
            rows.append({name: cell or None for name, cell in zip(header, cells + [""] * (len(header) - len(cells)))})
            lines.append(reader.line_num)  # the row's last line (its only one unless a quoted cell spans lines)
    return rows, lambda i: f"{path}:{lines[i]}"


def _read_parquet(path: str) -> tuple[list, Callable[[int], str]]:
    import datasets

    try:
        rows = datasets.load_dataset("parquet", data_files=path, split="train").to_list()
    except Exception as exc:  # pyarrow and datasets raise many types; the user needs one line
        raise UserError(f"{path}: cannot read parquet file: {first_line(exc, with_type=False)}") from None
    return rows, lambda i: f"{path} row {i + 1}"


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as exc:  # the hub client raises many types; the user needs one line
        raise UserError(f"{name}: could not load dataset (split {split}): {first_line(exc, with_type=False)}") from None


def _not_utf8(path: str) -> UserError:
    """The error for a text file that does not decode as UTF-8, naming the first bad line and byte."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):  # b"\n" never occurs inside a multi-byte UTF-8 character
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return UserError(f"{path}:{number}: not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                                 "save the file as UTF-8")
    return UserError(f"{path}: not UTF-8; save the file as UTF-8")


def check_row(row: Any, fmt: str) -> str | None:
    """The first problem of one example for format `fmt`, as "key: problem" (None when it is fine).

    Pure, so any reader can use it: required fields present, text fields strings (an object would otherwise train
    on its Python repr), chat messages {role, content} objects with a known role and string content.
    """
    if not isinstance(row, dict):
        return f"expected a JSON object, got {_json_type(row)}"
    for name in REQUIRED_FIELDS[fmt]:
        if row.get(name) is None:
            guess = next((other for other, names in REQUIRED_FIELDS.items() if all(n in row for n in names)), None)
            hint = f" (this row looks like format '{guess}')" if guess and guess != fmt else ""
            return f"{name}: missing field for format '{fmt}'{hint}"
    for name in STRING_FIELDS[fmt]:
        if row.get(name) is not None and not isinstance(row[name], str):  # alpaca's `input` may be absent or null
            return f"{name}: expected a string, got {_json_type(row[name])}"
    if fmt == "chat":
        return _check_messages(row["messages"])
    return None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"messages: expected a list of {{role, content}} objects, got {_json_type(messages)}"
    for index, message in enumerate(messages):
        key = f"messages[{index}]"
        if not isinstance(message, dict):
            return f"{key}: expected a {{role, content}} object, got {_json_type(message)}"
        if "from" in message and "value" in message and "role" not in message:
            return f"{key}: 'from'/'value' is the ShareGPT layout; chat messages need 'role' and 'content'"
        for name in ("role", "content"):
            if name not in message:
                return f"{key}.{name}: missing"
        role = message["role"]
        if role not in CHAT_ROLES:  # a typo'd role would be rendered as plain text by many templates, or crash them
            near = ROLE_ALIASES.get(str(role).lower()) or next(iter(difflib.get_close_matches(str(role), CHAT_ROLES, 1)), None)
            hint = f" (did you mean '{near}'?)" if near else ""
            return f"{key}.role: unknown role {json.dumps(role, default=str)}{hint}; expected one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message["content"], str):
            return f"{key}.content: expected a string, got {_json_type(message['content'])}"
    if not any(message["role"] == "assistant" for message in messages):
        return "chat example has no assistant message to learn from"
    return None


def _json_type(value: Any) -> str:
    """The JSON name of a value's type (what the user wrote), e.g. object for a dict."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- formatting


def segments(row: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, carries_loss) pieces, in order; eos/end-of-turn tokens are inside the loss pieces."""
    eos = tokenizer.eos_token or ""
    if fmt == "alpaca":
        return [(alpaca_prompt(row), False), (str(row["output"]) + eos, True)]
    if fmt == "prompt_completion":
        return [(str(row["prompt"]), False), (str(row["completion"]) + eos, True)]
    if fmt == "text":
        return [(str(row["text"]) + eos, True)]
    return _chat_segments(row["messages"], tokenizer)


def alpaca_prompt(row: dict) -> str:
    template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the rendered chat into prompt and assistant pieces by rendering growing prefixes of the conversation.

    Works with any template that renders a prefix of the conversation as a prefix of the text (true of the common
    ones); assistant pieces run from the generation prompt to the end of that turn, end-of-turn token included.
    """
    if tokenizer.chat_template is None:
        raise UserError("format 'chat' needs a tokenizer with a chat template (model.name_or_path has none)")

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # a template's raise_exception (e.g. roles must alternate): the user's data, one line
            raise UserError(f"data: the chat template of {tokenizer.name_or_path} refuses a conversation starting "
                            f"{json.dumps(messages[0]['content'][:40])}: {first_line(exc, with_type=False)}") from None

    pieces: list[tuple[str, bool]] = []
    done = ""  # text already assigned to pieces
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_end, turn_end = render(index, True), render(index + 1, False)
        if not (prompt_end.startswith(done) and turn_end.startswith(prompt_end)):
            raise UserError("the chat template does not render conversation prefixes as text prefixes; use format 'prompt_completion'")
        turn = turn_end[len(prompt_end):]
        # The turn carries loss up to and including its end-of-turn token; separators the template writes after it
        # (e.g. a newline) are formatting, not something the model should be trained to emit.
        cut = turn.rindex(tokenizer.eos_token) + len(tokenizer.eos_token) if tokenizer.eos_token in turn else len(turn)
        pieces += [(prompt_end[len(done):], False), (turn[:cut], True), (turn[cut:], False)]
        done = turn_end
    rest = render(len(messages), False)[len(done):]
    return [piece for piece in pieces + [(rest, False)] if piece[0]]


def eval_pair(row: dict, fmt: str, tokenizer) -> tuple[str, str] | None:
    """(prompt, expected completion) for the generation metric; None for raw text, which has no prompt."""
    if fmt == "alpaca":
        return alpaca_prompt(row), str(row["output"])
    if fmt == "prompt_completion":
        return str(row["prompt"]), str(row["completion"])
    if fmt == "chat":
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(row["messages"][:last], tokenize=False, add_generation_prompt=True)
        return prompt, str(row["messages"][last]["content"])
    return None


def tokenize(pieces: list[tuple[str, bool]], tokenizer, max_seq_len: int, completion_only: bool) -> dict:
    """input_ids/labels for one example, truncated to max_seq_len (keep the start); reports what was cut.

    A bos token is prepended when the tokenizer has one and the text does not already start with it (chat templates
    usually write it themselves).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    bos = tokenizer.bos_token
    if bos and not pieces[0][0].startswith(bos):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, carries_loss in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (carries_loss or not completion_only) else [IGNORE_INDEX] * len(ids)
    cut = max(0, len(input_ids) - max_seq_len)
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len], "tokens_cut": cut}


# ---------------------------------------------------------------- splitting, mixing, caching


def prepare_data(config: RunConfig, tokenizer) -> PreparedData:
    """Tokenized train/eval sets for the run, mixed by source weight, with each source's statistics."""
    data = config.data
    rng = random.Random(data.seed)
    per_source: list[tuple[SourceConfig, list[dict]]] = []
    eval_rows: list[dict] = []
    for index, source in enumerate(data.sources):
        rows = read_rows(source.path, source.format, source.split, source.max_examples)
        if index == 0 and data.eval_path is None and data.eval_fraction > 0:
            rows = rows[:]
            rng.shuffle(rows)
            held = max(1, int(len(rows) * data.eval_fraction))
            if held >= len(rows):
                raise UserError(f"data.eval_fraction: {source.path} has {len(rows)} examples, too few to hold out {held}")
            eval_rows, rows = rows[:held], rows[held:]
        per_source.append((source, rows))
    if data.eval_path is not None:
        eval_rows = read_rows(data.eval_path, data.sources[0].format)

    mixed = mix(per_source, rng)
    eval_format = data.sources[0].format
    train_examples, stats = [], {}
    for source, rows in mixed:
        encoded = _encode_cached(rows, source.format, tokenizer, config)
        stats[source.path] = _source_stats(encoded, len(rows))
        # Examples whose loss tokens were all truncated away would train nothing: dropped, and counted in stats.
        train_examples += [e for e in encoded if has_loss(e)]
    if not train_examples:
        raise UserError(f"data.max_seq_len: every training example lost all its loss tokens to truncation at "
                        f"{config.data.max_seq_len} tokens; raise data.max_seq_len")
    total_tokens = sum(s["tokens"] for s in stats.values()) or 1
    for s in stats.values():
        s["token_share"] = s["tokens"] / total_tokens
    rng.shuffle(train_examples)
    eval_encoded = [e for e in _encode_cached(eval_rows, eval_format, tokenizer, config) if has_loss(e)] if eval_rows else []

    import datasets

    def as_dataset(examples: list[dict]):
        return datasets.Dataset.from_dict(
            {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
        )

    pairs = [pair for row in eval_rows if (pair := eval_pair(row, eval_format, tokenizer)) is not None]
    return PreparedData(
        train=as_dataset(train_examples),
        eval=as_dataset(eval_encoded) if eval_encoded else None,
        eval_pairs=pairs[: config.eval.task_samples],
        stats=stats,
    )


def mix(per_source: list[tuple[SourceConfig, list[dict]]], rng: random.Random) -> list[tuple[SourceConfig, list[dict]]]:
    """Draw from each source so its share of examples equals weight/sum(weights), using as much data as possible
    without repeating any example: the mixed size is the largest N with N*share_i <= len(source_i) for every i."""
    total_weight = sum(source.weight for source, _ in per_source)
    shares = [source.weight / total_weight for source, _ in per_source]
    size = min(len(rows) / share for (_, rows), share in zip(per_source, shares))
    mixed = []
    for (source, rows), share in zip(per_source, shares):
        count = min(len(rows), max(1, round(size * share)))
        mixed.append((source, rng.sample(rows, count) if count < len(rows) else rows))
    return mixed


def has_loss(example: dict) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])


def _source_stats(encoded: list[dict], examples: int) -> dict:
    kept = [e for e in encoded if has_loss(e)]
    return {
        "examples": examples,
        "dropped_no_loss_tokens": examples - len(kept),
        "truncated": sum(1 for e in encoded if e["tokens_cut"]),
        "tokens_cut": sum(e["tokens_cut"] for e in encoded),
        "tokens": sum(len(e["input_ids"]) for e in kept),
        "loss_tokens": sum(sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in kept),
    }


def _encode_cached(rows: list[dict], fmt: str, tokenizer, config: RunConfig) -> list[dict]:
    """Tokenize rows, reusing a cache keyed by the rows, the format, the tokenizer and the masking settings."""
    key_material = json.dumps(
        [CACHE_VERSION, fmt, config.data.max_seq_len, config.data.completion_only_loss, _tokenizer_fingerprint(tokenizer), rows],
        sort_keys=True, default=str,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:24]
    cache_root = Path(config.data.cache_dir or os.environ.get("TUNEKIT_DATA_CACHE", Path.home() / ".cache" / "tunekit" / "data"))
    cache_file = cache_root / f"{key}.jsonl"
    if cache_file.is_file():
        with open(cache_file, encoding="utf-8") as handle:
            encoded = [json.loads(line) for line in handle]
    else:
        from tqdm.auto import tqdm

        encoded = [
            tokenize(segments(row, fmt, tokenizer), tokenizer, config.data.max_seq_len, config.data.completion_only_loss)
            for row in tqdm(rows, desc=f"tokenizing ({fmt})", leave=False, disable=len(rows) < 2000)
        ]
        write_text_atomically(cache_file, "".join(json.dumps(e) + "\n" for e in encoded))
    return encoded


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, type(tokenizer).__name__]
    return hashlib.sha256((vocab + json.dumps(extra, default=str)).encode()).hexdigest()


# ---------------------------------------------------------------- inspection


def inspect_data(config: RunConfig, num_samples: int = 3) -> str:
    """A text report: a few formatted samples with loss tokens marked «like this», the end-of-turn check, and each
    source's token share after truncation and mixing."""
    from tunekit.backends.common import load_tokenizer

    tokenizer = load_tokenizer(config)
    prepared = prepare_data(config, tokenizer)
    lines = [f"tokenizer: {config.model.name_or_path}  (eos={tokenizer.eos_token!r}, bos={tokenizer.bos_token!r})", ""]
    for number in range(min(num_samples, len(prepared.train))):
        example = prepared.train[number]
        lines += [f"--- sample {number + 1} ({len(example['input_ids'])} tokens; «...» = carries loss)",
                  render_with_mask(example["input_ids"], example["labels"], tokenizer), ""]
    eos_trained = sum(
        1 for e in prepared.train if tokenizer.eos_token_id in [l for l in e["labels"] if l != IGNORE_INDEX]
    )
    lines.append(f"end-of-sequence token {tokenizer.eos_token!r} carries loss in {eos_trained}/{len(prepared.train)} examples"
                 + ("" if eos_trained else "  <-- WARNING: the model will not learn to stop"))
    lines += ["", f"{'source':<40} {'examples':>8} {'tokens':>9} {'loss tok':>9} {'share':>6} {'truncated':>9} {'dropped':>7}"]
    for path, s in prepared.stats.items():
        lines.append(f"{path[-40:]:<40} {s['examples']:>8} {s['tokens']:>9} {s['loss_tokens']:>9} "
                     f"{s['token_share']:>6.1%} {s['truncated']:>9} {s['dropped_no_loss_tokens']:>7}")
    lines.append(f"eval: {len(prepared.eval) if prepared.eval is not None else 0} examples, "
                 f"{len(prepared.eval_pairs)} prompts for the task metric")
    return "\n".join(lines)


def render_with_mask(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """Decode the example, wrapping each run of loss-carrying tokens in «»."""
    out, in_loss, run = [], False, []

    def flush():
        if run:
            text = tokenizer.decode(run)
            out.append(f"«{text}»" if in_loss else text)

    for token, label in zip(input_ids, labels):
        carries = label != IGNORE_INDEX
        if carries != in_loss:
            flush()
            run, in_loss = [], carries
        run.append(token)
    flush()
    return "".join(out)
