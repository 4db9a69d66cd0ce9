"""Ahead-of-time compile of every Triton kernel and autotune config for sm_80 and sm_90 (bf16 and fp32).

No GPU needed: ``gslora.kernels.aot`` compiles each kernel x config x target to cubin in a
subprocess (conftest sets TRITON_INTERPRET=1 for this process, which turns the kernels into
interpreter wrappers; the subprocess runs without it) and reads registers, stack, local memory
and shared memory with triton's bundled cuobjdump. Asserts: it compiles, no local-memory spills,
shared memory within the target's limit, tensor-core instructions in the matmul kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "gslora.kernels.aot", "--arch", "80", "90", "--jobs", "2", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no results from the AOT compile:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return [json.loads(ln) for ln in lines]


def _label(r):
    return f"sm_{r['arch']} {r['kernel']} {r['config']} w{r['num_warps']}s{r['num_stages']}"


def test_every_kernel_and_config_compiled(aot_results):
    from gslora.kernels import aot

    kernels = {r["kernel"] for r in aot_results}
    assert kernels == {
        "_lora_proj_kernel", "_lora_gemm_kernel", "_lora_wgrad_kernel",
        "_group_sq_norms_kernel", "_group_prox_kernel", "_group_scale_kernel",
        "_adamw_prox_kernel",
    }
    assert len(aot_results) == len(aot.jobs([80, 90], aot.DEFAULT_VARIANTS))
    assert {r["variant"] for r in aot_results} == set(aot.DEFAULT_VARIANTS)
    assert {r["arch"] for r in aot_results} == {80, 90}
    failed = [f"{_label(r)}: {r['error']}" for r in aot_results if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_no_spills(aot_results):
    spilled = [f"{_label(r)}: regs={r['registers']} stack={r['stack']} local={r['local']}"
               for r in aot_results if r["ok"] and (r["local"] != 0 or r["stack"] != 0)]
    assert not spilled, "\n".join(spilled)


def test_shared_memory_within_target_limit(aot_results):
    too_big = [f"{_label(r)}: {r['shared']} > {r['shared_limit']}"
               for r in aot_results if r["ok"] and not 0 <= r["shared"] <= r["shared_limit"]]
    assert not too_big, "\n".join(too_big)


def test_matmul_kernels_use_tensor_cores(aot_results):
    from gslora.kernels.aot import MATMUL_KERNELS

    missing = []
    for r in aot_results:
        # fp32 inputs use exact fp32 FMA products by design (no TF32), so no tensor cores there.
        if not r["ok"] or r["kernel"] not in MATMUL_KERNELS or r["variant"] == "fp32":
            continue
        want = {"HMMA"} if r["arch"] == 80 else {"HMMA", "HGMMA"}
        if not want & set(r["mma"]):
            missing.append(f"{_label(r)}: {r['mma']}")
    assert not missing, "\n".join(missing)
