"""Word count: every rank maps its share of the lines, the reducers' kernels sum.

  every host:  sudo .venv/bin/python examples/wordcount.py --rank R --world W \
                   --rendezvous tcp://RANK0_IP:29400 [--text FILE] [--out PATH.json]

Rank R counts lines R, R+W, R+2W, ... of the text (default: a generated one), and
reduce_by_key sums the (word, count) pairs per word in the kernel of the word's reducer
(every rank reduces a share of the words). Each rank checks its share against
collections.Counter over the whole text and prints its most frequent words.
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import aggbox
from aggbox.collectives.reduce import reducer_of

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--world", type=int, required=True)
parser.add_argument("--rendezvous", required=True, help="tcp://RANK0_IP:PORT")
parser.add_argument("--iface", help="default: the interface that routes to rank 0")
parser.add_argument("--text", help="a text file every host can read (default: generated)")
parser.add_argument("--lines", type=int, default=5000, help="lines of the generated text")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--out", help="write this rank's counts here (.json)")
args = parser.parse_args()

if args.text:
    lines = Path(args.text).read_text().splitlines()
else:  # a skewed vocabulary, as in natural text: a few words are most of the count
    rng = random.Random(args.seed)
    vocab = [f"w{i}" for i in range(3000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    lines = [" ".join(rng.choices(vocab, weights, k=12)) for _ in range(args.lines)]

with aggbox.init(args.rank, args.world, args.rendezvous, iface=args.iface,
                 operations=["reduce_by_key"]) as ctx:
    mine = Counter(w.encode() for line in lines[ctx.rank::ctx.world] for w in line.split())
    # every rank calls it; each gets {word: count} for the words it reduces
    counts = ctx.reduce_by_key(mine).to_dict()

everything = Counter(w.encode() for line in lines for w in line.split())
expected = {w: c for w, c in everything.items() if reducer_of(w, args.world) == args.rank}
ok = counts == expected
top = ", ".join(f"{w.decode()} {c}" for w, c in Counter(counts).most_common(3))
print(f"rank {args.rank}: {len(counts)} distinct words, {sum(counts.values())} in all; "
      f"top: {top}; {'ok' if ok else 'MISMATCH'}", flush=True)
if args.out:
    Path(args.out).write_text(json.dumps({w.decode(): c for w, c in counts.items()}))
sys.exit(0 if ok else 1)
