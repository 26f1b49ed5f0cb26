"""The topology-aware exchange (``ranks_per_node``, leo_dist/topology.py) against the oracle, on gloo.

Layouts: 2 nodes × 2 ranks, 2 × 1, 3 × 1 and 1 node × 2; every test runs all its configurations
inside one spawn of the ranks (each builds its own optimizers)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import leo_dist
from conftest import run_ranks
from dist_util import SHAPES, bucket_grad, feed_grads, groups_for, local_grad, make_params, oracle_run, params_hash, rel_err
from leo_dist import onebit
from leo_dist.partition import Layout

STEPS = 6


def _run(rank, world, kind, g, grad_comm, hook, steps, overlap=None, warmup=0, update_comm=None):
    """Train the SHAPES model ``steps`` steps with ``ranks_per_node=g`` (None: flat); standalone
    (``.grad`` set) or through a DDP-like hook path (``opt._attach_hook`` + ``stage``)."""
    params = make_params()
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    extra = {} if update_comm is None else {"update_comm": update_comm}
    opt = cls(groups_for(params, kind), bucket_mb=1e-4, grad_comm=grad_comm, ranks_per_node=g,
              overlap_grads=overlap, grad_comm_warmup=warmup, **extra)
    exchange = opt._attach_hook(None) if hook else None
    hashes = []
    for step in range(steps):
        feed_grads(params, step, rank, True, exchange)
        opt.step()
        hashes.append(params_hash(params))
    return dict(params=[p.detach().clone() for p in params], hashes=hashes, stats=opt.comm_stats()["last_step"],
                replicas=opt.verify_replicas(), layout=[(b.padded, b.shard) for b in opt.layout.buckets])


def _exact_matrix(rank, world, g):
    """Every exact mode at ranks_per_node=g, both rules, standalone and hook, plus the flat run."""
    out = {}
    for kind in ("lion", "leo"):
        out[(kind, "flat")] = _run(rank, world, kind, None, "fp32", False, STEPS)
        for grad_comm in ("fp32", "bf16"):
            for hook in (False, True):
                out[(kind, grad_comm, hook)] = _run(rank, world, kind, g, grad_comm, hook, STEPS)
    out[("lion", "fp32", "inline")] = _run(rank, world, "lion", g, "fp32", True, STEPS, overlap=False)
    return out


@pytest.mark.parametrize("world,g", [(4, 2), (2, 1), (3, 1), (2, 2)])
def test_exact_modes_match_oracle_and_flat(world, g):
    # dyadic gradients: every partial sum is exact in float32 and in bfloat16 (|k|/64, |k| ≤ 128·W),
    # so all modes must give the oracle's bytes on the sign paths
    out = run_ranks(_exact_matrix, world, g)
    for kind in ("lion", "leo"):
        expected, _ = oracle_run(kind, world, STEPS, True)
        flat = out[0][(kind, "flat")]
        for key in [k for k in out[0] if k[0] == kind and k[1] != "flat"]:
            runs = [o[key] for o in out]
            for r in range(1, world):
                assert runs[r]["hashes"] == runs[0]["hashes"], (key, r)
            assert all(x["replicas"] for x in runs), key
            for i, (got, want, ref) in enumerate(zip(runs[0]["params"], expected, flat["params"])):
                if kind == "leo" and i < len(SHAPES) // 2 and got.ndim == 2:
                    assert rel_err(got, want) <= 2e-6, (key, i)  # the norms' sums run in another order
                else:
                    assert torch.equal(got, want), (key, i, rel_err(got, want))
                    assert torch.equal(got, ref), (key, i)


def _leo_update_modes(rank, world, g):
    out = {}
    for update_comm in ("bf16", "1bit"):
        out[(update_comm, "flat")] = _run(rank, world, "leo", None, "fp32", False, STEPS, update_comm=update_comm)
        for hook in (False, True):
            out[(update_comm, hook)] = _run(rank, world, "leo", g, "fp32", hook, STEPS, update_comm=update_comm)
    return out


@pytest.mark.parametrize("world,g", [(4, 2), (3, 1)])
def test_leo_matrix_update_modes_match_the_flat_exchange(world, g):
    # the recommended ShardedLeo (bf16 or 1-bit matrix updates) routed through the two-level exchange:
    # the update bytes (bf16 values, or bits plus one all-reduced scale per row) are those of the flat
    # exchange, the sign paths bitwise, the matrices up to the order of the norms' sums
    out = run_ranks(_leo_update_modes, world, g)
    for update_comm in ("bf16", "1bit"):
        flat = out[0][(update_comm, "flat")]
        for hook in (False, True):
            runs = [o[(update_comm, hook)] for o in out]
            assert all(r["hashes"] == runs[0]["hashes"] for r in runs), (update_comm, hook)
            assert all(r["replicas"] for r in runs), (update_comm, hook)
            assert any(k.endswith(":inter") for k in runs[0]["stats"]) == (world // g > 1), runs[0]["stats"]
            for i, (got, ref) in enumerate(zip(runs[0]["params"], flat["params"])):
                if i < len(SHAPES) // 2 and got.ndim == 2:
                    assert rel_err(got, ref) <= 2e-6, (update_comm, hook, i)
                else:
                    assert torch.equal(got, ref), (update_comm, hook, i)


def _bytes(rank, world, g):
    out = {mode: _run(rank, world, "lion", g, mode, False, 2) for mode in ("fp32", "bf16", "1bit")}
    # ranks_per_node="auto": torchrun's LOCAL_WORLD_SIZE, with the node numbering checked
    os.environ.update(LOCAL_WORLD_SIZE=str(g), GROUP_RANK=str(rank // g))
    out["auto"] = leo_dist.ShardedLion(make_params(), ranks_per_node="auto")._comm.local
    os.environ["GROUP_RANK"] = str(rank % g)  # ranks not numbered node by node
    try:
        leo_dist.ShardedLion(make_params(), ranks_per_node="auto")
        out["misnumbered"] = None
    except ValueError as e:
        out["misnumbered"] = str(e)
    return out


def test_bytes_cross_nodes_once():
    """2 nodes × 2 ranks: what each rank puts on the slow link per step, booked by level."""
    out = run_ranks(_bytes, 4, 2)
    m, g = 2, 2
    for mode, esize in (("fp32", 4), ("bf16", 2)):
        st, layout = out[0][mode]["stats"], out[0][mode]["layout"]
        # node stage: float32 all-to-all of the (W, S) blocks, (G−1)/G of them leave the rank
        assert st["all_to_all:intra"]["sent"] == sum((g - 1) * p // g * 4 for p, _ in layout)
        # across nodes: (M−1) shards of S elements, in the wire dtype: (M−1)/M · N/G per rank
        assert st["reduce_scatter:inter"]["sent"] == sum((m - 1) * s * esize for _, s in layout)
        # update bits: my S/8 bytes to my peer on the other node, then M·S/8 inside the node
        assert st["all_gather:inter"]["sent"] == sum((m - 1) * s // 8 for _, s in layout)
        assert st["all_gather:intra"]["sent"] == sum((g - 1) * m * s // 8 for _, s in layout)
        assert not any(k in st for k in ("reduce_scatter", "all_gather", "all_to_all")), sorted(st)
    assert all(o["auto"] == g for o in out)
    assert all("numbered node by node" in o["misnumbered"] for o in out), out[0]["misnumbered"]
    st, layout = out[0]["1bit"]["stats"], out[0]["1bit"]["layout"]
    # 1-bit across nodes: one message of S/8 + 4 per 1024 elements per other node
    assert st["all_to_all:inter"]["sent"] == sum((m - 1) * onebit.grad_payload_bytes(s) for _, s in layout)


def _emulated_1bit(world, g, steps):
    """The two-level 1-bit exchange computed in one process from the codec's own functions: per
    node, the float32 sum of its ranks' gradients in local-rank order; per local rank l, the M
    owners n·G + l compressed with that (node, l)'s error buffer; the owner averages."""
    m = world // g
    params = make_params()
    groups = [[(p, "sign") for p in grp["params"]] for grp in groups_for(params, "lion")]
    layout = Layout(groups, world, 0, int(1e-4 * 2**20)).buckets  # the optimizer's buckets at W ranks
    errors = {(n, l, bi): torch.zeros(m * b.shard) for n in range(m) for l in range(g) for bi, b in enumerate(layout)}
    oracle_params = make_params()
    oracle = leo_dist.Lion(groups_for(oracle_params, "lion"))
    where = {id(p): i for i, p in enumerate(params)}
    for step in range(steps):
        avg = [torch.zeros(p.numel()) for p in params]
        for bi, b in enumerate(layout):
            locals_ = [bucket_grad(b, step, r, True).view(world, b.shard) for r in range(world)]
            shard_avg = torch.zeros(world, b.shard)
            for l in range(g):
                owners = [n * g + l for n in range(m)]
                msgs = []
                for n in range(m):
                    node_sum = locals_[n * g][owners].clone()
                    for k in range(1, g):
                        node_sum += locals_[n * g + k][owners]
                    valid = [max(0, min(b.shard, b.numel - o * b.shard)) for o in owners]
                    msgs.append(onebit.compress_grad_(node_sum.reshape(-1), errors[(n, l, bi)], m, b.shard, valid))
                for j, o in enumerate(owners):
                    recv = torch.stack([msgs[n][j] for n in range(m)])
                    shard_avg[o] = onebit.decode_grad(recv, m, b.shard) / g if g > 1 else onebit.decode_grad(
                        recv, m, b.shard)
            flat_avg = shard_avg.reshape(-1)
            for s in b.slots:
                avg[where[id(s.param)]] = flat_avg[s.offset : s.offset + s.numel]
        for p, a in zip(oracle_params, avg):
            p.grad = a.view_as(p).clone()
        oracle.step()
    return [p.detach().clone() for p in oracle_params]


