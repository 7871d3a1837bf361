"""Webdataset shards on their own: samples by key, links, duplicate names, truncated and empty shards."""

from __future__ import annotations

import io
import tarfile

from hevc_vit.encode.readers.fetch import fetch
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import TarMember, split_tar_path
from hevc_vit.encode.readers.tar import is_tar_shard, list_tar, media_extension
from tests.helpers import write_tar


def test_media_extension_takes_the_last_part():
    assert media_extension("jpg") and media_extension("left.JPG") and media_extension("mp4")
    assert not media_extension("txt") and not media_extension("jpg.txt")
    assert is_tar_shard("a/B.TAR") and not is_tar_shard("a.tar.gz")


def test_samples_by_key_with_sidecars_read_with_one_seek(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [("d/1.jpg", b"JPEG1"), ("d/1.txt", b"cap1"), ("d/2.json", b"{}"), ("d/2.png", b"PNG2"), ("d/3.txt", b"x")],
    )
    specs = list_tar(str(shard), Network(), keep_columns=("txt",))
    assert [split_tar_path(s.path)[0] for s in specs] == ["d/1.jpg", "d/2.png", "d/3.txt"]
    assert [s.extra["id"] for s in specs] == ["d/1", "d/2", "d/3"]
    first, second, third = specs
    assert first.error == "" and isinstance(first.ref, TarMember)
    assert fetch(first.ref, [], Network()).data == b"JPEG1"  # the offset and size the listing found
    assert fetch(first.sidecars["txt"], [], Network()).data == b"cap1"
    assert second.sidecars == {}  # json is not kept
    assert third.error == "sample 'd/3' has no image or video member (members: d/3.txt)"


def test_links_and_duplicate_names_become_failed_rows(tmp_path):
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.jpg", b"A"), ("dup.jpg", b"1"), ("dup.jpg", b"2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in [("b.jpg", "a.jpg"), ("out.jpg", "../etc/x.jpg"), ("gone.jpg", "nothing.jpg")]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    specs = {split_tar_path(s.path)[0]: s for s in list_tar(str(path), Network())}
    assert fetch(specs["b.jpg"].ref, [], Network()).data == b"A"  # a link inside the shard is followed
    assert "outside the shard" in specs["out.jpg"].error
    assert "dangling" in specs["gone.jpg"].error
    assert "2 members of this shard are named 'dup.jpg'" in specs["dup.jpg"].error
    assert "number 2" in specs["dup.jpg#2"].error


def test_an_empty_a_truncated_and_a_non_tar_shard_say_so(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert list_tar(str(empty), Network())[0].error == "empty file (0 bytes): not a tar shard"
    full = write_tar(tmp_path / "full.tar", [("1.jpg", b"x" * 2000), ("2.jpg", b"y" * 2000)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[:3500])  # headers at 0 and 2560: inside the second data
    specs = list_tar(str(cut), Network())
    assert specs[0].error == ""
    assert "past the end of the shard (3500 bytes): the shard is truncated" in specs[1].error
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert "not a readable tar shard" in list_tar(str(junk), Network())[0].error
