"""launch/run_multinode.sh across two "nodes" on one machine: the topology testbed's two network
namespaces joined by a shaped veth pair (benchmarks/topology/testbed.py), one torchrun per node,
2 ranks each, gloo, c10d rendezvous on node 0 by host name, with the topology-aware exchange
(``--ranks-per-node auto``: LOCAL_WORLD_SIZE) so that its node levels meet a real two-node launch.

Needs root, iproute2 and a kernel that allows `ip netns add`; skipped otherwise. Both torchruns
have one hard deadline; the namespaces are removed in every case (the testbed's context manager),
and their names carry this process's pid, so parallel workers (pytest -n 2) never collide.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "topology"))

import testbed  # noqa: E402

STEPS = 24
TIMEOUT_S = 150
N_PARAMS_TINY = 437_760  # launch/gpt.py preset "tiny"


@pytest.fixture(scope="module")
def why_not():
    return testbed.can_create()


def test_run_multinode_gloo_two_namespaces(tmp_path, why_not):
    if why_not:
        pytest.skip(f"cannot build the two-namespace testbed here: {why_not}")
    delay = 1.0 if testbed.netem_available() else 0.0  # some kernels have no sch_netem
    p = testbed.plan(tag=f"{os.getpid()}t", rate_bps="1gbit", delay_ms=delay)
    metrics = [str(tmp_path / f"metrics{i}.jsonl") for i in range(2)]
    logs = [str(tmp_path / f"node{i}.log") for i in range(2)]
    with testbed.Testbed(p) as tb:
        env = [dict(NNODES="2", NPROC_PER_NODE="2", BACKEND="gloo", RDZV_ENDPOINT=p.rdzv_endpoint(by_name=True),
                    RDZV_ID=f"test_{os.getpid()}", OMP_NUM_THREADS="1",
                    TORCHRUN=os.path.join(os.path.dirname(sys.executable), "torchrun")) for _ in range(2)]
        argv = [[os.path.join(ROOT, "launch", "run_multinode.sh"), "--preset", "tiny", "--steps", str(STEPS),
                 "--optimizer", "sharded_lion", "--grad-comm", "bf16", "--ranks-per-node", "auto",
                 "--batch-size", "8", "--log-interval", "4",
                 "--eval-interval", "0", "--eval-batches", "2", "--dist-timeout", "60", "--no-progress",
                 "--metrics-file", m] for m in metrics]
        before = tb.counters()
        codes = testbed.run_on_nodes(tb, argv, env, logs, TIMEOUT_S)
        traffic = tb.counters() - before
    tails = "\n".join(f"--- node {i} (exit {c}):\n" + open(log).read()[-3000:] for i, (c, log) in
                      enumerate(zip(codes, logs)))
    assert codes == [0, 0], f"both torchruns must finish within {TIMEOUT_S}s and exit 0\n{tails}"
    written = [m for m in metrics if os.path.exists(m)]
    assert len(written) == 1, f"exactly one node hosts rank 0: {written}\n{tails}"
    with open(written[0]) as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if r.get("kind") == "train"]
    summary = [r for r in recs if r.get("kind") == "summary"]
    assert summary and summary[-1]["world_size"] == 4 and summary[-1]["steps"] == STEPS
    assert train[-1]["step"] == STEPS and train[-1]["loss"] < train[0]["loss"] - 0.1, train
    # Two-level bf16 exchange: each rank sends its peer on the other node half of its node-sum
    # slice (N/4 elements at 2 bytes), so 2 bytes per parameter per step cross in all, plus N/8 of
    # update bits; the flat exchange sends about 4.4 (docs/topology.md), so < 3 tells them apart
    # (start-up broadcast and checks included).
    assert STEPS * 2 * N_PARAMS_TINY < traffic.cross_node_bytes < STEPS * 3 * N_PARAMS_TINY, traffic
    assert min(traffic.veth_tx) > 0, "traffic must cross the veth in both directions"
    assert min(traffic.intra_node_bytes) > 0, "each node's two ranks talk over its own loopback"
