"""What a stranger on the network can reach of `epserve serve` (issue: RCE via Serve's internal port).

One real `epserve serve --trunk-ranks 1 --expert-ranks 2 --api-key K` (its own local cluster; on this
2-core machine that layout also proves a local cluster is sized for the layout it runs). Then:
- the exploit replayed: a pickle that would create a marker file goes, over loopback, to every socket
  the server's process tree listens on (found from the processes, not guessed): as the payload of
  every method of Serve's internal ASGIService, as raw bytes, and as an HTTP body. No file appears,
  and the replicas' internal servers answer UNAUTHENTICATED (Ray's token check ran before unpickling);
  the same payload does create the file when unpickled (so it is live);
- `ray.init` to the server's cluster without its token fails, with it succeeds;
- the socket table: everything listens on 127.0.0.1 except the ports Ray binds to every interface
  itself (the gRPC proxy, the replicas' internal servers), which the README's security section names.
"""

from __future__ import annotations

import ipaddress
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from cluster.process_groups import free_port
from tests.serve_process import ServeProcess, start_serve

pytestmark = pytest.mark.timeout(600)

KEY = "exposure-key"


class _Payload:
    """Unpickling this runs `touch MARKER` (what the attacker sent)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def server(embedded_model_dir: Path):  # noqa: ANN201
    sp = start_serve(
        ["--model", str(embedded_model_dir), "--trunk-ranks", "1", "--expert-ranks", "2", "--api-key", KEY],
        port=free_port(),
        grpc_port=free_port(),
    )
    try:
        sp.wait_ready(timeout_s=300)
        yield sp
    finally:
        sp.stop()


def _listening(sp: ServeProcess) -> list[tuple[str, int, psutil.Process]]:
    rows = []
    for p in sp.tree():
        try:
            rows += [
                (c.laddr.ip, c.laddr.port, p) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            pass
    return rows


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:60] or p.name()
    except psutil.Error:
        return "?"


def _loopback_reachable(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_unspecified


def test_layout_with_more_ranks_than_cores_serves(server: ServeProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key=KEY, timeout=120)
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_pickled_payload_reaches_no_unpickler(server: ServeProcess, tmp_path: Path) -> None:
    from ray.serve.generated import serve_pb2

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    # Positive control: the payload is live.
    subprocess.run(
        [sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
        input=payload,
        check=True,
        timeout=60,
    )
    assert marker.exists()
    marker.unlink()

    request = serve_pb2.ASGIRequest(
        pickled_request_metadata=payload, request_args=payload, request_kwargs=payload
    ).SerializeToString()
    methods = [
        "HandleRequest",
        "HandleRequestStreaming",
        "HandleRequestWithRejection",
        "HandleRequestWithRejectionStreaming",
    ]
    sockets = [(ip, port, p) for ip, port, p in _listening(server) if _loopback_reachable(ip)]
    assert len(sockets) >= 10, sockets
    refused_by_token = []
    for _ip, port, proc in sockets:
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as ch:
            for m in methods:
                call = (ch.unary_stream if "Streaming" in m else ch.unary_unary)(
                    f"/ray.serve.ASGIService/{m}", request_serializer=None, response_deserializer=None
                )
                try:
                    out = call(request, timeout=1)
                    if "Streaming" in m:
                        list(out)
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                        refused_by_token.append((port, _name(proc)))
        for body in (
            payload,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload,
        ):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(body)
                    s.settimeout(0.3)
                    try:
                        s.recv(4096)
                    except OSError:
                        pass
            except OSError:
                pass
    time.sleep(2)
    assert not marker.exists(), "a pickled payload sent over loopback was unpickled by the server"
    replicas = {p.pid for _ip, _port, p in sockets if "ServeReplica" in _name(p)}
    refused_names = " ".join(n for _, n in refused_by_token)
    assert len(replicas) >= 2 and refused_names.count("ServeReplica") >= 2 * len(methods), refused_by_token


def _gcs_address(sp: ServeProcess) -> str:
    for p in sp.tree():
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].endswith("gcs_server"):
            ports = sorted({c.laddr.port for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
            assert len(ports) == 1, ports  # the GCS serves one gRPC port (its flag says 0: chosen at start)
            return f"127.0.0.1:{ports[0]}"
    raise AssertionError("no gcs_server in the server's process tree")


def _token_path(sp: ServeProcess) -> str:
    """The cluster's token file, from the GCS's environment (epserve set it before starting the GCS)."""
    for p in sp.tree():
        try:
            if p.cmdline() and p.cmdline()[0].endswith("gcs_server"):
                return p.environ()["RAY_AUTH_TOKEN_PATH"]
        except psutil.Error:
            continue
    raise AssertionError("no gcs_server in the server's process tree")


@pytest.mark.parametrize("with_token", [False, True])
def test_ray_init_needs_the_clusters_token(server: ServeProcess, tmp_path: Path, with_token: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of this machine's user either
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if with_token:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = _token_path(server)
    code = (
        "import ray; ray.init(address=%r, log_to_driver=False); "
        "print('RAN', ray.get(ray.remote(num_cpus=0)(lambda: 41 + 1).remote(), timeout=60))"
    ) % _gcs_address(server)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if with_token:
        assert r.returncode == 0 and "RAN 42" in r.stdout, r.stderr[-2000:]
    else:
        assert r.returncode != 0 and "RAN" not in r.stdout
        assert "token" in r.stderr.lower(), r.stderr[-2000:]


def test_sockets_beyond_the_requested_host_are_the_documented_ones(server: ServeProcess) -> None:
    table = sorted((ip, port, _name(p)) for ip, port, p in _listening(server))
    print("\nlistening sockets of `epserve serve --host 127.0.0.1` and its process tree:")
    for ip, port, name in table:
        print(f"  {ip:>18}:{port:<6} {name}")
    beyond = [
        (ip, port, name)
        for ip, port, name in table
        if not ipaddress.ip_address(ip).is_loopback
        and not (
            ipaddress.ip_address(ip).version == 6
            and ipaddress.ip_address(ip).ipv4_mapped is not None
            and ipaddress.ip_address(ip).ipv4_mapped.is_loopback
        )
    ]
    # README "Security": Ray binds these to every interface and offers no option to change it.
    allowed = [
        (ip, port, name)
        for ip, port, name in beyond
        if (name.startswith("ray::ProxyActor") and port == server.grpc_port) or name.startswith("ray::ServeReplica")
    ]
    assert beyond == allowed, f"listening beyond 127.0.0.1: {sorted(set(beyond) - set(allowed))}"
    assert any(port == server.port and ipaddress.ip_address(ip).is_loopback for ip, port, _ in table)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "## Security" in readme and "ASGIService" in readme and "--grpc-port" in readme
