"""Single-process Lion and Leo against an independent float64 reference (docs/design.md, "The maths, once").

The reference below is deliberately written without leo_dist.functional: plain float64 tensor
ops, with the Leo norms taken by explicit loops over rows and columns, so that a mistake in the
shared maths cannot cancel out of the comparison.

Error measure for fp32: ``max|ours - ref| / max|ref|`` per tensor, bound 2e-6 after 20 steps.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from leo_dist import Leo, Lion, leo_param_groups
from leo_dist import functional as F

F64 = torch.float64
FP32_REL_TOL = 2e-6
STEPS = 20


# --------------------------------------------------------------------------- float64 reference

def _norms_of_rows(c: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sqrt((row * row).sum()) for row in c])


def ref_direction(c: torch.Tensor, rule: str, align: float, eps: float) -> torch.Tensor:
    """The update direction of docs/design.md in float64 (``sign(0) = 0`` via torch.sign)."""
    if rule == "lion":
        return torch.sign(c)
    if rule == "sign":
        return align * torch.sign(c)
    assert rule == "2d" and c.ndim == 2
    r = _norms_of_rows(c).unsqueeze(1)
    k = _norms_of_rows(c.t()).unsqueeze(0)
    u = c / (r + eps) + c / (k + eps)
    rms = math.sqrt((u * u).sum().item() / u.numel() + eps)
    return (align / (rms + eps)) * u


class RefParam:
    """Float64 shadow of one parameter and its momentum.

    For a bf16 parameter the shadow is rounded to bf16 after every step, because that is what
    the optimizer stores and reads back at the next step; momentum stays unrounded float64.
    """

    def __init__(self, p: torch.Tensor, rule: str, hp: dict):
        self.p = p.detach().to(F64).clone()
        self.m = torch.zeros_like(self.p)
        self.dtype = p.dtype
        self.rule = rule
        self.hp = hp

    def step(self, g: torch.Tensor) -> None:
        hp = self.hp
        b1, b2 = hp["betas"]
        c = b1 * self.m + (1 - b1) * g
        upd = ref_direction(c, self.rule, hp.get("align_const", 1.0), hp.get("eps", 1e-8))
        self.p = self.p * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * upd
        if self.dtype != torch.float32:
            self.p = self.p.to(self.dtype).to(F64)
        self.m = b2 * self.m + (1 - b2) * g


def draw_grad(gen: torch.Generator, m: torch.Tensor, beta1: float, dtype: torch.dtype) -> torch.Tensor:
    """A fresh N(0,1) gradient, exactly representable in ``dtype``, returned in float64.

    Elements whose ``c = β1·m + (1−β1)·g`` would lie within 1e-5 of the size of its two terms
    are redrawn: there fp32 rounding (≈6e-8 relative, and the fp32 momentum drifts from the
    float64 one by a few of those) could flip sign(c), a disagreement of the test data rather
    than of the optimizer. Redraws happen for about one element in 1e5.
    """
    def fresh():
        return torch.randn(m.shape, generator=gen, dtype=F64).to(dtype).to(F64)

    g = fresh()
    for _ in range(50):
        c = beta1 * m + (1 - beta1) * g
        near_zero = c.abs() <= 1e-5 * (beta1 * m.abs() + (1 - beta1) * g.abs())
        if not near_zero.any():
            return g
        g = torch.where(near_zero, fresh(), g)
    raise AssertionError("could not draw a gradient with c away from 0")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours = ours.detach().to(F64)
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers (8 significant bits) at |x|, for normal x."""
    _, exponent = torch.frexp(x.abs().clamp_min(1e-30))
    return torch.ldexp(torch.ones_like(x), exponent - 8)


# --------------------------------------------------------------------------- parity with the reference

def random_shapes(gen: torch.Generator) -> list[tuple[int, ...]]:
    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    n = r(2, 9)
    return [
        (r(1, 40),),                          # 1-D
        (1,),                                 # a single element
        (n, n),                               # square
        (r(10, 20), r(2, 5)),                 # tall
        (r(2, 5), r(10, 20)),                 # wide
        (1, r(2, 16)),                        # 1 x N
        (r(2, 16), 1),                        # N x 1
        (r(2, 4), r(2, 5), r(2, 6)),          # 3-D
        (r(1, 3), r(2, 4), r(2, 3), r(2, 3)),  # 4-D
    ]


