"""Per-token cost of grammar engines for JSON-schema constrained decoding.

    python benchmarks/constrained_overhead.py [--engines llguidance,vlmc,xgrammar,outlines]
        [--tokenizers demo,large] [--repeats 30] [--large-dir DIR] [--json out.json]

What one generated token costs the CPU: computing the allowed-token mask for the next
position, turning it into a bool [V] array (what `vlmc.runtime.constrained.Constraint.mask`
returns), and advancing the grammar by the chosen token. Reported as mean and p99
microseconds per token over `--repeats` runs of a ~100-token generation (the first run is a
warm-up and not counted), plus the one-off costs: preparing the tokenizer (once per model),
compiling the schema (once per schema) and starting a request.

Two drivers:
  doc     feed the tokens of a fixed valid document (the schema's example, serialized with
          `json.dumps` defaults and tokenized by the tokenizer), asserting each is allowed:
          what a model that follows the schema costs.
  random  pick a random allowed token each step (seeded), up to 100 tokens or until the
          grammar completes; the document is checked with json.loads afterwards.

Two tokenizers:
  demo    vlmc/demo/model/tokenizer.json (382 tokens, byte-level BPE), V = 400.
  large   a byte-level BPE with a 150,000-token vocabulary, Qwen2's pre-tokenizer and
          Qwen's added tokens, trained here on generated text (the hub is unreachable; this
          takes about 80 s once and is cached in --large-dir), V = 151,936 as in Qwen2.

Engines (each measured only where importable):
  llguidance   llguidance.LLMatcher directly (bitmask -> np.unpackbits -> bool).
  vlmc         vlmc.runtime.constrained (llguidance + the wrapper's checks).
  xgrammar     xgrammar.GrammarMatcher (requires torch at import time).
  outlines     outlines_core Index/Guide over the regex from build_regex_from_schema.

All engines are set to the same bounded whitespace, `(\\r?\\n)?[ \\t]{0,32}` (outlines and
xgrammar: their closest options; see ENGINE_NOTES in the output).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from vlmc.runtime.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "vlmc" / "demo" / "model"
DEFAULT_LARGE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmc" / "bench" / "bpe150k"

WS_REGEX = r"(\r?\n)?[ \t]{0,32}"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 40},
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 6},
        "orders": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0},
                    "total": {"type": "number"},
                    "status": {"enum": ["open", "shipped", "closed"]},
                },
                "required": ["id", "total", "status"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "email", "active", "role", "score", "address", "tags", "orders"],
    "additionalProperties": False,
}

DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@analytical-engine.org",
    "active": True,
    "role": "editor",
    "score": 97.25,
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "tags": ["math", "poetry", "engines"],
    "orders": [
        {"id": 1842, "total": 19.5, "status": "shipped"},
        {"id": 1843, "total": 7.0, "status": "open"},
    ],
}


# ----------------------------------------------------------------------------- tokenizers


def build_large_tokenizer(out: Path, vocab_size: int = 150_000, lines: int = 1_500_000) -> None:
    """Train a byte-level BPE with Qwen2's pre-tokenizer on generated text (deterministic)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    src = HFTokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))  # Qwen2's split regex + ByteLevel
    rng = random.Random(0)
    cons = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl gr br kr".split()
    vows = "a e i o u ai ea ou io y".split()

    def word() -> str:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.choice([1, 2, 2, 3, 3, 4])))
        return w + (rng.choice(cons) if rng.random() < 0.4 else "")

    words = sorted({word() for _ in range(400_000)})
    rng.shuffle(words)
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.9 for i in range(len(words))))

    def text():
        batch = []
        for _ in range(lines):
            ws = rng.choices(words, cum_weights=cum, k=rng.randint(5, 30))
            ws = [w.capitalize() if rng.random() < 0.1 else w for w in ws]
            r = rng.random()
            if r < 0.1:
                obj = {ws[0]: rng.randint(0, 10 ** rng.randint(1, 6)), ws[1]: ws[2:5], "id": rng.random()}
                s = json.dumps(obj, indent=rng.choice([None, 2]))
            elif r < 0.15:
                s = "    " * rng.randint(0, 3) + f"def {ws[0]}_{ws[1]}({ws[2]}, {ws[3]}=None):\n"
                s += f"        return {ws[2]}.{ws[4]}({rng.randint(0, 999)})"
            else:
                s = " ".join(ws) + rng.choice([".", ",", "!", "?", ":", ""])
            batch.append(s)
            if len(batch) == 1000:
                yield batch
                batch = []
        if batch:
            yield batch

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = src.pre_tokenizer
    tok.decoder = src.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(text(), trainer)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    # As in Qwen2.5: the tool-call tags are added tokens that are not "special".
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
    }))


