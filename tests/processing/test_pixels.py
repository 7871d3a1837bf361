"""EXIF orientation: encode's loader turns images upright as transformers' ``load_image`` does (the specification
here is ``PIL.ImageOps.exif_transpose`` on the decoded image), also when the JPEG is decoded at draft scale."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from hevc_vit.cli import build_parser
from hevc_vit.encode import encode
from hevc_vit.encode.decode.item import LoadOptions
from hevc_vit.encode.decode.load import load_item
from hevc_vit.processing.pixels import ORIENTATION_TAG, draft_jpeg, exif_orientation, turn_upright, upright_size
from hevc_vit.processing.processors import NativeResolutionProcessor

PROCESSOR = NativeResolutionProcessor(patch_size=14, min_tokens=16, max_tokens=64)
# 1 level of 255 in normalised units is about 1 / (255 · std) <= 0.0146 (CLIP std >= 0.261)
LEVEL = 1 / (255 * 0.2613)


def _picture(width: int = 1001, height: int = 611) -> Image.Image:
    """Textured, and not symmetric under any flip or turn; sides not multiples of 8 (the draft box matters)."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_turned_box_covers_the_same_pixels(orientation):
    """Every pixel centre, moved by the box rule, lands on the same pixel of PIL's transposed image."""
    image = Image.fromarray(np.arange(5 * 3, dtype=np.uint8).reshape(3, 5))  # W 5, H 3, every value once
    turned, _ = turn_upright(image, orientation)
    pixels = np.asarray(turned)
    for y in range(3):
        for x in range(5):
            box = (x + 0.25, y + 0.25, x + 0.75, y + 0.75)  # a small box around the centre of (x, y)
            _, (x0, y0, x1, y1) = turn_upright(image, orientation, box)
            assert pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)] == y * 5 + x
    assert turned.size[::-1] == upright_size(3, 5, orientation)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_loader_turns_images_upright_as_exif_transpose_does(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(_jpeg_with_orientation(_picture(), orientation))
    decoded = Image.open(path)
    decoded.load()
    assert exif_orientation(Image.open(path)) == orientation
    full = LoadOptions(PROCESSOR, 14, jpeg_draft=False)
    item = load_item(0, str(path), full)
    expected, grid = PROCESSOR.patchify(ImageOps.exif_transpose(decoded), 14)
    assert torch.equal(item.float_patches(), expected) and item.grid_thw == grid
    turned = orientation >= 5
    assert item.info["size"] == ([611, 1001] if turned else [1001, 611])  # the upright image's width, height
    assert item.info.get("exif_orientation", 1) == orientation
    as_stored = load_item(0, str(path), LoadOptions(PROCESSOR, 14, jpeg_draft=False, exif_transpose=False))
    assert torch.equal(as_stored.float_patches(), PROCESSOR.patchify(decoded, 14)[0])
    assert as_stored.info == {"size": [1001, 611]}
    assert torch.equal(as_stored.float_patches(), item.float_patches()) == (orientation == 1)


@pytest.mark.parametrize("orientation", [2, 6, 7, 8])
@pytest.mark.parametrize(
    "fmt, kwargs", [("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("PNG", {}), ("WEBP", {"lossless": True})]
)
def test_other_formats_turn_as_exif_transpose_does(tmp_path, orientation, fmt, kwargs):
    """Pillow turns a TIFF itself as it loads it (and drops the tag): turned once, not twice."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    path = tmp_path / f"o.{fmt.lower()}"
    _picture(101, 61).save(path, fmt, exif=exif, **kwargs)
    item = load_item(0, str(path), LoadOptions(PROCESSOR, 14))
    expected, grid = PROCESSOR.patchify(ImageOps.exif_transpose(Image.open(path)), 14)
    assert torch.equal(item.float_patches(), expected) and item.grid_thw == grid
    assert item.info["size"] == ([61, 101] if orientation >= 5 else [101, 61])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_decode_of_a_turned_jpeg_keeps_the_picture_in_place(tmp_path, orientation):
    """Against the draft decode resized as stored, then turned: flips give the same pixels; turns resize in the
    other pass order (measured: at most 4.1 levels). A box left unturned moves the picture (measured: 29 to 91)."""
    path = tmp_path / "o.jpg"
    path.write_bytes(_jpeg_with_orientation(_picture(), orientation))
    ours = load_item(0, str(path), LoadOptions(PROCESSOR, 14)).float_patches()
    image = Image.open(path)
    H, W = PROCESSOR.output_size(*upright_size(image.height, image.width, orientation))
    stored_h, stored_w = upright_size(H, W, orientation)
    box = draft_jpeg(image, (stored_h, stored_w))
    assert box is not None and box[2] % 1 != 0  # decoded at 1/4 scale, the box cuts a reduced pixel
    resized, _ = turn_upright(image.resize((stored_w, stored_h), resample=PROCESSOR.resample, box=box), orientation)
    reference = PROCESSOR.patchify(resized, 14)[0]
    bound = 0 if orientation < 5 else 6 * LEVEL
    assert (ours - reference).abs().max().item() <= bound + 1e-6


def test_encode_records_exif_transpose_and_resume_refuses_a_change(tmp_path, model):
    (tmp_path / "a.jpg").write_bytes(_jpeg_with_orientation(_picture(300, 200), 6))
    options = dict(model=model, workers=0, min_image_tokens=4, max_image_tokens=16, progress=False, log=lambda s: None)
    out = tmp_path / "out"
    encode([tmp_path / "a.jpg"], out, **options)
    assert json.loads((out / "encode_config.json").read_text())["exif_transpose"] is True
    (row,) = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert row["size"] == [200, 300] and row["exif_orientation"] == 6
    with pytest.raises(ValueError, match="exif_transpose: earlier True, now False"):
        encode([tmp_path / "a.jpg"], out, resume=True, exif_transpose=False, **options)
    assert build_parser().parse_args(["encode", "x", "--exif-transpose", "off"]).exif_transpose is False
