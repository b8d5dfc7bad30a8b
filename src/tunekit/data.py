"""One example at a time: read and check rows, format them into loss-marked pieces, tokenize a batch of them.

Every example becomes a list of (text, carries_loss) pieces, tokenized piece by piece, so that the loss mask is exact
and the same for all four SFT formats:
  alpaca             "### Instruction: ... ### Response:\n" (no loss) + output + eos (loss)
  prompt_completion  prompt (no loss) + completion + eos (loss)
  text               text + eos (loss everywhere)
  chat               the tokenizer's chat template; each assistant turn with its end-of-turn token carries loss
                     (tunekit.chat finds the turns)
A preference pair (format preference, objectives dpo/orpo) becomes three lists of pieces, prompt / chosen / rejected,
cut at the same places: string rows as prompt_completion (prompt, answer + eos), chat rows as chat (the answer is
the text the SFT chat mask marks for that assistant turn, through its end-of-turn token).
tunekit.prepare runs these over whole datasets (Arrow, worker processes, cache); nothing here holds a dataset.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from pathlib import Path
from typing import Any

from tunekit.chat import chat_segments, render
from tunekit.config import looks_local
from tunekit.errors import UserError, first_line

IGNORE_INDEX = -100  # label value that the loss skips
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ---------------------------------------------------------------- reading and checking

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what the major templates render (Llama 3, Qwen 2+, Mistral)
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # ShareGPT, Gemma
STRING_FIELDS = {  # format -> fields that must be strings when present (required ones are checked for presence first)
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "chat": (),
    "preference": (),  # strings or chat messages: _check_pair
}
PAIR_ROLES = ("system", "user", "assistant")  # a preference prompt's roles (no tool results: it ends with a user turn)


def read_rows(path: str, fmt: str, split: str = "train", max_examples: int | None = None) -> list[dict]:
    """Rows of a small file held as Python objects (eval.general, the merge check); training data goes through
    tunekit.prepare, which streams the same checked rows into Arrow."""
    return [row for _, row in checked_rows(path, fmt, split, max_examples)]


def checked_rows(path: str, fmt: str, split: str = "train", max_examples: int | None = None):
    """(where, row) for each example of a local JSON/JSONL/Parquet/CSV file or a hub dataset, checked for `fmt`'s
    fields, read lazily (memory does not grow with the file) and stopping after `max_examples`.

    `where` names the row for an error message: "FILE:LINE" for text files, "FILE row N" for parquet and hub data.
    Raises UserError `WHERE: problem` for bytes that are not UTF-8, a bad JSON line, a missing field or one of the
    wrong type, or an empty file; whatever `datasets`/pyarrow raise while reading becomes one such line too.
    """
    count = 0
    for where, row in iter_rows(path, split):
        if (problem := check_row(row, fmt)) is not None:
            raise UserError(f"{where}: {problem}")
        yield where, row
        count += 1
        if max_examples is not None and count >= max_examples:
            return
    if count == 0:
        raise UserError(f"{path}: no examples (empty file)")


def iter_rows(path: str, split: str = "train"):
    """(where, row) for every row of the source, unchecked; see checked_rows."""
    if not looks_local(path):
        yield from _iter_hub(path, split)
        return
    suffix = Path(path).suffix.lower()
    readers = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}
    if suffix not in readers:
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .parquet or .csv)")
    try:
        yield from readers[suffix](path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def count_rows(path: str, split: str = "train", max_examples: int | None = None) -> int | None:
    """Examples in a source without parsing it (for the estimate): non-blank lines of a JSONL file, the parquet
    footer's row count, rows of a CSV or JSON file; None for a hub dataset (unknown without downloading it)."""
    if not looks_local(path) or not Path(path).is_file():
        return None
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as handle:
            count = sum(1 for line in handle if line.strip())
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            count = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises many types; the user needs one line
            raise UserError(f"{path}: cannot read parquet file: {first_line(exc, with_type=False)}") from None
    else:
        count = sum(1 for _ in iter_rows(path, split))
    return min(count, max_examples) if max_examples else count


