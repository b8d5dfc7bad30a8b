"""chat_segments against the real chat templates of the major model families (fixtures in tests/chat_templates/).

Each family gets a small byte-level BPE with that family's special tokens, saved and loaded back with AutoTokenizer,
so the templates run through transformers' own loading and rendering code. The checks are invariants: the pieces
join to the rendered text, the loss text is each assistant turn as the family renders it plus its end-of-turn
token, no prompt text carries loss, and a template with {% generation %} agrees with its untagged original.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tunekit import chat
from tunekit.errors import UserError

TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclass(frozen=True)
class Family:
    template: str  # fixture file stem
    bos: str | None
    eos: str
    end_of_turn: str  # what end_of_turn_token must return
    turn: Callable[[str], str]  # assistant content -> its loss text as this family renders it
    last: Callable[[str], str] | None = None  # the same for the last turn, where it differs
    specials: tuple[str, ...] = ()  # extra special tokens (headers, end-of-turn)
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <think>, <tool_call>)
    system: bool = True  # the template accepts a system message
    pad: str | None = None


LLAMA3 = dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", end_of_turn="<|eot_id|>",
              turn=lambda c: c.strip() + "<|eot_id|>",
              specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
CHATML = dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
              turn=lambda c: c + "<|im_end|>", specials=("<|im_start|>", "<|endoftext|>"),
              plain=("<think>", "</think>", "<tool_call>", "</tool_call>"))
GEMMA = dict(bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>",
             turn=lambda c: c.strip() + "<end_of_turn>", specials=("<start_of_turn>", "<end_of_turn>"))
MISTRAL = dict(bos="<s>", eos="</s>", end_of_turn="</s>")

FAMILIES = {
    "llama3": Family("llama3", **LLAMA3),
    "llama3_1": Family("llama3_1", **LLAMA3),  # injects a "Cutting Knowledge Date" system block
    "qwen2_5": Family("qwen2_5", **CHATML),  # injects a default system prompt
    # The last turn gets an empty think block (see test_qwen3_last_turn_without_reasoning...).
    "qwen3": Family("qwen3", **CHATML, last=lambda c: "<think>\n\n</think>\n\n" + c + "<|im_end|>"),
    "gemma": Family("gemma", **{**GEMMA, "system": False}),
    "gemma3": Family("gemma3", **GEMMA),  # folds the system message into the first user turn
    "phi3": Family("phi3", bos="<s>", eos="<|endoftext|>", end_of_turn="<|end|>", turn=lambda c: c + "<|end|>",
                   specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "mistral_v7_tekken": Family("mistral_v7_tekken", **MISTRAL, turn=lambda c: c + "</s>",
                                specials=("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")),
    "mixtral": Family("mixtral", **MISTRAL, turn=lambda c: c + "</s>", specials=("[INST]", "[/INST]"), system=False),
    "zephyr": Family("zephyr", **MISTRAL, turn=lambda c: c + "</s>"),  # role tags are plain text in its tokenizer
    "llama2": Family("llama2", **MISTRAL, turn=lambda c: " " + c.strip() + " </s>"),
}
TAGGED_PAIRS = [("llama3", "llama3_training"), ("qwen2_5", "qwen2_5_training"), ("gemma", "gemma_training"),
                ("qwen3", "qwen3_training"), ("phi3", "phi3_training")]

SYSTEM = "You are a terse geography tutor."
EXCHANGES = [("What is the capital of France?", "Paris is the capital of France."),
             ("And of Italy?", "Rome.\nIt has been the capital since 1871."),
             ("Which river runs through it?", "The Tiber river runs through Rome.")]


def conversation(system: bool, exchanges=EXCHANGES) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in exchanges:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


@pytest.fixture(scope="module")
def base_bpe():
    """One small byte-level BPE (tokenizers library) that each family's tokenizer copies and extends."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [SYSTEM, *(text for pair in EXCHANGES for text in pair), "You are Qwen, created by Alibaba Cloud.",
             "Cutting Knowledge Date: December 2023", "tunekit probe question answer system"] * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe.to_str()


