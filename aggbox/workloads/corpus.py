"""Word-count corpora: a deterministic Zipf text generator, and any text file or folder.

A corpus is a list of files. Mappers read byte-range splits of it (:func:`make_splits`),
aligned to words the way Hadoop aligns input splits to lines: a word belongs to the split
that holds its first byte. Tokens are what ``bytes.split()`` makes (runs of
non-whitespace bytes, ASCII whitespace between them), nothing else: no case folding, no
punctuation stripping, so the reference count is unambiguous.

The generator (like HiBench's random text writer, but with a Zipf law over a synthetic
vocabulary):

- the vocabulary: ``vocab`` distinct lowercase words; lengths are log-normal (median 6.5
  letters, ~1% longer than 16), and the most frequent words are the shortest, as in
  natural language;
- word ranks follow Zipf's law, P(rank k) ~ 1 / k**skew (skew 0: uniform);
- ``words`` tokens, 12 to a line, written to ``files`` files;
- everything is determined by ``seed``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aggbox.errors import AggBoxError

WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() splits on
WORDS_PER_LINE = 12
_READ_AHEAD = 4096


@dataclass(frozen=True)
class ZipfCorpus:
    """Parameters of a generated corpus (all of them: the same parameters, the same bytes)."""

    words: int
    vocab: int = 50_000
    skew: float = 1.0
    seed: int = 1
    files: int = 4

    def __post_init__(self) -> None:
        if self.words < 1 or self.vocab < 1 or self.files < 1:
            raise AggBoxError("a Zipf corpus needs words, vocab and files >= 1")
        if self.skew < 0:
            raise AggBoxError(f"Zipf skew must be >= 0, got {self.skew}")

    @property
    def name(self) -> str:
        return (f"zipf-w{self.words}-v{self.vocab}-s{self.skew:g}-seed{self.seed}"
                f"-f{self.files}")


def vocabulary(size: int, seed: int) -> list[bytes]:
    """``size`` distinct lowercase words, shortest first (rank 1 = shortest)."""
    rng = np.random.default_rng([seed, 0x766F63])
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words: dict[bytes, None] = {}
    while len(words) < size:
        need = size - len(words)
        lengths = np.clip(np.rint(rng.lognormal(np.log(6.5), 0.4, need + 16)), 1, 32)
        for n in lengths.astype(int).tolist():
            words.setdefault(letters[rng.integers(0, 26, n)].tobytes(), None)
    out = list(words)[:size]
    out.sort(key=len)  # stable: equal lengths keep the random order
    return out


def zipf_ids(spec: ZipfCorpus) -> np.ndarray:
    """The corpus as vocabulary indices (0 = the most frequent word)."""
    rng = np.random.default_rng([spec.seed, 0x7A6970])
    ranks = np.arange(1, spec.vocab + 1, dtype=np.float64)
    weights = ranks ** -spec.skew
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ids = np.searchsorted(cdf, rng.random(spec.words), side="right")
    return np.minimum(ids, spec.vocab - 1)


def generate(spec: ZipfCorpus, out_dir: str | Path) -> list[Path]:
    """Write the corpus into ``out_dir`` (created) as ``part-NNNNN.txt`` files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = np.array(vocabulary(spec.vocab, spec.seed), dtype=object)
    ids = zipf_ids(spec)
    bounds = np.linspace(0, spec.words, spec.files + 1).round().astype(int)
    paths = []
    for f in range(spec.files):
        tokens = vocab[ids[bounds[f]:bounds[f + 1]]].tolist()
        seps = [b" "] * (WORDS_PER_LINE - 1) + [b"\n"]
        text = b"".join(itertools.chain.from_iterable(zip(tokens, itertools.cycle(seps),
                                                          strict=False)))
        if text and not text.endswith(b"\n"):
            text += b"\n"
        path = out / f"part-{f:05d}.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def input_files(path: str | Path) -> list[Path]:
    """A file, or every regular file under a folder (sorted, hidden ones skipped)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise AggBoxError(f"corpus {p} is neither a file nor a folder")
    files = sorted(f for f in p.rglob("*")
                   if f.is_file() and not any(part.startswith(".") for part in
                                              f.relative_to(p).parts))
    if not files:
        raise AggBoxError(f"corpus folder {p} holds no files")
    return files


# A split: pieces (path, start, end) of files, in order.
Split = list[tuple[str, int, int]]


def make_splits(files: list[Path], n: int) -> list[Split]:
    """Cut the concatenated files into ``n`` byte ranges of equal size."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    bounds = [round(total * i / n) for i in range(n + 1)]
    splits: list[Split] = []
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        pieces: Split = []
        base = 0
        for f, size in zip(files, sizes, strict=True):
            start, end = max(lo, base), min(hi, base + size)
            if start < end:
                pieces.append((str(f), start - base, end - base))
            base += size
        splits.append(pieces)
    return splits


def read_piece(path: str, start: int, end: int) -> bytes:
    """The bytes of the words whose first byte lies in [start, end) of ``path``."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            prev = f.read(1)
        else:
            prev = b"\n"
        data = bytearray(f.read(end - start))
        # The word running over `end` is ours: read on to its end.
        while data and data[-1:] not in (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c"):
            more = f.read(_READ_AHEAD)
            if not more:
                break
            cut = next((i for i, b in enumerate(more) if b in WHITESPACE), None)
            if cut is not None:
                data += more[:cut]
                break
            data += more
    # The word running into `start` is the previous split's: skip its rest.
    if prev not in (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c"):
        cut = next((i for i, b in enumerate(data) if b in WHITESPACE), len(data))
        del data[:cut]
    return bytes(data)


def read_split(split: Split) -> list[bytes]:
    """A mapper's tokens."""
    tokens: list[bytes] = []
    for path, start, end in split:
        tokens += read_piece(path, start, end).split()
    return tokens


def count_words(files: Iterable[Path]) -> Counter:
    """The reference: collections.Counter over every token of the corpus."""
    counts: Counter = Counter()
    for f in files:
        counts.update(Path(f).read_bytes().split())
    return counts


def digest(counts: Mapping[bytes, int]) -> str:
    """A fingerprint of {key: count}: equal iff the counts are equal."""
    h = hashlib.sha256()
    for k in sorted(counts):
        h.update(len(k).to_bytes(4, "little") + k + int(counts[k]).to_bytes(16, "little",
                                                                            signed=True))
    return h.hexdigest()


def write_counts(counts: Mapping[bytes, int], path: str | Path) -> None:
    """The job's output: ``key<TAB>count`` lines (keys as they are, in map order)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(k + b"\t" + str(v).encode() + b"\n" for k, v in counts.items()))
    os.replace(tmp, path)


def describe(spec: ZipfCorpus | None, files: list[Path]) -> dict:
    return {**(asdict(spec) if spec else {"source": [str(f) for f in files[:5]]}),
            "bytes": sum(f.stat().st_size for f in files), "n_files": len(files)}
