"""The HEVC ViT encoder: one packed core, a packing model and a standard model around it.

``HEVCViTPackingModel`` takes packed patches ``(T, C·p·p)`` + ``grid_thw``; ``HEVCViTModel`` takes
``(B, C, H, W)`` images or ``(B, C, T, H, W)`` videos and is an input/output adapter around the very same
layers, so the two cannot drift apart. Both hold the same weight names and load every format of
``hevc_vit.checkpoints``.

Legend: ``T`` packed tokens, ``n`` items, ``B`` batch, ``N`` tokens per item, ``D`` width, ``p`` patch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hevc_vit.attention import (
    TRANSFORMERS_NAMES,
    AttendFn,
    backend_name,
    choose_backend,
    get_attention,
    recording_attention,
    requested_backend,
    stack_attention_weights,
    transformers_name,
)
from hevc_vit.checkpoints.embedded import attach_load_hooks, check_reinitialisation
from hevc_vit.checkpoints.pretrained import load_pretrained, load_state_dict_checked  # noqa: F401 — load_state_dict_checked is public here too
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.layers import HEVCViTEncoder, HEVCViTPatchEmbed, HEVCViTPoolingHead, make_norm
from hevc_vit.packing import GridLike, PackingPlan, check_pixels, grid_positions, patchify, unpack_per_item
from hevc_vit.rope import rope_cos_sin
from hevc_vit.runtime.transformers_kwargs import check_tower_kwargs, wants_hidden_states


class HEVCViTPreTrainedModel(PreTrainedModel):
    """Weight init, loading of every checkpoint format, and the attention-backend switch."""

    config_class = HEVCViTConfig
    base_model_prefix = "hevc_vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HEVCViTEncoderLayer"]
    _supports_sdpa = True  # the registry's "sdpa"
    _supports_flash_attn = True  # "flash_attention_2" runs the registry's "flash_attn" (needs the flash-attn package)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.trunc_normal_(module.in_proj_weight, std=std)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, HEVCViTPoolingHead):
            nn.init.trunc_normal_(module.probe, std=std)

    def _initialize_weights(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        """transformers' per-module initialisation, except for a model that holds checkpoint weights (read by
        :meth:`from_pretrained`): those are never re-initialised — see
        :func:`~hevc_vit.checkpoints.embedded.check_reinitialisation`, which re-reads them or raises."""
        if getattr(self, "checkpoint_source", None) is not None:
            check_reinitialisation(self)
            return
        super()._initialize_weights(module, *args, **kwargs)

    # -- attention backend ---------------------------------------------------------------------------

    def set_attn_implementation(self, attn_implementation: str, *args: Any, **kwargs: Any) -> None:
        """Switch the attention backend: ours (``auto``, ``eager``, ``sdpa``, ``torch_varlen``, ``flash_attn``)
        or transformers' names (``flash_attention_2`` runs ``flash_attn``). ``config._attn_implementation``
        follows, in transformers' names; under ``auto`` it says what the last forward ran."""
        backend = backend_name(attn_implementation)
        self._attend = get_attention(backend)
        self.config.attention_backend = backend
        if backend == "auto":  # until a forward says otherwise: what auto picks for the weights as they are
            weight = self.patch_embed.proj.weight
            backend = choose_backend(weight.device, weight.dtype)
        self.config._attn_implementation = transformers_name(backend)

    @property
    def attn_implementation(self) -> str:
        return self.config.attention_backend

    # -- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> HEVCViTPreTrainedModel:
        """Load a checkpoint of any supported format (hevc_vit, packing, standard, legacy) into this model;
        see :func:`hevc_vit.checkpoints.pretrained.load_pretrained` for the arguments and which loader runs."""
        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)


