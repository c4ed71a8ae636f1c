"""Sum float32 vectors over the workers in the aggregator's kernel, and check the sum.

  every host:  sudo .venv/bin/python examples/allreduce.py --rank R --world W \
                   --rendezvous tcp://RANK0_IP:29400 [--floats N] [--out PATH.npz]

Rank 0 is the aggregator (its kernel sums, it holds no data); ranks 1..W-1 are the
workers. Each worker's vector comes from a seed and its rank, so every worker can compute
the exact float64 sum and check the kernel's against the error bound AggBox reports
(floats are quantized to int32 on the way); int32 vectors are summed exactly.
"""
import argparse
import sys

import numpy as np

import aggbox

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--world", type=int, required=True)
parser.add_argument("--rendezvous", required=True, help="tcp://RANK0_IP:PORT")
parser.add_argument("--iface", help="default: the interface that routes to rank 0")
parser.add_argument("--floats", type=int, default=100_000)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--out", help="write total, bound and int_total here (.npz)")
args = parser.parse_args()


def values(rank: int) -> np.ndarray:
    """Worker ``rank``'s vector: the same on every host that computes it."""
    return np.random.default_rng([args.seed, rank]).standard_normal(args.floats,
                                                                    dtype=np.float32)


ok = True
with aggbox.init(args.rank, args.world, args.rendezvous, aggregator_rank=0,
                 iface=args.iface, operations=["allreduce"]) as ctx:
    if ctx.is_aggregator:
        # Nothing to call: bpf/aggregate.c is attached here until every worker closed.
        print(f"rank {ctx.rank}: aggregator for workers {list(ctx.workers)}", flush=True)
    else:
        total = ctx.allreduce(values(ctx.rank))  # float32 in, float32 sum out
        bound = ctx.error_bound(total)  # per element, |total - exact| <= bound
        exact = np.sum([values(r).astype(np.float64) for r in ctx.workers], axis=0)
        err = np.abs(total - exact)
        ints = ctx.allreduce(np.arange(1000, dtype=np.int32) * (ctx.rank + 1))  # exact
        int_ok = np.array_equal(ints, np.arange(1000) * sum(r + 1 for r in ctx.workers))
        ok = bool((err <= bound).all()) and int_ok
        print(f"rank {ctx.rank}: {total.size} floats summed over {len(ctx.workers)} "
              f"workers, max error {err.max():.2e} (bound {bound.max():.2e}), int32 "
              f"{'exact' if int_ok else 'WRONG'}: {'ok' if ok else 'MISMATCH'}", flush=True)
        if args.out:
            np.savez(args.out, total=total, bound=bound, int_total=ints)
sys.exit(0 if ok else 1)
