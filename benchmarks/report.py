"""Write BENCHMARKS.md from the JSON lines of a benchmark run.

The tables, the machine, the exact commands, whether each target was met and the numeric parts
of the analysis all come from the records; only the section on where the time goes and what a
GPU changes is fixed text (it states mechanisms, and quotes measured numbers where it can).

    python -m benchmarks.report benchmarks/results/run-<id>.jsonl [more.jsonl] --md BENCHMARKS.md

With several runs in the files, the latest run of each bench (per device) is used, unless
``--run-id`` picks one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .harness import paired_ratio, read_jsonl

Rec = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Selecting and indexing records


def select_latest(records: Sequence[Rec], run_id: str | None = None) -> list[Rec]:
    """Records of ``run_id``, or of the latest run of each (bench, device)."""
    if run_id is not None:
        chosen = [r for r in records if r.get("run_id") == run_id]
        if not chosen:
            raise SystemExit(f"--run-id {run_id!r}: no records with that run id")
        return chosen
    latest: dict[tuple[str, str], str] = {}
    for r in records:
        if r.get("type") == "meta":
            latest[(r["bench"], r["device"])] = r["run_id"]
    runs = set(latest.values())
    out = []
    for r in records:
        if r.get("type") in ("meta", "result"):
            if latest.get((r["bench"], r["device"])) == r["run_id"]:
                out.append(r)
        elif r.get("type") == "run" and r["run_id"] in runs:
            out.append(r)
    return out


class Data:
    """Lookup of result records by bench, device, phase, provider and params."""

    def __init__(self, records: Sequence[Rec]) -> None:
        self.records = list(records)
        self.results = [r for r in records if r.get("type") == "result"]
        self.metas = [r for r in records if r.get("type") == "meta"]
        self.runs = [r for r in records if r.get("type") == "run"]

    def devices(self) -> list[str]:
        return list(dict.fromkeys(r["device"] for r in self.metas))

    def benches(self, device: str) -> list[str]:
        return list(dict.fromkeys(r["bench"] for r in self.metas if r["device"] == device))

    def find(self, bench: str, device: str, phase: str | None = None, provider: str | None = None,
             **params: Any) -> list[Rec]:
        out = []
        for r in self.results:
            if r["bench"] != bench or r["device"] != device:
                continue
            if phase is not None and r["phase"] != phase:
                continue
            if provider is not None and r["provider"] != provider:
                continue
            if any(r["params"].get(k) != v for k, v in params.items()):
                continue
            out.append(r)
        return out

    def one(self, bench: str, device: str, phase: str, provider: str, case: str) -> Rec | None:
        for r in self.find(bench, device, phase, provider):
            if r["case"] == case:
                return r
        return None

    def cases(self, bench: str, device: str, phase: str | None = None) -> list[str]:
        return list(dict.fromkeys(r["case"] for r in self.find(bench, device, phase)))


def med(r: Rec | None) -> float | None:
    return None if r is None else r.get("median_s")


def ratio(a: Rec | None, b: Rec | None) -> float | None:
    """a's time over b's: the median of the per-round ratios where both records hold the samples
    of one comparison (see benchmarks/harness.py), else median(a) / median(b) (records written
    before the samples were kept); None when either is missing or failed."""
    ma, mb = med(a), med(b)
    if not (ma and mb):
        return None
    same_compare = all(a.get(k) == b.get(k) for k in ("run_id", "bench", "device", "case", "phase"))
    paired = paired_ratio(a.get("times_s"), b.get("times_s")) if same_compare else None
    return paired if paired is not None else ma / mb


def overlap(a: Rec | None, b: Rec | None) -> bool:
    """True when the p20–p80 ranges of a and b overlap (the difference is within the noise)."""
    if not (a and b and a.get("p20_s") and b.get("p20_s")):
        return False
    return a["p20_s"] <= b["p80_s"] and b["p20_s"] <= a["p80_s"]


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    v = seconds * 1e3
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.2f}"


def x(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


# ----------------------------------------------------------------------------------------------
# Tables


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def result_table(d: Data, bench: str, device: str) -> str:
    rows = []
    for r in d.find(bench, device):
        notes = []
        if r.get("error"):
            notes.append(f"FAILED: {r['error']}")
        info = r.get("info") or {}
        if "backend" in info:
            notes.append(f"backend {info['backend']}")
        if "images_per_s" in info:
            notes.append(f"{info['images_per_s']:.2f} img/s")
        if r.get("first_call_s") and r.get("median_s") and r["first_call_s"] > 3 * r["median_s"] + 0.5:
            notes.append(f"first call {r['first_call_s']:.1f} s (compilation, lazy init)")
        spread = "–" if r.get("p20_s") is None else f"{ms(r['p20_s'])}–{ms(r['p80_s'])}"
        rows.append((r["case"], r["phase"], r["provider"], ms(r.get("median_s")), spread,
                     x(r.get("ratio_vs_baseline")), mib(r.get("peak_bytes")), r.get("reps"),
                     "; ".join(notes)))
    base = next((r["baseline"] for r in d.find(bench, device) if r.get("baseline")), None)
    headers = ("case", "phase", "provider", "median ms", "p20–p80 ms",
               f"× {base}" if base else "ratio", "peak MiB", "runs", "notes")
    return md_table(headers, rows)


# ----------------------------------------------------------------------------------------------
# Targets (CPU, fp32), each evaluated from the data


def _status(ok: bool | None) -> str:
    return "no data" if ok is None else ("**met**" if ok else "**not met**")


def targets(d: Data, device: str = "cpu") -> list[tuple[str, str, str]]:
    """(target, measured, status) rows."""
    out: list[tuple[str, str, str]] = []

    # Issue 2: LoRA linear.
    cases = d.cases("lora_linear", device, "fwd+bwd")
    if cases:
        def pair(case: str, other: str) -> tuple[Rec | None, Rec | None]:
            return (d.one("lora_linear", device, "fwd+bwd", "gslora", case),
                    d.one("lora_linear", device, "fwd+bwd", other, case))

        vs_plain = {c: ratio(*pair(c, "plain")) for c in cases}
        vals = [v for v in vs_plain.values() if v is not None]
        worst = max(vs_plain, key=lambda c: vs_plain[c] or 0) if vals else None
        out.append(("LoRA linear fwd+bwd ≤ 1.10× the frozen plain Linear, every shape",
                    f"{sum(v <= 1.10 for v in vals)}/{len(cases)} shapes within; gslora / plain {_rng(vals)}, worst at {worst}",
                    _status(None if len(vals) < len(cases) else all(v <= 1.10 for v in vals))))
        big = [c for c in cases if "M=4096" in c]
        speed = {c: ratio(*reversed(pair(c, "peft"))) for c in big}
        sv = [v for v in speed.values() if v is not None]
        out.append(("LoRA linear fwd+bwd ≥ 1.3× faster than PEFT eager at M = 4096",
                    f"PEFT / gslora {_rng(sv)} over {len(big)} shapes" if big else "M = 4096 not run",
                    _status(None if (not big or len(sv) < len(big)) else all(v >= 1.3 for v in sv))))
        vs_comp = {c: ratio(*pair(c, "peft+compile")) for c in cases}
        cv = [v for v in vs_comp.values() if v is not None]
        noisy = [c for c in cases if (vs_comp[c] or 0) > 1 and overlap(*pair(c, "peft+compile"))]
        out.append(("LoRA linear fwd+bwd not slower than compiled PEFT",
                    f"gslora / compiled {_rng(cv)}"
                    + (f"; slower but within the p20–p80 spread on {len(noisy)} shape(s)" if noisy else ""),
                    _status(None if len(cv) < len(cases) else all(v <= 1.0 for v in cv))))
        mem = [(a.get("peak_bytes"), b.get("peak_bytes")) for a, b in (pair(c, "peft") for c in cases)
               if a and b and a.get("peak_bytes") is not None and b.get("peak_bytes") is not None]
        out.append(("LoRA linear peak memory ≤ PEFT's (fwd+bwd)",
                    f"{sum(a <= b for a, b in mem)}/{len(cases)} shapes; gslora/PEFT "
                    + (_span([a / b for a, b in mem], 2) if mem else "–"),
                    _status(None if len(mem) < len(cases) else all(a <= b for a, b in mem))))

    # Issue 3: group sparsity.
    cases = d.cases("group_sparsity", device, "norms+prox")
    if cases:
        def g(case: str, phase: str, prov: str) -> Rec | None:
            return d.one("group_sparsity", device, phase, prov, case)

        fl = [ratio(g(c, "norms+prox", "gslora"), g(c, "norms+prox", "floor")) for c in cases]
        fe = [ratio(g(c, "norms+prox", "foreach"), g(c, "norms+prox", "gslora")) for c in cases]
        pe = [ratio(g(c, "penalty", "loop"), g(c, "penalty", "gslora")) for c in cases]
        pg = [ratio(g(c, "penalty", "loop"), g(c, "penalty", "gslora-grad")) for c in cases]
        for label, vals, test, fmt in (
            ("norms+prox within 2× of the one-pass floor", fl, lambda v: v <= 2.0, "gslora / floor"),
            ("norms+prox ≥ 4× faster than the _foreach path", fe, lambda v: v >= 4.0, "foreach / gslora"),
            ("penalty forward+backward ≥ 5× faster than autograd through the Python loop "
             "(fused value and gradient, `add_group_lasso_grad_`)", pg, lambda v: v >= 5.0,
             "loop / gslora-grad"),
            ("the same through autograd (`group_lasso_penalty(...).backward()`; no separate target)",
             pe, None, "loop / gslora"),
        ):
            ok = [v for v in vals if v is not None]
            met = None if test is None or len(ok) < len(cases) else all(test(v) for v in ok)
            out.append((label, f"{fmt} {_rng(ok)} over {len(cases)} layouts",
                        "–" if test is None else _status(met)))

    # Issue 7: end-to-end step.
    cases = d.cases("train_step", device, "step")
    for c in cases:
        gs = d.one("train_step", device, "step", "gslora", c)
        pl = d.one("train_step", device, "step", "peft+loop", c)
        pc = d.one("train_step", device, "step", "peft+loop+compile", c)
        sp = ratio(pl, gs)
        mem_ok = None
        if gs and pl and gs.get("peak_bytes") is not None and pl.get("peak_bytes") is not None:
            mem_ok = gs["peak_bytes"] <= pl["peak_bytes"]
        out.append((f"training step ({c}) ≥ 1.2× faster than PEFT + Python-loop penalty, eager, at ≤ its peak memory",
                    f"PEFT+loop / gslora {x(sp)}; peak {mib(gs.get('peak_bytes') if gs else None)} vs {mib(pl.get('peak_bytes') if pl else None)} MiB",
                    _status(None if sp is None or mem_ok is None else (sp >= 1.2 and mem_ok))))
        rc = ratio(gs, pc)
        out.append((f"training step ({c}) not slower than the compiled baseline",
                    f"gslora / compiled {x(rc)}" + (" (within the p20–p80 spread)" if rc and rc > 1 and overlap(gs, pc) else ""),
                    _status(None if rc is None else rc <= 1.0)))
    return out


# ----------------------------------------------------------------------------------------------
# Data-driven analysis


def _range(vals: Iterable[float | None]) -> tuple[float, float] | None:
    v = [a for a in vals if a is not None]
    return (min(v), max(v)) if v else None


def _rng(vals: Iterable[float | None], digits: int = 2) -> str:
    r = _range(vals)
    if r is None:
        return "–"
    return f"{r[0]:.{digits}f}×" if abs(r[0] - r[1]) < 10 ** -digits else f"{r[0]:.{digits}f}–{r[1]:.{digits}f}×"


def _span(vals: Sequence[float], digits: int) -> str:
    lo, hi = f"{min(vals):.{digits}f}", f"{max(vals):.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def analysis(d: Data, device: str) -> list[str]:
    """Paragraphs stating what the numbers of ``device`` say."""
    paras: list[str] = []
    # LoRA linear.
    cases = d.cases("lora_linear", device)
    if cases:
        parts = []
        for phase in ("fwd", "bwd", "fwd+bwd"):
            parts.append(f"{phase} {_rng(ratio(d.one('lora_linear', device, phase, 'gslora', c), d.one('lora_linear', device, phase, 'plain', c)) for c in cases)}")
        over = [100 * (ratio(d.one("lora_linear", device, "fwd+bwd", "gslora", c),
                             d.one("lora_linear", device, "fwd+bwd", "plain", c)) or float("nan")) - 100
                for c in cases]
        over = [o for o in over if o == o]
        ref = _rng(ratio(d.one("lora_linear", device, "fwd+bwd", "reference", c),
                         d.one("lora_linear", device, "fwd+bwd", "gslora", c)) for c in cases)
        peft = _rng(ratio(d.one("lora_linear", device, "fwd+bwd", "peft", c),
                          d.one("lora_linear", device, "fwd+bwd", "gslora", c)) for c in cases)
        backend = next((r["info"].get("backend") for r in d.find("lora_linear", device, provider="gslora")
                        if r.get("info")), "?")
        paras.append(
            f"**LoRA linear** (gslora backend `{backend}`). Against the floor, a frozen `nn.Linear` "
            f"doing the same GEMMs without the adapter, GSLoRALinear costs {', '.join(parts)} of "
            f"the plain layer; the adapter's share of a training call (fwd+bwd) is "
            + ((f"{min(over):+.0f}%" if max(over) - min(over) < 1 else f"{min(over):+.0f}% to {max(over):+.0f}%") if over else "–")
            + f". The plain-PyTorch reference is {ref} the time of gslora and PEFT eager "
            f"{peft} (values above 1× mean gslora is faster).")
    # FFN.
    cases = d.cases("ffn", device)
    if cases:
        paras.append(
            "**FFN block** (fc1 → GELU → fc2, LoRA on both): gslora / frozen block "
            f"{_rng(ratio(d.one('ffn', device, 'fwd+bwd', 'gslora', c), d.one('ffn', device, 'fwd+bwd', 'plain', c)) for c in cases)} "
            f"(fwd+bwd); PEFT eager / gslora "
            f"{_rng(ratio(d.one('ffn', device, 'fwd+bwd', 'peft', c), d.one('ffn', device, 'fwd+bwd', 'gslora', c)) for c in cases)}; "
            f"compiled PEFT / gslora "
            f"{_rng(ratio(d.one('ffn', device, 'fwd+bwd', 'peft+compile', c), d.one('ffn', device, 'fwd+bwd', 'gslora', c)) for c in cases)}.")
    # Group sparsity.
    cases = d.cases("group_sparsity", device)
    if cases:
        bw = []
        for c in cases:
            r = d.one("group_sparsity", device, "norms+prox", "gslora", c)
            if r and med(r):
                bw.append(2 * r["params"]["bytes"] / med(r) / 1e9)  # read + write once
        grad_rng = _rng(ratio(d.one("group_sparsity", device, "penalty", "loop", c),
                              d.one("group_sparsity", device, "penalty", "gslora-grad", c))
                        for c in cases)
        paras.append(
            "**Group sparsity**: one proximal step (norms + scale) takes gslora "
            f"{_rng(ratio(d.one('group_sparsity', device, 'norms+prox', 'gslora', c), d.one('group_sparsity', device, 'norms+prox', 'floor', c)) for c in cases)} "
            "the time of one in-place multiply over the same bytes"
            + (f" ({_span(bw, 1)} GB/s counting one read and one write)" if bw else "")
            + "; the Python loop takes "
            f"{_rng(ratio(d.one('group_sparsity', device, 'norms+prox', 'loop', c), d.one('group_sparsity', device, 'norms+prox', 'gslora', c)) for c in cases)} "
            "and the `_foreach` path "
            f"{_rng(ratio(d.one('group_sparsity', device, 'norms+prox', 'foreach', c), d.one('group_sparsity', device, 'norms+prox', 'gslora', c)) for c in cases)} "
            "the time of gslora. For the penalty's forward+backward, autograd through the loop takes "
            f"{_rng(ratio(d.one('group_sparsity', device, 'penalty', 'loop', c), d.one('group_sparsity', device, 'penalty', 'gslora', c)) for c in cases)} "
            "the time of the fused penalty's autograd op"
            + (f" and {grad_rng} the time of the fused value-and-gradient op, which writes `.grad` "
               "without autograd" if grad_rng != "–" else "")
            + ". These tensors are small (a few MB): per-call overheads "
            "(Python, dispatch, one kernel per tensor) matter as much as bandwidth."
            + (" One optimizer step (AdamW, then the prox) through `ProxOptimizer`, fused into one "
               "pass per group: the same step unfused (AdamW's own step, then the fused prox) takes "
               f"{_rng(ratio(d.one('group_sparsity', device, 'adamw+prox', 'gslora-unfused', c), d.one('group_sparsity', device, 'adamw+prox', 'gslora', c)) for c in cases)}, "
               "AdamW(foreach=True) + the `_foreach` prox "
               f"{_rng(ratio(d.one('group_sparsity', device, 'adamw+prox', 'foreach', c), d.one('group_sparsity', device, 'adamw+prox', 'gslora', c)) for c in cases)} "
               "and per-tensor AdamW + the loop prox "
               f"{_rng(ratio(d.one('group_sparsity', device, 'adamw+prox', 'loop', c), d.one('group_sparsity', device, 'adamw+prox', 'gslora', c)) for c in cases)} "
               "the time of the fused step; it is "
               f"{_rng(ratio(d.one('group_sparsity', device, 'adamw+prox', 'gslora', c), d.one('group_sparsity', device, 'adamw+prox', 'floor', c)) for c in cases)} "
               "one in-place multiply over θ, m and v (reading the gradient, a sqrt and two "
               "divisions per element stand between it and that floor)."
               if d.one("group_sparsity", device, "adamw+prox", "gslora", cases[0]) else ""))
    # Train step.
    cases = d.cases("train_step", device)
    if cases:
        lines = []
        for c in cases:
            recs = {r["provider"]: r for r in d.find("train_step", device, "step") if r["case"] == c}
            ips = ", ".join(f"{p} {r['info']['images_per_s']:.2f}" for p, r in recs.items()
                            if r.get("info", {}).get("images_per_s"))
            comp = recs.get("peft+loop+compile")
            lines.append(
                f"{c}: images/s {ips or '–'}; time of PEFT+loop / gslora {x(ratio(recs.get('peft+loop'), recs.get('gslora')))}, "
                f"compiled PEFT+loop / gslora {x(ratio(recs.get('peft+loop+compile'), recs.get('gslora')))}; "
                f"prox instead of the penalty: gslora+penalty / gslora {x(ratio(recs.get('gslora+penalty'), recs.get('gslora')))}"
                + (f"; compiling the baseline took {comp['first_call_s']:.0f} s" if comp and comp.get("first_call_s") else ""))
        paras.append("**Training step**: " + "; ".join(lines) + ". The frozen GEMMs and attention of "
                     "the backbone are identical in every provider; only the LoRA layers, the "
                     "penalty/prox and the optimizer differ, so the end-to-end gain is bounded by "
                     "their share of the step.")
    return paras


FIXED_TEXT = """\
## Where the time goes, and what changes on a GPU

