#!/usr/bin/env python
"""Latency–bandwidth model of each scheme: fitted to the slow-link measurements, checked against
them, then used to project step communication time to large jobs.

Model of one step's communication for scheme ``c`` with W ranks and N parameters::

    t_comm = κ_c · bytes_c(N, W) / B  +  calls_c(N) · ⌈log2 W⌉ · α

``bytes_c`` is the cost model of configs.py (bytes each rank sends per step under the ideal ring /
direct algorithms of docs/design.md), ``calls_c`` the number of collective calls (one per bucket and
collective kind), ``B`` the link rate, ``α`` the latency of one message hop, ``κ_c`` how much longer
than line rate the scheme's bytes actually take (1 = perfect; it absorbs headers, TCP dynamics,
gloo's algorithms and whatever does not overlap).

On the benchmark's link every rank shares one shaped loopback, so there ``B`` is the aggregate and
``bytes`` is the total over ranks (W · bytes_c); the measured step time is modelled as the
unshaped step time of the same run plus ``t_comm``. ``κ_c`` is the least-squares fit over the
scheme's measured points; the check reports every point's error, with κ fitted on all points and
with κ fitted on the lowest rate only (the other rates then being a prediction).

Projection assumptions (stated in docs/benchmarks.md too): every rank has its own full-duplex link
of rate B into a non-blocking network (so per-rank bytes set the time), fp32 parameters, 25 MB
buckets, tree-depth latency ⌈log2 W⌉·α per collective call with α = 10 µs, no overlap with
compute (the numbers are the communication a step must hide or wait for), κ_c = 1 (the ideal
algorithm; the measured κ are printed beside it), GPT-style models (12·d² per layer, untied
32k-token embeddings and head, 2048 positions).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import configs

__all__ = ["fit", "project", "synthetic_shapes", "PROJECTION_MODELS", "PROJECTION_WORLDS", "PROJECTION_LINKS",
           "ALPHA_S", "Topology", "LevelBytes", "level_bytes", "two_level", "project_two_level", "EXCHANGES",
           "TWO_LEVEL_SCHEMES"]

ALPHA_S = 10e-6
PROJECTION_WORLDS = (8, 32, 128, 512, 1024)
PROJECTION_LINKS = (100e9, 400e9)
# (label, n_layer, d_model): GPT-style shapes that land near the named sizes.
PROJECTION_MODELS = (("1B", 18, 2048), ("7B", 32, 4096), ("13B", 40, 5120), ("70B", 86, 8192))


def synthetic_shapes(n_layer: int, d: int, vocab: int = 32000, positions: int = 2048) -> configs.Shapes:
    shapes, matrix = [(vocab, d), (positions, d)], [False, False]
    for _ in range(n_layer):
        for s, m in (((d,), False), ((d,), False), ((3 * d, d), True), ((3 * d,), False), ((d, d), True),
                     ((d,), False), ((d,), False), ((d,), False), ((4 * d, d), True), ((4 * d,), False),
                     ((d, 4 * d), True), ((d,), False)):
            shapes.append(s)
            matrix.append(m)
    shapes += [(d,), (d,), (vocab, d)]
    matrix += [False, False, True]
    return configs.Shapes(tuple(shapes), tuple(matrix))


@dataclass
class Point:
    config: str
    world: int
    rate_bps: float
    step_s: float          # median step time on the shaped link
    free_step_s: float     # median step time of the same run on the unshaped loopback
    model_bytes_per_rank: float

    @property
    def x(self) -> float:
        """Seconds the cost model's bytes take at line rate on the shared link."""
        return self.world * self.model_bytes_per_rank * 8 / self.rate_bps

    @property
    def y(self) -> float:
        return self.step_s - self.free_step_s


def _kappa(points: list[Point]) -> float:
    sxx = sum(p.x * p.x for p in points)
    return sum(p.x * p.y for p in points) / sxx if sxx > 0 else float("nan")


