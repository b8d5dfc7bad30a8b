"""Training data at scale: each source read once into Arrow, tokenized by `datasets.map` in worker processes, cached
as a memory-mapped dataset, prepared by one process while the others wait; then split, mixed and shuffled through
index mappings, so no process ever holds the dataset as Python objects. SFT formats give input_ids/labels; preference
pairs (objectives dpo/orpo) give prompt_ids/chosen_ids/rejected_ids, every answer token scored, no prompt token.

Cache entry = one source, tokenized: <cache>/<key>/{raw.arrow, tokens*.arrow, meta.json}. The key covers all that
changes tokens — the source's bytes, format, max_examples, tokenizer (vocabulary, normalizer, special tokens, chat
template), max_seq_len, completion_only_loss and TOKENIZATION_VERSION — and nothing else: weights, the eval split,
the seed and every training setting apply at load time as index selections. meta.json is written last, and the
entry is renamed into place whole, so a half-written entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.config import RunConfig, looks_local
from tunekit.data import IGNORE_INDEX, checked_rows, eval_pair, iter_rows, pair_pieces, render_with_mask, segments
from tunekit.errors import UserError

TOKENIZATION_VERSION = 3  # bump when tokens or masks change, so stale caches are not reused
RAW_COLUMNS = {  # format -> the columns kept from each row (all strings; chat messages as JSON text)
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
}
JSON_COLUMNS = {"chat": ("messages",), "preference": ("prompt", "chosen", "rejected")}  # raw columns kept as JSON text
SFT_COLUMNS = ["input_ids", "labels"]  # what the trainer gets: labels -100 where no loss
PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]  # every answer token scored, no prompt token
COUNT_COLUMNS = ("tokens", "tokens_cut", "loss_tokens", "prompt_tokens")  # int32 per example, for stats and audits
ROWS_PER_WORKER = 2_000  # below this a worker process costs more to start than it saves
STREAM_SHUFFLE_BUFFER = 10_000  # examples held by a streamed source's shuffle buffer
# Padding share of unpacked SFT batches at or above which `prepare`/`inspect-data` suggest data.packing: true. At 30%
# about a third of every forward/backward computes on pad tokens, which packing (padding-free batches) removes, and
# packing's costs (a BFD pass over the data at start, position_ids, the rows' order no longer the examples') are
# small beside that. Below it the gain rarely repays changing how examples are batched.
PACKING_SUGGEST_SHARE = 0.30
# Above this many tokens the packed-row count is the lower bound ceil(tokens / max_seq_len) instead of TRL's own BFD
# pass (packed_rows), which would hold one byte per token (10M examples x 500 tokens: 5 GB) just to count rows.
PACK_COUNT_MAX_TOKENS = 50_000_000


@dataclass
class PreparedData:
    """What the trainer needs: tokenized splits, the task metric's held-out prompts, and per-source statistics."""

    train: Any  # datasets.Dataset (or IterableDataset when streaming): SFT_COLUMNS, or PAIR_COLUMNS for pairs
    eval: Any | None
    # (prompt text as generation starts from it, expected completion; for pairs the chosen answer)
    eval_pairs: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, dict] = field(default_factory=dict)  # source path -> counts and token share


@dataclass
class Source:
    """One cached source: its raw rows and token columns (memory-mapped), and who tokenized it."""

    raw: Any  # datasets.Dataset of RAW_COLUMNS[format]
    tokens: Any  # datasets.Dataset: train_columns(format) and COUNT_COLUMNS
    meta: dict


# ---------------------------------------------------------------- the job's data


