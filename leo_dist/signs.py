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
from typing import Any, Callable

import torch
from torch import Tensor

from .collectives import Comm, naming
from .functional import apply_update_
from .packing import HEADER_BYTES, bit_slice, unpack_signs
from .partition import Bucket

__all__ = ["SignStep", "gather_signs", "apply_to", "rounding_seed"]


def rounding_seed(step: int, param_index: int) -> int:
    """The seed of a parameter's stochastic bf16 rounding at a step: a function of both only, so
    every rank (and a resumed run) rounds alike."""
    return (step * 1_000_003 + param_index) & 0x7FFFFFFF


def gather_signs(comm: Comm, send: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor | None]:
    """All-gather every rank's packed bits; and their zero bitmaps, only if some rank has zeros.

    ``send`` is uint8 ``[S/8 + 8]`` (bits, then the header whose byte 0 flags exact zeros),
    ``zeros`` uint8 ``[S/8]``. Returns the bits of the whole bucket (``W·S/8`` bytes, rank
    order) and the zero bitmap or None.
    """
    nb = zeros.numel()
    gathered = torch.empty(comm.world * (nb + HEADER_BYTES), dtype=torch.uint8, device=send.device)
    comm.all_gather(gathered, send)
    table = gathered.view(comm.world, nb + HEADER_BYTES)
    bits = table[:, :nb].reshape(-1)
    zbits = None
    if bool(table[:, nb].any()):
        zbits = torch.empty(comm.world * nb, dtype=torch.uint8, device=send.device)
        comm.all_gather(zbits, zeros)
    return bits, zbits


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
        gathered = torch.empty(self.comm.world * (nb + HEADER_BYTES), dtype=torch.uint8, device=grad.device)
        work = self.comm.all_gather_start(gathered, send)
        return _Pending(b, group, zeros, gathered, work, send, index)

    def finish(self, pending: list["_Pending"], step: int = 0) -> None:
        """Wait for every launched bucket, then decode and apply. One host sync for all buckets
        together (which of them carry exact zeros); their zero bitmaps then travel, if any.
        ``step`` seeds stochastic bf16 rounding (the same on every rank)."""
        if not pending:
            return
        world = self.comm.world
        for p in pending:
            with naming(f"bucket {p.index}"):
                p.work.wait()
        tables = [p.gathered.view(world, -1) for p in pending]
        flags = torch.stack([t[:, p.zeros.numel()].any() for t, p in zip(tables, pending)]).tolist()
        for p, table, has_zeros in zip(pending, tables, flags):
            nb = p.zeros.numel()
            bits = table[:, :nb].reshape(-1)
            zbits = None
            if has_zeros:
                zbits = torch.empty(world * nb, dtype=torch.uint8, device=bits.device)
                with naming(f"bucket {p.index} (zero bitmap)"):
                    self.comm.all_gather(zbits, p.zeros)
            self._apply(p.bucket, p.group, bits, zbits, step)

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
class _Pending:
    """A sign bucket between its local step and its apply."""

    bucket: Bucket
    group: dict[str, Any]
    zeros: Tensor           # this rank's zero bitmap, S/8 bytes
    gathered: Tensor        # every rank's bits + header, W·(S/8 + 8) bytes
    work: Any               # the all-gather's handle
    send: Tensor            # kept alive until the all-gather is done
    index: int              # the bucket's position in the layout
