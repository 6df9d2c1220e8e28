"""The expert-load window and the load file: known counts in, known means and errors out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.expert_load import LoadWindow, rank_imbalance, read_load_file, write_load_file


def test_window_keeps_the_last_steps() -> None:
    w = LoadWindow(4)
    assert w.mean_tokens() is None
    w.add(2, torch.tensor([[2, 0]]), torch.tensor([1]))
    w.add(2, torch.tensor([[4, 4]]), torch.tensor([0]))
    assert torch.equal(w.mean_tokens(), torch.tensor([[1.5, 1.0]], dtype=torch.float64))
    w.add(2, torch.tensor([[0, 8]]), torch.tensor([0]))  # the first batch falls out of the 4-step window
    assert w.steps == 4
    assert torch.equal(w.mean_tokens(), torch.tensor([[1.0, 3.0]], dtype=torch.float64))
    assert torch.equal(w.mean_padding(), torch.tensor([0.0], dtype=torch.float64))


def test_imbalance_per_layer() -> None:
    got = rank_imbalance(torch.tensor([[3.0, 1.0], [0.0, 0.0], [2.0, 2.0]]))
    assert got.tolist() == [1.5, 1.0, 1.0]


def test_load_file_round_trip_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "load.json"
    write_load_file(p, torch.tensor([[1.0, 2.0, 3.0]]), steps=7, padding=torch.tensor([0.5]))
    assert read_load_file(p, num_experts=3, num_layers=1) == [[1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="lists 3 experts, the model has 4"):
        read_load_file(p, num_experts=4)
    with pytest.raises(ValueError, match="1 MoE layers, the model has 2"):
        read_load_file(p, num_layers=2)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an expert load file"):
        read_load_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        read_load_file(tmp_path / "missing.json")
