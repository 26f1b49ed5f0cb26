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


def powersgd_reference_bytes(shapes, world: int, rank: int, min_compression_rate: float) -> float:
    """Bytes one rank sends per compressed step of torch's PowerSGD hook (ring cost model).

    As the hook decides: a tensor viewed as ``(shape[0], -1)`` travels as its rank-``rank`` factors
    P and Q (``(rows + cols)·rank`` fp32 elements, two all-reduces) when that is at least
    ``min_compression_rate`` times smaller, otherwise (and for 1-D tensors) uncompressed in fp32.
    """
    elems = 0
    for shape in shapes:
        numel = math.prod(shape)
        rows = shape[0] if len(shape) >= 2 else 0
        cols = numel // rows if rows else 0
        compress = rows and (rows + cols) * rank * min_compression_rate < numel
        elems += (rows + cols) * rank if compress else numel
    return ddp_reference_bytes(elems, world)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
