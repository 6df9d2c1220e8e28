"""The checkpoint's image / video preprocessing settings: `preprocessor_config.json` and
`video_preprocessor_config.json`, read into one `PreprocessConfig`.

Owns: the keys HF's `Qwen2VLImageProcessor` and `Qwen3VLVideoProcessor` read (patch_size,
temporal_patch_size, merge_size, size.shortest_edge / longest_edge (pixel bounds; the older
min_pixels / max_pixels keys override them, as in HF), image_mean / image_std, rescale_factor,
fps, min_frames / max_frames, cap_pixels_per_frame / max_video_tokens), the values Qwen3.5
publishes (written by model_shards/tiny_checkpoint.py), and refusing settings we do not
implement (e.g. do_resize false) instead of silently ignoring them. Missing files or keys keep
the published defaults. Must not: preprocess pixels (model_shards/image_processing.py).
Tests: tests/model_shards/test_preprocessor_config.py (transformers' processors as oracle).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from model_shards.config import VisionConfig
from model_shards.image_processing import PreprocessConfig

IMAGE_FILE = "preprocessor_config.json"
VIDEO_FILE = "video_preprocessor_config.json"

# What Qwen3.5 (as Qwen3-VL) publishes; our defaults (PreprocessConfig) are these values.
QWEN35_IMAGE_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN35_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}

# Switches HF honours that we implement only one way: a file asking for the other way is refused.
_MUST_BE = {
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_sample_frames": True,
    "resample": 3,
}  # 3 = PIL bicubic


def load_preprocess_config(folder: str | Path, vision: VisionConfig) -> PreprocessConfig:
    """The preprocessing of the checkpoint in `folder` (defaults where a file or key is absent).

    Raises: ValueError naming the file and key for a malformed or unsupported value, or patch
    geometry that disagrees with the vision tower's config.
    """
    base = PreprocessConfig.for_vision(vision)
    fields: dict[str, Any] = {}
    image = _read(Path(folder) / IMAGE_FILE)
    video = _read(Path(folder) / VIDEO_FILE)
    if image is not None:
        fields.update(_common(image, IMAGE_FILE))
        lo, hi = _pixel_bounds(image, IMAGE_FILE, base.min_pixels, base.max_pixels)
        fields.update(min_pixels=lo, max_pixels=hi)
    if video is not None:
        common = _common(video, VIDEO_FILE)
        for key in ("image_mean", "image_std", "rescale_factor"):
            # one normalisation serves images and videos; Qwen's two files agree
            image_value = fields.get(key, getattr(base, key))
            if key in common and common[key] != image_value:
                raise ValueError(
                    f"{VIDEO_FILE}: {key} {common[key]} differs from the images' {image_value}; "
                    "separate image and video normalisation is not supported"
                )
        fields.update(common)
        lo, hi = _pixel_bounds(video, VIDEO_FILE, base.video_min_pixels, base.video_max_pixels)
        fields.update(video_min_pixels=lo, video_max_pixels=hi)
        if video.get("num_frames") is not None:
            raise ValueError(f"{VIDEO_FILE}: a fixed num_frames is not supported (frames are sampled at fps)")
        if "fps" in video:
            fields["fps"] = _number(video, "fps", VIDEO_FILE, positive=True)
        for key in ("min_frames", "max_frames", "max_video_tokens"):
            if key in video:
                fields[key] = _int(video, key, VIDEO_FILE)
        if video.get("cap_pixels_per_frame") is not None:
            fields["cap_pixels_per_frame"] = bool(video["cap_pixels_per_frame"])
    cfg = PreprocessConfig(**{**base.__dict__, **fields})
    for key, want in (
        ("patch_size", vision.patch_size),
        ("temporal_patch_size", vision.temporal_patch_size),
        ("merge_size", vision.spatial_merge_size),
    ):
        if getattr(cfg, key) != want:
            raise ValueError(
                f"preprocessor {key} {getattr(cfg, key)} disagrees with the vision tower's {want} "
                "(config.json vision_config)"
            )
    if cfg.min_frames > cfg.max_frames:
        raise ValueError(f"{VIDEO_FILE}: min_frames {cfg.min_frames} > max_frames {cfg.max_frames}")
    return cfg


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object")
    return data


def _common(d: dict[str, Any], name: str) -> dict[str, Any]:
    """Keys both files share: switches, patch geometry, normalisation."""
    for key, want in _MUST_BE.items():
        if key in d and d[key] is not None and d[key] != want:
            raise ValueError(f"{name}: {key} = {d[key]!r} is not supported (only {want!r})")
    out: dict[str, Any] = {}
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        if key in d:
            out[key] = _int(d, key, name)
    for key in ("image_mean", "image_std"):
        if key in d:
            v = d[key]
            v = [v] * 3 if isinstance(v, (int, float)) else v
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise ValueError(f"{name}: {key} must be 3 numbers, got {d[key]!r}")
            if key == "image_std" and any(x == 0 for x in v):
                raise ValueError(f"{name}: image_std has a zero")
            out[key] = tuple(float(x) for x in v)
    if "rescale_factor" in d:
        out["rescale_factor"] = _number(d, "rescale_factor", name, positive=True)
    return out


def _pixel_bounds(d: dict[str, Any], name: str, lo: int, hi: int) -> tuple[int, int]:
    """(min, max) pixels: size.shortest_edge / longest_edge, overridden by top-level min_pixels /
    max_pixels (HF's backward-compatible keys)."""
    size = d.get("size") or {}
    if not isinstance(size, dict):
        raise ValueError(f"{name}: size must be an object")
    for key, src in (("shortest_edge", size), ("min_pixels", size), ("min_pixels", d)):
        if src.get(key) is not None:
            lo = _int(src, key, name)
    for key, src in (("longest_edge", size), ("max_pixels", size), ("max_pixels", d)):
        if src.get(key) is not None:
            hi = _int(src, key, name)
    if lo > hi:
        raise ValueError(f"{name}: min pixels {lo} > max pixels {hi}")
    return lo, hi


def _int(d: dict[str, Any], key: str, name: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: {key} must be a positive integer, got {v!r}")
    return v


def _number(d: dict[str, Any], key: str, name: str, *, positive: bool) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name}: {key} must be a positive number, got {v!r}")
    return float(v)
