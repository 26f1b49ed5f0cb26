"""Topology-aware collectives: ranks on M nodes of G ranks each, a fast link inside a node and a
slow one between nodes (``ranks_per_node=`` of the sharded optimizers).

Rank ``r`` of the group lives on node ``r // G`` as local rank ``r % G`` (torchrun's numbering:
``RANK = GROUP_RANK·LOCAL_WORLD_SIZE + LOCAL_RANK``). Every rank still owns shard ``r`` of every
bucket, so the layout, the momentum and the checkpoints are those of the flat exchange. Two
families of groups carry the traffic: *intra* (the G ranks of one node) and *inter* (the M
ranks with the same local rank, one per node).

====================  ===============================================  ==========================
collective            how it travels                                   bytes per rank crossing nodes
====================  ===============================================  ==========================
gradient exchange     intra all-to-all at float32, summed in local-    ``(M−1)/M·N/G·wire_bytes``
(GradientExchange)    rank order → the node's partial sums of the M
                      shards of the ranks with my local rank; then an
                      inter reduce-scatter of those in the wire dtype
                      (fp32, bf16; or 1-bit with error feedback)
all-gather (updates)  inter all-gather (my shard to my peer on every   ``(M−1)·k``
                      node), then intra all-gather of the M pieces,
                      reordered into rank order
all-reduce            intra, then inter                                ``2(M−1)/M·n``
====================  ===============================================  ==========================

So the packed update bits cross the slow link once per node (N/8 bytes per node pair and
direction), not once per rank, and the gradients cross it once as the node's sum. Every other
collective (broadcast, gather, the flat all-to-all) runs on the whole group as before. Bytes book
under ``kind:intra`` and ``kind:inter`` in the optimizer's :class:`~leo_dist.collectives.CommStats`.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import Comm, CommStats, Done

__all__ = ["HierComm", "check_node_numbering", "node_mesh", "resolve_ranks_per_node"]


def resolve_ranks_per_node(value: Any, world: int) -> int | None:
    """``ranks_per_node`` as given to a sharded optimizer → G, or None for the flat exchange.

    ``None``: flat. An int ``G``: G ranks per node (it must divide the world size). ``"auto"``:
    torchrun's ``LOCAL_WORLD_SIZE``. Raises ``TypeError``/``ValueError`` naming ``ranks_per_node``.
    """
    if value is None:
        return None
    if value == "auto":
        raw = os.environ.get("LOCAL_WORLD_SIZE")
        if raw is None:
            raise ValueError("ranks_per_node='auto' reads LOCAL_WORLD_SIZE (set by torchrun), which is not set; "
                             "pass the number of ranks per node")
        value = int(raw)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ranks_per_node must be None, 'auto' or an int, got {value!r}")
    if value < 1 or world % value:
        raise ValueError(f"ranks_per_node must be a positive divisor of the world size {world}, got {value}")
    return value


class _Staged:
    """The work handle of a two-level all-gather: ``wait()`` finishes the inter stage, runs the
    intra stage and writes ``out`` in rank order (idempotent)."""

    def __init__(self, comm: "HierComm", out: Tensor, mid: Tensor, work: Any):
        self.comm, self.out, self.mid, self.work = comm, out, mid, work

    def wait(self, *args) -> bool:
        if self.work is None:
            return True
        self.work.wait()
        self.work = None
        c = self.comm
        k = self.mid.numel() // c.nodes
        full = torch.empty(c.world * k, dtype=self.mid.dtype, device=self.mid.device)
        c.intra.all_gather(full, self.mid)
        # full is (local rank, node, k); rank order is (node, local rank, k)
        self.out.view(c.nodes, c.local, k).copy_(full.view(c.local, c.nodes, k).transpose(0, 1))
        self.mid = None
        return True


class HierComm(Comm):
    """A :class:`~leo_dist.collectives.Comm` over ``group`` whose all-gathers and all-reduces go
    through the node hierarchy (module doc); ``ranks_per_node`` = G divides the group's size.

    Collective at construction: every rank creates every intra and inter group (M + G
    ``new_group`` calls, same order everywhere), with the group's backend and timeout.
    Attributes: ``local`` (G), ``nodes`` (M), ``node`` and ``local_rank`` of this rank, ``intra``
    and ``inter`` (:class:`Comm` objects; a world of one where a level has a single rank).
    """

    def __init__(self, group: dist.ProcessGroup | None, ranks_per_node: int, stats: CommStats | None = None):
        super().__init__(group, stats)
        g = ranks_per_node
        if self.world % g:
            raise ValueError(f"ranks_per_node must divide the world size {self.world}, got {g}")
        self.local, self.nodes = g, self.world // g
        self.node, self.local_rank = divmod(self.rank, g)
        if not self.distributed:
            self.intra = Comm(None, self.stats, "intra", solo=True)
            self.inter = Comm(None, self.stats, "inter", solo=True)
            return
        ranks = dist.get_process_group_ranks(self.group)
        self.intra = self._level([[ranks[n * g + l] for l in range(g)] for n in range(self.nodes)], self.node,
                                 "intra")
        self.inter = self._level([[ranks[n * g + l] for n in range(self.nodes)] for l in range(g)],
                                 self.local_rank, "inter")

    def _level(self, members: list[list[int]], mine: int, label: str) -> Comm:
        if len(members[0]) == 1:  # a level of one rank: no group, nothing on the wire
            return Comm(None, self.stats, label, solo=True)
        groups = [self.subgroup(m) for m in members]  # every rank creates every group, in order
        comm = Comm(groups[mine], self.stats, label)
        comm.native_reduce_scatter = self.native_reduce_scatter
        return comm

    def duplicate(self) -> "HierComm":
        """:meth:`Comm.duplicate` of the group and of both levels (collective)."""
        flat = super().duplicate()
        twin = HierComm(flat.group, self.local, self.stats)  # new levels, every rank creating every group
        twin.native_reduce_scatter = self.native_reduce_scatter
        return twin

    # ------------------------------------------------------------------ all-gather
    def all_gather_start(self, out: Tensor, inp: Tensor, count: bool = True):
        """Two-level :meth:`Comm.all_gather_start`: the inter stage is on the wire when this
        returns; ``wait()`` runs the intra stage. Books each stage itself, whatever ``count``
        says (its blocks then read as several calls)."""
        if not self.distributed:
            out.copy_(inp)
            return Done()
        if self.local == 1:
            return self.inter.all_gather_start(out, inp)
        if self.nodes == 1:
            return self.intra.all_gather_start(out, inp)
        mid = torch.empty(self.nodes * inp.numel(), dtype=inp.dtype, device=inp.device)
        return _Staged(self, out, mid, self.inter.all_gather_start(mid, inp))

    def all_gather(self, out: Tensor, inp: Tensor) -> None:
        self.all_gather_start(out, inp).wait()

    def book(self, kind: str, bytes_in: int, bytes_out: int, sent: float, received: float) -> None:
        """Logical all-gathers and reduce-scatters book per level as they travel (see
        :meth:`all_gather_start`); other kinds as :meth:`Comm.book`."""
        if kind not in ("all_gather", "reduce_scatter"):
            super().book(kind, bytes_in, bytes_out, sent, received)

    def book_reduce_scatter(self, numel: int, dtype: torch.dtype) -> None:
        return None

    # ------------------------------------------------------------------ all-reduce
    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> None:
        """Inside each node, then across nodes: every rank ends with the same value (each level's
        result is the same on all of its ranks, and the inter groups reduce equal inputs alike)."""
        self.intra.all_reduce(t, op)
        self.inter.all_reduce(t, op)

    def all_reduce_start(self, t: Tensor, op=dist.ReduceOp.SUM):
        """The intra stage runs now (fast link); returns the inter stage's work handle."""
        self.intra.all_reduce(t, op)
        return self.inter.all_reduce_start(t, op)

    def row_order(self) -> list[int]:
        """Row of owner ``r``'s shard in the send buffer of the two-level gradient exchange:
        owners grouped by the local rank they reach first, ``(r % G)·M + r // G``."""
        return [(r % self.local) * self.nodes + r // self.local for r in range(self.world)]


def check_node_numbering(comm: Comm, ranks_per_node: int, device: torch.device) -> None:
    """For ``ranks_per_node="auto"``: ``ValueError`` on every rank unless the group's ranks are
    numbered node by node (ranks ``n·G … n·G + G − 1`` share torchrun's ``GROUP_RANK``, and no two
    nodes share one). Collective (one all-gather of one int64); nothing to check without
    ``GROUP_RANK`` in the environment."""
    if not comm.distributed or "GROUP_RANK" not in os.environ:
        return
    mine = torch.tensor([int(os.environ["GROUP_RANK"])], dtype=torch.int64, device=device)
    table = torch.empty(comm.world, dtype=torch.int64, device=device)
    comm.all_gather(table, mine)
    nodes = table.view(-1, ranks_per_node).cpu()
    if not (nodes == nodes[:, :1]).all() or len(set(nodes[:, 0].tolist())) != nodes.shape[0]:
        raise ValueError(f"ranks_per_node='auto' ({ranks_per_node} per node, from LOCAL_WORLD_SIZE) needs the "
                         f"ranks numbered node by node, but their GROUP_RANKs are {table.tolist()}; pass "
                         "process_group= a group whose ranks are, or ranks_per_node=None for the flat exchange")


def node_mesh(device_type: str = "cpu", ranks_per_node: int | str = "auto"):
    """A 2-D ``DeviceMesh`` of (node, local rank) over the whole world, dims named ("node",
    "local"), for ``process_group=`` of the sharded optimizers: ``ranks_per_node`` ranks per node
    ("auto", the default: torchrun's ``LOCAL_WORLD_SIZE``, with the node-by-node numbering checked
    against ``GROUP_RANK`` where torchrun sets it). Collective over the default group, which must
    be initialised. Raises ``ValueError``/``TypeError`` naming ``ranks_per_node``."""
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("node_mesh needs torch.distributed's default group (call init_process_group first)")
    world = dist.get_world_size()
    g = resolve_ranks_per_node(ranks_per_node, world)
    if ranks_per_node == "auto":
        check_node_numbering(Comm(None), g, torch.device(device_type, torch.cuda.current_device())
                             if device_type == "cuda" else torch.device(device_type))
    return init_device_mesh(device_type, (world // g, g), mesh_dim_names=("node", "local"))
