"""LLaVA-NeXT vision towers around the HEVC ViT encoder, and the builder that picks one by name.

Both towers keep the interface of LLaVA-NeXT's vision towers (constructor ``(vision_tower, args,
delay_load)``, ``load_model``, ``feature_select``, ``image_processor`` and the size properties), so a LLaVA
model switches between them by changing only the vision tower's name:

* :class:`HEVCViTPackingVisionTower` converts whatever it is handed — a batch ``(B, C, H, W)``, a video
  batch ``(B, C, T, H, W)``, or a list mixing images ``(C, H, W)`` of any size, image stacks
  ``(n, C, H, W)`` and videos ``(C, T, H, W)`` — to one packed sequence, runs
  :class:`~hevc_vit.modeling.HEVCViTPackingModel` once, and splits the features back per item.
* :class:`HEVCViTVisionTower` runs :class:`~hevc_vit.modeling.HEVCViTModel` on batches of one size
  (and a list item by item): the reference the packing tower is tested against.

Nothing in a tower reads a device tensor on the host (no ``.item()``, ``.tolist()``, ``.cpu()``, no
data-dependent branch): every size comes from tensor shapes, so ranks of a distributed job never wait on
each other inside the tower. A rank without images calls :meth:`dummy_forward` to run the same weights.

Legend: ``T`` packed tokens, ``n`` items, ``B`` batch, ``N`` tokens per item, ``D`` width, ``p`` patch,
``C`` channels, ``L`` entries of ``hidden_states`` (``num_hidden_layers + 1``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .checkpoints import CONFIG_NAME, config_kwargs, read_config_dict
from .configuration import HEVCViTConfig
from .modeling import HEVCViTModel, HEVCViTPackingModel
from .packing import PackingPlan, check_sides, as_batch, patchify, patchify_items, unpack, unpack_batch

logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# mm_vision_select_feature -> number of hidden_states entries concatenated on the feature axis.
# The model has no CLS token, so every "cls_patch" variant equals its "patch" variant.
SELECT_FEATURES: dict[str, int] = {
    "patch": 1,
    "cls_patch": 1,
    "slicefour_patch": 4,
    "slicefour_cls_patch": 4,
    "slice_m25811_f6_patch": 5,
    "slice_m25811_f6_cls_patch": 5,
}
SLICE_M25811_F6_LAYERS = (-2, -5, -8, -11, 6)
SPATIAL_MERGE_PROJECTOR = "spatial_merge"  # the projector that merges 2x2 patches: /2 per side, /4 in total

ImagesInput = torch.Tensor | Sequence[torch.Tensor]
SpatialDims = tuple[int, int] | tuple[list[int], list[int]]


# --------------------------------------------------------------------------------------------------
# pure helpers: layer selection, config and processor loading
# --------------------------------------------------------------------------------------------------


def select_layer_indices(select_feature: str, select_layer: int, num_hidden_states: int) -> list[int]:
    """The entries of ``hidden_states`` a ``select_feature`` concatenates, as indices in ``[0, L)``.

    ``L = num_hidden_states`` (``num_hidden_layers + 1``: the input of every block, then the last output).

    * ``patch`` / ``cls_patch``: ``[select_layer]``.
    * ``slicefour_patch`` / ``slicefour_cls_patch``: LLaVA-NeXT's rule — with ``k = L // 4``, the indices
      ``k + select_layer, k + select_layer + k, ...`` below ``L`` (24 layers, ``select_layer=-2``:
      4, 10, 16, 22). The rule must give exactly four layers starting at an index >= 0, because the
      projector is sized ``4 · D``; otherwise this raises and names the ``select_layer`` values that fit.
    * ``slice_m25811_f6_patch`` / ``slice_m25811_f6_cls_patch``: -2, -5, -8, -11 and 6 (``select_layer`` is
      not used); needs ``L >= 11``.

    Raises ``ValueError`` for an unknown ``select_feature`` or a selection outside ``hidden_states``.
    """
    L = num_hidden_states
    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"mm_vision_select_feature={select_feature!r}; expected one of {list(SELECT_FEATURES)}")
    if select_feature.startswith("slicefour_"):
        k = L // 4
        fits = [s for s in range(-L, L) if k >= 1 and k + s >= 0 and len(range(k + s, L, k)) == 4]
        if not fits or select_layer not in fits:
            taken = list(range(k + select_layer, L, k)) if k >= 1 else []
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} with mm_vision_select_layer={select_layer} takes "
                f"hidden_states {taken} of {L} (every k = {L}//4 = {k}-th from index k + select_layer); expected "
                f"exactly 4 layers from an index >= 0 — select_layer values that fit here: {fits or 'none'}"
            )
        return list(range(k + select_layer, L, k))
    if select_feature.startswith("slice_m25811_f6_"):
        if L < 11:
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} takes hidden_states {list(SLICE_M25811_F6_LAYERS)}; "
                f"the model has only {L} (num_hidden_layers={L - 1}), expected at least 11 (10 layers)"
            )
        return [i % L for i in SLICE_M25811_F6_LAYERS]
    if not -L <= select_layer < L:
        raise ValueError(
            f"mm_vision_select_layer={select_layer}; expected an index into the {L} hidden_states "
            f"(num_hidden_layers + 1), from {-L} to {L - 1}"
        )
    return [select_layer % L]


def read_tower_config(name_or_path: str | os.PathLike) -> HEVCViTConfig:
    """The encoder config of a checkpoint (any supported format), reading only its ``config.json``."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return HEVCViTConfig(**config_kwargs(read_config_dict(path)))
    try:
        from huggingface_hub import hf_hub_download

        folder = os.path.dirname(hf_hub_download(path, CONFIG_NAME))
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise FileNotFoundError(
            f"vision tower {path!r} is not a local folder and its {CONFIG_NAME} could not be fetched: {e}"
        ) from e
    return HEVCViTConfig(**config_kwargs(read_config_dict(folder)))