def prepare_data(config: RunConfig, tokenizer, log=print) -> PreparedData:
    """Tokenized train/eval sets for the run, mixed by source weight, with each source's statistics."""
    import numpy as np

    data = config.data
    if data.streaming:
        return _prepare_streaming(config, tokenizer, log)
    sources = [load_source(s.path, s.format, s.split, s.max_examples, tokenizer, config, log) for s in data.sources]
    rng = np.random.default_rng(data.seed)
    train_rows = [np.arange(len(source.tokens)) for source in sources]
    held_rows = None
    if data.eval_path is None and data.eval_fraction > 0:
        train_rows[0], held_rows = hold_out(len(sources[0].tokens), data.eval_fraction, rng, data.sources[0].path)
    counts = mix_counts([len(rows) for rows in train_rows], [s.weight for s in data.sources])
    picked = [rows if count == len(rows) else np.sort(rng.choice(rows, count, replace=False))
              for rows, count in zip(train_rows, counts)]

    stats, kept = {}, []
    for index, (spec, source, rows) in enumerate(zip(data.sources, sources, picked)):
        columns = token_columns(source.tokens)
        stats[spec.path] = source_stats(columns, rows) | {"prepared_by": source.meta["prepared_by"]}
        audit_masks(f"data.sources[{index}]", spec.path, spec.format, columns, rows, config)
        kept.append(rows[columns["loss_tokens"][rows] > 0])  # no loss token left after truncation: trains nothing
    total_tokens = sum(s["tokens"] for s in stats.values()) or 1
    for s in stats.values():
        s["token_share"] = s["tokens"] / total_tokens

    columns = train_columns(data.sources[0].format)  # the config allows no mix of pairs and SFT rows
    train = select_rows([source.tokens for source in sources], kept, rng, columns)
    held = (sources[0], held_rows) if held_rows is not None else None
    evaluation, pairs = eval_split(config, tokenizer, log, held)
    return PreparedData(train=train, eval=evaluation, eval_pairs=pairs, stats=stats)


def eval_split(config: RunConfig, tokenizer, log, held: tuple[Source, Any] | None = None):
    """(eval dataset or None, task-metric pairs): data.eval_path whole, else `held` = (source, its held-out rows),
    else none. Examples without a loss token are left out of the eval loss (they would divide by zero tokens)."""
    import numpy as np

    data = config.data
    if data.eval_path is not None:
        source = load_source(data.eval_path, data.sources[0].format, "train", None, tokenizer, config, log)
        rows = np.arange(len(source.tokens))
    elif held is not None:
        source, rows = held
    else:
        return None, []
    fmt = data.sources[0].format
    loss = token_columns(source.tokens)["loss_tokens"][rows]
    evaluation = select_rows([source.tokens], [rows[loss > 0]], None, train_columns(fmt)) if (loss > 0).any() else None
    return evaluation, task_pairs(source.raw, rows, fmt, tokenizer, config.eval.task_samples)


def hold_out(size: int, fraction: float, rng, path: str):
    """(train rows, held-out rows) of the first source: a seeded random `fraction` of it, at least one example."""
    import numpy as np

    held = max(1, int(size * fraction))
    if held >= size:
        raise UserError(f"data.eval_fraction: {path} has {size} examples, too few to hold out {held}")
    order = rng.permutation(size)
    return np.sort(order[held:]), np.sort(order[:held])


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Examples drawn from each source so its share of examples equals weight/sum(weights), using as much data as
    possible without repeating any example: the mixed size is the largest N with N*share_i <= size_i for every i."""
    shares = [weight / sum(weights) for weight in weights]
    total = min(size / share for size, share in zip(sizes, shares))
    return [min(size, max(1, round(total * share))) for size, share in zip(sizes, shares)]


def train_columns(fmt: str) -> list[str]:
    """The token columns a source of format `fmt` gives the trainer: PAIR_COLUMNS for pairs, else SFT_COLUMNS."""
    return PAIR_COLUMNS if fmt == "preference" else SFT_COLUMNS


def select_rows(datasets_: list, rows: list, rng, columns: list[str]):
    """One training set from several tokenized sources: the chosen rows, in a seeded random order (rng None: file
    order), as an index mapping over the memory-mapped files (no copy), with only the trainer's `columns`."""
    import datasets
    import numpy as np

    offsets = np.cumsum([0] + [len(d) for d in datasets_[:-1]])
    chosen = np.concatenate([offset + r for offset, r in zip(offsets, rows)])
    if rng is not None:
        chosen = rng.permutation(chosen)
    joined = datasets_[0] if len(datasets_) == 1 else datasets.concatenate_datasets(datasets_)
    return joined.select(chosen, keep_in_memory=True).select_columns(columns)


def token_columns(tokens) -> dict:
    """The per-example count columns as numpy arrays (4 bytes per example each; the token lists stay on disk)."""
    table = tokens.data  # the memory-mapped Arrow table (no index mapping: load_source makes none)
    return {name: table.column(name).to_numpy() for name in COUNT_COLUMNS}  # int32; numpy sums them in int64


