"""``hevc-vit convert`` and ``hevc-vit info``: converted against source and the goldens, the bit-identical
round trip, verification that fails when it should, and nothing left behind by errors or interrupts."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hevc_vit.cli.convert as convert_cli
import hevc_vit.convert.commit as commit_mod
import hevc_vit.convert.write as write_mod
from hevc_vit import HEVCViTModel, HEVCViTPackingModel, patchify
from hevc_vit.checkpoints import load_checkpoint
from hevc_vit.checkpoints.names import convert_from_native as real_convert_from_native
from hevc_vit.cli import build_parser
from hevc_vit.cli import main as cli_main
from hevc_vit.configuration import PRESETS
from hevc_vit.convert import (
    DTYPES,
    STAGES,
    TOLERANCES,
    ConversionInterrupted,
    VerificationFailed,
    commit_folder,
    convert_checkpoint,
    describe_checkpoint,
    finish_interrupted_commit,
)
from tests.helpers import FIXTURES, tiny_config

LEGACY_PT = FIXTURES / "llava_vit_source_tiny.pt"
LEGACY_JSON = FIXTURES / "llava_vit_source_tiny.json"
LEGACY_GOLDEN = FIXTURES / "golden_llava_vit_source_tiny.safetensors"
STANDARD = FIXTURES / "onevision_encoder_tiny"
PACKING = FIXTURES / "llava_vit_packing_tiny"
REFERENCE_FOLDER = {"packing": PACKING, "standard": STANDARD}
MODEL_TYPE = {"packing": "llava_vit_packing", "standard": "onevision_encoder"}
CASE_KINDS = ("image_", "batch_2x", "image_", "video_", "packed_mixed")
GOLDEN_ATOL = 1e-4  # the bound for the legacy goldens (fp32)
TINY = dict(patch_size=14, hidden_size=64, num_attention_heads=2, num_hidden_layers=3, intermediate_size=128)
ROOT = Path(__file__).resolve().parents[2]


# tiny checkpoints: one thread (threads only contend on a shared CPU); the fixture's descriptive
# side-car keys are expected, so their warning is silenced
pytestmark = pytest.mark.usefixtures("one_thread", "quiet_sidecar_warning")


def quiet(_: str) -> None:
    pass


def all_files(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders, hidden ones too), relative."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def leftovers(parent: Path) -> list[str]:
    """Temporary folders, commit journals."""
    return sorted(p.name for p in parent.iterdir() if re.search(r"\.partial-|\.replaced-|\.commit$", p.name))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), f"keys differ: {sorted(set(a) ^ set(b))}"
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def copy_legacy(tmp_path: Path) -> Path:
    shutil.copyfile(LEGACY_PT, tmp_path / "legacy.pt")
    shutil.copyfile(LEGACY_JSON, tmp_path / "legacy.json")
    return tmp_path / "legacy.pt"


# -- legacy -> packing / standard, against the goldens ----------------------------------------------


@pytest.mark.parametrize("to", ["packing", "standard"])
def test_legacy_conversion_reproduces_golden(tmp_path, to):
    dst = tmp_path / "out"
    result = convert_checkpoint(LEGACY_PT, dst, to=to, log=quiet)
    assert result.source_format == "legacy" and result.report.passed
    assert [c.name.startswith(k) for c, k in zip(result.report.cases, CASE_KINDS)] == [True] * len(CASE_KINDS)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE[to] and config["layer_norm_eps"] == 1e-5
    # weight names and shapes are exactly those of the reference project's folder of that format
    written = load_file(dst / "model.safetensors")
    reference = load_file(REFERENCE_FOLDER[to] / "model.safetensors")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in reference.items()}

    golden = load_file(LEGACY_GOLDEN)
    standard = HEVCViTModel.from_pretrained(dst, attn_implementation="eager")
    packing = HEVCViTPackingModel.from_pretrained(dst, attn_implementation="eager")
    for case in ("image_56x56", "image_28x42", "video_4x28x28"):
        pixels = golden[f"{case}.pixel_values"]
        patches, grid = patchify(pixels, 14)
        with torch.no_grad():
            a, b = standard(pixels), packing(patches, grid)
        outputs = [
            ("standard", "last_hidden_state", a.last_hidden_state),
            ("standard", "pooler_output", a.pooler_output),
            ("packing", "last_hidden_state", b.last_hidden_state.view(pixels.shape[0], -1, 64)),  # (B, N, D)
            ("packing", "pooler_output", b.pooler_output),
        ]
        for model, name, actual in outputs:
            err = (actual - golden[f"{case}.{name}"]).abs().max().item()
            assert err <= GOLDEN_ATOL, f"{to} DST, {model} model, {case} {name}: max abs diff {err:.2e}"


def test_written_preprocessor_is_a_clip_processor_at_image_size(tmp_path):
    from transformers import CLIPImageProcessor

    dst = tmp_path / "out"
    convert_checkpoint(LEGACY_PT, dst, log=quiet)
    processor = CLIPImageProcessor.from_pretrained(dst)
    image = torch.rand(3, 300, 500).mul(255).to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 448, 448)  # the legacy JSON gives no image_size: the default 448


# -- standard <-> packing ----------------------------------------------------------------------------


def test_fixture_folders_convert_into_each_other_bit_identically(tmp_path):
    to_packing, back = tmp_path / "packing", tmp_path / "standard"
    convert_checkpoint(STANDARD, to_packing, to="packing", log=quiet)
    convert_checkpoint(to_packing, back, to="standard", log=quiet)
    same_tensors(load_file(to_packing / "model.safetensors"), load_file(PACKING / "model.safetensors"))
    same_tensors(load_file(back / "model.safetensors"), load_file(STANDARD / "model.safetensors"))
    original = json.loads((STANDARD / "config.json").read_text())
    round_trip = json.loads((back / "config.json").read_text())
    for key, value in original.items():
        if key not in ("transformers_version", "dtype"):
            assert round_trip[key] == value, key
    # the packing fixture converts to standard directly, too
    direct = tmp_path / "direct"
    convert_checkpoint(PACKING, direct, to="standard", log=quiet)
    same_tensors(load_file(direct / "model.safetensors"), load_file(STANDARD / "model.safetensors"))
    # SRC's own processor settings are kept
    assert (to_packing / "preprocessor_config.json").read_bytes() != b""
    assert json.loads((direct / "preprocessor_config.json").read_text()) == json.loads(
        (PACKING / "preprocessor_config.json").read_text()
    )


def test_library_folders_with_rms_norm_and_no_head_convert_both_ways(tmp_path):
    """A ``save_pretrained`` folder (model_type hevc_vit) of another architecture: no pooling head, RMSNorm."""
    model = HEVCViTModel(tiny_config(use_head=False, layer_norm_type="rms_norm")).eval()
    model.save_pretrained(tmp_path / "mine")
    result = convert_checkpoint(tmp_path / "mine", tmp_path / "standard", to="standard", log=quiet)
    assert result.source_format == "hevc_vit" and result.report.passed
    convert_checkpoint(tmp_path / "standard", tmp_path / "packing", to="packing", log=quiet)
    same_tensors(load_file(tmp_path / "packing" / "model.safetensors"), model.state_dict())
    config = json.loads((tmp_path / "packing" / "config.json").read_text())
    assert config["layer_norm_type"] == "rms_norm" and config["use_head"] is False


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_conversion_passes_its_thresholds(tmp_path, dtype):
    dst = tmp_path / "out"
    result = convert_checkpoint(LEGACY_PT, dst, to="packing", dtype=dtype, log=quiet)
    assert result.report.passed and result.report.tolerance == TOLERANCES[DTYPES[dtype]]
    assert {v.dtype for v in load_file(dst / "model.safetensors").values()} == {DTYPES[dtype]}
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == dtype
    # the comparison really ran in DST's dtype: the cast shows
    assert max(c.max_abs for c in result.report.cases) > 0


# -- verification fails when the conversion is wrong --------------------------------------------------


def _swap_q_and_k(state, fmt):
    out = real_convert_from_native(state, fmt)
    key = "encoder.layers.1.self_attn.qkv.weight"
    if key in out:
        q, k, v = out[key].chunk(3)
        out[key] = torch.cat([k, q, v]).contiguous()
    return out


def test_verification_fails_on_a_wrong_key_mapping_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(write_mod, "convert_from_native", _swap_q_and_k)
    before = all_files(tmp_path)
    with pytest.raises(VerificationFailed) as e:
        convert_checkpoint(LEGACY_PT, tmp_path / "out", to="packing", log=quiet)
    assert not e.value.report.passed and any(not c.passed for c in e.value.report.cases)
    assert all_files(tmp_path) == before

    rc = cli_main(["convert", str(LEGACY_PT), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAIL" in captured.out and "verification failed" in captured.err
    assert all_files(tmp_path) == before


def test_verification_fails_when_a_hyperparameter_is_lost(tmp_path, monkeypatch):
    real = write_mod.reference_config_dict

    def drop_eps(config, fmt, dtype):
        d = real(config, fmt, dtype)
        del d["layer_norm_eps"]  # would reload with the default 1e-6
        return d

    monkeypatch.setattr(write_mod, "reference_config_dict", drop_eps)
    with pytest.raises(VerificationFailed) as e:
        convert_checkpoint(LEGACY_PT, tmp_path / "out", log=quiet)
    assert e.value.report.config_mismatches == ["layer_norm_eps: SRC 1e-05, DST 1e-06"]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# -- bad input: non-zero exit, the problem named, nothing new on disk ---------------------------------


def _truncated_pt(tmp_path: Path) -> list[str]:
    data = LEGACY_PT.read_bytes()
    (tmp_path / "src.pt").write_bytes(data[: len(data) // 3])
    shutil.copyfile(LEGACY_JSON, tmp_path / "src.json")
    return [str(tmp_path / "src.pt")]


def _truncated_safetensors(tmp_path: Path) -> list[str]:
    shutil.copytree(STANDARD, tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return [str(tmp_path / "src")]


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _malicious(tmp_path: Path) -> list[str]:
    state = torch.load(LEGACY_PT, weights_only=True)["model"]
    torch.save({"model": state, "hook": _Payload(tmp_path / "payload_ran")}, tmp_path / "src.pt")
    shutil.copyfile(LEGACY_JSON, tmp_path / "src.json")
    return [str(tmp_path / "src.pt")]


def _wrong_preset(tmp_path: Path) -> list[str]:
    return [str(copy_legacy(tmp_path)), "--preset", "large"]


def _existing_dst(tmp_path: Path) -> list[str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    return [str(STANDARD)]


def _dst_inside_src(tmp_path: Path) -> list[str]:
    shutil.copytree(STANDARD, tmp_path / "src")
    return [str(tmp_path / "src"), str(tmp_path / "src" / "out")]


@pytest.mark.parametrize(
    "make, message",
    [
        (_truncated_pt, r"src\.pt could not be read as a PyTorch checkpoint \(corrupt or truncated\?\)"),
        (_truncated_safetensors, r"model\.safetensors could not be read as safetensors \(corrupt or truncated\?\)"),
        (_malicious, r"src\.pt was refused: the safe loader .* cannot read it \(Unsupported global: GLOBAL exec"),
        (_wrong_preset, r"shape mismatch: the architecture from preset 'large' does not fit .*hidden_size=1024"),
        (_existing_dst, r"DST .*out already exists; pass --force"),
        (_dst_inside_src, r"DST .*out overlaps SRC"),
    ],
    ids=["truncated_pt", "truncated_safetensors", "malicious_pickle", "wrong_preset", "existing_dst", "dst_in_src"],
)
def test_bad_input_exits_nonzero_names_the_problem_and_leaves_nothing(tmp_path, capsys, make, message):
    args = make(tmp_path)
    if len(args) == 1 or args[1].startswith("--"):
        args.insert(1, str(tmp_path / "out"))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    rc = cli_main(["convert", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(message, err), err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert not (tmp_path / "payload_ran").exists()


def test_dst_parent_folders_made_for_a_failed_conversion_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(write_mod, "convert_from_native", _swap_q_and_k)
    with pytest.raises(VerificationFailed):
        convert_checkpoint(LEGACY_PT, tmp_path / "a" / "b" / "out", log=quiet)
    assert all_files(tmp_path) == set()


# -- --force -----------------------------------------------------------------------------------------


def test_force_replaces_only_with_a_verified_result(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    monkeypatch.setattr(write_mod, "convert_from_native", _swap_q_and_k)
    with pytest.raises(VerificationFailed):
        convert_checkpoint(LEGACY_PT, dst, force=True, log=quiet)
    assert (dst / "mine.txt").read_text() == "keep me" and leftovers(tmp_path) == []

    monkeypatch.setattr(write_mod, "convert_from_native", real_convert_from_native)
    assert cli_main(["convert", str(LEGACY_PT), str(dst), "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert leftovers(tmp_path) == []


# -- interrupts --------------------------------------------------------------------------------------


def _signal_at(stage: str, signum: int):
    def on_stage(at: str) -> None:
        if at == stage:
            os.kill(os.getpid(), signum)

    return on_stage


def test_stages_are_reported_in_order(tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(STANDARD, dst)
    seen: list[str] = []
    convert_checkpoint(LEGACY_PT, dst, force=True, log=quiet, on_stage=seen.append)
    assert seen == [s for s in STAGES if s in seen] and set(STAGES) - set(seen) <= {"old_aside"}


@pytest.mark.parametrize("stage", ["write", "verify"])
def test_ctrl_c_during_the_conversion_leaves_no_dst(tmp_path, monkeypatch, capsys, stage):
    on_stage = _signal_at(stage, signal.SIGINT)
    monkeypatch.setattr(convert_cli, "convert_checkpoint", functools.partial(convert_checkpoint, on_stage=on_stage))
    handler = signal.getsignal(signal.SIGINT)
    rc = cli_main(["convert", str(LEGACY_PT), str(tmp_path / "out")])
    assert rc == 130 and "interrupted by SIGINT" in capsys.readouterr().err
    assert all_files(tmp_path) == set()
    assert signal.getsignal(signal.SIGINT) is handler, "the previous SIGINT handler was not restored"


def test_sigterm_before_the_swap_keeps_the_old_dst(tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(STANDARD, dst)
    with pytest.raises(ConversionInterrupted) as e:
        convert_checkpoint(LEGACY_PT, dst, force=True, log=quiet, on_stage=_signal_at("commit", signal.SIGTERM))
    assert e.value.signum == signal.SIGTERM and not e.value.dst_complete
    same_tensors(load_file(dst / "model.safetensors"), load_file(STANDARD / "model.safetensors"))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("method", ["exchange", "rename"])
def test_a_signal_during_the_commit_is_held_until_dst_is_complete(tmp_path, monkeypatch, method):
    use_method(monkeypatch, tmp_path, method)
    dst = tmp_path / "out"
    shutil.copytree(STANDARD, dst)
    with pytest.raises(ConversionInterrupted) as e:
        on_stage = _signal_at("journal", signal.SIGTERM)  # arrives before the first rename
        convert_checkpoint(LEGACY_PT, dst, to="packing", force=True, log=quiet, on_stage=on_stage)
    assert e.value.dst_complete
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llava_vit_packing"
    assert leftovers(tmp_path) == []


# -- the commit: DST is the old or the new folder, and a killed commit is finished by the next run ------


class Killed(BaseException):
    """Stands for ``kill -9`` at a stage of the commit: ``commit_folder`` runs no clean-up of its own, so what it
    leaves on disk is what a kill there leaves (a real kill is checked in a child process below)."""


def _kill_at(stage: str):
    def on_stage(at: str) -> None:
        if at == stage:
            raise Killed(at)

    return on_stage


def folder_is(path: Path, reference: Path) -> bool:
    """``path`` is a complete copy of the folder ``reference``: the same files, byte for byte."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = sorted(p.name for p in reference.iterdir())
    if sorted(p.name for p in path.iterdir()) != names:
        return False
    return all((path / name).read_bytes() == (reference / name).read_bytes() for name in names)


