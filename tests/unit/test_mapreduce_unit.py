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
    assert len(kv.Pairs.of([])) == 0 and kv.Pairs.of([]).combined() == {}
    c = kv.Pairs([b"b", b"a", b"b"]).combine()  # first-seen order, int64 values
    assert c.keys == [b"b", b"a"] and c.values.dtype == np.int64 and c.values.tolist() == [2, 1]


def test_combiner_is_exact_against_counter_on_a_zipf_split(tmp_path):
    files = corpus.generate(corpus.ZipfCorpus(words=30_000, vocab=3000, seed=2),
                            tmp_path / "z")
    tokens = corpus.read_split(corpus.make_splits(files, 1)[0])
    c = kv.Pairs(tokens).combine()
    assert dict(zip(c.keys, c.values.tolist(), strict=True)) == Counter(tokens)
    values = np.arange(len(tokens), dtype=np.int64) - 7  # any int64 values: KeySums
    expected: Counter = Counter()
    for k, v in zip(tokens, values.tolist(), strict=True):
        expected[k] += v
    assert kv.Pairs(tokens, values).combined() == expected


def test_key_sums_merge_batches_exactly_and_grow():
    sums = kv.KeySums()
    expected: Counter = Counter()
    rng = np.random.default_rng(1)
    for batch in range(6):
        keys = [b"k%d" % i for i in rng.integers(0, 3000, 2000)]  # repeats within a batch
        values = rng.integers(-2**40, 2**40, len(keys))
        sums.add(keys, values if batch % 2 else None)
        for k, v in zip(keys, values.tolist() if batch % 2 else [1] * len(keys), strict=True):
            expected[k] += v
    assert sums.to_dict() == expected and len(sums) == len(expected)
    sums.add([])
    sums.add_mapping({b"k1": 5, b"new": 2})
    expected.update({b"k1": 5, b"new": 2})
    assert sums.to_dict() == expected
    assert list(sums.index)[-1] == b"new"  # ids are dense, in first-seen order


@pytest.mark.parametrize("n_red", [1, 2, 3])
def test_partition_gives_each_pair_to_its_reducer_in_order(n_red):
    keys = [b"key%d" % (i % 50) for i in range(400)]
    values = np.arange(400, dtype=np.int64)
    reducers = [10 + r for r in range(n_red)]
    parts = kv.partition(keys, values, reducers)
    assert sorted(parts) == reducers
    for rank, (k, v) in parts.items():
        sel = [i for i, key in enumerate(keys) if kv.reducer_of(key, n_red) == rank - 10]
        assert k == [keys[i] for i in sel] and v.tolist() == sel
    assert sum(len(k) for k, _ in kv.partition(keys, None, reducers).values()) == 400


def test_bit_mask_reads_bit_i_as_pair_i():
    assert kv.bit_mask(0b1011, 5).tolist() == [True, True, False, True, False]
    assert kv.bit_mask(1 << 63, 64).tolist() == [False] * 63 + [True]
    assert kv.bit_mask(0, 0).tolist() == []


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
    shuffle._reset_counts()
    buf = bytearray(tcp_shuffle.encode_frame(keys, values) + struct.pack("<BII", 5, 0, 0))
    assert shuffle._take_frames(buf) and buf == bytearray()
    expected: Counter = Counter()
    for k, v in zip(keys, [1] * len(keys) if values is None else values.tolist(), strict=True):
        expected[k] += v
    assert shuffle.merged() == expected


def test_tcp_frames_wait_for_the_rest_of_a_frame():
    shuffle = tcp_shuffle.TcpShuffle.__new__(tcp_shuffle.TcpShuffle)
    shuffle._reset_counts()
    frame = tcp_shuffle.encode_frame([b"k"] * 10, None)
    buf = bytearray(frame[:7])
    assert not shuffle._take_frames(buf) and len(buf) == 7
    buf += frame[7:]
    assert not shuffle._take_frames(buf) and shuffle.merged() == {b"k": 10}


