"""Tokenizers loaded from a local Hugging Face tokenizer directory (`--tokenizer-model DIR`).

Ids match Megatron's `_HuggingFaceTokenizer`: `AutoTokenizer.from_pretrained(dir)(text).input_ids`,
so special tokens are added exactly as the tokenizer's own post-processor adds them.

Start-up: `transformers` imports torch (seconds), which the preprocessing tool does not need. A
directory whose tokenizer_config.json names a generic fast tokenizer class (no class-specific
encoding behaviour) and nothing beyond special-token names and decoding options is loaded
straight from tokenizer.json with the `tokenizers` library; `AutoTokenizer` would wrap the same
Rust tokenizer and encode through it, so the ids are the same. Anything else goes through
`transformers`, which is also loaded (lazily) for decoding and for the `tokenizer` property.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .base import MegatronTokenizer
from ._files import TokenizerFileError, require_dir
from .long_text import iter_piece_ids, probe_cut_mode, special_wrapping
from .word_cache import WordCacheEncoder, supports_word_cache

_FLAG = "--tokenizer-model"


def _load_auto_tokenizer(path: str, **kwargs: Any) -> Any:
    """Load `path` with AutoTokenizer, offline, turning loader failures into a clear ValueError."""
    require_dir(path, _FLAG, "Hugging Face tokenizer directory")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a requirement
        raise ImportError(
            "The HuggingFace tokenizers need the `transformers` package: pip install transformers"
        ) from e
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        files = sorted(os.listdir(path))
        raise ValueError(
            f"{_FLAG} {path!r}: could not load a Hugging Face tokenizer from this directory "
            f"(files: {files[:20]}); it needs tokenizer.json or the slow tokenizer's files "
            f"plus tokenizer_config.json. Loader said: {e}"
        ) from e


def _batch_backend(tok: Any) -> Any:
    """A private copy of the Rust tokenizer set up as `tok(text)` sets it, or None.

    None when `tok` is not a plain fast tokenizer (a subclass that overrides how text is encoded,
    or a pure-Python tokenizer); tokenize_batch then falls back to one call per text.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not getattr(tok, "is_fast", False):
        return None
    from transformers import PreTrainedTokenizerFast

    for name in ("__call__", "_encode_plus", "_batch_encode_plus", "_call_one", "encode_plus"):
        if getattr(type(tok), name, None) is not getattr(PreTrainedTokenizerFast, name, None):
            return None
    backend = copy.deepcopy(backend)
    # `tok(text)` with default arguments neither truncates nor pads.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))
    return backend


