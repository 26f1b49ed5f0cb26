"""Single-process ``Lion`` and ``Leo``: the oracle for every distributed path.

Both are ordinary ``torch.optim.Optimizer`` subclasses: param groups with their own
hyperparameters, ``closure``, LR schedulers, ``state_dict``/``load_state_dict``. The only state is
the momentum, stored per parameter under the torch.optim name ``exp_avg`` in ``momentum_dtype``
(float32 unless asked otherwise), shaped like the parameter. Parameters whose ``grad`` is None are
skipped (no decay, no momentum change).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from .dispatch import select_backend
from .validation import check_hyperparameters, check_param, check_grad, check_momentum_dtype

__all__ = ["Lion", "Leo", "leo_param_groups"]


class _MomentumSignOptimizer(Optimizer):
    """Shared plumbing of Lion and Leo: validation, state creation, the step loop."""

    def __init__(self, params, defaults: dict[str, Any], momentum_dtype, fused):
        check_hyperparameters(defaults)
        self._momentum_dtype = check_momentum_dtype(momentum_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                check_param(p)
        self._backend = select_backend(fused, [p for g in self.param_groups for p in g["params"]])

    @property
    def fused(self) -> bool:
        """True when the local step runs the Triton kernels (chosen at construction from ``fused``)."""
        return self._backend.name == "triton"

    _algorithm = ""

    def _check_algorithm(self, group: dict[str, Any], where: str) -> None:
        # a group of the sharded optimizers' "adamw" kind would otherwise be stepped by this rule
        algo = group.get("algorithm", self._algorithm)
        if algo != self._algorithm:
            raise ValueError(f"{where}['algorithm']: {type(self).__name__} steps only {self._algorithm!r} groups, "
                             f"got {algo!r} (per-group algorithms are a feature of ShardedLion/ShardedLeo; "
                             "here use a separate torch.optim.AdamW for those parameters)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_algorithm(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]")
            check_hyperparameters(self.param_groups[-1])
            for p in self.param_groups[-1]["params"]:
                check_param(p)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a rejected group must not stay in the optimizer
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim casts floating state to each parameter's dtype on load; the momentum keeps
        # ``momentum_dtype`` instead (fp32 momentum of bf16 parameters must not lose bits).
        for i, g in enumerate(state_dict.get("param_groups", [])):
            self._check_algorithm(g, f"state_dict['param_groups'][{i}]")
        saved = {pid: s.get("exp_avg") for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = (pid for g in state_dict["param_groups"] for pid in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for pid, p in zip(ids, params):
            m = saved.get(pid)
            if isinstance(m, torch.Tensor) and "exp_avg" in self.state.get(p, {}):
                self.state[p]["exp_avg"] = m.to(device=p.device, dtype=self._momentum_dtype, copy=True)

    def _gather(self, group) -> tuple[list, list, list]:
        params, grads, exp_avgs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad(p)
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=self._momentum_dtype, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
        return params, grads, exp_avgs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimisation step; ``closure`` re-evaluates the loss (run with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from . import fsdp as _fsdp  # DTensor (FSDP2) params: cross-shard Leo norms, see leo_dist/fsdp.py
        if _fsdp.any_dtensor(self.param_groups):
            _fsdp.dtensor_step_(self, [(g, *self._gather(g)) for g in self.param_groups],
                                rule="leo" if isinstance(self, Leo) else "lion", backend=self._backend)
            return loss
        for group in self.param_groups:
            params, grads, exp_avgs = self._gather(group)
            if params:
                self._update(group, params, grads, exp_avgs)
        return loss

    def _update(self, group, params, grads, exp_avgs) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class Lion(_MomentumSignOptimizer):
    """Lion (Chen et al., 2023): ``p ← p·(1−lr·wd) − lr·sign(β1·m + (1−β1)·g)``.

    Args:
        params: iterable of parameters or param-group dicts (floating point, not complex).
        lr: step size, ≥ 0. Default 1e-4.
        betas: ``(β1, β2)``, each in [0, 1). Default (0.9, 0.99).
        weight_decay: decoupled decay λ, ≥ 0. Default 0.
        momentum_dtype: dtype of ``exp_avg`` (float32 or bfloat16). Default float32.
        fused: None picks the Triton kernels for CUDA tensors when Triton imports; True demands
            them (raises otherwise); False never uses Triton. Without Triton, contiguous CPU
            float32/bfloat16 tensors take the compiled C path (:mod:`leo_dist.cpu_step`), anything
            else the multi-tensor torch path; all give the same results.
    """

    _algorithm = "lion"

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 *, momentum_dtype: torch.dtype | None = None, fused: bool | None = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, momentum_dtype, fused)

    def _update(self, group, params, grads, exp_avgs) -> None:
        beta1, beta2 = group["betas"]
        self._backend.lion_step(params, grads, exp_avgs, lr=group["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"])


class Leo(_MomentumSignOptimizer):
    """Leo: Lion's momentum with element-wise orthogonalisation of 2-D updates.

    For a group with ``orthogonalize=True`` (the default), every ``ndim == 2`` parameter takes
    ``align·u/RMS(u)`` with ``u = c/‖rows‖ + c/‖cols‖``; all other parameters, and every parameter
    of a group with ``orthogonalize=False``, take ``align_const·sign(c)``.

    Args: as :class:`Lion`, plus ``align_const`` (> 0, default 0.2), ``eps`` (> 0, default 1e-8)
    and the group key ``orthogonalize``. Defaults: lr 1e-3, weight_decay 0.01.
    """

    _algorithm = "leo"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.99), weight_decay: float = 0.01,
                 align_const: float = 0.2, eps: float = 1e-8, *, orthogonalize: bool = True,
                 momentum_dtype: torch.dtype | None = None, fused: bool | None = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
                        weight_decay=weight_decay, align_const=align_const, eps=eps,
                        orthogonalize=orthogonalize)
        super().__init__(params, defaults, momentum_dtype, fused)

    def _update(self, group, params, grads, exp_avgs) -> None:
        beta1, beta2 = group["betas"]
        self._backend.leo_step(params, grads, exp_avgs, lr=group["lr"], beta1=beta1, beta2=beta2,
                               weight_decay=group["weight_decay"], align_const=group["align_const"],
                               eps=group["eps"], orthogonalize=group["orthogonalize"])


def leo_param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into the two usual Leo groups.

    Returns ``[{"params": matrices, "orthogonalize": True, "weight_decay": weight_decay},
    {"params": rest, "orthogonalize": False, "weight_decay": 0.0}]`` where ``matrices`` are the 2-D
    weights of every module except embeddings, and ``rest`` are embeddings, norms, biases and any
    other shape. Empty groups are left out. Parameters shared between modules appear once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # A weight tied to an embedding (e.g. an LM head) is an embedding whichever module comes first.
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                     for p in m.parameters(recurse=False)}
    matrices, rest, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (matrices if p.ndim == 2 and id(p) not in embedding_ids else rest).append(p)
    groups = []
    if matrices:
        groups.append({"params": matrices, "orthogonalize": True, "weight_decay": weight_decay})
    if rest:
        groups.append({"params": rest, "orthogonalize": False, "weight_decay": 0.0})
    return groups