def load_tokenizers(names: list[str], large_dir: Path) -> list[tuple[str, Tokenizer, int]]:
    out = []
    for name in names:
        if name == "demo":
            out.append(("demo", Tokenizer.from_dir(DEMO_DIR), 400))
        elif name == "large":
            if not (large_dir / "tokenizer.json").is_file():
                print(f"building the 150k-token BPE in {large_dir} (about 80 s, once)...", flush=True)
                t0 = time.perf_counter()
                build_large_tokenizer(large_dir)
                print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
            out.append(("large", Tokenizer.from_dir(large_dir), 151_936))
        else:
            raise SystemExit(f"unknown tokenizer {name!r}")
    return out


# ----------------------------------------------------------------------------- engines
# Each engine: prepare(tok, V, eos) -> ctx; compile(ctx, schema) -> g; start(ctx, g) -> state;
# step functions mask(state) -> bool[V] and advance(state, token).


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self):
        import llguidance

        self.llg = llguidance
        self.version = llguidance.__version__

    def prepare(self, tok, V, eos):
        self.V = V
        self.n = max(V, tok.vocab_size)
        self.lltok = self.llg.LLTokenizer(tok.backend.to_str(), n_vocab=self.n, eos_token=sorted(eos))
        self.bits = np.zeros((self.n + 31) // 32, dtype=np.int32)

    def compile(self, schema):
        from vlmc.runtime.constrained import _JSON_OPTIONS

        g = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=dict(_JSON_OPTIONS))
        m = self.llg.LLMatcher(self.lltok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)  # build lazily-made parts
        m.reset()
        return m

    def start(self, g):
        return g.deep_copy()

    def mask(self, m):
        m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little", count=self.n)[: self.V].view(bool)

    def advance(self, m, t):
        if not m.consume_token(t):
            raise RuntimeError(m.get_error())

    def done(self, m):
        return m.is_stopped()


class VlmcEngine:
    name = "vlmc"

    def __init__(self):
        import llguidance

        from vlmc.runtime import constrained

        self.mod = constrained
        self.version = f"llguidance {llguidance.__version__}"

    def prepare(self, tok, V, eos):
        self.gc = self.mod.GrammarCompiler(tok, V, eos)

    def compile(self, schema):
        c = self.gc.json(schema)
        c.mask()
        return schema

    def start(self, schema):
        return self.gc.json(schema)

    def mask(self, c):
        return c.mask()

    def advance(self, c, t):
        c.advance(t)

    def done(self, c):
        return c.done