def source_stats(columns: dict, rows) -> dict:
    """Counts for the rows drawn from one source; `tokens`/`loss_tokens` over the examples that train."""
    loss = columns["loss_tokens"][rows]
    kept = rows[loss > 0]
    return {
        "examples": int(len(rows)),
        "dropped_no_loss_tokens": int((loss == 0).sum()),
        "truncated": int((columns["tokens_cut"][rows] > 0).sum()),
        "tokens_cut": int(columns["tokens_cut"][rows].sum()),
        "tokens": int(columns["tokens"][kept].sum()),
        "loss_tokens": int(columns["loss_tokens"][kept].sum()),
    }


def audit_masks(key: str, path: str, fmt: str, columns: dict, rows, config: RunConfig) -> None:
    """Stop before training when a source's loss mask cannot be right (silent mask failures are the field's most
    common fine-tuning bug): no example keeps a loss token, or the prompt is never masked while completion_only_loss
    is on. Examples that lost all loss tokens to truncation are dropped, with a warning."""
    loss, prompt = columns["loss_tokens"][rows], columns["prompt_tokens"][rows]
    if len(rows) and not (loss > 0).any():
        cause = (f"every example was cut at data.max_seq_len={config.data.max_seq_len} before its completion; raise it"
                 if (columns["tokens_cut"][rows] > 0).all() else
                 "the loss mask is empty (check `tunekit inspect-data`: the chat template's assistant turns were not found)")
        raise UserError(f"{key}: {path}: no example has a token that carries loss: {cause}")
    prompts_masked = fmt not in ("text", "preference")  # text has no prompt; a pair's prompt is never scored
    if config.data.completion_only_loss and prompts_masked and len(rows) and not (prompt[loss > 0] > 0).any():
        raise UserError(f"{key}: {path}: every token carries loss although data.completion_only_loss is on: the "
                        f"prompt is never masked (format {fmt}; check `tunekit inspect-data`)")
    dropped = int((loss == 0).sum())
    if dropped and fmt == "preference":
        print(f"warning: {path}: {dropped} of {len(rows)} pairs have a prompt that fills data.max_seq_len="
              f"{config.data.max_seq_len}, leaving no answer token; they are dropped (see the data table)")
    elif dropped:
        print(f"warning: {path}: {dropped} of {len(rows)} examples lost every loss token to truncation at "
              f"data.max_seq_len={config.data.max_seq_len}; they are dropped (see the data table)")


def task_pairs(raw, rows, fmt: str, tokenizer, limit: int) -> list[tuple[str, str]]:
    """(prompt, expected completion) for the generation metric from the first `limit` held-out rows."""
    pairs = []
    for row in raw.select(rows[:limit], keep_in_memory=True):
        pair = eval_pair(as_row(row, fmt), fmt, tokenizer)
        if pair is not None:
            pairs.append(pair)
    return pairs


def as_row(stored: dict, fmt: str) -> dict:
    """A raw Arrow row back in the shape tunekit.data's formatters take (chat messages, preference parts parsed)."""
    if fmt in JSON_COLUMNS:
        return {**stored, **{name: json.loads(stored[name]) for name in JSON_COLUMNS[fmt]}}
    return stored


# ---------------------------------------------------------------- one source, cached


def load_source(path: str, fmt: str, split: str, max_examples: int | None, tokenizer, config: RunConfig,
                log=print) -> Source:
    """The tokenized source from the cache, tokenizing it first when it is not there.

    Under a launcher every process calls this; a file lock next to the entry lets the first one tokenize while the
    others wait and then memory-map what it wrote (one per node when the cache is node-local, one per job when it is
    shared). The log line says which process did the work.
    """
    from filelock import FileLock

    key = source_key(path, fmt, split, max_examples, tokenizer, config)
    root = cache_root(config)
    entry = root / key
    if not (entry / "meta.json").is_file():
        made_root = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        lock = root / f"{key}.lock"
        try:
            with FileLock(str(lock)):
                if not (entry / "meta.json").is_file():  # nobody finished it while this process waited
                    _build_entry(entry, path, fmt, split, max_examples, tokenizer, config, log)
        except UserError:  # bad data: leave nothing behind (the lock, a cache directory made for it)
            lock.unlink(missing_ok=True)
            if made_root and not any(root.iterdir()):
                root.rmdir()
            raise
    source = _open_entry(entry)
    if source.meta["prepared_by"] != this_process():
        log(f"data: {path}: cache hit ({len(source.tokens):,} examples, tokenized by {source.meta['prepared_by']})")
    return source


