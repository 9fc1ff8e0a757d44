"""Answer extraction and normalization: GSM8K numbers, MATH ``\\boxed{}``, ARC letters.

Two uses: judging a generated trace (``extract_answer`` on the whole text, then
``answers_match``), and clustering short sampled answers for the ``sampled``
estimator (``normalize_short_answer``: what follows ``"The answer is"``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_KINDS = ("number", "boxed", "letter", "text")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """Canonical form of the first number in ``text``: commas, ``$`` and trailing
    zeros dropped (``"$1,234.50"`` -> ``"1234.5"``, ``"18.00"`` -> ``"18"``); None if no number."""
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    try:
        value = Decimal(match.group().replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution: after the last ``####`` or
    ``answer is`` if present, else the last number in the text; normalized."""
    if "####" in text:
        return normalize_number(text.rsplit("####", 1)[1])
    tails = list(_ANSWER_IS.finditer(text))
    if tails:
        found = normalize_number(text[tails[-1].end():])
        if found is not None:
            return found
    numbers = _NUMBER.findall(text.replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def _braced(s: str, command: str) -> str:
    """``\\frac43`` -> ``\\frac{4}{3}``, ``\\sqrt2`` -> ``\\sqrt{2}``: give bare one-character
    arguments their braces (``command`` takes 2 or 1 arguments)."""
    n_args = 2 if command == "frac" else 1
    out, i, token = [], 0, "\\" + command
    while True:
        j = s.find(token, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j + len(token)])
        i = j + len(token)
        for _ in range(n_args):
            if i < len(s) and s[i].isalnum():
                out.append("{" + s[i] + "}")
                i += 1
            elif i < len(s) and s[i] == "{":  # copy a braced argument as is
                depth, k = 0, i
                while k < len(s):
                    depth += {"{": 1, "}": -1}.get(s[k], 0)
                    k += 1
                    if depth == 0:
                        break
                out.append(s[i:k])
                i = k
            else:  # e.g. \sqrt[3]{x}: leave it alone
                break


def normalize_math(text: str) -> str:
    """MATH answer normalization for string comparison (in the spirit of Hendrycks et
    al.'s, not symbolic equivalence): the last ``\\boxed{}`` if any; spacing commands,
    ``\\left``/``\\right``, ``$``, degree signs, trailing units in ``\\text{}``/``\\mbox{}``
    and a short ``x =`` left side dropped; ``dfrac``/``tfrac`` -> ``frac``; bare
    ``\\frac43``/``\\sqrt2`` arguments braced; numbers through ``normalize_number``."""
    s = text.strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("\\:", ""), ("\\$", ""), ("$", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                     ("^\\circ", ""),
                     ("^{\\circ}", ""), ("\\%", ""), ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    # Trailing units: "864\mbox{inches}^2", "5\text{cm}" (a whole-answer \text{Evelyn} stays).
    s = re.sub(r"(?<=[\d}])\\(?:text|mbox)\{[^{}]*\}(\^\d)?$", "", s)
    s = re.sub(r"\\(?:text|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" -> "5"
    s = _braced(_braced(s, "frac"), "sqrt").rstrip(".")
    if re.fullmatch(r"-?[\d,]*\.?\d+", s):
        return normalize_number(s) or s
    return s


def extract_letter(text: str, labels: list[str]) -> str | None:
    """The option letter a trace commits to: the last ``answer is X`` / ``answer: (X)``,
    else the last ``(X)``, else the whole text being a letter; only letters in
    ``labels``. Lines starting with ``X.`` do not count: weak models echo the option
    list. None if no commitment is found."""
    allowed = "".join(re.escape(x) for x in labels)
    patterns = (
        (rf"answer\s*(?:is|:)?\s*(?:option\s*)?\(?([{allowed}])\)?(?![A-Za-z])", re.IGNORECASE),
        (rf"\(([{allowed}])\)", 0),
    )
    for pat, flags in patterns:
        found = [m.group(1) for m in re.finditer(pat, text, flags) if m.group(1) in labels]
        if found:
            return found[-1]
    stripped = text.strip().strip("().")
    return stripped if stripped in labels else None


def normalize_text(text: str) -> str:
    """Lower case, collapsed whitespace, no surrounding punctuation or quotes."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,;:!?\"'`")


def extract_answer(text: str, kind: str, labels: list[str] | None = None) -> str | None:
    """The answer a whole reasoning trace arrives at, normalized for ``kind``
    (``number``, ``boxed``, ``letter`` needs ``labels``, ``text``); None if none."""
    if kind == "number":
        return extract_number(text)
    if kind == "boxed":
        boxed = extract_boxed(text)
        return normalize_math(boxed) if boxed is not None else None
    if kind == "letter":
        if not labels:
            raise ValueError("kind 'letter' needs labels (the option letters)")
        return extract_letter(text, labels)
    if kind == "text":
        tails = list(_ANSWER_IS.finditer(text))
        return normalize_text(text[tails[-1].end():].split("\n")[0]) if tails else None
    raise ValueError(f"unknown answer kind {kind!r}; choose from {ANSWER_KINDS}")


def normalize_short_answer(text: str, kind: str, labels: list[str] | None = None) -> str:
    """Cluster key of a short answer (the words after the probe), e.g. ``" 18 dollars."``
    -> ``"18"``, ``" (B)"`` -> ``"B"``. Falls back to ``normalize_text``."""
    if kind == "number":
        return normalize_number(text) or normalize_text(text)
    if kind == "letter":
        m = re.match(r"\W*([A-Z])(?![A-Za-z])", text.strip())
        if m and (labels is None or m.group(1) in labels):
            return m.group(1)
        return normalize_text(text)
    if kind == "boxed":
        return normalize_math(text)
    if kind == "text":
        return normalize_text(text)
    raise ValueError(f"unknown answer kind {kind!r}; choose from {ANSWER_KINDS}")


def answers_match(predicted: str | None, gold: str, kind: str) -> bool:
    """Whether an extracted answer equals the gold answer after normalization."""
    if predicted is None:
        return False
    return normalize_short_answer(predicted, kind) == normalize_short_answer(gold, kind)