def build(base_bpe: str, family: Family, out: Path, template: str | None = None):
    """The family's tokenizer: base BPE + its special tokens + the chat template, saved and loaded back."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer.from_str(base_bpe)
    named = [token for token in (family.bos, family.eos, family.pad) if token]
    bpe.add_special_tokens(list(dict.fromkeys(named + list(family.specials))))
    bpe.add_tokens([AddedToken(token, special=False, normalized=False) for token in family.plain])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=family.bos, eos_token=family.eos,
                                        pad_token=family.pad or family.eos,
                                        extra_special_tokens=[t for t in family.specials if t not in named])
    tokenizer.chat_template = template if template is not None else \
        (TEMPLATES / f"{family.template}.jinja").read_text(encoding="utf-8")
    tokenizer.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def tokenizers(base_bpe, tmp_path_factory) -> dict:
    """Every family's tokenizer, plus the TRL training (tagged) variants under their fixture names."""
    root = tmp_path_factory.mktemp("chat-tokenizers")
    built = {name: build(base_bpe, family, root / name) for name, family in FAMILIES.items()}
    for original, tagged in TAGGED_PAIRS:
        family = FAMILIES[original]
        built[tagged] = build(base_bpe, family, root / tagged,
                              (TEMPLATES / f"{tagged}.jinja").read_text(encoding="utf-8"))
    return built


def loss_texts(pieces) -> list[str]:
    return [text for text, carries_loss in pieces if carries_loss]


def expected_loss(family: Family, exchanges=EXCHANGES) -> list[str]:
    turns = [family.turn(answer) for _, answer in exchanges]
    if family.last is not None:
        turns[-1] = family.last(exchanges[-1][1])
    return turns


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_is_each_assistant_turn_and_its_end_of_turn_token(tokenizers, name):
    family, tokenizer = FAMILIES[name], tokenizers[name]
    messages = conversation(family.system)
    pieces = chat.chat_segments(messages, tokenizer)

    assert "".join(text for text, _ in pieces) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert all(text for text, _ in pieces)
    assert loss_texts(pieces) == expected_loss(family)
    for text in loss_texts(pieces):  # nothing of the prompt side trains
        assert SYSTEM not in text and not any(question in text for question, _ in EXCHANGES)
        assert not any(token in text for token in family.specials if token != family.end_of_turn)


@pytest.mark.parametrize("name", FAMILIES)
def test_end_of_turn_token_per_family(tokenizers, name):
    assert chat.end_of_turn_token(tokenizers[name]) == FAMILIES[name].end_of_turn


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenized_pieces_decode_to_the_loss_text(tokenizers, name):
    """What the data pipeline does: tokenize piece by piece; the loss tokens decode to the expected turns."""
    family, tokenizer = FAMILIES[name], tokenizers[name]
    pieces = chat.chat_segments(conversation(family.system), tokenizer)
    loss_ids: list[int] = []
    for text, carries_loss in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        if carries_loss:
            loss_ids += ids
    assert tokenizer.decode(loss_ids) == "".join(expected_loss(family))
    assert tokenizer.convert_tokens_to_ids(family.end_of_turn) in loss_ids


@pytest.mark.parametrize("name", ["llama3", "gemma", "llama2"])
def test_trimming_templates_locate_padded_content(tokenizers, name):
    """Templates that trim content (Llama 3, Gemma, Llama 2) still get the turn, as rendered."""
    family = FAMILIES[name]
    exchanges = [("Hi?", "  Hello there.  \n"), ("Bye?", "\nGoodbye.")]
    pieces = chat.chat_segments(conversation(family.system, exchanges), tokenizers[name])
    assert loss_texts(pieces) == expected_loss(family, exchanges)


# ---------------------------------------------------------------------------------------------------------------
# Qwen 3: history rewriting and the <think> rule.
# ---------------------------------------------------------------------------------------------------------------