def use_method(monkeypatch, tmp_path: Path, method: str) -> None:
    """``exchange``: the atomic swap (skipped where this OS or file system has none); ``rename``: the
    two-rename fallback every other system gets."""
    if method == "rename":
        monkeypatch.setattr(commit_mod, "exchange_folders", lambda a, b: False)
        return
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir(), b.mkdir()
    (a / "x").touch()
    swapped = commit_mod.exchange_folders(a, b)
    shutil.rmtree(a), shutil.rmtree(b)
    if not swapped:
        pytest.skip("no atomic folder swap (renameat2 RENAME_EXCHANGE) here")


@pytest.fixture(scope="module")
def verified(tmp_path_factory) -> Path:
    """A verified packing conversion of the legacy fixture: the NEW folder of the commit tests (the OLD
    one is the standard fixture)."""
    folder = tmp_path_factory.mktemp("verified") / "made"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not HEVC ViT hyper-parameters")
            convert_checkpoint(LEGACY_PT, folder, to="packing", log=quiet)
    finally:
        torch.set_num_threads(threads)
    return folder


def _partial_name(dst: Path) -> str:
    return f".{dst.name}.partial-{socket.gethostname()}-{os.getpid()}-test"  # as convert_checkpoint names it


COMMIT_CASES = (
    [("exchange", True, s) for s in ("journal", "new_in_place", "old_removed", "committed")]
    + [("rename", True, s) for s in ("journal", "old_aside", "new_in_place", "old_removed", "committed")]
    + [("rename", False, s) for s in ("journal", "new_in_place", "old_removed", "committed")]
)