# Each reader yields (where, row). Text files are opened as utf-8-sig: UTF-8, with the byte-order mark some editors
# write skipped.


def _iter_jsonl(path: str):
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: bad JSON line: {exc.msg}") from None
            yield f"{path}:{number}", row


def _iter_json(path: str):
    """A JSON list of examples (or an object with one list value): one document, so it is parsed whole."""
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
    for index, row in enumerate(data):
        yield _JsonWhere(path, text, index), row


class _JsonWhere:
    """"FILE:LINE" of example `index` of a JSON list file, located (a second parse) only when an error prints it."""

    def __init__(self, path: str, text: str, index: int):
        self.path, self.text, self.index = path, text, index

    def __str__(self) -> str:
        return f"{self.path}:{_json_example_lines(self.text)[self.index]}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


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


def _iter_csv(path: str):
    """Every cell as the text written (no number or "NA" guessing); an empty cell is a missing value."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        for cells in reader:
            if not cells:
                continue  # blank line
            if len(cells) > len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(cells)} cells, but the header names {len(header)}")
            # reader.line_num: the row's last line (its only one unless a quoted cell spans lines)
            yield f"{path}:{reader.line_num}", {name: cell or None for name, cell in
                                                 zip(header, cells + [""] * (len(header) - len(cells)))}


def _iter_parquet(path: str):
    """Row groups one batch at a time: memory holds one batch, not the file."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                index += 1
                yield f"{path} row {index}", row
    except UserError:
        raise
    except Exception as exc:  # pyarrow raises many types; the user needs one line
        raise UserError(f"{path}: cannot read parquet file: {first_line(exc, with_type=False)}") from None


def _iter_hub(name: str, split: str):
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub client raises many types; the user needs one line
        raise UserError(f"{name}: could not load dataset (split {split}): {first_line(exc, with_type=False)}") from None
    for index, row in enumerate(dataset):
        yield f"{name} row {index + 1}", row


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
            if fmt == "preference" and name == "prompt" and not hint and "chosen" in row and "rejected" in row:
                hint = " (a pair whose prompt is inside chosen/rejected, TRL's implicit prompt, needs it split out)"
            return f"{name}: missing field for format '{fmt}'{hint}"
    for name in STRING_FIELDS[fmt]:
        if row.get(name) is not None and not isinstance(row[name], str):  # alpaca's `input` may be absent or null
            return f"{name}: expected a string, got {_json_type(row[name])}"
    if fmt == "chat":
        return _check_messages(row["messages"])
    if fmt == "preference":
        return _check_pair(row)
    return None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"messages: expected a list of {{role, content}} objects, got {_json_type(messages)}"
    for index, message in enumerate(messages):
        if (problem := _check_message(message, f"messages[{index}]")) is not None:
            return problem
    if not any(message["role"] == "assistant" for message in messages):
        return "chat example has no assistant message to learn from"
    return None


def _check_message(message: Any, key: str) -> str | None:
    """The first problem of one chat message, named `key` (e.g. "messages[2]", "chosen[0]")."""
    if not isinstance(message, dict):
        return f"{key}: expected a {{role, content}} object, got {_json_type(message)}"
    if "from" in message and "value" in message and "role" not in message:
        return f"{key}: 'from'/'value' is the ShareGPT layout; chat messages need 'role' and 'content'"
    # An assistant message that calls tools may have no text (OpenAI's layout: content null, tool_calls set).
    calls_tools = message.get("role") == "assistant" and bool(message.get("tool_calls"))
    for name in ("role", "content"):
        if name not in message and not (name == "content" and calls_tools):
            return f"{key}.{name}: missing"
    role = message["role"]
    if role not in CHAT_ROLES:  # a typo'd role would be rendered as plain text by many templates, or crash them
        near = ROLE_ALIASES.get(str(role).lower()) or next(iter(difflib.get_close_matches(str(role), CHAT_ROLES, 1)), None)
        hint = f" (did you mean '{near}'?)" if near else ""
        return f"{key}.role: unknown role {json.dumps(role, default=str)}{hint}; expected one of {', '.join(CHAT_ROLES)}"
    if not isinstance(message.get("content"), str) and not (calls_tools and message.get("content") is None):
        return f"{key}.content: expected a string, got {_json_type(message.get('content'))}"
    if "tool_calls" in message and not isinstance(message["tool_calls"], list):
        return f"{key}.tool_calls: expected a list of calls, got {_json_type(message['tool_calls'])}"
    return None


