"""Chat templates: loading, conversation shapes and token-exact assistant spans (tokenizers only)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.conftest import CORPUS, DROPS_REASONING
from utils.data.chat import (
    ChatTemplateError,
    ChatTokens,
    load_chat_template,
    tokenize_conversation,
)
from utils.data.conversation import Skip, to_conversation
from utils.demo.chat_data import (
    DEMO_CONVERSATIONS,
    TEMPLATE_PATH,
    add_chat_tokens,
    build_chat_rows,
    chat_corpus,
)
from utils.demo.tiny import build_tokenizer

CHATML_PLAIN = """\
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""
# Llama-2 chat: the system prompt folded into the first user turn, BOS before every [INST].
LLAMA2 = """\
{%- if messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}{% set turns = messages[1:] %}
{%- else %}{% set system = '' %}{% set turns = messages %}{% endif %}
{%- for message in turns %}
{%- if message['role'] == 'user' %}
{%- set content = message['content'] %}
{%- if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}
{{- bos_token + '[INST] ' + content + ' [/INST]' }}
{%- else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}
{%- endfor %}
"""
# Like Qwen3: an earlier assistant turn loses its <think> reasoning once a later turn exists.

SUM = "What is 2 plus 3?"
SUM_ANSWER = "2 plus 3 is 5."
FRANCE = "What is the capital of France?"
FRANCE_ANSWER = "The capital of France is Paris."
SUM_TOKENS = ["2", "Ġplus", "Ġ3", "Ġis", "Ġ5", ".", "<|im_end|>"]
FRANCE_TOKENS = ["T", "he", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    add_chat_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def chatml(tok):
    return load_chat_template(str(TEMPLATE_PATH), tok)


def write(tmp_path, text: str | bytes, name: str = "t.jinja") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def trained(tok, result: ChatTokens) -> list[list[str]]:
    return [tok.convert_ids_to_tokens(result.input_ids[s:e]) for s, e in result.spans]


def untrained_text(tok, result: ChatTokens) -> str:
    keep = set(range(len(result.input_ids))) - {i for s, e in result.spans for i in range(s, e)}
    return tok.decode([result.input_ids[i] for i in sorted(keep)])


def test_chatml_with_generation_markers_trains_exactly_the_replies(tok, chatml):
    assert chatml.has_generation_markers
    assert chatml.end_of_turn == "<|im_end|>"
    messages = [
        {"role": "system", "content": "Be brief."},
        user(SUM),
        assistant(SUM_ANSWER),
        user(FRANCE),
        assistant(FRANCE_ANSWER),
    ]
    result = tokenize_conversation(messages, tok, chatml, max_seq_len=512)
    assert trained(tok, result) == [SUM_TOKENS, FRANCE_TOKENS]
    # Nothing of the system or user turns, nor the "<|im_start|>assistant\n" header, nor the
    # newline after <|im_end|>, is trained.
    assert untrained_text(tok, result) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        f"{SUM}<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>user\n"
        f"{FRANCE}<|im_end|>\n<|im_start|>assistant\n\n"
    )
    assert tok.decode(result.input_ids) == tok.apply_chat_template(
        messages, chat_template=chatml.text, tokenize=False
    )
    assert not result.truncated


def test_template_without_markers_gives_the_same_spans(tok, chatml, tmp_path):
    plain = load_chat_template(write(tmp_path, CHATML_PLAIN), tok)
    assert not plain.has_generation_markers
    assert plain.end_of_turn == "<|im_end|>"
    messages = [user(SUM), assistant(SUM_ANSWER), user(FRANCE), assistant(FRANCE_ANSWER)]
    assert tokenize_conversation(messages, tok, plain, 512) == tokenize_conversation(
        messages, tok, chatml, 512
    )


