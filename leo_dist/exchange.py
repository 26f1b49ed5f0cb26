"""Phase 1 of a sharded step: the gradient exchange.

:class:`GradientExchange` owns everything between a local ``.grad`` and the averaged float32
shard the step consumes. :meth:`GradientExchange.stage` records where each parameter's local
gradient is (``.grad`` through :meth:`GradientExchange.collect`, or DDP's bucket during backward
through the hook) without copying it; once all of a bucket's parameters have arrived, the bucket
is sent at once, in blocks of ``cols`` columns of its ``(W, S)`` view (:data:`CHUNK_ELEMS`
elements, all W rows together): each block is copied from the gradients into a pooled send
buffer (wire dtype, AMP unscaling applied), exchanged (an all-to-all into a pooled receive
buffer, summed in rank order straight into the shard, or ``reduce_scatter_tensor`` into the shard)
and averaged; ``grad_comm="1bit"``'s warm-up steps take this path in ``warmup_grad_comm``'s wire
dtype (fp32 or bf16). When compressing (``grad_comm="1bit"`` past its warm-up) a bucket is compressed
block by block (:func:`leo_dist.onebit.compress_grad_stream_`) into a pooled message table and
sent in one all-to-all, decoded block by block into the shard.

Memory (docs/design.md, "Memory model"): the averaged shards (``4·N/W`` bytes) are allocated once
and reused every step; besides them at most :data:`MAX_INFLIGHT` pooled (send, receive) pairs of
``CHUNK_ELEMS`` wire elements exist (2 × 2 × 2 MiB at fp32), plus, for 1-bit, two float32 scratch
blocks. No step allocates a bucket-sized tensor, and a bucket's gradients are read while the
call that completes it runs (inside the DDP hook), never later.

Bytes per rank and bucket of ``P`` padded elements: reduce-scatter ``(W−1)/W·P·wire_bytes`` sent
and received (booked as one call per bucket, whatever the number of blocks); 1-bit all-to-all
``(W−1)/W·W·(S/8 + 4·⌈S/1024⌉)`` with ``S = P/W``.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import deque
from typing import Callable

import torch
from torch import Tensor

from . import onebit
from .collectives import Comm, naming, sum_in_rank_order
from .partition import Layout
from .sender import BackgroundSender
from .topology import HierComm
from .validation import check_grad

__all__ = ["GradientExchange", "WIRE_DTYPES", "CHUNK_ELEMS", "MAX_INFLIGHT"]

# grad_comm -> dtype the local gradients are staged in (1bit compresses from float32)
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "1bit": torch.float32}

#: elements of one block on the wire, all W rows together (2 MiB of fp32 send buffer)
CHUNK_ELEMS = 1 << 19
#: blocks (1-bit: buckets) in flight at once; each holds one pooled send and receive buffer
MAX_INFLIGHT = 2


class GradientExchange:
    """Reduce-scatter of one step's gradients into this rank's averaged shards.

    Args:
        layout: the optimizer's :class:`~leo_dist.partition.Layout`.
        comm: the :class:`~leo_dist.collectives.Comm` to send on.
        grad_comm: "fp32", "bf16" or "1bit" (see :data:`WIRE_DTYPES`).
        device: where the buffers live.
        compressing: called as each bucket is sent; True to send it 1-bit (``grad_comm="1bit"``
            past its warm-up), False for the uncompressed exchange in ``warmup_grad_comm``.
        warmup_grad_comm: with ``grad_comm="1bit"``, the wire of the uncompressed (warm-up) steps:
            "fp32" or "bf16", exactly as ``grad_comm`` of that name. Ignored otherwise.
        chunk_elems, max_inflight: block size and blocks in flight (memory against overlap).
        sender: a :class:`~leo_dist.sender.BackgroundSender` that sends each completed bucket
            while the caller (the DDP hook, inside backward) returns at once; None sends in the
            caller. ``comm`` must then be a group only the sender issues collectives on.

    State kept across steps: ``grad_error`` (``grad_comm="1bit"``: per bucket, float32 ``[P]``, the
    error feedback of this rank's compressed gradients), and the reused buffers: the averaged
    shards (``shards``), the send/receive pool and the 1-bit scratch. :meth:`reset` forgets only
    which gradients arrived.
    """

    def __init__(self, layout: Layout, comm: Comm, grad_comm: str, device: torch.device,
                 compressing: Callable[[], bool] = lambda: False, chunk_elems: int = CHUNK_ELEMS,
                 max_inflight: int = MAX_INFLIGHT, sender: BackgroundSender | None = None,
                 warmup_grad_comm: str = "fp32"):
        if grad_comm not in WIRE_DTYPES:
            raise ValueError(f"grad_comm must be one of {sorted(WIRE_DTYPES)}, got {grad_comm!r}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.layout, self.comm, self.grad_comm, self.device = layout, comm, grad_comm, device
        if warmup_grad_comm not in ("fp32", "bf16"):
            raise ValueError(f"warmup_grad_comm must be 'fp32' or 'bf16', got {warmup_grad_comm!r}")
        # the dtype of every uncompressed exchange (the 1-bit codec works on float32 scratch of its own)
        self.wire = WIRE_DTYPES[warmup_grad_comm if grad_comm == "1bit" else grad_comm]
        self.compressing = compressing
        self.max_inflight = max_inflight
        self.sender = sender
        w = comm.world
        # columns of a bucket's (W, S) view per block: a multiple of 1024 (the 1-bit scale runs)
        self.cols = onebit.block_columns(w, chunk_elems)
        buckets = layout.buckets
        self._offsets = [[s.offset for s in b.slots] for b in buckets]
        # error feedback of the 1-bit exchange: allocated up front so that checkpoints always have it
        self.grad_error: dict[int, Tensor] = {
            bi: torch.zeros(b.padded, dtype=torch.float32, device=device)
            for bi, b in enumerate(buckets)} if grad_comm == "1bit" else {}
        max_shard = max((b.shard for b in buckets), default=0)
        cols = min(self.cols, max_shard)
        #: two-level exchange (leo_dist.topology): float32 inside the node, the wire dtype across
        self.hier = comm if isinstance(comm, HierComm) and comm.distributed else None
        # the send-buffer row of each owner's shard (rank order for the flat exchange)
        self._row = self.hier.row_order() if self.hier else list(range(w))
        m = self.hier.nodes if self.hier else w  # rows of a 1-bit message table
        wire_bytes = w * cols * torch.finfo(self.wire).bits // 8
        if self.hier:  # float32 (W, c) for the node stage, then the (M, c) partial's wire copy
            wire_bytes = w * cols * 4 + m * cols * torch.finfo(self.wire).bits // 8
        if grad_comm == "1bit":
            wire_bytes = max(wire_bytes, m * max((onebit.grad_payload_bytes(b.shard) for b in buckets), default=0))
        self._pair_bytes = wire_bytes
        self._scratch_numel = 2 * max((onebit.scratch_numel(m, b.shard, self.cols) for b in buckets), default=0)
        self._node_cols = cols
        if self.hier and grad_comm == "1bit":  # the node stage of each compressed block
            self._scratch_numel += 2 * w * cols
        #: the averaged float32 shard of every bucket, allocated at first use and reused
        self.shards: list[Tensor | None] = [None] * len(buckets)
        self._free: list[tuple[Tensor, Tensor]] = []
        self._pairs = 0
        self._scratch: Tensor | None = None
        self._inflight: deque[tuple[Callable[[], None], tuple[Tensor, Tensor], int]] = deque()
        #: streamed steps (:meth:`stream`): stage() sends only buckets with an index below this;
        #: the others wait for :meth:`stream` or :meth:`collect`. None: every bucket once complete.
        self.launch_limit: int | None = None
        self._generation = 0
        self._n = len(buckets)
        self._sent = [False] * self._n
        self._src = [{} for _ in range(self._n)]
        self.reset()

    def reset(self) -> None:
        """Forget which gradients arrived this step (waiting for anything sent this step). A step
        handed to :meth:`stream` is not waited for: it ran, and owns the buffers until it ends."""
        if any(self._sent) or any(self._src):
            if self.sender is not None:
                self.sender.drain()
            while self._inflight:
                self._finish_oldest()
        self._forget()

    def _forget(self) -> None:
        self._src: list[dict[int, tuple]] = [{} for _ in range(self._n)]
        self._sent = [False] * self._n
        self._sources: dict[int, dict[int, tuple]] = {}  # the sent buckets' staged gradients
        self._head_done = 0
        self._generation += 1

    def owns(self, param: Tensor) -> bool:
        return id(param) in self.layout.where

    def stage(self, param: Tensor, grad: Tensor | None, inv_scale: Tensor | None = None) -> None:
        """Record one parameter's local gradient (None: zeros), to be sent times ``inv_scale`` (the
        AMP unscaling) when given; send the bucket once all its parameters have arrived. ``grad``
        is read before the call that completes its bucket returns (no ``sender``), or before
        :meth:`collect`/:meth:`reset` return (with one): it must stay unchanged until then, as
        DDP's bucket views and ``.grad`` do until the next backward."""
        bi, slot = self.layout.where[id(param)]
        b = self.layout.buckets[bi]
        if self._sent[bi]:
            raise RuntimeError("a gradient arrived for a bucket already sent this step: call step() after "
                               "each backward, or accumulate under ddp_model.no_sync()")
        self._src[bi][id(slot)] = (None if grad is None else grad.reshape(-1), inv_scale)
        if len(self._src[bi]) == len(b.slots) and (self.launch_limit is None or bi < self.launch_limit):
            self._launch(bi)

    # ------------------------------------------------------------------ buffers
    def _shard(self, bi: int) -> Tensor:
        if self.shards[bi] is None:
            self.shards[bi] = torch.empty(self.layout.buckets[bi].shard, dtype=torch.float32, device=self.device)
        return self.shards[bi]  # type: ignore[return-value]

    def _take(self) -> tuple[Tensor, Tensor]:
        """A (send, receive) pair of pooled byte buffers, waiting for the oldest block if all are busy."""
        while not self._free and self._pairs >= self.max_inflight:
            self._finish_oldest()
        if self._free:
            return self._free.pop()
        self._pairs += 1
        mk = lambda: torch.empty(self._pair_bytes, dtype=torch.uint8, device=self.device)  # noqa: E731
        return mk(), mk()

    def _finish_oldest(self) -> None:
        finish, pair, bi = self._inflight.popleft()
        with naming(f"bucket {bi}"):
            finish()
        self._free.append(pair)

    def _finish_bucket(self, bi: int) -> None:
        """Finish every block in flight up to bucket ``bi``'s last one (oldest first)."""
        while any(entry[2] == bi for entry in self._inflight):
            self._finish_oldest()

    def _onebit_scratch(self) -> Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self._scratch_numel, dtype=torch.float32, device=self.device)
        return self._scratch

    # ------------------------------------------------------------------ sending
    def _fill(self, bi: int, j0: int, j1: int, dst: Tensor, src: dict[int, tuple]) -> None:
        """``dst`` (``(W, j1 − j0)``, rows contiguous) ← columns ``[j0, j1)`` of bucket ``bi``'s
        local gradients viewed as ``(W, S)``, unscaled; zeros for missing gradients and padding.
        Owner ``r``'s columns go to row ``self._row[r]`` (``r`` unless the exchange is two-level)."""
        b = self.layout.buckets[bi]
        offsets, slots = self._offsets[bi], b.slots
        for r in range(self.comm.world):
            lo, hi = r * b.shard + j0, r * b.shard + j1
            row = dst[self._row[r]]
            i = max(0, bisect_right(offsets, lo) - 1)
            while i < len(slots) and slots[i].offset < hi:
                s = slots[i]
                i += 1
                a, e = max(lo, s.offset), min(hi, s.offset + s.numel)
                if a >= e:
                    continue
                piece = row[a - lo : e - lo]
                g, inv_scale = src[id(s)]
                if g is None:
                    piece.zero_()
                else:
                    piece.copy_(g[a - s.offset : e - s.offset])
                    if inv_scale is not None:
                        piece.mul_(inv_scale)
            if hi > b.numel:
                row[max(b.numel, lo) - lo :].zero_()

    def _launch(self, bi: int) -> None:
        self._sent[bi] = True
        src, self._src[bi] = self._src[bi], {}
        self._sources[bi] = src
        if self.sender is None:
            self._send(bi, src)
        else:
            generation = self._generation

            def job() -> None:
                self._send(bi, src)
                if generation == self._generation:
                    self._head_done += 1
            self.sender.submit(job)

    def _send(self, bi: int, src: dict[int, tuple]) -> None:
        with naming(f"bucket {bi}"):
            self._send_blocks(bi, src)

    def _send_blocks(self, bi: int, src: dict[int, tuple]) -> None:
        b, world, shard = self.layout.buckets[bi], self.comm.world, self._shard(bi)
        if self.hier is not None:
            if self.grad_comm == "1bit" and self.compressing():
                self._send_hier_1bit(bi, src)
            else:
                self._send_hier(bi, src)
            return
        if self.grad_comm == "1bit" and self.compressing():
            send_b, recv_b = pair = self._take()
            pb = onebit.grad_payload_bytes(b.shard)
            send = send_b[: world * pb].view(world, pb)
            recv = recv_b[: world * pb].view(world, pb)
            scratch = self._onebit_scratch()
            onebit.compress_grad_stream_(lambda j0, j1, xc: self._fill(bi, j0, j1, xc, src), self.grad_error[bi], send,
                                         world, b.shard, b.numel, self.cols, scratch)
            work = self.comm.all_to_all_start(recv, send)

            def finish() -> None:
                work.wait()
                onebit.decode_grad(recv, world, b.shard, out=shard, cols=self.cols, scratch=scratch)
            self._inflight.append((finish, pair, bi))
        else:
            self.comm.book_reduce_scatter(b.padded, self.wire)
            for j0 in range(0, b.shard, self.cols):
                j1 = min(b.shard, j0 + self.cols)
                n = world * (j1 - j0)
                send_b, recv_b = pair = self._take()
                send = send_b.view(self.wire)[:n].view(world, j1 - j0)
                recv = recv_b.view(self.wire)[:n].view(world, j1 - j0)
                self._fill(bi, j0, j1, send, src)
                out = shard[j0:j1]
                summed = self.comm.reduce_scatter_into_start(out, send, recv, count=False)

                def finish(summed=summed, out=out) -> None:
                    summed()
                    if world > 1:
                        out.div_(world)  # the only division by W
                self._inflight.append((finish, pair, bi))

    # ------------------------------------------------------------------ two levels
    def _node_stage(self, bi: int, j0: int, j1: int, send: Tensor, recv: Tensor, src: dict[int, tuple]) -> Tensor:
        """The node stage of columns ``[j0, j1)`` (``send``/``recv``: float32 ``(W, c)``), waited
        for: the float32 ``(M, c)`` node sums (a view of ``send``) of the shards of the M owners
        with this rank's local rank, in node order."""
        h, c = self.hier, j1 - j0
        self._fill(bi, j0, j1, send, src)
        h.intra.all_to_all_start(recv, send).wait()
        out = send.view(-1)[: h.nodes * c]
        sum_in_rank_order(recv.view(h.local, h.nodes * c), out=out)  # local-rank order, float32
        return out.view(h.nodes, c)

    def _send_hier(self, bi: int, src: dict[int, tuple]) -> None:
        """Two-level fp32/bf16 exchange of bucket ``bi``, block after block. Each block's node stage
        (fast link) is waited for at once, and its cross-node stage launched right after, so the
        slow link never idles while a finished node stage waits for a free buffer; the cross-node
        stages of consecutive blocks queue back to back on it."""
        b, h, shard = self.layout.buckets[bi], self.hier, self._shard(bi)
        m, w = h.nodes, h.world
        esize = torch.finfo(self.wire).bits // 8
        for j0 in range(0, b.shard, self.cols):
            j1 = min(b.shard, j0 + self.cols)
            c = j1 - j0
            send_b, recv_b = pair = self._take()
            send = send_b.view(torch.float32)[: w * c].view(w, c)
            recv = recv_b.view(torch.float32)[: w * c].view(w, c)
            p = self._node_stage(bi, j0, j1, send, recv, src)
            if self.wire == torch.float32 or m == 1:  # one node: nothing crosses, nothing is rounded
                wire = p
            else:  # one rounding of the node's sum, after the node's exact float32 sum
                wire = send_b[w * c * 4 : w * c * 4 + m * c * esize].view(self.wire).view(m, c)
                wire.copy_(p)
            out = shard[j0:j1]
            summed = h.inter.reduce_scatter_into_start(out, wire, recv_b.view(self.wire)[: m * c].view(m, c))

            def finish(summed=summed, out=out) -> None:
                summed()
                out.div_(w)  # the only division by W
            self._inflight.append((finish, pair, bi))

    def _send_hier_1bit(self, bi: int, src: dict[int, tuple]) -> None:
        """Two-level 1-bit exchange of bucket ``bi``: each block's node sums (float32, exact
        inside the node) are compressed with error feedback for the M owners across nodes, and
        sent in one inter all-to-all; the owner decodes and divides by W. The error buffer rows
        used are those of the owners with this rank's local rank."""
        b, h, shard = self.layout.buckets[bi], self.hier, self._shard(bi)
        m, g, w = h.nodes, h.local, h.world
        send_b, recv_b = pair = self._take()
        pb = onebit.grad_payload_bytes(b.shard)
        send = send_b[: m * pb].view(m, pb)
        recv = recv_b[: m * pb].view(m, pb)
        scratch = self._onebit_scratch()
        nc = self._node_cols
        codec = scratch[: scratch.numel() - 2 * w * nc]
        node_send = scratch[codec.numel() : codec.numel() + w * nc]
        node_recv = scratch[codec.numel() + w * nc :]

        def fill(j0: int, j1: int, xc: Tensor) -> None:
            c = j1 - j0
            xc.copy_(self._node_stage(bi, j0, j1, node_send[: w * c].view(w, c), node_recv[: w * c].view(w, c), src))
        err = self.grad_error[bi].view(m, g, b.shard)[:, h.local_rank, :]
        valid = [max(0, min(b.shard, b.numel - (n * g + h.local_rank) * b.shard)) for n in range(m)]
        onebit.compress_grad_stream_(fill, err, send, m, b.shard, valid, self.cols, codec)
        work = h.inter.all_to_all_start(recv, send)

        def finish() -> None:
            work.wait()
            onebit.decode_grad(recv, m, b.shard, out=shard, cols=self.cols, scratch=codec)
            if g > 1:
                shard.div_(g)  # decode averaged over the M nodes' sums
        self._inflight.append((finish, pair, bi))

    def set_mean_error(self, bi: int, mean: Tensor) -> None:
        """Load the 1-bit error feedback of bucket ``bi`` from its mean over ranks (float32
        ``[P]``, what checkpoints keep): every rank's buffer becomes ``mean`` for the flat exchange;
        for the two-level one, the rows of the owners this rank compresses for become ``G·mean``
        and the others zero, so that the node sums still owe the same total and the next mean is
        the same ``mean``."""
        err = self.grad_error[bi]
        if self.hier is None:
            err.copy_(mean)
            return
        h, shard = self.hier, self.layout.buckets[bi].shard
        err.zero_()
        mine = err.view(h.nodes, h.local, shard)[:, h.local_rank, :]
        mine.copy_(mean.view(h.nodes, h.local, shard)[:, h.local_rank, :]).mul_(h.local)

    # ------------------------------------------------------------------ streamed steps
    def streamable(self) -> bool:
        """Whether this step can be :meth:`stream`-ed: a launch limit is set, every bucket is
        complete, and only those below the limit are sent (no :meth:`collect` ran)."""
        lim = self.launch_limit
        return (self.sender is not None and lim is not None
                and all(self._sent[bi] == (bi < lim) for bi in range(self._n))
                and all(len(self._src[bi]) == len(self.layout.buckets[bi].slots) for bi in range(lim, self._n)))

    def head_done(self) -> int:
        """Buckets the sender has finished launching this step (read from the main thread)."""
        return self._head_done

    def staged_overflow(self, bound: float) -> Tensor:
        """A float32 0-d tensor: 1 if some staged local gradient of this step (sent or not) has an
        element whose magnitude is not below ``bound`` (inf and NaN included), else 0. One read
        of the gradients in blocks, no host sync."""
        flag = torch.zeros((), dtype=torch.float32, device=self.device)
        for src in [*self._sources.values(), *self._src]:
            for g, _ in src.values():
                if g is None or g.numel() == 0:
                    continue
                for i in range(0, g.numel(), CHUNK_ELEMS):
                    # NaN compares False, so NaN counts as an overflow
                    flag = torch.maximum(flag, (~(g[i : i + CHUNK_ELEMS].abs().amax() < bound)).float())
        return flag

    def stream(self, order: list[int], then: list[int], pack: Callable[[int], object],
               publish: Callable[[object], None], filled: Callable[[], None],
               end: Callable[[BaseException | None], None]) -> None:
        """Hand this step to the sender as one program (collective; the same lists on every rank).

        It sends the unsent buckets ``order`` one after the other. Once a bucket's shard is
        complete (after the next bucket's blocks are launched, so the wire never waits for it),
        ``pack(bi)`` steps it and may start collectives on :attr:`comm`, returning a handle;
        ``publish(handle)`` runs one bucket later (so those collectives travel behind the next
        blocks rather than stall the sender) and may start more. Then the last bucket and those
        of ``then`` (sent before, all complete) are packed and published. ``filled()`` runs once
        every gradient has been read, ``end(error)`` last. Every collective of the program is
        issued by the sender, in this order, so ranks agree whatever each thread's timing."""
        srcs = {bi: self._src[bi] for bi in order}
        for bi in order:
            self._sent[bi] = True

        def program() -> None:
            try:
                prev, pending = None, []
                for bi in order:
                    self._send(bi, srcs.pop(bi))
                    for handle in pending:
                        publish(handle)
                    pending = []
                    if prev is not None:
                        self._finish_bucket(prev)
                        pending.append(pack(prev))
                    prev = bi
                filled()
                while self._inflight:
                    self._finish_oldest()
                pending += [pack(bi) for bi in ([] if prev is None else [prev]) + then]
                for handle in pending:
                    publish(handle)
            except BaseException as e:
                end(e)
                raise
            end(None)
        self.sender.submit(program)
        self._forget()

    def sent_any(self) -> bool:
        """Whether some bucket has been sent since the last :meth:`reset`."""
        return any(self._sent)

    def collect(self, inv_scale: Tensor | None = None) -> list[Tensor]:
        """The averaged gradient shard of every bucket (float32, ``bucket.shard`` elements each;
        the same tensors every step), staging from ``.grad`` (times ``inv_scale`` when given) and
        sending whatever the DDP hook has not already sent."""
        for bi, b in enumerate(self.layout.buckets):
            if not self._sent[bi]:
                for s in b.slots:
                    if id(s) not in self._src[bi]:
                        if s.param.grad is not None:
                            check_grad(s.param)
                        self.stage(s.param, s.param.grad, inv_scale)
                if not self._sent[bi]:  # complete, held back by launch_limit
                    self._launch(bi)
        if self.sender is not None:
            self.sender.drain()
        while self._inflight:
            self._finish_oldest()
        return [self._shard(bi) for bi in range(len(self.layout.buckets))]
