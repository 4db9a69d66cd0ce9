"""GPU report for the gslora Triton kernels: resources, rooflines and (with --time) measured speed.

Without a GPU it prints, per kernel, autotune config and target (sm_80, sm_90): registers, stack,
local memory (spills) and shared memory from an ahead-of-time compile, then the analytical FLOPs,
the minimum HBM bytes and the roofline time on an H100 (989 TFLOP/s dense bf16, 3.35 TB/s) and an
H200 (989 TFLOP/s, 4.8 TB/s) for the ViT-S/B FFN shapes.

With ``--time`` on a machine with a GPU it also times the Triton kernels against cuBLAS (the
equivalent chain of torch.mm/addmm calls) with triton.testing.do_bench and prints achieved
TFLOP/s and GB/s. Every measurement is isolated: a failure is printed and the others still run.

    python benchmarks/gpu_report.py                 # static report (no GPU needed)
    python benchmarks/gpu_report.py --time --json out.jsonl   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAKS = {  # name: (dense bf16 FLOP/s, HBM bytes/s)
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
}
# ViT-S (384 → 1536 → 384) and ViT-B (768 → 3072 → 768) FFN linears as (K, N).
FFN_SHAPES = {"vit_s.fc1": (384, 1536), "vit_s.fc2": (1536, 384),
              "vit_b.fc1": (768, 3072), "vit_b.fc2": (3072, 768)}
TOKENS = (4096, 32768)
RANKS = (8, 16)
ELEM = 2  # bf16 bytes


def lora_counts(m: int, k: int, n: int, r: int) -> dict[str, float]:
    """FLOPs, minimum HBM bytes and the bytes our kernel design moves, forward and backward.

    Minimum bytes: every input read once, every output written once. Design bytes: the split
    forward reads x twice (projection + GEMM) and the P workspace (fp32 [M, 16+]); the backward
    reads g three times (u, dB, dx), x once for dA, P = u as fp32, and writes dx, dA, dB.
    """
    rp = max(16, 1 << (r - 1).bit_length())
    fwd_flops = 2 * m * k * n + 2 * m * k * r + 2 * m * n * r
    bwd_flops = 2 * m * n * k + 2 * m * n * r * 2 + 2 * m * k * r * 2
    params = n * k + r * k + n * r + n
    fwd_min = ELEM * (m * k + params + m * n + m * r)
    bwd_min = ELEM * (m * n + m * k + params + m * r + m * k + r * k + n * r)
    fwd_design = fwd_min + ELEM * m * k + 4 * m * rp * 2
    bwd_design = bwd_min + ELEM * 2 * m * n + 4 * m * rp * 3
    return {"fwd_flops": fwd_flops, "bwd_flops": bwd_flops, "fwd_min_bytes": fwd_min,
            "bwd_min_bytes": bwd_min, "fwd_design_bytes": fwd_design,
            "bwd_design_bytes": bwd_design}


def roofline_s(flops: float, nbytes: float, gpu: str) -> float:
    peak, bw = PEAKS[gpu]
    return max(flops / peak, nbytes / bw)


def print_resources(archs: list[int], jobs: int, records: list[dict]) -> None:
    print("== Kernel resources (ahead-of-time compile; bf16 tensor-core and fp32 FMA variants) ==")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("skipped: TRITON_INTERPRET=1 is set (unset it to compile for GPU targets)")
        return
    try:
        from gslora.kernels import aot

        results = aot.run(archs, aot.DEFAULT_VARIANTS, jobs)
    except Exception as exc:
        print(f"AOT compile failed: {type(exc).__name__}: {exc}")
        return
    print(f"{'target / kernel / config':<86} {'regs':>4} {'stack':>5} {'local':>5} "
          f"{'smem':>7} {'limit':>7}  mma")
    for r in results:
        if not r.ok:
            print(f"{r.label():<86} FAILED: {r.error[:300]}")
        else:
            print(f"{r.label():<86} {r.registers:>4} {r.stack:>5} {r.local:>5} {r.shared:>7} "
                  f"{r.shared_limit:>7}  {'+'.join(r.mma) or '-'}")
        records.append({"kind": "resources", **r.__dict__})


def print_rooflines(records: list[dict]) -> None:
    print("\n== Analytical counts and rooflines (bf16 LoRA linear, per call) ==")
    head = (f"{'layer':<10} {'M':>6} {'r':>3} {'pass':>4} {'GFLOP':>8} {'min MB':>8} "
            f"{'design MB':>9} {'AI':>6} {'H100 us':>8} {'H200 us':>8}")
    print(head)
    for name, (k, n) in FFN_SHAPES.items():
        for m in TOKENS:
            for r in RANKS:
                c = lora_counts(m, k, n, r)
                for pas in ("fwd", "bwd"):
                    fl, mb = c[f"{pas}_flops"], c[f"{pas}_min_bytes"]
                    row = {"kind": "roofline", "layer": name, "M": m, "K": k, "N": n, "r": r,
                           "pass": pas, "flops": fl, "min_bytes": mb,
                           "design_bytes": c[f"{pas}_design_bytes"],
                           "h100_us": roofline_s(fl, mb, "H100") * 1e6,
                           "h200_us": roofline_s(fl, mb, "H200") * 1e6}
                    records.append(row)
                    print(f"{name:<10} {m:>6} {r:>3} {pas:>4} {fl / 1e9:>8.1f} {mb / 1e6:>8.1f} "
                          f"{row['design_bytes'] / 1e6:>9.1f} {fl / mb:>6.0f} "
                          f"{row['h100_us']:>8.1f} {row['h200_us']:>8.1f}")


def _bench(fn, reps: int = 50) -> float:
    """Median ms per call as a Python caller sees it (host launch overhead included)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median"))


