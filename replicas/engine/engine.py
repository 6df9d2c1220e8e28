"""The engine: continuous batching of many requests on one expert-parallel group.

`step() = schedule -> execute -> update` (vLLM), run as one asyncio task: the scheduler picks
each trunk rank's tokens, the group runs them (one Ray call per rank, one incremental step message
each: replicas/engine/step_types.py), and sampled tokens become stream items of their requests:
token ids, at most one item per request per step (engine_types.RequestOutput). Requests join and
leave between steps; aborts and choices the front end ended (a stop string: `finish_choice`) free
their caches before the next step. A failed group ends every request it holds with a retriable
error, is rebuilt, and the loop resumes. Must not: hold model math, HTTP or text (the front end
detokenizes).
Tests: tests/replicas/test_engine.py, tests/replicas/test_step_protocol.py, tests/replicas/test_determinism.py,
tests/replicas/test_prefix_cache.py.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from replicas.engine.block_pool import BlockPool
from replicas.engine.engine_types import EngineFailure, GenerateOutput, GenerateRequest, RequestOutput
from replicas.engine.errors import EngineOverloaded, EngineUnavailable, RequestRejected
from replicas.engine.prefix_cache import GRID, PrefixCache
from replicas.engine.prefix_config import PrefixCacheConfig
from replicas.engine.scheduler import Scheduled, Scheduler, SchedulerConfig, SchedulerOutput
from replicas.engine.sequence import Sequence, Status
from replicas.engine.step_guard import request_problem
from replicas.engine.step_types import SERVER_ERROR, SeqStart, SeqStep, StepRequest, StepResult, TokenLogprobs
from replicas.serving.metrics import MetricsRegistry

if TYPE_CHECKING:  # annotations only: llguidance loads with the first constrained request
    from replicas.engine.structured_output import GrammarMatcher

log = logging.getLogger("ray.serve.epserve.engine")
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections while the engine runs (Engine.start)


# SeqStep's fields after output_index at their defaults (a plain decode's message entry)
_DECODE_DEFAULTS = (None, (), (), None, None, None, None)
assert SeqStep._fields[6:] == (
    "start",
    "drafts",
    "suppress_ids",
    "allowed_mask",
    "forced_token",
    "mtp_next",
    "save_state",
)
assert _DECODE_DEFAULTS == tuple(SeqStep._field_defaults[f] for f in SeqStep._fields[6:])


class AsyncRunner(Protocol):
    """The group as the engine drives it (replicas/ep/group.py, or an in-process adapter)."""

    async def step(self, requests: list[StepRequest]) -> list[StepResult]: ...


class _Stream:
    """A request's stream buffer: items appended by the engine loop, its reader woken per put. Lighter than
    asyncio.Queue (no getter deque, no put-side future machinery): one is fed per request per step.

    A reader waits on its own `waiter`, or, while its choice decodes (`decoding`: set by the engine once a plain
    choice has its first token; news comes with every step from then on), on the engine's one future of the next
    step's delivery: one future set per step instead of one per request. `ends` counts the choices the items
    appended so far end (each ends once: a finish or an error), so the reader stops after the last item without
    looking into each one."""

    __slots__ = ("items", "waiter", "ends", "decoding")

    def __init__(self) -> None:
        self.items: deque[RequestOutput] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.ends = 0
        self.decoding = False

    def put_nowait(self, item: RequestOutput) -> None:
        self.items.append(item)
        self.ends += sum(1 for o in item.outputs if o.finish_reason is not None or o.error is not None)
        self.wake()

    def wake(self) -> None:
        """Wake the reader waiting on its own waiter, if any (an item was appended)."""
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)


class _Delivery(asyncio.Future[None]):
    """The next step's delivery, awaited by every decoding stream's reader (Engine.generate).

    Its readers (the tasks awaiting it) are woken by one loop callback, not one each as a Future's done callbacks
    are: at 512 decoding requests that is 512 handles less per step. A task awaiting a Future subclass registers
    through `add_done_callback` looked up on the object: until delivery that name is an instance attribute bound to
    a plain future's C method (`_collect`, never completed), which only records the reader (a Python override cost
    ~0.5 us per reader per step); delivery reads them back (`_callbacks`, the (callback, context) pairs a Future
    keeps) and drops the attribute, so later callbacks take the Future's own path. Cancelling a task cancels the
    future it awaits: cancelling one reader must not cancel this one for all, so it refuses (the task then raises
    CancelledError as soon as it runs) and delivers now, so that the cancelled reader runs at once; the others wake
    once, find no item and wait for the next delivery."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._collect: asyncio.Future[None] = loop.create_future()
        # mypy: an instance attribute in place of the method (see the class docstring: a C-level call per reader)
        self.add_done_callback = self._collect.add_done_callback  # type: ignore[method-assign, assignment]

    def remove_done_callback(self, fn: Callable[[_Delivery], object], /) -> int:
        # (a reader's callback is called with this future, though `_collect` holds it)
        held = self._collect.remove_done_callback(cast("Callable[[asyncio.Future[None]], object]", fn))
        return held + super().remove_done_callback(fn)

    def deliver(self) -> None:
        if self.done():
            return
        self.set_result(None)
        del self.add_done_callback  # from now on the Future's own (a done future calls back via the loop)
        if self._collect._callbacks:  # the Future's (callback, context) pairs (C and Python futures)
            self.get_loop().call_soon(self._wake_readers)

    def _wake_readers(self) -> None:
        readers = self._collect._callbacks or ()
        self._collect = self.get_loop().create_future()  # (the readers are not called twice)
        for fn, context in readers:
            try:
                context.run(fn, self)
            except Exception as exc:  # noqa: BLE001  # as the loop treats a failing callback: report, go on
                self.get_loop().call_exception_handler({"message": "delivery callback failed", "exception": exc})

    def cancel(self, msg: object = None) -> bool:
        self.deliver()
        return False


