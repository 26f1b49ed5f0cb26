"""Peak memory per rank of a training step: plain DDP + Lion against leo_dist (docs/design.md, "Memory model").

A stack of square Linear layers (``--params 50M`` → 12 × Linear(2041, 2041), 49.99M parameters;
``200M`` → 12 × Linear(4082, 4082), 199.99M; any count N gets 12 layers of width ⌊√(N/12)⌋ up to
2048 below 100M, 4096 above, and more layers past that) trains for a
few steps on W gloo ranks spawned with torch.multiprocessing, one configuration at a time, each in
fresh processes. Every rank:

1. builds the model, runs one forward/backward (so ``.grad`` exists, autograd and the libraries
   are loaded), and takes the **baseline**: VmRSS (CPU) or ``memory_allocated`` (CUDA);
2. resets the kernel's high-water mark (``/proc/self/clear_refs`` ← ``5``; CUDA:
   ``reset_peak_memory_stats``), then builds DDP and/or the optimizer and runs ``--steps`` steps;
3. reads the peak (VmHWM from ``/proc/self/status``; CUDA: ``max_memory_allocated``).

The figure is **peak above baseline**, in units of the parameter bytes ``4N`` and as a ratio to
DDP + Lion at the same world size and model. So optimizer state, DDP's bucket buffers, the
sharded optimizers' buckets and every transient count; parameters, gradients and activations do
not (they are in the baseline, and the same in every configuration).

The ranks run with glibc malloc made explicit (see ``MALLOC_ENV``): a fixed mmap threshold of
128 KiB (every tensor of 128 KiB or more is its own mmap, returned to the kernel on free, so RSS
follows the live tensors), heap trimming at 128 KiB, two arenas, and transparent huge pages
disabled for the process (``prctl(PR_SET_THP_DISABLE)``). See docs/memory.md for why RSS.

    .venv/bin/python benchmarks/memory.py --world 2 --params 50M            # every configuration
    .venv/bin/python benchmarks/memory.py --world 2 --params 50M --breakdown --configs sharded_lion_fp32

``--breakdown`` also records, per phase (construction; each step's zero_grad / forward /
backward / opt.step), the RSS at its end and its own peak (the high-water mark is read and reset
at every phase boundary, so these peaks are exact, not sampled), a VmRSS timeline sampled by a
background thread every ``--sample-ms``, and, in one extra profiled step after the measurement,
the ops that allocate the most bytes inside ``opt.step()`` (torch.profiler ``profile_memory``,
grouped by their Python call site).

Results merge into docs/results/memory/memory.json (keyed by device, world, params, configuration),
from which docs/results/memory/memory.md and memory.png are regenerated.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "docs", "results", "memory")

# glibc malloc settings for the spawned ranks (read by malloc when the process starts).
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "131072",  # fixed: disables glibc's dynamic threshold (up to 32 MiB)
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "OMP_NUM_THREADS": "1",
}

# name -> (description, DDP?, optimizer spec)
CONFIGS: dict[str, tuple[str, bool, dict]] = {
    "ddp_lion": ("DDP + leo_dist.Lion", True, {"kind": "lion"}),
    "ddp_zero_lion": ("DDP + ZeroRedundancyOptimizer(Lion)", True, {"kind": "zero"}),
    "sharded_lion_fp32": ("ShardedLion fp32 grads", False, {"kind": "slion", "grad_comm": "fp32"}),
    "sharded_lion_bf16": ("ShardedLion bf16 grads", False, {"kind": "slion", "grad_comm": "bf16"}),
    "sharded_lion_1bit": ("ShardedLion 1bit grads", False, {"kind": "slion", "grad_comm": "1bit"}),
    "sharded_leo_exact": ("ShardedLeo exact", False, {"kind": "sleo", "update_comm": "exact"}),
    "sharded_leo_u1bit": ("ShardedLeo update_comm=1bit", False, {"kind": "sleo", "update_comm": "1bit"}),
    "hook_lion_fp32": ("DDP+hook ShardedLion fp32 grads", True, {"kind": "slion", "grad_comm": "fp32"}),
    "hook_lion_bf16": ("DDP+hook ShardedLion bf16 grads", True, {"kind": "slion", "grad_comm": "bf16"}),
    "hook_lion_1bit": ("DDP+hook ShardedLion 1bit grads", True, {"kind": "slion", "grad_comm": "1bit"}),
    "hook_leo_exact": ("DDP+hook ShardedLeo exact", True, {"kind": "sleo", "update_comm": "exact"}),
    "hook_leo_u1bit": ("DDP+hook ShardedLeo update_comm=1bit", True, {"kind": "sleo", "update_comm": "1bit"}),
}
REFERENCE = "ddp_lion"
# The project issue's targets (W=2, 50M, DDP defaults): peak-above-baseline / DDP+Lion's.
TARGETS = {
    "sharded_lion_fp32": 0.55, "sharded_lion_bf16": 0.55, "sharded_lion_1bit": 0.55,
    "hook_lion_fp32": 0.75, "hook_lion_bf16": 0.75, "hook_lion_1bit": 0.75,
    "hook_leo_exact": 0.9, "hook_leo_u1bit": 0.9,
}


# ----------------------------------------------------------------------------- pure helpers
def parse_count(text: str) -> int:
    """'50M' -> 50_000_000, '1.5G' -> 1_500_000_000, '123456' -> 123456."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (e.g. 50M, 200M, 1500000)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * scale))