THINKING = [(question, f"<think>\nStep {n}: recall the atlas.\n</think>\n\n{answer}")
            for n, (question, answer) in enumerate(EXCHANGES, start=1)]


def test_qwen3_multi_turn_with_think_blocks_in_history(tokenizers):
    """Qwen 3 drops the <think> blocks of turns before the last user message, so a conversation prefix does not
    render as a text prefix (the old prefix method refused this). Earlier turns train on their answers as the
    template keeps them; the last turn trains on its think block too, as the model generates it."""
    tokenizer = tokenizers["qwen3"]
    messages = conversation(True, THINKING)
    pieces = chat.chat_segments(messages, tokenizer)

    assert "".join(text for text, _ in pieces) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert loss_texts(pieces) == ["Paris is the capital of France.<|im_end|>",
                                  "Rome.\nIt has been the capital since 1871.<|im_end|>",
                                  "<think>\nStep 3: recall the atlas.\n</think>\n\n"
                                  "The Tiber river runs through Rome.<|im_end|>"]
    # The template really rewrote history: the first turn's think block is gone, and the conversation up to the
    # first answer does not render as a prefix of the whole (why the old prefix method refused it).
    assert "Step 1" not in "".join(text for text, _ in pieces)
    assert not tokenizer.apply_chat_template(messages, tokenize=False).startswith(
        tokenizer.apply_chat_template(messages[:3], tokenize=False))


def test_qwen3_last_turn_without_reasoning_trains_on_the_empty_think_block(tokenizers):
    """The template writes "<think>\\n\\n</think>\\n\\n" before a final answer without reasoning; it is part of what
    the model emits at inference (the generation prompt ends at "assistant\\n"), so it carries loss, as in TRL's
    qwen3_training.jinja where it sits inside {% generation %}."""
    pieces = chat.chat_segments(conversation(True), tokenizers["qwen3"])
    assert loss_texts(pieces) == ["Paris is the capital of France.<|im_end|>",
                                  "Rome.\nIt has been the capital since 1871.<|im_end|>",
                                  "<think>\n\n</think>\n\nThe Tiber river runs through Rome.<|im_end|>"]


def test_qwen3_reasoning_content_field(tokenizers):
    messages = [{"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris.", "reasoning_content": "It is Paris."}]
    pieces = chat.chat_segments(messages, tokenizers["qwen3"])
    assert loss_texts(pieces) == ["<think>\nIt is Paris.\n</think>\n\nParis.<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------------
# {% generation %} templates agree with their untagged originals.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("original,tagged", TAGGED_PAIRS)
def test_generation_tags_give_the_same_pieces_as_locating(tokenizers, original, tagged):
    family = FAMILIES[original]
    # Qwen 3's training template renders every think block; the two agree on a single exchange.
    messages = conversation(family.system, EXCHANGES[:1] if original == "qwen3" else EXCHANGES)
    untagged, tagged_tok = tokenizers[original], tokenizers[tagged]
    assert untagged.apply_chat_template(messages, tokenize=False) == tagged_tok.apply_chat_template(messages,
                                                                                                    tokenize=False)
    pieces = chat.chat_segments(messages, tagged_tok)
    assert "".join(text for text, _ in pieces) == tagged_tok.apply_chat_template(messages, tokenize=False)
    assert pieces == chat.chat_segments(messages, untagged)


TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CONVERSATION = [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                     {"role": "tool", "content": "18 C and sunny"},
                     {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]


@pytest.mark.parametrize("name", ["qwen2_5", "qwen2_5_training", "qwen3"])
def test_tool_calls_carry_loss_and_tool_results_do_not(tokenizers, name):
    pieces = chat.chat_segments(TOOL_CONVERSATION, tokenizers[name])
    think = "<think>\n\n</think>\n\n" if name == "qwen3" else ""  # Qwen 3: the turn after the tool result is last
    assert loss_texts(pieces) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        think + "It is 18 C and sunny in Paris.<|im_end|>"]
    assert "".join(text for text, _ in pieces) == tokenizers[name].apply_chat_template(TOOL_CONVERSATION,
                                                                                       tokenize=False)


def test_tiny_base_template_pieces(base_bpe, tmp_path):
    """The tiny base's own template (with {% generation %}): the pieces the old prefix method gave, written out,
    and the same pieces with the generation tags taken out."""
    from tunekit import tiny

    family = Family("tiny", bos=tiny.BOS, eos=tiny.EOS, pad=tiny.PAD, end_of_turn=tiny.EOS, turn=str,
                    specials=(tiny.USER, tiny.ASSISTANT))
    tagged = build(base_bpe, family, tmp_path / "tagged", tiny.CHAT_TEMPLATE)
    plain = build(base_bpe, family, tmp_path / "plain", re.sub(r"\{% (end)?generation %\}", "", tiny.CHAT_TEMPLATE))
    messages = [{"role": "user", "content": "Reverse the digits.\n381"}, {"role": "assistant", "content": "183"},
                {"role": "user", "content": "Again: 52"}, {"role": "assistant", "content": "25"}]
    expected = [("<|begin|><|user|>\nReverse the digits.\n381<|end|>\n<|assistant|>\n", False), ("183<|end|>", True),
                ("\n<|user|>\nAgain: 52<|end|>\n<|assistant|>\n", False), ("25<|end|>", True), ("\n", False)]
    assert chat.chat_segments(messages, tagged) == expected
    assert chat.chat_segments(messages, plain) == expected
    from tunekit import data

    if hasattr(data, "_chat_segments"):  # the method this replaces, while it exists: the same text, the same loss;
        # it split the prompt side at each turn's end ("\n" | "<|user|>..."), chat_segments keeps it in one piece
        merged = []
        for text, carries_loss in data._chat_segments(messages, tagged):
            if merged and not carries_loss and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + text, False)
            else:
                merged.append((text, carries_loss))
        assert merged == expected