def _open_entry(entry: Path) -> Source:
    import datasets

    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    token_files = [datasets.Dataset.from_file(str(entry / name)) for name in meta["token_files"]]
    tokens = token_files[0] if len(token_files) == 1 else datasets.concatenate_datasets(token_files)
    return Source(raw=datasets.Dataset.from_file(str(entry / "raw.arrow")), tokens=tokens, meta=meta)


def _build_entry(entry: Path, path: str, fmt: str, split: str, max_examples: int | None, tokenizer,
                 config: RunConfig, log) -> None:
    """Read, check and write the raw rows (one streaming pass), tokenize them with worker processes, rename in."""
    import shutil

    started = time.time()
    staging = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        rows = write_raw(checked_rows(path, fmt, split, max_examples), fmt, staging / "raw.arrow")
        workers = worker_count(config.data.num_proc, rows)
        log(f"data: {path}: tokenizing {rows:,} examples in {workers} worker process{'es' * (workers > 1)} "
            f"({this_process()})")
        tokens = _tokenize_raw(staging / "raw.arrow", staging, fmt, path, split, tokenizer, config, workers)
        meta = {"source": path, "format": fmt, "examples": rows, "prepared_by": this_process(),
                "seconds": round(time.time() - started, 2), "workers": workers,
                "token_files": sorted(Path(f["filename"]).name for f in tokens.cache_files),
                "tokenization_version": TOKENIZATION_VERSION}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")  # last: marks it complete
        del tokens  # release the memory maps before the rename
        if entry.exists():
            shutil.rmtree(entry)  # an incomplete entry (no meta.json) left by a crash
        os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"data: {path}: tokenized {rows:,} examples in {time.time() - started:.1f} s")


def write_raw(rows, fmt: str, out: Path) -> int:
    """Stream checked (where, row) pairs into an Arrow file of RAW_COLUMNS[fmt] (strings) plus `position` (the
    example's index in the source, to name its line in an error); memory holds one batch. Returns the row count."""
    import pyarrow as pa

    names = RAW_COLUMNS[fmt]
    schema = pa.schema([(name, pa.string()) for name in names] + [("position", pa.int64())])
    batch: dict[str, list] = {name: [] for name in schema.names}
    count = 0
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for _, row in rows:
            for name, value in raw_record(row, fmt).items():
                batch[name].append(value)
            batch["position"].append(count)
            count += 1
            if count % 10_000 == 0:
                writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
                batch = {name: [] for name in schema.names}
        if batch["position"]:
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
    return count


def _tokenize_raw(raw_file: Path, staging: Path, fmt: str, path: str, split: str, tokenizer, config: RunConfig,
                  workers: int):
    import datasets

    raw = datasets.Dataset.from_file(str(raw_file))
    return raw.map(
        encode_rows, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
        remove_columns=raw.column_names, cache_file_name=str(staging / "tokens.arrow"),
        new_fingerprint=staging.name, features=token_features(fmt), desc=f"tokenizing {Path(path).name}",
        fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "max_seq_len": config.data.max_seq_len,
                   "completion_only": config.data.completion_only_loss, "path": path, "split": split},
    )


def encode_rows(batch: dict, fmt: str, tokenizer, max_seq_len: int, completion_only: bool, path: str,
                split: str) -> dict:
    """datasets.map function: a batch of raw columns -> token columns. A row the chat template refuses names its
    line: the position is turned back into FILE:LINE by re-reading the source up to it (only on that error)."""
    from tunekit.data import encode, encode_pairs

    names = RAW_COLUMNS[fmt]
    pieces = []
    for index in range(len(batch["position"])):
        row = as_row({name: batch[name][index] for name in names}, fmt)
        try:
            pieces.append(pair_pieces(row, tokenizer) if fmt == "preference" else segments(row, fmt, tokenizer))
        except UserError as exc:
            raise UserError(f"{where_of(path, split, batch['position'][index])}: {exc}") from None
    if fmt == "preference":
        return encode_pairs(pieces, tokenizer, max_seq_len)  # completion_only does not apply: prompts never score
    columns = encode(pieces, tokenizer, max_seq_len, completion_only)
    columns["tokens"] = [len(ids) for ids in columns["input_ids"]]
    return columns


