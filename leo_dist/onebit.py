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
"""
from __future__ import annotations

import torch
from torch import Tensor

from .collectives import sum_in_rank_order
from .packing import pack_signs, unpack_signs

__all__ = ["GRAD_CHUNK", "grad_payload_bytes", "compress_grad_", "decode_grad"]

GRAD_CHUNK = 1024


def _chunks(shard: int) -> int:
    return -(-shard // GRAD_CHUNK)


def grad_payload_bytes(shard: int) -> int:
    """Bytes one rank sends one owner for a shard of ``shard`` elements (a multiple of 8)."""
    return shard // 8 + 4 * _chunks(shard)


def compress_grad_(x: Tensor, err: Tensor, world: int, shard: int, valid: int) -> Tensor:
    """Compress a local gradient bucket for the all-to-all, with error feedback.

    Args:
        x: float32 ``[world·shard]``, the local gradient bucket; overwritten (scratch).
        err: float32 ``[world·shard]`` error buffer, updated in place: ``err ← (x+err) − decoded``.
        valid: elements that belong to parameters (the end padding is kept at zero).

    Returns uint8 ``[world, grad_payload_bytes(shard)]``: row ``r`` is owner ``r``'s message,
    ``shard/8`` bytes of sign bits (set where ``x+err > 0``) then the chunk scales as float32.
    """
    x.add_(err)
    x[valid:] = 0
    n_chunks = _chunks(shard)
    padded = n_chunks * GRAD_CHUNK
    xs = x.view(world, shard)
    sums = torch.zeros(world, padded, dtype=torch.float32, device=x.device)
    sums[:, :shard] = xs.abs()
    sums = sums.view(world, n_chunks, GRAD_CHUNK).sum(dim=2)
    # Elements per chunk that belong to parameters, so that the end padding does not dilute the mean.
    starts = (torch.arange(world, device=x.device)[:, None] * shard
              + torch.arange(n_chunks, device=x.device)[None, :] * GRAD_CHUNK)
    lengths = (shard - torch.arange(n_chunks, device=x.device) * GRAD_CHUNK).clamp(max=GRAD_CHUNK)[None, :]
    counts = (valid - starts).clamp(min=0).minimum(lengths).float()
    scales = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    sign = torch.where(xs > 0, 1.0, -1.0)
    decoded = sign * scales.repeat_interleave(GRAD_CHUNK, dim=1)[:, :shard]
    err.copy_((xs - decoded).view(-1))
    err[valid:] = 0
    out = torch.empty(world, grad_payload_bytes(shard), dtype=torch.uint8, device=x.device)
    nb = shard // 8
    for r in range(world):
        pack_signs(xs[r], out[r, :nb])
    out[:, nb:].copy_(scales.contiguous().view(torch.uint8).view(world, -1))
    return out


def decode_grad(recv: Tensor, world: int, shard: int) -> Tensor:
    """Average the ``world`` messages an owner received: float32 ``[shard]``.

    ``recv`` is uint8 ``[world, grad_payload_bytes(shard)]``, row ``r`` from rank ``r``. The sum
    runs in rank order, so every owner computes it the same way.
    """
    nb = shard // 8
    n_chunks = _chunks(shard)
    signs = unpack_signs(recv[:, :nb].contiguous().view(-1), world * shard).view(world, shard)
    # a fresh copy: the float32 view needs 4-byte aligned storage
    scales = recv[:, nb:].reshape(-1).clone().view(torch.float32).view(world, n_chunks)
    vals = signs * scales.repeat_interleave(GRAD_CHUNK, dim=1)[:, :shard]
    return sum_in_rank_order(vals).div_(world)
