"""Phases 2–3 of a sharded step for Leo's matrices, whose rows may be split across ranks.

The owning rank of a slice of a matrix knows only part of each row and column norm. It adds the
squares of its ``c`` to a buffer holding, for every matrix of the optimizer, R row sums then C
column sums; one all-reduce of that buffer (O(rows + cols) floats per matrix, every matrix in one
call) completes the norms, a second all-reduce of one float per matrix completes ``Σu²``. Where a
shard boundary falls does not matter: every element meets the same complete norms.

Then the update travels (per matrix bucket of shard ``S``):

* ``update_comm="exact"``: one all-gather of the update in the parameter dtype, ``S·itemsize``
  bytes in per rank;
* ``update_comm="bf16"``: the same all-gather with float32 updates rounded to bfloat16 (to
  nearest; half the bytes; 16-bit parameters send as for "exact"), every rank, the owner included,
  applying the rounded values;
* ``update_comm="1bit"``: one all-reduce of one float per matrix row (the row scales), then one
  all-gather of ``S/8`` bytes of packed signs per rank (zero bitmaps only when needed), with
  an error-feedback buffer on the owner (see :mod:`leo_dist.onebit`).

Memory: ``c`` and then ``u`` are formed in place in the averaged gradient shard (which the step
consumes), block by block with one reused float32 scratch block of :data:`BLOCK_ELEMS`
elements; the exact update is all-gathered a block of columns at a time into two reused buffers
(one block travels while the previous one is applied) and applied piece by piece. So the transients of a matrix step are O(block), not O(bucket).
Chunking changes only the order of the float32 sums of squares (row, column, ``Σu²``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .collectives import Comm, naming
from .exact_gather import ExactGather
from .functional import apply_update_, leo_scale, update_momentum_
from .packing import bit_slice, pack_mask, pack_signs, unpack_signs
from .partition import Layout, MatrixSlice, NormLayout, rows_cols_pieces
from .signs import Packed, apply_to, rounding_seed

__all__ = ["MatrixStep", "add_row_col_sumsq_", "direction_", "momentum_and_c_", "BLOCK_ELEMS"]

#: elements of the reused float32 scratch block of a matrix step (1 MiB)
BLOCK_ELEMS = 1 << 18


def _blocks(piece: Tensor, block: int):
    """``(sub, i, j)``: 2-D sub-views of ``piece`` of at most ``block`` elements (whole rows
    when a row fits), ``sub[a, b]`` being ``piece[i + a, j + b]``."""
    h, w = piece.shape
    if w <= block:
        step = max(1, block // w)
        for i in range(0, h, step):
            yield piece[i : i + step], i, 0
    else:
        for i in range(h):
            for j in range(0, w, block):
                yield piece[i : i + 1, j : j + block], i, j


def _scratch_like(sub: Tensor, scratch: Tensor | None) -> Tensor:
    if scratch is None:
        return torch.empty(sub.shape, dtype=torch.float32, device=sub.device)
    return scratch[: sub.numel()].view(sub.shape)


def add_row_col_sumsq_(x: Tensor, sl: MatrixSlice, layout: NormLayout, buf: Tensor,
                       scratch: Tensor | None = None, block: int = BLOCK_ELEMS) -> None:
    """Add the squares of ``x`` (float32, the slice's ``c``) to its matrix's row/column sums in ``buf``.

    Works a block of at most ``block`` elements at a time in ``scratch`` (float32, ``block``
    elements; allocated per block if None)."""
    rows, cols = layout.rows(buf, sl.matrix), layout.cols(buf, sl.matrix)
    for piece, r, c in rows_cols_pieces(x, sl.start, sl.cols):
        for sub, i, j in _blocks(piece, block):
            sq = torch.square(sub, out=_scratch_like(sub, scratch))
            h, w = sub.shape
            rows[r + i : r + i + h] += sq.sum(dim=1)
            cols[c + j : c + j + w] += sq.sum(dim=0)


def direction_(x: Tensor, sl: MatrixSlice, layout: NormLayout, norms: Tensor, eps: float,
               scratch: Tensor | None = None, block: int = BLOCK_ELEMS) -> Tensor:
    """Overwrite ``x`` (the slice's ``c``) with ``u = c/(r+eps) + c/(k+eps)`` from complete norms.

    Returns ``Σu²`` over the slice as a 0-d float32 tensor. ``scratch``/``block`` as for
    :func:`add_row_col_sumsq_`; ``u`` has the bits of the unblocked formula.
    """
    rows, cols = layout.rows(norms, sl.matrix), layout.cols(norms, sl.matrix)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for piece, r, c in rows_cols_pieces(x, sl.start, sl.cols):
        for sub, i, j in _blocks(piece, block):
            h, w = sub.shape
            t = torch.div(sub, rows[r + i : r + i + h, None] + eps, out=_scratch_like(sub, scratch))
            sub.div_(cols[None, c + j : c + j + w] + eps).add_(t)   # c/(k+eps) + c/(r+eps): the same sum
            total += torch.square(sub, out=t).sum()
    return total


def momentum_and_c_(g: Tensor, m: Tensor, beta1: float, beta2: float, scratch: Tensor | None = None,
                    block: int = BLOCK_ELEMS) -> Tensor:
    """``g ← c = interpolate(m, g, β1)`` and ``update_momentum_(m, g, β2)``, from the same ``g``,
    block by block (``scratch``: float32, ``block`` elements). Returns ``g`` (now ``c``)."""
    for a in range(0, g.numel(), block):
        gb, mb = g[a : a + block], m[a : a + block]
        t = torch.lerp(gb, mb.float(), beta1, out=_scratch_like(gb, scratch))  # = interpolate(mb, gb, beta1)
        update_momentum_(mb, gb, beta2)
        gb.copy_(t)
    return g


class MatrixStep:
    """Leo's 2-D rule on every matrix bucket of a :class:`~leo_dist.partition.Layout`.

    Args:
        layout, comm: the optimizer's layout and collectives.
        update_comm: "exact", "bf16" or "1bit".
        device: where buffers live.
        stochastic_bf16: round bfloat16 matrices stochastically, keyed by (step, parameter,
            element index) as the sign buckets do, so that any split of a matrix into pieces
            rounds alike on every rank.
        kernels: :mod:`leo_dist.kernels` when the optimizer is fused: the local step then runs
            the slice-capable 2-D Triton kernels instead of the blocked torch code.

    State kept across steps: ``update_error`` (``update_comm="1bit"`` only): per matrix bucket a
    float32 ``[S]`` buffer over this rank's shard, what the 1-bit updates have not yet carried.
    """

    def __init__(self, layout: Layout, comm: Comm, update_comm: str, device: torch.device,
                 stochastic_bf16: bool = False, kernels=None):
        if update_comm not in ("exact", "bf16", "1bit"):
            raise ValueError(f"update_comm must be 'exact', 'bf16' or '1bit', got {update_comm!r}")
        self.layout, self.comm, self.update_comm, self.device = layout, comm, update_comm, device
        self.stochastic_bf16 = stochastic_bf16
        self.kernels = kernels
        self.buckets = layout.kind_buckets("matrix")
        self.update_error: dict[int, Tensor] = {}
        if update_comm == "1bit":
            for bi in self.buckets:
                self.update_error[bi] = torch.zeros(layout.buckets[bi].shard, dtype=torch.float32, device=device)
        self._scratch: Tensor | None = None
        self._gather = ExactGather(comm, device, max((b.shard for b in layout.buckets), default=0), BLOCK_ELEMS)

    def _block(self) -> Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(BLOCK_ELEMS, dtype=torch.float32, device=self.device)
        return self._scratch

    def step(self, groups: list[dict[str, Any]], shards: list[Tensor], exp_avgs: list[Tensor],
             step: int = 0) -> list[Packed]:
        """Step every matrix bucket; ``shards``/``exp_avgs`` are indexed by bucket (averaged float32
        gradient shards, consumed: overwritten with ``c``, then the update; momentum shards,
        updated in place); ``step`` keys the stochastic bf16 rounding. Two small all-reduces for
        all matrices together, then the update exchange.

        Exact updates are applied before this returns. 1-bit updates are packed, not sent: returns
        one :class:`~leo_dist.signs.Packed` per bucket, for :func:`leo_dist.signs.exchange_packed`
        to send together with the sign buckets (one host sync for all of them)."""
        if not self.buckets:
            return []
        layout, norms_at = self.layout, self.layout.norms
        group_of = lambda bi: groups[layout.buckets[bi].group_index]  # noqa: E731
        sumsq = torch.zeros(norms_at.size, dtype=torch.float32, device=self.device)
        usq = torch.zeros(len(layout.matrix_numel), dtype=torch.float32, device=self.device)
        local = self._local_fused if self.kernels is not None else self._local_torch
        cs = local(group_of, shards, exp_avgs, sumsq, usq)
        for bi in self.buckets:
            cs[bi][layout.buckets[bi].valid_in_shard(self.comm.rank):] = 0
        if self.update_comm == "1bit":
            return self._send_1bit(group_of, cs, step)
        self._send_exact(group_of, cs, step)
        return []

    def _all_reduce_norms(self, buf: Tensor, what: str) -> None:
        with naming(what):
            self.comm.all_reduce(buf)

    def _local_torch(self, group_of, shards, exp_avgs, sumsq: Tensor, usq: Tensor) -> dict[int, Tensor]:
        """The local step in torch, block by block: ``c`` then ``u`` then ``s·u`` in place in each
        gradient shard, the momentum updated in the first pass. Returns the shards by bucket."""
        layout, norms_at, scratch = self.layout, self.layout.norms, self._block()
        cs: dict[int, Tensor] = {}
        for bi in self.buckets:
            beta1, beta2 = group_of(bi)["betas"]
            cs[bi] = momentum_and_c_(shards[bi], exp_avgs[bi], beta1, beta2, scratch)
            for _, sl, x in layout.owned_views(bi, cs[bi]):
                add_row_col_sumsq_(x, sl, norms_at, sumsq, scratch)
        self._all_reduce_norms(sumsq, "row/column norm all-reduce")
        norms = sumsq.sqrt_()
        for bi in self.buckets:
            eps = group_of(bi)["eps"]
            for _, sl, x in layout.owned_views(bi, cs[bi]):
                usq[sl.matrix] += direction_(x, sl, norms_at, norms, eps, scratch)
        self._all_reduce_norms(usq, "Σu² all-reduce")
        for bi in self.buckets:
            group = group_of(bi)
            for _, sl, x in layout.owned_views(bi, cs[bi]):
                x.mul_(leo_scale(usq[sl.matrix], layout.matrix_numel[sl.matrix], group["align_const"], group["eps"]))
        return cs

    def _local_fused(self, group_of, shards, exp_avgs, sumsq: Tensor, usq: Tensor) -> dict[int, Tensor]:
        """The local step in the Triton 2-D kernels on each owned slice: two read passes (row and
        column sums of ``c²``, then ``Σu²``) and one pass that writes ``s·u`` over the gradient
        shard and updates the momentum. Same contract as :meth:`_local_torch`."""
        layout, norms_at, k = self.layout, self.layout.norms, self.kernels

        def slices(bi):
            for (_, sl, g), (_, _, m) in zip(layout.owned_views(bi, shards[bi]), layout.owned_views(bi, exp_avgs[bi])):
                r0 = sl.start // sl.cols
                yield sl, g, m, r0, (sl.end - 1) // sl.cols + 1

        for bi in self.buckets:
            beta1 = group_of(bi)["betas"][0]
            for sl, g, m, r0, r1 in slices(bi):
                row_sq, col_sq = k.leo2d_partial_sumsq(g, m, sl.start, sl.end, sl.cols, beta1)
                norms_at.rows(sumsq, sl.matrix)[r0:r1] += row_sq
                norms_at.cols(sumsq, sl.matrix).add_(col_sq)
        self._all_reduce_norms(sumsq, "row/column norm all-reduce")
        norms = sumsq.sqrt_()
        plus_eps: dict[tuple[int, int], Tensor] = {}
        for bi in self.buckets:
            group = group_of(bi)
            for sl, g, m, r0, r1 in slices(bi):
                plus_eps[bi, sl.matrix] = (norms_at.rows(norms, sl.matrix)[r0:r1] + group["eps"],
                                           norms_at.cols(norms, sl.matrix) + group["eps"])
                usq[sl.matrix] += k.leo2d_partial_usq(g, m, sl.start, sl.end, sl.cols, group["betas"][0],
                                                      *plus_eps[bi, sl.matrix])
        self._all_reduce_norms(usq, "Σu² all-reduce")
        for bi in self.buckets:
            group = group_of(bi)
            for sl, g, m, _, _ in slices(bi):
                scale = leo_scale(usq[sl.matrix], layout.matrix_numel[sl.matrix], group["align_const"], group["eps"])
                k.leo2d_update_(g, m, sl.start, sl.end, sl.cols, *group["betas"], *plus_eps[bi, sl.matrix],
                                scale, out=g)
        return {bi: shards[bi] for bi in self.buckets}

    def _apply(self, param: Tensor, index: int, lo: int, hi: int, upd: Tensor, group: dict[str, Any],
               step: int) -> None:
        """Apply ``upd`` (``hi − lo`` elements) to ``param.view(-1)[lo:hi]``."""
        seed = rounding_seed(step, index) if self.stochastic_bf16 and param.dtype == torch.bfloat16 else None
        lr, wd = group["lr"], group["weight_decay"]
        apply_to(param, lambda p: apply_update_(p.view(-1)[lo:hi], upd, lr, wd, rounding_seed=seed, rounding_offset=lo))

    def _send_exact(self, group_of: Callable[[int], dict[str, Any]], updates: dict[int, Tensor], step: int) -> None:
        """All-gather every bucket's update shard (float32 ``[S]``, in ``updates``) in the parameter
        dtype and apply it, a block of columns at a time, the next block on the wire while one is
        applied (:class:`~leo_dist.exact_gather.ExactGather`). The arithmetic, element by
        element, is that of one whole update."""
        def applier(bi: int):
            group = group_of(bi)
            return lambda s, lo, hi, upd: self._apply(s.param, s.index, lo, hi, upd, group, step)
        self._gather.send_all([(self.layout.buckets[bi], updates[bi], applier(bi), f"bucket {bi}")
                               for bi in self.buckets],
                              wire=torch.bfloat16 if self.update_comm == "bf16" else None)

    def _send_1bit(self, group_of: Callable[[int], dict[str, Any]], updates: dict[int, Tensor], step: int
                   ) -> list[Packed]:
        """Send Leo's matrix updates as ``α_row·sign(e)`` with error feedback (see :mod:`leo_dist.onebit`).

        One all-reduce of R floats per matrix (all matrices together) completes the row means of
        ``|e|``; then per bucket one all-gather of bits, as for sign buckets, sent by the caller
        (see :meth:`step`).
        """
        layout, rank = self.layout, self.comm.rank
        rowsum = torch.zeros(layout.row_size, dtype=torch.float32, device=self.device)
        errors = {}
        for bi in self.buckets:
            e = self.update_error[bi]
            e.add_(updates.pop(bi))
            errors[bi] = e
            for _, sl, x in layout.owned_views(bi, e):
                off = layout.row_offsets[sl.matrix]
                for piece, r, _ in rows_cols_pieces(x, sl.start, sl.cols):
                    rowsum[off + r : off + r + piece.shape[0]] += piece.abs().sum(dim=1)
        with naming("row scale all-reduce"):
            self.comm.all_reduce(rowsum)
        packed = []
        for bi in self.buckets:
            b, e = layout.buckets[bi], errors[bi]
            bits = torch.empty(b.shard // 8, dtype=torch.uint8, device=self.device)
            pack_signs(e, bits)
            is_zero = e == 0
            has_zero = is_zero[: b.valid_in_shard(rank)].any()
            packed.append(Packed(bits, pack_mask(is_zero), has_zero, bi, self._applier(bi, group_of(bi), rowsum, step)))
            # the owner keeps what α·sign(e) does not carry
            for _, sl, x in layout.owned_views(bi, e):
                alpha = rowsum[layout.row_offsets[sl.matrix] : layout.row_offsets[sl.matrix] + sl.rows] / sl.cols
                for piece, r, _ in rows_cols_pieces(x, sl.start, sl.cols):
                    piece.sub_(torch.sign(piece) * alpha[r : r + piece.shape[0], None])
        return packed

    def _applier(self, bi: int, group: dict[str, Any], rowsum: Tensor, step: int):
        """What to do with bucket ``bi``'s gathered bits: ``α_row·sign`` applied to each matrix."""
        layout = self.layout

        def apply(bits: Tensor, zbits: Tensor | None) -> None:
            for s, j in layout.matrix_slots[bi]:
                rows, cols = s.param.shape
                alpha = rowsum[layout.row_offsets[j] : layout.row_offsets[j] + rows] / cols
                sign = unpack_signs(bit_slice(bits, s.offset, s.numel), s.numel,
                                    None if zbits is None else bit_slice(zbits, s.offset, s.numel))
                upd = sign.view(rows, cols).mul_(alpha[:, None])
                self._apply(s.param, s.index, 0, s.numel, upd.view(-1), group, step)
        return apply
