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
  most ``SCALE_CHUNK`` elements, writing fresh outputs addressed the same way;
* ``adamw_prox_`` (the optimizer step fused with the prox) runs one program per group like the
  prox, over four tables of offsets (θ, grad, m, v): AdamW's update and the sums in one pass,
  then the shrink.

Non-contiguous tensors are copied to contiguous scratch (and copied back after the prox); the
contiguous path touches each element exactly once (norms) or twice (prox: read, write).
For sharded parameters (FSDP/TP) the prox must use globally reduced norms: call
``group_sq_norms`` on the local shards, all-reduce the [G] vector, then ``group_scale`` in place
(``group_scale_(…)``) with factor = max(0, 1 − λ/‖θ_g‖).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lora import INTERPRET, rounded, store_rounded

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
def _div_rn(a, b, ACC_DT: tl.constexpr):
    """a / b rounded to nearest like torch's division (fp32 '/' is approximate on the GPU)."""
    if ACC_DT == tl.float64:
        return a / b  # IEEE in fp64; tl.div_rn takes fp32 only
    return tl.div_rn(a, b)


@triton.jit
def _sqrt_rn(a, ACC_DT: tl.constexpr):
    """sqrt rounded to nearest like torch's (fp32 tl.sqrt is approximate on the GPU)."""
    if ACC_DT == tl.float64:
        return tl.sqrt(a)
    return tl.sqrt_rn(a)


