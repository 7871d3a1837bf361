"""Where the readers of ``hevc-vit encode`` meet odd local inputs: tar members that are links, duplicates or
devices; content whose name lies about it; a huge stray file; every input type of the Python API and hostile
ones; brace patterns too large to expand; img2dataset folders and webdataset samples with sidecars.

Each test compares an odd input with the plain one it stands for (the same bytes as a loose file)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit.encode import encode, read_index
from hevc_vit.encode.readers.expand import (
    MAX_BRACE_NAMES,
    SourceOptions,
    count_braces,
    expand_braces,
    expand_inputs,
    sample_inputs,
)
from hevc_vit.media.sniff import sniff
from hevc_vit.processing.processors import NativeResolutionProcessor
from tests.helpers import assert_close_rel, cli_args, features_by_path, subprocess_env, write_tar

PROC = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48, max_video_tokens=96)
OPTIONS = dict(processor=PROC, frames=4, workers=0, progress=False, log=lambda m: None)


def _jpeg(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def _encode(inputs, out: Path, model, **extra):
    result = encode(inputs, out, model=model, **{**OPTIONS, **extra})
    return result, read_index(out)


def _features(out: Path, path: str) -> torch.Tensor:
    return features_by_path(out)[path]["patches"]


# ---------------------------------------------------------------------------------------------------------------
# 1. every tar member has a row
# ---------------------------------------------------------------------------------------------------------------


def test_every_tar_member_has_a_row_links_read_inside_the_shard(model, tmp_path):
    a, b, c = _jpeg(40, 30, 0), _jpeg(30, 50, 1), _jpeg(44, 44, 2)
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "d", kind=tarfile.DIRTYPE)  # a folder entry: its files are members of their own
        _add(tar, "d/000.jpg", a)
        _add(tar, "001.jpg", kind=tarfile.LNKTYPE, link="d/000.jpg")  # as GNU tar writes a hard-linked file
        _add(tar, "d/002.jpg", kind=tarfile.SYMTYPE, link="../003.jpg")  # points forward, inside the shard
        _add(tar, "003.jpg", b)
        _add(tar, "004.jpg", kind=tarfile.SYMTYPE, link="../outside.jpg")  # leaves the shard
        _add(tar, "005.jpg", kind=tarfile.SYMTYPE, link=str(tmp_path / "outside.jpg"))  # absolute
        _add(tar, "006.jpg", kind=tarfile.SYMTYPE, link="nothing.jpg")  # dangling
        _add(tar, "007.jpg", kind=tarfile.SYMTYPE, link="008.jpg")  # a loop of links
        _add(tar, "008.jpg", kind=tarfile.SYMTYPE, link="007.jpg")
        _add(tar, "009.jpg", c)  # a name held twice
        _add(tar, "009.jpg", a)
        _add(tar, "010.jpg", kind=tarfile.LNKTYPE, link="009.jpg")  # a link to the ambiguous name
        _add(tar, "011.jpg", kind=tarfile.FIFOTYPE)
        _add(tar, "012.jpg", kind=tarfile.CHRTYPE)
        _add(tar, "013.jpg", kind=tarfile.LNKTYPE, link="nothing.jpg")  # a hard link to no member
        _add(tar, "._014.jpg", a)  # a hidden name (macOS writes these): skipped, as in folders
    (tmp_path / "outside.jpg").write_bytes(c)  # exists on the disk: must never be read through the shard
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.jpg").write_bytes(a)
    (loose / "b.jpg").write_bytes(b)
    _encode([shard, loose], tmp_path / "out", model)
    rows = {r["path"].split("::")[0].removeprefix("tar://"): r for r in read_index(tmp_path / "out")}
    names = [f"{i:03d}.jpg" for i in range(14) if i not in (0, 2)] + ["d/000.jpg", "d/002.jpg", "009.jpg#2"]
    assert set(rows) == set(names) | {str(loose / "a.jpg"), str(loose / "b.jpg")}  # the folder entry: no row
    out = tmp_path / "out"
    for name, same_as in (("d/000.jpg", "a.jpg"), ("001.jpg", "a.jpg"), ("d/002.jpg", "b.jpg"), ("003.jpg", "b.jpg")):
        assert rows[name]["status"] == "ok", rows[name]
        assert torch.equal(_features(out, rows[name]["path"]), _features(out, str(loose / same_as))), name
    reasons = {
        "004.jpg": "outside the shard",
        "005.jpg": "outside the shard",
        "006.jpg": "dangling",
        "007.jpg": "loop",
        "008.jpg": "loop",
        "009.jpg": "2 members of this shard are named '009.jpg'",
        "009.jpg#2": "2 members of this shard are named '009.jpg'",
        "010.jpg": "a name 2 members of this shard have",
        "011.jpg": "a fifo member, not a file",
        "012.jpg": "a character device member, not a file",
        "013.jpg": "dangling",
    }
    for name, reason in reasons.items():
        assert rows[name]["status"] == "failed" and reason in rows[name]["error"], rows[name]


# ---------------------------------------------------------------------------------------------------------------
# 2. the content decides, the name is a hint
# ---------------------------------------------------------------------------------------------------------------


def test_the_content_decides_what_an_input_is_not_its_name(model, tmp_path):
    pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")
    png, clip = _jpeg(50, 40, 3, "PNG"), next(p for p in sample_inputs() if p.suffix == ".mp4").read_bytes()
    frames = [(f"{i:03d}.jpg", _jpeg(32, 32, i)) for i in range(8)]
    (tmp_path / "in").mkdir()
    plain, named = tmp_path / "plain", tmp_path / "in"
    plain.mkdir()
    (plain / "image.png").write_bytes(png)
    (plain / "clip.mp4").write_bytes(clip)
    write_tar(named / "clip.mp4", frames)  # a tar of same-size JPEGs under a video name
    (named / "image.mp4").write_bytes(png)
    (named / "video.jpg").write_bytes(clip)
    (named / "text.jpg").write_text("not an image\n")
    write_tar(tmp_path / "shard.tar", [("000.mp4", (named / "clip.mp4").read_bytes()), ("001.mp4", png)])
    _, rows = _encode([plain, named, tmp_path / "shard.tar"], tmp_path / "out", model)
    by_name = {r["path"].split("::")[0].rsplit("/", 1)[-1]: r for r in rows}
    out = tmp_path / "out"
    for name in ("clip.mp4", "000.mp4"):
        row = by_name[name] if name == "000.mp4" else next(r for r in rows if r["path"] == str(named / "clip.mp4"))
        assert row["status"] == "failed" and "a tar archive, not an image or a video" in row["error"], row
    for name, same_as, kind in (("image.mp4", "image.png", "image"), ("001.mp4", "image.png", "image")):
        assert by_name[name]["status"] == "ok" and by_name[name]["kind"] == kind, by_name[name]
        assert torch.equal(_features(out, by_name[name]["path"]), _features(out, str(plain / same_as)))
    video = next(r for r in rows if r["path"] == str(named / "video.jpg"))
    assert video["status"] == "ok" and video["kind"] == "video", video
    assert torch.equal(_features(out, video["path"]), _features(out, str(plain / "clip.mp4")))
    assert by_name["text.jpg"]["status"] == "failed" and "its content is text" in by_name["text.jpg"]["error"]


def test_content_without_a_magic_number_goes_by_pillow_then_the_video_decoder(model, tmp_path):
    pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")
    png = _jpeg(36, 28, 9, "PNG")
    (tmp_path / "a.png").write_bytes(png)
    Image.open(io.BytesIO(png)).save(tmp_path / "a.dat", "TGA")  # TGA has no magic number: Pillow decides
    (tmp_path / "zeros.mp4").write_bytes(bytes(10_000))  # a video name, no video inside
    _, rows = _encode([tmp_path / "a.png", tmp_path / "a.dat", tmp_path / "zeros.mp4"], tmp_path / "out", model)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"] and "PyAV" in rows[2]["error"], rows
    assert torch.equal(_features(tmp_path / "out", rows[1]["path"]), _features(tmp_path / "out", rows[0]["path"]))


def test_sniff_names_the_usual_formats_from_their_first_bytes(tmp_path):
    for fmt, kind in (("JPEG", "image"), ("PNG", "image"), ("GIF", "image"), ("WEBP", "image"), ("TIFF", "image")):
        assert sniff(_jpeg(8, 8, 0, fmt)[:4096]).kind == kind, fmt
    assert sniff(_jpeg(8, 8, 0, "BMP")).kind == "image"
    tar = write_tar(tmp_path / "x.bin", [("a.jpg", b"x")]).read_bytes()
    assert sniff(tar[:4096]).what == "tar"
    assert sniff(b"\x00\x00\x00\x18ftypmp42" + bytes(100)).kind == "video"
    assert sniff(b"\x1aE\xdf\xa3" + bytes(100)).kind == "video"
    assert sniff(b"RIFF\x00\x00\x00\x00AVI LIST").kind == "video"
    assert sniff(bytes([0x47] + [0] * 187) * 3).kind == "video"  # MPEG-TS: a sync byte every 188
    assert sniff(b"hello\n").what == "text" and sniff(bytes(4096)).kind == ""
    assert sniff(b"BMW and MZ are text here\n").what == "text" and sniff(b"%PDF-1.7\n\x00").kind == "other"


# ---------------------------------------------------------------------------------------------------------------
# 3. a huge stray file is sniffed, never read whole
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_2gb_stray_file_is_a_failed_row_read_by_its_first_bytes(ckpt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_jpeg(40, 40, 0))
    with open(folder / "backup.iso", "wb") as f:
        f.truncate(2 * 1024**3)  # sparse: no disk used
    # the encode runs in a child of a fresh interpreter, so that interpreter's RUSAGE_CHILDREN is the encode's alone
    args = cli_args(folder, tmp_path / "out", ckpt)
    code = (
        "import resource, subprocess, sys; "
        f"rc = subprocess.run([sys.executable, '-m', 'hevc_vit', *{args!r}], stdout=sys.stderr, timeout=600)"
        ".returncode; "
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    rc, peak_kib = map(int, done.stdout.split())
    rows = {Path(r["path"]).name: r for r in read_index(tmp_path / "out")}
    assert rc == 1 and rows["a.jpg"]["status"] == "ok" and rows["backup.iso"]["status"] == "failed", done.stderr
    assert "not an image or a video" in rows["backup.iso"]["error"]
    assert peak_kib < 600 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"  # 2.4 GiB when the file was read whole


# ---------------------------------------------------------------------------------------------------------------
# 4. every input type of the Python API, and hostile ones
# ---------------------------------------------------------------------------------------------------------------


def test_bytes_and_streams_encode_like_the_file_they_hold(model, tmp_path):
    data = _jpeg(46, 38, 5)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    with open(path, "rb") as opened:
        inputs = [data, bytearray(data), memoryview(data), io.BytesIO(data), opened, b""]
        result, rows = _encode(inputs, tmp_path / "out", model)
    _, ref = _encode(path, tmp_path / "ref", model)
    want = _features(tmp_path / "ref", str(path))
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed"] and "empty" in rows[5]["error"]
    for row in rows[:5]:
        assert_close_rel(_features(tmp_path / "out", row["path"]), want, what=row["path"])  # packed differently
        assert row["size"] == ref[0]["size"]
    single, _ = _encode(data, tmp_path / "single", model)  # one bytes object is one input, as one path is
    assert single.encoded == 1


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("", ValueError, r"inputs\[0\] is an empty string"),
        ("   ", ValueError, r"inputs\[0\] is '   ', only whitespace"),
        ([None], TypeError, r"inputs\[0\] is None \(NoneType\); expected a path"),
        (["ok.jpg", 7], TypeError, r"inputs\[1\] is 7 \(int\)"),
        ([["a.jpg", "b.jpg"]], TypeError, r"inputs\[0\] is \['a.jpg', 'b.jpg'\] \(list\)"),
        ([b"a.jpg".decode(), io.StringIO("x")], TypeError, r"inputs\[1\] .* \(StringIO\)"),
    ],
)
def test_hostile_inputs_are_errors_naming_them(model, tmp_path, value, error, match):
    with pytest.raises(error, match=match):
        encode(value, tmp_path / "out", model=model, **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_paths_with_spaces_unicode_and_newlines_are_paths(model, tmp_path):
    data = _jpeg(40, 40, 6)
    names = ["with space.jpg", "ünïcødé 写真.jpg", "new\nline.jpg", "[brackets] {braces}.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(data)
    result, rows = _encode([tmp_path / n for n in names], tmp_path / "out", model)
    assert result.encoded == len(names) and [Path(r["path"]).name for r in rows] == names
    patches = [_features(tmp_path / "out", r["path"]) for r in rows]
    assert all(torch.equal(p, patches[0]) for p in patches)


def test_a_csv_header_with_a_quoted_newline_and_blank_paths(model, tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
    (tmp_path / "a.jpg").write_bytes(_jpeg(40, 40, 7))
    (tmp_path / "list.csv").write_text('"note\non two lines",path\n"x\ny",a.jpg\nz,"   "\n')
    result, rows = _encode(tmp_path / "list.csv", tmp_path / "out", model, keep_columns=("note\non two lines",))
    assert [r["status"] for r in rows] == ["ok", "failed"] and rows[0]["note\non two lines"] == "x\ny"
    assert "'   ', only whitespace" in rows[1]["error"] and "a str" not in rows[1]["error"]


# ---------------------------------------------------------------------------------------------------------------
# 5. brace patterns too large to expand
# ---------------------------------------------------------------------------------------------------------------


def test_brace_counts_match_the_expansion():
    for pattern in ("a{0..9}b{x,y,z}", "{09..11}/{1..3}.tar", "{a}{b,c}", "plain", "{5..1}{,,}", "{a,{b,c}}{1..2}"):
        assert count_braces(pattern) == len(expand_braces(pattern)), pattern


@pytest.mark.parametrize("pattern", ["d/{0..3000000}.tar", "d/{0000..2047}-{0000..2047}.tar"])
def test_a_brace_pattern_over_the_limit_exits_2_naming_it(tmp_path, capsys, pattern):
    from hevc_vit.cli import main as cli_main

    count = count_braces(pattern)
    assert count > MAX_BRACE_NAMES
    with pytest.raises(ValueError, match=f"expands to {count:,} names; at most {MAX_BRACE_NAMES:,}"):
        expand_inputs([str(tmp_path / pattern)])
    assert cli_main(["encode", str(tmp_path / pattern), "--out", str(tmp_path / "out"), "-q"]) == 2
    assert f"{count:,} names" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# 6. sidecars are columns, never failed inputs
# ---------------------------------------------------------------------------------------------------------------


def _img2dataset_folder(root: Path, blobs: list[bytes]) -> Path:
    shard = root / "00000"
    shard.mkdir(parents=True)
    for i, data in enumerate(blobs):
        (shard / f"{i:09d}.jpg").write_bytes(data)
        (shard / f"{i:09d}.txt").write_text(f"caption {i}\nsecond line")
        (shard / f"{i:09d}.json").write_text(json.dumps({"caption": f"caption {i}", "width": 40 + i}))
    pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(len(blobs))]}), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": len(blobs)}))
    return root


def test_an_img2dataset_folder_keeps_its_sidecars_as_columns(model, tmp_path):
    blobs = [_jpeg(40 + i, 40, i) for i in range(3)]
    root = _img2dataset_folder(tmp_path / "data", blobs)
    result, rows = _encode(root, tmp_path / "out", model, keep_columns=("txt", "json"))
    assert result.failed == 0 and result.encoded == 3, rows
    assert [Path(r["path"]).name for r in rows] == [f"{i:09d}.jpg" for i in range(3)]
    assert [r["txt"] for r in rows] == [f"caption {i}\nsecond line" for i in range(3)]
    assert [r["json"] for r in rows] == [{"caption": f"caption {i}", "width": 40 + i} for i in range(3)]
    plain, plain_rows = _encode(root, tmp_path / "plain", model)  # not asked: no columns, still no failed rows
    assert plain.failed == 0 and all("txt" not in r for r in plain_rows)
    for row in rows:
        assert torch.equal(_features(tmp_path / "out", row["path"]), _features(tmp_path / "plain", row["path"]))


def test_a_webdataset_sample_keeps_its_txt_and_json_members(model, tmp_path):
    blobs = [_jpeg(40, 30 + i, i) for i in range(3)]
    members = []
    for i, data in enumerate(blobs):
        members += [(f"{i:06d}.jpg", data), (f"{i:06d}.txt", f"caption {i}".encode())]
        if i != 1:  # a sample without its json: the column is left out of its row
            members.append((f"{i:06d}.json", json.dumps({"i": i}).encode()))
    members.append(("000003.json", b"{not json"))
    members.append(("000003.jpg", blobs[0]))
    write_tar(tmp_path / "shard.tar", members)
    result, rows = _encode(tmp_path / "shard.tar", tmp_path / "out", model, keep_columns=("txt", "json"))
    assert [r["txt"] for r in rows[:3]] == [f"caption {i}" for i in range(3)]
    assert rows[0]["json"] == {"i": 0} and "json" not in rows[1] and rows[2]["json"] == {"i": 2}
    assert rows[3]["status"] == "failed" and "the json sidecar is not valid JSON" in rows[3]["error"]
    assert result.failed == 1 and result.encoded == 3


def test_folder_sidecars_and_metadata_are_not_inputs_but_a_stray_text_file_is(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    for name in ("a.txt", "a.json", "a.cls", "meta.parquet", "stats.json", "notes.txt", "b.iso"):
        (tmp_path / name).write_text("1")
    (tmp_path / "a.caption").write_text("named by --keep-columns")
    specs = expand_inputs([tmp_path])
    assert sorted(Path(s.path).name for s in specs) == ["a.caption", "a.jpg", "b.iso", "notes.txt"]
    assert [s.sidecars for s in specs if s.path.endswith("a.jpg")] == [{}]
    kept = expand_inputs([tmp_path], sources=SourceOptions(keep_columns=("caption", "txt")))
    assert sorted(Path(s.path).name for s in kept) == ["a.jpg", "b.iso", "notes.txt"]
    (jpg,) = [s for s in kept if s.path.endswith("a.jpg")]
    assert jpg.sidecars == {"caption": str(tmp_path / "a.caption"), "txt": str(tmp_path / "a.txt")}
