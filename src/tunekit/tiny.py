"""The tiny local base model and the demo task that `make demo` and the test suite use.

Nothing here downloads anything: the "general text" corpus is generated from templates and word lists with a seeded
RNG, a byte-level BPE tokenizer is trained on it, and a small Llama is pretrained on it for a minute or two on CPU.
Pretraining also sees Alpaca-formatted examples of *sister* tasks on digit strings (repeat them, first digit, last
digit), so the base knows the format and can copy, but never the demo task (reverse the digits): the base scores 0 on
it and LoRA has something to teach (held-out exact match 0.00 -> 0.95 after 300 LoRA steps, ~15 s on one core).

    build_tiny_base(out_dir, preset="demo")  -> out_dir (model + tokenizer + general_eval.jsonl + tunekit_tiny.json)
    write_demo_task(out_dir)                 -> {"train": ..., "eval": ...} (+ chat/prompt_completion/text variants)
    write_preference_task(out_dir)           -> {"train", "eval", "chat_train", "chat_eval"}: reverse (chosen) vs
                                                copy (rejected) pairs for DPO / ORPO
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

BOS, EOS, PAD, USER, ASSISTANT = "<|begin|>", "<|end|>", "<|pad|>", "<|user|>", "<|assistant|>"
STAMP_NAME = "tunekit_tiny.json"
GENERAL_EVAL_NAME = "general_eval.jsonl"

# Sizes and step counts per preset. Measured on one core of a 2-core machine: demo 1.06M parameters, built in
# 95-115 s; test 0.2M parameters, 5-15 s.
PRESETS: dict[str, dict] = {
    "demo": {
        "corpus_chars": 2_000_000,  # general text: tokenizer training, general pretraining stream, held-out lines
        "vocab_size": 2000,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "pretrain_steps": 1000,  # copying emerges at ~600-800 steps with lr 1e-3; 2e-3 learned nothing in 1000
        "pretrain_batch_size": 4,  # general-text sequences per step
        "pretrain_seq_len": 64,  # tokens per general-text sequence (paragraphs are packed)
        "pretrain_task_batch_size": 16,  # Alpaca sister-task examples per step (loss on the answer only)
        "pretrain_lr": 1e-3,
        "general_eval_lines": 200,  # held-out paragraphs written to general_eval.jsonl
    },
    "test": {
        "corpus_chars": 200_000,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "pretrain_steps": 150,
        "pretrain_batch_size": 8,
        "pretrain_seq_len": 64,
        "pretrain_task_batch_size": 16,
        "pretrain_lr": 2e-3,
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
# Word lists for the generated corpus.
# ---------------------------------------------------------------------------------------------------------------
NOUNS = (
    "apple bird boat book bread car cat chair cloud coat cup desk dog door egg fish flag frog girl goat hat horse "
    "house key king lamp leaf lion milk moon mouse nest pen pig queen rain ring river road rock rose sand ship shoe "
    "sky snow sock star stone sun table tent tree truck wall water whale wind window wolf wood "
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
# Alpaca tasks on strings of distinct digits. The tokenizer splits digits one per token, so a digit is the same token
# in the input and in the answer (a word is not: "cat" after a newline and " cat" after a space are different
# tokens, and learning that map for every word costs a tiny model thousands of steps). Distinct digits keep "find
# this digit in the input" unambiguous. The demo task (reverse) is only in write_demo_task's files; the sister tasks
# are only in pretraining, so the base can copy and knows the format but has never reversed anything.
# ---------------------------------------------------------------------------------------------------------------
DEMO_INSTRUCTION = "Reverse the digits."
SISTER_TASKS = {
    "Repeat the digits.": lambda digits: digits,
    "Write the first digit.": lambda digits: digits[0],
    "Write the last digit.": lambda digits: digits[-1],
}
MIN_DIGITS, MAX_DIGITS = 3, 6  # digits per task input: 151,200 distinct 6-digit inputs alone


def _digits(rng: random.Random) -> str:
    """Return 3-6 distinct digits in random order, as a string ("3815")."""
    return "".join(rng.sample("0123456789", rng.randint(MIN_DIGITS, MAX_DIGITS)))


def _sister_example(rng: random.Random) -> dict:
    """Return one Alpaca record of a sister task (or a no-input "write a sentence" one) for pretraining."""
    if rng.random() < 0.1:  # exercises the no-input form of the template
        noun = rng.choice(NOUNS)
        return {"instruction": f"Write a sentence about the word {noun}.", "input": "",
                "output": f"The {noun} is here. {_sentence(rng)}"}
    instruction = rng.choice(list(SISTER_TASKS))
    digits = _digits(rng)
    return {"instruction": instruction, "input": digits, "output": SISTER_TASKS[instruction](digits)}


# ---------------------------------------------------------------------------------------------------------------
# Building the base
# ---------------------------------------------------------------------------------------------------------------
def build_hash(preset: str, seed: int) -> str:
    """Return a short hash of everything that determines the build: the preset's values, the seed, this module's
    source and the versions of the libraries that compute it (an edit here or an upgrade means a rebuild)."""
    from importlib.metadata import version

    params = {
        "preset": preset, "values": PRESETS[preset], "seed": seed,
        "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "libraries": {name: version(name) for name in ("torch", "transformers", "tokenizers")},
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _read_stamp(out_dir: Path) -> dict | None:
    """Return the build stamp in `out_dir`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_cached(out_dir: str | os.PathLike, preset: str = "demo", seed: int = 0) -> bool:
    """Return True when `out_dir` holds a finished build with the same preset, seed and build parameters."""
    return _stamp_matches(Path(out_dir), build_hash(preset, seed))


