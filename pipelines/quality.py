"""Decoding and the per-document quality filters of the curate stage (pure functions).

Thresholds come from params.yaml (`curate:`). The code rules follow BigCode's filters for The
Stack / StarCoder (longest line, mean line length, alphanumeric fraction, auto-generated markers,
encoded data); documents that are not source code (.txt, .md, rows of a jsonl/parquet/csv
source) get Gopher-style prose rules instead (word count, mean word length, symbol-to-word
ratio, words with a letter). Each filter returns the reason to drop a document, or None.
"""

import ast
import codecs
import gc
import re
import warnings
from collections.abc import Callable

from pipelines.params import CurateParams

UTF8_BOM = b"\xef\xbb\xbf"
# PEP 263, searched on each of the first two lines.
CODING_RE = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
_ASCII_NON_ALNUM = bytes(b for b in range(128) if not chr(b).isalnum())
_NON_ALNUM_RE = re.compile(r"[\W_]+")  # \w is str.isalnum() plus "_", so this is exactly "not alnum"

# StarCoder's encoded-data patterns: base64 runs, hex byte lists, \u escapes.
ENCODED_DATA_RES = (
    re.compile(r"[a-zA-Z0-9+/\n=]{64,}"),
    re.compile(r"(?:\b(?:0x|\\x)?[0-9a-fA-F]{2}(?:,\s*|\b\s*)){8,}"),  # ", " separators too
)
UNICODE_ESCAPES_RE = re.compile(r"(?:\\u[0-9a-fA-F]{4}){8,}")
# Source code by extension; anything else is judged as prose.
CODE_SUFFIXES = frozenset(
    ".py .pyi .pyw .c .h .cc .cpp .hpp .java .js .ts .go .rs .rb .sh .pl .lua .sql .r .m .swift .kt .scala".split()
)
_WORD_RE = re.compile(r"\S+")
_ALPHA_RE = re.compile(r"[^\W\d_]")


# ---------------------------------------------------------------------------------------------
# Decoding and text statistics


def decode_document(content: bytes) -> tuple[str | None, str | None]:
    """Raw bytes -> (text with "\\n" newlines, None), or (None, "undecodable"). Never raises.

    UTF-8 first (a BOM is dropped); failing that, the PEP 263 coding declaration of the first two
    lines, if it names a text codec Python has. Text holding NUL characters is binary, not text.
    """
    try:
        text = content.decode("utf-8-sig" if content.startswith(UTF8_BOM) else "utf-8")
    except UnicodeDecodeError:
        text = _decode_declared(content)
    if text is None or "\x00" in text:
        return None, "undecodable"
    return normalise_newlines(text), None


def _decode_declared(content: bytes) -> str | None:
    for line in content.split(b"\n", 2)[:2]:
        match = CODING_RE.match(line.decode("latin-1"))
        if match:
            try:
                codecs.lookup(match.group(1))
                return content.decode(match.group(1))
            except (LookupError, ValueError, TypeError):  # unknown codec, bytes-only codec, bad bytes
                return None
    return None


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def longest_line(text: str) -> int:
    return max(map(len, text.split("\n")))


def mean_line_length(text: str) -> float:
    return len(text) / (text.count("\n") + 1)


def alnum_fraction(text: str) -> float:
    """Share of characters that are letters or digits (str.isalnum); 0.0 for empty text."""
    if not text:
        return 0.0
    if text.isascii():  # bytes.translate runs in C: ~30x faster than a Python-level count
        num_alnum = len(text.encode("ascii").translate(None, _ASCII_NON_ALNUM))
    else:
        num_alnum = len(_NON_ALNUM_RE.sub("", text))
    return num_alnum / len(text)


def encoded_fraction(text: str) -> tuple[float, int]:
    """(share of characters inside encoded-data matches, longest match)."""
    patterns = ENCODED_DATA_RES + ((UNICODE_ESCAPES_RE,) if "\\u" in text else ())  # most texts have none
    spans = [m.end() - m.start() for pattern in patterns for m in pattern.finditer(text)]
    return (min(sum(spans) / len(text), 1.0) if text else 0.0), max(spans, default=0)


def is_code(path: str) -> bool:
    suffix = path.rsplit("#", 1)[0].rsplit("/", 1)[-1]
    return "." in suffix and "." + suffix.rsplit(".", 1)[1].lower() in CODE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Filters for every document


def too_short(path: str, text: str, rules: CurateParams) -> str | None:
    return "too_short" if len(text) < rules.min_chars else None


def too_long(path: str, text: str, rules: CurateParams) -> str | None:
    return "too_long" if len(text) > rules.max_chars else None


def long_line(path: str, text: str, rules: CurateParams) -> str | None:
    return "long_line" if longest_line(text) > rules.max_line_length else None


def long_mean_line(path: str, text: str, rules: CurateParams) -> str | None:
    return "long_mean_line" if mean_line_length(text) > rules.max_mean_line_length else None


def low_alnum(path: str, text: str, rules: CurateParams) -> str | None:
    return "low_alnum" if alnum_fraction(text) < rules.min_alnum_fraction else None


def autogenerated(path: str, text: str, rules: CurateParams) -> str | None:
    head = text[: rules.autogen_scan_chars].lower()
    return "autogenerated" if any(marker.lower() in head for marker in rules.autogen_markers) else None


