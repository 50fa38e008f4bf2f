"""Tokenizer, chat template and streaming detokenizer parity with transformers.

The fixture trains a small byte-level BPE tokenizer (Qwen-style special tokens and chat
template); transformers loads the same folder and is the reference for every comparison.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from vlmc.errors import InputError, SourceError
from vlmc.runtime.chat import normalize_messages, render_chat
from vlmc.runtime.detokenizer import StopStringMatcher, StreamingDetokenizer
from vlmc.runtime.tokenizer import Tokenizer, find_chat_template

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]

# Qwen2-VL's template (as shipped on the hub), images counted via a namespace.
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "Describe the image in detail. What is in the picture?",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストです。中文文本。",
    "café naïve résumé façade",
    "emoji 😀🎉 fun",
    "def main():\n    return 42\n",
]

TEXTS = [
    "Hello world!",
    "<|im_start|>user\nDescribe this.<|im_end|>\n<|im_start|>assistant\n",
    "café naïve résumé — Ærøskøbing",
    "日本語のテキストと漢字と한국어",
    "emoji 😀🎉🦙👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is this?",
    "  leading spaces\n\n\ttabs and <|im_end|>trailing  ",
    "",
]

TEXT_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": "<|im_end|>",
    "pad_token": {
        "__type": "AddedToken",
        "content": "<|endoftext|>",
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
        "special": True,
    },
    "bos_token": None,
    "unk_token": None,
}


def _train_backend() -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


def _write(folder: Path, backend: BackendTokenizer, config: dict, **files: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        name = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def backend() -> BackendTokenizer:
    return _train_backend()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, backend) -> Path:
    folder = tmp_path_factory.mktemp("qwen_tok")
    return _write(folder, backend, {**TEXT_CONFIG, "chat_template": QWEN_TEMPLATE})


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


# ------------------------------------------------------------------------------------ tokenizer


def test_encode_matches_transformers(tok, hf):
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True), text
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") == hf.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")


def test_decode_matches_transformers(tok, hf):
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # Arbitrary id sequences, including ones that cut characters in half.
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids) == hf.decode(ids)


def test_vocab_and_special_tokens(tok, hf):
    assert tok.vocab_size == len(hf)
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.eos_token_ids == [hf.eos_token_id]
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.bos_token_id is None and hf.bos_token_id is None
    hf_special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert tok.special_ids == hf_special
    for t in SPECIALS:
        assert tok.id_to_token(tok.token_to_id(t)) == t
    assert tok.special_tokens_map == hf.special_tokens_map


def test_bos_from_post_processor_and_missing_special(tmp_path, backend):
    # transformers v5 lets tokenizer.json's post-processor decide what add_special_tokens adds and
    # ignores tokenizer_config's add_bos_token; check both a file without and one with a BOS template.
    config = {**TEXT_CONFIG, "bos_token": "<|endoftext|>", "add_bos_token": True, "unk_token": "<unk>"}
    with_bos = BackendTokenizer.from_str(backend.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)]
    )
    for name, source, adds in [("plain", backend, False), ("bos", with_bos, True)]:
        folder = _write(tmp_path / name, source, config)
        ours = Tokenizer.from_dir(folder)
        ref = transformers.AutoTokenizer.from_pretrained(str(folder))
        for text in TEXTS:
            assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True)
            assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.add_bos_token is adds
        assert (ours.encode("hi", add_special_tokens=True)[0] == ours.bos_token_id) is adds
        # "<unk>" is not in tokenizer.json: both add it as a special token.
        assert ours.token_to_id("<unk>") == ref.convert_tokens_to_ids("<unk>")
        assert ours.vocab_size == len(ref)
        assert ours.encode("a<unk>b") == ref.encode("a<unk>b", add_special_tokens=False)
        assert ours.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}


def test_generation_config_eos_ids(tmp_path, backend):
    folder = _write(tmp_path / "gen", backend, TEXT_CONFIG, generation_config__json={"eos_token_id": [2, 0]})
    ours = Tokenizer.from_dir(folder)
    assert ours.eos_token_id == 2
    assert ours.eos_token_ids == [2, 0]
    # No eos_token in the tokenizer config: generation_config.json supplies it.
    config = {k: v for k, v in TEXT_CONFIG.items() if k != "eos_token"}
    folder = _write(tmp_path / "gen2", backend, config, generation_config__json={"eos_token_id": 2})
    ours = Tokenizer.from_dir(folder)
    assert ours.eos_token_id == 2 and ours.eos_token_ids == [2]


def test_source_errors(tmp_path, backend):
    with pytest.raises(SourceError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    folder = _write(tmp_path / "bad", backend, {})
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text('{"garbage": true}')
    with pytest.raises(SourceError, match="cannot load"):
        Tokenizer.from_dir(folder)


# ------------------------------------------------------------------------------------ chat template lookup


def test_find_chat_template_each_place(tmp_path, backend):
    plain = {k: v for k, v in TEXT_CONFIG.items()}
    d = _write(tmp_path / "jinja", backend, plain, chat_template__jinja="JINJA")
    assert find_chat_template(d) == "JINJA"
    d = _write(tmp_path / "json", backend, plain, chat_template__json={"chat_template": "JSON"})
    assert find_chat_template(d) == "JSON"
    d = _write(tmp_path / "proc", backend, plain, processor_config__json={"chat_template": "PROC"})
    assert find_chat_template(d) == "PROC"
    d = _write(tmp_path / "tokcfg", backend, {**plain, "chat_template": "TOKCFG"})
    assert find_chat_template(d) == "TOKCFG"
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    d = _write(tmp_path / "named", backend, {**plain, "chat_template": named})
    assert find_chat_template(d) == "DEFAULT"
    d = _write(tmp_path / "none", backend, plain)
    assert find_chat_template(d) is None
    # Precedence: the .jinja file wins over every config key, chat_template.json over the configs.
    d = _write(
        tmp_path / "all",
        backend,
        {**plain, "chat_template": "TOKCFG"},
        chat_template__jinja="JINJA",
        chat_template__json={"chat_template": "JSON"},
        processor_config__json={"chat_template": "PROC"},
    )
    assert find_chat_template(d) == "JINJA"
    (d / "chat_template.jinja").unlink()
    assert find_chat_template(d) == "JSON"
    (d / "chat_template.json").unlink()
    assert find_chat_template(d) == "PROC"
    d = _write(tmp_path / "nodefault", backend, {**plain, "chat_template": [{"name": "x", "template": "X"}]})
    with pytest.raises(SourceError, match="default"):
        find_chat_template(d)


def test_transformers_reads_same_template(tmp_path, backend):
    # The three storage places, loaded by transformers, give the template we find.
    for name, files, cfg in [
        ("jinja", {"chat_template__jinja": QWEN_TEMPLATE}, TEXT_CONFIG),
        ("tokcfg", {}, {**TEXT_CONFIG, "chat_template": QWEN_TEMPLATE}),
    ]:
        d = _write(tmp_path / name, backend, cfg, **files)
        assert find_chat_template(d) == transformers.AutoTokenizer.from_pretrained(str(d)).chat_template


# ------------------------------------------------------------------------------------ rendering


def _openai_conversation() -> list[dict]:
    return [
        {"role": "system", "content": "You are a careful vision assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}},
                {"type": "text", "text": "What is in this picture? 😀"},
            ],
        },
        {"role": "assistant", "content": "A cat on a sofa.", "tool_calls": None},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare with these:"},
                {"type": "image", "image": "/tmp/b.jpg"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                {"type": "text", "text": "日本語で答えて。"},
            ],
        },
    ]


def _transformers_conversation() -> list[dict]:
    return [
        {"role": "system", "content": "You are a careful vision assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image", "url": "https://example.com/a.png"},
                {"type": "text", "text": "What is in this picture? 😀"},
            ],
        },
        {"role": "assistant", "content": "A cat on a sofa."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare with these:"},
                {"type": "image", "path": "/tmp/b.jpg"},
                {"type": "image", "url": "data:image/png;base64,AAAA"},
                {"type": "text", "text": "日本語で答えて。"},
            ],
        },
    ]


def test_render_matches_apply_chat_template(tok, hf, tok_dir):
    template = find_chat_template(tok_dir)
    ref = hf.apply_chat_template(_transformers_conversation(), tokenize=False, add_generation_prompt=True)
    ours = render_chat(template, _openai_conversation(), **tok.special_tokens_map)
    assert ours == ref
    assert ours.count("<|image_pad|>") == 3
    assert tok.encode(ours) == hf.encode(ref, add_special_tokens=False)
    # Without a system prompt the template inserts its default one; without the generation prompt.
    convo = _openai_conversation()[1:2]
    ref = hf.apply_chat_template(_transformers_conversation()[1:2], tokenize=False, add_generation_prompt=False)
    assert render_chat(template, convo, add_generation_prompt=False) == ref
    # Extra template variables pass through.
    ref = hf.apply_chat_template(
        _transformers_conversation(), tokenize=False, add_generation_prompt=True, add_vision_id=True
    )
    assert render_chat(template, _openai_conversation(), add_vision_id=True) == ref
    assert "Picture 3: " in ref


def test_normalize_messages_collects_images():
    msgs, images = normalize_messages(_openai_conversation())
    assert images == ["https://example.com/a.png", "/tmp/b.jpg", "data:image/png;base64,AAAA"]
    assert msgs[1]["content"][0] == {"type": "image"}
    assert msgs[3]["content"][1:3] == [{"type": "image"}, {"type": "image"}]
    assert "tool_calls" not in msgs[2]  # None values are dropped, as transformers does
    # Already-normalized messages render again without complaint.
    assert render_chat(QWEN_TEMPLATE, msgs) == render_chat(QWEN_TEMPLATE, _openai_conversation())
    with pytest.raises(InputError, match="no image URL"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(InputError, match="unsupported content part type 'audio'"):
        normalize_messages([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])
    with pytest.raises(InputError, match="empty"):
        normalize_messages([])
    with pytest.raises(InputError, match="message 0"):
        normalize_messages(["hello"])


FEATURE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "{% if m['role'] == 'stop' %}{% break %}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] | tojson }}\n"
    "{% endfor %}"
    "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "count={{ ns.n }} year={{ strftime_now('%Y') }} eos={{ eos_token }}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_features_match_transformers(hf):
    messages = [
        {"role": "user", "content": "<b>\"quotes\" & 'apostrophes'</b> café 😀"},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "ok"},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "after stop"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "déjà <vu>"}}]
    ref = hf.apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, tools=tools, tokenize=False, add_generation_prompt=True
    )
    ours = render_chat(FEATURE_TEMPLATE, messages, tools=tools, **hf.special_tokens_map)
    assert ours == ref
    assert "&amp;" not in ours and "café" in ours
    # Unset special tokens render as empty (undefined), never as "None".
    assert render_chat("{{ bos_token }}|{{ eos_token }}", [{"role": "user", "content": "x"}]) == "|"
    assert render_chat("{{ bos_token }}", [{"role": "user", "content": "x"}], bos_token="<s>") == "<s>"


def test_template_errors():
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}"
        "{% endif %}ok"
    )
    with pytest.raises(InputError, match="Conversation must start with user"):
        render_chat(template, [{"role": "assistant", "content": "hi"}])
    assert render_chat(template, [{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(InputError):
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(SourceError, match="syntax error"):
        render_chat("{% for %}", [{"role": "user", "content": "hi"}])
    # The sandbox refuses attribute access to internals.
    with pytest.raises(InputError):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(InputError):
        render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", [{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------ detokenizer


class _CountingTokenizer:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


STREAM_TEXTS = [
    "Emoji: 🦙🦄👩‍👩‍👧 and CJK 漢字仮名交じり文, accented: Ærøskøbing ŝĉĥ.",
    "<|im_start|>assistant\n𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ ¿Qué? ☃️<|im_end|>",
]


def _stream(detok: StreamingDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_detokenizer_splits_characters_safely(tok):
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        # The fixture's vocabulary really does split characters across tokens.
        assert any("\ufffd" in tok.decode([i]) for i in ids)
        for skip in (False, True):
            pieces = _stream(StreamingDetokenizer(tok, skip_special_tokens=skip), ids)
            assert all("\ufffd" not in p for p in pieces)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_bounded_window(tok):
    text = " ".join(STREAM_TEXTS * 30)
    ids = tok.encode(text)
    counting = _CountingTokenizer(tok)
    pieces = _stream(StreamingDetokenizer(counting), ids)
    assert "".join(pieces) == tok.decode(ids)
    assert len(ids) > 500
    assert max(counting.lengths) <= 12  # windows stay short, never the whole sequence
    assert len(counting.lengths) <= 3 * len(ids) + 2


def _byte_level_symbol(b: int) -> str:
    """The printable character GPT-2 style byte-level BPE uses for byte `b`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def test_detokenizer_invalid_bytes(tok):
    # Lone continuation bytes and truncated lead bytes never complete: decode shows U+FFFD for
    # them, the stream must reproduce that exactly and keep its window bounded meanwhile.
    cont = [tok.token_to_id(_byte_level_symbol(b)) for b in (0x80, 0x9F, 0xBF)]
    lead = tok.token_to_id(_byte_level_symbol(0xE6))
    assert None not in cont and lead is not None
    ids = tok.encode("start ") + cont * 10 + [lead] + tok.encode("a 漢字") + [lead, cont[0]] + cont * 5 + [lead]
    counting = _CountingTokenizer(tok)
    pieces = _stream(StreamingDetokenizer(counting), ids)
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" in tok.decode(ids)
    assert max(counting.lengths) <= 16


