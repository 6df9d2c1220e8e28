"""generation_config.json: the checkpoint's default sampling settings and stop tokens.

Owns: reading the file once into a typed object; requests that leave a parameter unset take
its value from here (vLLM's behaviour). Absent file -> neutral defaults (temperature 1,
no top-k/top-p) and the config's eos ids. Tests: tests/model_shards/test_config.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model_shards.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int | None = None
    # Not a transformers key: our default thinking budget (replicas/api/request_builder.py); None: unbounded.
    max_thinking_tokens: int | None = None

    @staticmethod
    def load(folder: str | Path, cfg: ModelConfig) -> GenerationDefaults:
        path = Path(folder) / "generation_config.json"
        raw: dict = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        eos = raw.get("eos_token_id")
        eos_ids = list(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for e in cfg.eos_token_ids:
            if e not in eos_ids:
                eos_ids.append(e)
        do_sample = raw.get("do_sample", True)
        return GenerationDefaults(
            # do_sample=false in a generation config means greedy by default.
            temperature=float(raw.get("temperature", 1.0)) if do_sample else 0.0,
            top_p=float(raw.get("top_p", 1.0)),
            top_k=int(raw.get("top_k", 0) or 0),
            min_p=float(raw.get("min_p", 0.0) or 0.0),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
            presence_penalty=float(raw.get("presence_penalty", 0.0)),
            frequency_penalty=float(raw.get("frequency_penalty", 0.0)),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            max_new_tokens=raw.get("max_new_tokens"),
            max_thinking_tokens=_budget(raw.get("max_thinking_tokens"), path),
        )


def _budget(value: object, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: max_thinking_tokens must be a non-negative integer, got {value!r}")
    return value
