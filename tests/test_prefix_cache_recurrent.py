"""Prefix caching for hybrid decoders (Qwen3.5's Gated DeltaNet layers beside full
attention), on the tiny dense and MoE checkpoints of ``tests/fixtures``.

A cached prefix is the full-attention layers' KV blocks plus the recurrent layers' state
snapshot at its last block boundary. A prompt served from the cache gives the tokens it
gives without the cache; its log-probabilities are bitwise those of its first (missed)
run, whose prefill steps ended on the same boundaries, and within 1e-4 of a loop with no
prefix cache (whose steps end elsewhere). Checked alone and for a next turn, at the branch
point of prompts sharing a start and every ``state_every`` blocks, with images in the
prefix (another image behind the same placeholder ids does not match), for rows prefilled
together with left padding, through the disk tier (a restarted cache; a damaged snapshot
dropped), and with prompt-lookup speculation. Metrics and ``vlmc inspect`` show the
snapshot bytes.
"""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import qwen3_5 as q35  # noqa: E402
from fixtures import qwen3_5_moe as qm  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402
from vlmc.runtime.batcher import Batcher, Job, TokenEvent  # noqa: E402
from vlmc.runtime.prefix_cache import STATE, DiskTier, PrefixCache  # noqa: E402

ATOL = 1e-4
BLOCK = 8
RIVER = "the river runs by the mill and the mill turns by the river " * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("recprefix")
    out = {}
    for name, build in (("dense", q35.build_qwen3_5_checkpoint), ("moe", qm.build_qwen3_5_moe_checkpoint)):
        info = build(root / f"ckpt-{name}")
        art = vlmc_compile(info["path"], root / f"art-{name}", target="cpu")
        out[name] = (vlmc.load(art), art)
    return out


class Run:
    def __init__(self, n: int):
        self.tokens = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)]
        self.finish = [None] * n
        self.done = threading.Event()

    def emit(self, i: int):
        def on_event(ev):
            if isinstance(ev, TokenEvent):
                self.tokens[i].append(ev.token)
                self.logprobs[i].append(ev.logprob)
            else:
                self.finish[i] = ev
                if all(f is not None for f in self.finish):
                    self.done.set()
        return on_event

    def wait(self) -> None:
        assert self.done.wait(300), "jobs did not finish"
        assert all(f.reason in ("stop", "length") for f in self.finish), [f.error for f in self.finish]

    @property
    def cached(self) -> list[int]:
        return [f.cached_tokens for f in self.finish]


def run(batcher: Batcher, prompts: list, max_tokens: int = 12, wait: bool = True) -> Run:
    r = Run(len(prompts))
    for i, p in enumerate(prompts):
        batcher.submit(Job(p, r.emit(i), max_tokens=max_tokens, logprobs=0))
    if wait:
        r.wait()
    return r


def plain_runs(m, prompts, max_tokens=12) -> list[Run]:
    b = Batcher(m)
    try:
        return [run(b, [p], max_tokens) for p in prompts]
    finally:
        b.shutdown()


def same_as_plain(got: Run, want: Run) -> None:
    assert got.tokens == want.tokens
    diff = max(abs(a - b) for x, y in zip(got.logprobs, want.logprobs) for a, b in zip(x, y))
    assert diff <= ATOL, diff