def fit(points: list[Point]) -> tuple[dict[str, float], list[dict]]:
    """κ per scheme, and one row per measured point with the model's predictions and errors."""
    by_cfg: dict[str, list[Point]] = {}
    for p in points:
        by_cfg.setdefault(p.config, []).append(p)
    kappas, rows = {}, []
    for name, pts in by_cfg.items():
        k_all = _kappa(pts)
        low = min(p.rate_bps for p in pts)
        k_low = _kappa([p for p in pts if p.rate_bps == low])
        kappas[name] = k_all
        for p in pts:
            pred = {tag: p.free_step_s + k * p.x for tag, k in (("ideal", 1.0), ("fit", k_all), ("holdout", k_low))}
            rows.append(dict(config=name, world=p.world, rate_bps=p.rate_bps, measured_s=p.step_s,
                             free_step_s=p.free_step_s, line_rate_comm_s=p.x, kappa=k_all, kappa_low_rate=k_low,
                             holdout=p.rate_bps != low,
                             **{f"pred_{t}_s": v for t, v in pred.items()},
                             **{f"err_{t}": v / p.step_s - 1 for t, v in pred.items()}))
    return kappas, rows


def comm_time(cfg: configs.Config, shapes: configs.Shapes, world: int, link_bps: float, kappa: float = 1.0,
              alpha: float = ALPHA_S) -> float:
    phases = cfg.cost(shapes, world)
    bw = sum(p.bytes_per_rank for p in phases) * 8 / link_bps
    lat = sum(p.calls for p in phases) * math.ceil(math.log2(world)) * alpha
    return kappa * bw + lat


def project(names: list[str], kappas: dict[str, float] | None = None) -> list[dict]:
    """One row per (model, link, W): each scheme's step communication time in seconds (κ = 1)."""
    rows = []
    for label, n_layer, d in PROJECTION_MODELS:
        shapes = synthetic_shapes(n_layer, d)
        for link in PROJECTION_LINKS:
            for world in PROJECTION_WORLDS:
                row = dict(model=label, params=shapes.numel, link_gbit=link / 1e9, world=world)
                for name in names:
                    row[name] = comm_time(configs.REGISTRY[name], shapes, world, link)
                rows.append(row)
    return rows


def summarize_errors(rows: list[dict], key: str) -> float:
    errs = [abs(r[key]) for r in rows if key != "err_holdout" or r["holdout"]]
    return statistics.median(errs) if errs else float("nan")


# ------------------------------------------------------------------------------ two-level topology
# Jobs at scale run G GPUs per node on a fast intra-node fabric (NVLink-class, ~900 GB/s per GPU)
# and join the nodes with a far slower network (100-400 Gbit/s per node). What matters there is
# how many bytes cross between nodes, not only how many each rank sends. The model below splits
# every collective of a step into bytes each node sends to other nodes and bytes each GPU sends
# inside its node, for three ways of running the same collectives on W = G·M ranks (M nodes,
# ranks numbered node by node):
#
#   flat-ring    one ring over all W ranks, node-contiguous (what NCCL builds): of a node's G
#                outgoing ring hops one leaves the node, so a reduce-scatter or all-gather of an
#                S-byte payload sends (W-1)/W·S per GPU, of which (W-1)/W·S per *node* crosses.
#   flat-direct  every rank sends each other rank its piece directly (all_to_all_single: leo_dist's
#                reduce-scatter on gloo and its 1-bit gradient exchange): a GPU sends S/W to each of
#                the W-G ranks on other nodes, so G·(M-1)/M·S per node crosses: G times the ring's.
#   hierarchical reduce-scatter inside the node first, at full precision (fp32, on the fast fabric),
#                then across nodes on the node's partial sums, GPU i of every node exchanging slice
#                i ("rails"), in the scheme's gradient wire format; the update goes back the other
#                way: packed update bits cross once per node ((M-1)/M of them), then an all-gather
#                inside the node. Cross-node bytes per node: (M-1)/M·S per collective.
#
# Bytes are payload only (no headers, no small side information such as Leo's norm all-reduces),
# per step, fp32 parameters. Time: t = cross_per_node·8/B_inter + intra_per_gpu/B_intra, the two
# levels taken in sequence (no overlap between them or with compute), no latency term.

