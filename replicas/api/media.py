"""Images and videos of chat requests: fetching (no network), limits, preprocessing, prompt expansion.

Owns: reading OpenAI content parts (`image_url` / `video_url`) from `data:` base64 URLs or from files
under one allow-listed local folder (never the internet), bounds per request (count, bytes,
pixels, frames: each a 400 naming the limit), video files decoded by model_shards.video_decode,
preprocessing through model_shards.image_processing (settings read from the checkpoint),
and turning the template's one-pad-per-item prompt into the model's prompt with 3-D MRoPE positions
(model_shards.mm_positions). Must not: run the vision tower (trunk ranks do).
Tests: tests/replicas/test_multimodal.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_shards.config import ModelConfig
from model_shards.image_processing import (
    MediaError,
    MediaLimits,
    PreprocessConfig,
    VisionInput,
    check_counts,
    decode_image,
    preprocess_image,
    preprocess_sampled_video,
    preprocess_video,
)
from model_shards.mm_positions import VisionItem, VisionTokenIds, expand_placeholders, mrope_positions, token_types
from model_shards.video_decode import decode_video

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
DEFAULT_VIDEO_FPS = 2.0


@dataclass(frozen=True)
class MultimodalPrompt:
    """What the engine and trunk ranks need for a prompt with images or videos.

    Attributes:
        inputs: preprocessed items in prompt order (pixel_values [N, C*T*P*P] + grid).
        positions: [3, P] MRoPE positions of the whole prompt.
        rope_delta: decode position offset (position of token c = c + rope_delta).
        pad_ids: the image and video pad token ids (rows that take vision embeddings).
        content_keys: per item, in prompt order: (a 62-bit hash of its pixels, grid, kind and timestamps; the
            number of pad rows it takes). The prefix cache keys a prompt by its token ids with each pad row
            replaced by a value derived from its item's hash, so two prompts share a cached prefix only where
            their images are the same. Empty: the prompt is not cached.
    """

    inputs: tuple[VisionInput, ...]
    positions: torch.Tensor
    rope_delta: int
    pad_ids: tuple[int, int]
    content_keys: tuple[tuple[int, int], ...] = ()

    def cache_key(self, prompt_ids: tuple[int, ...] | list[int]) -> tuple[int, ...] | None:
        """The prompt as the prefix cache sees it: token ids, each pad row a negative value of (item hash, offset
        in the item) (never a token id), or None when the items carry no content keys."""
        if not self.content_keys:
            return None
        pads = set(self.pad_ids)
        keys: list[int] = []
        item, offset = 0, 0
        for t in prompt_ids:
            if t not in pads:
                keys.append(t)
                continue
            if item >= len(self.content_keys):
                return None  # more pad rows than the items take: not a prompt this reader built
            digest, rows = self.content_keys[item]
            keys.append(-1 - ((digest + offset * 0x9E3779B97F4A7C15) & ((1 << 62) - 1)))
            offset += 1
            if offset == rows:
                item, offset = item + 1, 0
        return tuple(keys)


class MediaReader:
    """Turns content parts into VisionInputs under the request limits.

    Args:
        cfg: the model config (needs a vision tower).
        limits: per-request bounds.
        local_root: folder whose files requests may name (file:// URLs or absolute paths); None = none.
        pre: the checkpoint's preprocessing (model_shards.preprocessor_config); None = Qwen3.5's defaults.
    """

    def __init__(
        self, cfg: ModelConfig, *, limits: MediaLimits, local_root: str | None, pre: PreprocessConfig | None = None
    ) -> None:
        if cfg.vision is None:
            raise ValueError("this model has no vision tower")
        self.cfg = cfg
        self.tokens = VisionTokenIds.from_config(cfg)
        self.pre = pre or PreprocessConfig.for_vision(cfg.vision)
        self.limits = limits
        self.root = Path(local_root).resolve() if local_root else None

    # ----------------------------------------------------------------- fetching
    def _bytes(self, url: str, what: str, *, limit: tuple[int, str] | None = None) -> bytes:
        """The bytes a data: URL or an allowed local file holds, at most `limit` = (bytes, its name)."""
        most, name = limit or (self.limits.max_bytes, "max_bytes")
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            if ";base64" not in head:
                raise MediaError(f"{what}: only base64 data URLs are accepted")
            if len(payload) * 3 // 4 > most:
                raise MediaError(f"{what} is over {most} bytes ({name})")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MediaError(f"{what}: invalid base64 data: {exc}") from None
        path = self._local(url, what)
        if path.is_file() and path.stat().st_size > most:
            raise MediaError(f"{what} is over {most} bytes ({name})")
        return path.read_bytes()

    def _local(self, url: str, what: str) -> Path:
        if url.startswith(("http://", "https://")):
            raise MediaError(f"{what}: fetching from the network is disabled; send a data: URL")
        if self.root is None:
            raise MediaError(f"{what}: local files are not allowed on this server (no allowed_local_media_path)")
        path = Path(url.removeprefix("file://")).resolve()
        if self.root != path and self.root not in path.parents:
            raise MediaError(f"{what}: {path} is outside the allowed media folder")
        if not path.exists():
            raise MediaError(f"{what}: {path} does not exist")
        return path

    def image(self, url: str) -> VisionInput:
        return preprocess_image(decode_image(self._bytes(url, "image"), limits=self.limits), cfg=self.pre)

    def video(self, spec: dict[str, Any]) -> VisionInput:
        """A video given as a file (mp4 / webm: a data: URL or an allowed local file; `fps` = sampling rate),
        a folder of frames (allow-listed) or a list of frame URLs (`fps` = the rate of the given frames)."""
        fps = _fps(spec.get("fps", DEFAULT_VIDEO_FPS))
        frames_urls = spec.get("frames")
        if frames_urls is None:
            url = str(spec.get("url", ""))
            if url.startswith("data:") or not self._local(url, "video").is_dir():
                # a video file: `fps` is the sampling rate (default: the checkpoint's)
                return self.video_file(url, sample_fps=fps if "fps" in spec else None)
            folder = self._local(url, "video")
            frames_urls = [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not isinstance(frames_urls, list) or not frames_urls:
            raise MediaError("video: no frames")
        if len(frames_urls) > self.limits.max_frames * 4:
            raise MediaError(f"video: {len(frames_urls)} frames given, too many (max_frames {self.limits.max_frames})")
        frames = [decode_image(self._bytes(str(u), "video frame"), limits=self.limits) for u in frames_urls]
        return preprocess_video(frames, video_fps=fps, cfg=self.pre, limits=self.limits)

    def video_file(self, url: str, *, sample_fps: float | None) -> VisionInput:
        """An mp4 / webm file (data: URL or allowed local file), sampled at `sample_fps` frames per second."""
        data = self._bytes(url, "video", limit=(self.limits.max_video_bytes, "max_video_bytes"))
        video = decode_video(data, cfg=self.pre, limits=self.limits, sample_fps=sample_fps)
        return preprocess_sampled_video(
            video.frames, video.indices, video_fps=video.fps, cfg=self.pre, limits=self.limits
        )

    # ----------------------------------------------------------------- requests
    def read_messages(self, messages: list[dict[str, Any]]) -> list[VisionInput]:
        """Every image / video of the messages, in prompt order."""
        parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]]
        kinds = [_kind(p) for p in parts]
        check_counts(images=kinds.count("image"), videos=kinds.count("video"), limits=self.limits)
        out = []
        for part, kind in zip(parts, kinds):
            if kind == "image":
                ref = part.get("image_url") or part.get("image") or {}
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise MediaError("image part without a url")
                out.append(self.image(url))
            elif kind == "video":
                ref = part.get("video_url") or part.get("video") or {}
                out.append(self.video(ref if isinstance(ref, dict) else {"url": ref}))
        return out

    def expand(
        self,
        prompt_ids: list[int],
        inputs: list[VisionInput],
        *,
        encode_text: Any,  # noqa: ANN401
    ) -> tuple[list[int], MultimodalPrompt]:
        """The model's prompt (pads expanded, frame timestamps written) and its multimodal prompt."""
        merge = self.cfg.vision.spatial_merge_size  # type: ignore[union-attr]  # checked in __init__
        items = [VisionItem(i.kind, i.grid_thw, i.timestamps) for i in inputs]
        try:
            ids = expand_placeholders(prompt_ids, items, tokens=self.tokens, merge_size=merge, encode_text=encode_text)
        except ValueError as exc:
            raise MediaError(str(exc)) from None
        positions, delta = mrope_positions(token_types(ids, tokens=self.tokens), items, merge_size=merge)
        keys = tuple((_content_hash(i), math.prod(i.grid_thw) // (merge * merge)) for i in inputs)
        return ids, MultimodalPrompt(tuple(inputs), positions, delta, (self.tokens.image, self.tokens.video), keys)


def _content_hash(item: VisionInput) -> int:
    """62 bits of blake2b over what the vision tower sees of one item (pixels, grid, kind, frame times)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{item.kind}|{item.grid_thw}|{item.timestamps}|{item.pixel_values.dtype}".encode())
    h.update(item.pixel_values.detach().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


def _kind(part: Any) -> str | None:  # noqa: ANN401
    if not isinstance(part, dict):
        return None
    t = part.get("type")
    if t in ("image_url", "image") or "image_url" in part:
        return "image"
    if t in ("video_url", "video") or "video_url" in part:
        return "video"
    return None


def has_media(messages: list[dict[str, Any]]) -> bool:
    return any(_kind(p) for m in messages if isinstance(m.get("content"), list) for p in m["content"])


def _fps(value: Any) -> float:  # noqa: ANN401  # client JSON
    """A video's frame rate: a finite positive number (a string like "abc" or "nan" is a MediaError -> 400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MediaError(f"video: fps must be a number, got {value!r:.40}")
    fps = float(value)
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"video: fps must be a finite number > 0, got {value!r:.40}")
    return fps