# ---------------------------------------------------------------------------------------------------------------
# Errors and cost.
# ---------------------------------------------------------------------------------------------------------------


def test_a_refused_conversation_is_one_error_line(tokenizers):
    with pytest.raises(UserError, match="refuses") as caught:
        chat.chat_segments(conversation(True), tokenizers["gemma"])  # Gemma has no system role
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="alternate"):
        chat.chat_segments([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenizers["mixtral"])


def test_an_assistant_turn_the_template_rewrites_is_an_error_not_a_wrong_mask(base_bpe, tmp_path):
    template = (TEMPLATES / "llama3.jinja").read_text(encoding="utf-8").replace(
        "message['content'] | trim", "message['content'] | trim | upper")
    tokenizer = build(base_bpe, FAMILIES["llama3"], tmp_path / "upper", template)
    with pytest.raises(UserError, match="cannot find assistant turn 1") as caught:
        chat.chat_segments(conversation(True), tokenizer)
    assert "\n" not in str(caught.value)


def test_no_chat_template_is_a_user_error(base_bpe, tmp_path):
    tokenizer = build(base_bpe, FAMILIES["llama3"], tmp_path / "none")
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        chat.chat_segments(conversation(True), tokenizer)
    assert chat.end_of_turn_token(tokenizer) is None


@pytest.mark.parametrize("name", ["qwen3", "llama3_training"])
def test_one_render_per_conversation_once_the_template_is_known(tokenizers, name, monkeypatch):
    """Per-template facts are probed once; after that each conversation costs one rendering."""
    from transformers import tokenization_utils_base
    from transformers.utils import chat_template_utils

    tokenizer = tokenizers[name]
    messages = conversation(True)
    chat.chat_segments(messages, tokenizer)  # learns the template's facts
    calls = []
    real = chat_template_utils.render_jinja_template
    counting = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(chat, "_render_tracked", counting)  # the {% generation %} path
    monkeypatch.setattr(tokenization_utils_base, "render_jinja_template", counting)  # apply_chat_template's
    chat.chat_segments(messages, tokenizer)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------
# Through the data pipeline: Arrow, worker map, cache — what training receives.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*FAMILIES, "qwen3-thinking"])
def test_the_prepared_dataset_trains_every_assistant_turn(tokenizers, name, tmp_path):
    """tunekit.prepare on a file of multi-turn conversations: each example's loss tokens decode to exactly its
    assistant turns with their end-of-turn tokens (Qwen 3 with <think> in history included)."""
    import json

    from tunekit import prepare
    from tunekit.config import RunConfig

    thinking = name == "qwen3-thinking"
    family = FAMILIES["qwen3" if thinking else name]
    tokenizer = tokenizers["qwen3" if thinking else name]
    conversations = [conversation(family.system, THINKING if thinking else EXCHANGES),
                     conversation(family.system, EXCHANGES[:1])]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    config = RunConfig.model_validate({
        "method": "lora", "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tmp_path)},
        "data": {"sources": [{"path": str(path), "format": "chat"}], "cache_dir": str(tmp_path / "cache"),
                 "eval_fraction": 0, "max_seq_len": 4096},
    })
    source = prepare.load_source(str(path), "chat", "train", None, tokenizer, config, log=lambda line: None)
    first, second = list(source.tokens)
    if thinking:
        expected = ["Paris is the capital of France.<|im_end|>", "Rome.\nIt has been the capital since 1871.<|im_end|>",
                    "<think>\nStep 3: recall the atlas.\n</think>\n\nThe Tiber river runs through Rome.<|im_end|>"]
    else:
        expected = expected_loss(family)
    for example, turns in ((first, expected), (second, expected_loss(family, EXCHANGES[:1]))):
        loss_ids = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert tokenizer.decode(loss_ids) == "".join(turns)
        assert example["prompt_tokens"] > 0
    assert len(prepare.prepare_data(config, tokenizer).train) == 2  # the mask audit passes


@pytest.mark.parametrize("name", FAMILIES)
def test_the_batched_token_path_gives_the_tokenizers_own_ids(tokenizers, name):
    """tunekit.data.token_ids (the Rust batch call) equals tokenizer(text, add_special_tokens=False) per text."""
    from tunekit.data import token_ids

    tokenizer = tokenizers[name]
    texts = [text for text, _ in chat.chat_segments(conversation(FAMILIES[name].system), tokenizer)]
    texts += [" leading space", "trailing space ", "", "ünïcode ✓ 🙂", "\n\n", "Paris\tis"]
    assert token_ids(texts, tokenizer) == [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.mark.parametrize("content", ["", None, "absent"])
def test_a_tool_call_turn_without_text_goes_through_the_pipeline(tokenizers, content, tmp_path):
    """OpenAI's layout for a tool call (content null or absent, tool_calls set) passes the row check and trains the
    call; the tool's result carries no loss."""
    import json

    from tunekit import data, prepare
    from tunekit.config import RunConfig

    call = {"role": "assistant", "tool_calls": [TOOL_CALL]}
    if content != "absent":
        call["content"] = content
    messages = [TOOL_CONVERSATION[0], call, *TOOL_CONVERSATION[2:]]
    assert data.check_row({"messages": messages}, "chat") is None
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    config = RunConfig.model_validate({
        "method": "lora", "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tmp_path)},
        "data": {"sources": [{"path": str(path), "format": "chat"}], "cache_dir": str(tmp_path / "cache"),
                 "eval_fraction": 0, "max_seq_len": 4096}})
    tokenizer = tokenizers["qwen2_5"]
    example = next(iter(prepare.load_source(str(path), "chat", "train", None, tokenizer, config,
                                            log=lambda line: None).tokens))
    loss = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert loss == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                    "It is 18 C and sunny in Paris.<|im_end|>")


def test_a_tool_call_that_is_not_a_list_is_named():
    from tunekit import data

    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": None, "tool_calls": {"name": "f"}}]}
    assert data.check_row(row, "chat") == "messages[1].tool_calls: expected a list of calls, got object"
    row["messages"][1] = {"role": "user", "content": None}
    assert data.check_row(row, "chat") == "messages[1].content: expected a string, got null"