# Three groups that differ in every hyperparameter. The lrs are large enough that a bf16
# parameter of size ~0.5 (ulp 2^-9..2^-8) really moves at every step instead of stalling.
LEO_GROUPS = [
    dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, align_const=0.2, eps=1e-8, orthogonalize=True),
    dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.0, align_const=0.5, eps=1e-8, orthogonalize=False),
    dict(lr=0.1, betas=(0.95, 0.999), weight_decay=0.01, align_const=0.3, eps=1e-6, orthogonalize=True),
]
LION_GROUPS = [
    dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1),
    dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.0),
    dict(lr=0.1, betas=(0.95, 0.999), weight_decay=0.01),
]


def _rule(kind: str, hp: dict, ndim: int) -> str:
    if kind == "lion":
        return "lion"
    return "2d" if hp["orthogonalize"] and ndim == 2 else "sign"


def _param_dtype(mode: str, index: int) -> torch.dtype:
    if mode == "mixed":
        return torch.bfloat16 if index % 2 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[mode]


class FunctionalDriver:
    """The same param groups stepped through leo_dist.functional directly.

    The optimizer classes may hand a group to a faster back end; the functional module is the
    maths every path is defined by, so it is held to the same reference.
    """

    def __init__(self, kind: str, groups: list[dict]):
        self.kind = kind
        self.param_groups = groups
        self.state = {p: {"exp_avg": torch.zeros_like(p, dtype=torch.float32)} for g in groups for p in g["params"]}

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            ps = g["params"]
            args = (ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps])
            kw = dict(lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1], weight_decay=g["weight_decay"])
            if self.kind == "lion":
                F.lion_update(*args, **kw)
            else:
                F.leo_update(*args, align_const=g["align_const"], eps=g["eps"], orthogonalize=g["orthogonalize"], **kw)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype_mode", ["float32", "bfloat16", "mixed"])
@pytest.mark.parametrize("kind", ["lion", "leo"])
@pytest.mark.parametrize("path", ["optimizer", "functional"])
def test_parity_with_float64_reference(path, kind, dtype_mode, seed):
    gen = torch.Generator().manual_seed(1000 * seed + 7)
    shapes = random_shapes(gen)
    group_hps = LION_GROUPS if kind == "lion" else LEO_GROUPS

    groups, refs, params = [], [], []
    index = 0
    for hp in group_hps:
        group_params = []
        for shape in shapes:
            dtype = _param_dtype(dtype_mode, index)
            index += 1
            p = nn.Parameter((0.5 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype))
            group_params.append(p)
            params.append(p)
            refs.append(RefParam(p, _rule(kind, hp, p.ndim), hp))
        groups.append(dict(params=group_params, **hp))
    if path == "optimizer":
        opt = (Lion if kind == "lion" else Leo)(groups)
    else:
        opt = FunctionalDriver(kind, groups)

    # bf16 parameters: rounding to bf16 is discontinuous, so the reference restarts every step
    # from the bf16 value the optimizer stored (the value it reads back) and the comparison is
    # made per step. Otherwise one tie-break that went the other way near some value is carried
    # along in absolute terms and later re-measured in a finer binade as several ulps.
    # The bound. The optimizer's fp32 value before rounding and the exact one differ by a few
    # fp32 roundings of the operands, far below half a bf16 spacing except where p·(1−ηλ) and
    # η·update nearly cancel; either way both round to the same bf16 number unless a rounding
    # midpoint lies between them, and then to neighbouring ones. So every element is within one
    # bf16 ulp (spacing at the larger magnitude), and only a small fraction differ at all
    # (measured ~1e-3 of element-steps, driven by the cancellations; bound 2%).
    mismatched = compared = 0
    for _ in range(STEPS):
        for p, ref in zip(params, refs):
            g = draw_grad(gen, ref.m, ref.hp["betas"][0], p.dtype)
            p.grad = g.to(p.dtype)
            if p.dtype == torch.bfloat16:
                ref.p = p.detach().to(F64)
            ref.step(g)
        opt.step()
        for p, ref in zip(params, refs):
            if p.dtype != torch.bfloat16:
                continue
            ours = p.detach().to(F64)
            diff = (ours - ref.p).abs()
            ulp = bf16_ulp(torch.maximum(ours.abs(), ref.p.abs()))
            assert (diff <= ulp).all(), (tuple(p.shape), ref.rule, (diff / ulp).max().item())
            mismatched += int((diff > 0).sum())
            compared += p.numel()
    assert mismatched <= 0.02 * compared, (mismatched, compared)

    for p, ref in zip(params, refs):
        # Momentum is fp32 whatever the parameter dtype, and bf16 gradients are exact in fp32.
        m = opt.state[p]["exp_avg"]
        assert m.dtype == torch.float32
        assert rel_err(m, ref.m) <= FP32_REL_TOL, (tuple(p.shape), ref.rule)
        if p.dtype == torch.float32:
            assert rel_err(p, ref.p) <= FP32_REL_TOL, (tuple(p.shape), ref.rule)