def clip_image_processor_class() -> type:
    """transformers' CLIP image processor class, imported when first needed. Without torchvision,
    transformers 5 answers ``CLIPImageProcessor`` with its PIL version and a warning on every use; asking
    for that version by name gives the same processor quietly (transformers 4 has only the one)."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def load_image_processor(name_or_path: str | os.PathLike, config: HEVCViTConfig) -> Any:
    """The checkpoint's ``CLIPImageProcessor`` (from its ``preprocessor_config.json``), or, when it has none,
    a CLIP-normalised one that resizes the short side to ``config.image_size`` and centre-crops a square."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, PREPROCESSOR_CONFIG_NAME)):
            return clip_image_processor_class().from_pretrained(path)
    else:
        try:
            return clip_image_processor_class().from_pretrained(path)
        except (OSError, ValueError):  # not on the Hub, or no processor config there
            pass
    logger.info("%s has no %s; using a CLIP-normalised processor at %d px", path, PREPROCESSOR_CONFIG_NAME, config.image_size)
    return default_image_processor(config)


def default_image_processor(config: HEVCViTConfig) -> Any:
    """A CLIP-normalised processor: short side resized to ``config.image_size``, centre-cropped square."""
    size = config.image_size
    return clip_image_processor_class()(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def _arg(args: Any, name: str, default: Any = None) -> Any:
    """``args.name`` for a config / namespace, ``args[name]`` for a mapping; ``default`` when absent."""
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


# --------------------------------------------------------------------------------------------------
# what the caller handed in, read from shapes only
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _InputLayout:
    """The shape of a tower input, from tensor shapes alone (no device reads).

    batched: True for one ``(B, C, H, W)`` / ``(B, C, T, H, W)`` tensor, False for a list.
    dtype: the input's dtype — the features come back in it.
    shapes: per list element (one entry for a batch), the output shape without the ``D`` axis:
        ``(N,)`` for an image or a video (``N = T·h·w``), ``(n, N)`` for an image stack or a batch.
    grids: per list element, ``(h, w)`` in patches.
    """

    batched: bool
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    grids: list[tuple[int, int]]

    @property
    def tokens(self) -> list[int]:
        """Packed tokens per list element."""
        return [math.prod(shape) for shape in self.shapes]

    def spatial_dims(self) -> SpatialDims:
        """``(h, w)`` shared by every element, else ``([h_0, h_1, ...], [w_0, w_1, ...])`` per element."""
        if len(set(self.grids)) == 1:
            return self.grids[0]
        return [h for h, _ in self.grids], [w for _, w in self.grids]


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


# --------------------------------------------------------------------------------------------------
# the towers
# --------------------------------------------------------------------------------------------------


class HEVCViTVisionTowerBase(nn.Module):
    """What both towers share: loading, freezing, feature selection, the size properties, the dummy input.

    Args:
        vision_tower: checkpoint folder (or Hub name) of any format ``hevc_vit.checkpoints`` reads.
        args: the LLaVA config / arguments (attributes or a dict):
            ``mm_vision_select_layer`` (default -1, LLaVA-NeXT's) — index into ``hidden_states``;
            ``mm_vision_select_feature`` (default ``"patch"``) — one of :data:`SELECT_FEATURES`;
            ``mm_projector_type`` (default ``"patch_merger"``) — ``"spatial_merge"`` divides the patch counts;
            ``unfreeze_mm_vision_tower`` / ``mm_tunable_parts`` — with ``delay_load``, load the weights anyway
            when the first is set or the second contains ``"mm_vision_tower"``.
        delay_load: read only the config now; :meth:`load_model` reads the weights later.
    """

    model_class: type[HEVCViTModel] | type[HEVCViTPackingModel]

    def __init__(
        self,
        vision_tower: str | os.PathLike,
        args: Any,
        delay_load: bool = False,
        *,
        model: HEVCViTModel | HEVCViTPackingModel | None = None,
    ):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = os.fspath(vision_tower)
        self.select_layer = int(_arg(args, "mm_vision_select_layer", -1))
        self.select_feature = _arg(args, "mm_vision_select_feature", "patch") or "patch"
        self.projector_type = _arg(args, "mm_projector_type", "patch_merger") or "patch_merger"
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature={self.select_feature!r}; expected one of {list(SELECT_FEATURES)}"
            )
        self.cfg_only: HEVCViTConfig | None = None
        self.image_processor: Any = None  # a transformers CLIP image processor once loaded
        self.vision_tower: HEVCViTModel | HEVCViTPackingModel | None = None

        tunable_parts = _arg(args, "mm_tunable_parts", None) or ()
        if model is not None:  # an encoder already in memory (see from_model): used as it is, not frozen
            if not isinstance(model, self.model_class):
                raise ValueError(f"model is a {type(model).__name__}; {type(self).__name__} runs a {self.model_class.__name__}")
            self.vision_tower = model
            in_folder = os.path.isdir(self.vision_tower_name)
            self.image_processor = (
                load_image_processor(self.vision_tower_name, model.config) if in_folder else default_image_processor(model.config)
            )
            self.is_loaded = True
        elif not delay_load:
            logger.info("Loading vision tower %s (%s)", self.vision_tower_name, type(self).__name__)
            self.load_model()
        elif _arg(args, "unfreeze_mm_vision_tower", False):
            logger.info("unfreeze_mm_vision_tower is set: loading the weights of %s now", self.vision_tower_name)
            self.load_model()
        elif "mm_vision_tower" in tunable_parts:
            logger.info("mm_tunable_parts has mm_vision_tower: loading the weights of %s now", self.vision_tower_name)
            self.load_model()
        else:
            self.cfg_only = read_tower_config(self.vision_tower_name)
        # fail at construction, not at the first batch, when the selection does not fit the model
        select_layer_indices(self.select_feature, self.select_layer, self.config.num_hidden_layers + 1)

    @classmethod
    def from_model(cls, model: HEVCViTModel | HEVCViTPackingModel, args: Any = None) -> "HEVCViTVisionTowerBase":
        """A tower around an encoder already in memory (being trained, or built from a preset), without
        reading a checkpoint; its weights keep their ``requires_grad`` as they are."""
        name = getattr(model.config, "name_or_path", "") or f"<{type(model).__name__} in memory>"
        return cls(name, args if args is not None else {}, model=model)

    # -- loading -------------------------------------------------------------------------------------

    def load_model(self, device_map: str | torch.device | dict | None = None) -> None:
        """Load the weights and the image processor, and freeze the weights (``requires_grad_(False)``).

        Idempotent: a second call logs a warning and returns without reading anything.
        """
        if self.is_loaded:
            logger.warning("%s is already loaded; load_model() called again, skipping", self.vision_tower_name)
            return
        self.vision_tower = self.model_class.from_pretrained(self.vision_tower_name, device_map=device_map)
        self.vision_tower.requires_grad_(False)
        self.image_processor = load_image_processor(self.vision_tower_name, self.vision_tower.config)
        self.cfg_only = None
        self.is_loaded = True

    def _require_loaded(self) -> nn.Module:
        if not self.is_loaded:
            raise RuntimeError(
                f"vision tower {self.vision_tower_name} was built with delay_load and its weights are not loaded; "
                f"call load_model() first"
            )
        return self.vision_tower

    # -- features ------------------------------------------------------------------------------------

    def feature_select(self, image_forward_outs: BaseModelOutputWithPooling) -> torch.Tensor:
        """The selected ``hidden_states`` entries, concatenated on the last axis.

        Works on packed ``(T, D)`` and batched ``(B, N, D)`` states alike; returns ``(..., D')`` with
        ``D' = hidden_size`` (``D`` times 1, 4 or 5). Raises ``ValueError`` for an unknown select feature.
        """
        hidden_states = image_forward_outs.hidden_states
        layers = select_layer_indices(self.select_feature, self.select_layer, len(hidden_states))
        if len(layers) == 1:
            return hidden_states[layers[0]]
        return torch.cat([hidden_states[i] for i in layers], dim=-1)  # (..., len(layers)·D)

    def _describe(self, images: ImagesInput) -> _InputLayout:
        """Validate a tower input from its shapes and describe it; raises ``ValueError`` naming the item."""
        C, p = self.config.num_channels, self.config.patch_size
        if isinstance(images, torch.Tensor):
            shape = tuple(images.shape)
            if images.dim() not in (4, 5) or shape[1] != C:
                raise ValueError(
                    f"images has shape {shape}; expected a batch of images (B, {C}, H, W) or of videos "
                    f"(B, {C}, T, H, W), or a list of images ({C}, H, W), image stacks (n, {C}, H, W) "
                    f"and videos ({C}, T, H, W)"
                )
            if 0 in shape[:-2]:
                raise ValueError(
                    f"images has shape {shape}; expected at least one image (and one frame per video) — a rank "
                    f"without images calls dummy_forward()"
                )
            _check_floating(images, f"images {shape}")
            H, W = shape[-2:]
            check_sides(f"images {shape}", H, W, p)
            B, T = shape[0], shape[2] if images.dim() == 5 else 1
            return _InputLayout(True, images.dtype, [(B, T * (H // p) * (W // p))], [(H // p, W // p)])

        if not isinstance(images, (list, tuple)):
            raise ValueError(
                f"images is a {type(images).__name__}; expected a tensor (B, {C}, H, W) / (B, {C}, T, H, W) "
                f"or a list of tensors"
            )
        if len(images) == 0:
            raise ValueError(
                f"images is an empty list; expected at least one image ({C}, H, W), image stack (n, {C}, H, W) "
                f"or video ({C}, T, H, W) (a rank without images calls dummy_forward())"
            )
        shapes, grids = [], []
        for i, item in enumerate(images):
            batch = as_batch(item, C, f"item {i}")  # (n, C, H, W) or (1, C, T, H, W)
            what = f"item {i} {tuple(item.shape)}"
            _check_floating(item, what)
            first = images[0]
            if item.dtype != first.dtype:
                raise ValueError(f"{what} has dtype {item.dtype}; item 0 has {first.dtype}, expected one dtype")
            if item.device != first.device:
                raise ValueError(
                    f"{what} is on {item.device}; item 0 is on {first.device}, expected every item on one device"
                )
            H, W = batch.shape[-2:]
            check_sides(what, H, W, p)
            h, w = H // p, W // p
            if batch.dim() == 5:  # a video: all frames are one item
                shapes.append((batch.shape[2] * h * w,))
            elif item.dim() == 3:  # an image
                shapes.append((h * w,))
            else:  # an image stack: each image is its own item
                shapes.append((batch.shape[0], h * w))
            grids.append((h, w))
        return _InputLayout(False, images[0].dtype, shapes, grids)

    def forward(
        self, images: ImagesInput, return_spatial_dims: bool = False
    ) -> torch.Tensor | list[torch.Tensor] | tuple[Any, Any, Any]:
        """Features of a batch or a list of images and videos, in the input's dtype, on the tower's device.

        images: ``(B, C, H, W)`` -> ``(B, h·w, D')``; ``(B, C, T, H, W)`` -> ``(B, T·h·w, D')``; a list ->
            a list with one tensor per element: image ``(C, H, W)`` -> ``(h·w, D')``, image stack
            ``(n, C, H, W)`` -> ``(n, h·w, D')``, video ``(C, T, H, W)`` -> ``(T·h·w, D')``. ``H`` and ``W``
            are multiples of ``p``; ``h = H/p``, ``w = W/p``; ``D' = hidden_size``.
        return_spatial_dims: also return ``h`` and ``w`` in patches: ``(features, h, w)`` with ints when every
            element has the same ``(h, w)``, else with lists of per-element ints (``h[i]``, ``w[i]``).
        """
        features, layout, _ = self._forward(images)  # each tower class defines _forward
        if return_spatial_dims:
            h, w = layout.spatial_dims()
            return features, h, w
        return features

    # -- distributed safety --------------------------------------------------------------------------

    @property
    def dummy_input(self) -> torch.Tensor:
        """``(1, C, 2p, 2p)`` zeros in the tower's dtype, on its device: the smallest image a 2x2 spatial
        merge still accepts."""
        side = 2 * self.config.patch_size
        return torch.zeros(1, self.config.num_channels, side, side, dtype=self.dtype, device=self.device)

    def dummy_forward(self) -> torch.Tensor:
        """Zero features ``(1, 4, hidden_size)`` that depend on every weight of the encoder.

        For a rank with no images: it runs :attr:`dummy_input` through the same forward as real images,
        so every module runs (ZeRO-3 / FSDP gather the same parameters on every rank), and the result is
        tied with weight zero to the last hidden state and the pooled output, so after
        ``loss + tower.dummy_forward().sum()`` every trainable parameter receives a (zero) gradient.
        The loss value does not change.
        """
        features, _, outputs = self._forward(self.dummy_input)
        anchor = outputs.last_hidden_state.sum()
        if outputs.pooler_output is not None:
            anchor = anchor + outputs.pooler_output.sum()
        return features * 0 + anchor * 0  # (1, 4, hidden_size), all zeros

    # -- properties ----------------------------------------------------------------------------------

    @property
    def dummy_feature(self) -> torch.Tensor:
        """``(1, hidden_size)`` zeros in the tower's dtype, on its device."""
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (float32 while the weights are not loaded)."""
        return self.vision_tower.dtype if self.is_loaded else torch.float32

    @property
    def device(self) -> torch.device:
        """The weights' device (the CPU while the weights are not loaded)."""
        return self.vision_tower.device if self.is_loaded else torch.device("cpu")

    @property
    def config(self) -> HEVCViTConfig:
        """The encoder config: the loaded model's, or the one read alone under ``delay_load``."""
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        """Width of the features: ``D`` times 1 (``patch``), 4 (``slicefour_*``) or 5 (``slice_m25811_f6_*``)."""
        return self.config.hidden_size * SELECT_FEATURES[self.select_feature]

    @property
    def num_patches_per_side(self) -> int:
        """Patches per side of an ``image_size`` image; halved for the ``spatial_merge`` projector."""
        per_side = self.config.image_size // self.config.patch_size
        return per_side // 2 if self.projector_type == SPATIAL_MERGE_PROJECTOR else per_side

    @property
    def num_patches(self) -> int:
        """Patches of an ``image_size`` image (no CLS token); a quarter for the ``spatial_merge`` projector."""
        patches = (self.config.image_size // self.config.patch_size) ** 2
        return patches // 4 if self.projector_type == SPATIAL_MERGE_PROJECTOR else patches

    @property
    def image_size(self) -> int:
        return self.config.image_size


def _check_floating(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} has dtype {x.dtype}; expected processed floating-point pixels")


class HEVCViTPackingVisionTower(HEVCViTVisionTowerBase):
    """LLaVA-NeXT vision tower on :class:`HEVCViTPackingModel`: every image and video of a call, at its own
    size, packed into one sequence and encoded in one forward."""

    model_class = HEVCViTPackingModel

    def _image_to_packing_input(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image ``(C, H, W)`` -> ``hidden_states (h·w, C·p·p)`` (flattened ``(C, p, p)`` patches, row-major)
        and ``grid_thw (1, 3)`` int64 on the CPU, ``[[1, h, w]]``."""
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError(f"image has shape {_shape(image)}; expected ({self.config.num_channels}, H, W)")
        self._describe([image])
        return patchify(image.unsqueeze(0), self.config.patch_size)  # (h·w, C·p·p), (1, 3)

    def _batch_images_to_packing_input(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(B, C, H, W)`` (or videos ``(B, C, T, H, W)``) -> ``hidden_states (B·T·h·w, C·p·p)`` and
        ``grid_thw (B, 3)`` int64 on the CPU, ``[T, h, w]`` per row; one vectorised reshape, no loop."""
        self._describe(images)
        return patchify(images, self.config.patch_size)  # (B·T·h·w, C·p·p), (B, 3)

    def _items_to_packing_input(self, items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A list of images / image stacks / videos -> ``hidden_states (T, C·p·p)`` and ``grid_thw (n, 3)``
        (one row per image and per video; runs of one shape are cut in one vectorised call)."""
        return patchify_items(items, self.config.patch_size, self.config.num_channels)

    def _forward(
        self, images: ImagesInput
    ) -> tuple[torch.Tensor | list[torch.Tensor], _InputLayout, BaseModelOutputWithPooling]:
        model = self._require_loaded()
        layout = self._describe(images)
        device = self.device

        # ==========================================================================================
        # INPUT CONVERSION: LLaVA images -> packing input
        #   from: a batch (B, C, H, W) / (B, C, T, H, W), or a list of images (C, H, W), image stacks
        #         (n, C, H, W) and videos (C, T, H, W) of any sizes
        #   to:   hidden_states (T, C·p·p) — the flattened (C, p, p) patches of all items, back to back —
        #         and grid_thw (n, 3) int64 on the CPU, (t, h, w) in patches per image / video
        # ==========================================================================================
        if layout.batched:  # cut on the tower's device: one copy of the pixels, then one reshape there
            hidden_states, grid_thw = self._batch_images_to_packing_input(images.to(device, non_blocking=True))
        else:  # cut where the items are, then one copy of the packed patches
            hidden_states, grid_thw = self._items_to_packing_input(images)
            hidden_states = hidden_states.to(device, non_blocking=True)  # (T, C·p·p)
        plan = PackingPlan.from_grid_thw(grid_thw, device=device)  # built on the host from CPU sizes

        outputs = model(hidden_states, plan=plan, output_hidden_states=True, return_dict=True)
        packed = self.feature_select(outputs).to(layout.dtype)  # (T, D')

        # ==========================================================================================
        # OUTPUT CONVERSION: packed features -> what the projector expects
        #   from: features (T, D'), the items back to back in input order
        #   to:   a batch -> (B, T·h·w, D'); a list -> one tensor per element: image (h·w, D'),
        #         image stack (n, h·w, D'), video (T·h·w, D') — split by sizes known on the host
        # ==========================================================================================
        if layout.batched:
            features: torch.Tensor | list[torch.Tensor] = unpack_batch(packed, plan)  # (B, N, D')
        else:
            parts = unpack(packed, layout.tokens)  # per element: (n·N, D')
            features = [part.view(*shape, part.shape[-1]) for part, shape in zip(parts, layout.shapes)]
        return features, layout, outputs


class HEVCViTVisionTower(HEVCViTVisionTowerBase):
    """LLaVA-NeXT vision tower on :class:`HEVCViTModel`: one forward per batch of one size, and a list
    item by item — the standard path the packing tower must equal."""

    model_class = HEVCViTModel

    def _forward(
        self, images: ImagesInput
    ) -> tuple[torch.Tensor | list[torch.Tensor], _InputLayout, BaseModelOutputWithPooling | list]:
        model = self._require_loaded()
        layout = self._describe(images)
        device = self.device
        if layout.batched:
            outputs = model(images.to(device, non_blocking=True), output_hidden_states=True, return_dict=True)
            return self.feature_select(outputs).to(layout.dtype), layout, outputs  # (B, N, D')
        features, all_outputs = [], []
        for item, shape in zip(images, layout.shapes):
            batch = as_batch(item, self.config.num_channels)  # (n, C, H, W) or (1, C, T, H, W)
            batch = batch.to(device, non_blocking=True)
            outputs = model(batch, output_hidden_states=True, return_dict=True)
            selected = self.feature_select(outputs).to(layout.dtype)  # (n, N, D')
            features.append(selected.view(*shape, selected.shape[-1]))  # (N, D') or (n, N, D')
            all_outputs.append(outputs)
        return features, layout, all_outputs


# --------------------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------------------

# (substring of the lower-cased name, tower class), tried in order
TOWER_PATTERNS: tuple[tuple[str, type[HEVCViTVisionTowerBase]], ...] = (
    ("hevc_vit_packing", HEVCViTPackingVisionTower),
    ("packing", HEVCViTPackingVisionTower),
    ("hevc_vit", HEVCViTVisionTower),
)


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> HEVCViTVisionTowerBase:
    """The tower a LLaVA config names, built with ``args=vision_tower_cfg`` and ``kwargs`` (e.g. ``delay_load``).

    The name is ``mm_vision_tower`` (else ``vision_tower``); matched case-insensitively, a name containing
    ``hevc_vit_packing`` or ``packing`` gives :class:`HEVCViTPackingVisionTower`, else one containing
    ``hevc_vit`` gives :class:`HEVCViTVisionTower`; anything else raises ``ValueError``.
    """
    name = _arg(vision_tower_cfg, "mm_vision_tower", None)
    if name is None:
        name = _arg(vision_tower_cfg, "vision_tower", None)
    accepted = ", ".join(f"{pattern!r} -> {cls.__name__}" for pattern, cls in TOWER_PATTERNS)
    if name is None:
        raise ValueError(
            f"vision_tower_cfg has neither mm_vision_tower nor vision_tower; expected a name containing one of: "
            f"{accepted}"
        )
    for pattern, cls in TOWER_PATTERNS:
        if pattern in os.fspath(name).lower():
            return cls(name, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"vision tower {os.fspath(name)!r} is unknown; expected a name containing one of: {accepted}")
