"""Flat buckets of parameters and the contiguous range of each bucket that each rank owns.

A bucket holds parameters of one param group, one update kind ("sign": 1-bit updates; "matrix":
Leo's 2-D rule) and one dtype, laid end to end in parameter order (no gaps between them) and
padded at the end to a multiple of ``8·W`` elements. Rank ``r`` owns elements
``[r·S, (r+1)·S)`` with ``S = padded / W``, a multiple of 8, so every rank's packed bits are whole
bytes. A boundary may fall anywhere inside a parameter, inside a matrix row, and a rank may own
nothing but padding.

Buckets are filled in reverse parameter order, the order in which backward usually produces
gradients, so that with the DDP hook the first bucket to complete is the first to be sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Slot", "Bucket", "build_buckets", "rows_cols_pieces"]


@dataclass
class Slot:
    """One parameter's place in a bucket."""

    param: Tensor
    index: int          # position of the parameter in the optimizer (groups in order, as state_dict numbers them)
    offset: int         # first element in the bucket
    numel: int

    def owned(self, lo: int, hi: int) -> tuple[int, int]:
        """The part of this parameter inside bucket range ``[lo, hi)``, in the parameter's flat
        indices; ``(0, 0)`` when they do not meet."""
        a, b = max(lo, self.offset), min(hi, self.offset + self.numel)
        return (a - self.offset, b - self.offset) if a < b else (0, 0)


@dataclass
class Bucket:
    group_index: int
    kind: str                    # "sign" | "matrix"
    dtype: torch.dtype
    slots: list[Slot] = field(default_factory=list)
    numel: int = 0               # elements used by parameters
    padded: int = 0              # numel rounded up to a multiple of 8·world_size
    shard: int = 0               # padded // world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard, (rank + 1) * self.shard

    def valid_in_shard(self, rank: int) -> int:
        """Elements of rank's shard that belong to parameters (the rest is end padding)."""
        return max(0, min(self.shard, self.numel - rank * self.shard))


def build_buckets(groups: list[list[tuple[int, Tensor, str]]], world_size: int, bucket_bytes: int) -> list[Bucket]:
    """Lay out parameters in buckets.

    ``groups[g]`` lists ``(index, param, kind)`` for param group ``g``. A bucket closes when adding
    the next parameter would exceed ``bucket_bytes`` (counted at 4 bytes per element, the fp32
    gradient); a parameter larger than that gets a bucket of its own.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cap = max(1, bucket_bytes // 4)
    buckets: list[Bucket] = []
    for g, entries in enumerate(groups):
        open_: dict[tuple[str, torch.dtype], Bucket] = {}
        for index, p, kind in reversed(entries):
            key = (kind, p.dtype)
            b = open_.get(key)
            if b is not None and b.numel + p.numel() > cap and b.slots:
                buckets.append(b)
                b = None
            if b is None:
                b = open_[key] = Bucket(group_index=g, kind=kind, dtype=p.dtype)
            b.slots.append(Slot(param=p, index=index, offset=b.numel, numel=p.numel()))
            b.numel += p.numel()
        buckets.extend(b for b in open_.values() if b.slots)
    quantum = 8 * world_size
    for b in buckets:
        b.padded = max(quantum, -(-b.numel // quantum) * quantum)
        b.shard = b.padded // world_size
    return buckets


def rows_cols_pieces(x: Tensor, start: int, cols: int):
    """Split a flat slice of a row-major matrix into 2-D pieces.

    ``x`` holds flat elements ``[start, start + x.numel())`` of a matrix with ``cols`` columns.
    Yields ``(piece, row, col)``: ``piece`` a 2-D view of ``x`` (a partial first row, a block of
    whole rows, a partial last row), whose element ``[i, j]`` is matrix element
    ``[row + i, col + j]``.
    """
    n, pos = x.numel(), 0
    head_col = start % cols
    if head_col and n:
        h = min(cols - head_col, n)
        yield x[:h].view(1, h), start // cols, head_col
        pos = h
    full = (n - pos) // cols
    if full:
        yield x[pos : pos + full * cols].view(full, cols), (start + pos) // cols, 0
        pos += full * cols
    if pos < n:
        yield x[pos:].view(1, n - pos), (start + pos) // cols, 0
