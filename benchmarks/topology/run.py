#!/usr/bin/env python
"""Topology benchmark: the slow-link configurations on two "nodes" joined by a shaped link.

    sudo .venv/bin/python benchmarks/topology/run.py                        # full matrix (long)
    sudo .venv/bin/python benchmarks/topology/run.py --configs ddp_adamw,leo_lion_bf16_ddp \\
        --rates 100mbit --delay-ms 0 --preset tiny --steps 16 --window-at 10 --timed-steps 5   # short check

What happens: the driver builds the testbed (testbed.py: two namespaces ``leo_topo_<pid>_n0/1``
with their own loopback, joined by a veth pair with 10.213.0.1/30 and .2/30 on its ends) and, for
each configuration, starts one torchrun per node (``--nnodes 2 --nproc-per-node P``, c10d
rendezvous on node 0's veth address, gloo on the veth). Every rank runs worker.py, which is
benchmarks/slow_link/worker.py with the testbed as its link: the run trains ``--steps`` steps on
the unshaped veth and at ``--window-at`` times ``--timed-steps`` steps at each ``--rates`` entry,
both veth ends shaped with tc (tbf at the rate behind netem for ``--delay-ms``), counting the
bytes that crossed the veth (both directions) and those that stayed on each node's loopback.

Outputs (``--out``, default docs/results/topology): ``raw/<config>.json`` and ``.log`` per run,
``results.json`` (every row, the machine, the command), ``table.md``; the table is printed last.
The namespaces are deleted on exit, also on error, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import testbed  # noqa: E402  (puts benchmarks/slow_link on sys.path)
import topo_configs  # noqa: E402
import netns  # noqa: E402
from report import steps_to_target  # noqa: E402  (benchmarks/slow_link/report.py)

BASELINE = "ddp_adamw"


# (flag, type, default, help): the options of the runs themselves, handed to every worker.
OPTIONS = (
    ("--configs", str, "all", f"comma-separated names or 'all' (default set: {','.join(topo_configs.DEFAULT)}); "
                              f"known: {','.join(topo_configs.configs.REGISTRY)}"),
    ("--rates", str, "100mbit,1gbit", "veth rates, comma-separated"),
    ("--delay-ms", float, 1.0, "one-way delay per packet on the veth (netem; 0 on kernels without sch_netem)"),
    ("--nproc-per-node", int, 2, "ranks per node"),
    ("--steps", int, 40, "training steps per run"),
    ("--timed-steps", int, 5, "steps timed at each rate"),
    ("--window-at", int, 12, "first timed step (after DDP's bucket rebuild and PowerSGD's warm-up)"),
    ("--eval-every", int, 10, "validation loss every N steps"),
    ("--target-loss", float, topo_configs.configs.TARGET_LOSS,
     "validation loss of the time-to-target column (the slow-link suite's)"),
    ("--preset", str, "10m", "launch/gpt.py model preset"),
    ("--batch-size", int, 4, "sequences per rank per step"),
    ("--seed", int, 0, "model init and data order"),
    ("--subnet", str, testbed.DEFAULT_SUBNET, "private subnet of the veth"),
    ("--out", str, os.path.join(ROOT, "docs", "results", "topology"), "output directory"),
    ("--label", str, "", "free text stored with the results (e.g. 'short validation run')"),
    ("--run-timeout", int, 1800, "seconds before one configuration's torchruns are killed"),
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, typ, default, text in OPTIONS:
        ap.add_argument(flag, type=typ, default=default, help=f"{text} (default: %(default)s)")
    args = ap.parse_args(argv)
    args.rates = [netns.parse_rate(r) for r in args.rates.split(",") if r]
    if not args.rates:
        ap.error("--rates: give at least one rate")
    if args.nproc_per_node < 1:
        ap.error("--nproc-per-node must be >= 1")
    if args.window_at + args.timed_steps * len(args.rates) - 1 > args.steps:
        ap.error(f"--steps {args.steps} is too short for the timed windows starting at step {args.window_at}")
    args.chosen = topo_configs.get(None if args.configs == "all" else args.configs)
    return args


def worker_args(cfg_name: str, args, out: str) -> list[str]:
    windows = ",".join(f"{netns.format_rate(r)}:{args.timed_steps}" for r in args.rates)
    return [os.path.join(HERE, "worker.py"), "--config", cfg_name, "--preset", args.preset,
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
            "--seed", str(args.seed), "--window-at", str(args.window_at), "--windows", windows,
            "--delay-ms", str(args.delay_ms), "--out", out]


def torchrun_argv(tb: testbed.Testbed, node: int, nproc: int, rdzv_id: str, port: int, script: list[str]) -> list[str]:
    """torchrun for one node of the testbed: c10d rendezvous on node 0, hosted there."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(tb.nodes)),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint",
            tb.plan.rdzv_endpoint(port), "--rdzv-id", rdzv_id, "--rdzv-conf", f"is_host={int(node == 0)}",
            "--local-addr", tb.nodes[node].addr] + script


