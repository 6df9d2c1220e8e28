"""`epserve bench`: load-test a server over HTTP (/v1/completions, streaming) or gRPC (Generate).

Flags follow `vllm bench serve` (design.md's table); the work is in loadtest/: datasets, arrival
process, clients, runner, aggregation, report and plot. Prints a summary table like vLLM's;
`--result-json` and `--plot` write the full result and a PNG. Exit status 1 when any request failed.
Requests follow the OpenAI schema by default, so any OpenAI-compatible server can be measured:
random and shared-prefix prompts are text of exact token counts, built with the served model's
tokenizer (`--tokenizer DIR`, else the server's /tokenize and /detokenize); `--prompt-token-ids`
sends token-id lists instead and `--ignore-eos` the non-standard fields that fix output lengths.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import sys

from epserve.cli import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test a server: TTFT, TPOT, ITL, E2E, throughput, goodput")
    add = p.add_argument
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--base-url", metavar="URL", help="HTTP server, e.g. http://127.0.0.1:8000 (a /v1 suffix is accepted)"
    )
    target.add_argument("--grpc", metavar="HOST:PORT", help="gRPC server (Serve's gRPC proxy)")
    add("--grpc-application", metavar="APP", help="Serve application name sent as gRPC metadata (several apps)")
    add("--model", metavar="NAME", help="model name (default: the server's first model)")
    add(
        "--tokenizer",
        metavar="DIR",
        help="the served model's folder (its tokenizer builds the text prompts; "
        "needed for sharegpt); default: the server's /tokenize and /detokenize",
    )
    add(
        "--prompt-token-ids",
        action="store_true",
        help="send random / shared-prefix prompts as token-id lists "
        "(epserve and vLLM take them; no tokenizer needed) instead of text",
    )
    add(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos and min_tokens = max_tokens, so every request "
        "generates exactly its output length (non-standard fields: strict OpenAI-schema servers reject them)",
    )
    add(
        "--dataset",
        choices=["random", "sharegpt", "shared-prefix", "multi-turn"],
        default="random",
        help="multi-turn: --num-prompts chat conversations replayed turn by turn with the server's own replies "
        "(HTTP only; prints cached tokens per turn)",
    )
    add("--dataset-path", metavar="FILE", help="ShareGPT JSON file (--dataset sharegpt)")
    add(
        "--random-input-len",
        type=int,
        metavar="N",
        default=1024,
        help="prompt tokens (also the shared-prefix question; default 1024)",
    )
    add("--random-output-len", type=int, metavar="N", default=128, help="output tokens (default 128)")
    add(
        "--random-range-ratio",
        type=float,
        metavar="R",
        default=0.0,
        help="lengths uniform in [len*(1-R), len*(1+R)] (default 0: exact)",
    )
    add("--shared-prefix-len", type=int, metavar="N", default=1024, help="prefix tokens shared by a group")
    add("--shared-prefix-groups", type=int, metavar="N", default=8, help="number of prefix groups")
    add(
        "--shared-prefix-group-firsts",
        action="store_true",
        help="send one request of each group first, the rest shuffled after them (prefix-cache hit rates)",
    )
    add("--sharegpt-output-len", type=int, metavar="N", help="fixed output length instead of the gpt turn's")
    add("--multi-turn-turns", type=int, metavar="N", default=6, help="user turns per conversation (default 6)")
    add(
        "--num-prompts",
        type=int,
        metavar="N",
        default=1000,
        help="requests to send (with --duration: distinct prompts, cycled)",
    )
    add(
        "--request-rate",
        type=float,
        metavar="RPS",
        default=math.inf,
        help="mean requests/s, gamma arrivals (default inf: all at once)",
    )
    add("--burstiness", type=float, metavar="K", default=1.0, help="gamma shape of arrivals (1 = Poisson, <1 burstier)")
    add("--max-concurrency", type=int, metavar="N", help="at most N requests in flight")
    add("--duration", type=float, metavar="S", help="stop sending after S seconds (requests in flight finish)")
    add("--warmup", type=int, metavar="N", default=1, help="requests sent before the measured run (default 1)")
    add("--goodput", nargs="+", metavar="KEY:MS", help="SLOs in ms, e.g. ttft:500 tpot:50 e2e:2000 (also itl)")
    add("--temperature", type=float, metavar="T", default=0.0, help="sampling temperature (default 0, greedy)")
    add("--api-key", metavar="KEY", help="API key (Authorization: Bearer KEY)")
    add("--seed", type=int, metavar="N", default=0, help="seed of prompts and arrival times")
    add("--request-timeout", type=float, metavar="S", default=600.0, help="deadline of one request (default 600 s)")
    add("--result-json", metavar="FILE", help="write the full result (summary and per-request data) here")
    add("--plot", metavar="PNG", help="write a PNG of latency distributions and throughput over time here")
    add("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from loadtest.metrics import parse_goodput
    from loadtest.report import build_result, summary_table, write_json
    from loadtest.runner import RunConfig, WarmupFailed

    try:
        slos = parse_goodput(args.goodput)
        cfg = RunConfig(
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            duration_s=args.duration,
            warmup=args.warmup,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.plot:
        _check_plot_dependency()  # before the run: a missing extra must not cost a whole benchmark
    if args.dataset == "multi-turn":
        return _multi_turn(args)
    client = _client(args)
    model = asyncio.run(_resolve_model(client))
    requests = _dataset(args, model)
    print(f"benchmarking model '{model}': {_describe_load(cfg)}", file=sys.stderr, flush=True)
    try:
        outcome = asyncio.run(_run(client, requests, cfg))
    except WarmupFailed as exc:
        raise UserError(str(exc)) from None
    config = {k: v for k, v in vars(args).items() if k not in ("run", "api_key", "command")}
    config.update(
        model=model,
        backend="grpc" if args.grpc else "openai-completions",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    result = build_result(outcome, config=config, slos=slos)
    print(summary_table(result), flush=True)
    if args.result_json:
        write_json(result, args.result_json)
        print(f"result written to {args.result_json}")
    if args.plot:
        from loadtest.plot import write_plot

        write_plot(result, args.plot, title=_plot_title(args, model))
        print(f"plot written to {args.plot}")
    return 1 if result["failed"] else 0


def _multi_turn(args: argparse.Namespace) -> int:
    """Replay chat conversations turn by turn (loadtest/multiturn.py); print cached tokens per turn."""
    from loadtest.http_client import OpenAICompletionsClient
    from loadtest.multiturn import ChatReplayClient, conversations, replay, turn_report
    from loadtest.report import write_json

    if args.grpc:
        raise UserError("--dataset multi-turn runs over HTTP chat completions: use --base-url")
    try:
        convs = conversations(args.num_prompts, turns=args.multi_turn_turns, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model = args.model or asyncio.run(_resolve_model(OpenAICompletionsClient(args.base_url, api_key=args.api_key)))
    client = ChatReplayClient(
        args.base_url,
        model=model,
        max_tokens=args.random_output_len,
        api_key=args.api_key,
        timeout_s=args.request_timeout,
    )

    async def go():  # noqa: ANN202  # -> list[TurnRecord]
        async with client:
            return await replay(client, convs, concurrency=args.max_concurrency or 1)

    try:
        records = asyncio.run(go())
    except ValueError as exc:  # /tokenize refused
        raise UserError(str(exc)) from None
    rows = turn_report(records)
    print(f"{'turn':>4} {'convs':>5} {'prompt':>7} {'cached':>7} {'floor':>7} {'reached':>8} {'TTFT p50 ms':>11}")
    for r in rows:
        floor = "-" if math.isnan(r["mean_floor"]) else f"{r['mean_floor']:.0f}"
        print(
            f"{r['turn']:>4} {r['conversations']:>5} {r['mean_prompt_tokens']:>7.0f} {r['mean_cached_tokens']:>7.0f} "
            f"{floor:>7} {r['reached_floor']:>8} {r['median_ttft_ms']:>11.0f}"
        )
    failed = [r for r in records if r.error is not None]
    for r in failed[:3]:
        print(f"conversation {r.conversation} turn {r.turn} failed: {r.error}", file=sys.stderr)
    if args.result_json:
        write_json({"config": {"dataset": "multi-turn"}, "turns": rows, "failed": len(failed)}, args.result_json)
        print(f"result written to {args.result_json}")
    return 1 if failed else 0


def _check_plot_dependency() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            "--plot needs matplotlib, which this environment lacks: pip install 'epserve[plot]' "
            "(bash scripts/install.sh installs it)"
        ) from None


async def _resolve_model(client) -> str:  # noqa: ANN001
    async with client:
        try:
            return await client.resolve_model()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001  # connection refused, DNS, ...: the user's target is wrong
            raise UserError(f"cannot reach the server: {type(exc).__name__}: {exc}") from None


async def _run(client, requests, cfg):  # noqa: ANN001, ANN202  # -> RunOutcome
    from loadtest.runner import run as run_bench

    async with client:
        return await run_bench(client, requests, cfg)


def _describe_load(cfg) -> str:  # noqa: ANN001
    rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g} req/s (burstiness {cfg.burstiness:g})"
    parts = [f"rate {rate}"]
    if cfg.max_concurrency:
        parts.append(f"max concurrency {cfg.max_concurrency}")
    if cfg.duration_s:
        parts.append(f"for {cfg.duration_s:g} s")
    return ", ".join(parts)


def _plot_title(args: argparse.Namespace, model: str) -> str:
    target = args.base_url or f"grpc://{args.grpc}"
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    conc = f", max concurrency {args.max_concurrency}" if args.max_concurrency else ""
    lens = (
        f"{args.random_input_len} in / {args.random_output_len} out tokens"
        if args.dataset != "sharegpt"
        else "ShareGPT lengths"
    )
    return f"epserve bench: {model} at {target}, {args.dataset} ({lens}), {rate}{conc}"


def _dataset(args: argparse.Namespace, model: str) -> list:
    from loadtest import datasets as ds

    try:
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        if args.dataset == "sharegpt":
            if not args.dataset_path or not args.tokenizer:
                raise UserError("--dataset sharegpt needs --dataset-path FILE and --tokenizer DIR")
            from model_shards.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(args.tokenizer)
            return ds.sharegpt_requests(
                args.dataset_path,
                args.num_prompts,
                tokenizer=tokenizer,
                seed=args.seed,
                output_len=args.sharegpt_output_len,
            )
        for length in (args.random_input_len, args.random_output_len):
            ds.length_bounds(length, args.random_range_ratio)  # bad values fail before any tokenizer work
        codec = _codec(args, model)
        local = codec if args.tokenizer and codec is not None else None  # loaded once: 15 MB of tokenizer.json
        space = ds.TokenSpace.from_tokenizer_dir(args.tokenizer, local) if args.tokenizer else ds.TokenSpace()
        common = dict(
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            seed=args.seed,
            space=space,
            codec=codec,
        )
        try:
            if args.dataset == "shared-prefix":
                return ds.shared_prefix_requests(
                    args.num_prompts,
                    groups=args.shared_prefix_groups,
                    prefix_len=args.shared_prefix_len,
                    group_firsts_first=args.shared_prefix_group_firsts,
                    **common,
                )
            return ds.random_requests(args.num_prompts, **common)
        finally:
            close = getattr(codec, "close", None)
            if close is not None:
                close()
    except (ValueError, OSError) as exc:  # bad lengths, a missing file, the server's /tokenize gone mid-way
        raise UserError(str(exc)) from None


def _codec(args: argparse.Namespace, model: str):  # noqa: ANN202  # TextCodec | None
    """The tokenizer that turns random ids into text prompts: None sends token ids.

    gRPC takes token ids natively, so it gets text only with --tokenizer. Over HTTP the default is the
    server's own /tokenize and /detokenize, checked here once so a server without them fails in a second."""
    if args.prompt_token_ids:
        return None
    if args.tokenizer:
        from model_shards.tokenizer import Tokenizer

        return Tokenizer.from_dir(args.tokenizer)
    if args.grpc:
        return None
    from loadtest.remote_tokenizer import RemoteTokenizer

    remote = RemoteTokenizer(args.base_url, model=model, api_key=args.api_key)
    try:
        remote.decode(remote.encode("Hello"))
    except (ValueError, OSError) as exc:
        remote.close()
        raise UserError(
            f"text prompts need the served model's tokenizer and the server's /tokenize failed "
            f"({exc}); pass --tokenizer DIR (the model's folder, or one with its tokenizer.json), "
            "or --prompt-token-ids if the server takes token-id prompts"
        ) from None
    print(
        f"building {args.num_prompts} text prompts with the server's tokenizer (/tokenize, /detokenize)",
        file=sys.stderr,
        flush=True,
    )
    return remote


def _client(args: argparse.Namespace):  # noqa: ANN202  # OpenAICompletionsClient | GrpcGenerateClient
    if args.grpc:
        from loadtest.grpc_client import GrpcGenerateClient

        return GrpcGenerateClient(
            args.grpc,
            model=args.model,
            api_key=args.api_key,
            application=args.grpc_application,
            temperature=args.temperature,
            timeout_s=args.request_timeout,
            ignore_eos=args.ignore_eos,
        )
    from loadtest.http_client import OpenAICompletionsClient

    return OpenAICompletionsClient(
        args.base_url,
        model=args.model,
        api_key=args.api_key,
        temperature=args.temperature,
        timeout_s=args.request_timeout,
        max_connections=args.max_concurrency or 0,
        ignore_eos=args.ignore_eos,
    )
