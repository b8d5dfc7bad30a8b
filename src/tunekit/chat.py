"""Chat templates: where each assistant turn sits in a rendered conversation, and which token ends a turn.

Templates differ in ways that break naive masking: Llama 3 ends a turn with <|eot_id|>, Gemma with <end_of_turn>,
Phi-3 with <|end|>, ChatML with <|im_end|>, while `eos_token` may be another token; Qwen 3 rewrites earlier
assistant turns (drops their <think> blocks), so a prefix of the conversation does not render as a prefix of the text.

    chat_segments(messages, tokenizer) -> [(text, carries_loss), ...]   what the data pipeline tokenizes
    chat_spans(messages, tokenizer)    -> (text, [(start, end), ...])   the same, as character spans
    end_of_turn_token(tokenizer)       -> "<|eot_id|>" | ... | None

Each conversation is rendered once. What a template does around an assistant turn (its end-of-turn token, the text
that ends a generation prompt) is learned once per tokenizer and template from probe conversations and cached.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass

from tunekit.errors import UserError, first_line

PROBE_SYSTEM = "tunekit probe system"
PROBE_USER = "tunekit probe question"
PROBE_ASSISTANT = "tunekit probe answer"
THINK_OPEN = "<think>"  # the reasoning-block opener of Qwen 3, DeepSeek-R1, Nemotron, SmolLM3, GLM

# The {% generation %} tag that transformers' AssistantTracker understands (same pattern transformers checks for).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's own chat template; a template's refusal is a UserError."""
    _require_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template's raise_exception (e.g. roles must alternate): the user's data, one line
        raise _refused(tokenizer, messages, exc) from None


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant message (e.g. <|eot_id|>, <|im_end|>,
    <end_of_turn>, <|end|>, </s>), or None when the tokenizer has no template or the template writes none.

    Found by rendering a one-exchange probe conversation and taking the first special token after the answer (the
    longest one when several start at the same place), so it needs no table of model families.
    """
    if tokenizer.chat_template is None:
        return None
    return _facts(tokenizer).end_of_turn


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, carries_loss) pieces, empty pieces dropped.

    The pieces join to exactly `tokenizer.apply_chat_template(messages, tokenize=False)`. A loss piece is what the
    model generates for one assistant turn: everything after its generation prompt (the assistant header, e.g.
    "<|im_start|>assistant\\n", or for Mistral/Llama 2 the "[/INST]" that closes the user turn) up to and including
    the end-of-turn token. That includes a <think> block wherever the template renders one for that turn (Qwen 3
    renders it for turns after the last user message; TRL's Qwen 3 training template puts it inside
    {% generation %} too), and excludes separators written after the end-of-turn token (e.g. "\\n").
    Raises UserError (one line) when the template refuses the conversation or an assistant turn cannot be located.
    """
    text, spans = chat_spans(messages, tokenizer)
    pieces, done = [], 0
    for start, end in spans:
        pieces += [(text[done:start], False), (text[start:end], True)]
        done = end
    pieces.append((text[done:], False))
    return [piece for piece in pieces if piece[0]]


