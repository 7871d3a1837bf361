"""Every file-name extension set the package decides by, and the file types it refuses, in one place (a leaf: it
imports nothing from the package).

Extensions with a dot (``.mp4``) are what :func:`os.path.splitext` returns; webdataset's extensions are without it
(``jpg``, the part after a sample key's first dot). A name's extension is only a hint: :mod:`.sniff` decides what
the content is by its first bytes.
"""

from __future__ import annotations

import stat

VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .flv .wmv .3gp .ogv".split())
IMAGE_EXTENSIONS = frozenset("jpg jpeg png webp bmp gif tif tiff ppm pgm pbm pnm jp2 j2k avif".split())  # no dot
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | {e.lstrip(".") for e in VIDEO_EXTENSIONS}  # no dot: a webdataset member's
TAR_EXTENSION = ".tar"  # a webdataset shard (uncompressed)
TABLE_EXTENSIONS = (".parquet", ".csv", ".tsv", ".jsonl")  # a tuple: str.endswith takes it
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})  # a text file listing one input per line
SIDECAR_EXTENSIONS = frozenset({"txt", "json", "cls"})  # no dot; the last part of the extension: "seg.txt" counts
METADATA_EXTENSIONS = frozenset({"parquet", "csv", "tsv", "jsonl", "json"})  # no dot: a folder's metadata tables
# a URL path ending in one of these names a file: it is read when its turn comes, not looked up while listing
FILE_SUFFIXES = frozenset({f".{e}" for e in MEDIA_EXTENSIONS} | set(TABLE_EXTENSIONS) | {TAR_EXTENSION})


def special_file(mode: int) -> str:
    """What a file of this ``st_mode`` is when it is not a regular file (a named pipe, a device, a socket), else
    "": a reader refuses such a file unopened, since opening a FIFO waits for a writer forever."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), f"a special file (mode {stat.filemode(mode)})")