COMMIT_IDS = [f"{m}-{'replace' if r else 'new'}-{s}" for m, r, s in COMMIT_CASES]


@pytest.mark.parametrize("method, replace, stage", COMMIT_CASES, ids=COMMIT_IDS)
def test_a_commit_killed_at_any_stage_is_finished_by_the_next_run(
    tmp_path, monkeypatch, capsys, verified, method, replace, stage
):
    use_method(monkeypatch, tmp_path, method)
    dst = tmp_path / "out"
    if replace:
        shutil.copytree(STANDARD, dst)
    new = tmp_path / _partial_name(dst)
    shutil.copytree(verified, new)
    with pytest.raises(Killed):
        commit_folder(new, dst, force=True, on_stage=_kill_at(stage))

    # at the kill: DST is the old or the new folder, complete (missing only between the fallback's renames)
    old_or_new = folder_is(dst, verified) or (folder_is(dst, STANDARD) if replace else not dst.exists())
    if stage == "old_aside":
        assert not dst.exists() and (tmp_path / ".out.commit").is_file()
    else:
        assert old_or_new, f"DST at {stage}: {sorted(all_files(tmp_path))}"
    if method == "exchange":
        assert dst.is_dir(), "the atomic swap leaves no instant without DST"
    # neither verified folder was deleted before the other one was in place
    here = list(tmp_path.iterdir())
    assert any(folder_is(p, verified) for p in here)
    if replace and not folder_is(dst, verified):
        assert any(folder_is(p, STANDARD) for p in here)

    # the next conversion to DST (here without --force: refused once it has finished that commit) puts the
    # new folder in place and deletes the old one
    rc = cli_main(["convert", str(LEGACY_PT), str(dst), "--to", "standard"])
    out, err = capsys.readouterr()
    assert rc == 2 and "already exists; pass --force" in err
    if stage != "committed":
        assert "finished the commit of an interrupted conversion" in out
    assert folder_is(dst, verified)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "method, stage",
    [("exchange", s) for s in ("journal", "new_in_place", "old_removed", "committed")]
    + [("rename", s) for s in ("journal", "old_aside", "new_in_place", "old_removed")],
)
def test_an_error_inside_the_commit_is_finished_by_the_run_itself(tmp_path, monkeypatch, verified, method, stage):
    use_method(monkeypatch, tmp_path, method)
    dst = tmp_path / "out"
    shutil.copytree(STANDARD, dst)
    with pytest.raises(Killed):
        convert_checkpoint(LEGACY_PT, dst, to="packing", force=True, log=quiet, on_stage=_kill_at(stage))
    assert folder_is(dst, verified)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_forced_conversion_after_a_kill_between_the_renames_keeps_both_verified_folders(
    tmp_path, monkeypatch, verified
):
    """The reported case: killed with the old DST moved aside and the new one not yet in place. The next
    forced conversion used to delete the new folder and never restore the old one."""
    monkeypatch.setattr(commit_mod, "exchange_folders", lambda a, b: False)
    dst = tmp_path / "out"
    shutil.copytree(STANDARD, dst)
    new = tmp_path / _partial_name(dst)
    shutil.copytree(verified, new)
    with pytest.raises(Killed):
        commit_folder(new, dst, force=True, on_stage=_kill_at("old_aside"))
    with pytest.raises(FileNotFoundError, match=r"interrupted while replacing it .*finish_interrupted_commit"):
        load_checkpoint(dst)  # a reader meanwhile is told why, and what finishes it

    notes: list[str] = []
    convert_checkpoint(LEGACY_PT, dst, to="standard", force=True, log=notes.append)
    assert any("finished the commit of an interrupted conversion" in n for n in notes)
    assert json.loads((dst / "config.json").read_text())["model_type"] == "onevision_encoder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_journal_held_by_a_live_commit_is_waited_for_and_an_empty_one_removed(tmp_path):
    import fcntl

    dst = tmp_path / "out"
    shutil.copytree(STANDARD, dst)
    journal = tmp_path / ".out.commit"
    record = {"new": ".x", "new_id": 0, "old_id": None, "aside": ".y", "host": "h", "pid": 7}
    journal.write_text(json.dumps(record))
    with open(journal) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a conversion committing right now
        with pytest.raises(FileExistsError, match=r"process 7 on h\) has been committing to DST .*out"):
            finish_interrupted_commit(dst, log=quiet, wait_s=0.2)
    journal.write_text("")  # a run killed while it created the journal: nothing moved
    assert finish_interrupted_commit(dst, log=quiet)
    assert not journal.exists() and folder_is(dst, STANDARD)


