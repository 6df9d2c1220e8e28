"""Small synthetic video files for tests, written with PyAV (the `video` extra)."""

from __future__ import annotations

import io

import numpy as np


def make_video(
    *,
    codec: str = "libx264",
    container: str = "mp4",
    frames: int = 20,
    fps: int = 10,
    width: int = 64,
    height: int = 48,
    seed: int = 0,
    noise: bool = False,
) -> bytes:
    """`frames` frames of moving coloured bars plus faint noise (so frames differ), encoded in memory;
    `noise`: full-range noise, which barely compresses (a large file from a short clip)."""
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = rng.integers(0, 255 if noise else 60, (height, width, 3), dtype=np.uint8)
            rgb = np.minimum(rgb, 255 - 150)  # the bars below add at most 150
            rgb[:, (i * 5) % width :, 0] += 150
            rgb[(i * 3) % height :, :, 2] += 120
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def pyav_frames(data: bytes) -> tuple[list, float]:
    """Every frame PyAV decodes from `data` (PIL RGB images, presentation order) and the stream's average rate."""
    import av

    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        return [f.to_image() for f in c.decode(stream)], float(stream.average_rate)
