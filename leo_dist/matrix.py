"""Leo's 2-D rule on matrices whose rows are split across ranks.

The owning rank of a slice of a matrix knows only part of each row and column norm. It adds the
squares of its ``c`` to a buffer holding, for every matrix of the optimizer, R row sums then C
column sums; one all-reduce of that buffer (O(rows + cols) floats per matrix, every matrix in one
call) completes the norms, a second all-reduce of one float per matrix completes ``Σu²``. Where a
shard boundary falls does not matter: every element meets the same complete norms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import functional as F
from .packing import HEADER_BYTES, bit_slice, pack_mask, pack_signs, unpack_signs
from .partition import rows_cols_pieces

__all__ = ["MatrixSlice", "MatrixSteps", "add_row_col_sumsq_", "direction_", "NormLayout"]


@dataclass
class MatrixSlice:
    """A rank's part of one matrix: flat elements ``[start, end)`` of an (rows, cols) matrix."""

    matrix: int        # index of the matrix in the NormLayout
    rows: int
    cols: int
    start: int
    end: int


class NormLayout:
    """Where each matrix's row and column sums live in the shared norm buffer."""

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


def add_row_col_sumsq_(x: Tensor, sl: MatrixSlice, layout: NormLayout, buf: Tensor) -> None:
    """Add the squares of ``x`` (float32, the slice's ``c``) to its matrix's row/column sums in ``buf``."""
    rows, cols = layout.rows(buf, sl.matrix), layout.cols(buf, sl.matrix)
    for piece, r, c in rows_cols_pieces(x, sl.start, sl.cols):
        sq = piece.square()
        h, w = piece.shape
        rows[r : r + h] += sq.sum(dim=1)
        cols[c : c + w] += sq.sum(dim=0)


def direction_(x: Tensor, sl: MatrixSlice, layout: NormLayout, norms: Tensor, eps: float) -> Tensor:
    """Overwrite ``x`` (the slice's ``c``) with ``u = c/(r+eps) + c/(k+eps)`` from complete norms.

    Returns ``Σu²`` over the slice as a 0-d float32 tensor.
    """
    rows, cols = layout.rows(norms, sl.matrix), layout.cols(norms, sl.matrix)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for piece, r, c in rows_cols_pieces(x, sl.start, sl.cols):
        h, w = piece.shape
        u = piece / (rows[r : r + h, None] + eps) + piece / (cols[None, c : c + w] + eps)
        piece.copy_(u)
        total += u.square().sum()
    return total


