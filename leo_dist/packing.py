"""1-bit packing of sign updates.

Bit order: element ``i`` lives in byte ``i // 8`` at bit ``i % 8`` (least significant bit first),
the order of ``numpy.packbits(..., bitorder="little")``. A set bit means ``x > 0``. The last byte is
padded with zero bits. Because one bit cannot encode zero, exact zeros travel in a second bitmap
of the same layout (bit set where ``x == 0``), sent only when a bucket has any (docs/design.md, phase 3).

All functions are vectorised torch, work on any device, and never loop over elements in Python.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_signs", "pack_mask", "unpack_signs", "packed_size", "bit_slice"]

# Moves byte j of a little-endian int64 holding eight 0/1 bytes to bit 56 + j. The partial
# products land on 64 distinct bit positions, so no carry can reach the top byte.
_GATHER_BITS = 0x0102040810204080


def packed_size(n: int) -> int:
    """Bytes needed for ``n`` bits: ``(n + 7) // 8``."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return (n + 7) // 8


def pack_mask(mask: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack a boolean tensor (any shape, read flat) into ``uint8[(n + 7) // 8]``.

    ``out``, if given, is a contiguous uint8 tensor of exactly that size and is returned.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    n = flat.numel()
    nbytes = packed_size(n)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=mask.device)
    elif out.dtype != torch.uint8 or out.numel() != nbytes or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 tensor of {nbytes} elements")
    if n == 0:
        return out
    full = n // 8
    if flat.storage_offset() % 8:
        flat = flat.clone()  # viewing bytes as int64 words needs an 8-byte aligned start
    if full:
        words = flat[: full * 8].view(torch.uint8).view(full, 8).contiguous().view(torch.int64).view(-1)
        out[:full].copy_(((words * _GATHER_BITS) >> 56) & 0xFF)
    if n % 8:
        tail = flat[full * 8 :].to(torch.uint8)
        shifts = torch.arange(tail.numel(), device=mask.device, dtype=torch.uint8)
        out[full] = (tail << shifts).sum().to(torch.uint8)
    return out


def pack_signs(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack ``x > 0`` (any shape, read flat) into ``uint8[(n + 7) // 8]``."""
    return pack_mask(x > 0, out)


_SHIFTS = {}


def _shifts(device: torch.device) -> Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def unpack_signs(
    bits: Tensor, n: int, zeros: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Decode ``n`` signs from packed ``bits``: ``+1`` where set, ``-1`` where clear.

    ``zeros``, if given, is a bitmap of the same layout from :func:`pack_mask`; its set bits decode
    to ``0``. Returns a new 1-D tensor of ``n`` elements of ``dtype``.
    """
    if bits.dtype != torch.uint8:
        raise TypeError(f"bits must be uint8, got {bits.dtype}")
    if n < 0 or bits.numel() < packed_size(n):
        raise ValueError(f"bits holds {bits.numel()} bytes, too few for n={n}")
    nb = packed_size(n)
    b = (bits.reshape(-1)[:nb].unsqueeze(1) >> _shifts(bits.device)) & 1
    sign = b.reshape(-1)[:n].to(dtype).mul_(2).sub_(1)
    if zeros is not None:
        if zeros.dtype != torch.uint8:
            raise TypeError(f"zeros must be uint8, got {zeros.dtype}")
        if zeros.numel() < nb:
            raise ValueError(f"zeros holds {zeros.numel()} bytes, too few for n={n}")
        z = ((zeros.reshape(-1)[:nb].unsqueeze(1) >> _shifts(zeros.device)) & 1).reshape(-1)[:n]
        sign.masked_fill_(z.bool(), 0)
    return sign


def bit_slice(bits: Tensor, offset: int, n: int) -> Tensor:
    """Bytes whose bit 0 is bit ``offset`` of ``bits``, covering ``n`` bits.

    A view when ``offset`` is a multiple of 8, else a new tensor of ``(n + 7) // 8`` bytes (bits
    past the end of ``bits`` read as 0).
    """
    q, r = divmod(offset, 8)
    nb = (n + 7) // 8
    if r == 0:
        return bits[q : q + nb]
    # in uint8, where << drops the bits shifted past bit 7: one output-sized tensor and one
    # temporary, not int32 copies
    out = bits[q : q + nb] >> r
    hi = bits[q + 1 : q + nb + 1] << (8 - r)
    out[: hi.numel()] |= hi
    return out
