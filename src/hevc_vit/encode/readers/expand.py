"""The inputs of ``hevc-vit encode``: files, folders (recursive), globs, brace ranges, list files, webdataset tar
shards, tables of paths, URLs and in-memory objects, expanded to one :class:`InputSpec` per item, and the samples
shipped with the package. Nothing given is dropped silently: what cannot be found or read becomes a spec with its
reason, which the run records as a failed row.

Where each kind is read: tar shards :mod:`.sources_tar`, tables :mod:`.tables`, URLs :mod:`.remote`, in-memory
objects and datasets :mod:`.objects`.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hevc_vit.codec.assets.read import is_asset_folder, is_assets_output
from hevc_vit.encode.readers.memory import MemorySource
from hevc_vit.encode.readers.remote import GLOB_CHARS, Network, list_url, read_location
from hevc_vit.encode.readers.sidecars import folder_inputs
from hevc_vit.encode.readers.spec import InputSpec, WorkUnit, describe_error, is_url
from hevc_vit.encode.readers.tables import is_table
from hevc_vit.encode.readers.tar import is_tar_shard
from hevc_vit.encode.readers.units import list_unit, memory_units, remote_item, table_units
from hevc_vit.media.kinds import LIST_EXTENSIONS

__all__ = [
    "InputSpec",
    "SourceOptions",
    "describe_error",
    "expand_braces",
    "expand_inputs",
    "expand_units",
    "sample_inputs",
]

ASSETS = Path(__file__).resolve().parents[2] / "assets"  # hevc_vit/assets
MAX_BRACE_NAMES = 1_000_000  # names one brace pattern may expand to (webdataset's largest shard ranges are smaller)
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class SourceOptions:
    """How inputs are read while they are expanded: the path and kept columns of tables, how URLs are read."""

    path_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    network: Network = Network()

    @classmethod
    def of(cls, options: Any) -> SourceOptions:
        """The source options of an ``EncodeOptions`` (``keep_columns`` may be one name or a sequence)."""
        keep = options.keep_columns
        keep = (keep,) if isinstance(keep, str) else tuple(keep)
        return cls(options.path_column, keep, Network(options.retries, options.timeout))


@dataclass
class _Expansion:
    add_unit: Callable[[WorkUnit], None]
    skip: frozenset[str]  # real paths of folders never searched (the output folder)
    sources: SourceOptions
    given: set[str]  # every name expanded: as given, from a list, a brace range or a glob (see expand_units)

    def add(self, spec: InputSpec) -> None:
        self.add_unit(WorkUnit.item(spec))


def expand_inputs(
    inputs: str | os.PathLike | Sequence[Any],
    exclude: Sequence[str | os.PathLike] = (),
    sources: SourceOptions | None = None,
) -> list[InputSpec]:
    """Files, folders (recursive), globs, brace ranges, list files, tar shards, tables, URLs and in-memory sources
    -> one ``InputSpec`` per item, without duplicates: :func:`expand_units`, every unit listed here.
    """
    sources = sources or SourceOptions()
    units = expand_units(inputs, exclude, sources)
    memory = {m.number: m for m in _as_list(inputs) if isinstance(m, MemorySource)}
    seen: set[str] = set()
    out: list[InputSpec] = []
    for unit in units:
        for spec in list_unit(unit, sources.path_column, sources.keep_columns, sources.network, memory):
            if spec.path not in seen:
                seen.add(spec.path)
                out.append(spec)
    return out


def _as_list(inputs: Any) -> list[Any]:
    return [inputs] if isinstance(inputs, (str, os.PathLike, MemorySource)) else list(inputs)


def expand_units(
    inputs: str | os.PathLike | Sequence[Any],
    exclude: Sequence[str | os.PathLike] = (),
    sources: SourceOptions | None = None,
    given: set[str] | None = None,
) -> list[WorkUnit]:
    """Files, folders (recursive), globs, brace ranges, list files, tar shards, tables, URLs and in-memory sources
    -> the run's work units (:mod:`.units`), without duplicates: a file is a unit of one item, a tar shard, a
    csv/tsv/jsonl table, a parquet row group and a slice of an in-memory source are listed into items later.

    A folder contributes every file under it in sorted order, hidden names (a leading ``.``) excepted.
    Symlinked folders are followed, each real folder at most once per input (so a link loop ends); a ``.txt``/
    ``.lst``/``.list`` file given directly (or by URL) lists one path or URL per line (blank lines and ``#``
    comments skipped, a URL as it is, relative paths from the list's folder or URL). ``{000000..000009}`` and
    ``{a,b}`` expand as in the shell
    (webdataset's shard ranges). A ``.tar`` contributes one item per webdataset sample, wherever it is found; a
    ``.parquet``/``.csv``/``.tsv``/``.jsonl`` given directly, by a glob or in a list contributes one item per row
    (a table inside a searched folder is an input like any other file). A URL (``s3://``, ``memory://``, ...)
    is listed or globbed through fsspec. Nothing given is dropped silently: a path that does not exist, a glob
    that matches nothing, a folder or list that yields no file, a folder that cannot be read and a link that is
    not followed each become a unit of one item with its error. Folders in ``exclude`` (the output folder) are not
    searched. One path (``str`` or ``Path``) is one input. A table without its path column raises ``ValueError``.
    ``given``: filled with every name expanded (as given and normalised), so ``--resume`` knows which earlier
    failed rows (a glob that matched nothing, an empty folder) this run's inputs stand for now.
    """
    out: list[WorkUnit] = []
    seen: set[str] = set()

    def add(unit: WorkUnit) -> None:
        if unit.name not in seen:
            seen.add(unit.name)
            out.append(unit)

    skip = frozenset(os.path.realpath(e) for e in exclude)
    ctx = _Expansion(add, skip, sources or SourceOptions(), given if given is not None else set())
    for raw in _as_list(inputs):
        if isinstance(raw, MemorySource):
            for unit in memory_units(raw):
                add(unit)
        else:
            _expand_one(os.fspath(raw), ctx, from_list=False)
    return out


def expand_braces(pattern: str) -> list[str]:
    """``data-{000..002}.tar`` -> ``data-000.tar``, ``data-001.tar``, ``data-002.tar`` (zero padding kept);
    ``{a,b}`` -> each; a pattern without braces -> itself. A pattern of more than ``MAX_BRACE_NAMES`` names
    raises ``ValueError`` (counted before anything is expanded)."""
    count = count_braces(pattern)
    if count > MAX_BRACE_NAMES:
        raise ValueError(
            f"the pattern {pattern!r} expands to {count:,} names; at most {MAX_BRACE_NAMES:,} are expanded "
            f"(MAX_BRACE_NAMES): split it into smaller ranges, or use a glob or a list file"
        )
    return _expand_braces(pattern)


def count_braces(pattern: str) -> int:
    """How many names :func:`expand_braces` makes of ``pattern``, computed without making them."""
    match = _BRACE.search(pattern)
    if match is None:
        return 1
    body, tail = match.group(1), pattern[match.end() :]
    lo, sep, hi = body.partition("..")
    if sep and lo.isdigit() and hi.isdigit():
        options = abs(int(hi) - int(lo)) + 1
    elif "," in body:
        options = body.count(",") + 1
    else:
        options = 1
    return options * count_braces(tail)


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    lo, sep, hi = body.partition("..")
    if sep and lo.isdigit() and hi.isdigit():
        width = max(len(lo), len(hi)) if (len(lo) > 1 and lo[0] == "0") or (len(hi) > 1 and hi[0] == "0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # not a range or a list: the braces are part of the name
        return [head + "{" + body + "}" + rest for rest in _expand_braces(tail)]
    return [head + option + rest for option in options for rest in _expand_braces(tail)]


def _expand_one(arg: str, ctx: _Expansion, from_list: bool) -> None:
    ctx.given.update((arg,) if is_url(arg) else (arg, str(Path(arg))))
    if "{" in arg and not os.path.exists(arg):
        names = expand_braces(arg)
        if names != [arg]:
            for name in names:
                _expand_one(name, ctx, from_list=True)
            return
    if is_url(arg):
        _expand_url(arg, ctx)
        return
    add, skip = ctx.add, ctx.skip
    path = Path(arg)
    if path.is_dir():
        if os.path.realpath(path) in skip:
            return
        if not _walk(path, ctx):
            why = "names starting with '.' are skipped; sidecars and tables beside images are not inputs"
            add(InputSpec(arg, f"no files in this folder ({why})"))
    elif path.is_file():
        if not from_list and path.suffix.lower() in LIST_EXTENSIONS:
            try:
                lines = _read_list(path)
            except (OSError, ValueError) as e:
                add(InputSpec(arg, str(e)))
                return
            if not lines:
                add(InputSpec(arg, "the list file names no paths (blank lines and # comments are skipped)"))
            for line in lines:
                _expand_one(line, ctx, from_list=True)
        else:
            _add_file(str(path), ctx, tables=True)
    elif GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            add(InputSpec(arg, "no file matches this pattern"))
        for match in matches:
            if not any(_is_inside(match, folder) for folder in skip):
                _expand_one(match, ctx, from_list=True)
    elif path.exists():  # named as the file would be (``./a.jpg`` is ``a.jpg``): one row once it is fixed
        add(InputSpec(str(path), "not a regular file or folder"))
    elif path.is_symlink():
        add(InputSpec(str(path), "a broken symbolic link: its target does not exist"))
    else:
        add(InputSpec(str(path), "no such file or folder"))


def _add_file(location: str, ctx: _Expansion, tables: bool) -> None:
    """A file found (local or a URL): a tar shard (listed later), a table (``tables``: its units, its columns
    checked now), or the file itself."""
    if is_tar_shard(location):
        ctx.add_unit(WorkUnit("tar", location))
    elif tables and is_table(location):
        options = ctx.sources
        for unit in table_units(location, options.path_column, options.keep_columns, options.network):
            ctx.add_unit(unit)
    else:
        ctx.add_unit(remote_item(location))


def _expand_url(url: str, ctx: _Expansion) -> None:
    try:
        urls, reason = list_url(url, ctx.sources.network)
    except OSError as e:
        ctx.add(InputSpec(url, describe_error(e)))
        return
    if not urls:
        ctx.add(InputSpec(url, reason))
    if urls == [url] and posixpath.splitext(url.split("?")[0])[1].lower() in LIST_EXTENSIONS:
        _expand_remote_list(url, ctx)
        return
    for found in urls:
        _add_file(found, ctx, tables=urls == [url] or GLOB_CHARS & set(url) != set())


def _expand_remote_list(url: str, ctx: _Expansion) -> None:
    """A list file behind a URL: its lines as a local list's (relative ones taken from the URL's folder)."""
    try:
        text = read_location(url, ctx.sources.network).decode("utf-8")
    except (OSError, ValueError) as e:  # unreadable, or not UTF-8
        ctx.add(InputSpec(url, f"cannot read this list file: {describe_error(e)}"))
        return
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        ctx.add(InputSpec(url, "the list file names no paths (blank lines and # comments are skipped)"))
    folder = posixpath.dirname(url)
    for line in lines:
        _expand_one(line if is_url(line) or line.startswith("/") else f"{folder}/{line}", ctx, from_list=True)


def _is_inside(path: str, folder: str) -> bool:
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(folder: Path, ctx: _Expansion) -> int:
    """Add the files under ``folder`` (sorted, depth first, hidden names skipped); returns how many specs were
    added. Symlinked folders are followed, but a real folder is searched at most once (``visited``), so a link
    loop or a second link to one folder adds a failed row for the link instead of running forever. A folder
    that cannot be read gets a failed row with the reason. A tar shard found is listed (one row per sample); a
    sidecar (``KEY.txt`` beside ``KEY.jpg``) and a dataset's metadata file (``.parquet``, ``.json``) are not
    inputs (:mod:`.sidecars`). A codec-assets folder (``OUT/assets/KEY``) is one input, read whole by the loader;
    in a codec-assets output folder only ``assets/`` is searched."""
    add, skip = ctx.add, ctx.skip
    visited = {os.path.realpath(folder)}
    count = 0
    stack = [folder]  # depth first: a folder's files, then each of its sub-folders in sorted order
    while stack:
        current = stack.pop()
        if is_asset_folder(current):  # a codec-assets folder is one input: its mosaics at its positions
            add(InputSpec(str(current)))
            count += 1
            continue
        if is_assets_output(current):  # a codec-assets output: its asset folders, not its index or previews
            current = current / "assets"
        try:
            with os.scandir(current) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            add(InputSpec(str(current), f"cannot read this folder: {describe_error(e)}"))
            count += 1
            continue
        folders, files = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symbolic links
            except OSError:
                is_dir = False  # a file then; opening it records the reason it cannot be read
            if not is_dir:
                files.append(entry.name)
                continue
            sub = current / entry.name
            real = os.path.realpath(sub)
            if real in skip:  # the output folder inside an input folder: never an input
                continue
            if real in visited:
                add(InputSpec(str(sub), f"not searched: a link to the folder {real}, already searched for this input"))
                count += 1
                continue
            visited.add(real)
            folders.append(sub)
        count += _add_folder_files(current, files, ctx)
        stack.extend(reversed(folders))
    return count


def _add_folder_files(folder: Path, names: list[str], ctx: _Expansion) -> int:
    """The files of one folder, less sidecars and metadata (:func:`.sidecars.folder_inputs`), the kept sidecars of
    each in its spec; returns how many were added (a folder of sidecars alone yields none)."""
    inputs = folder_inputs(names, ctx.sources.keep_columns)
    for name, sidecars in inputs:
        path = str(folder / name)
        if is_tar_shard(path):
            ctx.add_unit(WorkUnit("tar", path))
        else:
            found = {column: str(folder / sidecar) for column, sidecar in sidecars.items()}
            ctx.add(InputSpec(path, sidecars=found))
    return len(inputs)


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"list file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            f"expected one path per line in UTF-8"
        ) from None
    except OSError as e:
        raise OSError(f"cannot read list file {path}: {describe_error(e)}") from None
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lines.append(line if is_url(line) or os.path.isabs(line) else str(path.parent / line))  # a URL as it is
    return lines


def sample_inputs() -> list[Path]:
    """The sample images and the short clip shipped with the package (what ``hevc-vit encode`` encodes
    when given no input)."""
    return sorted(p for p in ASSETS.iterdir() if p.is_file() and not p.name.startswith(("_", ".")))
