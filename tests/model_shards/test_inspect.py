"""`epserve inspect` on good checkpoints, 397B arithmetic without weights, and what loaders read.

Oracles, each independent of model_shards: tensor counts / bytes by part and dtype from the
`safetensors` library's own header reading; parameter counts from transformers'
Qwen3_5MoeForConditionalGeneration (loaded from the HF-saved checkpoint; built on the meta
device for the tiny ones); the 397B numbers of model_spec §1.4 and §5.1. Broken folders:
tests/model_shards/test_bad_checkpoints.py. The CLI runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model_shards.checkpoint_files import CheckpointReader
from model_shards.checkpoint_summary import expected_params_by_part
from model_shards.config import from_hf_config
from model_shards.weights import MULTIMODAL_PREFIX, CheckpointLayout, expected_tensors, load_experts, load_trunk

REPO = Path(__file__).resolve().parents[2]
SHARED_CONFIGS = REPO.parent / "shared" / "configs"
# `python -m epserve.cli` would run cli.py as __main__, a second copy of the module whose
# UserError is not the one the commands raise; importing main keeps one copy.
CLI = [sys.executable, "-c", "import sys; from epserve.cli import main; sys.exit(main())"]
BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}
TEXT_DIMS = (
    "hidden_size",
    "vocab_size",
    "max_position_embeddings",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_hidden_layers",
)
VISION_DIMS = (
    "depth",
    "hidden_size",
    "num_heads",
    "intermediate_size",
    "out_hidden_size",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "num_position_embeddings",
)


def run_cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`epserve ARGS` in a fresh interpreter; stdout/stderr captured as text."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def part(name: str) -> str:
    """The test's own split of checkpoint names (model_spec §5.1): vision, mtp, routed experts, trunk."""
    if name.startswith("model.visual."):
        return "vision"
    if name.startswith("mtp."):
        return "mtp"
    return "experts" if ".mlp.experts." in name else "trunk"


def header_census(folder: Path) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Tensors/params/bytes by part and tensors/bytes by dtype, read with the safetensors library."""
    parts = {p: Counter() for p in ("trunk", "experts", "mtp", "vision")}
    dtypes: dict[str, Counter] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                numel, dtype = math.prod(sl.get_shape()), sl.get_dtype()
                nbytes = numel * BYTES[dtype]
                c = parts[part(name)]
                c["tensors"] += 1
                c["params"] += 0 if name.endswith("_scale_inv") else numel
                c["bytes"] += nbytes
                d = dtypes.setdefault(dtype, Counter())
                d["tensors"] += 1
                d["bytes"] += nbytes
    return (
        {k: dict(tensors=v["tensors"], params=v["params"], bytes=v["bytes"]) for k, v in parts.items()},
        {k: dict(tensors=v["tensors"], bytes=v["bytes"]) for k, v in dtypes.items()},
    )


def hf_params_by_part(model: torch.nn.Module) -> dict[str, int]:
    """transformers' own parameter count, split by name prefix (it holds no MTP head)."""
    out = Counter()
    for name, p in model.named_parameters():
        out["vision" if name.startswith("model.visual.") else "experts" if ".mlp.experts." in name else "trunk"] += (
            p.numel()
        )
    return {"trunk": out["trunk"], "experts": out["experts"], "vision": out["vision"]}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cli_env(epserve_cache: Path) -> dict[str, str]:
    """Subprocesses share the session's tokenizer cache (no rebuild of tokenizer.json)."""
    return {"EPSERVE_CACHE_DIR": str(epserve_cache)}


def _cli_tiny(out: Path, env: dict[str, str], *flags: str) -> Path:
    r = run_cli("tiny-checkpoint", out, *flags, env=env)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def tiny_per_expert(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str], tiny_fused: Path) -> Path:
    """`epserve tiny-checkpoint DIR --expert-layout per-expert` (after tiny_fused has cached the tokenizer)."""
    return _cli_tiny(tmp_path_factory.mktemp("tiny_pe") / "ckpt", cli_env, "--expert-layout", "per-expert")


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str], tiny_fused: Path) -> Path:
    """`epserve tiny-checkpoint DIR --fp8 --expert-layout per-expert`: the FP8 release's layout."""
    return _cli_tiny(tmp_path_factory.mktemp("tiny_fp8") / "ckpt", cli_env, "--fp8", "--expert-layout", "per-expert")


