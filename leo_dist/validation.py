"""Input checks shared by every optimizer. They raise ``ValueError``/``TypeError`` naming the argument."""
from __future__ import annotations

import math
import zlib
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["check_hyperparameters", "check_param", "check_grad", "check_momentum_dtype", "check_params_unique",
           "check_same_options_everywhere", "check_state_dict"]


def _number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_hyperparameters(group: Mapping[str, Any]) -> None:
    """Validate the hyperparameters present in ``group`` (a defaults dict or a param group)."""
    if "lr" in group and _number("lr", group["lr"]) < 0:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= _number(f"betas[{i}]", b) < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    if "weight_decay" in group and _number("weight_decay", group["weight_decay"]) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if "eps" in group and _number("eps", group["eps"]) <= 0:
        raise ValueError(f"eps must be > 0, got {group['eps']}")
    if "align_const" in group and _number("align_const", group["align_const"]) <= 0:
        raise ValueError(f"align_const must be > 0, got {group['align_const']}")
    if "orthogonalize" in group and not isinstance(group["orthogonalize"], bool):
        raise TypeError(f"orthogonalize must be a bool, got {type(group['orthogonalize']).__name__}")


def check_param(p: Any) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"params must contain tensors, got {type(p).__name__}")
    if p.is_complex() or not p.is_floating_point():
        raise TypeError(f"params must be real floating point tensors, got dtype {p.dtype}")


def check_grad(p: Tensor) -> None:
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError("sparse gradients are not supported (grad layout "
                        f"{g.layout}); use a dense embedding or another optimizer for it")
    if g.shape != p.shape:
        raise ValueError(f"grad of shape {tuple(g.shape)} does not match its parameter {tuple(p.shape)}")


def check_momentum_dtype(dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"momentum_dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype


# ----------------------------------------------------------------------------- sharded optimizers
def check_params_unique(param_groups: list[Mapping[str, Any]]) -> list[Tensor]:
    """The parameters of every group, in order; ``ValueError`` when one is given twice or none at all.

    (torch only warns about a parameter repeated inside one group; a sharded layout would give it
    two slots and two updates per step.)
    """
    flat, seen = [], {}
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) in seen:
                where = seen[id(p)]
                raise ValueError(f"params: the parameter at param_groups[{gi}]['params'][{pi}] (shape "
                                 f"{tuple(p.shape)}) was already given at param_groups[{where[0]}]['params']"
                                 f"[{where[1]}]; give every parameter once")
            seen[id(p)] = (gi, pi)
            flat.append(p)
    if not flat:
        raise ValueError("params: every param group is empty; give the optimizer at least one parameter")
    return flat


def check_same_options_everywhere(comm: Any, device: torch.device, **options: Any) -> None:
    """Collective (one all-gather of one int64 per option): ``ValueError`` on every rank, instead of a
    hang or a crash in a later collective, when ranks were given different ``options``
    (``bucket_mb``, ``grad_comm``, ...). ``comm`` is a :class:`leo_dist.collectives.Comm`."""
    if not comm.distributed:
        return
    names = sorted(options)
    mine = torch.tensor([zlib.crc32(repr(options[k]).encode()) for k in names], dtype=torch.int64, device=device)
    table = torch.empty(comm.world * len(names), dtype=torch.int64, device=device)
    comm.all_gather(table, mine)
    table = table.view(comm.world, len(names)).cpu()
    differ = [k for i, k in enumerate(names) if table[:, i].ne(table[0, i]).any()]
    if differ:
        bad = [r for r in range(comm.world) if table[r].ne(table[0]).any()]
        raise ValueError(f"ranks disagree on {', '.join(differ)}: ranks {bad} differ from rank 0 (rank {comm.rank} "
                         f"has {', '.join(f'{k}={options[k]!r}' for k in differ)}); every rank must build the "
                         "optimizer with the same arguments")


# ----------------------------------------------------------------------------- full state dicts
# Group keys that other optimizers (torch's, and the other leo_dist family) keep and Lion/Leo do not.
_FOREIGN_GROUP_KEYS = {"amsgrad", "momentum", "dampening", "nesterov", "maximize", "foreach", "capturable",
                       "differentiable", "fused", "decoupled_weight_decay", "lr_decay", "alpha", "centered",
                       "rho", "lambd", "etas", "step_sizes", "momentum_decay", "initial_accumulator_value",
                       "eps", "align_const", "orthogonalize", "max_iter", "history_size", "line_search_fn"}
_STATE_KEYS = {"exp_avg", "update_error", "grad_error", "exp_avg_sq", "step"}


def check_state_dict(state_dict: Any, param_groups: list[Mapping[str, Any]], optimizer: str) -> None:
    """Validate a full (single-process layout) state dict against ``param_groups`` before anything
    is loaded: its structure, that it is neither the sharded (DCP) form nor another optimizer's,
    the saved group hyperparameters, and the shape of every saved state tensor.
    ``TypeError``/``ValueError`` naming what is wrong."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict (from {optimizer}.state_dict()), got {type(state_dict).__name__}")
    if isinstance(state_dict.get("leo_dist"), str) or "param_groups" not in state_dict and "leo_dist" in state_dict:
        raise ValueError(f"state_dict is the sharded (DCP) form from sharded_state_dict(): resume it with "
                         f"dcp.load(...) and then {optimizer}.load_sharded_state_dict(...), not load_state_dict")
    groups, state = state_dict.get("param_groups"), state_dict.get("state", {})
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ValueError("state_dict['param_groups'] must be a list of dicts, each with a 'params' list")
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
    if len(groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(param_groups)}")
    mine_keys = set().union(*(set(g) for g in param_groups)) - {"params"}
    for gi, (mine, saved) in enumerate(zip(param_groups, groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(f"state_dict's param_groups[{gi}] holds {len(saved['params'])} parameters, this "
                             f"optimizer's holds {len(mine['params'])}")
        missing = sorted(set(mine) - set(saved) - {"params"})
        foreign = sorted((set(saved) & _FOREIGN_GROUP_KEYS) - mine_keys)
        if missing or foreign:
            raise ValueError(f"state_dict's param_groups[{gi}] was saved by another optimizer, not {optimizer} ("
                             + "; ".join(filter(None, [missing and f"it lacks {missing}",
                                                       foreign and f"it has {foreign}"])) + ")")
        check_hyperparameters({k: v for k, v in saved.items() if k in mine})
    ids = [i for g in groups for i in g["params"]]
    params = [p for g in param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        entry = state.get(pid)
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            raise TypeError(f"state_dict['state'][{pid!r}] must be a dict, got {type(entry).__name__}")
        foreign = sorted(set(entry) - _STATE_KEYS)
        if foreign:
            raise ValueError(f"state_dict['state'][{pid!r}] holds {foreign}: the state of another optimizer, not "
                             f"{optimizer} (whose state is exp_avg, plus update_error/grad_error in 1-bit modes, exp_avg_sq/step for AdamW groups)")
        for key, value in entry.items():
            if key == "step":
                continue
            if type(value).__name__ == "ShardedTensor":
                raise ValueError(f"state_dict['state'][{pid!r}][{key!r}] is a ShardedTensor: the sharded (DCP) "
                                 f"form loads with dcp.load + {optimizer}.load_sharded_state_dict")
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"state_dict['state'][{pid!r}][{key!r}] must be a real floating point tensor, got "
                                + (f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__))
            if value.shape != p.shape:
                raise ValueError(f"state_dict['state'][{pid!r}][{key!r}] has shape {tuple(value.shape)}, its "
                                 f"parameter has shape {tuple(p.shape)}: the state was saved for another model")