def _bench_graph(fn, reps: int = 50) -> float | None:
    """Median ms per call replayed from a CUDA graph: GPU time without host overhead.

    None when the call cannot be captured (the eager number then stands alone).
    """
    import triton.testing

    try:
        fn()  # autotune and compile outside the capture
        return float(triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median"))
    except Exception:
        return None


def _time_shape(records: list[dict], name: str, m: int, k: int, n: int, r: int) -> None:
    import torch

    from gslora import kernels

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
    b = torch.randn(n, device=dev, dtype=dt)
    a = torch.randn(r, k, device=dev, dtype=dt) * k ** -0.5
    bb = torch.randn(n, r, device=dev, dtype=dt)
    g = torch.randn(m, n, device=dev, dtype=dt)
    s = 1.0 / r
    c = lora_counts(m, k, n, r)

    def cublas_fwd():
        xa = x @ a.t()
        y = torch.addmm(b, x, w.t())
        return y.addmm_(xa, bb.t(), alpha=s), xa

    xa_ref = cublas_fwd()[1]

    def cublas_bwd():
        u = g @ bb
        db = (g.t() @ xa_ref).mul_(s)
        da = (u.t() @ x).mul_(s)
        dx = (g @ w).addmm_(u, a, alpha=s)
        return dx, da, db

    providers = {
        "fwd": [("cublas", cublas_fwd),
                ("triton", lambda: kernels.lora_linear_fwd(x, w, b, a, bb, s)),
                ("cublas_base", lambda: torch.addmm(b, x, w.t()))],
        "bwd": [("cublas", cublas_bwd),
                ("triton", lambda: kernels.lora_linear_bwd(g, x, w, a, bb, xa_ref, s)),
                ("cublas_base", lambda: g @ w)],
    }
    for pas, provs in providers.items():
        base_ms = None
        for prov, fn in provs:
            try:
                if prov == "triton":  # check before timing: a fast wrong kernel is worthless
                    got = fn()
                    want = cublas_fwd() if pas == "fwd" else cublas_bwd()
                    for gt, wt in zip(got, want, strict=True):
                        err = (gt.float() - wt.float()).abs().max().item()
                        scale = wt.float().abs().max().item() + 1e-6
                        if not err <= 0.05 * scale:
                            raise AssertionError(f"mismatch vs cuBLAS: {err:.3e} (scale {scale:.3e})")
                ms = _bench(fn)
                gms = _bench_graph(fn)
                t = gms if gms is not None else ms
                fl = 2 * m * n * k if prov == "cublas_base" else c[f"{pas}_flops"]
                nbytes = c[f"{pas}_min_bytes"]
                if prov == "cublas":
                    base_ms = t
                ratio = f"{base_ms / t:>8.2f}x" if base_ms else ""
                gtxt = f"{gms:>8.3f}" if gms is not None else f"{'-':>8}"
                print(f"{name:<10} {m:>6} {r:>3} {pas:>4} {prov:<14} {ms:>8.3f} {gtxt} "
                      f"{fl / t / 1e9:>8.1f} {nbytes / t / 1e6:>7.0f} {ratio:>9}", flush=True)
                records.append({"kind": "timing", "layer": name, "M": m, "K": k, "N": n,
                                "r": r, "pass": pas, "provider": prov, "ms": ms,
                                "graph_ms": gms, "tflops": fl / t / 1e9,
                                "gbps": nbytes / t / 1e6})
            except Exception as exc:
                print(f"{name:<10} {m:>6} {r:>3} {pas:>4} {prov:<14} FAILED: "
                      f"{type(exc).__name__}: {str(exc)[:300]}", flush=True)
                records.append({"kind": "timing", "layer": name, "M": m, "r": r,
                                "pass": pas, "provider": prov, "error": str(exc)[:500]})


def time_lora(records: list[dict], shapes: list[tuple[str, int, int, int, int]]) -> None:
    import torch

    print("\n== Timings: Triton vs cuBLAS (torch.mm chain), bf16, median ms ==")
    print("ms: eager call (host overhead included); graph ms: CUDA-graph replay (GPU time); "
          "TFLOP/s, GB/s and the ratio use graph ms when available")
    print(f"{'layer':<10} {'M':>6} {'r':>3} {'pass':>4} {'provider':<14} {'ms':>8} {'graph ms':>8} "
          f"{'TFLOP/s':>8} {'GB/s':>7} {'vs cuBLAS':>9}")
    for name, m, k, n, r in shapes:
        try:
            _time_shape(records, name, m, k, n, r)
        except Exception as exc:  # e.g. out of memory: report and go on with the next shape
            print(f"{name} M={m} r={r}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()


def time_groups(records: list[dict]) -> None:
    import torch

    from gslora import kernels, reference

    print("\n== Timings: group ops, ViT-B LoRA (12 blocks x {fc1,fc2} x {A,B}, r=16), fp32 ==")
    try:
        torch.manual_seed(0)
        tensors, ids = [], []
        for blk in range(12):
            for k, n in ((768, 3072), (3072, 768)):
                tensors += [torch.randn(16, k, device="cuda"), torch.randn(n, 16, device="cuda")]
                ids += [blk, blk]
        thr = torch.full((12,), 1.0, device="cuda")
        nbytes = sum(t.numel() * 4 for t in tensors)
    except Exception as exc:
        print(f"setup failed: {exc}")
        return
    cases = [
        ("sq_norms", "triton", lambda: kernels.group_sq_norms(tensors, ids, 12), nbytes),
        ("sq_norms", "torch", lambda: reference.group_sq_norms(tensors, ids, 12), nbytes),
        ("sq_norms", "foreach", lambda: torch.stack(torch._foreach_norm(tensors)), nbytes),
        ("prox_", "triton", lambda: kernels.group_prox_(tensors, ids, 12, thr), 2 * nbytes),
        ("prox_", "torch", lambda: reference.group_prox_(tensors, ids, 12, thr), 2 * nbytes),
        ("scale", "triton", lambda: kernels.group_scale(tensors, ids, thr), 2 * nbytes),
        ("scale", "torch", lambda: reference.group_scale(tensors, ids, thr), 2 * nbytes),
    ]
    for op, prov, fn, nb in cases:
        try:
            # Eager only: the group ops build their table on the host (a host→device copy per
            # call), which is part of their real cost and cannot be captured in a graph.
            ms = _bench(fn)
            print(f"{op:<9} {prov:<8} {ms * 1e3:>9.1f} us {nb / ms / 1e6:>7.0f} GB/s")
            records.append({"kind": "timing_group", "op": op, "provider": prov, "ms": ms,
                            "gbps": nb / ms / 1e6})
        except Exception as exc:
            print(f"{op:<9} {prov:<8} FAILED: {type(exc).__name__}: {str(exc)[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="time the kernels (needs a GPU)")
    parser.add_argument("--no-aot", action="store_true", help="skip the AOT resource table")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true",
                        help="time only M=32768, r=16 (the biggest shapes)")
    parser.add_argument("--json", type=Path, help="append JSON lines (with versions) here")
    args = parser.parse_args(argv)

    records: list[dict] = []
    if not args.no_aot:
        print_resources(args.arch, args.jobs, records)
    print_rooflines(records)
    if args.time:
        import torch

        if not torch.cuda.is_available():
            print("\n--time: no CUDA device here, timings skipped")
        else:
            print(f"\nGPU: {torch.cuda.get_device_name()}")
            shapes = [(name, m, k, n, r) for name, (k, n) in FFN_SHAPES.items()
                      for m in TOKENS for r in RANKS
                      if not args.quick or (m == 32768 and r == 16)]
            for part in (lambda: time_lora(records, shapes), lambda: time_groups(records)):
                try:
                    part()
                except Exception:
                    traceback.print_exc()
    if args.json:
        import torch
        import triton

        meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
                "triton": triton.__version__, "python": platform.python_version(),
                "machine": platform.node(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        with args.json.open("a") as fh:
            for rec in records:
                fh.write(json.dumps({**meta, **rec}, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
