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
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .attention import TRANSFORMERS_NAMES, AttendFn, backend_name, choose_backend, get_attention, transformers_name
from .checkpoints import TORCH_SUFFIXES, config_kwargs, load_checkpoint, read_folder_config
from .configuration import HEVCViTConfig
from .embedded import attach_load_hooks, check_reinitialisation
from .layers import HEVCViTEncoder, HEVCViTPatchEmbed, HEVCViTPoolingHead, make_norm
from .packing import GridLike, PackingPlan, check_pixels, grid_positions, patchify
from .rope import rope_cos_sin

# from_pretrained keyword arguments that only steer downloading (forwarded to the Hub client or ignored)
_HUB_KWARGS = {"cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder"}
_IGNORED_KWARGS = {
    "trust_remote_code",
    "use_safetensors",
    "low_cpu_mem_usage",
    "resume_download",
    "code_revision",
    "adapter_kwargs",
}
# transformers 5 loads folders through its own from_pretrained (with our weight conversions registered)
_TRANSFORMERS_ONLY_KWARGS = {"max_memory", "quantization_config", "offload_folder", "offload_state_dict", "key_mapping"}
TRANSFORMERS_LOADS_FOLDERS = int(transformers.__version__.split(".")[0]) >= 5


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
        :func:`~hevc_vit.embedded.check_reinitialisation`, which re-reads them or raises."""
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
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: HEVCViTConfig | None = None,
        attn_implementation: str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | dict | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> HEVCViTPreTrainedModel:
        """Load a checkpoint of any supported format (hevc_vit, packing, standard, legacy) into this model.

        The same path under every transformers release: :func:`~hevc_vit.checkpoints.load_checkpoint`
        reads the config and the weights (safetensors, or ``torch.load(weights_only=True)``) and renames/
        fuses them to this library's names; they are loaded strictly. Nothing the forward needs lives
        outside the checkpoint (RoPE tables are computed per forward), so a model built on the meta device
        comes out complete.

        pretrained_model_name_or_path: a checkpoint folder, a Hub id, or a weights-only file (a legacy
            training ``.pt``, a bare ``.safetensors``).
        preset / config_json: the architecture of a weights-only file (a preset name, or a JSON file of
            hyper-parameters); without them the JSON beside the file (``model.json`` for ``model.pt``) is
            used. What the tensor shapes tell is inferred and checked.

        dtype: None -> float32; ``"auto"`` -> as stored; or a ``torch.dtype`` / its name.
        device_map: a device (``"cuda"``, ``"cuda:1"``, ``"cpu"``), ``"auto"`` (CUDA when available) or a
            dict placing the whole model (``{"": device}``).
        attn_implementation: attention backend for this model (overrides the config's).
        Other keyword arguments that name config attributes override them.
        """
        if model_args:
            raise TypeError(f"from_pretrained takes no extra positional arguments; got {len(model_args)}")
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        preset, config_json = kwargs.pop("preset", None), kwargs.pop("config_json", None)
        if attn_implementation is not None:  # unknown -> ValueError, unavailable -> ImportError, before loading
            get_attention(attn_implementation)
            attn_implementation = backend_name(attn_implementation)
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None:
            dtype = _resolve_dtype(dtype) or "auto"  # a bad name -> ValueError here, whichever loader runs
        path = _resolve_folder(pretrained_model_name_or_path, hub)
        # transformers' loader, except inside another model's from_pretrained (a LLaVA tower built on the meta
        # device), where transformers refuses to nest and our loader reads the weights
        nested = torch.empty(()).device.type == "meta"
        if TRANSFORMERS_LOADS_FOLDERS and strict and not nested and os.path.isdir(path) and not (preset or config_json):
            config_checked, _, headers = read_folder_config(path)
            if headers is not None:  # safetensors: transformers' own loader
                return cls._from_pretrained_transformers(
                    path,
                    pretrained_model_name_or_path,
                    config or config_checked,
                    attn_implementation,
                    dtype,
                    device_map,
                    kwargs,
                )
        for k in list(kwargs):
            if k in _IGNORED_KWARGS or k.startswith("_"):
                kwargs.pop(k)
        want_info = bool(kwargs.pop("output_loading_info", False))
        loaded = load_checkpoint(path, preset=preset, config_json=config_json)
        state = loaded.state_dict
        # a fresh config (a copy of the caller's, if given): loading never changes the caller's object
        if config is not None:
            config = HEVCViTConfig(**config_kwargs(config.to_dict()))
        else:
            config = loaded.config
        for key in list(kwargs):
            if hasattr(config, key):
                setattr(config, key, kwargs.pop(key))
        if kwargs:
            raise TypeError(
                f"from_pretrained got unexpected keyword arguments {sorted(kwargs)}"
                + (
                    " (transformers' own loader takes them: transformers >= 5 and a safetensors folder)"
                    if set(kwargs) & _TRANSFORMERS_ONLY_KWARGS
                    else ""
                )
            )
        if attn_implementation is not None:
            config.attention_backend = attn_implementation
        config.validate()

        if strict:
            with torch.device("meta"):
                model = cls(config)
            load_state_dict_checked(model, state, strict=True, assign=True)
        else:
            model = cls(config)
            load_state_dict_checked(model, state, strict=False)
        target_dtype = _resolve_dtype(dtype)
        if target_dtype is not None:
            model.to(target_dtype)
        device = _resolve_device(device_map)
        if device is not None:
            model.to(device)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        model.checkpoint_source = dict(path=path, preset=preset, config_json=config_json)  # to re-read them
        model.eval()
        if want_info:
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    @classmethod
    def _from_pretrained_transformers(
        cls,
        path: str,
        name_or_path: str | os.PathLike,
        config: HEVCViTConfig,
        attn_implementation: str | None,
        dtype: torch.dtype | str | None,
        device_map: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        """A safetensors folder through transformers' own ``from_pretrained`` (transformers >= 5): ``device_map``
        (``"auto"``, per module), ``max_memory``, ``quantization_config``, ``output_loading_info`` and its dtype
        default behave as for any transformers model; the reference standard names are converted by the
        rules :mod:`hevc_vit.embedded` registers. Strict: anything missing, unexpected or mis-shaped raises."""
        config = HEVCViTConfig(**config_kwargs(config.to_dict()))  # never change the caller's object
        for key in [k for k in kwargs if hasattr(config, k) and not k.startswith("_")]:
            setattr(config, key, kwargs.pop(key))
        if attn_implementation is not None:
            config.attention_backend = attn_implementation
        config.validate()
        want_info = bool(kwargs.pop("output_loading_info", False))
        for key in _IGNORED_KWARGS & set(kwargs):
            kwargs.pop(key)
        one_device = _single_device(device_map)  # placed by us: transformers needs accelerate for any device_map
        model, info = super().from_pretrained(
            path,
            config=config,
            dtype=dtype,
            device_map=None if one_device else device_map,
            output_loading_info=True,
            **kwargs,
        )
        if one_device is not None and one_device is not True:
            model.to(one_device)
        info = dict(info) if not isinstance(info, dict) else info
        problems = {
            k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        if any(problems.values()):
            found = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items() if v)
            raise ValueError(f"checkpoint {path} does not fit {cls.__name__}: {found}")
        model.set_attn_implementation(config.attention_backend)
        model.config.name_or_path = str(name_or_path)
        model.checkpoint_source = dict(path=path, preset=None, config_json=None)
        model.eval()
        return (model, info) if want_info else model


def load_state_dict_checked(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False
) -> None:
    """``load_state_dict`` with one ``ValueError`` that lists missing keys, unexpected keys and shape
    mismatches (name, expected shape, found shape); with ``strict=False`` only mismatches are errors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict, assign=assign)


