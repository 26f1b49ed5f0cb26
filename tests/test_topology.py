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


def test_retrans_and_drops_travel_with_the_snapshots():
    snmp = "Tcp: RtoAlgorithm RtoMin RetransSegs InErrs\nTcp: 1 200 17 0\nUdp: InDatagrams\nUdp: 3\n"
    assert testbed.parse_tcp_retrans(snmp) == 17
    assert testbed.parse_tcp_retrans("Ip: 1\n") == 0
    a = testbed.Snapshot((1, 2), (3, 4), (10, 20), (0, 1))
    b = testbed.Snapshot((5, 7), (3, 9), (12, 25), (0, 4))
    t = b - a
    assert (t.tcp_retrans, t.qdisc_drops) == (7, 3)
    assert t.per_step(1)["tcp_retrans"] == 7
    assert testbed.Snapshot.from_json(b.to_json()) == b


def _driver():
    import importlib.util
    path = os.path.join(os.path.dirname(testbed.__file__), "run.py")
    spec = importlib.util.spec_from_file_location("topology_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_driver_arguments_and_configuration_names():
    run = _driver()
    args = run.parse_args([])
    assert [c.name for c in args.chosen] == list(run.topo_configs.DEFAULT)
    assert args.rates == [100e6, 1e9] and args.delay_ms == 1.0 and args.nproc_per_node == 2
    for name in ("ddp_adamw", "ddp_lion_fp16", "ddp_powersgd_lion", "leo_lion_fp32_ddp", "leo_lion_bf16_ddp",
                 "leo_lion_1bit_ddp", "leo_leo_bf16"):
        assert name in run.topo_configs.DEFAULT
    with pytest.raises(SystemExit):
        run.parse_args(["--steps", "5"])  # too short for the windows
    with pytest.raises(KeyError, match="unknown configuration"):
        run.parse_args(["--configs", "nope"])
    # A later (topology-aware) configuration joins by name once registered.
    cfgs = run.topo_configs.configs
    if "test_topo_hier" not in cfgs.REGISTRY:
        cfgs.register(cfgs.Config("test_topo_hier", "test", "lion", "lion", build=None,
                                  cost=cfgs.cost_leo_lion_bf16, default=False))
    assert [c.name for c in run.parse_args(["--configs", "ddp_adamw,test_topo_hier"]).chosen] == \
        ["ddp_adamw", "test_topo_hier"]


def test_driver_commands_rows_and_table():
    run = _driver()
    tb = testbed.Testbed(testbed.plan(tag=3))  # not entered: only its plan is used
    args = run.parse_args(["--rates", "100mbit", "--steps", "20"])
    script = run.worker_args("ddp_adamw", args, "/tmp/x.json")
    argv = run.torchrun_argv(tb, 1, 2, "rid", 29411, script)
    assert argv[argv.index("--rdzv-endpoint") + 1] == "10.213.0.1:29411"
    assert "is_host=0" in argv and argv[argv.index("--local-addr") + 1] == "10.213.0.2"
    assert "is_host=1" in run.torchrun_argv(tb, 0, 2, "rid", 29411, script)
    assert script[script.index("--windows") + 1] == "100mbit:5"
    topo = testbed.Traffic((3000, 1000), (500, 700), 2, 0).per_step(2)

    def rec(name, step_s):
        return dict(config=name, world=4, nproc_per_node=2, link_delay_ms=0.0, model_bytes_per_rank=1.0,
                    evals=[(0, 4.0), (20, 3.0)], n_params=10,
                    windows=[dict(rate_bps=100e6, steps=2, step_s=[step_s, step_s * 3, step_s], topology=topo)])
    rows = run.rows_from([rec("ddp_adamw", 1.0), rec("leo_lion_bf16_ddp", 0.5)], target=3.5)
    assert rows[0]["cross_node_bytes_per_step"] == 2000 and rows[0]["intra_node_bytes_per_step"] == [250, 350]
    assert rows[1]["speedup_vs_ddp"] == 2.0 and rows[1]["cross_vs_ddp"] == 1.0
    # 3.5 is half-way from 4.0 (step 0) to 3.0 (step 20): 10 steps, times the median step time
    assert rows[1]["steps_to_target"] == 10.0 and rows[1]["time_to_target_s"] == 5.0
    text = run.table(rows)
    assert ("| leo_lion_bf16_ddp | 100mbit | 0.500 | 0.002 | 0.001 (0.000 + 0.000) | 1.000 | 2.00 | 10.0 | 5.0 "
            "| 3.000 | 2 |") in text
    assert run.rows_from([rec("ddp_adamw", 1.0)], target=2.0)[0]["time_to_target_s"] is None  # never reached