def _onebit(rank, world, g):
    hier = _run(rank, world, "lion", g, "1bit", True, STEPS)
    flat = _run(rank, world, "lion", None, "1bit", True, STEPS)
    return hier, flat


@pytest.mark.parametrize("world,g", [(4, 2), (3, 1)])
def test_onebit_matches_the_emulated_two_level_codec(world, g):
    out = run_ranks(_onebit, world, g)
    expected = _emulated_1bit(world, g, STEPS)
    for r in range(1, world):
        assert out[r][0]["hashes"] == out[0][0]["hashes"]
    assert all(o[0]["replicas"] for o in out)
    for got, want in zip(out[0][0]["params"], expected):
        assert torch.equal(got, want), rel_err(got, want)
    if g == 1:  # one rank per node: the flat 1-bit exchange, bit for bit
        for got, ref in zip(out[0][0]["params"], out[0][1]["params"]):
            assert torch.equal(got, ref)


def _error_reshards(rank, world):
    """1-bit error feedback saved from one topology and loaded into another keeps its mean."""
    from leo_dist import checkpoint

    def build(g):
        params = make_params()
        return params, leo_dist.ShardedLion(groups_for(params, "lion"), bucket_mb=1e-4, grad_comm="1bit",
                                            grad_comm_warmup=0, ranks_per_node=g)

    def train(params, opt, steps, start=0):
        for step in range(start, start + steps):
            for p in params:
                p.grad = local_grad(step, rank, p.shape, True)
            opt.step()

    def means(opt):
        """What the senders owe the average, per bucket: the mean over ranks of the error rows each
        rank actually compresses for (all rows flat; the owners n·G + l at local rank l)."""
        h, out = opt._exchange.hier, []
        for bi, b in enumerate(opt.layout.buckets):
            err = opt._exchange.grad_error[bi].clone()
            if h is not None:
                used = torch.zeros(world, dtype=torch.bool)
                used.view(h.nodes, h.local)[:, h.local_rank] = True
                err.view(world, b.shard)[~used] = 0
            dist.all_reduce(err)
            out.append(err / world)
            assert torch.equal(out[-1], checkpoint._mean_grad_error(opt, bi))  # what a checkpoint keeps
        return out
    out = {}
    for src, dst in ((2, None), (None, 2), (2, 2)):
        params, opt = build(src)
        train(params, opt, 3)
        saved = means(opt)
        opt.consolidate_state_dict(to=0)
        box = [opt.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        params2, opt2 = build(dst)
        with torch.no_grad():
            for p, q in zip(params2, params):
                p.copy_(q)
        opt2.load_state_dict(box[0])
        # checkpoints keep the mean over ranks (what the senders still owe the average), not
        # each rank's own buffer; that mean must survive the change of topology exactly
        out[(src, dst)] = dict(same=all(torch.equal(a, b) for a, b in zip(saved, means(opt2))))
        train(params2, opt2, 2, 3)
        out[(src, dst)]["replicas"] = opt2.verify_replicas()
    return out


def test_onebit_error_feedback_reshards_across_topologies():
    out = run_ranks(_error_reshards, 4)
    for key, rec in out[0].items():
        assert rec["same"] and rec["replicas"], key


def _bad(rank, world):
    params = make_params()
    errors = []
    for value in (3, 0, "nodes", True, 2.0):
        try:
            leo_dist.ShardedLion(params, ranks_per_node=value)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    return errors


def test_bad_ranks_per_node_raise():
    errors = run_ranks(_bad, 2)[0]
    assert len(errors) == 5 and all("ranks_per_node" in e for e in errors), errors


def _one_node_bf16(rank, world):
    params = make_params()
    opt = leo_dist.ShardedLion(groups_for(params, "lion"), bucket_mb=1e-4, grad_comm="bf16", ranks_per_node=world)
    for step in range(STEPS):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, False)  # random: bf16 rounding would show
        opt.step()
    opt.consolidate_state_dict(to=0)
    sd = opt.state_dict() if rank == 0 else None
    return [p.detach().clone() for p in params], sd and [sd["state"][i]["exp_avg"] for i in range(len(params))]


