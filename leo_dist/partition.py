"""Flat buckets of parameters and the contiguous range of each bucket that each rank owns.

A bucket holds parameters of one param group, one update kind ("sign": 1-bit updates; "matrix":
Leo's 2-D rule; "adamw": AdamW groups, new values sent at full width) and one dtype, laid end to end in parameter order (no gaps between them) and
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

__all__ = ["Slot", "Bucket", "build_buckets", "rows_cols_pieces", "MatrixSlice", "NormLayout", "Layout"]


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
    kind: str                    # "sign" | "matrix" | "adamw"
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


@dataclass
class MatrixSlice:
    """A rank's part of one matrix: flat elements ``[start, end)`` of an (rows, cols) matrix."""

    matrix: int        # index of the matrix in the NormLayout
    rows: int
    cols: int
    start: int
    end: int


class NormLayout:
    """Where each matrix's row and column sums live in one flat norm buffer: R row sums, then C
    column sums, matrix after matrix (``size`` floats in all)."""

    def __init__(self, shapes: list[tuple[int, int]]):
        self.shapes = shapes
        self.offsets = []
        pos = 0
        for r, c in shapes:
            self.offsets.append(pos)
            pos += r + c
        self.size = pos

    def rows(self, buf: Tensor, j: int) -> Tensor:
        r, _ = self.shapes[j]
        return buf[self.offsets[j] : self.offsets[j] + r]

    def cols(self, buf: Tensor, j: int) -> Tensor:
        r, c = self.shapes[j]
        return buf[self.offsets[j] + r : self.offsets[j] + r + c]


class Layout:
    """Where every parameter of a sharded optimizer lives; fixed at construction, the same on all ranks.

    ``groups[g]`` lists ``(param, kind)`` for param group ``g`` (kind "sign", "matrix", "adamw", or None for a
    parameter the optimizer does not hold, which keeps its number but gets no place); ``rank``
    is this rank's index among ``world``.

    Attributes:
        buckets: the buckets (see :func:`build_buckets`).
        where: ``id(param) -> (bucket index, Slot)``.
        norms: the :class:`NormLayout` of every matrix, in bucket order.
        matrix_numel, row_offsets, row_size: per matrix its size and the offset of its rows in a
            buffer of ``row_size`` floats holding one value per row of every matrix.
        matrix_slots: ``bucket index -> [(Slot, matrix index)]`` for every matrix of a matrix bucket.
    """

    def __init__(self, groups: list[list[tuple[Tensor, str | None]]], world: int, rank: int, bucket_bytes: int):
        entries, index = [], 0
        for rows in groups:
            # kind None: a parameter that is not held (requires_grad=False), still numbered
            entries.append([(index + k, p, kind) for k, (p, kind) in enumerate(rows) if kind is not None])
            index += len(rows)
        self.world, self.rank = world, rank
        self.buckets: list[Bucket] = build_buckets(entries, world, bucket_bytes)
        self.where: dict[int, tuple[int, Slot]] = {
            id(s.param): (bi, s) for bi, b in enumerate(self.buckets) for s in b.slots}
        shapes: list[tuple[int, int]] = []
        self.matrix_slots: dict[int, list[tuple[Slot, int]]] = {}
        self._owned: dict[int, list[tuple[Slot, MatrixSlice]]] = {}
        for bi, b in enumerate(self.buckets):
            if b.kind != "matrix":
                continue
            lo, hi = b.shard_range(rank)
            self.matrix_slots[bi] = []
            for s in b.slots:
                r, c = s.param.shape
                j = len(shapes)
                shapes.append((r, c))
                self.matrix_slots[bi].append((s, j))
                a, e = s.owned(lo, hi)
                if a < e:
                    self._owned.setdefault(bi, []).append((s, MatrixSlice(j, r, c, a, e)))
        self.norms = NormLayout(shapes)
        self.matrix_numel = [r * c for r, c in shapes]
        self.row_offsets = [sum(r for r, _ in shapes[:j]) for j in range(len(shapes))]
        self.row_size = sum(r for r, _ in shapes)

    def kind_buckets(self, kind: str) -> list[int]:
        """Indices of the buckets of one kind ("sign", "matrix" or "adamw"), in order."""
        return [bi for bi, b in enumerate(self.buckets) if b.kind == kind]

    def owned_views(self, bi: int, flat: Tensor):
        """``(slot, MatrixSlice, view)`` for this rank's part of each matrix of bucket ``bi``;
        ``flat`` is a tensor over this rank's shard of the bucket (``bucket.shard`` elements)."""
        lo = self.buckets[bi].shard_range(self.rank)[0]
        for s, sl in self._owned.get(bi, []):
            base = s.offset + sl.start - lo
            yield s, sl, flat[base : base + sl.end - sl.start]

    def shard_views(self, bi: int, flat: Tensor):
        """``(slot, (a, e), view)``: each parameter's part ``[a, e)`` (flat indices) of this rank's
        shard ``flat`` of bucket ``bi``; parameters outside the shard get an empty view."""
        b = self.buckets[bi]
        lo, hi = b.shard_range(self.rank)
        for s in b.slots:
            a, e = s.owned(lo, hi)
            base = s.offset + a - lo
            yield s, (a, e), flat[base : base + (e - a)]
