"""Everything GPU-specific in leo_dist, checked and timed in one run.

    .venv/bin/python benchmarks/gpu_check.py              # writes docs/results/gpu_check/results.{json,md}

Sections (each records its results; a failing section is recorded as failed, with its error, and
the run goes on; the exit status is 1 when any check failed):

1. **kernels**: ``leo_dist.Lion`` / ``Leo`` with ``fused=True`` (Triton) against ``fused=False``
   (torch path) on the same CUDA tensors, several steps; sign-rule parameters and momentum
   bitwise, Leo's matrices within ``rtol=1e-6, atol=1e-8`` (the tolerances of tests/test_kernels.py).
2. **bandwidth**: one fused step over a large buffer, timed with ``torch.cuda.Event``, against a
   device copy of the same buffer; reported as GB/s of the bytes the step must move (Lion: read p,
   g, m, write p, m = 20 bytes per fp32 element) and as a fraction of the copy's rate.
3. **nccl**: ShardedLion / ShardedLeo on NCCL against the single-process optimizer fed the averaged
   gradients (dyadic gradients, so the reduction is exact): world 1 on one GPU in this process,
   and every visible GPU via torch.multiprocessing when there are several. Sign paths bitwise,
   Leo's matrices within 2e-6 relative (as in the CPU tests), replicas checked with ``verify_replicas()``.
4. **memory**: ``torch.cuda.max_memory_allocated`` above the baseline of benchmarks/memory.py's
   configurations (DDP + Lion, ShardedLion standalone, DDP + hook with ShardedLion/ShardedLeo).
5. **sync_debug**: one training step of each sharded optimizer (standalone and under the DDP hook)
   with ``torch.cuda.set_sync_debug_mode("error")``, phase by phase (zero_grad, forward, backward,
   opt.step); a phase that synchronises is reported with the error and where it was raised.

Without CUDA the script prints why and exits with status 0, writing nothing. The pure parts
(records, tolerances, parity comparison, report writing) run on CPU tensors and are tested in
tests/test_gpu_check.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "docs", "results", "gpu_check")
NO_CUDA_MESSAGE = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); nothing to check "
                   "or time here. Run it on a machine with an NVIDIA GPU; the CPU paths are covered by the test suite.")

# Shapes whose shard boundaries fall inside rows; a vector and a 3-D tensor take the sign rule.
PARITY_SHAPES = [(96, 200), (333,), (64, 1), (7, 13, 5), (1000, 17)]


# ----------------------------------------------------------------------------- records and tolerances
@dataclass
class Record:
    """One check or measurement. ``ok`` is None for a pure measurement."""
    section: str
    name: str
    ok: bool | None
    value: float | None = None
    unit: str = ""
    detail: str = ""
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Tolerance:
    """``bitwise`` or ``|a − b| ≤ atol + rtol·|b|`` elementwise (torch.testing.assert_close's rule), or
    ``max|a − b| / max|b| ≤ rel`` (the tests' relative error)."""
    bitwise: bool = False
    rtol: float = 0.0
    atol: float = 0.0
    rel: float | None = None

    def describe(self) -> str:
        if self.bitwise:
            return "bitwise"
        if self.rel is not None:
            return f"max|Δ|/max|ref| ≤ {self.rel:g}"
        return f"rtol={self.rtol:g}, atol={self.atol:g}"


SIGN = Tolerance(bitwise=True)
KERNEL_MATRIX = Tolerance(rtol=1e-6, atol=1e-8)  # tests/test_kernels.py, fused vs unfused Leo 2-D
SHARDED_MATRIX = Tolerance(rel=2e-6)  # as in the CPU tests: sharded vs single-process, fp32 rounding


def compare(a: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> tuple[bool, float, float]:
    """(within tolerance, max abs difference, max relative difference) of two same-shaped tensors."""
    if a.shape != ref.shape:
        return False, float("inf"), float("inf")
    a64, r64 = a.detach().double().cpu(), ref.detach().double().cpu()
    diff = (a64 - r64).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(r64.abs().max()) if r64.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    if tol.bitwise:
        ok = torch.equal(a.detach().cpu(), ref.detach().cpu())
    elif tol.rel is not None:
        ok = max_rel <= tol.rel
    else:
        ok = bool((diff <= tol.atol + tol.rtol * r64.abs()).all())
    if torch.isnan(a64).any() or torch.isnan(r64).any():
        ok = False  # a parity run that produces NaN fails, whatever the tolerance
    return ok, max_abs, max_rel


def compare_all(section: str, name: str, got: list[torch.Tensor], ref: list[torch.Tensor], tols: list[Tolerance]
                ) -> Record:
    """One record for a list of tensors: ok when every pair is within its tolerance."""
    if len(got) != len(ref) or len(got) != len(tols):
        return Record(section, name, False, detail=f"{len(got)} tensors against {len(ref)} references")
    worst, bad = 0.0, []
    for i, (a, b, t) in enumerate(zip(got, ref, tols)):
        ok, _, rel = compare(a, b, t)
        worst = max(worst, rel)
        if not ok:
            bad.append(f"#{i} {tuple(b.shape)} ({t.describe()}): max rel {rel:.3g}")
    detail = "; ".join(bad) if bad else f"{len(got)} tensors within tolerance"
    return Record(section, name, not bad, worst, "max rel diff", detail)


def tolerances_for(kind: str, tensors: list[torch.Tensor], matrix: Tolerance) -> list[Tolerance]:
    """Bitwise for Lion and Leo's sign-rule tensors; ``matrix`` for Leo's 2-D parameters."""
    return [matrix if kind == "leo" and t.ndim == 2 else SIGN for t in tensors]


# ----------------------------------------------------------------------------- parity runs
def make_grads(shapes, steps: int, rank: int = 0, dyadic: bool = False, seed: int = 3) -> list[list[torch.Tensor]]:
    """Per-step CPU gradients for ``rank``; dyadic values (k/64) sum exactly in fp32."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    out = []
    for _ in range(steps):
        if dyadic:
            out.append([torch.randint(-64, 65, s, generator=g).float() / 64 for s in shapes])
        else:
            out.append([torch.randn(s, generator=g) for s in shapes])
    return out


def init_params(shapes, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def run_single(kind: str, device, fused, shapes=PARITY_SHAPES, grads=None, steps: int = 5, **kw):
    """Parameters and momenta after ``steps`` steps of leo_dist.Lion/Leo on ``device`` (returned on CPU)."""
    import leo_dist

    grads = grads if grads is not None else make_grads(shapes, steps)
    params = [torch.nn.Parameter(t.clone().to(device)) for t in init_params(shapes)]
    cls = leo_dist.Leo if kind == "leo" else leo_dist.Lion
    opt = cls(params, lr=0.01, weight_decay=0.1, fused=fused, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device)
        opt.step()
    return [p.detach().cpu() for p in params], [opt.state[p]["exp_avg"].detach().cpu() for p in params]


def kernel_parity(kind: str, device, fused_a, fused_b, shapes=PARITY_SHAPES, steps: int = 5) -> list[Record]:
    """Records comparing two implementations (``fused_a`` against the reference ``fused_b``)."""
    grads = make_grads(shapes, steps)
    pa, ma = run_single(kind, device, fused_a, shapes, grads)
    pb, mb = run_single(kind, device, fused_b, shapes, grads)
    tag = f"{kind} fused={fused_a} vs fused={fused_b} on {device}"
    return [compare_all("kernels", f"{tag}: params", pa, pb, tolerances_for(kind, pb, KERNEL_MATRIX)),
            compare_all("kernels", f"{tag}: momentum", ma, mb, [SIGN] * len(mb))]


def sharded_parity(kind: str, device, rank: int, world: int, shapes=PARITY_SHAPES, steps: int = 5,
                   bucket_mb: float = 0.05, **kw) -> tuple[Record, bool]:
    """ShardedLion/ShardedLeo over the current default group (or a world of 1 without one), fed each
    rank's dyadic gradients, against the single-process optimizer fed their average.
    Returns (parity record, replicas identical)."""
    import leo_dist

    per_rank = [make_grads(shapes, steps, r, dyadic=True) for r in range(world)]
    avg = [[sum(per_rank[r][s][i] for r in range(world)) / world for i in range(len(shapes))] for s in range(steps)]
    ref, _ = run_single(kind, device, None, shapes, avg, **kw)
    params = [torch.nn.Parameter(t.clone().to(device)) for t in init_params(shapes)]
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    opt = cls(params, lr=0.01, weight_decay=0.1, bucket_mb=bucket_mb, **kw)
    for gs in per_rank[rank]:
        for p, g in zip(params, gs):
            p.grad = g.to(device)
        opt.step()
    got = [p.detach().cpu() for p in params]
    same = bool(opt.verify_replicas())
    rec = compare_all("nccl", f"Sharded{kind.capitalize()} W={world} rank {rank} on {device} vs single-process",
                      got, ref, tolerances_for(kind, ref, SHARDED_MATRIX))
    return rec, same


# ----------------------------------------------------------------------------- report
def summary(records: list[Record]) -> dict[str, int]:
    return {"passed": sum(r.ok is True for r in records), "failed": sum(r.ok is False for r in records),
            "measured": sum(r.ok is None for r in records)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(records: list[Record], meta: dict) -> str:
    s = summary(records)
    lines = ["# GPU check (generated by benchmarks/gpu_check.py)", "",
             f"Command: `{meta.get('command', '')}`  ", f"Device: {meta.get('device', '?')}  ",
             f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, {meta.get('date', '')}", "",
             f"**{s['passed']} passed, {s['failed']} failed, {s['measured']} measurements**", ""]
    section = None
    for r in records:
        if r.section != section:
            section = r.section
            lines += ["", f"## {section}", "", "| check | result | value | detail |", "|---|---|---|---|"]
        verdict = "—" if r.ok is None else ("PASS" if r.ok else "**FAIL**")
        value = "" if r.value is None else f"{r.value:.4g} {r.unit}".strip()
        lines.append(f"| {_cell(r.name)} | {verdict} | {value} | {_cell(r.detail)} |")
    return "\n".join(lines) + "\n"


def write_report(records: list[Record], out_dir: str, meta: dict) -> tuple[str, str]:
    """results.json (every record) and results.md (tables by section) under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "summary": summary(records), "records": [asdict(r) for r in records]}, f, indent=1)
    with open(mpath, "w") as f:
        f.write(render_markdown(records, meta))
    return jpath, mpath


def guarded(section: str, records: list[Record], fn, *args) -> None:
    """Run one section; an exception becomes a failed record carrying its traceback, not a crash."""
    try:
        records.extend(fn(*args))
    except Exception as e:  # recorded, printed, and counted as a failure
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        records.append(Record(section, f"{section} raised", False, detail=f"{type(e).__name__}: {e}",
                              data={"traceback": tb}))


# ----------------------------------------------------------------------------- GPU sections
def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` on the current stream (torch.cuda.Event timing)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    times.sort()
    return times[len(times) // 2]


def check_kernels() -> list[Record]:
    dev = torch.device("cuda")
    out = []
    for kind in ("lion", "leo"):
        out += kernel_parity(kind, dev, True, False)
    return out


def check_bandwidth(numel: int) -> list[Record]:
    import leo_dist

    dev = torch.device("cuda")
    out = []
    x = torch.randn(numel, device=dev)
    y = torch.empty_like(x)
    t_copy = cuda_time(lambda: y.copy_(x))
    copy_gbs = 2 * 4 * numel / t_copy / 1e9
    out.append(Record("bandwidth", f"device copy, {numel / 1e6:.0f}M fp32", None, copy_gbs, "GB/s",
                      f"{t_copy * 1e3:.3f} ms (read + write 8 bytes/element)"))
    del x, y
    rows = int(numel // 4096)
    for kind, shape in (("lion", (numel,)), ("leo", (rows, 4096))):
        for fused in (True, False):
            p = torch.nn.Parameter(torch.randn(shape, device=dev))
            p.grad = torch.randn(shape, device=dev)
            cls = leo_dist.Leo if kind == "leo" else leo_dist.Lion
            opt = cls([p], lr=1e-4, weight_decay=0.1, fused=fused)
            t = cuda_time(opt.step, iters=10)
            gbs = 20 * p.numel() / t / 1e9
            out.append(Record("bandwidth", f"{kind} step fused={fused}, {tuple(shape)}", None, gbs, "GB/s",
                              f"{t * 1e3:.3f} ms; {gbs / copy_gbs:.2f}× the copy rate "
                              f"(20 bytes/element: read p, g, m; write p, m)", {"seconds": t, "vs_copy": gbs / copy_gbs}))
            del p, opt
            torch.cuda.empty_cache()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nccl_world1() -> list[Record]:
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=300))
    try:
        out = []
        for kind in ("lion", "leo"):
            rec, same = sharded_parity(kind, torch.device("cuda", 0), 0, 1)
            out += [rec, Record("nccl", f"Sharded{kind.capitalize()} W=1 replicas identical", same)]
        return out
    finally:
        dist.destroy_process_group()


def _nccl_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300), device_id=torch.device("cuda", rank))
    try:
        recs = []
        for kind in ("lion", "leo"):
            rec, same = sharded_parity(kind, torch.device("cuda", rank), rank, world)
            recs += [rec, Record("nccl", f"Sharded{kind.capitalize()} W={world} rank {rank} replicas identical", same)]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump([asdict(r) for r in recs], f)
    finally:
        dist.destroy_process_group()


def check_nccl_multi(world: int) -> list[Record]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_nccl_rank, args=(world, free_port(), tmp), nprocs=world, join=True)
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                out += [Record(**d) for d in json.load(f)]
    return out


def check_memory(world: int, params: str, steps: int) -> list[Record]:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import memory

    n = memory.parse_count(params)
    results = [memory.run_config(c, world, n, steps, False, 2.0, "cuda")
               for c in ("ddp_lion", "sharded_lion_fp32", "hook_lion_fp32", "hook_leo_exact")]
    rat = memory.ratios(results)
    out = []
    for r in results:
        ratio = rat[r.key()]
        ok = None if r.config == memory.REFERENCE else (ratio is not None and ratio < 1.0)
        out.append(Record("memory", f"{r.config} W={world} {r.params / 1e6:.0f}M", ok, r.peak_units, "×4N",
                          f"max_memory_allocated above baseline {max(r.peak_above_baseline) / 2**20:.0f} MiB; "
                          f"{'' if ratio is None else f'{ratio:.3f}× DDP+Lion (must be < 1); '}"
                          f"momentum {r.momentum_units:.3f}×4N", {"per_rank": r.peak_above_baseline}))
    return out


def sync_debug_step(kind: str, with_ddp: bool) -> Record:
    """One step under set_sync_debug_mode("error"), phase by phase; reports the first phase that syncs."""
    import leo_dist
    import torch.distributed as dist

    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)).to(dev)
    x = torch.randn(16, 256, device=dev)
    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[0]) if with_ddp else net
    opt = (leo_dist.ShardedLeo(leo_dist.leo_param_groups(net)) if kind == "leo"
           else leo_dist.ShardedLion(net.parameters()))
    if with_ddp:
        leo_dist.hooks.attach(model, opt)
    for _ in range(2):  # warm-up outside the check: first-step allocations, DDP's bucket rebuild
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    name = f"Sharded{kind.capitalize()}{' + DDP hook' if with_ddp else ' standalone'}, W={dist.get_world_size()}"
    state = {}
    phases = (("zero_grad", lambda: opt.zero_grad()),
              ("forward", lambda: state.__setitem__("loss", model(x).square().mean())),
              ("backward", lambda: state["loss"].backward()),
              ("opt.step", lambda: opt.step()))
    for phase, fn in phases:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            torch.cuda.set_sync_debug_mode("default")
            tb = traceback.extract_tb(e.__traceback__)
            where = [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:"
                     f"{f.lineno} {f.name}" for f in tb if "leo_dist" in f.filename]
            return Record("sync_debug", name, False, detail=f"phase {phase} synchronises: {e}; at "
                          f"{' ← '.join(reversed(where)) or 'outside leo_dist'}",
                          data={"phase": phase, "traceback": traceback.format_exc()})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return Record("sync_debug", name, True, detail="no synchronising call in zero_grad, forward, backward, opt.step")


def check_sync_debug() -> list[Record]:
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=300))
    try:
        return [sync_debug_step(k, ddp) for k in ("lion", "leo") for ddp in (False, True)]
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--bandwidth-numel", type=int, default=64 * 2**20, help="elements of the timed buffers")
    ap.add_argument("--memory-params", default="50M")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["kernels", "bandwidth", "nccl", "memory", "sync_debug"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        return 0
    n_gpu = torch.cuda.device_count()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": f"{n_gpu} × {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    records: list[Record] = []
    t0 = time.time()
    sections = [("kernels", check_kernels, ()), ("bandwidth", check_bandwidth, (args.bandwidth_numel,)),
                ("nccl", check_nccl_world1, ())]
    if n_gpu > 1:
        sections.append(("nccl", check_nccl_multi, (n_gpu,)))
    sections += [("memory", check_memory, (n_gpu, args.memory_params, args.memory_steps)),
                 ("sync_debug", check_sync_debug, ())]
    for section, fn, a in sections:
        if section in args.skip:
            continue
        ts = time.time()
        guarded(section, records, fn, *a)
        print(f"[{section}] done in {time.time() - ts:.1f}s", flush=True)
    meta["seconds"] = round(time.time() - t0, 1)
    jpath, mpath = write_report(records, args.out, meta)
    print(render_markdown(records, meta))
    print(f"wrote {jpath} and {mpath}")
    return 1 if summary(records)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
