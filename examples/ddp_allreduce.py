"""DDP on two hosts with AggBox averaging the gradients in the aggregator's kernel.

  aggregator host:  python -m aggbox.torch aggregator --master HOST0:29500 --ifname eth0
  host 0 and 1:     python examples/ddp_allreduce.py HOST0:29500 RANK AGGREGATOR_IP
"""
import os
import sys

import torch
import torch.distributed as dist

from aggbox.torch import AggBoxState, allreduce_hook, interface_to

master, rank, aggregator = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# gloo binds to the host name's address unless told: use the interface to the aggregator
os.environ.setdefault("GLOO_SOCKET_IFNAME", interface_to(aggregator)[0])
dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=2)
state = AggBoxState.from_process_group(None, aggregator=aggregator)  # job, token, members

torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts them)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
ddp = torch.nn.parallel.DistributedDataParallel(model)
ddp.register_comm_hook(state, allreduce_hook)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
target = torch.randn(20, 1, generator=torch.Generator().manual_seed(42))
data = torch.Generator().manual_seed(rank)  # each rank its own samples
for _ in range(200):
    x = torch.randn(32, 20, generator=data)
    loss = torch.nn.functional.mse_loss(ddp(x), x @ target)
    opt.zero_grad()
    loss.backward()  # each gradient bucket: averaged over both ranks by the kernel
    opt.step()
print(f"rank {rank}: loss {loss.item():.4f}, last bucket's error bound "
      f"{state.last_error_bound_max:.1e}", flush=True)
state.close()
dist.destroy_process_group()
