"""Reading a safetensors checkpoint folder tensor by tensor, never more than asked.

Owns: locating shards (single file or index + shards), parsing each shard's header (names,
dtypes, shapes, offsets) without touching tensor data, integrity of index vs shards
(unknown shard, tensor missing from its shard, truncated file), and reads through mmap /
`get_slice` with a count of what was read (tests assert on it). Must not: know model names.
Tests: tests/model_shards/test_inspect.py (reads counted),
tests/model_shards/test_bad_checkpoints.py (index / shard integrity, truncated files, bad headers).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_BYTES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name inside the folder
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_BYTES.get(self.dtype, 0)


@dataclass
class ReadStats:
    """What a reader has read so far (names, and bytes of tensor data)."""

    names: list[str] = field(default_factory=list)
    bytes: int = 0


def read_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Parse a safetensors header; return the tensors and the bytes the data section needs."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"shard {path.name} is truncated: shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > os.path.getsize(path) - 8:
                raise CheckpointError(f"shard {path.name} is truncated: its header claims {hlen} bytes")
            header = json.loads(f.read(hlen))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"shard {path.name} has an unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {path.name} has an unreadable safetensors header: not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = TensorInfo(
                name=name, file=path.name, dtype=str(meta["dtype"]), shape=tuple(int(d) for d in meta["shape"])
            )
            data_end = max(data_end, int(meta["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"shard {path.name} has a malformed safetensors header entry for tensor {name}: "
                "it needs dtype, shape and data_offsets"
            ) from exc
    size = os.path.getsize(path)
    if 8 + hlen + data_end > size:
        raise CheckpointError(
            f"shard {path.name} is truncated: its header needs {8 + hlen + data_end} bytes, the file has {size}"
        )
    return tensors, data_end


class CheckpointReader:
    """Tensor-level access to one checkpoint folder.

    Args:
        folder: a HuggingFace model folder with model.safetensors or an index + shards.
    Raises:
        CheckpointError: no weights, index naming missing shards, tensors absent from the shard the
            index names, truncated shards.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.stats = ReadStats()
        self.tensors = self._scan()
        self._handles: dict[str, object] = {}

    # ----------------------------------------------------------------- scanning
    def _scan(self) -> dict[str, TensorInfo]:
        index_path = self.folder / INDEX_NAME
        if index_path.exists():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{INDEX_NAME} is not a valid safetensors index: {exc}") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors weights in {self.folder}")
            if len(files) > 1:
                raise CheckpointError(
                    f"{self.folder} has {len(files)} safetensors files but no {INDEX_NAME} to say which tensor is where"
                )
            weight_map = {}
        found: dict[str, TensorInfo] = {}
        for name in files:
            path = self.folder / name
            if not path.exists():
                raise CheckpointError(f"{INDEX_NAME} names shard {name}, which is not in {self.folder}")
            tensors, _ = read_header(path)
            for tname, info in tensors.items():
                if tname in found:
                    raise CheckpointError(f"tensor {tname} is stored twice ({found[tname].file} and {name})")
                found[tname] = info
        for tname, fname in weight_map.items():
            stored = found.get(tname)
            if stored is None or stored.file != fname:
                raise CheckpointError(
                    f"{INDEX_NAME} says tensor {tname} is in {fname}, but that shard does not hold it"
                )
        if weight_map:
            unindexed = sorted(set(found) - set(weight_map))
            if unindexed:
                raise CheckpointError(f"tensors {unindexed[:5]} are in shards but not in {INDEX_NAME}")
        return found

    # ----------------------------------------------------------------- reading
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"missing tensor {name} in {self.folder}") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _handle(self, file: str):  # noqa: ANN202  # safetensors' handle type is not exported
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (a copy out of the mmap)."""
        info = self.info(name)
        tensor = self._handle(info.file).get_tensor(name)
        self.stats.names.append(name)
        self.stats.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Selected indices of dim 0 (e.g. some experts of a fused tensor), read run by run."""
        info = self.info(name)
        sl = self._handle(info.file).get_slice(name)
        parts, start = [], 0
        rows = list(rows)
        while start < len(rows):
            end = start
            while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
                end += 1
            parts.append(sl[rows[start] : rows[end] + 1])
            start = end + 1
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        self.stats.names.append(f"{name}[{len(rows)} rows]")
        self.stats.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._handles.clear()
