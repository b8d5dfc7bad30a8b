"""The tiny local base model and the demo task that `make demo` and the test suite use.

Nothing here downloads anything: the "general text" corpus is generated from templates and word lists with a seeded
RNG, a byte-level BPE tokenizer is trained on it, and a small Llama is pretrained on it for a minute or two on CPU.
The pretraining text also holds Alpaca-formatted examples of *sister* tasks (repeat the words, first word, last word)
so the base knows the format and can copy, but it never sees the demo task (reverse the words): the base scores
~0 on it and LoRA has something to teach.

    build_tiny_base(out_dir, preset="demo")  -> out_dir (model + tokenizer + general_eval.jsonl + tunekit_tiny.json)
    write_demo_task(out_dir)                 -> {"train": ..., "eval": ...} (+ chat/prompt_completion/text variants)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

# Bump when the corpus, tokenizer, model or pretraining code changes: it is part of the cache hash, so old builds
# are rebuilt instead of silently reused.
BUILD_VERSION = 1

BOS, EOS, PAD, USER, ASSISTANT = "<|begin|>", "<|end|>", "<|pad|>", "<|user|>", "<|assistant|>"
STAMP_NAME = "tunekit_tiny.json"
GENERAL_EVAL_NAME = "general_eval.jsonl"

# Sizes and step counts per preset. Budgets on 2 CPU cores: demo ~2.5 min, test well under 40 s.
PRESETS: dict[str, dict] = {
    "demo": {
        "corpus_chars": 2_000_000,  # general text the tokenizer is trained on (and pretraining draws from)
        "vocab_size": 2000,
        "hidden_size": 192,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "pretrain_steps": 600,
        "pretrain_batch_size": 16,  # sequences per step
        "pretrain_seq_len": 128,  # tokens per sequence (documents are packed)
        "pretrain_lr": 3e-3,
        "task_fraction": 0.5,  # share of pretraining documents that are Alpaca sister-task examples
        "general_eval_lines": 200,
    },
    "test": {
        "corpus_chars": 200_000,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "pretrain_steps": 60,
        "pretrain_batch_size": 8,
        "pretrain_seq_len": 64,
        "pretrain_lr": 3e-3,
        "task_fraction": 0.5,
        "general_eval_lines": 200,
    },
}

# Chat template: the assistant turn, with its end-of-turn token, sits inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly what an assistant-only loss trains on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' }}{{ message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{% else %}"  # system (or anything else): plain text before the first turn
    "{{ message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------------------------
# Word lists for the generated corpus. TASK_WORDS are the words the Alpaca tasks are built from; they also occur in
# the general text so the tokenizer gives most of them a single token (with and without the leading space).
# ---------------------------------------------------------------------------------------------------------------
TASK_WORDS = (
    "apple bird boat book bread car cat chair cloud coat cup desk dog door egg fish flag frog girl goat hat horse "
    "house key king lamp leaf lion milk moon mouse nest pen pig queen rain ring river road rock rose sand ship shoe "
    "sky snow sock star stone sun table tent tree truck wall water whale wind window wolf wood"
).split()
NOUNS = TASK_WORDS + (
    "garden teacher farmer doctor child baby student friend letter basket bottle candle pencil picture "
    "kitten puppy rabbit turtle bridge hill forest island field village city market kitchen"
).split()
ADJECTIVES = (
    "big small red blue green yellow old new happy sad quick slow bright dark warm cold soft hard tall short "
    "quiet loud clean dirty young brave kind heavy light little round sweet"
).split()
COLORS = "red blue green yellow black white brown orange purple gray pink".split()
# (base, past) — the third person present is derived by _present3.
VERBS = [
    ("see", "saw"), ("find", "found"), ("take", "took"), ("make", "made"), ("carry", "carried"), ("push", "pushed"),
    ("pull", "pulled"), ("watch", "watched"), ("paint", "painted"), ("wash", "washed"), ("hold", "held"),
    ("open", "opened"), ("close", "closed"), ("help", "helped"), ("like", "liked"), ("want", "wanted"),
    ("give", "gave"), ("move", "moved"), ("touch", "touched"), ("follow", "followed"), ("bring", "brought"),
    ("throw", "threw"), ("catch", "caught"), ("draw", "drew"), ("buy", "bought"), ("sell", "sold"),
]
INTRANSITIVE = [("run", "ran"), ("jump", "jumped"), ("sleep", "slept"), ("sing", "sang"), ("play", "played"),
                ("swim", "swam"), ("walk", "walked"), ("laugh", "laughed"), ("rest", "rested"), ("wait", "waited")]
NAMES = "Anna Ben Cora Dan Eva Finn Gina Hugo Ivy Jack Kim Leo Mia Nora Omar Pia Sam Tara Uma Vic".split()
PLACES = "park garden kitchen market forest village city field river bank school library beach farm hill".split()
TIMES = "morning evening night day week summer winter spring".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NUMBER_WORDS = "one two three four five six seven eight nine ten".split()
PREPOSITIONS = "near under behind beside inside across over".split()


def _plural(noun: str) -> str:
    """Return the English plural of `noun` (regular rules, good enough for the word lists above)."""
    irregular = {"child": "children", "mouse": "mice", "leaf": "leaves", "wolf": "wolves", "fish": "fish",
                 "sheep": "sheep", "wife": "wives", "knife": "knives"}
    if noun in irregular:
        return irregular[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _present3(verb: str) -> str:
    """Return the third person singular present of `verb` ("carry" -> "carries")."""
    if verb.endswith(("s", "x", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _sentence(rng: random.Random) -> str:
    """Return one generated English-like sentence (one of ~16 templates filled from the word lists)."""
    n1, n2 = rng.sample(NOUNS, 2)
    a1, a2 = rng.sample(ADJECTIVES, 2)
    name1, name2 = rng.sample(NAMES, 2)
    verb, past = rng.choice(VERBS)
    iverb, ipast = rng.choice(INTRANSITIVE)
    place, prep, time_ = rng.choice(PLACES), rng.choice(PREPOSITIONS), rng.choice(TIMES)
    templates = [
        lambda: f"The {a1} {n1} {past} the {n2} {prep} the {place}.",
        lambda: f"{name1} {past} a {a1} {n1} {prep} the {place}.",
        lambda: f"Every {time_}, {name1} {_present3(verb)} the {n1}.",
        lambda: f"There are {rng.choice(NUMBER_WORDS)} {_plural(n1)} in the {place}.",
        lambda: f"Why did the {n1} {iverb}? Because the {n2} was {a1}.",
        lambda: f'{name1} said, "I like the {a1} {n1}."',
        lambda: f"If the {n1} is {a1}, then the {n2} is {a2}.",
        lambda: f"The {n1} was {a1} and the {n2} was {a2}.",
        lambda: f"{name1} and {name2} went to the {place} on {rng.choice(DAYS)}.",
        lambda: f"In the {place}, the {_plural(n1)} {ipast} all {time_}.",
        lambda: f"The {rng.choice(COLORS)} {n1} is bigger than the {n2}.",
        lambda: f"{name1} wanted to {verb} the {n1}, but {name2} did not.",
        lambda: f"A {a1} {n1} can {iverb}, and a {a2} {n2} can {rng.choice(INTRANSITIVE)[0]}.",
        lambda: f"Where is the {n1}? It is {prep} the {n2}.",
        lambda: f"{name1} has {rng.randint(2, 99)} {_plural(n1)} and {rng.randint(2, 99)} {_plural(n2)}.",
        lambda: f"The {n1}, the {n2} and the {rng.choice(NOUNS)} {ipast} together.",
    ]
    return rng.choice(templates)()


def _paragraph(rng: random.Random) -> str:
    """Return 2-6 generated sentences joined by spaces (one general-text document)."""
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))


def generate_corpus(n_chars: int, seed: int) -> list[str]:
    """Return generated general-text paragraphs totalling about `n_chars` characters (deterministic in `seed`)."""
    rng = random.Random(f"corpus-{seed}")
    lines, total = [], 0
    while total < n_chars:
        lines.append(_paragraph(rng))
        total += len(lines[-1]) + 1
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Alpaca tasks. The demo task (reverse) is only in write_demo_task's files; the sister tasks are only in pretraining.
# ---------------------------------------------------------------------------------------------------------------
DEMO_INSTRUCTION = "Reverse the order of the words."
SISTER_TASKS = {
    "Repeat the words.": lambda words: words,
    "Write the first word.": lambda words: words[:1],
    "Write the last word.": lambda words: words[-1:],
}
MIN_WORDS, MAX_WORDS = 3, 5  # words per task input


def render_alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Return the Alpaca prompt (everything before the response) — the same rendering as tunekit.data uses."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _word_list(rng: random.Random) -> list[str]:
    """Return 3-5 distinct task words in random order."""
    return rng.sample(TASK_WORDS, rng.randint(MIN_WORDS, MAX_WORDS))


def _sister_example(rng: random.Random) -> dict:
    """Return one Alpaca record of a sister task (or a no-input "write a sentence" one) for pretraining."""
    if rng.random() < 0.15:  # exercises the no-input form of the template
        noun = rng.choice(NOUNS)
        sentence = _sentence(rng)
        return {"instruction": f"Write a sentence about the word {noun}.", "input": "",
                "output": f"The {noun} is here. {sentence}"}
    instruction = rng.choice(list(SISTER_TASKS))
    words = _word_list(rng)
    return {"instruction": instruction, "input": " ".join(words), "output": " ".join(SISTER_TASKS[instruction](words))}


# ---------------------------------------------------------------------------------------------------------------
# Building the base
# ---------------------------------------------------------------------------------------------------------------
def _build_hash(preset: str, seed: int) -> str:
    """Return a short hash of everything that determines the build (preset values, seed, BUILD_VERSION)."""
    params = {"preset": preset, "values": PRESETS[preset], "seed": seed, "version": BUILD_VERSION}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _read_stamp(out_dir: Path) -> dict | None:
    """Return the build stamp in `out_dir`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_cached(out_dir: str | os.PathLike, preset: str = "demo", seed: int = 0) -> bool:
    """Return True when `out_dir` holds a finished build with the same preset, seed and build parameters."""
    stamp = _read_stamp(Path(out_dir))
    return stamp is not None and stamp.get("hash") == _build_hash(preset, seed)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Return a `PreTrainedTokenizerFast` (byte-level BPE trained on `texts`) with tunekit's special tokens and chat
    template. It adds no special tokens by itself: callers put bos first explicitly. Padding is on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4, in this order
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        extra_special_tokens=[USER, ASSISTANT], padding_side="right",
                                        model_max_length=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_chat_template(tokenizer) -> None:
    """Raise AssertionError unless the assistant mask covers exactly the assistant content plus its `<|end|>`."""
    messages = [{"role": "user", "content": "Repeat the words: cat dog"},
                {"role": "assistant", "content": "cat dog"}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask) if m]
    expected = tokenizer("cat dog", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert masked == expected, f"assistant mask covers {tokenizer.decode(masked)!r}, expected 'cat dog<|end|>'"


def _pretrain_documents(corpus: list[str], n_docs: int, task_fraction: float, seed: int) -> list[str]:
    """Return `n_docs` pretraining documents: general paragraphs mixed with Alpaca sister-task texts (with eos)."""
    rng = random.Random(f"pretrain-{seed}")
    docs = []
    for _ in range(n_docs):
        if rng.random() < task_fraction:
            ex = _sister_example(rng)
            docs.append(render_alpaca_prompt(ex["instruction"], ex["input"]) + ex["output"] + EOS)
        else:
            docs.append(rng.choice(corpus) + EOS)
    return docs


def _pack(tokenizer, docs: list[str], seq_len: int):
    """Return a LongTensor [n_blocks, seq_len]: bos + document tokens (each ending in eos), concatenated and cut."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id] + ids
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)


def pretrain(model, blocks, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train `model` as a causal LM on `blocks` ([n, seq_len] token ids) for `steps` AdamW steps (fp32, CPU).

    Warmup is 5% of the steps, then cosine decay to 10% of `lr`. Returns the loss of every step."""
    import math

    import torch
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretraining tiny base", disable=None)  # disable=None: off when not a tty
    for step in bar:
        idx = torch.randint(len(blocks), (batch_size,), generator=gen)
        batch = blocks[idx]  # [batch_size, seq_len]
        loss = model(input_ids=batch, labels=batch).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _new_model(tokenizer, values: dict, seed: int):
    """Return a randomly initialised LlamaForCausalLM (fp32) sized by the preset `values`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        num_key_value_heads=values["num_attention_heads"],
        max_position_embeddings=values["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # LoRA / merge code must handle separate embed_tokens and lm_head
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32)


def build_tiny_base(out_dir: str | os.PathLike, preset: str = "demo", seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the tiny pretrained Llama base in `out_dir` and return `out_dir` as a Path.

    `out_dir` then holds the model and tokenizer (`save_pretrained`, safetensors), `general_eval.jsonl` (held-out
    general text, `{"text": ...}` per line) and `tunekit_tiny.json` (preset, seed, hash of the build parameters).
    A finished build with the same hash is returned at once unless `force`. The build goes to `<out_dir>.tmp-<pid>`
    and is renamed at the end, so an interrupted build never looks finished. Raises ValueError on an unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(PRESETS)}")
    out_dir = Path(out_dir)
    if not force and is_cached(out_dir, preset, seed):
        return out_dir

    import torch

    values = PRESETS[preset]
    start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))  # tiny matmuls: more threads than cores only hurts
    try:
        corpus = generate_corpus(values["corpus_chars"], seed)
        # Held-out general text for the forgetting monitor: lines the model never trains on.
        n_eval = values["general_eval_lines"]
        train_corpus, eval_corpus = corpus[:-n_eval], corpus[-n_eval:]
        held_out = set(eval_corpus)
        train_corpus = [line for line in train_corpus if line not in held_out]

        tokenizer = train_tokenizer(train_corpus, values["vocab_size"])
        check_chat_template(tokenizer)
        model = _new_model(tokenizer, values, seed)

        n_tokens = values["pretrain_steps"] * values["pretrain_batch_size"] * values["pretrain_seq_len"]
        n_docs = n_tokens // 40 + 100  # ~40+ tokens per document: enough text that blocks rarely repeat
        docs = _pretrain_documents(train_corpus, n_docs, values["task_fraction"], seed)
        blocks = _pack(tokenizer, docs, values["pretrain_seq_len"])
        losses = pretrain(model, blocks, values["pretrain_steps"], values["pretrain_batch_size"],
                          values["pretrain_lr"], seed)
    finally:
        torch.set_num_threads(threads)

    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(tmp / GENERAL_EVAL_NAME, "w") as f:
        for line in eval_corpus:
            f.write(json.dumps({"text": line}) + "\n")
    stamp = {
        "preset": preset, "seed": seed, "hash": _build_hash(preset, seed), "build_version": BUILD_VERSION,
        "values": values, "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "build_seconds": round(time.time() - start, 1),
    }
    (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")  # written last: marks the build finished
    _replace_dir(tmp, out_dir, stamp["hash"])
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path, build_hash: str) -> None:
    """Move the finished build `tmp` to `out_dir`, replacing an older build there.

    If another process finished the same build first, keep theirs and drop ours."""
    if out_dir.exists():
        stamp = _read_stamp(out_dir)
        if stamp is not None and stamp.get("hash") == build_hash and not _same_file(tmp, out_dir):
            # A concurrent build of the same parameters won the race; both are identical (deterministic).
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(out_dir)


def _same_file(a: Path, b: Path) -> bool:
    """Return True when `a` and `b` are the same directory on disk."""
    try:
        return a.samefile(b)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The demo task files
# ---------------------------------------------------------------------------------------------------------------
def demo_examples(n: int, seed: int = 0) -> list[dict]:
    """Return `n` distinct Alpaca records of the demo task (reverse 3-5 words), deterministic in `seed`."""
    rng = random.Random(f"demo-{seed}")
    seen, records = set(), []
    while len(records) < n:
        words = _word_list(rng)
        key = " ".join(words)
        if key in seen:
            continue
        seen.add(key)
        records.append({"instruction": DEMO_INSTRUCTION, "input": key, "output": " ".join(reversed(words))})
    return records


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write `records` one JSON object per line to `path`; return `path`."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_demo_task(out_dir: str | os.PathLike, n_train: int = 2000, n_eval: int = 64, n_variants: int = 32,
                    seed: int = 0) -> dict[str, Path]:
    """Write the demo task into `out_dir` and return {"train", "eval", "chat", "prompt_completion", "text"} paths.

    train.jsonl / eval.jsonl are Alpaca records (`instruction`, `input`, `output`) with disjoint inputs.
    The other three hold the first `n_variants` train examples in other formats: chat.jsonl (`messages` with a user
    and an assistant turn), prompt_completion.jsonl (`prompt` = rendered Alpaca prompt, `completion` = output) and
    text.jsonl (`text` = prompt + output, no eos: the pipeline appends it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = demo_examples(n_train + n_eval, seed)  # all inputs distinct, so the split is disjoint
    train, eval_ = records[:n_train], records[n_train:]
    variants = train[:n_variants]
    chat = [{"messages": [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in variants]
    prompt_completion = [{"prompt": render_alpaca_prompt(r["instruction"], r["input"]), "completion": r["output"]}
                         for r in variants]
    text = [{"text": p["prompt"] + p["completion"]} for p in prompt_completion]
    return {
        "train": _write_jsonl(out_dir / "train.jsonl", train),
        "eval": _write_jsonl(out_dir / "eval.jsonl", eval_),
        "chat": _write_jsonl(out_dir / "chat.jsonl", chat),
        "prompt_completion": _write_jsonl(out_dir / "prompt_completion.jsonl", prompt_completion),
        "text": _write_jsonl(out_dir / "text.jsonl", text),
    }
