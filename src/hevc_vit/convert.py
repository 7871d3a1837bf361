"""Verified checkpoint conversion (``hevc-vit convert``) and checkpoint inspection (``hevc-vit info``).

A conversion reads SRC in any format (:func:`~hevc_vit.checkpoints.load_checkpoint`), renames its weights
with the key table (:func:`~hevc_vit.checkpoints.convert_from_native`) and writes a Hugging Face folder in a
temporary folder beside DST. It then reloads that folder and compares it with SRC on inputs it makes (two
image sizes, a non-square image, a video, a mixed packed batch); only when every case passes is the folder
renamed to DST. A failure, Ctrl-C or a kill leaves no DST and no temporary files (after ``kill -9`` the
next conversion to the same DST removes the leftover), and SRC is only ever read.

Replacing an existing DST (``--force``) is a journaled commit (:func:`_commit`): a small journal beside DST
records the two folders before anything moves, the old folder is kept until the new one is in place (on
Linux the two are swapped in one atomic step, so DST is never missing), and a run killed anywhere in the
commit is finished by the next conversion to that DST (:func:`finish_interrupted_commit`).

Legend: ``T`` packed tokens, ``n`` items, ``B`` batch, ``N`` tokens per item, ``D`` width, ``p`` patch.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import json
import math
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoints import (
    CONFIG_NAME,
    REFERENCE_ARCHITECTURES,
    REFERENCE_MODEL_TYPES,
    SAFETENSORS_NAME,
    UnsafeCheckpointError,
    check_weights_fit,
    convert_from_native,
    load_checkpoint,
    sibling_config_json,
)
from .configuration import PRESETS, HEVCViTConfig, architecture_keys
from .modeling import HEVCViTModel, HEVCViTPackingModel, HEVCViTPreTrainedModel, load_state_dict_checked
from .packing import as_batch, patchify_items

PREPROCESSOR_NAME = "preprocessor_config.json"
TARGET_FORMATS = ("packing", "standard")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# config.json keys written for the target formats (the architecture; the runtime backend is not written)
ARCH_KEYS = architecture_keys()

# OpenAI CLIP normalisation, what the OneVision encoder's processor uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The stages a conversion passes, in order; ``convert_checkpoint(on_stage=...)`` is called with each (tests
# interrupt or kill a conversion there). write: model.safetensors written, config.json not yet; verify:
# the folder is written, not yet verified; commit: verified, nothing committed. The commit (see _commit):
# journal: the journal is written, nothing moved; old_aside: the old DST renamed aside and the new folder
# not yet in place (only where the two cannot be swapped atomically); new_in_place: DST is the new folder,
# the old one still kept; old_removed: the old one deleted, the journal not yet; committed: done.
STAGES = ("write", "verify", "commit", "journal", "old_aside", "new_in_place", "old_removed", "committed")
COMMIT_STAGES = STAGES[3:]
# how long a conversion waits for another one's commit to the same DST to finish
COMMIT_WAIT_S = 30.0

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


class VerificationFailed(RuntimeError):
    """The written checkpoint did not reproduce SRC; DST was not created (or was left as it was)."""

    def __init__(self, report: "VerificationReport"):
        failed = [c.name for c in report.cases if not c.passed] + (["config.json"] if report.config_mismatches else [])
        super().__init__(f"verification failed for {failed} (thresholds for {report.dtype_name})")
        self.report = report


class ConversionInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived during a conversion; it was stopped and cleaned up."""

    def __init__(self, signum: int):
        self.signum = signum
        self.dst_complete = False  # True when the signal came during the final renames and DST is complete
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# --------------------------------------------------------------------------------------------------
# thresholds and comparisons
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """PASS when ``max|dst - src| <= max_abs · max(1, max|src|)`` and the per-token cosines reach
    ``min_cos`` (worst token) and ``mean_cos`` (average). SRC runs in float32, DST in its stored dtype."""

    max_abs: float
    min_cos: float
    mean_cos: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(max_abs=1e-4, min_cos=0.99999, mean_cos=0.999999),
    torch.float16: Tolerance(max_abs=2e-2, min_cos=0.995, mean_cos=0.999),
    torch.bfloat16: Tolerance(max_abs=1e-1, min_cos=0.98, mean_cos=0.995),
}


@dataclass
class CaseResult:
    """One verification case: token rows compared (last_hidden_state rows and pooled vectors)."""

    name: str
    items: int
    tokens: int
    max_abs: float
    ref_max: float
    min_cos: float
    mean_cos: float
    passed: bool


