"""ZeRO-style sharded Lion and Leo with 1-bit packed updates (design: docs/design.md).

Every rank keeps a full replica of the parameters and 1/W of the momentum. The optimizer is a
composition; each phase of a step belongs to one object, built at construction:

======================  =========================================  ==============================
phase                   what happens                               done by
======================  =========================================  ==============================
layout (once)           parameters → buckets → per-rank shards     :class:`~leo_dist.partition.Layout`
1. gradient exchange    local ``.grad`` → averaged float32 shard   :class:`~leo_dist.exchange.GradientExchange`
                        (reduce-scatter, or 1-bit all-to-all)
2–3. sign buckets       momentum, packed signs, all-gather, apply  :class:`~leo_dist.signs.SignStep`
2–3. Leo matrices       cross-shard norms, update, all-gather,     :class:`~leo_dist.matrix.MatrixStep`
                        apply
2–3. AdamW groups       AdamW on the shard, all-gather the new     :class:`~leo_dist.adamw.AdamWStep`
                        values in the parameter dtype
local arithmetic        Triton / C / torch                         :func:`~leo_dist.dispatch.select_backend`
======================  =========================================  ==============================

Bytes per rank and step: the exchange sends ``(W−1)/W·N·wire_bytes``; sign buckets all-gather
``S/8`` bytes per rank and bucket (and one float per bucket in one all-reduce for all); Leo's
matrices add two all-reduces of ``O(rows+cols)`` floats and send their update in the parameter
dtype (``update_comm="exact"``) or as bits plus one all-reduce of one float per row (``"1bit"``). Every rank decodes and applies the same bytes with
the same arithmetic, so replicas stay bitwise identical.

A parameter with ``requires_grad=False`` is not held; one whose gradient is None on every rank is
left untouched in a step; one with a gradient on some ranks only is averaged with zeros.

Transient memory: the float32 gradient shards (N/W elements, allocated once and reused), plus
fixed-size blocks of the exchange (``exchange.CHUNK_ELEMS``, ``MAX_INFLIGHT``); see docs/design.md,
"Memory model".
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from . import amp, checkpoint, misuse, replicas
from .adamw import AdamWStep, algorithm_of, resolve_algorithm
from .collectives import CollectiveError, Comm
from .ddp_guard import DDPGuard
from .dispatch import select_backend
from .deferred import DeferredUpdates
from .exchange import GradientExchange
from .groups import resolve_topology
from .matrix import MatrixStep
from .partition import Layout
from .sender import BackgroundSender
from .signs import InFlight, SignStep, exchange_packed
from .topology import HierComm, check_node_numbering, resolve_ranks_per_node
from .validation import (check_hyperparameters, check_momentum_dtype, check_param, check_params_unique,
                         check_same_options_everywhere)

__all__ = ["ShardedLion", "ShardedLeo"]

_CHECK_BLOCK = 1 << 18  # elements per block of the non-finite check (a 256 KiB bool temporary)


class _ShardedOptimizer(Optimizer):
    _leo = False
    _algorithm = "lion"  # the rule of a param group without an "algorithm" key

    def __init__(self, params, defaults: dict[str, Any], *, process_group, grad_comm: str, update_comm: str,
                 bucket_mb: float, momentum_dtype, fused, sync_params: bool, grad_comm_warmup: int = 50,
                 nonfinite: str = "skip", bf16_rounding: str = "stochastic", overlap_updates: bool = False,
                 overlap_grads: bool | None = None, ranks_per_node: int | str | None = None,
                 warmup_grad_comm: str = "fp32"):
        if not isinstance(overlap_updates, bool):
            raise TypeError(f"overlap_updates must be a bool, got {type(overlap_updates).__name__}")
        if overlap_grads is not None and not isinstance(overlap_grads, bool):
            raise TypeError(f"overlap_grads must be None or a bool, got {type(overlap_grads).__name__}")
        if grad_comm not in ("fp32", "bf16", "1bit"):
            raise ValueError(f"grad_comm must be one of ['1bit', 'bf16', 'fp32'], got {grad_comm!r}")
        if update_comm not in ("exact", "bf16", "1bit"):
            raise ValueError(f"update_comm must be 'exact', 'bf16' or '1bit', got {update_comm!r}")
        if isinstance(grad_comm_warmup, bool) or not isinstance(grad_comm_warmup, int) or grad_comm_warmup < 0:
            raise ValueError(f"grad_comm_warmup must be a non-negative int, got {grad_comm_warmup!r}")
        if warmup_grad_comm not in ("fp32", "bf16"):
            raise ValueError(f"warmup_grad_comm must be 'fp32' or 'bf16', got {warmup_grad_comm!r}")
        if warmup_grad_comm != "fp32" and grad_comm != "1bit":
            # only the 1-bit mode has a warm-up; accepting it elsewhere would silently do nothing
            raise ValueError(f"warmup_grad_comm={warmup_grad_comm!r} applies to grad_comm='1bit' only, "
                             f"got grad_comm={grad_comm!r}")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        # a ProcessGroup, a 1-D DeviceMesh or None; a 2-D (node, local rank) mesh sets ranks_per_node
        process_group, ranks_per_node = resolve_topology(process_group, ranks_per_node)
        check_hyperparameters(defaults)
        self._momentum_dtype = check_momentum_dtype(momentum_dtype)
        self.grad_comm, self.update_comm = grad_comm, update_comm
        self.grad_comm_warmup = grad_comm_warmup
        self.warmup_grad_comm = warmup_grad_comm
        self._steps_done = 0
        self._frozen = False
        super().__init__(params, defaults)
        self._frozen = True

        flat = check_params_unique(self.param_groups)
        for p in flat:
            check_param(p)
        devices = {p.device for p in flat}
        if len(devices) > 1:
            raise ValueError(f"params must all be on one device, got {sorted(map(str, devices))}")
        self._device = flat[0].device
        self._comm = Comm(process_group)
        auto_nodes = ranks_per_node == "auto"
        ranks_per_node = resolve_ranks_per_node(ranks_per_node, self._comm.world)
        self._backend = select_backend(fused, flat)
        kinds = [[(p, None if not p.requires_grad else "adamw" if algorithm_of(g, self._algorithm) == "adamw"
                   else "matrix" if self._leo and g["orthogonalize"] and p.ndim == 2
                   else "sign") for p in g["params"]] for g in self.param_groups]
        self._layout = Layout(kinds, self._comm.world, self._comm.rank, int(bucket_mb * 2**20))
        with self._comm.stats.outside_step():
            check_same_options_everywhere(self._comm, self._device, grad_comm=grad_comm, update_comm=update_comm,
                                          bucket_mb=bucket_mb, grad_comm_warmup=grad_comm_warmup,
                                          warmup_grad_comm=warmup_grad_comm, sync_params=sync_params,
                                          momentum_dtype=self._momentum_dtype,
                                          overlap_grads=overlap_grads, overlap_updates=overlap_updates,
                                          ranks_per_node=ranks_per_node)
            replicas.check_same_layout(self._comm, self.param_groups, self._device)
            if ranks_per_node is not None:  # the node levels' groups (collective, after the checks above)
                if auto_nodes:
                    check_node_numbering(self._comm, ranks_per_node, self._device)
                self._comm = HierComm(process_group, ranks_per_node, self._comm.stats)
            if sync_params:
                replicas.broadcast_params(self._comm, self._layout)
        self.overlap_grads = self._resolve_overlap_grads(overlap_grads)
        self._sender = BackgroundSender(f"leo_dist-sender-rank{self._comm.rank}") if self.overlap_grads else None
        with self._comm.stats.outside_step():  # the sender's own group (a collective over this one)
            exchange_comm = self._comm.duplicate() if self.overlap_grads else self._comm
        self._exchange = GradientExchange(self._layout, exchange_comm, grad_comm, self._device,
                                          compressing=lambda: self._steps_done >= self.grad_comm_warmup,
                                          sender=self._sender, warmup_grad_comm=warmup_grad_comm)
        if bf16_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"bf16_rounding must be 'nearest' or 'stochastic', got {bf16_rounding!r}")
        self.bf16_rounding = bf16_rounding
        self._signs = SignStep(self._comm, self._backend, self._leo, stochastic_bf16=bf16_rounding == "stochastic")
        self._matrices = MatrixStep(self._layout, self._comm, update_comm, self._device,
                                    stochastic_bf16=bf16_rounding == "stochastic", kernels=self._backend.kernels)
        self._adamw = AdamWStep(self._layout, self._comm, self._device)
        self._deferred = DeferredUpdates(self._layout) if overlap_updates else None
        self.overlap_updates = overlap_updates
        #: streamed steps (docs/overlap.md, "Streamed steps") once the DDP hook is attached without a GradScaler
        self._streamable = (overlap_updates and self._sender is not None and grad_comm in ("fp32", "bf16")
                            and bool(self._layout.buckets) and self._layout.kind_buckets("sign")
                            == list(range(len(self._layout.buckets))))
        self._streaming = False
        self._streamed_steps = 0
        # a local gradient element at or above this could overflow float32 when W of them are summed
        self._overflow_bound = torch.finfo(torch.float32).max / (2 * self._comm.world)
        self._init_state()
        self._hook_scaler: Any = None
        self._hook_attached = False
        self._consolidated: dict[str, Any] | None = None
        self._held = [s.param for b in self._layout.buckets for s in b.slots]
        self._guard = DDPGuard(self._held) if self._comm.distributed else None
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        #: steps skipped because some averaged gradient was inf/NaN (not counting GradScaler's own skips)
        self.skipped_steps = 0
        self._grad_guard = misuse.GradEditGuard(self._held)

    def _resolve_overlap_grads(self, asked: bool | None) -> bool:
        """Background sending (:mod:`leo_dist.sender`): on by default for CPU tensors in a group
        of more than one rank; CUDA would need the copies on a side stream, not built yet."""
        if not self._comm.distributed:
            return False
        if self._device.type != "cpu":
            if asked:
                raise NotImplementedError("overlap_grads=True is built for CPU tensors (gloo) only; on "
                                          f"{self._device.type} the exchange is sent from the DDP hook itself")
            return False
        return asked is None or asked

    # ----------------------------------------------------------------- layout and state
    @property
    def fused(self) -> bool:
        """True when the local step runs the Triton kernels (chosen at construction from ``fused``)."""
        return self._backend.name == "triton"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_frozen", False):
            raise RuntimeError("sharded optimizers fix their bucket layout at construction; add_param_group "
                               "afterwards is not supported: build a new optimizer with every group")
        if isinstance(param_group, dict):
            resolve_algorithm(param_group, self._algorithm, len(self.param_groups))  # before torch fills our defaults
        super().add_param_group(param_group)
        check_hyperparameters(self.param_groups[-1])

    def _init_state(self) -> None:
        """One momentum shard per bucket; ``state[p]`` holds views of the parameter's part of it."""
        self._momentum: list[Tensor] = []
        for bi, b in enumerate(self._layout.buckets):
            m = torch.zeros(b.shard, dtype=self._momentum_dtype, device=self._device)
            self._momentum.append(m)
            for s, owned, view in self._layout.shard_views(bi, m):
                self.state[s.param] = {"exp_avg": view, "shard_range": owned}
        for bi, e in self._matrices.update_error.items():
            for s, _, x in self._layout.owned_views(bi, e):
                self.state[s.param]["update_error"] = x
        for bi, v in self._adamw.exp_avg_sq.items():
            for k, (s, _, x) in enumerate(self._layout.shard_views(bi, v)):
                self.state[s.param].update(exp_avg_sq=x, step=self._adamw.steps[bi][k])

    def _attach_hook(self, grad_scaler: Any) -> GradientExchange:
        """Called by :func:`leo_dist.hooks.attach`: gradients now arrive through the DDP hook
        (unscaled by it when ``grad_scaler`` is given). Returns the exchange the hook stages into."""
        self._hook_attached = True
        self._hook_scaler = grad_scaler
        if self._streamable and grad_scaler is None:
            self._streaming = True
            self._exchange.launch_limit = len(self._layout.buckets)
        if self._guard is not None:
            self._guard.disarm()
        return self._exchange

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state this rank holds between steps, by kind: ``exp_avg`` (the
        momentum shards, padding included), ``update_error`` and ``grad_error`` (1-bit modes),
        ``exp_avg_sq`` (AdamW groups' float32 shards; their step counts, 4 bytes per parameter on
        the CPU, are not counted)."""
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"exp_avg": nbytes(self._momentum), "update_error": nbytes(self._matrices.update_error.values()),
                "grad_error": nbytes(self._exchange.grad_error.values()),
                "exp_avg_sq": nbytes(self._adamw.exp_avg_sq.values())}

    @property
    def layout(self) -> Layout:
        """The bucket layout (read only): ``layout.buckets`` with their kind, dtype, sizes and slots."""
        return self._layout

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimisation step on every rank (collective). See the module docstring for phases.

        Under ``torch.amp.GradScaler.step(opt)`` (see :mod:`leo_dist.amp`): each rank's gradients
        are unscaled by its own scale before they are averaged (by the DDP hook, or here), and an
        overflow on any rank skips the step on every rank, silently, as GradScaler skips.
        """
        if self._deferred is not None and not self._deferred.registered:
            raise RuntimeError(f"{type(self).__name__}(overlap_updates=True) applies each update in the next forward "
                               "and needs the model: leo_dist.hooks.attach(ddp_model, opt) registers it, or call "
                               "opt.register_model(model) in standalone use")
        self.synchronize()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._guard is not None:
            self._guard.check()
        scaling, inv_scale, found_inf = amp.scaling_protocol(self)
        misuse.check_grad_edits(self, unscaled=scaling and inv_scale is None)
        if scaling:
            self._check_scaling(inv_scale)
        if self._streaming and not scaling and self._exchange.streamable():
            return self._stream_step(loss)
        present = self._present()
        with self._phase("gradient reduce-scatter"):
            shards = self._exchange.collect(None if self._hook_attached else inv_scale)
        with self._phase("non-finite check (all-reduce)"):
            bad, absent = self._verdict(shards, present, found_inf)
        if bad:
            return self._skip(loss, scaling)
        kept = self._save_untouched(absent)
        # the hyperparameters of this step, as step() sees them: a deferred update is applied
        # after step() returns, when a scheduler may already have changed group["lr"]
        groups = [dict(g) for g in self.param_groups]
        with self._phase("Leo matrix norms / update all-gather"):
            packed = self._matrices.step(groups, shards, self._momentum, self._steps_done)
        with self._phase("AdamW parameter all-gather"):
            self._adamw.step(groups, shards, self._momentum)
        packed += [self._signs.pack(self._layout.buckets[bi], groups[self._layout.buckets[bi].group_index],
                                    shards[bi], self._momentum[bi], bi, self._steps_done)
                   for bi in self._layout.kind_buckets("sign")]
        with self._phase("update all-gather"):
            if self._deferred is not None and not kept:
                self._deferred.launch(self._comm, packed)  # applied by the next forward (leo_dist.deferred)
            else:  # parameters to restore after the update: apply it now
                exchange_packed(self._comm, packed)
        self._restore_untouched(kept)
        self._end_step(completed=True)
        return loss

    def _skip(self, loss, scaling: bool):
        """End a step whose averaged gradients (or, under GradScaler, some rank's) are not finite."""
        self._end_step(completed=False)
        if scaling:  # GradScaler's overflow skip: expected, and scaler.update() backs off
            return loss
        self.skipped_steps += 1
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}.step(): an averaged gradient is inf or NaN on some rank; nothing "
                "was changed (parameters, momentum and error buffers are as before this step)")
        if self.skipped_steps == 1:
            warnings.warn(f"{type(self).__name__}: an averaged gradient is inf or NaN; the step is skipped "
                          "on every rank (counted in opt.skipped_steps; nonfinite='raise' raises instead)",
                          RuntimeWarning, stacklevel=3)
        return loss

    def _stream_step(self, loss):
        """The streamed step (docs/overlap.md, "Streamed steps"): decide, hand the rest to the sender, return."""
        ex, n = self._exchange, len(self._layout.buckets)
        flags = torch.stack([ex.staged_overflow(self._overflow_bound),
                             torch.tensor(-float(ex.head_done()), device=self._device)])
        with self._phase("non-finite check (all-reduce)"):
            self._comm.all_reduce(flags, dist.ReduceOp.MAX)
        bad, least = flags.tolist()  # the step's one host sync
        limit = ex.launch_limit
        if bad > 0:
            with self._phase("gradient reduce-scatter"):
                ex.collect()
            return self._skip(loss, scaling=False)
        groups = [dict(g) for g in self.param_groups]  # this step's hyperparameters (see step())
        step = self._steps_done
        key = self._deferred.forward_rank

        hier = isinstance(ex.comm, HierComm)
        staged: list[InFlight] = []  # two-level all-gathers: their intra stage runs one bucket later

        def pack(bi: int):
            b = self._layout.buckets[bi]
            packed = self._signs.pack(b, groups[b.group_index], ex.shards[bi], self._momentum[bi], bi, step)
            flag = packed.has_zero.reshape(1).float()  # exact zeros somewhere: their bitmaps travel too
            return packed, flag, ex.comm.all_reduce_start(flag, dist.ReduceOp.MAX)

        def flush() -> None:
            while staged:
                flight = staged.pop(0)
                flight.wait()  # the intra stage is a collective: issued by the sender, in order
                self._deferred.publish(flight.packed.index, flight)

        def publish(handle) -> None:
            packed, flag, work = handle
            work.wait()
            flush()
            flight = InFlight(ex.comm, packed, bool(flag.item() > 0))
            if hier:
                staged.append(flight)
            else:
                self._deferred.publish(packed.index, flight)

        def end(error: BaseException | None) -> None:
            if error is None:
                try:
                    flush()
                except BaseException as e:  # noqa: BLE001 - reported to the waiters, raised by the sender
                    error = e
                else:
                    self._comm.stats.end_step()
            self._deferred.end(error)
            if error is not None:
                raise error

        self._deferred.expect(range(n))
        ex.stream(sorted(range(limit, n), key=key), sorted(range(limit), key=key), pack, publish,
                  self._deferred.filled, end)
        # the next step sends during backward what the wire carried before this step() began, plus
        # two: the wire must not idle while the verdict's round trip runs (a forward that waits a
        # little longer for its first bucket costs less, since the wire is the bound)
        ex.launch_limit = min(n, int(-least) + 2)
        self._steps_done += 1
        self._streamed_steps += 1
        self._consolidated = None
        return loss

    @contextmanager
    def _phase(self, name: str):
        """Name the phase of the step in a collective's failure (gloo's own text names none): a peer
        that died or stalled surfaces here, within the process group's timeout."""
        try:
            yield
        except RuntimeError as e:
            if isinstance(e, FloatingPointError) or str(e).startswith("leo_dist"):
                raise
            where, cause = (f" at {e.where}", e.cause) if isinstance(e, CollectiveError) else ("", e)
            raise RuntimeError(f"leo_dist {type(self).__name__}.step(), rank {self._comm.rank}/{self._comm.world}: "
                               f"{name} failed{where}, a peer may have exited or stalled "
                               f"({type(cause).__name__}: {cause})") from e

    def _present(self) -> list[bool]:
        """Per held parameter: does this rank have a gradient for it? (The DDP hook always hands
        one over; standalone, ``.grad is None`` means no.)"""
        return [self._hook_attached or p.grad is not None for p in self._held]

    def _check_scaling(self, inv_scale: Tensor | None) -> None:
        """Under GradScaler: the gradients to average must be unscaled by this rank's own scale."""
        if self._hook_attached:
            hook_inv = amp.inverse_scale(self._hook_scaler, self._device)
            if hook_inv is None or (inv_scale is not None and not torch.equal(hook_inv, inv_scale.to(self._device))):
                raise RuntimeError("with a GradScaler and the DDP hook, pass that scaler to "
                                   "leo_dist.hooks.attach(ddp_model, optimizer, grad_scaler=scaler): the hook "
                                   "unscales each bucket as it leaves during backward")
        elif inv_scale is not None and self._exchange.sent_any():
            raise RuntimeError(f"{type(self).__name__}: opt.clip_grad_norm_ ran on gradients still scaled by the "
                               "GradScaler; call scaler.unscale_(opt) before opt.clip_grad_norm_ (as torch's AMP "
                               "recipe does)")

    def _verdict(self, shards: list[Tensor], present: list[bool],
                 found_inf: Tensor | None = None) -> tuple[bool, list[Tensor]]:
        """One all-reduce (MAX) of ``1 + P`` floats, one host sync: whether any averaged gradient
        (or, under GradScaler, any rank's own inf check) is non-finite, and the held parameters
        that no rank has a gradient for."""
        flags = torch.zeros(1 + len(self._held), dtype=torch.float32, device=self._device)
        if found_inf is not None:
            flags[0] = found_inf.to(device=self._device, dtype=torch.float32).reshape(())
        for s in shards:
            for i in range(0, s.numel(), _CHECK_BLOCK):  # blocks: no shard-sized temporary
                flags[0] = torch.maximum(flags[0], (~torch.isfinite(s[i : i + _CHECK_BLOCK])).any().float())
        flags[1:] = torch.tensor(present, dtype=torch.float32)
        self._comm.all_reduce(flags, dist.ReduceOp.MAX)
        verdict = flags.tolist()  # the step's one host sync for this decision
        return verdict[0] > 0, [p for p, seen in zip(self._held, verdict[1:]) if not seen]

    def _save_untouched(self, params: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Copies of what the step must leave alone for parameters no rank has a gradient for (as
        the single-process optimizers skip them): the parameter, its momentum and error slices.
        Restored bitwise after the step; costs their size in memory for this step only."""
        kept = []
        for p in params:
            kept.append((p.data, p.data.clone()))
            for key in ("exp_avg", "update_error", "exp_avg_sq", "step"):
                view = self.state[p].get(key)
                if view is not None and view.numel():
                    kept.append((view, view.clone()))
        return kept

    @staticmethod
    def _restore_untouched(kept: list[tuple[Tensor, Tensor]]) -> None:
        for dst, src in kept:
            dst.copy_(src)

    def synchronize(self) -> None:
        """Apply every update that ``step()`` left in flight (``overlap_updates=True``); a no-op
        otherwise. Call it before reading parameters outside their modules' forward (EMA,
        logging, evaluation code that reads weights directly). Not collective: every all-gather
        was started in ``step()``."""
        if getattr(self, "_deferred", None) is not None and len(self._deferred):
            with self._phase("update all-gather (deferred)"):
                self._deferred.complete_all()

    def register_model(self, model: torch.nn.Module) -> None:
        """With ``overlap_updates=True``: the model whose forward applies the pending updates (a
        forward pre-hook on each module owning a held parameter). ``hooks.attach`` calls it."""
        if self._deferred is None:
            raise RuntimeError("register_model is for overlap_updates=True")
        if not self._deferred.registered:
            self._deferred.register(model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``, and discard gradients already exchanged for a
        step that will not run (a skipped step must not leak into the next one)."""
        if not set_to_none and self._deferred is not None:
            # a streamed step may still be reading DDP's buckets, which are .grad under
            # gradient_as_bucket_view=True: zeroing them in place must wait for it
            self._deferred.wait_filled()
        self._exchange.reset()
        super().zero_grad(set_to_none=set_to_none)

    def _end_step(self, completed: bool) -> None:
        self._steps_done += int(completed)
        self._consolidated = None
        self._exchange.reset()
        self._comm.stats.end_step()

    # GradScaler calls step() even when this rank saw an inf, with grad_scale/found_inf set (leo_dist.amp).
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the averaged gradients (the ones the step will use) to a global norm.

        Collective: every rank must call it, after backward and before :meth:`step`. Triggers the
        gradient exchange if the DDP hook has not. Returns the total norm before clipping (as
        ``torch.nn.utils.clip_grad_norm_`` does). Sends one float.
        """
        self.synchronize()
        max_norm = float(max_norm)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        norm_type = float(norm_type)
        if not (norm_type == float("inf") or norm_type > 0):
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
        shards = self._exchange.collect()
        if norm_type == float("inf"):
            local = torch.stack([s.abs().max() if s.numel() else s.new_zeros(()) for s in shards]).max()
            self._comm.all_reduce(local, dist.ReduceOp.MAX)
            total = local
        else:
            local = torch.stack([s.abs().pow(norm_type).sum() for s in shards]).sum()
            self._comm.all_reduce(local)
            total = local.pow(1.0 / norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for s in shards:
            s.mul_(coef)
        return total

    # ----------------------------------------------------------------- introspection
    def comm_stats(self) -> dict:
        """Bytes per collective kind: ``{"last_step": {kind: {...}, "sum": {...}}, "total": ..., "steps": n}``.

        Each kind reports ``calls``, ``bytes_in``/``bytes_out`` (sizes of the tensors given to and
        returned by the collectives) and ``sent``/``received`` (what this rank moves under the
        ideal algorithm; see :mod:`leo_dist.collectives`). ``last_step`` covers the exchange and
        update of the last completed :meth:`step` (a streamed one is waited for, not applied).
        """
        if self._deferred is not None:
            self._deferred.wait_done()
        return self._comm.stats.report()

    @property
    def world_size(self) -> int:
        return self._comm.world

    @torch.no_grad()
    def verify_replicas(self) -> bool:
        """Collective: True when every rank's parameters are bitwise equal to rank 0's.

        Sends two int64 checksums per parameter per rank (an all-gather).
        """
        self.synchronize()
        with self._comm.stats.outside_step():
            return replicas.verify(self._comm, [p for g in self.param_groups for p in g["params"]], self._device)

    # ----------------------------------------------------------------- checkpoints
    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's part of the state, for ``torch.distributed.checkpoint`` (every rank calls it,
        then ``dcp.save``/``dcp.load``); see :mod:`leo_dist.checkpoint`."""
        self.synchronize()
        with self._comm.stats.outside_step():
            return checkpoint.sharded_state_dict(self)

    def load_sharded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Finish resuming from a DCP checkpoint: call on every rank after ``dcp.load`` filled the
        dict that :meth:`sharded_state_dict` returned (saved at any world size)."""
        self.synchronize()
        with self._comm.stats.outside_step():
            checkpoint.load_sharded_state_dict(self, state_dict)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective: gather the full state onto group rank ``to``, whose next :meth:`state_dict`
        returns it (until the next step). The other ranks hold at most one bucket at a time."""
        self.synchronize()
        with self._comm.stats.outside_step():
            self._consolidated = checkpoint.consolidate(self, to)

    def state_dict(self) -> dict[str, Any]:
        """The full state, in the single-process ``Leo``/``Lion`` layout; never communicates.

        In a world of one it is built directly. With more ranks it is available on rank ``to``
        after :meth:`consolidate_state_dict`; otherwise this raises ``RuntimeError`` at once (it
        does not wait for the other ranks). For training checkpoints use DCP with
        :meth:`sharded_state_dict` on every rank: each rank writes only what it owns.
        """
        self.synchronize()
        if not self._comm.distributed:
            return checkpoint.full_state_dict(self)
        if self._consolidated is not None:
            return self._consolidated
        raise RuntimeError(
            f"{type(self).__name__}.state_dict() on rank {self._comm.rank}: the state is sharded across "
            f"{self._comm.world} ranks and is not gathered here. Either save through "
            "torch.distributed.checkpoint on every rank (dcp.save({'optim': opt.sharded_state_dict()}, "
            "checkpoint_id=...), resumed with opt.load_sharded_state_dict), or call "
            "opt.consolidate_state_dict(to=0) on every rank first and then opt.state_dict() on rank 0.")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full state (from :meth:`state_dict` at any world size, or from the single-process
        optimizer) on every rank; no communication. See :func:`leo_dist.checkpoint.load_state_dict`."""
        self.synchronize()
        checkpoint.load_state_dict(self, state_dict)


class ShardedLion(_ShardedOptimizer):
    """Lion with momentum sharded across ``process_group`` and 1-bit packed updates.

    Args: as :class:`leo_dist.Lion` (``lr=1e-4, betas=(0.9, 0.99), weight_decay=0``), plus
        process_group: the data-parallel group; None means the default group when one is
            initialised, else a world of 1 with no collectives. A 1-D ``DeviceMesh`` means its
            group; a 2-D one of (node, local rank) (dims named "node", "local", or HSDP's
            "replicate", "shard"; e.g. :func:`leo_dist.topology.node_mesh`) means the whole world
            with ``ranks_per_node`` = its second size (:func:`leo_dist.groups.resolve_topology`).
        grad_comm: gradient exchange: "fp32" (default, exact), "bf16", or "1bit" (signs with one
            scale per 1024 elements and error feedback, about N/8 bytes per rank; lossy, see
            :mod:`leo_dist.onebit`).
        grad_comm_warmup: with grad_comm="1bit", the first steps that exchange fp32 instead (default
            50). Early gradients change scale fast and error feedback then owes more than it
            sends: with 10 exact steps Leo lost 3-4% of final loss in 300 steps, with 50 within
            ±0.3% of exact (3 seeds, docs/onebit_modes.md). Over a whole 1000-step schedule
            1-bit gradients still cost about 2%, as PowerSGD rank 4 does (docs/convergence.md).
            Short runs that must compress sooner can lower it, at that cost.
        warmup_grad_comm: with grad_comm="1bit", what the warm-up steps exchange: "fp32" (default,
            exact) or "bf16" (half the warm-up's bytes: those steps run exactly as with
            grad_comm="bf16"). On a slow link the fp32 warm-up can be most of the time to a
            target (docs/benchmarks.md). Any other grad_comm raises ``ValueError`` unless "fp32".
        bucket_mb: bucket size in MiB of fp32 gradient (default 25).
        momentum_dtype: float32 (default) or bfloat16.
        fused: None/True/False, as for :class:`leo_dist.Lion`.
        sync_params: broadcast rank 0's parameters at construction (default True), as DDP does.
        nonfinite: what a step does when an averaged gradient is inf or NaN on some rank (decided
            on every rank alike, with one small all-reduce): "skip" (default; the step changes
            nothing, ``opt.skipped_steps`` counts it, warned once) or "raise" (``FloatingPointError``,
            after changing nothing). With a GradScaler its own skip-and-back-off applies instead.
        bf16_rounding: how bfloat16 parameters take their update: "stochastic" (default: unbiased,
            keyed by step and element so replicas stay bitwise equal; a step below half a bf16 ulp
            still lands on average) or "nearest" (as the single-process optimizers round). Chosen
            by measurement: docs/results/bf16_rounding_{lion,leo}.md.
        overlap_updates: leave the 1-bit update all-gathers in flight when ``step()`` returns and
            apply each bucket in the next forward, before the first module that uses it (default
            False). Needs the model: ``hooks.attach`` registers it, or ``opt.register_model(model)``.
            Raw reads of parameters in between see old values; ``opt.synchronize()`` completes
            them. With the DDP hook, the background sender, fp32/bf16 gradients and sign buckets
            only, the step is *streamed*: it returns before the gradient exchange ends, and each
            bucket is stepped and sent as soon as its shard is complete, in forward order.
            Contract and memory: :mod:`leo_dist.deferred`.
        overlap_grads: send the gradient exchange from a background thread on a process group of
            its own, so that the DDP hook returns at once and backward never waits for the wire
            (:mod:`leo_dist.sender`). None (default): on for CPU tensors with more than one rank;
            True on CUDA raises ``NotImplementedError``. Same bytes, same results bitwise.
        ranks_per_node: None (default: the flat exchange, every pair of ranks alike) or the ranks
            per node, G (an int dividing the world size, or "auto": torchrun's
            ``LOCAL_WORLD_SIZE``), for the topology-aware exchange of :mod:`leo_dist.topology`:
            gradients are summed at float32 inside each node and cross nodes once, as the node's
            sums, in ``grad_comm``; update bits cross once per node. Ranks are numbered node by
            node, as torchrun numbers them. Same momentum layout and checkpoints as the flat one.
            Leave it None with a 2-D mesh, which gives it.

    Parameters with ``requires_grad=False`` are not held (no state, never stepped); a parameter that
    no rank has a gradient for in a step is left untouched, as by the single-process optimizers; one
    that has a gradient on some ranks only is averaged with zeros from the others.

    Group key ``algorithm``: the optimizer's own rule ("lion" here, "leo" for ShardedLeo; the
    default) or "adamw": ``torch.optim.AdamW`` on that group (state ``step``, ``exp_avg``,
    ``exp_avg_sq``; its new values travel exact in the parameter dtype, whatever
    ``update_comm``). An "adamw" group takes this optimizer's ``lr`` unless it sets one, but
    AdamW's own defaults for ``betas`` (0.9, 0.999), ``eps`` (1e-8) and ``weight_decay`` (0.01),
    never this optimizer's, which mean something else in Lion and Leo. See :mod:`leo_dist.adamw`.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 process_group=None, grad_comm: str = "fp32", bucket_mb: float = 25,
                 momentum_dtype: torch.dtype | None = None, fused: bool | None = None, sync_params: bool = True,
                 grad_comm_warmup: int = 50, nonfinite: str = "skip",
                 bf16_rounding: str = "stochastic", overlap_updates: bool = False,
                 overlap_grads: bool | None = None, ranks_per_node: int | str | None = None,
                 warmup_grad_comm: str = "fp32"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, process_group=process_group, grad_comm=grad_comm, update_comm="exact",
                         bucket_mb=bucket_mb, momentum_dtype=momentum_dtype, fused=fused, sync_params=sync_params,
                         grad_comm_warmup=grad_comm_warmup, nonfinite=nonfinite, bf16_rounding=bf16_rounding,
                         overlap_updates=overlap_updates, overlap_grads=overlap_grads,
                         ranks_per_node=ranks_per_node, warmup_grad_comm=warmup_grad_comm)


