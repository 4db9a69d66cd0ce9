"""DTensor parameters (FSDP2's ``fully_shard``) as the group sparsity and the adapter files meet
them.

``torch.distributed.tensor`` is never imported here: a tensor can only be a DTensor once that
module has been imported, so gslora's own import stays torch and numpy.
"""

from __future__ import annotations

import sys

from torch import Tensor


def dtensor_type() -> type | None:
    """torch's DTensor class, or None while ``torch.distributed.tensor`` is not imported."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t: Tensor) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def whole(t: Tensor) -> Tensor:
    """``t`` detached; a DTensor's shards gathered into the whole tensor (a collective: every rank
    of its mesh must call it)."""
    return t.full_tensor().detach() if is_dtensor(t) else t.detach()


def copy_whole_(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` for a whole tensor ``src`` that every rank holds: into a DTensor, each
    rank copies its own shard of ``src`` (no communication). Call under ``torch.no_grad()``."""
    if not is_dtensor(dst):
        dst.copy_(src)
        return
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements,
                             src_data_rank=None)  # every rank slices its own part
    dst.to_local().copy_(mine.to_local())
