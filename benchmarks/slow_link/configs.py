"""Configurations of the slow-link benchmark, by name, with their cost models.

A configuration says how one data-parallel training step is wired (DDP or not, which hook,
which optimizer) and how many bytes per rank that wiring should put on the wire (the ideal ring
or direct algorithm of docs/design.md, per rank and step, fp32 parameters). Adding a scheme is one
``register(Config(...))``; the driver, the table, the plots and the projection pick it up.

Configurations that need a part of leo_dist that is not there yet (the compressed modes of docs/design.md
§2) are registered too: ``Config.unavailable()`` says why they cannot run, and the driver skips
them with that reason until the library grows the mode, after which they join the table unchanged.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# PowerSGD's settings and split are the demo's (no torch import: launch.traffic is pure Python)
from launch.traffic import (POWERSGD_MIN_COMPRESSION_RATE, POWERSGD_RANK, POWERSGD_START_ITER,  # noqa: E402
                            powersgd_split)

__all__ = ["Config", "Phase", "REGISTRY", "register", "get", "default_names", "uncompressed_steps", "HYPER", "model_shapes",
           "DDP_BUCKET_BYTES", "LEO_BUCKET_BYTES", "POWERSGD_RANK",
           "POWERSGD_START_ITER"]

# Per optimizer family, the demo's defaults (launch/train.py): sign methods take every coordinate a
# full step, so they want a smaller lr than AdamW.
HYPER = {
    "adamw": dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "lion": dict(lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1),
    "leo": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01),
}
DDP_BUCKET_BYTES = 25 * 2**20
LEO_BUCKET_BYTES = 25 * 2**20
# PowerSGD runs plain all-reduce for its first POWERSGD_START_ITER iterations (torch's
# recommended warm-up); the benchmark's timed windows start after it, so they measure the
# compressed steady state.
POWERSGD_BUCKET_BYTES = 1024 * 2**20
# exact steps before 1-bit gradients in the suite's configurations (see _sharded)
SUITE_1BIT_WARMUP = 10
# validation loss of 'time to target' in the suite and on the topology testbed (10m preset)
TARGET_LOSS = 2.85


@dataclass(frozen=True)
class Phase:
    """One kind of collective in a step: bytes each rank sends under the ideal algorithm, and how
    many separate collective calls carry them (the latency term of the projection)."""
    name: str
    bytes_per_rank: float
    calls: int


@dataclass(frozen=True)
class Shapes:
    """What the cost models need to know about a model: each parameter's shape, and which ones Leo
    treats as matrices (``ndim == 2`` outside embeddings)."""
    shapes: tuple[tuple[int, ...], ...]
    leo_matrix: tuple[bool, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def model_shapes(model) -> Shapes:
    """The :class:`Shapes` of a torch module, with Leo's grouping from ``leo_dist.leo_param_groups``."""
    from leo_dist import leo_param_groups
    matrices = {id(p) for g in leo_param_groups(model) if g.get("orthogonalize") for p in g["params"]}
    params = [p for p in model.parameters() if p.requires_grad]
    return Shapes(tuple(tuple(p.shape) for p in params), tuple(id(p) in matrices for p in params))


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    family: str                       # key of HYPER
    update: str                       # configurations with equal ``update`` compute the same update
    build: Callable[..., Any]         # (model, world, hyper) -> (forward module, optimizer)
    cost: Callable[[Shapes, int], list[Phase]]
    lossy: bool = False               # changes the update (compare on time to target, not step time)
    leo_dist: bool = False
    probe: Callable[[], str | None] = field(default=lambda: None)
    default: bool = True
    # A configuration whose every step is bitwise the same arithmetic on the same bytes (the DDP-hook
    # variant of a standalone optimizer): by default the driver runs it only through its timed
    # windows and the report takes the loss curve from the twin, after checking that their
    # per-step training losses agree exactly over the steps both ran.
    twin: str | None = None
    # Steps a lossy configuration runs uncompressed before its compression starts (PowerSGD's
    # start_powerSGD_iter); None: read from the built optimizer (see uncompressed_steps).
    warmup: int | None = None

    def unavailable(self) -> str | None:
        """None when this configuration can run here, else why not."""
        try:
            return self.probe()
        except Exception as exc:  # a probe that cannot even import is a reason too
            return f"{type(exc).__name__}: {exc}"

    def model_bytes(self, shapes: Shapes, world: int) -> float:
        return sum(p.bytes_per_rank for p in self.cost(shapes, world))

    def model_calls(self, shapes: Shapes, world: int) -> int:
        return sum(p.calls for p in self.cost(shapes, world))


