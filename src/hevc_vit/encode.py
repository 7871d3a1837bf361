"""``hevc-vit encode``: native-resolution features for files and folders of images and videos.

The Python API is :func:`encode`; the command line (``register_cli``) only parses and calls it.

Pipeline, per rank: inputs are expanded and shared out deterministically (input ``i`` goes to rank
``i % world_size``); worker processes decode, preprocess and patchify (``inputs.load_items``); the token-budget packer
groups items into forwards of at most ``max_tokens`` patches (first-fit decreasing); each group is one
forward of the packing model; features go to safetensors shards, and every input gets one index row. Under
``torchrun`` every rank writes its own shards and rank 0 merges the index after a barrier.

Legend: ``T`` packed tokens, ``n`` items, ``N`` tokens of one item, ``D`` width.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .configuration import PRESETS, HEVCViTConfig
from .grouping import TokenBudgetPacker
from .inputs import InputSpec, LoadedItem, LoadOptions, expand_inputs, load_items
from .packing import PackingPlan
from .processing import (
    PREPROCESSOR_NAME,
    FixedSizeProcessor,
    ImageProcessor,
    NativeResolutionProcessor,
    default_processor,
    load_processor,
)
from .sharding import (
    CONFIG_NAME,
    INDEX_NAME,
    LOCK_NAME,
    SHARD_DIR,
    SHARD_NAME,
    FolderLock,
    ShardWriter,
    make_row,
    rank_index_files,
    read_rows,
    write_index,
    write_json_atomic,
)

if TYPE_CHECKING:
    from .modeling import HEVCViTPackingModel

DEFAULT_OUT = "hevc_vit_features"
DEFAULT_MODEL = "small"
DEMO_SEED = 0
POOL_MODES = ("head", "mean", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ASSETS = Path(__file__).resolve().parent / "assets"
_BARRIER_TIMEOUT = timedelta(hours=6)  # ranks may finish their shares far apart on large runs
_ARCHITECTURE_FIELDS = (
    "patch_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "num_channels",
    "use_head",
)
# encode_config.json fields that change the features: a resumed run must match them
_RESUME_FIELDS = (
    "model", "weights", "architecture", "processor", "pool", "pooled_only", "frames", "temporal_context", "dtype",
)


def sample_inputs() -> list[Path]:
    """The sample images and the short clip shipped with the package (what ``hevc-vit encode`` encodes
    when given no input)."""
    return sorted(p for p in ASSETS.iterdir() if p.is_file() and not p.name.startswith(("_", ".")))


# --------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------


@dataclass
class EncodeResult:
    """What a run did. ``rows`` is the merged index (rank 0; empty on other ranks)."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    encoded: int = 0  # inputs encoded by this run, all ranks
    failed: int = 0  # inputs that failed in this run, all ranks
    skipped: int = 0  # inputs already done by an earlier run (--resume)
    tokens: int = 0  # patches encoded by this run, all ranks
    seconds: float = 0.0
    shards: int = 0  # shards written by this run, all ranks

    @property
    def index_path(self) -> Path:
        return self.out_dir / INDEX_NAME

    def summary(self) -> str:
        secs = max(self.seconds, 1e-9)
        done = self.encoded + self.failed
        lines = [
            f"encoded {self.encoded} of {done} inputs ({self.failed} failed"
            + (f", {self.skipped} already done before --resume" if self.skipped else "")
            + f"); {self.tokens:,} patches in {self.seconds:.1f} s: {done / secs:.2f} items/s, "
            f"{self.tokens / secs:,.0f} tokens/s",
        ]
        failures = [row for row in self.rows if row["status"] != "ok"]
        for row in failures[:10]:
            lines.append(f"  failed: {_printable(row['path'])}: {_printable(row['error'])}")
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more failed inputs (status 'failed' in the index)")
        if self.nothing_encoded:
            lines.append("nothing was encoded: every input failed (see the reasons above and in the index)")
        out_dir = _printable(str(self.out_dir))
        lines.append(f"features: {out_dir}/{SHARD_DIR}/ ({self.shards} new shards); index: {out_dir}/{INDEX_NAME}")
        return "\n".join(lines)

    @property
    def nothing_encoded(self) -> bool:
        """Every input of the run failed (none encoded, none done before): the CLI exits with status 1."""
        return self.encoded == 0 and self.skipped == 0