def where_of(path: str, split: str, position: int) -> str:
    """"FILE:LINE" (or "FILE row N") of the example at `position` of a source."""
    for index, (where, _) in enumerate(iter_rows(path, split)):
        if index == position:
            return str(where)
    return f"{path} example {position + 1}"


def token_features(fmt: str):
    from datasets import Features, List, Value

    ids = List(Value("int32"))  # vocabularies fit in int32: half the disk and page cache of int64
    counts = {name: Value("int32") for name in COUNT_COLUMNS}
    return Features({**{name: ids for name in train_columns(fmt)}, **counts})


def worker_count(num_proc: int | None, rows: int) -> int:
    """data.num_proc, default the cores this process may use (a Slurm/cgroup CPU set, not the whole machine),
    capped so each worker gets ROWS_PER_WORKER rows at least."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_proc or cores, rows // ROWS_PER_WORKER))


def this_process() -> str:
    """"rank R of N on HOST (pid P)" under a launcher, "HOST (pid P)" alone: the log's answer to who did the work."""
    host, pid = socket.gethostname(), os.getpid()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} on {host} (pid {pid})"
    return f"{host} (pid {pid})"


def cache_root(config: RunConfig) -> Path:
    default = Path.home() / ".cache" / "tunekit" / "data"
    return Path(config.data.cache_dir or os.environ.get("TUNEKIT_DATA_CACHE") or default)


def source_key(path: str, fmt: str, split: str, max_examples: int | None, tokenizer, config: RunConfig) -> str:
    """The cache key: everything that changes this source's tokens, and nothing else."""
    material = {
        "version": TOKENIZATION_VERSION,
        "source": source_identity(path, split),
        "format": fmt,
        "max_examples": max_examples,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": config.data.max_seq_len,
        "completion_only_loss": config.data.completion_only_loss,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def source_identity(path: str, split: str) -> str:
    """sha256 of a local file's bytes (its content, wherever it lives; ~1 GB/s); for a hub dataset, its name,
    split and datasets' own fingerprint of the downloaded data."""
    if looks_local(path):
        try:
            with open(path, "rb") as handle:
                return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as exc:
            raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    import datasets

    try:
        return f"hub:{path}:{split}:{datasets.load_dataset(path, split=split)._fingerprint}"
    except Exception as exc:  # the hub client raises many types; the user needs one line
        from tunekit.errors import first_line

        raise UserError(f"{path}: could not load dataset (split {split}): {first_line(exc, with_type=False)}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about a tokenizer that changes tokens: the fast tokenizer's full serialization (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens) or a slow one's vocabulary, plus the special tokens, the chat
    template and the class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
             type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None)]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode()).hexdigest()


# ---------------------------------------------------------------- streaming


def _prepare_streaming(config: RunConfig, tokenizer, log) -> PreparedData:
    """Sources read and tokenized on the fly, shuffled in a buffer, mixed by weight (as probabilities: in
    expectation, not exactly); nothing is cached. Eval, from data.eval_path, is prepared as usual."""
    import datasets

    data = config.data
    streams = [_stream(s.path, s.format, s.split, s.max_examples, tokenizer, config, data.seed + i)
               for i, s in enumerate(data.sources)]
    weights = [s.weight for s in data.sources]
    train = streams[0] if len(streams) == 1 else datasets.interleave_datasets(
        streams, probabilities=[w / sum(weights) for w in weights], seed=data.seed, stopping_strategy="first_exhausted")
    evaluation, pairs = eval_split(config, tokenizer, log)
    log(f"data: streaming {len(streams)} source(s); nothing is tokenized ahead of training")
    return PreparedData(train=train, eval=evaluation, eval_pairs=pairs,
                        stats={s.path: {"streaming": True, "weight": s.weight} for s in data.sources})


