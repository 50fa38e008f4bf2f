"""The continuous-batching loop (runtime.batcher) on the bundled demo model: joined
batches compute what one-at-a-time runs compute, cancellation, a full queue, penalties,
thinking budgets, and a failing request that does not take the loop down."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import vlmc
from vlmc.runtime.batcher import Batcher, FinishEvent, Job, QueueFull, Thinking, TokenEvent
from vlmc.runtime.engine import Prompt
from vlmc.runtime.kv_cache import make_caches
from vlmc.runtime.sampling import SamplingParams

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def demo():
    from vlmc.demo import MODEL_DIR
    return vlmc.load(MODEL_DIR)


class Collector:
    def __init__(self, n: int):
        self.tokens = [[] for _ in range(n)]
        self.finish: list[FinishEvent | None] = [None] * n
        self.done = threading.Event()
        self.left = n

    def emit(self, i: int):
        def on_event(ev):
            if isinstance(ev, TokenEvent):
                self.tokens[i].append(ev.token)
            else:
                self.finish[i] = ev
                self.left -= 1
                if not self.left:
                    self.done.set()
        return on_event


def run_jobs(batcher: Batcher, jobs: list[dict], timeout: float = 120) -> Collector:
    c = Collector(len(jobs))
    for i, kw in enumerate(jobs):
        batcher.submit(Job(emit=c.emit(i), **kw))
    assert c.done.wait(timeout), "jobs did not finish"
    return c


def prompts(m):
    qs = [("shapes-1.png", "What color is the circle?"), ("shapes-2.png", "Describe the image."),
          (None, "Tell me about shapes"), ("shapes-3.png", "How many shapes are there?"),
          (None, "circle square " * 60)]
    return [m.build_prompt(q, images=[str(EXAMPLES / im)] if im else None) for im, q in qs]


@pytest.mark.parametrize("kv", [None, {"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"},
                                {"max_kv_size": 48}], ids=["dense", "kv8", "kv4", "turbo3.5", "window48"])
def test_joined_batches_match_one_at_a_time(demo, kv):
    from vlmc.demo import MODEL_DIR
    m = demo if kv is None else vlmc.load(MODEL_DIR, **kv)
    ps = prompts(m)
    jobs = [dict(prompt=p, max_tokens=12 + 7 * i) for i, p in enumerate(ps)]
    b = Batcher(m, max_batch=8, prefill_chunk=48)   # the long prompt is prefilled in chunks between decode steps
    try:
        alone = [run_jobs(b, [j]) for j in jobs]
        batches = b.counters["prefill_batches"]
        together = run_jobs(b, jobs * 3)
        assert b.counters["decode_steps"] < b.counters["batched_tokens"]  # rows shared steps
        assert b.counters["prefill_batches"] - batches < 15  # and waiting prompts shared prefills
    finally:
        b.shutdown()
    for i, t in enumerate(together.tokens):
        assert t == alone[i % len(jobs)].tokens[0], i
        assert together.finish[i].reason == alone[i % len(jobs)].finish[0].reason
    assert {a.finish[0].reason for a in alone} == {"stop", "length"}
    if kv is None or "max_kv_size" in kv:  # and the unbatched engine agrees on an image prompt
        r = m.generate("What color is the circle?", images=[str(EXAMPLES / "shapes-1.png")], max_tokens=12)
        assert r.token_ids == alone[0].tokens[0]


def test_cancel_frees_the_row_and_the_queue_bounds(demo):
    b = Batcher(demo, max_batch=1, max_queue=1)
    try:
        seen = threading.Event()
        events = []

        def emit(ev):
            events.append(ev)
            if len(events) == 3:
                seen.set()

        long = Job(demo.build_prompt("Tell me about shapes"), emit, max_tokens=900)
        b.submit(long)
        assert seen.wait(60)
        b.submit(Job(demo.build_prompt("hi"), lambda ev: None, max_tokens=2))  # waits: the batch is full
        with pytest.raises(QueueFull):
            b.submit(Job(demo.build_prompt("hi"), lambda ev: None, max_tokens=2))
        long.cancel()  # frees the only slot: the waiting job is admitted, then ours fits in the queue
        for _ in range(600):
            if not b.load()["queue_depth"]:
                break
            time.sleep(0.05)
        c = run_jobs(b, [dict(prompt=demo.build_prompt("What color is the circle?",
                                                        images=[str(EXAMPLES / "shapes-1.png")]), max_tokens=5)])
        assert demo.tokenizer.decode(c.tokens[0]) == "green"
        assert isinstance(events[-1], FinishEvent) and events[-1].reason == "cancelled"
        assert events[-1].completion_tokens < 900 and b.load()["batch_size"] == 0
    finally:
        b.shutdown()


def test_frequency_penalty_and_seeded_sampling(demo):
    b = Batcher(demo)
    try:
        p = demo.build_prompt("Tell me about shapes")
        plain = run_jobs(b, [dict(prompt=p, max_tokens=30)]).tokens[0]
        assert len(set(plain)) < len(plain)  # greedy text-only output repeats itself
        penalized = run_jobs(b, [dict(prompt=p, max_tokens=30, frequency_penalty=2.0, presence_penalty=2.0)]).tokens[0]
        assert penalized != plain and len(set(penalized)) > len(set(plain))
        hot = SamplingParams(temperature=1.0, seed=7)
        one = run_jobs(b, [dict(prompt=p, max_tokens=20, params=hot)] * 3).tokens
        assert one[0] == one[1] == one[2]  # the same seed draws the same tokens in a shared batch
    finally:
        b.shutdown()


def test_thinking_budget_forces_the_end_token(demo):
    tok = demo.tokenizer
    base = demo.build_prompt("Tell me about shapes")
    ids = base.ids + tok.encode("<think>")
    end_ids = tok.encode("</think>")
    b = Batcher(demo)
    try:
        job = dict(prompt=Prompt(ids, None, base.text + "<think>"), max_tokens=20,
                   thinking=Thinking(4, "<think>", "</think>", end_ids, inside=True))
        out = run_jobs(b, [job]).tokens[0]
    finally:
        b.shutdown()
    assert out[4:4 + len(end_ids)] == end_ids
    assert "</think>" not in tok.decode(out[:4])


class Exploding:
    done = False

    def mask(self):
        raise RuntimeError("boom")

    def advance(self, token):
        pass


def test_a_failing_request_does_not_kill_the_loop(demo):
    b = Batcher(demo)
    try:
        bad = run_jobs(b, [dict(prompt=demo.build_prompt("hi"), max_tokens=5, constraint=Exploding())])
        assert bad.finish[0].reason == "error" and "boom" in bad.finish[0].error
        good = run_jobs(b, [dict(prompt=demo.build_prompt("hi"), max_tokens=3)])
        assert good.finish[0].reason == "length" and b.alive
    finally:
        b.shutdown()


@pytest.mark.parametrize("layout", [{"layout": "dense"}, {"layout": "quantized", "bits": 4, "group_size": 32}])
def test_cache_join_select_and_drop(layout):
    """Joining caches of different lengths pads the shorter on the left; selecting and
    dropping leading padding keep every sequence's tokens where the mask expects them."""
    rng = np.random.default_rng(0)
    plan = [{"index": 0, "kv": layout}]
    a, b = make_caches(plan, 1, 2, 64)[0], make_caches(plan, 1, 2, 64)[0]
    ka, kb = (mx.array(rng.standard_normal((1, 2, n, 64)).astype(np.float32)) for n in (5, 9))
    a.append(ka, ka)
    b.append(kb, kb)
    ref_a = a.codecs["k"].decode(a.parts("k"), mx.float32)
    ref_b = b.codecs["k"].decode(b.parts("k"), mx.float32)
    a.pad_left(4)
    a.concat(b)
    assert a.batch == 2 and a.offset == 9
    keys = a.codecs["k"].decode(a.parts("k"), mx.float32)
    assert mx.array_equal(keys[0:1, :, 4:], ref_a) and mx.array_equal(keys[1:2], ref_b)
    a.select([0])
    a.drop_left(4)
    assert a.offset == 5 and mx.array_equal(a.codecs["k"].decode(a.parts("k"), mx.float32), ref_a)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_loop_reports_it(demo):
    """Something escaping the loop (not an ordinary exception) kills it; /health reads this."""
    b = Batcher(demo)

    def emit(ev):
        raise SystemExit("gone")

    b.submit(Job(demo.build_prompt("hi"), emit, max_tokens=2))
    b._thread.join(30)
    assert not b.alive and "SystemExit" in b.error


