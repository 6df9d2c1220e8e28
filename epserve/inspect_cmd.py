"""`epserve inspect DIR [--json]`: what a checkpoint holds, and whether it would load.

A thin shim over model_shards/checkpoint_summary.py (headers only, no tensor data): prints the
architecture, expert layout, counts by part and dtype, shards and side files on stdout; each
problem on stderr as `epserve inspect: error: ...`. Exit 0 when loadable, 1 when broken.
Tests: tests/model_shards/test_inspect.py, tests/model_shards/test_bad_checkpoints.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from epserve.cli import UserError
from model_shards.checkpoint_summary import CheckpointSummary, summarise


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="checkpoint summary and integrity (config, tensors, bytes, dtypes, problems)")
    p.add_argument("dir", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    summary = summarise(folder)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(render(summary))
    for problem in summary.problems:
        print(f"epserve inspect: error: {problem}", file=sys.stderr)
    if not summary.ok:
        print(
            f"epserve inspect: error: {folder} cannot be loaded ({len(summary.problems)} problem(s) above)",
            file=sys.stderr,
        )
    return 0 if summary.ok else 1


# ------------------------------------------------------------------------------ text report
def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _config_lines(c: dict[str, Any]) -> list[str]:
    if "hidden_size" not in c:
        lines = [f"model_type   {c.get('model_type')!r} (config not usable, see errors)"]
        if c.get("quantization") is not None:
            lines.append(f"quantization {json.dumps(c['quantization'])}")
        return lines
    lines = [
        f"model_type   {c['model_type']}, dtype {c['dtype']}, tie_word_embeddings {c['tie_word_embeddings']}",
        f"layers       {c['num_hidden_layers']}: {c['linear_attention_layers']} linear (Gated DeltaNet) + "
        f"{c['full_attention_layers']} full attention at {c['full_attention_layer_ids']}",
        f"hidden       {c['hidden_size']}, vocab {c['vocab_size']}, context {c['max_position_embeddings']}",
        f"attention    {c['num_attention_heads']} q / {c['num_key_value_heads']} kv heads x {c['head_dim']} "
        f"(rotary {c['rotary_dim']})",
        f"deltanet     {c['linear_num_key_heads']} qk / {c['linear_num_value_heads']} v heads x "
        f"{c['linear_key_head_dim']} / {c['linear_value_head_dim']}, conv {c['linear_conv_kernel_dim']}",
        f"experts      {c['num_experts']} routed, top-{c['num_experts_per_tok']}, width "
        f"{c['moe_intermediate_size']}, shared expert width {c['shared_expert_intermediate_size']}",
        f"mtp          {c['mtp_num_hidden_layers']} layer(s)",
    ]
    v = c["vision"]
    lines.append(
        "vision       none"
        if v is None
        else f"vision       depth {v['depth']}, hidden {v['hidden_size']}, {v['num_heads']} heads, mlp "
        f"{v['intermediate_size']}, out {v['out_hidden_size']}, patch {v['patch_size']}x{v['patch_size']}"
        f"x{v['temporal_patch_size']}, merge {v['spatial_merge_size']}"
    )
    q = c["quantization"]
    lines.append(
        "quantization none"
        if q is None
        else f"quantization {q['quant_method']} {q['fmt']}, block {q['weight_block_size'][0]}x"
        f"{q['weight_block_size'][1]}, activations {q['activation_scheme']}, not converted: "
        f"{', '.join(q['modules_to_not_convert']) or '(none)'}"
    )
    return lines


def render(s: CheckpointSummary) -> str:
    """The text report (stdout of `epserve inspect DIR`)."""
    lines = [f"checkpoint   {s.folder}: {'OK, loadable' if s.ok else 'BROKEN'}"]
    lines += _config_lines(s.config)
    if s.layout is not None:
        lay = s.layout
        lines.append(
            f"layout       experts {lay['experts']}, mtp {lay['mtp'] or 'absent'}, "
            f"vision {'present' if lay['vision'] else 'absent'}, prefix {lay['prefix']}"
        )
    sh = s.shards
    total = sh["index_total_size"]
    lines.append(
        f"shards       {sh['count']} file(s)"
        + (f" + index (total_size {total:,}, headers declare {sh['tensor_bytes']:,})" if sh["index"] else ", no index")
    )
    lines.append("files        " + ", ".join(f"{name} {'yes' if there else 'NO'}" for name, there in s.files.items()))
    lines += ["", f"{'part':<9}{'tensors':>9}{'params':>18}{'':>10}{'bytes':>16}"]
    tot = [0, 0, 0]
    for name, p in s.parts.items():
        lines.append(f"{name:<9}{p.tensors:>9,}{p.params:>18,}{_count(p.params):>10}{p.bytes:>16,}{_size(p.bytes):>12}")
        tot = [tot[0] + p.tensors, tot[1] + p.params, tot[2] + p.bytes]
    lines.append(f"{'total':<9}{tot[0]:>9,}{tot[1]:>18,}{_count(tot[1]):>10}{tot[2]:>16,}{_size(tot[2]):>12}")
    lines.append("(params exclude FP8 scale companions; bytes include them)")
    lines += ["", f"{'dtype':<9}{'tensors':>9}{'bytes':>16}"]
    for name, d in s.dtypes.items():
        lines.append(f"{name:<9}{d.tensors:>9,}{d.bytes:>16,}{_size(d.bytes):>12}")
    if s.warnings:
        lines += [""] + [f"warning: {w}" for w in s.warnings]
    return "\n".join(lines)
