"""Process groups given as a ``torch.distributed.ProcessGroup``, a 1-D ``DeviceMesh``, or a 2-D
``DeviceMesh`` of (node, local rank) for the topology-aware exchange."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["resolve_group", "resolve_topology", "NODE_DIM_NAMES", "LOCAL_DIM_NAMES"]

# The names a 2-D mesh's dims must carry to be read as (node, local rank), both data-parallel:
# ours, and HSDP's (replicate across nodes, shard inside one). A (dp, tp) mesh passed whole by
# mistake must not silently average over its tensor-parallel ranks.
NODE_DIM_NAMES = ("node", "inter", "replicate", "dp_replicate")
LOCAL_DIM_NAMES = ("local", "intra", "shard", "dp_shard")


def _device_mesh_type():
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        return ()
    return DeviceMesh


def resolve_group(process_group: Any) -> dist.ProcessGroup | None:
    """``None`` and process groups pass through; a 1-D ``DeviceMesh`` becomes ``mesh.get_group()``.

    Raises ``ValueError`` for a mesh of more than one dimension (pass ``mesh["dp"]``, the
    data-parallel dimension) and ``TypeError`` for anything else.
    """
    if process_group is None or isinstance(process_group, dist.ProcessGroup):
        return process_group
    if isinstance(process_group, _device_mesh_type()):
        if process_group.ndim != 1:
            raise ValueError(f"process_group: a DeviceMesh must be 1-D (the data-parallel dimension, e.g. "
                             f"mesh['dp']) or 2-D of (node, local rank) with its dims named "
                             f"{NODE_DIM_NAMES[0]!r} and {LOCAL_DIM_NAMES[0]!r} (or HSDP's 'replicate', 'shard'), "
                             f"got {process_group.ndim} dimensions {tuple(process_group.shape)} named "
                             f"{process_group.mesh_dim_names}")
        return process_group.get_group()
    raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or None, got "
                    f"{type(process_group).__name__}")


def resolve_topology(process_group: Any, ranks_per_node: Any) -> tuple[dist.ProcessGroup | None, Any]:
    """``(group, ranks_per_node)`` of a sharded optimizer's ``process_group``/``ranks_per_node``.

    A 2-D ``DeviceMesh`` whose dims are named (node, local rank) — ``NODE_DIM_NAMES[i]``,
    ``LOCAL_DIM_NAMES[j]``, e.g. ``init_device_mesh("cuda", (nodes, gpus), mesh_dim_names=("node",
    "local"))`` — means data parallelism over the whole mesh with the two-level exchange: the
    group is the default group and ``ranks_per_node`` the mesh's second size. The mesh must
    hold every rank of the default group, numbered node by node (``mesh.mesh`` is
    ``arange(W).view(nodes, G)``), and ``ranks_per_node`` must then be left None (the mesh says
    it). Everything else goes through :func:`resolve_group` unchanged. Raises ``ValueError``
    naming the parameter otherwise.
    """
    if not isinstance(process_group, _device_mesh_type()) or process_group.ndim != 2:
        return resolve_group(process_group), ranks_per_node
    mesh = process_group
    names = mesh.mesh_dim_names
    if names is None or names[0] not in NODE_DIM_NAMES or names[1] not in LOCAL_DIM_NAMES:
        resolve_group(mesh)  # raises, with the accepted names
    if ranks_per_node is not None:
        raise ValueError(f"ranks_per_node: with a 2-D DeviceMesh of (node, local rank) the mesh gives the ranks per "
                         f"node ({mesh.shape[1]}); leave ranks_per_node None, got {ranks_per_node!r}")
    ranks = mesh.mesh.flatten().tolist()
    if ranks != list(range(dist.get_world_size())):
        raise ValueError(f"process_group: a 2-D DeviceMesh of (node, local rank) must hold every rank of the default "
                         f"group numbered node by node (arange({dist.get_world_size()}).view{tuple(mesh.shape)}), "
                         f"got {mesh.mesh.tolist()}; for a subset of the ranks pass process_group= their group "
                         "and ranks_per_node=")
    return None, int(mesh.shape[1])
