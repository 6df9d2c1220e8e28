"""`epserve tiny-checkpoint` writes the real layout: transformers loads it with zero missing keys.

Oracles: transformers' own loader and forward (fp32, eager) on the written folder; for FP8,
transformers on a copy whose FP8 weights are dequantised in the test (plain torch, not our
code), and the unquantised checkpoint of the same seed for the size of the quantisation error.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_shards.batch import SeqChunk, StepBatch
from model_shards.model import LocalModel

FP32_TOL = 1e-4  # equivalent op groupings in fp32 (measured ~1e-6)
PROMPT = [248045, 846, 198, 9419, 248046, 198, 248045, 74455, 198, 248068, 198, 5, 77, 1000, 248000]


def _ours(folder: Path, dtype: str = "float32") -> torch.Tensor:
    model = LocalModel.load(folder, dtype=dtype)
    n = len(PROMPT)
    pools = model.allocate(num_blocks=2, block_size=16, num_slots=1)
    return model.forward(
        StepBatch.build([SeqChunk(tuple(PROMPT), 0, 0, (0, 1), logits="all")], block_size=16), pools
    ).logits_RV[:n]


def _hf(folder: Path) -> tuple[torch.Tensor, list[str], list[str]]:
    from transformers import Qwen3_5MoeForConditionalGeneration

    model, info = Qwen3_5MoeForConditionalGeneration.from_pretrained(
        folder,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    with torch.no_grad():
        logits = model.eval()(torch.tensor([PROMPT])).logits[0].float()
    return logits, list(info["missing_keys"]), list(info["unexpected_keys"])


@pytest.fixture(scope="module")
def tiny_per_expert(tmp_path_factory: pytest.TempPathFactory, epserve_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("tiny_pe") / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "epserve.cli", "tiny-checkpoint", str(out), "--expert-layout", "per-expert"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), "EPSERVE_CACHE_DIR": str(epserve_cache)},
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_transformers_loads_tiny_checkpoint_and_gives_our_logits(
    layout: str, tiny_fused: Path, tiny_per_expert: Path
) -> None:
    folder = tiny_fused if layout == "fused" else tiny_per_expert
    want, missing, unexpected = _hf(folder)
    # transformers drops mtp.* by design (model_spec §5.2); nothing else may be left over.
    assert missing == []
    assert [k for k in unexpected if not k.startswith("mtp.")] == []
    got = _ours(folder)
    d = (got - want).abs()
    assert d.max().item() < FP32_TOL, f"max |d| {d.max().item():.3g}, mean {d.mean().item():.3g}"


def test_tiny_checkpoint_files(tiny_fused: Path) -> None:
    cfg = json.loads((tiny_fused / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_moe" and "vision_config" in cfg
    assert cfg["text_config"]["vocab_size"] == 248320
    index = json.loads((tiny_fused / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1, "the index must spread tensors over several shards"
    names = set(index["weight_map"])
    assert any(n.startswith("mtp.") for n in names) and any(n.startswith("model.visual.") for n in names)
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in names
    gen = json.loads((tiny_fused / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [248046, 248044]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_fused / f).exists()


def _dequantised_copy(src: Path, dst: Path) -> Path:
    """Dequantise every FP8 tensor with plain torch ops; drop the scales and the quantisation config."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / shard), "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    for name in [n for n in out if n.endswith("_scale_inv")]:
        scale = out.pop(name).float()
        w = out[name.removesuffix("_scale_inv")].float()
        rows = torch.arange(w.shape[-2]) // 128
        cols = torch.arange(w.shape[-1]) // 128
        out[name.removesuffix("_scale_inv")] = w * scale[..., rows[:, None], cols[None, :]]  # exact in fp32
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_fp8_matches_dequantised_reference(tmp_path: Path, epserve_cache: Path) -> None:
    from model_shards.tiny_checkpoint import write_tiny_checkpoint

    fp8 = write_tiny_checkpoint(tmp_path / "fp8", seed=3, expert_layout="per-expert", fp8=True, tokenizer=False)
    plain = write_tiny_checkpoint(tmp_path / "plain", seed=3, expert_layout="per-expert", tokenizer=False)
    # FP8 stays FP8 on disk and in memory
    dtypes = set()
    for shard in fp8.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {f.get_slice(n).get_dtype() for n in f.keys()}
    assert "F8_E4M3" in dtypes
    model = LocalModel.load(fp8, dtype="float32")
    from model_shards.quant import Fp8Weight

    assert isinstance(model.trunk.w.layers[0].mixer.in_proj_qkv, Fp8Weight)
    assert isinstance(model.experts.layers[0].gate_up, Fp8Weight)

    got = _ours(fp8)
    want, missing, _ = _hf(_dequantised_copy(fp8, tmp_path / "deq"))
    assert missing == []
    d = (got - want).abs()
    assert d.max().item() < FP32_TOL, f"vs dequantised reference: max |d| {d.max().item():.3g}"
    # Against the unquantised weights of the same seed: e4m3 keeps 3 mantissa bits (~2.6% RMS error
    # per weight, checked in test_quant.py); through 8 layers whose top-4 routing is discrete
    # (a perturbed router picks another expert for some tokens) that grows to ~27% RMS on the
    # logits of this random model. It must stay the same model: logits well correlated.
    base = _ours(plain)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), base.flatten(), dim=0).item()
    assert not torch.equal(got, base) and cos > 0.9, f"cosine(fp8 logits, unquantised logits) = {cos:.3f}"


