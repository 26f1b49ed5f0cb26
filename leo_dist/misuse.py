"""Catch ``torch.nn.utils.clip_grad_norm_`` (and other in-place edits of ``.grad``) on the
parameters of a sharded optimizer, which would otherwise go silently wrong.

With the DDP hook the averaged shards leave during backward: editing ``.grad`` afterwards changes
nothing the step uses. Standalone, ``.grad`` holds this rank's *local* gradient, so
``clip_grad_norm_`` clips each rank by its own norm instead of by the norm of the average (what a
DDP user expects). Either way the fix is ``opt.clip_grad_norm_(max_norm)``.

How it is detected (:class:`GradEditGuard`): a post-accumulate-grad hook on every parameter queues,
once per backward, an autograd final callback that re-queues itself once, so that it runs after
DDP's own final callback (which copies the bucket back into ``.grad``). It then records, per
parameter, a fingerprint of ``.grad``: its identity and its version counter (``grad._version``,
bumped by every in-place op: ``clip_grad_norm_``'s ``_foreach_mul_``, ``mul_``, ``zero_``...).
``step()`` compares the fingerprints with the current ``.grad`` (:func:`check_grad_edits`) and
raises ``RuntimeError`` ("use opt.clip_grad_norm_") when one changed. Only state after the last
backward counts, so ``no_sync()`` accumulation, ``zero_grad`` (before backward) and DDP's copies
never trip it; ``p.grad = ...`` set by hand without a backward is never checked. Allowed: the
version bump of ``GradScaler.unscale_`` (``scaler.step`` sets ``opt.grad_scale`` to None when it
already unscaled; how far its kernel moves the counter is probed once per device
type, since the CPU kernel does not move it at all), and, standalone, replacing ``.grad`` by a new tensor
(the step reads it). Cost: one Python call per parameter per backward and one pass over the
parameters per backward and per step; no communication, no tensor op.

``allow_grad_edits(opt)`` turns the check off for deliberate edits in standalone mode (they do
reach the step there).
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["GradEditGuard", "check_grad_edits", "allow_grad_edits"]

MESSAGE = (
    "the .grad of {n} parameter(s) of this {cls} (e.g. {names}) was modified in place after backward(), "
    "most likely by torch.nn.utils.clip_grad_norm_. {why} To clip, use opt.clip_grad_norm_(max_norm) "
    "(collective, on the averaged gradients, between backward and step). For a deliberate in-place edit "
    "of standalone gradients, call leo_dist.misuse.allow_grad_edits(opt) once.")
_WHY_HOOK = ("With leo_dist.hooks.attach the averaged gradients left during backward, so the edit would be "
             "ignored.")
_WHY_STANDALONE = ("Standalone, .grad holds this rank's local gradient, so clip_grad_norm_ would clip each rank "
                   "by its own norm, not by the norm of the averaged gradient as under DDP.")


_UNSCALE_BUMPS: dict[str, int] = {}


def _unscale_bumps(device: torch.device) -> int:
    """How far ``GradScaler.unscale_`` moves a gradient's version counter on ``device`` (0 on the
    CPU in torch 2.13: its foreach kernel bypasses the counter); probed once per device type."""
    if device.type not in _UNSCALE_BUMPS:
        t = torch.ones(1, device=device)
        before = t._version
        torch._amp_foreach_non_finite_check_and_unscale_([t], torch.zeros((), device=device),
                                                         torch.ones((), device=device))
        _UNSCALE_BUMPS[device.type] = t._version - before
    return _UNSCALE_BUMPS[device.type]


def _key(g: Tensor) -> int:
    # views of one buffer (DDP's gradient_as_bucket_view) share one version counter
    return id(g._base) if g._base is not None else id(g)


class GradEditGuard:
    """Fingerprints of ``.grad`` at the end of the last backward, for ``params``."""

    def __init__(self, params: Iterable[Tensor]):
        self.params = list(params)
        self.enabled = True
        self._snapshot: list[tuple[int, int] | None] | None = None
        self._queued = False
        self._handles = []
        ref = weakref.ref(self)

        def on_grad(_: Tensor) -> None:
            guard = ref()
            if guard is not None:
                guard._arm()

        for p in self.params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(on_grad))

    def _arm(self) -> None:
        if self._queued or not self.enabled or torch.compiler.is_compiling():
            return
        engine = torch.autograd.Variable._execution_engine
        ref = weakref.ref(self)

        def after_ddp() -> None:  # runs after every callback queued during backward (DDP's finalize)
            guard = ref()
            if guard is not None:
                guard._queued = False
                guard.record()

        def first() -> None:
            engine.queue_callback(after_ddp)

        try:
            engine.queue_callback(first)
        except RuntimeError:  # not inside a backward pass (a hook fired by hand): nothing to arm
            return
        self._queued = True

    def record(self) -> None:
        self._snapshot = [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.params]

    def forget(self) -> None:
        self._snapshot = None
        self._queued = False  # also recovers from a backward that raised before its callbacks ran

    def edited(self, hook_attached: bool, unscaled: bool) -> list[int]:
        """Indices of parameters whose ``.grad`` changed since the last backward."""
        snap = self._snapshot
        if snap is None or not self.enabled:
            return []
        allowance: dict[int, int] = {}
        if unscaled:  # GradScaler.unscale_: one in-place op per gradient (per view of a shared buffer)
            for p in self.params:
                if p.grad is not None:
                    allowance[_key(p.grad)] = allowance.get(_key(p.grad), 0) + _unscale_bumps(p.grad.device)
        bad = []
        for i, (p, fp) in enumerate(zip(self.params, snap)):
            g = p.grad
            if fp is None or g is None:
                if hook_attached and (fp is None) != (g is None):
                    bad.append(i)
                continue
            if id(g) != fp[0]:
                if hook_attached:
                    bad.append(i)
                continue
            if g._version - fp[1] > allowance.get(_key(g), 0):
                bad.append(i)
        return bad

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def check_grad_edits(optimizer: Any, unscaled: bool = False) -> None:
    """Called at the top of a sharded ``step()``: raise ``RuntimeError`` if a ``.grad`` of the
    optimizer was edited in place since the last backward (``unscaled``: ``scaler.unscale_(opt)``
    ran, and its one in-place op per gradient is allowed); then forget the fingerprints."""
    guard: GradEditGuard | None = getattr(optimizer, "_grad_guard", None)
    if guard is None:
        return
    hook = bool(getattr(optimizer, "_hook_attached", False))
    if not hook and optimizer.world_size == 1:  # local gradient = average: torch's clipping is right
        guard.forget()
        return
    bad = guard.edited(hook, unscaled)
    guard.forget()
    if bad:
        names = ", ".join(f"#{i} {tuple(guard.params[i].shape)}" for i in bad[:3])
        raise RuntimeError(MESSAGE.format(n=len(bad), cls=type(optimizer).__name__, names=names,
                                          why=_WHY_HOOK if hook else _WHY_STANDALONE))


def allow_grad_edits(optimizer: Any, allow: bool = True) -> None:
    """Turn the in-place ``.grad`` edit check of ``optimizer`` off (``allow=True``) or back on."""
    guard: GradEditGuard | None = getattr(optimizer, "_grad_guard", None)
    if guard is None:
        raise TypeError(f"{type(optimizer).__name__} is not a leo_dist sharded optimizer")
    guard.enabled = not allow
    guard.forget()