REGISTRY: dict[str, Config] = {}


def uncompressed_steps(cfg: Config, opt) -> int:
    """How many of the first steps ``cfg`` (built as ``opt``) runs uncompressed, at the exact
    modes' speed: time to target times them apart (worker.py --warmup-window-at, report.py)."""
    if cfg.warmup is not None:
        return cfg.warmup
    if getattr(opt, "grad_comm", None) == "1bit":
        return opt.grad_comm_warmup
    return 0


def register(cfg: Config) -> Config:
    if cfg.name in REGISTRY:
        raise ValueError(f"configuration {cfg.name!r} registered twice")
    REGISTRY[cfg.name] = cfg
    return cfg


def get(names: Sequence[str] | str | None) -> list[Config]:
    """Configurations by name ('all' or None: the default set, in registry order)."""
    if names is None or names == "all" or list(names) == ["all"]:
        return [REGISTRY[n] for n in default_names()]
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown configuration(s) {unknown}; known: {sorted(REGISTRY)}")
    return [REGISTRY[n] for n in names]


def default_names() -> list[str]:
    return [n for n, c in REGISTRY.items() if c.default]


# ------------------------------------------------------------------------------ cost models
def _ring(world: int) -> float:
    return (world - 1) / world


def _buckets(nbytes: float, cap: int) -> int:
    # DDP given an explicit bucket_cap_mb makes its first bucket that size too (no 1 MB first bucket).
    return math.ceil(nbytes / cap) if nbytes > 0 else 0


def _ddp_all_reduce(shapes: Shapes, world: int, wire_bytes: int) -> list[Phase]:
    n = shapes.numel
    calls = _buckets(4 * n, DDP_BUCKET_BYTES)
    return [Phase(f"all_reduce ({'fp32' if wire_bytes == 4 else '16-bit'} grads)", 2 * _ring(world) * wire_bytes * n,
                  calls)]


def cost_ddp_fp32(shapes: Shapes, world: int) -> list[Phase]:
    return _ddp_all_reduce(shapes, world, 4)


def cost_ddp_16bit(shapes: Shapes, world: int) -> list[Phase]:
    return _ddp_all_reduce(shapes, world, 2)


def cost_zero(shapes: Shapes, world: int) -> list[Phase]:
    # DDP all-reduces the full gradient (ZeroRedundancyOptimizer does not change DDP's hook), then
    # each rank broadcasts the parameters it updated: every parameter reaches W-1 other ranks.
    bcast = Phase("broadcast (fp32 params)", _ring(world) * 4 * shapes.numel, len(shapes.shapes))
    return _ddp_all_reduce(shapes, world, 4) + [bcast]


def _powersgd_split(shapes: Shapes, rank: int) -> tuple[int, int]:
    """Elements all-reduced uncompressed, and elements of the P and Q factors."""
    return powersgd_split(shapes.shapes, rank, POWERSGD_MIN_COMPRESSION_RATE)


def cost_powersgd(shapes: Shapes, world: int) -> list[Phase]:
    plain, factors = _powersgd_split(shapes, POWERSGD_RANK)
    calls = _buckets(4 * shapes.numel, POWERSGD_BUCKET_BYTES)
    return [Phase("all_reduce (uncompressed 1-D grads)", 2 * _ring(world) * 4 * plain, calls),
            Phase(f"all_reduce (rank-{POWERSGD_RANK} P and Q)", 2 * _ring(world) * 4 * factors, 2 * calls)]


