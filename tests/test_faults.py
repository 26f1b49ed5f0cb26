"""A peer that dies or stalls mid-step: the surviving ranks raise within the process-group timeout.

Rank ``victim`` either exits (``os._exit``, as a killed process does: no clean-up, no goodbye) or
blocks (on a store key that only the survivors set, after they have raised: a real stall, not a
sleep) at one phase of a step, while the others call ``step()`` on an optimizer over a process
group whose timeout is ``PG_TIMEOUT_S``. Each survivor reports what it raised and how long after
the fault; the parent checks that every survivor raised, in time, from inside ``step()``, and
that the message names the phase and the bucket.

The harness is conftest's worker with one difference: a rank that is meant to die is not waited
for a result, only for its exit code; every wait has a deadline.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import re
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import leo_dist
from conftest import _worker
from dist_util import groups_for, local_grad, make_params

PG_TIMEOUT_S = 10.0
DIED = 17  # exit code of the rank that dies
# What a message must contain to name each phase (any one of the alternatives).
PHASE_WORDS = {
    "exchange": r"(?i)gradient exchange|reduce[-_ ]scatter|all[-_ ]to[-_ ]all|phase 1",
    "update": r"(?i)all[-_ ]gather|update|phase 3|sign",
}


def run_with_fault(fn, world: int, *args, dies: tuple[int, ...] = (), timeout: float = 90.0):
    """Run ``fn`` on ``world`` ranks (conftest's worker); ranks in ``dies`` are expected to exit
    without a result (their exit code is returned instead). Returns ``{rank: result or exitcode}``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(fn, r, world, store_path, results, args), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        out: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(out) < world - len(dies):
                try:
                    rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(f"survivors did not report within {timeout}s; got {sorted(out)}") from None
                if status != "ok":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
            for r in dies:
                procs[r].join(timeout=max(0.1, deadline - time.monotonic()))
                out[r] = procs[r].exitcode
        finally:
            for p in procs:
                p.join(timeout=2)
                if p.is_alive():
                    p.kill()
                    p.join()
    return out


def _optimizer(kind: str, pg):
    params = make_params()
    if kind == "lion":
        return params, leo_dist.ShardedLion(groups_for(params, kind), process_group=pg, bucket_mb=1e-4)
    return params, leo_dist.ShardedLeo(groups_for(params, kind), process_group=pg, bucket_mb=1e-4)


class _Stalled(Exception):
    pass


def _fault_worker(rank, world, kind, victim, how, phase, store_path):
    store = dist.FileStore(store_path, world)
    pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    params, opt = _optimizer(kind, pg)
    for step in range(2):  # a healthy start: the fault comes mid-run
        for p in params:
            p.grad = local_grad(step, rank, p.shape, True)
        opt.step()
    assert opt.verify_replicas()
    for p in params:
        p.grad = local_grad(2, rank, p.shape, True)

    def fault():
        store.set("t_fault", repr(time.time()))
        if how == "exit":
            os._exit(DIED)
        store.wait(["survivors_done"], datetime.timedelta(seconds=120))  # the stall: released only afterwards
        raise _Stalled

    if rank == victim:
        if phase == "exchange":  # before step(): the first collective of the step never gets a partner
            try:
                fault()
            except _Stalled:
                return {"stalled": True}
        else:  # inside step(): the gradients arrived, the update all-gather never happens
            real = opt._comm.all_gather, opt._comm.all_gather_start  # sign buckets gather asynchronously
            opt._comm.all_gather = opt._comm.all_gather_start = lambda *a, **k: fault()
            try:
                opt.step()
            except _Stalled:
                return {"stalled": True}
            finally:
                opt._comm.all_gather, opt._comm.all_gather_start = real
            raise AssertionError("the victim's step finished")
    t0 = time.time()
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - what the survivor sees is the point
        t_err = time.time()
        store.add("survivors_failed", 1)
        if int(store.add("survivors_failed", 0)) == world - 1:
            store.set("survivors_done", "1")
        tb = traceback.extract_tb(e.__traceback__)
        return {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "message": str(e),
                "t_fault": float(store.get("t_fault").decode()), "t_err": t_err, "t_step": t0,
                "frames": [f"{os.path.basename(f.filename)}:{f.name}" for f in tb]}
    raise AssertionError(f"rank {rank}: step() returned although rank {victim} never took part")


CASES = [  # (kind, world, victim, how, phase)
    ("lion", 3, 2, "exit", "exchange"),
    ("leo", 2, 1, "exit", "update"),
    ("lion", 2, 1, "stall", "exchange"),
    ("lion", 3, 0, "stall", "update"),
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def fault(request, tmp_path_factory):
    """One faulty run per case, shared by the tests that read it: ``(case, {rank: report})``."""
    kind, world, victim, how, phase = request.param
    path = str(tmp_path_factory.mktemp("faults") / "store")
    out = run_with_fault(_fault_worker, world, kind, victim, how, phase, path,
                         dies=(victim,) if how == "exit" else (), timeout=60 + 3 * PG_TIMEOUT_S)
    survivors = [r for r in range(world) if r != victim]
    for r in survivors:
        rep = out[r]
        print(f"\n[{'-'.join(map(str, request.param))}] rank {r}: {rep['t_err'] - rep['t_fault']:.2f}s after "
              f"the fault: {rep['type']}: {rep['message']}")
    return request.param, out, survivors


def test_dead_or_stalled_peer_makes_the_others_raise_in_time(fault):
    (kind, world, victim, how, phase), out, survivors = fault
    assert out[victim] == (DIED if how == "exit" else {"stalled": True})
    for r in survivors:
        rep = out[r]
        waited = rep["t_err"] - rep["t_fault"]
        assert "RuntimeError" in rep["mro"], rep  # gloo's DistBackendError is one
        assert any(f.endswith(":step") for f in rep["frames"]), rep["frames"]  # raised from inside step()
        # within the timeout (plus a margin for a loaded machine): never an indefinite hang
        assert waited <= PG_TIMEOUT_S + 10, (r, waited, rep["message"])
        if how == "stall":  # a live but silent peer: nothing can tell it from a slow one before the timeout
            assert waited >= PG_TIMEOUT_S * 0.8, (r, waited, rep["message"])


def test_the_error_names_the_phase(fault):
    (kind, world, victim, how, phase), out, survivors = fault
    for r in survivors:
        message = out[r]["message"]
        assert re.search(PHASE_WORDS[phase], message), (r, phase, message)
        assert re.search(r"bucket \d+|norm all-reduce", message), (r, message)
        assert message.startswith(f"leo_dist Sharded{kind.capitalize()}.step(), rank {r}/{world}"), message
