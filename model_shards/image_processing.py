"""Pixels -> the vision tower's input: decoding with limits, resizing, normalising, patchifying.

Owns: the Qwen image/video preprocessing (HF `Qwen2VLImageProcessorPil` for images,
`Qwen3VLVideoProcessor` + `Qwen3VLProcessor` timestamps for videos) with Pillow and numpy:
RGB conversion (alpha composited on white), `smart_resize` to multiples of patch * merge
within [min_pixels, max_pixels], bicubic resize, rescale 1/255, normalise with mean/std
(0.5 for Qwen3.5), rows [N, C*T*P*P] in merge-block order (t, h/m, w/m, m, m); a still image
is repeated to the temporal patch. Also the request bounds (`MediaLimits`): each violation is a
`MediaError` (a ValueError) that names the limit, which the server turns into a 400.
Must not: know token ids (model_shards/mm_positions.py) or run the tower (model_shards/vision.py).
Tests: tests/model_shards/test_vision.py (against `Qwen2VLImageProcessorPil`, and known answers).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model_shards.config import VisionConfig


class MediaError(ValueError):
    """An image or video the server refuses (a client error); the message names the limit or the problem."""


@dataclass(frozen=True)
class MediaLimits:
    """Per-request bounds, checked before any pixel is decoded where possible.

    Attributes:
        max_images: images (and videos, counted separately) one request may carry.
        max_videos: videos one request may carry.
        max_bytes: encoded size of one image or one video frame.
        max_pixels: decoded width * height of one image or frame (before resizing).
        max_frames: frames one video may keep after sampling.
        max_video_bytes: encoded size of one video file (mp4 / webm).
        max_video_seconds: duration of one video file (the larger of the container's and frames / fps).
        max_video_decoded_frames: frames a video file may hold (all are decoded to reach the sampled ones).
        max_video_decoded_pixels: width * height summed over the decoded frames of one video file.
        max_video_decode_s: wall time decoding one video file may take (a backstop for slow streams).
    """

    max_images: int = 16
    max_videos: int = 2
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    max_frames: int = 768
    max_video_bytes: int = 64 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_video_decoded_frames: int = 18000
    max_video_decoded_pixels: int = 18000 * 1920 * 1080
    max_video_decode_s: float = 60.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize and normalisation settings (HF `preprocessor_config.json` / `video_preprocessor_config.json`).

    Defaults are Qwen3.5's released files: images within [65536, 16777216] pixels, videos within
    [4096, 25165824] pixels over all frames, mean = std = 0.5 per channel, 2 frames per second
    sampled, 4 to 768 frames. `cap_pixels_per_frame` (HF's opt-in qwen-vl-utils rule, off in
    transformers 5.24 and in Qwen's files) caps each frame at min(max_video_tokens * factor^2,
    video_max_pixels / frames), floored at 1.05 * video_min_pixels.
    Read from a checkpoint by model_shards/preprocessor_config.py.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: patch * merge (32 for Qwen3.5)."""
        return self.patch_size * self.merge_size

    @staticmethod
    def for_vision(v: VisionConfig, **overrides: object) -> PreprocessConfig:
        """Patch geometry from the model's vision config, other fields default unless overridden."""
        return PreprocessConfig(
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size,
            **overrides,  # type: ignore[arg-type]  # field values
        )


@dataclass(frozen=True)
class VisionInput:
    """One preprocessed image or video.

    Attributes:
        kind: "image" or "video".
        pixel_values: [t*h*w, C*T*P*P] float32 rows in merge-block order.
        grid_thw: (t, h, w) in patches.
        timestamps: videos: seconds of each temporal patch (mean of its first and last frame).
    """

    kind: str
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...] = ()


# ------------------------------------------------------------------------------ decoding and bounds
def check_counts(*, images: int, videos: int, limits: MediaLimits) -> None:
    """Raise MediaError when a request carries more images or videos than allowed."""
    if images > limits.max_images:
        raise MediaError(f"too many images: {images} in one request, the limit (max_images) is {limits.max_images}")
    if videos > limits.max_videos:
        raise MediaError(f"too many videos: {videos} in one request, the limit (max_videos) is {limits.max_videos}")


