"""The thinking budget in the engine: `</think>` and its blank line forced exactly after max_thinking_tokens
reasoning tokens, with and without MTP speculation.

Oracles: greedy decoding without a budget (the reasoning before the forced token is unchanged), and greedy
decoding of the prompt extended by the forced text (what follows the forced tokens is what the model writes after
that text). Served behaviour (README example, tool calls and JSON after a budget, gRPC) is in
tests/replicas/test_chat_features.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from model_shards.sampling import SamplingParams
from replicas.engine.engine_types import GenerateRequest
from tests.replicas.test_speculative import BLOCK, GREEDY, peaked_checkpoint, peaked_model  # noqa: F401

pytestmark = pytest.mark.timeout(600)

THINK_CLOSE = 248069  # `</think>` in the Qwen3.5 vocabulary
BLANK_LINE = 271  # "\n\n"
END = (THINK_CLOSE, BLANK_LINE)


@pytest.fixture(scope="module")
def tiny_model(embedded_model_dir: Path):  # noqa: ANN201  # LocalModel
    from model_shards.model import LocalModel

    return LocalModel.load(embedded_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def thinking_prompt(embedded_model_dir: Path) -> tuple[int, ...]:
    """The README's first chat ("Hello") rendered with thinking on: it ends inside `<think>`."""
    from model_shards.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(embedded_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert text.endswith("<think>\n")
    assert tok.encode("</think>") == [THINK_CLOSE] and tok.encode("\n\n") == [BLANK_LINE]
    return tuple(tok.encode(text))


def _run(model, reqs: list[GenerateRequest], *, k: int = 0, slots: int = 4):  # noqa: ANN001, ANN202
    """Run requests on an in-process engine; returns each one's tokens and final completion_tokens, and counters."""
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    async def main():  # noqa: ANN202
        runner = LocalRunner(model, CacheSizes(num_blocks=64, block_size=BLOCK, num_slots=slots, spec_tokens=k))
        engine = Engine(
            runner,
            pools=[BlockPool(num_blocks=64, num_slots=slots, block_size=BLOCK)],
            config=SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=256, lookahead=2 * k),
            max_waiting=len(reqs),
            spec_tokens=k,
        )
        engine.start()

        async def one(req: GenerateRequest) -> tuple[list[int], int]:
            toks, usage = [], 0
            async for item in engine.generate(req):
                for ev in item.outputs:
                    assert ev.error is None, ev.error
                    toks += ev.token_ids
                    usage = ev.completion_tokens
            return toks, usage

        try:
            outs = await asyncio.wait_for(asyncio.gather(*(one(r) for r in reqs)), 300)
            counters = {name: v for (name, _), v in engine.metrics.snapshot().counters.items()}
            return outs, counters
        finally:
            await engine.stop()

    return asyncio.run(main())


def _req(
    rid: str,
    prompt: tuple[int, ...],
    max_tokens: int,
    budget: int | None,
    *,
    params: SamplingParams = GREEDY,
    exits: tuple[int, ...] = (THINK_CLOSE,),
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        prompt_ids=prompt,
        params=params,
        max_tokens=max_tokens,
        ignore_eos=True,
        max_thinking_tokens=budget,
        thinking_end_ids=END if budget is not None else (),
        thinking_exit_ids=exits if budget is not None else (),
    )


@pytest.mark.parametrize("token", [0, 31, 32, 63, THINK_CLOSE, 248319])
def test_one_token_mask_allows_only_that_token(token: int) -> None:
    import torch

    from model_shards.sampling import apply_bitmask
    from replicas.engine.step_types import only_token_mask

    logits = apply_bitmask(torch.zeros(248320), only_token_mask(token))
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [token]


def test_think_close_forced_exactly_at_the_budget(tiny_model, thinking_prompt) -> None:  # noqa: ANN001
    n = 14
    ((plain, _),) = _run(tiny_model, [_req("plain", thinking_prompt, n, None)])[0]
    assert THINK_CLOSE not in plain, "random weights were expected never to close <think> by themselves"
    budgets = [0, 1, 5, 9]
    outs, _ = _run(tiny_model, [_req(f"b{b}", thinking_prompt, n, b) for b in budgets])
    for b, (out, usage) in zip(budgets, outs):
        assert len(out) == n and usage == n, "reasoning and forced tokens count toward max_tokens"
        reasoning = out.index(THINK_CLOSE)
        assert reasoning == b, f"budget {b}: </think> after {reasoning} reasoning tokens"
        assert out[:b] == plain[:b], "the reasoning before the budget is the unbudgeted output"
        assert out[b : b + 2] == list(END) and out.count(THINK_CLOSE) == 1
    # after the forced text the model continues as it would from a prompt that holds that text
    b, (out, _) = 5, outs[2]
    ((cont, _),) = _run(tiny_model, [_req("oracle", thinking_prompt + tuple(out[: b + 2]), n - b - 2, None)])[0]
    assert out[b + 2 :] == cont


