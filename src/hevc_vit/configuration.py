"""One config class for every hyper-parameter of the HEVC ViT encoder, and the preset table."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from hevc_vit.attention import check_backend_name

# name -> (patch_size, hidden_size, num_attention_heads, num_hidden_layers, intermediate_size)
PRESETS: dict[str, dict[str, int]] = {
    name: dict(patch_size=p, hidden_size=d, num_attention_heads=h, num_hidden_layers=n, intermediate_size=m)
    for name, (p, d, h, n, m) in {
        "small": (16, 384, 6, 6, 1536),
        "base": (16, 768, 12, 12, 3072),
        "large": (14, 1024, 16, 24, 4096),
        "huge": (14, 1280, 20, 32, 5120),
        "giant": (14, 1536, 16, 40, 6144),
    }.items()
}

LAYER_NORM_TYPES = ("layer_norm", "rms_norm")

# the accepted range of every integer hyper-parameter: far above any real ViT (ViT-22B is 6144 wide with
# 48 layers), low enough that a nonsense config.json is refused before it builds (or allocates) anything
INT_RANGES: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 65536),
    "intermediate_size": (1, 262144),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 2048),
    "num_channels": (1, 1024),
    "image_size": (1, 65536),
    "patch_size": (1, 1024),
    "temporal_patch_size": (1, 1),
    "spatial_merge_size": (1, 64),
    "rope_temporal_size": (1, 1 << 20),
}
# the most parameters an architecture may have (ViT-22B has 2.2e10)
MAX_PARAMETERS = 10**11


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_hyperparameters(values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first value in ``values`` (hyper-parameter name -> value, any subset)
    of the wrong type or out of range, with what was expected. Only each value alone is checked; the
    relations between them are :meth:`HEVCViTConfig.validate`'s."""
    for name, value in values.items():
        if name in INT_RANGES:
            lo, hi = INT_RANGES[name]
            if name == "temporal_patch_size" and value != 1:
                raise ValueError(f"{name}={value!r}; only 1 is supported (the patch embedding is 2D)")
            if not _is_int(value) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r}; expected a positive integer (at most {hi:,})")
        elif name in ("layer_norm_eps", "rope_theta") or (name == "head_norm_eps" and value is not None):
            if not _is_real(value) or not math.isfinite(value) or not value > 0:
                none = "None or " if name == "head_norm_eps" else ""
                raise ValueError(f"{name}={value!r}; expected {none}a positive finite number")
        elif name == "attention_dropout":
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r}; expected a number in [0, 1)")
        elif name == "initializer_range":
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r}; expected a non-negative finite number")
        elif name == "use_head":
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}; expected true or false")
        elif name == "layer_norm_type":
            if not isinstance(value, str) or value not in LAYER_NORM_TYPES:
                raise ValueError(f"{name}={value!r}; expected one of {LAYER_NORM_TYPES}")
        elif name == "hidden_act":
            if not isinstance(value, str) or value not in ACT2FN:
                raise ValueError(f"{name}={value!r}; expected a name in transformers' ACT2FN, e.g. 'gelu'")
        elif name in ("attention_backend", "attn_implementation"):
            if not isinstance(value, str):
                raise ValueError(f"{name}={value!r}; expected a backend name such as 'auto', 'eager' or 'sdpa'")


def count_parameters(values: Mapping[str, int]) -> int:
    """The number of weights of the architecture ``values`` describes (validated integers), computed
    without building it."""
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_channels", "patch_size")
    D, M, L, C, p = (values[name] for name in names)
    norm = D if values.get("layer_norm_type", "layer_norm") == "rms_norm" else 2 * D
    layer = 2 * norm + (3 * D * D + 3 * D) + (D * D + D) + (D * M + M) + (M * D + D)
    head = D + (3 * D * D + 3 * D) + (D * D + D) + D + (D * M + M) + (M * D + D)
    return D * C * p * p + 2 * norm + L * layer + (head if values.get("use_head", True) else 0)


def architecture_keys() -> tuple[str, ...]:
    """The hyper-parameters :class:`HEVCViTConfig` takes, in signature order (the attention backend, a
    runtime choice, excluded): what a checkpoint's ``config.json`` must carry."""
    params = inspect.signature(HEVCViTConfig.__init__).parameters
    return tuple(
        name
        for name, p in params.items()
        if name not in ("self", "attn_implementation") and p.kind is not p.VAR_KEYWORD
    )


