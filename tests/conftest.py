"""Shared fixtures: random checkpoints built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep every local Ray node on loopback (design.md); set before any test imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/model_shards/test_fp8_grouped_kernel.py).
# Set before anything imports triton: its library functions are jitted, in the mode of this variable, at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random checkpoint saved by transformers (per-expert layout, no MTP, no tokenizer)."""
    from tests.hf_oracle import save_random_hf_checkpoint

    return save_random_hf_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt")


@pytest.fixture(scope="session")
def hf_checkpoint_fused(hf_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.hf_oracle import fuse_experts

    return fuse_experts(hf_checkpoint, tmp_path_factory.mktemp("hf_fused") / "ckpt")


@pytest.fixture(scope="session")
def epserve_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache dir for generated artefacts (tokenizer.json, the embedded model) shared by the session."""
    d = Path(os.environ.get("EPSERVE_TEST_CACHE") or tmp_path_factory.mktemp("epserve_cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_fused(epserve_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`epserve tiny-checkpoint` output, fused experts (the embedded default model)."""
    from model_shards.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_fused") / "ckpt", cache_dir=epserve_cache)


@pytest.fixture(scope="session")
def ray_cluster():  # noqa: ANN201  # cluster.local_cluster.LocalCluster
    """A 3-node Ray cluster on loopback, shared by every test that needs Ray (started once)."""
    from cluster.local_cluster import start_local_cluster

    cluster = start_local_cluster(3, cpus_per_node=6)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def embedded_model_dir(epserve_cache: Path) -> Path:
    """The embedded default model (what `epserve serve` serves without --model), in the test cache."""
    from model_shards.tiny_checkpoint import embedded_model

    return embedded_model(epserve_cache)


@pytest.fixture(scope="session")
def embedded_fp32_mtp_model(embedded_model_dir: Path):  # noqa: ANN201  # model_shards.model.LocalModel
    """The embedded model loaded once in fp32 with its MTP head (the prefix-cache engine and rank tests share it)."""
    from model_shards.model import LocalModel

    return LocalModel.load(embedded_model_dir, dtype="float32", with_mtp=True)


@pytest.fixture(scope="module")
def one_thread_mtp_model(embedded_fp32_mtp_model):  # noqa: ANN001, ANN201  # model_shards.model.LocalModel
    """`embedded_fp32_mtp_model` with torch on one thread for the module, as every rank actor runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield embedded_fp32_mtp_model
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serve_ports(ray_cluster):  # noqa: ANN001, ANN201  # -> (http base URL, grpc "host:port")
    """Ray Serve on the shared cluster: HTTP and gRPC proxies on free loopback ports."""
    from ray import serve

    from cluster.process_groups import free_port
    from replicas.api.grpc_service import grpc_options
    from replicas.api.proxy_options import serve_start_options
    from replicas.serving.app_args import AppArgs

    http, grpc_port = free_port(), free_port()
    # the proxies' limits at AppArgs' defaults (16 MiB bodies and messages, 10 s body reads), as `epserve serve`
    serve.start(
        http_options={"host": "127.0.0.1", "port": http},
        grpc_options=grpc_options(grpc_port),
        **serve_start_options(AppArgs()),
    )
    yield f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def serve_http(serve_ports):  # noqa: ANN001, ANN201  # -> base URL of Serve's HTTP proxy
    return serve_ports[0]
