#!/usr/bin/env python
"""One configuration's run on the topology testbed: the slow-link worker, with its link swapped.

benchmarks/slow_link/worker.py trains, and at ``--window-at`` times K steps per ``--windows``
rate, asking its ``netns`` module to shape the link and read its counters around each window.
Here every rank runs that very worker, with its ``netns`` replaced by a view of the testbed
(``LEO_TOPO_NODES``, set by run.py): shaping applies to both veth ends (from whichever node rank 0
is on: namespaces are reachable by name from any of them, as root), and the counters are the
veth's, so the worker's ``tx_bytes`` is the cross-node traffic (both directions). The per-node
loopback bytes are kept aside and added to the JSON rank 0 writes, window by window.
"""
from __future__ import annotations

import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import testbed  # noqa: E402  (puts benchmarks/slow_link on sys.path)
import topo_configs  # noqa: E402, F401  (registers the topology-only configurations)
import netns  # noqa: E402
import worker as slow_worker  # noqa: E402  (benchmarks/slow_link/worker.py)


def main() -> None:
    nodes = testbed.nodes_from_env(os.environ["LEO_TOPO_NODES"])
    snapshots: list[testbed.Snapshot] = []

    def shape(rate_bps: float, delay_ms: float = 0.0, *_, **__) -> None:
        for n in nodes:
            netns.shape(rate_bps, delay_ms, netns=n.netns, dev=n.veth)

    def unshape(*_, **__) -> None:
        for n in nodes:
            netns.unshape(n.netns, dev=n.veth)

    def read_counters(*_, **__) -> netns.LinkCounters:
        snap = testbed.snapshot(nodes)
        snapshots.append(snap)
        return netns.LinkCounters(sum(snap.veth_tx), 0, sum(snap.tcp_retrans), sum(snap.qdisc_drops))

    view = types.SimpleNamespace(**{k: getattr(netns, k) for k in netns.__all__})
    view.shape, view.unshape, view.read_counters = shape, unshape, read_counters
    slow_worker.netns = view
    if os.environ.get("LEO_TOPO_TRACE"):  # diagnosis only (link_trace.py)
        import link_trace
        config = sys.argv[sys.argv.index("--config") + 1]
        link_trace.install(config, nodes[int(os.environ.get("GROUP_RANK", "0"))].veth)
    slow_worker.main()

    out = sys.argv[sys.argv.index("--out") + 1]
    if os.environ.get("RANK") == "0" and os.path.exists(out):
        with open(out) as f:
            rec = json.load(f)
        for i, window in enumerate(rec["windows"]):
            window["topology"] = (snapshots[2 * i + 1] - snapshots[2 * i]).per_step(window["steps"])
        rec["topology_nodes"] = [vars(n) for n in nodes]
        rec["nproc_per_node"] = int(os.environ.get("LOCAL_WORLD_SIZE", 0))
        with open(out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
