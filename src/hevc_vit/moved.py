"""Modules that moved, by their old names: ``import hevc_vit.towers`` keeps working after round 3 put the towers in
:mod:`hevc_vit.llava`. The one list of every such name; an old name imports the very module at its new place (the
same object: its functions, classes and monkeypatches are shared), nothing is copied.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED = {
    # round 3: the towers and projector in llava/, checkpoints and bench as packages
    "hevc_vit.towers": "hevc_vit.llava.towers",
    "hevc_vit.tower_base": "hevc_vit.llava.base",
    "hevc_vit.tower_config": "hevc_vit.llava.config",
    "hevc_vit.tower_inputs": "hevc_vit.llava.inputs",
    "hevc_vit.projector": "hevc_vit.llava.projector",
    "hevc_vit.checkpoint_io": "hevc_vit.checkpoints.io",
    "hevc_vit.weight_names": "hevc_vit.checkpoints.names",
    "hevc_vit.architecture": "hevc_vit.checkpoints.architecture",
    "hevc_vit.bench_measure": "hevc_vit.bench.measure",
    "hevc_vit.bench_dtypes": "hevc_vit.bench.dtypes",
    "hevc_vit.bench_pipeline": "hevc_vit.bench.pipeline",
    # round 3: the top level keeps the model core; the rest joined the packages of its concern
    "hevc_vit.devices": "hevc_vit.runtime.devices",
    "hevc_vit.calibration": "hevc_vit.runtime.calibration",
    "hevc_vit.loading": "hevc_vit.checkpoints.pretrained",
    "hevc_vit.embedded": "hevc_vit.checkpoints.embedded",
    "hevc_vit.image_processing": "hevc_vit.processing.image_processing",
    # round 3: the Ray engine beside the local one
    "hevc_vit.ray": "hevc_vit.encode.engines.ray",
    "hevc_vit.ray.cluster": "hevc_vit.encode.engines.ray.cluster",
    "hevc_vit.ray.dataset": "hevc_vit.encode.engines.ray.dataset",
    "hevc_vit.ray.folder": "hevc_vit.encode.engines.ray.run",
    "hevc_vit.ray.stages": "hevc_vit.encode.engines.ray.stages",
    "hevc_vit.ray.watchdog": "hevc_vit.encode.engines.ray.watchdog",
    # round 3: encode by stage; processors, pixels and media below encode
    "hevc_vit.encode.processing": "hevc_vit.processing.processors",
    "hevc_vit.encode.processor_files": "hevc_vit.processing.files",
    "hevc_vit.encode.pixels": "hevc_vit.processing.pixels",
    "hevc_vit.encode.video": "hevc_vit.media.video",
    "hevc_vit.encode.video_torchcodec": "hevc_vit.media.video_torchcodec",
    "hevc_vit.encode.sniff": "hevc_vit.media.sniff",
    "hevc_vit.encode.items": "hevc_vit.encode.readers.spec",
    "hevc_vit.encode.remote": "hevc_vit.encode.readers.remote",
    "hevc_vit.encode.sources": "hevc_vit.encode.readers.expand",
    "hevc_vit.encode.sources_tar": "hevc_vit.encode.readers.tar",
    "hevc_vit.encode.tables": "hevc_vit.encode.readers.tables",
    "hevc_vit.encode.objects": "hevc_vit.encode.readers.memory",
    "hevc_vit.encode.units": "hevc_vit.encode.readers.units",
    "hevc_vit.encode.sidecars": "hevc_vit.encode.readers.sidecars",
    "hevc_vit.encode.loading": "hevc_vit.encode.decode.load",
    "hevc_vit.encode.sparse": "hevc_vit.encode.decode.sparse",
    "hevc_vit.encode.workers": "hevc_vit.encode.decode.workers",
    "hevc_vit.encode.batching": "hevc_vit.encode.model.batching",
    "hevc_vit.encode.forward": "hevc_vit.encode.model.forward",
    "hevc_vit.encode.index": "hevc_vit.encode.output.index",
    "hevc_vit.encode.shards": "hevc_vit.encode.output.shards",
    "hevc_vit.encode.formats": "hevc_vit.encode.output.formats",
    "hevc_vit.encode.folder": "hevc_vit.encode.output.folder",
    "hevc_vit.encode.lock": "hevc_vit.encode.output.lock",
    "hevc_vit.encode.recovery": "hevc_vit.encode.output.recovery",
    "hevc_vit.encode.result": "hevc_vit.encode.output.result",
    "hevc_vit.encode.runner": "hevc_vit.encode.api",
    "hevc_vit.encode.distributed": "hevc_vit.encode.engines.distributed",
    "hevc_vit.encode.option_values": "hevc_vit.encode.options.values",
    # round 2
    "hevc_vit.sharding": "hevc_vit.encode",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name in :data:`MOVED` before the file system does, and loads it as its new module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])  # the module itself: the import system keeps its name

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once): an old name never loads a second copy of a file."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
