"""Reduce-by-key and the word-count workload without a kernel: corpus, splits, wire
payloads, the TCP shuffle's frames, the result mapping, and how runs are summarized."""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
import pytest

from aggbox.baselines import tcp_shuffle
from aggbox.bench import mapreduce_ratios, summarize_mapreduce
from aggbox.collectives import reduce as kv
from aggbox.collectives.group import Group, Member
from aggbox.protocol import HEADER, HEADER_SIZE, KV_PAIR_SIZE, Flags, MsgType
from aggbox.workloads import corpus
from aggbox.workloads.mapreduce import join_records, make_schedule

# ----------------------------------------------------------------- corpus ---------------


def test_zipf_corpus_is_deterministic_and_follows_its_parameters(tmp_path):
    spec = corpus.ZipfCorpus(words=20_000, vocab=500, skew=1.2, seed=7, files=3)
    a = corpus.generate(spec, tmp_path / "a")
    b = corpus.generate(spec, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    counts = corpus.count_words(a)
    assert sum(counts.values()) == 20_000 and len(a) == 3
    assert len(counts) <= 500
    # Zipf: the most frequent word is about 2**1.2 times as frequent as the second.
    (_, first), (_, second) = counts.most_common(2)
    assert 1.6 < first / second < 3.0
    other = corpus.count_words(corpus.generate(corpus.ZipfCorpus(20_000, 500, 1.2, seed=8),
                                               tmp_path / "c"))
    assert other != counts


def test_vocabulary_is_distinct_and_shortest_words_are_most_frequent():
    words = corpus.vocabulary(5000, seed=3)
    assert len(set(words)) == 5000
    lengths = [len(w) for w in words]
    assert lengths == sorted(lengths)
    assert any(n > kv.KEY_WIDTH for n in lengths)  # some keys need the long path


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_splits_give_every_token_to_exactly_one_mapper(tmp_path, n):
    (tmp_path / "x.txt").write_bytes(b"alpha beta  gamma\ndelta\tepsilon " * 50 + b"zeta")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.txt").write_bytes(b"  a-very-long-token-that-straddles splits   ")
    (tmp_path / ".hidden").write_bytes(b"never counted")
    files = corpus.input_files(tmp_path)
    assert [f.name for f in files] == ["y.txt", "x.txt"]
    splits = corpus.make_splits(files, n)
    tokens = [t for s in splits for t in corpus.read_split(s)]
    assert Counter(tokens) == corpus.count_words(files)


def test_a_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(corpus.AggBoxError, match="neither a file nor a folder"):
        corpus.input_files(tmp_path / "nope")


def test_digest_tells_counts_apart_and_ignores_order():
    a = {b"x": 1, b"y": 2}
    assert corpus.digest(a) == corpus.digest({b"y": 2, b"x": 1})
    assert corpus.digest(a) != corpus.digest({b"x": 1, b"y": 3})
    assert corpus.digest(a) != corpus.digest({b"x": 1, b"y": 2, b"z": 0})


# ----------------------------------------------------------------- wire payloads --------


def group(rank: int = 1, **options) -> Group:
    members = tuple(Member(i, f"10.0.0.{i + 1}") for i in range(3))
    return Group(job_id=5, token=99, members=members, rank=rank, port=49000, options=options)


def decode(packets: list[bytes]) -> Counter:
    out: Counter = Counter()
    for seq, pkt in enumerate(packets, start=1):
        fields = HEADER.unpack_from(pkt)
        assert fields[2] == MsgType.KV and fields[6] == seq
        flags, count = fields[3], fields[9]
        body = memoryview(pkt)[HEADER_SIZE:]
        if flags & Flags.KV_LONG:
            keys, values = kv.decode_long(body, count)
        else:
            assert len(body) == count * KV_PAIR_SIZE
            keys, values = kv.decode_fixed(body, count)
        for k, v in zip(keys, values, strict=True):
            out[k] += v
    return out


def test_packets_carry_every_pair_and_long_keys_go_in_long_packets():
    keys = [b"w%d" % (i % 97) for i in range(1000)] + [b"x" * 16, b"y" * 17, b"a\0b", b""]
    values = np.arange(len(keys), dtype=np.int64) - 3
    packets = kv.build_packets(group(), keys, values)
    assert all(len(p) <= 1500 - 28 for p in packets)
    expected: Counter = Counter()
    for k, v in zip(keys, values.tolist(), strict=True):
        expected[k] += v
    assert decode(packets) == expected
    long_packets = [p for p in packets if HEADER.unpack_from(p)[3] & Flags.KV_LONG]
    assert len(long_packets) == 1 and HEADER.unpack_from(long_packets[0])[9] == 2


def test_sixty_pairs_fill_a_packet_at_mtu_1500():
    assert kv.pairs_per_packet(1500) == 60
    assert kv.pairs_per_packet(9000) == 64  # one spill bit per pair: at most 64


def test_a_key_too_long_for_any_packet_is_refused_clearly():
    with pytest.raises(kv.AggBoxError, match="does not fit in one packet"):
        kv.build_packets(group(), [b"k" * 2000], np.ones(1, dtype=np.int64))


def test_which_keys_the_kernel_can_hold():
    assert kv.fits_kernel(b"") and kv.fits_kernel(b"x" * 16)
    assert not kv.fits_kernel(b"x" * 17) and not kv.fits_kernel(b"a\0")


def test_reducer_of_is_stable_and_spreads_keys():
    keys = [b"key%d" % i for i in range(10_000)]
    owners = Counter(kv.reducer_of(k, 4) for k in keys)
    assert set(owners) == {0, 1, 2, 3} and min(owners.values()) > 2000
    assert kv.reducer_of(b"abc", 4) == kv.reducer_of(b"abc", 4) and kv.reducer_of(b"x", 1) == 0


def test_pairs_combine_sums_per_key():
    assert kv.Pairs([b"a", b"b", b"a"]).combined() == {b"a": 2, b"b": 1}
    p = kv.Pairs.of([(b"a", 5), (b"b", -1), (b"a", 2)])
    assert p.combined() == {b"a": 7, b"b": -1}
    assert kv.Pairs.of({b"k": 3}).combined() == {b"k": 3}


def test_key_counts_reads_like_a_dict_and_merges_user_space_pairs():
    directory = {b"a": 0, b"b": 2}
    values = np.array([5, 0, 7], dtype=np.int64)  # entry 1: given up by the kernel
    counts = kv.KeyCounts(directory, values, {b"b": 1, b"long-key-spilled-here": 4})
    assert counts == {b"a": 5, b"b": 8, b"long-key-spilled-here": 4}
    assert len(counts) == 3 and b"a" in counts and b"zz" not in counts
    assert counts.to_dict() == dict(counts.items())
    with pytest.raises(KeyError):
        counts[b"zz"]


def test_window_larger_than_the_dedup_ring_is_refused():
    with pytest.raises(kv.AggBoxError, match="window must be"):
        kv.ReduceByKey(group(), window=kv.RING + 1)


# ----------------------------------------------------------------- TCP frames -----------


@pytest.mark.parametrize("keys,values", [
    ([b"a", b"bb", b"a"], None),
    ([b"a", b"bb", b"a"], np.array([1, -2, 3])),
    ([b"new\nline", b"x", b""], np.array([4, 5, 6])),
    ([b""], None),
])
def test_tcp_frames_round_trip(keys, values):
    shuffle = tcp_shuffle.TcpShuffle.__new__(tcp_shuffle.TcpShuffle)
    shuffle.counts = Counter()
    buf = bytearray(tcp_shuffle.encode_frame(keys, values) + struct.pack("<BII", 5, 0, 0))
    assert shuffle._take_frames(buf) and buf == bytearray()
    expected: Counter = Counter()
    for k, v in zip(keys, [1] * len(keys) if values is None else values.tolist(), strict=True):
        expected[k] += v
    assert shuffle.counts == expected


def test_tcp_frames_wait_for_the_rest_of_a_frame():
    shuffle = tcp_shuffle.TcpShuffle.__new__(tcp_shuffle.TcpShuffle)
    shuffle.counts = Counter()
    frame = tcp_shuffle.encode_frame([b"k"] * 10, None)
    buf = bytearray(frame[:7])
    assert not shuffle._take_frames(buf) and len(buf) == 7
    buf += frame[7:]
    assert not shuffle._take_frames(buf) and shuffle.counts == {b"k": 10}


# ----------------------------------------------------------------- runs -----------------


def test_schedule_interleaves_every_system_once_per_repetition():
    sched = make_schedule(["a", "b", "c"], 4, seed=2)
    assert len(sched) == 12
    for rep in range(4):
        assert sorted(s for s, r in sched if r == rep) == ["a", "b", "c"]
    assert make_schedule(["a", "b", "c"], 4, seed=2) == sched


def _job(system, rep, rank, mapper, t0, last_send, final, digest="d0", cpu=0.1):
    rec = {"kind": "job", "system": system, "rep": rep, "job": rep, "rank": rank,
           "mapper": mapper, "reducer": not mapper, "t_start": t0, "t_read": t0 + 0.01,
           "t_final": final, "cpu_s": cpu,
           "stats": {"t_last_send": last_send, "pairs_sent": 10, "packets": 2}}
    if not mapper:
        rec.update(t_written=final + 0.005, digest=digest, n_keys=3)
    return rec


def test_join_records_measures_from_the_last_byte_sent_and_checks_digests():
    records = [
        _job("aggbox", 0, 0, False, 1.0, 0, 2.0),  # warm-up: dropped
        _job("aggbox", 1, 1, True, 10.0, 10.5, 0), _job("aggbox", 1, 2, True, 10.1, 10.6, 0),
        _job("aggbox", 1, 0, False, 10.0, 0, 10.61, cpu=0.02),
        _job("tcp", 1, 1, True, 20.0, 20.2, 0), _job("tcp", 1, 0, False, 20.0, 0, 20.5,
                                                     digest="wrong"),
    ]
    samples = join_records(records, {0: "d0"}, words=1000, warmup=1)
    by = {s["system"]: s for s in samples}
    assert by["aggbox"]["reduce_s"] == pytest.approx(0.01)
    assert by["aggbox"]["job_s"] == pytest.approx(0.615)
    assert by["aggbox"]["reducer_cpu_s"] == 0.02 and by["aggbox"]["exact"]
    assert by["tcp"]["reduce_s"] == pytest.approx(0.3) and not by["tcp"]["exact"]
    per = summarize_mapreduce(samples, ["aggbox", "tcp"])
    assert per["aggbox"]["n"] == 1 and per["tcp"]["exact"] is False
    assert mapreduce_ratios(per)["reduce_s tcp/aggbox"] == pytest.approx(30.0, rel=1e-3)
