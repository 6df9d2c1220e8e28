"""The checkpoint's preprocessor_config.json / video_preprocessor_config.json are honoured.

Oracle: transformers' own processors loaded from the same folder, offline
(`Qwen2VLImageProcessorPil.from_pretrained` for images, `Qwen3VLVideoProcessor.from_pretrained` for
video frame sampling and token counts), and the ingress's prompt builder (`ModelContext.load`) on a
checkpoint whose files differ from the defaults: a smaller max pixels gives fewer vision tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_shards.config import from_hf_config
from model_shards.image_processing import (
    MediaLimits,
    PreprocessConfig,
    preprocess_image,
    preprocess_video,
    sample_frame_indices,
)
from model_shards.preprocessor_config import (
    IMAGE_FILE,
    QWEN35_IMAGE_PREPROCESSOR,
    QWEN35_VIDEO_PREPROCESSOR,
    VIDEO_FILE,
    load_preprocess_config,
)

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _folder(src: Path, dst: Path, image: dict | None = None, video: dict | None = None) -> Path:
    """A checkpoint folder without weights (config, tokenizer) with the given preprocessor files."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    for name, content in ((IMAGE_FILE, image), (VIDEO_FILE, video)):
        (dst / name).unlink(missing_ok=True)
        if content is not None:
            (dst / name).write_text(json.dumps(content))
    return dst


def _hf_image(folder: Path):  # noqa: ANN202
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(folder))


def _hf_video(folder: Path):  # noqa: ANN202
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor.from_pretrained(str(folder))