EXCHANGES = ("flat-ring", "flat-direct", "hierarchical")
INTRA_BYTES_PER_S = 900e9          # NVLink-class fabric, per GPU and direction
GPUS_PER_NODE = 8
TWO_LEVEL_NODES = (2, 4, 16, 64, 128)
TWO_LEVEL_LINKS = (100e9, 200e9, 400e9)   # bit/s per node


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int = GPUS_PER_NODE
    inter_bps: float = 400e9                # per node, bits/s
    intra_bytes_per_s: float = INTRA_BYTES_PER_S  # per GPU, bytes/s

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("nodes and gpus_per_node must be >= 1")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class LevelBytes:
    cross_per_node: float   # bytes one node sends to the other nodes
    intra_per_gpu: float    # bytes one GPU sends to the other GPUs of its node

    def __add__(self, other: "LevelBytes") -> "LevelBytes":
        return LevelBytes(self.cross_per_node + other.cross_per_node, self.intra_per_gpu + other.intra_per_gpu)

    def time_s(self, topo: Topology) -> float:
        return self.cross_per_node * 8 / topo.inter_bps + self.intra_per_gpu / topo.intra_bytes_per_s


def level_bytes(kind: str, payload: float, topo: Topology, exchange: str, intra_payload: float | None = None
                ) -> LevelBytes:
    """One reduce-scatter ('rs'), all-gather ('ag') or all-reduce ('ar') of ``payload`` bytes (the
    full tensor: the reduce-scatter's input, the all-gather's output). ``intra_payload``: the
    hierarchical exchange's intra-node payload (default ``payload``; e.g. fp32 gradients where
    ``payload`` is their bf16 or 1-bit wire form)."""
    if kind == "ar":
        return level_bytes("rs", payload, topo, exchange, intra_payload) + \
            level_bytes("ag", payload, topo, exchange)
    if kind not in ("rs", "ag"):
        raise ValueError(f"kind must be rs, ag or ar, got {kind!r}")
    g, m, w = topo.gpus_per_node, topo.nodes, topo.world
    if exchange == "flat-ring":
        sent = (w - 1) / w * payload
        cross = sent if m > 1 else 0.0
        return LevelBytes(cross, sent - cross / g)
    if exchange == "flat-direct":
        return LevelBytes(g * (w - g) / w * payload, (g - 1) / w * payload)
    if exchange == "hierarchical":
        intra = payload if intra_payload is None else intra_payload
        return LevelBytes((m - 1) / m * payload, (g - 1) / g * (intra if kind == "rs" else payload))
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


# Per configuration of configs.py: bytes per element of the gradients on the (cross-node) wire,
# and whether Leo's matrices send fp32 updates; the updates are otherwise packed bits (1/8 byte).
TWO_LEVEL_SCHEMES = {
    "ddp_adamw": dict(grad=4.0, all_reduce=True),
    "ddp_lion_fp16": dict(grad=2.0, all_reduce=True),
    "leo_lion_fp32": dict(grad=4.0),
    "leo_lion_bf16": dict(grad=2.0),
    # Compressed gradients cannot be summed hop by hop: the 1-bit exchange is an all-to-all (no ring).
    "leo_lion_1bit": dict(grad=1 / 8 + 4 / 1024, no_ring=True),
    "leo_leo_bf16": dict(grad=2.0, leo_exact=True),
}