class HEVCViTCore(HEVCViTPreTrainedModel):
    """The layers both models share, run on packed tokens (the base of both models; every model of this
    library is built through its ``__init__``)."""

    def __init__(self, config: HEVCViTConfig):
        requested = requested_backend(getattr(config, "_attn_implementation", None))  # transformers' request
        if getattr(config, "_attn_implementation", None) not in (None, *TRANSFORMERS_NAMES):
            config._attn_implementation = None  # one of ours (torch_varlen): transformers checks only its own names
        super().__init__(config)
        self.patch_embed = HEVCViTPatchEmbed(config)
        self.layernorm_pre = make_norm(config)
        self.encoder = HEVCViTEncoder(config)
        self.layernorm_post = make_norm(config)
        self.head = HEVCViTPoolingHead(config) if config.use_head else None
        attach_load_hooks(self)  # load_state_dict of a model holding this one converts reference names
        self.post_init()
        self.set_attn_implementation(requested or config.attention_backend)

    def compile_blocks(self, **compile_kwargs: Any) -> HEVCViTCore:
        """Compile the dense parts of every block (see :meth:`HEVCViTEncoder.compile_blocks`); returns self."""
        self.encoder.compile_blocks(**compile_kwargs)
        return self

    def encode_packed(
        self,
        patches: torch.Tensor,
        plan: PackingPlan,
        output_hidden_states: bool = False,
        attend: AttendFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """patches ``(T, C·p·p)`` -> ``last (T, D)``, ``pooled (n, D)`` or None, ``hidden`` tuple or None.

        ``attend`` replaces the model's attention backend for this call (benchmark baselines use it).
        """
        if request := requested_backend(self.config._attn_implementation):  # a parent's set_attn_implementation
            self.set_attn_implementation(request)
        x = self.layernorm_pre(self.patch_embed(patches))  # (T, D), cast to the weights' dtype there
        if attend is None and self.config.attention_backend == "auto":  # say what runs, as transformers does
            self.config._attn_implementation = transformers_name(choose_backend(x.device, x.dtype))
        cos, sin = rope_cos_sin(plan.positions, self.config.head_dim, self.config.rope_theta, dtype=x.dtype)
        x, hidden = self.encoder(x, cos, sin, plan, attend or self._attend, output_hidden_states)
        last = self.layernorm_post(x)  # (T, D)
        pooled = self.head(last, plan) if self.head is not None else None  # (n, D)
        return last, pooled, hidden

    def forward_packed(
        self,
        hidden_states: torch.Tensor,
        grid_thw: GridLike | None = None,
        patch_positions: torch.Tensor | None = None,
        plan: PackingPlan | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        per_item: bool = False,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Packed patches ``(T, C·p·p)`` + ``grid_thw`` (or a ``plan``) through the layers: what
        :meth:`HEVCViTPackingModel.forward` runs, and the standard model for packed input. ``per_item``: the
        token outputs come one entry per item (:func:`~hevc_vit.packing.unpack_per_item`), not packed."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(
                f"hidden_states has shape {shape}; expected 2-D packed patches (T, C·p·p) = "
                f"(T, {self.config.patch_dim})"
            )
        check_pixels("hidden_states", hidden_states)  # floating point
        self._check_data("hidden_states", hidden_states)
        T, width = hidden_states.shape
        if width != self.config.patch_dim:
            c, p = self.config.num_channels, self.config.patch_size
            raise ValueError(
                f"hidden_states has patch width {width}; expected C·p·p = {c}·{p}·{p} = {self.config.patch_dim}"
            )
        if plan is None:
            if grid_thw is None:
                raise ValueError("grid_thw is None; pass grid_thw (n, 3) or a prebuilt plan")
            plan = PackingPlan.from_grid_thw(grid_thw, device=hidden_states.device, num_tokens=T)
            if patch_positions is not None:
                plan = PackingPlan.from_seqlens(
                    plan.seqlens, patch_positions, device=hidden_states.device, grid_thw=plan.grid_thw
                )
        elif grid_thw is not None or patch_positions is not None:
            raise ValueError("pass either plan, or grid_thw (and patch_positions), not both")
        if plan.total_tokens != T:
            raise ValueError(
                f"grid_thw describes {plan.total_tokens} patches (sum of t·h·w over {plan.num_items} items); "
                f"hidden_states has {T}"
            )
        if plan.device != hidden_states.device:
            raise ValueError(f"plan is on {plan.device}; hidden_states is on {hidden_states.device}")
        output_hidden_states = wants_hidden_states(output_hidden_states, self.config.output_hidden_states)
        attend, weights = self._attention_recorder(output_attentions)
        last, pooled, hidden = self.encode_packed(hidden_states, plan, output_hidden_states, attend)
        if per_item:  # (n, N, D), or jagged (n, j, D) when the items' token counts differ
            last = unpack_per_item(last, plan)
            hidden = tuple(unpack_per_item(h, plan) for h in hidden) if hidden is not None else None
        return _output(last, pooled, hidden, weights, return_dict, self.config.return_dict)

    def _attention_recorder(self, output_attentions: bool | None) -> tuple[AttendFn | None, list | None]:
        """The attention that records its weights (and their store) for ``output_attentions``, or None, None."""
        if not (output_attentions if output_attentions is not None else self.config.output_attentions):
            return None, None
        return recording_attention(self.config.attention_backend)

    def _check_channels(self, what: str, shape: tuple[int, ...], channels: int) -> None:
        if channels != self.config.num_channels:
            raise ValueError(
                f"{what} has shape {shape} with {channels} channels; the config expects "
                f"num_channels={self.config.num_channels}"
            )

    def _check_data(self, what: str, x: torch.Tensor) -> None:
        """Meta tensors (shapes without values) only go through a model on the meta device, and back."""
        weights = next(self.parameters())  # not an attribute read: in a forward, ZeRO-3 would gather the weight
        if x.is_meta != weights.is_meta:
            raise ValueError(
                f"{what} is on {x.device} but the model's weights are on {weights.device}; expected both to hold "
                f"data (cpu, cuda) or both on the meta device"
            )


class HEVCViTPackingModel(HEVCViTCore):
    """The encoder on packed input: every image and video at its own size, in one forward."""

    main_input_name = "hidden_states"

    def forward(
        self,
        hidden_states: torch.Tensor | None = None,
        grid_thw: GridLike | None = None,
        patch_positions: torch.Tensor | None = None,
        plan: PackingPlan | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: GridLike | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """
        hidden_states: ``(T, C·p·p)`` — flattened ``(C, p, p)`` patches of all items, packed.
        grid_thw: ``(n, 3)`` int — ``(t, h, w)`` in patches per item; a CPU tensor or a list of triples
            keeps the forward free of host syncs (a device tensor is copied to the host once).
        patch_positions: optional ``(T, 3)`` int — explicit ``(t, h, w)`` RoPE position per patch.
        plan: a prebuilt :class:`PackingPlan` instead of ``grid_thw`` / ``patch_positions``.
        pixel_values / image_grid_thw: the same patches and grid under the names of transformers' image
            processors (:class:`~hevc_vit.processing.image_processing.HEVCViTImageProcessor`); given
            ``image_grid_thw``, the token outputs come per image, as transformers' pipelines split them (see Returns).
        Returns ``last_hidden_state (T, D)``, ``pooler_output (n, D)`` (with the head),
        ``hidden_states``: ``num_hidden_layers + 1`` tensors ``(T, D)`` when asked. With ``image_grid_thw`` the
        token outputs are ``(n, N, D)`` when every image has ``N`` tokens, else a jagged nested tensor whose
        ``[i]`` is image ``i``'s ``(N_i, D)`` — so ``pipeline("image-feature-extraction", batch_size=k)`` gives
        every image ``(1, N_i, D)``, as one call per image does. ``pixel_values`` images ``(B, C, H, W)`` or videos
        ``(B, C, T, H, W)`` of one size (a fixed-size processor's, e.g. ``CLIPImageProcessor``) are patchified and
        come back as the standard model's ``(B, N, D)``. ``output_attentions`` and ``**kwargs``: as in
        :meth:`HEVCViTModel.forward`.
        """
        check_tower_kwargs(f"{type(self).__name__}.forward", kwargs)
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() in (4, 5):
            return self._forward_images(pixel_values, hidden_states, grid_thw, image_grid_thw, patch_positions, plan,
                                        output_hidden_states, return_dict, output_attentions)  # fmt: skip
        hidden_states = _one_of("hidden_states", hidden_states, "pixel_values", pixel_values)
        per_item = image_grid_thw is not None
        grid_thw = _one_of("grid_thw", grid_thw, "image_grid_thw", image_grid_thw, required=False)
        return self.forward_packed(hidden_states, grid_thw, patch_positions, plan, output_hidden_states, return_dict,
                                   per_item, output_attentions)  # fmt: skip

    def _forward_images(
        self, pixel_values, hidden_states, grid_thw, image_grid_thw, patch_positions, plan, output_hidden_states,
        return_dict, output_attentions,
    ) -> BaseModelOutputWithPooling | tuple:  # fmt: skip
        given = {"hidden_states": hidden_states, "grid_thw": grid_thw, "image_grid_thw": image_grid_thw,
                 "patch_positions": patch_positions, "plan": plan}  # fmt: skip
        extra = sorted(name for name, value in given.items() if value is not None)
        if extra:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} (images or videos of one size) and {extra} "
                f"were given too; expected pixel_values alone, or packed patches (T, C·p·p) with image_grid_thw"
            )
        self._check_channels("pixel_values", tuple(pixel_values.shape), pixel_values.shape[1])
        patches, grid = patchify(pixel_values, self.config.patch_size)  # (B·N, C·p·p), (B, 3)
        return self.forward_packed(
            patches, grid, None, None, output_hidden_states, return_dict, True, output_attentions
        )


