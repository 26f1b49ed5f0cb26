"""All-gather a bucket's per-rank shards at full width in the parameter dtype, block by block.

Leo's exact matrix updates (:class:`~leo_dist.matrix.MatrixStep`, ``update_comm="exact"``) and
AdamW groups' new parameter values (:class:`~leo_dist.adamw.AdamWStep`) travel this way: each rank
contributes its float32 shard ``[S]`` of a bucket, cast to the bucket's dtype, and every rank
receives every shard. The all-gather runs a block of columns at a time into one reused buffer of
about :data:`~leo_dist.matrix.BLOCK_ELEMS` elements, and each received block is handed to the
caller piece by piece (one piece per parameter and rank), so the transient is O(block), not
O(bucket). Bytes: ``S·itemsize`` in, ``W·S·itemsize`` out per rank and bucket, booked as one
``all_gather``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .collectives import Comm
from .partition import Bucket, Slot

__all__ = ["ExactGather"]


class ExactGather:
    """One reused all-gather buffer for the buckets of a :class:`~leo_dist.partition.Layout`.

    Args:
        comm: the optimizer's collectives.
        device: where the buffer lives.
        max_shard: the largest ``bucket.shard`` it will be asked to send (sizes the buffer).
        block: elements per rank and block (rounded down to a multiple of 8; at least 8).
    """

    def __init__(self, comm: Comm, device: torch.device, max_shard: int, block: int):
        self.comm, self.device, self.max_shard = comm, device, max_shard
        self.cols = max(8, block // comm.world // 8 * 8)
        self._buf: Tensor | None = None

    def send(self, b: Bucket, shard: Tensor, apply: Callable[[Slot, int, int, Tensor], None]) -> None:
        """All-gather this rank's ``shard`` (float32 ``[b.shard]``) of bucket ``b`` in ``b.dtype``.

        For every received piece calls ``apply(slot, lo, hi, values)``: ``values`` (``b.dtype``,
        ``hi − lo`` elements, a view of the reused buffer valid only during the call) are the
        gathered elements ``[lo, hi)`` of ``slot``'s flat parameter. Every rank receives the same
        bytes, so an ``apply`` that is a function of them keeps replicas bitwise identical.
        """
        world, comm, cols = self.comm.world, self.comm, self.cols
        esize = torch.finfo(b.dtype).bits // 8
        if self._buf is None or self._buf.numel() < world * min(cols, b.shard) * esize:
            self._buf = torch.empty(world * min(cols, self.max_shard) * esize, dtype=torch.uint8, device=self.device)
        if comm.distributed:
            moved = (world - 1) * b.shard * esize
            comm.book("all_gather", b.shard * esize, world * b.shard * esize, moved, moved)
        for j0 in range(0, b.shard, cols):
            j1 = min(b.shard, j0 + cols)
            c = j1 - j0
            full = self._buf.view(b.dtype)[: world * c].view(world, c)
            mine = shard[j0:j1] if b.dtype == torch.float32 else shard[j0:j1].to(b.dtype)
            comm.all_gather_uncounted(full.view(-1), mine)
            for r in range(world):
                lo, hi = r * b.shard + j0, r * b.shard + j1
                for s in b.slots:
                    a, e = max(lo, s.offset), min(hi, s.offset + s.numel)
                    if a < e:
                        apply(s, a - s.offset, e - s.offset, full[r, a - lo : e - lo])
