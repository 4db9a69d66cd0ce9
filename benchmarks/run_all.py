"""Run the whole benchmark suite, then regenerate BENCHMARKS.md from this run's JSON lines.

``make bench`` runs ``python -m benchmarks.run_all``. Each bench script runs in its own
process (a crash or a hung compile in one cannot take the others down; each is reported),
appending to one JSON-lines file per run, ``benchmarks/results/run-<id>.jsonl``; then
:mod:`benchmarks.report` writes ``BENCHMARKS.md`` from that file alone.

    python -m benchmarks.run_all [--quick] [--device cuda] [--only lora_linear,group_sparsity]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from .harness import RESULTS_DIR, append_jsonl

ROOT = Path(__file__).resolve().parent.parent

# name → extra arguments of the suite run. One warm-up call (it absorbs compilation and lazy
# initialisation; every provider's warm-up precedes all timed rounds) keeps the suite to minutes
# on 2 CPU cores; medians of alternating rounds stay fair. At least 7 rounds for the
# seconds-long cases: with 3, one slow phase of a shared virtual machine moved a median by 20 %;
# 11 for the LoRA linear, whose M = 4096 calls varied by +-20 % from round to round and whose
# target (1.10x) leaves a margin of a few percent.
SUITE: dict[str, list[str]] = {
    "lora_linear": ["--warmup", "1", "--min-reps", "11", "--target-time", "1"],
    "group_sparsity": ["--min-reps", "10", "--target-time", "0.5"],
    "ffn": ["--warmup", "1", "--min-reps", "7", "--target-time", "1"],
    "train_step": ["--warmup", "1", "--min-reps", "7", "--target-time", "4"],
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="the --quick subset of every script")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {list(SUITE)}")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON-lines file of this run (default benchmarks/results/run-<id>.jsonl)")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md",
                   help="the report to write (default BENCHMARKS.md at the repository root)")
    p.add_argument("--no-report", action="store_true", help="only run, do not write the report")
    p.add_argument("--threads", type=int, default=None, help="passed to every script")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="passed to every script: glibc keeps freed memory, as a caching allocator "
                        "would (default: glibc's defaults; see benchmarks/harness.py)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per script before it is stopped")
    args = p.parse_args(argv)

    names = list(SUITE) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; known: {', '.join(SUITE)}")
    run_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    out = args.out or RESULTS_DIR / f"run-{run_id}.jsonl"
    if out.resolve().is_relative_to(ROOT):  # shorter, machine-independent commands in the report
        out = out.resolve().relative_to(ROOT)
    command = "python -m benchmarks.run_all" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")

    steps = []
    t_suite = time.perf_counter()
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--device", args.device,
               "--out", str(out), "--run-id", run_id, *SUITE[name]]
        if args.quick:
            cmd.append("--quick")
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if args.keep_freed_memory:
            cmd.append("--keep-freed-memory")
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        seconds = time.perf_counter() - t0
        steps.append({"bench": name, "command": "python " + " ".join(cmd[1:]), "rc": rc,
                      "seconds": round(seconds, 1)})
        print(f"# {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.0f} s", flush=True)
    total = time.perf_counter() - t_suite
    append_jsonl(out, [{"type": "run", "run_id": run_id, "command": command, "device": args.device,
                        "quick": args.quick, "steps": steps, "seconds": round(total, 1),
                        "time": _dt.datetime.now().isoformat(timespec="seconds")}])
    print(f"\n# suite finished in {total:.0f} s; results in {out}")
    if not args.no_report:
        from . import report

        report.main([str(out), "--md", str(args.md)])
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