def test_detokenizer_metaspace_tokenizer():
    # SentencePiece-style decoding strips the leading space of the first token; windows must agree.
    sp = BackendTokenizer(models.BPE(byte_fallback=True, unk_token=None))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=alphabet, show_progress=False)
    sp.train_from_iterator(CORPUS * 5, trainer)
    text = "Hello world café 漢字 🦙 fox"
    ids = sp.encode(text).ids
    assert "".join(_stream(StreamingDetokenizer(sp), ids)) == sp.decode(ids, skip_special_tokens=False)
    # Byte-fallback pieces for an unseen emoji.
    ids = sp.encode(" ").ids + [sp.token_to_id(f"<0x{b:02X}>") for b in "🦙 x".encode()] + sp.encode("world").ids
    pieces = _stream(StreamingDetokenizer(sp), ids)
    assert "".join(pieces) == sp.decode(ids, skip_special_tokens=False)
    assert all("\ufffd" not in p for p in pieces)


# ------------------------------------------------------------------------------------ stop strings


def _run_stops(stops, chunks):
    m = StopStringMatcher(stops)
    out = []
    for c in chunks:
        r = m.feed(c)
        out.append(r.text)
        if r.stopped:
            return "".join(out), r.stop
    out.append(m.flush())
    return "".join(out), None


