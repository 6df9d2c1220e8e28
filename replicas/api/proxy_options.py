"""What epserve sets in Serve's proxies: limits that must act before a request reaches the ingress.

Serve's proxies are started with Serve (`serve.start`), before any app, and read these settings
from their environment: the HTTP body middleware (replicas/api/body_limits.py) through Serve's
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` hook, the gRPC server's max message size (send and
receive; gRPC refuses a larger message from its length prefix, before buffering it) through
`RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`, and the health Watch cap (replicas/api/proxy_health.py).
`serve_start_options` passes them as the Serve controller's runtime_env, which the proxies it
creates inherit; on KubeRay the same variables are set on the Ray containers (k8s/). The values
come from the app's `AppArgs`, whose ingress enforces the body limits again.
Tests: tests/replicas/test_unauth_limits.py.
"""

from __future__ import annotations

from typing import Any

from replicas.api.body_limits import MAX_BODY_ENV, READ_TIMEOUT_ENV
from replicas.api.proxy_health import MAX_WATCHERS_ENV
from replicas.serving.app_args import AppArgs

HTTP_CALLBACK = "replicas.api.body_limits:proxy_middlewares"


def proxy_env(args: AppArgs) -> dict[str, str]:
    """Environment variables for Serve's proxy processes."""
    cap = args.max_request_body_bytes()
    return {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": HTTP_CALLBACK,
        MAX_BODY_ENV: str(cap),
        READ_TIMEOUT_ENV: repr(args.body_read_timeout_s),
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(cap),
        MAX_WATCHERS_ENV: str(args.max_health_watchers),
    }


def serve_start_options(args: AppArgs) -> dict[str, Any]:
    """Keyword arguments for `serve.start` beside http_options / grpc_options."""
    return {"controller_options": {"runtime_env": {"env_vars": proxy_env(args)}}}
