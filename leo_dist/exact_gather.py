"""All-gather a bucket's per-rank shards at full width in the parameter dtype, block by block.

Leo's exact matrix updates (:class:`~leo_dist.matrix.MatrixStep`, ``update_comm="exact"``) and
AdamW groups' new parameter values (:class:`~leo_dist.adamw.AdamWStep`) travel this way: each rank
contributes its float32 shard ``[S]`` of a bucket, cast to the bucket's dtype, and every rank
receives every shard. The all-gather runs a block of columns at a time through two reused buffers
of about :data:`~leo_dist.matrix.BLOCK_ELEMS` elements (one block on the wire while the previous
one is used), and each received block is handed to the
caller piece by piece (one piece per parameter and rank), so the transient is O(block), not
O(bucket). Bytes: ``S·itemsize`` in, ``W·S·itemsize`` out per rank and bucket, booked as one
``all_gather``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .collectives import Comm, naming
from .partition import Bucket, Slot

__all__ = ["ExactGather"]


class ExactGather:
    """Two reused all-gather buffers for the buckets of a :class:`~leo_dist.partition.Layout`.

    Args:
        comm: the optimizer's collectives.
        device: where the buffers live.
        max_shard: the largest ``bucket.shard`` it will be asked to send (bounds the buffers for
            small layouts).
        block: elements per block on the wire, all ranks together (rounded down to a multiple of
            ``8·W``; at least 8 per rank).
    """

    def __init__(self, comm: Comm, device: torch.device, max_shard: int, block: int):
        self.comm, self.device, self.max_shard = comm, device, max_shard
        self.cols = max(8, block // comm.world // 8 * 8)
        self._buf: Tensor | None = None

    def send(self, b: Bucket, shard: Tensor, apply: Callable[[Slot, int, int, Tensor], None], label: str) -> None:
        """:meth:`send_all` of one bucket."""
        self.send_all([(b, shard, apply, label)])

    def send_all(self, items: list[tuple[Bucket, Tensor, Callable[[Slot, int, int, Tensor], None], str]],
                 wire: torch.dtype | None = None) -> None:
        """All-gather, for each ``(b, shard, apply, label)``, this rank's ``shard`` (float32 ``[b.shard]``)
        of bucket ``b`` in ``b.dtype`` (``wire``, when given, for float32 buckets: their values
        rounded to nearest, ``S·wire_size`` bytes in), block after block, block ``k+1`` on the wire while block
        ``k`` is handed out (two buffers of ``W·cols`` elements at 4 bytes each).

        For every received piece calls ``apply(slot, lo, hi, values)``: ``values`` (the wire dtype,
        ``hi − lo`` elements, a view of a reused buffer valid only during the call) are the
        gathered elements ``[lo, hi)`` of ``slot``'s flat parameter. Every rank receives the same
        bytes, so an ``apply`` that is a function of them keeps replicas bitwise identical.
        ``label`` (e.g. "bucket 3") names the bucket in a failing collective's error.
        """
        world, comm, cols = self.comm.world, self.comm, self.cols
        dtype_of = lambda b: wire if wire is not None and b.dtype == torch.float32 else b.dtype  # noqa: E731
        blocks = [(b, shard, apply, label, j0, min(b.shard, j0 + cols))
                  for b, shard, apply, label in items for j0 in range(0, b.shard, cols)]
        if not blocks:
            return
        if self._buf is None:
            self._buf = torch.empty(2, world * min(cols, self.max_shard) * 4, dtype=torch.uint8, device=self.device)
        for b, *_ in items:
            esize = torch.finfo(dtype_of(b)).bits // 8
            if comm.distributed:
                moved = (world - 1) * b.shard * esize
                comm.book("all_gather", b.shard * esize, world * b.shard * esize, moved, moved)

        def start(k: int):
            b, shard, _, label, j0, j1 = blocks[k]
            dtype = dtype_of(b)
            full = self._buf[k % 2].view(dtype)[: world * (j1 - j0)].view(world, j1 - j0)
            mine = shard[j0:j1].to(dtype)  # a copy only when the wire is not float32
            with naming(label):
                return full, mine, comm.all_gather_start(full.view(-1), mine, count=False)

        ahead = start(0)
        for k, (b, _, apply, label, j0, j1) in enumerate(blocks):
            full, _, work = ahead
            if k + 1 < len(blocks):
                ahead = start(k + 1)
            with naming(label):
                work.wait()
            for r in range(world):
                lo, hi = r * b.shard + j0, r * b.shard + j1
                for s in b.slots:
                    a, e = max(lo, s.offset), min(hi, s.offset + s.numel)
                    if a < e:
                        apply(s, a - s.offset, e - s.offset, full[r, a - lo : e - lo])
