"""Plot a topology run: step time and bytes across nodes per configuration and rate.

    .venv/bin/python benchmarks/topology/plot.py docs/results/topology [more result dirs ...] --out FILE.png

Reads each directory's results.json (benchmarks/topology/run.py); one row of bars per rate, the
flat and topology-aware ("_hier") configurations side by side.
"""
from __future__ import annotations

import argparse
import json
import os


def load(dirs: list[str]) -> list[dict]:
    rows = []
    for d in dirs:
        with open(os.path.join(d, "results.json")) as f:
            rows.extend(json.load(f)["rows"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="result directories (each with results.json)")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(args.dirs)
    rates = sorted({r["rate"] for r in rows}, key=lambda s: next(x["rate_bps"] for x in rows if x["rate"] == s))
    fig, axes = plt.subplots(len(rates), 2, figsize=(13, 3.2 * len(rates) + 1.2), squeeze=False)
    for i, rate in enumerate(rates):
        sel = [r for r in rows if r["rate"] == rate]
        names = [r["config"] for r in sel]
        colors = ["tab:orange" if "_hier" in n else "tab:blue" if n.startswith("leo_") else "tab:gray" for n in names]
        for j, (key, scale, label) in enumerate((("step_s_median", 1.0, "step s (median)"),
                                                 ("cross_node_bytes_per_step", 1e-6, "MB per step across nodes"))):
            ax = axes[i][j]
            ax.barh(range(len(sel)), [r[key] * scale for r in sel], color=colors)
            ax.set_yticks(range(len(sel)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(f"{rate} between the nodes", fontsize=9)
            for k, r in enumerate(sel):
                ax.text(r[key] * scale, k, f" {r[key] * scale:.2f}", va="center", fontsize=6)
    fig.suptitle("2 nodes x 2 ranks (gloo), 10.8M-parameter GPT: gray DDP, blue flat leo_dist, "
                 "orange topology-aware", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