def decode_image(data: bytes, *, limits: MediaLimits) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) after checking size limits.

    The pixel count is read from the header before decoding (no decompression bomb is expanded).
    Raises: MediaError (too many bytes, too many pixels, not an image).
    """
    if len(data) > limits.max_bytes:
        raise MediaError(f"image is {len(data)} bytes, the limit (max_bytes) is {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own guard, far above any sane max_pixels
        raise MediaError(f"image has too many pixels, the limit (max_pixels) is {limits.max_pixels}: {exc}") from exc
    except OSError as exc:
        raise MediaError(f"not a decodable image: {exc}") from exc
    check_pixels(image.size, limits=limits)
    try:
        image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise MediaError(f"image data is corrupt: {exc}") from exc
    return image


def check_pixels(size: tuple[int, int], *, limits: MediaLimits) -> None:
    """Raise MediaError when width * height exceeds `limits.max_pixels`."""
    w, h = size
    if w * h > limits.max_pixels:
        raise MediaError(f"image is {w}x{h} = {w * h} pixels, the limit (max_pixels) is {limits.max_pixels}")


def to_rgb(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8. Images with alpha (or a transparent palette colour) are composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------ resize rules
def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Rule (HF `smart_resize`): round each side to the nearest multiple; if the area is too large,
    scale both by beta = sqrt(h*w / max_pixels) and round down (at least `factor`); if too small,
    scale by sqrt(min_pixels / (h*w)) and round up.
    Raises: MediaError for an aspect ratio above 200 or a side that rounds to zero.
    """
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is above the limit of 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        raise MediaError(
            f"image of {height}x{width} is too small for a {factor}-pixel grid with min_pixels {min_pixels}"
        )
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int, height: int, width: int, *, factor: int, temporal_factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Target frame (height, width) of a video (HF Qwen3-VL video rule): frames smaller than
    `factor` are first scaled up to it; the pixel bounds apply to frames * height * width, with the
    frame count rounded to a multiple of `temporal_factor` for the rounding step only."""
    if num_frames < temporal_factor:
        raise MediaError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"video aspect ratio {max(height, width) / min(height, width):.1f} is above the limit of 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ------------------------------------------------------------------------------ pixels
def resize_and_normalize(rgb: np.ndarray, *, size: tuple[int, int], cfg: PreprocessConfig) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, h, w] float32: bicubic resize (Pillow) to `size` = (h, w), then
    x * rescale_factor (in float64, stored float32), then (x - mean) / std per channel in float32."""
    h, w = size
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def patchify(frames_FCHW: np.ndarray, *, cfg: PreprocessConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Frames -> tower rows. F must be a multiple of the temporal patch T.

    Row order (gt, h/m, w/m, m, m); each row is (C, T, P, P) flattened: the T frames of one
    temporal patch at one spatial patch.
    Returns: pixel_values [gt*gh*gw, C*T*P*P] float32 and grid (gt, gh, gw).
    """
    f, c, height, width = frames_FCHW.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    assert f % tp == 0 and height % (p * m) == 0 and width % (p * m) == 0, (f, height, width)
    gt, gh, gw = f // tp, height // p, width // p
    x = frames_FCHW.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, bh, bw, ih, iw, C, T, P, P)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def preprocess_image(image: Image.Image, *, cfg: PreprocessConfig) -> VisionInput:
    """One still image -> a VisionInput with grid (1, h, w); the frame is repeated T times."""
    rgb = to_rgb(image)
    size = smart_resize(
        rgb.shape[0], rgb.shape[1], factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    frame = resize_and_normalize(rgb, size=size, cfg=cfg)
    pixels, grid = patchify(np.repeat(frame[None], cfg.temporal_patch_size, axis=0), cfg=cfg)
    return VisionInput("image", pixels, grid)


def preprocess_images(
    images: Sequence[Image.Image], *, cfg: PreprocessConfig, limits: MediaLimits
) -> list[VisionInput]:
    """Several images of one request (count checked against `limits`)."""
    check_counts(images=len(images), videos=0, limits=limits)
    for im in images:
        check_pixels(im.size, limits=limits)
    return [preprocess_image(im, cfg=cfg) for im in images]


# ------------------------------------------------------------------------------ video
def sample_frame_indices(
    total_frames: int, *, video_fps: float, cfg: PreprocessConfig, num_frames: int | None = None
) -> list[int]:
    """Which source frames to keep (HF Qwen3-VL `sample_frames`): `num_frames` if given, else
    total / video_fps * cfg.fps clamped to [min_frames, min(max_frames, total)]; spread evenly
    over [0, total - 1] and rounded."""
    if total_frames < 1:
        raise MediaError("a video needs at least one frame")
    if num_frames is None:
        n = int(total_frames / video_fps * cfg.fps)
        num_frames = min(max(n, cfg.min_frames), cfg.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()


def frame_timestamps(indices: Sequence[int], *, video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: frames grouped by T (the last repeated to fill a group),
    timestamp = mean of the group's first and last frame times (index / video_fps)."""
    idx = list(indices)
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    secs = [i / video_fps for i in idx]
    return [(secs[i] + secs[i + temporal_patch_size - 1]) / 2 for i in range(0, len(secs), temporal_patch_size)]


def preprocess_video(
    frames: Sequence[Image.Image],
    *,
    video_fps: float,
    cfg: PreprocessConfig,
    limits: MediaLimits,
    num_frames: int | None = None,
) -> VisionInput:
    """A video given as its decoded frames (all of them, at `video_fps`) -> one VisionInput.

    Frames are sampled (`sample_frame_indices`), then preprocessed by `preprocess_sampled_video`.
    Raises: MediaError (no frames, too many frames kept, frame sizes differ, pixel limits).
    """
    if not frames:
        raise MediaError("a video needs at least one frame")
    if video_fps <= 0:
        raise MediaError(f"video fps must be positive, got {video_fps}")
    indices = sample_frame_indices(len(frames), video_fps=video_fps, cfg=cfg, num_frames=num_frames)
    if len(indices) > limits.max_frames:
        raise MediaError(f"video keeps {len(indices)} frames, the limit (max_frames) is {limits.max_frames}")
    return preprocess_sampled_video([frames[i] for i in indices], indices, video_fps=video_fps, cfg=cfg, limits=limits)


def video_max_pixels(num_frames: int, cfg: PreprocessConfig) -> int:
    """Pixel budget of all frames together (HF Qwen3VLVideoProcessor.resize, with its optional per-frame cap)."""
    if not cfg.cap_pixels_per_frame:
        return cfg.video_max_pixels
    frame_cap = cfg.max_video_tokens * cfg.factor * cfg.factor
    per_frame = max(min(frame_cap, cfg.video_max_pixels // num_frames), int(cfg.video_min_pixels * 1.05))
    return per_frame * num_frames


def preprocess_sampled_video(
    frames: Sequence[Image.Image],
    indices: Sequence[int],
    *,
    video_fps: float,
    cfg: PreprocessConfig,
    limits: MediaLimits,
) -> VisionInput:
    """The kept frames of a video (frame `indices[i]` of the source at `video_fps`) -> one VisionInput.

    Frames are resized together (`smart_resize_video`, Pillow bicubic), normalised, padded to a
    multiple of T by repeating the last, and patchified; the timestamps are those the prompt
    carries (`frame_timestamps`).

    Warning: HF resizes video frames with torchvision's bicubic (antialiased tensor resize), not
    Pillow's, so pixel values differ slightly from HF's video processor; the geometry is the same.
    Raises: MediaError (no frames, too many frames, frame sizes differ, pixel limits).
    """
    if not frames or len(frames) != len(indices):
        raise MediaError("a video needs at least one frame")
    if len(frames) > limits.max_frames:
        raise MediaError(f"video keeps {len(frames)} frames, the limit (max_frames) is {limits.max_frames}")
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise MediaError(f"video frames differ in size: {sorted(sizes)}")
    check_pixels(frames[0].size, limits=limits)
    rgb = [to_rgb(f) for f in frames]
    size = smart_resize_video(
        len(rgb),
        rgb[0].shape[0],
        rgb[0].shape[1],
        factor=cfg.factor,
        temporal_factor=cfg.temporal_patch_size,
        min_pixels=cfg.video_min_pixels,
        max_pixels=video_max_pixels(len(rgb), cfg),
    )
    stack = [resize_and_normalize(x, size=size, cfg=cfg) for x in rgb]
    stack += [stack[-1]] * (-len(stack) % cfg.temporal_patch_size)
    pixels, grid = patchify(np.stack(stack), cfg=cfg)
    ts = frame_timestamps(indices, video_fps=video_fps, temporal_patch_size=cfg.temporal_patch_size)
    return VisionInput("video", pixels, grid, tuple(ts))