def test_token_merged_across_the_reply_boundary_is_trained_by_both_ways(tok, tmp_path):
    # The generation prompt ends in a space that BPE merges with the reply's first word
    # ("ĠThe"): that token is trained (as transformers' assistant mask does) by both ways.
    plain = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    marked = plain.replace(
        "{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}",
        "{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ '\\n\\n' }}",
    )
    messages = [user(FRANCE), assistant(FRANCE_ANSWER)]
    results = [
        tokenize_conversation(messages, tok, load_chat_template(write(tmp_path, t), tok), 512)
        for t in (plain, marked)
    ]
    assert results[0] == results[1]
    assert trained(tok, results[0]) == [
        ["ĠThe", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
    ]


def test_template_without_an_end_of_turn_token_trains_the_reply_text(tok, tmp_path):
    text = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    template = load_chat_template(write(tmp_path, text), tok)
    assert template.end_of_turn is None
    result = tokenize_conversation([user(SUM), assistant(SUM_ANSWER)], tok, template, 512)
    # The reply is " 2 plus 3 is 5." as the template writes it; the blank line after is not.
    assert tok.decode(result.input_ids[slice(*result.spans[0])]) == " " + SUM_ANSWER


def test_three_assistant_turns_are_all_trained(tok, chatml):
    messages = [
        user(SUM),
        assistant(SUM_ANSWER),
        user(FRANCE),
        assistant(FRANCE_ANSWER),
        user("Say hello."),
        assistant("Hello! How can I help you today?"),
    ]
    for template in (chatml, dataclasses.replace(chatml, has_generation_markers=False)):
        result = tokenize_conversation(messages, tok, template, 512)
        assert trained(tok, result) == [
            SUM_TOKENS,
            FRANCE_TOKENS,
            ["H", "ello", "!", "ĠHow", "Ġcan", "ĠI", "Ġhelp", "Ġyou", "Ġtoday", "?", "<|im_end|>"],
        ]


def test_llama2_template_folds_the_system_turn_and_writes_bos_once_per_exchange(tmp_path):
    tok = build_tokenizer(CORPUS, vocab_size=400)
    tok.add_tokens(["<s>"], special_tokens=True)
    tok.bos_token = "<s>"  # Llama's BOS; the tiny tokenizer's post-processor would add "</s>"
    template = load_chat_template(write(tmp_path, LLAMA2), tok)
    assert template.end_of_turn == "</s>"
    messages = [
        {"role": "system", "content": "Be brief."},
        user(SUM),
        assistant(SUM_ANSWER),
        user(FRANCE),
        assistant(FRANCE_ANSWER),
    ]
    result = tokenize_conversation(messages, tok, template, 512)
    assert trained(tok, result) == [
        ["Ġ2", "Ġplus", "Ġ3", "Ġis", "Ġ5", ".", "Ġ", "</s>"],
        ["ĠThe", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "Ġ", "</s>"],
    ]
    assert untrained_text(tok, result) == (
        f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{SUM} [/INST]<s>[INST] {FRANCE} [/INST]"
    )
    # The template writes BOS; nothing adds another in front of it.
    assert result.input_ids[0] == tok.bos_token_id
    assert result.input_ids[1] != tok.bos_token_id
    assert result.input_ids.count(tok.bos_token_id) == 2


def test_hub_schema_row_through_a_template(tok, chatml):
    row = {"prompt": f" Human: {SUM} Assistant:", "chosen": f" {SUM_ANSWER}", "rejected": " 6"}
    messages = to_conversation(row)
    assert messages == [user(SUM), assistant(SUM_ANSWER)]
    result = tokenize_conversation(messages, tok, chatml, 512)
    assert trained(tok, result) == [SUM_TOKENS]
    assert "Human" not in tok.decode(result.input_ids)


def test_multi_exchange_hh_prompt_becomes_its_turns(tok, chatml):
    row = {
        "prompt": f"\n\nHuman: {SUM}\n\nAssistant: {SUM_ANSWER}\n\nHuman: {FRANCE}\n\nAssistant:",
        "response": f" {FRANCE_ANSWER}",
    }
    messages = to_conversation(row)
    assert messages == [user(SUM), assistant(SUM_ANSWER), user(FRANCE), assistant(FRANCE_ANSWER)]
    result = tokenize_conversation(messages, tok, chatml, 512)
    assert trained(tok, result) == [SUM_TOKENS, FRANCE_TOKENS]


@pytest.mark.parametrize(
    ("row", "system_prompt", "expected_system"),
    [
        (
            {"conversations": [{"from": "human", "value": SUM}, {"from": "gpt", "value": "5"}]},
            None,
            None,
        ),
        ({"messages": [user(SUM), assistant("5")], "system": "Row."}, "Flag.", "Row."),
        ({"messages": [user(SUM), assistant("5")]}, "Flag.", "Flag."),
        (
            {
                "messages": [{"role": "system", "content": "Own."}, user(SUM), assistant("5")],
                "system": "Row.",
            },
            "Flag.",
            "Own.",
        ),
        (
            {"instruction": "Add 2 and 3.", "input": "", "output": "5", "system": "Row."},
            None,
            "Row.",
        ),
        ({"prompt": SUM, "completion": "5"}, "Flag.", "Flag."),
    ],
)
def test_row_shapes_and_system_turn_precedence(row, system_prompt, expected_system):
    messages = to_conversation(row, system_prompt=system_prompt)
    system = [m["content"] for m in messages if m["role"] == "system"]
    assert system == ([expected_system] if expected_system else [])
    assert [m["role"] for m in messages if m["role"] != "system"] == ["user", "assistant"]
    assert messages[-1]["content"] == "5"


@pytest.mark.parametrize(
    ("row", "reason", "detail"),
    [
        ({"messages": [user(SUM)]}, "no assistant turn", "['user']"),
        (
            {"messages": [user(SUM), user(FRANCE), assistant("5")]},
            "roles out of order",
            "turn 2 is user",
        ),
        ({"messages": [assistant("5"), user(SUM)]}, "roles out of order", "turn 1 is assistant"),
        (
            {"messages": [user(SUM), assistant("5"), {"role": "system", "content": "x"}]},
            "roles out of order",
            "turn 3 is system",
        ),
        ({"messages": [user(SUM), assistant("  ")]}, "empty turn", "turn 2 (assistant) is empty"),
        ({"messages": [user(SUM), {"role": "tool", "content": "5"}]}, "unknown role", "'tool'"),
        ({"prompt": " Human: Assistant:", "chosen": " 5"}, "empty turn", "turn 1 (user)"),
        ({"prompt": " Human: q Assistant: Sure,", "chosen": " 5"}, "roles out of order", "inside"),
        ({"text": "hello"}, "unrecognised row", "['text']"),
    ],
)
def test_bad_conversations_are_skipped_with_a_reason(row, reason, detail):
    skip = to_conversation(row)
    assert isinstance(skip, Skip)
    assert skip.reason == reason
    assert detail in skip.detail


def test_trailing_user_turn_is_dropped():
    assert to_conversation({"messages": [user(SUM), assistant("5"), user(FRANCE)]}) == [
        user(SUM),
        assistant("5"),
    ]


def test_unsplittable_render_is_skipped_with_the_reason(tok, tmp_path):
    template = load_chat_template(write(tmp_path, DROPS_REASONING), tok)
    one = [user(SUM), assistant(f"<think>2+3=5</think>{SUM_ANSWER}")]
    assert isinstance(tokenize_conversation(one, tok, template, 512), ChatTokens)
    skip = tokenize_conversation([*one, user(FRANCE), assistant(FRANCE_ANSWER)], tok, template, 512)
    assert skip.reason == "template cannot be split"
    assert "turn 2" in skip.detail and "rewrites earlier turns" in skip.detail


def test_truncation_cuts_spans_and_skips_rows_with_nothing_left(tok, chatml):
    messages = [user(SUM), assistant(SUM_ANSWER), user(FRANCE), assistant(FRANCE_ANSWER)]
    full = tokenize_conversation(messages, tok, chatml, 512)
    first_start, first_end = full.spans[0]
    cut = tokenize_conversation(messages, tok, chatml, first_end - 2)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[: first_end - 2]
    assert cut.spans == [(first_start, first_end - 2)]
    skip = tokenize_conversation(messages, tok, chatml, first_start)
    assert skip.reason == "truncated away"
    assert f"max_seq_len {first_start}" in skip.detail


def test_model_template_is_the_tokenizers_own(tok):
    assert load_chat_template("dschat", tok) is None
    with_template = build_tokenizer(CORPUS, vocab_size=400)
    add_chat_tokens(with_template)
    with_template.chat_template = CHATML_PLAIN
    template = load_chat_template("model", with_template)
    assert (template.source, template.text, template.end_of_turn) == (
        "model",
        CHATML_PLAIN,
        "<|im_end|>",
    )


def test_model_without_a_template_is_refused():
    tok = build_tokenizer(CORPUS, vocab_size=400)
    tok.name_or_path = "tiny-opt"
    with pytest.raises(
        ChatTemplateError, match="tokenizer of 'tiny-opt' has no chat template"
    ) as err:
        load_chat_template("model", tok)
    assert "--chat_template dschat" in str(err.value)


def test_template_syntax_error_names_the_line(tok, tmp_path):
    broken = write(tmp_path, "{% for message in messages %}\n{{ message['content'] }\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template: line 2") as err:
        load_chat_template(broken, tok)
    assert "{{ message['content'] }" in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"\xff\xfe{{ x }}", "not UTF-8"), ("  \n", "the file is empty")],
)
def test_unusable_template_files_are_refused(tok, tmp_path, content, message):
    path = str(tmp_path / "missing.jinja") if content is None else write(tmp_path, content)
    with pytest.raises(ChatTemplateError, match=message):
        load_chat_template(path, tok)