def snapshot_bytes(m) -> int:
    return sum(L["kv"]["bytes_per_sequence"] for L in m.kv_layers if L["kv"]["layout"] == "recurrent")


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_a_hit_is_bitwise_the_miss_and_equals_no_cache(models, name):
    m, _ = models[name]
    assert m.decoder.prefix_refusal() is None
    first = m.build_prompt(RIVER)
    turn = m.build_prompt(messages=[{"role": "user", "content": RIVER},
                                    {"role": "assistant", "content": "The mill."},
                                    {"role": "user", "content": "And the river?"}])
    want = plain_runs(m, [first, turn])
    cache = PrefixCache(block_size=BLOCK)
    b = Batcher(m, prefix_cache=cache)
    try:
        miss, hit, nxt = run(b, [first]), run(b, [first]), run(b, [turn])
    finally:
        b.shutdown()
    assert miss.cached == [0] and hit.cached == [(len(first.ids) - 1) // BLOCK * BLOCK]
    assert hit.tokens == miss.tokens and hit.logprobs == miss.logprobs  # bitwise
    same_as_plain(hit, want[0])
    same_as_plain(nxt, want[1])
    common = next(i for i, (x, y) in enumerate(zip(first.ids, turn.ids)) if x != y) // BLOCK
    usable = (len(first.ids) - 1) // BLOCK   # where the first prompt kept its states
    assert nxt.cached == [usable * BLOCK if common >= usable else 0]
    stats = cache.stats()
    per = snapshot_bytes(m)
    assert stats["state_bytes_per_snapshot"] == per and stats["state_snapshots"] >= 2
    assert stats["state_bytes"] == per * stats["state_snapshots"] and stats["bytes"] > stats["state_bytes"]
    assert stats["hit_tokens"] == hit.cached[0] + nxt.cached[0]


@pytest.mark.parametrize("every", [0, 2])
def test_prompts_sharing_a_start_reuse_it_from_the_branch_point(models, every):
    """Without ``state_every`` the second prompt finds the shared blocks but no state there
    and keeps one at the branch point, which the third reuses; with it, the second already
    starts from the last kept boundary before the branch."""
    m, _ = models["dense"]
    system = "Answer as the miller would, briefly. " * 5
    prompts = [m.build_prompt(q, system=system) for q in ("Where is the mill?", "Name the river.", "Count wheels.")]
    want = plain_runs(m, prompts)
    b = Batcher(m, prefix_cache=PrefixCache(block_size=BLOCK, state_every=every))
    try:
        got = [run(b, [p]) for p in prompts]
    finally:
        b.shutdown()
    for g, w in zip(got, want):
        same_as_plain(g, w)
    common = lambda a, b: next(i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y)  # noqa: E731
    shared = common(prompts[0], prompts[1])
    assert common(prompts[0], prompts[2]) == common(prompts[1], prompts[2]) == shared
    branch = shared // BLOCK * BLOCK
    hits = [g.cached[0] for g in got]
    assert hits[0] == 0 and hits[2] == branch > 0
    if every:
        assert hits[1] == shared // (BLOCK * every) * BLOCK * every > 0
    else:
        assert hits[1] == 0


def test_images_in_the_prefix(models):
    m, _ = models["dense"]
    one, two = ck.make_test_image(100, 70, seed=3), ck.make_test_image(100, 70, seed=4)
    def turn(image, question):
        return m.build_prompt(messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Look at this picture carefully."}]},
            {"role": "assistant", "content": "I see shapes."},
            {"role": "user", "content": question}], images=[image])

    prompts = [turn(one, "Describe the picture."), turn(one, "What shape is in it?"), turn(two, "What shape is in it?")]
    want = plain_runs(m, prompts)
    b = Batcher(m, prefix_cache=PrefixCache(block_size=BLOCK, state_every=1))
    try:
        got = [run(b, [p]) for p in prompts]
    finally:
        b.shutdown()
    for g, w in zip(got, want):
        same_as_plain(g, w)
    image = [i for i, t in enumerate(prompts[0].ids) if t == m.image_token_id]
    hits = [g.cached[0] for g in got]
    assert hits[0] == 0 and hits[1] >= image[-1] + 1 and hits[1] % BLOCK == 0
    assert hits[2] <= image[0]  # the other image's blocks are not the first one's


