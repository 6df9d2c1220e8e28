"""The arguments of the Serve app: one pydantic model, `extra="forbid"`.

The same model validates `serve.run(build_app(args))`, `epserve serve --config app.yaml` and
a KubeRay serveConfigV2 `args:` block, so a typo in any of them is an error, not a silent
default. Environment variables are read here only (`api_key_env`). Tests:
tests/replicas/test_app_args.py.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from replicas.engine.prefix_config import PrefixCacheConfig

CPU_COLLECTIVE_DEADLINE_S = 5.0
GPU_COLLECTIVE_DEADLINE_S = 30.0


class AutoscalingArgs(BaseModel):
    """Serve autoscaling bounds of one deployment (replicas; for the engine, whole groups)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, description="Replicas kept at idle.")
    max_replicas: int = Field(1, ge=1, description="Upper bound under load.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must persist this long before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle time before scaling down.")
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report load.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window the load is averaged over.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self

    def serve_config(self) -> dict:
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }


class AppArgs(BaseModel):
    """Everything `build_app` needs. Sizes of caches are per trunk rank."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Checkpoint folder; unset = the embedded tiny model.")
    served_model_name: str | None = Field(None, description="Name clients use; default: the folder's name.")
    trunk_ranks: int = Field(1, ge=1, description="D: trunk ranks per expert-parallel group.")
    expert_ranks: int = Field(0, ge=0, description="X: expert ranks per group (0 = experts inside the trunk).")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gpus: bool = Field(False, description="Give every rank one GPU (NCCL); else CPU ranks (gloo).")
    cpus_per_rank: float = Field(1.0, gt=0)
    group_nodes: int | None = Field(
        None,
        ge=1,
        description="Nodes each group's ranks span, placed by all-to-all traffic (cluster/traffic.py): at most "
        "ceil((D + X) / N) ranks per node, one placement bundle per node (STRICT_SPREAD). Unset: one bundle per "
        "rank (PACK with GPUs, SPREAD with CPU ranks).",
    )
    collective_deadline_s: float | None = Field(
        None,
        gt=0,
        description="Bound on every collective of a group; a hung rank's streams fail after it. "
        "Unset: 5 s with CPU ranks (gloo), 30 s with GPUs (NCCL).",
    )
    capacity_factor: float = Field(2.0, gt=0, description="Decode exchange capacity over the mean rows per pair.")
    micro_batches: int | None = Field(
        None,
        ge=1,
        description="Ping-pong micro-batches per trunk rank (replicas/ep/micro_batches.py): a rank's attention of "
        "one runs while the expert ranks compute another's FFN; 1 turns it off. Unset: 2 with GPUs, 1 with CPU "
        "ranks. Needs expert_ranks >= 1 to matter.",
    )
    expert_load_file: str | None = Field(
        None,
        description="Initial expert placement from a saved load file (`epserve rebalance --save-load`); "
        "unset: contiguous ranges.",
    )
    redundant_experts: int = Field(
        0,
        ge=0,
        description="Extra expert copies per MoE layer: in the initial placement (needs expert_load_file) and in "
        "automatic rebalances (rebalance_interval_steps / rebalance_imbalance_threshold).",
    )
    rebalance_interval_steps: int | None = Field(
        None, ge=1, description="Rebalance the experts by measured load every this many engine steps (unset: never)."
    )
    rebalance_imbalance_threshold: float | None = Field(
        None,
        gt=1.0,
        description="Rebalance when the measured max/mean rows per expert rank (worst MoE layer, load window) "
        "exceeds this; checked every 32 steps, at most once per 256 steps (unset: never).",
    )
    rebalance_experts_per_step: int = Field(
        8,
        ge=0,
        description="A rebalance's weight moves: expert copies each expert rank loads between two serving steps "
        "(0: all at once, one longer pause).",
    )
    block_size: int = Field(16, ge=1, le=1024)
    num_kv_blocks: int = Field(1024, ge=1, description="KV blocks per trunk rank (CPU ranks).")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="With gpus: fraction of each trunk rank's GPU memory it uses; KV blocks (and at most "
        "max_num_seqs state slots) are sized from what the weights leave, not num_kv_blocks (vLLM's name).",
    )
    cuda_graph: bool = Field(
        True,
        description="CUDA graphs for decode steps (batch-size buckets captured at start) where a runner supports "
        "them: today the in-process runner only (`epserve generate`, the benchmarks); trunk ranks of a group run "
        "decode eagerly (replicas/ep/decode_graphs.py says what stands in the way). False: eager everywhere.",
    )
    max_num_seqs: int = Field(32, ge=1, description="Running sequences (= DeltaNet state slots) per trunk rank.")
    max_num_batched_tokens: int = Field(2048, ge=64, description="New tokens per trunk rank per step.")
    max_model_len: int | None = Field(
        None, ge=2, description="Context limit; default: the model's, capped by the cache."
    )
    default_max_tokens: int | None = Field(None, ge=1, description="max_tokens when a request sets none.")
    max_thinking_tokens: int | None = Field(
        None,
        ge=0,
        description="Thinking budget when a chat request sets none: after this many reasoning tokens "
        "the engine writes </think> and the answer follows. Unset: generation_config.json's max_thinking_tokens "
        "(16 in the embedded tiny model), else unbounded.",
    )
    max_n: int = Field(16, ge=1, description="Largest n a request may ask for.")
    max_fanout: int = Field(64, ge=1, description="Sequences one request may start: prompts x n (a 400 beyond).")
    max_waiting_requests: int = Field(256, ge=1, description="Engine queue bound; beyond it 429 + Retry-After.")
    max_queue_steps: int | None = Field(
        None,
        ge=1,
        description="Admit a request that must queue only if a running slot frees within this many "
        "steps (by the running requests' max_tokens); beyond it 429, so admitted requests keep their TTFT. "
        "Unset: only max_waiting_requests bounds the queue.",
    )
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    ingress_max_queued_requests: int = Field(512, ge=1, description="Serve's own queue bound (503 beyond).")
    engine_max_ongoing_requests: int = Field(1024, ge=1)
    ingress_autoscaling: AutoscalingArgs = Field(
        default_factory=lambda: AutoscalingArgs(min_replicas=1, max_replicas=2, target_ongoing_requests=32)
    )
    engine_autoscaling: AutoscalingArgs = Field(
        default_factory=lambda: AutoscalingArgs(min_replicas=1, max_replicas=1, target_ongoing_requests=64)
    )
    api_key: SecretStr | None = Field(None, description="Bearer key required on every route but /health.")
    api_key_env: str | None = Field(None, description="Name of an environment variable holding the key.")
    load_timeout_s: float = Field(1800.0, gt=0, description="Time allowed to load weights and form a group.")
    allowed_local_media_path: str | None = Field(
        None, description="Folder whose files requests may name as images / video frames (no network fetching)."
    )
    max_images_per_request: int = Field(8, ge=0)
    max_videos_per_request: int = Field(1, ge=0)
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="Encoded size of one image or video frame.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Decoded width x height of one image or frame.")
    max_video_frames: int = Field(64, ge=1, description="Frames one video keeps after sampling.")
    # Video files are decoded in the ingress (PyAV, the `video` extra); these bound one file's decode.
    max_video_bytes: int = Field(64 * 2**20, ge=1, description="Encoded size of one video file (mp4 / webm).")
    max_video_seconds: float = Field(
        600.0, gt=0, description="Duration of one video file; longer videos are refused, not truncated."
    )
    max_video_decoded_frames: int = Field(
        18000,
        ge=1,
        description="Frames one video file may hold: every frame is decoded to reach the sampled "
        "ones (10 min at 30 fps).",
    )
    max_video_decoded_pixels: int = Field(
        18000 * 1920 * 1080,
        ge=1,
        description="Width x height summed over the decoded frames of one video file "
        "(bounds decode work and time: 10 min of 1080p at 30 fps).",
    )
    max_video_decode_s: float = Field(
        60.0, gt=0, description="Wall time decoding one video file may take (a backstop for slow streams)."
    )
    speculative_tokens: int = Field(
        0,
        ge=0,
        le=8,
        description="k > 0: the MTP head drafts k tokens per step, verified by the next step "
        "(greedy output is identical to k = 0; needs a checkpoint with mtp.*).",
    )
    prefix_cache: bool = Field(
        True,
        description="Reuse the KV blocks and saved DeltaNet states of earlier prompts' shared prefixes (False: "
        "`--no-prefix-cache`, every prompt prefills from token 0).",
    )
    prefix_state_slots: int | None = Field(
        None,
        ge=0,
        description="Saved DeltaNet states (state checkpoints) per trunk rank for the prefix cache, each the size "
        "of a state slot. Unset: max_num_seqs. On GPUs a cap: they are carved out of the KV cache memory, at most "
        "a quarter of it (model_shards/cache_sizing.py); 0: no state is saved, so no prompt resumes from the cache.",
    )
    prefix_states_per_path: int = Field(
        4, ge=1, description="Saved states along one root-to-leaf path of the prefix tree, at most."
    )
    prefix_probe_interval: int = Field(
        512,
        ge=0,
        description="A new prompt path's first prefill saves provisional states every this many tokens (a multiple "
        "of 64; 0: none), so the first request that branches from it resumes near the branch point.",
    )
    max_request_body_mb: float = Field(
        16.0,
        gt=0,
        description="Largest HTTP request body and gRPC message, in MiB (2**20 bytes): 413 / "
        "RESOURCE_EXHAUSTED beyond, refused before it is buffered.",
    )
    body_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send its whole request body (408 after); a body still "
        "arriving holds no ingress slot.",
    )
    max_health_watchers: int = Field(
        1024,
        ge=1,
        description="grpc.health.v1 Watch streams per Serve proxy (RESOURCE_EXHAUSTED beyond); "
        "they are answered by the proxy and hold no ingress slot.",
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0,
        gt=0,
        description="On stop (Ctrl-C, SIGTERM, a replica being stopped) streams may finish this long; "
        "the rest end with a retriable error event and [DONE] (gRPC UNAVAILABLE). Keep it "
        "and the ingress's 5 s more below the pods' terminationGracePeriodSeconds.",
    )

    @model_validator(mode="after")
    def _layout(self) -> AppArgs:
        if self.expert_ranks == 0 and self.trunk_ranks > 1:
            raise ValueError("expert_ranks 0 keeps the experts inside one trunk rank: use trunk_ranks 1, or X >= 1")
        if self.group_nodes is not None and self.group_nodes > self.trunk_ranks + self.expert_ranks:
            raise ValueError(
                f"group_nodes {self.group_nodes} exceeds the group's {self.trunk_ranks + self.expert_ranks} ranks "
                "(trunk_ranks + expert_ranks): a node would hold none"
            )
        auto = self.rebalance_interval_steps is not None or self.rebalance_imbalance_threshold is not None
        if auto and self.expert_ranks == 0:
            raise ValueError("rebalance_interval_steps / rebalance_imbalance_threshold need expert_ranks >= 1")
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if self.prefix_probe_interval % 64:
            raise ValueError(
                f"prefix_probe_interval must be a multiple of 64 (0: off), got {self.prefix_probe_interval}"
            )
        if self.collective_deadline_s is None:
            # CPU steps of the served models take well under a second, so 5 s finds a hung (SIGSTOPped) rank
            # within reliability.md's target; NCCL kernels and first-step warm-ups need longer.
            self.collective_deadline_s = CPU_COLLECTIVE_DEADLINE_S if not self.gpus else GPU_COLLECTIVE_DEADLINE_S
        if self.micro_batches is None:
            # on GPUs the trunk and the expert ranks are separate devices that idle in lock-step; one CPU rank's
            # compute already competes for the machine's cores
            self.micro_batches = 2 if self.gpus else 1
        return self

    def prefix_cache_config(self) -> PrefixCacheConfig:
        return PrefixCacheConfig(
            enabled=self.prefix_cache,
            states_per_path=self.prefix_states_per_path,
            probe_interval=self.prefix_probe_interval,
        )

    def prefix_state_checkpoints(self) -> int:
        """State checkpoints each trunk rank allocates (`CacheSizes.state_checkpoints`; on GPUs the cap)."""
        if not self.prefix_cache:
            return 0
        return self.max_num_seqs if self.prefix_state_slots is None else self.prefix_state_slots

    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 2**20)

    def resolved_api_key(self) -> str | None:
        """The key itself: from api_key, or read (here, once) from the named environment variable."""
        if self.api_key is not None:
            return self.api_key.get_secret_value() or None
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"api_key_env names {self.api_key_env}, which is unset or empty")
            return value
        return None

    def group_rank_nodes(self) -> tuple[int, ...] | None:
        """The node of each rank of a group when `group_nodes` is set: the Serve replica's placement group
        and the group's actors both follow it."""
        if self.group_nodes is None:
            return None
        # imported here: cluster.placement loads torch, and AppArgs stays a light pydantic module
        from cluster.topology import GroupShape
        from cluster.traffic import spread_by_traffic

        return spread_by_traffic(GroupShape(self.trunk_ranks, self.expert_ranks), self.group_nodes)
