"""Batching for ``hevc-vit encode``: items of different token counts grouped into forwards of at most
``max_tokens`` patches.

``first_fit_decreasing`` is the pure rule; ``TokenBudgetPacker`` applies it to a stream of items, a window
at a time, so a long run never holds more than a few forwards' worth of decoded items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")


def first_fit_decreasing(sizes: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group item indices so each group's total size is at most ``max_tokens``.

    Items are placed largest first, each into the first group with room (first-fit decreasing). An item
    larger than ``max_tokens`` gets a group of its own: items are never split. Inside a group the indices
    are in ascending order; groups are in the order they were opened (fullest first, in practice).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}; expected a positive integer")
    for i, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"item {i} has size {size}; expected at least 1 token")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for g, free in enumerate(room):
            if sizes[i] <= free:
                groups[g].append(i)
                room[g] -= sizes[i]
                break
        else:
            groups.append([i])
            room.append(max_tokens - sizes[i])
    return [sorted(group) for group in groups]


class TokenBudgetPacker(Generic[Item]):
    """Streams items into groups of at most ``max_tokens`` tokens.

    Items are buffered until the buffer holds ``window_tokens`` (default: 4 forwards' worth); then the buffer
    is grouped by first-fit decreasing and every group but the emptiest goes out, the emptiest waiting for
    more items. ``flush()`` sends out what is left at the end.
    """

    def __init__(self, max_tokens: int, window_tokens: int | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}; expected a positive integer")
        self.max_tokens = max_tokens
        self.window_tokens = window_tokens if window_tokens is not None else 4 * max_tokens
        self._items: list[tuple[Item, int]] = []
        self._tokens = 0

    def add(self, item: Item, tokens: int) -> list[list[Item]]:
        """Buffer one item of ``tokens`` tokens; returns the groups that are ready (possibly none)."""
        self._items.append((item, tokens))
        self._tokens += tokens
        if self._tokens < self.window_tokens:
            return []
        groups = self._group()
        keep = min(range(len(groups)), key=lambda g: (sum(t for _, t in groups[g]), -g)) if len(groups) > 1 else None
        ready = [group for g, group in enumerate(groups) if g != keep]
        self._items = list(groups[keep]) if keep is not None else []
        self._tokens = sum(t for _, t in self._items)
        return [[item for item, _ in group] for group in ready]

    def flush(self) -> list[list[Item]]:
        """Every buffered item, grouped; the buffer is empty afterwards."""
        groups = self._group() if self._items else []
        self._items, self._tokens = [], 0
        return [[item for item, _ in group] for group in groups]

    def _group(self) -> list[list[tuple[Item, int]]]:
        sizes = [tokens for _, tokens in self._items]
        return [[self._items[i] for i in group] for group in first_fit_decreasing(sizes, self.max_tokens)]
