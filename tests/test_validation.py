"""Bad input fails loudly with ValueError/TypeError naming the argument (docs/usage.md)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from leo_dist import Leo, Lion
from leo_dist.dispatch import triton_available
from leo_dist.validation import check_hyperparameters, check_momentum_dtype

OPTIMIZERS = [pytest.param(Lion, id="Lion"), pytest.param(Leo, id="Leo")]


def _params():
    return [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]


# (keyword arguments, exception, text that must appear in the message)
SHARED_BAD = [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(lr=math.nan), ValueError, "lr"),
    (dict(lr=math.inf), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "lr"),
    (dict(betas=(1.0, 0.99)), ValueError, r"betas\[0\]"),
    (dict(betas=(-0.1, 0.99)), ValueError, r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    (dict(betas=(0.9, -1e-3)), ValueError, r"betas\[1\]"),
    (dict(betas=(0.9, None)), TypeError, r"betas\[1\]"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(betas=(0.9,)), TypeError, "betas"),
    (dict(betas=(0.9, 0.99, 0.999)), TypeError, "betas"),
    (dict(betas="ab"), TypeError, "betas"),
    (dict(weight_decay=-0.01), ValueError, "weight_decay"),
    (dict(weight_decay=True), TypeError, "weight_decay"),  # a bool is not a number here
    (dict(momentum_dtype=torch.float16), TypeError, "momentum_dtype"),
    (dict(momentum_dtype=torch.float64), TypeError, "momentum_dtype"),
    (dict(momentum_dtype="bfloat16"), TypeError, "momentum_dtype"),
    (dict(fused="yes"), TypeError, "fused"),
    (dict(fused=1), TypeError, "fused"),
]

LEO_BAD = [
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(align_const=0.0), ValueError, "align_const"),
    (dict(align_const=-0.2), ValueError, "align_const"),
    (dict(orthogonalize="yes"), TypeError, "orthogonalize"),
]


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("kwargs,exc,match", SHARED_BAD)
def test_bad_constructor_arguments(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(_params(), **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", LEO_BAD)
def test_bad_leo_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Leo(_params(), **kwargs)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_boundary_values_are_accepted(cls):
    extra = dict(eps=1e-30, align_const=1e-6) if cls is Leo else {}
    opt = cls(_params(), lr=0.0, betas=[0.0, 0.0], weight_decay=0.0, **extra)
    assert opt.param_groups[0]["betas"] == (0.0, 0.0)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize(
    "tensor",
    [
        pytest.param(torch.zeros(3, dtype=torch.int64), id="int64"),
        pytest.param(torch.zeros(3, dtype=torch.int32), id="int32"),
        pytest.param(torch.zeros(3, dtype=torch.bool), id="bool"),
        pytest.param(torch.zeros(3, dtype=torch.complex64), id="complex64"),
        pytest.param(torch.zeros(2, 2, dtype=torch.complex128), id="complex128"),
    ],
)
def test_non_real_floating_params_are_rejected(cls, tensor):
    with pytest.raises(TypeError, match="params"):
        cls([nn.Parameter(torch.randn(2)), tensor])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_sparse_gradients_are_rejected(cls):
    emb = nn.Embedding(10, 3, sparse=True)
    w0 = emb.weight.detach().clone()
    opt = cls(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2, 7])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), w0)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize(
    "group,exc,match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9,)), TypeError, "betas"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    ],
)
def test_bad_param_group_is_rejected_and_not_kept(cls, group, exc, match):
    opt = cls(_params())
    extra = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(exc, match=match):
        opt.add_param_group(dict(params=[extra], **group))
    # A caller that catches the error must not be left with the invalid group in the optimizer.
    assert len(opt.param_groups) == 1
    assert all(p is not extra for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize(
    "group,exc,match",
    [
        (dict(eps=0.0), ValueError, "eps"),
        (dict(align_const=-1.0), ValueError, "align_const"),
        (dict(orthogonalize=1), TypeError, "orthogonalize"),
    ],
)
def test_bad_leo_param_group(group, exc, match):
    opt = Leo(_params())
    with pytest.raises(exc, match=match):
        opt.add_param_group(dict(params=[nn.Parameter(torch.randn(2, 2))], **group))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_bad_param_in_added_group(cls):
    opt = cls(_params())
    with pytest.raises(TypeError, match="params"):
        opt.add_param_group(dict(params=[torch.zeros(3, dtype=torch.int64)]))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_good_param_group_is_added_with_defaults(cls):
    opt = cls(_params(), lr=0.5)
    extra = nn.Parameter(torch.randn(4, 4))
    opt.add_param_group(dict(params=[extra], weight_decay=0.25))
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.25


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_fused_true_on_cpu_fails_loudly_or_runs(cls):
    """fused=True never falls back silently: on CPU without the interpreter it must raise."""
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter is on; fused=True is legitimate on CPU")
    with pytest.raises(RuntimeError, match="(?i)triton"):
        cls(_params(), fused=True)


def test_check_functions_directly():
    check_hyperparameters({"lr": torch.tensor(0.1), "betas": (0.5, 0.5)})  # a 0-d tensor is a scalar
    with pytest.raises(TypeError, match="lr"):
        check_hyperparameters({"lr": None})
    with pytest.raises(TypeError, match="eps"):
        check_hyperparameters({"eps": [1e-8]})
    assert check_momentum_dtype(None) is torch.float32
    assert check_momentum_dtype(torch.bfloat16) is torch.bfloat16
