"""The baseline-versus-finetuned report: side by side on the console, Markdown or JSON on disk."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

from utils.errors import UserError
from utils.files import write_atomically

REPORT_FORMATS = {".md": "markdown", ".markdown": "markdown", ".json": "json"}


def build_report(
    models: dict[str, str],
    decoding: dict[str, object],
    runtime: dict[str, str],
    prompts: list[str],
    answers: dict[str, list[list[str]]],
    perplexity: dict[str, object] | None,
    prompt_format: str | None = None,
) -> dict:
    """A plain dict (the JSON form): header fields and one row per prompt with both answers.

    `models` and `answers` are keyed "baseline" and "finetune"; each answer is the
    list of `num_return_sequences` generations.
    """
    rows = [
        {"prompt": prompt, "baseline": answers["baseline"][i], "finetune": answers["finetune"][i]}
        for i, prompt in enumerate(prompts)
    ]
    return {
        "models": models,
        "decoding": decoding,
        "runtime": runtime,
        "perplexity": perplexity,
        "prompt_format": prompt_format,
        "rows": rows,
    }


def format_console(report: dict, width: int | None = None) -> str:
    """Each prompt, then the two models' answers in two columns."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    column = max(20, (width - 3) // 2)
    lines = [*_header_lines(report), ""]
    for number, row in enumerate(report["rows"], 1):
        lines += [
            "=" * (2 * column + 3),
            f"[{number}/{len(report['rows'])}] {row['prompt'].strip()}",
            "",
        ]
        left = _wrap_answers(row["baseline"], column)
        right = _wrap_answers(row["finetune"], column)
        lines.append(_pad("baseline", column) + " | finetuned")
        lines.append("-" * column + "-+-" + "-" * column)
        for i in range(max(len(left), len(right))):
            cell_left = left[i] if i < len(left) else ""
            cell_right = right[i] if i < len(right) else ""
            lines.append((_pad(cell_left, column) + " | " + cell_right).rstrip())
        lines.append("")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """A header list (models, decoding, perplexities) and a prompt | baseline | finetuned table."""
    lines = ["# Baseline vs fine-tuned", "", *(f"- {line}" for line in _header_lines(report)), ""]
    lines += ["| prompt | baseline | finetuned |", "| --- | --- | --- |"]
    for row in report["rows"]:
        cells = [row["prompt"], _join_answers(row["baseline"]), _join_answers(row["finetune"])]
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def save_report(report: dict, path: str | Path) -> None:
    """Write Markdown or JSON (by extension) atomically: a reader never sees half a file."""
    path = Path(path)
    kind = REPORT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"--output {path}: unknown extension; use .md or .json")
    text = (
        render_markdown(report)
        if kind == "markdown"
        else json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(path), text)  # with the umask's modes, not mkstemp's 0600


def _header_lines(report: dict) -> list[str]:
    models, ppl = report["models"], report["perplexity"]
    lines = [
        f"baseline: {models['baseline']}",
        f"finetuned: {models['finetune']}",
        "decoding: " + ", ".join(f"{k}={v}" for k, v in report["decoding"].items()),
        "runtime: " + ", ".join(f"{k}={v}" for k, v in report["runtime"].items()),
    ]
    if report.get("prompt_format"):
        lines.append(f"prompts: {report['prompt_format']}")
    if ppl:
        lines.append(
            f"perplexity on {ppl['rows']} rows of {' '.join(ppl['data_path'])} "
            f"(loss on {ppl['loss_on']} tokens, as training's --loss_on {ppl['loss_on']}): "
            f"baseline {ppl['baseline']:.3f}, finetuned {ppl['finetune']:.3f}"
        )
    return lines


def _join_answers(answers: list[str]) -> str:
    if len(answers) == 1:
        return answers[0]
    return "\n".join(f"({i}) {answer}" for i, answer in enumerate(answers, 1))


def _markdown_cell(text: str) -> str:
    text = text.strip().replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")
    return text or " "


def _wrap_answers(answers: list[str], width: int) -> list[str]:
    return [
        line for paragraph in _join_answers(answers).split("\n") for line in _wrap(paragraph, width)
    ]


def _display_width(text: str) -> int:
    """Terminal columns: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _display_width(text))


def _wrap(text: str, width: int) -> list[str]:
    """Greedy wrap by display width, breaking at the last space when there is one.

    textwrap counts characters, which misaligns columns of Chinese or Japanese text.
    """
    lines, current = [], ""
    for char in text:
        if _display_width(current + char) > width:
            cut = current.rfind(" ")
            if cut > 0:
                lines.append(current[:cut])
                current = current[cut + 1 :]
            else:
                lines.append(current)
                current = ""
        current += char
    lines.append(current)
    return [line.rstrip() for line in lines] or [""]
