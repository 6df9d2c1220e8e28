"""`transformers serve` for a Qwen3.5-MoE folder on a machine without torchvision (used by bench_frontpath.py).

The checkpoint ships preprocessor_config.json / video_preprocessor_config.json, so `transformers
serve` loads it with AutoProcessor, whose Qwen3-VL video processor needs torchvision; the CPU
venv has none (PyPI's torchvision wheels are CUDA builds that do not load with torch+cpu). When
AutoProcessor fails for that reason the tokenizer is loaded instead, which is all the text
endpoints use: /v1/completions tokenizes with `getattr(processor, "tokenizer", processor)` and
streams with its Rust tokenizer, and generation is the same `model.generate` (continuous
batching off). Everything else is `transformers serve` unchanged: same CLI, same FastAPI app.

Usage: python benchmarks/tf_serve_textonly.py MODEL_DIR [transformers serve options]
"""

from __future__ import annotations

import sys


def _patch_processor_fallback() -> None:
    from transformers import AutoTokenizer
    from transformers.cli.serving import model_manager

    original = model_manager.ModelManager._load_processor

    def load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):  # noqa: ANN001, ANN202  # transformers own class
        try:
            return original(self, model_id_and_revision, gguf_file=gguf_file)
        except (ImportError, ValueError) as exc:
            if "torchvision" not in str(exc).lower():
                raise
            model_id, revision = model_manager.split_revision(model_id_and_revision)
            print(
                f"[tf_serve_textonly] AutoProcessor needs torchvision ({type(exc).__name__}); "
                f"serving text with the tokenizer of {model_id}",
                file=sys.stderr,
                flush=True,
            )
            return AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=self.trust_remote_code)

    model_manager.ModelManager._load_processor = load_processor


def main() -> int:
    _patch_processor_fallback()
    from transformers.cli.transformers import main as transformers_main

    sys.argv = ["transformers", "serve", *sys.argv[1:]]
    return transformers_main() or 0


if __name__ == "__main__":
    sys.exit(main())
