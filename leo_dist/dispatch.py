"""Choice between the Triton kernels and the torch path (``fused=None | True | False``)."""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

from torch import Tensor

__all__ = ["triton_available", "interpreter_enabled", "resolve_fused"]


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