GOOD = {  # id -> (fixture, expert layout, MTP layout, tokenizer files present)
    "tiny-fused": ("tiny_fused", "fused", "fused", True),
    "tiny-per-expert": ("tiny_per_expert", "per-expert", "per-expert", True),
    "tiny-fp8-per-expert": ("tiny_fp8", "per-expert", "per-expert", True),
    "hf-saved": ("hf_checkpoint", "per-expert", None, False),
}


@pytest.fixture(scope="module")
def inspected() -> dict[Path, dict]:
    """`epserve inspect DIR --json` output per folder, run once each."""
    return {}


def inspect_json(folder: Path, cache: dict[Path, dict]) -> dict:
    if folder not in cache:
        r = run_cli("inspect", folder, "--json")
        assert r.returncode == 0, f"inspect failed on a good checkpoint:\n{r.stderr}"
        assert "error" not in r.stderr, r.stderr
        cache[folder] = json.loads(r.stdout)
    return cache[folder]


# ------------------------------------------------------------------------------ good checkpoints
@pytest.mark.parametrize("case", list(GOOD))
def test_inspect_good_checkpoint(case: str, request: pytest.FixtureRequest, inspected: dict[Path, dict]) -> None:
    fixture, experts, mtp, tokenizer = GOOD[case]
    folder: Path = request.getfixturevalue(fixture)
    out = inspect_json(folder, inspected)
    assert out["ok"] is True and out["problems"] == []

    raw = json.loads((folder / "config.json").read_text())
    text, vision = raw["text_config"], raw["vision_config"]
    shown = out["config"]
    assert shown["model_type"] == raw["model_type"]
    for key in TEXT_DIMS:
        assert shown[key] == text[key], key
    assert shown["full_attention_layers"] == text["layer_types"].count("full_attention")
    assert shown["linear_attention_layers"] == text["layer_types"].count("linear_attention")
    assert shown["mtp_num_hidden_layers"] == text.get("mtp_num_hidden_layers", 0)
    for key in VISION_DIMS:
        assert shown["vision"][key] == vision[key], key
    quant = raw.get("quantization_config")
    if quant is None:
        assert shown["quantization"] is None
    else:
        for key in ("quant_method", "fmt", "weight_block_size", "activation_scheme", "modules_to_not_convert"):
            assert shown["quantization"][key] == quant[key], key

    assert out["layout"] == {"prefix": MULTIMODAL_PREFIX, "experts": experts, "mtp": mtp, "vision": True}
    parts, dtypes = header_census(folder)
    assert out["parts"] == parts
    assert out["dtypes"] == dtypes
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert [f["file"] for f in out["shards"]["files"]] == shards and out["shards"]["count"] == len(shards)
    tensor_bytes = sum(p["bytes"] for p in parts.values())
    assert out["shards"]["tensor_bytes"] == tensor_bytes
    if out["shards"]["index"]:
        assert out["shards"]["index_total_size"] == tensor_bytes
    assert out["files"] == {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": tokenizer,
        "generation_config.json": True,
    }


def test_fp8_scales_are_bytes_not_params(tiny_fp8: Path, tiny_per_expert: Path, inspected: dict[Path, dict]) -> None:
    """Same seed and dims: the FP8 folder has the bf16 folder's parameter counts, fewer bytes, F8_E4M3 tensors."""
    fp8, bf16 = inspect_json(tiny_fp8, inspected), inspect_json(tiny_per_expert, inspected)
    for name in ("trunk", "experts", "mtp", "vision"):
        assert fp8["parts"][name]["params"] == bf16["parts"][name]["params"], name
    assert fp8["parts"]["experts"]["bytes"] < bf16["parts"]["experts"]["bytes"]
    assert fp8["parts"]["vision"] == bf16["parts"]["vision"]  # model.visual is not converted
    assert fp8["dtypes"]["F8_E4M3"]["tensors"] > 0 and "F8_E4M3" not in bf16["dtypes"]