def chat_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant turn's loss text]), spans in order and disjoint.

    Templates with {% generation %} blocks give the spans themselves (transformers' AssistantTracker); the spans are
    then trimmed to the same rule as below (no generation-prompt text, nothing after the end-of-turn token). Other
    templates are rendered once and each assistant turn is located in order: the next occurrence of the generation
    cue, then the first end-of-turn token after it, checked to enclose the turn's content.
    """
    _require_template(tokenizer)
    facts = _facts(tokenizer)
    if facts.tagged and _render_tracked is not None:
        text, spans = _tagged_spans(messages, tokenizer, facts)
    else:
        text = render(tokenizer, messages)
        spans = _located_spans(text, messages, tokenizer, facts)
    return text, spans


# ---------------------------------------------------------------------------------------------------------------
# Per-template facts, learned from probe conversations once per (tokenizer, template).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateFacts:
    end_of_turn: str | None  # special token written right after an assistant message's content
    cue: str  # text that ends a generation prompt: the assistant header, else what closes the user turn
    tagged: bool  # the template marks assistant output with {% generation %}


# Keyed by the tokenizer object (dropped with it), then by template string (a caller may swap the template).
_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _facts(tokenizer) -> TemplateFacts:
    template = _template_string(tokenizer)
    per_template = _FACTS.setdefault(tokenizer, {})
    if template not in per_template:
        per_template[template] = TemplateFacts(end_of_turn=_probe_end_of_turn(tokenizer),
                                               cue=_probe_cue(tokenizer), tagged=bool(GENERATION_TAG.search(template)))
    return per_template[template]


def _probes(last: dict) -> list[list[dict]]:
    """Probe conversations ending with `last`: without a system message first (Gemma refuses one), then with one
    (some templates require it)."""
    return [[{"role": "user", "content": PROBE_USER}, *([last] if last["role"] != "user" else [])],
            [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": PROBE_USER},
             *([last] if last["role"] != "user" else [])]]


def _try_render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # a template that refuses this probe shape; the next probe may suit it
        return None


def _probe_end_of_turn(tokenizer) -> str | None:
    specials = _special_tokens(tokenizer)
    for probe in _probes({"role": "assistant", "content": PROBE_ASSISTANT}):
        text = _try_render(tokenizer, probe, False)
        if text is None or PROBE_ASSISTANT not in text:
            continue
        tail = text[text.rindex(PROBE_ASSISTANT) + len(PROBE_ASSISTANT):]
        found = [(tail.find(token), -len(token), token) for token in specials if token in tail]
        return min(found)[2] if found else None
    return None


def _probe_cue(tokenizer) -> str:
    """What the generation prompt adds (e.g. "<|im_start|>assistant\\n"); for templates that ignore
    add_generation_prompt (Mistral, Llama 2), what follows the user's content instead (e.g. " [/INST]"). "" when the
    template writes neither, and then no assistant turn can be located."""
    for probe in _probes({"role": "user", "content": PROBE_USER}):
        bare, prompt = _try_render(tokenizer, probe, False), _try_render(tokenizer, probe, True)
        if bare is None or prompt is None:
            continue
        # What only the prompt has, after what the two renderings share. Not simply prompt[len(bare):]: Phi-3 ends a
        # conversation without a generation prompt with eos, so bare is not a prefix of prompt. Templates that
        # ignore add_generation_prompt (Mistral, Llama 2) give nothing there: then what follows the user's content.
        user_end = prompt.rfind(PROBE_USER) + len(PROBE_USER) if PROBE_USER in prompt else -1
        shared = _token_boundary(prompt, len(os.path.commonprefix([bare, prompt])), _special_tokens(tokenizer))
        if 0 <= user_end <= shared < len(prompt):
            cue = prompt[shared:]
        else:
            cue = prompt[user_end:] if user_end >= 0 else ""
        # A prompt that opens the reasoning block for the model (DeepSeek-R1, Qwen 3.5+, Nemotron 3: "...<think>\\n",
        # or "<think>\\n\\n</think>\\n\\n" to skip it) is the header plus a think block; history turns render the header
        # without it, and a rendered think block is part of the turn's loss text (see chat_segments).
        if THINK_OPEN in cue:
            cue = cue[:cue.index(THINK_OPEN)]
        return cue
    return ""


def _token_boundary(text: str, at: int, specials: set[str]) -> int:
    """`at`, moved back to the start of a special token it falls inside ("<|end|>\\n<|" shared by "<|endoftext|>"
    and "<|assistant|>" is cut before "<|")."""
    for token in specials:
        for back in range(1, min(len(token), at + 1)):
            if text.startswith(token, at - back):
                return at - back
    return at


def _special_tokens(tokenizer) -> set[str]:
    specials = {token for token in tokenizer.all_special_tokens if token}
    specials |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return specials


def _template_string(tokenizer) -> str:
    # get_chat_template picks the default of a named-template dict, as apply_chat_template does.
    get = getattr(tokenizer, "get_chat_template", None)
    return get() if get is not None else tokenizer.chat_template


# ---------------------------------------------------------------------------------------------------------------
# Spans: from {% generation %} blocks, or located in the one rendering.
# ---------------------------------------------------------------------------------------------------------------

try:  # public module-level function behind apply_chat_template(return_assistant_tokens_mask=True) in transformers 5
    from transformers.utils.chat_template_utils import render_jinja_template as _render_tracked
except ImportError:  # an older or newer transformers without it: locate turns as for untagged templates
    _render_tracked = None


def _tagged_spans(messages: list[dict], tokenizer, facts: TemplateFacts) -> tuple[str, list[tuple[int, int]]]:
    """Render once with the AssistantTracker on and normalize its character spans to the loss rule."""
    # The same inputs apply_chat_template gives the template: None-valued keys dropped, special tokens as variables.
    conversation = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        rendered, indices = _render_tracked([conversation], chat_template=_template_string(tokenizer),
                                            return_assistant_tokens_mask=True, add_generation_prompt=False,
                                            **tokenizer.special_tokens_map)
    except Exception as exc:
        raise _refused(tokenizer, messages, exc) from None
    text, spans = rendered[0], []
    for start, end in indices[0]:
        start, end = _trim_span(text, start, end, facts)
        if end <= start:
            continue
        if spans and facts.end_of_turn and text.endswith(facts.end_of_turn, 0, spans[-1][1]) \
                and not text[spans[-1][1]:start].strip():
            continue  # right after a turn's end-of-turn token: no turn's output (TRL's Phi-3 template wraps the eos
            # it writes after the last <|end|>, which the model never generates: it stops at <|end|>)
        if spans and start <= spans[-1][1]:  # several generation blocks in one turn: one span
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    return text, spans


def _trim_span(text: str, start: int, end: int, facts: TemplateFacts) -> tuple[int, int]:
    """A generation block cut to the loss rule. The prompt gives the cue, so a block that starts with it or inside
    it (TRL's DeepSeek and gpt-oss templates open it before the assistant header, its Qwen 2.5 one before the
    header's "\\n") starts after it. A block that runs past the end-of-turn token (TRL's templates include the "\\n"
    after <|im_end|>) ends at it; one that stops just short of it (content only) takes it in, since the model must
    learn to stop."""
    cue, eot = facts.cue, facts.end_of_turn
    for back in range(len(cue)):
        if back <= start and text.startswith(cue, start - back) and start - back + len(cue) <= end:
            start = start - back + len(cue)
            break
    if eot:
        last = text.rfind(eot, start, end)
        if last >= 0:
            end = last + len(eot)
        elif text.startswith(eot, end):
            end += len(eot)
    return start, end


def _located_spans(text: str, messages: list[dict], tokenizer, facts: TemplateFacts) -> list[tuple[int, int]]:
    """Each assistant turn in order: the next cue after the previous turn, then the first end-of-turn token after
    it. The content (as the template keeps it: stripped, reasoning removed) must lie between the two, so a turn the
    template rewrote beyond recognition is an error rather than a wrong mask."""
    cue, eot = facts.cue, facts.end_of_turn
    spans: list[tuple[int, int]] = []
    cursor = 0
    for number, message in enumerate((m for m in messages if m.get("role") == "assistant"), start=1):
        cores = _content_cores(message)
        if not cue:
            raise _unlocated(tokenizer, number, message, "its generation prompt writes nothing to find the turn by")
        at = text.find(cue, cursor)
        if at < 0:
            raise _unlocated(tokenizer, number, message, f"no {cue!r} before it")
        start = at + len(cue)
        if eot:
            stop = text.find(eot, start)
            if stop < 0:
                raise _unlocated(tokenizer, number, message, f"no {eot!r} after it")
            end = stop + len(eot)
        else:  # a template that ends turns with plain text (GLM 4 starts the next turn): the loss ends with the content
            last = text.find(cores[-1], start) if cores else -1
            if last < 0:
                raise _unlocated(tokenizer, number, message, "its content is not in the rendered text")
            stop = end = last + len(cores[-1])
        body, position = text[start:stop], 0
        if cue in body:  # a template that ends some turns with another token (gpt-oss: <|end|> vs <|return|>)
            raise _unlocated(tokenizer, number, message, f"the next {cue!r} comes before its {eot or 'end'}")
        for core in cores:  # in order, each within the turn
            found = body.find(core, position)
            if found < 0:
                raise _unlocated(tokenizer, number, message, f"its content is not between {cue!r} and the turn's end")
            position = found + len(core)
        spans.append((start, end))
        cursor = end
    return spans


def _content_cores(message: dict) -> list[str]:
    """The text of an assistant message that any template keeps verbatim: each text part, stripped, with a leading
    reasoning block removed (Qwen 3 moves or drops everything up to </think>)."""
    content = message.get("content")
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):  # multimodal-style content blocks
        texts = [block["text"] for block in content if isinstance(block, dict) and isinstance(block.get("text"), str)]
    else:
        texts = []
    cores = []
    for part in texts:
        if "</think>" in part:
            part = part.rsplit("</think>", 1)[1]
        if part.strip():
            cores.append(part.strip())
    return cores


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line each, naming the template's owner and the conversation.
# ---------------------------------------------------------------------------------------------------------------


def _require_template(tokenizer) -> None:
    if tokenizer.chat_template is None:
        raise UserError("chat messages (format 'chat', or 'preference' pairs written as messages) need a tokenizer "
                        "with a chat template (model.name_or_path has none)")


def _refused(tokenizer, messages: list[dict], exc: Exception) -> UserError:
    first = str(messages[0].get("content"))[:40] if messages else ""
    return UserError(f"the chat template of {tokenizer.name_or_path} refuses a conversation starting "
                     f"{first!r}: {first_line(exc, with_type=False)}")


def _unlocated(tokenizer, number: int, message: dict, why: str) -> UserError:
    content = str(message.get("content"))[:40]
    return UserError(f"cannot find assistant turn {number} ({content!r}) in the text the chat template of "
                     f"{tokenizer.name_or_path} renders: {why}; use format 'prompt_completion' for this data")
