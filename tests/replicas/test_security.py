"""Security checks (docs/reliability.md goals S2 and S5).

S2: every HTTP route of `build_api()` (walked from the route table, so a new route cannot be forgotten)
and every RPC of the proto's services (walked from the descriptor) refuses a caller without the API key
(401 with the OpenAI error body / UNAUTHENTICATED); only /health and grpc.health.v1 are open.
S5: an `ast` scan of the project's sources for unsafe calls (unpickling, torch.load, eval/exec,
trust_remote_code, yaml.load without SafeLoader, shell=True, recv_pyobj), checkpoints read through
safetensors only, and chat templates rendered in jinja2's sandbox.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import requests
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from replicas.proto import epserve_pb2

pytestmark = pytest.mark.timeout(900)

APP, PREFIX, KEY, MODEL = "sec", "/sec", "sec-key", "sec-tiny"
ROOT = Path(__file__).resolve().parents[2]
OPEN_PATHS = {"/health"}  # nothing else: /openapi.json is behind the key, /docs and /redoc are disabled
BODIES = {  # plausible bodies; a POST route missing here gets {} (a 400 with the key, still a 401 without)
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [9707]},
}


@pytest.fixture(scope="module")
def sec_app(serve_ports, embedded_model_dir: Path):  # noqa: ANN001, ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    http, grpc_target = serve_ports
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name=MODEL,
        dtype="float32",
        num_kv_blocks=32,
        max_num_seqs=4,
        max_model_len=256,
        default_max_tokens=1,
        api_key=KEY,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    channel = grpc.insecure_channel(grpc_target)
    yield SimpleNamespace(base=http + PREFIX, channel=channel)
    channel.close()
    serve.delete(APP)


def _route_calls() -> list[tuple[str, str]]:
    """(method, path) of every route the ingress serves, from its route table."""
    from replicas.api.ingress import build_api

    calls = []
    for route in build_api().routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            calls.append((method, route.path))
    return calls


def _is_openai_401(r: requests.Response) -> bool:
    if r.status_code != 401:
        return False
    if r.request.method == "HEAD":
        return True
    err = r.json()["error"]
    return (
        set(err) == {"message", "type", "param", "code"}
        and err["type"] == "authentication_error"
        and err["code"] == "invalid_api_key"
        and err["message"]
    )


# ----------------------------------------------------------------------------------------------- S2: HTTP


def test_route_table_is_what_we_audit() -> None:
    """A change of the route table shows up here first: review its auth before updating this list."""
    paths = {p for _, p in _route_calls()}
    assert paths == {
        "/openapi.json",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
        "/reset_prefix_cache",  # admin: behind the key like the rest
    }
    assert not {"/docs", "/redoc", "/docs/oauth2-redirect"} & paths


def test_every_http_route_needs_the_key(sec_app) -> None:  # noqa: ANN001
    problems = []
    for method, path in _route_calls():
        url = sec_app.base + path
        body = BODIES.get(path, {}) if method == "POST" else None
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
            {"X-Api-Key": KEY},
        ):
            r = requests.request(method, url, json=body, headers=headers, timeout=60)
            if path in OPEN_PATHS:
                if r.status_code == 401:
                    problems.append(f"{method} {path} {headers}: open route answered 401")
            elif not _is_openai_401(r):
                problems.append(f"{method} {path} {headers}: {r.status_code} {r.text[:200]}")
        r = requests.request(method, url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        if r.status_code == 401 or r.status_code >= 500:
            problems.append(f"{method} {path} with the key: {r.status_code} {r.text[:200]}")
    assert problems == []


def test_unknown_paths_do_not_reveal_routes(sec_app) -> None:  # noqa: ANN001
    """Without the key an unknown path is a 401 like a known one (no route discovery without a key)."""
    for path in ("/no/such/route", "/docs", "/redoc", "/v1/embeddings"):
        r = requests.get(sec_app.base + path, timeout=30)
        assert _is_openai_401(r), (path, r.status_code, r.text[:200])
        r = requests.get(sec_app.base + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 404, (path, r.status_code)


def test_openapi_json_needs_the_key(sec_app) -> None:  # noqa: ANN001
    r = requests.get(sec_app.base + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]


# ----------------------------------------------------------------------------------------------- S2: gRPC


def _rpc(channel: grpc.Channel, service: str, method) -> tuple[object, object]:  # noqa: ANN001
    """A generic callable for one RPC of the descriptor, and an empty request of its input type."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{service}/{method.name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    call = kind(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_cls.FromString)
    return call, request_cls()


