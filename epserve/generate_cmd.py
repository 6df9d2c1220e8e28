"""`epserve generate`: complete one prompt, in one process or on an expert-parallel group.

Unset sampling flags take the checkpoint's generation_config.json defaults (as requests to
`serve` do); `--temperature 0` is greedy. Without tokenizer files, `--prompt-ids` works and
text features refuse with a message naming the missing tokenizer. The prompt runs on the serving
Engine over an in-process runner (replicas/ep/offline_generate.py); text is decoded here from its token ids.
Tests: tests/replicas/test_offline_generate.py, tests/model_shards/test_model_parity.py, tests/replicas/test_startup.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from epserve.cli import UserError
from epserve.prefix_flags import add_prefix_cache_flags, prefix_cache_from_args
from model_shards.cache_sizing import DEFAULT_GPU_MEMORY_UTILIZATION
from model_shards.config import from_hf_config
from model_shards.generation_config import GenerationDefaults
from model_shards.sampling import SamplingParams
from replicas.ep.speculative import MAX_SPECULATIVE_TOKENS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt (single process or expert-parallel)")
    p.add_argument("--model", help="checkpoint folder (default: the embedded tiny model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user message with the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, help="nucleus mass in (0, 1] (default: generation_config.json)")
    p.add_argument("--top-k", type=int, help="0 disables (default: generation_config.json)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype (auto = the checkpoint's)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="single process: auto (cuda:0 when torch sees a GPU, else cpu), cpu, cuda or cuda:N; "
        "ranks of a group take cuda where Ray gives them a GPU",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=DEFAULT_GPU_MEMORY_UTILIZATION,
        help="on cuda: fraction of the GPU's memory the model may use; KV blocks fill what the weights leave "
        "(default 0.9; ignored on cpu)",
    )
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="single process on cuda: run decode steps eagerly instead of replaying the CUDA graphs captured at "
        "start (replicas/ep/decode_graphs.py; nothing to turn off on cpu)",
    )
    p.add_argument("--output", choices=["text", "json"], default="text")
    p.add_argument("--trunk-ranks", type=int, default=1, help="trunk ranks D (>= 1)")
    p.add_argument("--expert-ranks", type=int, default=0, help="expert ranks X (0 = experts in the trunk process)")
    p.add_argument("--nodes", type=int, help="start a local Ray cluster of N nodes on loopback")
    p.add_argument("--address", help="join an existing Ray cluster at this address")
    p.add_argument("--block-size", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument(
        "--speculative-tokens",
        type=int,
        default=0,
        metavar="K",
        help="draft K tokens per step with the checkpoint's MTP head (0 = off; greedy output is identical either way)",
    )
    add_prefix_cache_flags(p)
    p.set_defaults(run=run)


def sampling_from_args(args: argparse.Namespace, defaults: GenerationDefaults) -> SamplingParams:
    temperature = defaults.temperature if args.temperature is None else args.temperature
    top_p = defaults.top_p if args.top_p is None else args.top_p
    top_k = defaults.top_k if args.top_k is None else args.top_k
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < -1:
        raise UserError(f"--top-k must be >= -1, got {top_k}")
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        min_p=defaults.min_p,
        repetition_penalty=defaults.repetition_penalty,
        seed=args.seed,
    )


def _prompt_ids(args: argparse.Namespace, folder: Path):  # noqa: ANN202  # (ids, tokenizer | None)
    from model_shards.tokenizer import Tokenizer, TokenizerMissing

    tokenizer = None
    try:
        tokenizer = Tokenizer.from_dir(folder)
    except TokenizerMissing:
        if args.prompt is not None or args.chat:
            raise UserError(
                f"{folder} has no tokenizer (tokenizer.json): --prompt/--chat need one; pass --prompt-ids instead"
            ) from None
    if args.prompt_ids is not None:
        if args.chat:
            raise UserError("--chat applies the chat template to --prompt text, not to --prompt-ids")
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        return ids, tokenizer
    assert tokenizer is not None
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    return tokenizer.encode(text), tokenizer


def run(args: argparse.Namespace) -> int:
    from model_shards.tiny_checkpoint import embedded_model

    folder = Path(args.model) if args.model else embedded_model()
    if not folder.is_dir():
        raise UserError(f"--model {folder} is not a folder")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.trunk_ranks < 1 or args.expert_ranks < 0:
        raise UserError("--trunk-ranks must be >= 1 and --expert-ranks >= 0")
    cfg = from_hf_config(folder)
    if not 0 <= args.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise UserError(f"--speculative-tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {args.speculative_tokens}")
    if args.speculative_tokens and not cfg.has_mtp:
        raise UserError(f"--speculative-tokens needs an MTP head: {folder}'s config has mtp_num_hidden_layers 0")
    prefix_cache_from_args(args, num_slots=1)  # bad --prefix-* values fail before the model loads
    defaults = GenerationDefaults.load(folder, cfg)
    params = sampling_from_args(args, defaults)
    prompt, tokenizer = _prompt_ids(args, folder)
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    if len(prompt) + args.max_tokens > cfg.max_position_embeddings:
        raise UserError(
            f"prompt ({len(prompt)}) + max tokens ({args.max_tokens}) exceed the model's context "
            f"{cfg.max_position_embeddings}"
        )
    gen = _generate(args, folder, prompt, params, defaults, cfg)
    text = tokenizer.decode(list(gen.token_ids)) if tokenizer is not None else None
    if args.output == "json":
        print(
            json.dumps(
                {
                    "token_ids": list(gen.token_ids),
                    "text": text,
                    "prompt_token_ids": prompt,
                    "finish_reason": gen.finish_reason,
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(gen.token_ids)},
                    "timings": {"prefill_s": round(gen.ttft_s, 4), "decode_s": round(gen.decode_s, 4)},
                    "speculative": {
                        "steps": gen.steps,
                        "draft_tokens": gen.draft_tokens,
                        "accepted_tokens": gen.accepted_tokens,
                    },
                }
            )
        )
    else:
        print(text if text is not None else " ".join(map(str, gen.token_ids)))
        print(f"[{len(gen.token_ids)} tokens, finish_reason={gen.finish_reason}]", file=sys.stderr)
    return 0


def _request(args: argparse.Namespace, prompt: list[int], params: SamplingParams, defaults: GenerationDefaults):  # noqa: ANN202  # GenerateRequest
    from replicas.engine.engine_types import GenerateRequest

    return GenerateRequest(
        request_id="epserve-generate",
        prompt_ids=tuple(prompt),
        params=params,
        max_tokens=args.max_tokens,
        eos_token_ids=defaults.eos_token_ids,
    )


def _device(args: argparse.Namespace):  # noqa: ANN202  # torch.device (torch is imported late)
    from model_shards.device import resolve_device

    if not 0 < args.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    try:
        return resolve_device(args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _generate(args, folder, prompt, params, defaults, cfg):  # noqa: ANN001, ANN202  # thin glue -> Completion
    """The serving Engine over an in-process runner: the model in this process, or an expert-parallel group."""
    from replicas.engine.errors import RequestRejected
    from replicas.ep.offline_generate import GenerationFailed, cache_sizes, offline_generate

    req = _request(args, prompt, params, defaults)
    k = args.speculative_tokens
    prefix_cache, checkpoints = prefix_cache_from_args(args, num_slots=1)
    caches = cache_sizes(
        len(prompt), args.max_tokens, spec_tokens=k, block_size=args.block_size, state_checkpoints=checkpoints
    )
    try:
        if args.expert_ranks == 0 and args.trunk_ranks == 1 and args.nodes is None and args.address is None:
            from model_shards.model import LocalModel
            from replicas.ep.local_runner import LocalRunner

            runner = LocalRunner(
                LocalModel.load(folder, dtype=args.dtype, device=_device(args)),
                caches,
                gpu_memory_utilization=args.gpu_memory_utilization,
                cuda_graph=args.cuda_graph,
            )
            try:
                return offline_generate(
                    runner, req, spec_tokens=k, vocab_size=cfg.vocab_size, prefix_cache=prefix_cache
                )
            finally:
                runner.close()
        if args.device != "auto":
            raise UserError(
                f"--device {args.device} applies to the single-process run; the ranks of an expert-parallel group "
                "take cuda where Ray gives them a GPU"
            )
        from epserve.group_runner import run_on_group

        return run_on_group(args, folder, req, caches, vocab_size=cfg.vocab_size, prefix_cache=prefix_cache)
    except (RequestRejected, GenerationFailed) as exc:
        raise UserError(f"generation failed: {exc}") from None