def encoded_data(path: str, text: str, rules: CurateParams) -> str | None:
    fraction, longest = encoded_fraction(text)
    too_much = fraction > rules.max_encoded_fraction or longest > rules.max_encoded_run
    return "encoded_data" if too_much else None


# ---------------------------------------------------------------------------------------------
# Filters for source code


def invalid_python(path: str, text: str, rules: CurateParams) -> str | None:
    if not (rules.require_valid_python and path.endswith(".py")):
        return None
    # The parse allocates a node object per token; with the collector on, those allocations set
    # off full collections that walk every live object (~30% of curate time on the stdlib). The
    # tree holds no cycles, so reference counting frees it all without the collector.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings():  # invalid escape sequences etc. are not our business here
            warnings.simplefilter("ignore")
            compile(text, path, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "invalid_python"
    finally:
        if gc_was_enabled:
            gc.enable()
    return None


# ---------------------------------------------------------------------------------------------
# Gopher-style filters for prose (documents that are not source code)


def prose_too_few_words(path: str, text: str, rules: CurateParams) -> str | None:
    if is_code(path):
        return None
    return "prose_too_few_words" if len(_WORD_RE.findall(text)) < rules.prose_min_words else None


def prose_word_length(path: str, text: str, rules: CurateParams) -> str | None:
    if is_code(path):
        return None
    words = _WORD_RE.findall(text)
    mean = sum(map(len, words)) / len(words) if words else 0.0
    low, high = rules.prose_mean_word_length
    return None if low <= mean <= high else "prose_word_length"


def prose_symbols(path: str, text: str, rules: CurateParams) -> str | None:
    if is_code(path):
        return None
    words = max(len(_WORD_RE.findall(text)), 1)
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return "prose_symbols" if symbols / words > rules.prose_max_symbol_ratio else None


def prose_few_alpha_words(path: str, text: str, rules: CurateParams) -> str | None:
    if is_code(path):
        return None
    words = _WORD_RE.findall(text)
    with_letter = sum(1 for w in words if _ALPHA_RE.search(w))
    share = with_letter / len(words) if words else 0.0
    return "prose_few_alpha_words" if share < rules.prose_min_alpha_words else None


Filter = Callable[[str, str, CurateParams], str | None]
# Cheap checks first; the parse, by far the costliest, last.
FILTERS: tuple[Filter, ...] = (
    too_short,
    too_long,
    long_line,
    long_mean_line,
    low_alnum,
    autogenerated,
    encoded_data,
    prose_too_few_words,
    prose_word_length,
    prose_symbols,
    prose_few_alpha_words,
    invalid_python,
)
FILTER_REASONS = tuple(f.__name__ for f in FILTERS)


def failing_filters(path: str, text: str, rules: CurateParams) -> list[str]:
    """Every filter's reason that applies (the quarantine lists them all, not just the first)."""
    reasons = []
    for check in FILTERS:
        reason = check(path, text, rules)
        if reason:
            reasons.append(reason)
    return reasons


def explain_reason(reason: str, path: str, text: str | None, rules: CurateParams) -> str:
    """The figure behind one drop reason, next to the rule it broke (for `curate --explain`)."""
    if text is None or reason == "undecodable":
        return "not UTF-8, no usable PEP 263 coding declaration, or NUL bytes (binary data)"
    if reason == "invalid_python":
        try:
            compile(text, path, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            where = f"line {exc.lineno}: " if getattr(exc, "lineno", None) else ""
            return f"does not parse as Python ({where}{getattr(exc, 'msg', exc)})"
        return "does not parse as Python"
    words = _WORD_RE.findall(text)
    figures = {
        "too_short": lambda: f"{len(text)} characters < curate.min_chars {rules.min_chars}",
        "too_long": lambda: f"{len(text)} characters > curate.max_chars {rules.max_chars}",
        "long_line": lambda: (
            f"longest line {longest_line(text)} > curate.max_line_length {rules.max_line_length}"
        ),
        "long_mean_line": lambda: (
            f"mean line {mean_line_length(text):.1f} > curate.max_mean_line_length {rules.max_mean_line_length}"
        ),
        "low_alnum": lambda: (
            f"alphanumeric fraction {alnum_fraction(text):.3f} < curate.min_alnum_fraction {rules.min_alnum_fraction}"
        ),
        "autogenerated": lambda: (
            "marker "
            + repr(
                next(
                    m for m in rules.autogen_markers if m.lower() in text[: rules.autogen_scan_chars].lower()
                )
            )
            + f" in the first {rules.autogen_scan_chars} characters"
        ),
        "encoded_data": lambda: (
            "encoded data is {:.0%} of the text, longest run {} (limits {:.0%}, {})".format(
                *encoded_fraction(text), rules.max_encoded_fraction, rules.max_encoded_run
            )
        ),
        "prose_too_few_words": lambda: f"{len(words)} words < curate.prose_min_words {rules.prose_min_words}",
        "prose_word_length": lambda: (
            f"mean word length {sum(map(len, words)) / max(len(words), 1):.1f} outside {rules.prose_mean_word_length}"
        ),
        "prose_symbols": lambda: f"too many '#' and '...' per word (> {rules.prose_max_symbol_ratio})",
        "prose_few_alpha_words": lambda: (
            f"fewer than {rules.prose_min_alpha_words:.0%} of words hold a letter"
        ),
    }
    try:
        return figures[reason]()
    except (KeyError, StopIteration):  # a reason from an older rule set, or a marker since removed
        return f"dropped by the {reason} rule"
