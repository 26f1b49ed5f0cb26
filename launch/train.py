#!/usr/bin/env python
"""Train a small GPT-style character LM data-parallel with leo_dist, and show what it saves.

Runs under torchrun (one process per rank; RANK/WORLD_SIZE/LOCAL_RANK come from the
environment) or as plain ``python launch/train.py`` (a world of one). See launch/README.md.

    torchrun --standalone --nproc-per-node 2 launch/train.py --preset tiny --steps 200

This file is the entry point; the demo lives in launch/, one concern a module:

* ``cli.py``: the command-line flags and their checks;
* ``ranks.py``: rank, world and device (``Dist``), and the demo's own collectives;
* ``gpt.py``: the model and the corpus; ``data.py``: batches as functions of (seed, rank, step);
* ``optimizers.py``: the optimizers offered, their defaults, and the lr schedule;
* ``loop.py``: building the run, and the training loop;
* ``traffic.py``: bytes per step (the optimizer's counters, DDP's cost model);
* ``report.py``: console lines, the metrics file, the header and the summary;
* ``ckpt.py``: checkpoints and resume.

Determinism and resume: the batch of step ``s`` on rank ``r`` is drawn from a generator seeded by
``(seed, r, s)``, and the global torch RNG is reseeded from the same triple before every step, so
no RNG state needs to be checkpointed: a run resumed at step ``s`` sees exactly the data and
randomness an uninterrupted run sees at ``s``. Checkpoints are ``torch.distributed.checkpoint``
directories that every rank writes its own shard into (see ``ckpt.py``); multi-node resume
therefore needs the checkpoint directory on a filesystem every node can read.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Running as a script puts launch/ on sys.path, not the repository root that holds both
    # `launch` and (for an uninstalled checkout) `leo_dist`. Replace it rather than add to it, so
    # that launch/'s modules are only importable as `launch.<name>` and never shadow another
    # top-level module (launch/data.py as `data`, for example).
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _here:
        sys.path.pop(0)
    sys.path.insert(0, os.path.dirname(_here))

from launch.cli import build_parser, parse_args  # noqa: E402
from launch.loop import train  # noqa: E402
from launch.optimizers import build_optimizer, lr_factor  # noqa: E402
from launch.ranks import Dist  # noqa: E402
from launch.traffic import ddp_reference_bytes  # noqa: E402

# The demo's pieces, importable from here as before the split into modules.
__all__ = ["main", "build_parser", "parse_args", "train", "build_optimizer", "lr_factor", "Dist",
           "ddp_reference_bytes"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = Dist(args)
    clean = False
    try:
        rc = train(args, d)
        clean = True
        return rc
    finally:
        d.close(clean)


if __name__ == "__main__":
    sys.exit(main())