def test_a_journal_locked_by_another_process_as_it_is_created_is_refused_in_bounded_time(tmp_path, monkeypatch):
    """Another conversion to DST finds this run's fresh (empty) journal and takes its lock, then stops (Ctrl-Z, a
    hung NFS write): the commit waits for it at most ``COMMIT_WAIT_S``, then refuses with nothing moved. The old
    code waited on that lock without end; the commit runs in a thread the test waits on for a bounded time."""
    import fcntl
    import threading

    held: list[int] = []

    class OsTakingTheJournal:  # os, whose open lets "another process" lock the journal the moment it is created
        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, path, flags, *mode):
            fd = os.open(path, flags, *mode)
            if flags & os.O_EXCL and str(path).endswith(".commit") and not held:
                held.append(os.open(path, os.O_RDWR))  # another open file: its flock conflicts, as another process's
                fcntl.flock(held[0], fcntl.LOCK_EX)
            return fd

    new, dst = tmp_path / ".out.partial", tmp_path / "out"
    shutil.copytree(STANDARD, new)
    monkeypatch.setattr(commit_mod, "os", OsTakingTheJournal())
    monkeypatch.setattr(commit_mod, "COMMIT_WAIT_S", 0.5)
    outcome: list[BaseException | None] = []

    def commit() -> None:
        try:
            commit_folder(new, dst, force=False)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=commit, daemon=True)
    thread.start()
    thread.join(timeout=20)
    hung = thread.is_alive()
    for fd in held:
        os.close(fd)  # lets a hung commit go on, so the test leaves nothing waiting
    thread.join(timeout=20)
    assert not hung, "the commit was still waiting for the journal's lock after 20 s"
    error = outcome[0]
    assert isinstance(error, FileExistsError), error
    assert ".out.commit" in str(error) and "0.5 s" in str(error) and "convert again" in str(error), error
    assert folder_is(new, STANDARD) and not dst.exists()  # nothing moved