@pytest.mark.slow
def test_transformers_loads_a_sized_checkpoint(tmp_path: Path, epserve_cache: Path) -> None:
    """A sized checkpoint is still the real layout: transformers (the oracle) loads it with zero
    missing keys, and its config carries the dims."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    from model_shards.tiny_checkpoint import CheckpointSizes, write_tiny_checkpoint

    sizes = CheckpointSizes(layers=5, hidden_size=192, num_experts=8, moe_intermediate_size=32)
    out = write_tiny_checkpoint(tmp_path / "sized", sizes=sizes, cache_dir=epserve_cache)
    model, info = Qwen3_5MoeForConditionalGeneration.from_pretrained(
        out, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"] and not [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_experts) == (5, 192, 8)


def test_size_flags_reach_the_config_and_the_shards(
    tmp_path: Path, epserve_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--layers / --hidden-size / --experts / widths` through the CLI: the config carries the dims (every
    4th layer full attention), the expert tensors have them, and `checkpoint_bytes` equals the bytes
    safetensors reads back from the shards."""
    from epserve.cli import main
    from model_shards.tiny_checkpoint import CheckpointSizes, checkpoint_bytes

    out = tmp_path / "sized"
    flags = ["--layers", "5", "--hidden-size", "32", "--experts", "8"]
    flags += ["--moe-intermediate-size", "16", "--shared-intermediate-size", "48"]
    monkeypatch.setenv("EPSERVE_CACHE_DIR", str(epserve_cache))
    assert main(["tiny-checkpoint", str(out), *flags]) == 0
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["hidden_size"], text["num_experts"]) == (5, 32, 8)
    assert (text["moe_intermediate_size"], text["shared_expert_intermediate_size"]) == (16, 48)
    assert text["layer_types"].count("full_attention") == 1
    read, shapes = 0, {}
    for shard in out.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():  # safe_open is not a mapping
                t = f.get_tensor(name)
                read += t.numel() * t.element_size()
                shapes[name] = tuple(t.shape)
    assert shapes["model.language_model.layers.4.mlp.experts.gate_up_proj"] == (8, 32, 32)
    sizes = CheckpointSizes(
        layers=5, hidden_size=32, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=48
    )
    assert checkpoint_bytes(sizes) == read


def test_target_gib_picks_the_fewest_experts_reaching_it() -> None:
    from model_shards.tiny_checkpoint import checkpoint_bytes, sizes_for_target

    for target, fp8 in ((4.0, False), (4.0, True), (0.5, False)):
        sizes = sizes_for_target(target, fp8=fp8)
        assert sizes.num_experts % 8 == 0
        assert checkpoint_bytes(sizes, fp8=fp8) >= target * 2**30
        if sizes.num_experts > 8:
            fewer = dataclasses.replace(sizes, num_experts=sizes.num_experts - 8)
            assert checkpoint_bytes(fewer, fp8=fp8) < target * 2**30


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--experts", "2"], "num_experts"),
        (["--vocab-size", "1000"], "vocab_size"),
        (["--target-gib", "1", "--experts", "8"], "--target-gib"),
        (["--layers", "0"], "layers"),
    ],
)
def test_bad_size_flags_exit_2_naming_the_problem(
    tmp_path: Path, flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from epserve.cli import main

    assert main(["tiny-checkpoint", str(tmp_path / "x"), *flags]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
