"""Bytes on the wire: a sharded optimizer's own counters per step, and DDP's ring all-reduce cost model."""
from __future__ import annotations

import math


def comm_totals(opt) -> dict[str, dict[str, int]]:
    """Running per-kind byte totals of a sharded optimizer: ``{kind: {"sent", "received", "calls"}}``.

    Steps are measured as differences of these totals taken around forward/backward/step, not
    from ``comm_stats()["last_step"]``: that one also books the construction-time parameter
    broadcast and a checkpoint's momentum all-gather onto the following step.
    """
    # Layout: {"last_step": {kind: {...}, "sum": {...}}, "total": {kind: {calls, bytes_in, bytes_out,
    # sent, received}, "sum": {...}}, "steps": n}
    total = opt.comm_stats().get("total", {})
    return {k: {f: int(v.get(f, 0)) for f in ("sent", "received", "calls")}
            for k, v in total.items() if k != "sum" and isinstance(v, dict)}


def comm_delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    zero = {"sent": 0, "received": 0, "calls": 0}
    return {k: {f: v[f] - before.get(k, zero)[f] for f in zero} for k, v in after.items()
            if v["calls"] != before.get(k, zero)["calls"]}


def ddp_reference_bytes(n_params: int, world: int, bytes_per_elem: int = 4) -> float:
    """Bytes one rank sends per step in a ring all-reduce of ``n_params`` elements (cost model)."""
    return 2.0 * (world - 1) / world * bytes_per_elem * n_params


# DDP's PowerSGD hook as the demo (launch/loop.py) and the slow-link suite
# (benchmarks/slow_link/configs.py) run it: rank-4 factors, plain all-reduce for the first 10
# steps (torch's advice: let the gradients settle before compressing), compression only where it
# is at least 2x.
POWERSGD_RANK = 4
POWERSGD_START_ITER = 10
POWERSGD_MIN_COMPRESSION_RATE = 2.0


def powersgd_split(shapes, rank: int = POWERSGD_RANK,
                   min_compression_rate: float = POWERSGD_MIN_COMPRESSION_RATE) -> tuple[int, int]:
    """(elements all-reduced uncompressed, elements of the P and Q factors) of one compressed step
    of torch's PowerSGD hook, as it decides: a tensor viewed as ``(shape[0], -1)`` travels as its
    rank-``rank`` factors (``(rows + cols)·rank`` fp32 elements) when that is at least
    ``min_compression_rate`` times smaller, otherwise (and for 1-D tensors) uncompressed."""
    plain = factors = 0
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) < 2:
            plain += numel
            continue
        rows, cols = shape[0], numel // shape[0]
        if (rows + cols) * rank * min_compression_rate < numel:
            factors += (rows + cols) * rank
        else:
            plain += numel
    return plain, factors


def powersgd_reference_bytes(shapes, world: int) -> float:
    """Bytes one rank sends per compressed step of the PowerSGD hook (ring cost model, fp32)."""
    return ddp_reference_bytes(sum(powersgd_split(shapes)), world)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