def test_min_tokens_holds_eos_back(demo):
    p = demo.build_prompt("What color is the circle?", images=[str(EXAMPLES / "shapes-1.png")])
    b = Batcher(demo)
    try:
        free = run_jobs(b, [dict(prompt=p, max_tokens=12)])
        held = run_jobs(b, [dict(prompt=p, max_tokens=12, min_tokens=12)])
    finally:
        b.shutdown()
    assert free.finish[0].reason == "stop" and len(free.tokens[0]) < 12
    assert held.finish[0].reason == "length" and len(held.tokens[0]) == 12
    assert held.tokens[0][:len(free.tokens[0])] == free.tokens[0]


def test_a_failing_image_encode_fails_only_its_request(demo):
    """Images are encoded on the vision thread; a failure there ends that request alone."""
    from dataclasses import replace
    good = demo.build_prompt("What color is the circle?", images=[str(EXAMPLES / "shapes-1.png")])
    broken = replace(good, images=replace(good.images, pixel_values=good.images.pixel_values[:, :7]))
    b = Batcher(demo)
    try:
        c = run_jobs(b, [dict(prompt=broken, max_tokens=5), dict(prompt=good, max_tokens=5),
                         dict(prompt=demo.build_prompt("hi"), max_tokens=3)])
        assert c.finish[0].reason == "error" and c.tokens[0] == []
        assert demo.tokenizer.decode(c.tokens[1]) == "green" and c.finish[2].reason == "length"
        assert b.alive and b.idle() and b.load()["encoding_images"] == 0
    finally:
        b.shutdown()


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_prefix_cache_reuses_blocks_and_changes_nothing(demo, kv_bits):
    """A second turn over the same image reuses the first turn's KV blocks; a different
    image behind the same placeholder ids does not; outputs equal runs without the cache."""
    from vlmc.demo import MODEL_DIR
    from vlmc.runtime.prefix_cache import PrefixCache
    m = demo if kv_bits is None else vlmc.load(MODEL_DIR, kv_bits=kv_bits)
    one, two = str(EXAMPLES / "shapes-1.png"), str(EXAMPLES / "shapes-2.png")

    def turn(image, question):
        return m.build_prompt(messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "What color is the circle?"}]},
            {"role": "assistant", "content": "green"},
            {"role": "user", "content": question}])

    prompts = [turn(one, "How many shapes are there?"), turn(one, "Describe the image."),
               turn(two, "Describe the image.")]
    plain, cached = Batcher(m), Batcher(m, prefix_cache=PrefixCache(block_size=8))
    try:
        ref = [run_jobs(plain, [dict(prompt=p, max_tokens=20)]) for p in prompts]
        got = [run_jobs(cached, [dict(prompt=p, max_tokens=20)]) for p in prompts]
    finally:
        plain.shutdown()
        cached.shutdown()
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens
    hits = [g.finish[0].cached_tokens for g in got]
    image_end = max(i for i, t in enumerate(prompts[0].ids) if t == m.image_token_id) + 1
    assert hits[0] == 0
    assert hits[1] >= image_end and hits[1] % 8 == 0 and hits[1] < len(prompts[1].ids)
    first_image = prompts[2].ids.index(m.image_token_id)
    assert hits[2] <= first_image  # the other image's blocks are not the first one's
    stats = cached.prefix_cache.stats()
    assert stats["hit_tokens"] == sum(hits) and stats["blocks"] > 0 and stats["bytes"] > 0


