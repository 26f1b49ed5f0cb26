"""ZeRO-style sharded Lion and Leo with 1-bit packed updates (SPEC §2).

Every rank keeps a full replica of the parameters and 1/W of the momentum. One step:

1. reduce-scatter: each bucket's gradients, flattened in the wire dtype (fp32 or bf16), are
   summed across ranks into the owner's shard (gloo: all-to-all + local sum; NCCL:
   reduce_scatter_tensor) and divided by W once. Sends ``(W−1)/W·N·wire_bytes`` per rank.
2. local step on the shard: momentum, ``c``, and the update. Leo's matrices complete their row
   and column norms with one all-reduce of ``Σ(rows+cols)`` floats and their RMS with one of a
   float per matrix.
3. all-gather: sign buckets send ``S/8`` bytes of packed bits plus an 8-byte header per rank
   (and, only when some ``c`` is exactly 0, a second all-gather of the ``S/8``-byte zero
   bitmaps); Leo's matrix buckets send their update in the parameter dtype. Every rank decodes
   and applies ``p ← p·(1−lr·wd) − lr·update`` to its replica, from the same bytes with the same
   arithmetic, so replicas stay bitwise identical.

A parameter whose ``.grad`` is None on a rank contributes a zero gradient (the sharded step
cannot skip a parameter unless every rank agrees it has no gradient; unlike the single-process
optimizers it still decays and its momentum still moves).

Transient memory: at most two buckets' send and receive buffers at once, plus the float32
gradient shards (N/W elements) between the exchange and the step.
"""
from __future__ import annotations

import warnings
import zlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from . import local_step
from .collectives import Comm
from .exchange import GradientExchange
from .dispatch import resolve_fused
from .matrix import MatrixSlice, MatrixSteps, NormLayout
from .packing import HEADER_BYTES, bit_slice
from .partition import Bucket, Slot, build_buckets
from .validation import check_hyperparameters, check_momentum_dtype, check_param

__all__ = ["ShardedLion", "ShardedLeo"]

# GradScaler hands itself to optimizers whose step() takes `grad_scaler` (see step()), with a
# FutureWarning about a future protocol that would not let us make found_inf agree across ranks.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)