*This section is written by hand; the numbers it refers to are in the tables above.*

**LoRA linear.** A training call of a frozen linear with LoRA costs the base GEMMs (forward
x·Wᵀ, backward g·W; no dW since W is frozen) plus the rank-r side: x·Aᵀ and (xAᵀ)·Bᵀ in the
forward, u = g·B, dB, dA and u·A in the backward. At r = 8–16 the side products are
r/N–r/K of the base work (1–4 %), so the floor is the frozen plain Linear and the distance to
it is mostly memory traffic, not FLOPs: PEFT's eager forward materialises an extra [M, N]
result for the LoRA branch (lora_B(lora_A(x)) · s, then a second add into the base output) and
its backward reads g once more for dB, which is why it is slower and holds more memory than the
base layer. The fused path accumulates s·(xAᵀ)Bᵀ into the base output (no second [M, N]) and
keeps only the [M, r] product xAᵀ for the backward, so its extra traffic is O(M·r) instead of
O(M·N). What remains to the floor is the extra passes over x, g and dx for the thin rank-r
products (a [M, K] × [K, 8] product is bandwidth-bound, and MKL ran these at a fraction of the
memory speed, so the CPU backend does them in explicit SIMD row-block kernels); removing those
passes entirely would need the rank-r work inside the GEMM's own tiles (a custom GEMM).

