"""Video files (mp4 / webm) -> the frames the model sees: PyAV (FFmpeg) decoding under limits.

Owns: the allow-list of containers and codecs, the bounds of one decode (bytes, duration, frames,
decoded pixels, wall time: each a MediaError naming the limit), and frame sampling as HF's
Qwen3-VL video processor does it (total frames and the stream's average rate -> indices, via
model_shards.image_processing.sample_frame_indices), keeping only the sampled frames in memory.
A video decoder is attack surface: the container is recognised from its magic bytes and opened
with that demuxer only (FFmpeg never probes, so playlists, concat lists or image sequences that
name other files cannot be opened), from memory (no protocol, no file access; mp4 external data
references off), and only the listed codecs are decoded.
PyAV is optional (the `video` extra): without it, a MediaError says the server lacks it.
Must not: resize or normalise (model_shards/image_processing.py), fetch bytes (replicas/api/media.py).
Tests: tests/replicas/test_multimodal.py (served), tests/model_shards/test_video_decode.py.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from model_shards.image_processing import MediaError, MediaLimits, PreprocessConfig, sample_frame_indices

# Containers by magic bytes -> the FFmpeg demuxer used. ISO BMFF (mp4 / mov): a box size, then
# "ftyp" (files that do not start with ftyp are refused: every muxer of the last 15 years writes it).
# Matroska's EBML magic covers WebM (a Matroska profile; one demuxer reads both).
ALLOWED_CONTAINERS = {"mp4": "ISO BMFF (mp4, mov)", "matroska": "WebM / Matroska"}
# The codecs web video uses, decoded by FFmpeg's most-used, most-fuzzed decoders; everything else
# (mpeg4 part 2, mjpeg, raw video, legacy codecs) is refused to keep the decoder surface small.
ALLOWED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})
NO_PYAV = (
    "video files need the server's `video` extra (PyAV: pip install 'epserve[video]'), which this "
    "server lacks; send the video as a list of frames instead"
)


@dataclass(frozen=True)
class DecodedVideo:
    """The sampled frames of a video file.

    Attributes:
        frames: RGB frames at `indices`, in order.
        indices: their frame numbers in the file (0-based, presentation order).
        total_frames: frames the file holds.
        fps: the video stream's average frame rate (timestamps are index / fps, as in HF).
        container, codec: what was decoded (e.g. "mp4", "h264").
    """

    frames: list[Image.Image]
    indices: list[int]
    total_frames: int
    fps: float
    container: str
    codec: str


def sniff_container(data: bytes) -> str:
    """The allowed container `data` is in, from its magic bytes. Raises: MediaError otherwise."""
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    allowed = ", ".join(ALLOWED_CONTAINERS.values())
    raise MediaError(f"video: the container is not an allowed one (allowed containers: {allowed})")


def decode_video(
    data: bytes, *, cfg: PreprocessConfig, limits: MediaLimits, sample_fps: float | None = None
) -> DecodedVideo:
    """Decode a video file and keep the frames HF's sampling picks at `sample_fps` (default cfg.fps).

    Raises: MediaError (no PyAV, a limit exceeded, a container or codec not allowed, undecodable).
    """
    if sample_fps is not None and not (math.isfinite(sample_fps) and sample_fps > 0):
        raise MediaError(f"video fps must be a positive number, got {sample_fps}")
    try:
        import av
    except ImportError:
        raise MediaError(NO_PYAV) from None
    if len(data) > limits.max_video_bytes:
        raise MediaError(f"video is {len(data)} bytes, the limit (max_video_bytes) is {limits.max_video_bytes}")
    fmt = sniff_container(data)
    deadline = time.monotonic() + limits.max_video_decode_s
    try:
        codec, total, fps = _scan(av, data, fmt, limits, deadline)
        pick = replace(cfg, fps=sample_fps) if sample_fps is not None else cfg
        indices = sample_frame_indices(total, video_fps=fps, cfg=pick)
        if len(indices) > limits.max_frames:  # refused before any frame is decoded and kept
            raise MediaError(f"video keeps {len(indices)} frames, the limit (max_frames) is {limits.max_frames}")
        frames, decoded = _decode(av, data, fmt, set(indices), limits, deadline)
        if decoded != total:
            # the container's packet count was not the frame count: sample again on what decodes
            total = decoded
            indices = sample_frame_indices(total, video_fps=fps, cfg=pick)
            frames, _ = _decode(av, data, fmt, set(indices), limits, deadline)
    except av.FFmpegError as exc:
        raise MediaError(f"video: not decodable as {ALLOWED_CONTAINERS[fmt]}: {exc}") from None
    return DecodedVideo([frames[i] for i in indices], indices, total, fps, fmt, codec)


def _open(av: Any, data: bytes, fmt: str) -> Any:  # noqa: ANN401  # PyAV's container
    # fixed demuxer (no probing); enable_drefs 0: never follow mp4 references to other files
    return av.open(io.BytesIO(data), mode="r", format=fmt, options={"enable_drefs": "0"})


def _stream(container: Any) -> Any:  # noqa: ANN401
    streams = list(container.streams.video)
    if not streams:
        raise MediaError("video: the file has no video stream")
    return streams[0]


def _check_time(deadline: float, limits: MediaLimits) -> None:
    if time.monotonic() > deadline:
        raise MediaError(
            f"video: decoding took longer than the limit (max_video_decode_s) of {limits.max_video_decode_s} s"
        )


def _scan(av: Any, data: bytes, fmt: str, limits: MediaLimits, deadline: float) -> tuple[str, int, float]:  # noqa: ANN401
    """Codec, frame count and frame rate from the container and its packets (nothing decoded)."""
    with _open(av, data, fmt) as container:
        stream = _stream(container)
        ctx = stream.codec_context
        codec = ctx.codec.canonical_name
        if codec not in ALLOWED_CODECS:
            raise MediaError(
                f"video: codec {codec!r} is not allowed (allowed codecs: {', '.join(sorted(ALLOWED_CODECS))})"
            )
        if ctx.width * ctx.height > limits.max_pixels:
            raise MediaError(
                f"video frames are {ctx.width}x{ctx.height} = {ctx.width * ctx.height} pixels, "
                f"the limit (max_pixels) is {limits.max_pixels}"
            )
        rate = stream.average_rate or stream.guessed_rate
        if not rate or float(rate) <= 0:
            raise MediaError("video: the stream has no frame rate")
        fps = float(rate)
        declared = container.duration / 1e6 if container.duration else 0.0  # AV_TIME_BASE units
        _check_seconds(declared, limits)
        total = 0
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            total += 1
            if total > limits.max_video_decoded_frames:
                raise MediaError(
                    f"video has more than {limits.max_video_decoded_frames} frames, the limit "
                    "(max_video_decoded_frames)"
                )
            _check_time(deadline, limits)
        if total == 0:
            raise MediaError("video: the file has no frames")
        _check_seconds(total / fps, limits)
        return codec, total, fps


def _check_seconds(seconds: float, limits: MediaLimits) -> None:
    if seconds > limits.max_video_seconds:
        raise MediaError(
            f"video is {seconds:.1f} s long, the limit (max_video_seconds) is {limits.max_video_seconds} s"
        )


def _decode(
    av: Any,  # noqa: ANN401
    data: bytes,
    fmt: str,
    wanted: set[int],
    limits: MediaLimits,
    deadline: float,
) -> tuple[dict[int, Image.Image], int]:
    """Decode every frame (presentation order), keep those numbered in `wanted` as RGB images."""
    kept: dict[int, Image.Image] = {}
    n = pixels = 0
    with _open(av, data, fmt) as container:
        for frame in container.decode(_stream(container)):
            area = frame.width * frame.height
            if area > limits.max_pixels:
                raise MediaError(
                    f"video frames are {frame.width}x{frame.height} = {area} pixels, the limit "
                    f"(max_pixels) is {limits.max_pixels}"
                )
            pixels += area
            if pixels > limits.max_video_decoded_pixels:
                raise MediaError(
                    f"video decodes to more than {limits.max_video_decoded_pixels} pixels over its "
                    "frames, the limit (max_video_decoded_pixels)"
                )
            if n >= limits.max_video_decoded_frames:
                raise MediaError(
                    f"video has more than {limits.max_video_decoded_frames} frames, the limit "
                    "(max_video_decoded_frames)"
                )
            if n in wanted:
                kept[n] = frame.to_image()  # RGB24 through swscale
            n += 1
            _check_time(deadline, limits)
    if n == 0:
        raise MediaError("video: no frame could be decoded")
    return kept, n