def _leo_phases(shapes: Shapes, world: int, grad_bytes: float, leo: bool, update_bits: bool = False,
                update_bytes: float = 4) -> list[Phase]:
    """Sharded step: reduce-scatter the gradients, all-gather packed signs (and, for Leo's
    matrices with exact updates, the fp32 update), complete Leo's norms with small all-reduces."""
    n = shapes.numel
    n_mat = sum(math.prod(s) for s, m in zip(shapes.shapes, shapes.leo_matrix) if m) if leo else 0
    n_sign = n - n_mat
    row_col = sum(s[0] + s[1] for s, m in zip(shapes.shapes, shapes.leo_matrix) if m) if leo else 0
    sign_buckets = _buckets(4 * n_sign, LEO_BUCKET_BYTES)
    mat_buckets = _buckets(4 * n_mat, LEO_BUCKET_BYTES)
    phases = [Phase("reduce_scatter (grads)", _ring(world) * grad_bytes * n, sign_buckets + mat_buckets),
              # each rank's packed bits go to the W-1 others (the zero flags, one float per bucket, are
              # one small all-reduce, left out like the other side information)
              Phase("all_gather (1-bit signs)", _ring(world) * n_sign / 8, sign_buckets)]
    if n_mat:
        upd = n_mat / 8 if update_bits else update_bytes * n_mat
        phases.append(Phase("all_gather (matrix updates)", _ring(world) * upd, mat_buckets))
        phases.append(Phase("all_reduce (row/col norms, RMS)", 2 * _ring(world) * 4 * (row_col + len(shapes.shapes)),
                            2))
    return phases


def cost_leo_leo_bf16_u16(shapes, world):
    return _leo_phases(shapes, world, 2, leo=True, update_bytes=2)


def cost_leo_lion_fp32(shapes, world):
    return _leo_phases(shapes, world, 4, leo=False)


def cost_leo_lion_bf16(shapes, world):
    return _leo_phases(shapes, world, 2, leo=False)


def cost_leo_leo_fp32(shapes, world):
    return _leo_phases(shapes, world, 4, leo=True)


def cost_leo_leo_bf16(shapes, world):
    return _leo_phases(shapes, world, 2, leo=True)


def cost_leo_1bit_grads(shapes, world):
    # docs/design.md: signs with one fp32 scale per 1024-element chunk, delivered by an all-to-all.
    return _leo_phases(shapes, world, 1 / 8 + 4 / 1024, leo=False)