@dataclass
class VerificationReport:
    dtype_name: str
    tolerance: Tolerance
    cases: list[CaseResult] = field(default_factory=list)
    config_mismatches: list[str] = field(default_factory=list)  # hyper-parameters that did not survive the trip

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases) and not self.config_mismatches

    def table(self) -> str:
        """The per-case table the CLI prints."""
        t = self.tolerance
        head = (
            f"{'case':<26}{'items':>6}{'tokens':>8}{'max abs diff':>14}{'max |src|':>11}"
            f"{'min cos':>12}{'mean cos':>12}  result"
        )
        lines = [head, "-" * len(head)]
        for c in self.cases:
            lines.append(
                f"{c.name:<26}{c.items:>6}{c.tokens:>8}{c.max_abs:>14.3e}{c.ref_max:>11.3f}"
                f"{c.min_cos:>12.8f}{c.mean_cos:>12.8f}  {'PASS' if c.passed else 'FAIL'}"
            )
        lines.append(
            f"thresholds for {self.dtype_name}: max abs diff <= {t.max_abs:g} x max(1, max|src|), "
            f"min cos >= {t.min_cos}, mean cos >= {t.mean_cos}"
        )
        if self.config_mismatches:
            differ = "; ".join(self.config_mismatches)
            lines.append(f"config.json: FAIL, reloaded hyper-parameters differ from SRC: {differ}")
        else:
            lines.append("config.json: PASS, reloaded hyper-parameters equal SRC's")
        return "\n".join(lines)


def compare_outputs(
    name: str, items: int, reference: list[torch.Tensor], actual: list[torch.Tensor], tolerance: Tolerance
) -> CaseResult:
    """Compare matching ``(rows, D)`` tensors (token features, pooled vectors) row by row."""
    ref = torch.cat([r.detach().double().reshape(-1, r.shape[-1]) for r in reference]).cpu()  # (rows, D)
    out = torch.cat([a.detach().double().reshape(-1, a.shape[-1]) for a in actual]).cpu()  # (rows, D)
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: outputs have shape {tuple(out.shape)}, the reference {tuple(ref.shape)}")
    max_abs = (out - ref).abs().max().item()
    ref_max = ref.abs().max().item()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1, eps=1e-12)  # (rows,)
    min_cos, mean_cos = cos.min().item(), cos.mean().item()
    finite = math.isfinite(max_abs) and math.isfinite(min_cos)
    passed = (
        finite
        and max_abs <= tolerance.max_abs * max(1.0, ref_max)
        and min_cos >= tolerance.min_cos
        and mean_cos >= tolerance.mean_cos
    )
    tokens = reference[0].reshape(-1, reference[0].shape[-1]).shape[0]  # the features; pooled vectors follow
    return CaseResult(name, items, int(tokens), max_abs, ref_max, min_cos, mean_cos, passed)


# --------------------------------------------------------------------------------------------------
# verification inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class VerificationCase:
    """``batch`` for the standard model (``(B, C, H, W)`` / ``(B, C, T, H, W)``), or ``items`` packed into
    one sequence for the packing model (the reference runs them one at a time)."""

    name: str
    batch: torch.Tensor | None = None
    items: list[torch.Tensor] | None = None