def test_submit_refuses_prompts_with_no_room(demo):
    from vlmc.errors import InputError
    b = Batcher(demo)
    try:
        with pytest.raises(InputError, match="context"):
            b.submit(Job(Prompt([1] * demo.max_context, None, ""), lambda ev: None))
        with pytest.raises(InputError, match="empty"):
            b.submit(Job(Prompt([], None, ""), lambda ev: None))
        assert b.load()["queue_depth"] == 0
    finally:
        b.shutdown()


def test_prefix_cache_disk_tier_outlives_the_loop(demo, tmp_path):
    """Blocks evicted from memory go to disk; a fresh cache on the same folder (a restarted
    server) reuses them with unchanged outputs; a corrupt block file is dropped, not used."""
    from vlmc.runtime.prefix_cache import DiskTier, PrefixCache
    system = "Answer with one word. " * 12
    first = demo.build_prompt("What color is the circle?", images=[str(EXAMPLES / "shapes-1.png")], system=system)
    again = demo.build_prompt("How many shapes are there?", images=[str(EXAMPLES / "shapes-1.png")], system=system)
    plain = Batcher(demo)
    ref = run_jobs(plain, [dict(prompt=again, max_tokens=10)]).tokens[0]
    plain.shutdown()

    tiny_memory = PrefixCache(max_bytes=1, block_size=8, disk=DiskTier(tmp_path))  # every block spills to disk
    b = Batcher(demo, prefix_cache=tiny_memory)
    run_jobs(b, [dict(prompt=first, max_tokens=3)])
    b.shutdown()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files and tiny_memory.stats()["blocks"] == 0

    restarted = PrefixCache(block_size=8, disk=DiskTier(tmp_path))
    b = Batcher(demo, prefix_cache=restarted)
    try:
        c = run_jobs(b, [dict(prompt=again, max_tokens=10)])
    finally:
        b.shutdown()
    assert c.tokens[0] == ref and c.finish[0].cached_tokens >= 8 and restarted.disk.hits > 0

    files[0].write_bytes(b"not a safetensors file")
    broken = DiskTier(tmp_path)
    assert broken.get(files[0].stem) is None and not files[0].exists()


