"""Load testing of an OpenAI-compatible (or epserve gRPC) server: the core of `epserve bench`.

One concept per module: `datasets` (what to send; text prompts through a local tokenizer or
`remote_tokenizer`, the server's /tokenize), `arrivals` (when to send it), `http_client`
and `grpc_client` (how; one `RequestResult` per request), `runner` (warm-up, dispatch, progress),
`metrics` (aggregation, goodput), `report` (summary table, JSON), `plot` (PNG). `fake_server` is a
trivial streaming server used to show the client is not the bottleneck (benchmarks/bench_loadgen.py)
and by the tests; `locustfile.py` is a stand-alone Locust file for autoscaling tests.
Must not: import Ray or the serving code (a bench runs on any machine that reaches the server); it
uses only the tokenizer (model_shards/tokenizer.py) and the generated gRPC stubs (replicas/proto).
Tests: tests/loadtest/test_bench.py.
"""