# tokenizer_config.json classes that add no encoding behaviour of their own to tokenizer.json
GENERIC_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# tokenizer_config.json keys that do not change the ids `tok(text)` gives
_ENCODING_NEUTRAL_KEYS = {
    "tokenizer_class", "backend", "bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
    "mask_token", "added_tokens_decoder", "model_max_length", "clean_up_tokenization_spaces", "model_input_names",
    "padding_side", "truncation_side", "name_or_path", "tokenizer_file", "auto_map", "chat_template",
    "extra_special_tokens", "additional_special_tokens", "split_special_tokens",
}
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _token_content(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_plain_fast_tokenizer(path: str) -> Optional[tuple[Any, Dict[str, Optional[int]]]]:
    """(Rust tokenizer set up as `AutoTokenizer(path)(text)` encodes, special-token ids) when the
    directory can be loaded without transformers (see the module docstring), else None."""
    json_file, config_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
    if not (os.path.isfile(json_file) and os.path.isfile(config_file)):
        return None
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in GENERIC_FAST_CLASSES:
        return None
    if set(config) - _ENCODING_NEUTRAL_KEYS:
        return None
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(json_file)
    except Exception:  # let transformers report the problem in its own words
        return None
    # Tokens that tokenizer_config.json declares must already be in tokenizer.json with the same id;
    # otherwise transformers would add them, which changes the ids.
    for token_id, token in (config.get("added_tokens_decoder") or {}).items():
        if backend.id_to_token(int(token_id)) != _token_content(token):
            return None
    extra = config.get("additional_special_tokens") or []
    extra += list((config.get("extra_special_tokens") or {}).values()) if isinstance(config.get("extra_special_tokens"), dict) else []
    ids: Dict[str, Optional[int]] = {}
    for name in _SPECIAL_NAMES:
        content = _token_content(config.get(name))
        ids[name] = backend.token_to_id(content) if content is not None else None
        if content is not None and ids[name] is None:
            return None
    if any(_token_content(t) is None or backend.token_to_id(_token_content(t)) is None for t in extra):
        return None
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return backend, ids


class HuggingFaceTokenizer(MegatronTokenizer):
    """Megatron's `HuggingFaceTokenizer`: any tokenizer AutoTokenizer can load from a local directory."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        self.path = os.fspath(path) if path is not None else None
        self._kwargs = kwargs
        self._tokenizer: Any = None
        plain = None if kwargs else load_plain_fast_tokenizer(require_dir(self.path, _FLAG, "Hugging Face tokenizer directory"))
        if plain is not None:
            self._backend, self._special_ids = plain
            self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        else:
            self._tokenizer = _load_auto_tokenizer(self.path, **kwargs)
            self._backend = _batch_backend(self._tokenizer)
            self._special_ids = None
            self._vocab_size = len(self._tokenizer)
        self._words: Optional[WordCacheEncoder] = None
        if self._backend is not None and supports_word_cache(self._backend):
            added = [t.content for t in self._backend.get_added_tokens_decoder().values()]
            self._words = WordCacheEncoder(self._encode_plain, added)
            self._wrapping = special_wrapping(lambda t: self._backend.encode(t, add_special_tokens=True).ids,
                                              lambda t: self._encode_plain([t])[0])
        # the word cache runs under the GIL: --workers then means worker processes
        self.parallel_batch = self._words is None

    @property
    def tokenizer(self) -> Any:
        """The underlying transformers tokenizer (loaded on first use when not needed to encode)."""
        if self._tokenizer is None:
            self._tokenizer = _load_auto_tokenizer(self.path, **self._kwargs)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict:
        if self._special_ids is not None:
            return self._backend.get_vocab(with_added_tokens=True)
        return self._tokenizer.get_vocab()

    def _special(self, name: str) -> Optional[int]:
        if self._special_ids is not None:
            return self._special_ids[name]
        return getattr(self._tokenizer, name + "_id")

    @property
    def eod(self) -> int:
        eos = self._special("eos_token")
        if eos is None:
            raise ValueError(
                f"the tokenizer in {_FLAG} {self.path!r} defines no eos_token, which Megatron uses as "
                "the end-of-document id (--append-eod, attention/loss masks); set eos_token in its "
                "tokenizer_config.json"
            )
        return int(eos)

    @property
    def bos(self) -> Optional[int]:
        return self._special("bos_token")

    @property
    def pad(self) -> Optional[int]:
        return self._special("pad_token")

    def tokenize(self, text: str) -> List[int]:
        if self._special_ids is not None:
            if not isinstance(text, str):
                raise ValueError(f"tokenize expects a string, got {type(text).__name__}")
            return self._backend.encode(text, add_special_tokens=True).ids
        return list(self._tokenizer(text).input_ids)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """One call into the Rust tokenizer for the whole list (it parallelises over texts)."""
        texts = list(texts)
        if not texts:
            return []
        if self._backend is None:
            return [self.tokenize(t) for t in texts]
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"tokenize_batch expects strings, got {type(t).__name__}")
        if self._words is not None:  # see word_cache.py
            before, after = self._wrapping
            return [before + ids + after for ids in self._words.encode(texts)]
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets; same ids.
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        encodings = encode(texts, add_special_tokens=True)
        return [e.ids for e in encodings]

    def _encode_plain(self, texts: Sequence[str]) -> List[List[int]]:
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def tokenize_pieces(self, text: str, piece_chars: int) -> Optional[Iterator[List[int]]]:
        """For Rust tokenizers with a pre-tokenizer (text without one is a single pre-token that no
        cut may split): plain ids piece by piece inside the post-processor's special tokens."""
        if self._backend is None or self._backend.pre_tokenizer is None:
            return None
        if not hasattr(self, "_cut_mode"):
            self._cut_mode = probe_cut_mode(self._encode_plain) or ""
        if not hasattr(self, "_wrapping"):
            self._wrapping = special_wrapping(lambda t: self._backend.encode(t, add_special_tokens=True).ids,
                                              lambda t: self._encode_plain([t])[0])
        if not self._cut_mode:
            return None
        before, after = self._wrapping
        return itertools.chain([before], iter_piece_ids(text, self._cut_mode, self._encode_plain, piece_chars), [after])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


class DeepSeekV2Tokenizer(HuggingFaceTokenizer):
    """DeepSeek-V2/V3 tokenizer directory plus `--extra-vocab-size` unused ids reserved in the model.

    DeepSeek checkpoints have more embedding rows than tokenizer entries; the extra ids make the
    tokenizer's vocab size reach the model's.
    """

    def __init__(self, path: str | os.PathLike, extra_vocab_size: int = 0, **kwargs: Any) -> None:
        if isinstance(extra_vocab_size, bool) or not isinstance(extra_vocab_size, int) or extra_vocab_size < 0:
            raise ValueError(f"--extra-vocab-size must be an integer >= 0, got {extra_vocab_size!r}")
        super().__init__(path, **kwargs)
        self.extra_vocab_size = extra_vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size + self.extra_vocab_size


__all__ = ["HuggingFaceTokenizer", "DeepSeekV2Tokenizer", "TokenizerFileError"]