class HEVCViTConfig(PretrainedConfig):
    """Hyper-parameters of the HEVC ViT (OneVision) encoder.

    Args (defaults are the ``large`` preset, ViT-L/14):
        hidden_size: 1024 — token width ``D``.
        intermediate_size: 4096 — MLP width.
        num_hidden_layers: 24.
        num_attention_heads: 16 — ``head_dim = hidden_size / heads`` must be a multiple of 32
            (the 3D RoPE splits ``head_dim / 2`` as t:h:w = 4:6:6 in units of ``head_dim // 32``).
        num_channels: 3.
        image_size: 448 — the size the fixed-size (CLIP) processor produces; packing input may be any size.
        patch_size: 14 — ``p``; a patch is ``C·p·p`` values.
        temporal_patch_size: 1 — frames per patch (the patch embedding is 2D: only 1 is supported).
        hidden_act: "gelu" — MLP activation (exact GELU), any name in ``transformers.activations.ACT2FN``.
        layer_norm_eps: 1e-6 — eps of every norm (legacy training checkpoints use 1e-5).
        layer_norm_type: "layer_norm" or "rms_norm".
        attention_dropout: 0.0 — dropout on attention probabilities while training.
        initializer_range: 0.02 — std of the truncated-normal init of fresh weights.
        rope_theta: 10000.0 — RoPE base.
        rope_temporal_size: 64 — the temporal context the model was trained with (frames); positions
            beyond it still work, it is kept for processors choosing ``patch_positions``.
        use_head: True — attention-pooling head giving one pooled vector per image/video.
        spatial_merge_size: 1 — merge factor used by downstream projectors; the encoder's patch order is
            not affected by it.
        head_norm_eps: None — eps of the pooling head's RMSNorm; None means ``layer_norm_eps``. Legacy
            training checkpoints used PyTorch's default there (float32 machine epsilon, ~1.19e-7).
        attn_implementation: "auto" — attention backend: "auto", "eager", "sdpa", "torch_varlen" or
            "flash_attn" (see ``hevc_vit.attention``). Also accepted as ``attention_backend``. A name
            transformers sets in ``_attn_implementation`` (``attn_implementation=`` on a model holding this
            encoder, e.g. ``{"vision_config": "eager"}`` on a LLaVA class) takes precedence when the model is built.
    """

    model_type = "hevc_vit"

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 448,
        patch_size: int = 14,
        temporal_patch_size: int = 1,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        layer_norm_type: str = "layer_norm",
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rope_theta: float = 10000.0,
        rope_temporal_size: int = 64,
        use_head: bool = True,
        spatial_merge_size: int = 1,
        head_norm_eps: float | None = None,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ):
        # transformers treats `attn_implementation` as its own (and rejects names it does not know),
        # so our backend lives under `attention_backend` and never reaches PretrainedConfig.
        backend = kwargs.pop("attention_backend", None)
        self.attention_backend = attn_implementation or backend or "auto"
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layer_norm_type = layer_norm_type
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rope_theta = rope_theta
        self.rope_temporal_size = rope_temporal_size
        self.use_head = use_head
        self.spatial_merge_size = spatial_merge_size
        self.head_norm_eps = head_norm_eps
        # each value alone first: transformers' own config checks read head_dim, which needs sane numbers
        check_hyperparameters({name: getattr(self, name) for name in architecture_keys()})
        super().__init__(**kwargs)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Width of one flattened patch, ``C·p·p``."""
        return self.num_channels * self.patch_size * self.patch_size

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first hyper-parameter that cannot work, its value and what was
        expected: wrong types (a string, a list, null), values out of range, sizes that do not fit each other,
        and architectures too large to build (more than ``MAX_PARAMETERS`` weights)."""
        check_hyperparameters({name: getattr(self, name) for name in architecture_keys()})
        check_hyperparameters({"attention_backend": self.attention_backend})
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 32:
            raise ValueError(
                f"head_dim={self.head_dim} (hidden_size={self.hidden_size} / num_attention_heads="
                f"{self.num_attention_heads}) must be a multiple of 32 for the 4:6:6 (t, h, w) RoPE split"
            )
        n = count_parameters({name: getattr(self, name) for name in architecture_keys()})
        if n > MAX_PARAMETERS:
            raise ValueError(
                f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, num_hidden_layers="
                f"{self.num_hidden_layers} give {n:,} parameters ({4 * n / 2**30:,.0f} GiB in float32); expected "
                f"at most {MAX_PARAMETERS:,}"
            )
        check_backend_name(self.attention_backend)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HEVCViTConfig:
        """Config of a named size preset (``small``, ``base``, ``large``, ``huge``, ``giant``)."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def matching_preset(self) -> str | None:
        """The preset whose architecture numbers equal this config's, if any."""
        for name, numbers in PRESETS.items():
            if all(getattr(self, key) == value for key, value in numbers.items()):
                return name
        return None