def _check_pair(row: dict) -> str | None:
    """A preference pair: prompt, chosen and rejected all strings, or all chat messages (the prompt: system/user/
    assistant turns ending with a user turn; each answer: assistant messages), and two different answers."""
    kinds = {}
    for name in REQUIRED_FIELDS["preference"]:
        value = row[name]
        if not isinstance(value, (str, list)):
            return f"{name}: expected a string or a list of chat messages, got {_json_type(value)}"
        kinds[name] = "a string" if isinstance(value, str) else "chat messages"
    for name in ("chosen", "rejected"):
        if kinds[name] != kinds["prompt"]:  # a template would render one part and not the other: no single rule
            return (f"{name}: {kinds[name]}, but prompt is {kinds['prompt']}: prompt, chosen and rejected must be "
                    "all strings or all chat messages")
    if kinds["prompt"] == "chat messages":
        problem = _check_pair_prompt(row["prompt"]) or _check_answer(row["chosen"], "chosen") \
            or _check_answer(row["rejected"], "rejected")
        if problem is not None:
            return problem
    if _answer_identity(row["chosen"]) == _answer_identity(row["rejected"]):
        return "rejected: chosen and rejected are identical: the pair teaches nothing"
    return None


def _check_pair_prompt(messages: list) -> str | None:
    if not messages:
        return "prompt: empty list of messages: a chat prompt needs at least a user turn"
    for index, message in enumerate(messages):
        if (problem := _check_message(message, f"prompt[{index}]")) is not None:
            return problem
        if message["role"] not in PAIR_ROLES:
            return (f"prompt[{index}].role: {json.dumps(message['role'])} is not used in a preference prompt; "
                    f"expected one of {', '.join(PAIR_ROLES)}")
    if messages[-1]["role"] != "user":  # the answers are the assistant's reply to it
        return (f"prompt[{len(messages) - 1}].role: a chat prompt ends with a user turn, "
                f"got {json.dumps(messages[-1]['role'])}")
    return None


def _check_answer(messages: list, name: str) -> str | None:
    if not messages:
        return f"{name}: empty list of messages: an answer needs at least one assistant message"
    for index, message in enumerate(messages):
        if (problem := _check_message(message, f"{name}[{index}]")) is not None:
            return problem
        if message["role"] != "assistant":
            return f"{name}[{index}].role: expected \"assistant\" (an answer), got {json.dumps(message['role'])}"
    return None


def _answer_identity(answer: str | list) -> Any:
    """What a template renders of an answer: its text, or each message's role, content and tool calls (other keys,
    e.g. a per-message weight, do not make two answers different)."""
    if isinstance(answer, str):
        return answer
    return [(m.get("role"), m.get("content"), json.dumps(m.get("tool_calls"), sort_keys=True)) for m in answer]


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
    if fmt == "preference":  # prompt + chosen, as SFT would train on it (the merge check runs it)
        prompt, chosen, _ = pair_pieces(row, tokenizer)
        return [(piece, False) for piece in prompt] + [(piece, True) for piece in chosen]
    return chat_segments(row["messages"], tokenizer)


