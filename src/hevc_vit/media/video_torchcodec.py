"""Video input through torchcodec (``--video-backend torchcodec``): the same uniformly sampled frames as the PyAV
path (:func:`.video.read_video`), decoded by torchcodec's ``VideoDecoder``.

torchcodec is not a dependency of this package: ``pip install torchcodec`` (its build must match the installed
torch: the wheels on PyPI are CUDA builds), and it loads the system's FFmpeg shared libraries (``libavcodec``
and the others, major versions 4 to 8), which must be installed (e.g. ``apt-get install ffmpeg``). PyAV ships its
own FFmpeg; torchcodec does not.

Frames are sampled as the PyAV path samples them: over the count the stream states (else the frames found by
scanning it, torchcodec's exact seek mode); when the file holds slightly fewer, over those; when it holds far
fewer (beyond the PyAV path's slack), it is refused as truncated.
"""

from __future__ import annotations

import functools
import os
from typing import IO

from PIL import Image

from hevc_vit.media.frames import DecodedVideo, sample_frame_indices

INSTALL_HINT = (
    "pip install torchcodec (a build matching the installed torch), and FFmpeg's shared libraries "
    "(libavcodec etc., major version 4 to 8; e.g. apt-get install ffmpeg), which torchcodec loads"
)


@functools.cache
def require_torchcodec():
    """torchcodec's ``VideoDecoder`` class; raises ``ImportError`` saying what to install when torchcodec is
    missing or cannot load (no FFmpeg libraries, a build for another torch)."""
    try:
        from torchcodec.decoders import VideoDecoder  # optional: not a dependency (see the module's docstring)
    except ImportError as e:
        raise ImportError(
            f"video_backend='torchcodec' needs torchcodec, which is not installed ({e}); {INSTALL_HINT}"
        ) from None
    except Exception as e:  # installed, but its libraries do not load: OSError, RuntimeError
        cause = f": {e.__cause__}" if e.__cause__ is not None else ""  # torch's load_library hides the dlopen error
        reason = " ".join(f"{e}{cause}".split())[:400]
        raise ImportError(
            f"video_backend='torchcodec': torchcodec is installed but cannot load ({type(e).__name__}: {reason}); "
            f"{INSTALL_HINT}; or use video_backend='pyav'"
        ) from None
    return VideoDecoder


def read_video_torchcodec(path: str | os.PathLike | IO[bytes], num_frames: int):
    """Decode ``num_frames`` uniformly sampled frames of the best video stream of ``path`` (a path, or a clip's
    bytes in a file object) with torchcodec; a :class:`.video.DecodedVideo`."""
    decoder_class = require_torchcodec()
    if hasattr(path, "read"):
        path.seek(0)
        source = path.read()
    else:
        source = os.fspath(path)
    decoder = decoder_class(source, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1)
    meta = decoder.metadata
    found = meta.num_frames_from_content if meta.num_frames_from_content is not None else meta.num_frames
    total = meta.num_frames_from_header or found  # as the PyAV path: the stated count first
    if not total or not found:
        raise ValueError("the video stream has no frames")
    wanted = sample_frame_indices(total, num_frames)
    if wanted[-1] >= found:  # sampled frames past the last one in the file
        if found < total - max(2, total // 20):
            raise ValueError(
                f"the video is truncated or damaged: its stream states {total} frames, but only {found} are in the "
                f"file (the sampled frames {wanted} need {wanted[-1] + 1})"
            )
        total = found  # the stated count was slightly off: sample again over the frames that exist
        wanted = sample_frame_indices(total, num_frames)
    batch = decoder.get_frames_at(wanted).data  # (T, H, W, 3) uint8
    frames = [Image.fromarray(frame.numpy()) for frame in batch]
    return DecodedVideo(frames, wanted, total)
