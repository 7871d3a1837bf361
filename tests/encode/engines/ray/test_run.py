"""``encode --engine ray`` (:mod:`hevc_vit.encode.engines.ray`) against the local engine on one mixed folder (images,
a corrupt JPEG, a file that is no image): the same index rows and the same features, for safetensors and npy-parquet; a
lost model actor and a lost writer retried by Ray with every input written exactly once; ``encode_dataset``
against the same. One local Ray instance (2 CPUs, loopback only, no dashboard) serves the module."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hevc_vit.cli import main as cli_main
from hevc_vit.encode import EncodeOptions, encode, iter_features, read_index
from hevc_vit.encode.output.index import rank_index_files
from tests.helpers import assert_close_rel, cli_args, without_shard, write_tar
from tests.helpers.encode import read_npy_parquet

# Every server the test instance starts binds 127.0.0.1: Ray's processes read the first variable when they start;
# this process, which may have imported Ray in an earlier test module, reads ray_constants (set in the fixture)
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
TOKENS = dict(min_image_tokens=4, max_image_tokens=48, max_tokens=64)  # max_tokens: several forwards and blocks
QUIET = dict(progress=False, log=lambda message: None)


@pytest.fixture(scope="module")
def local_ray():
    saved = {name: os.environ.get(name) for name in LOOPBACK}
    os.environ.update(LOOPBACK)
    ray = pytest.importorskip("ray", reason="Ray (the 'ray' extra) is not installed")
    pytest.importorskip("ray.data")
    from ray._private import ray_constants

    saved_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(
            num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
            log_to_driver=False,
        )  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1", "the test instance must bind the loopback alone"
        yield ray
    finally:
        ray.shutdown()
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture(scope="module")
def mixed(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    for image in sorted(images.iterdir()):
        shutil.copy(image, folder / image.name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(40)))
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def local_runs(mixed, ckpt, tmp_path_factory):
    """The local engine's output folder, per format."""
    root = tmp_path_factory.mktemp("local")
    for fmt in ("safetensors", "npy-parquet"):
        encode([mixed], root / fmt, model=ckpt, workers=0, output_format=fmt, **TOKENS, **QUIET)
    return root


def _rows(out) -> list[dict]:
    """The index rows without the part's name (the engines name parts differently)."""
    return without_shard(read_index(out))


def _assert_same_safetensors(local, ray_out):
    assert _rows(ray_out) == _rows(local)
    expected = {row["path"]: tensors for row, tensors in iter_features(local)}
    got = {row["path"]: tensors for row, tensors in iter_features(ray_out)}
    assert sorted(got) == sorted(expected) and len(got) == 6
    for path, tensors in expected.items():
        assert sorted(got[path]) == sorted(tensors)
        for name, tensor in tensors.items():
            assert_close_rel(got[path][name].float(), tensor.float(), what=f"{path} {name}")


def _assert_one_part_per_name(out):
    """Every part file is named by an index row, and no block's index file is left."""
    named = {row["shard"] for row in read_index(out) if row["shard"]}
    on_disk = {f"shards/{p.name}" for p in (out / "shards").iterdir()}
    assert on_disk == named
    assert rank_index_files(out) == []


@pytest.mark.ray
@pytest.mark.slow
def test_cli_engine_ray_matches_local_npy_parquet(local_ray, mixed, ckpt, local_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(mixed.parent)  # relative paths: read from here, wherever Ray's workers run
    out = tmp_path / "out"
    extra = ("--max-tokens", "64", "--output-format", "npy-parquet", "--engine", "ray", "--decode-cpus", "1")
    assert cli_main(cli_args(Path(mixed.name), out, ckpt, *extra)) == 1  # two inputs failed, as locally
    local = local_runs / "npy-parquet"
    assert [{**row, "path": str(mixed.parent / row["path"])} for row in _rows(out)] == _rows(local)
    (expected, expected_meta), (got, got_meta) = read_npy_parquet(local), read_npy_parquet(out)
    by_path = {str(mixed.parent / meta["path"]): vector for vector, meta in zip(got, got_meta)}
    assert len(by_path) == len(got_meta) == 6
    for vector, meta in zip(expected, expected_meta):  # float16 vectors
        np.testing.assert_allclose(by_path[meta["path"]], vector, rtol=0, atol=2e-3 * np.abs(vector).max())


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["model", "write"])
def test_lost_actor_or_writer_is_retried_without_duplicates(
    local_ray, mixed, ckpt, local_runs, tmp_path, monkeypatch, stage
):
    from hevc_vit.encode.engines.ray import encode_folder
    from hevc_vit.encode.engines.ray.stages import FAULT_ENV

    fault = tmp_path / "fault"
    fault.write_text(stage)  # the first model call / block write ends its process, once
    monkeypatch.setenv(FAULT_ENV, str(fault))
    options = EncodeOptions(model=ckpt, engine="ray", **TOKENS, **QUIET)
    result = encode_folder([mixed], tmp_path / "out", options, batch_size=2)
    assert not fault.exists(), f"the {stage} stage never met the fault"
    assert (result.encoded, result.failed) == (6, 2)
    # 4 model calls of 2 items, and far less than shard_size_mb of features: one part holds every call's results
    assert result.shards == len(list((tmp_path / "out" / "shards").iterdir())) == 1
    _assert_same_safetensors(local_runs / "safetensors", tmp_path / "out")
    _assert_one_part_per_name(tmp_path / "out")
    # the folder's rules hold as for the local engine: a second run is refused, --resume finds all done
    with pytest.raises(FileExistsError, match="--resume"):
        encode_folder([mixed], tmp_path / "out", options)
    again = encode_folder([mixed], tmp_path / "out", options.replace(resume=True))
    assert (again.encoded, again.skipped) == (0, 6)
    _assert_same_safetensors(local_runs / "safetensors", tmp_path / "out")