**Group sparsity.** The LoRA parameters of a whole ViT are a few MB; a proximal step has to
read every value once and write it once. The Python loop launches ~3 ops per tensor plus
a reduction per group and, in autograd, builds and walks a graph of hundreds of nodes; the
fused op does one pass per group while the group is hot in cache. On a CPU the floor itself is
tens to hundreds of microseconds, so constant overheads (argument checking, dispatch) decide
the ratio at these sizes.

**End-to-end step.** Attention and the frozen FFN GEMMs dominate a ViT training step; LoRA,
the penalty and AdamW over ~1 % of the parameters are a small slice. The end-to-end speed-up
therefore cannot exceed 1 / (1 − share of the removed overhead), and `torch.compile` mainly
fuses the element-wise parts (GELU, LayerNorm, residual adds, the LoRA add), which gslora does
not touch: a compiled baseline can win on the parts that are not LoRA at all.

**On a GPU** (H200, `--device cuda`): the same scripts time with CUDA events and measure memory
with `torch.cuda.max_memory_allocated`; the `gslora` provider then runs the `triton` (or
`cuda`) backend. The GEMMs become ~100× faster while the cost of launching a kernel (~5 µs on
the device, and tens of µs of Python-side launcher and autograd overhead per op) does not
shrink, so at the sizes of these benchmarks most calls are launch-bound: what counts is the
number of launches and Python calls per step, not bytes or FLOPs. (i) The per-tensor loop of the
group penalty is ~4 launches × tensors; the fused ops are one or two launches, so their gain
grows with the model's depth, but only once their own fixed overhead is below the loop's.
(ii) The LoRA side products are bandwidth-bound on any device and become a larger fraction of a
now-faster base GEMM unless they are fused into its epilogue (the Triton kernels carry the
[BM, r] side accumulator in the output tile); at large M the fused kernel must compete with
cuBLAS on the base GEMM itself. (iii) In bf16, saving the [M, r] product instead of [M, N]
temporaries matters more, because activation memory, not FLOPs, bounds the batch size. Read
the cuda tables (when present) for which of these effects dominates at each size.

