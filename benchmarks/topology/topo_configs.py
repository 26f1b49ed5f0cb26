"""Configurations of the topology benchmark: the slow-link registry (benchmarks/slow_link/configs.py)
plus the ones that only make sense on a multi-node testbed.

Both the driver (run.py) and every rank (worker.py) import this module, so a configuration
registered here is known by name on both sides, with the same ``Config`` fields as the slow-link
ones (``build(model, world, hyper) -> (forward module, optimizer)``, a cost model, a ``probe``
that says why it cannot run yet). A topology-aware leo_dist configuration (say a hierarchical
exchange: reduce-scatter inside the node, then across nodes on the node's partial sums) is added
the same way; its ``build`` can read the node layout from torchrun's environment
(``LOCAL_WORLD_SIZE``, ``GROUP_RANK``) and make the intra- and inter-node process groups:

    configs.register(configs.Config(
        "leo_lion_bf16_hier", "ShardedLion, bf16 grads, hierarchical", "lion", "lion",
        build=_build_hierarchical, cost=cost_hierarchical, leo_dist=True, probe=_probe_hierarchical))

then `run.py --configs leo_lion_bf16_hier,...` runs it beside the others, and adding its name to
``DEFAULT`` puts it in the default set. benchmarks/slow_link/project.py's two-level model
(``project.two_level``) already predicts its cross-node and intra-node bytes.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW_LINK = os.path.join(os.path.dirname(HERE), "slow_link")
if SLOW_LINK not in sys.path:
    sys.path.insert(0, SLOW_LINK)

import configs  # noqa: E402  (benchmarks/slow_link/configs.py)

__all__ = ["configs", "DEFAULT", "get"]

# ShardedLion with 1-bit gradients through the DDP hook: the hook variant of the slow-link
# registry's standalone leo_lion_1bit (same arithmetic, so it is that run's twin).
if "leo_lion_1bit_ddp" not in configs.REGISTRY:
    configs.register(configs.Config(
        "leo_lion_1bit_ddp", "ShardedLion, 1-bit grads (error feedback), DDP hook", "lion", "lion-1bit",
        configs._sharded("lion", "1bit", True), configs.cost_leo_1bit_grads, lossy=True, leo_dist=True,
        probe=configs._probe_sharded("lion", "1bit", hook=True), default=False, twin="leo_lion_1bit"))

# The default set of a topology run (issue 12): the baselines, then flat leo_dist with the hook.
DEFAULT = ("ddp_adamw", "ddp_lion_fp16", "ddp_powersgd_lion", "leo_lion_fp32_ddp", "leo_lion_bf16_ddp",
           "leo_lion_1bit_ddp", "leo_leo_bf16")


def get(names: str | None) -> list[configs.Config]:
    """Configurations by comma-separated name; None or 'all': ``DEFAULT``."""
    return configs.get(list(DEFAULT) if names in (None, "all") else names)
