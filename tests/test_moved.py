"""The old module names of :data:`hevc_vit.moved.MOVED`: each imports the very module at its new place (the same
object, not a copy), attributes are reached through an old name, and no file is loaded twice."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

from hevc_vit.moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_name_imports_its_new_module_itself(old):
    new = MOVED[old]
    assert importlib.import_module(old) is importlib.import_module(new)
    assert sys.modules[old] is sys.modules[new]


def test_no_file_is_loaded_twice():
    for old in sorted(MOVED):
        importlib.import_module(old)
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if module is None or not path or not name.startswith("hevc_vit"):
            continue
        by_file.setdefault(os.path.realpath(path), []).append(name)
    twice = {
        path: names
        for path, names in by_file.items()
        if len({id(sys.modules[name]) for name in names}) > 1  # two module objects made from one file
    }
    assert not twice, f"files loaded as more than one module object: {twice}"


def test_an_attribute_through_an_old_name_is_the_new_one():
    from hevc_vit.llava.towers import HEVCViTPackingVisionTower as new
    from hevc_vit.towers import HEVCViTPackingVisionTower as old

    assert old is new
    from hevc_vit.encode.items import split_tar_path as through_old  # a module of encode/ renamed into readers/
    from hevc_vit.encode.readers.spec import split_tar_path

    assert through_old is split_tar_path


def test_a_monkeypatch_through_an_old_name_reaches_the_new_module(monkeypatch):
    import hevc_vit.encode.readers.remote as remote
    import hevc_vit.encode.remote as old_remote

    monkeypatch.setattr(old_remote, "RETRY_PAUSE", 123.0)
    assert remote.RETRY_PAUSE == 123.0  # one module object: a patch through either name is seen by both