def _image(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_tiny_checkpoint_writes_the_published_files_and_they_load_as_the_defaults(tiny_fused: Path) -> None:
    assert json.loads((tiny_fused / IMAGE_FILE).read_text()) == QWEN35_IMAGE_PREPROCESSOR
    assert json.loads((tiny_fused / VIDEO_FILE).read_text()) == QWEN35_VIDEO_PREPROCESSOR
    vision = from_hf_config(tiny_fused).vision
    cfg = load_preprocess_config(tiny_fused, vision)
    assert cfg == PreprocessConfig.for_vision(vision)
    # transformers reads the same numbers from the same files
    img, vid = _hf_image(tiny_fused), _hf_video(tiny_fused)
    assert (img.size["shortest_edge"], img.size["longest_edge"]) == (cfg.min_pixels, cfg.max_pixels)
    assert (vid.size["shortest_edge"], vid.size["longest_edge"]) == (cfg.video_min_pixels, cfg.video_max_pixels)
    assert (vid.fps, vid.min_frames, vid.max_frames) == (cfg.fps, cfg.min_frames, cfg.max_frames)
    assert tuple(img.image_mean) == cfg.image_mean and tuple(vid.image_std) == cfg.image_std


@pytest.mark.parametrize("cap", [False, True], ids=["uncapped", "cap_pixels_per_frame"])
def test_changed_values_are_honoured_like_transformers(tiny_fused: Path, tmp_path: Path, cap: bool) -> None:
    from transformers.video_utils import VideoMetadata

    image = {**QWEN35_IMAGE_PREPROCESSOR, "size": {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 6}}
    video = {
        **QWEN35_VIDEO_PREPROCESSOR,
        "size": {"shortest_edge": 4096, "longest_edge": 32 * 32 * 40},
        "fps": 3.0,
        "min_frames": 2,
        "max_frames": 10,
        "cap_pixels_per_frame": cap,
        "max_video_tokens": 3,
    }
    folder = _folder(tiny_fused, tmp_path / "ckpt", image, video)
    vision = from_hf_config(folder).vision
    cfg = load_preprocess_config(folder, vision)
    default = PreprocessConfig.for_vision(vision)
    hf_img, hf_vid = _hf_image(folder), _hf_video(folder)

    for w, h in [(300, 200), (64, 500), (1000, 1000)]:
        ours = preprocess_image(_image(w, h), cfg=cfg)
        ref = hf_img(images=[_image(w, h)], return_tensors="pt")
        assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist(), (w, h)
        assert np.prod(ours.grid_thw) < np.prod(preprocess_image(_image(w, h), cfg=default).grid_thw)

    for total, fps, (w, h) in [(40, 10.0, (320, 240)), (7, 2.0, (96, 64)), (300, 30.0, (640, 360))]:
        indices = sample_frame_indices(total, video_fps=fps, cfg=cfg)
        assert indices == hf_vid.sample_frames(VideoMetadata(total_num_frames=total, fps=fps)).tolist()
        frames = [_image(w, h)] * total
        ours = preprocess_video(frames, video_fps=fps, cfg=cfg, limits=MediaLimits())
        hf_cap = {"cap_pixels_per_frame": cap} if cap else {}  # unset: its own default (off), as in the file
        assert int(np.prod(ours.grid_thw)) == hf_vid.get_num_of_video_patches(len(indices), h, w, hf_cap)
        assert ours.grid_thw != preprocess_video(frames, video_fps=fps, cfg=default, limits=MediaLimits()).grid_thw


def test_older_min_max_pixels_keys_override_size(tiny_fused: Path, tmp_path: Path) -> None:
    image = {**QWEN35_IMAGE_PREPROCESSOR, "min_pixels": 3136, "max_pixels": 32 * 32 * 5}
    folder = _folder(tiny_fused, tmp_path / "ckpt", image, None)
    cfg = load_preprocess_config(folder, from_hf_config(folder).vision)
    hf = _hf_image(folder)
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"]) == (3136, 5120)
    assert cfg.video_max_pixels == PreprocessConfig().video_max_pixels  # no video file: defaults


@pytest.mark.parametrize(
    "image,video,needle",
    [
        ({"do_resize": False}, None, "do_resize"),
        ({"patch_size": 14}, None, "patch_size 14 disagrees"),
        ({"image_std": [0.5, 0, 0.5]}, None, "image_std"),
        ({"size": {"shortest_edge": 100, "longest_edge": 10}}, None, "min pixels"),
        (None, {"fps": "abc"}, "fps"),
        (None, {"num_frames": 8}, "num_frames"),
        (None, {"min_frames": 10, "max_frames": 4}, "min_frames"),
        ({}, {"image_mean": [0.1, 0.2, 0.3]}, "image_mean"),
    ],
    ids=["do_resize", "patch", "std-zero", "min>max", "fps", "num_frames", "frames", "mean-differs"],
)
def test_unsupported_or_malformed_values_are_refused_by_name(
    tiny_fused: Path,
    tmp_path: Path,
    image,  # noqa: ANN001
    video,  # noqa: ANN001
    needle: str,
) -> None:
    folder = _folder(tiny_fused, tmp_path / "ckpt", image, video)
    with pytest.raises(ValueError, match=needle):
        load_preprocess_config(folder, from_hf_config(folder).vision)


def test_served_prompt_follows_the_checkpoint_max_pixels(tiny_fused: Path, tmp_path: Path) -> None:
    """The ingress's prompt builder on two folders differing only in max pixels."""
    import base64
    import io

    from replicas.api.openai_protocol import ChatCompletionRequest
    from replicas.api.request_builder import ModelContext

    buf = io.BytesIO()
    _image(640, 480).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
                }
            ],
        }
    )
    counts = {}
    for name, longest in (("default", None), ("small", 32 * 32 * 8)):
        image = dict(QWEN35_IMAGE_PREPROCESSOR)
        if longest:
            image["size"] = {"shortest_edge": 1024, "longest_edge": longest}
        folder = _folder(tiny_fused, tmp_path / name, image, QWEN35_VIDEO_PREPROCESSOR)
        ctx = ModelContext.load(
            str(folder), name="m", max_model_len=None, cache_tokens=32768, default_max_tokens=None, max_n=1
        )
        ids = ctx.chat_prompt(req).ids
        counts[name] = ids.count(ctx.cfg.image_token_id)
        # transformers' count for the same image and file
        hf = _hf_image(folder)(images=[_image(640, 480)], return_tensors="pt")["image_grid_thw"][0]
        assert counts[name] == int(hf.prod()) // 4
    assert counts["small"] == 6 and counts["default"] == 300, counts  # 640x480 -> 96x64 and 640x480 pixels
