"""Rank, world size and device of this process (from torchrun's environment, or a world of one),
and the few collectives the demo itself needs."""
from __future__ import annotations

import argparse
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


class Dist:
    """Rank, world and device of this process, and the helpers that must agree across ranks."""

    def __init__(self, args: argparse.Namespace):
        env_world = os.environ.get("WORLD_SIZE")
        self.launched = env_world is not None and "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0)) if self.launched else 0
        self.world = int(env_world) if self.launched else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.launched else 0

        want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
        if want_cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise SystemExit(f"error: LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} "
                                 "CUDA devices are visible; lower --nproc-per-node")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.backend = args.backend or ("nccl" if want_cuda else "gloo")
        if self.backend == "nccl" and not want_cuda:
            raise SystemExit("error: --backend nccl needs CUDA devices; use --backend gloo on CPU")

        timeout = datetime.timedelta(seconds=args.dist_timeout)
        kw: dict[str, Any] = dict(backend=self.backend, timeout=timeout)
        if self.backend == "nccl":
            kw["device_id"] = self.device
        if self.launched and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one TCPStore for every attempt of the worker group, and the
            # env:// rendezvous does not separate them: after a restart a rank can read a peer's
            # address from the previous attempt and fail to connect (pytorch/pytorch#135712).
            # One key prefix per attempt keeps each attempt's process group to itself.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world,
                                  is_master=False, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(store=dist.PrefixStore(f"leo_dist/attempt_{attempt}/", store),
                                    rank=self.rank, world_size=self.world, **kw)
        elif self.launched:
            dist.init_process_group(**kw)  # env:// rendezvous set up by torchrun
        elif args.ddp:
            # DDP needs a process group even for one rank; an in-memory store avoids picking a port.
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kw)
        self.initialized = dist.is_initialized()
        if self.initialized and (dist.get_rank() != self.rank or dist.get_world_size() != self.world):
            raise SystemExit("error: RANK/WORLD_SIZE in the environment disagree with the process group")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        """Mean over ranks of a few floats (fp64 so the sum is exact enough to compare runs)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.initialized and self.world > 1:
            dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.initialized and self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        if not (self.initialized and self.world > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self, clean: bool) -> None:
        if self.initialized:
            if clean and self.world > 1:
                # A rank that tears gloo down while a peer is still in its last collective can
                # abort that peer ("terminate called without an active exception"); leave together.
                dist.barrier()
            dist.destroy_process_group()