@pytest.mark.ray
@pytest.mark.slow
def test_tar_parquet_and_url_sources_match_local(local_ray, mixed, ckpt, tmp_path):
    """The Ray engine takes the same sources as encode: a tar shard (with a member that is no image), a parquet
    list in several row groups (with a missing path, and a kept column) and a folder behind a ``file://`` URL (read
    through fsspec by the decoding tasks). A ``memory://`` URL, which lives in this process alone, is refused."""
    pytest.importorskip("fsspec")
    pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
    good = sorted(p for p in mixed.iterdir() if p.suffix in (".jpg", ".png") and p.name != "corrupt.jpg")
    members = [(f"k{i:03d}{p.suffix}", p.read_bytes()) for i, p in enumerate(good)] + [("k999.jpg", b"junk")]
    shard = write_tar(tmp_path / "s-000.tar", members)
    paths = [str(p) for p in good] + [str(tmp_path / "missing.jpg")]
    table = pa.table({"path": paths, "caption": [f"c{i}" for i in range(len(paths))]})
    pq.write_table(table, tmp_path / "list.parquet", row_group_size=2)
    (tmp_path / "remote").mkdir()
    for p in good[:2]:
        shutil.copy(p, tmp_path / "remote" / p.name)
    inputs = [shard, tmp_path / "list.parquet", (tmp_path / "remote").as_uri() + "/"]
    options = dict(model=ckpt, keep_columns="caption", **TOKENS, **QUIET)
    encode(inputs, tmp_path / "local", workers=0, **options)
    encode(inputs, tmp_path / "ray", engine="ray", **options)
    rows = _rows(tmp_path / "local")
    assert _rows(tmp_path / "ray") == rows
    assert [row["status"] for row in rows].count("failed") == 2 and any(row.get("caption") for row in rows)
    expected = {row["path"]: tensors for row, tensors in iter_features(tmp_path / "local")}
    got = {row["path"]: tensors for row, tensors in iter_features(tmp_path / "ray")}
    assert sorted(got) == sorted(expected) and len(got) == 2 * len(good) + 2
    for path, tensors in expected.items():
        assert_close_rel(got[path]["patches"], tensors["patches"], what=path)
    with pytest.raises(ValueError, match="memory://"):
        encode(["memory://ray-test/"], tmp_path / "refused", engine="ray", **options)
    assert not (tmp_path / "refused").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_encode_dataset_matches_local(local_ray, mixed, ckpt, local_runs):
    from hevc_vit.encode.engines.ray import encode_dataset

    files = sorted(mixed.iterdir())
    ds = local_ray.data.from_items([{"path": str(p), "image": p.read_bytes(), "n": i} for i, p in enumerate(files)])
    rows = encode_dataset(ds, model=ckpt, **TOKENS).take_all()
    assert sorted(row["path"] for row in rows) == [str(p) for p in files]
    local = {row["path"]: row for row in read_index(local_runs / "safetensors")}
    features = {row["path"]: tensors for row, tensors in iter_features(local_runs / "safetensors")}
    for row in rows:
        assert row["n"] == files.index(next(p for p in files if str(p) == row["path"]))  # passed through
        expected = local[row["path"]]
        assert row["status"] == expected["status"]
        if row["status"] != "ok":
            assert row["error"] and not np.isfinite(row["pooled"]).any() and row["patches"].shape == (0, 64)
            continue
        tensors = features[row["path"]]
        assert row["grid_thw"].tolist() == expected["grid_thw"]
        assert_close_rel(torch.tensor(row["patches"]), tensors["patches"], what=row["path"])
        assert_close_rel(torch.tensor(row["pooled"]), tensors["pooled"], what=row["path"])