class MatrixSteps:
    """Mixin for ``ShardedLeo``: the step of its matrix buckets (needs the optimizer's layout:
    ``_slices``, ``_norm_layout``, ``_matrix_numel``, ``_row_offsets``, ``_all_matrix_slots``,
    ``_update_error``, and ``_gather_signs``/``_apply``/``_group``)."""

    def _slice_views(self, bi: int, flat: Tensor):
        """``(slot, MatrixSlice, view of flat)`` for this rank's part of each matrix of bucket ``bi``;
        ``flat`` is a tensor over the rank's shard of the bucket."""
        lo = self._buckets[bi].shard_range(self._comm.rank)[0]
        for s, sl in self._slices.get(bi, []):
            base = s.offset + sl.start - lo
            yield s, sl, flat[base : base + sl.end - sl.start]

    def _matrix_step(self, matrix: list[int], shards: list[Tensor]) -> None:
        """Leo's 2-D rule on every matrix bucket; two small all-reduces for all of them together."""
        layout = self._norm_layout
        sumsq = torch.zeros(layout.size, dtype=torch.float32, device=self._device)
        cs: dict[int, Tensor] = {}
        for bi in matrix:
            beta1, beta2 = self._group(self._buckets[bi])["betas"]
            g, m = shards[bi], self._momentum[bi]
            cs[bi] = F.interpolate(m, g, beta1)
            F.update_momentum_(m, g, beta2)
            for _, sl, x in self._slice_views(bi, cs[bi]):
                add_row_col_sumsq_(x, sl, layout, sumsq)
        self._comm.all_reduce(sumsq)
        norms = sumsq.sqrt_()
        usq = torch.zeros(len(self._matrix_numel), dtype=torch.float32, device=self._device)
        for bi in matrix:
            eps = self._group(self._buckets[bi])["eps"]
            for _, sl, x in self._slice_views(bi, cs[bi]):
                usq[sl.matrix] += direction_(x, sl, layout, norms, eps)
        self._comm.all_reduce(usq)
        for bi in matrix:
            b, group = self._buckets[bi], self._group(self._buckets[bi])
            for _, sl, x in self._slice_views(bi, cs[bi]):
                x.mul_(F.leo_scale(usq[sl.matrix], self._matrix_numel[sl.matrix], group["align_const"], group["eps"]))
            cs[bi][b.valid_in_shard(self._comm.rank):] = 0
        if self.update_comm == "1bit":
            self._matrix_update_1bit(matrix, cs)
            return
        world = self._comm.world
        for bi in matrix:
            b, group = self._buckets[bi], self._group(self._buckets[bi])
            full = torch.empty(world * b.shard, dtype=b.dtype, device=self._device)
            self._comm.all_gather(full, cs.pop(bi).to(b.dtype))
            for s in b.slots:
                if s.numel:
                    upd = full[s.offset : s.offset + s.numel]
                    self._apply(s.param, lambda p: F.apply_update_(p, upd, group["lr"], group["weight_decay"]))

    def _matrix_update_1bit(self, matrix: list[int], updates: dict[int, Tensor]) -> None:
        """Send Leo's matrix updates as ``α_row·sign(e)`` with error feedback (see :mod:`leo_dist.onebit`).

        One all-reduce of R floats per matrix (all matrices together) completes the row means of
        ``|e|``; then per bucket one all-gather of bits, as for sign buckets.
        """
        rank = self._comm.rank
        rowsum = torch.zeros(self._row_layout_size, dtype=torch.float32, device=self._device)
        errors = {}
        for bi in matrix:
            e = self._update_error[bi]
            e.add_(updates.pop(bi))
            errors[bi] = e
            for _, sl, x in self._slice_views(bi, e):
                off = self._row_offsets[sl.matrix]
                for piece, r, _ in rows_cols_pieces(x, sl.start, sl.cols):
                    rowsum[off + r : off + r + piece.shape[0]] += piece.abs().sum(dim=1)
        self._comm.all_reduce(rowsum)
        for bi in matrix:
            b, group, e = self._buckets[bi], self._group(self._buckets[bi]), errors[bi]
            nb = b.shard // 8
            valid = b.valid_in_shard(rank)
            send = torch.zeros(nb + HEADER_BYTES, dtype=torch.uint8, device=self._device)
            pack_signs(e, send[:nb])
            is_zero = e == 0
            zeros = pack_mask(is_zero)
            send[nb] = is_zero[:valid].any().to(torch.uint8)
            # the owner keeps what α·sign(e) does not carry
            for _, sl, x in self._slice_views(bi, e):
                alpha = rowsum[self._row_offsets[sl.matrix] : self._row_offsets[sl.matrix] + sl.rows] / sl.cols
                for piece, r, _ in rows_cols_pieces(x, sl.start, sl.cols):
                    piece.sub_(torch.sign(piece) * alpha[r : r + piece.shape[0], None])
            bits, zbits = self._gather_signs(send, zeros)
            for s, sl_all in self._all_matrix_slots[bi]:
                j, (rows, cols) = sl_all, s.param.shape
                alpha = rowsum[self._row_offsets[j] : self._row_offsets[j] + rows] / cols
                sign = unpack_signs(bit_slice(bits, s.offset, s.numel), s.numel,
                                    None if zbits is None else bit_slice(zbits, s.offset, s.numel))
                upd = sign.view(rows, cols).mul_(alpha[:, None])
                self._apply(s.param, lambda p: F.apply_update_(p, upd, group["lr"], group["weight_decay"]))

