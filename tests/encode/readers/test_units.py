"""Work units: rank 0's plan holds units (a tar shard, a parquet row group), not items; tar shards and a parquet
table of several row groups encoded at world 2 equal world 1; a run killed with SIGKILL (at world 1 or 2) and
resumed (at world 1 or 3) equals an uninterrupted run, features and index rows."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from hevc_vit.cli import main as cli_main
from hevc_vit.encode import read_index
from hevc_vit.encode.engines.pipeline import prepare_folder
from hevc_vit.encode.output.index import INDEX_NAME, rank_index_files, read_jsonl
from hevc_vit.encode.readers.expand import SourceOptions, expand_inputs, expand_units
from hevc_vit.encode.readers.units import list_share, ordered_paths
from tests.helpers import (
    assert_same_output,
    cli_args,
    features_by_path,
    launch_command,
    run_encode_cli,
    subprocess_env,
    write_image,
    write_tar,
)

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the 'data' extra) is not installed")

SIZES = [(70, 42), (100, 30), (56, 56), (41, 97), (30, 30), (90, 60), (45, 45), (60, 33)]
# every run of this file: one shard per forward of at most 60 patches (a few items), failures allowed
COMMON = ("--max-tokens", "60", "--shard-size-mb", "0", "--allow-failures")


def _corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the pages of one row group (its footer stays readable): reading that group raises."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    data = bytearray(path.read_bytes())
    for c in range(meta.num_columns):
        column = meta.column(c)
        start = column.dictionary_page_offset or column.data_page_offset
        data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """Two tar shards (one with a sample that has no image, one truncated), a parquet table of 4 row groups (one
    unreadable, one row without a path), a csv table and two loose files: every image distinct."""
    root = tmp_path_factory.mktemp("units")
    pool = root / "pool"
    pool.mkdir()
    images = [write_image(pool / f"{i:02d}.png", *SIZES[i % len(SIZES)], seed=i) for i in range(24)]
    blob = [p.read_bytes() for p in images]
    members = [(f"s{i:03d}.png", blob[i]) for i in range(4)] + [("s004.txt", b"a caption, no image")]
    members += [(f"s{i:03d}.png", blob[i]) for i in range(5, 7)]
    write_tar(root / "shard-000.tar", members)
    cut = write_tar(root / "shard-001.tar", [(f"t{i:03d}.png", blob[i]) for i in range(7, 11)])
    cut.write_bytes(cut.read_bytes()[: 512 * 3 + len(blob[7]) + 600])  # the second member ends past the end
    paths = [f"pool/{i:02d}.png" for i in range(11, 21)]
    paths[4] = ""  # a row without a path: a failed row
    table = pa.table({"path": paths, "caption": [f"c{i}" for i in range(10)]})
    pq.write_table(table, root / "table.parquet", row_group_size=3)  # row groups of 3, 3, 3 and 1 rows
    _corrupt_row_group(root / "table.parquet", 2)
    (root / "list.csv").write_text("path,caption\n" + "".join(f"pool/{i:02d}.png,d{i}\n" for i in (21, 22)))
    return [root / "shard-000.tar", cut, root / "table.parquet", root / "list.csv", images[23], images[0]]


def _cli(inputs: list[Path], out: Path, ckpt: Path, *extra: str) -> list[str]:
    return cli_args(inputs, out, ckpt, *COMMON, "--keep-columns", "caption", *extra)


@pytest.fixture(scope="module")
def uninterrupted(inputs, ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "out"
    assert cli_main(_cli(inputs, out, ckpt)) == 0
    return out


def _assert_same_run(got: Path, want: Path) -> None:
    """The same output as an uninterrupted run, merged (no rank index files left)."""
    assert_same_output(got, want)
    assert not rank_index_files(got)


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


def test_rank0_plan_holds_units_not_items(inputs, tmp_path):
    many = write_tar(tmp_path / "many.tar", [(f"{i:04d}.png", inputs[-1].read_bytes()) for i in range(40)])
    sources = SourceOptions(keep_columns=("caption",))
    plan = prepare_folder([many, *inputs], tmp_path / "out", False, False, {}, lambda m: None, sources)
    kinds = [(unit.kind, Path(unit.location).name) for unit in plan.units]
    assert kinds == [
        ("tar", "many.tar"),  # 40 samples, one unit: listed by the rank that takes it
        ("tar", "shard-000.tar"),
        ("tar", "shard-001.tar"),
        *[("row_group", "table.parquet")] * 4,
        ("table", "list.csv"),
        ("item", "23.png"),
        ("item", "00.png"),
    ]
    assert [unit.start for unit in plan.units if unit.kind == "row_group"] == [0, 3, 6, 9]

    # listed by 3 ranks and put back in unit order: the items, names and keys of the listing at world 1
    one = list_share(plan.units, 0, 1, keep_columns=("caption",))
    shares = [list_share(plan.units, r, 3, keep_columns=("caption",)) for r in range(3)]
    listed = {u: paths for share in shares for u, paths in share.listed.items()}
    assert ordered_paths(plan.units, listed) == [spec.path for spec in one.specs]
    assert [spec.path for spec in expand_inputs([many, *inputs], sources=sources)] == ordered_paths(plan.units, listed)
    keys = {spec.path: key for share in shares for spec, key in zip(share.specs, share.keys)}
    assert keys == dict(zip([spec.path for spec in one.specs], one.keys))
    # samples of the tars (shard-001: 2, and a row for its damaged end), rows of the tables (row group 2: one row)
    assert len(set(one.keys)) == len(one.keys) == 40 + 7 + 3 + (3 + 3 + 1 + 1) + 2 + 2
    errors = {_name(spec.path): spec.error for spec in one.specs if spec.error}
    assert errors.keys() == {"s004.txt", "t008.png", "shard-001.tar", "table.parquet#rowgroup2", "table.parquet#row4"}
    assert "no image or video member" in errors["s004.txt"] and "truncated" in errors["t008.png"]
    assert "damaged after 2 samples" in errors["shard-001.tar"]
    assert "cannot read row group 2" in errors["table.parquet#rowgroup2"]
    assert "path column is empty" in errors["table.parquet#row4"]


def _name(path: str) -> str:
    """``tar://MEMBER::SHARD`` -> the member's file name; a path -> its file name."""
    return path.split("::")[0].rsplit("/", 1)[-1]