def pair_pieces(row: dict, tokenizer) -> tuple[list[str], list[str], list[str]]:
    """A preference pair as (prompt pieces, chosen pieces, rejected pieces): texts tokenized one by one (encode_pairs),
    at the same boundaries as the SFT formats, so the answer tokens are exactly the SFT loss tokens.

    String rows: ([prompt], [chosen + eos], [rejected + eos]), the prompt as written (prompt_completion's rule).
    Chat rows: prompt + answer rendered once through the chat template (tunekit.chat.chat_segments); the prompt is
    the text before the answer's first assistant turn (history turns are cut where SFT cuts them, unscored here), the
    answer runs from there through the end-of-turn token of its last turn; template filler after it (e.g. "\n") is
    not part of either. The answer starts where SFT's loss starts, after the generation cue, never inside a token.
    Raises UserError when the template renders the prompt differently before chosen and before rejected, or the
    answer's assistant turns cannot be found.
    """
    if isinstance(row["prompt"], str):
        eos = tokenizer.eos_token or ""
        return [row["prompt"]], [row["chosen"] + eos], [row["rejected"] + eos]
    prompt, chosen = _split_answer(row["prompt"], row["chosen"], tokenizer)
    prompt_before_rejected, rejected = _split_answer(row["prompt"], row["rejected"], tokenizer)
    if prompt_before_rejected != prompt:  # one prompt_ids column serves both answers
        raise UserError(f"prompt: the chat template of {tokenizer.name_or_path} renders the prompt differently before "
                        "chosen and before rejected; write the pair as strings (rendered by you)")
    return prompt, chosen, rejected


def _split_answer(prompt: list[dict], answer: list[dict], tokenizer) -> tuple[list[str], list[str]]:
    """(prompt pieces, answer pieces) of the conversation prompt + answer; see pair_pieces."""
    pieces = chat_segments(prompt + answer, tokenizer)
    turns = [index for index, (_, carries_loss) in enumerate(pieces) if carries_loss]  # one loss piece per turn
    history = sum(message["role"] == "assistant" for message in prompt)
    if len(turns) != history + len(answer):  # a template that merges or skips turns: no honest boundary
        raise UserError(f"cannot find the answer's assistant turns in the text the chat template of "
                        f"{tokenizer.name_or_path} renders ({len(turns)} turns found, {history + len(answer)} "
                        "expected); write the pair as strings")
    first, last = turns[history], turns[-1]
    return [text for text, _ in pieces[:first]], [text for text, _ in pieces[first:last + 1]]


def alpaca_prompt(row: dict) -> str:
    template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


def eval_pair(row: dict, fmt: str, tokenizer) -> tuple[str, str] | None:
    """(prompt, expected completion) for the generation metric; None for raw text, which has no prompt."""
    if fmt == "alpaca":
        return alpaca_prompt(row), str(row["output"])
    if fmt == "prompt_completion":
        return str(row["prompt"]), str(row["completion"])
    if fmt == "chat":
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        prompt = render(tokenizer, row["messages"][:last], add_generation_prompt=True)
        return prompt, str(row["messages"][last]["content"])
    if fmt == "preference":  # the chosen answer's first turn: generation stops at its end-of-turn token
        if isinstance(row["prompt"], str):
            return row["prompt"], row["chosen"]
        return render(tokenizer, row["prompt"], add_generation_prompt=True), str(row["chosen"][0].get("content") or "")
    return None


def tokenize(pieces: list[tuple[str, bool]], tokenizer, max_seq_len: int, completion_only: bool) -> dict:
    """input_ids/labels for one example (see encode); the merge check and the tiny base's pretraining use it."""
    columns = encode([pieces], tokenizer, max_seq_len, completion_only)
    return {name: values[0] for name, values in columns.items()}