@triton.jit
def _adamw_prox_kernel(p_ptr, g_ptr, m_ptr, v_ptr, table_ptr, starts_ptr, coef_ptr, thr_ptr,
                       norms_ptr, lam_ptr, n_rows, LERP_LOW: tl.constexpr,
                       ADAM_METRIC: tl.constexpr, ACC_DT: tl.constexpr,
                       EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    """torch.optim.AdamW's update of group g (θ, m, v read and written once) summing θ² and v of
    the stored values, then λ_g (divided by Adam's scale d_g with ADAM_METRIC) and the in-place
    shrink θ ← θ·max(0, 1 − λ_g/‖θ_g‖) while the group is in L2; the math and its evaluation
    order are those of the CPU kernel (csrc/group_ops_cpu.cpp, adamw_update_impl).

    table rows (one per tensor, grouped by g): offsets of θ, grad, m, v from their base pointers,
    then the element count; after the 5·n_rows row entries, the element count of every group.
    coef: decay, w1, β2, w2, √bc2, eps, step_size, bc2 in ACC_DT (see adamw_prox_impl).
    """
    g = tl.program_id(0)
    c0 = tl.load(starts_ptr + g).to(tl.int32)
    c1 = tl.load(starts_ptr + g + 1).to(tl.int32)
    decay = tl.load(coef_ptr + 0)
    w1 = tl.load(coef_ptr + 1)
    beta2 = tl.load(coef_ptr + 2)
    w2 = tl.load(coef_ptr + 3)
    bc2_sqrt = tl.load(coef_ptr + 4)
    eps = tl.load(coef_ptr + 5)
    step_size = tl.load(coef_ptr + 6)
    bc2 = tl.load(coef_ptr + 7)
    acc_sq = tl.zeros((BLOCK,), dtype=ACC_DT)
    acc_v = tl.zeros((BLOCK,), dtype=ACC_DT)
    for c in range(c0, c1):
        p_off = tl.load(table_ptr + c)
        g_off = tl.load(table_ptr + n_rows + c)
        m_off = tl.load(table_ptr + 2 * n_rows + c)
        v_off = tl.load(table_ptr + 3 * n_rows + c)
        n = tl.load(table_ptr + 4 * n_rows + c)
        for i in range(0, n, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            live = idx < n
            gi = tl.load(g_ptr + g_off + idx, mask=live, other=0.0).to(ACC_DT)
            m0 = tl.load(m_ptr + m_off + idx, mask=live, other=0.0).to(ACC_DT)
            v0 = tl.load(v_ptr + v_off + idx, mask=live, other=0.0).to(ACC_DT)
            p0 = tl.load(p_ptr + p_off + idx, mask=live, other=0.0).to(ACC_DT)
            # torch's lerp switches formulas at weight 0.5 for accuracy.
            if LERP_LOW:
                mi = m0 + w1 * (gi - m0)
            else:
                mi = gi - (gi - m0) * (1.0 - w1)
            vi = v0 * beta2 + w2 * gi * gi
            denom = _div_rn(_sqrt_rn(vi, ACC_DT), bc2_sqrt, ACC_DT) + eps
            pi = p0 * decay + (-step_size) * _div_rn(mi, denom, ACC_DT)
            # The sums below must be over the values as stored.
            ps = rounded(pi, p_ptr, EMULATE_RNE)
            vs = rounded(vi, v_ptr, EMULATE_RNE)
            tl.store(p_ptr + p_off + idx, ps, mask=live)
            tl.store(m_ptr + m_off + idx, rounded(mi, m_ptr, EMULATE_RNE), mask=live)
            tl.store(v_ptr + v_off + idx, vs, mask=live)
            pr = ps.to(ACC_DT)
            # Masked lanes: 0/0 when eps = 0; keep them out of the sums.
            acc_sq += tl.where(live, pr * pr, 0.0)
            acc_v += tl.where(live, vs.to(ACC_DT), 0.0)
    norm = _sqrt_rn(tl.sum(acc_sq, axis=0), ACC_DT)
    lam = tl.load(thr_ptr + g).to(ACC_DT)
    if ADAM_METRIC:
        size = tl.load(table_ptr + 5 * n_rows + g).to(ACC_DT)
        # An empty group has no scale (0/0 on the CPU): its λ stays.
        d = _sqrt_rn(_div_rn(tl.sum(acc_v, axis=0), tl.where(size > 0, size, 1.0) * bc2,
                             ACC_DT), ACC_DT) + eps
        ok = (size > 0) & (d > 0) & (d < float("inf"))
        lam = tl.where(ok, lam / tl.where(ok, d, 1.0), lam)
    safe = tl.where(norm > 0, norm, 1.0)
    factor = tl.where(norm > lam, 1.0 - lam / safe, 0.0)
    tl.store(norms_ptr + g, norm)
    tl.store(lam_ptr + g, lam)
    tl.debug_barrier()  # the group's θ written above, read back below by other threads
    for c in range(c0, c1):
        p_off = tl.load(table_ptr + c)
        n = tl.load(table_ptr + 4 * n_rows + c)
        for i in range(0, n, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            ptrs = p_ptr + p_off + idx
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


def adamw_prox_impl(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                    exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], ids: list[int],
                    num_groups: int, thresholds: Tensor, lr: float, beta1: float, beta2: float,
                    eps: float, weight_decay: float, adam_metric: bool) -> tuple[Tensor, Tensor]:
    """AdamW + group prox in place, one launch (validated arguments, equal step counts);
    returns the norms after the AdamW update and the thresholds used, [num_groups] each."""
    work = [_contiguous(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    dtype, device = work[0][0].dtype, work[0][0].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    step = float(state_steps[0]) + 1
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    # torch.optim.AdamW's constants, each rounded once to the accumulate dtype (as the CPU
    # kernel does). In a tensor, not as kernel arguments: Triton passes Python floats as fp32.
    coefs = torch.tensor([1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, math.sqrt(bc2), eps,
                          lr / bc1, bc2], dtype=acc)
    if device.type == "cuda":  # a pageable copy would wait for the GPU queue to drain
        coefs = coefs.pin_memory().to(device, non_blocking=True)
    norms = torch.empty(num_groups, device=device, dtype=acc)
    lam_used = torch.empty(num_groups, device=device, dtype=acc)
    live = sorted((g, i) for i, g in enumerate(ids) if work[0][i].numel() > 0)
    if not live:  # every group empty: nothing to update, norm 0 and λ as given everywhere
        norms.zero_()
        lam_used.copy_(thresholds)
    else:
        bases = [ts[live[0][1]] for ts in work]
        n = len(live)

        def build() -> list[int]:
            rows = []
            for ts, base in zip(work, bases, strict=True):
                rows += _rel_offsets([ts[i] for _, i in live], base)
            rows += [work[0][i].numel() for _, i in live]
            counts, sizes = [0] * num_groups, [0] * num_groups
            for g, i in live:
                counts[g] += 1
                sizes[g] += work[0][i].numel()
            starts = [0]
            for cnt in counts:
                starts.append(starts[-1] + cnt)
            return rows + sizes + starts

        key = ("adamw", str(device), num_groups,
               tuple((g, *(ts[i].data_ptr() for ts in work), work[0][i].numel()) for g, i in live))
        packed = _device_table(key, build, device)
        thr = thresholds.to(device=device, dtype=acc).contiguous()
        _adamw_prox_kernel[(num_groups,)](
            *bases, packed, packed[5 * n + num_groups:], coefs, thr, norms, lam_used, n,
            LERP_LOW=(1 - beta1) < 0.5, ADAM_METRIC=bool(adam_metric), ACC_DT=_acc_tl(dtype),
            EMULATE_RNE=_emulate_rne(dtype), BLOCK=NORM_BLOCK, num_warps=GROUP_NUM_WARPS,
        )
    with torch.no_grad():
        for dst, src in zip((params, exp_avgs, exp_avg_sqs), (work[0], work[2], work[3]),
                            strict=True):
            for t, w in zip(dst, src, strict=True):
                if w is not t:
                    t.copy_(w)
        for s in state_steps:
            s += 1
    return norms, lam_used