def test_end_of_turn_the_tokenizer_does_not_know_is_refused(tmp_path):
    plain = build_tokenizer(CORPUS, vocab_size=400)  # no <|im_start|>/<|im_end|> tokens
    with pytest.raises(ChatTemplateError, match=re.escape("'<|im_end|>', which the tokenizer")):
        load_chat_template(write(tmp_path, CHATML_PLAIN), plain)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        # An empty block: nothing is marked at all.
        (
            CHATML_PLAIN.replace(
                "{%- endfor %}", "{% generation %}{% endgeneration %}{%- endfor %}"
            ),
            "cannot locate the assistant's reply in a one-exchange conversation: no assistant tokens",
        ),
        # The user's turns marked instead of the assistant's.
        (
            CHATML_PLAIN.replace(
                "{{- '<|im_start|>' + message['role']",
                "{%- if message['role'] == 'user' %}{% generation %}U{% endgeneration %}{% endif %}"
                "{{- '<|im_start|>' + message['role']",
            ),
            "generation %} blocks do not cover the assistant's reply",
        ),
    ],
)
def test_generation_markers_must_cover_the_reply(tok, tmp_path, template, message):
    with pytest.raises(ChatTemplateError, match=re.escape(message)):
        load_chat_template(write(tmp_path, template), tok)


def test_demo_conversations_render_through_the_demo_template():
    train, evaluation = build_chat_rows(seed=0)
    assert (train, evaluation) == build_chat_rows(seed=0)
    tok = build_tokenizer(chat_corpus(train), vocab_size=512)
    add_chat_tokens(tok)
    template = load_chat_template(str(TEMPLATE_PATH), tok)
    for row in train + evaluation:
        assert to_conversation(row) == row["messages"]
        result = tokenize_conversation(row["messages"], tok, template, 128)
        assert not result.truncated
        assert len(result.spans) == sum(m["role"] == "assistant" for m in row["messages"])
    assert any(row["messages"][0]["role"] == "system" for row in train)
    # Eval questions are held out: none is asked in training.
    asked = {m["content"] for row in train for m in row["messages"] if m["role"] == "user"}
    assert not asked & {m["content"] for row in evaluation for m in row["messages"]}
    for messages, answer in DEMO_CONVERSATIONS:
        prompt = tok.apply_chat_template(
            messages, chat_template=template.text, tokenize=False, add_generation_prompt=True
        )
        assert prompt.endswith("<|im_start|>assistant\n") and answer