def encode(examples: list[list[tuple[str, bool]]], tokenizer, max_seq_len: int, completion_only: bool) -> dict:
    """Token columns for a batch of examples given as (text, carries_loss) pieces, truncated to max_seq_len (the
    start is kept).

    Every piece of the batch goes through the tokenizer in one call (see token_ids), each piece on its own: a piece boundary is a token boundary, so the loss mask is exact. A bos token is
    prepended when the tokenizer has one and the text does not already start with it (chat templates usually write
    it themselves). Columns: input_ids, labels (-100 where no loss), tokens_cut (dropped by truncation),
    loss_tokens, prompt_tokens (masked tokens other than that bos: 0 means the whole example carries loss).
    """
    texts = [text for pieces in examples for text, _ in pieces]
    piece_ids = token_ids(texts, tokenizer)
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    columns = {"input_ids": [], "labels": [], "tokens_cut": [], "loss_tokens": [], "prompt_tokens": []}
    next_piece = 0
    for pieces in examples:
        prepend_bos = needs_bos(pieces[0][0] if pieces else "", bos)
        input_ids: list[int] = [bos_id] if prepend_bos else []
        labels: list[int] = [IGNORE_INDEX] if prepend_bos else []
        for _, carries_loss in pieces:
            ids = piece_ids[next_piece]
            next_piece += 1
            input_ids += ids
            labels += ids if (carries_loss or not completion_only) else [IGNORE_INDEX] * len(ids)
        cut = max(0, len(input_ids) - max_seq_len)
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        loss_tokens = len(labels) - labels.count(IGNORE_INDEX)
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
        columns["tokens_cut"].append(cut)
        columns["loss_tokens"].append(loss_tokens)
        columns["prompt_tokens"].append(len(labels) - loss_tokens - prepend_bos)
    return columns


def needs_bos(first_text: str, bos: str | None) -> bool:
    """Whether a bos token goes before an example starting with `first_text`: the tokenizer has one and the text does
    not already start with it (chat templates usually write it themselves)."""
    return bool(bos) and not first_text.startswith(bos)


def encode_pairs(pairs: list[tuple[list[str], list[str], list[str]]], tokenizer, max_seq_len: int) -> dict:
    """Token columns for a batch of preference pairs given as pair_pieces, one tokenizer call for the batch.

    prompt_ids get a bos first when the tokenizer has one and the prompt does not start with it (encode's rule).
    Truncation keeps the start: each answer is cut so that prompt + answer fits max_seq_len; a pair whose prompt
    leaves no room keeps no answer token (loss_tokens 0: prepare drops it and counts it). Columns: prompt_ids,
    chosen_ids, rejected_ids, tokens (of both sequences, prompt + chosen and prompt + rejected), tokens_cut (from the
    two), loss_tokens (scored: chosen + rejected), prompt_tokens (the prompt without that bos).
    """
    texts = [piece for pair in pairs for part in pair for piece in part]
    piece_ids = iter(token_ids(texts, tokenizer))
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    columns: dict[str, list] = {name: [] for name in ("prompt_ids", "chosen_ids", "rejected_ids", "tokens",
                                                      "tokens_cut", "loss_tokens", "prompt_tokens")}
    for prompt, chosen, rejected in pairs:
        prompt_ids, chosen_ids, rejected_ids = ([token for _ in part for token in next(piece_ids)]
                                                for part in (prompt, chosen, rejected))
        prepend_bos = needs_bos(prompt[0] if prompt else "", bos)
        prompt_ids = ([bos_id] if prepend_bos else []) + prompt_ids
        full = 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
        room = max(0, max_seq_len - len(prompt_ids))
        prompt_ids, chosen_ids, rejected_ids = prompt_ids[:max_seq_len], chosen_ids[:room], rejected_ids[:room]
        tokens = 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
        columns["prompt_ids"].append(prompt_ids)
        columns["chosen_ids"].append(chosen_ids)
        columns["rejected_ids"].append(rejected_ids)
        columns["tokens"].append(tokens)
        columns["tokens_cut"].append(full - tokens)
        columns["loss_tokens"].append(len(chosen_ids) + len(rejected_ids))
        columns["prompt_tokens"].append(len(prompt_ids) - prepend_bos)
    return columns


def token_ids(texts: list[str], tokenizer) -> list[list[int]]:
    """tokenizer(texts, add_special_tokens=False)["input_ids"], through the Rust tokenizer's batch call when there is
    one: the same ids (a test checks it on every tokenizer the tests build), without the per-text Python objects and
    offsets the transformers wrapper makes (~25% of tokenizing time)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


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
