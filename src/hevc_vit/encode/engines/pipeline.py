"""What the local and the Ray engine share: the options the loaders get, items packed and encoded group by
group, the listing of a run's share of the inputs, and the tally of what a run did (with its progress bar).

The engines (:mod:`.local`, :mod:`.ray`) import this module, never each other; :mod:`hevc_vit.encode.api`
chooses between them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from hevc_vit.codec.config import CodecSparseConfig
from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.model.batching import TokenBudgetPacker
from hevc_vit.encode.model.forward import EncodedItem, GroupEncoder
from hevc_vit.encode.model.loader import Encoder
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.folder import RunPlan
from hevc_vit.encode.readers.expand import SourceOptions
from hevc_vit.encode.readers.memory import MemorySource
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.units import Share, list_share


class Tally:
    """A run's counts (inputs encoded and failed, patches encoded) and its progress bar."""

    def __init__(self, total: int, show: bool, desc: str):
        self.encoded = self.failed = self.tokens = self.loaded = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="item", disable=not show, file=sys.stderr, dynamic_ncols=True)

    def add(self, encoded: int, failed: int, tokens: int) -> None:
        self.encoded += encoded
        self.failed += failed
        self.tokens += tokens
        self.bar.update(encoded + failed)
        self._postfix()

    def item_loaded(self) -> None:
        """An item was decoded and prepared; it counts as done once its features are written (or it failed)."""
        self.loaded += 1
        self._postfix(refresh=True)

    def _postfix(self, refresh: bool = False) -> None:
        secs = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.loaded} loaded, {self.tokens / secs:,.0f} tokens/s", refresh=refresh)

    def counts(self) -> tuple[int, int, int]:
        return self.encoded, self.failed, self.tokens

    def close(self) -> None:
        self.bar.close()


def shows_progress(options: EncodeOptions) -> bool:
    """Whether a run shows its progress bar: ``options.progress``, else when stderr is a terminal."""
    return sys.stderr.isatty() if options.progress is None else options.progress


def load_options(options: EncodeOptions, encoder: Encoder, memory: list, keys: list[str]) -> LoadOptions:
    """How the loaders (local worker processes, or Ray's decode stage) read and prepare the inputs of a run:
    ``memory`` holds its in-memory inputs, ``keys`` the shard keys of the items in the order they are loaded."""
    config = encoder.model.config
    codec = (
        CodecSparseConfig(frames=options.video_frames, budget=options.codec_budget) if options.codec_sparse else None
    )
    return LoadOptions(
        encoder.processor,
        config.patch_size,
        config.num_channels,
        options.video_frames,
        options.temporal_context,
        codec=codec,
        preview_dir=options.codec_preview_dir,
        memory=memory,
        network=Network(options.retries, options.timeout),
        jpeg_draft=options.jpeg_draft,
        exif_transpose=options.exif_transpose,
        keys=keys,
        video_backend=options.video_backend,
    )


def memory_sources(inputs: Sequence[Any] | None) -> dict[int, MemorySource]:
    """The in-memory inputs among ``inputs`` (objects, datasets), by number: their rows' names for the listing."""
    return {m.number: m for m in inputs or [] if isinstance(m, MemorySource)}


def list_run_share(
    plan: RunPlan, rank: int, world: int, options: EncodeOptions, sources: dict[int, MemorySource]
) -> Share:
    """The items of rank ``rank`` of ``world``: its units of the plan listed (unit ``u`` is rank ``u % world``'s),
    with the plan's shard keys."""
    s = SourceOptions.of(options)
    return list_share(plan.units, rank, world, s.path_column, s.keep_columns, s.network, sources, plan.keys)


def encode_groups(
    loader: Iterator[LoadedItem],
    forward: GroupEncoder,
    budget: int,
    loaded: Callable[[], None] | None = None,
) -> Iterator[list[EncodedItem]]:
    """Loaded items (in order) packed into forwards of at most ``budget`` patches and encoded: yields the results
    of each forward as it finishes, in order (an item that failed to load: at once, a list of its own); the last
    forward's come once ``loader`` ends. loaded: called as each item arrives (a progress count)."""
    packer: TokenBudgetPacker[LoadedItem] = TokenBudgetPacker(budget)
    for item in loader:  # in input order; a worker that dies fails only its input
        if loaded is not None:
            loaded()
        if item.error:
            yield [forward.failed(item)]
            continue
        for group in packer.add(item, item.num_tokens):
            yield from forward.run(group)
    for group in packer.flush():
        yield from forward.run(group)
    yield from forward.close()