def _stream(path: str, fmt: str, split: str, max_examples: int | None, tokenizer, config: RunConfig, seed: int):
    import datasets

    names = RAW_COLUMNS[fmt]
    features = datasets.Features({**{name: datasets.Value("string") for name in names},
                                  "position": datasets.Value("int64")})
    stream = datasets.IterableDataset.from_generator(
        _raw_records, features=features, gen_kwargs={"path": path, "fmt": fmt, "split": split,
                                                     "max_examples": max_examples})
    stream = stream.map(encode_rows, batched=True, batch_size=256, remove_columns=list(features),
                        fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "max_seq_len": config.data.max_seq_len,
                                   "completion_only": config.data.completion_only_loss, "path": path, "split": split})
    stream = stream.filter(lambda loss: [n > 0 for n in loss], input_columns="loss_tokens", batched=True)
    stream = stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    return stream.select_columns(["input_ids", "labels"])


def _raw_records(path: str, fmt: str, split: str, max_examples: int | None):
    for position, (_, row) in enumerate(checked_rows(path, fmt, split, max_examples)):
        yield {**raw_record(row, fmt), "position": position}


def raw_record(row: dict, fmt: str) -> dict:
    """A checked row as its RAW_COLUMNS[fmt] strings (chat messages and preference parts, a string or messages, as
    JSON text: any message keys survive, and a part keeps its kind)."""
    record = {name: row.get(name) for name in RAW_COLUMNS[fmt]}
    for name in JSON_COLUMNS.get(fmt, ()):
        record[name] = json.dumps(record[name], ensure_ascii=False)
    return record


# ---------------------------------------------------------------- padding


def padded_lengths(train):
    """int64 [len(train)]: the tokens each training example takes in a padded row, in train order: len(input_ids),
    or for a pair prompt + the longer of chosen/rejected (TRL's preference collator stacks prompt+chosen and
    prompt+rejected into one batch padded to its longest sequence). Read from the Arrow list offsets through the
    index mapping: no token list is built."""
    import numpy as np
    import pyarrow.compute as pc

    table = train.data  # the joined memory-mapped table; train's rows are the index mapping's
    def lengths(name):
        return pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False).astype(np.int64)
    if "prompt_ids" in train.column_names:
        per_row = lengths("prompt_ids") + np.maximum(lengths("chosen_ids"), lengths("rejected_ids"))
    else:
        per_row = lengths("input_ids")
    indices = train._indices  # datasets' index mapping (select_rows always makes one); None: rows in file order
    return per_row if indices is None else per_row[indices.column(0).to_numpy()]


def expected_max(sorted_lengths, size: int) -> float:
    """E[max] of a uniformly random `size`-subset of `sorted_lengths` (ascending), exactly: the i-th smallest
    (1-based) is the max with probability C(i-1, size-1) / C(n, size). Weights built as a running log ratio,
    C(i, k-1) / C(i-1, k-1) = i / (i-k+1), so a million examples cost a few numpy passes."""
    import numpy as np

    n = len(sorted_lengths)
    if size >= n:
        return float(sorted_lengths[-1])
    i = np.arange(size, n, dtype=np.float64)  # i = k..n-1 -> the log weight of position i+1
    log_weight = np.concatenate([[0.0], np.cumsum(np.log(i) - np.log(i - size + 1))])
    weight = np.exp(log_weight - log_weight[-1])  # the largest weight is the last: no overflow
    return float((weight * sorted_lengths[size - 1:]).sum() / weight.sum())


def expected_slots(lengths, batch_size: int) -> float:
    """Expected token slots (rows x padded length) of one epoch of batches of `batch_size` drawn as the Trainer
    draws them: a random permutation cut into consecutive batches, the last one short (drop_last off), each batch
    right-padded to its longest example. Each batch of a random permutation is a uniform random subset of its size,
    so by linearity of expectation this is exact: (full batches) x batch_size x E[max] + remainder x E[max]."""
    import numpy as np

    ordered = np.sort(np.asarray(lengths, dtype=np.int64))
    full, rest = divmod(len(ordered), batch_size)
    slots = full * batch_size * expected_max(ordered, batch_size) if full else 0.0
    return slots + (rest * expected_max(ordered, rest) if rest else 0.0)


