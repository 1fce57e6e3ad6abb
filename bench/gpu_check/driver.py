"""One call of a lent GPU answers everything (issue 19 items 4-5): bench/gpu_check.sh.

Parts, in this order, each in processes of its own, each bounded by a timeout and all of
them together by --budget_s:

  inputs    the model folder and the data (inputs.py); the machine's versions, and
            DeepSpeed's FusedAdam built once, beside them (machine.py)
  variants  pad (DeepSpeed-Chat's batches, --pad_to_max_len), default, packing (--packing)
            and plain (--chunked_loss off), each in its own process (variant.py) on main.py's
            own start-up and train step; the default one then runs the profile
  e2e       main.py for one epoch: launch to a verified model folder
  launcher  training_scripts/opt/single_gpu/run_1.3b.sh OUT 0 --max_steps 4, which must exit
            within --grace_s of its last line (a hung one is killed, its stacks kept)

    bash bench/gpu_check.sh --out DIR          # CUDA: OPT-1.3B's shape, bf16, ZeRO-2, seq 512
    bash bench/gpu_check.sh --tiny --out DIR   # any CPU, a minute or two: what CI runs

--out gets summary.md, results.json and logs.tar.gz, rewritten after every part. The last
line printed is the ratio line (report.ratio_line). Exit status 1 when a part failed, was
skipped for lack of time, or the launcher did not exit in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

from bench.gpu_check.parts import (
    VARIANTS,
    Check,
    prepare_inputs,
    run_e2e,
    run_launcher,
    run_variant,
)
from bench.gpu_check.processes import stop_running
from bench.gpu_check.report import ratio_line, summary_markdown, write_outputs


def parse_check_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the demo's tiny OPT and data, any CPU")
    p.add_argument("--out", default="gpu_check_out", help="summary.md, results.json, logs")
    p.add_argument("--work", help="scratch folder, kept (default: a temporary one, removed)")
    p.add_argument("--model", help="a model folder (default: built, see --model_size)")
    p.add_argument("--model_size", default="1.3b", choices=("1.3b", "tiny"),
                   help="what build_opt_model.py builds without --model (tiny: 2 layers, "
                   "the genuine tokenizer: a CPU rehearsal of the full check)")  # fmt: skip
    p.add_argument("--dialogues", help="HH-RLHF jsonl (default: .gpu/ or ../shared/data/)")
    p.add_argument("--rows", type=int, default=2000, help="training rows (not with --tiny)")
    p.add_argument("--eval_rows", type=int, default=200)
    p.add_argument("--steps", type=int, help="timed steps per variant (50; tiny 8)")
    p.add_argument("--profile_steps", type=int, help="steps profiled (20; tiny 5)")
    p.add_argument("--max_seq_len", type=int, help="512; tiny 128")
    p.add_argument("--batch", type=int, default=8, help="micro-batch")
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--budget_s", type=float, help="all parts together (470; tiny 900)")
    p.add_argument("--grace_s", type=float, default=30.0, help="exit after the last line")
    p.add_argument("--parts", default="variants,e2e,launcher")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    tiny = args.tiny
    args.steps = args.steps or (8 if tiny else 50)
    args.profile_steps = args.profile_steps if args.profile_steps is not None else 5 if tiny else 20
    args.max_seq_len = args.max_seq_len or (128 if tiny else 512)
    args.budget_s = args.budget_s or (900 if tiny else 470)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_check_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="gpu_check.")
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    check = Check(args, work, logs, time.monotonic() + args.budget_s)
    check.results["settings"] = vars(args)
    # An outer `timeout` (SIGTERM) still gets the outputs written and the children killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        inputs = prepare_inputs(check)
        parts = args.parts.split(",")
        for name in args.variants.split(",") if inputs and "variants" in parts else ():
            run_variant(check, name, inputs)
        if inputs and "e2e" in parts:
            run_e2e(check, inputs)
        if inputs and "launcher" in parts:
            run_launcher(check, inputs)
    finally:
        stop_running()
        write_outputs(args.out, check.results, logs)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        print(summary_markdown(check.results), flush=True)
        print(ratio_line(check.results), flush=True)
    return 0 if all_ok(check.results) else 1


def all_ok(results: dict) -> bool:
    parts = [results.get("inputs", {}), results.get("e2e"), results.get("launcher")]
    parts += list(results.get("variants", {}).values())
    return all(p["status"] == "ok" for p in parts if p is not None)


if __name__ == "__main__":
    sys.exit(main())
