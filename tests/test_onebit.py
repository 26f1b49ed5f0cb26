"""The lossy 1-bit modes: compression maths, error feedback, and the distributed plumbing."""
from __future__ import annotations

import pytest
import torch

import leo_dist
from conftest import run_ranks
from dist_util import SHAPES, bucket_grad, feed_grads, groups_for, local_grad, make_params, params_hash, rel_err
from leo_dist import onebit
from leo_dist.partition import build_buckets

STEPS = 12
WARMUP = 3


def test_compress_decode_match_the_definition():
    world, shard, valid = 3, 1032, 3 * 1032 - 20
    g = torch.Generator().manual_seed(0)
    x = torch.randn(world * shard, generator=g)
    x[valid:] = 0
    err = torch.randn(world * shard, generator=g) * 0.1
    err[valid:] = 0
    xe = x + err
    payload = onebit.compress_grad_(x.clone(), err_new := err.clone(), world, shard, valid)
    assert payload.shape == (world, onebit.grad_payload_bytes(shard))
    # reference: per owner, chunks of GRAD_CHUNK, scale = mean |x+e| over the valid elements
    decoded = torch.empty_like(xe)
    for r in range(world):
        for c0 in range(0, shard, onebit.GRAD_CHUNK):
            lo, hi = r * shard + c0, r * shard + min(c0 + onebit.GRAD_CHUNK, shard)
            v = xe[lo:min(hi, valid)]
            scale = v.double().abs().mean().float() if v.numel() else torch.tensor(0.0)
            decoded[lo:hi] = torch.where(xe[lo:hi] > 0, scale, -scale)
    decoded[valid:] = 0
    for r in range(world):
        got = onebit.decode_grad(payload[r : r + 1], 1, shard)
        n = min(shard, valid - r * shard)  # the end padding decodes to something never applied
        assert rel_err(got[:n], decoded[r * shard : r * shard + n]) <= 1e-6
    # error feedback: what was not sent stays behind, exactly
    assert rel_err(err_new[:valid], (xe - decoded)[:valid]) <= 1e-6
    assert torch.equal(err_new[valid:], torch.zeros(world * shard - valid))


def test_error_feedback_telescopes():
    # Σ_t decoded_t + e_T = Σ_t g_t: nothing is lost, only delayed
    shard = 2048
    err = torch.zeros(shard)
    sent, total = torch.zeros(shard, dtype=torch.float64), torch.zeros(shard, dtype=torch.float64)
    for t in range(30):
        g = torch.randn(shard, generator=torch.Generator().manual_seed(t))
        total += g.double()
        payload = onebit.compress_grad_(g.clone(), err, 1, shard, shard)
        sent += onebit.decode_grad(payload, 1, shard).double()
    assert float((sent + err.double() - total).abs().max()) <= 1e-4


def _train(rank, world, grad_comm, update_comm, weight_decay=0.01):
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), grad_comm=grad_comm, update_comm=update_comm,
                              grad_comm_warmup=WARMUP, weight_decay=weight_decay)
    hashes = []
    for step in range(STEPS):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, False)
        opt.step()
        hashes.append(params_hash(params))
    stats = opt.comm_stats()["last_step"]
    for to in range(world):  # every rank gets the full state, one after the other
        opt.consolidate_state_dict(to)
        if to == rank:
            sd = opt.state_dict()
    return [p.detach().clone() for p in params], hashes, sd, stats


def _simulated_1bit_grads(world):
    """Per step, the averaged gradients that the 1-bit exchange delivers, simulated in one process
    with the same bucket layout: every rank compresses its bucket, each owner decodes its W pieces."""
    params = make_params()
    groups = groups_for(params, "leo")
    entries, i = [], 0
    for g in groups:
        rows = []
        for p in g["params"]:
            matrix = g.get("orthogonalize", True) and p.ndim == 2
            rows.append((i, p, "matrix" if matrix else "sign"))
            i += 1
        entries.append(rows)
    buckets = build_buckets(entries, world, 25 * 2**20)
    errors = [[torch.zeros(b.padded) for b in buckets] for _ in range(world)]
    out = []
    for step in range(STEPS):
        grads = {}
        for bi, b in enumerate(buckets):
            flats = [bucket_grad(b, step, r, False) for r in range(world)]
            if step < WARMUP:
                avg = sum(flats[1:], flats[0].clone()) / world if world > 1 else flats[0]
            else:
                payloads = [onebit.compress_grad_(flats[r], errors[r][bi], world, b.shard, b.numel)
                            for r in range(world)]
                avg = torch.cat([onebit.decode_grad(torch.stack([payloads[r][o] for r in range(world)]), world,
                                                    b.shard) for o in range(world)])
            for s in b.slots:
                grads[s.index] = avg[s.offset : s.offset + s.numel].view(s.param.shape).clone()
        out.append([grads[k] for k in range(len(params))])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_1bit_gradients_match_simulated_exchange(world):
    out = run_ranks(_train, world, "1bit", "exact")
    for r in range(1, world):
        assert out[r][1] == out[0][1], "replicas diverged"
    params = make_params()
    opt = leo_dist.Leo(groups_for(params, "leo"))
    for grads in _simulated_1bit_grads(world):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for got, want in zip(out[0][0], params):
        assert rel_err(got, want.detach()) <= 2e-6
    # after warm-up, the gradient exchange is one all-to-all of bits + scales, no reduce-scatter
    stats = out[0][3]
    assert "reduce_scatter" not in stats and stats["all_to_all"]["calls"] >= 1
    # the saved mean error is the same on every rank
    for k, entry in out[0][2]["state"].items():
        assert torch.equal(entry["grad_error"], out[1][2]["state"][k]["grad_error"])


