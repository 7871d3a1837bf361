"""Where an input's bytes are read from: :func:`fetch` for each kind of ref (a tar member by offset, a URL through
fsspec, a row held in memory), and its refusal of a bare path."""

from __future__ import annotations

import pytest

from hevc_vit.encode.readers.fetch import fetch
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import MemoryRow, RemoteFile, TarMember


def test_fetch_reads_a_member_by_its_offset_and_a_memory_row(tmp_path):
    shard = tmp_path / "s.bin"
    shard.write_bytes(b"headerPAYLOADtrailer")
    got = fetch(TarMember(str(shard), "a.jpg", offset=6, size=7), [], Network())
    assert (got.name, got.data) == ("a.jpg", b"PAYLOAD")
    got = fetch(RemoteFile(shard.as_uri()), [], Network(retries=0))  # file:// through fsspec
    assert got.data == shard.read_bytes()
    got = fetch(MemoryRow(source=1, row=0), [[b"x"], [b"\x89PNG"]], Network())
    assert got.data == b"\x89PNG"
    with pytest.raises(TypeError, match="ref is a str"):
        fetch("a.jpg", [], Network())