def run_one(tb: testbed.Testbed, cfg, index: int, args, raw_dir: str) -> dict | None:
    out = os.path.join(raw_dir, f"{cfg.name}.json")
    script = worker_args(cfg.name, args, out + ".tmp")
    env = [dict(tb.node_env(i), LEO_TOPO_NODES=testbed.nodes_to_env(tb.nodes)) for i in range(len(tb.nodes))]
    argv = [torchrun_argv(tb, i, args.nproc_per_node, f"{cfg.name}_{args.run_id}", testbed.RDZV_PORT + index, script)
            for i in range(len(tb.nodes))]
    logs = [os.path.join(raw_dir, f"{cfg.name}.node{i}.log") for i in range(len(tb.nodes))]
    tb.unshape()  # a run killed mid-window must not leave its successor shaped
    t0 = time.time()
    codes = testbed.run_on_nodes(tb, argv, env, logs, args.run_timeout)
    try:
        with open(out + ".tmp") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        print(f"    FAILED (exit codes {codes}); logs: {', '.join(logs)}", flush=True)
        for log in logs:
            with open(log) as f:
                for ln in [ln.strip() for ln in f if "Error" in ln][-2:]:
                    print("     ", ln[:300])
        return None
    rec.update(exit_codes=codes, wall_s=time.time() - t0, run_id=args.run_id, label=args.label,
               link_delay_ms=args.delay_ms)
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)
    os.remove(out + ".tmp")
    return rec


def rows_from(recs: list[dict], target: float = topo_configs.configs.TARGET_LOSS) -> list[dict]:
    """One row per (configuration, rate). Time to target = steps to ``target`` (validation loss,
    interpolated between evaluations; the training runs unshaped outside the timed windows, as in
    the slow-link suite) × the median step time at that rate."""
    rows = []
    for r in recs:
        reached = steps_to_target(r["evals"], target)
        for w in r["windows"]:
            topo = w["topology"]
            rows.append(dict(config=r["config"], label=topo_configs.configs.REGISTRY[r["config"]].label,
                             world=r["world"], nproc_per_node=r.get("nproc_per_node"),
                             rate=netns.format_rate(w["rate_bps"]), rate_bps=w["rate_bps"],
                             delay_ms=r.get("link_delay_ms"), timed_steps=w["steps"],
                             step_s_median=statistics.median(w["step_s"]), step_s=w["step_s"],
                             cross_node_bytes_per_step=topo["cross_node_bytes"],
                             intra_node_bytes_per_step=topo["intra_node_bytes"],
                             intra_node_bytes_per_step_total=topo["intra_node_bytes_total"],
                             flat_model_bytes_per_rank=r["model_bytes_per_rank"],
                             library_sent_per_rank=w.get("library_sent_per_rank"),
                             tcp_retrans=topo["tcp_retrans"], qdisc_drops=topo["qdisc_drops"],
                             final_val_loss=r["evals"][-1][1], final_step=r["evals"][-1][0],
                             replicas_identical=r.get("replicas_identical"), n_params=r["n_params"],
                             target_loss=target, steps_to_target=reached,
                             time_to_target_s=None if reached is None else reached * statistics.median(w["step_s"])))
    base = {x["rate"]: x for x in rows if x["config"] == BASELINE}
    for x in rows:
        b = base.get(x["rate"])
        x["cross_vs_ddp"] = x["cross_node_bytes_per_step"] / b["cross_node_bytes_per_step"] if b else None
        x["speedup_vs_ddp"] = b["step_s_median"] / x["step_s_median"] if b else None
    return rows