@pytest.mark.parametrize("world", [1, 3])
def test_1bit_updates_keep_replicas_identical_and_lose_nothing(world):
    # Without weight decay, p_1bit − p_exact = lr · e_T exactly: the momentum (hence every exact
    # update U_t) does not depend on how updates travel, and Σ applied = Σ U_t − e_T.
    onebit_run = run_ranks(_train, world, "fp32", "1bit", 0.0)
    for r in range(1, world):
        assert onebit_run[r][1] == onebit_run[0][1], "replicas diverged"
    exact = run_ranks(_train, world, "fp32", "exact", 0.0)[0][0]
    state = onebit_run[0][2]["state"]
    lr = 1e-3  # group 0 (the matrices) runs at the default lr
    matrices = 0
    for i, (got, want) in enumerate(zip(onebit_run[0][0], exact)):
        if "update_error" in state[i]:
            matrices += 1
            e = state[i]["update_error"]
            assert float((got - want - lr * e).abs().max()) <= 1e-5, i
            if got.shape[1] > 1:
                # the modes really differ (an (R, 1) matrix is sent exactly: α_i·sign(e_i) = e_i)
                assert float(e.abs().max()) > 0 and float((got - want).abs().max()) > 1e-5, i
        else:
            assert torch.equal(got, want), i  # sign parameters travel as bits in both modes
    assert matrices == sum(1 for s in SHAPES[: len(SHAPES) // 2] if len(s) == 2)


def test_1bit_arguments():
    p = [torch.zeros(3, 3, requires_grad=True)]
    with pytest.raises(ValueError, match="grad_comm_warmup"):
        leo_dist.ShardedLeo(p, grad_comm="1bit", grad_comm_warmup=-1)
    with pytest.raises(ValueError, match="update_comm"):
        leo_dist.ShardedLeo(p, update_comm="2bit")


def _codec(world, shard, valid, cols, use_c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * shard, generator=g)
    err = torch.randn(world * shard, generator=g) * 0.1
    err[valid:] = 0
    x[3], x[min(valid, world * shard) // 2] = float("inf"), float("nan")
    out = torch.empty(world, onebit.grad_payload_bytes(shard), dtype=torch.uint8)
    xv = x.view(world, shard)
    old = onebit.USE_C
    onebit.USE_C = use_c
    try:
        onebit.compress_grad_stream_(lambda j0, j1, xc: xc.copy_(xv[:, j0:j1]), err, out, world, shard, valid, cols)
        decoded = onebit.decode_grad(out, world, shard, cols=cols)
    finally:
        onebit.USE_C = old
    return out, err, decoded


@pytest.mark.parametrize("world,shard,valid,cols", [(1, 2048, 2000, 1024), (2, 4104, 8000, 2048),
                                                    (3, 1032, 3 * 1032 - 20, 1024), (4, 520, 1111, 1024)])
def test_c_codec_agrees_with_the_torch_codec(world, shard, valid, cols):
    # the one-pass C codec (leo_dist.cpu_step) against the torch ops it replaces: the same bits,
    # scales and error feedback to float32 rounding (it sums |x+e| in float64), the same
    # non-finite scales; decoding the same messages is bitwise equal
    from leo_dist import cpu_step
    if not cpu_step.available():
        pytest.skip(f"the C library is not built here: {cpu_step.build_info()}")
    (out_c, err_c, _), (out_t, err_t, _) = (_codec(world, shard, valid, cols, use, 7) for use in (True, False))
    nb = shard // 8
    assert torch.equal(out_c[:, :nb], out_t[:, :nb])
    sc, st = (o[:, nb:].contiguous().view(torch.float32) for o in (out_c, out_t))
    assert torch.equal(torch.isfinite(sc), torch.isfinite(st)) and not torch.isfinite(st).all()
    fin = torch.isfinite(st)
    assert ((sc - st).abs() <= 1e-6 * st.abs())[fin].all()
    assert torch.allclose(err_c, err_t, rtol=0, atol=1e-6) and torch.equal(err_c[valid:], err_t[valid:])
    old = onebit.USE_C
    try:
        onebit.USE_C = True
        dec_c = onebit.decode_grad(out_t, world, shard, cols=cols)
        onebit.USE_C = False
        dec_t = onebit.decode_grad(out_t, world, shard, cols=cols)
    finally:
        onebit.USE_C = old
    assert torch.equal(dec_c.nan_to_num(), dec_t.nan_to_num())


def _warmup_wire(rank, world, g, hook):
    """Per step, the parameter hashes and the gradient exchange's bytes of three optimizers on the
    same gradients: 1-bit with a bf16 warm-up, bf16 throughout, 1-bit with the fp32 warm-up."""
    out = {}
    for name, kw in [("1bit_bf16", dict(grad_comm="1bit", warmup_grad_comm="bf16")), ("bf16", dict(grad_comm="bf16")),
                     ("1bit_fp32", dict(grad_comm="1bit"))]:
        params = make_params()
        opt = leo_dist.ShardedLeo(groups_for(params, "leo"), bucket_mb=1e-4, grad_comm_warmup=WARMUP,
                                  ranks_per_node=g, **kw)
        exchange = opt._attach_hook(None) if hook else None
        hashes, grad_bytes = [], []
        for step in range(WARMUP + 2):
            feed_grads(params, step, rank, False, exchange)
            opt.step()
            hashes.append(params_hash(params))
            last = opt.comm_stats()["last_step"]
            grad_bytes.append({k: v["sent"] for k, v in last.items() if k != "sum"})
        out[name] = dict(hashes=hashes, grad_bytes=grad_bytes, replicas=opt.verify_replicas())
    return out


@pytest.mark.parametrize("world,g,hook", [(1, None, False), (3, None, True), (4, 2, True),
                                          (3, 1, False)])
def test_bf16_warmup_runs_the_bf16_exchange(world, g, hook):
    # warmup_grad_comm="bf16": the warm-up steps are grad_comm="bf16" bitwise (same bytes, same
    # parameters), then compression starts on schedule, from the same (zero) error feedback
    out = run_ranks(_warmup_wire, world, g, hook)
    for r in range(world):
        assert out[r]["1bit_bf16"]["hashes"] == out[0]["1bit_bf16"]["hashes"], "replicas diverged"
        assert out[r]["1bit_bf16"]["replicas"]
    mine, bf16, fp32 = (out[0][k] for k in ("1bit_bf16", "bf16", "1bit_fp32"))
    assert mine["hashes"][:WARMUP] == bf16["hashes"][:WARMUP]
    assert mine["hashes"][:WARMUP] != fp32["hashes"][:WARMUP]  # fp32 rounds nothing
    assert mine["hashes"][WARMUP] != bf16["hashes"][WARMUP]
    if world == 1:
        return  # nothing on the wire
    grads = "reduce_scatter" if g is None else "reduce_scatter:inter"  # the (cross-node) gradient stage
    for step in range(WARMUP + 2):
        if step < WARMUP:
            assert mine["grad_bytes"][step] == bf16["grad_bytes"][step]
            assert 2 * mine["grad_bytes"][step][grads] == fp32["grad_bytes"][step][grads]
        else:
            assert not any(k.startswith("reduce_scatter") for k in mine["grad_bytes"][step])
            assert mine["grad_bytes"][step] == fp32["grad_bytes"][step]


def test_warmup_grad_comm_arguments():
    p = [torch.zeros(3, 3, requires_grad=True)]
    with pytest.raises(ValueError, match="warmup_grad_comm"):
        leo_dist.ShardedLeo(p, grad_comm="1bit", warmup_grad_comm="fp16")
    for grad_comm in ("fp32", "bf16"):  # no warm-up to apply it to: refused, not ignored
        with pytest.raises(ValueError, match="warmup_grad_comm"):
            leo_dist.ShardedLion(p, grad_comm=grad_comm, warmup_grad_comm="bf16")
    assert leo_dist.ShardedLion(p, grad_comm="1bit", warmup_grad_comm="bf16").warmup_grad_comm == "bf16"