@dataclass(slots=True)
class _Delta:
    """A choice's news of the step being delivered (becomes one GenerateOutput)."""

    seq: Sequence
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | None = None
    error: EngineFailure | None = None


class Engine:
    """Schedules and runs requests on one group.

    Args:
        runner: executes steps (the group driver).
        pools: one BlockPool per trunk rank, sized like the ranks' cache tensors.
        config: scheduler limits per trunk rank.
        max_waiting: bound of the waiting queue (sequences); beyond it `EngineOverloaded`.
        recover: called (in a thread) after a group failure to rebuild it; None = stay failed.
        metrics: where to record serving metrics.
        grammars: returns the GrammarCache for structured output (built on first use; None = unsupported).
        spec_tokens: k > 0 drafts k tokens per step with the MTP head (the runner's pools must hold the
            per-token states: spec_tokens >= k, and config.lookahead >= 2k).
        max_queue_steps: a request that must wait for a running slot is admitted only if one frees within
            this many steps, by the running sequences' max_tokens (1: at the end of the step now running);
            beyond it `EngineOverloaded`, so admitted requests keep their TTFT. None: `max_waiting` only.
        vocab_size: rows of the LM head; token ids and logprobs beyond it are refused at admission
            (replicas/engine/step_guard.py). None: unchecked.
        engine_id: stamped on every stream item (RequestOutput.engine_id): the Serve replica running this engine.
        prefix_cache: how the prefix cache behaves (replicas/engine/prefix_cache.py, one per trunk rank over its
            pool's state checkpoints); None or enabled=False: every prompt prefills from token 0. A pool without
            checkpoints, or a KV block size that does not divide 64, turns it off (logged).
    """

    def __init__(
        self,
        runner: AsyncRunner,
        *,
        pools: list[BlockPool],
        config: SchedulerConfig,
        max_waiting: int = 256,
        recover: Callable[[], None] | None = None,
        metrics: MetricsRegistry | None = None,
        grammars: Callable[[], Any] | None = None,
        spec_tokens: int = 0,
        max_queue_steps: int | None = None,
        vocab_size: int | None = None,
        engine_id: str = "",
        prefix_cache: PrefixCacheConfig | None = None,
    ) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        caches: list[PrefixCache] | None = None
        if prefix_cache is not None and prefix_cache.enabled:
            if any(p.num_checkpoints == 0 or GRID % p.block_size for p in pools):
                log.warning(
                    "prefix cache off: it needs state checkpoints on every trunk rank and a KV block size dividing %d",
                    GRID,
                )
            else:
                caches = [PrefixCache(p, prefix_cache) for p in pools]
        self.prefix_caches = caches
        self.scheduler = Scheduler(config, pools, caches)
        self.engine_id = engine_id
        self.max_waiting = max_waiting
        self.recover = recover
        self.metrics = metrics or MetricsRegistry()
        self._grammars = grammars
        self.spec_tokens = spec_tokens
        if max_queue_steps is not None and max_queue_steps < 1:
            raise ValueError(f"max_queue_steps must be >= 1 or None, got {max_queue_steps}")
        self.max_queue_steps = max_queue_steps
        if spec_tokens and config.lookahead < 2 * spec_tokens:
            raise ValueError(f"speculating {spec_tokens} tokens needs SchedulerConfig.lookahead >= {2 * spec_tokens}")
        self._streams: dict[str, tuple[list[Sequence], _Stream]] = {}
        self._touched: list[Sequence] = []  # sequences with news this step (their `delta`)
        self._step_tokens = 0  # tokens generated this step (one counter update per step)
        self._now = 0.0  # the clock of the step being recorded (one reading per step, not per token)
        self._ttft = self.metrics.histogram("time_to_first_token_seconds")
        self._itl = self.metrics.histogram("inter_token_latency_seconds")
        self._delivery: _Delivery | None = None  # what decoding streams' readers wait on (generate)
        self._deliver_pending = False  # an item put between steps waits for _deliver at the loop's next turn
        self._prev_times: list[float] = []  # the step's tokens' previous token times (ITL, observed per step)
        self._prev_now = 0.0  # the previous step's clock: most tokens' previous token time
        self._same_prev = 0  # tokens of this step whose previous token came in the previous step
        self._aborted: list[Sequence] = []
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.failure: str | None = None  # set while the group is down
        self.draining = False  # stopping: admits nothing new
        self.steps = 0
        self.last_step_time = 0.0
        self._canary: asyncio.Future | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            # What lives before the first request (modules, torch, the tokenizer: ~200k objects) moves out of the
            # collector's reach: a full collection walked it all, ~100 ms every few dozen steps at 512 running.
            # Collect first, so garbage in cycles now (e.g. an earlier engine's) is not frozen with it.
            gc.collect()
            gc.freeze()
            # Each step at hundreds running allocates thousands of short-lived objects (step entries, stream items):
            # at the default first threshold (700) that is several young collections per step, each promoting the
            # items still in flight into older generations that are walked again (~0.4 ms per step at 512). A
            # larger first threshold collects them once they are dead. Only ever raised (the process may want more).
            g0, g1, g2 = gc.get_threshold()
            gc.set_threshold(max(g0, GC_YOUNG_THRESHOLD), g1, g2)
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="epserve-engine")

    async def stop(self) -> None:
        """End every request with a retriable error and stop the loop."""
        self._fail_all("the engine is shutting down", retriable=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001  # the loop's own end
                pass
            self._task = None

    async def drain(self, grace_s: float) -> None:
        """Admit nothing new; let open requests run for `grace_s`, then end the rest with a retriable error."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.end(rid, "the server is shutting down; retry")

    def end(self, request_id: str, message: str) -> None:
        """End a request now with a retriable error item (its stream closes); caches freed between steps."""
        entry = self._streams.get(request_id)
        if entry is None:
            return
        seqs, queue = entry
        failure = EngineFailure(message, retriable=True)
        outputs = tuple(
            GenerateOutput(index=s.index, error=failure, completion_tokens=s.num_output)
            for s in seqs
            if s.status is not Status.FINISHED and not s.aborted
        )
        if outputs:
            self._put_outside_step(queue, RequestOutput(request_id, self.steps, outputs, self.engine_id))
        self.abort(request_id)

    # ----------------------------------------------------------------- requests
    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Stream the news of all n choices of `req`, at most one item per engine step, until each choice has
        finished or failed.

        Raises (before the first event):
            EngineOverloaded, RequestRejected, EngineUnavailable.
        """
        self.admit_check(req)
        compiled = await self._compile(req) if req.grammar is not None else None
        seqs = [Sequence(req, i, next(self._ids)) for i in range(req.n)]
        for s in seqs:
            # Verification is exact for plain sampling; penalties, grammars and min_tokens change the
            # distribution from token to token, so those requests decode without drafts.
            s.speculate = (
                bool(self.spec_tokens) and req.grammar is None and not s.params.has_penalties and req.min_tokens == 0
            )
        if compiled is not None:
            from replicas.engine.structured_output import GrammarMatcher

            for s in seqs:
                s.matcher = GrammarMatcher(compiled, eos_ids=() if req.ignore_eos else req.eos_token_ids)
        if self.prefix_caches is not None:
            key = req.mm.cache_key(req.prompt_ids) if req.mm is not None else tuple(req.prompt_ids)
            for s in seqs:  # None: not cached (an image prompt without content keys)
                s.cache_key, s.cache_ns = key, (req.cache_salt or "", s.speculate)
        queue = _Stream()
        self._streams[req.request_id] = (seqs, queue)
        for s in seqs:
            s.stream = queue
            s.self_fed = s.plain and not s.speculate
            s.fast = s.self_fed and req.n == 1
            self.scheduler.add(s)
        self._wake.set()
        n = req.n
        items, loop = queue.items, asyncio.get_running_loop()
        try:
            while True:
                if items:
                    yield items.popleft()
                    continue
                if queue.ends >= n:  # every choice ended, every item out
                    break
                # waits here, not in a helper coroutine: one frame less per item (one per step)
                if queue.decoding:
                    # decoding: its news comes with the next step; wait on the future every decoding reader shares
                    # (a preempted choice wakes with each step until it decodes again: a wake finds no item)
                    f = self._delivery
                    if f is None or f.done():
                        f = self._delivery = _Delivery(loop=loop)
                    await f
                else:
                    queue.waiter = waiter = loop.create_future()
                    await waiter
        finally:
            if queue.ends < n:
                self.abort(req.request_id)
            self._streams.pop(req.request_id, None)

    def _deliver(self) -> None:
        """Wake the readers waiting on the shared delivery future (their items are in their streams)."""
        self._deliver_pending = False
        f, self._delivery = self._delivery, None
        if f is not None:
            f.deliver()

    def _put_outside_step(self, stream: _Stream, item: RequestOutput) -> None:
        """An item between steps (an error, an acknowledgement): its reader may wait on the shared future."""
        stream.put_nowait(item)
        if stream.decoding:  # its reader may wait on the shared delivery (if not, the early wake finds nothing)
            self._deliver()

    async def _compile(self, req: GenerateRequest) -> Any:  # noqa: ANN401  # CompiledGrammar
        """Compile (or fetch from the bounded cache) the request's grammar, off the event loop."""
        from replicas.engine.structured_output import GrammarCompileBusy

        if self._grammars is None:
            raise RequestRejected("structured output is not available on this engine")
        try:
            cache = await asyncio.to_thread(self._grammars)
            return await asyncio.to_thread(cache.get, req.grammar)
        except GrammarCompileBusy as exc:
            raise EngineOverloaded(str(exc)) from None
        except ValueError as exc:
            raise RequestRejected(f"invalid structured output constraint: {exc}") from None

    def admit_check(self, req: GenerateRequest) -> None:
        if self.draining:
            raise EngineUnavailable("the server is shutting down; retry")
        if self.failure is not None:
            raise EngineUnavailable(f"the expert-parallel group is unavailable ({self.failure}); retry")
        if req.request_id in self._streams:
            raise RequestRejected(f"request id {req.request_id} is already running")
        problem = request_problem(req, vocab_size=self.vocab_size)
        if problem is not None:  # refused alone, before any step: it cannot fail the group
            raise RequestRejected(problem)
        if not self.scheduler.fits_ever(len(req.prompt_ids) + req.max_tokens):
            raise RequestRejected(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) do not fit in one trunk "
                "rank's KV cache on this server"
            )
        queued = len(self.scheduler.waiting) + req.n - self._free_seq_slots()
        if queued > self.max_waiting:
            raise EngineOverloaded(
                f"{len(self.scheduler.waiting)} sequences are waiting for a running slot (limit {self.max_waiting})"
            )
        if queued > 0 and self.max_queue_steps is not None:
            steps = self._steps_until_freed(queued)
            if steps > self.max_queue_steps:
                raise EngineOverloaded(f"no running slot frees within {self.max_queue_steps} steps")

    def _steps_until_freed(self, k: int) -> float:
        """Steps until k running sequences have ended, if each runs to its max_tokens.

        NOTE: an upper bound (eos, a stop string or accepted drafts end sequences sooner), so the
        bound errs towards rejecting; a sequence still prefilling counts its prefill as one step.
        """
        ends = sorted(seq.req.max_tokens - seq.num_output for run in self.scheduler.running for seq in run.values())
        return ends[k - 1] if k <= len(ends) else float("inf")

    def _free_seq_slots(self) -> int:
        """Running slots the next step can fill: sequences taking them do not queue behind running ones.

        NOTE: a burst into an idle engine arrives faster than the loop moves it from `waiting` to running,
        so counting every waiting sequence as queued would reject requests that start at the next step.
        """
        s = self.scheduler
        return sum(
            max(0, min(s.config.max_num_seqs - len(run), pool.free_slots)) for run, pool in zip(s.running, s.pools)
        )

    def abort(self, request_id: str) -> None:
        """Stop a request; its caches are freed before the next step."""
        entry = self._streams.get(request_id)
        if entry is None:
            return
        running = [s for s in entry[0] if s.status is not Status.FINISHED and not s.aborted]
        if not running:
            return
        log.info("request %s: aborted", request_id)
        self.metrics.inc("requests_aborted")
        for s in running:
            s.aborted = True
            self._aborted.append(s)
        self._wake.set()

    def finish_choice(self, request_id: str, index: int) -> None:
        """The front end ended choice `index` (it found a stop string): stop generating it; its caches are freed
        before the next step. Its stream gets one last item for it (finish_reason "stop", no tokens) and then
        nothing more; the front end, which counts tokens up to its stop string only, ignores it."""
        entry = self._streams.get(request_id)
        if entry is None or not 0 <= index < len(entry[0]):
            return
        seqs, queue = entry
        s = seqs[index]
        if s.status is Status.FINISHED or s.aborted:
            return
        s.aborted, s.end_reason = True, "stop"
        self._aborted.append(s)
        s.delta = None  # not reached between steps; for safety
        out = GenerateOutput(index=index, finish_reason="stop", completion_tokens=s.num_output)
        queue.put_nowait(RequestOutput(request_id, self.steps, (out,), self.engine_id))
        # A reader on the shared future wakes at the loop's next turn (one wake of all decoding readers per turn,
        # not one per stopped choice): the front end ignores this item, and the loop turns now (or ends a step).
        self._deliver_pending |= queue.decoding
        self._wake.set()

    # ----------------------------------------------------------------- the loop
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if self._deliver_pending:
                self._deliver()
            self._reap()
            out = self.scheduler.schedule()
            if out.empty:
                if self._canary is not None and not self.scheduler.num_running:
                    await self._run_canary()
                elif not self.scheduler.waiting and not self.scheduler.num_running:
                    self._wake.clear()
                else:
                    await asyncio.sleep(0.005)  # waiting on an abort or a free block
                self._record_gauges()
                continue
            t0 = time.monotonic()
            try:
                requests = self._requests(out)
                results = await self.runner.step(requests)
                _check_results(requests, results)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # any group failure ends its requests, retriably
                await self._on_failure(exc)
                continue
            self.steps += 1
            self._prev_now = self._now
            self.last_step_time = self._now = time.monotonic()
            self.metrics.observe("step_time_seconds", self.last_step_time - t0)
            self._update(out, results)
            self._record_gauges()

    def _requests(self, out: SchedulerOutput) -> list[StepRequest]:
        reqs = []
        new = tuple.__new__  # a NamedTuple's own __new__ is a Python function: this builds it in C
        columnar = out.columnar or [0] * len(out.per_trunk)
        for t, trunk in enumerate(out.per_trunk):
            steps: list[SeqStep] = []
            append = steps.append
            k = columnar[t]  # the first k: decodes the rank continues on its own (StepRequest.decodes)
            for sch in trunk[k:] if k else trunk:
                seq, start, n, sample = sch
                addr = seq.addr
                if seq.plain and n == 1 and sample and addr.started:  # type: ignore[union-attr]  # scheduled: addr set
                    # a plain decode (here: with drafting on, or a new KV block): its token, output index and new
                    # blocks, nothing else (what _seq_step gives it); the fields in SeqStep's order, its defaults
                    # after the output index
                    sent, blocks = addr.blocks_sent, addr.blocks  # type: ignore[union-attr]
                    fresh: tuple[int, ...] = ()
                    if sent != len(blocks):
                        fresh, addr.blocks_sent = tuple(blocks[sent:]), len(blocks)  # type: ignore[union-attr]
                    oi = start + 1 - seq.prompt_len
                    # (a concatenation: `*_DECODE_DEFAULTS` inside the display builds a list first)
                    append(
                        new(SeqStep, (seq.seq_id, start, (seq.token_ids[start],), fresh, True, oi) + _DECODE_DEFAULTS)
                    )
                    continue
                append(self._seq_step(sch))
                if seq.t_scheduled is None:
                    seq.t_scheduled = time.monotonic()
                    self.metrics.observe("request_queue_time_seconds", seq.t_scheduled - seq.t_arrival)
            cont = trunk[:k]
            reqs.append(
                StepRequest(
                    tuple(steps),
                    released=self.scheduler.take_released(t),
                    mtp_steps=self.spec_tokens,
                    decodes=tuple([sch[0].seq_id for sch in cont]),
                    decode_context=tuple([sch[1] for sch in cont]),
                )
            )
        return reqs

    @staticmethod
    def _seq_step(sch: Scheduled) -> SeqStep:
        """A sequence's part of the step message: O(new tokens), whatever its context (step_types.py)."""
        seq, start, n = sch.seq, sch.start, sch.n
        addr = seq.addr
        assert addr is not None
        ids = seq.token_ids
        first: SeqStart | None = None
        if not addr.started:  # its first step on this rank (fresh, or recomputed after a preemption)
            addr.started = True
            mm = seq.mm
            first = SeqStart(
                addr.slot,
                seq.params,
                seq.prompt_len,
                rope_delta=seq.rope_delta,
                mm_positions=mm.positions if mm is not None else None,
                vision_rows=seq.vision_rows() if mm is not None else (),
                vision=mm.inputs if mm is not None else None,
                mtp=seq.speculate,
                restore=addr.restore,
                # the repetition penalty reads the whole prompt: a restoring rank gets the cached part's ids
                prefix_ids=tuple(ids[:start])
                if addr.restore is not None and seq.params.repetition_penalty != 1.0
                else (),
            )
        new_blocks: tuple[int, ...] = ()
        if addr.blocks_sent != len(addr.blocks):
            new_blocks = tuple(addr.blocks[addr.blocks_sent :])
            addr.blocks_sent = len(addr.blocks)
        if not sch.sample:  # a prefill chunk that is not the prompt's last
            nxt = ids[start + n] if seq.speculate and start + n < len(ids) else None
            save = seq.saving[1] if seq.saving is not None and seq.saving[0] == start + n else None
            return SeqStep(
                seq.seq_id,
                start,
                tuple(ids[start : start + n]),
                new_blocks,
                False,
                0,
                first,
                mtp_next=nxt,
                save_state=save,
            )
        drafts = tuple(seq.drafts) if (seq.drafts and n > 1 and start + 1 == len(ids)) else ()
        own = tuple(ids[start : start + n - len(drafts)]) if n > 1 else (ids[start],)
        # A spent thinking budget forces `</think>` (then its blank line) through a one-token mask, so sampling,
        # logprobs and the MTP drafts that follow all see the forced token; _update keeps drafts out of these steps.
        forced = seq.forced_token()
        if forced is not None:
            assert not drafts, "drafts never reach a forced token"
            return SeqStep(seq.seq_id, start, own, new_blocks, True, seq.num_output, first, forced_token=forced)
        mask = seq.matcher.bitmask() if seq.matcher is not None else None
        suppress = seq.suppressed_ids()
        if mask is None and not suppress and not drafts:  # the common decode: nothing but the token
            return SeqStep(seq.seq_id, start, own, new_blocks, True, seq.num_output, first)
        return SeqStep(
            seq.seq_id,
            start,
            own,
            new_blocks,
            True,
            seq.num_output,
            first,
            drafts=drafts,
            suppress_ids=suppress,
            allowed_mask=mask,
        )

    def _update(self, out: SchedulerOutput, results: list[StepResult]) -> None:
        now, step, engine_id, prevs = self._now, self.steps, self.engine_id, self._prev_times
        add_prev, gen_out, req_out = prevs.append, GenerateOutput, RequestOutput  # locals: read per sequence
        prev_now = self._prev_now
        tokens = same = 0
        if out.prefilled:  # prefix cache: before the updates below release sequences that finished in this step
            refused = {
                sch.seq.seq_id
                for trunk, res in zip(out.per_trunk, results)
                if res.errors
                for sch, e in zip(trunk, res.errors)
                if e is not None
            }
            self.scheduler.after_step(out, refused)
        for trunk, res in zip(out.per_trunk, results):
            token_ids, logprobs, errors = res.token_ids, res.logprobs, res.errors
            for i, sch in enumerate(trunk):
                seq, start, count, sample = sch
                if errors and (error := errors[i]) is not None:
                    self._refuse(seq, error)  # failed alone, before the step's collectives
                    continue
                if seq.fast:  # plain, n = 1, no drafts: what _emit and _flush do, inlined (the hot path)
                    seq.num_computed = start + count
                    if not sample or seq.aborted:
                        continue
                    token = token_ids[i]
                    assert token is not None  # the rank samples every sampling sequence
                    ids = seq.token_ids
                    ids.append(token)
                    prev = seq.t_last_token
                    seq.t_last_token = now
                    stream = seq.stream
                    if prev == prev_now:  # (counted, not listed: one histogram update for all of them)
                        same += 1
                    elif prev is not None:
                        add_prev(prev)
                    else:
                        seq.t_first_token = now
                        self._ttft.observe(now - seq.t_arrival)
                        stream.decoding = True  # news with every step from now on
                    tokens += 1
                    n = len(ids) - seq.prompt_len
                    lp = logprobs[i]
                    if token in seq.end_ids or n >= seq.max_tokens:
                        finish, stop_reason = seq.ends(token)
                        if finish is not None:
                            self._finish(seq, finish)
                            stream.ends += 1
                        o = gen_out(seq.index, (token,), () if lp is None else (lp,), finish, stop_reason, n)
                    else:  # decoding on (stop_reason and finish_reason None)
                        o = gen_out(seq.index, (token,), () if lp is None else (lp,), None, None, n)
                    stream.items.append(req_out(seq.request_id, step, (o,), engine_id, seq.cached_tokens))
                    if stream.waiter is not None:  # (rare: a decoding reader waits on the shared delivery)
                        stream.wake()
                    continue
                if seq.plain and not seq.speculate:  # no drafts, forced tokens or grammar
                    seq.num_computed = sch.start + sch.n
                    if sch.sample and not seq.aborted:
                        token = res.token_ids[i]
                        assert token is not None
                        self._emit(seq, token, res.logprobs[i])
                    continue
                accepted = res.accepted[i] if res.accepted else ()
                # the same test as _seq_step's: a decode that carried drafts
                verified = bool(seq.drafts) and sch.sample and sch.n > 1 and sch.start + 1 == seq.num_tokens
                if verified:  # the new token and the accepted drafts are in the caches now
                    self.metrics.inc("spec_decode_num_draft_tokens", len(seq.drafts))
                    self.metrics.inc("spec_decode_num_accepted_tokens", len(accepted))
                    seq.num_computed = sch.start + 1 + len(accepted)
                else:
                    seq.num_computed = sch.start + sch.n
                seq.drafts = list(res.drafts[i]) if res.drafts and seq.speculate else []
                if not sch.sample or seq.aborted:
                    continue
                token = res.token_ids[i]
                assert token is not None
                forced = seq.forced_token()
                if forced is not None and token != forced:  # only NaN logits get past a one-token mask
                    log.warning("request %s: sampled %d where %d was forced", seq.req.request_id, token, forced)
                    token, seq.drafts = forced, []
                lps = (*(res.accepted_logprobs[i] if accepted else ()), res.logprobs[i])
                for t, lp in zip((*accepted, token), lps):
                    if self._emit(seq, t, lp):
                        break
                room = seq.free_tokens()
                if room is not None and len(seq.drafts) >= room:
                    # k drafts emit up to k + 1 tokens: none of them may take the place of a forced token
                    seq.drafts = []
        self._step_tokens += tokens
        self._same_prev += same
        self._flush()
        self._deliver()

    def _emit(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> bool:
        """Record one generated token in its choice's news of this step; True when it ended the choice."""
        prev = seq.t_last_token
        now = self._now
        finish, stop_reason = seq.append(token, now)
        error = None
        if seq.matcher is not None and finish is None:
            finish, error = self._advance_grammar(seq.matcher, token)
        self._step_tokens += 1
        if prev is None:
            self._ttft.observe(now - seq.t_arrival)
        else:
            self._prev_times.append(prev)
        d = self._delta(seq)
        d.token_ids.append(token)
        if logprobs is not None:
            d.logprobs.append(logprobs)
        if finish is None and error is None:
            return False
        d.finish_reason, d.stop_reason, d.error = finish, stop_reason, error
        seq.drafts = []
        self._finish(seq, finish or "error")
        return True

    @staticmethod
    def _advance_grammar(matcher: GrammarMatcher, token: int) -> tuple[str | None, EngineFailure | None]:
        """Feed the sampled token to the sequence's grammar: ("stop", None) when it is complete, (None, error) when
        the token broke it, (None, None) while it runs on."""
        from replicas.engine.structured_output import GrammarViolation

        try:
            matcher.accept(token)
        except GrammarViolation as exc:
            return None, EngineFailure(f"structured output failed: {exc}", retriable=False, code=500)
        return ("stop", None) if matcher.is_terminated() else (None, None)

    def _refuse(self, seq: Sequence, why: str) -> None:
        """A trunk rank refused this sequence before the step's first collective: it ends alone, with a
        non-retriable 400 (its own input) or 500 (the server's: out of memory for the step), never retried on
        another group, and the group keeps serving."""
        if seq.status is Status.FINISHED or seq.aborted:
            return
        log.warning("request %s: refused by its trunk rank: %s", seq.req.request_id, why)
        if why.startswith(SERVER_ERROR):
            failure = EngineFailure(f"the step failed: {why[len(SERVER_ERROR) :]}", retriable=False, code=500)
        else:
            failure = EngineFailure(f"refused: {why}", retriable=False, code=400)
        self._delta(seq).error = failure
        self.scheduler.release(seq)
        self.metrics.inc("request_errors", kind="refused")

    def _delta(self, seq: Sequence) -> _Delta:
        """The choice's news of the step being delivered (created on first use)."""
        d = seq.delta
        if d is None:
            d = seq.delta = _Delta(seq)
            self._touched.append(seq)
        return d

    def _flush(self) -> None:
        """Deliver the step's news: one item per request with any, holding all its choices' deltas."""
        touched, self._touched = self._touched, []
        if self._step_tokens:
            self.metrics.inc("generation_tokens", self._step_tokens)
            self._step_tokens = 0
        if self._same_prev:
            self._itl.observe_many(self._now - self._prev_now, self._same_prev)
            self._same_prev = 0
        if self._prev_times:  # one histogram update per distinct previous time
            now, observe = self._now, self._itl.observe_many
            for prev, k in Counter(self._prev_times).items():
                observe(now - prev, k)
            self._prev_times = []
        step, engine_id, streams = self.steps, self.engine_id, self._streams
        grouped: dict[str, list[Sequence]] = {}
        for seq in touched:
            rid = seq.req.request_id
            if seq.req.n == 1:  # the common case: the item is this choice's delta alone
                d = seq.delta
                seq.delta = None
                entry = streams.get(rid)
                if entry is not None and d is not None:
                    entry[1].put_nowait(RequestOutput(rid, step, (_output(d),), engine_id, seq.cached_tokens))
            else:
                grouped.setdefault(rid, []).append(seq)
        for rid, seqs in grouped.items():
            deltas = []
            for seq in sorted(seqs, key=lambda q: q.index):
                if seq.delta is not None:
                    deltas.append(_output(seq.delta))
                    seq.delta = None
            entry = streams.get(rid)
            if entry is not None and deltas:
                cached = entry[0][0].cached_tokens  # the first choice's
                entry[1].put_nowait(RequestOutput(rid, step, tuple(deltas), engine_id, cached))

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.release(seq)
        self.metrics.inc("request_success", finished_reason=reason)
        if seq.index == 0:
            self.metrics.inc("prompt_tokens", seq.prompt_len)
        self.metrics.observe("e2e_request_latency_seconds", time.monotonic() - seq.t_arrival)

    def _reap(self) -> None:
        """Release aborted sequences (between steps, never during one)."""
        aborted, self._aborted = self._aborted, []
        for s in aborted:
            if s.status is not Status.FINISHED:
                self.scheduler.release(s)
                self.metrics.inc("request_success", finished_reason=s.end_reason)

    # ----------------------------------------------------------------- readiness
    async def probe(self, *, max_age_s: float = 5.0, timeout_s: float = 60.0) -> bool:
        """Whether the data path works: a step through every rank succeeded in the last `max_age_s`,
        or the canary step (one token through every rank, on reserved caches) run now through the loop succeeds."""
        if self.failure is not None:
            return False
        if self.steps and time.monotonic() - self.last_step_time < max_age_s:
            return True
        if self._canary is None:
            self._canary = asyncio.get_running_loop().create_future()
            self._wake.set()
        try:
            return bool(await asyncio.wait_for(asyncio.shield(self._canary), timeout_s))
        except asyncio.TimeoutError:
            return False

    async def _run_canary(self) -> None:
        """The canary step (one token on each trunk rank's reserved block and slot, through every expert
        exchange; replicas/ep/trunk_rank.py) between real steps, so lock-step is never broken."""
        waiter, self._canary = self._canary, None
        assert waiter is not None
        try:
            await self.runner.step([StepRequest(canary=True) for _ in self.scheduler.pools])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  # the group failed: same path as a failed real step
            waiter.set_result(False)
            await self._on_failure(exc)
            return
        self.steps += 1
        self.last_step_time = time.monotonic()
        waiter.set_result(True)

    # ----------------------------------------------------------------- failures
    def _fail_all(self, message: str, *, retriable: bool) -> None:
        failure = EngineFailure(message=message, retriable=retriable)
        for rid, (seqs, queue) in list(self._streams.items()):
            outputs = []
            for s in seqs:
                if s.status is Status.FINISHED:
                    continue
                self.scheduler.release(s)
                if s.aborted:  # already ended (aborted, or stopped by the front end)
                    continue
                outputs.append(GenerateOutput(index=s.index, error=failure, completion_tokens=s.num_output))
                self.metrics.inc("request_errors", kind="group_failure" if retriable else "error")
            if outputs:
                self._put_outside_step(queue, RequestOutput(rid, self.steps, tuple(outputs), self.engine_id))

    async def _on_failure(self, exc: Exception) -> None:
        self.failure = str(exc)
        log.error("group step failed: %s", exc)
        self._fail_all(f"the expert-parallel group failed and is being rebuilt ({exc})", retriable=True)
        for cache in self.prefix_caches or ():  # a rebuilt group's caches start empty: nothing the tree says holds
            cache.reset()
        if self.recover is None:
            return
        try:
            await asyncio.to_thread(self.recover)
        except Exception as rebuild_exc:  # noqa: BLE001  # stays unavailable; health reports it
            log.error("group rebuild failed: %s", rebuild_exc)
            self.failure = f"rebuild failed: {rebuild_exc}"
            return
        self.failure = None
        log.info("group rebuilt; serving again")

    # ----------------------------------------------------------------- state
    def _record_gauges(self) -> None:
        m, pools = self.metrics, self.scheduler.pools
        m.set("num_requests_running", self.scheduler.num_running)
        m.set("num_requests_waiting", len(self.scheduler.waiting))
        m.set("kv_blocks_used", sum(p.num_blocks - p.available_blocks for p in pools))  # cache-only blocks: free
        m.set("kv_blocks_total", sum(p.num_blocks for p in pools))
        m.set("state_slots_used", sum(p.num_slots - p.free_slots for p in pools))
        m.set("state_slots_total", sum(p.num_slots for p in pools))
        m.counters[("num_preemptions", ())] = float(self.scheduler.num_preemptions)

    def stats(self) -> dict[str, Any]:
        """Counts read by tests and operators now (the /metrics gauges lag by the push period)."""
        return {
            "running": self.scheduler.num_running,
            "waiting": len(self.scheduler.waiting),
            "streams": len(self._streams),
            "aborted": int(self.metrics.counters.get(("requests_aborted", ()), 0)),
            "pools": self.pool_state(),
            **self.prefix_cache_stats(),
        }

    def prefix_cache_stats(self) -> dict[str, int]:
        """The prefix cache's counters summed over trunk ranks (zeros without one): queries and hits in prompt
        tokens (vLLM's prefix_cache_queries / prefix_cache_hits), states stored and evicted, states and KV blocks
        held now."""
        out = dict.fromkeys(
            (
                "prefix_cache_queries",
                "prefix_cache_hits",
                "prefix_cache_states_stored",
                "prefix_cache_states_evicted",
                "prefix_cache_states",
                "prefix_cache_blocks",
            ),
            0,
        )
        for cache in self.prefix_caches or ():
            for k, v in cache.stats().items():
                out[k] += v
        return out

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix no running sequence uses (safe while serving: what a running sequence holds
        stays until it leaves). False when this engine has no prefix cache."""
        if self.prefix_caches is None:
            return False
        for cache in self.prefix_caches:
            cache.reset()
        return True

    def pool_state(self) -> list[dict[str, int]]:
        """Free blocks and slots per trunk rank (tests check aborts return everything); blocks only the prefix cache
        holds count as free (it evicts them on demand)."""
        return [
            {
                "free_blocks": p.available_blocks,
                "num_blocks": p.num_blocks,
                "free_slots": p.free_slots,
                "num_slots": p.num_slots,
            }
            for p in self.scheduler.pools
        ]


def _check_results(requests: list[StepRequest], results: list[StepResult]) -> None:
    """A result per trunk rank with a token per sequence, else the group's answer is broken: the step fails like
    a group failure instead of the update raising inside the loop (which would leave every stream waiting)."""
    if len(results) != len(requests) or any(len(res.token_ids) != req.num_seqs for req, res in zip(requests, results)):
        got = [len(r.token_ids) for r in results]
        raise RuntimeError(f"the group answered {got} tokens for {[r.num_seqs for r in requests]} sequences per rank")


def _output(d: _Delta) -> GenerateOutput:
    return GenerateOutput(
        d.seq.index, tuple(d.token_ids), tuple(d.logprobs), d.finish_reason, d.stop_reason, d.seq.num_output, d.error
    )
