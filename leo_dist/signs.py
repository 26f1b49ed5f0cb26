"""Phases 2–3 of a sharded step for sign buckets: local step, all-gather of packed bits, apply.

:class:`SignStep` steps this rank's shard of a sign bucket (Lion, and Leo's sign-rule
parameters), packs the signs of ``c`` 8 per byte, all-gathers them and applies
``p ← p·(1−lr·wd) − lr·scale·sign`` to every parameter of the bucket on every rank.

Bytes per rank and bucket: one all-gather of ``S/8`` bytes in (``W·S/8`` out), and only when
some valid ``c`` is exactly 0 on some rank a second all-gather of the ``S/8``-byte zero bitmaps,
so that exact zeros get no step. Which buckets need it is decided for all of them at once: one
all-reduce (MAX) of one float per bucket, per step.

Order, overlap and memory: :meth:`SignStep.pack` steps one bucket locally (momentum, bits, zero
bitmap: ``2·S/8`` bytes kept); :func:`exchange_packed` then reads the zero flags of every packed
bucket with one all-reduce and one host sync (not one per bucket), and all-gathers the buckets
with :data:`IN_FLIGHT` of them on the wire while the previous one is applied. So the gathered
bits alive at once are ``(IN_FLIGHT + 1)·W·S/8`` bytes, bounded by the bucket size, not by N.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import Comm, naming
from .functional import apply_update_
from .packing import bit_slice, unpack_signs
from .partition import Bucket

__all__ = ["SignStep", "Packed", "InFlight", "exchange_packed", "start_packed", "IN_FLIGHT", "apply_to", "rounding_seed"]


def rounding_seed(step: int, param_index: int) -> int:
    """The seed of a parameter's stochastic bf16 rounding at a step: a function of both only, so
    every rank (and a resumed run) rounds alike."""
    return (step * 1_000_003 + param_index) & 0x7FFFFFFF


#: buckets whose bits are on the wire while the previous bucket is applied
IN_FLIGHT = 2


def _zero_flags(comm: Comm, packed: list["Packed"]) -> list[bool]:
    """Which packed buckets have an exact zero on some rank: one all-reduce (MAX) of one float per
    bucket, and the one host sync for all of them."""
    flags = torch.stack([p.has_zero.reshape(()) for p in packed]).float()
    with naming("zero-flag all-reduce"):
        comm.all_reduce(flags, dist.ReduceOp.MAX)
    return [f > 0 for f in flags.tolist()]


class InFlight:
    """One packed bucket's all-gathers (bits, and the zero bitmaps when needed), started."""

    def __init__(self, comm: Comm, p: "Packed", has_zeros: bool):
        self.packed = p
        self.bits = torch.empty(comm.world * p.bits.numel(), dtype=torch.uint8, device=p.bits.device)
        with naming(f"bucket {p.index}"):
            self.works = [comm.all_gather_start(self.bits, p.bits)]
            self.zbits = None
            if has_zeros:
                self.zbits = torch.empty_like(self.bits)
                self.works.append(comm.all_gather_start(self.zbits, p.zeros))

    def wait(self) -> None:
        with naming(f"bucket {self.packed.index}"):
            for w in self.works:
                w.wait()

    def apply(self) -> None:
        """Apply the arrived update to every parameter of the bucket (after :meth:`wait`)."""
        self.packed.apply(self.bits, self.zbits)

    def finish(self) -> None:
        self.wait()
        self.apply()


def exchange_packed(comm: Comm, packed: list["Packed"]) -> None:
    """All-gather and apply every packed bucket, in order (collective; the same list on every rank).

    One all-reduce (MAX) of ``len(packed)`` floats and one host sync decide which buckets also
    send their zero bitmaps; then bucket ``k``'s bits (``W·S/8`` bytes arrive) are waited for and
    handed to ``packed[k].apply(bits, zbits)`` while buckets ``k+1 … k+IN_FLIGHT`` travel.
    """
    if not packed:
        return
    has_zeros = _zero_flags(comm, packed)
    ahead = deque(InFlight(comm, packed[k], has_zeros[k]) for k in range(min(IN_FLIGHT, len(packed))))
    for k in range(len(packed)):
        current = ahead.popleft()
        current.wait()
        if k + IN_FLIGHT < len(packed):
            ahead.append(InFlight(comm, packed[k + IN_FLIGHT], has_zeros[k + IN_FLIGHT]))
        current.apply()


