"""torch.nn.utils.clip_grad_norm_ on a sharded optimizer's parameters: step() raises "use
opt.clip_grad_norm_" (leo_dist.misuse), with no false positive on the usual idioms."""
from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
import leo_dist.hooks
import leo_dist.misuse
from conftest import run_ranks
from dist_util import groups_for, local_grad, make_params
from test_hooks import GradProbe

CASES = ["torch_clip", "none", "opt_clip", "no_sync", "require_sync_flag", "zero_grad_false", "scaler_unscale",
         "scaler_unscale_then_torch_clip", "bucket_view_torch_clip", "bucket_view_scaler", "grad_replaced",
         "allowed"]


def _case(rank, world, use_ddp, case):
    net = GradProbe(make_params())
    bucket_view = case.startswith("bucket_view")
    model = DDP(net, bucket_cap_mb=0.0002, gradient_as_bucket_view=bucket_view) if use_ddp else net
    opt = leo_dist.ShardedLion(groups_for(list(net.ps), "lion"), bucket_mb=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if "scaler" in case else None
    if use_ddp:
        leo_dist.hooks.attach(model, opt, grad_scaler=scaler)
    if case == "allowed":
        leo_dist.misuse.allow_grad_edits(opt)
    outcome = []
    for step in range(3):
        grads = lambda micro: [local_grad(step * 7 + micro, rank, p.shape, True) for p in net.ps]  # noqa: E731
        if case in ("no_sync", "require_sync_flag") and use_ddp:
            for micro in range(3):
                last = micro == 2
                if case == "no_sync":
                    if last:
                        model(grads(micro)).backward()
                    else:
                        with model.no_sync():
                            model(grads(micro)).backward()
                else:
                    model.require_backward_grad_sync = last
                    model(grads(micro)).backward()
        else:
            loss = model(grads(0))
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if case in ("torch_clip", "scaler_unscale_then_torch_clip", "bucket_view_torch_clip", "allowed"):
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        if case == "opt_clip":
            opt.clip_grad_norm_(0.5)
        if case == "grad_replaced":
            for p in net.ps:
                p.grad = p.grad.clone()
        try:
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            outcome.append("ok")
        except RuntimeError as e:
            outcome.append(str(e))
            break
        opt.zero_grad(set_to_none=case != "zero_grad_false")
    return outcome


def _all_cases(rank, world, use_ddp):
    return {case: _case(rank, world, use_ddp, case) for case in CASES
            if use_ddp or case not in DDP_ONLY}


DDP_ONLY = {"no_sync", "require_sync_flag", "bucket_view_torch_clip", "bucket_view_scaler"}
# with the hook any edit (or replacement) of .grad is lost; standalone a replacement is what step reads
RAISES = {True: {"torch_clip", "scaler_unscale_then_torch_clip", "bucket_view_torch_clip", "grad_replaced"},
          False: {"torch_clip", "scaler_unscale_then_torch_clip"}}


@pytest.mark.parametrize("use_ddp", [True, False], ids=["ddp_hook", "standalone"])
def test_grad_edits_detected_and_no_false_positives(use_ddp):
    out = run_ranks(_all_cases, 2, use_ddp)
    for per_rank in out:
        for case, outcome in per_rank.items():
            if case in RAISES[use_ddp]:
                assert len(outcome) == 1 and "use opt.clip_grad_norm_" in outcome[0], (case, outcome)
            else:
                assert outcome == ["ok"] * 3, (case, outcome)
    assert set(out[0]) == set(CASES) - (set() if use_ddp else DDP_ONLY)


def _world_of_one_and_message():
    params = make_params()
    opt = leo_dist.ShardedLion(params)
    (sum((p * p).sum() for p in params)).backward()
    torch.nn.utils.clip_grad_norm_(params, 0.1)  # W=1 standalone: the local gradient is the average
    opt.step()
    return True


def test_world_of_one_standalone_allows_torch_clipping():
    assert _world_of_one_and_message()
