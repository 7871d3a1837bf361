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

import itertools
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .checkpoints import CONFIG_NAME, config_kwargs, read_config_dict
from .configuration import HEVCViTConfig
from .modeling import HEVCViTModel, HEVCViTPackingModel
from .packing import PackingPlan, as_batch, patchify, patchify_items, unpack
from .tower_inputs import Element, ImagesInput, TowerInput, resolve_tower_input

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

STACK_AS_CLIP_SETTING = "hevc_vit_stack_as_clip"  # opt-in LLaVA config attribute, see HEVCViTVisionTowerBase


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
    logger.info(
        "%s has no %s; using a CLIP-normalised processor at %d px", path, PREPROCESSOR_CONFIG_NAME, config.image_size
    )
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
            ``hevc_vit_stack_as_clip`` (default 0: off) — opt-in: a ``(k, C, H, W)`` stack of exactly this many
            square frames with nothing saying otherwise is one clip (the reference fork's tower does this
            for 8 frames unasked; 8 square images would silently become a video, hence off by default).
        delay_load: read only the config now; :meth:`load_model` reads the weights later.
        vision_tower_cfg: the same as ``args`` (the keyword the current LLaVA fork's builder passes).
    """

    model_class: type[HEVCViTModel] | type[HEVCViTPackingModel]

    def __init__(
        self,
        vision_tower: str | os.PathLike,
        args: Any = None,
        delay_load: bool = False,
        *,
        vision_tower_cfg: Any = None,
        model: HEVCViTModel | HEVCViTPackingModel | None = None,
    ):
        super().__init__()
        if args is not None and vision_tower_cfg is not None and args is not vision_tower_cfg:
            raise ValueError("pass the LLaVA config once, as args or as vision_tower_cfg (the current fork's name)")
        args = args if args is not None else vision_tower_cfg if vision_tower_cfg is not None else {}
        self.is_loaded = False
        self.vision_tower_name = os.fspath(vision_tower)
        self.select_layer = int(_arg(args, "mm_vision_select_layer", -1))
        self.select_feature = _arg(args, "mm_vision_select_feature", "patch") or "patch"
        self.projector_type = _arg(args, "mm_projector_type", "patch_merger") or "patch_merger"
        self.stack_as_clip = int(_arg(args, STACK_AS_CLIP_SETTING, 0) or 0)
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
                raise ValueError(
                    f"model is a {type(model).__name__}; {type(self).__name__} runs a {self.model_class.__name__}"
                )
            self.vision_tower = model
            in_folder = os.path.isdir(self.vision_tower_name)
            self.image_processor = (
                load_image_processor(self.vision_tower_name, model.config)
                if in_folder
                else default_image_processor(model.config)
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
        self.register_load_state_dict_pre_hook(_load_before_weights_arrive)

    @classmethod
    def from_model(cls, model: HEVCViTModel | HEVCViTPackingModel, args: Any = None) -> HEVCViTVisionTowerBase:
        """A tower around an encoder already in memory (being trained, or built from a preset), without
        reading a checkpoint; its weights keep their ``requires_grad`` as they are."""
        name = getattr(model.config, "name_or_path", "") or f"<{type(model).__name__} in memory>"
        return cls(name, args if args is not None else {}, model=model)

    # -- loading -------------------------------------------------------------------------------------

    def load_model(self, device_map: str | torch.device | dict | None = None) -> None:
        """Load the weights and the image processor, and freeze the weights (``requires_grad_(False)``).

        The weights take torch's default dtype — float32, unless the tower is built inside a model being
        loaded in another dtype (``from_pretrained(..., dtype=torch.bfloat16)`` sets the default while it
        builds), so the tower follows the model it sits in. Idempotent: a second call logs a warning and
        returns without reading anything.
        """
        if self.is_loaded:
            logger.warning("%s is already loaded; load_model() called again, skipping", self.vision_tower_name)
            return
        self.vision_tower = self.model_class.from_pretrained(
            self.vision_tower_name, device_map=device_map, dtype=torch.get_default_dtype()
        )
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

    def resolve(
        self,
        images: ImagesInput,
        grid_thw: Any = None,
        patch_positions: Any = None,
        num_frames: int | None = None,
    ) -> TowerInput:
        """What a call means: which frames form which item, with which positions (see
        :mod:`hevc_vit.tower_inputs`); validates the input and raises ``ValueError`` naming what is wrong."""
        return resolve_tower_input(
            images,
            num_channels=self.config.num_channels,
            patch_size=self.config.patch_size,
            grid_thw=grid_thw,
            patch_positions=patch_positions,
            num_frames=num_frames,
            stack_as_clip=self.stack_as_clip,
        )

    def forward(
        self,
        images: ImagesInput,
        return_spatial_dims: bool = False,
        grid_thw: Any = None,
        patch_positions: Any = None,
        num_frames: int | None = None,
    ) -> torch.Tensor | list[torch.Tensor] | tuple[Any, Any, Any]:
        """Features of a batch or a list of images and videos, in the input's dtype, on the tower's device.

        images: ``(B, C, H, W)`` -> ``(B, h·w, D')``; ``(B, C, T, H, W)`` -> ``(B, T·h·w, D')``; a list ->
            a list with one tensor per element: image ``(C, H, W)`` -> ``(h·w, D')``, image stack
            ``(n, C, H, W)`` -> ``(n, h·w, D')``, video ``(C, T, H, W)`` -> ``(T·h·w, D')``. ``H`` and ``W``
            are multiples of ``p``; ``h = H/p``, ``w = W/p``; ``D' = hidden_size``. A stack whose frames form
            one clip (see below) still comes back as ``(B, h·w, D')``, frame by frame, as LLaVA splits it.
        return_spatial_dims: also return ``h`` and ``w`` in patches: ``(features, h, w)`` with ints when every
            element has the same ``(h, w)``, else with lists of per-element ints (``h[i]``, ``w[i]``).
        grid_thw: optional ``(n, 3)`` int rows ``(t, h, w)``; checked against the pixels (``ValueError``
            naming both when they disagree); rows with ``t > 1`` group a stack's frames into clips.
        patch_positions: optional explicit ``(t, h, w)`` RoPE positions — a per-sample list of ``(1, M, 3)`` /
            ``(M, 3)`` int tensors (or ``[None]``), as the current LLaVA fork passes them. For a stack of ``B``
            frames: ``M = h·w`` gives every image those positions; ``M = B·h·w`` makes the stack one clip
            (e.g. 8 frames spread over a 64-frame context, t = 0, 9, ..., 63); per-sample entries of
            ``k·h·w`` take the next ``k`` frames each. For a list: one entry per element.
        num_frames: the stack is consecutive clips of this many frames (the current fork's keyword).
        """
        features, layout, _ = self.forward_with_outputs(images, grid_thw, patch_positions, num_frames)
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
        features, _, outputs = self.forward_with_outputs(self.dummy_input)
        anchor = features.new_zeros(())
        for out in outputs if isinstance(outputs, list) else [outputs]:
            anchor = anchor + out.last_hidden_state.sum()
            if out.pooler_output is not None:
                anchor = anchor + out.pooler_output.sum()
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


def _load_before_weights_arrive(tower: HEVCViTVisionTowerBase, state_dict, prefix, *args) -> None:
    """``load_state_dict`` of a model holding a tower built with ``delay_load``: when the state holds tower
    weights, load the tower first, so that they have weights to go to instead of being dropped."""
    if not tower.is_loaded and any(key.startswith(prefix + "vision_tower.") for key in state_dict):
        logger.info(
            "the weights being loaded hold %s's tower weights: loading the tower first", tower.vision_tower_name
        )
        tower.load_model()


class HEVCViTPackingVisionTower(HEVCViTVisionTowerBase):
    """LLaVA-NeXT vision tower on :class:`HEVCViTPackingModel`: every image and video of a call, at its own
    size, packed into one sequence and encoded in one forward."""

    model_class = HEVCViTPackingModel

    def to_packing_input(
        self,
        images: ImagesInput,
        grid_thw: Any = None,
        patch_positions: Any = None,
        num_frames: int | None = None,
    ) -> tuple[torch.Tensor, PackingPlan, TowerInput]:
        """A tower call as packing input: ``patches (T, C·p·p)`` on the tower's device, the
        :class:`PackingPlan` (one row per image and per clip, explicit positions when given) and the
        resolved call. Public so benchmarks and data loaders can build the input once."""
        layout = self.resolve(images, grid_thw, patch_positions, num_frames)
        device = self.device
        p = self.config.patch_size
        # ==========================================================================================
        # INPUT CONVERSION: LLaVA images -> packing input
        #   from: a batch (B, C, H, W) / (B, C, T, H, W), or a list of images (C, H, W), image stacks
        #         (n, C, H, W) and videos (C, T, H, W) of any sizes
        #   to:   patches (T, C·p·p) — the flattened (C, p, p) patches of all frames, back to back, which is
        #         already the frame-major order of any clip of consecutive frames — and the plan, whose
        #         grid_thw (n, 3) has one (k, h, w) row per image (k = 1) and per clip of k frames
        # ==========================================================================================
        if layout.batched:  # cut on the tower's device: one copy of the pixels, then one reshape there
            patches, _ = patchify(images.to(device, non_blocking=True), p)  # (B·T·h·w, C·p·p)
        else:  # cut where the items are, then one copy of the packed patches
            patches, _ = patchify_items(images, p, self.config.num_channels)
            patches = patches.to(device, non_blocking=True)  # (T, C·p·p)
        plan = PackingPlan.from_grid_thw(layout.grid_thw(), device=device, patch_positions=layout.positions())
        return patches, plan, layout

    def forward_with_outputs(
        self,
        images: ImagesInput,
        grid_thw: Any = None,
        patch_positions: Any = None,
        num_frames: int | None = None,
    ) -> tuple[torch.Tensor | list[torch.Tensor], TowerInput, BaseModelOutputWithPooling]:
        """:meth:`forward`'s features, the resolved call and the model's packed outputs (one forward)."""
        model = self._require_loaded()
        patches, plan, layout = self.to_packing_input(images, grid_thw, patch_positions, num_frames)
        outputs = model(patches, plan=plan, output_hidden_states=True, return_dict=True)
        packed = self.feature_select(outputs).to(layout.dtype)  # (T, D')
        # ==========================================================================================
        # OUTPUT CONVERSION: packed features -> what the projector expects
        #   from: features (T, D'), the elements back to back in input order
        #   to:   a batch -> (B, h·w, D') or (B, T·h·w, D'); a list -> one tensor per element: image (h·w, D'),
        #         image stack (n, h·w, D'), video (T·h·w, D') — split by sizes known on the host
        # ==========================================================================================
        D = packed.shape[-1]
        if layout.batched:
            return packed.view(*layout.elements[0].shape, D), layout, outputs
        parts = unpack(packed, layout.tokens)  # per element: (tokens, D')
        return [part.view(*e.shape, D) for part, e in zip(parts, layout.elements)], layout, outputs


class HEVCViTVisionTower(HEVCViTVisionTowerBase):
    """LLaVA-NeXT vision tower on :class:`HEVCViTModel`: one forward per run of items of one shape (a batch
    of images is one forward, a list goes element by element) — the standard path the packing tower must
    equal."""

    model_class = HEVCViTModel

    def forward_with_outputs(
        self,
        images: ImagesInput,
        grid_thw: Any = None,
        patch_positions: Any = None,
        num_frames: int | None = None,
    ) -> tuple[torch.Tensor | list[torch.Tensor], TowerInput, list[BaseModelOutputWithPooling]]:
        """:meth:`forward`'s features, the resolved call and the model outputs of every forward it ran."""
        model = self._require_loaded()
        layout = self.resolve(images, grid_thw, patch_positions, num_frames)
        elements = [images] if layout.batched else [as_batch(x, self.config.num_channels) for x in images]
        features, all_outputs = [], []
        for batch, element in zip(elements, layout.elements):
            batch = batch.to(self.device, non_blocking=True)  # (n, C, H, W) or (B, C, T, H, W)
            parts = []
            for pixels, positions in _runs(batch, element):
                outputs = model(pixels, patch_positions=positions, output_hidden_states=True, return_dict=True)
                parts.append(self.feature_select(outputs).to(layout.dtype).flatten(0, 1))  # (g·N, D')
                all_outputs.append(outputs)
            selected = torch.cat(parts) if len(parts) > 1 else parts[0]
            features.append(selected.view(*element.shape, selected.shape[-1]))
        return (features[0] if layout.batched else features), layout, all_outputs


def _runs(batch: torch.Tensor, element: Element) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The standard model's inputs for one element: one batch per run of consecutive items with the same
    frame count — images ``(g, C, H, W)``, clips ``(g, C, k, H, W)`` — with their positions ``(g, N, 3)``."""
    if batch.dim() == 5:  # videos (B, C, T, H, W): one run
        positions = element.positions
        return [(batch, None if positions is None else positions.reshape(batch.shape[0], -1, 3))]
    hw = element.h * element.w
    runs, frame = [], 0
    for k, group in itertools.groupby(element.frames):
        g = len(list(group))
        pixels = batch[frame : frame + g * k]  # (g·k, C, H, W)
        if k > 1:  # consecutive frames -> clips (g, C, k, H, W)
            pixels = pixels.view(g, k, *pixels.shape[1:]).transpose(1, 2)
        positions = element.positions
        if positions is not None:
            positions = positions[frame * hw : (frame + g * k) * hw].reshape(g, k * hw, 3)
        runs.append((pixels, positions))
        frame += g * k
    return runs


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
