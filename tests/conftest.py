"""Multi-process test harness: ranks are spawned processes on gloo, rendezvous on a file.

``run_ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh
processes with one thread each, a process group with a timeout, and teardown in ``finally``; it
returns the list of per-rank results (which must pickle) for the parent to compare, and re-raises
the first rank's exception with its traceback. ``fn`` must be a module-level function.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import traceback

import pytest
import torch
import torch.multiprocessing as mp

GROUP_TIMEOUT_S = 60


def _worker(fn, rank, world_size, store_path, results, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory handles that die with this process
        results.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # report every failure to the parent, never hang it
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store_path, results, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out, errors = {}, []
        try:
            for _ in range(world_size):
                try:
                    rank, status, value = results.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"ranks did not finish within {timeout}s; got {sorted(out)}") from None
                if status == "ok":
                    out[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    errors.append((rank, value))
                    break  # the other ranks will time out on their collectives; don't wait for them
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            rank, msg = errors[0]
            raise RuntimeError(f"rank {rank} failed:\n{msg}")
        return [out[r] for r in range(world_size)]


@pytest.fixture
def ranks():
    return run_ranks
