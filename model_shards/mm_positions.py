"""Token layout of prompts that mix text, images and videos: placeholder expansion and 3-D MRoPE positions.

Owns: expanding the chat template's one-token placeholders into the pad runs the vision tower
fills (model_spec §4.2), the per-token modality types (0 text, 1 image, 2 video, HF's
`mm_token_type_ids`), and the [3, L] (T, H, W) position ids with the `rope_delta` decode
continues from (model_spec §4.3, HF `get_rope_index`). Pure Python/torch on token ids: no
pixels (model_shards/image_processing.py), no weights (model_shards/vision.py).
Tests: tests/model_shards/test_vision.py (against transformers' `get_rope_index`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from model_shards.config import ModelConfig

TEXT, IMAGE, VIDEO = 0, 1, 2  # modality type of a token (HF `mm_token_type_ids`)
KINDS = {"image": IMAGE, "video": VIDEO}


@dataclass(frozen=True)
class VisionTokenIds:
    """The special token ids of the vision placeholders (config.json top level)."""

    image: int  # <|image_pad|>
    video: int  # <|video_pad|>
    vision_start: int  # <|vision_start|>
    vision_end: int  # <|vision_end|>

    @staticmethod
    def from_config(cfg: ModelConfig) -> VisionTokenIds:
        ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
        if cfg.vision is None or any(i is None for i in ids):
            raise ValueError(
                "this model takes no images or videos: config.json has no vision_config or lacks "
                "image_token_id / video_token_id / vision_start_token_id / vision_end_token_id"
            )
        return VisionTokenIds(*(int(i) for i in ids))  # type: ignore[arg-type]  # None excluded above


@dataclass(frozen=True)
class VisionItem:
    """One image or video of a prompt, as the vision tower sees it.

    Attributes:
        kind: "image" or "video".
        grid_thw: (t, h, w) in patches (t temporal patches; h, w multiples of the merge size).
        timestamps: videos only, seconds of each temporal patch (len t); written into the prompt.
    """

    kind: str
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"vision item kind {self.kind!r} is not 'image' or 'video'")
        t, h, w = self.grid_thw
        if min(t, h, w) < 1:
            raise ValueError(f"grid_thw {self.grid_thw} must be positive")
        if self.kind == "image" and t != 1:
            raise ValueError(f"an image has one temporal patch, got grid_thw {self.grid_thw}")
        if self.kind == "video" and len(self.timestamps) != t:
            raise ValueError(f"a video with {t} temporal patches needs {t} timestamps, got {len(self.timestamps)}")

    def tokens(self, *, merge_size: int) -> int:
        """Pad tokens (= vision tower outputs) of the whole item: t * h * w / merge^2."""
        t, h, w = self.grid_thw
        return t * (h // merge_size) * (w // merge_size)


def timestamp_text(seconds: float) -> str:
    """The text written before each temporal patch of a video: `<{t:.1f} seconds>`."""
    return f"<{seconds:.1f} seconds>"


# ------------------------------------------------------------------------------ placeholders
def expand_placeholders(
    token_ids: Sequence[int],
    items: Sequence[VisionItem],
    *,
    tokens: VisionTokenIds,
    merge_size: int,
    encode_text: Callable[[str], list[int]],
) -> list[int]:
    """Expand each placeholder of a tokenized chat prompt into what the model reads.

    Images (`...<|image_pad|>...`): the pad becomes t*h*w/merge^2 copies of itself.
    Videos (`<|vision_start|><|video_pad|><|vision_end|>`, or a bare `<|video_pad|>`): replaced by,
    per temporal patch, `encode_text("<{t:.1f} seconds>")` + vision_start + video_pad x (h*w/merge^2)
    + vision_end. The i-th image placeholder takes the i-th image of `items`, likewise videos.

    NOTE: this is the Qwen processor's (and vLLM's) rule: the template's wrapping start/end pair
    is replaced with the video. transformers 5.24's generic replacement swaps only the pad and
    keeps an extra outer `<|vision_start|>` ... `<|vision_end|>` around the frames.

    Args:
        token_ids: the prompt with one pad token per image / video.
        items: the prompt's images and videos in prompt order.
        encode_text: the tokenizer (plain text, no special tokens added).
    Raises:
        ValueError: the number of placeholders of a kind differs from the items of that kind.
    """
    queues = {kind: iter([it for it in items if it.kind == kind]) for kind in KINDS}
    counts = {kind: sum(it.kind == kind for it in items) for kind in KINDS}
    seen = {kind: 0 for kind in KINDS}

    def take(kind: str) -> VisionItem:
        seen[kind] += 1
        item = next(queues[kind], None)
        if item is None:
            raise ValueError(f"the prompt has more {kind} placeholders than the {counts[kind]} {kind}(s) given")
        return item

    out: list[int] = []
    ids = list(token_ids)
    i = 0
    while i < len(ids):
        tok = ids[i]
        if tok == tokens.image:
            out.extend([tokens.image] * take("image").tokens(merge_size=merge_size))
        elif tok == tokens.video:
            item = take("video")
            wrapped = (
                bool(out) and out[-1] == tokens.vision_start and i + 1 < len(ids) and ids[i + 1] == tokens.vision_end
            )
            if wrapped:
                out.pop()
                i += 1  # skip the template's vision_end too
            _, h, w = item.grid_thw
            frame = (
                [tokens.vision_start] + [tokens.video] * ((h // merge_size) * (w // merge_size)) + [tokens.vision_end]
            )
            for seconds in item.timestamps:
                out.extend(encode_text(timestamp_text(seconds)))
                out.extend(frame)
        else:
            out.append(tok)
        i += 1
    for kind in KINDS:
        if seen[kind] != counts[kind]:
            raise ValueError(
                f"{counts[kind]} {kind}(s) were given but the prompt has {seen[kind]} {kind} placeholder(s)"
            )
    return out


def token_types(token_ids: Sequence[int], *, tokens: VisionTokenIds) -> list[int]:
    """Per token: IMAGE for `<|image_pad|>`, VIDEO for `<|video_pad|>`, else TEXT (HF `mm_token_type_ids`)."""
    return [IMAGE if t == tokens.image else VIDEO if t == tokens.video else TEXT for t in token_ids]


# ------------------------------------------------------------------------------ positions
def _frame_grids(items: Sequence[VisionItem], kind: str) -> Iterator[tuple[int, int, int]]:
    """Grids a run of `kind` consumes, in order; a video counts as t grids of t = 1 (one per timestamp)."""
    for it in items:
        if it.kind == kind:
            t, h, w = it.grid_thw
            yield from [(1, h, w)] * t if kind == "video" else [it.grid_thw]


def mrope_positions(types: Sequence[int], items: Sequence[VisionItem], *, merge_size: int) -> tuple[torch.Tensor, int]:
    """3-D MRoPE position ids of a whole prompt and its decode offset.

    Walks runs of equal type with a counter p = 0:
      text run of n tokens: all three rows p .. p+n-1, then p += n;
      vision run (one image, or one temporal patch of a video) with merged grid (t', h', w'):
      T = p + t_idx, H = p + row, W = p + col over the (t', h', w') grid flattened row-major,
      then p += max(h', w')  (not the token count).
    rope_delta = max(position) + 1 - L: decode token at cache length c gets position c + rope_delta
    on all three rows (model_spec §4.3). A prefill chunk of tokens [a, b) takes positions[:, a:b].

    Args:
        types: per token TEXT / IMAGE / VIDEO (`token_types`), after `expand_placeholders`.
        items: the prompt's images and videos in prompt order.
    Returns:
        positions [3, L] int64, rope_delta (int, <= 0).
    Raises:
        ValueError: a vision run whose length does not match its grid, or runs / items that differ in number.
    """
    grids = {IMAGE: _frame_grids(items, "image"), VIDEO: _frame_grids(items, "video")}
    parts: list[torch.Tensor] = []
    p = 0
    start = 0
    for kind, run in itertools.groupby(types):
        n = len(list(run))
        if kind == TEXT:
            parts.append(torch.arange(p, p + n).expand(3, n))
            p += n
        elif kind in grids:
            name = "image" if kind == IMAGE else "video frame"
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"a {name} run at token {start} has no matching {name} in the items")
            t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
            if n != t * h * w:
                raise ValueError(f"the {name} run at token {start} has {n} tokens, its grid {grid} needs {t * h * w}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + p)
            p += max(h, w)
        else:
            raise ValueError(f"token type {kind} at token {start} is not TEXT, IMAGE or VIDEO")
        start += n
    for kind, rest in grids.items():
        if next(rest, None) is not None:
            raise ValueError(
                f"more {'images' if kind == IMAGE else 'video frames'} were given than the prompt has runs for"
            )
    if not parts:
        raise ValueError("an empty prompt has no positions")
    positions = torch.cat(parts, dim=1).to(torch.long)
    return positions, int(positions.max()) + 1 - positions.shape[1]