def _resolve_folder(name_or_path: str | os.PathLike, hub: dict[str, Any]) -> str:
    """A local folder or weights-only file as it is; anything else is fetched from the Hub."""
    subfolder = hub.pop("subfolder", None) or ""
    if os.path.isdir(name_or_path):
        return os.path.join(name_or_path, subfolder)
    if os.path.isfile(name_or_path):
        if subfolder:
            raise ValueError(f"subfolder={subfolder!r} was given, but {name_or_path!s} is a file, not a folder")
        return str(name_or_path)
    if str(name_or_path).endswith(TORCH_SUFFIXES + (".safetensors",)) or os.path.isabs(name_or_path):
        raise FileNotFoundError(f"checkpoint {name_or_path!s} does not exist")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.bin"], **hub)
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise FileNotFoundError(
            f"{name_or_path!s} is not a local folder and could not be fetched from the Hugging Face Hub: {e}"
        ) from e
    return os.path.join(folder, subfolder)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r}; expected 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype")
        return resolved
    return dtype


def _single_device(device_map: Any) -> torch.device | bool | None:
    """The one device a ``device_map`` names (True for None: nowhere in particular), or None when it is a real
    map — ``"auto"``, ``"balanced"``, per-module placements — for transformers (and accelerate) to apply."""
    if device_map is None:
        return True
    if isinstance(device_map, dict):
        return _resolve_device(device_map) if set(device_map) == {""} else None
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return None
    return _resolve_device(device_map)


def _resolve_device(device_map: str | torch.device | dict | None) -> torch.device | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map}; this model loads on one device, e.g. {{'': 'cuda:0'}}")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


