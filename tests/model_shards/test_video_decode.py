"""Video files decoded under limits, sampled as transformers samples them.

Oracles: transformers' own PyAV loader (`transformers.video_utils.read_video_pyav` with
`Qwen3VLVideoProcessor.sample_frames`) for which frames are kept, their pixels and the frame
rate; `Qwen3VLProcessor._calculate_timestamps` for the timestamps; plain PyAV decoding for WebM
(transformers' loader needs a frame count WebM does not store). Limits: each named in the error.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_shards.image_processing import MediaError, MediaLimits, PreprocessConfig, sample_frame_indices
from model_shards.tiny_checkpoint import tiny_config_dict

av = pytest.importorskip("av")  # the `video` extra; the test extra installs it

from model_shards.config import from_hf_config  # noqa: E402
from model_shards.video_decode import decode_video  # noqa: E402
from replicas.api.media import MediaReader  # noqa: E402
from tests.synthetic_video import make_video, pyav_frames  # noqa: E402

CFG = PreprocessConfig()


def _png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("sample_fps", [None, 4.0, 0.5], ids=["config-fps", "fps-4", "fps-0.5"])
def test_mp4_keeps_the_frames_transformers_pyav_loader_keeps(tmp_path: Path, sample_fps: float | None) -> None:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import read_video_pyav

    data = make_video(frames=30, fps=10)
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    proc = Qwen3VLVideoProcessor()
    ref, meta = read_video_pyav(str(path), lambda metadata, **_: proc.sample_frames(metadata, fps=sample_fps))
    ours = decode_video(data, cfg=CFG, limits=MediaLimits(), sample_fps=sample_fps)
    assert (ours.container, ours.codec, ours.total_frames) == ("mp4", "h264", 30)
    assert ours.indices == meta.frames_indices.tolist() and ours.fps == meta.fps == 10.0
    assert np.array_equal(np.stack([np.asarray(f) for f in ours.frames]), ref)


@pytest.mark.parametrize("codec", ["libvpx-vp9", "libvpx"], ids=["vp9", "vp8"])
def test_webm_keeps_the_sampled_frames_pyav_decodes(codec: str) -> None:
    data = make_video(codec=codec, container="webm", frames=16, fps=8)
    frames, rate = pyav_frames(data)
    ours = decode_video(data, cfg=CFG, limits=MediaLimits())
    assert (ours.container, ours.total_frames, ours.fps) == ("matroska", 16, rate)
    assert ours.indices == sample_frame_indices(16, video_fps=rate, cfg=CFG) == [0, 5, 10, 15]
    for i, f in zip(ours.indices, ours.frames):
        assert np.array_equal(np.asarray(f), np.asarray(frames[i]))


def test_video_file_equals_its_frames_sent_as_a_frame_list(tmp_path: Path) -> None:
    """MediaReader: the same item (pixels, grid, timestamps) from the file (data URL or allowed local
    file) as from the decoded frames given as a list at the stream's rate."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    data = make_video(frames=20, fps=10, width=96, height=64)
    (tmp_path / "clip.mp4").write_bytes(data)
    reader = MediaReader(from_hf_config(tiny_config_dict()), limits=MediaLimits(), local_root=str(tmp_path))
    frames, rate = pyav_frames(data)
    listed = reader.video({"frames": [_png_url(f) for f in frames], "fps": rate})
    for url in (
        "data:video/mp4;base64," + base64.b64encode(data).decode(),
        str(tmp_path / "clip.mp4"),
        f"file://{tmp_path / 'clip.mp4'}",
    ):
        got = reader.video({"url": url})
        assert got.grid_thw == listed.grid_thw and got.timestamps == listed.timestamps
        assert torch_equal(got.pixel_values, listed.pixel_values)
    indices = sample_frame_indices(20, video_fps=rate, cfg=CFG)
    assert list(listed.timestamps) == Qwen3VLProcessor._calculate_timestamps(None, indices, rate, 2)
    # `fps` on a file is the sampling rate: 5 per second keeps 10 of the 20 frames (5 temporal patches)
    assert reader.video({"url": str(tmp_path / "clip.mp4"), "fps": 5}).grid_thw[0] == 5
    # a server without allowed_local_media_path names no files
    closed = MediaReader(from_hf_config(tiny_config_dict()), limits=MediaLimits(), local_root=None)
    with pytest.raises(MediaError, match="local files are not allowed"):
        closed.video({"url": str(tmp_path / "clip.mp4")})


def torch_equal(a, b) -> bool:  # noqa: ANN001
    return a.shape == b.shape and bool((a == b).all())


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data,limits,needle",
    [
        (lambda: make_video(), MediaLimits(max_video_bytes=1000), "max_video_bytes"),
        (lambda: make_video(frames=20, fps=10), MediaLimits(max_video_seconds=1.5), "max_video_seconds"),
        (lambda: make_video(frames=20), MediaLimits(max_video_decoded_frames=10), "max_video_decoded_frames"),
        (lambda: make_video(frames=20), MediaLimits(max_video_decoded_pixels=20000), "max_video_decoded_pixels"),
        (lambda: make_video(), MediaLimits(max_pixels=1000), "max_pixels"),
        (lambda: make_video(), MediaLimits(max_video_decode_s=1e-9), "max_video_decode_s"),
        (lambda: make_video(frames=60, fps=10), MediaLimits(max_frames=8), "max_frames"),
        (lambda: make_video(codec="mpeg4"), MediaLimits(), "codec 'mpeg4' is not allowed"),
        (lambda: make_video(codec="mpeg4", container="avi"), MediaLimits(), "container"),
        (_gif, MediaLimits(), "container"),
        (lambda: b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nfile:///etc/passwd\n", MediaLimits(), "container"),
        (lambda: b"ffconcat version 1.0\nfile /etc/passwd\n", MediaLimits(), "container"),
        (lambda: make_video()[:600], MediaLimits(), "not decodable"),
    ],
    ids=[
        "bytes",
        "seconds",
        "decoded-frames",
        "decoded-pixels",
        "frame-pixels",
        "decode-time",
        "kept-frames",
        "codec",
        "avi",
        "gif",
        "hls-playlist",
        "concat-list",
        "truncated",
    ],
)
def test_limits_and_refusals_name_the_problem(data, limits: MediaLimits, needle: str) -> None:  # noqa: ANN001
    reader = MediaReader(from_hf_config(tiny_config_dict()), limits=limits, local_root=None)
    with pytest.raises(MediaError, match=needle.replace("(", r"\(")):
        # fps 10: sample every frame, so 60 frames exceed max_frames 8
        reader.video({"url": "data:video/mp4;base64," + base64.b64encode(data()).decode(), "fps": 10})


def test_without_pyav_a_video_file_is_refused_naming_the_extra() -> None:
    """A process where `import av` fails (the server installed without the `video` extra)."""
    code = (
        "import sys, base64; sys.modules['av'] = None\n"
        "from model_shards.config import from_hf_config\n"
        "from model_shards.tiny_checkpoint import tiny_config_dict\n"
        "from model_shards.image_processing import MediaError, MediaLimits\n"
        "from replicas.api.media import MediaReader\n"
        "r = MediaReader(from_hf_config(tiny_config_dict()), limits=MediaLimits(), local_root=None)\n"
        "try:\n"
        "    r.video({'url': 'data:video/mp4;base64,' + base64.b64encode(sys.stdin.buffer.read()).decode()})\n"
        "except MediaError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=make_video(),
        capture_output=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr.decode()
    assert "REFUSED" in out.stdout.decode() and "`video` extra" in out.stdout.decode(), out.stdout.decode()


def test_decoding_keeps_only_sampled_frames_for_long_videos() -> None:
    """A 60 s video at the default 2 fps keeps 120 frames, not 600 (frames kept = what sampling picks)."""
    data = make_video(frames=600, fps=10, width=32, height=32)
    out = decode_video(data, cfg=CFG, limits=MediaLimits())
    assert out.total_frames == 600 and len(out.frames) == len(out.indices) == 120
    assert out.indices == sample_frame_indices(600, video_fps=10.0, cfg=CFG)


@pytest.mark.parametrize("fps", [0.0, -2.0, float("nan"), float("inf")])
def test_a_sampling_fps_that_is_not_a_positive_number_is_refused(fps: float) -> None:
    with pytest.raises(MediaError, match="fps"):
        decode_video(make_video(), cfg=CFG, limits=MediaLimits(), sample_fps=fps)
