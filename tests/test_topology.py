"""The two-node topology testbed's pure-Python parts (no root needed): planning, parsing, counters."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "topology"))

import testbed  # noqa: E402

PROC_NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: {lo} 10 0 0 0 0 0 0 {lo} 10 0 0 0 0 0 0
  ltb{i}: 999 5 0 0 0 0 0 0 {veth} 7 0 0 0 0 0 0
"""


def test_plan_names_addresses_and_rate():
    p = testbed.plan(tag=1234, rate_bps="100mbit", delay_ms=1)
    a, b = p.nodes
    assert (a.netns, b.netns) == ("leo_topo_1234_n0", "leo_topo_1234_n1")
    assert (a.cidr, b.cidr) == ("10.213.0.1/30", "10.213.0.2/30")
    assert a.veth != b.veth and all(len(n.veth) <= 15 for n in p.nodes)
    assert a.hostname == "leo-topo-1234-n0"
    assert p.rate_bps == 100e6 and p.delay_ms == 1.0
    assert p.rdzv_endpoint() == "10.213.0.1:29400"
    assert p.rdzv_endpoint(29500, by_name=True) == "leo-topo-1234-n0:29500"
    assert testbed.plan().nodes[0].netns == f"leo_topo_{os.getpid()}_n0"
    assert testbed.plan(tag=1, subnet="192.168.77.0/24").nodes[1].cidr == "192.168.77.2/24"


@pytest.mark.parametrize("subnet", ["8.8.8.0/30", "127.0.0.0/30", "10.0.0.0/31x", "10.0.0.1/32", "169.254.0.0/30",
                                    "fd00::/126"])
def test_plan_refuses_public_loopback_and_tiny_subnets(subnet):
    with pytest.raises(ValueError):
        testbed.plan(tag=1, subnet=subnet)


def test_plan_refuses_bad_tags_and_delays():
    for bad in ("a;b", "x y", "../n"):
        with pytest.raises(ValueError):
            testbed.plan(tag=bad)
    with pytest.raises(ValueError):
        testbed.plan(tag=1, delay_ms=-1)
    with pytest.raises(ValueError):
        testbed.plan(tag=1, n_nodes=3)


def test_parse_proc_net_dev():
    parsed = testbed.parse_proc_net_dev(PROC_NET_DEV.format(lo=100, i=0, veth=5000))
    assert parsed["lo"] == dict(rx_bytes=100, rx_packets=10, tx_bytes=100, tx_packets=10)
    assert parsed["ltb0"]["tx_bytes"] == 5000 and parsed["ltb0"]["rx_bytes"] == 999
    assert set(parsed) == {"lo", "ltb0"}


def test_counter_arithmetic_sums_both_directions_and_keeps_nodes_apart():
    nodes = testbed.plan(tag=7).nodes
    snap = lambda lo0, v0, lo1, v1: testbed.Snapshot.from_proc(  # noqa: E731
        [PROC_NET_DEV.format(lo=lo0, i=0, veth=v0), PROC_NET_DEV.format(lo=lo1, i=1, veth=v1)], nodes)
    before, after = snap(100, 1000, 200, 2000), snap(1100, 5000, 3200, 8000)
    traffic = after - before
    assert traffic.veth_tx == (4000, 6000)
    assert traffic.cross_node_bytes == 10000
    assert traffic.intra_node_bytes == (1000, 3000)
    per = traffic.per_step(4)
    assert per["cross_node_bytes"] == 2500 and per["intra_node_bytes"] == [250, 750]
    assert per["intra_node_bytes_total"] == 1000
    with pytest.raises(ValueError):
        traffic.per_step(0)
    assert testbed.Snapshot.from_json(after.to_json()) == after
    with pytest.raises(RuntimeError, match="missing"):
        testbed.Snapshot.from_proc([PROC_NET_DEV.format(lo=1, i=5, veth=1)] * 2, nodes)


def test_nodes_round_trip_through_env_and_hosts_file():
    nodes = testbed.plan(tag=42, subnet="10.9.8.0/29").nodes
    assert testbed.nodes_from_env(testbed.nodes_to_env(nodes)) == nodes
    hosts = testbed.hosts_file("127.0.0.1 localhost\n", nodes)
    assert hosts.startswith("127.0.0.1 localhost\n")
    assert "10.9.8.1 leo-topo-42-n0\n" in hosts and "10.9.8.2 leo-topo-42-n1\n" in hosts