def model_shape(n_params: int) -> tuple[int, int]:
    """(width, layers) of a stack of Linear(width, width) with about ``n_params`` parameters."""
    if n_params <= 0:
        raise ValueError("the parameter count must be positive")
    width = 2048 if n_params < 100_000_000 else 4096
    if n_params < 12 * (width * width + width):
        width = max(8, int((n_params / 12) ** 0.5))
    layers = max(1, round(n_params / (width * width + width)))
    return width, layers


def status_kib(field_name: str, text: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, in KiB."""
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    if not m:
        raise KeyError(field_name)
    return int(m.group(1))


def state_bytes(opt) -> dict[str, int]:
    """Bytes of optimizer state tensors on this rank, by state key, each storage counted once.

    Sharded optimizers keep per-parameter views of one buffer per bucket: counting storages, not
    views, gives the memory really held (padding included). ZeroRedundancyOptimizer: its local
    optimizer's state.
    """
    import torch

    inner = getattr(opt, "optim", opt)
    seen: dict[str, set] = {}
    total: dict[str, int] = {}
    for st in inner.state.values():
        for key, t in st.items():
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr in seen.setdefault(key, set()):
                continue
            seen[key].add(ptr)
            total[key] = total.get(key, 0) + s.nbytes()
    return total


@dataclass
class Result:
    """One configuration at one (device, world, params): per-rank figures, in bytes."""
    config: str
    world: int
    params: int
    device: str
    peak_above_baseline: list[int]
    baseline: list[int]
    momentum_bytes: list[int]
    state_bytes: list[dict]
    method: str
    steps: int
    width: int = 0
    layers: int = 0
    breakdown: list | None = None
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.device, self.world, self.params, self.config)

    @property
    def peak_units(self) -> float:
        """Max over ranks of peak-above-baseline, in units of the parameter bytes 4N."""
        return max(self.peak_above_baseline) / (4 * self.params)

    @property
    def momentum_units(self) -> float:
        return max(self.momentum_bytes) / (4 * self.params)


def target_for(r: Result) -> float | None:
    """The issue's target ratio, which is stated for W=2 and the 50M model only."""
    return TARGETS.get(r.config) if r.world == 2 and abs(r.params - 50e6) < 5e6 else None


def ratios(results: list[Result]) -> dict[tuple, float | None]:
    """Peak ratio to DDP + Lion of the same (device, world, params), per result key."""
    ref = {(r.device, r.world, r.params): r.peak_units for r in results if r.config == REFERENCE}
    out = {}
    for r in results:
        base = ref.get((r.device, r.world, r.params))
        out[r.key()] = r.peak_units / base if base else None
    return out


def merge(old: list[Result], new: list[Result]) -> list[Result]:
    """``old`` with every entry of the same key replaced by ``new``'s, in a stable order."""
    by_key = {r.key(): r for r in old}
    by_key.update({r.key(): r for r in new})
    order = list(CONFIGS)
    return sorted(by_key.values(), key=lambda r: (r.device, r.params, r.world,
                                                  order.index(r.config) if r.config in order else 99))


def thin(samples: list, points: int = 400) -> list:
    """At most ``points`` of a (t, bytes) timeline, keeping each bin's largest sample (peaks survive)."""
    if len(samples) <= points:
        return list(samples)
    step = len(samples) / points
    return [max(samples[int(i * step): int((i + 1) * step)], key=lambda s: s[1]) for i in range(points)]


def load(path: str) -> list[Result]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return [Result(**{k: v for k, v in d.items() if k in Result.__dataclass_fields__}) for d in data["results"]]


def save(path: str, results: list[Result], meta: dict) -> None:
    rat = ratios(results)
    rows = []
    for r in results:
        d = r.__dict__.copy()
        if r.breakdown:
            d["breakdown"] = [dict(b, timeline=thin(b.get("timeline", []))) for b in r.breakdown]
        d["peak_units_4N"] = round(r.peak_units, 4)
        d["momentum_units_4N"] = round(r.momentum_units, 4)
        d["ratio_to_ddp_lion"] = None if rat[r.key()] is None else round(rat[r.key()], 4)
        d["target"] = target_for(r)
        rows.append(d)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def table(results: list[Result]) -> str:
    """Markdown table of every result (max over ranks), ratios to DDP + Lion, targets."""
    rat = ratios(results)
    lines = ["| device | W | params | configuration | peak above baseline MiB | ×4N | vs DDP+Lion | target "
             "| momentum/rank MiB | momentum ×4N | other state MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = rat[r.key()]
        target = target_for(r)
        verdict = "" if target is None or ratio is None else (f"≤{target} {'✓' if ratio <= target else '✗'}")
        other = max(sum(v for k, v in s.items() if k != "exp_avg") for s in r.state_bytes) if r.state_bytes else 0
        lines.append(f"| {r.device} | {r.world} | {r.params / 1e6:.1f}M | {CONFIGS.get(r.config, (r.config,))[0]} "
                     f"(`{r.config}`) | {fmt_mib(max(r.peak_above_baseline))} | {r.peak_units:.3f} | "
                     f"{'—' if ratio is None else f'{ratio:.3f}'} | {verdict} | {fmt_mib(max(r.momentum_bytes))} | "
                     f"{r.momentum_units:.3f} | {fmt_mib(other)} |")
    return "\n".join(lines)


def breakdown_table(r: Result) -> str:
    """Per-phase RSS (end) and peak of rank 0, above the baseline, in MiB and ×4N."""
    if not r.breakdown:
        return ""
    unit = 4 * r.params
    lines = [f"#### `{r.config}`, W={r.world}, {r.params / 1e6:.1f}M (rank 0)", "",
             "| phase | peak MiB | peak ×4N | at end MiB | at end ×4N | seconds |", "|---|---|---|---|---|---|"]
    for ph in r.breakdown[0]["phases"]:
        lines.append(f"| {ph['phase']} | {fmt_mib(ph['peak'])} | {ph['peak'] / unit:.3f} | {fmt_mib(ph['end'])} | "
                     f"{ph['end'] / unit:.3f} | {ph['seconds']:.2f} |")
    top = r.breakdown[0].get("step_allocations") or []
    if top:
        lines += ["", "Largest allocations inside one `opt.step()` (torch.profiler, bytes allocated by the op "
                      "itself, grouped by op and call site):", "",
                  "| op | calls | MiB | ×4N | call site |", "|---|---|---|---|---|"]
        for a in top:
            lines.append(f"| {a['op']} | {a['calls']} | {fmt_mib(a['bytes'])} | {a['bytes'] / unit:.3f} | "
                         f"{' ← '.join(a['stack'][:3]) or '—'} |")
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.device, r.world, r.params) for r in results})
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 3.6 * len(groups)), squeeze=False)
    rat = ratios(results)
    for ax, g in zip(axes[:, 0], groups):
        rs = [r for r in results if (r.device, r.world, r.params) == g]
        names = [r.config for r in rs]
        peaks = [r.peak_units for r in rs]
        moms = [r.momentum_units for r in rs]
        x = range(len(rs))
        ax.bar(x, peaks, color=["#888" if n.startswith("ddp") else "#3a7" if n.startswith("sharded") else "#37a"
                                for n in names], label="peak above baseline")
        ax.bar(x, moms, width=0.35, color="k", alpha=0.5, label="momentum per rank")
        for i, r in enumerate(rs):
            q = rat[r.key()]
            if q is not None:
                ax.text(i, peaks[i], f"{q:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("× parameter bytes (4N)")
        ax.set_title(f"{g[0]}, W={g[1]}, {g[2] / 1e6:.0f}M params: peak memory per rank above baseline "
                     f"(labels: ratio to DDP+Lion)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- measurement
class PeakMeter:
    """Peak memory above a baseline: VmHWM after clear_refs (CPU), the allocator's peak (CUDA).

    Falls back to a sampling thread (VmRSS every ``sample_s``) where clear_refs is not writable.
    """

    def __init__(self, device, sample_s: float = 0.001):
        self.cuda = device.type == "cuda"
        self.sample_s = sample_s
        self.method = "cuda.max_memory_allocated" if self.cuda else "VmHWM after clear_refs=5"
        self._sampler = None
        self._sampled_peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            return status_kib("VmRSS", f.read()) * 1024

    @staticmethod
    def hwm() -> int:
        with open("/proc/self/status") as f:
            return status_kib("VmHWM", f.read()) * 1024

    def current(self) -> int:
        if self.cuda:
            import torch
            return torch.cuda.memory_allocated()
        return self.rss()

    def reset(self) -> None:
        """Start a new peak window at the current usage."""
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        if self._sampler is None:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                return
            except OSError:
                self.method = "VmRSS sampled by a thread (clear_refs not writable)"
                self._start_sampler()
        self._sampled_peak = self.rss()

    def peak(self) -> int:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampler is not None:
            return max(self._sampled_peak, self.rss())
        return self.hwm()

    def _start_sampler(self) -> None:
        def run():
            while True:
                self._sampled_peak = max(self._sampled_peak, self.rss())
                time.sleep(self.sample_s)

        self._sampler = threading.Thread(target=run, daemon=True)
        self._sampler.start()


class Timeline:
    """VmRSS sampled by a background thread: (seconds since ``t0``, bytes)."""

    def __init__(self, sample_s: float, t0: float):
        self.sample_s, self.samples, self._stop, self._t0 = sample_s, [], False, t0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.samples.append((round(time.perf_counter() - self._t0, 4), PeakMeter.rss()))
            time.sleep(self.sample_s)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop = True
        self._thread.join()


def disable_thp() -> bool:
    """prctl(PR_SET_THP_DISABLE, 1): no transparent huge pages in this process (RSS in 4 KiB pages)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def build_model(width: int, layers: int, device, rank: int):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank)).to(device)
    return net, lambda m: m(x).square().mean()


def build_optimizer(spec: dict, net):
    import leo_dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    kind = spec["kind"]
    if kind == "lion":
        return leo_dist.Lion(net.parameters())
    if kind == "zero":
        return ZeroRedundancyOptimizer(net.parameters(), optimizer_class=leo_dist.Lion)
    # grad_comm="1bit": no fp32 warm-up, so that the measured steps are compressed ones
    if kind == "slion":
        return leo_dist.ShardedLion(net.parameters(), grad_comm=spec["grad_comm"], grad_comm_warmup=0)
    if kind == "sleo":
        return leo_dist.ShardedLeo(leo_dist.leo_param_groups(net), update_comm=spec["update_comm"])
    raise ValueError(kind)


def setup(use_ddp: bool, spec: dict, net, device, rank: int):
    """(model to call, optimizer): DDP with its default settings, the leo_dist hook when sharded."""
    import leo_dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(net, device_ids=[rank] if device.type == "cuda" else None) if use_ddp else net
    opt = build_optimizer(spec, net)
    if use_ddp and spec["kind"] in ("slion", "sleo"):
        leo_dist.hooks.attach(model, opt)
    return model, opt


def _site(name: str) -> str:
    """'/x/y/leo_dist/exchange.py(41): _stage' -> 'leo_dist/exchange.py:41 _stage'."""
    m = re.search(r"((?:leo_dist|benchmarks)/[\w/]+\.py)\((\d+)\): (\S+)", name)
    return f"{m.group(1)}:{m.group(2)} {m.group(3)}" if m else name


def attribute_allocations(events, top: int = 12) -> list[dict]:
    """Bytes allocated by ops (profiler events with positive self memory), grouped by the outermost
    op below a Python frame and the two innermost leo_dist/benchmarks call sites above it."""
    groups: dict[tuple, dict] = {}
    for e in events:
        b = e.self_cpu_memory_usage or 0
        if getattr(e, "self_device_memory_usage", 0) and e.self_device_memory_usage > 0:
            b = e.self_device_memory_usage
        if b <= 0 or ".py(" in e.name:
            continue
        op, sites, p = e.name, [], e.cpu_parent
        while p is not None:
            if ".py(" in p.name:
                if "leo_dist/" in p.name or "benchmarks/" in p.name:
                    sites.append(_site(p.name))
            elif not sites and "built-in method" not in p.name:
                op = p.name  # an enclosing op (aten::cat around its aten::empty)
            p = p.cpu_parent
        key = (op, tuple(sites[:2]))
        g = groups.setdefault(key, {"op": op, "calls": 0, "bytes": 0, "stack": list(sites[:2])})
        g["calls"] += 1
        g["bytes"] += int(b)
    return sorted(groups.values(), key=lambda g: -g["bytes"])[:top]


def profile_step(step_fn, top: int = 12) -> list[dict]:
    """The ops allocating the most bytes within ``step_fn()``, with their leo_dist call sites."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        step_fn()
    return attribute_allocations(prof.events(), top)


def worker(rank: int, world: int, config: str, width: int, layers: int, steps: int, port: int, out_dir: str,
           breakdown: bool, sample_ms: float, device_kind: str) -> None:
    thp = disable_thp()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    cuda = device_kind == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        _, use_ddp, spec = CONFIGS[config]
        # Warm-up: the same configuration on a tiny model, so that lazily loaded code (leo_dist's
        # C step library, torch.distributed.optim, DDP's reducer, gloo's algorithms) is loaded
        # before the baseline and does not count as the configuration's memory.
        tiny, tiny_loss = build_model(64, 2, device, rank)
        tmodel, topt = setup(use_ddp, spec, tiny, device, rank)
        for _ in range(2):
            topt.zero_grad()
            tiny_loss(tmodel).backward()
            topt.step()
        del tiny, tiny_loss, tmodel, topt
        net, loss_fn = build_model(width, layers, device, rank)
        loss_fn(net).backward()  # .grad exists, autograd warmed up: part of the baseline
        dist.barrier()
        gc.collect()
        meter = PeakMeter(device)
        t0 = time.perf_counter()
        timeline = Timeline(sample_ms / 1000, t0).start() if breakdown and not cuda else None
        phases: list[dict] = []
        baseline = meter.current()
        meter.reset()
        t_phase = [t0]

        def phase(name: str) -> None:
            """Close the current phase: its own peak (high-water mark since the last boundary)."""
            if not breakdown:
                return
            peak, end = meter.peak(), meter.current()
            now = time.perf_counter()
            phases.append({"phase": name, "peak": peak - baseline, "end": end - baseline,
                           "seconds": now - t_phase[0], "t_end": now - t0})
            t_phase[0] = now
            meter.reset()

        model, opt = setup(use_ddp, spec, net, device, rank)
        phase("construct")
        for s in range(steps):
            opt.zero_grad()
            phase(f"step{s}:zero_grad")
            loss = loss_fn(model)
            phase(f"step{s}:forward")
            loss.backward()
            del loss
            phase(f"step{s}:backward")
            opt.step()
            phase(f"step{s}:opt.step")
        if cuda:
            torch.cuda.synchronize()
        peak = meter.peak() - baseline
        if breakdown:
            peak = max(p["peak"] for p in phases)
        states = state_bytes(opt)
        momentum = states.get("exp_avg", 0)
        rec = {"peak_above_baseline": int(peak), "baseline": int(baseline), "momentum_bytes": int(momentum),
               "state_bytes": states, "method": meter.method, "thp_disabled": thp,
               "env": {k: os.environ.get(k) for k in MALLOC_ENV}}
        if timeline is not None:
            timeline.stop()
            rec["timeline"] = [(t, r - baseline) for t, r in timeline.samples]
        if breakdown:
            rec["phases"] = phases
            if not cuda:  # one more step, profiled, outside the measured window
                opt.zero_grad()
                loss_fn(model).backward()
                rec["step_allocations"] = profile_step(opt.step)
        dist.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rec, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(config: str, world: int, n_params: int, steps: int, breakdown: bool, sample_ms: float,
               device_kind: str = "cpu") -> Result:
    """Spawn ``world`` fresh ranks for one configuration and collect their figures."""
    import torch.multiprocessing as mp

    width, layers = model_shape(n_params)
    actual = layers * (width * width + width)
    os.environ.update(MALLOC_ENV)  # the spawned interpreters start with these (glibc reads them at start)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, config, width, layers, steps, free_port(), tmp, breakdown, sample_ms,
                               device_kind), nprocs=world, join=True)
        recs = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                recs.append(json.load(f))
    bd = None
    if breakdown:
        bd = [{"rank": r, "phases": rec["phases"], "timeline": rec.get("timeline", []),
               "step_allocations": rec.get("step_allocations", [])} for r, rec in enumerate(recs)]
    return Result(config=config, world=world, params=actual, device=device_kind,
                  peak_above_baseline=[rec["peak_above_baseline"] for rec in recs],
                  baseline=[rec["baseline"] for rec in recs], momentum_bytes=[rec["momentum_bytes"] for rec in recs],
                  state_bytes=[rec["state_bytes"] for rec in recs], method=recs[0]["method"], steps=steps,
                  width=width, layers=layers, breakdown=bd,
                  extra={"thp_disabled": recs[0]["thp_disabled"], "env": recs[0]["env"]})