## Reproduce

* the whole suite and this file: `make bench` (= `python -m benchmarks.run_all`; add
  `--quick` for a one-minute check of the tooling);
* one script: `python -m benchmarks.bench_lora_linear [--quick] [--device cuda] [--plot lora.png]`
  (likewise `bench_group_sparsity`, `bench_ffn`, `bench_train_step`; `--help` lists the
  shape, provider and repetition options);
* a report from several files, e.g. a CPU suite and a GPU run:
  `python -m benchmarks.report benchmarks/results/run-<id>.jsonl gpu.jsonl --md BENCHMARKS.md`.
"""


def machine_section(d: Data) -> list[str]:
    lines = ["## Machine and command", ""]
    for run in d.runs:
        total = run.get("seconds")
        lines.append(f"Suite command: `{run['command']}` ({'quick subset; ' if run.get('quick') else ''}"
                     f"{total:.0f} s in all, {run['time']}).")
        for s in run.get("steps", []):
            lines.append(f"* `{s['command']}` — {'ok' if s['rc'] == 0 else 'FAILED: ' + str(s['rc'])}, {s['seconds']:.0f} s")
        lines.append("")
    seen = set()
    for m in d.metas:
        mc = m["machine"]
        key = (m["device"], mc.get("cpu"), mc.get("gpu"))
        if key not in seen:
            seen.add(key)
            hw = mc.get("gpu") if m["device"].startswith("cuda") else mc.get("cpu")
            lines.append(
                f"* **{m['device']}**: {hw}; {mc.get('usable_cpus')} usable of {mc.get('logical_cpus')} "
                f"logical CPUs, {mc.get('torch_threads')} torch threads, {mc.get('mem_total_gib')} GiB; "
                f"{mc.get('platform')}; Python {mc.get('python')}")
            lines.append(
                f"* versions: torch {mc.get('torch')} (CUDA {mc.get('torch_cuda')}), gslora {mc.get('gslora')} "
                f"(git {mc.get('git')}), numpy {mc.get('numpy')}, triton {mc.get('triton')}"
                + (f", peft {mc['peft']}" if mc.get("peft") else "")
                + (f", timm {mc['timm']}" if mc.get("timm") else ""))
            lines.append(f"* gslora backends: {str(mc.get('gslora_backends', '')).replace(chr(10), '; ')}")
            lines.append(f"* peak memory: {m.get('peak_memory_method')}")
    several = len(d.devices()) > 1
    loads = [((f"{m['device']} " if several else "") + m["bench"], m["machine"].get("loadavg"),
              m.get("loadavg_end")) for m in d.metas]
    la = [f"{b} {s[0]:.1f}→{e[0]:.1f}" for b, s, e in loads if s and e]
    if la:
        lines.append("* 1-minute load average at start → end of each script (a noise indicator: "
                     f"compare with the CPU count above): {', '.join(la)}")
    lines.append("")
    for m in d.metas:
        lines.append(f"* `{m['command'].strip()}` — run `{m['run_id']}`, {m['time']}, {m['dtype']}"
                     f"; allocator: {m.get('allocator', 'default (not recorded)')}")
    return lines


def render(d: Data) -> str:
    out = ["# gslora benchmarks", "",
           "Generated by `python -m benchmarks.report` from the JSON lines of a run of "
           "`make bench` (`python -m benchmarks.run_all`). Times are per call: median and "
           "p20–p80 of alternating side-by-side runs in one process. Ratios (the ratio column: to "
           "the bench's baseline, the floor where there is one; the targets and the text: between "
           "the providers named) are medians of the per-round ratios: every round runs each "
           "provider once, next to each other, so a slow spell of the machine cancels out "
           "(records without their samples, from before this was kept, give the ratio of the "
           "medians). Do not edit by hand: rerun `make bench`.", ""]
    if any(m.get("quick") for m in d.metas):
        out += ["> **Quick run** (`--quick`): a subset of the shapes, for checking the tooling; "
                "the numbers are not the suite's.", ""]
    high = [m for m in d.metas if m["machine"].get("loadavg") and m["machine"].get("logical_cpus")
            and m["machine"]["loadavg"][0] > 1.5 * m["machine"]["logical_cpus"]]
    if high:
        out += [f"> **Noisy machine**: the load average exceeded 1.5× the CPU count when "
                f"{', '.join(m['bench'] for m in high)} started; other processes shared the cores, "
                "so absolute times and small ratios are unreliable in this run.", ""]
    out += machine_section(d)
    cpu_targets = targets(d, "cpu") if "cpu" in d.devices() else []
    if cpu_targets:
        out += ["", "## Targets (CPU, fp32)", "", md_table(("target", "measured", "status"), cpu_targets)]
    for device in d.devices():
        paras = analysis(d, device)
        if paras:
            out += ["", f"## What the numbers say ({device})", ""]
            for p in paras:
                out += [p, ""]
    titles = {"lora_linear": "LoRA linear (issue 2)", "group_sparsity": "Group sparsity (issue 3)",
              "ffn": "FFN block", "train_step": "End-to-end training step"}
    for device in d.devices():
        for bench in d.benches(device):
            meta = next(m for m in d.metas if m["bench"] == bench and m["device"] == device)
            out += ["", f"## {titles.get(bench, bench)} — {device}, {meta['dtype']}", "",
                    f"`{meta['command'].strip()}`", "", result_table(d, bench, device)]
    out += ["", FIXED_TEXT]
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="JSON-lines files written by the benches")
    p.add_argument("--md", type=Path, default=None, help="write the report here (default: stdout)")
    p.add_argument("--run-id", default=None, help="use only this run's records")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.files if not f.exists()]
    if missing:
        raise SystemExit(f"no such file: {', '.join(missing)}")
    d = Data(select_latest(read_jsonl(args.files), args.run_id))
    if not d.metas:
        raise SystemExit("no benchmark records in " + ", ".join(map(str, args.files)))
    text = render(d)
    if args.md is None:
        sys.stdout.write(text)
    else:
        args.md.write_text(text)
        print(f"# wrote {args.md}")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
