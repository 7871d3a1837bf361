"""The output folder's lock on its own: exclusive, names its holder, leaves nothing behind."""

from __future__ import annotations

import json
import os

import pytest

from hevc_vit.encode.output.index import LOCK_NAME
from hevc_vit.encode.output.lock import FolderLock


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with FolderLock.acquire(tmp_path / "out") as lock:
        holder = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and lock.path == tmp_path / "out" / LOCK_NAME
        with pytest.raises(FileExistsError, match=rf"in use by another hevc-vit encode run \(pid {os.getpid()} on"):
            FolderLock.acquire(tmp_path / "out")  # another open file description: flock refuses it
    assert not (tmp_path / "out").exists()  # release removed the lock file and the folders it made
    FolderLock.acquire(tmp_path / "out").release()  # free again


def test_release_keeps_folders_that_hold_something_and_is_idempotent(tmp_path):
    lock = FolderLock.acquire(tmp_path / "a" / "b")
    (tmp_path / "a" / "b" / "index.jsonl").write_text("")
    lock.release()
    lock.release()
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["index.jsonl"]
