"""Math answer grading: pull the final answer out of a response, then decide whether it equals the label.

Extraction (`extract_math_answer`): the content of the last `\\boxed{…}` (or `\\fbox{…}`, braces matched, so
`\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`); a last box that never closes is malformed (None, never a guess).
Without a box, the last number in the text (`-3`, `1,000`, `2.5`, `3/4`).

Equivalence (`math_equal`): a cheap string match after light normalisation first, then math-verify (Hugging
Face's LaTeX → sympy parser and comparator, a maintained PyPI package) for the rest: `\\frac`/`\\dfrac`/`a/b`,
decimals vs fractions (to 6 decimals: `0.333` is not `1/3`), percentages (`50\\%` matches `50` and `0.5`),
thousands separators, `$`, units and `\\text{}`, `x = 3` vs `3`, sets, intervals (bracket kinds must agree),
matrices and symbolic equality through sympy. Plain words (`yes`, `(B)`) compare case-insensitively as text.

`strict=True` adds DeepScaleR's three stricter rules on top: a fraction must match the label's fraction as
written (`2/4` is not `1/2`), an integer label needs a plain integer answer (`\\sqrt{9}` is not `3`, `3.0` is), and
a percent sign is dropped rather than read (`50\\%` is `50`, not `0.5`).

Time limit: math-verify bounds itself with `signal.alarm`, which only works on the main thread, but graders run
on worker threads (the rollout manager's event loop, the reward server). So each comparison runs with
math-verify's own timeouts off, on a helper thread that the caller waits for at most `timeout_s`; past that the
comparison counts as wrong, the helper is sent an exception (it stops at its next bytecode) and the caller
moves on at once, even if sympy is stuck in C.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading

from math_verify import LatexExtractionConfig, parse, verify

DEFAULT_TIMEOUT_S = 5.0

logger = logging.getLogger(__name__)

_MV_CONFIG = [LatexExtractionConfig(boxed_match_priority=0)]
_NUMBER = re.compile(r"(?<![\w)\]}.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")
_WORD = re.compile(r"\(?[A-Za-z][A-Za-z ]*\)?")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRACTION = re.compile(r"^(-?)(?:\\frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+))$")
_INTEGER = re.compile(r"^-?\d+(?:\.0*)?$")
# a number followed by a unit in text: `10\text{ cm}`, `5\,\mbox{dollars}`, `3\text{ m}^2`
_UNIT = re.compile(r"^(-?[\d.,/]+)\s*(?:\\[,;:! ]\s*)*\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")


class _Abandoned(BaseException):
    """Raised inside an abandoned comparison thread (a BaseException, so math-verify's `except Exception` lets it
    through)."""


class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_QuietTimeoutWarning())


# -- extraction ---------------------------------------------------------------------------------------------
def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` matching the `{` at `open_at` (escaped `\\{` `\\}` skipped), or None if it never closes."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` / `\\fbox{…}` (also the brace-less `\\boxed 5`), or None when there is
    none or the last one never closes."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    if boxed < 0 and fbox < 0:
        return None
    i = boxed + len("\\boxed") if boxed > fbox else fbox + len("\\fbox")  # just past the command name
    if text.startswith("{", i):
        end = _closing_brace(text, i)
        return None if end is None else text[i + 1 : end].strip()
    if text.startswith(" ", i):  # `\boxed 5`: up to the closing `$` or the end of the line
        return re.split(r"[$\n]", text[i:].strip(), maxsplit=1)[0].strip() or None
    return None


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def extract_math_answer(response: str) -> str | None:
    """The final answer of a response: last box, else last number; None when there is neither (or the last box
    is malformed)."""
    if "\\boxed" in response or "\\fbox" in response:
        return last_boxed(response)
    return last_number(response)


def label_answer(label: str) -> str:
    """A label may itself be a worked solution with a box (MATH's `solution` field): use the box then."""
    label = str(label).strip()
    return (last_boxed(label) or "") if ("\\boxed" in label or "\\fbox" in label) else label


# -- equivalence --------------------------------------------------------------------------------------------
def normalize(answer: str) -> str:
    """Light, safe normalisation for the string fast path (math-verify does the real work)."""
    s = answer.strip().replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\$", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").strip("$ ").rstrip(".")
    s = _UNIT.sub(r"\1", s)
    s = _TEXT_WRAP.sub(r"\1", s)
    s = re.sub(r"\s+", "", s)
    lhs, eq, rhs = s.partition("=")
    if eq and len(lhs) <= 2 and "=" not in rhs:  # `x=3`, `k=3` -> `3` (Hendrycks' rule)
        s = rhs
    return s.replace(",", "") if _THOUSANDS.match(s) else s


def _is_word(s: str) -> bool:
    return bool(_WORD.fullmatch(s)) and len(s.strip("() ")) > 0


def _fraction(s: str) -> tuple[str, str, str] | None:
    m = _FRACTION.match(s)
    return None if m is None else (m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5))


def _strict_verdict(answer: str, label: str) -> bool | None:
    """DeepScaleR's extra rules on normalised strings: False when one applies and fails, else None (undecided)."""
    fa, fl = _fraction(answer), _fraction(label)
    if fa and fl:
        return fa == fl  # an unreduced fraction is not the reduced label
    if _INTEGER.match(label) and not _INTEGER.match(answer):
        return False
    return None


def _symbolic_equal(answer: str, label: str) -> bool:
    gold = parse(f"\\boxed{{{label}}}", extraction_config=_MV_CONFIG, parsing_timeout=None)
    pred = parse(f"\\boxed{{{answer}}}", extraction_config=_MV_CONFIG, parsing_timeout=None)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def run_with_time_limit(fn, timeout_s: float):
    """fn() on a helper thread; TimeoutError if it takes longer than timeout_s (the helper is then abandoned)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except _Abandoned:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    helper = threading.Thread(target=target, name="math-grader", daemon=True)
    helper.start()
    helper.join(timeout_s)
    if helper.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(helper.ident), ctypes.py_object(_Abandoned))
        raise TimeoutError(f"comparison took over {timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def math_equal(answer: str, label: str, *, strict: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the extracted `answer` equals `label` (see the module docstring); False past `timeout_s`."""
    a, g = normalize(answer), normalize(label)
    if strict:
        a, g = a.replace("\\%", "").replace("%", ""), g.replace("\\%", "").replace("%", "")
    if not a or not g:
        return False
    if a == g:
        return True
    if _is_word(a) and _is_word(g):
        return a.strip("()").lower() == g.strip("()").lower()
    if strict and (verdict := _strict_verdict(a, g)) is not None:
        return verdict
    try:
        return run_with_time_limit(lambda: _symbolic_equal(a, g), timeout_s)
    except TimeoutError:
        logger.warning("math grader: comparing %.80r with label %.80r took over %ss; scored as wrong", a, g, timeout_s)
        return False
