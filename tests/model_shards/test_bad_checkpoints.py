"""Broken checkpoints: `epserve inspect` and `epserve generate` refuse them and name the problem.

Each case copies a good small checkpoint into tmp_path (a two-shard copy of the transformers-saved
`hf_checkpoint`, or a tiny FP8 per-expert checkpoint; unchanged shards are hard links, so a
broken file is always unlinked and rewritten, never edited in place), breaks exactly one thing,
and runs both commands as subprocesses. Both must exit 1 with the tensor / field / shard file on
stderr, and `summarise` must report exactly that one problem. Good checkpoints: test_inspect.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_shards.checkpoint_summary import summarise
from model_shards.tiny_checkpoint import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
# `python -m epserve.cli` would run cli.py as __main__, a second copy of the module whose
# UserError is not the one the commands raise; importing main keeps one copy.
CLI = [sys.executable, "-c", "import sys; from epserve.cli import main; sys.exit(main())"]
INDEX = "model.safetensors.index.json"
P = "model.language_model."


# ------------------------------------------------------------------------------ folder surgery
def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a folder; safetensors files are hard-linked (fall back to a copy across filesystems)."""

    def link_or_copy(s: str, d: str) -> None:
        if s.endswith(".safetensors"):
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)
    return dst


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_shard(folder: Path, file: str, tensors: dict[str, torch.Tensor]) -> None:
    """Replace one shard (unlink first: the old file may be a hard link to the good checkpoint)."""
    (folder / file).unlink()
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    """Index with total_size recomputed from the shards, so only the intended thing is broken."""
    total = 0
    for file in sorted(set(weight_map.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            for name in f.keys():
                total += _nbytes(f, name)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _nbytes(f, name: str) -> int:  # noqa: ANN001  # safetensors' handle type is not exported
    sl = f.get_slice(name)
    return math.prod(sl.get_shape()) * {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}[sl.get_dtype()]


def edit_tensors(folder: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> str:
    """Load the shard holding `name`, apply `edit` to its tensors, rewrite shard and index; the shard's file name."""
    index = read_index(folder)
    file = index["weight_map"][name]
    tensors = load_file(str(folder / file))
    before = set(tensors)
    edit(tensors)
    write_shard(folder, file, tensors)
    weight_map = {n: f for n, f in index["weight_map"].items() if n not in before - set(tensors)}
    weight_map.update({n: file for n in set(tensors) - before})
    write_index(folder, weight_map)
    return file


def edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


# ------------------------------------------------------------------------------ the breaks
def missing_tensor(folder: Path) -> list[str]:
    name = f"{P}layers.3.self_attn.q_proj.weight"
    edit_tensors(folder, name, lambda t: t.pop(name))
    return ["missing tensor", name]


def wrong_shape(folder: Path) -> list[str]:
    name = f"{P}layers.0.linear_attn.in_proj_z.weight"
    edit_tensors(folder, name, lambda t: t.update({name: t[name][:-1].clone()}))
    return [name, "shape"]


def extra_tensor(folder: Path) -> list[str]:
    anchor, name = f"{P}layers.0.mlp.experts.0.gate_proj.weight", f"{P}layers.0.mlp.experts.16.gate_proj.weight"
    edit_tensors(folder, anchor, lambda t: t.update({name: t[anchor].clone()}))  # expert 16 of 16
    return ["unexpected tensor", name]


def unknown_model_type(folder: Path) -> list[str]:
    edit_config(folder, lambda c: c.update(model_type="qwen3_moe"))
    return ["model_type", "qwen3_moe"]


def unsupported_quantisation(folder: Path) -> list[str]:
    edit_config(folder, lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128}))
    return ["quantization", "awq"]


def truncated_shard(folder: Path) -> list[str]:
    file = sorted(set(read_index(folder)["weight_map"].values()))[-1]
    data = (folder / file).read_bytes()
    (folder / file).unlink()
    (folder / file).write_bytes(data[: len(data) // 2])  # an interrupted download
    return [file, "truncated"]


def absent_shard(folder: Path) -> list[str]:
    file = sorted(set(read_index(folder)["weight_map"].values()))[-1]
    (folder / file).unlink()  # the index still names it
    return [file, INDEX]


def fp8_weight_stored_bf16(folder: Path) -> list[str]:
    """An FP8 config with one FP8 weight stored BF16 (its scale left in place)."""
    index = read_index(folder)
    wm = index["weight_map"]
    # the smallest shard holding an FP8 weight (one with a scale): the edit rewrites that whole shard
    with_fp8 = {f for n, f in wm.items() if f"{n}_scale_inv" in wm}
    smallest = min(with_fp8, key=lambda f: (folder / f).stat().st_size)
    name = next(n for n, f in sorted(wm.items()) if f == smallest and f"{n}_scale_inv" in wm)
    edit_tensors(folder, name, lambda t: t.update({name: t[name].to(torch.bfloat16)}))
    return [name, "BF16", "F8_E4M3"]


def weight_stored_fp8_without_quantisation(folder: Path) -> list[str]:
    """A config without quantization_config, one linear weight stored F8_E4M3 (no scale to apply)."""
    name = f"{P}layers.1.linear_attn.out_proj.weight"
    edit_tensors(folder, name, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    return [name, "F8_E4M3"]


def malformed_header(folder: Path) -> list[str]:
    """A shard whose header entry lost its dtype (the data section is left as it was)."""
    file = sorted(set(read_index(folder)["weight_map"].values()))[0]
    data = (folder / file).read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    name = sorted(n for n in header if n != "__metadata__")[0]
    del header[name]["dtype"]
    raw = json.dumps(header).encode()
    (folder / file).unlink()
    (folder / file).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen :])
    return [file, name, "header"]


CASES: dict[str, tuple[str, Callable[[Path], list[str]]]] = {  # id -> (base checkpoint, break)
    "missing-tensor": ("hf_sharded", missing_tensor),
    "wrong-shape": ("hf_sharded", wrong_shape),
    "extra-tensor": ("hf_sharded", extra_tensor),
    "unknown-model-type": ("hf_sharded", unknown_model_type),
    "unsupported-quantisation-awq": ("hf_sharded", unsupported_quantisation),
    "truncated-shard": ("hf_sharded", truncated_shard),
    "index-names-absent-shard": ("hf_sharded", absent_shard),
    "fp8-config-weight-stored-bf16": ("tiny_fp8_bare", fp8_weight_stored_bf16),
    "bf16-config-weight-stored-fp8": ("hf_sharded", weight_stored_fp8_without_quantisation),
    "malformed-shard-header": ("hf_sharded", malformed_header),
}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hf_sharded(hf_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transformers-saved checkpoint split into two shards with an index (as real releases ship)."""
    out = tmp_path_factory.mktemp("hf_sharded") / "ckpt"
    out.mkdir()
    tensors = load_file(str(hf_checkpoint / "model.safetensors"))
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, group in halves.items():
        save_file({n: tensors[n] for n in group}, str(out / file), metadata={"format": "pt"})
    write_index(out, {n: f for f, group in halves.items() for n in group})
    shutil.copy2(hf_checkpoint / "config.json", out / "config.json")
    shutil.copy2(hf_checkpoint / "generation_config.json", out / "generation_config.json")
    return out


@pytest.fixture(scope="module")
def tiny_fp8_bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP8 release's layout (per-expert, e4m3 + bf16 block scales), no tokenizer files."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("fp8_bare") / "ckpt", fp8=True, expert_layout="per-expert", tokenizer=False
    )


# ------------------------------------------------------------------------------ the test
@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_refused_and_named(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    base, breaker = CASES[case]
    folder = copy_checkpoint(request.getfixturevalue(base), tmp_path / "broken")
    needles = breaker(folder)

    summary = summarise(folder)
    assert not summary.ok
    assert len(summary.problems) == 1, summary.problems
    assert all(n in summary.problems[0] for n in needles), summary.problems

    commands = {
        "inspect": ["inspect", folder],
        "generate": ["generate", "--model", folder, "--prompt-ids", "1,2,3", "--max-tokens", "2"],
    }
    procs = {
        cmd: subprocess.Popen(
            [*CLI, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd, argv in commands.items()
    }
    try:
        outputs = {cmd: proc.communicate(timeout=120) for cmd, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for cmd, (out, err) in outputs.items():
        proc = procs[cmd]
        assert proc.returncode == 1, f"{cmd} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
        assert "Traceback" not in err, err
        assert err.startswith(f"epserve {cmd}: error: "), err
        unnamed = [n for n in needles if n not in err]
        assert not unnamed, f"{cmd} stderr does not name {unnamed}:\n{err}"
        if cmd == "inspect":
            assert "BROKEN" in out.splitlines()[0], out


def test_bases_are_good_after_every_break(hf_sharded: Path, tiny_fp8_bare: Path) -> None:
    """Each problem above came from its break, not from the base; copies never wrote through to it."""
    for folder in (hf_sharded, tiny_fp8_bare):
        summary = summarise(folder)
        assert summary.ok, summary.problems
        assert not [w for w in summary.warnings if "total_size" in w]
