"""Qwen3.5-MoE model math, configuration and shard-by-shard weight loading.

Single-device only: nothing here imports Ray or torch.distributed. Distribution lives in
cluster/ and replicas/, which call into these functions with local tensors.
"""