def table(rows: list[dict]) -> str:
    def f(v, spec):
        return "–" if v is None else format(v, spec)
    head = ["config", "rate", "step s (median)", "cross-node MB/step (veth)", "intra-node MB/step (lo, n0+n1)",
            "× DDP cross bytes", "× DDP speed", "steps to target", "time to target s", "final val loss", "retx"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        lines.append("| " + " | ".join([
            x["config"], x["rate"], f(x["step_s_median"], ".3f"), f(x["cross_node_bytes_per_step"] / 1e6, ".3f"),
            f"{x['intra_node_bytes_per_step_total'] / 1e6:.3f} (" +
            " + ".join(f"{b / 1e6:.3f}" for b in x["intra_node_bytes_per_step"]) + ")",
            f(x["cross_vs_ddp"], ".3f"), f(x["speedup_vs_ddp"], ".2f"), f(x.get("steps_to_target"), ".1f"),
            f(x.get("time_to_target_s"), ".1f"), f(x["final_val_loss"], ".3f"),
            str(x["tcp_retrans"])]) + " |")
    return "\n".join(lines)


def slow_run():
    """benchmarks/slow_link/run.py as a module (its name clashes with this file's)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("slow_link_run", os.path.join(testbed.SLOW_LINK, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> None:
    args = parse_args(argv)
    netns.require_root()
    raw_dir = os.path.join(args.out, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    runnable = []
    for cfg in args.chosen:
        why = cfg.unavailable()
        print(f"skipping {cfg.name}: {why}") if why else runnable.append(cfg)
    args.run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    command = " ".join(sys.argv)
    # SIGTERM (e.g. from timeout) must unwind through the testbed's cleanup like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    t_start = time.time()
    recs = []
    p = testbed.plan(subnet=args.subnet, delay_ms=args.delay_ms)
    with testbed.Testbed(p) as tb:
        if args.delay_ms > 0:  # fail now, not inside the first timed window, where netem is missing
            tb.shape(args.rates[0], args.delay_ms)
            tb.unshape()
        print(f"testbed {[n.netns for n in tb.nodes]}, veth {tb.nodes[0].cidr} <-> {tb.nodes[1].cidr}; "
              f"{args.nproc_per_node} ranks/node; rates {[netns.format_rate(r) for r in args.rates]}, delay "
              f"{args.delay_ms} ms; preset {args.preset}, {args.steps} steps", flush=True)
        for index, cfg in enumerate(runnable):
            print(f"== {cfg.name} ({time.time() - t_start:.0f}s elapsed)", flush=True)
            rec = run_one(tb, cfg, index, args, raw_dir)
            if rec is not None:
                recs.append(rec)
    print(f"finished in {time.time() - t_start:.0f}s; testbed removed", flush=True)
    rows = rows_from(recs, args.target_loss)
    result = dict(run_id=args.run_id, label=args.label, command=command, machine=slow_run().machine(),
                  settings=dict(rates=args.rates, delay_ms=args.delay_ms, nproc_per_node=args.nproc_per_node,
                                nnodes=2, preset=args.preset, steps=args.steps, timed_steps=args.timed_steps,
                                window_at=args.window_at, batch_size=args.batch_size, seed=args.seed,
                                target_loss=args.target_loss),
                  skipped=[c.name for c in args.chosen if c not in runnable],
                  failed=[c.name for c in runnable if c.name not in {r["config"] for r in recs}], rows=rows)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"{args.label or 'Topology run'} {args.run_id}: `{command}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
