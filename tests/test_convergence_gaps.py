"""benchmarks/convergence.py's ``--gaps`` table: training loss against the same optimizer exact."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import convergence  # noqa: E402


def _run(config, seed, scale):
    losses = [[step, scale * (5.0 - step / 250)] for step in range(10, 1001, 10)]
    return {convergence._key(config, 2, seed, "tiny", 1000): dict(config=config, seed=seed, losses=losses)}


def test_gaps_compare_each_configuration_with_its_own_exact_run_on_shared_seeds():
    runs = {}
    for seed in (0, 1):
        runs.update(_run("leo exact", seed, 1.0))
        runs.update(_run("lion exact", seed, 2.0))
        runs.update(_run("lion grad_comm=1bit", seed, 2.0 * (1.01 if seed == 0 else 1.03)))
    runs.update(_run("leo grad_comm=1bit", 0, 1.05))  # one seed only
    table = convergence.gaps(runs, 2, "tiny", 1000, points=(100, 1000))
    rows = {line.split(" (vs")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"lion grad_comm=1bit", "leo grad_comm=1bit"}, table
    assert "(vs lion exact, 2 seeds) | +2.00% | +2.00% |" in rows["lion grad_comm=1bit"], table
    assert "(vs leo exact, 1 seeds) | +5.00% | +5.00% |" in rows["leo grad_comm=1bit"], table
