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

from .partition import rows_cols_pieces

__all__ = ["MatrixSlice", "add_row_col_sumsq_", "direction_", "NormLayout"]


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