def plot_timeline(r: Result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = r.breakdown[0]["timeline"]
    if not samples:
        return
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot([s[0] for s in samples], [s[1] / (4 * r.params) for s in samples], lw=1)
    for ph in r.breakdown[0]["phases"]:  # a line at the end of each phase, named
        ax.axvline(ph["t_end"], color="#bbb", lw=0.5)
        ax.text(ph["t_end"], 0, ph["phase"], rotation=90, fontsize=5, va="bottom", ha="right")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS above baseline (×4N)")
    ax.set_title(f"{r.config}, W={r.world}, {r.params / 1e6:.0f}M, rank 0: VmRSS timeline", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2])
    ap.add_argument("--params", nargs="+", default=["50M"], help="parameter counts, e.g. 50M 200M")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="per-phase peaks, RSS timeline, top allocating ops")
    ap.add_argument("--sample-ms", type=float, default=2.0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    json_path = os.path.join(args.out, "memory.json")
    new = []
    for n in args.params:
        for w in args.world:
            for c in args.configs:  # strictly one configuration at a time
                t0 = time.time()
                r = run_config(c, w, parse_count(n), args.steps, args.breakdown, args.sample_ms, args.device)
                new.append(r)
                print(f"W={w} {r.params / 1e6:.1f}M {c:20s} peak {fmt_mib(max(r.peak_above_baseline)):>6} MiB "
                      f"= {r.peak_units:.3f}×4N  momentum {r.momentum_units:.3f}×4N  "
                      f"per rank {[fmt_mib(p) for p in r.peak_above_baseline]}  ({time.time() - t0:.0f}s)",
                      flush=True)
    print()
    print(table(merge([], new)))
    for r in new:
        if r.breakdown:
            print()
            print(breakdown_table(r))
    if args.no_save:
        return 0
    results = merge(load(json_path), new)
    meta = {"command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "malloc_env": MALLOC_ENV, "unit": "bytes; ×4N = / (4 · parameter count)",
            "baseline": "after model, one backward (.grad) and imports; peak window covers DDP/optimizer "
                        "construction and the steps"}
    save(json_path, results, meta)
    md = ["# Peak memory per rank (generated by benchmarks/memory.py)", "", table(results), ""]
    for r in results:
        if r.breakdown:
            md += [breakdown_table(r), ""]
            plot_timeline(r, os.path.join(args.out, f"timeline_{r.config}_w{r.world}_{round(r.params / 1e6)}m.png"))
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write("\n".join(md))
    plot(results, os.path.join(args.out, "memory.png"))
    print(f"\nwrote {json_path}, memory.md, memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
