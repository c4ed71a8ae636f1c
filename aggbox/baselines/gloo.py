"""Allreduce with gloo through torch.distributed (CPU): the strongest real library for
this job on this testbed. Ranks are started once and time many calls (start-up costs
seconds: torch import and rendezvous)."""

from __future__ import annotations

import os

import numpy as np

from aggbox.baselines import result_buffer
from aggbox.collectives.group import Group
from aggbox.errors import AggBoxError


class GlooAllreducer:
    def __init__(self, group: Group, port: int, timeout_s: float = 120.0):
        try:
            import torch
            import torch.distributed as dist
        except ImportError as exc:
            raise AggBoxError("the gloo baseline needs torch, the optional aggbox[torch] "
                              "extra: `AGGBOX_TORCH=pypi make setup` installs torch==2.13.0 "
                              "(setup takes PyTorch's CPU index when it answers)") from exc
        from datetime import timedelta

        # Inside a namespace the hostname resolves to 127.0.0.1: name the interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", group.ifname)
        # One intra-op thread: a rank is one busy thread, like every other system's.
        # gloo's own threads (its work queue, the TCP transport's loop) stay: they are
        # threads of this process, on its CPU set, and hand a call's work over rather
        # than run beside it.
        torch.set_num_threads(1)
        self.torch, self.dist = torch, dist
        self.group = group
        master = group.members[0].ip
        dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}",
                                rank=group.rank, world_size=group.size,
                                timeout=timedelta(seconds=timeout_s))

    def allreduce(self, tensor: np.ndarray, op: str = "sum",
                  out: np.ndarray | None = None) -> np.ndarray:
        """The sum (or mean) over the group; ``out`` (float32, C-contiguous, the tensor's
        size) holds it if given, else a new array. all_reduce works in place: it reduces
        ``out`` (or a new copy) holding the tensor's values."""
        if out is None:
            t = self.torch.from_numpy(np.array(tensor, copy=True))
        else:
            np.copyto(result_buffer(out, tensor), np.asarray(tensor).reshape(-1))
            t = self.torch.from_numpy(out)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        result = t.numpy()
        if op == "mean":
            if out is None:
                return result / self.group.size
            result /= self.group.size
        return result

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
