"""The GPU check's outputs: results.json (every number), summary.md (the tables),
logs.tar.gz (every step's log), rewritten after each step so that a check cut short still
leaves what it measured; and the one-line ratio summary it prints last."""

from __future__ import annotations

import json
import os
import tarfile

from utils.files import atomic_path, write_atomically


def write_outputs(out: str, results: dict, logs: str) -> None:
    write_atomically(os.path.join(out, "results.json"), json.dumps(results, indent=1) + "\n")
    write_atomically(os.path.join(out, "summary.md"), summary_markdown(results))
    with atomic_path(os.path.join(out, "logs.tar.gz")) as temp, tarfile.open(temp, "w:gz") as tar:
        tar.add(logs, arcname="logs")


def ratio_line(results: dict) -> str:
    """`default/pad=R packing/pad=R chunked/plain=R chunked_peak/plain=R e2e_s=N
    launcher_exit_s=N` (real tokens/s ratios, then the peak-memory ratio; n/a where a part
    did not run; launcher_exit_s is `hung` where it never exited)."""
    variants = results.get("variants", {})

    def ratio(top: str, bottom: str, key: str = "tokens_per_s") -> str:
        a, b = variants.get(top, {}).get(key), variants.get(bottom, {}).get(key)
        return f"{a / b:.2f}" if a and b else "n/a"

    e2e = results.get("e2e", {}).get("verified_s")  # launch to a verified model folder
    launcher = results.get("launcher", {})
    exit_s = launcher.get("exit_after_last_line_s")
    exit_text = "hung" if launcher.get("hung") else "n/a" if exit_s is None else f"{exit_s:.1f}"
    return (
        f"default/pad={ratio('default', 'pad')} packing/pad={ratio('packing', 'pad')} "
        f"chunked/plain={ratio('default', 'plain')} "
        f"chunked_peak/plain={ratio('default', 'plain', 'peak_gib')} "
        f"e2e_s={'n/a' if e2e is None else f'{e2e:.0f}'} launcher_exit_s={exit_text}"
    )


def summary_markdown(results: dict) -> str:
    settings, machine = results.get("settings", {}), results.get("machine", {})
    lines = [
        f"# GPU check: {machine.get('gpu') or 'CPU'}{' (--tiny)' if settings.get('tiny') else ''}",
        "",
        "- python {python}, torch {torch} (CUDA {cuda}), deepspeed {deepspeed}, transformers "
        "{transformers}, {cpus} CPUs".format_map(_Missing(machine)),
        f"- inputs: {_format_inputs(results.get('inputs', {}))}",
        _format_setup(results.get("variants", {})),
        f"- {results.get('elapsed_s', '?')} s in all (budget {settings.get('budget_s')} s)",
        "",
        *_variant_table(results.get("variants", {}), settings),
        *_e2e_table(results.get("e2e", {})),
        *_launcher_table(results.get("launcher", {}), settings),
        *_profile_tables(results.get("variants", {}).get("default", {}).get("profile")),
        "## Ratios",
        "",
        f"    {ratio_line(results)}",
        "",
    ]
    return "\n".join(lines)