def test_rows_prefilled_together_keep_their_states(models):
    """Two prompts prefilled as one padded batch keep each row's states at its own block
    boundaries; a repeat of each, run beside a third request, starts from them."""
    m, _ = models["dense"]
    prompts = [m.build_prompt(RIVER), m.build_prompt("Tell me about the mill wheel and its shapes " * 3),
               m.build_prompt("Describe the picture.", images=[ck.make_test_image(100, 70, seed=3)])]
    assert len(prompts[0].ids) != len(prompts[1].ids)
    want = plain_runs(m, prompts)
    b = Batcher(m, prefix_cache=PrefixCache(block_size=BLOCK))
    try:
        with b._cond:  # (re-entrant) both are queued before the loop admits either
            together = run(b, prompts[:2], wait=False)
        together.wait()
        batches = b.counters["prefill_batches"]
        again = run(b, [prompts[2], prompts[0], prompts[1]])
    finally:
        b.shutdown()
    assert batches == 1
    assert together.cached == [0, 0]
    assert again.cached[1:] == [(len(p.ids) - 1) // BLOCK * BLOCK for p in prompts[:2]]
    for i, j in ((0, 0), (1, 1)):  # batched rows round differently: within tolerance
        assert together.tokens[i] == want[j].tokens[0]
    for i, j in ((0, 2), (1, 0), (2, 1)):
        assert again.tokens[i] == want[j].tokens[0]


def test_disk_tier_keeps_states(models, tmp_path):
    m, _ = models["dense"]
    first = m.build_prompt(RIVER)
    spill = PrefixCache(max_bytes=1, block_size=BLOCK, disk=DiskTier(tmp_path))  # every entry goes to disk
    b = Batcher(m, prefix_cache=spill)
    try:
        miss = run(b, [first])
    finally:
        b.shutdown()
    states = sorted(tmp_path.glob(f"*{STATE}.safetensors"))
    assert len(states) == 1 and spill.stats()["blocks"] == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == len(first.ids) // BLOCK + 1

    restarted = PrefixCache(block_size=BLOCK, disk=DiskTier(tmp_path))
    b = Batcher(m, prefix_cache=restarted)
    try:
        hit = run(b, [first])
    finally:
        b.shutdown()
    assert hit.cached == [(len(first.ids) - 1) // BLOCK * BLOCK] and restarted.disk.hits > 0
    assert hit.tokens == miss.tokens and hit.logprobs == miss.logprobs

    states[0].write_bytes(b"not a safetensors file")
    damaged = PrefixCache(block_size=BLOCK, disk=DiskTier(tmp_path))
    b = Batcher(m, prefix_cache=damaged)
    try:
        again = run(b, [first])
    finally:
        b.shutdown()
    assert again.cached == [0] and damaged.disk.corrupt == 1
    assert again.tokens == miss.tokens


def test_speculation_with_a_prefix_hit(models):
    """Prompt lookup, and a drafter that proposes the right continuation with every third
    token wrong (so verify steps keep some drafts and rewind the states over the others),
    on prompts served from the cache: the tokens of a loop without either."""
    from vlmc.runtime.speculative import Draft, Drafter, PromptLookup, Speculation

    m, _ = models["dense"]
    prompt = m.build_prompt(RIVER)
    want = plain_runs(m, [prompt], max_tokens=24)[0]

    class HalfRight(Drafter):
        name = "half-right"

        def start(self, prompt_ids, prompt=None):
            return len(prompt_ids)

        def propose(self, state, context, k, sampler=None, rng=None):
            done = len(context) - state
            truth = want.tokens[0][done:done + k]
            return Draft([t if (done + i) % 3 != 2 else (t + 1) % 400 for i, t in enumerate(truth)])

    for drafter in (PromptLookup(ngram=2, min_ngram=1), HalfRight()):
        b = Batcher(m, prefix_cache=PrefixCache(block_size=BLOCK),
                    speculation=Speculation(drafter, num_draft_tokens=4, adaptive=False))
        try:
            miss, hit = run(b, [prompt], 24), run(b, [prompt], 24)
        finally:
            b.shutdown()
        assert hit.cached[0] > 0 and miss.tokens == hit.tokens == want.tokens, drafter.name
    c = b.counters
    assert c["speculative_steps"] > 0 and c["draft_proposed"] > c["draft_accepted"] > 0


def test_metrics_and_inspect_show_snapshot_bytes(models):
    from click.testing import CliRunner

    from vlmc.cli import main

    m, art = models["dense"]
    per = snapshot_bytes(m)
    out = CliRunner().invoke(main, ["inspect", str(art)]).output
    assert f"prefix cache: {per:,} B of recurrent states per stored block boundary" in out
    cache = PrefixCache(block_size=BLOCK)
    b = Batcher(m, prefix_cache=cache)
    b.shutdown()
    assert cache.stats()["state_bytes_per_snapshot"] == per and cache.stats()["state_snapshots"] == 0


def test_a_cache_without_a_stored_form_is_still_refused(models):
    from dataclasses import replace

    m, _ = models["dense"]
    layers = [dict(L, kv={"layout": "recurrent"}) if L["kv"]["layout"] == "recurrent" else L for L in m.kv_layers]
    reason = replace(m.decoder, kv_layers=layers).prefix_refusal()
    assert reason and "no planned sizes" in reason
    odd = [dict(L, kv={"layout": "paged"}) for L in m.kv_layers]
    assert "has no stored form" in replace(m.decoder, kv_layers=odd).prefix_refusal()
