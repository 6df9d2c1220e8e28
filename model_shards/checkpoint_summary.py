"""Summarising a checkpoint folder from its safetensors headers: what `epserve inspect` reports.

Owns: tensor / parameter / byte counts by part (trunk, experts, mtp, vision) and by dtype (FP8
scale companions count as bytes, never as parameters), the shard table (index total_size vs the
bytes the headers declare), which side files are present (tokenizer, generation config), and the
problems that make a folder unloadable, one line each. Reads headers only (CheckpointReader,
check_checkpoint), never tensor data. Must not: print (epserve/inspect_cmd.py formats), or
keep its own name table (model_shards/weights.py has the one table).
Tests: tests/model_shards/test_inspect.py, tests/model_shards/test_bad_checkpoints.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model_shards.checkpoint_files import INDEX_NAME, CheckpointError, CheckpointReader, TensorInfo, read_header
from model_shards.config import ConfigError, ModelConfig, from_hf_config, load_config_dict
from model_shards.weights import (
    FLOAT_DTYPES,
    PARTS,
    SCALE_SUFFIX,
    CheckpointLayout,
    CheckpointProblems,
    TensorSpec,
    check_checkpoint,
    part_of,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class PartCount:
    """Tensors, parameters (FP8 scales excluded) and bytes (scales included) of one part."""

    tensors: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class DtypeCount:
    """Tensors and bytes stored in one safetensors dtype ("BF16", "F8_E4M3", ...)."""

    tensors: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class CheckpointSummary:
    """Everything `epserve inspect` says about a folder; `to_json()` is its `--json` output.

    Attributes:
        config: architecture facts (`config_facts`), or only what could be read when config.json is bad.
        layout: prefix / expert layout / MTP layout / vision, or None when undecidable.
        parts: PARTS -> counts, from the tensors the headers list.
        dtypes: safetensors dtype -> counts.
        shards: shard files, index total_size, bytes the headers declare.
        files: side file name -> present.
        problems: one line per reason the folder cannot be loaded (empty: loadable).
        warnings: things that do not stop loading (no tokenizer, no MTP tensors, total_size mismatch).
    """

    folder: str
    config: dict[str, Any]
    layout: dict[str, Any] | None
    parts: dict[str, PartCount]
    dtypes: dict[str, DtypeCount]
    shards: dict[str, Any]
    files: dict[str, bool]
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "config": self.config,
            "layout": self.layout,
            "parts": {k: asdict(v) for k, v in self.parts.items()},
            "dtypes": {k: asdict(v) for k, v in self.dtypes.items()},
            "shards": self.shards,
            "files": self.files,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "ok": self.ok,
        }


# ------------------------------------------------------------------------------ counting
def is_scale(name: str) -> bool:
    """Whether a tensor is an FP8 block-scale companion (`...weight_scale_inv`): bytes, not parameters."""
    return name.endswith(SCALE_SUFFIX)


def count_tensors(tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, PartCount], dict[str, DtypeCount]]:
    """Counts by part (every part of PARTS present, zeros included) and by dtype, from headers."""
    parts = {p: PartCount() for p in PARTS}
    dtypes: dict[str, DtypeCount] = {}
    for name, info in tensors.items():
        part = parts[part_of(name)]
        part.tensors += 1
        part.params += 0 if is_scale(name) else math.prod(info.shape)
        part.bytes += info.nbytes
        dt = dtypes.setdefault(info.dtype, DtypeCount())
        dt.tensors += 1
        dt.bytes += info.nbytes
    return parts, dict(sorted(dtypes.items()))


def expected_params_by_part(specs: Mapping[str, TensorSpec]) -> dict[str, int]:
    """Parameters per part of an `expected_tensors` table (planner arithmetic, no weights needed).

    Args:
        specs: name -> TensorSpec, as `weights.expected_tensors` returns it.
    Returns:
        PARTS -> parameter count; FP8 scale companions are excluded.
    """
    out = {p: 0 for p in PARTS}
    for name, spec in specs.items():
        if not is_scale(name):
            out[spec.part] += math.prod(spec.shape)
    return out


# ------------------------------------------------------------------------------ facts
def config_facts(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture as `inspect` shows it; keys are the HuggingFace config.json field names
    where one exists (so a reader can compare with the file), plus derived counts."""
    v, q = cfg.vision, cfg.quant
    facts: dict[str, Any] = {
        "model_type": cfg.model_type,
        "dtype": cfg.dtype,
        "num_hidden_layers": cfg.num_layers,
        "linear_attention_layers": len(cfg.linear_layers),
        "full_attention_layers": len(cfg.attention_layers),
        "full_attention_layer_ids": list(cfg.attention_layers),
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rotary_dim": cfg.rotary_dim,
        "linear_num_key_heads": cfg.linear_num_key_heads,
        "linear_num_value_heads": cfg.linear_num_value_heads,
        "linear_key_head_dim": cfg.linear_key_head_dim,
        "linear_value_head_dim": cfg.linear_value_head_dim,
        "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
        "mtp_num_hidden_layers": cfg.mtp_num_hidden_layers,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vision": None,
        "quantization": None,
    }
    if v is not None:
        facts["vision"] = {
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "in_channels": v.in_channels,
            "num_position_embeddings": v.num_position_embeddings,
        }
    if q is not None:
        # from_hf_config accepts only quant_method fp8 with fmt e4m3, so those two are what was read.
        facts["quantization"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [q.block_rows, q.block_cols],
            "activation_scheme": q.activation_scheme,
            "modules_to_not_convert": list(q.modules_to_not_convert),
        }
    return facts