def _stamp_matches(out_dir: Path, expected_hash: str) -> bool:
    """Return True when `out_dir` holds a finished build (its stamp is written last) whose hash is `expected_hash`."""
    stamp = _read_stamp(out_dir)
    return stamp is not None and stamp.get("hash") == expected_hash


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Return a `PreTrainedTokenizerFast` (byte-level BPE trained on `texts`) with tunekit's special tokens and chat
    template. It adds no special tokens by itself: callers put bos first explicitly. Padding is on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4, in this order
    tok = Tokenizer(models.BPE())
    # One token per digit (the tasks copy digits), then GPT-2 style byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        extra_special_tokens=[USER, ASSISTANT], padding_side="right",
                                        model_max_length=model_max_length)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_chat_template(tokenizer) -> None:
    """Raise RuntimeError unless the assistant mask covers exactly the assistant content plus its `<|end|>`."""
    messages = [{"role": "user", "content": "Repeat the words.\ncat dog"},
                {"role": "assistant", "content": "cat dog"}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask) if m]
    expected = tokenizer("cat dog", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if masked != expected:
        raise RuntimeError(f"assistant mask covers {tokenizer.decode(masked)!r}, expected 'cat dog<|end|>'")


def encode_alpaca(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) for one Alpaca record through tunekit's own data pipeline, exactly as fine-tuning
    will see it: bos + prompt + output + eos, labels -100 on bos and the prompt (loss on output + eos only)."""
    from tunekit.data import segments, tokenize

    encoded = tokenize(segments(record, "alpaca", tokenizer), tokenizer, max_seq_len=1 << 30, completion_only=True)
    return encoded["input_ids"], encoded["labels"]


def _pack(tokenizer, docs: list[str], seq_len: int):
    """Return a LongTensor [n_blocks, seq_len]: bos + document + eos for each document, concatenated and cut."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)


def _pad_right(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Return (input_ids, attention_mask, labels), each a LongTensor [len(rows), longest row], padded on the right."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(labs)] = torch.tensor(labs)
    return input_ids, attention_mask, labels


def pretrain(model, blocks, task_rows: list[tuple[list[int], list[int]]], steps: int, batch_size: int,
             task_batch_size: int, lr: float, pad_id: int, seed: int) -> list[float]:
    """Pretrain `model` for `steps` AdamW steps (fp32, CPU) and return the loss of every step.

    Each step sums two causal-LM losses: one on `batch_size` random general-text `blocks` ([n, seq_len] ids, loss on
    every token) and one on the next `task_batch_size` Alpaca sister-task rows (loss on output + eos only, as in
    fine-tuning). Without the second stream the few answer tokens drown in general text and the base never learns
    to copy within a CPU-minute budget. Warmup is 5% of the steps, then cosine decay to 10% of `lr`."""
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
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]  # [batch_size, seq_len]
        general_loss = model(input_ids=batch, labels=batch).loss  # labels are shifted inside the model
        rows = task_rows[step * task_batch_size: (step + 1) * task_batch_size]
        input_ids, attention_mask, labels = _pad_right(rows, pad_id)
        task_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        (general_loss + task_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(general_loss.item() + task_loss.item())
        bar.set_postfix(general=f"{general_loss.item():.3f}", task=f"{task_loss.item():.3f}")
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


def train_base(preset: str, seed: int = 0):
    """Generate the corpus, train the tokenizer and pretrain a fresh model for `preset`, in memory.

    Returns (model, tokenizer, general_eval_lines, losses): the fp32 LlamaForCausalLM in eval mode, its
    PreTrainedTokenizerFast, the held-out general-text paragraphs (never trained on) and the per-step losses."""
    import torch

    from tunekit.data import alpaca_prompt

    values = PRESETS[preset]
    threads = torch.get_num_threads()
    # One thread: these matmuls are too small to split, and on a busy 2-core machine 2 threads ran 8x slower
    # (OpenMP workers spin waiting for each other). A fixed count also keeps the build bit-for-bit reproducible.
    torch.set_num_threads(1)
    try:
        corpus = generate_corpus(values["corpus_chars"], seed)
        n_eval = values["general_eval_lines"]
        eval_lines = corpus[-n_eval:]
        held_out = set(eval_lines)
        train_lines = [line for line in corpus[:-n_eval] if line not in held_out]

        rng = random.Random(f"sister-{seed}")
        sister = [_sister_example(rng) for _ in range(values["pretrain_steps"] * values["pretrain_task_batch_size"])]
        # Trained on the general text plus as many Alpaca texts, so the template's pieces get their own tokens.
        sister_texts = [alpaca_prompt(r) + r["output"] for r in sister]
        tokenizer = train_tokenizer(train_lines + sister_texts[:len(train_lines)], values["vocab_size"],
                                    model_max_length=values["max_position_embeddings"])
        check_chat_template(tokenizer)

        model = _new_model(tokenizer, values, seed)
        blocks = _pack(tokenizer, train_lines, values["pretrain_seq_len"])
        task_rows = [encode_alpaca(tokenizer, r) for r in sister]
        losses = pretrain(model, blocks, task_rows, values["pretrain_steps"], values["pretrain_batch_size"],
                          values["pretrain_task_batch_size"], values["pretrain_lr"], tokenizer.pad_token_id, seed)
    finally:
        torch.set_num_threads(threads)
    return model, tokenizer, eval_lines, losses


def _check_reload(path: Path, model, tokenizer) -> None:
    """Raise RuntimeError unless `path` loads back (Auto classes) to the same logits and token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.data import alpaca_prompt

    text = alpaca_prompt({"instruction": "Repeat the digits.", "input": "3815"}) + "3815"
    loaded_tok = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if loaded_tok(text, add_special_tokens=False)["input_ids"] != ids:
        raise RuntimeError(f"tokenizer saved to {path} does not reload exactly")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([[tokenizer.bos_token_id] + ids])
    with torch.no_grad():
        if not torch.equal(loaded(x).logits, model.eval()(x).logits):
            raise RuntimeError(f"model saved to {path} does not reload exactly")


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

    start = time.time()
    model, tokenizer, eval_lines, losses = train_base(preset, seed)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _check_reload(tmp, model, tokenizer)
    _write_jsonl(tmp / GENERAL_EVAL_NAME, [{"text": line} for line in eval_lines])
    last = losses[-20:]
    stamp = {
        "preset": preset, "seed": seed, "hash": build_hash(preset, seed), "values": PRESETS[preset],
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": round(sum(last) / len(last), 4),  # general + task loss, mean of the last 20 steps
        "build_seconds": round(time.time() - start, 1),
    }
    (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")  # written last: marks the build finished
    _replace_dir(tmp, out_dir, stamp["hash"], force)
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path, build_hash: str, force: bool) -> None:
    """Move the finished build `tmp` to `out_dir`, replacing whatever is there.

    If a concurrent process finished the same build first (same hash), keep theirs unless `force`: the two are
    identical, and theirs may already be in use."""
    for _ in range(3):  # another process may rename its build into place between our steps
        if out_dir.exists():
            if not force and _stamp_matches(out_dir, build_hash):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(out_dir)
            return
        except OSError:
            continue
    raise RuntimeError(f"could not move the tiny base build {tmp} to {out_dir}")


# ---------------------------------------------------------------------------------------------------------------
# The demo task files
# ---------------------------------------------------------------------------------------------------------------
def demo_examples(n: int, seed: int = 0) -> list[dict]:
    """Return `n` Alpaca records of the demo task (reverse 3-6 distinct digits) with distinct inputs, deterministic
    in `seed`."""
    rng = random.Random(f"demo-{seed}")
    seen, records = set(), []
    while len(records) < n:
        digits = _digits(rng)
        if digits not in seen:
            seen.add(digits)
            records.append({"instruction": DEMO_INSTRUCTION, "input": digits, "output": digits[::-1]})
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
    from tunekit.data import alpaca_prompt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # All inputs are distinct, so the split is disjoint; eval comes first so it does not depend on n_train.
    records = demo_examples(n_eval + n_train, seed)
    eval_, train = records[:n_eval], records[n_eval:]
    variants = train[:n_variants]
    chat = [{"messages": [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in variants]
    prompt_completion = [{"prompt": alpaca_prompt(r), "completion": r["output"]} for r in variants]
    text = [{"text": p["prompt"] + p["completion"]} for p in prompt_completion]
    return {
        "train": _write_jsonl(out_dir / "train.jsonl", train),
        "eval": _write_jsonl(out_dir / "eval.jsonl", eval_),
        "chat": _write_jsonl(out_dir / "chat.jsonl", chat),
        "prompt_completion": _write_jsonl(out_dir / "prompt_completion.jsonl", prompt_completion),
        "text": _write_jsonl(out_dir / "text.jsonl", text),
    }


def preference_examples(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Return `n` (digits, chosen, rejected) triples of the preference task with distinct inputs, deterministic in
    `seed`: chosen = the digits reversed (the demo task's answer), rejected = the digits copied, which the base
    prefers because pretraining taught it "Repeat the digits." and never reversing. Distinct digits, so the two
    answers always differ."""
    rng = random.Random(f"preference-{seed}")  # its own stream: not the demo task's inputs in the same order
    seen, triples = set(), []
    while len(triples) < n:
        digits = _digits(rng)
        if digits not in seen:
            seen.add(digits)
            triples.append((digits, digits[::-1], digits))
    return triples


def write_preference_task(out_dir: str | os.PathLike, n_train: int = 2000, n_eval: int = 64,
                          seed: int = 0) -> dict[str, Path]:
    """Write the tiny preference task into `out_dir`; return {"train", "eval", "chat_train", "chat_eval"} paths.

    preference-train.jsonl / preference-eval.jsonl hold string rows {"prompt", "chosen", "rejected"}: the prompt is
    the rendered Alpaca prompt of "Reverse the digits." (the same text as the demo task's), used as written; the
    pipeline appends eos to each answer. preference-chat-train.jsonl / preference-chat-eval.jsonl hold the same pairs
    as messages: prompt = [user turn], chosen / rejected = [assistant turn]. Train and eval inputs are disjoint.
    """
    from tunekit.data import alpaca_prompt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Eval first, so the held-out pairs do not depend on n_train.
    triples = preference_examples(n_eval + n_train, seed)
    splits = {"eval": triples[:n_eval], "train": triples[n_eval:]}
    paths = {}
    for split, rows in splits.items():
        strings = [{"prompt": alpaca_prompt({"instruction": DEMO_INSTRUCTION, "input": digits}),
                    "chosen": chosen, "rejected": rejected} for digits, chosen, rejected in rows]
        chat = [{"prompt": [{"role": "user", "content": f"{DEMO_INSTRUCTION}\n{digits}"}],
                 "chosen": [{"role": "assistant", "content": chosen}],
                 "rejected": [{"role": "assistant", "content": rejected}]} for digits, chosen, rejected in rows]
        paths[split] = _write_jsonl(out_dir / f"preference-{split}.jsonl", strings)
        paths[f"chat_{split}"] = _write_jsonl(out_dir / f"preference-chat-{split}.jsonl", chat)
    return {name: paths[name] for name in ("train", "eval", "chat_train", "chat_eval")}


# ---------------------------------------------------------------------------------------------------------------
# Tiny random-init models of other architectures (tests/test_architectures.py): the same code paths as a real
# checkpoint of that family (its module names, fused projections, Conv1D, fused MoE experts, attention support, chat
# template's end-of-turn token), a few thousand parameters each.
# ---------------------------------------------------------------------------------------------------------------
ARCH_HIDDEN, ARCH_HEADS, ARCH_LAYERS, ARCH_INTERMEDIATE = 32, 4, 2, 64
# family -> (transformers config class name, its extra settings, the end-of-turn token its chat template writes:
# None = the tokenizer's eos, as in tiny's own template).
ARCHITECTURES: dict[str, tuple[str, dict, str | None]] = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": False}, "<|eot_id|>"),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2}, None),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}, "<|im_end|>"),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 8}, "<|im_end|>"),
    "gemma3": ("Gemma3TextConfig", {"num_key_value_heads": 2, "head_dim": 8}, "<end_of_turn>"),
    "olmo2": ("Olmo2Config", {"num_key_value_heads": 2}, None),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2}, EOS),  # Phi-3 ends turns with <|end|>, tiny's eos
    "starcoder2": ("Starcoder2Config", {"num_key_value_heads": 2}, None),
    "gpt_neox": ("GPTNeoXConfig", {}, None),
    "falcon": ("FalconConfig", {"new_decoder_architecture": True, "num_kv_heads": 2}, None),
    "gpt2": ("GPT2Config", {}, None),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 16}, "<|im_end|>"),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 8}, "<end_of_turn>"),
}


