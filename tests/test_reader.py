"""Stage 2's streaming reader: the same rows as loading the split whole, bounded memory, and a DDP
rank decodes only the row groups that hold its own sequences."""

import numpy as np
import pytest

from conftest import tiny_config
from mol import cache as C
from mol.config import load_config
from mol.reader import StreamingSequences
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