def test_stop_matcher_across_pieces():
    m = StopStringMatcher(["</answer>", "STOP"])
    r = m.feed("The answer is 42</ans")
    assert r.text == "The answer is 42" and not r.stopped  # "</ans" held back
    r = m.feed("wer> trailing")
    assert r.stopped and r.text == "" and r.stop == "</answer>"
    assert m.feed("more").text == ""
    # A held prefix that does not complete is released.
    m = StopStringMatcher(["</answer>"])
    assert m.feed("a </an").text == "a "
    assert m.feed("d b").text == "</and b"
    assert m.flush() == ""
    m = StopStringMatcher(["abc"])
    assert m.feed("xaab").text == "xa"
    assert m.flush() == "ab"
    # Earliest stop wins.
    assert _run_stops(["world", "lo w"], ["hel", "lo wor", "ld"]) == ("hel", "lo w")
    assert _run_stops([], ["a", "b"]) == ("ab", None)
    with pytest.raises(InputError):
        StopStringMatcher([""])


def test_stop_matcher_random_splits():
    rng = random.Random(1)
    alphabet = "ab<>/ 漢😀"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        found = [(text.find(s), s) for s in stops if s in text]
        expected = text[: min(found)[0]] if found else text
        got, stop = _run_stops(stops, chunks)
        assert got == expected, (text, stops, chunks)
        assert (stop is not None) == bool(found)