def _printable(text: str) -> str:
    """``text`` safe to print on any terminal: a file name that is not valid UTF-8 (held by Python as
    surrogate escapes) shows its bytes as ``\\xNN`` instead of making ``print`` raise."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) else str(text)


# --------------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    """This process's place in the run. One process: rank 0 of 1, no process group."""

    rank: int = 0
    world: int = 1
    group: Any = None  # a gloo group for barriers and broadcasts of Python objects (None: default group)
    owns_group: bool = False

    @classmethod
    def setup(cls, device: torch.device) -> "_Dist":
        import torch.distributed as dist

        under_launcher = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        if not dist.is_available() or not (dist.is_initialized() or under_launcher):
            return cls()
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=_BARRIER_TIMEOUT)
            owns = True
        group = None
        if dist.get_backend() != "gloo":  # object broadcasts and barriers stay on the CPU
            group = dist.new_group(backend="gloo", timeout=_BARRIER_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), group, owns)

    @property
    def active(self) -> bool:
        return self.world > 1 or self.owns_group

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0, on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on rank 0 (other ranks get an empty list)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out or []

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}; CUDA is not available here (use 'cpu')")
    if resolved.type == "cuda" and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}; this machine has {torch.cuda.device_count()} CUDA devices")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------------
# model and processor
# --------------------------------------------------------------------------------------------------


def load_model(
    model: str | os.PathLike | torch.nn.Module | None,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
) -> tuple["HEVCViTPackingModel", str, bool]:
    """The packing model to encode with: ``(model, description, weights_are_random)``.

    model: None (the demo: the ``small`` preset), a preset name (random weights, seed 0), anything
        ``HEVCViTPackingModel.from_pretrained`` reads (a checkpoint folder of any supported format, a
        weights-only file, a Hub id ``org/name``), or a model object (``HEVCViTPackingModel``/``HEVCViTModel``).
    """
    from .modeling import HEVCViTModel, HEVCViTPackingModel

    if isinstance(model, torch.nn.Module):
        if isinstance(model, HEVCViTModel):  # same layers, same weight names: reuse the weights
            packing = HEVCViTPackingModel(model.config)
            packing.load_state_dict(model.state_dict())
            model = packing
        if not isinstance(model, HEVCViTPackingModel):
            raise ValueError(f"model is a {type(model).__name__}; expected an HEVCViTPackingModel or HEVCViTModel")
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        name = str(getattr(model.config, "name_or_path", "") or f"<{type(model).__name__} object>")
        return model.to(device=device, dtype=dtype).eval(), name, False
    name = os.fspath(model) if model is not None else DEFAULT_MODEL
    if name in PRESETS:
        config = HEVCViTConfig.from_preset(name, attn_implementation=attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_SEED)
            packing = HEVCViTPackingModel(config)
        return packing.to(device=device, dtype=dtype).eval(), f"preset:{name} (random weights, seed {DEMO_SEED})", True
    local = os.path.exists(name)
    hub_id = not local and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not (local or hub_id):
        raise ValueError(
            f"model={name!r} is neither a preset ({', '.join(PRESETS)}), nor an existing checkpoint folder or file, "
            f"nor a Hugging Face Hub id (org/name)"
        )
    packing = HEVCViTPackingModel.from_pretrained(
        name, attn_implementation=attn_implementation, dtype=dtype, device_map=device
    )
    return packing.eval(), os.path.abspath(name) if local else name, False


