"""Video frames for BLIP's zero-shot video tasks (the BLIP paper's section 5.6; Salesforce BLIP
``data/video_dataset.py``; docs/blip-finetune.md): ``n`` frames sampled from a video (8 for text-video retrieval,
16 for video QA), each through the image transform, their ViT tokens then concatenated as one image input
(:func:`blipfast.models.blip_finetune.video_tokens`).

A video is a folder of frames (image files, in the order of their sorted names) or a video file decoded with PyAV
(``pip install 'blipfast[video]'``; :func:`read_frames` says so when it is missing).

Frame sampling (:func:`sample_frame_indices`) is BLIP's: ``"uniform"`` is ``np.arange(0, vlen, vlen / n,
dtype=int)`` verbatim, which numpy evaluates as ``i * int(vlen / n)`` (the first step truncated, then repeated):
37 frames give 0, 2, ..., 30, not frames spread over the whole video, and a video shorter than ``n`` frames gives
frame 0 ``n`` times; ``"rand"``: ``n`` distinct sorted frames at random; ``"headtail"``: half from each half.
BLIP decodes with decord resized to 384 x 384 by FFmpeg's scaler; here each frame goes through the model's image
transform (a bicubic resize with PIL), so pixel values can differ slightly from BLIP's.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np

from .vision import ImageReadError, load_image

__all__ = ["IMAGE_EXTENSIONS", "STRATEGIES", "VIDEO_EXTENSIONS", "check_video", "list_frames", "read_frames",
           "sample_frame_indices", "video_length"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
STRATEGIES = ("uniform", "rand", "headtail")


def sample_frame_indices(num_total: int, num_frames: int, strategy: str = "uniform",
                         rng: Optional[random.Random] = None) -> list:
    """The indices of the ``num_frames`` frames BLIP's ``_load_video_from_path_decord`` reads from a video of
    ``num_total`` frames (see the module docstring); ``rng``: the generator of the random strategies."""
    for name, v in (("num_total", num_total), ("num_frames", num_frames)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"sample_frame_indices: {name} must be a positive int, got {v!r}")
    if strategy == "uniform":
        return [int(i) for i in np.arange(0, num_total, num_total / num_frames, dtype=int)]
    rng = rng or random.Random()
    if strategy == "rand":
        if num_total < num_frames:
            raise ValueError(f"sample_frame_indices: 'rand' needs at least {num_frames} frames, the video has "
                             f"{num_total}")
        return sorted(rng.sample(range(num_total), num_frames))
    if strategy == "headtail":
        half = num_total // 2
        if half < num_frames // 2 or num_total - half < num_frames // 2:
            raise ValueError(f"sample_frame_indices: 'headtail' needs {num_frames // 2} frames in each half, the "
                             f"video has {num_total}")
        return sorted(rng.sample(range(half), num_frames // 2)) + sorted(rng.sample(range(half, num_total),
                                                                                    num_frames // 2))
    raise ValueError(f"sample_frame_indices: strategy must be one of {STRATEGIES}, got {strategy!r}")


def list_frames(folder: str) -> list:
    """The image files of a frame folder, sorted by name."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ImageReadError(f"video {folder!r}: the folder holds no frame images ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def _av():
    try:
        import av
    except ImportError:
        raise ImageReadError("reading video files needs PyAV: pip install 'blipfast[video]' (or give folders of "
                             "frames)") from None
    return av


def check_video(path, where: str) -> None:
    """A video input: a folder of frames or a video file (PyAV needed for the latter); ValueError naming ``where``
    (the row or gallery item) before any model loads."""
    path = Path(path)
    if path.is_dir():
        return
    if not (path.is_file() and path.name.lower().endswith(VIDEO_EXTENSIONS)):
        state = "is missing" if not path.exists() else "is neither a folder of frames nor a video file"
        raise ValueError(f"--images: {path} {state} (the video of {where}; --video reads folders of frames or "
                         f"{', '.join(VIDEO_EXTENSIONS)} files)")
    try:
        _av()  # PyAV missing: its install advice now, not after the model loaded
    except ValueError as e:
        raise ValueError(f"{e} (the video {path} of {where})") from None


def _decode(path: str, keep=None):
    """(frame count, {index: PIL image} of the frames in ``keep``) of a video file, decoded with PyAV."""
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageReadError(f"video {path!r} has no video stream")
            got, n = {}, 0
            for frame in container.decode(video=0):
                if keep is not None and n in keep:
                    got[n] = frame.to_image().convert("RGB")
                n += 1
            return n, got
    except ImageReadError:
        raise
    except Exception as exc:  # PyAV raises its own errors (av.error.*) for unreadable files
        raise ImageReadError(f"cannot decode video {path!r}: {exc}") from None


def video_length(path: str) -> int:
    """The number of frames of a video (a frame folder or a video file)."""
    if os.path.isdir(path):
        return len(list_frames(path))
    return _decode(path)[0]


def read_frames(path: str, num_frames: int, strategy: str = "uniform", rng: Optional[random.Random] = None) -> list:
    """``num_frames`` PIL images (RGB) of the video at ``path`` (a folder of frames or a video file), sampled by
    :func:`sample_frame_indices`. Raises :class:`~blipfast.data.ImageReadError` for what cannot be read."""
    if os.path.isdir(path):
        files = list_frames(path)
        return [load_image(files[i]) for i in sample_frame_indices(len(files), num_frames, strategy, rng)]
    if not os.path.isfile(path):
        raise ImageReadError(f"video {path!r} does not exist")
    n, _ = _decode(path)
    if n == 0:
        raise ImageReadError(f"video {path!r} has no frames")
    idx = sample_frame_indices(n, num_frames, strategy, rng)
    _, got = _decode(path, set(idx))
    return [got[i] for i in idx]