# grad_comm -> dtype the local gradients are staged in (1bit compresses from float32)
_GRAD_COMMS = {"fp32": torch.float32, "bf16": torch.bfloat16, "1bit": torch.float32}
class _ShardedOptimizer(GradientExchange, MatrixSteps, Optimizer):
    _leo = False

    def __init__(self, params, defaults: dict[str, Any], *, process_group, grad_comm: str, update_comm: str,
                 bucket_mb: float, momentum_dtype, fused, sync_params: bool, grad_comm_warmup: int = 10):
        if grad_comm not in _GRAD_COMMS:
            raise ValueError(f"grad_comm must be one of {sorted(_GRAD_COMMS)}, got {grad_comm!r}")
        if update_comm not in ("exact", "1bit"):
            raise ValueError(f"update_comm must be 'exact' or '1bit', got {update_comm!r}")
        if isinstance(grad_comm_warmup, bool) or not isinstance(grad_comm_warmup, int) or grad_comm_warmup < 0:
            raise ValueError(f"grad_comm_warmup must be a non-negative int, got {grad_comm_warmup!r}")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
        check_hyperparameters(defaults)
        self._momentum_dtype = check_momentum_dtype(momentum_dtype)
        self.grad_comm, self.update_comm = grad_comm, update_comm
        self._wire = _GRAD_COMMS[grad_comm]
        self.grad_comm_warmup = grad_comm_warmup
        self._steps_done = 0
        self._frozen = False
        super().__init__(params, defaults)
        self._frozen = True

        flat = [p for g in self.param_groups for p in g["params"]]
        for p in flat:
            check_param(p)
        devices = {p.device for p in flat}
        if len(devices) > 1:
            raise ValueError(f"params must all be on one device, got {sorted(map(str, devices))}")
        self._device = flat[0].device
        self._comm = Comm(process_group)
        self._fused = resolve_fused(fused, flat)

        entries, index = [], 0
        for group in self.param_groups:
            rows = []
            for p in group["params"]:
                matrix = self._leo and group["orthogonalize"] and p.ndim == 2
                rows.append((index, p, "matrix" if matrix else "sign"))
                index += 1
            entries.append(rows)
        self._buckets: list[Bucket] = build_buckets(entries, self._comm.world, int(bucket_mb * 2**20))
        self._where: dict[int, tuple[int, Slot]] = {}
        for bi, b in enumerate(self._buckets):
            for s in b.slots:
                self._where[id(s.param)] = (bi, s)
        with self._comm.stats.outside_step():
            self._check_same_layout_everywhere()
            if sync_params:
                self._broadcast_params()
        self._init_state()
        self._reset_exchange()
        self._hook_attached = False
        self._hook_scaler = None
        self._ddp_checked = False

    # ----------------------------------------------------------------- layout and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_frozen", False):
            raise RuntimeError("sharded optimizers fix their bucket layout at construction; add_param_group "
                               "afterwards is not supported: build a new optimizer with every group")
        super().add_param_group(param_group)
        check_hyperparameters(self.param_groups[-1])

    def _check_same_layout_everywhere(self) -> None:
        """Fail on every rank, instead of hanging, when ranks disagree on the parameters."""
        desc = []
        for g in self.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            desc.append((sorted(hyper.items(), key=lambda kv: kv[0]),
                         [(tuple(p.shape), str(p.dtype)) for p in g["params"]]))
        params_crc = zlib.crc32(repr([d[1] for d in desc]).encode())
        hyper_crc = zlib.crc32(repr([d[0] for d in desc]).encode())
        n_params = sum(len(g["params"]) for g in self.param_groups)
        mine = torch.tensor([n_params, len(self.param_groups), params_crc, hyper_crc, self._comm.world],
                            dtype=torch.int64, device=self._device)
        if not self._comm.distributed:
            return
        table = torch.empty(self._comm.world * mine.numel(), dtype=torch.int64, device=self._device)
        self._comm.all_gather(table, mine)
        table = table.view(self._comm.world, -1).cpu()
        bad = [r for r in range(self._comm.world) if not torch.equal(table[r], table[0])]
        if bad:
            what = "parameter list (count, shapes or dtypes)" if any(
                table[r, :3].ne(table[0, :3]).any() for r in bad) else "param-group hyperparameters"
            raise ValueError(f"ranks disagree on the {what}: rank 0 has {table[0].tolist()[:2]} (params, groups), "
                             f"ranks {bad} differ; every rank must build the optimizer over the same model")

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        """Make every replica equal to rank 0's, as DDP does at construction."""
        if not self._comm.distributed:
            return
        for b in self._buckets:
            buf = torch.cat([s.param.detach().reshape(-1) for s in b.slots])
            self._comm.broadcast(buf, 0)
            for s in b.slots:
                s.param.copy_(buf[s.offset : s.offset + s.numel].view_as(s.param))

    def _init_state(self) -> None:
        rank = self._comm.rank
        self._momentum: list[Tensor] = []
        for b in self._buckets:
            m = torch.zeros(b.shard, dtype=self._momentum_dtype, device=self._device)
            self._momentum.append(m)
            lo, hi = b.shard_range(rank)
            for s in b.slots:
                a, e = s.owned(lo, hi)
                base = s.offset + a - lo
                self.state[s.param] = {"exp_avg": m[base : base + (e - a)], "shard_range": (a, e)}
        # Leo's matrices: one entry per matrix in the shared norm buffer, and this rank's slices.
        shapes, self._slices = [], {}
        for bi, b in enumerate(self._buckets):
            if b.kind != "matrix":
                continue
            lo, hi = b.shard_range(rank)
            for s in b.slots:
                r, c = s.param.shape
                j = len(shapes)
                shapes.append((r, c))
                a, e = s.owned(lo, hi)
                if a < e:
                    self._slices.setdefault(bi, []).append((s, MatrixSlice(j, r, c, a, e)))
        self._norm_layout = NormLayout(shapes)
        self._matrix_numel = [r * c for r, c in shapes]
        self._row_offsets = [sum(r for r, _ in shapes[:j]) for j in range(len(shapes))]
        self._row_layout_size = sum(r for r, _ in shapes)
        # every matrix of each bucket with its index in the layout (all ranks decode all of them)
        self._all_matrix_slots: dict[int, list[tuple[Slot, int]]] = {}
        j = 0
        for bi, b in enumerate(self._buckets):
            if b.kind == "matrix":
                self._all_matrix_slots[bi] = [(s, j + k) for k, s in enumerate(b.slots)]
                j += len(b.slots)
        self._grad_error: dict[int, Tensor] = {}
        self._update_error: dict[int, Tensor] = {}
        if self.update_comm == "1bit":
            for bi in self._all_matrix_slots:
                e = self._update_error[bi] = torch.zeros(self._buckets[bi].shard, dtype=torch.float32,
                                                         device=self._device)
                for s, sl, x in self._slice_views(bi, e):
                    self.state[s.param]["update_error"] = x

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, grad_scaler=None):
        """One optimisation step on every rank (collective). See the module docstring for phases.

        ``grad_scaler`` is passed by ``torch.amp.GradScaler.step(opt)``, never by users: the
        averaged gradients are unscaled here (or were by the DDP hook), and the step is skipped on
        every rank when any averaged gradient is inf/NaN.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._ddp_checked:
            self._ddp_checked = True
            if not self._hook_attached and self._comm.distributed:
                from .hooks import check_not_under_plain_ddp
                check_not_under_plain_ddp(self)
        shards = self._reduced_gradients()
        if grad_scaler is not None and self._amp_unscale_and_check(grad_scaler, shards):
            self._reset_exchange()
            self._comm.stats.end_step()
            return loss
        matrix = [bi for bi, b in enumerate(self._buckets) if b.kind == "matrix"]
        if matrix:
            self._matrix_step(matrix, shards)
        for bi, b in enumerate(self._buckets):
            if b.kind == "sign":
                self._sign_step(bi, b, shards[bi])
        self._reset_exchange()
        self._comm.stats.end_step()
        self._steps_done += 1
        return loss

    def _group(self, b: Bucket) -> dict[str, Any]:
        return self.param_groups[b.group_index]

    def _gather_signs(self, send: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor | None]:
        """All-gather every rank's packed bits; and their zero bitmaps, only if some rank has zeros.

        ``send`` is uint8 ``[S/8 + 8]`` (bits, then the header whose byte 0 flags exact zeros),
        ``zeros`` uint8 ``[S/8]``. Returns the bits of the whole bucket (``W·S/8`` bytes, rank
        order) and the zero bitmap or None.
        """
        nb = zeros.numel()
        world = self._comm.world
        gathered = torch.empty(world * (nb + HEADER_BYTES), dtype=torch.uint8, device=self._device)
        self._comm.all_gather(gathered, send)
        table = gathered.view(world, nb + HEADER_BYTES)
        bits = table[:, :nb].reshape(-1)
        zbits = None
        if bool(table[:, nb].any()):
            zbits = torch.empty(world * nb, dtype=torch.uint8, device=self._device)
            self._comm.all_gather(zbits, zeros)
        return bits, zbits

    def _sign_step(self, bi: int, b: Bucket, grad: Tensor) -> None:
        group = self._group(b)
        beta1, beta2 = group["betas"]
        nb = b.shard // 8
        send = torch.zeros(nb + HEADER_BYTES, dtype=torch.uint8, device=self._device)
        zeros = torch.empty(nb, dtype=torch.uint8, device=self._device)
        backend = self._backend()
        send[nb] = backend.sign_shard_step_(grad, self._momentum[bi], send[:nb], zeros,
                                            b.valid_in_shard(self._comm.rank), beta1, beta2)
        bits, zbits = self._gather_signs(send, zeros)
        scale = group["align_const"] if self._leo else 1.0
        lr, wd = group["lr"], group["weight_decay"]
        for s in b.slots:
            if s.numel == 0:
                continue
            z = None if zbits is None else bit_slice(zbits, s.offset, s.numel)
            self._apply(s.param, lambda p: backend.apply_signs_(p, bit_slice(bits, s.offset, s.numel), z,
                                                                lr, wd, scale))

    @staticmethod
    def _apply(param: Tensor, fn: Callable[[Tensor], None]) -> None:
        if param.is_contiguous():
            fn(param.data)
        else:
            tmp = param.data.contiguous()
            fn(tmp)
            param.data.copy_(tmp)

    def _backend(self):
        if self._fused:
            from . import kernels
            return kernels
        return local_step

    # ----------------------------------------------------------------- introspection
    def comm_stats(self) -> dict:
        """Bytes per collective kind: ``{"last_step": {kind: {...}, "sum": {...}}, "total": ..., "steps": n}``.

        Each kind reports ``calls``, ``bytes_in``/``bytes_out`` (sizes of the tensors given to and
        returned by the collectives) and ``sent``/``received`` (what this rank moves under the
        ideal algorithm; see :mod:`leo_dist.collectives`). ``last_step`` covers the exchange and
        update of the last completed :meth:`step`.
        """
        return self._comm.stats.report()

    @property
    def world_size(self) -> int:
        return self._comm.world

    @torch.no_grad()
    def verify_replicas(self) -> bool:
        """Collective: True when every rank's parameters are bitwise equal to rank 0's.

        Sends two int64 checksums per parameter per rank (an all-gather).
        """
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        sums = []
        for g in self.param_groups:
            for p in g["params"]:
                x = p.detach().reshape(-1).view(ints[p.element_size()]).to(torch.int64)
                w = torch.arange(x.numel(), device=x.device, dtype=torch.int64) % 65521 + 1
                sums.append(torch.stack([x.sum(), (x * w).sum()]))
        mine = torch.stack(sums).reshape(-1) if sums else torch.zeros(0, dtype=torch.int64, device=self._device)
        if not self._comm.distributed:
            return True
        table = torch.empty(self._comm.world * mine.numel(), dtype=torch.int64, device=self._device)
        with self._comm.stats.outside_step():
            self._comm.all_gather(table, mine)
        table = table.view(self._comm.world, -1)
        return bool((table == table[0]).all())

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The full, world-size independent state (collective: every rank must call it); see
        :func:`leo_dist.checkpoint.sharded_state_dict`."""
        from .checkpoint import sharded_state_dict
        with self._comm.stats.outside_step():
            return sharded_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (any world size) or from the single-process optimizer;
        see :func:`leo_dist.checkpoint.load_sharded_state_dict`."""
        from .checkpoint import load_sharded_state_dict
        load_sharded_state_dict(self, state_dict)


class ShardedLion(_ShardedOptimizer):
    """Lion with momentum sharded across ``process_group`` and 1-bit packed updates.

    Args: as :class:`leo_dist.Lion` (``lr=1e-4, betas=(0.9, 0.99), weight_decay=0``), plus
        process_group: the data-parallel group; None means the default group when one is
            initialised, else a world of 1 with no collectives.
        grad_comm: gradient exchange: "fp32" (default, exact), "bf16", or "1bit" (signs with one
            scale per 1024 elements and error feedback, about N/8 bytes per rank; lossy, see
            :mod:`leo_dist.onebit`).
        grad_comm_warmup: with grad_comm="1bit", the first steps that exchange fp32 instead (default 10).
        bucket_mb: bucket size in MiB of fp32 gradient (default 25).
        momentum_dtype: float32 (default) or bfloat16.
        fused: None/True/False, as for :class:`leo_dist.Lion`.
        sync_params: broadcast rank 0's parameters at construction (default True), as DDP does.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 process_group=None, grad_comm: str = "fp32", bucket_mb: float = 25,
                 momentum_dtype: torch.dtype | None = None, fused: bool | None = None, sync_params: bool = True,
                 grad_comm_warmup: int = 10):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, process_group=process_group, grad_comm=grad_comm, update_comm="exact",
                         bucket_mb=bucket_mb, momentum_dtype=momentum_dtype, fused=fused, sync_params=sync_params,
                         grad_comm_warmup=grad_comm_warmup)


