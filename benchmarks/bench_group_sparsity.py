"""Group sparsity: group norms, proximal step and the group-lasso penalty (issue 3).

Group layouts of real models, one group per Transformer block = {fc1.A, fc1.B, fc2.A, fc2.B}:
ViT-B/16 (12 blocks, K=768, N=3072) and the paper's face ViT (6 blocks, 512/2048), r = 8, 16.
Phases and providers:

* ``norms``       ‖θ_g‖₂ of every group
* ``norms+prox``  one proximal step θ_g ← θ_g·max(0, 1 − λ_g/‖θ_g‖) (norms, then scale in place)
* ``penalty``     Σ_g ‖θ_g‖₂ forward and backward (the authors' way of sparsifying)
* ``adamw+prox``  one optimizer step: AdamW on every tensor, then the proximal step

  ``gslora``   the fused ops of :mod:`gslora.functional` (``group_norms``, ``group_prox_``,
               ``group_lasso_penalty``), default backend (``cpu`` when gslora._C is built)
  ``gslora-grad`` (penalty only) the penalty's value and gradient in one fused op without
               autograd, ``add_group_lasso_grad_`` (what ``GroupSparsity.add_penalty_grad_`` runs)
  ``loop``     a per-tensor Python loop, as research code writes it (autograd for the penalty)
  ``foreach``  ``torch._foreach_norm`` + one ``index_add_`` per call + ``torch._foreach_mul_``
  ``floor``    one pass over the same number of bytes: a reduction of one flat tensor (norms),
               one in-place multiply (prox), a reduction plus an out-of-place multiply (penalty),
               one in-place multiply over θ, m and v, the bytes the step must write (adamw+prox)

  For ``adamw+prox``: ``gslora`` is ``ProxOptimizer(torch.optim.AdamW)``, which runs the fused
  ``adamw_prox_`` kernel; ``gslora-unfused`` the same with ``fused=False`` (AdamW's own step,
  then ``group_prox_``); ``loop`` AdamW (per tensor, torch's CPU default) + the loop prox;
  ``foreach`` AdamW(foreach=True) + the ``_foreach`` prox.

Ratios are against ``floor``. λ is 1e-4 of each group's initial norm, so groups shrink slowly
and never reach zero (a zero group would let a kernel skip work a trained model has).

    python -m benchmarks.bench_group_sparsity [--quick] [--device cuda]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .common import gslora_backend_name
from .harness import BenchRun, Case, base_parser, require_float_dtype, select_providers

BENCH = "group_sparsity"
PROVIDERS = ("gslora", "gslora-unfused", "gslora-grad", "loop", "foreach", "floor")
PHASES = ("norms", "norms+prox", "penalty", "adamw+prox")
LR = 1e-3  # AdamW's learning rate in the adamw+prox phase
LAYOUTS = {"vit_b16": (12, 768, 3072), "face_vit": (6, 512, 2048)}
FULL = {"layouts": ["vit_b16", "face_vit"], "r": [8, 16]}
QUICK = {"layouts": ["face_vit"], "r": [8]}


def make_groups(blocks: int, K: int, N: int, r: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> tuple[list[Tensor], list[int]]:
    """Per block fc1.A [r,K], fc1.B [N,r], fc2.A [r,N], fc2.B [K,r]; group id = block index."""
    gen = torch.Generator().manual_seed(seed)
    tensors, ids = [], []
    for b in range(blocks):
        for shape in ((r, K), (N, r), (r, N), (K, r)):
            tensors.append((torch.randn(*shape, generator=gen) * 0.02).to(device, dtype))
            ids.append(b)
    return tensors, ids


def _members(ids: Sequence[int], num_groups: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(num_groups)]
    for i, g in enumerate(ids):
        out[g].append(i)
    return out


# ------------------------------------------------------------------------------- loop (research code)

def loop_norms(tensors: Sequence[Tensor], members: Sequence[Sequence[int]]) -> Tensor:
    return torch.stack([torch.sqrt(sum(tensors[i].pow(2).sum() for i in m)) for m in members])


def loop_prox_(tensors: Sequence[Tensor], members: Sequence[Sequence[int]], lam: Tensor) -> Tensor:
    norms = []
    for g, m in enumerate(members):
        norm = torch.sqrt(sum(tensors[i].pow(2).sum() for i in m))
        factor = torch.clamp(1 - lam[g] / norm, min=0)
        for i in m:
            tensors[i].mul_(factor)
        norms.append(norm)
    return torch.stack(norms)


def loop_penalty(tensors: Sequence[Tensor], members: Sequence[Sequence[int]]) -> Tensor:
    return sum(torch.sqrt(sum(tensors[i].pow(2).sum() for i in m)) for m in members)


# ------------------------------------------------------------------------------- foreach

def foreach_norms(tensors: Sequence[Tensor], ids_t: Tensor, num_groups: int) -> Tensor:
    sq = torch.stack(torch._foreach_norm(list(tensors))).square()
    return torch.zeros(num_groups, dtype=sq.dtype, device=sq.device).index_add_(0, ids_t, sq).sqrt()


def foreach_prox_(tensors: Sequence[Tensor], ids_t: Tensor, num_groups: int, lam: Tensor) -> Tensor:
    norms = foreach_norms(tensors, ids_t, num_groups)
    factor = torch.where(norms > lam, 1 - lam / torch.where(norms > 0, norms, 1), 0)
    torch._foreach_mul_(list(tensors), list(factor[ids_t].unbind()))
    return norms


def foreach_penalty(tensors: Sequence[Tensor], ids_t: Tensor, num_groups: int) -> Tensor:
    sq = torch.stack(torch._foreach_norm(list(tensors))).square()
    return torch.zeros(num_groups, dtype=sq.dtype, device=sq.device).index_add(0, ids_t, sq).sqrt().sum()


# ------------------------------------------------------------------------------- cases

def build_cases(names: Sequence[str], tensors0: Sequence[Tensor], ids: Sequence[int],
                device: torch.device) -> dict[str, dict[str, Case]]:
    """{phase: {provider: Case}}; every provider works on its own copy of the tensors."""
    import gslora.functional as F

    G = max(ids) + 1
    members = _members(ids, G)
    ids_t = torch.tensor(list(ids), device=device)
    numel = sum(t.numel() for t in tensors0)
    lam = 1e-4 * loop_norms(tensors0, members)
    cases: dict[str, dict[str, Case]] = {p: {} for p in PHASES}

    def copies(requires_grad: bool = False) -> list[Tensor]:
        return [t.detach().clone().requires_grad_(requires_grad) for t in tensors0]

    # adamw+prox: α such that λ = LR·α is the smallest of the λ_g above (no group dies).
    alpha = float(lam.min()) / LR
    grads = [torch.randn_like(t) * 1e-3 for t in tensors0]

    def optimizer_step(name: str) -> Case:
        from gslora.sparsity import GroupSparsity, ProxOptimizer

        params = copies()
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if name.startswith("gslora"):
            sp = GroupSparsity([(f"g{g}", [params[i] for i in m]) for g, m in enumerate(members)])
            opt = ProxOptimizer(torch.optim.AdamW(list(sp.params), lr=LR), sp, alpha,
                                fused=name == "gslora")
            return Case(lambda _: opt.step())
        adamw = torch.optim.AdamW(params, lr=LR, foreach=name == "foreach")
        lam_step = torch.full((G,), LR * alpha, device=device)
        if name == "loop":
            return Case(lambda _: (adamw.step(), loop_prox_(params, members, lam_step)))
        return Case(lambda _: (adamw.step(), foreach_prox_(params, ids_t, G, lam_step)))

    for name in names:
        if name not in ("floor", "gslora-grad"):
            cases["adamw+prox"][name] = optimizer_step(name)
        if name == "gslora-unfused":
            continue
        ts, leaves = copies(), copies(True)

        def clear(leaves=leaves) -> None:
            for t in leaves:
                t.grad = None

        if name == "gslora":
            cases["norms"][name] = Case(lambda _, ts=ts: F.group_norms(ts, ids, G))
            cases["norms+prox"][name] = Case(lambda _, ts=ts: F.group_prox_(ts, ids, G, lam))
            cases["penalty"][name] = Case(
                lambda _, lv=leaves: F.group_lasso_penalty(lv, ids, G).backward(), setup=clear)
        elif name == "gslora-grad":
            cases["penalty"][name] = Case(
                lambda _, lv=leaves: F.add_group_lasso_grad_(lv, ids, G), setup=clear)
        elif name == "loop":
            cases["norms"][name] = Case(lambda _, ts=ts: loop_norms(ts, members))
            cases["norms+prox"][name] = Case(lambda _, ts=ts: loop_prox_(ts, members, lam))
            cases["penalty"][name] = Case(
                lambda _, lv=leaves: loop_penalty(lv, members).backward(), setup=clear)
        elif name == "foreach":
            cases["norms"][name] = Case(lambda _, ts=ts: foreach_norms(ts, ids_t, G))
            cases["norms+prox"][name] = Case(lambda _, ts=ts: foreach_prox_(ts, ids_t, G, lam))
            cases["penalty"][name] = Case(
                lambda _, lv=leaves: foreach_penalty(lv, ids_t, G).backward(), setup=clear)
        elif name == "floor":
            flat = torch.randn(numel, device=device, dtype=tensors0[0].dtype)
            cases["norms"][name] = Case(lambda _, f=flat: torch.linalg.vector_norm(f))
            # 1 - 1e-7 rounds to 1 - 2**-23 in fp32: a real multiply that barely moves values.
            cases["norms+prox"][name] = Case(lambda _, f=flat: f.mul_(1 - 1e-7))
            cases["penalty"][name] = Case(
                lambda _, f=flat: (torch.linalg.vector_norm(f), torch.mul(f, 0.5)))
            flat3 = torch.randn(3 * numel, device=device, dtype=tensors0[0].dtype)
            cases["adamw+prox"][name] = Case(lambda _, f=flat3: f.mul_(1 - 1e-7))
    return cases


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default=None, help=f"comma-separated subset of {list(LAYOUTS)}")
    p.add_argument("--r", default=None, help="LoRA ranks, e.g. 8,16")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16, fp16")
    args = p.parse_args(argv)
    grid = QUICK if args.quick else FULL
    layouts = args.layouts.split(",") if args.layouts else grid["layouts"]
    bad = [lay for lay in layouts if lay not in LAYOUTS]
    if bad:
        raise SystemExit(f"--layouts: unknown {bad}; known: {', '.join(LAYOUTS)}")
    try:
        ranks = [int(v) for v in args.r.split(",")] if args.r else grid["r"]
    except ValueError:
        raise SystemExit(f"--r expects comma-separated integers, got {args.r!r}") from None
    names = select_providers(args.providers, PROVIDERS)
    dtype = require_float_dtype(args.dtype)
    run = BenchRun(BENCH, args, dtype=dtype, argv=argv)
    dev = run.device
    info = {name: {"backend": gslora_backend_name(dev)} for name in ("gslora", "gslora-grad")}

    for layout in layouts:
        blocks, K, N = LAYOUTS[layout]
        for r in ranks:
            tensors, ids = make_groups(blocks, K, N, r, dev, dtype)
            numel = sum(t.numel() for t in tensors)
            params = {"layout": layout, "blocks": blocks, "K": K, "N": N, "r": r,
                      "tensors": len(tensors), "groups": blocks, "numel": numel,
                      "bytes": numel * tensors[0].element_size()}
            label = f"{layout} G={blocks} r={r}"
            cases = build_cases(names, tensors, ids, dev)
            for phase in PHASES:
                with torch.set_grad_enabled(phase == "penalty"):
                    res = run.compare(cases[phase])
                run.add(label, params, phase, res, baseline="floor" if "floor" in names else None,
                        provider_info=info)
    return run.finish(plot_x="bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