def packed_rows(lengths, max_seq_len: int) -> int:
    """Rows TRL's packing (best-fit decreasing, as SFTTrainer runs it over the train set in its order) makes of
    examples of `lengths`: its own pack_dataset over a column of zeros with these lengths, so the count is TRL's."""
    import datasets
    import numpy as np
    import pyarrow as pa
    from trl.data_utils import pack_dataset

    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]))  # int64: a large list, past 2**31 tokens
    column = pa.LargeListArray.from_arrays(offsets, pa.array(np.zeros(int(lengths.sum()), dtype=np.int8)))
    dataset = datasets.Dataset(pa.table({"input_ids": column}))
    return len(pack_dataset(dataset, max_seq_len, strategy="bfd"))


def padding_report(lengths, real_tokens: int, config: RunConfig) -> str:
    """Lines on the padding training batches carry: share = (slots - real tokens) / slots, slots expected over the
    Trainer's random order (`expected_slots`, exact). `lengths`: padded_lengths(train); `real_tokens`: the tokens
    the rows hold (a pair's: prompt + chosen and prompt + rejected). Unpacked SFT suggests data.packing when the
    share is at least PACKING_SUGGEST_SHARE, with the slots packing saves; packed SFT gives the packed rows' fill;
    pairs give the share only (packing does not apply to dpo/orpo)."""
    import numpy as np

    if not len(lengths):
        return ""
    batch, max_len = config.training.per_device_train_batch_size, config.data.max_seq_len
    if config.data.packing:
        total = int(np.sum(lengths))
        if total > PACK_COUNT_MAX_TOKENS:  # TRL's packing pass would hold a byte per token here
            rows, how = -(-total // max_len), "at most "  # ceil: no packing fills rows better
        else:
            rows, how = packed_rows(lengths, max_len), ""
        return (f"packing: {len(lengths):,} examples in {'at least ' if how else ''}{rows:,} rows of {max_len} "
                f"tokens, {how}{real_tokens / (rows * max_len):.1%} filled (batches are padding-free: no pad token "
                "is computed)")
    sequences = 2 if config.preference else 1  # a pair is two sequences padded to the batch's longest
    slots = sequences * expected_slots(np.asarray(lengths), batch)
    share = (slots - real_tokens) / slots
    rows = f"{batch} pairs (2 x {batch} sequences, " if config.preference else f"{batch} examples ("
    line = (f"padding: {share:.1%} of the token slots in batches of {rows}random order, padded to the batch's "
            f"longest) are padding: {slots - real_tokens:,.0f} of {slots:,.0f} per epoch (exact expectation)")
    if config.preference or share < PACKING_SUGGEST_SHARE:
        return line
    return (line + f"\nsuggestion: set data.packing: true: padding-free packed batches compute only the "
            f"{real_tokens:,} real tokens, {slots - real_tokens:,.0f} fewer slots per epoch "
            f"({share:.0%}; padding is {PACKING_SUGGEST_SHARE:.0%}+ of the work)")


# ---------------------------------------------------------------- the report


def data_table(stats: dict[str, dict], preference: bool = False) -> str:
    """The per-source table `tunekit prepare` and `inspect-data` print. For preference pairs (`preference`) a row
    counts pairs, the tokens of both sequences (prompt + chosen, prompt + rejected) and the scored answer tokens."""
    unit, scored = ("pairs", "scored tok") if preference else ("examples", "loss tok")
    lines = [f"{'source':<40} {unit:>9} {'tokens':>11} {scored:>11} {'share':>6} {'truncated':>9} {'dropped':>7}"]
    for path, s in stats.items():
        if s.get("streaming"):
            lines.append(f"{path[-40:]:<40} streamed (weight {s['weight']:g}): counted only as training reads it")
            continue
        lines.append(f"{path[-40:]:<40} {s['examples']:>9,} {s['tokens']:>11,} {s['loss_tokens']:>11,} "
                     f"{s['token_share']:>6.1%} {s['truncated']:>9,} {s['dropped_no_loss_tokens']:>7,}")
    return "\n".join(lines)


def padding_lines(prepared: PreparedData, config: RunConfig) -> list[str]:
    """padding_report's lines for a prepared job (none when streaming: no lengths before training reads the data);
    the real tokens are the data table's. The lengths are read here, not in prepare_data, so training pays nothing."""
    if config.data.streaming:
        return []
    report = padding_report(padded_lengths(prepared.train), sum(s["tokens"] for s in prepared.stats.values()), config)
    return report.splitlines()


def inspect_data(config: RunConfig, num_samples: int = 3) -> str:
    """A text report: a few formatted samples with loss tokens marked «like this», the end-of-turn check, and each
    source's token share after truncation and mixing."""
    from itertools import islice

    from tunekit.backends.common import load_tokenizer
    from tunekit.chat import end_of_turn_token

    tokenizer = load_tokenizer(config)
    prepared = prepare_data(config, tokenizer)
    if config.preference:
        return inspect_pairs(prepared, tokenizer, config, num_samples)
    end = end_of_turn_token(tokenizer) if any(s.format == "chat" for s in config.data.sources) else None
    end = end or tokenizer.eos_token
    end_id = tokenizer.convert_tokens_to_ids(end) if end else None
    lines = [f"tokenizer: {config.model.name_or_path}  (eos={tokenizer.eos_token!r}, bos={tokenizer.bos_token!r}, "
             f"end of turn={end!r})", ""]
    samples = list(islice(iter(prepared.train), 200))
    for number, example in enumerate(samples[:num_samples]):
        lines += [f"--- sample {number + 1} ({len(example['input_ids'])} tokens; «...» = carries loss)",
                  render_with_mask(example["input_ids"], example["labels"], tokenizer), ""]
    trained = sum(1 for e in samples if end_id in [label for label in e["labels"] if label != IGNORE_INDEX])
    lines.append(f"end token {end!r} carries loss in {trained}/{len(samples)} sampled examples"
                 + ("" if trained else "  <-- WARNING: the model will not learn to stop"))
    lines += ["", data_table(prepared.stats), *padding_lines(prepared, config)]
    eval_size = len(prepared.eval) if prepared.eval is not None else 0
    lines.append(f"eval: {eval_size} examples, {len(prepared.eval_pairs)} prompts for the task metric")
    return "\n".join(lines)


def inspect_pairs(prepared: PreparedData, tokenizer, config: RunConfig, num_samples: int) -> str:
    """inspect-data for preference pairs: the prompt as the model sees it, then each answer with its scored tokens
    marked «like this» (every answer token is scored, no prompt token), token counts, the end-token check."""
    from itertools import islice

    from tunekit.chat import end_of_turn_token

    end_of_turn = end_of_turn_token(tokenizer) if tokenizer.chat_template is not None else None
    ends = {token for token in (tokenizer.eos_token, end_of_turn) if token}  # string rows end with eos
    end_ids = {tokenizer.convert_tokens_to_ids(token) for token in ends}
    lines = [f"tokenizer: {config.model.name_or_path}  (eos={tokenizer.eos_token!r}, bos={tokenizer.bos_token!r}, "
             f"end of turn={end_of_turn!r})", ""]
    samples = list(islice(iter(prepared.train), 200))
    for number, pair in enumerate(samples[:num_samples]):
        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        lines += [f"--- pair {number + 1} (prompt {len(prompt)} tokens, chosen {len(chosen)}, rejected "
                  f"{len(rejected)}; «...» = scored)",
                  "prompt:", render_with_mask(prompt, [IGNORE_INDEX] * len(prompt), tokenizer),
                  "chosen:", render_with_mask(chosen, chosen, tokenizer),
                  "rejected:", render_with_mask(rejected, rejected, tokenizer), ""]
    ended = sum(1 for pair in samples if end_ids & set(pair["chosen_ids"]) and end_ids & set(pair["rejected_ids"]))
    names = " or ".join(repr(token) for token in sorted(ends))
    lines.append(f"end token {names} is scored in both answers of {ended}/{len(samples)} sampled pairs"
                 + ("" if ended else "  <-- WARNING: the model will not learn to stop"))
    lines += ["", data_table(prepared.stats, preference=True), *padding_lines(prepared, config)]
    eval_size = len(prepared.eval) if prepared.eval is not None else 0
    lines.append(f"eval: {eval_size} pairs, {len(prepared.eval_pairs)} prompts for the task metric")
    return "\n".join(lines)