def make_verification_cases(config: HEVCViTConfig, seed: int = 0) -> list[VerificationCase]:
    """Deterministic random inputs sized from the config: a square image at the processor size (capped at
    16x16 patches), a batch of two at another size, a non-square image, a non-square video and a mixed
    packed batch (tall image, video, square image, a single patch)."""
    g = torch.Generator().manual_seed(seed)
    C, p = config.num_channels, config.patch_size
    n1 = min(max(config.image_size // p, 2), 16)
    n2 = n1 // 2 if n1 // 2 >= 2 else n1 + 2

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    s1, s2 = n1 * p, n2 * p
    frames = 4 if C != 4 else 5  # a video item (C, T, H, W) with T == C would read as an image stack
    return [
        VerificationCase(f"image_{s1}x{s1}", batch=pixels(1, C, s1, s1)),
        VerificationCase(f"batch_2x{s2}x{s2}", batch=pixels(2, C, s2, s2)),
        VerificationCase(f"image_{3 * p}x{5 * p}", batch=pixels(1, C, 3 * p, 5 * p)),
        VerificationCase(f"video_4x{2 * p}x{3 * p}", batch=pixels(1, C, 4, 2 * p, 3 * p)),
        VerificationCase(
            "packed_mixed",
            items=[pixels(C, 5 * p, 2 * p), pixels(C, frames, 2 * p, 2 * p), pixels(C, s2, s2), pixels(C, p, p)],
        ),
    ]


def _outputs(
    model: HEVCViTPreTrainedModel, case: VerificationCase, packed: bool, device: torch.device
) -> list[torch.Tensor]:
    """``[last (rows, D), pooled (n, D)]`` of one case, float32 on the CPU. ``packed``: one packed forward of
    all items through a packing model; otherwise the standard model, one item at a time for ``items``."""
    with torch.no_grad():
        if case.batch is not None:
            out = model(case.batch.to(device))
            lasts, pooled = [out.last_hidden_state], [out.pooler_output]
        elif packed:
            patches, grid = patchify_items(case.items, model.config.patch_size, model.config.num_channels)
            out = model(patches.to(device), grid)
            lasts, pooled = [out.last_hidden_state], [out.pooler_output]
        else:
            lasts, pooled = [], []
            for item in case.items:
                batch = as_batch(item, model.config.num_channels)  # (1, C, H, W) or (1, C, T, H, W)
                out = model(batch.to(device))
                lasts.append(out.last_hidden_state[0])
                pooled.append(out.pooler_output)
    last = torch.cat([x.reshape(-1, x.shape[-1]) for x in lasts]).float().cpu()  # (rows, D)
    result = [last]
    if pooled[0] is not None:
        result.append(torch.cat(pooled).float().cpu())  # (n, D)
    return result


def _items(case: VerificationCase) -> int:
    return case.batch.shape[0] if case.batch is not None else len(case.items)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def reference_config_dict(config: HEVCViTConfig, fmt: str, dtype: torch.dtype) -> dict:
    """``config.json`` contents for target format ``fmt`` (the reference project's ``model_type``)."""
    import transformers

    if fmt not in REFERENCE_MODEL_TYPES:
        raise ValueError(f"target format {fmt!r}; expected one of {sorted(REFERENCE_MODEL_TYPES)}")
    d = {k: getattr(config, k) for k in ARCH_KEYS if k != "head_norm_eps"}
    head_eps = config.head_norm_eps
    if head_eps is not None:
        d["head_norm_eps"] = float(head_eps)
    dtype_name = str(dtype).removeprefix("torch.")
    d.update(
        architectures=[REFERENCE_ARCHITECTURES[fmt]],
        model_type=REFERENCE_MODEL_TYPES[fmt],
        torch_dtype=dtype_name,  # transformers 4 reads this name ...
        dtype=dtype_name,  # ... transformers 5 this one
        transformers_version=transformers.__version__,
    )
    return dict(sorted(d.items()))


def clip_preprocessor_dict(image_size: int) -> dict:
    """A ``CLIPImageProcessor`` config at ``image_size``: resize the short side, centre-crop, normalise."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def target_state_dict(native: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Native weights cast to ``dtype`` (floating tensors only) and renamed to format ``fmt``; every tensor
    contiguous and with its own storage, as safetensors requires."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in native.items()}
    out = convert_from_native(cast, fmt)
    seen: set[int] = set()
    for key, value in out.items():
        value = value.contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_stage(stage: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# signals and the temporary folder
# --------------------------------------------------------------------------------------------------


class _SignalGuard:
    """Turns SIGINT / SIGTERM / SIGHUP into :class:`ConversionInterrupted` (so clean-up runs), and holds
    them back during the final renames. Installs nothing outside the main thread or for ignored signals."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.holding = False
        self.held: int | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.holding:
            self.held = signum
            return
        raise ConversionInterrupted(signum)

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                sig = getattr(signal, name, None)
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @contextmanager
    def hold(self, reraise: bool = True) -> Iterator[None]:
        """Signals arriving inside are acted on when it ends (when ``reraise``), never in the middle."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            held, self.held = self.held, None
            if held is not None and reraise:
                raise ConversionInterrupted(held)


def _temp_prefix(dst: Path, kind: str) -> str:
    return f".{dst.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale(dst: Path, log: Callable[[str], None]) -> None:
    """Remove temporary folders of earlier conversions to ``dst`` killed on this host (their process is gone),
    except those a commit journal names (they are the commit's; see :func:`finish_interrupted_commit`)."""
    record = _read_journal_file(_journal_path(dst)) or {}
    journaled = {record.get("new"), record.get("aside")}
    for kind in ("partial", "replaced"):
        mine = f".{dst.name}.{kind}-{socket.gethostname()}-"
        for path in dst.parent.glob(f".{dst.name}.{kind}-*"):
            if path.name.startswith(mine) and path.is_dir() and path.name not in journaled:
                _remove_if_dead(path, path.name[len(mine):].split("-")[0], log)


def _remove_if_dead(path: Path, pid_text: str, log: Callable[[str], None]) -> None:
    """Remove ``path``, a temporary folder of process ``pid_text`` on this host, when that process is gone."""
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return
    try:
        os.kill(int(pid_text), 0)
        return  # that conversion is still running
    except ProcessLookupError:
        pass
    except PermissionError:
        return
    shutil.rmtree(path, ignore_errors=True)
    log(f"removed {path}, left by an interrupted conversion (process {pid_text})")


def _check_paths(src: Path, dst: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(f"SRC {src} does not exist")
    s, d = src.resolve(), dst.resolve()
    if s == d or s.is_relative_to(d) or d.is_relative_to(s):
        raise ValueError(f"DST {dst} overlaps SRC {src}; choose a DST outside SRC (SRC is never modified)")


def _check_dst(dst: Path, force: bool) -> None:
    if os.path.lexists(dst):
        if not dst.is_dir() or dst.is_symlink():
            raise FileExistsError(f"DST {dst} exists and is not a folder; refusing to replace it")
        if not force:
            raise FileExistsError(
                f"DST {dst} already exists; pass --force to replace it (it is replaced only by a verified result)"
            )


# --------------------------------------------------------------------------------------------------
# the commit: a journal beside DST, the old folder kept until the new one is in place
# --------------------------------------------------------------------------------------------------


class InterruptedCommitError(OSError):
    """A commit journal beside DST that cannot be finished safely (its folders were changed by hand)."""


def _journal_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.commit"


def _folder_id(path: Path) -> int | None:
    """The inode number of the folder at ``path`` (not following a link): renames within DST's parent keep
    it, so it tells which folder sits where (``st_dev`` is left out: NFS clients number devices each their
    own way). None when there is no folder there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino if stat.S_ISDIR(st.st_mode) else None


def _lock(fd: int, wait: bool) -> bool:
    """Take the advisory lock of an open file (it dies with the process); False when another holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the journal alone
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _read_journal_file(journal: Path) -> dict | None:
    try:
        with open(journal, encoding="utf-8") as f:
            return _parse_journal(f.read())
    except OSError:
        return None


def _parse_journal(text: str) -> dict | None:
    """A journal's record; None when it is empty or cut short (its run died before anything moved: the
    record is complete and on disk before the first rename)."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    keys = ("new", "new_id", "old_id", "aside", "host", "pid")
    return record if isinstance(record, dict) and all(k in record for k in keys) else None


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28)
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or
    the file system cannot, and nothing moved."""
    fn = _renameat2()
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _is_open_as(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced since)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _open_journal(dst: Path, wait_s: float) -> int | None:
    """A descriptor holding the lock of DST's journal, or None when there is no journal. A journal whose
    lock is held belongs to a live conversion committing right now: wait up to ``wait_s`` for it."""
    journal = _journal_path(dst)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(journal, os.O_RDWR)
        except FileNotFoundError:
            return None
        if _lock(fd, wait=False):
            if _is_open_as(fd, journal):
                return fd
            os.close(fd)  # finished (and removed) while we waited for it: look again
            continue
        os.close(fd)
        if time.monotonic() > deadline:
            record = _read_journal_file(journal) or {}
            raise FileExistsError(
                f"another conversion (process {record.get('pid', '?')} on {record.get('host', '?')}) has been "
                f"committing to DST {dst} for over {wait_s:g} s ({journal} is locked); try again when it has finished"
            )
        time.sleep(0.05)


def finish_interrupted_commit(
    dst: str | os.PathLike, log: Callable[[str], None] = print, wait_s: float = COMMIT_WAIT_S
) -> bool:
    """Finish the commit of a conversion to ``dst`` that was killed (or failed) while replacing DST.

    Its journal (``.DST.commit``) names the verified new folder and the old one. Whatever instant the run
    stopped at, the new folder is put in place as DST and only then is the old one deleted; a journal cut
    short (the run died before anything moved) is removed. Every conversion to ``dst`` calls this first.
    Returns True when there was a journal. Raises ``FileExistsError`` while a live conversion holds it
    (after ``wait_s``), :class:`InterruptedCommitError` when its folders were changed by hand.
    """
    dst = Path(dst)
    journal = _journal_path(dst)
    fd = _open_journal(dst, wait_s)
    if fd is None:
        return False
    try:
        with os.fdopen(os.dup(fd), encoding="utf-8") as f:
            record = _parse_journal(f.read())
        if record is not None:
            _finish_commit(dst, record, _no_stage)
        os.unlink(journal)
        _fsync(dst.parent)
    finally:
        os.close(fd)
    if record is None:
        log(f"removed {journal.name}, left by a conversion killed before its commit began")
    else:
        log(
            f"finished the commit of an interrupted conversion (process {record['pid']} on {record['host']}): "
            f"{dst} is its verified result"
        )
    return True


def _finish_commit(dst: Path, record: dict, on_stage: Callable[[str], None]) -> None:
    """Take a journaled commit from wherever it stopped to its end: the new folder at DST, then the old one
    deleted. Each step looks at which folder (by identity) sits where, so a run killed anywhere in here is
    finished the same way by the next; neither verified folder is deleted before the other is in place."""
    parent = dst.parent
    new, aside = parent / record["new"], parent / record["aside"]
    new_id, old_id = record["new_id"], record["old_id"]
    if _folder_id(dst) != new_id:
        if _folder_id(new) != new_id:
            raise InterruptedCommitError(
                f"{_journal_path(dst)} records a commit of {new} to {dst}, but that folder is neither at {new} "
                f"nor at {dst}; everything was left as it is: choose what DST should be, then delete the journal"
            )
        if os.path.lexists(dst):
            if old_id is None or _folder_id(dst) != old_id:
                raise InterruptedCommitError(
                    f"{dst} was changed after the commit recorded in {_journal_path(dst)} began; everything was "
                    f"left as it is (the verified new folder is {new}): choose what DST should be, then delete "
                    f"the journal"
                )
            if not _exchange(new, dst):  # one atomic swap where the OS can: DST is never missing
                os.rename(dst, aside)
                _fsync(parent)
                on_stage("old_aside")
                os.rename(new, dst)
        else:
            os.rename(new, dst)
        _fsync(parent)
        on_stage("new_in_place")
    if old_id is not None:
        for path in (aside, new):  # the old folder, wherever the swap left it
            if _folder_id(path) == old_id:
                shutil.rmtree(path, ignore_errors=True)
        _fsync(parent)
    on_stage("old_removed")


def _commit(tmp: Path, dst: Path, force: bool, on_stage: Callable[[str], None] = _no_stage) -> None:
    """Move the verified folder ``tmp`` into place as DST, replacing an existing DST (``force``).

    First a journal (``.DST.commit``, locked for the life of the commit, one per DST) records both folders
    and is flushed to disk; then the new folder goes in (swapped with the old one atomically where the OS
    can, else the old renamed aside first), the old one is deleted, and the journal removed. An error or a
    kill at any point leaves the journal: :func:`finish_interrupted_commit` finishes the commit from there.
    """
    journal = _journal_path(dst)
    while True:
        if journal.exists():  # another conversion's commit to DST, killed or still running: finish it first
            finish_interrupted_commit(dst, log=lambda _: None)
        try:
            fd = os.open(journal, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            continue
        try:
            _lock(fd, wait=True)
            if not _is_open_as(fd, journal):
                continue  # found empty and unlocked by a run looking for stale journals, and removed: again
            try:
                record = _journal_record(tmp, dst, force)
            except FileExistsError:  # refused before anything moved: the journal goes with the refusal
                os.unlink(journal)
                raise
            os.write(fd, json.dumps(record, indent=1).encode() + b"\n")
            os.fsync(fd)
            _fsync(dst.parent)
            on_stage("journal")
            _finish_commit(dst, record, on_stage)
            os.unlink(journal)
            _fsync(dst.parent)
            break
        finally:
            os.close(fd)
    on_stage("committed")


def _journal_record(tmp: Path, dst: Path, force: bool) -> dict:
    """What the journal of committing ``tmp`` to ``dst`` records, checked under its lock: both folders by
    name and identity, where the old one goes aside, and who commits."""
    if os.path.lexists(dst):
        if not force:
            raise FileExistsError(f"DST {dst} appeared during the conversion; pass --force to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise FileExistsError(f"DST {dst} appeared during the conversion and is not a folder")
    return {
        "dst": dst.name,
        "new": tmp.name,
        "new_id": _folder_id(tmp),
        "old_id": _folder_id(dst),
        "aside": f"{_temp_prefix(dst, 'replaced')}{secrets.token_hex(4)}",
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _finish_own_commit(dst: Path, tmp: Path, log: Callable[[str], None]) -> bool:
    """After an error inside this run's commit of ``tmp``: finish it as the next run would. True when DST is
    now the new folder; when it cannot be finished here, the journal stays for the next run."""
    if not _journal_names(dst, tmp):
        return False  # refused before the journal was written: nothing moved
    try:
        return finish_interrupted_commit(dst, log)
    except Exception as e:
        log(f"could not finish the commit now ({e}); the next conversion to {dst} will")
        return False


def _journal_names(dst: Path, tmp: Path) -> bool:
    """Whether DST's journal records ``tmp`` as the folder being committed."""
    record = _read_journal_file(_journal_path(dst))
    return record is not None and record.get("new") == tmp.name


# --------------------------------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    src: Path
    dst: Path
    source_format: str
    target_format: str
    dtype: torch.dtype
    report: VerificationReport


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most parameters."""
    counts = Counter()
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] += v.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def build_model(cls: type, config: HEVCViTConfig, state: dict[str, torch.Tensor]) -> HEVCViTPreTrainedModel:
    """A model of class ``cls`` holding ``state`` (native names, loaded strictly, tensors shared)."""
    with torch.device("meta"):
        model = cls(config)
    load_state_dict_checked(model, state, strict=True, assign=True)
    return model.eval()


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "packing",
    preset: str | None = None,
    config_json: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    on_stage: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert SRC (any format) into a verified Hugging Face folder DST in format ``to``.

    to: ``packing`` (``model_type: llava_vit_packing``) or ``standard`` (``model_type: onevision_encoder``).
    preset / config_json: the architecture of a weights-only SRC (see :func:`load_checkpoint`).
    dtype: ``float32``, ``bfloat16``, ``float16`` or None (as stored in SRC).
    force: replace an existing DST folder — only once the new checkpoint has passed verification.
    device: where the verification forwards run.
    on_stage: called with the name of each stage the conversion reaches (``STAGES``, in order), e.g. to
        interrupt it at a known point in tests.
    Returns the :class:`ConversionResult` with the verification report (also printed through ``log``).
    Raises ``FileExistsError`` / ``FileNotFoundError`` / ``ValueError`` for bad input (nothing written),
    :class:`VerificationFailed` when DST does not reproduce SRC, :class:`ConversionInterrupted` on a signal;
    in every case DST is left as it was and the temporary folder is removed. A commit to DST that an
    earlier run left half-done (killed while replacing DST) is finished first
    (:func:`finish_interrupted_commit`); an error during this run's own commit finishes it the same way.
    """
    src, dst = Path(src), Path(dst)
    if to not in TARGET_FORMATS:
        raise ValueError(f"to={to!r}; expected one of {list(TARGET_FORMATS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in TOLERANCES:
        raise ValueError(f"dtype={dtype}; expected one of {list(DTYPES)}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r}; expected a torch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!s}, but CUDA is not available here; use --device cpu")
    stage = on_stage if on_stage is not None else _no_stage
    _check_paths(src, dst)

    with _SignalGuard() as guard:
        if dst.parent.is_dir():
            with guard.hold():
                finish_interrupted_commit(dst, log)
        _check_dst(dst, force)
        loaded = load_checkpoint(src, preset=preset, config_json=config_json)
        config, source_format = loaded.config, loaded.format
        config.attention_backend = "eager"  # the specification; the comparison is about the weights
        target_dtype = dtype if dtype is not None else stored_dtype(loaded.state_dict)
        if target_dtype not in TOLERANCES:
            raise ValueError(f"SRC is stored in {target_dtype}; pass --dtype with one of {list(DTYPES)}")
        weights_only = not (src / CONFIG_NAME).is_file()
        where = f" (architecture from {_arch_source(src, preset, config_json)})" if weights_only else ""
        log(f"SRC {src}: {source_format} format{where}")
        log(f"  {describe_architecture(config)}")

        # the reference: SRC in float32, strictly loaded — a wrong preset or key table fails here
        native32 = {k: v.float() if v.is_floating_point() else v for k, v in loaded.state_dict.items()}
        reference = build_model(HEVCViTModel, config, native32).to(device)
        cases = make_verification_cases(config)
        expected = {c.name: _outputs(reference, c, packed=False, device=device) for c in cases}
        del reference, native32

        created = [d for d in (dst.parent, *dst.parent.parents) if not d.exists()]  # deepest first
        tmp = None
        committed = False
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(dst, log)
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst, "partial"), dir=dst.parent))
            log(f"writing {to} checkpoint ({str(target_dtype).removeprefix('torch.')}) to {tmp.name}")
            _write_folder(tmp, src, loaded.state_dict, config, to, target_dtype, stage)
            del loaded
            stage("verify")
            log(f"verifying: reloading it and comparing with SRC on {len(cases)} cases")
            report = _verify(tmp, config, cases, expected, target_dtype, device)
            log(report.table())
            if not report.passed:
                raise VerificationFailed(report)
            stage("commit")
            try:
                with guard.hold():
                    _commit(tmp, dst, force, stage)
                    committed = True
            except BaseException as e:
                if not committed:  # an error inside the commit left its journal: finish it now
                    with guard.hold(reraise=False):
                        committed = _finish_own_commit(dst, tmp, log)
                if isinstance(e, ConversionInterrupted):
                    e.dst_complete = committed  # a signal held back during the renames, acted on after them
                raise
        finally:
            with guard.hold(reraise=False):
                if tmp is not None and tmp.exists() and not _journal_names(dst, tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                if not committed:
                    for d in created:  # folders made for DST's parent, when nothing ended up in them
                        try:
                            d.rmdir()
                        except OSError:
                            break
    log(f"wrote {dst}")
    return ConversionResult(src, dst, source_format, to, target_dtype, report)


def _write_folder(
    folder: Path,
    src: Path,
    native: dict[str, torch.Tensor],
    config: HEVCViTConfig,
    fmt: str,
    dtype: torch.dtype,
    on_stage: Callable[[str], None] = _no_stage,
) -> None:
    from safetensors.torch import save_file

    tensors = target_state_dict(native, fmt, dtype)
    save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    _fsync(folder / SAFETENSORS_NAME)
    del tensors
    on_stage("write")
    processor = src / PREPROCESSOR_NAME if src.is_dir() else None
    if processor is not None and processor.is_file():
        shutil.copyfile(processor, folder / PREPROCESSOR_NAME)  # keep SRC's own processor settings
        _fsync(folder / PREPROCESSOR_NAME)
    else:
        _write_json(folder / PREPROCESSOR_NAME, clip_preprocessor_dict(config.image_size))
    _write_json(folder / CONFIG_NAME, reference_config_dict(config, fmt, dtype))
    # mkdtemp (and safetensors) create private files; DST gets the permissions of a folder made by hand
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)
    _fsync(folder)


def _verify(
    folder: Path,
    config: HEVCViTConfig,
    cases: list[VerificationCase],
    expected: dict[str, list[torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
) -> VerificationReport:
    """Reload ``folder`` with ``from_pretrained`` (standard model for batches, packing model for the packed
    case, one at a time) and compare every case with SRC's outputs, and the reloaded config with SRC's."""
    tolerance = TOLERANCES[dtype]
    report = VerificationReport(str(dtype).removeprefix("torch."), tolerance)
    actual: dict[str, list[torch.Tensor]] = {}
    for cls, packed in ((HEVCViTModel, False), (HEVCViTPackingModel, True)):
        mine = [c for c in cases if (c.items is not None) == packed]
        if not mine:
            continue
        model = cls.from_pretrained(folder, dtype="auto", attn_implementation="eager", device_map=device)
        loaded_dtype = model.patch_embed.proj.weight.dtype
        if loaded_dtype != dtype:
            raise AssertionError(f"{folder} reloaded as {loaded_dtype}; it was written as {dtype}")
        for case in mine:
            actual[case.name] = _outputs(model, case, packed=packed, device=device)
        for key in ARCH_KEYS:
            want, got = getattr(config, key, None), getattr(model.config, key, None)
            if want != got and f"{key}: SRC {want!r}, DST {got!r}" not in report.config_mismatches:
                report.config_mismatches.append(f"{key}: SRC {want!r}, DST {got!r}")
        del model
    for case in cases:
        report.cases.append(compare_outputs(case.name, _items(case), expected[case.name], actual[case.name], tolerance))
    return report


def _arch_source(src: Path, preset: str | None, config_json: str | os.PathLike | None) -> str:
    if preset is not None:
        return f"preset {preset!r}"
    if config_json is not None:
        return str(config_json)
    sidecar = sibling_config_json(src)
    return f"{sidecar} and tensor shapes" if sidecar is not None else "tensor shapes"


def describe_architecture(config: HEVCViTConfig) -> str:
    """One line: the numbers, the norm and the preset they match."""
    preset = config.matching_preset()
    head_eps = config.head_norm_eps
    return (
        f"patch {config.patch_size}, width {config.hidden_size}, heads {config.num_attention_heads} "
        f"(head_dim {config.head_dim}), layers {config.num_hidden_layers}, mlp {config.intermediate_size}, "
        f"{config.layer_norm_type} eps {config.layer_norm_eps:g}"
        + (f" (head norm eps {head_eps:g})" if head_eps is not None else "")
        + f", pooling head {'yes' if config.use_head else 'no'}, image_size {config.image_size}; "
        + (f"preset {preset}" if preset else "no preset (custom)")
    )


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    path: Path
    format: str
    model_type: str | None
    config: HEVCViTConfig
    num_parameters: int
    dtypes: dict[str, int]  # dtype name -> parameters stored in it
    files: list[tuple[str, int]]  # (name, bytes)
    fits: str  # "yes", or the strict-loading error

    def render(self) -> str:
        """The text ``hevc-vit info`` prints."""
        total = sum(self.dtypes.values()) or 1
        if len(self.dtypes) == 1:
            dtypes = next(iter(self.dtypes))
        else:
            dtypes = ", ".join(f"{name} ({100 * n / total:.1f}%)" for name, n in self.dtypes.items())
        kind = f" (model_type {self.model_type})" if self.model_type else " (weights only, no config.json)"
        lines = [
            f"path:          {self.path}",
            f"format:        {self.format}{kind}",
            f"architecture:  {describe_architecture(self.config)}",
            f"parameters:    {self.num_parameters:,}",
            f"dtype:         {dtypes}",
            f"weights fit:   {self.fits}",
            "files:",
        ]
        for name, size in self.files:
            lines.append(f"  {name:<40}{format_size(size):>12}")
        lines.append(f"  {'total':<40}{format_size(sum(size for _, size in self.files)):>12}")
        return "\n".join(lines)


def format_size(size: int) -> str:
    """Bytes in binary units: ``691.4 KiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def describe_checkpoint(
    path: str | os.PathLike, preset: str | None = None, config_json: str | os.PathLike | None = None
) -> CheckpointInfo:
    """Format, architecture (and the preset it matches), parameter count, dtype and file sizes of a
    checkpoint of any format; ``fits`` says whether the weights load strictly into that architecture."""
    path = Path(path)
    loaded = load_checkpoint(path, preset=preset, config_json=config_json, check_fit=False)
    model_type = None
    if (path / CONFIG_NAME).is_file():
        with open(path / CONFIG_NAME, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    dtypes = Counter()
    for v in loaded.state_dict.values():
        dtypes[str(v.dtype).removeprefix("torch.")] += v.numel()
    if path.is_dir():
        files = sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.is_file())
    else:
        files = [(path.name, path.stat().st_size)]
        sidecar = config_json if config_json is not None else (None if preset else sibling_config_json(path))
        if sidecar is not None:
            files.append((Path(sidecar).name, Path(sidecar).stat().st_size))
    try:
        source = str(path / CONFIG_NAME) if model_type is not None else _arch_source(path, preset, config_json)
        check_weights_fit(loaded.config, loaded.state_dict, loaded.format, path, source)  # before building
        with torch.device("meta"):
            model = HEVCViTModel(loaded.config)
        load_state_dict_checked(model, loaded.state_dict, strict=True, assign=True)
        fits = "yes (strict load)"
    except ValueError as e:
        fits = f"NO: {e}"
    return CheckpointInfo(
        path=path,
        format=loaded.format,
        model_type=model_type,
        config=loaded.config,
        num_parameters=sum(dtypes.values()),
        dtypes=dict(dtypes.most_common()),
        files=files,
        fits=fits,
    )


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

_CONVERT_EPILOG = """\
formats:
  standard  Hugging Face OneVision encoder folder (model_type onevision_encoder or llava_vit)
  packing   reference packing folder (model_type llava_vit_packing)
  hevc_vit  this library's save_pretrained folders (read only)
  legacy    training .pt file without config: keys conv1, ln_pre, transformer.layers.N.*, ln_post, head.*
            (architecture from --preset / --config, else the .json beside the file, checked against
            the tensor shapes; LayerNorm eps 1e-5 kept)

DST is written in a temporary folder beside it, reloaded and compared with SRC on generated inputs
(two image sizes, a non-square image, a video, a mixed packed batch), and moved into place only when
every case passes. A failure or an interrupt leaves no DST; SRC is only read.

exit status: 0 verified and written, 1 verification failed, 2 invalid input (nothing written),
130/143 interrupted (nothing written)."""


def _add_arch_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        metavar="NAME",
        help=f"architecture of a weights-only SRC (legacy .pt): one of {', '.join(PRESETS)}; "
        "checked against the tensor shapes",
    )
    group.add_argument(
        "--config",
        dest="config_json",
        metavar="JSON",
        help="architecture of a weights-only SRC as a JSON file of hyper-parameters (HEVCViTConfig names, "
        "or head_dim); default: the .json beside SRC (model.json for model.pt) when it exists",
    )


def register_cli(subparsers) -> None:
    """Add ``convert`` and ``info`` to the ``hevc-vit`` command line."""
    convert = subparsers.add_parser(
        "convert",
        help="convert a checkpoint of any format into a verified packing or standard folder",
        description="Convert SRC (HF standard or packing folder, or legacy training .pt) into a Hugging Face\n"
        "folder DST (config.json, model.safetensors, preprocessor_config.json), verified before it is\n"
        "moved into place.",
        epilog=_CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("src", metavar="SRC", help="checkpoint folder, or legacy .pt / bare .safetensors file")
    convert.add_argument("dst", metavar="DST", help="output folder (must not exist unless --force)")
    convert.add_argument(
        "--to",
        choices=TARGET_FORMATS,
        default="packing",
        help="format of DST: packing (model_type llava_vit_packing, fused qkv) or standard (model_type "
        "onevision_encoder, separate q/k/v); default: %(default)s",
    )
    _add_arch_options(convert)
    convert.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="dtype of DST's weights; default: as stored in SRC. The verification thresholds depend on it: "
        + "; ".join(
            f"{name} max abs diff <= {TOLERANCES[d].max_abs:g} x max|src|, min/mean cosine >= "
            f"{TOLERANCES[d].min_cos}/{TOLERANCES[d].mean_cos}"
            for name, d in DTYPES.items()
        ),
    )
    convert.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DST folder; it is replaced only after the new checkpoint passes verification",
    )
    convert.add_argument(
        "--device",
        default="cpu",
        help="device for the verification forwards, e.g. cpu, cuda, cuda:1; default: %(default)s",
    )
    convert.set_defaults(run=run_convert)

    info = subparsers.add_parser(
        "info",
        help="show a checkpoint's format, architecture, parameter count, dtype and file sizes",
        description="Show the format, architecture (and the preset it matches), parameter count, dtype and "
        "file sizes of a checkpoint of any format, and whether its weights load strictly.",
    )
    info.add_argument("path", metavar="PATH", help="checkpoint folder, or legacy .pt / bare .safetensors file")
    _add_arch_options(info)
    info.set_defaults(run=run_info)


def _error(command: str, message: str) -> int:
    print(f"hevc-vit {command}: error: {message}", file=sys.stderr)
    return EXIT_INPUT


@contextmanager
def _plain_warnings(command: str) -> Iterator[None]:
    """Warnings as one ``hevc-vit <command>: warning: ...`` line, without the source line."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"hevc-vit {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def run_convert(args: argparse.Namespace) -> int:
    try:
        with _plain_warnings("convert"):
            convert_checkpoint(
                args.src,
                args.dst,
                to=args.to,
                preset=args.preset,
                config_json=args.config_json,
                dtype=args.dtype,
                force=args.force,
                device=args.device,
            )
    except VerificationFailed as e:
        print(f"hevc-vit convert: FAIL: {e}; DST {args.dst} left as it was", file=sys.stderr)
        return EXIT_FAILED
    except ConversionInterrupted as e:
        outcome = "DST is complete and verified" if e.dst_complete else f"DST {args.dst} left as it was"
        print(f"hevc-vit convert: {e}; {outcome}, temporary files removed", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"hevc-vit convert: interrupted; DST {args.dst} left as it was", file=sys.stderr)
        return 128 + signal.SIGINT
    except (UnsafeCheckpointError, ValueError, OSError) as e:
        return _error("convert", str(e))
    return EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    try:
        with _plain_warnings("info"):
            print(describe_checkpoint(args.path, preset=args.preset, config_json=args.config_json).render())
    except (ValueError, OSError) as e:
        return _error("info", str(e))
    return EXIT_OK