def test_batch_generate_api(demo):
    img = str(EXAMPLES / "shapes-1.png")
    reqs = [{"prompt": "What color is the circle?", "images": [img]},
            {"prompt": "Describe the image.", "images": [str(EXAMPLES / "shapes-2.png")], "max_tokens": 30},
            "Tell me about shapes",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                       {"type": "text", "text": "How many shapes are there?"}]}]}]
    results = demo.batch_generate(reqs, max_tokens=12, temperature=0)
    assert [r.text for r in results][0] == "green"
    for i in (0, 1, 3):  # the image questions the model was trained on (text-only output is near-tie noise)
        kw = dict(reqs[i])
        one = demo.generate(**{"max_tokens": 12, **kw})
        got = results[i]
        assert got.token_ids == one.token_ids and got.text == one.text and got.finish_reason == one.finish_reason
    assert results[2].finish_reason == "length" and results[2].generation_tokens == 12
    from vlmc.errors import InputError
    with pytest.raises(InputError):
        demo.batch_generate([{"prompt": "hi", "max_tokens": 0}])


def test_an_idle_loop_hands_memory_back(demo, monkeypatch):
    """When the queue empties the loop releases MLX's buffer cache and, on glibc, the heap's
    free pages (the cpu target's activations are malloc'd numpy arrays)."""
    import platform
    from vlmc.runtime import memory
    if platform.libc_ver()[0] == "glibc":
        assert memory._trim is not None
    calls = []
    real = memory.release
    monkeypatch.setattr(memory, "release", lambda: calls.append(1) or real())
    b = Batcher(demo)
    try:
        before = len(calls)
        run_jobs(b, [dict(prompt=demo.build_prompt("Tell me about shapes"), max_tokens=4)])
        deadline = time.time() + 10
        while len(calls) <= before and time.time() < deadline:
            time.sleep(0.01)
        assert len(calls) > before
    finally:
        b.shutdown()


