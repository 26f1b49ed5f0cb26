"""1-bit compression with error feedback, for the two lossy modes of the sharded optimizers.

``grad_comm="1bit"`` — each rank adds its error buffer to its local gradient bucket, sends every
owner the signs of its chunk (1 bit per element) plus one float32 scale per ``GRAD_CHUNK``
elements (the mean magnitude of that run), and keeps what the message did not say as the next
error. The owner decodes the W messages and averages them. One ``all_to_all_single`` of
``W·(S/8 + 4·⌈S/GRAD_CHUNK⌉)`` bytes per rank and bucket: about N/8 bytes received per rank,
whatever W. The error buffer costs 4 bytes per parameter per rank.

``update_comm="1bit"`` — Leo's matrix update ``U`` is added to an error buffer on its owner, and
``sign(e)`` travels as bits with a per-row scale ``α_i = mean_j |e_ij|``; the row sums are
completed with an all-reduce of R floats per matrix, so every rank knows every ``α`` without
sending it, and applies ``α_i·sign``. The owner keeps ``e − α·sign(e)`` for the next step.

Memory: the gradient codecs stream the ``(world, shard)`` view of a bucket a block of ``cols``
columns at a time (a multiple of ``GRAD_CHUNK``, so every scale run lies in one block), with two
``world × cols`` float32 scratch blocks: no temporary the size of the bucket. The bits are the
same as a whole-bucket computation's (every value is computed by the same element-wise op or the
same 1024-element sum).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import cpu_step
from .collectives import sum_in_rank_order
from .packing import pack_signs, unpack_signs

__all__ = ["GRAD_CHUNK", "grad_payload_bytes", "compress_grad_", "compress_grad_stream_", "decode_grad",
           "block_columns", "scratch_numel"]

GRAD_CHUNK = 1024

# Default elements of one streamed block (all ``world`` rows together): 1 MiB of float32.
_BLOCK_ELEMS = 1 << 18

#: use the one-pass C codec (leo_dist.cpu_step) for CPU tensors when it is built; False forces the
#: torch path (the reference the tests compare it with)
USE_C = True


def _c_codec(t: Tensor) -> bool:
    return USE_C and t.device.type == "cpu" and cpu_step.available()


def _chunks(shard: int) -> int:
    return -(-shard // GRAD_CHUNK)


def grad_payload_bytes(shard: int) -> int:
    """Bytes one rank sends one owner for a shard of ``shard`` elements (a multiple of 8)."""
    return shard // 8 + 4 * _chunks(shard)


def block_columns(world: int, elems: int = _BLOCK_ELEMS) -> int:
    """Columns of a ``(world, shard)`` bucket view per streamed block of about ``elems``
    elements: a positive multiple of ``GRAD_CHUNK``."""
    return max(GRAD_CHUNK, elems // max(1, world) // GRAD_CHUNK * GRAD_CHUNK)


def scratch_numel(world: int, shard: int, cols: int) -> int:
    """float32 elements of one scratch block for a shard of ``shard`` and blocks of ``cols``."""
    return world * min(cols, _chunks(shard) * GRAD_CHUNK)


def _blocks(shard: int, cols: int):
    for j0 in range(0, shard, cols):
        yield j0, min(shard, j0 + cols)


def _row_valid(world: int, shard: int, valid: int | Sequence[int]) -> list[int]:
    """Per row, the elements that belong to parameters: ``valid`` counts them over the whole
    ``(world, shard)`` view, or gives them row by row (rows that are not consecutive owners)."""
    if isinstance(valid, int):
        return [max(0, min(shard, valid - r * shard)) for r in range(world)]
    if len(valid) != world:
        raise ValueError(f"valid: one count per row expected ({world}), got {len(valid)}")
    return list(valid)


def _valid_cols(row_valid: list[int], j0: int, c: int):
    """Per row r, how many of columns [j0, j0 + c) belong to parameters (the rest is end padding)."""
    return [max(0, min(c, v - j0)) for v in row_valid]


def compress_grad_stream_(fill: Callable[[int, int, Tensor], None], err: Tensor, out: Tensor, world: int,
                          shard: int, valid: int | Sequence[int], cols: int | None = None,
                          scratch: Tensor | None = None) -> Tensor:
    """:func:`compress_grad_` reading the local gradient block by block from ``fill``.

    ``fill(j0, j1, xc)`` writes columns ``[j0, j1)`` of the local gradient bucket viewed as
    ``(world, shard)`` into ``xc`` (float32 ``(world, j1 − j0)``, rows contiguous). ``out`` is
    the uint8 ``[world, grad_payload_bytes(shard)]`` message table (returned), ``err`` as for
    :func:`compress_grad_`, or a list of per-row counts (``err`` may then be a view whose rows
    are not adjacent, as the two-level exchange's are). ``cols``: block width (a multiple of ``GRAD_CHUNK``; default
    :func:`block_columns`). ``scratch``: float32, at least ``2·scratch_numel(...)`` elements
    (allocated if None). The bits are those of :func:`compress_grad_`.
    """
    cols = block_columns(world) if cols is None else cols
    if cols <= 0 or cols % GRAD_CHUNK:
        raise ValueError(f"cols must be a positive multiple of {GRAD_CHUNK}, got {cols}")
    nb = shard // 8
    width = scratch_numel(world, shard, cols)
    if scratch is None:
        scratch = torch.empty(2 * width, dtype=torch.float32, device=err.device)
    ev = err.view(world, shard)
    dev = err.device
    row_valid = _row_valid(world, shard, valid)
    use_c = _c_codec(err)
    for j0, j1 in _blocks(shard, cols):
        c = j1 - j0
        k0, k = j0 // GRAD_CHUNK, _chunks(c)
        cp = k * GRAD_CHUNK
        x = scratch[: world * cp].view(world, cp)
        t = scratch[width : width + world * cp].view(world, cp)
        xs = x[:, :c]
        fill(j0, j1, xs)
        if use_c:  # the same block in one pass (about 10x less time than the torch ops below)
            cpu_step.onebit_compress_block_(xs, ev[:, j0:j1], _valid_cols(row_valid, j0, c), out, j0 // 8,
                                            nb + 4 * k0)
            continue
        if cp != c:
            x[:, c:].zero_()
        xs.add_(ev[:, j0:j1])
        nvalid = _valid_cols(row_valid, j0, c)
        for r, nv in enumerate(nvalid):
            if nv < c:
                xs[r, nv:].zero_()
        # per run of GRAD_CHUNK: mean magnitude over the elements that belong to parameters
        torch.abs(x, out=t)
        sums = t.view(world, k, GRAD_CHUNK).sum(dim=2)
        ks = torch.arange(k0, k0 + k, device=dev)
        lengths = (shard - ks * GRAD_CHUNK).clamp(max=GRAD_CHUNK)[None, :]
        counts = (torch.tensor(row_valid, device=dev)[:, None] - ks[None, :] * GRAD_CHUNK).clamp(min=0) \
            .minimum(lengths).float()
        scales = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
        # decoded = sign·scale (sign = +1 where x > 0, else −1); err ← x − decoded
        t.fill_(-1.0).masked_fill_(x > 0, 1.0)
        t.view(world, k, GRAD_CHUNK).mul_(scales[:, :, None])
        ec = ev[:, j0:j1]
        new = t[:, :c]
        torch.sub(xs, new, out=new)
        # a non-finite gradient (or the NaN/inf scale of its chunk) never enters the residual: those
        # elements keep their error, and the owner sees the non-finite scale and skips the step
        ec.copy_(torch.where(torch.isfinite(new), new, ec))
        for r, nv in enumerate(nvalid):
            if nv < c:
                ec[r, nv:].zero_()
            pack_signs(xs[r], out[r, j0 // 8 : j1 // 8])
        out[:, nb + 4 * k0 : nb + 4 * (k0 + k)].copy_(scales.contiguous().view(torch.uint8).view(world, -1))
    return out


def compress_grad_(x: Tensor, err: Tensor, world: int, shard: int, valid: int, cols: int | None = None) -> Tensor:
    """Compress a local gradient bucket for the all-to-all, with error feedback.

    Args:
        x: float32 ``[world·shard]``, the local gradient bucket (read; the caller may treat it as
            scratch).
        err: float32 ``[world·shard]`` error buffer, updated in place: ``err ← (x+err) − decoded``.
        valid: elements that belong to parameters (the end padding is kept at zero).
        cols: block width of the streaming (see :func:`compress_grad_stream_`).

    Returns uint8 ``[world, grad_payload_bytes(shard)]``: row ``r`` is owner ``r``'s message,
    ``shard/8`` bytes of sign bits (set where ``x+err > 0``) then the chunk scales as float32.
    """
    out = torch.empty(world, grad_payload_bytes(shard), dtype=torch.uint8, device=x.device)
    xv = x.view(world, shard)
    return compress_grad_stream_(lambda j0, j1, xc: xc.copy_(xv[:, j0:j1]), err, out, world, shard, valid, cols)


def decode_grad(recv: Tensor, world: int, shard: int, out: Tensor | None = None, cols: int | None = None,
                scratch: Tensor | None = None) -> Tensor:
    """Average the ``world`` messages an owner received: float32 ``[shard]``.

    ``recv`` is uint8 ``[world, grad_payload_bytes(shard)]``, row ``r`` from rank ``r``. The sum
    runs in rank order, so every owner computes it the same way. ``out`` (float32 ``[shard]``),
    if given, receives the result; ``scratch`` (float32, ``scratch_numel(...)`` elements) is the
    block buffer (allocated if None).
    """
    cols = block_columns(world) if cols is None else cols
    if cols <= 0 or cols % GRAD_CHUNK:
        raise ValueError(f"cols must be a positive multiple of {GRAD_CHUNK}, got {cols}")
    nb = shard // 8
    n_chunks = _chunks(shard)
    # a fresh copy (4 bytes per GRAD_CHUNK elements): the float32 view needs 4-byte aligned storage
    scales = recv[:, nb:].reshape(-1).clone().view(torch.float32).view(world, n_chunks)
    if out is None:
        out = torch.empty(shard, dtype=torch.float32, device=recv.device)
    if _c_codec(recv) and recv.is_contiguous():
        for j0, j1 in _blocks(shard, cols):
            cpu_step.onebit_decode_block_(recv, j0 // 8, scales, j0 // GRAD_CHUNK, out[j0:j1])
        return out
    if scratch is None:
        scratch = torch.empty(scratch_numel(world, shard, cols), dtype=torch.float32, device=recv.device)
    for j0, j1 in _blocks(shard, cols):
        c = j1 - j0
        k0, k = j0 // GRAD_CHUNK, _chunks(c)
        cp = k * GRAD_CHUNK
        v = scratch[: world * cp].view(world, cp)
        for r in range(world):
            v[r, :c].copy_(unpack_signs(recv[r, j0 // 8 : j1 // 8], c))
        if cp != c:
            v[:, c:].zero_()
        v.view(world, k, GRAD_CHUNK).mul_(scales[:, k0 : k0 + k, None])
        sum_in_rank_order(v[:, :c], out=out[j0:j1])
    return out.div_(world)