def _variant_table(variants: dict, settings: dict) -> list[str]:
    lines = [
        "## Batching and loss variants, each in its own process",
        "",
        "main.py's start-up with the variant's flags, then the tool's train step: warm-up on "
        "every batch width the timed steps use (at least 3 steps), then "
        f"{settings.get('steps')} timed steps, each ended by a device synchronisation. Real "
        "tokens/s and MFU over the timed steps; medians per step (the chunked loss computes "
        "the output layer's gradients inside the forward); peak: the process's "
        "max_memory_allocated (GPU) or peak RSS (CPU).",
        "",
        "| variant | flags | warm-up | timed | median step s | real tok/s | median tok/s "
        "| padding | MFU | peak GiB | data / fwd / bwd / opt ms | start-up s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        phases = v.get("phases_median_s", {})
        keys = ("data_s", "forward_s", "backward_s", "optimizer_s")
        split = " / ".join(_num(phases.get(k), 1e3, ".1f") for k in keys)
        lines.append(
            f"| {name} | `{v.get('variant_flags') or '(none)'}` | {v.get('warmup_steps', '-')} "
            f"| {v.get('timed_steps', '-')} | {_num(v.get('median_step_s'), 1, '.4f')} "
            f"| {_num(v.get('tokens_per_s'), 1, ',.0f')} "
            f"| {_num(v.get('median_tokens_per_s'), 1, ',.0f')} "
            f"| {_pct(v.get('padding'))} | {_pct(v.get('mfu'))} "
            f"| {_num(v.get('peak_gib'), 1, '.2f')} | {split} "
            f"| {_num(v.get('startup_s'), 1, '.0f')} | {v.get('status')} |"
        )
    if variants:
        first = next(iter(variants.values()))
        lines += ["", f"loss path (default): {variants.get('default', first).get('loss_path')}"]
    return [*lines, ""]


def _e2e_table(e2e: dict) -> list[str]:
    if not e2e:
        return []
    return [
        "## main.py end to end, one epoch",
        "",
        "| launch to exit s | launch to verified s | optimizer steps | real tok/s | step s "
        "| MFU | eval loss before -> after | exit after last line s | status |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {_num(e2e.get('exit_wall_s'), 1, '.1f')} | {_num(e2e.get('verified_s'), 1, '.1f')} "
        f"| {e2e.get('steps', '-')} | {_num(e2e.get('real_tokens_per_s'), 1, ',.0f')} "
        f"| {_num(e2e.get('step_s'), 1, '.3f')} | {_pct(e2e.get('mfu'))} "
        f"| {_num(e2e.get('eval_loss_before'), 1, '.4f')} -> "
        f"{_num(e2e.get('eval_loss_after'), 1, '.4f')} "
        f"| {_num(e2e.get('exit_after_last_line_s'), 1, '.1f')} | {e2e.get('status')} |",
        "",
    ]


def _launcher_table(launcher: dict, settings: dict) -> list[str]:
    if not launcher:
        return []
    return [
        f"## {launcher.get('script')} --max_steps 4",
        "",
        f"Must exit within {settings.get('grace_s')} s of its last line (stacks of a hung run "
        "are in logs.tar.gz, launcher.log).",
        "",
        "| exit code | launch to exit s | launch to verified s | exit after last line s | status |",
        "|---|---|---|---|---|",
        f"| {launcher.get('returncode')} | {_num(launcher.get('exit_wall_s'), 1, '.1f')} "
        f"| {_num(launcher.get('verified_s'), 1, '.1f')} "
        f"| {_num(launcher.get('exit_after_last_line_s'), 1, '.1f')} | {launcher.get('status')} |",
        "",
    ]


def _profile_tables(profile: dict | None) -> list[str]:
    if not profile:
        return []
    lines = [
        f"## Profile: the default variant, {profile['steps']} steps under torch.profiler",
        "",
        f"Self time summed over all operations, per step: device "
        f"{profile['device_ms_per_step']:.1f} ms, CPU {profile['cpu_ms_per_step']:.1f} ms. "
        "Per-step data wait, forward, backward and optimizer step: the variants table.",
        "",
    ]
    for title, key in (("device", "by_device"), ("CPU", "by_cpu")):
        lines += [
            f"Top operations by self {title} time:",
            "",
            "| operation | calls/step | self device ms/step | self CPU ms/step |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{op['name']}` | {op['calls_per_step']:.1f} | {op['self_device_ms']:.2f} "
            f"| {op['self_cpu_ms']:.2f} |"
            for op in profile[key]
        ] or ["| (none recorded) | | | |"]
        lines.append("")
    return lines


def _format_setup(variants: dict) -> str:
    measured = [v for v in variants.values() if "parameters" in v]
    if not measured:
        return "- setup: no variant ran"
    v = measured[0]
    return (
        f"- setup: {v['device']}, {v['parameters'] / 1e6:,.1f}M parameters, {v['dtype']}, ZeRO "
        f"stage {v['zero_stage']}, micro-batch {v['micro_batch']}, --max_seq_len {v['max_seq_len']}"
    )


def _format_inputs(inputs: dict) -> str:
    parts = [f"{k} {v}" for k, v in inputs.items() if k != "status"]
    return ", ".join(parts) + f" ({inputs.get('status', 'not prepared')})"


def _num(value, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "?"
