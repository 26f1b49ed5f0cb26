"""Phases 2–3 of a sharded step for sign buckets: local step, all-gather of packed bits, apply.

:class:`SignStep` steps this rank's shard of a sign bucket (Lion, and Leo's sign-rule
parameters), packs the signs of ``c`` 8 per byte, all-gathers them and applies
``p ← p·(1−lr·wd) − lr·scale·sign`` to every parameter of the bucket on every rank.

Bytes per rank and bucket: one all-gather of ``S/8 + 8`` bytes in (``W·(S/8 + 8)`` out), and only
when some valid ``c`` is exactly 0 on some rank (a flag in the 8-byte header) a second all-gather
of the ``S/8``-byte zero bitmaps, so that exact zeros get no step.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .collectives import Comm
from .packing import HEADER_BYTES, bit_slice
from .partition import Bucket

__all__ = ["SignStep", "gather_signs", "apply_to"]


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

    def __init__(self, comm: Comm, backend, leo: bool):
        self.comm, self.backend, self.leo = comm, backend, leo

    def step(self, b: Bucket, group: dict[str, Any], grad: Tensor, exp_avg: Tensor) -> None:
        """Step bucket ``b``: ``grad`` is this rank's averaged float32 shard (read only),
        ``exp_avg`` its momentum shard (updated in place); every parameter of ``b`` is updated."""
        beta1, beta2 = group["betas"]
        nb = b.shard // 8
        send = torch.zeros(nb + HEADER_BYTES, dtype=torch.uint8, device=grad.device)
        zeros = torch.empty(nb, dtype=torch.uint8, device=grad.device)
        send[nb] = self.backend.sign_shard_step_(grad, exp_avg, send[:nb], zeros,
                                                 b.valid_in_shard(self.comm.rank), beta1, beta2)
        bits, zbits = gather_signs(self.comm, send, zeros)
        scale = group["align_const"] if self.leo else 1.0
        lr, wd = group["lr"], group["weight_decay"]
        apply = self.backend.apply_signs_
        for s in b.slots:
            if s.numel == 0:
                continue
            z = None if zbits is None else bit_slice(zbits, s.offset, s.numel)
            sb = bit_slice(bits, s.offset, s.numel)
            apply_to(s.param, lambda p: apply(p, sb, z, lr, wd, scale))
