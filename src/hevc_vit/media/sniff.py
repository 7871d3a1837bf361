"""What an input holds, from its first bytes: an image, a video, an archive, text, or unknown.

The loader decides how to decode an input by its content, never by its name alone: a tar of JPEGs named
``clip.mp4`` is an archive (refused, never handed to the video decoder), a PNG named ``clip.mp4`` is an image, an
MP4 named ``photo.jpg`` is a video. The extension is only a hint, for content that no magic number here names
(then a video extension sends it to the video decoder, anything else to Pillow and then the video decoder).
Only ``HEAD_BYTES`` are read to decide, so a stray 2 GB file costs a few kilobytes, not its size in memory.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass

HEAD_BYTES = 4096  # the prefix every decision is made from

_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
)
_VIDEO_MAGIC = (
    (b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (b"OggS", "Ogg"),
    (b"FLV\x01", "FLV"),
    (b"0&\xb2u\x8ef\xcf\x11", "ASF/WMV"),
    (b"\x00\x00\x01\xba", "MPEG program stream"),
    (b"\x00\x00\x01\xb3", "MPEG video"),
)
_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"(\xb5/\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!", "rar"),
)
_OTHER_MAGIC = ((b"%PDF", "a PDF document"), (b"\x7fELF", "an ELF executable"))
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}  # the DIB header's size, right after the 14-byte file header
_HEIF_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1"}
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_TS_PACKET = 188


@dataclass(frozen=True)
class Sniffed:
    """kind: ``image``, ``video``, ``archive``, ``other`` (text, documents, executables, audio) or ``""`` (no
    format known here); what: the format in words (``JPEG``, ``MP4/MOV``, ``tar``, ``text``)."""

    kind: str
    what: str = ""


def sniff(head: bytes) -> Sniffed:
    """The kind of content that starts with ``head`` (its first ``HEAD_BYTES``, or all of it when shorter)."""
    for table, kind in ((_IMAGE_MAGIC, "image"), (_VIDEO_MAGIC, "video"), (_ARCHIVE_MAGIC, "archive")):
        for magic, what in table:
            if head.startswith(magic):
                return Sniffed(kind, what)
    if head[:4] == b"RIFF" and len(head) >= 12:
        form = head[8:12]
        if form == b"WEBP":
            return Sniffed("image", "WebP")
        if form in (b"AVI ", b"AVIX"):
            return Sniffed("video", "AVI")
        return Sniffed("other", f"a RIFF {form.decode('latin-1').strip()} file (audio or other data)")
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return Sniffed("image", "BMP")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return Sniffed("image", "HEIF/AVIF") if brand in _HEIF_BRANDS else Sniffed("video", "MP4/MOV")
    if head[4:8] in _QUICKTIME_ATOMS:
        return Sniffed("video", "QuickTime")
    if _is_transport_stream(head):
        return Sniffed("video", "MPEG transport stream")
    if _is_tar(head):
        return Sniffed("archive", "tar")
    for magic, what in _OTHER_MAGIC:
        if head.startswith(magic):
            return Sniffed("other", what)
    if _is_text(head):
        return Sniffed("other", "text")
    return Sniffed("")


def _is_transport_stream(head: bytes) -> bool:
    for start, size in ((0, _TS_PACKET), (4, _TS_PACKET + 4)):  # .ts, and .m2ts (a 4-byte timestamp per packet)
        syncs = head[start::size][: len(head) // size]
        if len(syncs) >= 2 and set(syncs) == {0x47}:
            return True
    return False


def _is_tar(head: bytes) -> bool:
    """A tar header: ``ustar`` at byte 257, or an old (v7) header whose checksum holds."""
    if head[257:262] == b"ustar":
        return True
    if len(head) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(head[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"  # a character cut by the prefix
    return True


def read_head(source: str | os.PathLike | io.BytesIO) -> bytes:
    """The first ``HEAD_BYTES`` of a file, or of in-memory bytes (without copying the rest)."""
    if isinstance(source, io.BytesIO):
        with source.getbuffer() as view:
            head = view[:HEAD_BYTES]
            data = head.tobytes()
            head.release()
        return data
    with open(source, "rb") as f:
        return f.read(HEAD_BYTES)


def refusal(found: Sniffed, name: str) -> str:
    """Why content sniffed as ``found`` (an archive, text, ..., or an image Pillow cannot open) is not encoded."""
    suffix = os.path.splitext(name)[1].lower()
    named = f", whatever its name's {suffix} says" if suffix else ""
    if found.kind == "image":
        return f"a {found.what} image (by its content{named}) that Pillow cannot open"
    if found.kind == "archive":
        return (
            f"a {found.what} archive, not an image or a video (by its content{named}); a webdataset shard is "
            f"listed, one input per sample, when its name ends in .tar"
        )
    return f"not an image or a video: its content is {found.what}" + (f" ({named[2:]})" if named else "")