def _byte_vocab(tok: Tokenizer) -> list[bytes | None]:
    """Token id -> its bytes (None for special tokens), from a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    u2b = {chr(c): b for b, c in zip(bs, cs)}
    added = tok.backend.get_added_tokens_decoder()
    out: list[bytes | None] = [None] * tok.vocab_size
    for s, i in tok.backend.get_vocab(with_added_tokens=True).items():
        if i in added:
            out[i] = None if added[i].special else added[i].content.encode()
        else:
            out[i] = bytes(u2b[ch] for ch in s)
    return out


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self):
        import xgrammar

        self.xgr = xgrammar
        from importlib.metadata import version

        self.version = version("xgrammar")

    def prepare(self, tok, V, eos):
        xgr = self.xgr
        vocab = [""] * tok.vocab_size
        for s, i in tok.backend.get_vocab(with_added_tokens=True).items():
            vocab[i] = s
        self.V = V
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=sorted(eos))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.bits = np.zeros((1, (V + 31) // 32), dtype=np.int32)

    def compile(self, schema):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=True, max_whitespace_cnt=32, strict_mode=True
        )

    def start(self, g):
        return self.xgr.GrammarMatcher(g)

    def mask(self, m):
        m.fill_next_token_bitmask(self.bits)
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little", count=self.V).view(bool)

    def advance(self, m, t):
        if not m.accept_token(t):
            raise RuntimeError(f"xgrammar rejected {t}")

    def done(self, m):
        return m.is_terminated()


class OutlinesEngine:
    name = "outlines"

    def __init__(self):
        import outlines_core
        from importlib.metadata import version

        self.oc = outlines_core
        self.version = version("outlines_core")

    def prepare(self, tok, V, eos):
        vocab: dict[bytes, list[int]] = {}
        eos_id = min(eos)
        for i, b in enumerate(_byte_vocab(tok)):
            if b is not None and i not in eos:
                vocab.setdefault(b, []).append(i)
        self.vocab = self.oc.Vocabulary(eos_id, vocab)
        self.V = V
        self.bits = np.zeros((V + 31) // 32, dtype=np.int32)

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=WS_REGEX)
        return self.oc.Index(regex, self.vocab)

    def start(self, index):
        return self.oc.Guide(index)

    def mask(self, g):
        g.write_mask_into(self.bits.ctypes.data, self.bits.size, 4)
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little", count=self.V).view(bool)

    def advance(self, g, t):
        g.advance(t, return_tokens=False)

    def done(self, g):
        return g.is_finished() and not self.mask(g)[: self.V].any()


ENGINES = {"llguidance": LLGuidanceEngine, "vlmc": VlmcEngine, "xgrammar": XGrammarEngine, "outlines": OutlinesEngine}
ENGINE_NOTES = {
    "llguidance": f"whitespace_pattern {WS_REGEX}, separators ',' ':' (vlmc's settings)",
    "vlmc": "GrammarCompiler.json(); per-request matcher is a deep copy of a cached one",
    "xgrammar": "any_whitespace=True, max_whitespace_cnt=32, strict_mode=True; imports torch",
    "outlines": f"build_regex_from_schema(whitespace_pattern={WS_REGEX!r}); Index built per schema",
}


# ----------------------------------------------------------------------------- measuring


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run_one(engine, g, driver: str, doc_ids: list[int], eos: set[int], seed: int, steps: int):
    """One generation; returns (per-token mask us, per-token advance us, token ids, finished)."""
    state = engine.start(g)
    rng = random.Random(seed)
    t_mask, t_adv, ids = [], [], []
    pc = time.perf_counter_ns
    for k in range(len(doc_ids) if driver == "doc" else steps):
        t0 = pc()
        m = engine.mask(state)
        t1 = pc()
        if driver == "doc":
            tok = doc_ids[k]
            if not m[tok]:
                raise AssertionError(f"{engine.name}: document token {k} ({tok}) not allowed")
        else:
            allowed = np.flatnonzero(m)
            non_eos = [int(a) for a in allowed if int(a) not in eos] if len(allowed) < 64 else None
            if non_eos is not None and not non_eos:
                tok = int(allowed[0])
            elif non_eos is not None:
                tok = rng.choice(non_eos)
            else:
                tok = int(allowed[rng.randrange(len(allowed))])
                while tok in eos:
                    tok = int(allowed[rng.randrange(len(allowed))])
        t2 = pc()
        engine.advance(state, tok)
        t3 = pc()
        t_mask.append((t1 - t0) / 1e3)
        t_adv.append((t3 - t2) / 1e3)
        ids.append(tok)
        if tok in eos or engine.done(state):
            return t_mask, t_adv, ids, True
    return t_mask, t_adv, ids, False


def strip_max_length(schema):
    """The schema without `maxLength` (bounded strings are the slow case for llguidance)."""
    if isinstance(schema, dict):
        return {k: strip_max_length(v) for k, v in schema.items() if k != "maxLength"}
    return schema


SCHEMAS = {"maxlen": SCHEMA, "plain": strip_max_length(SCHEMA)}


def measure(engine, g, tok: Tokenizer, driver: str, repeats: int, steps: int) -> dict:
    eos = set(tok.eos_token_ids)
    t0 = time.perf_counter()
    engine.start(g)
    start_ms = (time.perf_counter() - t0) * 1e3
    doc_ids = tok.encode(json.dumps(DOCUMENT))
    masks, advs, total = [], [], []
    n_tokens = []
    for r in range(repeats + 1):
        tm, ta, ids, finished = run_one(engine, g, driver, doc_ids, eos, seed=r, steps=steps)
        text = tok.decode([i for i in ids if i not in eos])
        if driver == "doc":
            assert json.loads(text) == DOCUMENT, text
        elif finished:
            json.loads(text)  # a completed random document must parse
        if r == 0:
            continue  # warm-up
        masks += tm
        advs += ta
        total += [a + b for a, b in zip(tm, ta)]
        n_tokens.append(len(ids))
    return {
        "start_ms": start_ms,
        "tokens_per_run": statistics.mean(n_tokens),
        "mask_mean_us": statistics.mean(masks),
        "advance_mean_us": statistics.mean(advs),
        "mean_us": statistics.mean(total),
        "p50_us": percentile(total, 50),
        "p99_us": percentile(total, 99),
        "max_us": max(total),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="llguidance,vlmc,xgrammar,outlines")
    ap.add_argument("--tokenizers", default="demo,large")
    ap.add_argument("--drivers", default="doc,random")
    ap.add_argument("--schemas", default="maxlen,plain", help="maxlen: strings with maxLength; plain: without")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--steps", type=int, default=100, help="tokens per run for the random driver")
    ap.add_argument("--large-dir", type=Path, default=DEFAULT_LARGE_DIR)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    toks = load_tokenizers(args.tokenizers.split(","), args.large_dir)
    engines = []
    for name in args.engines.split(","):
        try:
            engines.append(ENGINES[name]())
        except ImportError as e:
            print(f"{name}: not installed ({e})")
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus")
    for e in engines:
        print(f"  {e.name} {e.version}: {ENGINE_NOTES[e.name]}")
    results = []
    header = (f"{'tokenizer':9} {'V':>7} {'schema':6} {'driver':6} {'engine':10} {'tok/run':>7} {'mask us':>8} "
              f"{'adv us':>7} {'mean us':>8} {'p50 us':>7} {'p99 us':>7} {'prep ms':>8} {'compile ms':>10}")
    print(header, flush=True)
    for tname, tok, V in toks:
        for e in engines:
            t0 = time.perf_counter()
            e.prepare(tok, V, set(tok.eos_token_ids))
            prep_ms = (time.perf_counter() - t0) * 1e3
            for sname in args.schemas.split(","):
                t0 = time.perf_counter()
                try:
                    g = e.compile(SCHEMAS[sname])
                except Exception as ex:  # report and go on: one engine failing is a result too
                    print(f"{tname:9} {V:7d} {sname:6} {'-':6} {e.name:10} COMPILE FAILED: {type(ex).__name__}: {str(ex)[:200]}")
                    continue
                compile_ms = (time.perf_counter() - t0) * 1e3
                for driver in args.drivers.split(","):
                    try:
                        r = measure(e, g, tok, driver, args.repeats, args.steps)
                    except Exception as ex:
                        print(f"{tname:9} {V:7d} {sname:6} {driver:6} {e.name:10} FAILED: {type(ex).__name__}: {str(ex)[:200]}")
                        continue
                    r.update(tokenizer=tname, V=V, schema=sname, driver=driver, engine=e.name, version=e.version,
                             prepare_ms=prep_ms, compile_ms=compile_ms)
                    results.append(r)
                    print(f"{tname:9} {V:7d} {sname:6} {driver:6} {e.name:10} {r['tokens_per_run']:7.0f} "
                          f"{r['mask_mean_us']:8.1f} {r['advance_mean_us']:7.1f} {r['mean_us']:8.1f} {r['p50_us']:7.1f} "
                          f"{r['p99_us']:7.1f} {prep_ms:8.1f} {compile_ms:10.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