# -- real processes, killed -----------------------------------------------------------------------------

# a conversion (the CLI) in a child process that pauses at a stage, or dies there with os._exit — no
# clean-up of any kind runs, as with kill -9
_CHILD = r"""
import functools, os, sys, time
import hevc_vit.cli.convert as convert_cli
import hevc_vit.convert.commit as commit
from hevc_vit.cli import main
stage, action, method, *argv = sys.argv[1:]
if method == "rename":
    commit.exchange_folders = lambda a, b: False
def on_stage(at):
    if at == stage and action == "pause":
        print(f"paused at {at}", file=sys.stderr, flush=True)
        time.sleep(60)
    elif at == stage:
        os._exit(9)
convert_cli.convert_checkpoint = functools.partial(convert_cli.convert_checkpoint, on_stage=on_stage)
sys.exit(main(["convert", *argv]))
"""


def _start_child(stage: str, action: str, *argv: str | Path, method: str = "exchange") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, stage, action, method, *map(str, argv)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_pause(proc: subprocess.Popen, stage: str) -> None:
    for line in proc.stderr:
        if f"paused at {stage}" in line:
            return
    raise AssertionError(f"the conversion ended (rc {proc.wait()}) before it reached the pause point")


@pytest.mark.slow
def test_killed_conversion_process_leaves_no_dst(tmp_path):
    """A real process killed mid-write (after model.safetensors, before config.json): SIGTERM cleans up
    at once; after SIGKILL only a hidden temporary folder remains, removed by the next conversion."""
    term_dst, kill_dst = tmp_path / "term", tmp_path / "kill"
    procs = {
        signal.SIGTERM: _start_child("write", "pause", LEGACY_PT, term_dst),
        signal.SIGKILL: _start_child("write", "pause", LEGACY_PT, kill_dst),
    }
    try:
        for (signum, proc), dst in zip(procs.items(), (term_dst, kill_dst)):
            _wait_for_pause(proc, "write")
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}.partial-")]
            assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file(), "not paused mid-write"
            assert not (partial[0] / "config.json").exists(), "not paused mid-write"
            proc.send_signal(signum)
        rc_term = procs[signal.SIGTERM].wait(timeout=60)
        err_term = procs[signal.SIGTERM].stderr.read()
        procs[signal.SIGKILL].wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc_term == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err_term
    assert not term_dst.exists() and not kill_dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".term.")] == []
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".kill.partial-")]) == 1

    notes: list[str] = []
    convert_checkpoint(LEGACY_PT, kill_dst, log=notes.append)
    assert any("left by an interrupted conversion" in n for n in notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill"]


@pytest.mark.slow
def test_a_process_killed_between_the_renames_is_finished_by_the_next_run(tmp_path, verified):
    """A real process dies (os._exit, no clean-up) with the old DST renamed aside and the new folder not
    in place: both verified folders are on disk, and the next conversion puts the new one in place."""
    dst = tmp_path / "out"
    shutil.copytree(STANDARD, dst)
    proc = _start_child("old_aside", "exit", LEGACY_PT, dst, "--force", method="rename")
    try:
        assert proc.wait(timeout=120) == 9, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    here = list(tmp_path.iterdir())
    assert not dst.exists() and (tmp_path / ".out.commit").is_file()
    assert any(folder_is(p, verified) for p in here) and any(folder_is(p, STANDARD) for p in here)

    assert finish_interrupted_commit(dst, log=quiet)
    assert folder_is(dst, verified)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- the command line --------------------------------------------------------------------------------


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices[name]


@pytest.mark.parametrize("command", ["convert", "info"])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = _subparser(command)
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.dest} has no help text"
        names = action.option_strings or [action.metavar]
        for name in names:
            assert name in text, f"{name} is missing from `hevc-vit {command} --help`"
        for choice in action.choices or ():
            if action.dest != "preset":
                assert choice in text, f"{choice} of {names} is missing from the help"
    if command == "convert":
        for word in ("--to", "--preset", "--config", "--dtype", "--force", "--device", "exit status", "legacy"):
            assert word in text