def weights_identity(model: torch.nn.Module) -> str:
    """``sha256:HEX`` over the model's tensors as loaded: name, dtype, shape and bytes of every state-dict entry,
    in name order. ``--resume`` compares it, so new weights saved at the same ``--model`` path are refused.

    Why the loaded tensors rather than the files: they are what the features depend on, whatever the checkpoint
    format (folder, single file, Hub id, model object), and a partial hash of the files (size, dates, first and
    last MB) would miss a fine-tune that left the first and last tensors alone. One pass over the weights costs
    about as much as loading them (~1 s per GB), once per run, on rank 0 only; tensors are copied to the host one
    at a time, so memory stays bounded.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        host = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{str(host.dtype).removeprefix('torch.')}:{tuple(host.shape)}\n".encode("utf-8"))
        digest.update(host.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def build_processor(
    processor: str | os.PathLike | ImageProcessor,
    config: HEVCViTConfig,
    model_folder: str | None = None,
    min_image_tokens: int | None = None,
    max_image_tokens: int | None = None,
    max_video_tokens: int | None = None,
) -> ImageProcessor:
    """The processor: ``"native"`` (default), ``"clip"``, a ``preprocessor_config.json`` path, or an object.

    ``native`` and ``clip`` take their normalisation from the checkpoint's ``preprocessor_config.json`` when
    the model folder has one (a native one there is used as is, with the token bounds given here on top).
    """
    overrides = {
        k: v
        for k, v in dict(min_tokens=min_image_tokens, max_tokens=max_image_tokens, max_video_tokens=max_video_tokens).items()
        if v is not None
    }
    if isinstance(processor, ImageProcessor):
        chosen = processor
    elif processor in ("native", "clip"):
        base = None
        if model_folder is not None and (Path(model_folder) / PREPROCESSOR_NAME).is_file():
            base = load_processor(model_folder)
        if processor == "native" and isinstance(base, NativeResolutionProcessor):
            return NativeResolutionProcessor.from_dict({**base.to_dict(), **overrides})
        return default_processor(processor, config.patch_size, config.image_size, base=base, **overrides)
    else:
        chosen = load_processor(processor)
    if overrides:
        if not isinstance(chosen, NativeResolutionProcessor):
            raise ValueError(f"{sorted(overrides)} only apply to the native processor; got {type(chosen).__name__}")
        chosen = NativeResolutionProcessor.from_dict({**chosen.to_dict(), **overrides})
    if isinstance(chosen, NativeResolutionProcessor) and chosen.patch_size != config.patch_size:
        raise ValueError(
            f"the processor's patch_size={chosen.patch_size} differs from the model's patch_size={config.patch_size}"
        )
    return chosen


def _largest_item(processor: ImageProcessor, frames: int, patch_size: int) -> int:
    """Patches of the largest item the processor can produce (an image, or a clip of ``frames`` frames)."""
    if isinstance(processor, NativeResolutionProcessor):
        return max(processor.max_tokens, frames * max(processor.token_bounds(frames)))
    if isinstance(processor, FixedSizeProcessor) and processor.do_center_crop:
        h, w = processor.crop_size
        return frames * (h // patch_size) * (w // patch_size)
    return 0


# --------------------------------------------------------------------------------------------------
# output folder
# --------------------------------------------------------------------------------------------------


def _owned_outputs(out_dir: Path) -> list[Path]:
    """The files a run writes in ``out_dir`` (what ``--overwrite`` removes), by their exact names: the index
    files, ``encode_config.json`` and ``shards/rankRRRRR-NNNNN.safetensors`` (and their temporary files).
    Nothing else is touched, e.g. a ``shards/ranking.safetensors`` of the user's."""
    paths = [out_dir / INDEX_NAME, out_dir / CONFIG_NAME, *rank_index_files(out_dir)]
    shard_dir = out_dir / SHARD_DIR
    if shard_dir.is_dir():
        paths += sorted(p for p in shard_dir.iterdir() if SHARD_NAME.match(p.name) and p.is_file())
    return [p for p in paths if p.exists()]


def _holds_files(path: Path) -> bool:
    """``path`` is a folder with something in it besides a run's lock file."""
    return path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())


def _choose_out_dir(
    out_dir: str | os.PathLike | None, resume: bool, overwrite: bool, log, busy: frozenset[Path] = frozenset()
) -> Path:
    """The output folder to claim: ``out_dir``, or with None the default folder or the next free numbered one
    (skipping ``busy`` ones, held by runs in progress). Whether it may be used is decided under its lock."""
    if resume and overwrite:
        raise ValueError("resume and overwrite were both given; --resume continues a run, --overwrite replaces it")
    if out_dir is not None:
        path = Path(out_dir)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {_printable(str(path))} is a file; expected a folder (new or from an earlier run)")
        return path
    # No --out: the default folder, or the next free numbered one, so a second run never touches the first.
    base = Path(DEFAULT_OUT)
    if resume or overwrite:
        return base
    n, path = 1, base
    while path in busy or (path.exists() and (not path.is_dir() or _holds_files(path))):
        n += 1
        path = Path(f"{DEFAULT_OUT}-{n}")
    if n > 1:
        log(f"{base}/ holds an earlier run; writing to {path}/ (pass --out DIR to choose)")
    return path


def _claim_out_dir(out_dir: str | os.PathLike | None, resume: bool, overwrite: bool, log) -> FolderLock:
    """Rank 0: choose the output folder and take its lock before anything is checked or written there, then
    decide (under the lock) whether this run may use it. A second run on the same folder is refused with the
    holder's pid and host; without ``--out`` it moves on to the next numbered folder instead."""
    busy: set[Path] = set()
    while True:
        path = _choose_out_dir(out_dir, resume, overwrite, log, frozenset(busy))
        try:
            lock = FolderLock.acquire(path)
        except FileExistsError:
            if out_dir is not None or resume or overwrite:
                raise
            busy.add(path)
            continue
        if _holds_files(path) and not (resume or overwrite):
            lock.release()
            if out_dir is None:  # filled by a run that ended since we looked: take the next one
                busy.add(path)
                continue
            raise FileExistsError(
                f"--out {_printable(str(path))} exists and is not empty; pass --resume to continue the run that "
                f"wrote it, --overwrite to replace its outputs, or choose another --out"
            )
        return lock


