"""What the local and the Ray engine share: the options the loaders get, items packed and encoded group by
group, the listing of a run's share of the inputs, and the tally of what a run did (with its progress bar).

The engines (:mod:`.local`, :mod:`.ray`) import this module, never each other; :mod:`hevc_vit.encode.api`
chooses between them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hevc_vit.codec.config import CodecSparseConfig
from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.model.batching import TokenBudgetPacker
from hevc_vit.encode.model.forward import EncodedItem, GroupEncoder
from hevc_vit.encode.model.loader import Encoder
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.folder import check_resume_config, owned_outputs
from hevc_vit.encode.output.index import ENCODE_CONFIG_NAME
from hevc_vit.encode.output.recovery import resume_state
from hevc_vit.encode.readers.expand import SourceOptions, expand_units, sample_inputs
from hevc_vit.encode.readers.memory import MemorySource
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import KeyBook, WorkUnit
from hevc_vit.encode.readers.units import Share, list_share
from hevc_vit.files import write_json_atomic


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
        decode_timeout=options.decode_timeout,
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


@dataclass
class RunPlan:
    """What rank 0 decides and every rank follows: the folder, the work units (:mod:`.units`; unit ``u`` goes to
    rank ``u % world``), the inputs already done, the keys the folder holds, what was repaired in the folder; or
    the error every rank raises (its kind's name and its message)."""

    out_dir: str
    units: list[WorkUnit] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    keys: KeyBook = field(default_factory=KeyBook)
    repairs: list[str] = field(default_factory=list)
    error: tuple[str, str] | None = None

    @classmethod
    def refused(cls, e: BaseException) -> RunPlan:
        kind = next(k for k in _ERROR_KINDS if isinstance(e, k))
        return cls("", error=(kind.__name__, str(e)))

    def raise_error(self) -> None:
        if self.error is not None:
            kind, message = self.error
            raise {k.__name__: k for k in _ERROR_KINDS}[kind](message)


_ERROR_KINDS = (FileExistsError, FileNotFoundError, ValueError, OSError, ImportError)  # the first match names an error


def prepare_folder(
    inputs: Sequence[str | os.PathLike] | None,
    path: Path,
    resume: bool,
    overwrite: bool,
    settings: dict[str, Any],
    say: Callable[[str], None],
    sources: SourceOptions | None = None,
) -> RunPlan:
    """Rank 0, holding the folder's lock: the inputs expanded to work units (a tar shard or a table's row group
    is one unit, listed by the rank that takes it), the inputs already done and the folder's keys (with resume,
    which first settles what an interrupted run left: :mod:`.recovery`), and the folder made ready. The output
    folder itself is never an input, even inside an input folder. ``sources``: how tables and
    URLs are read."""
    given: set[str] = set()
    units = expand_units(inputs if inputs else sample_inputs(), exclude=[path], sources=sources, given=given)
    if not units:
        raise ValueError(f"no inputs: {[os.fspath(i) for i in inputs or []]} name no files")
    refuse_nothing_to_encode(units)
    plan = RunPlan(str(path), units)
    if resume and path.is_dir():
        check_resume_config(path, settings, say)
        plan.done, plan.keys = resume_state(path, units, given, plan.repairs)  # the folder settled (.recovery)
    if overwrite and path.is_dir():
        for owned in owned_outputs(path):
            owned.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / ENCODE_CONFIG_NAME, settings)
    return plan


def refuse_nothing_to_encode(units: list[WorkUnit]) -> None:
    """``ValueError`` when no input names anything to encode: every unit is an input that failed while it was
    expanded (a path that does not exist, a glob that matches nothing, an empty folder or list, an unreadable
    folder). Refused before the folder is prepared, so a typo leaves no folder with failed rows behind. Inputs
    that are found but fail later (a file that is no image, a damaged tar or table row) are a run like any other:
    their rows say why."""
    if any(unit.kind != "item" or not unit.spec.error for unit in units):
        return
    shown = "; ".join(f"{unit.spec.path!r}: {unit.spec.error}" for unit in units[:5])
    more = f"; and {len(units) - 5} more" if len(units) > 5 else ""
    raise ValueError(f"nothing to encode: {shown}{more}; expected files, folders, globs or URLs that exist")