def test_one_node_rounds_nothing():
    """ranks_per_node = W (one node): nothing crosses nodes, so grad_comm="bf16" rounds nothing:
    parameters and momentum are the fp32 oracle's, bitwise (a bf16 rounding shows in the momentum)."""
    got, momentum = run_ranks(_one_node_bf16, 2)[0]
    expected, oracle = oracle_run("lion", 2, STEPS, False)
    for a, b in zip(got, expected):
        assert torch.equal(a, b), rel_err(a, b)
    held = [p for g in oracle.param_groups for p in g["params"]]  # state_dict's numbering
    for m, p in zip(momentum, held):
        assert torch.equal(m, oracle.state[p]["exp_avg"]), rel_err(m, oracle.state[p]["exp_avg"])


def _mesh(rank, world, g):
    """A 2-D (node, local rank) DeviceMesh as process_group against ranks_per_node=g, and the
    meshes that must be refused."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    def train(opt_kw, kind="lion"):
        params = make_params()
        cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
        opt = cls(groups_for(params, kind), bucket_mb=1e-4, grad_comm="bf16", **opt_kw)
        exchange = opt._attach_hook(None)
        for step in range(3):
            for p in params:
                exchange.stage(p, local_grad(step, rank, p.shape, True))
            opt.step()
        return dict(hash=params_hash(params), local=opt._comm.local, levels=sorted(opt.comm_stats()["last_step"]))

    def refused(**opt_kw):
        try:
            leo_dist.ShardedLion(make_params(), **opt_kw)
        except ValueError as e:
            return str(e)
        return None

    m = world // g
    out = {}
    mesh = init_device_mesh("cpu", (m, g), mesh_dim_names=("node", "local"))
    for kind in ("lion", "leo"):
        out[kind] = (train(dict(process_group=mesh), kind), train(dict(ranks_per_node=g), kind))
    out["hsdp"] = train(dict(process_group=init_device_mesh("cpu", (m, g), mesh_dim_names=("replicate", "shard"))))
    os.environ.update(LOCAL_WORLD_SIZE=str(g), GROUP_RANK=str(rank // g))
    auto = leo_dist.node_mesh("cpu")
    out["node_mesh"] = (tuple(auto.shape), auto.mesh_dim_names, train(dict(process_group=auto)))
    out["dp_tp"] = refused(process_group=init_device_mesh("cpu", (m, g), mesh_dim_names=("dp", "tp")))
    out["unnamed"] = refused(process_group=init_device_mesh("cpu", (m, g)))
    out["both"] = refused(process_group=mesh, ranks_per_node=g)
    if world == 4:  # ranks not numbered node by node
        out["misnumbered"] = refused(process_group=DeviceMesh("cpu", [[0, 2], [1, 3]],
                                                              mesh_dim_names=("node", "local")))
    return out


@pytest.mark.parametrize("world,g", [(4, 2), (3, 1)])
def test_two_dim_device_mesh_is_the_two_level_exchange(world, g):
    out = run_ranks(_mesh, world, g)
    for o in out:
        for kind in ("lion", "leo"):
            via_mesh, via_int = o[kind]
            assert via_mesh == via_int, kind  # same params bitwise, same levels booked
            assert via_mesh["hash"] == out[0][kind][0]["hash"]
            assert via_mesh["local"] == g and "reduce_scatter:inter" in via_mesh["levels"], via_mesh
        assert o["hsdp"] == o["lion"][0]
        assert o["node_mesh"] == ((world // g, g), ("node", "local"), o["lion"][0])
        assert "must be 1-D" in o["dp_tp"] and "('dp', 'tp')" in o["dp_tp"], o["dp_tp"]
        assert "must be 1-D" in o["unnamed"], o["unnamed"]
        assert o["both"].startswith("ranks_per_node:"), o["both"]
    if world == 4:
        assert all("numbered node by node" in o["misnumbered"] for o in out), out[0]["misnumbered"]