def test_tcp_reducer_merges_unit_and_valued_frames_of_many_mappers_exactly():
    rng = np.random.default_rng(3)
    vocab = [b"w%d" % i for i in range(500)] + [b"x" * 40]
    shuffle = tcp_shuffle.TcpShuffle.__new__(tcp_shuffle.TcpShuffle)
    shuffle._reset_counts()
    expected: Counter = Counter()
    buf = bytearray()
    for mapper in range(4):
        tokens = [vocab[i] for i in rng.integers(0, len(vocab), 3000)]
        expected.update(tokens)
        if mapper % 2:  # a combiner's frame: distinct keys with their counts
            c = kv.Pairs(tokens).combine()
            buf += tcp_shuffle.encode_frame(c.keys, c.values)
        else:
            buf += tcp_shuffle.encode_frame(tokens, None)
    buf += struct.pack("<BII", 5, 0, 0)
    assert shuffle._take_frames(buf)
    assert shuffle.merged() == expected


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
    cpu = {"aggbox": {"cpu_us_per_op": 5.0, "overcommitted": True},
           "tcp": {"cpu_us_per_op": 7000.0, "overcommitted": True}}
    samples = join_records(records, {0: "d0"}, words=1000, warmup=1, cpu=cpu)
    by = {s["system"]: s for s in samples}
    assert by["aggbox"]["after_last_send_s"] == pytest.approx(0.01)
    assert by["aggbox"]["job_s"] == pytest.approx(0.615)
    assert by["aggbox"]["reducer_cpu_s"] == 0.02 and by["aggbox"]["exact"]
    assert by["tcp"]["after_last_send_s"] == pytest.approx(0.3) and not by["tcp"]["exact"]
    assert by["tcp"]["cpu_us_per_op"] == 7000.0 and by["aggbox"]["overcommitted"] is True
    assert "reduce_s" not in by["aggbox"]
    per = summarize_mapreduce(samples, ["aggbox", "tcp"])
    assert per["aggbox"]["n"] == 1 and per["tcp"]["exact"] is False
    assert per["tcp"]["cpu_ms_per_job"] == pytest.approx(7.0)


def _sample(system, i, job_s, after, cpu_us):
    return {"system": system, "iter": i, "job_s": job_s, "after_last_send_s": after,
            "reducer_cpu_s": 0.01, "pairs_per_s": 1e6, "exact": True, "map_s": 0.1,
            "done_wait_s": 0.0, "reducer_read_s": 0.0, "read_input_s": 0.01,
            "shuffled_pairs": 10, "packets": 1, "retransmits": 0, "spilled_pairs": 0,
            "keys": 3, "cpu_us_per_op": cpu_us, "mappers_cpu_us_per_op": cpu_us / 2,
            "reducers_cpu_us_per_op": cpu_us / 4, "promise": "app", "procs_per_cpu": 2.5,
            "overcommitted": True, "cpu_source": "cpuidle"}


def test_mapreduce_ratios_pair_like_with_like_and_carry_cis():
    samples = []
    for i in range(5):
        samples += [_sample("aggbox", i, 0.20 + 0.01 * i, 0.001, 300e3),
                    _sample("tcp_combiner", i, 0.40 + 0.01 * i, 0.030, 450e3),
                    _sample("aggbox_nocombiner", i, 0.50 + 0.01 * i, 0.001, 600e3),
                    _sample("tcp", i, 0.30 + 0.01 * i, 0.200, 500e3)]
    systems = ["aggbox", "aggbox_nocombiner", "tcp", "tcp_combiner"]
    per = summarize_mapreduce(samples, systems)
    assert per["aggbox"]["job_s"] == pytest.approx(0.22)
    low, high = per["aggbox"]["job_s_p50_ci"]
    assert 0.20 <= low <= 0.22 <= high <= 0.24
    assert per["aggbox"]["promise"] == "app" and per["aggbox"]["overcommitted"] is True
    assert per["tcp"]["cpu_ms_per_job"] == pytest.approx(500.0)
    ratios = mapreduce_ratios(samples, per)
    # Only like for like: the same combiner choice on both sides.
    assert set(ratios) == {"job_s tcp_combiner/aggbox", "job_s tcp/aggbox_nocombiner",
                           "after_last_send_s tcp_combiner/aggbox",
                           "after_last_send_s tcp/aggbox_nocombiner",
                           "cpu per job tcp_combiner/aggbox", "cpu per job tcp/aggbox_nocombiner"}
    head = ratios["job_s tcp_combiner/aggbox"]
    assert head["headline"] and head["pair"] == "both with combiner"
    assert head["ratio"] == pytest.approx(0.42 / 0.22, rel=1e-3)
    assert head["ci95"][0] <= head["ratio"] <= head["ci95"][1]
    assert ratios["job_s tcp/aggbox_nocombiner"]["ratio"] == pytest.approx(0.32 / 0.52,
                                                                           rel=1e-3)
    assert not ratios["after_last_send_s tcp_combiner/aggbox"]["headline"]
    assert ratios["cpu per job tcp/aggbox_nocombiner"]["ratio"] == pytest.approx(500 / 600,
                                                                                 rel=1e-3)
