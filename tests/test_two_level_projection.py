"""benchmarks/slow_link/project.py's two-level (nodes × GPUs) model: cross-node vs intra-node bytes."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "slow_link"))

import configs  # noqa: E402
import project  # noqa: E402

ONE = configs.Shapes(((4096, 4096),), (True,))  # one matrix: per-element ratios stay clean
N = ONE.numel


def test_flat_ring_ddp_matches_the_ring_cost_model():
    topo = project.Topology(nodes=16, gpus_per_node=8)
    w = topo.world
    b = project.two_level("ddp_adamw", ONE, topo, "flat-ring")
    per_gpu_sent = 2 * (w - 1) / w * 4 * N     # the flat cost model of configs.py
    assert per_gpu_sent == pytest.approx(configs.REGISTRY["ddp_adamw"].model_bytes(ONE, w))
    assert b.cross_per_node == pytest.approx(per_gpu_sent)       # one ring hop leaves each node
    assert b.intra_per_gpu == pytest.approx(per_gpu_sent * 7 / 8)


def test_hierarchical_sends_each_node_partial_once_and_bits_once_per_node():
    m, g = 16, 8
    topo = project.Topology(nodes=m, gpus_per_node=g)
    hier = project.two_level("leo_lion_bf16", ONE, topo, "hierarchical")
    direct = project.two_level("leo_lion_bf16", ONE, topo, "flat-direct")
    # across nodes: the bf16 node partials once ((M-1)/M of 2N) and the packed bits once (N/8)
    assert hier.cross_per_node == pytest.approx((m - 1) / m * (2 * N + N / 8))
    # inside the node: the fp32 reduce-scatter and the all-gather of the bits
    assert hier.intra_per_gpu == pytest.approx((g - 1) / g * (4 * N + N / 8))
    # the direct exchange sends every GPU's pieces across on their own: G times the bytes
    assert direct.cross_per_node == pytest.approx(g * hier.cross_per_node)
    ring = project.two_level("leo_lion_bf16", ONE, topo, "flat-ring")
    assert hier.cross_per_node < ring.cross_per_node < direct.cross_per_node


def test_limits_one_node_and_one_gpu_per_node():
    for exchange in project.EXCHANGES:
        one_node = project.two_level("ddp_adamw", ONE, project.Topology(nodes=1, gpus_per_node=8), exchange)
        assert one_node.cross_per_node == 0
        assert one_node.intra_per_gpu > 0
    flat = project.Topology(nodes=8, gpus_per_node=1)
    for name in ("ddp_adamw", "leo_lion_bf16", "leo_leo_bf16"):
        h = project.two_level(name, ONE, flat, "hierarchical")
        r = project.two_level(name, ONE, flat, "flat-ring")
        assert h.intra_per_gpu == 0 and r.intra_per_gpu == 0
        assert h.cross_per_node == pytest.approx(r.cross_per_node)


def test_one_bit_gradients_and_leo_matrices():
    topo = project.Topology(nodes=4, gpus_per_node=8)
    with pytest.raises(ValueError, match="no ring"):
        project.two_level("leo_lion_1bit", ONE, topo, "flat-ring")
    hier = project.two_level("leo_lion_1bit", ONE, topo, "hierarchical")
    assert hier.cross_per_node == pytest.approx(3 / 4 * N * (1 / 8 + 4 / 1024 + 1 / 8))
    leo = project.two_level("leo_leo_bf16", ONE, topo, "hierarchical")      # exact fp32 matrix updates
    assert leo.cross_per_node == pytest.approx(3 / 4 * N * (2 + 4))
    assert project.two_level("leo_lion_bf16_ddp", ONE, topo, "flat-direct") == \
        project.two_level("leo_lion_bf16", ONE, topo, "flat-direct")
    with pytest.raises(ValueError):
        project.level_bytes("bcast", 1.0, topo, "flat-ring")
    with pytest.raises(ValueError):
        project.level_bytes("rs", 1.0, topo, "tree")
    with pytest.raises(ValueError):
        project.Topology(nodes=0)


def test_time_and_projection_rows():
    topo = project.Topology(nodes=2, gpus_per_node=8, inter_bps=100e9, intra_bytes_per_s=900e9)
    b = project.LevelBytes(cross_per_node=12.5e9, intra_per_gpu=9e9)
    assert b.time_s(topo) == pytest.approx(1.0 + 0.01)
    names = ["ddp_adamw", "leo_lion_bf16", "leo_lion_1bit"]
    rows = project.project_two_level(names)
    per = len(project.PROJECTION_MODELS) * len(project.TWO_LEVEL_LINKS) * len(project.TWO_LEVEL_NODES)
    assert len(rows) == per * (3 + 3 + 2)        # 1-bit has no flat-ring row
    for r in rows:
        if r["model"] == "7B" and r["exchange"] == "hierarchical" and r["config"] == "leo_lion_1bit":
            ddp = next(x for x in rows if (x["model"], x["link_gbit"], x["nodes"], x["config"], x["exchange"]) ==
                       ("7B", r["link_gbit"], r["nodes"], "ddp_adamw", "flat-ring"))
            assert r["cross_node_bytes_per_node"] < 0.05 * ddp["cross_node_bytes_per_node"]
            assert r["comm_s"] < ddp["comm_s"]
    assert "| leo_lion_1bit | hierarchical |" in project.two_level_table(rows)


def test_model_matches_the_testbed_layout():
    # Two nodes × two ranks (benchmarks/topology): DDP's gloo ring puts 2·(3/4)·4N on each node's
    # link, leo_dist's all-to-all reduce-scatter (bf16) G·(M-1)/M·2N plus the bits.
    tiny = configs.Shapes(((437760,),), (False,))
    topo = project.Topology(nodes=2, gpus_per_node=2)
    n = tiny.numel
    assert project.two_level("ddp_adamw", tiny, topo, "flat-ring").cross_per_node == pytest.approx(6 * n)
    assert project.two_level("leo_lion_bf16", tiny, topo, "flat-direct").cross_per_node == \
        pytest.approx(2 * n + n / 8)
