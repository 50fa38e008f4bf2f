"""Tokenizer for the runtime: `tokenizers` plus the bits of transformers' config handling we need.

A checkpoint (or a compiled artifact) ships `tokenizer.json` — the full `tokenizers`
serialization — and `tokenizer_config.json`, which names the special tokens, says whether a
BOS token is prepended, and sometimes declares extra added tokens. transformers combines the
two; we reproduce that combination without importing transformers, so that encoding and
decoding match it token for token.

`find_chat_template` looks for the chat template in the places transformers stores it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _BackendTokenizer

from vlmc.errors import SourceError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_JINJA_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"

# The named special tokens transformers knows (`SPECIAL_TOKENS_ATTRIBUTES`), in its order.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Texts longer than this (characters) are encoded through `encode_batch`, which releases the
# GIL while the Rust side works (`encode` holds it): a long prompt in one thread must not
# stop every other Python thread of a server for the seconds it takes.
_RELEASE_GIL_CHARS = 4096
# `exceeds` tokenizes a long text in pieces of about this many characters.
_PIECE_CHARS = 32768
# Unicode normalizers that never shrink a text by more than 3 characters to 1 (composition
# joins at most a base and two marks, or three Hangul jamo); any other may delete text.
_BOUNDED_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend"}

# Cleanup transformers applies on decode when `clean_up_tokenization_spaces` is set (WordPiece-era).
_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, a dict with `content`, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise SourceError(f"{TOKENIZER_CONFIG_FILE}: cannot understand special token {value!r}")


def _added_token(value: Any, *, special: bool) -> AddedToken:
    """Build a `tokenizers.AddedToken` from a config entry, keeping its strip/normalize flags."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    content = _token_content(value)
    assert content is not None
    return AddedToken(
        content,
        single_word=bool(value.get("single_word", False)),
        lstrip=bool(value.get("lstrip", False)),
        rstrip=bool(value.get("rstrip", False)),
        normalized=bool(value.get("normalized", not special)),
        special=bool(value.get("special", special)),
    )