def _check_resume_config(out_dir: Path, settings: dict[str, Any], say) -> None:
    path = out_dir / CONFIG_NAME
    if not path.is_file():
        return
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if "weights" not in earlier:  # written before the weights were recorded: nothing to compare with
        say(f"note: {path} does not record the weights' checksum; --resume cannot check they are the same")
        earlier["weights"] = settings.get("weights")
    differ = [k for k in _RESUME_FIELDS if earlier.get(k) != settings.get(k)]
    if differ:
        details = "; ".join(f"{k}: earlier {earlier.get(k)!r}, now {settings.get(k)!r}" for k in differ)
        raise ValueError(
            f"--resume: {out_dir} was encoded with other settings ({details}); resume with the same model and "
            f"options, or write to another --out"
        )


@dataclass
class _RunPlan:
    """What rank 0 decides and every rank follows."""

    out_dir: str
    specs: list[InputSpec]
    done: set[str]
    error: str = ""
    error_type: str = ""


def _prepare(
    inputs: Sequence[str | os.PathLike] | None,
    path: Path,
    resume: bool,
    overwrite: bool,
    settings: dict[str, Any],
    say=lambda msg: None,
) -> _RunPlan:
    """Rank 0, holding the folder's lock: the expanded inputs, the inputs already done (with resume), and the
    folder made ready. The output folder itself is never an input, even inside an input folder."""
    specs = expand_inputs(inputs if inputs else sample_inputs(), exclude=[path])
    if not specs:
        raise ValueError(f"no inputs: {[_printable(os.fspath(i)) for i in inputs or []]} name no files")
    done: set[str] = set()
    if resume and path.is_dir():
        _check_resume_config(path, settings, say)
        for row in read_rows(path).values():
            if row.get("status") == "ok" and (path / row.get("shard", "")).is_file():
                done.add(row["path"])
        shard_dir = path / SHARD_DIR
        if shard_dir.is_dir():  # temporary files of a run that was killed mid-write
            for tmp in shard_dir.iterdir():
                if (m := SHARD_NAME.match(tmp.name)) and m.group(3):
                    tmp.unlink()
    if overwrite and path.is_dir():
        for owned in _owned_outputs(path):
            owned.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / CONFIG_NAME, settings)
    return _RunPlan(str(path), specs, done)


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(4, max(0, (os.cpu_count() or 1) // local_world - 1))


def _key(index: int) -> str:
    return f"{index:08d}"


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


class _GroupRunner:
    """Runs groups through the model and hands their features to the writer.

    A group's results are collected one group later: on a GPU the next group is prepared and queued while
    the previous one's features come back, so the device does not wait for the host.
    """

    def __init__(self, model, device: torch.device, dtype: torch.dtype, pool: str, pooled_only: bool, writer, on_done):
        self.model, self.device, self.dtype = model, device, dtype
        self.pool, self.pooled_only = pool, pooled_only
        self.writer, self.on_done = writer, on_done
        self._pending = None

    def run(self, items: list[LoadedItem]) -> None:
        try:
            outputs = self._forward(items)
        except torch.cuda.OutOfMemoryError:
            self._finish()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) > 1:  # smaller forwards may fit
                half = len(items) // 2
                self.run(items[:half])
                self.run(items[half:])
                return
            item = items[0]
            self.writer.add_failure(_failure_row(item, f"out of memory on {self.device} ({item.num_tokens} patches)"))
            self.on_done(0, 1, 0)
            return
        self._finish()
        self._pending = (items, outputs)

    def _forward(self, items: list[LoadedItem]):
        patches = torch.cat([it.patches for it in items]) if len(items) > 1 else items[0].patches  # (T, C·p·p)
        positions = torch.cat([it.positions for it in items]) if len(items) > 1 else items[0].positions  # (T, 3)
        grid = torch.tensor([it.grid_thw for it in items], dtype=torch.int64)  # (n, 3)
        plan = PackingPlan.from_grid_thw(grid, device=self.device, patch_positions=positions)
        with torch.inference_mode():
            out = self.model(patches.to(self.device, self.dtype, non_blocking=True), plan=plan, return_dict=True)
            last = out.last_hidden_state  # (T, D)
            pooled = None
            if self.pool == "head":
                pooled = out.pooler_output  # (n, D)
            elif self.pool == "mean":
                counts = torch.tensor(plan.seqlens, dtype=torch.float32, device=self.device)[:, None]  # (n, 1)
                sums = last.new_zeros(plan.num_items, last.shape[1], dtype=torch.float32)
                pooled = (sums.index_add_(0, plan.segment_ids, last.float()) / counts).to(last.dtype)  # (n, D)
            non_blocking = self.device.type == "cuda"
            last_host = None if self.pooled_only else last.to("cpu", non_blocking=non_blocking)
            pooled_host = None if pooled is None else pooled.to("cpu", non_blocking=non_blocking)
            event = None
            if non_blocking:
                event = torch.cuda.Event()
                event.record()
        return plan.seqlens, last_host, pooled_host, event

    def _finish(self) -> None:
        if self._pending is None:
            return
        items, (seqlens, last, pooled, event) = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        per_item = torch.split(last, list(seqlens)) if last is not None else [None] * len(items)
        tokens = failed = 0
        for i, (item, features) in enumerate(zip(items, per_item)):
            tensors = {"grid_thw": torch.tensor(item.grid_thw, dtype=torch.int64)}
            if features is not None:
                tensors["patches"] = features.clone()  # (N, D), its own storage for safetensors
            if pooled is not None:
                tensors["pooled"] = pooled[i].clone()  # (D,)
            bad = [name for name in ("patches", "pooled") if name in tensors and not tensors[name].isfinite().all()]
            if bad:  # NaN or inf features are never stored as ok
                error = f"non-finite features: the {' and '.join(bad)} hold NaN or inf values (not stored)"
                self.writer.add_failure(_failure_row(item, error))
                failed += 1
                continue
            shape = list(tensors["patches"].shape) if features is not None else list(tensors["pooled"].shape)
            row = make_row(item.path, status="ok", key=_key(item.index), shape=shape, grid_thw=list(item.grid_thw),
                           kind=item.kind, **item.info)
            self.writer.add(row, tensors)
            tokens += item.num_tokens
        self.writer.end_forward()
        self.on_done(len(items) - failed, failed, tokens)

    def close(self) -> None:
        self._finish()


def _failure_row(item: LoadedItem, error: str | None = None) -> dict[str, Any]:
    return make_row(item.path, status="failed", error=error or item.error, key=_key(item.index))


def encode(
    inputs: Sequence[str | os.PathLike] | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | torch.nn.Module | None = None,
    processor: str | os.PathLike | ImageProcessor = "native",
    pool: str | None = None,
    pooled_only: bool = False,
    max_tokens: int = 16384,
    frames: int = 8,
    temporal_context: int | None = None,
    min_image_tokens: int | None = None,
    max_image_tokens: int | None = None,
    max_video_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    workers: int | None = None,
    shard_size_mb: float = 1024,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> EncodeResult:
    """Encode images and videos to features in ``out_dir``: safetensors shards plus ``index.jsonl``.

    inputs: files, folders (recursive), globs and ``.txt`` list files; one path (a ``str`` or ``Path``) is one
        input; None or empty: the sample images and clip shipped with the package.
    out_dir: the output folder; None: ``./hevc_vit_features`` (or ``-2``, ``-3``, ... when taken). An
        existing non-empty folder is refused unless ``resume`` (skip inputs already encoded there) or
        ``overwrite`` (remove the outputs of the earlier run first).
    model: None (the ``small`` preset with random weights: a demo), a preset name, a checkpoint folder, or a
        model object. processor: ``"native"``, ``"clip"``, a ``preprocessor_config.json`` path or an object.
    pool: ``"head"`` (the attention-pooling head; the default when the model has one), ``"mean"`` (mean of
        the item's patch features) or ``"none"``. pooled_only: save only pooled vectors, not patch features.
    max_tokens: patch budget of one forward; items are grouped first-fit decreasing, never split (an item
        over the budget runs alone).
    frames: frames sampled uniformly from each video; temporal_context: spread their RoPE ``t`` over
        ``0..temporal_context-1`` (None: the frame's index in the sample, ``0..frames-1``).
    device / dtype: default CUDA (this rank's GPU) in bfloat16 when available, else the CPU in float32.
    workers: processes decoding and preprocessing (0: in this process); one that dies fails only its input.
    shard_size_mb: features per shard before a new one is started (0: one shard per forward).
    progress: tqdm bar on stderr (None: when stderr is a terminal, on rank 0); log: where notices go
        (default: stderr, rank 0 only).

    Under ``torchrun`` (or with ``torch.distributed`` initialised) each rank encodes every ``world_size``-th
    input, writes its own shards, and rank 0 writes the merged index after a barrier.
    Returns an :class:`EncodeResult`; per-input failures are recorded in the index, not raised.
    The output folder is held exclusively (a lock that ends with the process) from before the first check
    until the run returns; invalid options are refused before anything is created.
    """
    if isinstance(inputs, (str, os.PathLike)):  # one path is one input, not a sequence of characters
        inputs = [inputs]
    _check_options(pool, max_tokens, frames, temporal_context, shard_size_mb, workers,
                   min_image_tokens, max_image_tokens, max_video_tokens)
    torch_device = _resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    dist = _Dist.setup(torch_device)
    say = (log or (lambda msg: print(msg, file=sys.stderr, flush=True))) if dist.rank == 0 else (lambda msg: None)
    try:
        return _encode(
            dist, say, inputs, out_dir, model, processor, pool, pooled_only, max_tokens, frames, temporal_context,
            (min_image_tokens, max_image_tokens, max_video_tokens), torch_device, torch_dtype, attn_implementation,
            workers, shard_size_mb, resume, overwrite, progress,
        )
    finally:
        dist.close()


def _check_options(pool, max_tokens, frames, temporal_context, shard_size_mb, workers, *token_bounds) -> None:
    """Refuse invalid option values before anything is loaded or created."""
    if pool is not None and pool not in POOL_MODES:
        raise ValueError(f"pool={pool!r}; expected one of {POOL_MODES}")
    positive = [("max_tokens", max_tokens), ("frames", frames)]
    bound_names = ("min_image_tokens", "max_image_tokens", "max_video_tokens")
    positive += [(name, v) for name, v in zip(bound_names, token_bounds) if v is not None]
    for name, value in positive:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive integer")
    if temporal_context is not None and (
        not isinstance(temporal_context, int) or isinstance(temporal_context, bool) or temporal_context < frames
    ):
        raise ValueError(f"temporal_context={temporal_context!r}; expected an integer of at least frames={frames}")
    if (not isinstance(shard_size_mb, (int, float)) or isinstance(shard_size_mb, bool)
            or not math.isfinite(shard_size_mb) or shard_size_mb < 0):
        raise ValueError(f"shard_size_mb={shard_size_mb!r}; expected a finite number >= 0 (0: one shard per forward)")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ValueError(f"workers={workers!r}; expected an integer >= 0")


def _encode(dist, say, inputs, out_dir, model, processor, pool, pooled_only, max_tokens, frames, temporal_context,
            token_bounds, device, dtype, attn_implementation, workers, shard_size_mb, resume, overwrite, progress):
    # Rank 0 takes the output folder (an exclusive lock, held until the run returns) before anything is
    # checked, loaded or written; a refusal reaches every rank with the run plan, so no rank waits forever.
    lock, early_error = None, None
    if dist.rank == 0:
        try:
            lock = _claim_out_dir(out_dir, resume, overwrite, say)
        except (ValueError, OSError) as e:  # refused, or the folder cannot be made
            early_error = _RunPlan("", [], set(), str(e), type(e).__name__)
            if not dist.active:
                _raise(early_error)
    try:
        return _run(dist, say, inputs, lock.folder if lock else None, early_error, model, processor, pool,
                    pooled_only, max_tokens, frames, temporal_context, token_bounds, device, dtype,
                    attn_implementation, workers, shard_size_mb, resume, overwrite, progress)
    finally:
        if lock is not None:
            lock.release()


def _run(dist, say, inputs, chosen, early_error, model, processor, pool, pooled_only, max_tokens, frames,
         temporal_context, token_bounds, device, dtype, attn_implementation, workers, shard_size_mb, resume, overwrite,
         progress):
    packing, model_name, random_weights = load_model(model, device, dtype, attn_implementation)
    config = packing.config
    if random_weights:
        say(
            f"model: {model_name}. These weights are random: the features only show that the pipeline runs. "
            f"Pass --model PATH (a checkpoint folder) for real features."
        )
    folder = model_name if isinstance(model, (str, os.PathLike)) and os.path.isdir(model_name) else None
    proc = build_processor(processor, config, folder, *token_bounds)
    if pool is None:
        pool = "head" if config.use_head else "mean"
    if pool == "head" and not config.use_head:
        raise ValueError("pool='head' but the model has no pooling head (use_head=False); use 'mean' or 'none'")
    if pooled_only and pool == "none":
        raise ValueError("pooled_only=True with pool='none' would save nothing; choose pool 'head' or 'mean'")
    largest = _largest_item(proc, frames, config.patch_size)
    if largest > max_tokens:
        say(f"note: max_tokens={max_tokens} is below the largest item this processor can make ({largest} patches); "
            f"such items run alone, one per forward")
    settings = {
        "model": model_name,
        "weights": weights_identity(packing) if dist.rank == 0 else None,  # only rank 0 checks and writes settings
        "architecture": {k: getattr(config, k) for k in _ARCHITECTURE_FIELDS},
        "processor": proc.to_dict(),
        "pool": pool,
        "pooled_only": pooled_only,
        "frames": frames,
        "temporal_context": temporal_context,
        "dtype": str(dtype).removeprefix("torch."),
        "max_tokens": max_tokens,
        "world_size": dist.world,
    }

    # rank 0 decides the folder, the inputs and what is done; every rank follows
    plan = early_error
    if dist.rank == 0 and plan is None:
        try:
            plan = _prepare(inputs, chosen, resume, overwrite, settings, say)
        except (ValueError, OSError) as e:  # reaches every rank, which all raise it (none waits forever)
            plan = _RunPlan("", [], set(), str(e), type(e).__name__)
    plan = dist.broadcast(plan)
    if plan.error:
        _raise(plan)
    path = Path(plan.out_dir)

    share = [
        (i, spec.path)
        for i, spec in enumerate(plan.specs)
        if i % dist.world == dist.rank and not spec.error and spec.path not in plan.done
    ]
    options = LoadOptions(proc, config.patch_size, config.num_channels, frames, temporal_context)
    n_workers = _default_workers() if workers is None else workers
    show = (sys.stderr.isatty() if progress is None else progress) and dist.rank == 0
    bar = _progress(len(share), show, "encode" if dist.world == 1 else f"encode rank 0/{dist.world}")
    stats = {"encoded": 0, "failed": 0, "tokens": 0}
    loop_start = time.perf_counter()

    def on_done(encoded: int, failed: int, tokens: int) -> None:
        stats["encoded"] += encoded
        stats["failed"] += failed
        stats["tokens"] += tokens
        bar.update(encoded + failed)
        secs = max(time.perf_counter() - loop_start, 1e-9)
        bar.set_postfix_str(f"{stats['tokens'] / secs:,.0f} tokens/s", refresh=False)

    writer = ShardWriter(path, dist.rank, int(shard_size_mb * 2**20), background=True)
    runner = _GroupRunner(packing, device, dtype, pool, pooled_only, writer, on_done)
    packer: TokenBudgetPacker[LoadedItem] = TokenBudgetPacker(max_tokens)
    loader = load_items(share, options, n_workers)  # in order; a worker that dies fails only its input
    try:
        for item in loader:
            if item.error:
                writer.add_failure(_failure_row(item))
                stats["failed"] += 1
                bar.update(1)
                continue
            for group in packer.add(item, item.num_tokens):
                runner.run(group)
        for group in packer.flush():
            runner.run(group)
        runner.close()
        writer.close()
    except BaseException:
        loader.close()  # stop the workers first
        try:  # keep what finished: its inputs are skipped by --resume
            runner.close()
            writer.close()
        except BaseException:
            writer.abandon()
        bar.close()
        raise
    bar.close()

    totals = dist.gather((stats, writer.shards_written))
    dist.barrier()  # every rank's shards and index rows are on disk
    result = EncodeResult(out_dir=path.resolve(), skipped=len(plan.done))
    if dist.rank == 0:
        for rank_stats, shards in totals:
            result.encoded += rank_stats["encoded"]
            result.failed += rank_stats["failed"]
            result.tokens += rank_stats["tokens"]
            result.shards += shards
        result.rows = _merge_index(path, plan.specs)
        result.failed += sum(1 for spec in plan.specs if spec.error)
    result.seconds = time.perf_counter() - loop_start
    dist.barrier()  # the merged index exists before any rank returns
    return result


def _raise(plan: _RunPlan) -> None:
    kinds = {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError}
    raise kinds.get(plan.error_type, OSError)(plan.error)


def _merge_index(out_dir: Path, specs: list[InputSpec]) -> list[dict[str, Any]]:
    """Rank 0: one row per input, in input order, from the rank files (and an earlier index); rows of an
    earlier run's inputs that this run was not given are kept at the end. The rank files go afterwards."""
    latest = read_rows(out_dir)
    rows, missing = [], []
    for i, spec in enumerate(specs):
        if spec.error:
            rows.append(make_row(spec.path, status="failed", error=spec.error, key=_key(i)))
        elif spec.path in latest:
            rows.append(latest.pop(spec.path))
        else:
            missing.append(spec.path)
    if missing:
        raise RuntimeError(f"{len(missing)} inputs have no index row after every rank finished, e.g. {missing[:3]}")
    rows.extend(latest.values())
    write_index(out_dir / INDEX_NAME, rows)
    for rank_file in rank_index_files(out_dir):
        rank_file.unlink()
    return rows


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

_EPILOG = """\
examples:
  hevc-vit encode                                   # the demo: sample images + clip, random small model
  hevc-vit encode photos/ clips/*.mp4 --model ./ckpt --out feats
  hevc-vit encode list.txt --model ./ckpt --out feats --resume
  torchrun --nproc-per-node 8 -m hevc_vit encode data/ --model ./ckpt --out feats
"""


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode images and videos to native-resolution features (safetensors shards + index.jsonl)",
        description=(
            "Encode images and videos at their native resolution with the packing model. With no INPUT, encodes "
            "the sample images and clip shipped with the package; with no --model, uses a small demo model with "
            "random weights."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, folders (recursive), globs, or .txt lists of paths")
    p.add_argument("--out", "-o", metavar="DIR", help=f"output folder (default: ./{DEFAULT_OUT}, numbered if taken)")
    p.add_argument("--model", metavar="PATH|PRESET",
                   help=f"checkpoint folder, or a preset ({', '.join(PRESETS)}) with random weights "
                        f"(default: {DEFAULT_MODEL}, random: a demo)")
    p.add_argument("--processor", default="native", metavar="native|clip|PATH",
                   help="native resolution (default), CLIP fixed size, or a preprocessor_config.json")
    p.add_argument("--min-image-tokens", type=int, metavar="N", help="native: fewest patches per image (default 256)")
    p.add_argument("--max-image-tokens", type=int, metavar="N", help="native: most patches per image (default 4096)")
    p.add_argument("--max-video-tokens", type=int, metavar="N", help="native: most patches per clip (default 8192)")
    p.add_argument("--pool", choices=POOL_MODES, help="pooled vector per item: head (default with a head), mean, none")
    p.add_argument("--pooled-only", action="store_true", help="save pooled vectors only, not patch features")
    p.add_argument("--max-tokens", type=int, default=16384, metavar="N", help="patch budget of one forward (16384)")
    p.add_argument("--frames", type=int, default=8, metavar="N", help="frames sampled uniformly per video (8)")
    p.add_argument("--temporal-context", type=int, metavar="N",
                   help="spread the frames' temporal positions over 0..N-1 (e.g. 64); default: 0..frames-1")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: this rank's GPU if any, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="compute and storage dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--attn-implementation", metavar="NAME",
                   help="attention backend: auto, eager, sdpa, torch_varlen, flash_attn (default: the model's)")
    p.add_argument("--workers", type=int, metavar="N", help="processes for decoding (default: up to 4)")
    p.add_argument("--shard-size-mb", type=float, default=1024, metavar="MB", help="features per shard (1024)")
    p.add_argument("--resume", action="store_true", help="continue DIR: skip inputs already encoded there")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in DIR")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no notices; the summary only")
    p.set_defaults(run=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``hevc-vit encode``; returns the exit status: 0 when inputs were encoded (some may have failed rows), 1 when
    every input failed or the output could not be written, 2 for invalid arguments or a refused folder."""
    log = (lambda msg: None) if args.quiet else None
    try:
        result = encode(
            args.inputs,
            args.out,
            model=args.model,
            processor=args.processor,
            pool=args.pool,
            pooled_only=args.pooled_only,
            max_tokens=args.max_tokens,
            frames=args.frames,
            temporal_context=args.temporal_context,
            min_image_tokens=args.min_image_tokens,
            max_image_tokens=args.max_image_tokens,
            max_video_tokens=args.max_video_tokens,
            device=args.device,
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
            workers=args.workers,
            shard_size_mb=args.shard_size_mb,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=False if args.quiet else None,
            log=log,
        )
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"hevc-vit encode: error: {_printable(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder cannot be written, the disk is full, ...
        print(f"hevc-vit encode: error: {_printable(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hevc-vit encode: interrupted; finished shards are kept: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:  # the totals and the summary are rank 0's
        return 0
    print(result.summary())
    return 1 if result.nothing_encoded else 0
