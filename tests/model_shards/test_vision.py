"""Vision tower, multimodal positions and preprocessing against transformers (fp32, CPU).

Oracles: `Qwen3_5MoeForConditionalGeneration` on the random checkpoint transformers saved
(`hf_checkpoint`): its `get_image_features` for the tower, its forward + cache for whole-model
logits with images / video, its `get_rope_index` for positions; `Qwen2VLImageProcessorPil`
(transformers' Pillow backend, no torchvision needed) for image preprocessing; the Qwen3-VL video
helpers (`smart_resize`, `sample_frames`, `patchify`, `_calculate_timestamps`, called unbound)
for video geometry; `F.interpolate` for the position-grid resampling; known answers elsewhere.

Tolerances: the tower is bit-equal to HF (fp32 and bf16: same ops in the same order). Whole-model
logits use 1e-4 fp32 (test_model_parity's bound: the text trunk groups some ops differently,
e.g. GQA by reshape, stacked projections; measured ~1e-6).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model_shards.batch import SeqChunk, StepBatch
from model_shards.checkpoint_files import CheckpointError, CheckpointReader
from model_shards.config import from_hf_config
from model_shards.image_processing import (
    MediaError,
    MediaLimits,
    PreprocessConfig,
    VisionInput,
    decode_image,
    frame_timestamps,
    patchify,
    preprocess_image,
    preprocess_images,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
    smart_resize_video,
)
from model_shards.mm_positions import (
    IMAGE,
    TEXT,
    VIDEO,
    VisionItem,
    VisionTokenIds,
    expand_placeholders,
    mrope_positions,
    token_types,
)
from model_shards.model import LocalModel
from model_shards.vision import VisionTower, load_vision, position_embedding
from tests.device_ops import HostSyncRecorder, fake_cuda

FP32_TOL = 1e-4
BLOCK = 16
MERGE = 2
TOK = VisionTokenIds(image=1001, video=1002, vision_start=1003, vision_end=1004)
VS, VE, IMG, VID = TOK.vision_start, TOK.vision_end, TOK.image, TOK.video
# small resize bounds keep the tiny model fast: 2 to 12 merged blocks of 32x32 pixels per image
SMALL = PreprocessConfig(min_pixels=32 * 32 * 2, max_pixels=32 * 32 * 12)


def _report(ours: torch.Tensor, ref: torch.Tensor) -> str:
    d = (ours.float() - ref.float()).abs()
    return f"max |d| {d.max().item():.3g}, mean |d| {d.mean().item():.3g}"


def _text(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _fake_tokenizer(s: str) -> list[int]:
    """Stands in for the tokenizer on timestamp text (the random checkpoint has none)."""
    return [ord(c) % 997 for c in s]


def _noise_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
    return im if mode in ("RGB", "RGBA") else im.convert(mode)


@pytest.fixture(scope="module")
def hf_mm(hf_checkpoint: Path):  # noqa: ANN201  # Qwen3_5MoeForConditionalGeneration
    from transformers import Qwen3_5MoeForConditionalGeneration

    ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(
        hf_checkpoint, dtype=torch.float32, attn_implementation="eager", experts_implementation="grouped_mm"
    ).eval()
    assert ref.model.visual.config._attn_implementation == "eager"
    return ref


@pytest.fixture(scope="module")
def tower(hf_checkpoint: Path) -> VisionTower:
    cfg = from_hf_config(hf_checkpoint)
    return VisionTower(
        load_vision(CheckpointReader(hf_checkpoint), cfg, dtype=torch.float32), cfg.vision, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def ours(hf_checkpoint: Path) -> LocalModel:
    return LocalModel.load(hf_checkpoint, dtype="float32")


# ------------------------------------------------------------------------------ (a) the tower
GRIDS = [(1, 4, 6), (2, 6, 4), (1, 2, 2), (1, 12, 10), (3, 2, 4)]


def test_position_grid_is_bilinear_align_corners_resampling(tower: VisionTower) -> None:
    """Known answer: the 4-tap sum equals F.interpolate(bilinear, align_corners=True), in merge-block order."""
    pos = tower.w.pos_embed
    side = int(pos.shape[0] ** 0.5)
    table = pos.T.reshape(1, -1, side, side)
    for t, h, w in [(1, 4, 6), (2, 10, 2), (1, 16, 16), (1, 2, 20)]:
        img = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [D, h, w]
        blocks = img.reshape(-1, h // 2, 2, w // 2, 2).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
        got = position_embedding(pos, grids=[(t, h, w)], merge=MERGE)
        torch.testing.assert_close(got, blocks.repeat(t, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tower_bit_equal_to_transformers(dtype: torch.dtype, hf_checkpoint: Path) -> None:
    """Several items at once (images, videos with 2 and 3 temporal patches) vs HF get_image_features."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(
        hf_checkpoint, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    cfg = from_hf_config(hf_checkpoint)
    ours = VisionTower(load_vision(CheckpointReader(hf_checkpoint), cfg, dtype=dtype), cfg.vision, dtype=dtype)
    n = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(n, cfg.vision.patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.model.get_image_features(pixels, torch.tensor(GRIDS)).pooler_output
    for _ in range(2):  # the second encode reads the frame tables the first one built (per grid shape)
        got = ours.encode(pixels, GRIDS)
        assert got.dtype == dtype and got.shape == (n // 4, cfg.vision.out_hidden_size)
        for g, w in zip(ours.split(got, GRIDS), want):
            assert torch.equal(g, w), _report(g, w)


def _fake_cuda_like(obj: Any) -> Any:  # noqa: ANN401  # a weights dataclass, a list of them or a tensor
    """The same weights as fake tensors made on "cuda" (shape and dtype only)."""
    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device="cuda")
    if isinstance(obj, list):
        return [_fake_cuda_like(o) for o in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _fake_cuda_like(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        )
    return obj


def test_tower_builds_its_tables_on_the_weights_device(tower: VisionTower) -> None:
    """With the weights on (fake) "cuda", an encode copies nothing in from the host: the position and rotary
    tables are made on the device, once per frame shape, and reused by later encodes."""
    with fake_cuda():
        gpu = VisionTower(_fake_cuda_like(tower.w), tower.cfg, dtype=torch.float32)
        pixels = torch.empty(sum(t * h * w for t, h, w in GRIDS), tower.cfg.patch_dim, device="cuda")
        for _ in range(2):
            with HostSyncRecorder() as rec:  # raises at a sync, a host copy or a CPU operand
                # the undecorated body: ops inside torch.inference_mode are invisible to dispatch modes
                out = VisionTower.encode.__wrapped__(gpu, pixels, GRIDS)  # type: ignore[attr-defined]  # set by inference_mode's decorator
            assert out.device.type == "cuda"
            assert not rec.of_kind("h2d"), [str(e) for e in rec.events]
        held = [t for tables in gpu._frames.values() for t in tables]
        assert len(gpu._frames) == len({(h, w) for _, h, w in GRIDS}) and all(t.device.type == "cuda" for t in held)


def test_sdpa_attention_close_to_eager(tower: VisionTower) -> None:
    n = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(n, tower.cfg.patch_dim, generator=torch.Generator().manual_seed(1))
    fast = VisionTower(tower.w, tower.cfg, dtype=torch.float32, attention="sdpa")
    a, b = tower.encode(pixels, GRIDS), fast.encode(pixels, GRIDS)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=lambda m: _report(b, a))


def test_tower_rejects_bad_inputs(tower: VisionTower) -> None:
    with pytest.raises(ValueError, match="pixel_values has shape"):
        tower.encode(torch.zeros(10, tower.cfg.patch_dim), [(1, 4, 6)])
    with pytest.raises(ValueError, match="multiples of 2"):
        tower.encode(torch.zeros(15, tower.cfg.patch_dim), [(1, 3, 5)])


def test_load_vision_names_the_missing_tensor(hf_checkpoint: Path) -> None:
    reader = CheckpointReader(hf_checkpoint)
    del reader.tensors["model.visual.blocks.1.attn.qkv.bias"]
    with pytest.raises(CheckpointError, match=r"model\.visual\.blocks\.1\.attn\.qkv\.bias"):
        load_vision(reader, from_hf_config(hf_checkpoint), dtype=torch.float32)


# ------------------------------------------------------------------------------ (b) whole model
@dataclasses.dataclass
class Prompt:
    ids: list[int]
    inputs: list[VisionInput]

    @property
    def items(self) -> list[VisionItem]:
        return [VisionItem(v.kind, v.grid_thw, v.timestamps) for v in self.inputs]


def _prompts() -> dict[str, Prompt]:
    """Chat-template-shaped prompts (one placeholder per item) with real preprocessing."""
    img_a = preprocess_image(_noise_image(70, 100, 1), cfg=SMALL)  # grid (1, 4, 6): 6 tokens
    img_b = preprocess_image(_noise_image(130, 60, 2), cfg=SMALL)  # grid (1, 8, 4): 8 tokens
    frames = [_noise_image(64, 64, 10 + i) for i in range(4)]
    video = preprocess_video(frames, video_fps=2.0, cfg=SMALL, limits=MediaLimits())  # grid (2, 4, 4)
    assert (img_a.grid_thw, img_b.grid_thw, video.grid_thw) == ((1, 4, 6), (1, 8, 4), (2, 4, 4))
    assert video.timestamps == (0.25, 1.25)
    return {
        "one_image": Prompt(_text(5, 1) + [VS, IMG, VE] + _text(7, 2), [img_a]),
        "two_images": Prompt(_text(3, 3) + [VS, IMG, VE] + _text(4, 4) + [VS, IMG, VE] + _text(6, 5), [img_b, img_a]),
        "video": Prompt(_text(4, 6) + [VS, VID, VE] + _text(5, 7), [video]),
        "text_only": Prompt(_text(23, 8), []),
    }


def _expand(p: Prompt) -> tuple[list[int], list[int]]:
    ids = expand_placeholders(p.ids, p.items, tokens=TOK, merge_size=MERGE, encode_text=_fake_tokenizer)
    return ids, token_types(ids, tokens=TOK)


def _hf_kwargs(p: Prompt, ids: list[int], types: list[int]) -> dict:
    """What Qwen3VLProcessor would hand the model for this prompt."""
    kw: dict = {"input_ids": torch.tensor([ids]), "mm_token_type_ids": torch.tensor([types], dtype=torch.int32)}
    for kind, pv, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        chosen = [v for v in p.inputs if v.kind == kind]
        if chosen:
            kw[pv] = torch.cat([v.pixel_values for v in chosen])
            kw[grid] = torch.tensor([v.grid_thw for v in chosen])
    return kw


STEPS = 20


@dataclasses.dataclass
class HfRun:
    """transformers on one prompt: all prefill logits, then `generate`'s greedy tokens and the logits
    of every decode step (its own cache and 3-D position bookkeeping: cache length + rope_deltas)."""

    ids: list[int]
    types: list[int]
    prefill: torch.Tensor  # [L, V]
    tokens: list[int]  # STEPS + 1 greedy tokens
    decode: torch.Tensor  # [STEPS, V]: logits after feeding tokens[0..STEPS-1]
    rope_delta: int


def _hf_run(ref, p: Prompt) -> HfRun:  # noqa: ANN001
    ids, types = _expand(p)
    kw = _hf_kwargs(p, ids, types)
    ref.model.rope_deltas = None  # HF keeps the last prompt's delta on the module
    with torch.no_grad():
        prefill = ref(**kw).logits[0].float()
        out = ref.generate(
            **kw,
            max_new_tokens=STEPS + 1,
            do_sample=False,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = torch.cat(out.logits).float()
    torch.testing.assert_close(logits[0], prefill[-1], atol=1e-5, rtol=0)  # generate's prefill = forward's
    return HfRun(
        ids, types, prefill, out.sequences[0, len(ids) :].tolist(), logits[1:], int(ref.model.rope_deltas[0, 0])
    )


@pytest.fixture(scope="module")
def hf_runs(hf_mm) -> dict[str, HfRun]:  # noqa: ANN001
    return {name: _hf_run(hf_mm, p) for name, p in _prompts().items()}


def _override(seqs: list[tuple[list[int], list[VisionInput]]], tower: VisionTower) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, embeds) for StepBatch.embeds_override: every item of the batch encoded in one call,
    image pads filled with the images in order, video pads with the videos (HF's masked_scatter)."""
    inputs = [v for _, items in seqs for v in items]
    embeds = tower.split(
        tower.encode(torch.cat([v.pixel_values for v in inputs]), [v.grid_thw for v in inputs]),
        [v.grid_thw for v in inputs],
    )
    rows, parts, start, k = [], [], 0, 0
    for types, items in seqs:
        mine = embeds[k : k + len(items)]
        k += len(items)
        for code, kind in ((IMAGE, "image"), (VIDEO, "video")):
            rows += [start + i for i, t in enumerate(types) if t == code]
            parts += [e for e, v in zip(mine, items) if v.kind == kind]
        start += len(types)
    return torch.tensor(rows), torch.cat(parts)


def test_prefill_and_decode_with_images_and_video_match_transformers(
    hf_runs: dict[str, HfRun],
    ours: LocalModel,
    tower: VisionTower,
) -> None:
    """One image / two images of different sizes / a 2-temporal-patch video / text only, prefilled
    together in one step (explicit MRoPE positions + embeds_override), then 20 decode steps together
    with rope_delta (positions None); HF runs each prompt alone (forward, then generate)."""
    prompts, runs = _prompts(), list(hf_runs.values())
    tables, nb = [], 0
    for r in runs:
        n = -(-(len(r.ids) + STEPS + 1) // BLOCK)
        tables.append(tuple(range(nb, nb + n)))
        nb += n
    pools = ours.allocate(num_blocks=nb, block_size=BLOCK, num_slots=len(runs))
    chunks, deltas = [], []
    for i, (r, p) in enumerate(zip(runs, prompts.values())):
        pos, delta = mrope_positions(r.types, p.items, merge_size=MERGE)
        deltas.append(delta)
        chunks.append(
            SeqChunk(tuple(r.ids), 0, i, tables[i], positions=pos if p.inputs else None, rope_delta=delta, logits="all")
        )
    assert deltas == [r.rope_delta for r in runs] == [-3, -7, -4, 0]
    batch = StepBatch.build(chunks, block_size=BLOCK)
    override = _override([(r.types, p.inputs) for r, p in zip(runs, prompts.values())], tower)
    got = ours.forward(dataclasses.replace(batch, embeds_override=override), pools).logits_RV
    want = torch.cat([r.prefill for r in runs])
    torch.testing.assert_close(got, want, atol=FP32_TOL, rtol=0, msg=lambda m: f"prefill: {_report(got, want)}")

    for step in range(STEPS):
        seqs = [
            SeqChunk((r.tokens[step],), len(r.ids) + step, i, tables[i], rope_delta=deltas[i])
            for i, r in enumerate(runs)
        ]
        got = ours.forward(StepBatch.build(seqs, block_size=BLOCK), pools).logits_RV
        want = torch.stack([r.decode[step] for r in runs])
        torch.testing.assert_close(got, want, atol=FP32_TOL, rtol=0, msg=lambda m: f"step {step}: {_report(got, want)}")  # noqa: B023  # called in this iteration
        assert got.argmax(-1).tolist() == [r.tokens[step + 1] for r in runs]


def test_prefill_split_inside_an_image_matches_transformers(
    hf_runs: dict[str, HfRun],
    ours: LocalModel,
    tower: VisionTower,
) -> None:
    """Chunked prefill whose boundary falls inside the second image: each chunk gets its slice of
    positions and of the override rows; logits equal HF's one-shot prefill."""
    p, r = _prompts()["two_images"], hf_runs["two_images"]
    pos, delta = mrope_positions(r.types, p.items, merge_size=MERGE)
    rows, embeds = _override([(r.types, p.inputs)], tower)
    second = r.types.index(IMAGE, r.types.index(TEXT, r.types.index(IMAGE)))
    split = second + 3  # 3 tokens into the second image
    table = tuple(range(-(-len(r.ids) // BLOCK)))
    pools = ours.allocate(num_blocks=len(table), block_size=BLOCK, num_slots=1)
    got = []
    for a, b in ((0, split), (split, len(r.ids))):
        keep = (rows >= a) & (rows < b)
        chunk = SeqChunk(tuple(r.ids[a:b]), a, 0, table, positions=pos[:, a:b], rope_delta=delta, logits="all")
        batch = dataclasses.replace(
            StepBatch.build([chunk], block_size=BLOCK), embeds_override=(rows[keep] - a, embeds[keep])
        )
        got.append(ours.forward(batch, pools).logits_RV)
    got_all = torch.cat(got)
    torch.testing.assert_close(got_all, r.prefill, atol=FP32_TOL, rtol=0, msg=lambda m: _report(got_all, r.prefill))


# ------------------------------------------------------------------------------ (c) positions
def test_model_spec_measured_example() -> None:
    """model_spec §4.3: [t t t VS img x6 (grid 1x4x6) VE t t]."""
    ids = [5, 6, 7, VS] + [IMG] * 6 + [VE, 8, 9]
    pos, delta = mrope_positions(token_types(ids, tokens=TOK), [VisionItem("image", (1, 4, 6))], merge_size=MERGE)
    assert pos[:, 4:10].tolist() == [[4] * 6, [4, 4, 4, 5, 5, 5], [4, 5, 6, 4, 5, 6]]
    assert pos[:, 10].tolist() == [7, 7, 7] and delta == -3


LAYOUTS = {
    "image_first": ([VS, IMG, VE, 1, 2], [("image", (1, 4, 6))]),
    "image_last": ([1, 2, VS, IMG], [("image", (1, 6, 4))]),
    "adjacent_images": ([1, VS, IMG, VE, VS, IMG, VE, 3], [("image", (1, 2, 2)), ("image", (1, 16, 10))]),
    "wide_and_tall": ([9, VS, IMG, VE, 9, VS, IMG, VE], [("image", (1, 6, 20)), ("image", (1, 20, 6))]),
    "video_3_patches": ([1, 2, VS, VID, VE, 4], [("video", (3, 4, 6), (0.5, 1.5, 2.5))]),
    "image_video_image": (
        [1, VS, IMG, VE, 2, VS, VID, VE, 3, VS, IMG, VE, 4],
        [("image", (1, 4, 4)), ("video", (2, 8, 4), (0.2, 1.7)), ("image", (1, 2, 8))],
    ),
    "bare_video_pad": ([1, VID, 2], [("video", (2, 2, 2), (0.0, 1.0))]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_positions_match_transformers_get_rope_index(layout: str, hf_mm) -> None:  # noqa: ANN001
    template, spec = LAYOUTS[layout]
    items = [VisionItem(*s) for s in spec]
    ids = expand_placeholders(template, items, tokens=TOK, merge_size=MERGE, encode_text=_fake_tokenizer)
    types = token_types(ids, tokens=TOK)
    ours, delta = mrope_positions(types, items, merge_size=MERGE)
    grids = {k: [it.grid_thw for it in items if it.kind == k] for k in ("image", "video")}
    want, want_delta = hf_mm.model.get_rope_index(
        torch.tensor([ids]),
        torch.tensor([types]),
        image_grid_thw=torch.tensor(grids["image"]) if grids["image"] else None,
        video_grid_thw=torch.tensor(grids["video"]) if grids["video"] else None,
    )
    assert torch.equal(ours, want[:, 0]) and delta == int(want_delta[0, 0])


def test_video_expansion_follows_the_qwen_processor() -> None:
    """Per temporal patch: `<t seconds>` text, vision_start, h*w/4 pads, vision_end; the template's
    wrapping start/end pair is replaced (Qwen's processor and vLLM), a bare pad is replaced alone."""
    item = VisionItem("video", (2, 4, 2), (0.25, 1.3))
    frame = [VS, VID, VID, VE]
    wrapped = expand_placeholders(
        [7, VS, VID, VE, 8], [item], tokens=TOK, merge_size=MERGE, encode_text=_fake_tokenizer
    )
    assert wrapped == [7] + _fake_tokenizer("<0.2 seconds>") + frame + _fake_tokenizer("<1.3 seconds>") + frame + [8]
    bare = expand_placeholders([VID], [item], tokens=TOK, merge_size=MERGE, encode_text=_fake_tokenizer)
    assert bare == wrapped[1:-1]
    image = expand_placeholders(
        [VS, IMG, VE], [VisionItem("image", (1, 4, 6))], tokens=TOK, merge_size=MERGE, encode_text=_fake_tokenizer
    )
    assert image == [VS] + [IMG] * 6 + [VE]


def test_mismatched_items_and_runs_raise() -> None:
    img = VisionItem("image", (1, 4, 6))
    with pytest.raises(ValueError, match="more image placeholders"):
        expand_placeholders([IMG, IMG], [img], tokens=TOK, merge_size=MERGE, encode_text=_fake_tokenizer)
    with pytest.raises(ValueError, match="1 image"):
        expand_placeholders([1, 2], [img], tokens=TOK, merge_size=MERGE, encode_text=_fake_tokenizer)
    with pytest.raises(ValueError, match="has 5 tokens"):
        mrope_positions([TEXT] + [IMAGE] * 5, [img], merge_size=MERGE)
    with pytest.raises(ValueError, match="more images"):
        mrope_positions([TEXT] * 3, [img], merge_size=MERGE)
    with pytest.raises(ValueError, match="timestamps"):
        VisionItem("video", (2, 4, 4), (0.5,))


# ------------------------------------------------------------------------------ (d) preprocessing
def test_images_equal_transformers_pil_processor() -> None:
    """Bit-equal pixel_values and grids vs Qwen2VLImageProcessorPil with Qwen3.5's settings (patch 16,
    mean = std = 0.5), over RGB / RGBA / L / P-with-transparency inputs and several aspect ratios."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = PreprocessConfig(min_pixels=32 * 32 * 2, max_pixels=32 * 32 * 40)
    hf = Qwen2VLImageProcessorPil(
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
    )
    palette = _noise_image(40, 50, 5, "P")
    palette.info["transparency"] = 3
    images = [
        _noise_image(100, 130, 1),
        _noise_image(37, 300, 2, "RGBA"),
        _noise_image(500, 480, 3, "L"),
        palette,
        _noise_image(33, 95, 4),
        _noise_image(1000, 40, 6),
    ]
    for im in images:
        want = hf(images=[im], return_tensors="pt")
        got = preprocess_image(im, cfg=cfg)
        assert [list(got.grid_thw)] == want["image_grid_thw"].tolist(), im.mode
        assert torch.equal(got.pixel_values, want["pixel_values"]), (
            f"{im.mode}: {_report(got.pixel_values, want['pixel_values'])}"
        )


def test_smart_resize_known_answers_and_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    lo, hi = 65536, 16777216  # Qwen3.5 preprocessor_config.json
    # by hand: 640x480 rounds to (640, 480) = 307200 px, inside the bounds
    assert smart_resize(480, 640, factor=32, min_pixels=lo, max_pixels=hi) == (480, 640)
    # 100x100 rounds to 96x96 < 65536: beta = sqrt(65536 / 10000) = 2.56, ceil(256 / 32) * 32 = 256
    assert smart_resize(100, 100, factor=32, min_pixels=lo, max_pixels=hi) == (256, 256)
    # 8000x6000 = 48e6 > 16777216: beta = sqrt(48e6 / 16777216) = 1.6915, floor(4729.9/32)*32 = 4704, 3520
    assert smart_resize(8000, 6000, factor=32, min_pixels=lo, max_pixels=hi) == (4704, 3520)
    for h, w in [(1, 150), (33, 95), (1080, 1920), (4097, 4097), (250, 4000), (10, 2000)]:
        assert smart_resize(h, w, factor=32, min_pixels=lo, max_pixels=hi) == hf_smart_resize(
            h, w, factor=32, min_pixels=lo, max_pixels=hi
        )
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(10, 2500, factor=32, min_pixels=lo, max_pixels=hi)


def test_patch_order_known_answer() -> None:
    """Pixels encode their coordinates (R = row, G = col, B = 9); with rescale 1, mean 0, std 1 every
    value of every row must be the coordinate of the pixel that row should hold."""
    h, w = 64, 96  # already on the 32-pixel grid: the resize keeps the pixels
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    im = Image.fromarray(np.stack([rr, cc, np.full_like(rr, 9)], -1).astype(np.uint8))
    cfg = PreprocessConfig(
        min_pixels=1, max_pixels=h * w, rescale_factor=1.0, image_mean=(0, 0, 0), image_std=(1, 1, 1)
    )
    out = preprocess_image(im, cfg=cfg)
    assert out.grid_thw == (1, 4, 6)
    x = out.pixel_values.view(4 * 6, 3, 2, 16, 16)  # (row, C, T, P, P)
    for n in range(24):
        blk, inner = divmod(n, 4)
        prow, pcol = (blk // 3) * 2 + inner // 2, (blk % 3) * 2 + inner % 2
        py, px = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
        for t in range(2):  # the still image is repeated over the temporal patch
            assert np.array_equal(x[n, 0, t].numpy(), prow * 16 + py)
            assert np.array_equal(x[n, 1, t].numpy(), pcol * 16 + px)
            assert (x[n, 2, t] == 9).all()


def test_normalisation_of_a_constant_image() -> None:
    out = preprocess_image(Image.new("RGB", (64, 64), (200, 0, 255)), cfg=SMALL)
    want = torch.tensor([(200 / 255 - 0.5) / 0.5, -1.0, 1.0])
    got = out.pixel_values.view(-1, 3, 2 * 16 * 16)
    torch.testing.assert_close(got, want.view(1, 3, 1).expand_as(got), atol=1e-6, rtol=0)


def test_video_geometry_matches_transformers_helpers() -> None:
    """Frame sampling, timestamps, resize rule and patch order vs the Qwen3-VL video helpers
    (called unbound: the processor class itself needs torchvision)."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_resize
    from transformers.video_utils import VideoMetadata

    cfg = PreprocessConfig()
    hf_self = SimpleNamespace(fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames)
    for total, fps in [(100, 30.0), (3, 24.0), (1000, 25.0), (7, 1.0), (9, 2.0)]:
        want = Qwen3VLVideoProcessor.sample_frames(hf_self, VideoMetadata(total_num_frames=total, fps=fps)).tolist()
        got = sample_frame_indices(total, video_fps=fps, cfg=cfg)
        assert got == want
        assert frame_timestamps(got, video_fps=fps, temporal_patch_size=2) == Qwen3VLProcessor._calculate_timestamps(
            None, list(want), fps, 2
        )
    for t, h, w in [(4, 100, 130), (8, 20, 500), (30, 1080, 1920), (600, 720, 1280), (5, 31, 33)]:
        assert smart_resize_video(
            t, h, w, factor=32, temporal_factor=2, min_pixels=cfg.video_min_pixels, max_pixels=cfg.video_max_pixels
        ) == hf_resize(
            t, h, w, temporal_factor=2, factor=32, min_pixels=cfg.video_min_pixels, max_pixels=cfg.video_max_pixels
        )
    frames = np.random.default_rng(0).standard_normal((4, 3, 64, 96)).astype(np.float32)
    got, grid = patchify(frames, cfg=cfg)
    want, *want_grid = Qwen3VLVideoProcessor.patchify(
        None, torch.from_numpy(frames)[None], patch_size=16, merge_size=2, temporal_patch_size=2
    )
    assert list(grid) == want_grid and torch.equal(got, want[0])


def test_video_pairs_frames_and_pads_the_last() -> None:
    """5 kept frames -> 3 temporal patches; frame k's blue value is 40k, so each row's T slots show
    which frames were paired; the odd last frame is repeated."""
    frames = [Image.new("RGB", (64, 64), (0, 0, 40 * k)) for k in range(5)]
    cfg = dataclasses.replace(SMALL, rescale_factor=1.0, image_mean=(0, 0, 0), image_std=(1, 1, 1), min_frames=1)
    out = preprocess_video(frames, video_fps=1.0, cfg=cfg, limits=MediaLimits(), num_frames=5)
    assert out.grid_thw == (3, 4, 4) and out.timestamps == (0.5, 2.5, 4.0)
    blue = out.pixel_values.view(3, 16, 3, 2, 256)[:, :, 2]  # [t, patch, T, P*P]
    want = torch.tensor([[0, 40], [80, 120], [160, 160]], dtype=torch.float32)
    assert torch.equal(blue, want[:, None, :, None].expand_as(blue))


def test_limits_raise_media_errors_naming_the_limit() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="PNG")
    data = buf.getvalue()
    assert decode_image(data, limits=MediaLimits()).size == (40, 40)
    with pytest.raises(MediaError, match="max_bytes"):
        decode_image(data, limits=MediaLimits(max_bytes=10))
    with pytest.raises(MediaError, match="max_pixels"):
        decode_image(data, limits=MediaLimits(max_pixels=1000))
    with pytest.raises(MediaError, match="not a decodable image"):
        decode_image(b"not an image", limits=MediaLimits())
    with pytest.raises(MediaError, match="max_images"):
        preprocess_images([Image.new("RGB", (32, 32))] * 3, cfg=SMALL, limits=MediaLimits(max_images=2))
    with pytest.raises(MediaError, match="max_frames"):
        preprocess_video([Image.new("RGB", (32, 32))] * 10, video_fps=2.0, cfg=SMALL, limits=MediaLimits(max_frames=3))
    assert issubclass(MediaError, ValueError)