class Tokenizer:
    """Encode/decode text with a checkpoint's tokenizer, matching transformers' fast tokenizer.

    `vocab_size` counts every id the tokenizer can produce (base vocabulary plus added tokens),
    i.e. transformers' `len(tokenizer)`, which is what a logits row must cover.
    """

    def __init__(
        self,
        backend: _BackendTokenizer,  # taken over (mutated: missing special tokens are added)
        *,
        special_tokens: dict[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._tok = backend
        self._max_token_chars: int | None = None
        self._shrink: int | None = 0  # 0: not yet known (see _normalizer_shrink)
        # The runtime never wants silent truncation or padding from the serialized tokenizer.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.special_tokens_map: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}

        # Named special tokens missing from tokenizer.json become special added tokens, as in transformers.
        missing = [t for t in self.special_tokens_map.values() if self._tok.token_to_id(t) is None]
        if missing:
            tokens = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            self._tok.add_special_tokens(tokens)

        # transformers (v5) ignores tokenizer_config's add_bos_token/add_eos_token when tokenizer.json
        # exists: its post-processor alone decides what `add_special_tokens=True` adds, and a
        # tokenizer.json without one adds nothing. We do the same and record what it adds.
        self._extra_eos = [int(i) for i in extra_eos_token_ids]
        self.config_add_bos_token = add_bos_token
        self.config_add_eos_token = add_eos_token
        prefix, suffix = self._post_processor_additions()
        self.add_bos_token = self.bos_token_id is not None and self.bos_token_id in prefix
        self.add_eos_token = self._named_id("eos_token") is not None and self._named_id("eos_token") in suffix
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces) and not self._is_bpe()
        self._refresh_special_ids()

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json` EOS ids) from a folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise SourceError(f"tokenizer folder {folder} does not exist")
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise SourceError(
                f"{tok_file} not found: vlmc needs a fast tokenizer file (tokenizer.json) next to the model"
            )
        try:
            backend = _BackendTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad files
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SourceError(f"cannot load {tok_file}: {detail}") from None

        config: dict[str, Any] = {}
        cfg_file = folder / TOKENIZER_CONFIG_FILE
        if cfg_file.is_file():
            loaded = _read_json(cfg_file)
            if not isinstance(loaded, dict):
                raise SourceError(f"{cfg_file} must hold a JSON object")
            config = loaded

        # Added tokens the config declares that tokenizer.json lacks (rare, but transformers adds them).
        decoder = config.get("added_tokens_decoder") or {}
        if isinstance(decoder, dict):
            entries = []
            for key, value in decoder.items():
                try:
                    idx = int(key)
                except ValueError:
                    continue
                content = _token_content(value)
                if content is not None and backend.token_to_id(content) is None:
                    entries.append((idx, value))
            for _, value in sorted(entries, key=lambda e: e[0]):
                special = bool(value.get("special", False)) if isinstance(value, dict) else False
                token = _added_token(value, special=special)
                if token.special:
                    backend.add_special_tokens([token])
                else:
                    backend.add_tokens([token])

        special: dict[str, str] = {}
        for name in NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(name))
            if content is not None:
                special[name] = content
        # v5 `extra_special_tokens` may be a dict of *named* tokens (image_token, ...), or a list.
        extras = config.get("extra_special_tokens")
        if extras is None:
            extras = config.get("additional_special_tokens")
        extra_list: list[Any] = []
        if isinstance(extras, dict):
            for name, value in extras.items():
                content = _token_content(value)
                if content is not None:
                    special[str(name)] = content
        elif isinstance(extras, list):
            extra_list = extras
        for value in extra_list:
            content = _token_content(value)
            if content is not None and backend.token_to_id(content) is None:
                backend.add_special_tokens([_added_token(value, special=True)])

        extra_eos: list[int] = []
        gen_file = folder / GENERATION_CONFIG_FILE
        if gen_file.is_file():
            gen = _read_json(gen_file)
            eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
            if isinstance(eos, int):
                extra_eos = [eos]
            elif isinstance(eos, list):
                extra_eos = [int(i) for i in eos if isinstance(i, int)]

        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True

        return cls(
            backend,
            special_tokens=special,
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            extra_eos_token_ids=extra_eos,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ----------------------------------------------------------------------------- internals

    def _is_bpe(self) -> bool:
        return type(self._tok.model).__name__ == "BPE"

    def _post_processor_additions(self) -> tuple[list[int], list[int]]:
        """The ids `add_special_tokens=True` puts before and after a text."""
        for probe in ("Hello", "a", " "):
            plain = self._tok.encode(probe, add_special_tokens=False).ids
            if not plain:
                continue
            full = self._tok.encode(probe, add_special_tokens=True).ids
            for start in range(len(full) - len(plain) + 1):
                if full[start : start + len(plain)] == plain:
                    return full[:start], full[start + len(plain) :]
        return self._tok.encode("", add_special_tokens=True).ids, []

    def _refresh_special_ids(self) -> None:
        ids = {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        for content in self.special_tokens_map.values():
            i = self._tok.token_to_id(content)
            if i is not None:
                ids.add(i)
        self._special_ids = frozenset(ids)

    # ----------------------------------------------------------------------------- public API

    @property
    def backend(self) -> _BackendTokenizer:
        """The wrapped `tokenizers.Tokenizer` (for the detokenizer and advanced uses)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. `<|im_start|>`) map to their ids.

        `add_special_tokens=True` adds what the post-processor adds (BOS/EOS per the config);
        chat prompts are rendered with their BOS already in the text, so the default is False.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if len(text) > _RELEASE_GIL_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for, at most: its vocabulary entry's
        length (a byte-level entry has one character per byte it covers, a SentencePiece or
        WordPiece entry at least one per character it covers, and added tokens are literal)."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    def _normalizer_shrink(self) -> int | None:
        """By how much the normalizer can shorten a text at most (1: it cannot), or None
        when it may delete text outright (then no length says a text is long)."""
        spec = json.loads(self._tok.to_str()).get("normalizer")
        if spec is None:
            return 1
        kinds = [n.get("type") for n in spec.get("normalizers", [])] if spec.get("type") == "Sequence" else [spec.get("type")]
        return 3 if set(kinds) <= _BOUNDED_NORMALIZERS else None

    def exceeds(self, text: str, limit: int) -> bool:
        """Whether ``text`` is certainly more than ``limit`` tokens, at a bounded cost: from
        its length alone when that suffices (over ``limit`` x the longest token x what the
        normalizer can shrink), else by tokenizing it in pieces and stopping once their
        tokens pass the limit, so a huge text costs about ``limit`` tokens of work and
        memory, never its whole length. False means "maybe not": short texts are not
        tokenized here at all (encoding them in full is cheap)."""
        if self._shrink == 0:
            self._shrink = self._normalizer_shrink()
        if self._shrink is not None and len(text) > limit * self.max_token_chars * self._shrink:
            return True
        if len(text) <= _PIECE_CHARS:
            return False
        count = pieces = 0
        start = 0
        while start < len(text):
            end = min(len(text), start + _PIECE_CHARS)
            if end < len(text):  # cut before whitespace, where pre-tokenizers split anyway
                cut = max(text.rfind(" ", start + _PIECE_CHARS // 2, end), text.rfind("\n", start + _PIECE_CHARS // 2, end))
                end = cut if cut > start else end
            count += len(self._tok.encode_batch([text[start:end]], add_special_tokens=False)[0].ids)
            pieces += 1
            if count > limit + 8 * pieces:  # (a cut may split what would be one token: a margin per cut)
                return True
            start = end
        return False

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUP_REPLACEMENTS:
                text = text.replace(old, new)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids (base vocabulary + added tokens); at least max id + 1."""
        n = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        if added:
            n = max(n, max(added) + 1)
        return n

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def _named_id(self, name: str) -> int | None:
        content = self.special_tokens_map.get(name)
        return None if content is None else self._tok.token_to_id(content)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens_map.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer config's EOS id, else the first of generation_config.json's."""
        i = self._named_id("eos_token")
        if i is None and self._extra_eos:
            return self._extra_eos[0]
        return i

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the tokenizer's EOS plus generation_config.json's `eos_token_id`s."""
        ids: list[int] = []
        first = self._named_id("eos_token")
        for i in ([first] if first is not None else []) + self._extra_eos:
            if i not in ids:
                ids.append(i)
        return ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special tokens (special added tokens and the named special tokens)."""
        return self._special_ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"


# --------------------------------------------------------------------------------- chat template


def _template_from_value(value: Any, source: Path) -> str | None:
    """A `chat_template` config value: a string, or a list of {name, template} (use "default")."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # {name: template}, as transformers keeps multiple templates
        chosen = value.get("default")
        if isinstance(chosen, str):
            return chosen
        raise SourceError(f"{source}: chat_template has no 'default' entry (found {sorted(value)})")
    if isinstance(value, list):
        named = {}
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str):
                named[item["name"]] = item["template"]
            else:
                raise SourceError(f"{source}: chat_template list entries must be {{name, template}} objects")
        if "default" in named:
            return named["default"]
        raise SourceError(f"{source}: chat_template list has no 'default' template (found {sorted(named)})")
    raise SourceError(f"{source}: chat_template must be a string or a list of named templates")


def find_chat_template(directory: str | os.PathLike[str]) -> str | None:
    """The chat template stored with a checkpoint, or None if it has none.

    Looks, in order, at `chat_template.jinja`, `chat_template.json` (`{"chat_template": ...}`),
    then the `chat_template` key of `processor_config.json` and `tokenizer_config.json`.
    """
    folder = Path(directory)
    jinja_file = folder / CHAT_TEMPLATE_JINJA_FILE
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"cannot read {jinja_file}: {e}") from None
    for name in (CHAT_TEMPLATE_JSON_FILE, PROCESSOR_CONFIG_FILE, TOKENIZER_CONFIG_FILE):
        path = folder / name
        if not path.is_file():
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise SourceError(f"{path} must hold a JSON object")
        template = _template_from_value(data.get("chat_template"), path)
        if template is not None:
            return template
    return None
