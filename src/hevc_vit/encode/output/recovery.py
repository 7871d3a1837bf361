"""What ``--resume`` makes of the folder an earlier run left, before anything new is written there.

The index rows are the commit record: a part (a shard, or an npy-parquet or parquet part) is published whole
first, then its rows are appended (:mod:`.shards`), so a run killed between the two (``kill -9``) leaves a part no
row names, or one whose rows were only partly appended, or an ``.npy`` whose metadata was never published.
Rank 0, holding the folder's lock, reads every row (:func:`resume_state`), refuses a folder it cannot trust
(:class:`~.index.DamagedFolderError`, nothing changed), and then settles it: one row per input in
``index.jsonl`` (the rank files folded in; an earlier failed row that this run's inputs now stand for, such as
a glob that matched nothing, dropped), and every part file no row names removed. A part whose rows are missing
in part is removed with its rows, and its inputs are encoded again, so each input is stored once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hevc_vit.encode.output.formats import owned_files, part_files
from hevc_vit.encode.output.index import (
    INDEX_NAME,
    DamagedFolderError,
    KeyBook,
    rank_index_files,
    read_rows,
    write_index,
)
from hevc_vit.encode.output.shards import holds_features, shard_keys
from hevc_vit.encode.readers.spec import WorkUnit, describe_error


def resume_state(
    out_dir: Path, units: Sequence[WorkUnit], given: set[str], repairs: list[str]
) -> tuple[set[str], KeyBook]:
    """The inputs an earlier run finished (an ``ok`` row whose part holds its features) and the folder's keys,
    with the folder settled (see the module). ``given``: the names this run's inputs were expanded from
    (:func:`.sources.expand_units`); ``repairs`` gets what was repaired, for the summary."""
    latest = read_rows(out_dir, on_torn=repairs.append)
    done, torn_parts = _check_parts(out_dir, list(latest.values()), repairs)
    items = {unit.spec.path for unit in units if unit.kind == "item"}
    stale = (given | {unit.name for unit in units if unit.kind != "item"}) - items
    # a failed row of a name this run expands again (to other inputs, or to the same failure, rewritten)
    rows = [row for row in latest.values() if not (row.get("status") != "ok" and row["path"] in stale)]
    keys = KeyBook.of(rows, len(units))  # the inputs of a part removed below keep their keys
    kept = [row for row in rows if not (row.get("status") == "ok" and row.get("shard") in torn_parts)]
    _settle(out_dir, kept, changed=len(kept) != len(latest), repairs=repairs)
    return done, keys


def _check_parts(out_dir: Path, rows: list[dict[str, Any]], repairs: list[str]) -> tuple[set[str], set[str]]:
    """The inputs whose ``ok`` row names a part holding their features, and the parts that hold inputs no row
    names (their rows were cut short). What is safe to redo is noted in ``repairs`` (a part that is missing); a
    part that cannot be read, or lacks a row's features, raises :class:`DamagedFolderError` saying what to do."""
    by_part: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_part.setdefault(row.get("shard") if isinstance(row.get("shard"), str) else "", []).append(row)
    done: set[str] = set()
    torn: set[str] = set()
    for part, members in by_part.items():
        path = out_dir / part
        if not part or not path.is_file():
            missing = f"{path}: missing, named by {_rows(members)}" if part else f"{_rows(members)} name no shard"
            repairs.append(f"{missing}; their inputs are encoded again")
            continue
        names = _part_names(path, members)
        unnamed = {name.rsplit(".", 1)[0] for name in names} - {str(row.get("key")) for row in members}
        if unnamed:
            torn.add(part)
            repairs.append(
                f"{path}: holds {len(unnamed)} inputs no index row names (its rows were cut short); removed with its "
                f"{_rows(members)}, and their inputs are encoded again"
            )
            continue
        done.update(row["path"] for row in members)
    return done, torn


def _part_names(path: Path, rows: list[dict[str, Any]]) -> set[str]:
    """The tensor names of the part at ``path``; raises :class:`DamagedFolderError` when it cannot be read or
    lacks the features of one of ``rows``."""
    try:
        names = shard_keys(path)
    except Exception as e:  # any reader error: the file is not a part this library wrote
        damage, named = f"cannot be read ({describe_error(e)}); it is named by", rows
    else:
        named = [row for row in rows if not holds_features(names, str(row.get("key")))]
        damage = "does not hold the features of"
        if not named:
            return names
    raise DamagedFolderError(
        f"--resume: {path} {damage} {_rows(named)} (e.g. {named[0].get('path')!r}): the output folder is damaged. "
        f"Delete that file, then rerun with --resume to encode its inputs again (or start again with --overwrite)"
    )


def _rows(rows: list[Any]) -> str:
    return f"{len(rows)} ok row{'s' if len(rows) != 1 else ''}"


def _settle(out_dir: Path, rows: list[dict[str, Any]], changed: bool, repairs: list[str]) -> None:
    """``index.jsonl`` made of ``rows`` (one per input) when it differs from what the files hold, the rank files
    folded into it; then every part file no row names removed (an interrupted write's), temporary files too."""
    rank_files = rank_index_files(out_dir)
    if changed or rank_files:
        write_index(out_dir / INDEX_NAME, rows)  # first: a kill from here on leaves rows that name no part
        for rank_file in rank_files:
            rank_file.unlink()
    parts = {row["shard"] for row in rows if row.get("status") == "ok" and isinstance(row.get("shard"), str)}
    named = {p for part in parts if part and (out_dir / part).is_file() for p in part_files(out_dir, part)}
    for path in owned_files(out_dir):
        if path not in named:
            path.unlink()
            if ".tmp" not in path.name:
                repairs.append(f"{path}: no index row names it (a run was killed as it wrote it); removed")