def test_bad_device_is_named(tmp_path, capsys):
    assert cli_main(["convert", str(LEGACY_PT), str(tmp_path / "out"), "--device", "gpu0"]) == 2
    assert "device='gpu0'; expected 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["convert", str(LEGACY_PT), str(tmp_path / "out"), "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err
    assert all_files(tmp_path) == set()


def test_preset_and_config_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(LEGACY_PT), "out", "--preset", "large", "--config", str(LEGACY_JSON)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# -- info --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, fmt", [(STANDARD, "standard"), (PACKING, "packing"), (LEGACY_PT, "legacy")])
def test_info_reports_format_architecture_parameters_dtype_and_sizes(path, fmt, capsys):
    info = describe_checkpoint(path)
    weights = torch.load(path, weights_only=True)["model"] if fmt == "legacy" else load_file(path / "model.safetensors")
    assert info.format == fmt
    assert info.num_parameters == sum(v.numel() for v in weights.values())
    assert info.dtypes == {"float32": info.num_parameters}
    assert info.fits.startswith("yes")
    files = [path] if fmt == "legacy" else sorted(p for p in path.iterdir())
    for f in files:
        assert (f.name, f.stat().st_size) in info.files
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"format:        {fmt}" in out and f"{info.num_parameters:,}" in out and "no preset (custom)" in out
    assert "width 64, heads 2 (head_dim 32), layers 3, mlp 128" in out


def test_info_names_the_matching_preset_and_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny", dict(TINY))
    assert "preset tiny" in describe_checkpoint(LEGACY_PT).render()
    assert cli_main(["info", str(LEGACY_PT), "--preset", "large"]) == 2
    assert "shape mismatch" in capsys.readouterr().err
    assert cli_main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
