"""The data-set catalogue: DeepSpeed-Chat's step-1 sources, one entry each.

An entry says where a source loads from, which columns it needs, where its eval rows
come from, and how one row becomes Example(prompt, response). Adding a data
set is one formatter function and one DATASETS line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from utils.data.formats import Example, Formatter, first, is_text, question_answer, verbatim


@dataclass(frozen=True)
class CatalogueEntry:
    hub_name: str  # what datasets.load_dataset gets
    columns: tuple[str, ...]  # top-level columns every row needs
    format: Formatter
    eval_split: str | None  # None: the source has train only; eval is a seeded 9:1 cut
    config: str | None = None  # hub configuration name, if the data set has several


def format_hh(row: dict[str, Any]) -> Example | None:
    """Dahoas/rm-static and full-hh-rlhf: already "\\n\\nHuman: ... Assistant:" + " answer"."""
    return verbatim(row["prompt"], row["chosen"])


def format_pairwise(row: dict[str, Any]) -> Example | None:
    return question_answer(row["prompt"], row["chosen"])


def format_yitingxie(row: dict[str, Any]) -> Example | None:
    """The prompt stops before "Assistant:"; responses start with "Assistant: "."""
    if not is_text(row["prompt"], row["chosen"]):
        return None
    return verbatim(row["prompt"] + "Assistant:", row["chosen"].split("Assistant:")[-1])


CITATION = re.compile(r"\s?\[\d+(?:,\s*\d+)*\]")


def format_webgpt(row: dict[str, Any]) -> Example | None:
    """The higher-scored answer wins; "[1]"-style citations go, since there is no browser."""
    question = (row["question"] or {}).get("full_text")
    scores = (row["score_0"], row["score_1"])
    if any(not isinstance(s, int | float) for s in scores):
        return None
    answers = (row["answer_0"], row["answer_1"])
    best = 0 if scores[0] >= scores[1] else 1
    chosen = CITATION.sub("", answers[best]) if isinstance(answers[best], str) else None
    return question_answer(question, chosen)


def format_shp(row: dict[str, Any]) -> Example | None:
    """labels == 1 means human_ref_A is preferred."""
    a, b = row["human_ref_A"], row["human_ref_B"]
    return question_answer(row["history"], a if row["labels"] == 1 else b)


def format_sharegpt_vicuna(row: dict[str, Any]) -> Example | None:
    """USER/ASSISTANT turns renamed to Human/Assistant; only the role markers change."""
    prompt = row["prompt"]
    if not is_text(prompt, row["label"]):
        return None
    prompt = re.sub(r"\bUSER:", "Human:", prompt)
    prompt = re.sub(r"\bASSISTANT:", "Assistant:", prompt)
    return Example(prompt if prompt[:1].isspace() else f" {prompt}", f" {row['label']}")


def format_zhihu(row: dict[str, Any]) -> Example | None:
    return question_answer(row["INSTRUCTION"], row["RESPONSE"])


def format_miracl(row: dict[str, Any]) -> Example | None:
    return question_answer(row["query"], first(row["positive_passages"], "text"))


def format_hc3(row: dict[str, Any]) -> Example | None:
    return question_answer(row["question"], first(row["human_answers"]))


def format_mkqa(lang: str) -> Formatter:
    def format_row(row: dict[str, Any]) -> Example | None:
        queries, answers = row["queries"] or {}, row["answers"] or {}
        return question_answer(queries.get(lang), first(answers.get(lang), "text"))

    return format_row


def format_qg_jaquad(row: dict[str, Any]) -> Example | None:
    return question_answer(row["question"], row["sentence"])


def format_qag_jaquad(row: dict[str, Any]) -> Example | None:
    return question_answer(first(row["questions"]), row["paragraph"])


PAIR = ("prompt", "chosen")
MIRACL = ("query", "positive_passages", "negative_passages")
MKQA = ("queries", "answers")
DATASETS: dict[str, CatalogueEntry] = {
    "Dahoas/rm-static": CatalogueEntry("Dahoas/rm-static", PAIR, format_hh, "test"),
    "Dahoas/full-hh-rlhf": CatalogueEntry("Dahoas/full-hh-rlhf", PAIR, format_hh, "test"),
    "Dahoas/synthetic-instruct-gptj-pairwise": CatalogueEntry(
        "Dahoas/synthetic-instruct-gptj-pairwise", PAIR, format_pairwise, None
    ),
    "yitingxie/rlhf-reward-datasets": CatalogueEntry(
        "yitingxie/rlhf-reward-datasets", PAIR, format_yitingxie, "test"
    ),
    "openai/webgpt_comparisons": CatalogueEntry(
        "openai/webgpt_comparisons",
        ("question", "answer_0", "answer_1", "score_0", "score_1"),
        format_webgpt,
        None,
    ),
    "stanfordnlp/SHP": CatalogueEntry(
        "stanfordnlp/SHP",
        ("history", "human_ref_A", "human_ref_B", "labels"),
        format_shp,
        "validation",
    ),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": CatalogueEntry(
        "pvduy/sharegpt_alpaca_oa_vicuna_format",
        ("prompt", "label"),
        format_sharegpt_vicuna,
        "test",
    ),
    "wangrui6/Zhihu-KOL": CatalogueEntry(
        "wangrui6/Zhihu-KOL", ("INSTRUCTION", "RESPONSE"), format_zhihu, None
    ),
    "Cohere/miracl-zh-queries-22-12": CatalogueEntry(
        "Cohere/miracl-zh-queries-22-12", MIRACL, format_miracl, "dev"
    ),
    "Cohere/miracl-ja-queries-22-12": CatalogueEntry(
        "Cohere/miracl-ja-queries-22-12", MIRACL, format_miracl, "dev"
    ),
    "Hello-SimpleAI/HC3-Chinese": CatalogueEntry(
        "Hello-SimpleAI/HC3-Chinese", ("question", "human_answers"), format_hc3, None, config="all"
    ),
    "mkqa-Chinese": CatalogueEntry("mkqa", MKQA, format_mkqa("zh_cn"), None),
    "mkqa-Japanese": CatalogueEntry("mkqa", MKQA, format_mkqa("ja"), None),
    "lmqg/qg_jaquad": CatalogueEntry(
        "lmqg/qg_jaquad", ("question", "sentence"), format_qg_jaquad, "validation"
    ),
    "lmqg/qag_jaquad": CatalogueEntry(
        "lmqg/qag_jaquad", ("questions", "paragraph"), format_qag_jaquad, "validation"
    ),
    "local/jsonfile": CatalogueEntry("local/jsonfile", PAIR, format_hh, "eval"),
}