def problem_lines(problems: CheckpointProblems) -> list[str]:
    """One line per problem `check_checkpoint` found, every tensor named (no truncation)."""
    lines = [f"missing tensor {n}" for n in problems.missing]
    lines += [f"unexpected tensor {n} (not in the Qwen3.5-MoE layout of this config)" for n in problems.unexpected]
    lines += [f"tensor {n} has shape {list(got)}, expected {list(want)}" for n, want, got in problems.wrong_shape]
    lines += [
        f"tensor {n} is {dt}, expected F8_E4M3 (the config declares FP8 weights)" for n, dt in problems.wrong_dtype
    ]
    lines += [
        f"tensor {n} is {dt}, expected {'/'.join(FLOAT_DTYPES)} (the config does not quantise it, so it "
        "would load without scales)"
        for n, dt in problems.not_float
    ]
    return lines


# ------------------------------------------------------------------------------ summary
def summarise(folder: str | Path) -> CheckpointSummary:
    """Summarise a checkpoint folder from config.json and the safetensors headers.

    Args:
        folder: a HuggingFace model folder.
    Returns:
        The summary; `problems` names every reason the folder would not load (the same checks
        `LocalModel.load` runs before reading any tensor data).
    """
    folder = Path(folder)
    problems: list[str] = []
    warnings: list[str] = []
    raw, cfg = _read_config(folder, problems)
    reader, tensors = _read_headers(folder, problems)
    layout = None
    if reader is not None and cfg is not None:
        try:
            found = CheckpointLayout.detect(reader, cfg)
        except CheckpointError as exc:
            problems.append(str(exc))
        else:
            layout = {
                "prefix": found.prefix,
                "experts": found.layout,
                "mtp": found.mtp_layout,
                "vision": found.has_vision,
            }
            problems += problem_lines(check_checkpoint(reader, cfg, found))
            warnings += _absent_parts(cfg, found)
    parts, dtypes = count_tensors(tensors)
    files = {name: (folder / name).is_file() for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE)}
    if not files[TOKENIZER_FILES[0]]:
        warnings.append(f"no {TOKENIZER_FILES[0]}: only --prompt-ids prompts work (text prompts and chat need it)")
    facts = config_facts(cfg) if cfg is not None else {"model_type": raw.get("model_type")}
    if cfg is None and isinstance(raw.get("quantization_config"), dict):
        facts["quantization"] = raw["quantization_config"]
    return CheckpointSummary(
        folder=str(folder),
        config=facts,
        layout=layout,
        parts=parts,
        dtypes=dtypes,
        shards=_shard_table(folder, tensors, warnings),
        files=files,
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def _read_config(folder: Path, problems: list[str]) -> tuple[dict[str, Any], ModelConfig | None]:
    try:
        raw = load_config_dict(folder)
    except ConfigError as exc:
        problems.append(str(exc))
        return {}, None
    try:
        return raw, from_hf_config(raw)
    except (ValueError, TypeError) as exc:  # ConfigError, or a field of the wrong type
        problems.append(f"config.json: {exc}")
        return raw, None


def _read_headers(folder: Path, problems: list[str]) -> tuple[CheckpointReader | None, dict[str, TensorInfo]]:
    """The reader (index/shard integrity checked), or on failure its error plus whatever headers
    of the shards present can still be read, so the counts show what the folder does hold."""
    try:
        reader = CheckpointReader(folder)
    except CheckpointError as exc:
        problems.append(str(exc))
    else:
        return reader, reader.tensors
    tensors: dict[str, TensorInfo] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            found, _ = read_header(path)
        except CheckpointError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
            continue
        tensors.update(found)
    return None, tensors


def _absent_parts(cfg: ModelConfig, layout: CheckpointLayout) -> list[str]:
    out = []
    if cfg.has_mtp and layout.mtp_layout is None:
        out.append(
            f"config declares {cfg.mtp_num_hidden_layers} MTP layer(s) but the checkpoint has no mtp.* "
            "tensors: generation works, MTP speculation is unavailable"
        )
    if cfg.vision is not None and not layout.has_vision:
        out.append("config has a vision_config but the checkpoint has no model.visual.* tensors: text only")
    return out


def _shard_table(folder: Path, tensors: Mapping[str, TensorInfo], warnings: list[str]) -> dict[str, Any]:
    """Shard files (the index's, else those present), tensors and bytes per shard, index total_size."""
    index_path = folder / INDEX_NAME
    total_size: int | None = None
    listed: list[str] | None = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            listed = sorted(set(index["weight_map"].values()))
            total_size = (index.get("metadata") or {}).get("total_size")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass  # the reader has already reported an unreadable index
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    per_file: dict[str, list[int]] = {}
    for info in tensors.values():
        counts = per_file.setdefault(info.file, [0, 0])
        counts[0] += 1
        counts[1] += info.nbytes
    tensor_bytes = sum(info.nbytes for info in tensors.values())
    if total_size is not None and int(total_size) != tensor_bytes:
        warnings.append(
            f"{INDEX_NAME} metadata.total_size is {int(total_size):,} but the shard headers declare "
            f"{tensor_bytes:,} bytes of tensors"
        )
    if listed is not None and set(present) - set(listed):
        warnings.append(f"shard files not named in {INDEX_NAME} (never loaded): {sorted(set(present) - set(listed))}")
    files = []
    for name in listed if listed is not None else present:
        path = folder / name
        tcount, tbytes = per_file.get(name, [0, 0])
        files.append(
            {"file": name, "tensors": tcount, "bytes": tbytes, "size": path.stat().st_size if path.is_file() else None}
        )
    return {
        "count": len(files),
        "index": listed is not None,
        "index_total_size": total_size,
        "tensor_bytes": tensor_bytes,
        "files": files,
    }
