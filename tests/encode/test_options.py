"""The options of a run on their own (:mod:`hevc_vit.encode.options`): each field checked on construction, the
rules between fields, the derived values, a checked copy, what the config records."""

from __future__ import annotations

import dataclasses

import pytest

from hevc_vit.encode.options import EncodeOptions, recorded_options


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_tokens": 0}, "max_tokens=0; expected "),
        ({"workers": -1}, "workers=-1; expected "),
        ({"pool": "max"}, "pool='max'; expected "),
        ({"resume": "yes"}, "resume='yes'; expected true or false"),
        ({"min_image_tokens": 64, "max_image_tokens": 16}, "min_image_tokens=64 and max_image_tokens=16"),
        ({"frames": 8, "temporal_context": 4}, "temporal_context=4; expected an integer of at least frames=8"),
        ({"codec_preview_dir": "p"}, "codec_preview_dir was given without codec_sparse"),
        ({"ray_address": "auto"}, "ray_address was given with engine='local'"),
        ({"resume": True, "overwrite": True}, "resume and overwrite were both given"),
        ({"output_format": "npy-parquet", "pool": "none"}, "output_format='npy-parquet' with pool='none'"),
        ({"normalize": True, "pool": "none"}, "normalize with pool='none'"),
        ({"output_format": "parquet", "storage_dtype": "bfloat16"}, "storage_dtype='bfloat16' with output_format="),
    ],
)
def test_a_bad_value_or_combination_is_refused_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EncodeOptions(**overrides)


def test_derived_values():
    options = EncodeOptions()
    assert (options.video_frames, options.stores_pooled_only, options.normalizes) == (8, False, False)
    assert EncodeOptions(codec_sparse=True).video_frames == 64 and EncodeOptions(frames=3).video_frames == 3
    assert EncodeOptions(output_format="clip-retrieval").normalizes
    assert EncodeOptions(output_format="npy-parquet").stores_pooled_only
    assert EncodeOptions(pooled_only=True).stores_pooled_only


def test_replace_checks_the_copy_and_names_unknown_options():
    options = EncodeOptions(max_tokens=100)
    copy = options.replace(workers=2)
    assert (copy.max_tokens, copy.workers, options.workers) == (100, 2, None)
    with pytest.raises(TypeError, match=r"unknown encode options \['max_token'\]; expected some of: model, "):
        options.replace(max_token=3)
    with pytest.raises(ValueError, match="max_tokens=0"):
        options.replace(max_tokens=0)


def test_say_goes_to_the_log_else_to_stderr(capsys):
    said = []
    EncodeOptions(log=said.append).say("hello")
    assert said == ["hello"]
    EncodeOptions().say("to stderr")
    assert capsys.readouterr().err == "to stderr\n"


def test_recorded_options_are_the_fields_marked_so():
    fields = {f.name: f.metadata["record"] for f in dataclasses.fields(EncodeOptions)}
    assert recorded_options() == tuple(name for name, how in fields.items() if how)
    compared, noted = recorded_options("compare"), recorded_options("note")
    assert set(compared) | set(noted) == set(recorded_options()) and not set(compared) & set(noted)
    assert "model" in compared and "workers" not in recorded_options()  # workers do not change the features