def test_bf16_parameters_really_move():
    """Guard for the bf16 parity test: with its lrs the bf16 parameters do not stall."""
    gen = torch.Generator().manual_seed(8)
    p = nn.Parameter(0.5 * torch.randn(8, 8, generator=gen).to(torch.bfloat16))
    p0 = p.detach().clone()
    opt = Leo([dict(params=[p], **LEO_GROUPS[1])])
    for _ in range(3):
        p.grad = torch.randn(8, 8, generator=gen).to(torch.bfloat16)
        opt.step()
    assert (p.detach() != p0).float().mean() > 0.9


# --------------------------------------------------------------------------- against lion_pytorch

def test_lion_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    gen = torch.Generator().manual_seed(3)
    shapes = [(37,), (6, 7), (3, 4, 5), (2, 3, 2, 2)]
    hps = [dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.0)]

    ours, theirs, shadow_m, betas = [], [], [], []
    groups_ours, groups_theirs = [], []
    for hp in hps:
        go, gt = [], []
        for shape in shapes:
            init = torch.randn(shape, generator=gen)
            a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
            go.append(a)
            gt.append(b)
            ours.append(a)
            theirs.append(b)
            shadow_m.append(torch.zeros(shape, dtype=F64))
            betas.append(hp["betas"])
        groups_ours.append(dict(params=go, **hp))
        groups_theirs.append(dict(params=gt, **hp))
    opt_ours = Lion(groups_ours)
    opt_theirs = lion_pytorch.Lion(groups_theirs)

    for _ in range(STEPS):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            b1, b2 = betas[i]
            g = draw_grad(gen, shadow_m[i], b1, torch.float32)
            shadow_m[i] = b2 * shadow_m[i] + (1 - b2) * g
            a.grad = g.float()
            b.grad = g.float()
        opt_ours.step()
        opt_theirs.step()

    for a, b in zip(ours, theirs):
        # Same signs (guaranteed by draw_grad), ±lr is exact in fp32 and the decay is the same
        # single multiply, so the parameters agree bit for bit.
        assert torch.equal(a, b)
        # Momentum: torch.lerp versus mul+add round differently; a few fp32 ulps of O(1) values.
        torch.testing.assert_close(opt_ours.state[a]["exp_avg"], opt_theirs.state[b]["exp_avg"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- sign(0) and skipped params

def _make(kind: str, params, **kw):
    if kind == "lion":
        return Lion(params, **kw)
    return Leo(params, **kw)


@pytest.mark.parametrize("shape", [(6,), (3, 4), (1, 5)])
@pytest.mark.parametrize("kind", ["lion", "leo", "leo-sign"])
def test_zero_gradient_and_momentum_only_decay(kind, shape):
    lr, wd = 0.1, 0.5
    extra = {"orthogonalize": False} if kind == "leo-sign" else {}
    p = nn.Parameter(torch.randn(shape))
    expected = p.detach().clone()
    opt = _make(kind.split("-")[0], [p], lr=lr, weight_decay=wd, **extra)
    for _ in range(3):
        p.grad = torch.zeros(shape)
        opt.step()
        # Leo's 2-D rule with c = 0 gives u = 0/(0+eps) = 0 and a finite scale: no step either.
        expected = expected * (1 - lr * wd)
    assert torch.equal(p.detach(), expected)
    assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_zero_c_without_decay_leaves_parameter_bitwise(kind):
    p = nn.Parameter(torch.randn(4, 3))
    p0 = p.detach().clone()
    opt = _make(kind, [p], lr=0.1, weight_decay=0.0)
    p.grad = torch.zeros(4, 3)
    opt.step()
    assert torch.equal(p.detach(), p0)
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_elements_with_zero_c_get_no_sign_step(kind):
    lr, wd = 0.1, 0.0
    p = nn.Parameter(torch.zeros(5))
    opt = _make(kind, [p], lr=lr, weight_decay=wd)
    p.grad = torch.tensor([1.0, 0.0, -2.0, 0.0, 3.0])
    opt.step()
    scale = 1.0 if kind == "lion" else 0.2  # Leo's default align_const on a 1-D parameter
    step = lr * scale
    assert torch.equal(p.detach(), torch.tensor([-step, 0.0, step, 0.0, -step]))


def test_leo_2d_zero_rows_and_columns_only_decay():
    """Rows (and columns) of c that are all zero get u = 0 there: those elements only decay."""
    lr, wd = 0.1, 0.3
    p = nn.Parameter(torch.randn(4, 5))
    p0 = p.detach().clone()
    opt = Leo([p], lr=lr, weight_decay=wd)
    g = torch.randn(4, 5)
    g[1] = 0.0
    g[:, 3] = 0.0
    p.grad = g
    opt.step()
    untouched = torch.zeros(4, 5, dtype=torch.bool)
    untouched[1] = True
    untouched[:, 3] = True
    assert torch.equal(p.detach()[untouched], (p0 * (1 - lr * wd))[untouched])
    assert (p.detach()[~untouched] != (p0 * (1 - lr * wd))[~untouched]).all()


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_parameter_without_grad_is_skipped(kind):
    a = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(7))
    b0 = b.detach().clone()
    opt = _make(kind, [a, b], lr=0.1, weight_decay=0.5)
    for _ in range(2):
        a.grad = torch.randn(3, 4)
        opt.step()
    assert b.grad is None
    assert torch.equal(b.detach(), b0)  # no decay either
    assert b not in opt.state
    assert "exp_avg" in opt.state[a]


# --------------------------------------------------------------------------- state_dict, schedulers, closure

def _build(kind, tensors, momentum_dtype, lr_scale=1.0):
    params = [nn.Parameter(t.clone()) for t in tensors]
    half = len(params) // 2
    if kind == "lion":
        groups = [dict(params=params[:half], lr=0.03 * lr_scale, weight_decay=0.1),
                  dict(params=params[half:], lr=0.01 * lr_scale, betas=(0.8, 0.9))]
    else:
        groups = [dict(params=params[:half], lr=0.03 * lr_scale, weight_decay=0.1),
                  dict(params=params[half:], lr=0.01 * lr_scale, orthogonalize=False, align_const=0.4)]
    opt = _make(kind, groups, momentum_dtype=momentum_dtype)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return params, opt, sched


def _run(params, opt, sched, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        opt.step()
        sched.step()


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_state_dict_round_trip_resumes_bitwise(kind, momentum_dtype, param_dtype):
    gen = torch.Generator().manual_seed(11)
    shapes = [(5, 6), (9,), (2, 3, 4), (7, 2)]
    init = [torch.randn(s, generator=gen).to(param_dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(10)]

    params_a, opt_a, sched_a = _build(kind, init, momentum_dtype)
    _run(params_a, opt_a, sched_a, grads)

    params_b, opt_b, sched_b = _build(kind, init, momentum_dtype)
    _run(params_b, opt_b, sched_b, grads[:4])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_b], "opt": opt_b.state_dict(),
                "sched": sched_b.state_dict()}, buf)
    del params_b, opt_b, sched_b
    buf.seek(0)
    ckpt = torch.load(buf)

    # Different lrs at construction: load_state_dict must restore the saved ones.
    params_c, opt_c, sched_c = _build(kind, ckpt["params"], momentum_dtype, lr_scale=7.0)
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    expected_m_dtype = momentum_dtype or torch.float32
    for p in params_c:
        assert opt_c.state[p]["exp_avg"].dtype == expected_m_dtype
    _run(params_c, opt_c, sched_c, grads[4:])

    for ga, gc in zip(opt_a.param_groups, opt_c.param_groups):
        assert ga["lr"] == gc["lr"]
    for pa, pc in zip(params_a, params_c):
        assert torch.equal(pa, pc)
        ma, mc = opt_a.state[pa]["exp_avg"], opt_c.state[pc]["exp_avg"]
        assert ma.dtype == mc.dtype == expected_m_dtype
        assert torch.equal(ma, mc)


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_closure_is_evaluated_with_grad_and_its_loss_returned(kind):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    model_a = nn.Linear(4, 2)
    model_b = nn.Linear(4, 2)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = _make(kind, model_a.parameters(), lr=0.01)
    opt_b = _make(kind, model_b.parameters(), lr=0.01)

    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt_a.zero_grad()
        loss = nn.functional.mse_loss(model_a(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt_a.step(closure)
        opt_b.zero_grad()
        expected = nn.functional.mse_loss(model_b(x), y)
        expected.backward()
        assert opt_b.step() is None
        assert torch.equal(loss.detach(), expected.detach())
    assert calls == [True, True, True]
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_step_hooks_run(kind):
    p = nn.Parameter(torch.randn(3, 3))
    opt = _make(kind, [p])
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    p.grad = torch.randn(3, 3)
    opt.step()
    assert seen == ["pre", "post"]


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_bf16_momentum_is_stored_in_bf16_and_tracks_fp32(kind):
    gen = torch.Generator().manual_seed(5)
    shapes = [(16, 12), (40,), (3, 4, 5)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    runs = {}
    for mdtype in (None, torch.bfloat16):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = _make(kind, params, lr=0.01, weight_decay=0.1, momentum_dtype=mdtype)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
        runs[mdtype] = (params, opt)

    params32, opt32 = runs[None]
    params16, opt16 = runs[torch.bfloat16]
    for p32, p16, p0 in zip(params32, params16, init):
        m16 = opt16.state[p16]["exp_avg"]
        assert m16.dtype == torch.bfloat16
        assert opt32.state[p32]["exp_avg"].dtype == torch.float32
        # bf16 momentum keeps 8 significant bits (each store rounds by <= 2^-9 relative): sign(c)
        # flips only where c is tiny, and the 2-D rule moves by about the momentum's relative
        # error. Both are small against how far the parameters travelled in 20 steps (measured:
        # 0 for the sign rule, ~1e-3 for the 2-D rule; bound 1e-2). |m| < 1 here, so 3e-3
        # absolute is a few bf16 roundings (measured ~1e-3).
        travelled = (p32.detach() - p0).norm()
        assert (p16.detach() - p32.detach()).norm() <= 1e-2 * travelled
        torch.testing.assert_close(m16.float(), opt32.state[p32]["exp_avg"], rtol=0.0, atol=3e-3)


def test_momentum_dtype_argument_sets_state_dtype():
    p = nn.Parameter(torch.randn(4, 4))
    opt = Leo([p], momentum_dtype=torch.bfloat16)
    p.grad = torch.randn(4, 4)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- leo_param_groups

class TinyLM(nn.Module):
    def __init__(self, head_first: bool):
        super().__init__()
        if head_first:  # registration order must not change how the tied weight is classified
            self.head = nn.Linear(8, 11, bias=False)
            self.emb = nn.Embedding(11, 8)
        else:
            self.emb = nn.Embedding(11, 8)
            self.head = nn.Linear(8, 11, bias=False)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("head_first", [False, True])
def test_leo_param_groups_splits_matrices_from_the_rest(head_first):
    model = TinyLM(head_first)
    groups = leo_param_groups(model, weight_decay=0.05)
    assert len(groups) == 2
    mats, rest = groups
    assert mats["orthogonalize"] is True and mats["weight_decay"] == 0.05
    assert rest["orthogonalize"] is False and rest["weight_decay"] == 0.0

    ids = lambda ps: sorted(id(p) for p in ps)  # noqa: E731
    assert ids(mats["params"]) == ids([model.proj.weight])
    assert ids(rest["params"]) == ids([model.emb.weight, model.proj.bias, model.norm.weight, model.norm.bias])
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))  # the tied weight appears once

    opt = Leo(groups)
    x = model.emb(torch.tensor([1, 2, 3]))
    model.head(model.norm(model.proj(x))).sum().backward()
    opt.step()


def test_leo_param_groups_leaves_out_empty_groups_and_rejects_non_modules():
    groups = leo_param_groups(nn.LayerNorm(4))
    assert len(groups) == 1 and groups[0]["orthogonalize"] is False
    with pytest.raises(TypeError, match="model"):
        leo_param_groups([nn.Parameter(torch.zeros(2, 2))])
