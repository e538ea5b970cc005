"""Sentence splitting for `--split-sentences` (NLTK punkt), checked before anything is written.

Why a check up front: Megatron's tool downloads punkt at run time and, without network or with
`--partitions 1`, could end without writing outputs (user-needs row 28). Here a missing model is a
clear error, with the command that installs it, before any output file is created.
"""

from __future__ import annotations

from typing import Any, List, Protocol

INSTALL_HINT = "python -c \"import nltk; nltk.download('punkt_tab')\""
MAX_SPLIT_CHARS = 1_000_000  # texts are split in pieces of this many characters, as Megatron does


class SentenceSplitterUnavailable(RuntimeError):
    """`--split-sentences` was asked for but NLTK or its punkt model is missing."""


class SentenceSplitter(Protocol):
    def tokenize(self, text: str) -> List[str]: ...


def _keep_newlines_vars(base: Any) -> Any:
    """Punkt language variables whose sentence-end context swallows the whitespace that follows
    the end mark, so each sentence keeps its trailing spaces and newlines (`--keep-newlines`):
    the sentences then concatenate back to the original text, line breaks included."""

    class KeepWhitespaceVars(base):  # type: ignore[misc, valid-type]
        _period_context_fmt = (
            r"\S*"  # the word that carries the end mark
            r"%(SentEndChars)s"  # ., ? or !
            r"\s*"  # trailing whitespace belongs to this sentence
            r"(?=(?P<after_tok>%(NonWord)s|(?P<next_tok>\S+)))"  # then punctuation or the next word
        )

    return KeepWhitespaceVars


def load_sentence_splitter(lang: str = "english", keep_newlines: bool = False) -> SentenceSplitter:
    """NLTK's pretrained punkt model for `lang` (the `punkt_tab` data of NLTK >= 3.9, or the older
    `punkt` pickle on older NLTK). Raises SentenceSplitterUnavailable with install instructions."""
    try:
        import nltk
        from nltk.tokenize import punkt
    except ImportError as exc:
        raise SentenceSplitterUnavailable(
            f"--split-sentences needs NLTK: pip install nltk, then {INSTALL_HINT}"
        ) from exc
    splitter: Any
    if hasattr(punkt, "PunktTokenizer"):  # NLTK >= 3.8.2 reads the safe punkt_tab format
        try:
            nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
        except (LookupError, ValueError) as exc:
            raise SentenceSplitterUnavailable(
                f"--split-sentences needs NLTK's punkt sentence model for {lang!r}, which is not installed "
                f"(searched {', '.join(nltk.data.path)}). Install it with:\n    {INSTALL_HINT}\n"
                "or set NLTK_DATA to a folder that holds tokenizers/punkt_tab."
            ) from exc
        splitter = punkt.PunktTokenizer(lang)
    else:  # old NLTK: pickled model
        try:
            splitter = nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
        except LookupError as exc:
            raise SentenceSplitterUnavailable(
                f"--split-sentences needs NLTK's punkt model for {lang!r}. Install it with:\n"
                "    python -c \"import nltk; nltk.download('punkt')\""
            ) from exc
    if keep_newlines:
        splitter = punkt.PunktSentenceTokenizer(
            train_text=splitter._params, lang_vars=_keep_newlines_vars(punkt.PunktLanguageVars)()
        )
    return splitter


def split_text(splitter: SentenceSplitter, text: str) -> List[str]:
    """Sentences of `text`; very long texts are split piecewise (punkt is superlinear on huge
    inputs, and Megatron splits in 1,000,000-character pieces, which we follow for equal output)."""
    if len(text) <= MAX_SPLIT_CHARS:
        return splitter.tokenize(text)
    sentences: List[str] = []
    for start in range(0, len(text), MAX_SPLIT_CHARS):
        sentences.extend(splitter.tokenize(text[start : start + MAX_SPLIT_CHARS]))
    return sentences
