"""Chat templates (--chat_template): load one, and tokenise a conversation with its assistant spans.

A conversation is rendered as the model will be served (vLLM, TGI and transformers all
apply the same Jinja template), and the trained tokens are exactly those of the
assistant turns, each with the end-of-turn token the template writes after it. Templates
with `{% generation %}` markers say where the assistant's tokens are; for the others the
conversation is rendered turn by turn and each reply is what its render adds after the
generation prompt. Both work in characters and map to tokens through the fast
tokenizer's offsets, so BPE merges across a boundary are handled the same way.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass
from typing import NamedTuple

import jinja2
from transformers import PreTrainedTokenizerBase

from utils.data.conversation import Message, Skip
from utils.errors import UserError

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What a control token looks like ("<|im_end|>", "<end_of_turn>", "</s>"): it must be one token.
CONTROL_TOKEN = re.compile(r"<[^<>\s]{1,40}>")
PROBE: list[Message] = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
PROBE_ANSWER = "Paris"
DOCS = "https://huggingface.co/docs/transformers/chat_templating"
CHOICES = (
    "--chat_template dschat (DeepSpeed-Chat's ' Human: … Assistant:' format), "
    "--chat_template model (the tokenizer's own) or the path of a Jinja file"
)


class ChatTemplateError(UserError):
    """A chat template that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ChatTemplate:
    text: str  # the Jinja source
    source: str  # what the report prints: "model" or the file's path
    end_of_turn: str | None  # the token closing an assistant turn, e.g. "<|im_end|>"
    has_generation_markers: bool  # {% generation %} blocks mark the assistant's tokens


class ChatTokens(NamedTuple):
    input_ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) positions of assistant tokens: what is trained
    truncated: bool  # the rendered conversation was longer than max_seq_len


def load_chat_template(spec: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate | None:
    """--chat_template's value -> the template, checked on a one-exchange conversation.

    "dschat" -> None (DeepSpeed-Chat's format); "model" -> the tokenizer's own template;
    anything else is the path of a Jinja file.
    """
    if spec == "dschat":
        return None
    if spec == "model":
        text, source = model_template(tokenizer), "model"
    else:
        text, source = read_template(spec), spec
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"--chat_template {source}: the tokenizer of {tokenizer.name_or_path!r} is a slow "
            "(Python) tokenizer; locating assistant turns needs a fast one's offsets. "
            "Fix: load it with use_fast=True (a tokenizer.json), or use --chat_template dschat."
        )
    template = ChatTemplate(text, source, None, bool(GENERATION_MARKER.search(text)))
    template = dataclasses.replace(template, end_of_turn=find_end_of_turn(template, tokenizer))
    check_probe(template, tokenizer)
    return template


def model_template(tokenizer: PreTrainedTokenizerBase) -> str:
    name = tokenizer.name_or_path or "the model"
    if tokenizer.chat_template is None:
        raise ChatTemplateError(
            f"--chat_template model: the tokenizer of {name!r} has no chat template (its "
            f"tokenizer_config.json or chat_template.jinja carries none). Fix: pass {CHOICES}."
        )
    try:
        return tokenizer.get_chat_template()
    except ValueError:  # several named templates and none called "default"
        names = sorted(tokenizer.chat_template)
        raise ChatTemplateError(
            f"--chat_template model: {name!r} has several chat templates {names} and no "
            "'default'. Fix: save the one to train with as a .jinja file and pass its path."
        ) from None


