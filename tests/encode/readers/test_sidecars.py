"""Sidecars on their own: which files of a folder are inputs, and a sidecar's bytes as its row's value."""

from __future__ import annotations

import json

import pytest

from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.sidecars import (
    MAX_SIDECAR_BYTES,
    folder_inputs,
    read_sidecars,
    sidecar_value,
    split_name,
)
from hevc_vit.encode.readers.spec import MemoryRow


def test_split_name_splits_at_the_first_dot():
    assert split_name("000123.seg.txt") == ("000123", "seg.txt")
    assert split_name("README") == ("README", "")


def test_folder_inputs_leaves_sidecars_and_metadata_out():
    names = ["1.jpg", "1.txt", "1.json", "2.png", "2.caption", "notes.txt", "00000.parquet", "00000_stats.json"]
    got = folder_inputs(names, keep=("txt", "caption"))
    # 1.txt/1.json are 1.jpg's sidecars, 2.caption is kept so a sidecar; notes.txt has no image: an input that fails
    assert got == [
        ("1.jpg", {"txt": "1.txt"}),
        ("2.png", {"caption": "2.caption"}),
        ("notes.txt", {"txt": "notes.txt"}),
    ]
    assert [name for name, _ in folder_inputs(names, keep=())] == ["1.jpg", "2.png", "2.caption", "notes.txt"]


def test_sidecar_value_by_extension_and_its_errors():
    assert sidecar_value("txt", "a caption é".encode()) == "a caption é"
    assert sidecar_value("json", json.dumps({"w": 3}).encode()) == {"w": 3}
    assert sidecar_value("seg.cls", b" 7\n") == 7
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 0xff at 1\)"):
        sidecar_value("txt", b"a\xff")
    with pytest.raises(ValueError, match="the json sidecar is not valid JSON"):
        sidecar_value("json", b"{")
    with pytest.raises(ValueError, match="holds 'cat'; expected an integer class"):
        sidecar_value("cls", b"cat")
    with pytest.raises(ValueError, match=f"more than the {MAX_SIDECAR_BYTES}"):
        sidecar_value("txt", b"x" * (MAX_SIDECAR_BYTES + 1))


def test_read_sidecars_from_a_file_and_from_memory(tmp_path):
    (tmp_path / "1.txt").write_text("from a file")
    memory = [[b'{"k": 1}']]
    got = read_sidecars({"txt": str(tmp_path / "1.txt"), "json": MemoryRow(0, 0)}, memory, Network())
    assert got == {"txt": "from a file", "json": {"k": 1}}
