"""Variants of the 1-bit gradient codec, tried in a single-process emulation of W data-parallel ranks.

No process group and no library change: every step runs the W ranks' forward/backward one after the
other (rank r's batch is the demo's ``train_batch(..., rank=r, step)``), flattens each rank's
gradient into one vector in parameter order, combines the W vectors as the chosen mode says, sets
``p.grad`` to the result and steps the single-process ``leo_dist.Leo`` / ``leo_dist.Lion`` (the
oracle the sharded optimizers match). Model, data, param groups, default lr/betas/wd, the cosine
schedule and its warm-up are the demo's (launch/).

Codec of the library (leo_dist/onebit.py), reproduced here: per rank ``x = g_r + e_r``; one scale
per run of ``C`` consecutive elements, ``s = mean|x|`` over the run; decoded ``s·sign(x)`` with
sign = +1 where ``x > 0`` and −1 otherwise (so exact zeros decode to −s); ``e_r ← x − decoded``;
the owner averages the W decoded vectors. The first ``warmup`` steps are exact (fp32 mean).

Variants (``--configs``; see CONFIGS): chunk size, per-row or rank-1 (row × column) scales for the
2-D matrices, warm-up length, no error feedback, and diagnostics that compress only part of the
model. Per step of compression the run also records how far the decoded mean gradient is from the
exact mean and how far the optimizer's update computed from it is from the update the exact mean
would give from the same momentum (cosine, relative L2).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onebit_modes.py --configs "leo exact" "leo 1bit C1024"
    .venv/bin/python benchmarks/onebit_modes.py --table      # markdown tables from docs/onebit_modes.json

Results are merged into ``docs/onebit_modes.json`` after every run (keyed by config, seed, world, steps).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import leo_dist  # noqa: E402
from leo_dist.functional import leo_direction, leo_scale  # noqa: E402
from launch.data import evaluate, train_batch  # noqa: E402
from launch.gpt import GPT, PRESETS, GPTConfig, load_corpus  # noqa: E402
from launch.optimizers import DEFAULT_BETAS, DEFAULT_LR, DEFAULT_WD, _decay_groups, lr_factor  # noqa: E402


def _cfg(opt, codec="exact", chunk=1024, warmup=10, ef=True, scope="all", leak=1.0):
    return dict(opt=opt, codec=codec, chunk=chunk, warmup=warmup, ef=ef, scope=scope, leak=leak)


# codec: exact | flat (runs of `chunk` over the flattened vector) | row (one scale per row of each
# 2-D matrix, the rest flat) | rank1 (scale_ij = r_i·c_j for each 2-D matrix, the rest flat)
# scope: which part is compressed: all | mat (2-D matrices only, the rest exact) | rest (the rest only)
CONFIGS = {
    "leo exact": _cfg("leo"),
    "leo 1bit C1024": _cfg("leo", "flat", 1024),
    "leo 1bit C256": _cfg("leo", "flat", 256),
    "leo 1bit C64": _cfg("leo", "flat", 64),
    "leo 1bit row": _cfg("leo", "row", 1024),
    "leo 1bit rank1": _cfg("leo", "rank1", 1024),
    "leo 1bit C1024 wu30": _cfg("leo", "flat", 1024, warmup=30),
    "leo 1bit C1024 wu50": _cfg("leo", "flat", 1024, warmup=50),
    "leo 1bit C1024 wu100": _cfg("leo", "flat", 1024, warmup=100),
    "leo 1bit C1024 noEF": _cfg("leo", "flat", 1024, ef=False),
    "leo 1bit C1024 leak0.9": _cfg("leo", "flat", 1024, leak=0.9),
    "leo 1bit C1024 mat-only": _cfg("leo", "flat", 1024, scope="mat"),
    "leo 1bit C1024 rest-only": _cfg("leo", "flat", 1024, scope="rest"),
    "leo 1bit rank1 wu50": _cfg("leo", "rank1", 1024, warmup=50),
    "leo 1bit C64 wu50": _cfg("leo", "flat", 64, warmup=50),
    "lion exact": _cfg("lion"),
    "lion 1bit C1024": _cfg("lion", "flat", 1024),
    "lion 1bit C64": _cfg("lion", "flat", 64),
    "lion 1bit row": _cfg("lion", "row", 1024),
    "lion 1bit rank1": _cfg("lion", "rank1", 1024),
    "lion 1bit C1024 wu50": _cfg("lion", "flat", 1024, warmup=50),
}


class Codec:
    """Builds, once per model, the per-element scale of each variant, and the bits it costs."""

    def __init__(self, params, mat_ids, spec):
        self.spec = spec
        self.segs = []  # (offset, numel, shape, is_matrix)
        off = 0
        for p in params:
            self.segs.append((off, p.numel(), tuple(p.shape), id(p) in mat_ids))
            off += p.numel()
        self.n = off
        self.mat_mask = torch.zeros(self.n, dtype=torch.bool)
        for o, k, _, is_mat in self.segs:
            if is_mat:
                self.mat_mask[o:o + k] = True
        scope = spec["scope"]
        self.comp_mask = {"all": torch.ones(self.n, dtype=torch.bool), "mat": self.mat_mask,
                          "rest": ~self.mat_mask}[scope]
        self.n_comp = int(self.comp_mask.sum())

    def _flat_scale(self, ax: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
        """Per-element scale: mean |x| over runs of ``chunk`` of the 1-D ``ax`` (|x|)."""
        n = ax.numel()
        k = -(-n // chunk)
        pad = torch.zeros(k * chunk, dtype=ax.dtype)
        pad[:n] = ax
        counts = torch.full((k,), float(chunk))
        counts[-1] = n - (k - 1) * chunk
        s = pad.view(k, chunk).sum(1) / counts
        return s.repeat_interleave(chunk)[:n], k

    def scales(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per-element scale for ``x`` (full vector; only the compressed part is used) and the
        number of float32 scales sent."""
        codec, chunk = self.spec["codec"], self.spec["chunk"]
        ax = x.abs()
        scale = torch.zeros_like(x)
        if codec == "flat":
            idx = self.comp_mask.nonzero().squeeze(1)
            s, k = self._flat_scale(ax[idx], chunk)
            scale[idx] = s
            return scale, k
        # row / rank1: per-matrix scales for compressed matrices, flat runs for the compressed rest
        n_scales = 0
        rest = self.comp_mask & ~self.mat_mask
        if rest.any():
            idx = rest.nonzero().squeeze(1)
            s, k = self._flat_scale(ax[idx], chunk)
            scale[idx] = s
            n_scales += k
        for o, k, shape, is_mat in self.segs:
            if not is_mat or not bool(self.comp_mask[o]):
                continue
            a = ax[o:o + k].view(shape)
            r = a.mean(dim=1, keepdim=True)
            if codec == "row":
                sc = r.expand(shape)
                n_scales += shape[0]
            elif codec == "rank1":
                mean = a.mean()
                c = a.mean(dim=0, keepdim=True) / mean.clamp_min(1e-30)
                sc = r * c
                n_scales += shape[0] + shape[1]
            else:
                raise ValueError(codec)
            scale[o:o + k] = sc.reshape(-1)
        return scale, n_scales

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Decoded message for the local ``x = g + e``: compressed part ``scale·sign(x)`` (sign
        +1 where x > 0 else −1, as leo_dist/onebit.py), the uncompressed part exact."""
        scale, n_scales = self.scales(x)
        sign = torch.where(x > 0, 1.0, -1.0)
        dec = torch.where(self.comp_mask, sign * scale, x)
        return dec, n_scales

    def bits_per_element(self, n_scales: int) -> float:
        """Bits of one rank's message per gradient element: signs, float32 scales, fp32 for the
        uncompressed part."""
        return (self.n_comp + 32 * n_scales + 32 * (self.n - self.n_comp)) / self.n


def _update_vector(opt, params, grads_by_param, fam):
    """The update each parameter would take from ``grads`` given the optimizer's current momentum
    (without changing anything), concatenated in parameter order."""
    out = []
    for group in opt.param_groups:
        beta1 = group["betas"][0]
        for p in group["params"]:
            g = grads_by_param[id(p)]
            m = opt.state[p].get("exp_avg") if p in opt.state else None
            c = g.clone() if m is None else torch.lerp(g, m, beta1)
            if fam == "leo" and group["orthogonalize"] and p.ndim == 2:
                u = leo_direction(c, group["eps"])
                u = u * leo_scale(u.square().sum(), u.numel(), group["align_const"], group["eps"])
            elif fam == "leo":
                u = group["align_const"] * torch.sign(c)
            else:
                u = torch.sign(c)
            out.append((id(p), u.reshape(-1)))
    order = {id(p): i for i, p in enumerate(params)}
    out.sort(key=lambda t: order[t[0]])
    return torch.cat([u for _, u in out])


def run_one(name: str, spec: dict, args, corpus) -> dict:
    torch.set_num_threads(1)
    train_ids, val_ids, vocab = corpus
    fam = spec["opt"]
    cfg = GPTConfig(vocab_size=vocab, **PRESETS[args.preset])
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    model.train()
    wd = DEFAULT_WD[fam]
    if fam == "leo":
        groups = leo_dist.leo_param_groups(model, weight_decay=wd)
        opt = leo_dist.Leo(groups, lr=DEFAULT_LR[fam], betas=DEFAULT_BETAS[fam])
        mat_ids = {id(p) for g in groups if g["orthogonalize"] for p in g["params"]}
    else:
        groups = _decay_groups(model, wd)
        opt = leo_dist.Lion(groups, lr=DEFAULT_LR[fam], betas=DEFAULT_BETAS[fam])
        # the same 2-D non-embedding matrices as Leo's orthogonalised group
        mat_ids = {id(p) for g in leo_dist.leo_param_groups(model) if g["orthogonalize"] for p in g["params"]}
    params = [p for p in model.parameters() if p.requires_grad]
    base_lrs = [g["lr"] for g in opt.param_groups]
    sched = SimpleNamespace(warmup_steps=min(100, args.steps // 10), schedule="cosine", steps=args.steps)
    bargs = SimpleNamespace(seed=args.seed, batch_size=args.batch_size, eval_batches=args.eval_batches)
    codec = Codec(params, mat_ids, spec) if spec["codec"] != "exact" else None
    n = sum(p.numel() for p in params)
    err = [torch.zeros(n) for _ in range(args.world)]
    diag = dict(grad_rel_err=[], update_cos=[], update_rel_err=[], mat_update_cos=[], sign_agree=[])
    trace = []  # (step, ||e_0||/||g_0||, ||mean decoded - exact mean||/||exact mean||, ||g_0||)
    mat_mask = codec.mat_mask if codec else None
    losses = []
    bits = 32.0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        factor = lr_factor(sched, step)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * factor
        local, step_losses = [], []
        for r in range(args.world):
            x, y = train_batch(train_ids, bargs, cfg, r, step, "cpu")
            model.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            loss.backward()
            local.append(torch.cat([p.grad.reshape(-1) for p in params]))
            step_losses.append(loss.item())
        losses.append(sum(step_losses) / len(step_losses))
        exact = torch.stack(local).mean(0)
        if codec is None or step <= spec["warmup"]:
            combined = exact
        else:
            decs = []
            for r in range(args.world):
                xr = local[r] + err[r] if spec["ef"] else local[r]
                dec, n_scales = codec.encode_decode(xr)
                if spec["ef"]:
                    err[r] = (xr - dec) * spec.get("leak", 1.0)
                decs.append(dec)
            combined = torch.stack(decs).mean(0)
            bits = codec.bits_per_element(n_scales)
            if step % 10 == 0:
                trace.append((step, float(err[0].norm() / local[0].norm()),
                              float((combined - exact).norm() / exact.norm()), float(local[0].norm())))
            if step % args.diag_every == 0:
                diag["grad_rel_err"].append(float((combined - exact).norm() / exact.norm()))
                split = lambda v: {id(p): t.view_as(p) for p, t in zip(params, v.split([q.numel() for q in params]))}
                u_c = _update_vector(opt, params, split(combined), fam)
                u_e = _update_vector(opt, params, split(exact), fam)
                diag["update_cos"].append(float(torch.nn.functional.cosine_similarity(u_c, u_e, dim=0)))
                diag["update_rel_err"].append(float((u_c - u_e).norm() / u_e.norm()))
                diag["mat_update_cos"].append(float(torch.nn.functional.cosine_similarity(
                    u_c[mat_mask], u_e[mat_mask], dim=0)))
                diag["sign_agree"].append(float((torch.sign(u_c) == torch.sign(u_e)).float().mean()))
        offs = 0
        for p in params:
            k = p.numel()
            p.grad = combined[offs:offs + k].view_as(p).clone()
            offs += k
        opt.step()
        if not math.isfinite(losses[-1]):
            break
    train_time = time.perf_counter() - t0
    d = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), sum=lambda v: v)
    val = evaluate(model, val_ids, bargs, cfg, d)
    mean = lambda v: sum(v) / len(v) if v else None
    return dict(config=name, **spec, seed=args.seed, world=args.world, steps=args.steps, preset=args.preset,
                batch_size=args.batch_size, final_loss=losses[-1], train_loss_last20=mean(losses[-20:]),
                val_loss=val, bits_per_element=bits, seconds=train_time,
                diag={k: mean(v) for k, v in diag.items()}, trace=trace,
                losses=[(i + 1, l) for i, l in enumerate(losses) if (i + 1) % 10 == 0])


def _key(r):
    return (r["config"], r["seed"], r["world"], r["steps"], r.get("preset", "tiny"), r.get("batch_size", 16))


def load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return dict(results=[])


def save(path, data, new):
    data["results"] = [r for r in data["results"] if _key(r) != _key(new)] + [new]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def table(data, world=None, steps=None) -> str:
    """Markdown: per (world, steps, config), the mean over the seeds present, and the difference
    vs the exact run of the same optimizer on the same seeds."""
    rows = data["results"]
    by = {}
    for r in rows:
        by.setdefault((r["world"], r["steps"], r["config"]), {})[r["seed"]] = r
    lines = []
    for (w, s) in sorted({(k[0], k[1]) for k in by}):
        if (world and w != world) or (steps and s != steps):
            continue
        lines += [f"\nW={w}, {s} steps", "",
                  "| configuration | seeds | val loss | Δ val vs exact (per seed, %) | train loss (last-20 mean) "
                  "| bits/elem compressed step | bits/elem run mean | grad rel. err | update cos | update rel. err |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (w2, s2, name), seeds in sorted(by.items(), key=lambda kv: (kv[0][2].split()[0], kv[0][2] != kv[0][2].split()[0] + " exact", list(CONFIGS).index(kv[0][2]) if kv[0][2] in CONFIGS else 99)):
            if (w2, s2) != (w, s):
                continue
            fam = name.split()[0]
            ex = by.get((w, s, f"{fam} exact"), {})
            common = sorted(seeds)
            val = sum(seeds[k]["val_loss"] for k in common) / len(common)
            tr = sum(seeds[k]["train_loss_last20"] for k in common) / len(common)
            both = [k for k in common if k in ex]
            if both and not name.endswith("exact"):
                dv = [seeds[k]["val_loss"] / ex[k]["val_loss"] - 1 for k in both]
                delta = f"{100 * sum(dv) / len(dv):+.2f}% ({', '.join(f'{100 * x:+.2f}' for x in dv)})"
            else:
                delta = "—"
            dg = [seeds[k]["diag"] for k in common]
            f = lambda key: (f"{sum(x[key] for x in dg) / len(dg):.3f}" if all(x.get(key) is not None for x in dg)
                             else "—")
            r0 = seeds[common[0]]
            b = r0["bits_per_element"]
            k = min(r0["warmup"], s) if r0["codec"] != "exact" else s
            run_bits = (32.0 * k + b * (s - k)) / s
            lines.append(f"| {name} | {','.join(map(str, common))} | {val:.4f} | {delta} | {tr:.4f} | "
                         f"{b:.3f} | {run_bits:.2f} | {f('grad_rel_err')} | {f('update_cos')} "
                         f"| {f('update_rel_err')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["leo exact", "leo 1bit C1024"], choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--diag-every", type=int, default=5, help="diagnostics every this many compressed steps")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "onebit_modes.json"))
    ap.add_argument("--skip-done", action="store_true", help="skip runs already in --out")
    ap.add_argument("--table", action="store_true", help="only print the markdown tables of --out")
    args = ap.parse_args()
    data = load(args.out)
    if args.table:
        print(table(data))
        return
    corpus = load_corpus()
    done = {_key(r) for r in data["results"]}
    for seed in args.seeds:
        for name in args.configs:
            a = argparse.Namespace(**{**vars(args), "seed": seed})
            probe = dict(config=name, seed=seed, world=args.world, steps=args.steps, preset=args.preset,
                         batch_size=args.batch_size)
            if args.skip_done and _key(probe) in done:
                continue
            r = run_one(name, CONFIGS[name], a, corpus)
            save(args.out, data, r)
            dg = r["diag"]
            extra = "" if dg["update_cos"] is None else (
                f"  grad_err {dg['grad_rel_err']:.3f}  upd_cos {dg['update_cos']:.3f}  "
                f"upd_err {dg['update_rel_err']:.3f}  mat_cos {dg['mat_update_cos']:.3f}  sign_agree {dg['sign_agree']:.3f}")
            print(f"W={args.world} seed {seed} {name:26s} val {r['val_loss']:.4f}  train {r['final_loss']:.4f} "
                  f"(last20 {r['train_loss_last20']:.4f})  bits {r['bits_per_element']:.3f}  "
                  f"{r['seconds']:.0f}s{extra}", flush=True)


if __name__ == "__main__":
    main()