class HEVCViTModel(HEVCViTCore):
    """The encoder on ``(B, C, H, W)`` images or ``(B, C, T, H, W)`` videos of one size."""

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        visible_indices: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_grid_thw: GridLike | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """
        pixel_values: ``(B, C, H, W)`` or ``(B, C, T, H, W)``; ``H``, ``W`` multiples of ``p``. Packed patches
            ``(T, C·p·p)`` with ``image_grid_thw (n, 3)`` (what transformers' image processor of this library
            gives, e.g. in ``pipeline("image-feature-extraction")``) run the packing path instead, every item at
            its own size, and come back per image like :class:`HEVCViTPackingModel`'s with ``image_grid_thw``.
        patch_positions: optional ``(B, N, 3)`` int — explicit ``(t, h, w)`` per patch (``N = T·H/p·W/p``).
        visible_indices: optional ``(B, K)`` int — keep only these patches of each item (sparse input);
            on the CPU they are range-checked here, on a device the gather checks them.
        output_hidden_states: a flag, or (transformers 5) the layer index / indices a LLaVA class selects: then
            all ``num_hidden_layers + 1`` are returned, the tuple those indices select from.
        output_attentions: the attention weights of every layer, ``(B, H, N, N)`` as transformers shapes them
            (a packed input: ``(n, H, N, N)``, or a tuple of ``(H, N_i, N_i)`` per item when sizes differ); only
            the ``eager`` backend computes them — on any other this call runs eager, with a warning (once).
        kwargs: what transformers' LLaVA classes pass a vision tower besides (``vision_aspect_ratio``, ...: see
            :mod:`hevc_vit.runtime.transformers_kwargs`), accepted and ignored; other names ignored with a warning.
        Returns ``last_hidden_state (B, N or K, D)``, ``pooler_output (B, D)`` (with the head),
        ``hidden_states``: ``num_hidden_layers + 1`` tensors ``(B, N or K, D)`` when asked, ``attentions``.
        """
        check_tower_kwargs(f"{type(self).__name__}.forward", kwargs)
        if image_grid_thw is not None or (isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 2):
            if image_grid_thw is None or visible_indices is not None:
                raise ValueError(
                    "pixel_values is 2-D (packed patches); expected image_grid_thw (n, 3) with it and no "
                    "visible_indices — or images (B, C, H, W) / videos (B, C, T, H, W)"
                )
            return self.forward_packed(pixel_values, image_grid_thw, patch_positions, None, output_hidden_states,
                                       return_dict, True, output_attentions)  # fmt: skip
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() not in (4, 5):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values has shape {shape}; expected (B, C, H, W) images or (B, C, T, H, W) videos")
        self._check_channels("pixel_values", tuple(pixel_values.shape), pixel_values.shape[1])
        self._check_data("pixel_values", pixel_values)
        device = pixel_values.device
        patches, grid = patchify(pixel_values, self.config.patch_size)  # (B·N, C·p·p), (B, 3)
        B = pixel_values.shape[0]
        N = patches.shape[0] // B
        if patch_positions is None:
            positions = grid_positions(grid[:1]).repeat(B, 1)  # (B·N, 3) on the CPU
        else:
            if not isinstance(patch_positions, torch.Tensor) or tuple(patch_positions.shape) != (B, N, 3):
                shape = (
                    tuple(patch_positions.shape) if isinstance(patch_positions, torch.Tensor) else type(patch_positions)
                )
                raise ValueError(f"patch_positions has shape {shape}; expected ({B}, {N}, 3), one (t, h, w) per patch")
            positions = patch_positions.reshape(B * N, 3)
        seqlens, grid_thw = [N] * B, grid
        if visible_indices is not None:
            idx = _check_visible_indices(visible_indices, B, N).to(device)
            K = idx.shape[1]
            P = patches.shape[1]
            patches = patches.view(B, N, P).gather(1, idx[..., None].expand(B, K, P)).reshape(B * K, P)
            positions = positions.to(device).view(B, N, 3).gather(1, idx[..., None].expand(B, K, 3)).reshape(B * K, 3)
            seqlens, grid_thw = [K] * B, None
        plan = PackingPlan.from_seqlens(seqlens, positions, device=device, grid_thw=grid_thw)
        output_hidden_states = wants_hidden_states(output_hidden_states, self.config.output_hidden_states)
        attend, weights = self._attention_recorder(output_attentions)
        last, pooled, hidden = self.encode_packed(patches, plan, output_hidden_states, attend)
        n = seqlens[0]
        last = last.view(B, n, -1)  # (B, N, D)
        hidden = tuple(h.view(B, n, -1) for h in hidden) if hidden is not None else None
        return _output(last, pooled, hidden, weights, return_dict, self.config.return_dict)


