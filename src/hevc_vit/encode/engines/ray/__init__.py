"""``hevc-vit encode --engine ray``: the same encode, run as a Ray Data pipeline across a cluster.

Where the local engine (one process per GPU, ``torchrun`` for several) decodes in the loader workers of the node
that runs the model, Ray scales each stage on its own: decoding and preprocessing run as CPU tasks anywhere in
the cluster (``decode_cpus`` at once), the model runs in ``model_actors`` actors (one GPU each), and the parts are
written by CPU tasks. Failed tasks are retried and a lost actor is restarted; every input still gets exactly one
index row.

* :func:`encode_folder` (what ``encode(..., engine="ray")`` calls) writes the same output folder as the local
  engine: same formats, same ``encode_config.json`` checks (lock, ``--resume``, ``--overwrite``), read back by
  ``read_index``, ``iter_features`` and ``load_features``.
* :func:`encode_dataset` maps a ``ray.data.Dataset`` of images to a dataset of features, for pipelines of one's
  own.

Stages: :mod:`.stages` (decode, model, write), the pipeline on the driver :mod:`.folder` and :mod:`.dataset`,
connecting (or starting a local instance, loopback only) :mod:`.cluster`, and :mod:`.watchdog`, which stops the
local instance's processes when the driver dies without shutting it down. Ray is an optional dependency:
``pip install 'hevc-vit[ray]'``.
"""

from __future__ import annotations

from hevc_vit.encode.engines.ray.dataset import encode_dataset
from hevc_vit.encode.engines.ray.run import encode_folder

__all__ = ["encode_dataset", "encode_folder"]
