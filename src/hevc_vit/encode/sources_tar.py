"""Webdataset ``.tar`` shards as inputs: each sample (the members that share a key) is one input.

A member ``dir/000123.jpg`` has the key ``dir/000123`` and the extension ``jpg`` (the key ends at the first dot
of the file name, as webdataset splits it); consecutive members with one key form a sample. A sample's input is
its first member whose extension (or the extension's last part, ``left.jpg`` -> ``jpg``) is an image or a video
one; its index row has ``id`` = the key and ``path`` = ``tar://MEMBER::SHARD`` (:func:`.items.tar_path`). The
shard is listed once, by its headers (the data is skipped, not read); a member is read later with one seek.
Nothing is dropped silently: a sample without an image or video member, a member that ends past the end of the
shard (a truncated shard) and a shard damaged inside a header each give a failed row.
"""

from __future__ import annotations

import os
import re
import tarfile

from .items import InputSpec, TarMember, tar_path
from .remote import Network, describe_error, is_url, open_location, url_filesystem, with_retries
from .video import VIDEO_EXTENSIONS

IMAGE_EXTENSIONS = frozenset("jpg jpeg png webp bmp gif tif tiff ppm pgm pbm pnm jp2 j2k avif".split())
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | {e.lstrip(".") for e in VIDEO_EXTENSIONS}
# archives are listed (a .tar) or refused, never handed to an image or video decoder
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".zip", ".7z", ".rar")
# "dir/000123.seg.png" -> ("dir/000123", "seg.png"); a newline is a character of a name like any other
_KEY = re.compile(r"\A((?:.*/|)[^./][^/]*?)\.([^/]*)\Z", re.DOTALL)


def is_tar_shard(location: str) -> bool:
    return location.lower().endswith(".tar")


def archive_kind(name: str, head: bytes = b"") -> str:
    """The kind of archive ``name`` is by its extension or its first bytes (``"tar"``, ``"zip"``, ...); ``""``
    when it is not one."""
    lower = name.lower()
    for ext in ARCHIVE_EXTENSIONS:
        if lower.endswith(ext):
            return ext.lstrip(".")
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!")):
        return "compressed archive"
    return ""


def media_extension(ext: str) -> bool:
    """A webdataset extension (``jpg``, ``left.jpg``, ``MP4``) names an image or a video."""
    ext = ext.lower()
    return ext in MEDIA_EXTENSIONS or ext.rsplit(".", 1)[-1] in MEDIA_EXTENSIONS


def list_tar(location: str, network: Network) -> list[InputSpec]:
    """One spec per sample of the shard at ``location`` (a local path or a URL), in the shard's order."""
    try:
        if is_url(location):
            return with_retries(lambda: _list(location, network), network.retries, f"listing {location}")
        return _list(location, network)
    except (OSError, ValueError) as e:
        return [InputSpec(location, f"cannot read this tar shard: {describe_error(e)}")]


def _list(location: str, network: Network) -> list[InputSpec]:
    total = _size(location, network)
    if total == 0:
        return [InputSpec(location, "empty file (0 bytes): not a tar shard")]
    samples: list[tuple[str, list[tarfile.TarInfo]]] = []
    with open_location(location, network) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            return [InputSpec(location, f"not a readable tar shard (uncompressed .tar expected): {describe_error(e)}")]
        damage = ""
        try:
            while (member := tar.next()) is not None:
                _add_member(samples, member)
        except tarfile.TarError as e:
            damage = describe_error(e)
        end = tar.offset
        if not damage and end < total:
            f.seek(end)
            if f.read(tarfile.BLOCKSIZE).strip(b"\0"):  # a header tarfile could not read: the shard is cut in one
                damage = f"an unreadable header at byte {end} (the shard may be truncated)"
    specs = [_sample_spec(location, key, members, total) for key, members in samples]
    if not samples and not damage:
        return [InputSpec(location, "the tar shard holds no samples (no file member named KEY.EXTENSION)")]
    if damage:
        specs.append(InputSpec(location, f"the tar shard is damaged after {len(samples)} samples: {damage}"))
    return specs


def _size(location: str, network: Network) -> int:
    if not is_url(location):
        return os.path.getsize(location)
    fs, path = url_filesystem(location, network)
    return int(fs.size(path))


def _add_member(samples: list[tuple[str, list[tarfile.TarInfo]]], member: tarfile.TarInfo) -> None:
    if not member.isfile():
        return
    match = _KEY.match(member.name)
    if match is None:  # no extension, or a hidden name: webdataset skips these too
        return
    key = match.group(1)
    if samples and samples[-1][0] == key:
        samples[-1][1].append(member)
    else:
        samples.append((key, [member]))


def _sample_spec(location: str, key: str, members: list[tarfile.TarInfo], total: int) -> InputSpec:
    chosen = next((m for m in members if media_extension(_KEY.match(m.name).group(2))), None)
    if chosen is None:
        names = ", ".join(m.name for m in members)
        error = f"sample {key!r} has no image or video member (members: {names})"
        return InputSpec(tar_path(members[0].name, location), error, extra={"id": key})
    path = tar_path(chosen.name, location)
    end = chosen.offset_data + chosen.size
    if end > total:
        error = f"the member ends at byte {end}, past the end of the shard ({total} bytes): the shard is truncated"
        return InputSpec(path, error, extra={"id": key})
    return InputSpec(path, ref=TarMember(location, chosen.name, chosen.offset_data, chosen.size), extra={"id": key})
