"""Phases 2–3 of a sharded step for sign buckets: local step, all-gather of packed bits, apply.

:class:`SignStep` steps this rank's shard of a sign bucket (Lion, and Leo's sign-rule
parameters), packs the signs of ``c`` 8 per byte, all-gathers them and applies
``p ← p·(1−lr·wd) − lr·scale·sign`` to every parameter of the bucket on every rank.

Bytes per rank and bucket: one all-gather of ``S/8 + 8`` bytes in (``W·(S/8 + 8)`` out), and only
when some valid ``c`` is exactly 0 on some rank (a flag in the 8-byte header) a second all-gather
of the ``S/8``-byte zero bitmaps, so that exact zeros get no step.

Overlap and host syncs: :meth:`SignStep.launch` steps one bucket and starts its all-gather without
waiting; the next bucket's local step runs while it travels. :meth:`SignStep.finish` then reads
every bucket's zero flag with one host sync for all of them (not one per bucket) before applying.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .collectives import Comm, naming
from .functional import apply_update_
from .packing import HEADER_BYTES, bit_slice, unpack_signs
from .partition import Bucket

__all__ = ["SignStep", "BitsInFlight", "start_gather", "finish_gathers", "apply_to", "rounding_seed"]


def rounding_seed(step: int, param_index: int) -> int:
    """The seed of a parameter's stochastic bf16 rounding at a step: a function of both only, so
    every rank (and a resumed run) rounds alike."""
    return (step * 1_000_003 + param_index) & 0x7FFFFFFF


def start_gather(comm: Comm, send: Tensor, zeros: Tensor, index: int) -> "BitsInFlight":
    """Start the all-gather of one bucket's packed bits; no host sync.

    ``send`` is uint8 ``[S/8 + 8]`` (bits, then the header whose byte 0 flags exact zeros),
    ``zeros`` uint8 ``[S/8]`` (the zero bitmap, sent later only if some rank has zeros); ``index``
    names the bucket if the collective fails. ``W·(S/8 + 8)`` bytes arrive.
    """
    gathered = torch.empty(comm.world * send.numel(), dtype=torch.uint8, device=send.device)
    return BitsInFlight(zeros, gathered, comm.all_gather_start(gathered, send), send, index)


def finish_gathers(comm: Comm, flights: list["BitsInFlight"]) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Wait for every bucket's bits; then, with one host sync for all of them, read which buckets
    carry exact zeros on some rank. Yields per bucket, in order, the bits of the whole bucket
    (``W·S/8`` bytes, rank order) and its zero bitmap (all-gathered only for those buckets) or None.
    A generator, so that only one bucket's decoded bits are alive at a time: consume it fully, on
    every rank alike (the zero bitmaps are collectives)."""
    if not flights:
        return
    for f in flights:
        with naming(f"bucket {f.index}"):
            f.work.wait()
    tables = [f.gathered.view(comm.world, -1) for f in flights]
    flags = torch.stack([t[:, f.zeros.numel()].any() for t, f in zip(tables, flights)]).tolist()
    for f, table, has_zeros in zip(flights, tables, flags):
        nb = f.zeros.numel()
        zbits = None
        if has_zeros:
            zbits = torch.empty(comm.world * nb, dtype=torch.uint8, device=table.device)
            with naming(f"bucket {f.index} (zero bitmap)"):
                comm.all_gather(zbits, f.zeros)
        yield table[:, :nb].reshape(-1), zbits


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

    def launch(self, b: Bucket, group: dict[str, Any], grad: Tensor, exp_avg: Tensor, index: int = 0) -> "_Pending":
        """Local step of bucket ``b`` and the start of its all-gather; no host sync.

        ``grad`` is this rank's averaged float32 shard (read only), ``exp_avg`` its momentum shard
        (updated in place). The all-gather runs while the caller steps the next bucket. ``index``
        (the bucket's position in the layout) names it if the all-gather fails.
        """
        beta1, beta2 = group["betas"]
        nb = b.shard // 8
        send = torch.zeros(nb + HEADER_BYTES, dtype=torch.uint8, device=grad.device)
        zeros = torch.empty(nb, dtype=torch.uint8, device=grad.device)
        send[nb] = self.backend.sign_shard_step_(grad, exp_avg, send[:nb], zeros,
                                                 b.valid_in_shard(self.comm.rank), beta1, beta2)
        return _Pending(b, group, start_gather(self.comm, send, zeros, index))

    def finish(self, pending: list["_Pending"], step: int = 0,
               more: Sequence[tuple["BitsInFlight", Callable[[Tensor, Tensor | None], None]]] = ()) -> None:
        """Wait for every launched bucket, then decode and apply (see :func:`finish_gathers`: one
        host sync for all buckets). ``step`` seeds stochastic bf16 rounding (the same on every rank).
        ``more``: other buckets' bits in flight (Leo's 1-bit matrix updates), finished in the same
        host sync, each then handed to its ``apply(bits, zbits)``."""
        flights = [p.flight for p in pending] + [f for f, _ in more]
        applies = [lambda bits, zbits, p=p: self._apply(p.bucket, p.group, bits, zbits, step) for p in pending]
        applies += [apply for _, apply in more]
        for apply, (bits, zbits) in zip(applies, finish_gathers(self.comm, flights)):
            apply(bits, zbits)

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
class BitsInFlight:
    """One bucket's packed bits on their way to every rank."""

    zeros: Tensor           # this rank's zero bitmap, S/8 bytes
    gathered: Tensor        # every rank's bits + header, W·(S/8 + 8) bytes
    work: Any               # the all-gather's handle
    send: Tensor            # kept alive until the all-gather is done
    index: int              # the bucket's position in the layout


@dataclass
class _Pending:
    """A sign bucket between its local step and its apply."""

    bucket: Bucket
    group: dict[str, Any]
    flight: BitsInFlight
