"""Continuous batching: one generation loop serving many requests at once.

Every iteration of the loop does at most one prefill chunk of the request being admitted
and one decode step of the running batch, so a long prompt never stalls the sequences
already decoding, and a new request joins the batch as soon as its prompt is in the
cache, without waiting for the batch to drain.

Waiting requests are prefilled together (left-padded, in chunks of at most
``prefill_chunk`` prompt tokens over all of their rows), then joined to the running batch (``step.Sequences.join``: the side with fewer
columns is padded on the left so both share the write index). When sequences finish their
rows are dropped, and columns that only padding occupies are cut. Positions, sampling,
stop strings, constraints and thinking budgets are per sequence.

Images go through the vision tower on a thread of their own before their request queues
for prefill, so a large image does not stop the running batch's decoding (both threads
share the cores; MLX evaluates on per-thread streams). Other threads only ``submit`` and
``cancel``. Events reach the request's ``emit`` callback on the loop thread (the vision
thread emits only a failure or a cancellation of a request it holds).
"""
from __future__ import annotations

import collections
import json
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InputError
from . import memory
from .detokenizer import StopStringMatcher, StreamingDetokenizer
from .engine import VLM, GenerationResult, Prompt
from .kv_cache import RotatingKVCache
from .sampling import Sampler, SamplingParams
from .prefix_cache import PrefixCache, block_keys, block_spec, image_spans
from .speculative import Draft, Speculation, decide
from .step import Sequences
from .vision_cache import VisionFeatureCache


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``; retry later."""


class LoopStopped(RuntimeError):
    """The loop was shut down (its model unloaded or swapped out): submit to the next one."""


@dataclass
class Thinking:
    """A thinking budget: after ``budget`` tokens inside thinking, ``end_ids`` are forced."""
    budget: int
    start: str
    end: str
    end_ids: list[int]
    inside: bool = False       # the prompt already opened thinking


@dataclass
class TokenEvent:
    token: int
    text: str                          # text that became final with this token (may be "")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    reason: str                        # stop | length | cancelled | error
    text: str                          # held-back text released at the end
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class Job:
    """One request for the loop."""
    prompt: Prompt
    emit: Callable[[Any], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: Sequence[str] = ()
    logprobs: int | None = None        # None: no logprobs; k >= 0: chosen token + top k
    constraint: Any = None             # .mask() -> bool[V], .advance(id), .done
    thinking: Thinking | None = None
    min_tokens: int = 0                # EOS is masked until this many tokens were generated
    presence_penalty: float = 0.0      # OpenAI's: subtracted once from every generated token's logit
    frequency_penalty: float = 0.0     # ... and once per time it was generated
    speculate: bool = True             # when the loop speculates: whether this request takes part
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    features: Any = None               # the images' encodings, once the vision thread made them
    prefix_keys: list[str] | None = None  # the prompt's prefix-cache block keys, once computed

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """A job inside the loop: its sampler, text state and position."""

    def __init__(self, job: Job, vlm: VLM, max_context: int):
        self.job = job
        self.sampler = Sampler(job.params)
        self.detok = StreamingDetokenizer(vlm.tokenizer, skip_special_tokens=True)
        self.stops = StopStringMatcher(job.stop)
        self.history = list(job.prompt.ids)
        self.budget = max(0, min(job.max_tokens, max_context - len(job.prompt.ids)))
        self.generated = 0
        self.last = 0
        self.refeed: list[int] = []  # accepted tokens before ``last`` that the caches lost (speculation)
        self.forced: collections.deque[int] = collections.deque()
        self.think_inside = bool(job.thinking and job.thinking.inside)
        self.think_count = 0
        self.think_text = ""
        self.finished = False
        self.cached = 0            # prompt tokens whose KV came from the prefix cache
        self.draft_state: Any = None
        self.draft_length: Any = None
        self.draft: list[int] = []   # a drafter that reads the batch: its proposal for the next step
        self.rng = np.random.default_rng(job.params.seed)

    @property
    def pending(self) -> list[int]:
        """The accepted tokens the caches do not hold yet: the next step feeds them."""
        return [*self.refeed, self.last]


class Batcher:
    def __init__(self, vlm: VLM, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
                 vision_cache: VisionFeatureCache | None = None, prefix_cache: PrefixCache | None = None,
                 prefill_batch_tokens: int = 2048, speculation: Speculation | None = None,
                 max_step_tokens: int = 16):
        """``speculation``: draft and verify tokens for the requests that take part (Job.speculate);
        ``max_step_tokens``: most tokens a speculative step feeds (rows x tokens per row),
        the size the decode kernels take in one pass."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or max_step_tokens < 1:
            raise ValueError("max_batch, prefill_chunk and max_step_tokens must be >= 1 and max_queue >= 0")
        refusal = None if speculation is None else speculation.drafter.batch_refusal
        if refusal:
            raise InputError(refusal)
        vlm.materialize()
        draft_model = getattr(speculation.drafter, "vlm", None) if speculation is not None else None
        if hasattr(draft_model, "materialize"):  # the loop's thread runs it too
            draft_model.materialize()
        self.vlm = vlm
        self.speculation = speculation
        self.step_cost = speculation.cost() if speculation is not None else None
        # a drafter that reads the batch's caches drafts for every row after each step (_draft_ahead)
        self._reads_batch = speculation is not None and speculation.drafter.reads_batch
        self._draft_step: float | None = None    # seconds of one such drafter call (moving average)
        self.max_step_tokens = max_step_tokens
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.prefill_batch_tokens = prefill_batch_tokens
        self.vision_cache = vision_cache or VisionFeatureCache(0)
        # None, or why this model's prompts skip the prefix cache (it is then not used at all)
        self.prefix_refusal = vlm.decoder.prefix_refusal() if prefix_cache is not None else None
        self.prefix_cache = prefix_cache if self.prefix_refusal is None else None
        if self.prefix_refusal and prefix_cache.max_bytes > 0:
            warnings.warn(self.prefix_refusal, stacklevel=2)
        # linear-attention layers: their states are kept as snapshots at chosen block boundaries
        states = [L["kv"] for L in vlm.kv_layers if isinstance(L.get("kv"), dict) and L["kv"].get("layout") == "recurrent"]
        self._recurrent = bool(states)
        if self.prefix_cache is not None and states:
            self.prefix_cache.state_bytes_per_snapshot = sum(int(k.get("bytes_per_sequence", 0)) for k in states)
        # blocks are only valid for this artifact and KV layout (the disk tier outlives us)
        self._prefix_salt = json.dumps([str(vlm.artifact.path), vlm.artifact.manifest.get("source", {}),
                                        vlm.kv_layers], sort_keys=True, default=str)
        self._eos_mask: mx.array | None = None   # [1, V]: where min_tokens hides EOS
        self._pending: collections.deque[Job] = collections.deque()     # ready to prefill
        self._to_encode: collections.deque[Job] = collections.deque()   # waiting for the vision tower
        self._encoding: Job | None = None
        self._cond = threading.Condition()
        self._active: list[_Row] = []
        self._batch: Sequences | None = None     # the running batch, one row per active job
        self._prefill: dict[str, Any] | None = None
        self._admitting: list[Job] = []         # jobs being turned into prefill rows
        self._live: set[_Row] = set()           # every admitted row not yet finished
        self._stop = False
        self.error: str | None = None           # what killed the loop, if it died
        self.counters = collections.Counter()
        self.decode_time = 0.0
        self._thread = threading.Thread(target=self._run, name="vlmc-generation", daemon=True)
        self._thread.start()
        self._vision = threading.Thread(target=self._run_vision, name="vlmc-vision", daemon=True)
        self._vision.start()

    # ------------------------------------------------------------------ other threads
    def submit(self, job: Job) -> None:
        self.vlm.check_length([job.prompt])  # InputError: empty, or no room left in the context
        with self._cond:
            if self._stop:
                raise LoopStopped("the generation loop is shut down")
            waiting = len(self._pending) + len(self._to_encode) + (self._encoding is not None)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting")
            if job.prompt.images is not None and job.features is None:
                self._to_encode.append(job)
            else:
                self._pending.append(job)
            self.counters["requests"] += 1
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        """Both threads run (a request can be served)."""
        return self._thread.is_alive() and self._vision.is_alive()

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"queue_depth": len(self._pending) + len(self._to_encode) + (self._encoding is not None),
                    "batch_size": len(self._active), "prefilling": int(self._prefill is not None),
                    "encoding_images": len(self._to_encode) + (self._encoding is not None)}

    def idle(self) -> bool:
        with self._cond:
            return not (self._pending or self._to_encode or self._encoding or self._active or self._prefill)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything and stop the loop (its caches are freed with it)."""
        with self._cond:
            self._stop = True
            for job in [*self._pending, *self._to_encode]:
                job.cancel()
            for row in self._active:
                row.job.cancel()
            if self._prefill is not None:
                for row in self._prefill["rows"]:
                    row.job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)
        self._vision.join(timeout)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not (self._stop or self._pending or self._active or self._prefill):
                        memory.release()  # idle: hand cached and freed buffers back to the system
                    while not (self._stop or self._pending or self._active or self._prefill):
                        self._cond.wait()
                    if self._stop and not (self._active or self._prefill or self._pending):
                        return
                try:
                    self._step()
                except Exception as e:  # a bug hit these requests: fail them, keep serving
                    self.counters["loop_errors"] += 1
                    traceback.print_exc()
                    self._fail_all(f"{type(e).__name__}: {e}")
        except BaseException as e:  # the loop is dead: /health says so
            self.error = f"{type(e).__name__}: {e}"
            raise

    def _run_vision(self) -> None:
        try:
            self._vision_loop()
        except BaseException as e:  # the vision thread is dead: /health says so
            self.error = f"vision thread: {type(e).__name__}: {e}"
            raise

    def _vision_loop(self) -> None:
        """Encode queued requests' images, then hand the requests to the loop."""
        while True:
            with self._cond:
                while not (self._stop or self._to_encode):
                    self._cond.wait()
                if self._stop and not self._to_encode:
                    return
                job = self._encoding = self._to_encode.popleft()
            try:
                if job.cancelled:
                    job.emit(FinishEvent("cancelled", "", len(job.prompt.ids), 0))
                    continue
                features = self.vision_cache.features(self.vlm.encode_images, job.prompt.images)
                mx.eval(features)  # an array left lazy here could not be evaluated on the loop's thread
                job.features = features
                with self._cond:
                    handed = not self._stop
                    if handed:
                        self._pending.append(job)
                        self._cond.notify_all()
                if not handed:
                    job.emit(FinishEvent("cancelled", "", len(job.prompt.ids), 0))
            except Exception as e:  # this request's images failed; the others go on
                self.counters["loop_errors"] += 1
                traceback.print_exc()
                job.emit(FinishEvent("error", "", len(job.prompt.ids), 0, error=f"{type(e).__name__}: {e}"))
            finally:
                with self._cond:
                    self._encoding = None

    def _step(self) -> None:
        self._drop_cancelled()
        if self._prefill is None:
            jobs = self._admit()
            if jobs:
                self._admitting = jobs
                self._begin_prefill(jobs)
                self._admitting = []
        if self._prefill is not None:
            self._prefill_chunk()
        if self._active:
            self._decode_step()

    def _fail_all(self, message: str) -> None:
        failed = [(r.job, r.generated) for r in self._live]
        live_jobs = {id(r.job) for r in self._live}
        failed += [(job, 0) for job in self._admitting if id(job) not in live_jobs]
        for row in self._live:
            row.finished = True
        self._live.clear()
        self._active, self._batch, self._prefill, self._admitting = [], None, None, []
        for job, generated in failed:
            job.emit(FinishEvent("error", "", len(job.prompt.ids), generated, error=message))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [j for j in self._pending if j.cancelled]
            for j in gone:
                self._pending.remove(j)
        for j in gone:
            j.emit(FinishEvent("cancelled", "", len(j.prompt.ids), 0))
        if self._prefill is not None and all(r.job.cancelled for r in self._prefill["rows"]):
            rows = self._prefill["rows"]
            self._prefill = None
            for row in rows:
                self._finish(row, "cancelled")
        for row in self._active:
            if row.job.cancelled and not row.finished:
                self._finish(row, "cancelled")
        self._compact()

    # ------------------------------------------------------------------ prefill
    def _admit(self) -> list[Job]:
        """The next waiting jobs to prefill together: the first one, plus those behind it
        while batch slots and ``prefill_batch_tokens`` (padded) allow. One bigger prefill
        runs the GEMMs at a better rate than several small ones and dequantizes compact
        weights once. A job
        that finds its start in the prefix cache is prefilled alone."""
        with self._cond:
            slots = self.max_batch - len(self._active)
            if not self._pending or slots < 1:
                return []
            jobs = [self._pending.popleft()]
            if self._prefix_hit(jobs[0]):
                return jobs
            width = len(jobs[0].prompt.ids)
            while self._pending and len(jobs) < slots:
                nxt = self._pending[0]
                wider = max(width, len(nxt.prompt.ids))
                if wider * (len(jobs) + 1) > self.prefill_batch_tokens or self._prefix_hit(nxt):
                    break
                jobs.append(self._pending.popleft())
                width = wider
            return jobs

    def _prefix_hit(self, job: Job) -> bool:
        pc = self.prefix_cache
        if pc is None or pc.max_bytes <= 0:
            return False
        keys = self._block_keys(job)
        return bool(pc.lookup(keys, usable=min(1, (len(job.prompt.ids) - 1) // pc.block_size)))

    def _block_keys(self, job: Job) -> list[str]:
        if job.prefix_keys is None:  # admission checks a job for hits, then prefills it: hash once
            ids = job.prompt.ids
            spans = image_spans(ids, self.vlm.placeholder_ids, job.prompt.images)
            job.prefix_keys = block_keys(ids, spans, self.prefix_cache.block_size, salt=self._prefix_salt)
        return job.prefix_keys

    def _begin_prefill(self, jobs: list[Job]) -> None:
        vlm = self.vlm
        rows, inputs = [], []
        for job in jobs:
            row = _Row(job, vlm, vlm.max_context)
            self._live.add(row)
            features = job.features
            if job.prompt.images is not None and features is None:
                features = self.vision_cache.features(vlm.encode_images, job.prompt.images)
            rows.append(row)
            inputs.append(vlm.prompt_inputs(job.prompt, features))
        seqs = Sequences.start(vlm.decoder, inputs)
        keys = [[] for _ in jobs]
        if self.prefix_cache is not None and self.prefix_cache.max_bytes > 0:
            keys = [self._block_keys(job) for job in jobs]
            run = 0
            if len(jobs) == 1:
                try:
                    rows[0].cached, run = self._reuse_prefix(jobs[0], keys[0], seqs)
                except ValueError:  # blocks this cache cannot take (checked, so not expected): prefill it all
                    self.prefix_cache.discard(keys[0])
                    seqs = Sequences.start(vlm.decoder, inputs)
            if self._recurrent:
                for i, row in enumerate(rows):
                    seqs.keep_states[i] = self._state_columns(seqs, i, row, run if len(jobs) == 1 else 0)
        stored = [row.cached // self.prefix_cache.block_size if self.prefix_cache else 0 for row in rows]
        self._prefill = {"rows": rows, "seqs": seqs, "keys": keys, "stored": stored}

    def _state_columns(self, seqs: Sequences, i: int, row: _Row, run: int) -> set[int]:
        """Where row ``i``'s prefill keeps its recurrent states for the prefix cache (columns,
        each a block boundary past the reused prefix): after the last whole block a later
        prompt can reuse (a repeat or a next turn of this one), at the end of the cached run
        of blocks it found (``run``: the branch point, where prompts sharing this start part),
        and every ``state_every`` blocks. None inside a bidirectional span."""
        pc = self.prefix_cache
        bs = pc.block_size
        usable = (len(row.job.prompt.ids) - 1) // bs   # a prompt always prefills its last token
        wanted = {usable, run, *range(pc.state_every, usable + 1, pc.state_every or usable + 1)}
        start = int(seqs.starts[i])
        cols = {start + n * bs for n in wanted if row.cached // bs < n <= usable}
        return {c for c in cols if seqs.safe_prefix(i, c) == c}

    def _reuse_prefix(self, job: Job, keys: list[str], seqs: Sequences) -> tuple[int, int]:
        """Import the longest cached run of this prompt's leading blocks: (tokens covered,
        blocks of the cached run found). With recurrent layers the run is cut back to the
        last block after which their states were kept."""
        pc = self.prefix_cache
        bs = pc.block_size
        found = pc.lookup(keys, usable=(len(job.prompt.ids) - 1) // bs,  # >= 1 token left to prefill
                          expect=[block_spec(cache, bs) for cache in seqs.caches])
        while found and seqs.safe_prefix(0, len(found) * bs) != len(found) * bs:
            found = found[:-1]  # a prefix that ends inside a bidirectional span is not reusable
        run, snapshot = len(found), None
        recurrent = [cache for cache in seqs.caches if cache.layout == "recurrent"]
        if recurrent:
            expect = [cache.snapshot_spec() for cache in recurrent]
            n = len(found)
            while n and (seqs.safe_prefix(0, n * bs) != n * bs
                         or (snapshot := pc.lookup_state(keys[n - 1], expect)) is None):
                n -= 1
            found = found[:n]
        done = len(found) * bs
        states = iter(snapshot or [])
        for layer, cache in enumerate(seqs.caches):
            if cache.layout != "recurrent":
                cache.import_blocks([blocks[layer] for blocks in found])
            elif found:
                cache.import_state(next(states), done)
        seqs.skip(done)
        pc.count(done, len(job.prompt.ids))
        return done, run

    def _prefill_chunk(self) -> None:
        pf = self._prefill
        rows, seqs = pf["rows"], pf["seqs"]
        # a budget of prompt tokens per loop iteration over all the rows prefilled together, so
        # the running batch's next decode step waits for about the same work however many join
        logits = seqs.prefill(max(1, self.prefill_chunk // seqs.batch))
        self.counters["prefill_steps"] += 1
        mx.eval(logits)  # this chunk's work now, between the running batch's decode steps
        self._store_blocks(pf)
        if not seqs.prefill_done:
            return
        self._prefill = None
        self.counters["prompt_tokens"] += sum(len(r.job.prompt.ids) for r in rows)
        self.counters["prefill_batches"] += 1
        if self.prefix_cache is not None:
            if len(rows) > 1:  # (a lone prompt was counted when it looked its prefix up)
                for r in rows:
                    self.prefix_cache.count(0, len(r.job.prompt.ids))
            bs = self.prefix_cache.block_size
            for i, keys in enumerate(pf["keys"]):
                if keys:
                    start = int(seqs.starts[i])
                    self.prefix_cache.store_states(keys, {(c - start) // bs: snap for c, snap in seqs.states[i].items()})
        tokens, infos = self._sample(rows, logits)
        for row, token, info in zip(rows, tokens, infos):
            self._accept(row, token, info)
        self._draft_ahead(rows, seqs, [seqs.offset] * len(rows), len(self._active) + len(rows))
        if not self._active:
            self._active, self._batch = list(rows), seqs
        else:
            self._batch.join(seqs)
            self._active.extend(rows)
        self._compact()  # rows that finished on their first token leave again

    def _store_blocks(self, pf: dict) -> None:
        """Keep the prompt blocks this chunk completed, in every layer. Right after the chunk
        is the one time a sliding window surely holds them: it keeps the chunk and at least
        ``window - 1`` tokens before it (and, through ``keep_from``, the start of a block the
        chunk left unfinished), and the next chunk drops the oldest. (Exporting at the end of
        the prompt instead would find a long prompt's first blocks gone.)"""
        if self.prefix_cache is None:
            return
        seqs, bs = pf["seqs"], self.prefix_cache.block_size
        for i, keys in enumerate(pf["keys"]):
            if keys:
                pf["stored"][i] = self.prefix_cache.store(keys, seqs.caches, first=pf["stored"][i], row=i,
                                                          start=int(seqs.starts[i]))
        # a window smaller than a block keeps the start of each row's next block until it is stored
        pending = [int(seqs.starts[i]) + n * bs for i, (keys, n) in enumerate(zip(pf["keys"], pf["stored"]))
                   if n < len(keys)]
        for cache in seqs.caches:
            if isinstance(cache, RotatingKVCache):
                cache.keep_from = min(pending) if pending and not seqs.prefill_done else None

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        rows = self._active
        B = len(rows)
        drafts = self._drafts(rows) if self.speculation is not None else None
        if drafts is not None or any(r.refeed for r in rows):
            self._speculative_step(rows, drafts or [[] for _ in rows], t0)
            return
        t_step = time.perf_counter()
        logits = self._batch.decode(mx.array([r.last for r in rows], dtype=mx.int32))
        if self.step_cost is not None:
            mx.eval(logits)
            self.step_cost.observe(B, time.perf_counter() - t_step)
        tokens, infos = self._sample(rows, logits)
        for row, token, info in zip(rows, tokens, infos):
            self._accept(row, token, info)
        self._draft_ahead(rows, self._batch, [self._batch.offset] * B, sum(not r.finished for r in rows))
        self.counters["decode_steps"] += 1
        self.counters["batched_tokens"] += B
        self.decode_time += time.perf_counter() - t0
        self._compact()

    # ------------------------------------------------------------------ speculation
    def _drafts(self, rows: list[_Row]) -> list[list[Any]] | None:
        """Each row's draft (a list of (token, q) pairs), or None when no row drafts this step.
        A step feeds at most ``max_step_tokens`` tokens: rows x (pending + drafted)."""
        spec = self.speculation
        B = len(rows)
        per_row = max(1, self.max_step_tokens // B)
        cost = lambda k: self.step_cost.ratio(B * (k + 1), B)  # noqa: E731 - every row drafting k
        out, any_draft = [], False
        for row in rows:
            k = 0
            if self._reads_batch:  # drafted after the last step (_draft_ahead); this step may take fewer
                k = min(len(row.draft), row.budget - row.generated - 1, per_row - len(row.pending))
                draft, row.draft = (Draft(row.draft) if k > 0 else None), []
            else:
                if row.job.speculate and not row.forced:
                    if row.draft_length is None:
                        row.draft_length = spec.length()
                        row.draft_state = spec.drafter.start(row.job.prompt.ids, row.job.prompt)
                    k = min(row.draft_length.next(cost), row.budget - row.generated - 1,
                            per_row - len(row.pending), self.vlm.max_context - len(row.history) - 1)
                draft = spec.drafter.propose(row.draft_state, row.history, k, row.sampler, row.rng) if k > 0 else None
            pairs = [] if draft is None else \
                [(t, None if draft.q is None else draft.q[i]) for i, t in enumerate(draft.tokens[:k])]
            any_draft = any_draft or bool(pairs)
            out.append(pairs)
        return out if any_draft else None

    def _draft_ahead(self, rows: list[_Row], seqs: Sequences, ends: list[int], batch: int) -> None:
        """For a drafter that reads the batch's caches: every row's draft for the next step,
        in one drafter call per drafted token, now that the step just taken left each row's
        context in the caches up to ``ends`` (columns; a speculative step's rejected columns
        after it are trimmed afterwards) and its hidden states in ``seqs.hidden``. ``batch``:
        the rows the next step will have (its per-row share of ``max_step_tokens``). The
        drafter's time per call joins the cost the adaptive draft length weighs."""
        if not self._reads_batch:
            return
        spec = self.speculation
        batch = max(batch, 1)
        per_row = max(1, self.max_step_tokens // batch)
        base = self.step_cost.seconds.get(batch)

        def cost(k: int) -> float:  # the verify step's cost plus k drafter calls, relative to a decode step
            extra = k * self._draft_step / base if self._draft_step is not None and base else 0.0
            return self.step_cost.ratio(batch * (k + 1), batch) + extra
        ks = []
        for row in rows:
            row.draft, k = [], 0
            if not row.finished and row.job.speculate and not row.forced:
                if row.draft_length is None:
                    row.draft_length = spec.length()
                k = max(0, min(row.draft_length.next(cost), row.budget - row.generated - 1,
                               per_row - len(row.pending), self.vlm.max_context - len(row.history) - 1))
            ks.append(k)
        if not any(ks):
            return
        t = time.perf_counter()
        drafts = spec.drafter.propose_rows(seqs, [r.last for r in rows], ends, ks)
        calls = max(ks)
        per_call = (time.perf_counter() - t) / calls
        self._draft_step = per_call if self._draft_step is None else 0.8 * self._draft_step + 0.2 * per_call
        self.counters["draft_calls"] += calls
        for row, draft in zip(rows, drafts):
            row.draft = list(draft)

    def _speculative_step(self, rows: list[_Row], drafts: list[list[Any]], t0: float) -> None:
        """Feed every row its pending tokens and its draft in one verify step, accept by the
        lossless rule position by position (``_accept`` as in a decode step: stops, EOS,
        constraints, thinking budgets), then keep the columns every row still needs: a row
        that kept more re-feeds those tokens next step (all rows share one write index)."""
        fed = [r.pending + [t for t, _ in d] for r, d in zip(rows, drafts)]
        n = max(len(f) for f in fed)
        ids = mx.array([f + [f[-1]] * (n - len(f)) for f in fed], dtype=mx.int32)  # pads: trimmed below
        t_step = time.perf_counter()
        logits = self._batch.verify(ids)
        mx.eval(logits)
        self.step_cost.observe(len(rows) * n, time.perf_counter() - t_step)
        valid, proposed, accepted = [], 0, 0
        for b, (row, draft) in enumerate(zip(rows, drafts)):
            first = len(row.pending) - 1                 # the position after the last pending token
            kept = 0
            for j in range(len(draft) + 1):
                candidate, q = draft[j] if j < len(draft) else (None, None)
                token, ok, info = self._pick(row, logits[b, first + j][None], candidate, q)
                self._accept(row, token, info)
                if not ok or row.finished or row.forced:
                    break
                kept += 1
            valid.append(first + 1 + kept)           # fed columns before the last accepted token
            if draft:
                row.draft_length.update(len(draft), kept)
                self.speculation.drafter.accepted(row.draft_state, row.history)
            proposed += len(draft)
            accepted += kept
        live = [v for v, r in zip(valid, rows) if not r.finished]
        keep = min(live) if live else n
        for row, f, v in zip(rows, fed, valid):
            row.refeed = f[keep:v] if not row.finished else []
        # the columns no row accepted go first; then the drafter reads each row's accepted ones
        # (where all rows kept as many, as for one sequence), then the trim to what all rows keep
        top = max(live, default=n)
        self._batch.trim(n - top)
        self._draft_ahead(rows, self._batch, [self._batch.offset - top + v for v in valid], len(live))
        self._batch.trim(max(0, top - keep))
        self.counters["speculative_steps"] += 1
        self.counters["draft_proposed"] += proposed
        self.counters["draft_accepted"] += accepted
        self.counters["batched_tokens"] += len(rows)
        self.decode_time += time.perf_counter() - t0
        self._compact()

    def _pick(self, row: _Row, row_logits: mx.array, candidate: int | None, q: Any) -> tuple[int, bool, Any]:
        """One position of a speculative step: the row's token there (its constraint, EOS
        hold, penalties and sampler applied as in ``_sample``), whether it is ``candidate``,
        and its log-probability info."""
        if row.forced:
            token, ok = row.forced[0], False
        else:
            masked = self._masked(row, row_logits)
            penalty = row.sampler.params.repetition_penalty != 1.0
            processed = row.sampler.process(masked, [row.history] if penalty else None)[0]
            token, ok = decide(processed, candidate, q, greedy=row.sampler.params.greedy, rng=row.rng)
        info = None
        if row.job.logprobs is not None:
            lp = row_logits[0].astype(mx.float32) - mx.logsumexp(row_logits[0].astype(mx.float32))
            info = self._logprob_info(row, lp, token)
        return token, ok, info

    def _masked(self, row: _Row, row_logits: mx.array) -> mx.array:
        """The row's logits under its constraint, min_tokens EOS hold and OpenAI penalties."""
        if row.job.constraint is not None:
            allowed = mx.array(row.job.constraint.mask()[None])
            row_logits = mx.where(allowed, row_logits.astype(mx.float32), float("-inf"))
        if row.generated < row.job.min_tokens:
            row_logits = self._mask_eos(row_logits)
        if row.job.presence_penalty or row.job.frequency_penalty:
            row_logits = self._penalize(row, row_logits)
        return row_logits

    @staticmethod
    def _logprob_info(row: _Row, lp: mx.array, token: int) -> tuple[float, list]:
        k = row.job.logprobs
        top = []
        if k:
            order = mx.argpartition(-lp, k - 1)[:k] if k < lp.shape[0] else mx.arange(lp.shape[0])
            vals = lp[order]
            top = sorted(zip(order.tolist(), vals.tolist()), key=lambda t: -t[1])[:k]
        return float(lp[token].item()), top

    @staticmethod
    def _plain_greedy(row: _Row) -> bool:
        """Whether the row's next token is the argmax of its logits with at most EOS held back
        (no forced token, constraint, penalty or sampling)."""
        job, p = row.job, row.sampler.params
        return (not row.forced and job.constraint is None and p.greedy and p.repetition_penalty == 1.0
                and not job.presence_penalty and not job.frequency_penalty)

    def _greedy_picks(self, rows: list[_Row], logits: mx.array, which: list[int]) -> dict[int, int]:
        """Row -> its token for rows ``which`` (plain greedy ones), picked on the host: numpy's
        argmax picks what MLX's does (the first of equal maxima, the first NaN) at a small
        part of its cost over a large vocabulary. A row holding EOS back whose pick is an EOS
        id is picked again with those ids at -inf, as ``_masked`` has them (any other pick
        is also the masked row's first maximum)."""
        if not which:
            return {}
        host = np.asarray(logits if logits.dtype == mx.float32 else logits.astype(mx.float32))
        out = {}
        for i in which:
            pick = int(np.argmax(host[i]))
            if rows[i].generated < rows[i].job.min_tokens:
                hide = np.asarray(self._eos_hide(host.shape[-1]))[0]
                if hide[pick]:
                    pick = int(np.argmax(np.where(hide, np.float32(-np.inf), host[i])))
            out[i] = pick
        return out

    def _sample(self, rows: list[_Row], logits: mx.array) -> tuple[list[int], list[Any]]:
        """One next token per row, each with its own sampler, constraint and forced tokens.
        Plain greedy rows (most of a served batch) are picked on the host."""
        shared = self._greedy_picks(rows, logits, [i for i, row in enumerate(rows) if self._plain_greedy(row)])
        picks, lps = [], []
        for i, row in enumerate(rows):
            row_logits = logits[i:i + 1]
            if i in shared:
                pass
            elif row.forced:
                picks.append(mx.array([row.forced[0]], dtype=mx.int32))
            else:
                row_logits = self._masked(row, row_logits)
                penalty = row.sampler.params.repetition_penalty != 1.0
                picks.append(row.sampler(row_logits, [row.history] if penalty else None))
            lps.append(None if row.job.logprobs is None else
                       logits[i].astype(mx.float32) - mx.logsumexp(logits[i].astype(mx.float32)))
        own = mx.concatenate(picks) if picks else None
        mx.eval(*([] if own is None else [own]), *[lp for lp in lps if lp is not None])
        own_ids = iter([] if own is None else own.tolist())
        tokens = [shared[i] if i in shared else next(own_ids) for i in range(len(rows))]
        infos = []
        for row, token, lp in zip(rows, tokens, lps):
            infos.append(None if lp is None else self._logprob_info(row, lp, token))
        return tokens, infos

    def _eos_hide(self, vocab: int) -> mx.array:
        """[1, vocab]: True at the EOS ids (built once, not per step)."""
        if self._eos_mask is None or self._eos_mask.shape[-1] != vocab:
            hide = np.zeros(vocab, dtype=bool)
            hide[[i for i in self.vlm.eos_ids if i < vocab]] = True
            self._eos_mask = mx.array(hide)[None]
        return self._eos_mask

    def _mask_eos(self, logits: mx.array) -> mx.array:
        return mx.where(self._eos_hide(logits.shape[-1]), float("-inf"), logits.astype(mx.float32))

    @staticmethod
    def _penalize(row: _Row, logits: mx.array) -> mx.array:
        generated = row.history[len(row.job.prompt.ids):]
        if not generated:
            return logits
        counts = np.bincount(np.asarray(generated), minlength=logits.shape[-1])[:logits.shape[-1]]
        shift = row.job.frequency_penalty * counts + row.job.presence_penalty * (counts > 0)
        return logits.astype(mx.float32) - mx.array(shift.astype(np.float32))[None]

    # ------------------------------------------------------------------ per-token bookkeeping
    def _accept(self, row: _Row, token: int, info: Any) -> None:
        job = row.job
        forced = bool(row.forced)
        if forced:
            row.forced.popleft()
        row.last = token
        row.refeed = []
        if token in self.vlm.eos_ids and not forced:
            constraint = job.constraint
            if constraint is None or constraint.done or bool(constraint.mask()[token]):
                self._finish(row, "stop")
                return
        if job.constraint is not None:
            job.constraint.advance(token)
        row.generated += 1
        row.history.append(token)
        self.counters["generation_tokens"] += 1
        piece = row.stops.feed(row.detok.add(token))
        self._track_thinking(row, piece.text)
        lp, top = info if info is not None else (None, None)
        job.emit(TokenEvent(token, piece.text, lp, top))
        if piece.stopped or (job.constraint is not None and job.constraint.done):
            self._finish(row, "stop")
        elif row.generated >= row.budget:
            self._finish(row, "length")

    def _track_thinking(self, row: _Row, text: str) -> None:
        spec = row.job.thinking
        if spec is None or row.forced:
            return
        row.think_text = (row.think_text + text)[-256:]
        if not row.think_inside:
            cut = row.think_text.rfind(spec.start)
            if cut >= 0 and spec.end not in row.think_text[cut:]:
                row.think_inside, row.think_count, row.think_text = True, 0, ""
            return
        if spec.end in row.think_text:
            row.think_inside, row.think_text = False, ""
            return
        row.think_count += 1
        if row.think_count >= spec.budget:
            row.forced.extend(spec.end_ids)
            row.think_inside, row.think_text = False, ""

    def _finish(self, row: _Row, reason: str) -> None:
        if row.finished:
            return
        row.finished = True
        self._live.discard(row)
        tail = ""
        if reason in ("stop", "length") and not row.stops.stopped:
            tail = row.stops.feed(row.detok.flush()).text + row.stops.flush()
        self.counters[f"finish_{reason}"] += 1
        row.job.emit(FinishEvent(reason, tail, len(row.job.prompt.ids), row.generated, row.cached))

    def _compact(self) -> None:
        """Drop finished rows from the batch and the columns only padding holds."""
        if not any(r.finished for r in self._active):
            return
        keep = [i for i, r in enumerate(self._active) if not r.finished]
        if not keep:
            self._active, self._batch = [], None
            return
        self._active = [self._active[i] for i in keep]
        self._batch.keep(keep)


def batch_generate(vlm: VLM, requests: Sequence[str | dict[str, Any]], *, max_tokens: int = 256,
                   max_batch: int = 8, stop: Sequence[str] | None = None, sampling: SamplingParams | None = None,
                   draft: Any = None, num_draft_tokens: int | None = None,
                   **sampling_kw: Any) -> list[GenerationResult]:
    """Generate replies to many requests at once through the continuous-batching loop
    (the server's): each request is a prompt string or a dict of ``build_prompt``
    arguments (``prompt``, ``images``, ``messages``, ``system``) plus optional
    ``max_tokens`` and ``stop``. Results come back in request order; tok/s are over the
    whole batch's time. Batched matmuls round differently from single ones, so a greedy
    reply can differ from ``generate``'s where two tokens are nearly tied. ``draft`` and
    ``num_draft_tokens``: speculation as in ``generate`` (the model's default when None)."""
    params = sampling or vlm.sampling_params(**sampling_kw)
    speculation = vlm.speculation_for(draft, num_draft_tokens)
    jobs, texts, tokens, finishes = [], [], [], []
    done = threading.Event()
    left = [len(requests)]
    for i, req in enumerate(requests):
        req = {"prompt": req} if isinstance(req, str) else dict(req)
        limit = int(req.pop("max_tokens", max_tokens))
        stops = list(req.pop("stop", stop) or [])
        if limit < 1:
            raise InputError(f"request {i}: max_tokens must be >= 1, got {limit}")
        prompt = vlm.build_prompt(**req)
        texts.append([])
        tokens.append([])
        finishes.append(None)

        def emit(ev, i=i):
            texts[i].append(ev.text)
            if isinstance(ev, FinishEvent):
                finishes[i] = ev
                left[0] -= 1
                if not left[0]:
                    done.set()
            else:
                tokens[i].append(ev.token)
        jobs.append(Job(prompt, emit, params, limit, stops))
    if not jobs:
        return []
    batcher = Batcher(vlm, max_batch=max_batch, max_queue=len(jobs), speculation=speculation)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    try:
        for job in jobs:
            batcher.submit(job)
        done.wait()
    finally:
        batcher.shutdown()
    seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory() / 1e9
    out = []
    for i, f in enumerate(finishes):
        if f.reason == "error":
            raise RuntimeError(f"request {i} failed: {f.error}")
        out.append(GenerationResult("".join(texts[i]), tokens[i], f.reason, f.prompt_tokens, f.completion_tokens,
                                    f.prompt_tokens / seconds, f.completion_tokens / seconds, peak))
    return out