def test_a_missing_kept_column_stops_the_plan_before_any_row_is_read(inputs, tmp_path):
    with pytest.raises(ValueError, match="keep_columns \\['nope'\\] are not columns"):
        expand_units([inputs[2]], sources=SourceOptions(keep_columns=("nope",)))


# --------------------------------------------------------------------------------------------------
# world sizes, and SIGKILL then --resume
# --------------------------------------------------------------------------------------------------

# `python WRAPPER PIDS encode ...`: the CLI with every forward slowed down, writing its pid to PIDS/RANK so the
# test can SIGKILL each process (torchrun starts its workers in sessions of their own)
WRAPPER = """
import os, sys, time
from pathlib import Path
from hevc_vit.encode.model import forward
pids = Path(sys.argv.pop(1))
(pids / os.environ.get("RANK", "0")).write_text(str(os.getpid()))
run = forward.GroupEncoder.run
def slow_run(self, items):
    time.sleep(0.4)
    return run(self, items)
forward.GroupEncoder.run = slow_run
from hevc_vit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(world: int, args: list[str]) -> None:
    proc = run_encode_cli(world, args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _published_rows(out: Path) -> int:
    """ok rows in the rank index files: each names a shard already complete on disk."""
    try:
        return sum(row.get("status") == "ok" for f in rank_index_files(out) for row in read_jsonl(f))
    except (OSError, ValueError):  # a row being written
        return 0


def _sigkill(kill, pid: str) -> None:
    try:
        kill(int(pid), signal.SIGKILL)
    except (ProcessLookupError, ValueError):  # gone already (or a pid file being written)
        pass


def _kill_after_first_shard(world: int, args: list[str], tmp_path: Path) -> tuple[Path, set[str]]:
    """Start ``encode`` at ``world`` ranks, SIGKILL every process once a shard and its rows are on disk; returns
    the output folder and the shards its index rows name."""
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    cmd = launch_command(world, [str(tmp_path / "wrapper.py"), str(pids), *args])
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    out = Path(args[args.index("--out") + 1])
    deadline = time.monotonic() + 120
    try:
        while _published_rows(out) == 0:
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "no shard was published in 120 s"
            time.sleep(0.02)
    finally:
        _sigkill(os.killpg, str(proc.pid))  # the launcher (torchrun's agent), then each rank
        for pid_file in pids.iterdir():
            _sigkill(os.kill, pid_file.read_text())
        proc.communicate(timeout=60)
    assert not (out / INDEX_NAME).exists(), "the run finished before it was killed"
    return out, {row["shard"] for f in rank_index_files(out) for row in read_jsonl(f) if row["shard"]}


@pytest.mark.slow
@pytest.mark.distributed
def test_world_two_equals_world_one_for_tars_and_row_groups(inputs, ckpt, uninterrupted, tmp_path):
    out = tmp_path / "multi"
    _run(2, _cli(inputs, out, ckpt, "--device", "cpu"))
    _assert_same_run(out, uninterrupted)
    rows = read_index(out)
    assert {row["shard"].split("-")[0] for row in rows if row["shard"]} == {"shards/rank00000", "shards/rank00001"}
    failed = {_name(row["path"]): row["error"] for row in rows if row["status"] == "failed"}
    assert len(failed) == 5 and "cannot read row group 2" in failed["table.parquet#rowgroup2"], failed
    assert [row["caption"] for row in rows if "caption" in row] == [
        f"c{i}" for i in range(10) if i not in (6, 7, 8)
    ] + [
        "d21",
        "d22",
    ]


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(inputs, ckpt, uninterrupted, tmp_path):
    out, early = _kill_after_first_shard(1, _cli(inputs, tmp_path / "out", ckpt), tmp_path)
    assert cli_main(_cli(inputs, out, ckpt, "--resume")) == 0
    _assert_same_run(out, uninterrupted)
    assert early & {row["shard"] for row in read_index(out)}  # what the killed run finished was kept, not redone


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("resume_world", [1, 3])
def test_killed_at_world_two_resumed_at_another_world_size(inputs, ckpt, uninterrupted, tmp_path, resume_world):
    out, early = _kill_after_first_shard(2, _cli(inputs, tmp_path / "out", ckpt, "--device", "cpu"), tmp_path)
    if resume_world == 1:
        assert cli_main(_cli(inputs, out, ckpt, "--resume")) == 0
    else:
        _run(resume_world, _cli(inputs, out, ckpt, "--resume", "--device", "cpu"))
    _assert_same_run(out, uninterrupted)
    assert early & {row["shard"] for row in read_index(out)}  # what the killed run finished was kept, not redone


def test_a_path_named_by_two_units_gets_one_row_where_it_is_first_met(inputs, ckpt, tmp_path):
    pool = inputs[-1].parent
    (tmp_path / "again.csv").write_text(f"path\n{pool / '23.png'}\n{pool / '01.png'}\n{pool / '23.png'}\n")
    out = tmp_path / "out"
    assert cli_main(cli_args([pool / "01.png", tmp_path / "again.csv"], out, ckpt)) == 0
    rows = read_index(out)
    assert [Path(row["path"]).name for row in rows] == ["01.png", "23.png"]
    assert all(row["status"] == "ok" for row in rows) and len(features_by_path(out)) == 2
    stored = [key for shard in (out / "shards").iterdir() for key in safe_open(shard, "pt").keys()]
    assert sorted(k for k in stored if k.endswith(".grid_thw")) == sorted(f"{r['key']}.grid_thw" for r in rows)  # once


def test_a_tar_without_samples_and_a_table_without_rows_are_failed_rows(tmp_path):
    empty_tar = write_tar(tmp_path / "empty.tar", [("README", b"no key, no extension")])
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "empty.csv").write_text("path\n")
    specs = expand_inputs([empty_tar, tmp_path / "empty.parquet", tmp_path / "empty.csv"])
    assert [(Path(s.path).name, s.error) for s in specs] == [
        ("empty.tar", "sample 'README' has no image or video member (members: README)"),  # every member has a row
        ("empty.parquet", "the table has no rows"),
        ("empty.csv", "the table has no rows"),
    ]