def _code(call, request, metadata: list[tuple[str, str]]) -> grpc.StatusCode:  # noqa: ANN001
    try:
        out = call(request, timeout=60, metadata=metadata)
        if not hasattr(out, "SerializeToString"):
            list(out)  # a stream: the status comes at its end
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_every_rpc_needs_the_key(sec_app) -> None:  # noqa: ANN001
    app = [("application", APP)]
    services = epserve_pb2.DESCRIPTOR.services_by_name
    assert services, "the proto declares no service"
    problems = []
    for service in services.values():
        for method in service.methods:
            call, request = _rpc(sec_app.channel, service.full_name, method)
            for meta in ([], [("authorization", "Bearer wrong")], [("authorization", KEY)]):
                code = _code(call, request, app + meta)
                if code != grpc.StatusCode.UNAUTHENTICATED:
                    problems.append(f"{service.full_name}/{method.name} {meta}: {code.name}")
            code = _code(call, request, app + [("authorization", f"Bearer {KEY}")])
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                problems.append(f"{service.full_name}/{method.name} with the key: {code.name}")
    assert problems == []


def test_grpc_health_is_open(sec_app) -> None:  # noqa: ANN001
    stub = health_pb2_grpc.HealthStub(sec_app.channel)
    meta = [("application", APP)]
    assert (
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30, metadata=meta).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="epserve.v1.Epserve"), timeout=30, metadata=meta)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


# ----------------------------------------------------------------------------------------------- S5: static scan

