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


# ------------------------------------------------------------------ topology-aware (issue 12)
def cost_hierarchical(grad_bytes: float, leo: bool = False, update_bits: bool = False):
    """Bytes per rank and level of the two-level exchange (leo_dist/topology.py) with G ranks per
    node (torchrun's LOCAL_WORLD_SIZE, 2 on the testbed): float32 all-to-all inside the node,
    the node's sums across nodes in the wire dtype, update bits across nodes once per node."""
    def cost(shapes, world):
        import math
        g = int(os.environ.get("LOCAL_WORLD_SIZE", "2"))
        g = g if world % g == 0 else 1
        m = world // g
        n = shapes.numel
        n_mat = sum(math.prod(s) for s, mat in zip(shapes.shapes, shapes.leo_matrix) if mat) if leo else 0
        # bits, plus Leo's matrix updates: exact (fp32) or, with update_comm="1bit", bits too
        upd = (n - n_mat) / 8 + (n_mat / 8 if update_bits else 4 * n_mat)
        calls = configs._buckets(4 * n, configs.LEO_BUCKET_BYTES)
        return [configs.Phase("all_to_all intra (fp32 grads)", (g - 1) / g * 4 * n, calls),
                configs.Phase("reduce_scatter inter (node sums)", (m - 1) / m * n / g * grad_bytes, calls),
                configs.Phase("all_gather inter (updates)", (m - 1) / world * upd, calls),
                configs.Phase("all_gather intra (updates)", (g - 1) / g * upd, calls)]
    return cost


for _grad, _gb in (("fp32", 4), ("bf16", 2), ("1bit", 1 / 8 + 4 / 1024)):
    _name = f"leo_lion_{_grad}_hier"
    if _name not in configs.REGISTRY:
        configs.register(configs.Config(
            _name, f"ShardedLion, {_grad} grads, topology-aware (ranks_per_node='auto'), DDP hook", "lion",
            "lion-1bit" if _grad == "1bit" else "lion",
            configs._sharded("lion", _grad, True, ranks_per_node="auto"), cost_hierarchical(_gb),
            lossy=_grad == "1bit", leo_dist=True, probe=configs._probe_sharded("lion", _grad, hook=True),
            default=False))
if "leo_leo_bf16_hier" not in configs.REGISTRY:
    configs.register(configs.Config(
        "leo_leo_bf16_hier", "ShardedLeo, bf16 grads, exact matrix updates, topology-aware", "leo", "leo",
        configs._sharded("leo", "bf16", False, ranks_per_node="auto"), cost_hierarchical(2, leo=True),
        leo_dist=True, probe=configs._probe_sharded("leo", "bf16"), default=False))

# ... with issue 16's overlap (background gradient exchange, update all-gathers behind the next
# forward, 2 MiB buckets as prepare() picks for this model); flat twin: leo_lion_<grad>_ddp_overlap_b2.
# bf16 also with larger buckets: on the testbed's 2 cores every bucket's collectives, hooks and
# messages cost CPU, which 4 ranks share (docs/topology.md, "Where the two-level step's time goes")
for _grad, _gb, _mb, _suffix in (("bf16", 2, 2, "_b2"), ("1bit", 1 / 8 + 4 / 1024, 2, "_b2"),
                                 ("bf16", 2, None, ""), ("bf16", 2, 8, "_b8")):
    _name = f"leo_lion_{_grad}_hier_overlap{_suffix}"
    if _name not in configs.REGISTRY:
        configs.register(configs.Config(
            _name, f"ShardedLion, {_grad} grads, topology-aware, DDP hook, overlap_updates, {_mb or 25} MB buckets",
            "lion", "lion-1bit" if _grad == "1bit" else "lion",
            configs._sharded("lion", _grad, True, ranks_per_node="auto", overlap_updates=True, bucket_mb=_mb),
            cost_hierarchical(_gb), lossy=_grad == "1bit", leo_dist=True,
            probe=configs._probe_sharded("lion", _grad, hook=True), default=False))
# the same without streamed steps (an A/B of docs/overlap.md, "Streamed steps")
if "leo_lion_bf16_hier_overlap_b2_nostream" not in configs.REGISTRY:
    configs.register(configs.Config(
        "leo_lion_bf16_hier_overlap_b2_nostream", "ShardedLion, bf16 grads, topology-aware, DDP hook, "
        "overlap_updates, 2 MB buckets, step not streamed", "lion", "lion",
        configs._sharded("lion", "bf16", True, ranks_per_node="auto", overlap_updates=True, bucket_mb=2,
                         stream=False),
        cost_hierarchical(2), leo_dist=True, probe=configs._probe_sharded("lion", "bf16", hook=True), default=False))

# ShardedLeo as recommended (bf16 gradients, 1-bit matrix updates) and at one bit on both sides,
# two-level, with the same overlap; flat twins: leo_leo_<grad>_1bit_ddp_overlap_b2
for _grad, _gb in (("bf16", 2), ("1bit", 1 / 8 + 4 / 1024)):
    _name = f"leo_leo_{_grad}_1bit_hier_overlap_b2"
    if _name not in configs.REGISTRY:
        configs.register(configs.Config(
            _name, f"ShardedLeo, {_grad} grads, 1-bit matrix updates, topology-aware, DDP hook, overlap_updates, "
            "2 MB buckets", "leo", "leo-1bit" if _grad == "bf16" else "leo-1bit-1bit",
            configs._sharded("leo", _grad, True, update_comm="1bit", ranks_per_node="auto", overlap_updates=True,
                             bucket_mb=2),
            cost_hierarchical(_gb, leo=True, update_bits=True), lossy=True, leo_dist=True,
            probe=configs._probe_sharded("leo", _grad, update_comm="1bit", hook=True), default=False))

HIERARCHICAL = ("leo_lion_fp32_hier", "leo_lion_bf16_hier", "leo_lion_1bit_hier", "leo_leo_bf16_hier")
DEFAULT = DEFAULT + HIERARCHICAL
