"""Ahead-of-time compilation of every gslora Triton kernel for real GPU targets, no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` yields a cubin per kernel
and autotune config; ``cuobjdump`` (shipped in the triton wheel) then reports registers, stack and
local memory (spills), and the SASS shows whether the matrix products use tensor cores (HMMA on
sm_80; HGMMA (wgmma) or HMMA on sm_90). The specialisations mirror what the JIT produces for the
hot path (contiguous bf16 tensors, feature sizes divisible by 16: unit strides become constants,
pointers and the other strides carry the divisibility-by-16 hint).

Run as ``python -m gslora.kernels.aot [--arch 80 90] [--jobs 2] [--json]`` with TRITON_INTERPRET
unset (the kernels must be real ``JITFunction`` objects, not interpreter wrappers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Dynamic shared memory per block available to a kernel.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MATMUL_KERNELS = ("_lora_proj_kernel", "_lora_gemm_kernel", "_lora_wgrad_kernel")
# Operand variants the AOT test covers: bf16 (tensor cores) and fp32 (exact FMA, no TF32).
DEFAULT_VARIANTS = ["bf16", "fp32"]


@dataclass
class Job:
    kernel: str
    variant: str
    config: dict[str, int]
    num_warps: int
    num_stages: int
    arch: int


@dataclass
class Result:
    kernel: str
    variant: str
    config: dict[str, int]
    num_warps: int
    num_stages: int
    arch: int
    ok: bool = False
    error: str = ""
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    shared_limit: int = 0
    mma: list[str] = field(default_factory=list)

    def label(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.config.items())
        return (f"sm_{self.arch} {self.kernel}[{self.variant}] {meta} "
                f"w{self.num_warps}s{self.num_stages}")


def _signatures(variant: str) -> dict[str, list[tuple[str, Any]]]:
    """Per kernel: (arg name, 'type[:16]' or a constexpr value) in argument order."""
    import triton.language as tl

    dt = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[variant]
    ieee = variant == "fp32"
    p = f"*{dt}:16"
    flags = {"UPCAST": False, "IEEE": ieee}
    return {
        "_lora_proj_kernel": [
            ("x_ptr", p), ("a_ptr", p), ("mask_ptr", "*u8:16"), ("p_ptr", "*fp32:16"),
            ("M", "i32"), ("K", "i32:16"), ("R", "i32"),
            ("stride_xm", "i32:16"), ("stride_xk", 1), ("stride_ar", "i32:16"),
            ("stride_ak", 1), ("stride_mm", "i32:16"), ("stride_mk", 1), ("keep_scale", "fp32"),
            ("HAS_MASK", True), ("R_PAD", 16), *flags.items(),
        ],
        "_lora_gemm_kernel": [
            ("x_ptr", p), ("w_ptr", p), ("p_ptr", "*fp32:16"), ("v_ptr", p), ("bias_ptr", p),
            ("mask_ptr", "*u8:16"), ("out_ptr", p),
            ("M", "i32"), ("N", "i32:16"), ("K", "i32:16"), ("R", "i32"),
            ("stride_xm", "i32:16"), ("stride_xk", 1), ("stride_wk", 1), ("stride_wn", "i32:16"),
            ("stride_vr", 1), ("stride_vn", "i32:16"), ("stride_mm", "i32:16"), ("stride_mn", 1),
            ("stride_om", "i32:16"), ("stride_on", 1), ("scaling", "fp32"), ("keep_scale", "fp32"),
            ("HAS_BIAS", True), ("HAS_MASK", False), ("R_PAD", 16), ("SPLIT_P", not ieee),
            *flags.items(),
        ],
        "_lora_wgrad_kernel": [
            ("p_ptr", "*fp32:16"), ("q_ptr", p), ("mask_ptr", "*u8:16"), ("ws_ptr", "*fp32:16"),
            ("M", "i32"), ("C", "i32:16"), ("R", "i32"), ("rows_per_split", "i32:16"),
            ("stride_pm", "i32:16"), ("stride_pr", 1), ("stride_qm", "i32:16"), ("stride_qc", 1),
            ("stride_mm", "i32:16"), ("stride_mc", 1),
            ("HAS_MASK", True), ("R_PAD", 16), ("P_FP32", True), ("SPLIT_P", not ieee),
            *flags.items(),
        ],
        "_group_sq_norms_kernel": [
            ("base_ptr", p), ("offs_ptr", "*i64:16"), ("lens_ptr", "*i64:16"),
            ("starts_ptr", "*i64:16"), ("out_ptr", "*fp32:16"), ("ACC_DT", tl.float32),
        ],
        "_group_prox_kernel": [
            ("base_ptr", p), ("offs_ptr", "*i64:16"), ("lens_ptr", "*i64:16"),
            ("starts_ptr", "*i64:16"), ("thr_ptr", "*fp32:16"), ("norms_ptr", "*fp32:16"),
            ("ACC_DT", tl.float32), ("EMULATE_RNE", False),
        ],
        "_group_scale_kernel": [
            ("in_ptr", p), ("out_ptr", p), ("in_offs_ptr", "*i64:16"), ("out_offs_ptr", "*i64:16"),
            ("lens_ptr", "*i64:16"), ("gids_ptr", "*i64:16"), ("coeffs_ptr", "*fp32:16"),
            ("EMULATE_RNE", False),
        ],
        "_adamw_prox_kernel": [
            ("p_ptr", p), ("g_ptr", p), ("m_ptr", p), ("v_ptr", p), ("table_ptr", "*i64:16"),
            ("starts_ptr", "*i64"), ("coef_ptr", "*fp32:16"), ("thr_ptr", "*fp32:16"),
            ("norms_ptr", "*fp32:16"), ("lam_ptr", "*fp32:16"), ("n_rows", "i32"),
            ("LERP_LOW", True), ("ADAM_METRIC", True), ("ACC_DT", tl.float32),
            ("EMULATE_RNE", False),
        ],
    }


def _kernels(variant: str = "bf16") -> dict[str, Any]:
    """Kernel name → (JITFunction, the autotune configs the launcher uses for this variant)."""
    from . import group, lora

    fp32 = variant == "fp32"
    return {
        "_lora_proj_kernel": (lora._lora_proj_kernel,
                              lora.PROJ_CONFIGS_FP32 if fp32 else lora.PROJ_CONFIGS),
        "_lora_gemm_kernel": (lora._lora_gemm_kernel,
                              lora.GEMM_CONFIGS_FP32 if fp32 else lora.GEMM_CONFIGS),
        "_lora_wgrad_kernel": (lora._lora_wgrad_kernel,
                               lora.WGRAD_CONFIGS_FP32 if fp32 else lora.WGRAD_CONFIGS),
        "_group_sq_norms_kernel": (group._group_sq_norms_kernel, [None]),
        "_group_prox_kernel": (group._group_prox_kernel, [None]),
        "_group_scale_kernel": (group._group_scale_kernel, [None]),
        "_adamw_prox_kernel": (group._adamw_prox_kernel, [None]),
    }


def jobs(archs: list[int], variants: list[str]) -> list[Job]:
    """Every kernel × autotune config × target (× dtype variant for the matmul kernels).

    The group kernels have no matmul and one config; they are compiled for the first variant.
    """
    from . import group

    out = []
    for name in _kernels():
        for variant in variants if name in MATMUL_KERNELS else variants[:1]:
            for cfg in _kernels(variant)[name][1]:
                if cfg is None:
                    block = group.NORM_BLOCK if "scale" not in name else group.SCALE_BLOCK
                    meta, warps, stages = {"BLOCK": block}, group.GROUP_NUM_WARPS, 2
                else:
                    meta, warps, stages = dict(cfg.kwargs), cfg.num_warps, cfg.num_stages
                for arch in archs:
                    out.append(Job(name, variant, meta, warps, stages, arch))
    return out


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_job(job: Job) -> Result:
    """Compile one kernel/config/target and read its resource usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    res = Result(job.kernel, job.variant, job.config, job.num_warps, job.num_stages, job.arch,
                 shared_limit=SHARED_LIMIT.get(job.arch, 0))
    try:
        fn, _ = _kernels(job.variant)[job.kernel]
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(f"{job.kernel} is {type(fn).__name__}, not a JITFunction: "
                               "unset TRITON_INTERPRET")
        spec = _signatures(job.variant)[job.kernel]
        names = [n for n, _ in spec]
        if names != list(fn.arg_names)[: len(names)]:
            raise RuntimeError(f"signature table out of date for {job.kernel}: {fn.arg_names}")
        signature, constants, attrs = {}, {}, {}
        for i, (name, desc) in enumerate(spec):
            if isinstance(desc, str):
                ty, _, hint = desc.partition(":")
                signature[name] = ty
                if hint == "16":
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "constexpr"
                constants[name] = desc
        for name, value in job.config.items():
            signature[name] = "constexpr"
            constants[name] = value
        missing = [a for a in fn.arg_names if a not in signature]
        if missing:
            raise RuntimeError(f"no signature entry for {missing}")
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants,
                                        attrs=attrs)
        target = GPUTarget("cuda", job.arch, 32)
        backend = triton.compiler.make_backend(target)
        options = backend.parse_options({"num_warps": job.num_warps,
                                         "num_stages": job.num_stages})
        compiled = triton.compile(src, target=target, options=options.__dict__)
        res.shared = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        res.registers = int(fields.get("REG", -1))
        res.stack = int(fields.get("STACK", -1))
        res.local = int(fields.get("LOCAL", -1))
        res.mma = sorted(set(re.findall(r"\b(HGMMA|HMMA|IMMA)\b", sass)))
        res.ok = True
    except Exception as exc:  # reported per job so one failure does not hide the others
        res.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
    return res


def run(archs: list[int], variants: list[str], processes: int = 2) -> list[Result]:
    """Compile every job, ``processes`` at a time; results in job order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile ahead of time")
    todo = jobs(archs, variants)
    if processes <= 1:
        return [compile_job(j) for j in todo]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(compile_job, todo))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    results = run(args.arch, args.variants, args.jobs)
    for r in results:
        if args.json:
            print(json.dumps(r.__dict__))
        else:
            status = "ok" if r.ok else f"FAILED {r.error}"
            print(f"{r.label():<90} regs={r.registers:>3} stack={r.stack} local={r.local} "
                  f"smem={r.shared:>6}/{r.shared_limit} mma={'+'.join(r.mma) or '-'} {status}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