def test_ray_options_need_the_ray_engine():
    with pytest.raises(ValueError, match="decode_cpus was given with engine='local'"):
        EncodeOptions(decode_cpus=2)
    assert EncodeOptions(engine="ray", decode_cpus=2, model_actors=1, ray_address="auto").engine == "ray"
    with pytest.raises(ValueError, match="engine='gpu'; expected one of"):
        EncodeOptions(engine="gpu")


def test_missing_ray_names_the_extra(monkeypatch):
    from hevc_vit.encode.engines.ray.cluster import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'hevc-vit\[ray\]'"):
        import_ray()


@pytest.mark.ray  # imports Ray Data (about 1 s)
def test_actors_use_the_dtype_the_driver_resolved(ckpt, monkeypatch):
    """``auto`` is resolved once, on the driver, and handed to every model actor: an actor on a node of another CPU
    kind (here: the rule changed after the driver chose) must not choose for itself."""
    pytest.importorskip("ray.data")
    from hevc_vit.encode.engines.ray import dataset
    from hevc_vit.encode.engines.ray.stages import ModelStage

    monkeypatch.setattr(dataset, "cluster_has_gpus", lambda: False)
    monkeypatch.setenv("HEVC_VIT_CPU_DTYPE", "bfloat16")  # the driver's CPU takes bf16
    said = []
    options = EncodeOptions(model=ckpt, dtype="auto", progress=False, log=said.append)
    encoder, device, dtype = dataset.prepare(options, said.append)
    assert (device.type, dtype) == ("cpu", torch.bfloat16)
    assert any(line.startswith("auto dtype: bfloat16") for line in said), said
    stages = dataset.Stages(options, encoder, device, dtype, [], None)
    monkeypatch.setenv("HEVC_VIT_CPU_DTYPE", "float32")  # an actor's CPU would take fp32
    actor = ModelStage(stages.actor_options, "cpu")
    assert actor.dtype == torch.bfloat16
    assert next(actor.encoder.model.parameters()).dtype == torch.bfloat16


@pytest.mark.ray
@pytest.mark.slow
def test_model_actors_the_cluster_cannot_place_fail_the_run_after_the_bound(
    local_ray, mixed, ckpt, tmp_path, monkeypatch
):
    """Actors asking for a GPU on a cluster without one (here: --device cuda on the CPU-only test instance) never
    start: the run fails with a TimeoutError naming the wait and its length, and ``encode_dataset``'s execution with
    Ray's GetTimeoutError, where Ray Data waited for them without end. Each is a thread the test waits on for a
    bounded time."""
    import threading

    from hevc_vit.encode.engines.ray import cluster

    monkeypatch.setattr(cluster, "ACTORS_START_S", 3, raising=False)  # absent before the bound
    context = local_ray.data.DataContext.get_current()  # the runs set the bound there: restored after the test
    monkeypatch.setattr(context, "wait_for_min_actors_s", -1)  # Ray Data's default (an earlier run set the bound)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            encode(
                [mixed], tmp_path / "out", model=ckpt, engine="ray", device="cuda", dtype="float32", **TOKENS, **QUIET
            )
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    def run_dataset() -> None:
        from hevc_vit.encode.engines.ray import encode_dataset

        rows = local_ray.data.from_items([{"path": str(p), "image": p.read_bytes()} for p in sorted(mixed.iterdir())])
        try:
            encode_dataset(rows, model=ckpt, device="cuda", dtype="float32", **TOKENS).take_all()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    for target in (run_dataset, run):  # the dataset first: the run sets the bound in this process's DataContext too
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(timeout=240)
        assert not thread.is_alive(), f"{target.__name__} was still waiting for its model actors after 240 s"
    dataset_error, error = outcome
    assert isinstance(error, TimeoutError), repr(error)
    assert "model actors" in str(error) and "3 s" in str(error) and "ray status" in str(error), error
    assert isinstance(dataset_error, local_ray.exceptions.GetTimeoutError), repr(dataset_error)
    assert "Timed out while starting actors" in str(dataset_error), dataset_error
