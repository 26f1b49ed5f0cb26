"""Catch a sharded optimizer stepping parameters that a plain DDP module already all-reduces.

Such a job sends every gradient twice (DDP's all-reduce, then the optimizer's reduce-scatter).
The results stay right, so nothing else would ever tell the user. :class:`DDPGuard` notices it
without scanning the heap: from construction to the first step it keeps a global module
forward pre-hook that records, by weak reference, each ``DistributedDataParallel`` module whose
forward runs (one ``isinstance`` per module call, for the first iteration only); the first
``step()`` removes the hook and raises if one of those modules trains the optimizer's
parameters. ``leo_dist.hooks.attach`` disarms the guard: the gradients then flow through the hook.
"""
from __future__ import annotations

import weakref
from typing import Iterable

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DDPGuard"]


class DDPGuard:
    """Armed at construction of a distributed sharded optimizer over ``params``."""

    def __init__(self, params: Iterable[Tensor]):
        self._ids = {id(p) for p in params}
        self._seen: list[weakref.ref] = []
        seen = self._seen

        def record(module: nn.Module, args) -> None:
            if isinstance(module, DistributedDataParallel) and not any(r() is module for r in seen):
                seen.append(weakref.ref(module))

        self._handle = nn.modules.module.register_module_forward_pre_hook(record)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self._seen.clear()

    def check(self) -> None:
        """Disarm, then raise ``RuntimeError`` if a plain DDP module ran over these parameters."""
        if self._handle is None:
            return
        modules = [m for m in (r() for r in self._seen) if m is not None]
        self.disarm()
        for ddp in modules:
            if any(id(p) in self._ids for p in ddp.parameters()):
                raise RuntimeError(
                    "these parameters belong to a DistributedDataParallel model that all-reduces their "
                    "gradients with its default hook; call leo_dist.hooks.attach(ddp_model, optimizer) "
                    "so that DDP reduce-scatters into the optimizer instead of sending them twice")

    def __del__(self) -> None:
        try:
            self.disarm()
        except Exception:  # interpreter shutdown
            pass