class ShardedLeo(_ShardedOptimizer):
    """Leo with momentum sharded across ``process_group``; sign updates travel as packed bits,
    matrix updates (``update_comm="exact"``) in the parameter dtype.

    Args: as :class:`leo_dist.Leo` (``lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01,
    align_const=0.2, eps=1e-8``, group key ``orthogonalize``) and as :class:`ShardedLion`, plus
        update_comm: how matrix updates travel: "exact" (default; in the parameter dtype, bit-exact
            Leo), "bf16" (float32 updates rounded to bfloat16 to nearest, half the bytes, every
            rank applying the rounded values: ``leo_update(..., update_dtype=torch.bfloat16)``;
            no state) or "1bit" (sign bits with a per-row scale and an error-feedback buffer on
            the owner; lossy, see :mod:`leo_dist.onebit`).
    """

    _leo = True
    _algorithm = "leo"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.99), weight_decay: float = 0.01,
                 align_const: float = 0.2, eps: float = 1e-8, *, orthogonalize: bool = True, process_group=None,
                 grad_comm: str = "fp32", update_comm: str = "exact", bucket_mb: float = 25,
                 momentum_dtype: torch.dtype | None = None, fused: bool | None = None, sync_params: bool = True,
                 grad_comm_warmup: int = 50, nonfinite: str = "skip",
                 bf16_rounding: str = "stochastic", overlap_updates: bool = False,
                 overlap_grads: bool | None = None, ranks_per_node: int | str | None = None,
                 warmup_grad_comm: str = "fp32"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
                        weight_decay=weight_decay, align_const=align_const, eps=eps, orthogonalize=orthogonalize)
        super().__init__(params, defaults, process_group=process_group, grad_comm=grad_comm,
                         update_comm=update_comm, bucket_mb=bucket_mb, momentum_dtype=momentum_dtype, fused=fused,
                         sync_params=sync_params, grad_comm_warmup=grad_comm_warmup, nonfinite=nonfinite,
                         bf16_rounding=bf16_rounding, overlap_updates=overlap_updates,
                         overlap_grads=overlap_grads, ranks_per_node=ranks_per_node,
                         warmup_grad_comm=warmup_grad_comm)
