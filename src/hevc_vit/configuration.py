"""One config class for every hyper-parameter of the HEVC ViT encoder, and the preset table."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# name -> (patch_size, hidden_size, num_attention_heads, num_hidden_layers, intermediate_size)
PRESETS: dict[str, dict[str, int]] = {
    name: dict(
        patch_size=p, hidden_size=d, num_attention_heads=h, num_hidden_layers=n, intermediate_size=m
    )
    for name, (p, d, h, n, m) in {
        "small": (16, 384, 6, 6, 1536),
        "base": (16, 768, 12, 12, 3072),
        "large": (14, 1024, 16, 24, 4096),
        "huge": (14, 1280, 20, 32, 5120),
        "giant": (14, 1536, 16, 40, 6144),
    }.items()
}

LAYER_NORM_TYPES = ("layer_norm", "rms_norm")


def architecture_keys() -> tuple[str, ...]:
    """The hyper-parameters :class:`HEVCViTConfig` takes, in signature order (the attention backend, a
    runtime choice, excluded): what a checkpoint's ``config.json`` must carry."""
    import inspect

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
            "flash_attn" (see ``hevc_vit.attention``). Also accepted as ``attention_backend``.
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
        """Raise ``ValueError`` naming the first hyper-parameter that cannot work."""
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r}; expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 32:
            raise ValueError(
                f"head_dim={self.head_dim} (hidden_size={self.hidden_size} / num_attention_heads="
                f"{self.num_attention_heads}) must be a multiple of 32 for the 4:6:6 (t, h, w) RoPE split"
            )
        if self.temporal_patch_size != 1:
            raise ValueError(
                f"temporal_patch_size={self.temporal_patch_size}; only 1 is supported (the patch embedding is 2D)"
            )
        if self.layer_norm_type not in LAYER_NORM_TYPES:
            raise ValueError(f"layer_norm_type={self.layer_norm_type!r}; expected one of {LAYER_NORM_TYPES}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r}; expected a positive float")
        if self.head_norm_eps is not None and not self.head_norm_eps > 0:
            raise ValueError(f"head_norm_eps={self.head_norm_eps!r}; expected None or a positive float")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r}; expected a positive float")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout={self.attention_dropout!r}; expected a float in [0, 1)")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r}; expected a name in transformers' ACT2FN, e.g. 'gelu'")
        from .attention import check_backend_name  # late import: attention imports nothing from here

        check_backend_name(self.attention_backend)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "HEVCViTConfig":
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