def _one_of(name: str, value: Any, alias: str, alias_value: Any, required: bool = True) -> Any:
    """``value`` or its transformers-named ``alias`` (one of them, not both)."""
    if value is not None and alias_value is not None:
        raise ValueError(f"{name} and {alias} were both given; pass one (they are the same input)")
    value = value if value is not None else alias_value
    if value is None and required:
        raise ValueError(f"{name} is None; expected packed patches (T, C·p·p) as {name} or {alias}")
    return value


def _check_visible_indices(visible_indices: torch.Tensor, B: int, N: int) -> torch.Tensor:
    if not isinstance(visible_indices, torch.Tensor) or visible_indices.dim() != 2 or visible_indices.shape[0] != B:
        shape = tuple(visible_indices.shape) if isinstance(visible_indices, torch.Tensor) else type(visible_indices)
        raise ValueError(f"visible_indices has shape {shape}; expected ({B}, K), K patch indices per item")
    if visible_indices.is_floating_point() or visible_indices.dtype == torch.bool:
        raise ValueError(f"visible_indices has dtype {visible_indices.dtype}; expected an integer tensor")
    if visible_indices.shape[1] == 0:
        raise ValueError(f"visible_indices has shape {tuple(visible_indices.shape)}; expected K >= 1")
    if visible_indices.device.type == "cpu":
        lo, hi = int(visible_indices.min()), int(visible_indices.max())
        if lo < 0 or hi >= N:
            bad = lo if lo < 0 else hi
            raise ValueError(f"visible_indices holds {bad}; expected indices in [0, {N}) for {N} patches per item")
    return visible_indices.long()


def _output(last, pooled, hidden, weights, return_dict, default_return_dict) -> BaseModelOutputWithPooling | tuple:
    attentions = stack_attention_weights(weights) if weights is not None else None
    if return_dict if return_dict is not None else default_return_dict:
        return BaseModelOutputWithPooling(last, pooled, hidden, attentions)
    return tuple(v for v in (last, pooled, hidden, attentions) if v is not None)
