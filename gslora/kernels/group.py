"""Triton kernels and launchers for the group-sparse ops: squared norms, scale, proximal step.

Every op is one launch over all groups, driven by a flat table built on the host:

* the tensors are addressed relative to one base pointer (the first tensor): row i of the table
  holds the element offset ``(data_ptr_i - data_ptr_base) / itemsize`` (int64, may be negative)
  and the element count, so any number of tensors is reached from a single pointer argument;
* ``group_sq_norms`` and ``group_prox_`` run one program per group over the group's rows (a CSR
  table ``starts[G + 1]``): the sum of squares is deterministic (no atomics), and the prox scales
  the group in place right after its norm is known, while the data is still in L1/L2. LoRA groups
  are small (ViT-B block, r = 16: 123 k elements), so one program per group streams them in a few
  microseconds; the launch dominates;
* ``group_scale`` (the penalty's backward) has no reduction and runs one program per chunk of at
  most ``SCALE_CHUNK`` elements, writing fresh outputs addressed the same way.

Non-contiguous tensors are copied to contiguous scratch (and copied back after the prox); the
contiguous path touches each element exactly once (norms) or twice (prox: read, write).
For sharded parameters (FSDP/TP) the prox must use globally reduced norms: call
``group_sq_norms`` on the local shards, all-reduce the [G] vector, then ``group_scale`` in place
(``group_scale_(…)``) with factor = max(0, 1 − λ/‖θ_g‖).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lora import INTERPRET, store_rounded

NORM_BLOCK = 1024 if not INTERPRET else 4096
SCALE_BLOCK = 1024 if not INTERPRET else 4096
SCALE_CHUNK = 1 << 16
GROUP_NUM_WARPS = 4


@triton.jit
def _sum_squares(base_ptr, offs_ptr, lens_ptr, c0, c1, ACC_DT: tl.constexpr, BLOCK: tl.constexpr):
    """Σ of squares over chunks c0..c1-1 (one group), in ACC_DT; shared by norms and prox."""
    acc = tl.zeros((BLOCK,), dtype=ACC_DT)
    for c in range(c0, c1):
        off = tl.load(offs_ptr + c)
        n = tl.load(lens_ptr + c)
        for i in range(0, n, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            v = tl.load(base_ptr + off + idx, mask=idx < n, other=0.0).to(ACC_DT)
            acc += v * v
    return tl.sum(acc, axis=0)


@triton.jit
def _group_sq_norms_kernel(base_ptr, offs_ptr, lens_ptr, starts_ptr, out_ptr,
                           ACC_DT: tl.constexpr, BLOCK: tl.constexpr):
    """out[g] = Σ over rows c of group g of Σ base[offs[c] + i]², i < lens[c]."""
    g = tl.program_id(0)
    c0 = tl.load(starts_ptr + g).to(tl.int32)
    c1 = tl.load(starts_ptr + g + 1).to(tl.int32)
    tl.store(out_ptr + g, _sum_squares(base_ptr, offs_ptr, lens_ptr, c0, c1, ACC_DT, BLOCK))


@triton.jit
def _group_prox_kernel(base_ptr, offs_ptr, lens_ptr, starts_ptr, thr_ptr, norms_ptr,
                       ACC_DT: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    """θ_g ← θ_g · max(0, 1 − λ_g/‖θ_g‖) in place; norms[g] = ‖θ_g‖ before the step."""
    g = tl.program_id(0)
    c0 = tl.load(starts_ptr + g).to(tl.int32)
    c1 = tl.load(starts_ptr + g + 1).to(tl.int32)
    norm = tl.sqrt(_sum_squares(base_ptr, offs_ptr, lens_ptr, c0, c1, ACC_DT, BLOCK))
    lam = tl.load(thr_ptr + g).to(ACC_DT)
    # Same expression as the reference: exact 0 when ‖θ_g‖ ≤ λ_g (also for a zero group).
    safe = tl.where(norm > 0, norm, 1.0)
    factor = tl.where(norm > lam, 1.0 - lam / safe, 0.0)
    tl.store(norms_ptr + g, norm)
    for c in range(c0, c1):
        off = tl.load(offs_ptr + c)
        n = tl.load(lens_ptr + c)
        for i in range(0, n, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            ptrs = base_ptr + off + idx
            v = tl.load(ptrs, mask=idx < n, other=0.0)
            store_rounded(ptrs, v.to(ACC_DT) * factor, idx < n, EMULATE_RNE)


@triton.jit
def _group_scale_kernel(in_ptr, out_ptr, in_offs_ptr, out_offs_ptr, lens_ptr, gids_ptr,
                        coeffs_ptr, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = in[row] · coeffs[gid[row]] for one table row (a chunk of one tensor)."""
    row = tl.program_id(0)
    in_off = tl.load(in_offs_ptr + row)
    out_off = tl.load(out_offs_ptr + row)
    n = tl.load(lens_ptr + row)
    c = tl.load(coeffs_ptr + tl.load(gids_ptr + row))
    for i in range(0, n, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        v = tl.load(in_ptr + in_off + idx, mask=idx < n, other=0.0)
        store_rounded(out_ptr + out_off + idx, v.to(c.dtype) * c, idx < n, EMULATE_RNE)


def _emulate_rne(dtype: torch.dtype) -> bool:
    # The interpreter truncates fp32 → bf16; the GPU rounds to nearest even (see lora.to_bf16_rne).
    return INTERPRET and dtype == torch.bfloat16


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rel_offsets(tensors: Sequence[Tensor], base: Tensor) -> list[int]:
    item = base.element_size()
    out = []
    for t in tensors:
        delta = t.data_ptr() - base.data_ptr()
        if delta % item:
            # Cannot happen for tensors of one dtype from torch's allocators; fail loudly if it does.
            raise RuntimeError("gslora.kernels: tensor storage is not aligned to its element size")
        out.append(delta // item)
    return out


def _contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


# Device copies of the tables, keyed by the tensors' addresses and sizes. Parameters keep their
# storage across steps, so after the first step an op launches without any host→device copy
# (a pageable copy also serialises the host with the GPU queue). The table holds only addresses
# and sizes, so a key hit is correct whatever tensor now lives there. Bounded LRU.
_TABLES: OrderedDict[tuple, Tensor] = OrderedDict()
_TABLES_MAX = 64


def _device_table(key: tuple, build, device: torch.device) -> Tensor:
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(build(), dtype=torch.int64).to(device, non_blocking=True)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def _group_table(work: list[Tensor], ids: list[int], num_groups: int):
    """(base, offs int64, lens int64, starts int64 [G+1]) on the tensors' device, rows by group."""
    live = [(g, t) for g, t in zip(ids, work, strict=True) if t.numel() > 0]
    base = live[0][1] if live else work[0]
    live.sort(key=lambda gt: gt[0])  # stable: keeps the callers' order inside a group
    n = len(live)

    def build() -> list[int]:
        offs = _rel_offsets([t for _, t in live], base)
        lens = [t.numel() for _, t in live]
        counts = [0] * num_groups
        for g, _ in live:
            counts[g] += 1
        starts = [0]
        for cnt in counts:
            starts.append(starts[-1] + cnt)
        return offs + lens + starts

    key = ("groups", str(base.device), num_groups,
           tuple((g, t.data_ptr(), t.numel()) for g, t in live))
    packed = _device_table(key, build, base.device)
    return base, packed[:n], packed[n:2 * n], packed[2 * n:]


def group_sq_norms_impl(tensors: Sequence[Tensor], ids: list[int], num_groups: int) -> Tensor:
    """[num_groups] Σ‖θ_i‖² per group in the accumulate dtype; one launch."""
    work = _contiguous([t.detach() for t in tensors])
    acc = torch.float64 if work[0].dtype == torch.float64 else torch.float32
    out = torch.empty(num_groups, device=work[0].device, dtype=acc)
    base, offs, lens, starts = _group_table(work, ids, num_groups)
    _group_sq_norms_kernel[(num_groups,)](
        base, offs, lens, starts, out, ACC_DT=_acc_tl(work[0].dtype), BLOCK=NORM_BLOCK,
        num_warps=GROUP_NUM_WARPS,
    )
    return out


def group_prox_impl(tensors: Sequence[Tensor], ids: list[int], num_groups: int,
                    thresholds: Tensor) -> Tensor:
    """In-place block soft-thresholding of every group; returns the norms before (one launch)."""
    work = _contiguous(tensors)
    acc = torch.float64 if work[0].dtype == torch.float64 else torch.float32
    norms = torch.empty(num_groups, device=work[0].device, dtype=acc)
    thr = thresholds.to(device=work[0].device, dtype=acc).contiguous()
    base, offs, lens, starts = _group_table(work, ids, num_groups)
    with torch.no_grad():
        _group_prox_kernel[(num_groups,)](
            base, offs, lens, starts, thr, norms, ACC_DT=_acc_tl(work[0].dtype),
            EMULATE_RNE=_emulate_rne(work[0].dtype), BLOCK=NORM_BLOCK, num_warps=GROUP_NUM_WARPS,
        )
        for t, w in zip(tensors, work, strict=True):
            if w is not t:
                t.copy_(w)
    return norms


def group_scale_impl(tensors: Sequence[Tensor], ids: list[int], coeffs: Tensor,
                     out: Sequence[Tensor] | None = None) -> list[Tensor]:
    """out_i = θ_i · coeffs[g(i)] computed in coeffs.dtype, one launch.

    Without ``out`` the results are fresh tensors (never views of one buffer: custom-op outputs
    may not alias each other); with ``out`` they are written into those tensors.
    """
    work = _contiguous([t.detach() for t in tensors])
    coeffs = coeffs.contiguous()
    live = [i for i, w in enumerate(work) if w.numel() > 0]
    if out is None:
        outs = [torch.empty_like(w) for w in work]
        targets = outs
    else:
        outs = list(out)
        targets = _contiguous(outs)
    if live:
        in_base, out_base = work[live[0]], targets[live[0]]
        chunks = [(i, start) for i in live for start in range(0, work[i].numel(), SCALE_CHUNK)]
        n = len(chunks)

        def build() -> list[int]:
            in_offs = dict(zip(live, _rel_offsets([work[i] for i in live], in_base), strict=True))
            out_offs = dict(zip(live, _rel_offsets([targets[i] for i in live], out_base),
                                strict=True))
            rows_in = [in_offs[i] + st for i, st in chunks]
            rows_out = [out_offs[i] + st for i, st in chunks]
            rows_len = [min(SCALE_CHUNK, work[i].numel() - st) for i, st in chunks]
            rows_gid = [ids[i] for i, _ in chunks]
            return rows_in + rows_out + rows_len + rows_gid

        # Output addresses are part of the key; in a training loop the caching allocator tends
        # to hand out the same blocks every step, so the table is usually reused.
        key = ("scale", str(in_base.device), tuple(ids),
               tuple((w.data_ptr(), w.numel()) for w in work),
               tuple(t.data_ptr() for t in targets))
        packed = _device_table(key, build, in_base.device)
        _group_scale_kernel[(n,)](
            in_base, out_base, packed[:n], packed[n:2 * n], packed[2 * n:3 * n],
            packed[3 * n:], coeffs, EMULATE_RNE=_emulate_rne(in_base.dtype), BLOCK=SCALE_BLOCK,
            num_warps=GROUP_NUM_WARPS,
        )
    if out is not None:
        with torch.no_grad():
            for o, tgt in zip(outs, targets, strict=True):
                if tgt is not o:
                    o.copy_(tgt)
    return outs
