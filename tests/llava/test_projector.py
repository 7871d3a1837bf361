"""The projectors: packed against one item at a time (the fork's reshape maths), batched and list forms against
the packed one, fork state_dicts, gradients, the builder and the input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hevc_vit.llava.projector import (
    IdentityProjector,
    LinearProjector,
    MLPProjector,
    PatchMergerProjector,
    SpatialMergeProjector,
    build_projector,
    merged_grid_thw,
    spatial_merge_index,
)

D, L = 8, 12  # vision width, LLM width
RTOL_FP32 = 1e-6  # max |a - b| relative to max |reference|: same maths, different order of the same ops

# a mixed list: image 4x4, video t=2 of 2x6, non-square 6x2 image, smallest 2x2 image
GRID = [(1, 4, 4), (2, 2, 6), (1, 6, 2), (1, 2, 2)]


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL_FP32) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"max abs diff {err:.3e} > {rtol:.0e} x {scale:.3e}"


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random LayerNorm affine too, so a swapped or skipped parameter shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def packed_features(grid=GRID) -> torch.Tensor:
    return torch.randn(sum(t * h * w for t, h, w in grid), D)  # (T, D)


# -- independent references: one item at a time, the fork's reshape/permute maths -------------------------------


def ref_spatial_merge(proj: SpatialMergeProjector, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    """One item (t·h·w, D), frames as the batch axis of the fork's SpatialMergeProjector.forward."""
    x = proj.ln_q(x).view(t, h // 2, 2, w // 2, 2, D)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(t * (h // 2) * (w // 2), 4 * D)  # (t·h/2·w/2, 4D), (dy, dx) order
    return proj.mlp(x)


def ref_patch_merger(proj: PatchMergerProjector, x: torch.Tensor) -> torch.Tensor:
    """The fork's PatchMerger.forward on a batch (B, N, D)."""
    B = x.shape[0]
    return proj.mlp(proj.ln_q(x).view(B, -1, 4 * D))


def per_item(x: torch.Tensor, grid) -> list[torch.Tensor]:
    return list(torch.split(x, [t * h * w for t, h, w in grid]))


# -- pure index maths ---------------------------------------------------------------------------------------


def test_spatial_merge_index_matches_reshape_permute():
    """The vectorised gather index equals the per-item reshape/permute applied to token numbers."""
    expected, first = [], 0
    for t, h, w in GRID:
        ids = torch.arange(first, first + t * h * w).view(t, h // 2, 2, w // 2, 2)
        expected.append(ids.permute(0, 1, 3, 2, 4).reshape(-1))  # (t·h·w,)
        first += t * h * w
    index = spatial_merge_index(torch.tensor(GRID))
    assert index.dtype == torch.int64 and index.device.type == "cpu"
    assert torch.equal(index, torch.cat(expected))


def test_merged_grid_thw_agrees_with_output_sizes():
    """Shapes of a mixed list through spatial_merge: (t, h/2, w/2) tokens per item."""
    proj = SpatialMergeProjector(D, L)
    merged = merged_grid_thw(GRID)
    assert merged.tolist() == [[t, h // 2, w // 2] for t, h, w in GRID]
    items = [torch.randn(t * h * w, D) for t, h, w in GRID]
    outs = proj(items, height=[h for _, h, _ in GRID], width=[w for _, _, w in GRID])
    assert [tuple(o.shape) for o in outs] == [(int(row.prod()), L) for row in merged]
    packed = proj(torch.cat(items), torch.tensor(GRID))
    assert packed.shape == (int(merged.prod(-1).sum()), L)


# -- packed against one item at a time ------------------------------------------------------------------------


def test_spatial_merge_packed_equals_per_item():
    proj = randomize(SpatialMergeProjector(D, L))
    x = packed_features()
    out = proj(x, grid_thw=torch.tensor(GRID))  # (T', L)
    expected = torch.cat([ref_spatial_merge(proj, xi, *g) for xi, g in zip(per_item(x, GRID), GRID)])
    assert_rel(out, expected)
    assert_rel(proj(x, grid_thw=GRID), expected)  # list of triples


def test_patch_merger_packed_equals_per_item():
    proj = randomize(PatchMergerProjector(D, L))
    x = packed_features()
    out = proj(x, grid_thw=torch.tensor(GRID))
    expected = torch.cat([ref_patch_merger(proj, xi[None])[0] for xi in per_item(x, GRID)])
    assert_rel(out, expected)


# -- batched forms against the fork's maths -------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(4, 6), (6, 2), (4, 4)])
def test_spatial_merge_batched_equals_fork_math(h, w):
    proj = randomize(SpatialMergeProjector(D, L))
    x = torch.randn(3, h * w, D)  # (B, N, D)
    expected = torch.stack([ref_spatial_merge(proj, xi, 1, h, w) for xi in x])  # (B, N/4, L)
    assert_rel(proj(x, height=h, width=w), expected)
    if h == w:  # a square grid needs no height / width
        assert_rel(proj(x), expected)


def test_spatial_merge_batched_video_merges_each_frame():
    """(B, t·h·w, D) from a batch of videos: every frame merged on its own."""
    proj = randomize(SpatialMergeProjector(D, L))
    x = torch.randn(2, 3 * 2 * 4, D)
    expected = torch.stack([ref_spatial_merge(proj, xi, 3, 2, 4) for xi in x])
    assert_rel(proj(x, height=2, width=4), expected)


def test_patch_merger_batched_equals_view():
    proj = randomize(PatchMergerProjector(D, L))
    x = torch.randn(3, 20, D)
    assert_rel(proj(x), ref_patch_merger(proj, x))
    assert_rel(proj(x, height=4, width=5), ref_patch_merger(proj, x))  # height / width are not needed, ignored


# -- list form against packed form ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SpatialMergeProjector, PatchMergerProjector, MLPProjector, LinearProjector])
def test_list_equals_packed(cls):
    """A tower's list output (image, image stack, video, non-square image) equals the packed forward, split."""
    proj = randomize(cls(D, L))
    image, stack, video, tall = torch.randn(16, D), torch.randn(2, 8, D), torch.randn(24, D), torch.randn(12, D)
    heights, widths = [4, 2, 2, 6], [4, 4, 6, 2]
    grid = [(1, 4, 4), (1, 2, 4), (1, 2, 4), (2, 2, 6), (1, 6, 2)]  # the stack is two items
    outs = proj([image, stack, video, tall], height=heights, width=widths)
    packed = proj(torch.cat([image, stack.reshape(-1, D), video, tall]), grid_thw=grid)
    assert [o.shape[:-2] for o in outs] == [(), (2,), (), ()]
    assert_rel(torch.cat([o.reshape(-1, L) for o in outs]), packed)


def test_list_with_shared_height_width():
    proj = randomize(SpatialMergeProjector(D, L))
    items = [torch.randn(16, D), torch.randn(3, 16, D)]
    outs = proj(items, height=4, width=4)
    assert_rel(outs[0], ref_spatial_merge(proj, items[0], 1, 4, 4))
    assert_rel(outs[1], torch.stack([ref_spatial_merge(proj, xi, 1, 4, 4) for xi in items[1]]))
    for out, inferred in zip(outs, proj(items)):  # square grids: height / width inferred
        assert_rel(inferred, out)


# -- per-token projectors keep the structure ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp3x_gelu", "identity"])
def test_per_token_projectors_keep_structure(kind):
    proj = randomize(build_projector({"mm_projector_type": kind, "mm_hidden_size": D, "hidden_size": L}))

    def plain(x):  # the module's own per-token maths, without our forward
        if kind == "identity":
            return x
        if kind == "linear":
            return F.linear(x, proj.weight, proj.bias)
        return torch.nn.Sequential.forward(proj, x)

    batched, packed, items = torch.randn(2, 6, D), packed_features(), [torch.randn(5, D), torch.randn(2, 3, D)]
    assert_rel(proj(batched, height=2, width=3), plain(batched))
    assert_rel(proj(packed, grid_thw=GRID), plain(packed))
    for out, item in zip(proj(items), items):
        assert_rel(out, plain(item))


# -- training ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["spatial_merge", "patch_merger", "mlp2x_gelu", "linear"])
def test_gradients_reach_features_and_every_parameter(kind):
    proj = randomize(build_projector({"mm_projector_type": kind, "mm_hidden_size": D, "hidden_size": L}))
    x = packed_features().requires_grad_(True)
    proj(x, grid_thw=torch.tensor(GRID)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


# -- fork checkpoints -----------------------------------------------------------------------------------------


def fork_merger_state_dict() -> dict[str, torch.Tensor]:
    H = 4 * D
    shapes = {"ln_q.weight": (D,), "ln_q.bias": (D,), "mlp.0.weight": (H, H), "mlp.0.bias": (H,)}
    shapes |= {"mlp.2.weight": (L, H), "mlp.2.bias": (L,)}
    return {k: torch.randn(s) for k, s in shapes.items()}


@pytest.mark.parametrize("cls", [SpatialMergeProjector, PatchMergerProjector])
def test_fork_merger_state_dict_loads_strictly(cls):
    sd = fork_merger_state_dict()
    proj = cls(D, L)
    proj.load_state_dict(sd, strict=True)
    x = torch.randn(2, 16, D)  # (B, N, D), 4x4 grids
    normed = F.layer_norm(x, (D,), sd["ln_q.weight"], sd["ln_q.bias"], eps=1e-6)
    if cls is SpatialMergeProjector:
        normed = normed.view(2, 2, 2, 2, 2, D).permute(0, 1, 3, 2, 4, 5)  # (B, h/2, w/2, 2, 2, D)
    merged = normed.reshape(2, 4, 4 * D)  # (B, N/4, 4D)
    hidden = F.gelu(F.linear(merged, sd["mlp.0.weight"], sd["mlp.0.bias"]))
    assert_rel(proj(x, height=4, width=4), F.linear(hidden, sd["mlp.2.weight"], sd["mlp.2.bias"]))


def test_fork_mlp_and_linear_state_dicts_load_strictly():
    shapes = {"0.weight": (L, D), "0.bias": (L,), "2.weight": (L, L), "2.bias": (L,)}
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    mlp = MLPProjector(D, L, depth=2)
    mlp.load_state_dict(sd, strict=True)
    x = torch.randn(5, D)
    expected = F.linear(F.gelu(F.linear(x, sd["0.weight"], sd["0.bias"])), sd["2.weight"], sd["2.bias"])
    assert_rel(mlp(x), expected)
    linear = LinearProjector(D, L)
    linear.load_state_dict({"weight": sd["0.weight"], "bias": sd["0.bias"]}, strict=True)
    assert_rel(linear(x), F.linear(x, sd["0.weight"], sd["0.bias"]))


# -- the builder ------------------------------------------------------------------------------------------------


class _Config:  # attributes, like a transformers config
    mm_hidden_size, hidden_size = D, L

    def __init__(self, kind: str | None = None):
        if kind is not None:
            self.mm_projector_type = kind


@pytest.mark.parametrize(
    "kind, cls",
    [
        ("linear", LinearProjector),
        ("identity", IdentityProjector),
        ("patch_merger", PatchMergerProjector),
        ("spatial_merge", SpatialMergeProjector),
        ("mlp2x_gelu", MLPProjector),
        (None, LinearProjector),  # the default
    ],
)
def test_build_projector_each_name(kind, cls):
    for config in (_Config(kind), {"mm_projector_type": kind, "mm_hidden_size": D, "hidden_size": L}):
        proj = build_projector(config)
        assert type(proj) is cls
        assert proj(torch.randn(1, 16, D)).shape[-1] == (D if cls is IdentityProjector else L)


def test_build_mlp_depth_matches_fork_indices():
    proj = build_projector(_Config("mlp3x_gelu"))
    assert list(proj.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


@pytest.mark.parametrize("kind", ["pooler", "mlp0x_gelu", "MLP2x_gelu", "mlp2x_res2x_gelu"])
def test_build_projector_unknown_name(kind):
    with pytest.raises(ValueError, match=rf"mm_projector_type='{kind}'.*spatial_merge"):
        build_projector(_Config(kind))


def test_build_projector_missing_width():
    with pytest.raises(ValueError, match="hidden_size=None"):
        build_projector({"mm_projector_type": "linear", "mm_hidden_size": D})


# -- bad inputs -------------------------------------------------------------------------------------------------

spatial, merger = SpatialMergeProjector(D, L), PatchMergerProjector(D, L)
BAD = {
    "odd grid row": (lambda: spatial(torch.randn(28, D), [(1, 4, 4), (1, 3, 4)]), r"item 1 has h x w = 3 x 4.*even"),
    "odd height/width": (lambda: spatial(torch.randn(2, 15, D), height=3, width=5), r"h x w = 3 x 5.*even"),
    "odd list item": (
        lambda: spatial([torch.randn(16, D), torch.randn(6, D)], height=[4, 2], width=[4, 3]),
        r"item 1 \(6, 8\) has h x w = 2 x 3",
    ),
    "odd square": (lambda: spatial(torch.randn(1, 9, D)), r"h x w = 3 x 3.*even"),
    "not square": (lambda: spatial(torch.randn(2, 24, D)), r"24 tokens, not a square.*height= and width="),
    "height does not divide": (lambda: spatial(torch.randn(1, 20, D), height=4, width=4), r"20 tokens.*4 x 4"),
    "grid total": (lambda: spatial(torch.randn(20, D), [(1, 4, 4)]), r"grid_thw holds 16 tokens.*x has 20"),
    "zero in grid": (lambda: spatial(torch.randn(16, D), [(1, 0, 4)]), r"row 0 is \[1, 0, 4\].*positive"),
    "negative height": (lambda: spatial(torch.randn(1, 16, D), height=-4, width=-4), r"height=-4.*positive"),
    "one side only": (lambda: spatial(torch.randn(1, 16, D), height=4), r"height=4, width=None.*both"),
    "list lengths": (lambda: spatial([torch.randn(16, D)], height=[4, 4], width=4), r"height has 2 entries.*tensor, 1"),
    "width": (lambda: spatial(torch.randn(1, 16, D + 1)), rf"width {D + 1}.*mm_hidden_size={D}"),
    "rank": (lambda: spatial(torch.randn(16)), r"x \(16,\); expected \(B, N, D\)"),
    "merger batch": (lambda: merger(torch.randn(2, 6, D)), r"6 tokens.*multiple of 4"),
    "merger grid row": (lambda: merger(torch.randn(22, D), [(1, 4, 4), (1, 2, 3)]), r"item 1 .*6 tokens.*of 4"),
    "merger list item": (lambda: merger([torch.randn(8, D), torch.randn(2, 5, D)]), r"item 1 \(2, 5, 8\) has 5 tokens"),
    "empty list": (lambda: merger([]), r"empty list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_value_error_naming_the_value(case):
    call, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        call()