def read_template(path: str) -> str:
    fix = f"Fix: pass {CHOICES}."
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ChatTemplateError(f"--chat_template {path}: no such file. {fix}") from None
    except OSError as error:
        raise ChatTemplateError(
            f"--chat_template {path}: cannot read it ({error.strerror}). {fix}"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ChatTemplateError(
            f"--chat_template {path}: not UTF-8 text (byte {error.start} is "
            f"{raw[error.start : error.start + 1]!r}). Fix: save the template as UTF-8."
        ) from None
    if not text.strip():
        raise ChatTemplateError(f"--chat_template {path}: the file is empty. {fix}")
    return text


def find_end_of_turn(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The first added token (not whitespace) the template writes after a reply, or None."""
    rendered = render_probe(template, tokenizer)
    at = rendered.rfind(PROBE_ANSWER)
    if at < 0:
        raise ChatTemplateError(
            f"--chat_template {template.source}: the template does not write the assistant's "
            f"reply (rendered {rendered!r:.200}). Fix: render message['content'] for every role."
        )
    tail = rendered[at + len(PROBE_ANSWER) :]
    for written in CONTROL_TOKEN.findall(tail):
        if len(tokenizer(written, add_special_tokens=False)["input_ids"]) != 1:
            raise ChatTemplateError(
                f"--chat_template {template.source}: the template ends an assistant turn with "
                f"{written!r}, which the tokenizer of {tokenizer.name_or_path!r} splits into "
                "pieces, so the model could not learn where to stop. Fix: add it to the "
                "tokenizer as a special token, or use the template the model was trained with."
            )
    added = tokenizer.added_tokens_decoder  # whitespace tokens (Gemma's "\n\n") close nothing
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    tokens = [added[i].content for i in ids if i in added and not added[i].content.isspace()]
    return tokens[0] if tokens else None


def render_probe(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> str:
    try:
        return render(PROBE, tokenizer, template.text)
    except jinja2.TemplateSyntaxError as error:
        lines = template.text.splitlines()
        line = lines[error.lineno - 1].strip() if 0 < error.lineno <= len(lines) else ""
        raise ChatTemplateError(
            f"--chat_template {template.source}: not a valid Jinja template: line "
            f"{error.lineno}: {error.message}" + (f"\n    {line}" if line else "") + "\n"
            f"Fix: correct that line (chat template syntax: {DOCS})."
        ) from None
    except jinja2.TemplateError as error:
        raise ChatTemplateError(
            f"--chat_template {template.source}: rendering a user/assistant exchange fails: "
            f"{error}. Fix: the template must accept role/content messages ({DOCS})."
        ) from None


def check_probe(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> None:
    """The reply of a one-exchange conversation must be found and trained, or nothing will be."""
    found = tokenize_conversation(PROBE, tokenizer, template, max_seq_len=1 << 30)
    if isinstance(found, Skip):
        raise ChatTemplateError(
            f"--chat_template {template.source}: cannot locate the assistant's reply in a "
            f"one-exchange conversation: {found.reason}: {found.detail}"
        )
    trained = "".join(tokenizer.decode(found.input_ids[s:e]) for s, e in found.spans)
    if PROBE_ANSWER not in trained:
        raise ChatTemplateError(
            f"--chat_template {template.source}: its {{% generation %}} blocks do not cover "
            f"the assistant's reply (they mark {trained!r:.120}). Fix: wrap each assistant "
            "message's content and end-of-turn token in {% generation %}…{% endgeneration %}."
        )


def tokenize_conversation(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    max_seq_len: int,
) -> ChatTokens | Skip:
    """Render and tokenise a conversation; spans hold the assistant tokens, cut at max_seq_len.

    The template alone writes special tokens (BOS included): the rendered text is
    tokenised without adding any, as transformers' apply_chat_template does.
    """
    try:
        if template.has_generation_markers:
            found = marked_spans(messages, tokenizer, template)
        else:
            found = rendered_spans(messages, tokenizer, template)
    except jinja2.TemplateError as error:
        return Skip("template error", f"the template raised: {error}")
    if isinstance(found, Skip):
        return found
    ids, spans = found
    if not spans:
        return Skip("no assistant tokens", "the template's generation blocks mark no tokens")
    kept = [(start, min(end, max_seq_len)) for start, end in spans if start < max_seq_len]
    if not kept:
        return Skip(
            "truncated away",
            f"the first assistant token is at position {spans[0][0]}, past max_seq_len "
            f"{max_seq_len} (the conversation has {len(ids)} tokens)",
        )
    return ChatTokens(ids[:max_seq_len], kept, len(ids) > max_seq_len)


def marked_spans(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate
) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = tokenizer.apply_chat_template(
        messages, chat_template=template.text, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(encoding["input_ids"]), runs(encoding["assistant_masks"])


def rendered_spans(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate
) -> tuple[list[int], list[tuple[int, int]]] | Skip:
    """Each reply = what rendering it adds after the generation prompt, up to the end of turn."""
    full = render(messages, tokenizer, template.text)
    char_spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:turn], tokenizer, template.text, add_generation_prompt=True)
        through = render(messages[: turn + 1], tokenizer, template.text)
        if not through.startswith(before):
            return Skip(
                "template cannot be split",
                f"the text before assistant turn {turn + 1} changes once the reply follows "
                "(the generation prompt is not how the template starts a reply)",
            )
        if not full.startswith(through):
            return Skip(
                "template cannot be split",
                f"the turns after turn {turn + 1} change how it is rendered (the template "
                "rewrites earlier turns, e.g. drops their reasoning); add {% generation %} "
                "markers to the template to train on it",
            )
        reply = through[len(before) :]
        eot = template.end_of_turn
        # Up to the end-of-turn token: what follows it (a newline) is never generated.
        end = reply.rfind(eot) + len(eot) if eot and eot in reply else len(reply.rstrip())
        if end == 0:
            return Skip("template cannot be split", f"assistant turn {turn + 1} renders no text")
        char_spans.append((len(before), len(before) + end))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], token_spans(encoding["offset_mapping"], char_spans)


def render(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    add_generation_prompt: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=text, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def token_spans(
    offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Character spans -> token spans: every token overlapping a span belongs to it.

    The same rule as transformers' assistant mask, so both ways give the same tokens.
    """
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    spans = []
    for start, end in char_spans:
        # Offsets only grow: the first token ending after `start`, the last starting before `end`.
        first, stop = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)
        if first < stop:
            spans.append((first, stop))
    return spans


def runs(mask: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 1, 0, 1] -> [(1, 3), (4, 5)]: the [start, end) runs of ones."""
    spans: list[tuple[int, int]] = []
    for i, bit in enumerate(mask):
        if not bit:
            continue
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans
