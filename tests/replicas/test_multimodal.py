"""Images and videos through the chat API equal the offline path, on the single-process and
expert-parallel layouts.

Oracle: the model in this process (LocalModel + the vision tower, fp32) on the same preprocessed image,
with the prompt expanded and positioned by model_shards (whose vision parts are checked against
transformers in tests/model_shards/test_vision.py), decoded greedily. A video file (mp4, made here with
PyAV) gives the prompt and output of the frames PyAV decodes from it, sent as a frame list at the
stream's rate (same timestamps). Bad images and videos get 400s naming the limit.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import requests
import torch
from PIL import Image

pytestmark = pytest.mark.timeout(900)

TOKENS = 8
VIDEO_BYTES = 150_000  # limits of the test app, small enough to trip with tiny synthetic videos
VIDEO_FRAMES = 100
VIDEO_SECONDS = 20.0
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def _png(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _flat_png(w: int, h: int) -> bytes:
    """A large but tiny-to-send image (one colour compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(*images: bytes) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _url(im)}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is in the picture?"}]}]


def _offline_text(folder: Path, messages: list[dict]) -> str:
    """Greedy continuation computed in this process, the plain way."""
    from model_shards.batch import SeqChunk, StepBatch
    from model_shards.checkpoint_files import CheckpointReader
    from model_shards.image_processing import MediaLimits
    from model_shards.model import LocalModel
    from model_shards.tokenizer import Tokenizer
    from model_shards.vision import VisionTower, load_vision
    from replicas.api.media import MediaReader

    model = LocalModel.load(folder, dtype="float32")
    cfg = model.cfg
    tok = Tokenizer.from_dir(folder)
    tower = VisionTower(
        load_vision(CheckpointReader(folder), cfg, dtype=torch.float32), cfg.vision, dtype=torch.float32
    )
    reader = MediaReader(cfg, limits=MediaLimits(), local_root=None)
    inputs = reader.read_messages(messages)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    ids, mm = reader.expand(tok.encode(text), inputs, encode_text=tok.encode)
    embeds = tower.encode(torch.cat([i.pixel_values for i in inputs]), [i.grid_thw for i in inputs])
    rows = torch.tensor([i for i, t in enumerate(ids) if t in mm.pad_ids])
    table = tuple(range(-(-(len(ids) + TOKENS) // 16)))
    pools = model.allocate(num_blocks=len(table), block_size=16, num_slots=1)
    batch = StepBatch.build([SeqChunk(tuple(ids), 0, 0, table, positions=mm.positions)], block_size=16)
    from dataclasses import replace

    logits = model.forward(replace(batch, embeds_override=(rows, embeds)), pools).logits_RV[0]
    out = []
    for step in range(TOKENS):
        token = int(logits.argmax())
        out.append(token)
        chunk = SeqChunk((token,), len(ids) + step, 0, table, rope_delta=mm.rope_delta)
        logits = model.forward(StepBatch.build([chunk], block_size=16), pools).logits_RV[0]
    return tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module", params=[0, 1], ids=["single-process", "expert-parallel"])
def app(request, serve_http: str, embedded_model_dir: Path, tmp_path_factory):  # noqa: ANN001, ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs

    x = request.param
    name = f"mm{x}"
    media = tmp_path_factory.mktemp(f"media{x}")
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name=name,
        dtype="float32",
        expert_ranks=x,
        num_kv_blocks=160,
        max_num_seqs=8,
        max_model_len=2048,
        max_images_per_request=3,
        max_image_pixels=2000 * 2000,
        allowed_local_media_path=str(media),
        max_video_bytes=VIDEO_BYTES,
        max_video_decoded_frames=VIDEO_FRAMES,
        max_video_seconds=VIDEO_SECONDS,
    )
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    yield SimpleNamespace(
        base=f"{serve_http}/{name}",
        name=name,
        folder=embedded_model_dir,
        media=media,
        oai=openai.OpenAI(base_url=f"{serve_http}/{name}/v1", api_key="x", max_retries=0, timeout=300),
    )
    serve.delete(name)


@pytest.mark.parametrize("sizes", [[(64, 96)], [(40, 40), (130, 70)]], ids=["one-image", "two-images"])
def test_image_chat_equals_offline_greedy(app, sizes) -> None:  # noqa: ANN001
    images = [_png(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    messages = _messages(*images)
    out = app.oai.chat.completions.create(
        model=app.name, messages=messages, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True, **NO_THINK}
    )
    assert out.choices[0].message.content == _offline_text(app.folder, messages)
    # the image tokens count as prompt tokens
    assert out.usage.prompt_tokens > 64 * len(sizes)


@pytest.mark.parametrize(
    "content,needle",
    [
        (lambda: _url(_flat_png(2100, 2100)), "max_pixels"),
        (lambda: _url(_png(64, 64)[:300]), "corrupt"),
        (lambda: "data:image/png;base64," + base64.b64encode(b"definitely not an image").decode(), "decodable"),
        (lambda: "data:image/png;base64,@@@not-base64@@@", "base64"),
        (lambda: "https://example.com/cat.png", "network"),
        (lambda: "file:///etc/passwd", "outside the allowed media folder"),
    ],
    ids=["oversized", "truncated", "undecodable", "bad-base64", "network-url", "local-file"],
)
def test_bad_images_get_400_and_server_keeps_serving(app, content, needle: str) -> None:  # noqa: ANN001
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": content()}}, {"type": "text", "text": "hi"}],
        }
    ]
    r = requests.post(
        app.base + "/v1/chat/completions", json={"model": app.name, "messages": messages, "max_tokens": 2}, timeout=120
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"], r.json()
    too_many = _messages(*[_png(32, 32, seed=i) for i in range(4)])
    r = requests.post(
        app.base + "/v1/chat/completions", json={"model": app.name, "messages": too_many, "max_tokens": 2}, timeout=120
    )
    assert r.status_code == 400 and "max_images" in r.json()["error"]["message"]
    ok = app.oai.chat.completions.create(
        model=app.name, messages=_messages(_png(48, 48)), max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert (ok.usage.completion_tokens, ok.choices[0].finish_reason) == (2, "length")


# ------------------------------------------------------------------------------ video files
def _video_messages(spec: dict) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": spec},
                {"type": "text", "text": "What happens in the video?"},
            ],
        }
    ]


def _chat(app, messages: list[dict]):  # noqa: ANN001, ANN202
    return app.oai.chat.completions.create(
        model=app.name, messages=messages, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True, **NO_THINK}
    )


def test_mp4_video_equals_its_decoded_frames_as_a_frame_list(app) -> None:  # noqa: ANN001
    pytest.importorskip("av")
    from tests.synthetic_video import make_video, pyav_frames

    data = make_video(frames=20, fps=10, width=96, height=64)  # 2 s: 4 frames sampled at 2 fps
    (app.media / "clip.mp4").write_bytes(data)
    frames, rate = pyav_frames(data)
    listed = _video_messages({"frames": [_url(_png_bytes(f)) for f in frames], "fps": rate})
    want = _chat(app, listed)
    assert want.choices[0].message.content == _offline_text(app.folder, listed)
    for spec in (
        {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()},
        {"url": str(app.media / "clip.mp4")},
    ):
        got = _chat(app, _video_messages(spec))
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        assert got.choices[0].message.content == want.choices[0].message.content


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda mv: mv(frames=40, fps=10, width=320, height=240, noise=True), "max_video_bytes"),
        (lambda mv: mv(frames=120, fps=30, width=32, height=32), "max_video_decoded_frames"),
        (lambda mv: mv(frames=25, fps=1, width=32, height=32), "max_video_seconds"),
        (lambda mv: mv(codec="mpeg4"), "codec"),
        (lambda mv: _gif(), "container"),
    ],
    ids=["bytes", "frames", "seconds", "codec", "container"],
)
def test_bad_videos_get_400_naming_the_limit(app, make, needle: str) -> None:  # noqa: ANN001
    pytest.importorskip("av")
    from tests.synthetic_video import make_video

    data = make(make_video)
    if needle == "max_video_bytes":
        assert len(data) > VIDEO_BYTES
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    r = requests.post(
        app.base + "/v1/chat/completions",
        json={"model": app.name, "max_tokens": 2, "messages": _video_messages({"url": url})},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"], r.json()
    ok = app.oai.chat.completions.create(
        model=app.name, messages=_messages(_png(48, 48)), max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert (ok.usage.completion_tokens, ok.choices[0].finish_reason) == (2, "length")


def test_image_prompts_share_a_cached_prefix_only_with_the_same_image(app) -> None:  # noqa: ANN001
    """The prefix cache keys image rows by the image's pixels (MultimodalPrompt.cache_key): the second turn of a
    chat resumes past its image when the image is the same one, not when another image of the same size stands in
    its place (same token ids, other pixels); both answers equal the uncached greedy run."""
    question = " ".join(f"detail{i}" for i in range(60))  # ~150 tokens after the image: the header lands past 128

    def turn1(image: bytes) -> list[dict]:
        parts = [{"type": "image_url", "image_url": {"url": _url(image)}}, {"type": "text", "text": question}]
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]

    def turn2(image: bytes, reply: str) -> list[dict]:
        return [*turn1(image), {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]

    same, other = _png(64, 96, seed=11), _png(64, 96, seed=12)
    first = _chat(app, turn1(same))  # saves a state before its assistant header (a chat cache hint)
    reply = first.choices[0].message.content or ""
    again, swapped = _chat(app, turn2(same, reply)), _chat(app, turn2(other, reply))
    assert again.usage.prompt_tokens == swapped.usage.prompt_tokens  # same token ids, only the pixels differ
    assert again.usage.prompt_tokens_details.cached_tokens >= 128
    assert swapped.usage.prompt_tokens_details.cached_tokens < 64  # the image starts inside the first 64 tokens
    assert again.choices[0].message.content == _offline_text(app.folder, turn2(same, reply))
    assert swapped.choices[0].message.content == _offline_text(app.folder, turn2(other, reply))
