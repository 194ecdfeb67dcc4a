"""Answer normalisation and verifiable answer checking.

:func:`answers_match` is the accuracy check used by the rewards and the evaluation. Every rule is strict
on purpose: a lenient matcher turns into a reward that can be gamed, so there is no substring or
containment matching anywhere. Rules by ``kind``:

- ``"number"``: both sides parse with :func:`normalize_number`; whole numbers must be equal exactly
  (``"18"`` matches ``"18.0"`` and ``"$18"``, never ``"180"``; ``"1000001"`` is not ``"1000000"``), other
  values agree within a relative tolerance of 1e-6 (absolute 1e-9 around zero), which absorbs rounding
  such as ``"0.333333"`` against ``"1/3"``.
- ``"math"``: :func:`normalize_math` strings are equal, or both parse as numbers and agree as above, or
  both are top-level comma lists whose elements match in some order (``"1,-1"`` vs ``"-1, 1"``).
- ``"yes_no"``: only a leading yes/no token counts (``"YES, because..."`` is yes; ``"no, yes"`` is no).
- ``"choice"``: option letters, 0-based indices, LogiQA's ``index, "text"`` and option texts are resolved
  to an option index (see :func:`answers_match`).
- ``"text"``: SQuAD-style :func:`normalize_text` strings are equal.
- ``"auto"``: the rule is inferred from each gold answer (:func:`infer_kind`).

A gold answer that is empty or cannot be parsed under its kind never matches anything.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from fractions import Fraction
from typing import Sequence

from cepo.answers.parsing import last_boxed

KINDS = ("auto", "number", "math", "yes_no", "choice", "text")
REL_TOL = 1e-6
ABS_TOL = 1e-9

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,4})?"
_PLAIN_NUMBER = re.compile(rf"[-+]?{_NUM}")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRACTION = re.compile(rf"([-+]?)\s*({_NUM})\s*/\s*({_NUM})")
_LATEX_FRAC = re.compile(r"([-+]?)\s*\\frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
_LEADING_PHRASE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)?\s*", re.IGNORECASE)
_LEADING_VARIABLE = re.compile(r"^[A-Za-z]\s*=(?!=)\s*")
_TRAILING_TEXT_UNIT = re.compile(r"^(.*\d.*?)\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}\s*$", re.DOTALL)
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[!,;:]|\\q?quad\b|\\ ")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])|\\[bB]igg?[lr]?(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\u00b0")
_WORD = re.compile(r"[A-Za-z][A-Za-z'.\-]*")
_YES_NO = re.compile(r"^[\W_]*(yes|no)\b", re.IGNORECASE)

# Words after a number that mean it is not a single number ("3 or 4", "2 pi", "5 x") or that it is not
# asserted ("5 is wrong"). At most _MAX_UNIT_WORDS words may follow a number.
_NOT_A_UNIT = frozenset(
    "or and to plus minus times over divided by x y z i e pi sqrt root squared cubed "
    "is are was were be not no never wrong incorrect false".split()
)
_MAX_UNIT_WORDS = 3
_SCALE_WORDS = {"hundred": 10**2, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")

_LETTER_FULL = re.compile(
    r"^(?:(?:the\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*)?[(\[]?([A-Za-z])[)\]]?[.:]?$",
    re.IGNORECASE,
)
_LETTER_PREFIX = re.compile(
    r"^(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])[.):]|(?:option|choice)\s*[(\[]?([A-Za-z])[)\]]?(?![A-Za-z]))"
    r"(?:\s|$)",
    re.IGNORECASE,
)
_INDEX_TEXT = re.compile(r"""^\s*(\d+)\s*,\s*(".*"|'.*')\s*$""", re.DOTALL)
_BARE_INDEX = re.compile(r"^\s*(\d+)\s*$")


def _unwrap_boxed(s: str) -> str:
    content = last_boxed(s)
    return s if content is None else content


def _strip_markdown(s: str) -> str:
    return s.strip().strip("*`").strip()


def _parse_plain(s: str) -> Fraction | None:
    s = s.strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        return Fraction(s)
    return None


def _parse_number_core(s: str) -> Fraction | None:
    value = _parse_plain(s)
    if value is not None:
        return value
    match = _FRACTION.fullmatch(s) or _LATEX_FRAC.fullmatch(s)
    if match is None:
        return None
    sign, num, den = match.groups()
    numerator, denominator = _parse_plain(num), _parse_plain(den)
    if numerator is None or denominator is None or denominator == 0:
        return None
    value = numerator / denominator
    return -value if sign == "-" else value


def _exact_number(s: str) -> Fraction | None:
    """The exact value behind :func:`normalize_number` (a Fraction, so large integers stay exact)."""
    if not isinstance(s, str):
        if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s):
            return Fraction(s)
        return None
    s = _unwrap_boxed(_strip_markdown(s))
    s = s.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\%", "").replace("%", "")
    s = _SPACING.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    unit = _TRAILING_TEXT_UNIT.match(s)
    if unit is not None:
        s = unit.group(1)
    s = _LEADING_PHRASE.sub("", s.strip())
    s = _LEADING_VARIABLE.sub("", s).strip().rstrip(".").strip()
    if not s:
        return None
    # Peel trailing unit words off the end ("18 dollars", "7 apples each").
    tokens = s.split()
    words: list[str] = []
    while len(tokens) > 1 and _WORD.fullmatch(tokens[-1]):
        words.append(tokens.pop().lower().strip("."))
    words.reverse()
    if len(words) > _MAX_UNIT_WORDS or any(word in _NOT_A_UNIT for word in words):
        return None
    value = _parse_number_core(" ".join(tokens))
    if value is None:
        return None
    if words and words[0] in _SCALE_WORDS:
        value *= _SCALE_WORDS[words[0]]
    return value


def normalize_number(s: str) -> float | None:
    """The single number written in ``s``, or ``None`` when ``s`` is not exactly one number.

    Accepts thousands separators (``"1,234"``), currency (``"$18"``, ``"\\$18"``), a percent sign (the
    value is kept: ``"50%"`` is 50), degrees, trailing unit words (``"18 dollars"``; scale words
    multiply: ``"5 million"``), negative numbers (also with a Unicode minus), decimals, scientific
    notation, simple fractions (``"3/4"``), LaTeX fractions (``"\\frac{3}{4}"``, ``"\\dfrac34"``,
    ``"-\\frac12"``), a surrounding ``\\boxed{}`` or ``$...$``, and a leading ``"x ="`` or
    ``"The answer is"``. Returns ``None`` for ``"3 or 4"``, ``"x+1"``, ``"2\\pi"``, ``"3x"``.
    """
    value = _exact_number(s)
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for i, char in enumerate(s):
            depth += char == "{"
            depth -= char == "}"
            if depth == 0 and i < len(s) - 1:
                return s  # "{a}+{b}": the outer braces are not one group
        s = s[1:-1]
    return s


def normalize_math(s: str) -> str:
    """A canonical string for a MATH-style LaTeX answer.

    Unwraps ``\\boxed{}``/``\\fbox{}``; drops ``$``, ``\\(``/``\\)``, ``\\left``/``\\right``, LaTeX
    spacing (``\\!``, ``\\,``), degrees, percent signs, a trailing ``\\text{...}`` unit after a number
    and all whitespace; unwraps the remaining ``\\text{X}``; rewrites ``\\dfrac``/``\\tfrac`` as
    ``\\frac``, ``\\frac12`` as ``\\frac{1}{2}``, ``\\sqrt3`` as ``\\sqrt{3}``, ``\\leq`` as ``\\le``;
    removes thousands separators of a plain number, a trailing ``.`` and a leading ``x =``.
    Case is kept (variables are case-sensitive).
    """
    if not isinstance(s, str):
        return ""
    s = _unwrap_boxed(_strip_markdown(s))
    s = s.replace("\\$", "").replace("$", "").replace("\u2212", "-")
    for token in ("\\(", "\\)", "\\[", "\\]", "\\displaystyle"):
        s = s.replace(token, "")
    s = _SPACING.sub("", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    unit = _TRAILING_TEXT_UNIT.match(s)
    if unit is not None:
        s = unit.group(1)
    s = _TEXT_COMMAND.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)", r"\\frac{\1}", s)
    s = re.sub(r"(\\frac\{[^{}]*\})\s*(\d)", r"\1{\2}", s)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)
    for long, short in (("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\neq", "\\ne")):
        s = re.sub(re.escape(long) + r"(?![A-Za-z])", lambda _m, short=short: short, s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    stripped = _LEADING_VARIABLE.sub("", s)
    if stripped:
        s = stripped
    s = _strip_outer_braces(s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def normalize_text(s: str) -> str:
    """SQuAD-style normalisation: lower-case, drop punctuation and the articles a/an/the, squeeze spaces.

    Unlike SQuAD, punctuation that changes a number is kept: a minus sign before a digit and a ``.`` or
    ``/`` between digits, so ``"-1"``, ``"1.5"`` and ``"3/4"`` stay distinct from ``"1"``, ``"15"``, ``"34"``.
    """
    if not isinstance(s, str):
        return ""
    s = unicodedata.normalize("NFKC", s).lower().replace("\u2212", "-")
    kept = []
    last = len(s) - 1
    for i, ch in enumerate(s):
        if ch.isspace():
            kept.append(" ")
        elif ch not in _PUNCTUATION and not unicodedata.category(ch).startswith("P"):
            kept.append(ch)
        elif i < last and s[i + 1].isdigit() and (
            (ch == "-" and (i == 0 or not s[i - 1].isalnum())) or (ch in "./" and i > 0 and s[i - 1].isdigit())
        ):
            kept.append(ch)
    s = _ARTICLES.sub(" ", "".join(kept))
    return " ".join(s.split())


def normalize_yes_no(s: str) -> str | None:
    """``"yes"`` or ``"no"`` when ``s`` starts with that word (after punctuation/markup), else ``None``."""
    if not isinstance(s, str):
        return None
    match = _YES_NO.match(s)
    return match.group(1).lower() if match else None


def _looks_like_latex(s: str) -> bool:
    return any(token in s for token in ("\\", "^", "{", "$", "_"))


def infer_kind(gold: str) -> str:
    """The matching rule ``"auto"`` uses for one gold answer."""
    if normalize_number(gold) is not None:
        return "number"
    if normalize_text(gold) in ("yes", "no"):
        return "yes_no"
    if _looks_like_latex(gold):
        return "math"
    return "text"


def _numbers_close(a: Fraction, b: Fraction) -> bool:
    # Whole numbers compare exactly (1000001 is not 1000000); the tolerance absorbs rounding of decimals.
    if a.denominator == 1 and b.denominator == 1:
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL)
    except OverflowError:
        return a == b


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(s):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _math_equal(pred: str, gold: str, allow_lists: bool = True) -> bool:
    if not gold:
        return False
    if pred == gold:
        return True
    pred_value, gold_value = _exact_number(pred), _exact_number(gold)
    if pred_value is not None and gold_value is not None:
        return _numbers_close(pred_value, gold_value)
    if allow_lists:
        pred_parts, gold_parts = _split_top_level(pred), _split_top_level(gold)
        if len(gold_parts) > 1 and len(pred_parts) == len(gold_parts) and all(gold_parts):
            remaining = list(gold_parts)
            for part in pred_parts:
                hit = next((g for g in remaining if _math_equal(part, g, allow_lists=False)), None)
                if hit is None:
                    return False
                remaining.remove(hit)
            return True
    return False


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return s[1:-1].strip()
    return s


def _option_index(text: str, options: Sequence[str] | None) -> int | None:
    if not options:
        return None
    key = normalize_text(text)
    if not key:
        return None
    for i, option in enumerate(options):
        if normalize_text(option) == key:
            return i
    return None


def _resolve_choice(
    s: str, options: Sequence[str] | None, *, is_gold: bool, allow_index: bool
) -> tuple[int | None, str, bool]:
    """(option index or None, normalised text, whether an index-style form was used)."""
    s = _strip_markdown(s)
    match = _INDEX_TEXT.match(s)
    if match is not None:
        index, text = int(match.group(1)), normalize_text(_unquote(match.group(2)))
        # A prediction in LogiQA's form is read as an index when the gold is index-style, or when its
        # text names that very option (so a list such as "3, 4" is not taken for option 3).
        if is_gold or allow_index or (options and index < len(options) and text == normalize_text(options[index])):
            return index, text, True
    letter = _LETTER_FULL.match(s)
    char = letter.group(1) if letter is not None else None
    if char is None and not is_gold:
        prefix = _LETTER_PREFIX.match(s)
        char = next((g for g in prefix.groups() if g), None) if prefix is not None else None
    if char is not None:
        index = ord(char.upper()) - ord("A")
        if not options or index < len(options):
            return index, "", False
        # A letter past the last option can only be an option text (options may be "x", "y", ...); a
        # gold letter that names no option is unparseable.
        text_index = _option_index(s, options)
        if text_index is not None or not is_gold:
            return text_index, normalize_text(s), False
        return None, "", False
    bare = _BARE_INDEX.match(s)
    if bare is not None and (is_gold or allow_index):
        if not is_gold or _option_index(s, options) is None:
            return int(bare.group(1)), "", True
    text = _unquote(s)
    return _option_index(text, options), normalize_text(text), False


def _choice_match(pred: str, gold: str, options: Sequence[str] | None) -> bool:
    gold_index, gold_text, index_style = _resolve_choice(gold, options, is_gold=True, allow_index=True)
    if options and gold_index is not None and not 0 <= gold_index < len(options):
        return False  # a gold option that does not exist cannot be matched
    if options and gold_index is not None and not gold_text:
        gold_text = normalize_text(options[gold_index])
    if gold_index is None and not gold_text:
        return False
    pred_index, pred_text, _ = _resolve_choice(pred, options, is_gold=False, allow_index=index_style)
    if gold_index is not None and pred_index is not None:
        return gold_index == pred_index
    if gold_text and pred_text:
        return gold_text == pred_text
    return False


def _match_one(predicted: str, gold: str, kind: str, options: Sequence[str] | None) -> bool:
    if kind == "auto":
        kind = infer_kind(gold)
    if kind == "number":
        gold_value = _exact_number(gold)
        pred_value = _exact_number(predicted)
        return gold_value is not None and pred_value is not None and _numbers_close(pred_value, gold_value)
    if kind == "math":
        return _math_equal(normalize_math(predicted), normalize_math(gold))
    if kind == "yes_no":
        gold_answer = normalize_yes_no(gold)
        return gold_answer is not None and normalize_yes_no(predicted) == gold_answer
    if kind == "choice":
        return _choice_match(predicted, gold, options)
    gold_text = normalize_text(gold)
    return bool(gold_text) and normalize_text(predicted) == gold_text


def unmatchable_gold(gold: str, kind: str = "auto", options: Sequence[str] | None = None) -> str | None:
    """Why ``gold`` cannot serve as a gold answer under ``kind``, or None when it can: it is empty, cannot
    be parsed under that rule (so :func:`answers_match` never accepts anything for it), or, for ``math``,
    holds no digit or letter (a placeholder such as ``"???"``). Training on such answers gives a reward
    that is 0 for every sample."""
    if not isinstance(gold, str) or not gold.strip():
        return "the gold answer is empty"
    rule = infer_kind(gold) if kind == "auto" else kind
    if rule == "number" and _exact_number(gold) is None:
        return f"gold answer {gold[:40]!r} is not a number (answer kind 'number')"
    if rule == "math" and not any(ch.isalnum() for ch in normalize_math(gold)):
        return f"gold answer {gold[:40]!r} holds no digit, letter or symbol name (answer kind 'math')"
    if rule == "yes_no" and normalize_yes_no(gold) is None:
        return f"gold answer {gold[:40]!r} does not start with yes or no (answer kind 'yes_no')"
    if rule == "choice":
        index, text, _ = _resolve_choice(gold, options, is_gold=True, allow_index=True)
        if (index is None and not text) or (options and index is not None and not 0 <= index < len(options)):
            return f"gold answer {gold[:40]!r} names no option (answer kind 'choice')"
    if rule == "text" and not normalize_text(gold):
        return f"gold answer {gold[:40]!r} is only punctuation (answer kind 'text')"
    return None


def answers_match(
    predicted: str,
    gold: str | Sequence[str],
    kind: str = "auto",
    options: Sequence[str] | None = None,
) -> bool:
    """Whether ``predicted`` matches any accepted ``gold`` answer under the rule for ``kind``.

    Choice matching resolves both sides to an option: the gold may be a letter (``"B"``), a 0-based index
    (``"1"``), LogiQA's ``index, "text"`` or an option text; the prediction may be a letter (``"B"``,
    ``"(B)"``, ``"B."``, ``"B) text"``, ``"Option B"``), an option text, or, when the gold is given by
    index, an index. A letter needs brackets or punctuation after it unless it stands alone, so
    ``"Because ..."`` is not option B. ``options`` (usually ``Example.meta["options"]``) lets letters
    and texts be compared with each other; without them only like forms compare.

    Never raises for a bad gold answer: empty or unparseable golds simply do not match.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(predicted, str) or not predicted.strip():
        return False
    golds = [gold] if isinstance(gold, str) else list(gold or ())
    for candidate in golds:
        if isinstance(candidate, (int, float)) and not isinstance(candidate, bool):
            candidate = str(candidate)
        if not isinstance(candidate, str) or not candidate.strip():
            continue
        if _match_one(predicted, candidate, kind, options):
            return True
    return False