def two_level(name: str, shapes: configs.Shapes, topo: Topology, exchange: str) -> LevelBytes:
    """Cross-node and intra-node bytes of one step of configuration ``name`` (a key of
    ``TWO_LEVEL_SCHEMES``; a ``_ddp`` hook variant counts as its standalone twin)."""
    scheme = TWO_LEVEL_SCHEMES[name.removesuffix("_ddp")]
    if exchange == "flat-ring" and scheme.get("no_ring"):
        raise ValueError(f"{name}: its gradient exchange has no ring form (use flat-direct or hierarchical)")
    n = shapes.numel
    if scheme.get("all_reduce"):
        # DDP: an all-reduce of the gradients (hierarchical: reduce-scatter in the node, all-reduce
        # across nodes on the partial sums, all-gather in the node), no update exchange.
        return level_bytes("ar", scheme["grad"] * n, topo, exchange, intra_payload=4.0 * n)
    n_mat = sum(math.prod(s) for s, mat in zip(shapes.shapes, shapes.leo_matrix) if mat) \
        if scheme.get("leo_exact") else 0
    update = (n - n_mat) / 8 + 4.0 * n_mat
    return level_bytes("rs", scheme["grad"] * n, topo, exchange, intra_payload=4.0 * n) + \
        level_bytes("ag", update, topo, exchange)


def project_two_level(names: list[str], models=PROJECTION_MODELS, nodes=TWO_LEVEL_NODES, links=TWO_LEVEL_LINKS,
                      gpus_per_node: int = GPUS_PER_NODE) -> list[dict]:
    """One row per (model, node link, nodes, scheme, exchange): bytes per level and the time."""
    rows = []
    for label, n_layer, d in models:
        shapes = synthetic_shapes(n_layer, d)
        for link in links:
            for m in nodes:
                topo = Topology(m, gpus_per_node, link)
                for name in names:
                    for exchange in EXCHANGES:
                        if exchange == "flat-ring" and TWO_LEVEL_SCHEMES[name.removesuffix("_ddp")].get("no_ring"):
                            continue
                        b = two_level(name, shapes, topo, exchange)
                        rows.append(dict(model=label, params=shapes.numel, link_gbit=link / 1e9, nodes=m,
                                         gpus_per_node=gpus_per_node, world=topo.world, config=name,
                                         exchange=exchange, cross_node_bytes_per_node=b.cross_per_node,
                                         intra_node_bytes_per_gpu=b.intra_per_gpu, comm_s=b.time_s(topo)))
    return rows


def two_level_table(rows: list[dict], model: str = "7B", link_gbit: float = 400.0) -> str:
    """Markdown: per scheme and exchange, cross-node GB per node and intra-node GB per GPU per step."""
    sel = [r for r in rows if r["model"] == model and r["link_gbit"] == link_gbit]
    nodes = sorted({r["nodes"] for r in sel})
    head = ["config", "exchange"] + [f"M={m}: cross GB/node · intra GB/GPU · ms" for m in nodes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in dict.fromkeys((r["config"], r["exchange"]) for r in sel):
        cells = [f"{r['cross_node_bytes_per_node'] / 1e9:.2f} · {r['intra_node_bytes_per_gpu'] / 1e9:.2f} · "
                 f"{1e3 * r['comm_s']:.0f}" for m in nodes for r in sel if (r["config"], r["exchange"]) == key
                 and r["nodes"] == m]
        lines.append("| " + " | ".join(list(key) + cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import csv
    ap = argparse.ArgumentParser(description="Two-level (nodes x GPUs) projection of cross-node and intra-node bytes")
    ap.add_argument("--configs", default=",".join(TWO_LEVEL_SCHEMES))
    ap.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    ap.add_argument("--model", default="7B", help="model of the printed table (all go to --csv)")
    ap.add_argument("--link-gbit", type=float, default=400.0, help="node link of the printed table")
    ap.add_argument("--csv", default=None, help="write every row here")
    a = ap.parse_args()
    out = project_two_level(a.configs.split(","), gpus_per_node=a.gpus_per_node)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(out[0]))
            wr.writeheader()
            wr.writerows(out)
    print(two_level_table(out, a.model, a.link_gbit))