# ------------------------------------------------------------------------------ builders
def _decay_groups(model, weight_decay: float) -> list[dict]:
    """Decay the matrices (ndim >= 2), not biases and norms: the same groups for every optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _ddp(model, bucket_bytes: int = DDP_BUCKET_BYTES):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, bucket_cap_mb=bucket_bytes / 2**20)


def build_ddp_adamw(model, world, hyper):
    import torch
    ddp = _ddp(model)
    return ddp, torch.optim.AdamW(_decay_groups(model, hyper["weight_decay"]), lr=hyper["lr"], betas=hyper["betas"])


def build_ddp_lion_fp16(model, world, hyper):
    import leo_dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    ddp = _ddp(model)
    # bf16_compress_hook refuses gloo; fp16 is the 16-bit hook that runs there.
    ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp, leo_dist.Lion(_decay_groups(model, hyper["weight_decay"]), lr=hyper["lr"], betas=hyper["betas"])


def build_zero_lion(model, world, hyper):
    import leo_dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    ddp = _ddp(model)
    opt = ZeroRedundancyOptimizer(_decay_groups(model, hyper["weight_decay"]), optimizer_class=leo_dist.Lion,
                                  lr=hyper["lr"], betas=hyper["betas"])
    return ddp, opt


def build_ddp_powersgd_lion(model, world, hyper):
    import leo_dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    # One DDP bucket: with several, the Q all-reduce that one bucket's callback launches from a gloo
    # thread races the next bucket's all-reduces, ranks issue them in different orders and gloo
    # pairs mismatched collectives (seen here: a size-mismatch crash at the first compressed step).
    ddp = _ddp(model, POWERSGD_BUCKET_BYTES)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=POWERSGD_RANK,
                               start_powerSGD_iter=POWERSGD_START_ITER,
                               min_compression_rate=POWERSGD_MIN_COMPRESSION_RATE,
                               use_error_feedback=True, warm_start=True, random_seed=0)
    ddp.register_comm_hook(state, psgd.powerSGD_hook)
    return ddp, leo_dist.Lion(_decay_groups(model, hyper["weight_decay"]), lr=hyper["lr"], betas=hyper["betas"])


def _sharded(kind: str, grad_comm: str, ddp_hook: bool, update_comm: str = "exact", bucket_mb: float | None = None,
             **options):
    """``options``: more keywords of the optimizer (``overlap_grads``, ``overlap_updates``);
    ``bucket_mb``: DDP's ``bucket_cap_mb`` and the optimizer's ``bucket_mb`` (default 25 for both)."""
    bucket_bytes = LEO_BUCKET_BYTES if bucket_mb is None else bucket_mb * 2**20
    # stream=False: the deferred path of overlap_updates without streamed steps (an A/B of
    # docs/overlap.md, "Streamed steps"; no public switch, the streamed step is what overlap allows)
    stream = options.pop("stream", True)
    if grad_comm == "1bit":
        # The suite's 80-step budget puts its timed windows at step 12 and its target at 30-70
        # steps; under the library's 50-step exact warm-up every window would time fp32 steps.
        # These configurations keep the 10 warm-up steps they have always been measured with
        # (what that costs in convergence: docs/onebit_modes.md).
        options.setdefault("grad_comm_warmup", SUITE_1BIT_WARMUP)

    def build(model, world, hyper):
        import leo_dist
        if kind == "lion":
            opt = leo_dist.ShardedLion(_decay_groups(model, hyper["weight_decay"]), grad_comm=grad_comm,
                                       bucket_mb=bucket_bytes / 2**20, lr=hyper["lr"], betas=hyper["betas"],
                                       **options)
        else:
            opt = leo_dist.ShardedLeo(leo_dist.leo_param_groups(model, hyper["weight_decay"]), grad_comm=grad_comm,
                                      update_comm=update_comm, bucket_mb=bucket_bytes / 2**20,
                                      lr=hyper["lr"], betas=hyper["betas"], **options)
        if not stream:
            opt._streamable = False
        if not ddp_hook:
            return model, opt
        import leo_dist.hooks
        ddp = _ddp(model, bucket_bytes)
        leo_dist.hooks.attach(ddp, opt)
        return ddp, opt
    return build


def _probe_sharded(kind: str, grad_comm: str = "fp32", update_comm: str = "exact", hook: bool = False):
    """Build the optimizer on one tiny tensor in a world of one: raises where the mode is missing."""
    def probe() -> str | None:
        import torch
        import leo_dist
        if hook:
            import leo_dist.hooks  # noqa: F401
        p = torch.nn.Parameter(torch.zeros(4, 4))
        cls = leo_dist.ShardedLion if kind == "lion" else leo_dist.ShardedLeo
        kw = {} if kind == "lion" else {"update_comm": update_comm}
        try:
            cls([p], grad_comm=grad_comm, **kw)
        except NotImplementedError as exc:
            return f"not implemented in this leo_dist: {exc}"
        return None
    return probe


register(Config("ddp_adamw", "DDP + AdamW (fp32 all-reduce)", "adamw", "adamw", build_ddp_adamw, cost_ddp_fp32))
register(Config("ddp_lion_fp16", "DDP + Lion, fp16 compress hook", "lion", "lion", build_ddp_lion_fp16,
                cost_ddp_16bit))
register(Config("zero_lion", "ZeroRedundancyOptimizer(Lion) + DDP", "lion", "lion", build_zero_lion, cost_zero))
register(Config("ddp_powersgd_lion", f"DDP + PowerSGD (rank {POWERSGD_RANK}) + Lion", "lion", "lion-powersgd",
                build_ddp_powersgd_lion, cost_powersgd, lossy=True, warmup=POWERSGD_START_ITER))
for _grad in ("fp32", "bf16"):
    _c = cost_leo_lion_fp32 if _grad == "fp32" else cost_leo_lion_bf16
    register(Config(f"leo_lion_{_grad}", f"ShardedLion, {_grad} grads", "lion", "lion", _sharded("lion", _grad, False),
                    _c, leo_dist=True, probe=_probe_sharded("lion", _grad)))
    register(Config(f"leo_lion_{_grad}_ddp", f"ShardedLion, {_grad} grads, DDP hook", "lion", "lion",
                    _sharded("lion", _grad, True), _c, leo_dist=True, probe=_probe_sharded("lion", _grad, hook=True),
                    twin=f"leo_lion_{_grad}"))
register(Config("leo_leo_bf16", "ShardedLeo, bf16 grads, exact matrix updates", "leo", "leo",
                _sharded("leo", "bf16", False), cost_leo_leo_bf16, leo_dist=True, probe=_probe_sharded("leo", "bf16")))
register(Config("leo_leo_fp32", "ShardedLeo, fp32 grads, exact matrix updates", "leo", "leo",
                _sharded("leo", "fp32", False), cost_leo_leo_fp32, leo_dist=True, probe=_probe_sharded("leo", "fp32"),
                default=False))
# The compressed modes of docs/design.md: skipped with the library's own reason until they exist.
register(Config("leo_lion_1bit", "ShardedLion, 1-bit grads (error feedback)", "lion", "lion-1bit",
                _sharded("lion", "1bit", False), cost_leo_1bit_grads, lossy=True, leo_dist=True,
                probe=_probe_sharded("lion", "1bit")))
register(Config("leo_leo_bf16_u16", "ShardedLeo, bf16 grads, bf16 matrix updates", "leo", "leo",
                _sharded("leo", "bf16", False, update_comm="bf16"), cost_leo_leo_bf16_u16, lossy=True,
                leo_dist=True, probe=_probe_sharded("leo", "bf16", update_comm="bf16"), default=False))
register(Config("leo_leo_bf16_1bit", "ShardedLeo, bf16 grads, 1-bit matrix updates", "leo", "leo-1bit",
                _sharded("leo", "bf16", False, update_comm="1bit"),
                lambda s, w: _leo_phases(s, w, 2, leo=True, update_bits=True), lossy=True, leo_dist=True,
                probe=_probe_sharded("leo", "bf16", update_comm="1bit")))

# Overlap (issue 16): the DDP-hook variants with the gradient exchange sent from the hook itself
# (overlap_grads=False: backward waits whenever the exchange's buffer pool is full, as before the
# background sender), and with the update all-gathers left to the next forward (overlap_updates).
# Same arithmetic as their standalone twins, bitwise.
for _grad, _c in (("fp32", cost_leo_lion_fp32), ("bf16", cost_leo_lion_bf16), ("1bit", cost_leo_1bit_grads)):
    _update = "lion-1bit" if _grad == "1bit" else "lion"
    _twin = f"leo_lion_{_grad}"
    if _grad == "1bit":
        register(Config("leo_lion_1bit_ddp", "ShardedLion, 1-bit grads, DDP hook", "lion", _update,
                        _sharded("lion", "1bit", True), _c, lossy=True, leo_dist=True,
                        probe=_probe_sharded("lion", "1bit", hook=True), twin=_twin, default=False))
    register(Config(f"leo_lion_{_grad}_ddp_inhook", f"ShardedLion, {_grad} grads, DDP hook, sent in the hook",
                    "lion", _update, _sharded("lion", _grad, True, overlap_grads=False), _c, lossy=_grad == "1bit",
                    leo_dist=True, probe=_probe_sharded("lion", _grad, hook=True), twin=_twin, default=False))
    register(Config(f"leo_lion_{_grad}_ddp_overlap", f"ShardedLion, {_grad} grads, DDP hook, overlap_updates",
                    "lion", _update, _sharded("lion", _grad, True, overlap_updates=True), _c, lossy=_grad == "1bit",
                    leo_dist=True, probe=_probe_sharded("lion", _grad, hook=True), twin=_twin, default=False))
    for _mb in (2, 4):
        register(Config(f"leo_lion_{_grad}_ddp_overlap_b{_mb}",
                        f"ShardedLion, {_grad} grads, DDP hook, overlap_updates, {_mb} MB buckets", "lion", _update,
                        _sharded("lion", _grad, True, overlap_updates=True, bucket_mb=_mb), _c, lossy=_grad == "1bit",
                        leo_dist=True, probe=_probe_sharded("lion", _grad, hook=True), twin=_twin, default=False))
        register(Config(f"leo_lion_{_grad}_ddp_b{_mb}", f"ShardedLion, {_grad} grads, DDP hook, {_mb} MB buckets",
                        "lion", _update, _sharded("lion", _grad, True, bucket_mb=_mb), _c, lossy=_grad == "1bit",
                        leo_dist=True, probe=_probe_sharded("lion", _grad, hook=True), twin=_twin, default=False))
    register(Config(f"leo_lion_{_grad}_ddp_overlap_b2_nostream",
                    f"ShardedLion, {_grad} grads, DDP hook, overlap_updates, 2 MB buckets, step not streamed",
                    "lion", _update, _sharded("lion", _grad, True, overlap_updates=True, bucket_mb=2, stream=False),
                    _c, lossy=_grad == "1bit", leo_dist=True, probe=_probe_sharded("lion", _grad, hook=True),
                    twin=_twin, default=False))
# ShardedLeo (exact matrix updates) with the same overlap: "every mode" of issue 16's W=2 target.
register(Config("leo_leo_bf16_ddp_overlap_b2", "ShardedLeo, bf16 grads, DDP hook, overlap_updates, 2 MB buckets",
                "leo", "leo", _sharded("leo", "bf16", True, overlap_updates=True, bucket_mb=2), cost_leo_leo_bf16,
                leo_dist=True, probe=_probe_sharded("leo", "bf16", hook=True), twin="leo_leo_bf16", default=False))
# Time to target (issue 11): Leo at one bit on both sides, and the recommended bf16 + 1-bit, behind
# the DDP hook with overlap_updates (Leo's matrices take the deferred path, not the streamed one).
register(Config("leo_leo_1bit_1bit", "ShardedLeo, 1-bit grads, 1-bit matrix updates", "leo", "leo-1bit-1bit",
                _sharded("leo", "1bit", False, update_comm="1bit"),
                lambda s, w: _leo_phases(s, w, 1 / 8 + 4 / 1024, leo=True, update_bits=True), lossy=True,
                leo_dist=True, probe=_probe_sharded("leo", "1bit", update_comm="1bit"), default=False))
for _grad in ("bf16", "1bit"):
    register(Config(f"leo_leo_{_grad}_1bit_ddp_overlap_b2",
                    f"ShardedLeo, {_grad} grads, 1-bit matrix updates, DDP hook, overlap_updates, 2 MB buckets",
                    "leo", "leo-1bit" if _grad == "bf16" else "leo-1bit-1bit",
                    _sharded("leo", _grad, True, update_comm="1bit", overlap_updates=True,
                                                bucket_mb=2),
                    lambda s, w, g=_grad: _leo_phases(s, w, 2 if g == "bf16" else 1 / 8 + 4 / 1024, leo=True,
                                                      update_bits=True),
                    lossy=True, leo_dist=True, probe=_probe_sharded("leo", _grad, update_comm="1bit", hook=True),
                    twin="leo_leo_bf16_1bit" if _grad == "bf16" else "leo_leo_1bit_1bit", default=False))
# The 1-bit warm-up in bf16 (warmup_grad_comm="bf16"): the same candidates, their uncompressed
# first steps at half the bytes. Time to target on a slow link is mostly those steps.
_BF16_WARM = dict(warmup_grad_comm="bf16")
register(Config("leo_lion_1bit_bf16warm", "ShardedLion, 1-bit grads, bf16 warm-up", "lion", "lion-1bit-bf16warm",
                _sharded("lion", "1bit", False, **_BF16_WARM), cost_leo_1bit_grads, lossy=True, leo_dist=True,
                probe=_probe_sharded("lion", "1bit"), default=False))
register(Config("leo_lion_1bit_bf16warm_ddp_overlap_b2",
                "ShardedLion, 1-bit grads, bf16 warm-up, DDP hook, overlap_updates, 2 MB buckets", "lion",
                "lion-1bit-bf16warm", _sharded("lion", "1bit", True, overlap_updates=True, bucket_mb=2, **_BF16_WARM),
                cost_leo_1bit_grads, lossy=True, leo_dist=True, probe=_probe_sharded("lion", "1bit", hook=True),
                twin="leo_lion_1bit_bf16warm", default=False))
register(Config("leo_leo_1bit_1bit_bf16warm", "ShardedLeo, 1-bit grads, 1-bit matrix updates, bf16 warm-up", "leo",
                "leo-1bit-1bit-bf16warm", _sharded("leo", "1bit", False, update_comm="1bit", **_BF16_WARM),
                lambda s, w: _leo_phases(s, w, 1 / 8 + 4 / 1024, leo=True, update_bits=True), lossy=True,
                leo_dist=True, probe=_probe_sharded("leo", "1bit", update_comm="1bit"), default=False))
register(Config("leo_leo_1bit_1bit_bf16warm_ddp_overlap_b2",
                "ShardedLeo, 1-bit grads, 1-bit matrix updates, bf16 warm-up, DDP hook, overlap_updates, 2 MB buckets",
                "leo", "leo-1bit-1bit-bf16warm",
                _sharded("leo", "1bit", True, update_comm="1bit", overlap_updates=True, bucket_mb=2, **_BF16_WARM),
                lambda s, w: _leo_phases(s, w, 1 / 8 + 4 / 1024, leo=True, update_bits=True), lossy=True,
                leo_dist=True, probe=_probe_sharded("leo", "1bit", update_comm="1bit", hook=True),
                twin="leo_leo_1bit_1bit_bf16warm", default=False))
