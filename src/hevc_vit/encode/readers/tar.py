"""Webdataset ``.tar`` shards as inputs: each sample (the members that share a key) is one input.

A member ``dir/000123.jpg`` has the key ``dir/000123`` and the extension ``jpg`` (the key ends at the first dot
of the file name, as webdataset splits it); consecutive members with one key form a sample. A sample's input is
its first member whose extension (or the extension's last part, ``left.jpg`` -> ``jpg``) is an image or a video
one; its index row has ``id`` = the key and ``path`` = ``tar://MEMBER::SHARD`` (:func:`.items.tar_path`). The
shard is listed once, by its headers (the data is skipped, not read); a member is read later with one seek.

Every member but folder entries and hidden names (a part starting with ``.``, as in folders) is in a row. A hard
link is read through the member it names; a symbolic link is resolved from its own folder and followed inside the
shard only (one that is absolute, leaves the shard through ``..``, dangles or loops is a failed row, never read
from the disk). A name held by more than one member is ambiguous (``tar -x`` keeps the last, a reader that
scans keeps the first), so each of those members is a failed row, the later ones named ``tar://NAME#N::SHARD``.
A fifo or device member, a sample without an image or video member, a member that ends past the end of the shard
(a truncated shard) and a shard damaged inside a header each give a failed row too. The other members of a sample
are its sidecars: the ones whose extension ``--keep-columns`` names (``txt``, ``json``) fill its row's columns.
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hevc_vit.encode.readers.remote import Network, open_location, url_filesystem, with_retries
from hevc_vit.encode.readers.spec import InputSpec, TarMember, describe_error, is_url, tar_path
from hevc_vit.media.kinds import MEDIA_EXTENSIONS, TAR_EXTENSION

# "dir/000123.seg.png" -> ("dir/000123", "seg.png"); a newline is a character of a name like any other
_KEY = re.compile(r"\A((?:.*/|)[^./][^/]*?)(?:\.([^/]*))?\Z", re.DOTALL)
MAX_LINK_HOPS = 16  # symbolic links followed from one member (a loop fails)


def is_tar_shard(location: str) -> bool:
    return location.lower().endswith(TAR_EXTENSION)


def media_extension(ext: str) -> bool:
    """A webdataset extension (``jpg``, ``left.jpg``, ``MP4``) names an image or a video."""
    ext = ext.lower()
    return ext in MEDIA_EXTENSIONS or ext.rsplit(".", 1)[-1] in MEDIA_EXTENSIONS


def list_tar(location: str, network: Network, keep_columns: Sequence[str] = ()) -> list[InputSpec]:
    """One spec per sample of the shard at ``location`` (a local path or a URL), in the shard's order, and one
    failed spec per member that cannot be read as a file (see the module's docstring). A sample's members whose
    extension ``keep_columns`` names become its sidecars (read by the loader into its index row)."""
    try:
        if is_url(location):
            return with_retries(lambda: _list(location, network, keep_columns), network.retries, f"listing {location}")
        return _list(location, network, keep_columns)
    except (OSError, ValueError) as e:
        return [InputSpec(location, f"cannot read this tar shard: {describe_error(e)}")]


def _list(location: str, network: Network, keep: Sequence[str]) -> list[InputSpec]:
    total = _size(location, network)
    if total == 0:
        return [InputSpec(location, "empty file (0 bytes): not a tar shard")]
    members: list[tarfile.TarInfo] = []
    with open_location(location, network) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            return [InputSpec(location, f"not a readable tar shard (uncompressed .tar expected): {describe_error(e)}")]
        damage = ""
        try:
            while (member := tar.next()) is not None:
                members.append(member)
        except tarfile.TarError as e:
            damage = describe_error(e)
        end = tar.offset
        if not damage and end < total:
            f.seek(end)
            if f.read(tarfile.BLOCKSIZE).strip(b"\0"):  # a header tarfile could not read: the shard is cut in one
                damage = f"an unreadable header at byte {end} (the shard may be truncated)"
    specs = _specs(location, _entries(members), total, keep)
    if not specs and not damage:
        return [
            InputSpec(
                location, "the tar shard holds no samples (no file member, folder entries and hidden names aside)"
            )
        ]
    if damage:
        specs.append(InputSpec(location, f"the tar shard is damaged after {len(specs)} samples: {damage}"))
    return specs


def _size(location: str, network: Network) -> int:
    if not is_url(location):
        return os.path.getsize(location)
    fs, path = url_filesystem(location, network)
    return int(fs.size(path))


@dataclass
class _Entry:
    """A member of a shard as an input: its name, the member holding its bytes (itself, or what a link names),
    or why it cannot be read."""

    name: str
    data: tarfile.TarInfo | None = None
    error: str = ""


def _clean(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _hidden(name: str) -> bool:
    return any(part.startswith(".") and part != ".." for part in name.split("/"))


def _entries(members: list[tarfile.TarInfo]) -> list[_Entry]:
    """Every member but folder entries and hidden names, in order, each read through the links it names."""
    listed = [m for m in members if not m.isdir() and not _hidden(_clean(m.name))]
    counts = Counter(_clean(m.name) for m in members)
    by_name = {_clean(m.name): m for m in members if counts[_clean(m.name)] == 1}
    entries, seen = [], Counter()
    for member in listed:
        name = _clean(member.name)
        seen[name] += 1
        if counts[name] > 1:  # a tar holds a name more than once; a name must open one member
            error = (
                f"{counts[name]} members of this shard are named {name!r} (this one is number {seen[name]}, its "
                f"header at byte {member.offset}); the name would not say which one, so none is encoded"
            )
            entries.append(_Entry(name if seen[name] == 1 else f"{name}#{seen[name]}", error=error))  # unique paths
            continue
        entries.append(_follow(name, member, by_name, counts))
    return entries


def _follow(name: str, member: tarfile.TarInfo, by_name: dict[str, tarfile.TarInfo], counts: Counter) -> _Entry:
    """The member whose bytes ``member`` holds: itself, or the file its hard or symbolic links lead to inside the
    shard (a symbolic link is resolved from its own folder and never leaves the shard)."""
    current, where = member, name
    for _ in range(MAX_LINK_HOPS + 1):
        if current.isfile() and current.sparse is not None:  # its data is not one run of `size` bytes
            return _Entry(name, error="a GNU sparse member: its bytes are not stored in one piece; not supported")
        if current.isfile():
            return _Entry(name, current)
        if current.islnk():
            what, target = "a hard link", posixpath.normpath(_clean(current.linkname))
        elif current.issym():
            what, link = "a symbolic link", current.linkname
            target = posixpath.normpath(posixpath.join(posixpath.dirname(where), link))
            if link.startswith("/") or target == ".." or target.startswith("../"):
                return _Entry(name, error=f"{what} to {link!r}, outside the shard: links are followed inside it only")
        else:
            kind = _TYPES.get(current.type, f"type {current.type!r}")
            via = "" if current is member else f" (reached through links from {name!r})"
            return _Entry(name, error=f"a {kind} member{via}, not a file")
        if counts.get(target, 0) > 1:
            return _Entry(name, error=f"{what} to {target!r}, a name {counts[target]} members of this shard have")
        if target not in by_name:
            return _Entry(name, error=f"{what} to {target!r}, which is not a member of this shard (a dangling link)")
        current, where = by_name[target], target
    return _Entry(name, error=f"more than {MAX_LINK_HOPS} links in a row from this member (a loop of links?)")


_TYPES = {
    tarfile.DIRTYPE: "folder",
    tarfile.FIFOTYPE: "fifo",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
}


def _specs(location: str, entries: list[_Entry], total: int, keep: Sequence[str]) -> list[InputSpec]:
    """One spec per sample (consecutive readable members with one key), and one failed spec per member that
    cannot be read, at its place."""
    out: list[InputSpec | tuple[str, list[_Entry]]] = []
    sample: tuple[str, list[_Entry]] | None = None
    for entry in entries:
        key = _KEY.match(entry.name).group(1) if _KEY.match(entry.name) else entry.name
        if entry.error:
            out.append(InputSpec(tar_path(entry.name, location), entry.error, extra={"id": key}))
        elif sample is not None and sample[0] == key:
            sample[1].append(entry)
        else:
            sample = (key, [entry])
            out.append(sample)
    return [x if isinstance(x, InputSpec) else _sample_spec(location, *x, total, keep) for x in out]


def _extension(name: str) -> str:
    match = _KEY.match(name)
    return (match.group(2) or "") if match else ""


def _sample_spec(location: str, key: str, entries: list[_Entry], total: int, keep: Sequence[str]) -> InputSpec:
    chosen = next((e for e in entries if media_extension(_extension(e.name))), None)
    if chosen is None:
        names = ", ".join(e.name for e in entries)
        error = f"sample {key!r} has no image or video member (members: {names})"
        return InputSpec(tar_path(entries[0].name, location), error, extra={"id": key})
    path = tar_path(chosen.name, location)
    for entry in entries:
        end = entry.data.offset_data + entry.data.size
        if end > total and (entry is chosen or _extension(entry.name) in keep):
            error = f"the member {entry.name} ends at byte {end}, past the end of the shard ({total} bytes)"
            error += ": the shard is truncated"
            return InputSpec(path, error, extra={"id": key})
    sidecars = {_extension(e.name): _member(location, e) for e in reversed(entries) if _extension(e.name) in keep}
    return InputSpec(path, ref=_member(location, chosen), extra={"id": key}, sidecars=sidecars)


def _member(location: str, entry: _Entry) -> TarMember:
    return TarMember(location, entry.name, entry.data.offset_data, entry.data.size)
