"""Stage 2's streaming reader: the same rows as loading the split whole, bounded memory, and a DDP
rank decodes only the row groups that hold its own sequences."""

import collections
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from mol import cache as C
from mol.config import load_config
from mol.cache import read as cache_read
from mol.cache.stream import StreamingSequences
from mol.teacher import run_teacher_pass
from mol.train import DataPlan


@pytest.fixture
def one_row_groups(tiny_model_dir, corpora, tmp_path):
    """A cache whose row groups hold one sequence each (row_group_tokens = max_seq_len)."""
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "c", teacher={"row_group_tokens": 48}))
    cache_dir, _ = run_teacher_pass(cfg)
    return C.TeacherCache(cache_dir)


def _same_row(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, v in a.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, b[key]), key
        else:
            assert v == b[key], key


@pytest.mark.parametrize("split,corpus", [("train", "domain"), ("train", "general"), ("val", None)])
def test_streamed_rows_equal_the_loaded_split(one_row_groups, split, corpus):
    cache = one_row_groups
    whole = cache.load(split, corpus)
    tiny_budget = StreamingSequences(cache, split, corpus, max_cache_bytes=1)  # evicts all but the newest
    assert len(tiny_budget) == len(whole)
    assert list(tiny_budget.subset) == list(whole.subset) and list(tiny_budget.corpus) == list(whole.corpus)
    assert np.array_equal(tiny_budget.has_teacher, whole.has_teacher)
    for i in list(range(len(whole))) + [3, 0, len(whole) - 1]:  # in order, then back again
        _same_row(tiny_budget.row(i), whole.row(i))
    assert len(tiny_budget._cache) == 1
    tiny_budget.close()


def test_a_rank_decodes_only_its_own_sequences(one_row_groups):
    """Two ranks split every step's global batch as the trainer does; each decodes exactly the row
    groups of the sequences it trains on, none of the other rank's."""
    cache = one_row_groups
    global_batch, world, steps = 4, 2, 5
    readers = {r: {c: StreamingSequences(cache, "train", c) for c in ("domain", "general")} for r in range(world)}
    plan = DataPlan(np.arange(len(readers[0]["domain"])), np.arange(len(readers[0]["general"])), 1.0, seed=0)
    mine = {r: set() for r in range(world)}
    for step in range(steps):
        items = plan.step_items(step, global_batch)
        for r in range(world):
            part = items[r * global_batch // world:(r + 1) * global_batch // world]
            readers[r]["domain"].prefetch([i for c, i in part if c == "domain"])
            for c, i in part:
                readers[r][c].row(i)
                mine[r].add((c, i))
    for r in range(world):
        # one sequence a row group: it decoded as many groups as it trained on distinct sequences,
        # so none beyond its own (the prefetch of domain rows included)
        assert sum(x.decoded_groups for x in readers[r].values()) == len(mine[r])
        for x in readers[r].values():
            x.close()


def test_a_shard_is_hashed_once_when_first_read_and_a_mismatch_stops_its_rows(one_row_groups, monkeypatch):
    """Stage 2 opens a cache without hashing it; each shard is hashed when a reader first needs it,
    once for every reader over the cache, and a shard whose bytes are not its manifest's yields no
    row (was: every shard hashed before the first step, ~1 s a GB)."""
    cache = one_row_groups
    hashed = []
    real = C.sha256_path
    monkeypatch.setattr(cache_read, "sha256_path", lambda p: hashed.append(p.name) or real(p))
    unit = cache.units[0]
    bad = unit.path / unit.shards[1]["file"]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    train = StreamingSequences(cache, "train", "domain")
    val = StreamingSequences(cache, "val", "domain")
    assert hashed == []  # opening reads manifests, not shards
    in_bad = [i for i in range(len(train)) if train.groups[train._gid[i]][0] == str(bad)]
    fine = [i for i in range(len(train)) if train.groups[train._gid[i]][0] != str(bad)]
    assert in_bad and fine
    for i in fine:
        train.row(i)
    for i in range(len(val)):
        try:
            val.row(i)
        except C.CacheError:
            pass
    assert sorted(hashed) == sorted(set(hashed)), "a shard hashed twice"
    assert set(hashed) <= {s["file"] for s in unit.shards}
    train.prefetch(in_bad)
    with pytest.raises(C.CacheError, match=f"{bad.name}: sha256 mismatch"):
        train.row(in_bad[0])
    with pytest.raises(C.CacheError, match=f"{bad.name}: sha256 mismatch"):
        train.row(in_bad[-1])
    train.close()
    val.close()


def test_the_reader_refuses_values_out_of_contract(one_row_groups):
    """Zero probability codes and an input id past the vocabulary, in a shard whose manifest vouches
    for its sha256: the row that holds them is never handed out, and the error names the shard and
    the row (was: decoded and trained on, KL 26.9; or an IndexError mid-run)."""
    from faults_kit import rewrite_shard, vouch_for

    unit = one_row_groups.units[1]  # general: labelled
    shard = unit.path / unit.shards[0]["file"]

    def edit(d):
        d.topk_probs[d.tok_off[1] - 1:] = 0  # every position of row 1 on
        d.input_ids[d.tok_off[2] + 3] = 50000
    rewrite_shard(shard, edit)
    vouch_for(shard)
    cache = C.TeacherCache(one_row_groups.path)
    seqs = StreamingSequences(cache, "train", "general")
    # shard row -> sequence index (one row a row group: the row group's number is the row's)
    where = {seqs.groups[seqs._gid[i]][1]: i for i in range(len(seqs)) if seqs.groups[seqs._gid[i]][0] == str(shard)}
    if 0 in where:
        seqs.row(where[0])  # row 0 is untouched
    for row, text in ((1, "row 1 position 0: probability codes"), (2, "row 2: input id 50000 at token 3")):
        if row in where:
            with pytest.raises(C.CacheError, match=f"{shard.name}: {text}"):
                seqs.row(where[row])
    assert {1, 2} & set(where)
    seqs.close()


def test_the_prefetch_thread_and_the_trainer_take_turns_on_a_shard(one_row_groups, monkeypatch):
    """The trainer reads a row group while the prefetch thread decodes others of the same shard. One
    ParquetFile read from two threads at once fails in pyarrow 26 (ArrowInvalid "ReadRangeCache did not
    find matching cache entry", at times a segfault: a forget-ce run died of it on 2026-12-07), so reads
    of one shard must never overlap. A spy widens each read by a few ms and records the overlap."""
    cache = one_row_groups
    whole = cache.load("train", "domain")
    n = len(whole)
    active, worst, guard = collections.Counter(), [0], threading.Lock()
    read = pq.ParquetFile.read_row_group

    def spy(self, *a, **k):
        with guard:
            active[id(self)] += 1
            worst[0] = max(worst[0], active[id(self)])
        time.sleep(0.003)
        try:
            return read(self, *a, **k)
        finally:
            with guard:
                active[id(self)] -= 1

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    for rnd in range(3):
        reader = StreamingSequences(cache, "train", "domain", max_cache_bytes=1)
        order = np.random.default_rng(rnd).permutation(n)
        reader.prefetch(order[n // 2:])  # the pool decodes these while the caller reads the others
        for i in [*order[:n // 2], *order[n // 2:]]:
            _same_row(reader.row(int(i)), whole.row(int(i)))
        reader.close()
    assert worst[0] == 1
