"""Process groups given as a ``torch.distributed.ProcessGroup`` or a 1-D ``DeviceMesh``."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["resolve_group"]


def resolve_group(process_group: Any) -> dist.ProcessGroup | None:
    """``None`` and process groups pass through; a 1-D ``DeviceMesh`` becomes ``mesh.get_group()``.

    Raises ``ValueError`` for a mesh of more than one dimension (pass ``mesh["dp"]``, the
    data-parallel dimension) and ``TypeError`` for anything else.
    """
    if process_group is None or isinstance(process_group, dist.ProcessGroup):
        return process_group
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        DeviceMesh = ()  # type: ignore[assignment]
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(f"process_group: a DeviceMesh must be 1-D (the data-parallel dimension, e.g. "
                             f"mesh['dp']), got {process_group.ndim} dimensions {tuple(process_group.shape)}")
        return process_group.get_group()
    raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or None, got "
                    f"{type(process_group).__name__}")