def test_prefill_chunks_are_a_token_budget_over_all_rows(demo):
    """Prompts prefilled together share --prefill-chunk: each step runs about that many
    prompt tokens over all their rows, so a decode step of the running batch never waits
    for rows x chunk tokens; the replies are the unchunked ones."""
    m = demo
    ps = [m.build_prompt("circle square " * n) for n in (30, 50, 70)]
    jobs = [dict(prompt=p, max_tokens=6) for p in ps]
    b = Batcher(m, max_batch=8, prefill_chunk=48, prefill_batch_tokens=4096)
    try:
        with b._cond:  # (reentrant) the loop admits all three at once
            together = Collector(len(jobs))
            for i, kw in enumerate(jobs):
                b.submit(Job(emit=together.emit(i), **kw))
        assert together.done.wait(120)
        width = max(len(p.ids) for p in ps)
        assert b.counters["prefill_batches"] == 1
        assert b.counters["prefill_steps"] >= width // (48 // 3)  # 16 columns x 3 rows per step
    finally:
        b.shutdown()
    for p, got in zip(ps, together.tokens):
        assert got == run_alone(m, p)


def run_alone(m, p):
    b = Batcher(m, max_batch=1, prefill_chunk=4096)
    try:
        return run_jobs(b, [dict(prompt=p, max_tokens=6)]).tokens[0]
    finally:
        b.shutdown()


def test_greedy_rows_picked_on_the_host_get_what_mlx_picks(demo):
    """Plain greedy rows are picked with numpy's argmax; every row still gets the token its
    own MLX path (EOS held under min_tokens, ties, NaN, forced tokens, penalties, sampling)
    gives."""
    from vlmc.runtime.batcher import _Row
    b = Batcher(demo)
    b.shutdown()
    p = Prompt(ids=[5, 6, 7])
    eos = sorted(demo.eos_ids)[0]
    kinds = [dict(), dict(min_tokens=4), dict(frequency_penalty=1.5), dict(), dict(min_tokens=4),
             dict(params=SamplingParams(temperature=0.8, seed=3)), dict(), dict(min_tokens=4), dict(min_tokens=4)]
    rows = [_Row(Job(prompt=p, emit=lambda ev: None, max_tokens=8, **kw), demo, 4096) for kw in kinds]
    rows[3].forced.append(9)
    for row in rows:
        row.history += [11, 11, 12]
    vocab = demo.tokenizer.vocab_size
    host = np.random.default_rng(0).standard_normal((len(rows), vocab)).astype(np.float32)
    host[:, eos] = 50.0  # EOS is every row's argmax: the held rows must pick the next best
    host[2, 11] = 49.0   # under the penalty row 2's second best loses its place
    host[7, [20, 30]] = 60.0  # a tie: the first
    host[8, [40, 45]] = np.nan  # NaN: the first, as MLX's argmax
    logits = mx.array(host)
    tokens, _ = b._sample(rows, logits)
    in_mlx = [int(row.sampler(b._masked(row, logits[i:i + 1]))[0].item()) for i, row in enumerate(rows)]
    for i in (0, 1, 2, 4, 6, 7, 8):
        assert tokens[i] == in_mlx[i], i
    assert tokens[0] == eos and tokens[1] != eos and tokens[3] == 9 and tokens[7] == 20 and tokens[8] == 40
    assert [b._sample([row], logits[i:i + 1])[0][0] for i, row in enumerate(rows) if i != 5] == \
        [t for i, t in enumerate(tokens) if i != 5]
