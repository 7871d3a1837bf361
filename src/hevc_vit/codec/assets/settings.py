"""Every setting of a codec-assets run, validated here (:class:`AssetSettings`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hevc_vit.codec.assets.frames import WINDOW_PICKS
from hevc_vit.codec.config import NORMALIZE, SIGNALS

MODES = ("global", "time_bucket")
MOSAIC_FORMATS = ("jpg", "png")  # jpg: the reference's (lossy); png: lossless, the selection's exact pixels
ASSET_SIGNALS = SIGNALS  # the differences on the prepared squares, the decoder's motion vectors mapped onto them
_RECORD_DEFAULTS = {"mosaic_format": "jpg", "mv_floor": 0.5}  # what a record older than these fields was written with
FORMAT = "hevc_vit.codec_assets.v1"  # meta.json "format": the layout of the reference's offline tool


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive integer")


@dataclass(frozen=True)
class AssetSettings:
    """The layout and the selection of the assets, named after the reference's options.

    frames: ``T`` frames sampled per clip (``--seq_len_frames``, 64); num_images: ``N`` mosaics (8); square_size: side
    of each square frame and mosaic in pixels (576); patch_size: 16 (a 36x36 grid); jpeg_quality: of JPEG mosaics (95).
    mosaic_format: ``jpg`` (the reference's ``mosaic_000.jpg …``) or ``png`` (``mosaic_000.png …``, lossless: the
    canvases hold the selection's pixels exactly). mode: ``global`` (one top-K over frames 1..T-1) or ``time_bucket``
    (one mosaic per contiguous bucket of frames); time_bucket_count: buckets, -1 = the mosaics left after the whole
    frames. keep_mid_full_frame / mid_full_frame_index: also keep one middle frame whole (-1 = ``T // 2``). window_len /
    window_pick: sample within a ``window_len``-frame window (0 = the whole clip) at its ``begin``, ``mid`` or ``end``.
    signals / weights / normalize / diff_floor / mv_floor / static_fallback: the scores, as
    :class:`hevc_vit.codec.CodecSparseConfig` (signals from :data:`ASSET_SIGNALS`; a frame without motion vectors
    is scored by the other signals, by ``aligned_difference`` when ``motion_vectors`` is the only one).
    :meth:`reference` is the reference tool's fusion (motion vectors + a difference, per-frame p95).
    """

    frames: int = 64
    num_images: int = 8
    square_size: int = 576
    patch_size: int = 16
    jpeg_quality: int = 95
    mosaic_format: str = "jpg"
    mode: str = "global"
    time_bucket_count: int = -1
    keep_mid_full_frame: bool = False
    mid_full_frame_index: int = -1
    window_len: int = 0
    window_pick: str = "none"
    signals: tuple[str, ...] = ("aligned_difference",)
    weights: tuple[float, ...] | None = None
    normalize: str = "volume"
    diff_floor: float = 2.0
    static_fallback: bool = True
    mv_floor: float = 0.5

    def __post_init__(self) -> None:
        for name in ("frames", "num_images", "square_size", "patch_size"):
            _positive_int(name, getattr(self, name))
        if self.square_size % self.patch_size:
            raise ValueError(
                f"square_size={self.square_size}, patch_size={self.patch_size}; expected a multiple of the patch size "
                f"(nearest: {self.square_size // self.patch_size * self.patch_size})"
            )
        q = self.jpeg_quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise ValueError(f"jpeg_quality={q!r}; expected an integer from 1 to 100")
        if self.mosaic_format not in MOSAIC_FORMATS:
            raise ValueError(f"mosaic_format={self.mosaic_format!r}; expected one of {MOSAIC_FORMATS}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")
        if self.window_pick not in WINDOW_PICKS:
            raise ValueError(f"window_pick={self.window_pick!r}; expected one of {WINDOW_PICKS}")
        if self.window_len < 0:
            raise ValueError(f"window_len={self.window_len}; expected 0 (the whole clip) or a frame count")
        object.__setattr__(self, "signals", tuple(self.signals))
        bad = [s for s in self.signals if s not in ASSET_SIGNALS]
        if not self.signals or bad or len(set(self.signals)) != len(self.signals):
            raise ValueError(f"signals={self.signals}; expected distinct names from {ASSET_SIGNALS}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.signals) or min(self.weights) < 0:
                raise ValueError(f"weights={self.weights}; expected {len(self.signals)} non-negative numbers")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize={self.normalize!r}; expected one of {NORMALIZE}")
        if not self.diff_floor >= 0 or not self.mv_floor >= 0:
            raise ValueError(f"diff_floor={self.diff_floor}, mv_floor={self.mv_floor}; expected numbers >= 0")

    @classmethod
    def reference(cls, **overrides) -> AssetSettings:
        """The reference tool's fusion (``--w_mv 1 --w_res 1``, each map over its frame's p95, clipped), as
        :meth:`hevc_vit.codec.CodecSparseConfig.reference`: motion vectors + aligned difference (for its codec
        residual, which stock FFmpeg does not export), equal weights, ``normalize="frame"``."""
        return cls(**{**dict(signals=("motion_vectors", "aligned_difference"), normalize="frame"), **overrides})

    @property
    def motion_vectors(self) -> bool:
        """Whether the decoder's motion vectors are read (``motion_vectors`` in the signals)."""
        return "motion_vectors" in self.signals

    @property
    def grid(self) -> int:
        """Patches per side of a square (36 at 576 / 16)."""
        return self.square_size // self.patch_size

    @property
    def tokens(self) -> int:
        """Rows of ``positions_thw``: ``num_images · grid²``."""
        return self.num_images * self.grid**2

    def as_dict(self) -> dict:
        """JSON-ready, as stored in ``meta.json`` and compared on resume."""
        values = asdict(self)
        values["signals"] = list(self.signals)
        values["weights"] = None if self.weights is None else list(self.weights)
        return values

    def same_as(self, recorded: dict | None) -> bool:
        """``recorded`` (a ``meta.json``'s or a run record's settings) are these settings; a record written before
        ``mosaic_format`` or ``mv_floor`` existed holds their defaults then (``jpg``, 0.5)."""
        return isinstance(recorded, dict) and self.differences(recorded) == []

    def differences(self, recorded: dict) -> list[str]:
        """The names of the settings ``recorded`` holds other values of (sorted)."""
        recorded, ours = {**_RECORD_DEFAULTS, **recorded}, self.as_dict()
        missing = object()  # a key on one side only differs
        return sorted(k for k in ours.keys() | recorded.keys() if recorded.get(k, missing) != ours.get(k, missing))

    def reference_cfg(self) -> dict:
        """The reference tool's ``cfg`` block (its option names), for readers of its ``meta.json``."""
        return dict(
            seq_len_frames=self.frames,
            num_images=self.num_images,
            square_size=self.square_size,
            patch_size=self.patch_size,
            window_len=self.window_len,
            window_pick=self.window_pick,
            keep_mid_full_frame=self.keep_mid_full_frame,
            mid_full_frame_index=self.mid_full_frame_index,
            topk_mode=self.mode,
            time_bucket_count=self.time_bucket_count,
        )
