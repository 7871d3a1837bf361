"""The batching rule (:func:`first_fit_decreasing`) and the streaming packer, on their own."""

from __future__ import annotations

import numpy as np
import pytest

from hevc_vit.encode.model.batching import TokenBudgetPacker, first_fit_decreasing


def test_first_fit_decreasing_keeps_the_budget_and_every_item_once():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 120, size=int(rng.integers(1, 40))).tolist()
        groups = first_fit_decreasing(sizes, 100)
        assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
        loads = [sum(sizes[i] for i in g) for g in groups]
        for g, load in zip(groups, loads):
            assert load <= 100 or len(g) == 1
        # first fit: no two groups could have been one (an item went to a later group only if it did not fit)
        small = [load for load in loads if load <= 100]
        assert all(a + b > 100 for i, a in enumerate(small) for b in small[i + 1 :])
    assert first_fit_decreasing([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]  # 60+40, 50+30+20
    with pytest.raises(ValueError, match="max_tokens=0"):
        first_fit_decreasing([1], 0)


def test_streaming_packer_emits_every_item_once_within_the_budget():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 300, size=500).tolist()
    packer = TokenBudgetPacker(256)
    groups = []
    for i, size in enumerate(sizes):
        groups += packer.add(i, size)
    groups += packer.flush()
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(sum(sizes[i] for i in g) <= 256 or len(g) == 1 for g in groups)
    fill = sum(sizes) / (256 * len(groups))
    assert fill > 0.85, f"groups are only {fill:.0%} full on average"


def test_an_item_over_the_budget_gets_a_group_of_its_own_and_sizes_are_checked():
    assert first_fit_decreasing([10, 150, 20], 100) == [[1], [0, 2]]  # never split, never joined
    assert first_fit_decreasing([], 100) == []
    with pytest.raises(ValueError, match="item 1 has size 0"):
        first_fit_decreasing([3, 0], 100)
    with pytest.raises(ValueError, match="max_tokens=-1"):
        TokenBudgetPacker(-1)


def test_the_packer_holds_items_until_its_window_is_full():
    packer = TokenBudgetPacker(10, window_tokens=30)
    assert packer.add("a", 8) == [] and packer.add("b", 8) == [] and packer.add("c", 8) == []  # 24 < 30
    ready = packer.add("d", 8)  # 32 tokens: four groups of one; the emptiest (the last opened) waits
    assert ready == [["a"], ["b"], ["c"]]
    assert packer.flush() == [["d"]]
    assert packer.flush() == []  # nothing is left after a flush