def test_budget_with_sampling_and_a_larger_budget_than_max_tokens(tiny_model, thinking_prompt) -> None:  # noqa: ANN001
    sampled = SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=11)
    outs, _ = _run(tiny_model, [_req("s", thinking_prompt, 12, 6, params=sampled), _req("big", thinking_prompt, 8, 50)])
    (s, _), (big, _) = outs
    assert s.index(THINK_CLOSE) == 6 and s[6:8] == list(END)
    assert THINK_CLOSE not in big and len(big) == 8  # max_tokens ends it first, all reasoning


def test_model_ending_its_reasoning_stops_the_budget(tiny_model, thinking_prompt) -> None:  # noqa: ANN001
    """A token in thinking_exit_ids ends reasoning (as `</think>` written by the model does): nothing is forced."""
    ((plain, _),) = _run(tiny_model, [_req("plain", thinking_prompt, 10, None)])[0]
    ((out, _),) = _run(tiny_model, [_req("exit", thinking_prompt, 10, 4, exits=(plain[2],))])[0]
    assert out == plain


def test_drafts_never_skip_the_forced_token(peaked_model, thinking_prompt) -> None:  # noqa: ANN001, F811  # fixture imported above
    """Speculating k = 2: drafts stop short of the budget, so the output equals the budgeted run without drafts."""
    budgets = [1, 2, 3, 4, 5, 6, 7, 8]
    reqs = [_req(f"b{b}", thinking_prompt[: 10 + b], 16, b) for b in budgets]  # distinct prompts
    plain, _ = _run(peaked_model, reqs, k=0, slots=8)
    spec, counters = _run(peaked_model, reqs, k=2, slots=8)
    assert counters.get("spec_decode_num_draft_tokens", 0) > 0
    for b, (want, _), (got, usage) in zip(budgets, plain, spec):
        assert got == want, f"budget {b}"
        assert got.index(THINK_CLOSE) == b and got[b : b + 2] == list(END) and usage == 16


# ---------------------------------------------------------------------------- where the budget comes from
def test_budget_resolution_request_then_server_then_checkpoint(embedded_model_dir: Path) -> None:
    from replicas.api.openai_protocol import ChatCompletionRequest
    from replicas.api.request_builder import ModelContext

    def ctx(server: int | None) -> ModelContext:
        return ModelContext.load(
            str(embedded_model_dir),
            name="t",
            max_model_len=512,
            cache_tokens=4096,
            default_max_tokens=None,
            max_n=1,
            max_thinking_tokens=server,
        )

    def built(c: ModelContext, body: dict, *, thinking: bool = True, grammar: object = None) -> GenerateRequest:
        req = ChatCompletionRequest.model_validate(
            {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}
        )
        return c.build(req, [1, 2, 3], request_id="r", thinking=thinking, grammar=grammar)

    checkpoint, server = ctx(None), ctx(3)
    assert checkpoint.max_thinking_tokens == 16  # the embedded model's generation_config.json
    assert built(checkpoint, {}).max_thinking_tokens == 16
    assert built(server, {}).max_thinking_tokens == 3
    g = built(server, {"max_thinking_tokens": 0})
    assert g.max_thinking_tokens == 0 and g.thinking_end_ids == END
    assert g.thinking_exit_ids == (THINK_CLOSE, 248058)  # `</think>`, or a tool call the model starts itself
    assert built(server, {}, grammar=object()).thinking_exit_ids == (THINK_CLOSE,)  # a grammar wants </think>
    assert built(server, {"max_thinking_tokens": 5}, thinking=False).max_thinking_tokens is None  # thinking off


def test_serve_flag_and_bad_values(embedded_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from epserve.cli import main
    from model_shards.config import ConfigError, from_hf_config
    from model_shards.generation_config import GenerationDefaults

    assert main(["serve", "--max-thinking-tokens", "-1"]) == 2
    assert "max_thinking_tokens" in capsys.readouterr().err
    (tmp_path / "generation_config.json").write_text('{"max_thinking_tokens": "lots"}')
    cfg = from_hf_config(embedded_model_dir)
    with pytest.raises(ConfigError, match="max_thinking_tokens"):
        GenerationDefaults.load(tmp_path, cfg)
