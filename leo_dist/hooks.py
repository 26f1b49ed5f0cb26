"""DDP communication hook: DDP's all-reduce replaced by the sharded optimizer's reduce-scatter.

``attach(ddp_model, optimizer)`` registers :func:`reduce_scatter_hook`. As DDP hands over each of
its buckets during backward, the hook copies the gradients of the optimizer's parameters into the
optimizer's own buckets and starts each bucket's reduce-scatter as soon as it is complete, so the
exchange overlaps the rest of backward; ``optimizer.step()`` then waits for it, steps the shard and
all-gathers the 1-bit update. Gradients of parameters the optimizer does not hold (say embeddings
trained by AdamW, see :func:`leo_dist.average_gradients`) are all-reduced and averaged exactly once,
as plain DDP would.

What ``.grad`` holds while the hook is active: for the optimizer's parameters, this rank's *local*
(unaveraged) gradient — the average exists only in shards, on their owners. Clip with
``optimizer.clip_grad_norm_`` (which works on the averaged shards), not
``torch.nn.utils.clip_grad_norm_``. For other parameters, the averaged gradient, as with DDP.

The hook maps DDP's gradients to the optimizer by parameter identity, so it does not care how
DDP buckets them or that DDP rebuilds its buckets after the first iteration. Under
``ddp_model.no_sync()`` DDP calls no hook; the first backward outside it sends the accumulated
gradients, once.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .amp import inverse_scale
from .sharded import _ShardedOptimizer

__all__ = ["attach", "reduce_scatter_hook", "HookState"]


class HookState:
    """State of :func:`reduce_scatter_hook`: the sharded optimizer that receives the gradients
    (its :class:`~leo_dist.exchange.GradientExchange` stages them) and the AMP scaler, if any.

    Picklable, as torch's ``PowerSGDState`` is (``torch.save(ddp_model)`` and ``copy.deepcopy``
    pickle DDP's comm hooks with their state): the optimizer, which holds process groups and the
    momentum, is left out, as PowerSGD leaves out its process group; the scaler is kept. An
    unpickled state is unbound: :meth:`bind` it to an optimizer (or :func:`attach` afresh) before
    the hook runs, else the hook raises.
    """

    def __init__(self, optimizer: Any, grad_scaler: Any = None):
        self.grad_scaler = grad_scaler
        self.bind(optimizer)

    def bind(self, optimizer: Any) -> None:
        """Point this state at ``optimizer`` (a ``ShardedLeo``/``ShardedLion``)."""
        if not isinstance(optimizer, _ShardedOptimizer):
            raise TypeError("the leo_dist DDP hook needs a leo_dist.ShardedLeo or ShardedLion optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.exchange = optimizer._exchange

    def __getstate__(self) -> dict[str, Any]:
        return {"grad_scaler": self.grad_scaler}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.grad_scaler = state.get("grad_scaler")
        self.optimizer = None
        self.exchange = None


def _foreign_all_reduce(comm: Any, grad: Tensor) -> Tensor:
    """Average ``grad`` (a parameter the optimizer does not hold) in place, synchronously: the
    per-parameter form of the hook has no future for DDP to wait on."""
    if not comm.distributed:
        return grad
    if torch.compiler.is_compiling():  # as torch's default hooks do under compiled autograd
        from torch.distributed import _functional_collectives as fcol

        grad.copy_(fcol.all_reduce(grad / comm.world, "sum", comm.group))
        return grad
    grad.div_(comm.world)
    comm.all_reduce(grad)
    return grad


def reduce_scatter_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook (``ddp_model.register_comm_hook(state, reduce_scatter_hook)``); see the module doc.

    ``bucket`` is a :class:`torch.distributed.GradBucket` (eager DDP; returns a future), or, under
    compiled autograd with ``torch._dynamo.config.optimize_ddp = "python_reducer"``, the tuple
    ``(param.grad, param)`` that DDP's per-parameter hook passes (as torch's
    ``default_hooks._compress_hook`` handles it); the gradient is then staged or averaged in place
    and returned, since that caller ignores the result and waits on nothing. (The annotations are
    the ones DDP's ``register_comm_hook`` insists on.)
    """
    exchange = state.exchange
    if exchange is None:
        raise RuntimeError("this leo_dist HookState was unpickled and is not bound to an optimizer: call "
                           "state.bind(optimizer) or leo_dist.hooks.attach(ddp_model, optimizer)")
    # not exchange.comm: that group may belong to the background sender (leo_dist.sender)
    comm = state.optimizer._comm
    if isinstance(bucket, tuple):
        grad, param = bucket[0], bucket[1]
        if exchange.owns(param):
            exchange.stage(param, grad, inverse_scale(state.grad_scaler, grad.device))
            return grad  # type: ignore[return-value]
        return _foreign_all_reduce(comm, grad)  # type: ignore[return-value]
    buf = bucket.buffer()
    foreign: list[Tensor] = []
    # Unscaled while copying into the optimizer's buckets, so that the averaged shards (which
    # clip_grad_norm_ and step() see) are true gradients; .grad keeps the scaled local ones.
    inv_scale = inverse_scale(state.grad_scaler, buf.device)
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        if exchange.owns(p):
            exchange.stage(p, g, inv_scale)
        else:
            foreign.append(g)
    if not foreign:
        fut: torch.futures.Future[Tensor] = torch.futures.Future()
        fut.set_result(buf)
        return fut
    flat = torch.cat([g.reshape(-1) for g in foreign])
    flat.div_(comm.world)
    if not comm.distributed:
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut
    work = comm.all_reduce_start(flat)

    def write_back(_: Any) -> Tensor:
        pos = 0
        for g in foreign:
            g.copy_(flat[pos : pos + g.numel()].view_as(g))
            pos += g.numel()
        return buf

    return work.get_future().then(write_back)


def attach(ddp_model: DistributedDataParallel, optimizer: Any, grad_scaler: Any = None) -> HookState:
    """Register :func:`reduce_scatter_hook` on ``ddp_model`` for ``optimizer``; returns its state.

    With mixed precision, pass the ``torch.amp.GradScaler`` that scales the loss: the hook unscales
    the gradients as it copies them (the usual ``scaler.scale(loss).backward(); scaler.unscale_(opt);
    opt.clip_grad_norm_(...); scaler.step(opt); scaler.update()`` then works unchanged).

    Raises ``TypeError`` when ``ddp_model`` is not a DDP module or ``optimizer`` not a sharded
    leo_dist optimizer, and ``ValueError`` when the optimizer holds parameters the model does not,
    or its process group differs in size from DDP's.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}")
    state = HookState(optimizer, grad_scaler)
    model_params = {id(p) for p in ddp_model.parameters() if p.requires_grad}
    missing = [i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
               if id(p) not in model_params]
    if missing:
        raise ValueError(f"the optimizer holds {len(missing)} parameter(s) (indices {missing[:5]}...) that the DDP "
                         "model does not train; build the optimizer over ddp_model's parameters")
    ddp_world = dist.get_world_size(ddp_model.process_group)
    if ddp_world != optimizer.world_size:
        raise ValueError(f"DDP's process group has {ddp_world} ranks, the optimizer's {optimizer.world_size}")
    if ddp_model._comm_hooks:
        raise RuntimeError("ddp_model already has a communication hook; DDP allows only one")
    ddp_model.register_comm_hook(state, reduce_scatter_hook)
    optimizer._attach_hook(grad_scaler)
    if optimizer.overlap_updates:  # the next forward applies the updates step() left in flight
        optimizer.register_model(ddp_model.module)
    return state