def start_packed(comm: Comm, packed: list["Packed"]) -> list[InFlight]:
    """Start the all-gathers of every packed bucket at once and return them, for the caller to
    :meth:`InFlight.finish` later (collective like :func:`exchange_packed`; the bits of all
    buckets, ``W·S/8`` bytes each, stay alive until finished)."""
    if not packed:
        return []
    return [InFlight(comm, p, z) for p, z in zip(packed, _zero_flags(comm, packed))]


def apply_to(param: Tensor, fn: Callable[[Tensor], None]) -> None:
    """Run the in-place ``fn`` on ``param``'s data, through a contiguous copy if it is strided."""
    if param.is_contiguous():
        fn(param.data)
    else:
        tmp = param.data.contiguous()
        fn(tmp)
        param.data.copy_(tmp)


class SignStep:
    """The step of sign buckets; stateless beyond its collaborators.

    Args:
        comm: the collectives.
        backend: a :class:`leo_dist.dispatch.Backend` (its ``sign_shard_step_``/``apply_signs_``).
        leo: True for Leo (the sign step is scaled by ``align_const``), False for Lion.
    """

    def __init__(self, comm: Comm, backend, leo: bool, stochastic_bf16: bool = False):
        self.comm, self.backend, self.leo = comm, backend, leo
        self.stochastic_bf16 = stochastic_bf16

    def pack(self, b: Bucket, group: dict[str, Any], grad: Tensor, exp_avg: Tensor, index: int,
             step: int) -> "Packed":
        """Local step of bucket ``b``; no host sync, nothing sent yet (see :func:`exchange_packed`).

        ``grad`` is this rank's averaged float32 shard (read only), ``exp_avg`` its momentum shard
        (updated in place); ``index`` (the bucket's position in the layout) names it if a
        collective fails; ``step`` seeds stochastic bf16 rounding (the same on every rank).
        """
        beta1, beta2 = group["betas"]
        nb = b.shard // 8
        bits = torch.empty(nb, dtype=torch.uint8, device=grad.device)
        zeros = torch.empty(nb, dtype=torch.uint8, device=grad.device)
        flag = self.backend.sign_shard_step_(grad, exp_avg, bits, zeros, b.valid_in_shard(self.comm.rank),
                                             beta1, beta2)
        return Packed(bits, zeros, flag, index, lambda bits, zbits: self._apply(b, group, bits, zbits, step))

    def _apply(self, b: Bucket, group: dict[str, Any], bits: Tensor, zbits: Tensor | None, step: int) -> None:
        """Decode bucket ``b``'s bits (``W·S/8`` bytes) and apply them to every parameter in it."""
        scale = group["align_const"] if self.leo else 1.0
        lr, wd = group["lr"], group["weight_decay"]
        apply = self.backend.apply_signs_
        for s in b.slots:
            if s.numel == 0:
                continue
            z = None if zbits is None else bit_slice(zbits, s.offset, s.numel)
            sb = bit_slice(bits, s.offset, s.numel)
            if self.stochastic_bf16 and s.param.dtype == torch.bfloat16:
                seed = rounding_seed(step, s.index)
                sign = unpack_signs(sb, s.numel, z, dtype=torch.float32)
                apply_to(s.param, lambda p: apply_update_(p, sign, lr, wd, scale, rounding_seed=seed))
            else:
                apply_to(s.param, lambda p: apply(p, sb, z, lr, wd, scale))


@dataclass
class Packed:
    """One bucket's packed update on this rank, before it travels."""

    bits: Tensor            # uint8 [S/8]: the signs of this rank's shard
    zeros: Tensor           # uint8 [S/8]: its bitmap of exact zeros
    has_zero: Tensor        # 0-d, on the device: some valid element of the shard is exactly zero
    index: int              # the bucket's position in the layout
    apply: Callable[[Tensor, Tensor | None], None]   # (whole bucket's bits, zero bitmap or None)