class ShardedLeo(_ShardedOptimizer):
    """Leo with momentum sharded across ``process_group``; sign updates travel as packed bits,
    matrix updates (``update_comm="exact"``) in the parameter dtype.

    Args: as :class:`leo_dist.Leo` (``lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01,
    align_const=0.2, eps=1e-8``, group key ``orthogonalize``) and as :class:`ShardedLion`, plus
        update_comm: how matrix updates travel: "exact" (default; in the parameter dtype, bit-exact
            Leo) or "1bit" (sign bits with a per-row scale and an error-feedback buffer on the
            owner; lossy, see :mod:`leo_dist.onebit`).
    """

    _leo = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.99), weight_decay: float = 0.01,
                 align_const: float = 0.2, eps: float = 1e-8, *, orthogonalize: bool = True, process_group=None,
                 grad_comm: str = "fp32", update_comm: str = "exact", bucket_mb: float = 25,
                 momentum_dtype: torch.dtype | None = None, fused: bool | None = None, sync_params: bool = True,
                 grad_comm_warmup: int = 10):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
                        weight_decay=weight_decay, align_const=align_const, eps=eps, orthogonalize=orthogonalize)
        super().__init__(params, defaults, process_group=process_group, grad_comm=grad_comm,
                         update_comm=update_comm, bucket_mb=bucket_mb, momentum_dtype=momentum_dtype, fused=fused,
                         sync_params=sync_params, grad_comm_warmup=grad_comm_warmup)
