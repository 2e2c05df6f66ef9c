"""Final-answer extraction from a model's completion (EvoLM's protocol).

The answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\framebox{...}``; braces
balanced, nesting allowed), else the text after the last "answer is" (after a ``:`` if one follows), else
the text after the last GSM8K-style ``####``. Sets whose reference solutions are bare answers (CRUXEval,
TabMWP, ...) also accept a bare final line as the answer (``bare=True``).
"""
from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox|framebox)\s*(?:\[[^\]]*\]\s*)*")
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\framebox[...]{...}``) with balanced
    braces; None if none closes. ``\\boxed 5`` (no braces) gives ``5``."""
    for m in reversed(list(_BOXED.finditer(text))):
        start = m.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1:i].strip()
            continue  # unclosed: try an earlier one
        bare = re.match(r"[^\s$]+", text[start:])
        if bare:
            return bare.group(0)
    return None


def _trim(answer: str) -> str:
    answer = answer.strip()
    while answer and (answer[-1] in ".。" or answer[-1].isspace()):
        answer = answer[:-1]
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer[1:-1].strip()
    return answer


def after_answer_is(text: str) -> str | None:
    """The text after the last "answer is": from a following ``:`` if there is one, up to the end of
    that line or sentence, trimmed of a trailing period. None if the phrase is absent or nothing follows."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].lstrip(" \t")
    if rest.startswith(":"):
        rest = rest[1:]
    rest = rest.strip().split("\n", 1)[0]
    rest = _SENTENCE_END.split(rest, 1)[0]
    return _trim(rest) or None


def after_hashes(text: str) -> str | None:
    """The text after the last ``####`` on its line (GSM8K's answer marker)."""
    pos = text.rfind("####")
    if pos < 0:
        return None
    return _trim(text[pos + 4:].strip().split("\n", 1)[0]) or None


def last_line(text: str) -> str | None:
    """The last non-empty line, trimmed; None for blank text."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return _trim(lines[-1]) or None if lines else None


def extract_answer(text: str | None, bare: bool = False) -> str | None:
    """The final answer in ``text`` (see the module's doc), or None when it states none."""
    if not text:
        return None
    for find in (last_boxed, after_answer_is, after_hashes):
        answer = find(text)
        if answer is not None:
            return answer
    return last_line(text) if bare else None


def tail(text: str | None, chars: int = 128) -> str | None:
    """The last ``chars`` characters (the span majority voting extracts answers from)."""
    return None if text is None else text[-chars:]


def marked_answer(text: str | None) -> str | None:
    """The final answer that ``text`` marks (boxed, "answer is" or ``####``), or None."""
    return extract_answer(text, bare=False)


def vote_answer(text: str | None, bare: bool = False, chars: int = 128) -> str | None:
    """The answer a completion votes with in a majority vote: the answer marked in its last ``chars``
    characters; with ``bare``, its last line when it marks no answer anywhere (that line is then its final
    answer). None (the completion abstains) when it states no final answer there: a completion whose
    marked answer lies before its last ``chars`` characters does not vote with a line after it."""
    answer = marked_answer(tail(text, chars))
    if answer is None and bare and text and marked_answer(text) is None:
        answer = last_line(text)
    return answer
