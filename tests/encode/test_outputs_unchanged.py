"""Every output of ``encode`` on the package's own sample set stays what it was before the round-3 move of
``encode/`` into stages: index rows exact, tensors byte-identical on the machine that stored them.

The stored file (``fixtures/encode_outputs/``) was made by this test on the code before the move
(``HEVC_VIT_WRITE_ENCODE_DIGESTS=1``). Index rows are compared exactly everywhere. Tensors are compared by
their sha256 where the CPU model and torch version are the ones that stored them (same kernels, so a
byte-for-byte promise); on another CPU, fp32 kernels may sum in another order, so they are compared with
the tolerance of the dtype they were stored in against the stored tensors themselves (checked here by forcing
PyTorch's AVX2 and scalar kernels: ``ATEN_CPU_CAPABILITY=avx2|default``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hevc_vit.encode import encode, read_index
from tests.helpers import FIXTURES, assert_close_rel

STORED = FIXTURES / "encode_outputs"
SAMPLES = Path(__import__("hevc_vit").__file__).resolve().parent / "assets"
MODEL = FIXTURES / "llava_vit_packing_tiny"

# one run per way the outputs are made: native resolution, pooled + npy, parquet, codec-sparse video, fixed size
RUNS = {
    "native": {"frames": 4},
    "pooled_npy": {"frames": 4, "pool": "head", "output_format": "npy-parquet"},
    "parquet": {"frames": 4, "pool": "mean", "output_format": "parquet", "storage_dtype": "float16"},
    "codec_sparse": {"frames": 8, "codec_sparse": True, "codec_budget": 0.5},
    "clip": {"frames": 2, "processor": "clip"},
}


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu} | torch {torch.__version__}"


def _run(name: str, tmp_path: Path) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, list]]:
    out = tmp_path / name
    result = encode(None, out, model=str(MODEL), dtype="float32", progress=False, log=lambda _: None, **RUNS[name])
    assert result.failed == 0
    rows = []
    for row in read_index(out):
        row = dict(row)
        row["path"] = Path(row["path"]).name  # the samples' folder differs between clones
        rows.append(row)
    return rows, *_outputs(out)


def _outputs(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Every array the run wrote, read back by its format's reader and keyed by file and name; and the other
    columns of its tables."""
    import numpy as np
    import pyarrow.parquet as pq

    tensors, columns = {}, {}
    for file in sorted(out.rglob("*")):
        rel = file.relative_to(out).as_posix()
        if file.suffix == ".safetensors":
            tensors.update({f"{rel}/{k}": v for k, v in load_file(str(file)).items()})
        elif file.suffix == ".npy":
            tensors[rel] = torch.from_numpy(np.load(file))
        elif file.suffix == ".parquet":
            table = pq.read_table(file)
            for column in table.column_names:
                values = table.column(column).to_pylist()
                if values and all(_first_leaf(v) is not None for v in values):  # features: a float array per row
                    for i, v in enumerate(values):
                        tensors[f"{rel}/{column}/{i}"] = torch.tensor(np.array(v, dtype=np.float32))
                else:  # index-like columns: compared exactly, with the clone's own folder taken out
                    text = json.dumps(values, default=str).replace(str(SAMPLES), "<samples>")
                    columns[f"{rel}/{column}"] = json.loads(text)
    return tensors, columns


def _first_leaf(value) -> float | None:
    """The first number of a nested list when it is a float (a feature value), else None."""
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, float) else None


def _sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.mark.video
@pytest.mark.parametrize("name", sorted(RUNS))
def test_encode_outputs_match_the_stored_digest(name, tmp_path):
    rows, tensors, columns = _run(name, tmp_path)
    digest_file = STORED / f"{name}.json"
    tensor_file = STORED / f"{name}.safetensors"
    if os.environ.get("HEVC_VIT_WRITE_ENCODE_DIGESTS") == "1":
        STORED.mkdir(exist_ok=True)
        digest_file.write_text(
            json.dumps(
                {"machine": _machine(), "rows": rows, "columns": columns, "tensors_sha256": _sha(tensors)}, indent=1
            )
            + "\n"
        )
        save_file({k: v.float() for k, v in tensors.items()}, str(tensor_file))
    stored = json.loads(digest_file.read_text())
    assert rows == stored["rows"]
    assert columns == stored["columns"]
    if stored["machine"] == _machine():
        assert _sha(tensors) == stored["tensors_sha256"], f"{name}: tensors differ from the stored digest"
    else:  # other kernels: equal within what rounding to the stored dtype allows (an fp32 ulp moved flips fp16 bits)
        stored_dtype = getattr(torch, RUNS[name].get("storage_dtype", "float32"))
        want = load_file(str(tensor_file))
        assert sorted(tensors) == sorted(want)
        for key in want:
            assert_close_rel(tensors[key].float(), want[key], stored_dtype, key)