def test_inspect_text_report(tiny_fp8: Path) -> None:
    r = run_cli("inspect", tiny_fp8)
    assert r.returncode == 0, r.stderr
    report = r.stdout
    for line in (
        "OK, loadable",
        "8: 6 linear (Gated DeltaNet) + 2 full attention at [3, 7]",
        "experts      16 routed, top-4, width 64, shared expert width 128",
        "quantization fp8 e4m3, block 128x128",
        "experts per-expert, mtp per-expert",
        "F8_E4M3",
    ):
        assert line in report, f"{line!r} not in:\n{report}"


def test_params_equal_transformers_count_hf_saved(hf_checkpoint: Path, inspected: dict[Path, dict]) -> None:
    from transformers import Qwen3_5MoeForConditionalGeneration

    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(hf_checkpoint, dtype=torch.float32)
    want = hf_params_by_part(model)
    out = inspect_json(hf_checkpoint, inspected)
    assert {k: out["parts"][k]["params"] for k in want} == want
    assert out["parts"]["mtp"] == {"tensors": 0, "params": 0, "bytes": 0}


@pytest.mark.parametrize("case", ["tiny-fused", "tiny-fp8-per-expert"])
def test_params_equal_transformers_count_tiny(
    case: str, request: pytest.FixtureRequest, inspected: dict[Path, dict]
) -> None:
    """The tiny config built by transformers on the meta device has our trunk/expert/vision counts."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    folder: Path = request.getfixturevalue(GOOD[case][0])
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("quantization_config", None)  # count the unquantised model: scales are not parameters
    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(**raw))
    want = hf_params_by_part(model)
    out = inspect_json(folder, inspected)
    assert {k: out["parts"][k]["params"] for k in want} == want


# ------------------------------------------------------------------------------ 397B without weights
@pytest.mark.parametrize("variant", ["bf16-fused", "fp8-per-expert"])
def test_397b_arithmetic_from_config_only(variant: str) -> None:
    """model_spec §5.1 tensor counts and §1.4 parameter totals from the expected-tensor table alone."""
    name = "qwen3.5-397b-a17b.config.json" if variant == "bf16-fused" else "qwen3.5-397b-a17b-fp8.config.json"
    if not (SHARED_CONFIGS / name).is_file():
        pytest.skip(f"{SHARED_CONFIGS / name} is absent (the shared folder beside the repo is not mounted)")
    cfg = from_hf_config(SHARED_CONFIGS / name)
    layout = variant.split("-", 1)[1]
    specs = expected_tensors(cfg, prefix=MULTIMODAL_PREFIX, layout=layout, mtp_layout=layout, vision=True)
    params = expected_params_by_part(specs)
    assert params["trunk"] + params["experts"] + params["vision"] == 396_802_360_816
    assert params["mtp"] == 6_595_568_128
    assert params["experts"] == 60 * 512 * 3 * 4096 * 1024 == 386_547_056_640
    assert params["vision"] == 456_010_480
    counts = Counter(s.part for n, s in specs.items() if not n.endswith("_scale_inv"))
    if variant == "bf16-fused":
        assert counts["trunk"] + counts["experts"] == 1038 and counts["vision"] == 333 and counts["mtp"] == 19
        assert not any(s.fp8 for s in specs.values())
    else:
        assert counts["experts"] == 60 * 512 * 3 and counts["vision"] == 333
        scales = [n for n in specs if n.endswith("_scale_inv")]
        assert len(scales) == sum(s.fp8 for s in specs.values()) > 0
        gate = specs[f"{MULTIMODAL_PREFIX}layers.0.mlp.experts.0.gate_proj.weight_scale_inv"]
        assert gate.shape == (8, 32)  # model_spec §5.3


# ------------------------------------------------------------------------------ what loaders read
EXPERT_IDS = [1, 5, 6, 13]


def test_per_expert_load_reads_only_requested_experts(hf_checkpoint: Path) -> None:
    cfg = from_hf_config(hf_checkpoint)
    reader = CheckpointReader(hf_checkpoint)
    shard = load_experts(reader, cfg, expert_ids=EXPERT_IDS, dtype=torch.float32)
    want = {
        f"{MULTIMODAL_PREFIX}layers.{i}.mlp.experts.{e}.{w}.weight"
        for i in range(cfg.num_layers)
        for e in EXPERT_IDS
        for w in ("gate_proj", "up_proj", "down_proj")
    }
    assert sorted(reader.stats.names) == sorted(want)  # each exactly once, no other expert
    assert reader.stats.bytes == sum(reader.tensors[n].nbytes for n in want)
    with safe_open(str(hf_checkpoint / "model.safetensors"), framework="pt") as f:
        x = f"{MULTIMODAL_PREFIX}layers.2.mlp.experts.6."
        gate_up = torch.cat([f.get_tensor(x + "gate_proj.weight"), f.get_tensor(x + "up_proj.weight")])
    assert torch.equal(shard.layers[2].gate_up[EXPERT_IDS.index(6)], gate_up)


def test_fused_load_reads_only_requested_rows(hf_checkpoint_fused: Path) -> None:
    cfg = from_hf_config(hf_checkpoint_fused)
    reader = CheckpointReader(hf_checkpoint_fused)
    shard = load_experts(reader, cfg, expert_ids=EXPERT_IDS, dtype=torch.float32)
    fused = [
        f"{MULTIMODAL_PREFIX}layers.{i}.mlp.experts.{w}"
        for i in range(cfg.num_layers)
        for w in ("gate_up_proj", "down_proj")
    ]
    assert sorted(reader.stats.names) == sorted(f"{n}[{len(EXPERT_IDS)} rows]" for n in fused)
    full = sum(reader.tensors[n].nbytes for n in fused)
    assert reader.stats.bytes * cfg.num_experts == full * len(EXPERT_IDS)
    with safe_open(str(hf_checkpoint_fused / "model.safetensors"), framework="pt") as f:
        down = f.get_tensor(f"{MULTIMODAL_PREFIX}layers.7.mlp.experts.down_proj")
    assert torch.equal(shard.layers[7].down, down[EXPERT_IDS])


def test_fp8_per_expert_load_reads_requested_weights_and_their_scales(tiny_fp8: Path) -> None:
    cfg = from_hf_config(tiny_fp8)
    reader = CheckpointReader(tiny_fp8)
    load_experts(reader, cfg, expert_ids=EXPERT_IDS, dtype=torch.bfloat16)
    bases = [f"{MULTIMODAL_PREFIX}layers.{i}.mlp." for i in range(cfg.num_layers)] + ["mtp.layers.0.mlp."]
    want = {
        f"{b}experts.{e}.{w}.weight{s}"
        for b in bases
        for e in EXPERT_IDS
        for w in ("gate_proj", "up_proj", "down_proj")
        for s in ("", "_scale_inv")
    }
    assert sorted(reader.stats.names) == sorted(want)


@pytest.mark.parametrize("case", ["hf-saved", "tiny-fp8-per-expert"])
def test_load_trunk_reads_no_expert_tensor(case: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(GOOD[case][0])
    cfg = from_hf_config(folder)
    reader = CheckpointReader(folder)
    layout = CheckpointLayout.detect(reader, cfg)
    load_trunk(reader, cfg, dtype=torch.float32, layout=layout)
    assert not [n for n in reader.stats.names if ".mlp.experts." in n]
    want = {
        n
        for n, s in layout.expected(cfg).items()
        if s.part == "trunk" or (s.part == "mtp" and ".mlp.experts." not in n)
    }
    assert sorted(reader.stats.names) == sorted(want)  # every trunk tensor once, nothing else


# ------------------------------------------------------------------------------ optional files and parts
def test_generate_without_tokenizer_or_mtp(hf_checkpoint: Path) -> None:
    """The HF-saved folder has no tokenizer files and no mtp.* tensors: ids work, text prompts say why not."""
    assert not (hf_checkpoint / "tokenizer.json").exists()
    assert not any(n.startswith("mtp.") for n in CheckpointReader(hf_checkpoint).tensors)
    ok = run_cli(
        "generate",
        "--model",
        hf_checkpoint,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--output",
        "json",
    )
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert len(result["token_ids"]) == 2 and result["text"] is None
    text = run_cli("generate", "--model", hf_checkpoint, "--prompt", "hello", "--max-tokens", "2")
    assert text.returncode != 0
    assert "tokenizer" in text.stderr and "--prompt-ids" in text.stderr and "Traceback" not in text.stderr
