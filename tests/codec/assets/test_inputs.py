"""Inputs of a codec-assets run: the reference's jsonl job list, plain files, folders and globs, keys."""

from __future__ import annotations

import json

import pytest

from hevc_vit.codec.assets import Job, expand_jobs, read_job_list


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_job_list_keeps_fields_skips_missing_and_names_broken_lines(tmp_path):
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"video": "/v/a.mp4", "key": "ka", "conversations": [{"from": "human", "value": "<image>"}]},
            {"video": "/v/b.mp4", "key": "kb", "exists": False},
            {"video": "/v/d.mp4", "key": "kd", "exists": 0},  # any false value, as the reference
            "",
            {"video": "/v/c.mp4"},
        ],
    )
    got = read_job_list(jobs)
    assert [(j.key, j.video) for j in got] == [("ka", "/v/a.mp4"), ("c", "/v/c.mp4")]
    assert got[0].fields["conversations"][0]["value"] == "<image>" and got[0].source == f"{jobs}:1"
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"video": "a.mp4", "key": "a"}, '{"video": "b.mp4", '])
    with pytest.raises(ValueError, match=r"broken.jsonl line 2 is not valid JSON"):
        expand_jobs([broken])
    other = write_jsonl(tmp_path / "other.jsonl", [{"path": "a.mp4", "id": 7}])
    with pytest.raises(ValueError, match=r"other.jsonl line 1 has no string 'video'"):
        expand_jobs([other])
    assert [(j.key, j.video) for j in expand_jobs([other], key_column="id", path_column="path")] == [("7", "a.mp4")]


def test_plain_files_folders_and_globs_get_unique_stem_keys(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for name in ("x/clip.mp4", "y/clip.mp4", "y/other.mkv", "y/notes.txt", "clip-2.mp4"):
        (tmp_path / name).write_bytes(b"")
    jobs = expand_jobs([tmp_path / "x", str(tmp_path / "y" / "*.m*"), tmp_path / "clip-2.mp4"])
    assert [(j.key, j.video.replace(str(tmp_path), "")) for j in jobs] == [
        ("clip", "/x/clip.mp4"),
        ("clip-3", "/y/clip.mp4"),  # clip-2 is a real stem given later: never taken by the de-duplication
        ("other", "/y/other.mkv"),
        ("clip-2", "/clip-2.mp4"),
    ]
    assert expand_jobs([Job("k", "v.mp4")]) == [Job("k", "v.mp4")]
    with pytest.raises(ValueError, match="matches no file"):
        expand_jobs([str(tmp_path / "*.webm")])