class _HEVCViTCore(HEVCViTPreTrainedModel):
    """The layers both models share, run on packed tokens."""

    def __init__(self, config: HEVCViTConfig):
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
        self.set_attn_implementation(config.attention_backend)

    def compile_blocks(self, **compile_kwargs: Any) -> _HEVCViTCore:
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
        dtype = self.patch_embed.proj.weight.dtype
        x = self.layernorm_pre(self.patch_embed(patches.to(dtype)))  # (T, D)
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
    ) -> BaseModelOutputWithPooling | tuple:
        """Packed patches ``(T, C·p·p)`` + ``grid_thw`` (or a ``plan``) through the layers: what
        :meth:`HEVCViTPackingModel.forward` runs, and the standard model for packed input."""
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
        output_hidden_states = (
            bool(output_hidden_states) if output_hidden_states is not None else self.config.output_hidden_states
        )
        last, pooled, hidden = self.encode_packed(hidden_states, plan, output_hidden_states)
        return _output(last, pooled, hidden, return_dict, self.config.return_dict)

    def _check_channels(self, what: str, shape: tuple[int, ...], channels: int) -> None:
        if channels != self.config.num_channels:
            raise ValueError(
                f"{what} has shape {shape} with {channels} channels; the config expects "
                f"num_channels={self.config.num_channels}"
            )

    def _check_data(self, what: str, x: torch.Tensor) -> None:
        """Meta tensors (shapes without values) only go through a model on the meta device, and back."""
        weights = self.patch_embed.proj.weight
        if x.is_meta != weights.is_meta:
            raise ValueError(
                f"{what} is on {x.device} but the model's weights are on {weights.device}; expected both to hold "
                f"data (cpu, cuda) or both on the meta device"
            )


class HEVCViTPackingModel(_HEVCViTCore):
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
    ) -> BaseModelOutputWithPooling | tuple:
        """
        hidden_states: ``(T, C·p·p)`` — flattened ``(C, p, p)`` patches of all items, packed.
        grid_thw: ``(n, 3)`` int — ``(t, h, w)`` in patches per item; a CPU tensor or a list of triples
            keeps the forward free of host syncs (a device tensor is copied to the host once).
        patch_positions: optional ``(T, 3)`` int — explicit ``(t, h, w)`` RoPE position per patch.
        plan: a prebuilt :class:`PackingPlan` instead of ``grid_thw`` / ``patch_positions``.
        pixel_values / image_grid_thw: the same as ``hidden_states`` / ``grid_thw``, under the names of
            transformers' image processors (:class:`~hevc_vit.image_processing.HEVCViTImageProcessor`).
        Returns ``last_hidden_state (T, D)``, ``pooler_output (n, D)`` (with the head),
        ``hidden_states``: ``num_hidden_layers + 1`` tensors ``(T, D)`` when asked.
        """
        hidden_states = _one_of("hidden_states", hidden_states, "pixel_values", pixel_values)
        grid_thw = _one_of("grid_thw", grid_thw, "image_grid_thw", image_grid_thw, required=False)
        return self.forward_packed(hidden_states, grid_thw, patch_positions, plan, output_hidden_states, return_dict)


class HEVCViTModel(_HEVCViTCore):
    """The encoder on ``(B, C, H, W)`` images or ``(B, C, T, H, W)`` videos of one size."""

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        visible_indices: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_grid_thw: GridLike | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """
        pixel_values: ``(B, C, H, W)`` or ``(B, C, T, H, W)``; ``H``, ``W`` multiples of ``p``. Packed patches
            ``(T, C·p·p)`` with ``image_grid_thw (n, 3)`` (what transformers' image processor of this library
            gives, e.g. in ``pipeline("image-feature-extraction")``) run the packing path instead, every item at
            its own size, and come back packed like :class:`HEVCViTPackingModel`'s.
        patch_positions: optional ``(B, N, 3)`` int — explicit ``(t, h, w)`` per patch (``N = T·H/p·W/p``).
        visible_indices: optional ``(B, K)`` int — keep only these patches of each item (sparse input);
            on the CPU they are range-checked here, on a device the gather checks them.
        Returns ``last_hidden_state (B, N or K, D)``, ``pooler_output (B, D)`` (with the head),
        ``hidden_states``: ``num_hidden_layers + 1`` tensors ``(B, N or K, D)`` when asked.
        """
        if image_grid_thw is not None or (isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 2):
            if image_grid_thw is None or visible_indices is not None:
                raise ValueError(
                    "pixel_values is 2-D (packed patches); expected image_grid_thw (n, 3) with it and no "
                    "visible_indices — or images (B, C, H, W) / videos (B, C, T, H, W)"
                )
            return self.forward_packed(
                pixel_values, image_grid_thw, patch_positions, None, output_hidden_states, return_dict
            )
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
        output_hidden_states = (
            bool(output_hidden_states) if output_hidden_states is not None else self.config.output_hidden_states
        )
        last, pooled, hidden = self.encode_packed(patches, plan, output_hidden_states)
        n = seqlens[0]
        last = last.view(B, n, -1)  # (B, N, D)
        hidden = tuple(h.view(B, n, -1) for h in hidden) if hidden is not None else None
        return _output(last, pooled, hidden, return_dict, self.config.return_dict)


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


def _output(last, pooled, hidden, return_dict, default_return_dict) -> BaseModelOutputWithPooling | tuple:
    if return_dict if return_dict is not None else default_return_dict:
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)
    return tuple(v for v in (last, pooled, hidden) if v is not None)