SCANNED = ("model_shards", "cluster", "replicas", "epserve", "loadtest")
BANNED_CALLS = {
    "pickle.load": "unpickling",
    "pickle.loads": "unpickling",
    "pickle.Unpickler": "unpickling",
    "_pickle.loads": "unpickling",
    "cloudpickle.load": "unpickling",
    "cloudpickle.loads": "unpickling",
    "dill.load": "unpickling",
    "dill.loads": "unpickling",
    "marshal.load": "unmarshalling",
    "marshal.loads": "unmarshalling",
    "shelve.open": "unpickling",
    "jsonpickle.decode": "unpickling",
    "torch.load": "pickle-based weights",
    "torch.jit.load": "pickle-based weights",
    "torch.serialization.load": "pickle-based weights",
    "eval": "eval",
    "exec": "exec",
    "builtins.eval": "eval",
    "builtins.exec": "exec",
    "yaml.unsafe_load": "unsafe yaml",
    "yaml.unsafe_load_all": "unsafe yaml",
    "yaml.full_load": "unsafe yaml",
    "yaml.full_load_all": "unsafe yaml",
    "os.system": "shell",
    "os.popen": "shell",
    "asyncio.create_subprocess_shell": "shell",
    "jinja2.Environment": "unsandboxed jinja",
    "jinja2.Template": "unsandboxed jinja",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (`import numpy as np` -> np: numpy)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value in (False, None)


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Findings of the S5 rules in one Python source (file:line: what)."""
    tree = ast.parse(source, filename)
    aliases, docstrings, found = _aliases(tree), _docstrings(tree), []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases) or ""
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if name in BANNED_CALLS:
                found.append(f"{where}: {name} ({BANNED_CALLS[name]})")
            if name.endswith(".recv_pyobj") or name == "recv_pyobj":
                found.append(f"{where}: recv_pyobj (unpickling network data)")
            if name in ("yaml.load", "yaml.load_all"):
                loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
                loader_name = (_dotted(loader, aliases) or "").rsplit(".", 1)[-1] if loader is not None else ""
                if loader_name not in SAFE_YAML_LOADERS:
                    found.append(f"{where}: {name} without SafeLoader")
            if name.startswith("subprocess.") and "shell" in kw and not _is_false(kw["shell"]):
                found.append(f"{where}: {name} with shell=True")
            if name in ("numpy.load", "numpy.lib.format.read_array") and not _is_false(kw.get("allow_pickle")):
                found.append(f"{where}: {name} with allow_pickle")
            if "trust_remote_code" in kw and not _is_false(kw["trust_remote_code"]):
                found.append(f"{where}: trust_remote_code")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value == "trust_remote_code":
                found.append(f"{where}: 'trust_remote_code' key")
            if node.value.lower().endswith(WEIGHT_SUFFIXES) or "pytorch_model" in node.value:
                found.append(f"{where}: non-safetensors weight file name {node.value!r}")
    return found


def test_scanner_finds_each_rule_and_nothing_safe() -> None:
    bad = """
import pickle, cloudpickle as cp, yaml, subprocess, torch, numpy as np, zmq
from pickle import loads as L
from transformers import AutoModel
pickle.loads(b""); cp.load(f); L(b""); torch.load("w"); eval("1"); exec("x=1")
yaml.load(s); yaml.load(s, Loader=yaml.Loader); subprocess.run("ls", shell=True); sock.recv_pyobj()
AutoModel.from_pretrained("x", trust_remote_code=True); np.load("a", allow_pickle=True)
open("pytorch_model.bin"); {"trust_remote_code": True}
"""
    found = unsafe_calls(bad)
    for what in (
        "pickle.loads",
        "cloudpickle.load",
        "torch.load",
        ": eval",
        ": exec",
        "yaml.load without",
        "shell=True",
        "recv_pyobj",
        "trust_remote_code",
        "allow_pickle",
        "weight file name",
        "'trust_remote_code' key",
    ):
        assert any(what in f for f in found), (what, found)
    assert len([f for f in found if "pickle.loads" in f]) == 2  # the alias `L` resolves too
    assert len([f for f in found if "yaml.load without" in f]) == 2
    safe = """'''A docstring may mention pytorch_model.bin.'''
import yaml, subprocess, torch
model.eval(); yaml.safe_load(s); yaml.load(s, Loader=yaml.SafeLoader); subprocess.run(["ls"], check=True)
subprocess.run(["ls"], shell=False); torch.tensor([1]); f(trust_remote_code=False)
"""
    assert unsafe_calls(safe) == []


# The one unpickling the project does: the trunk ranks' step stream, whose frames are HMAC-SHA256-checked with a
# per-epoch key that reaches both ends only through Ray's token-authenticated calls (replicas/ep/step_channel.py).
# Allowed only in a function that compares the frame's MAC first (checked below, so removing the check fails).
AUTHENTICATED_UNPICKLING = {"replicas/ep/step_channel.py"}


def _unpickles_only_after_a_mac_check(source: str) -> bool:
    """Every function of `source` that calls pickle.loads also calls hmac.compare_digest on an earlier line."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = [(n.lineno, _dotted(n.func, aliases)) for n in ast.walk(fn) if isinstance(n, ast.Call)]
        loads = [ln for ln, name in calls if name == "pickle.loads"]
        checks = [ln for ln, name in calls if name == "hmac.compare_digest"]
        if loads and not (checks and min(checks) < min(loads)):
            return False
    return True


def test_no_unsafe_calls_in_project_sources() -> None:
    files = [p for d in SCANNED if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, files
    findings = []
    for p in files:
        rel, source = p.relative_to(ROOT).as_posix(), p.read_text()
        found = unsafe_calls(source, rel)
        if rel in AUTHENTICATED_UNPICKLING:
            assert _unpickles_only_after_a_mac_check(source), rel
            found = [f for f in found if not f.endswith("pickle.loads (unpickling)")]
        findings += found
    assert findings == []


def test_the_mac_check_rule_fails_without_the_check() -> None:
    checked = (
        "import hmac, pickle\n"
        "def f(b, m, k):\n"
        "    if not hmac.compare_digest(m, k):\n"
        "        raise ValueError\n"
        "    return pickle.loads(b)\n"
    )
    unchecked = "import pickle\ndef f(b):\n    return pickle.loads(b)\n"
    late = (
        "import hmac, pickle\ndef f(b, m, k):\n    x = pickle.loads(b)\n    hmac.compare_digest(m, k)\n    return x\n"
    )
    assert _unpickles_only_after_a_mac_check(checked)
    assert not _unpickles_only_after_a_mac_check(unchecked)
    assert not _unpickles_only_after_a_mac_check(late)


SAFETENSORS_CALL = re.compile(r"\b(safe_open|load_file)\(")  # whole names: read_load_file( is not one


def test_checkpoints_are_read_through_safetensors_only(tmp_path: Path) -> None:
    """A folder with pickle-format weights only is refused, never loaded through a fallback."""
    from model_shards.checkpoint_files import CheckpointError, CheckpointReader

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    with pytest.raises(CheckpointError, match="safetensors"):
        CheckpointReader(tmp_path)
    readers = {
        p.relative_to(ROOT).as_posix()
        for d in SCANNED
        if (ROOT / d).is_dir()
        for p in (ROOT / d).rglob("*.py")
        if SAFETENSORS_CALL.search(p.read_text())
    }
    assert readers == {"model_shards/checkpoint_files.py"}, readers


# ----------------------------------------------------------------------------------------------- S5: templates

ESCAPES = [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ strftime_now.__globals__.os.system('id') }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'system'}) }}",
]
# Bare reads of an unsafe attribute render as jinja's Undefined (empty), revealing nothing.
BARE_READS = [
    "{{ messages.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ messages|attr('__class__')|attr('__mro__') }}",
    "{{ '{0.__class__}'.format(messages) }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_chat_template_sandbox_blocks_escapes(source: str) -> None:
    from jinja2.exceptions import SecurityError

    from model_shards.chat_template import ChatTemplate, ChatTemplateError

    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert isinstance(info.value.__cause__, SecurityError), repr(info.value.__cause__)


@pytest.mark.parametrize("source", BARE_READS)
def test_chat_template_sandbox_reveals_nothing(source: str) -> None:
    from model_shards.chat_template import ChatTemplate

    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]) == ""
