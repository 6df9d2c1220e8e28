"""Offline generation (`epserve generate`, the benchmarks) runs the serving Engine over the in-process runner.

Oracles: transformers' greedy `generate` (tokens, and the logprobs of its scores) on a checkpoint it saved;
the same tokens cut at a chosen eos (known answer for finish_reason and steps); decoding without speculation
for greedy decoding with MTP drafts, through `run_to_completion` and through the `epserve generate` command.
The command on an expert-parallel group is checked against transformers in tests/replicas/test_startup.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_shards.sampling import SamplingParams
from replicas.engine.engine_types import GenerateRequest
from replicas.ep.actors import CacheSizes
from tests.hf_oracle import hf_causal_lm
from tests.replicas.test_speculative import GREEDY, PROMPTS, peaked_checkpoint, peaked_model  # noqa: F401

pytestmark = pytest.mark.timeout(600)

NEW = 12


def _hf_greedy(folder: Path, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ref = hf_causal_lm(folder, dtype=torch.float32)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [float(torch.log_softmax(row[0].float(), -1)[t]) for row, t in zip(out.logits, tokens)]
    return tokens, logprobs


def test_greedy_tokens_and_logprobs_equal_transformers_and_eos_stops(hf_checkpoint: Path) -> None:
    from model_shards.model import LocalModel
    from replicas.ep.local_runner import LocalRunner
    from replicas.ep.offline_generate import cache_sizes, generate_each

    prompt = torch.randint(0, 1024, (37,), generator=torch.Generator().manual_seed(11)).tolist()
    want, want_lps = _hf_greedy(hf_checkpoint, prompt, NEW)
    cut = next(i for i in range(4, NEW) if want[i] not in want[:i])  # eos first sampled at position `cut`
    model = LocalModel.load(hf_checkpoint, dtype="float32")
    params = SamplingParams(temperature=0.0, logprobs=0)
    runner = LocalRunner(model, cache_sizes(len(prompt), NEW))
    try:
        full, stopped = generate_each(  # one engine, two requests in turn: figures are per request
            runner,
            [
                GenerateRequest("full", tuple(prompt), params, max_tokens=NEW),
                GenerateRequest("eos", tuple(prompt), params, max_tokens=NEW, eos_token_ids=(want[cut],)),
            ],
            vocab_size=model.cfg.vocab_size,
        )
    finally:
        runner.close()
    assert list(full.token_ids) == want
    torch.testing.assert_close([lp.logprob for lp in full.logprobs], want_lps, atol=1e-4, rtol=0)
    assert full.finish_reason == "length" and full.steps == NEW  # the prefill samples the first token
    assert full.ttft_s > 0 and full.decode_s > 0
    assert (full.draft_tokens, full.accepted_tokens) == (0, 0)
    assert list(stopped.token_ids) == want[: cut + 1] and stopped.finish_reason == "stop"
    assert stopped.steps == cut + 1


def test_greedy_speculation_equals_plain(peaked_model) -> None:  # noqa: ANN001, F811  # the imported fixture
    from replicas.ep.local_runner import LocalRunner
    from replicas.ep.offline_generate import cache_sizes, generate_each

    prompts, max_tokens = PROMPTS[:3], 24
    outs = {}
    for k in (0, 2):
        runner = LocalRunner(peaked_model, cache_sizes(max(map(len, prompts)), max_tokens, spec_tokens=k))
        reqs = [GenerateRequest(f"p{i}", p, GREEDY, max_tokens=max_tokens) for i, p in enumerate(prompts)]
        try:
            outs[k] = generate_each(runner, reqs, spec_tokens=k, vocab_size=peaked_model.cfg.vocab_size)
        finally:
            runner.close()
    for plain, spec in zip(outs[0], outs[2]):
        assert spec.token_ids == plain.token_ids and len(plain.token_ids) == max_tokens
        assert plain.steps == max_tokens and plain.draft_tokens == 0
        # a step emits its accepted drafts and one token (the last step may be cut by max_tokens)
        assert spec.steps <= max_tokens <= spec.steps + spec.accepted_tokens
    drafted, accepted = sum(c.draft_tokens for c in outs[2]), sum(c.accepted_tokens for c in outs[2])
    assert 0 < accepted < drafted


def _cli_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    from epserve.cli import main

    assert main(["generate", *argv, "--output", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # the CLI path is also checked against transformers in test_startup.py
def test_generate_command_speculation_equals_plain(peaked_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811  # the imported fixture
    common = ["--model", str(peaked_checkpoint), "--prompt-ids", ",".join(map(str, PROMPTS[1]))]
    common += ["--max-tokens", "20", "--temperature", "0", "--dtype", "float32"]
    plain = _cli_json(capsys, *common)
    spec = _cli_json(capsys, *common, "--speculative-tokens", "2")
    assert spec["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 20
    assert spec["text"] == plain["text"] and plain["finish_reason"] == "length"
    assert plain["speculative"] == {"steps": 20, "draft_tokens": 0, "accepted_tokens": 0}
    assert spec["speculative"]["draft_tokens"] > 0 and spec["speculative"]["steps"] < 20


def test_cache_sizes_hold_prompt_output_and_lookahead() -> None:
    from replicas.ep.offline_generate import cache_sizes

    assert cache_sizes(17, 15, block_size=16) == CacheSizes(num_blocks=2, block_size=16, num_slots=1)
    assert cache_sizes(17, 16, block_size=16).num_blocks == 3
    assert cache_sizes(17, 15, spec_tokens=2, block_size=16, num_slots=3) == CacheSizes(
        num_blocks=9, block_size=16, num_slots=3, spec_tokens=2
    )