def turn_template(end_of_turn: str) -> str:
    """A chat template that ends every turn with `end_of_turn` (a special token), assistant turns in {% generation %}."""
    return (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}" + end_of_turn
        + "{% endgeneration %}{% else %}{{ message['content'] }}" + end_of_turn + "{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )


def build_tiny_architecture(family: str, out_dir: str | os.PathLike, tokenizer, seed: int = 0) -> Path:
    """Save a random-init model of `family` (ARCHITECTURES) with `tokenizer` (train_tokenizer's, copied: the
    family's end-of-turn token is added to it as a special token, with a template that writes it) into out_dir."""
    import copy

    import torch
    import transformers

    class_name, extra, end_of_turn = ARCHITECTURES[family]
    tokenizer = copy.deepcopy(tokenizer)
    if end_of_turn not in (None, EOS):
        tokenizer.add_tokens([end_of_turn], special_tokens=True)
    if end_of_turn is not None:
        tokenizer.chat_template = turn_template(end_of_turn)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family == "gpt2":  # GPT-2's config names its sizes n_*
        sizes = {"n_embd": ARCH_HIDDEN, "n_layer": ARCH_LAYERS, "n_head": ARCH_HEADS, "n_inner": ARCH_INTERMEDIATE,
                 "n_positions": 256}
    else:
        sizes = {"hidden_size": ARCH_HIDDEN, "num_hidden_layers": ARCH_LAYERS, "num_attention_heads": ARCH_HEADS,
                 "intermediate_size": ARCH_INTERMEDIATE, "max_position_embeddings": 256}
    config = getattr(transformers, class_name)(vocab_size=len(tokenizer), **sizes, **ids, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
