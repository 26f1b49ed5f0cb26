"""The one place that decides how a local step runs: Triton kernels, the C library, or torch.

Every optimizer asks :func:`select_backend` once, at construction, and then calls the returned
back end's four operations; nothing else in leo_dist chooses between implementations:

* ``lion_step`` / ``leo_step``: a whole single-process step over paired lists (contract of
  :func:`leo_dist.functional.lion_update` / :func:`~leo_dist.functional.leo_update`).
* ``sign_shard_step_`` / ``apply_signs_``: the two memory-bound passes of a sharded sign step
  (contract in :mod:`leo_dist.local_step`).

Back ends: ``"triton"`` (:mod:`leo_dist.kernels`, CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``"cpu"`` (:mod:`leo_dist.cpu_step`, one C pass, for contiguous CPU
float32/bfloat16 tensors when the library builds, else the torch code with the same results).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

from torch import Tensor

from . import functional, local_step

__all__ = ["triton_available", "interpreter_enabled", "resolve_fused", "select_backend", "Backend"]


def triton_available() -> bool:
    """True when the optional ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton runs kernels on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_fused(fused: bool | None, tensors: Sequence[Tensor]) -> bool:
    """Decide whether an optimizer over ``tensors`` uses the Triton kernels.

    ``None``: yes when every tensor is on CUDA and Triton is importable. ``True``: yes, or a
    ``RuntimeError`` saying why not (no Triton; CPU tensors without the interpreter). ``False``: no.
    """
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if fused is None:
        return on_cuda and triton_available()
    if not fused:
        return False
    if not triton_available():
        raise RuntimeError("fused=True needs Triton: pip install 'leo-dist[triton]'")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError("fused=True on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1); "
                           "use fused=False or None for the CPU path")
    return True


def _c_path(*tensors: Tensor) -> bool:
    from . import cpu_step
    return cpu_step.supports(*tensors) and cpu_step.available()


class Backend:
    """The ``"cpu"`` back end: the C library where it applies, the torch code otherwise."""

    name = "cpu"
    kernels = None  # the Triton kernels module, for the parts of a step that call it directly

    def lion_step(self, params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, sign_scale=1.0) -> None:
        kw = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
        if _c_path(*params, *grads, *exp_avgs):
            from . import cpu_step
            cpu_step.lion_step_(params, grads, exp_avgs, sign_scale=sign_scale, **kw)
        else:
            functional.lion_update(params, grads, exp_avgs, sign_scale=sign_scale, **kw)

    def leo_step(self, params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, align_const, eps,
                 orthogonalize=True) -> None:
        kw = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, align_const=align_const, eps=eps,
                  orthogonalize=orthogonalize)
        if _c_path(*params, *grads, *exp_avgs):
            from . import cpu_step
            cpu_step.leo_step_(params, grads, exp_avgs, **kw)
        else:
            functional.leo_update(params, grads, exp_avgs, **kw)

    sign_shard_step_ = staticmethod(local_step.sign_shard_step_)
    apply_signs_ = staticmethod(local_step.apply_signs_)


class _TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        from . import kernels  # imports Triton: only when this back end is chosen
        self._k = self.kernels = kernels
        self.sign_shard_step_ = kernels.sign_shard_step_
        self.apply_signs_ = kernels.apply_signs_

    def lion_step(self, params, grads, exp_avgs, **kw) -> None:
        self._k.lion_step(params, grads, exp_avgs, **kw)

    def leo_step(self, params, grads, exp_avgs, **kw) -> None:
        self._k.leo_step(params, grads, exp_avgs, **kw)


def select_backend(fused: bool | None, tensors: Sequence[Tensor]) -> Backend:
    """The back end an optimizer over ``tensors`` uses (see :func:`resolve_fused` for ``fused``)."""
    return _TritonBackend() if resolve_fused(fused, tensors) else Backend()
