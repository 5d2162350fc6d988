"""Rule graders (`--rm-type`): each one a sync `(response, label, metadata=None) -> float`, usable on its own.

A grader is two steps: `extract` pulls the answer out of the response (None: no answer, scored `missing`), and
`judge` scores that answer against the label. The `boxed_` prefix swaps the first step for "the content of the
last `\\boxed{…}`", so `boxed_math` is `math` without the last-number fallback and `boxed_dapo` reads the box
instead of the `Answer:` line. Rule graders ignore metadata (it is there for custom and remote ones).

| rm-type    | answer                                          | judge                                  | scores   |
|------------|-------------------------------------------------|----------------------------------------|----------|
| arithmetic | whole response: the integer after the last `=`  | equals the integer label               | 1 / 0    |
| math       | last `\\boxed{}`, else the last number          | `math_equal` (math-verify, sympy)      | 1 / 0    |
| dapo       | last `Answer: …` line in the last 300 chars     | Minerva-normalised strings equal       | +1 / -1  |
| deepscaler | last `\\boxed{}` after the last `</think>`      | `math_equal(strict=True)`              | 1 / 0    |
| f1         | whole response                                  | HotpotQA token F1 (yes/no must match)  | [0, 1]   |
| random     | whole response                                  | coin flip seeded by (label, response)  | 1 / 0    |
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from glm_rl.rollout.rewards.math_grader import DEFAULT_TIMEOUT_S, extract_math_answer, label_answer, last_boxed
from glm_rl.rollout.rewards.math_grader import math_equal as _math_equal_fn

RewardFn = Callable[..., float]  # (response: str, label: str, metadata: dict | None = None) -> float


@dataclass(frozen=True)
class RuleGrader:
    extract: Callable[[str], str | None]
    judge: Callable[[str, str], float]
    missing: float = 0.0  # the score of a response with no answer

    def __call__(self, response: str, label: str, metadata: dict | None = None) -> float:
        answer = self.extract(response)
        return self.missing if answer is None else float(self.judge(answer, str(label)))

    def boxed(self) -> RuleGrader:
        return RuleGrader(last_boxed, self.judge, self.missing)


# -- arithmetic (the tiny demo task) --------------------------------------------------------------------------
_ARITHMETIC = re.compile(r"=\s*(-?\d+)\s*$")


def parse_arithmetic_answer(response: str) -> int | None:
    """The integer after the last '=' at the end of the response, or None when malformed."""
    match = _ARITHMETIC.search(response.strip())
    return int(match.group(1)) if match else None


def _arithmetic_judge(response: str, label: str) -> float:
    answer = parse_arithmetic_answer(response)
    return float(answer is not None and answer == int(label))


def arithmetic_reward(response: str, label: str, metadata: dict | None = None) -> float:
    """1.0 when the response ends in "= <label>" (e.g. "123+456=579"), else 0.0 (malformed included)."""
    return _arithmetic_judge(response, label)


# -- dapo: DAPO's `Answer:` line, Minerva normalisation, +1 / -1 ----------------------------------------------
_DAPO_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_DAPO_TAIL = 300  # DAPO reads only the end of the response
# fmt: off
_DAPO_REPLACE = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_DAPO_DROP = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
              "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
              "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
              "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
              ",\\!", "{,}", '"', "\\dots"]
_DAPO_UNWRAP = [re.compile(r"\\text\{(.*?)\}"), re.compile(r"\\textbf\{(.*?)\}"), re.compile(r"\\overline\{(.*?)\}"),
                re.compile(r"\\boxed\{(.*)\}")]
# fmt: on


def dapo_normalize(answer: str) -> str:
    """Minerva's final-answer normalisation (as DAPO uses it): right of the last '=', words and units dropped,
    first `$…$` span kept, \\text{}/\\boxed{} unwrapped, `\\fracab` → `\\frac{a}{b}`, digit commas removed."""
    s = str(answer).split("=")[-1]
    for old, new in _DAPO_REPLACE:
        s = s.replace(old, new)
    for junk in _DAPO_DROP:
        s = s.replace(junk, "")
    if math_span := re.search(r"\$(.*?)\$", s):
        s = math_span.group(1)
    for pattern in _DAPO_UNWRAP:
        s = pattern.sub(r"\1", s)
    s = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", s)
    s = re.sub(r"sqrt([^{])", r"sqrt{\1}", s).replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def _dapo_extract(response: str) -> str | None:
    lines = _DAPO_LINE.findall(response[-_DAPO_TAIL:])
    return lines[-1] if lines else None


def _dapo_judge(answer: str, label: str) -> float:
    gold = dapo_normalize(label)
    try:  # DAPO-Math labels are integers: "34.0" and "34" are the same label
        if float(gold).is_integer():
            gold = str(int(float(gold)))
    except (ValueError, OverflowError):
        pass
    return 1.0 if dapo_normalize(answer) == gold else -1.0


# -- deepscaler: after </think>, then the boxed answer, graded strictly ---------------------------------------
def _deepscaler_extract(response: str) -> str | None:
    return last_boxed(response.split("</think>")[-1]) if "</think>" in response else None


# -- f1 (HotpotQA / SQuAD token F1) ---------------------------------------------------------------------------
def f1_normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction: str, label: str) -> float:
    pred, gold = f1_normalize(prediction), f1_normalize(label)
    if (pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")) and pred != gold:
        return 0.0
    common = sum((Counter(pred.split()) & Counter(gold.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred.split()), common / len(gold.split())
    return 2 * precision * recall / (precision + recall)


def _coin(response: str, label: str) -> float:
    """A reproducible coin flip: the same (label, response) always scores the same, across processes."""
    return float(random.Random(f"{label}\x00{response}").randint(0, 1))


def _identity(response: str) -> str:
    return response


def _graders(timeout_s: float) -> dict[str, RuleGrader]:
    math_equal = functools.partial(_math_equal_fn, timeout_s=timeout_s)
    return {
        "arithmetic": RuleGrader(_identity, _arithmetic_judge),
        "math": RuleGrader(extract_math_answer, lambda a, g: float(math_equal(a, label_answer(g)))),
        "dapo": RuleGrader(_dapo_extract, _dapo_judge, missing=-1.0),
        "deepscaler": RuleGrader(_deepscaler_extract, lambda a, g: float(math_equal(a, label_answer(g), strict=True))),
        "f1": RuleGrader(_identity, f1_score),
        "random": RuleGrader(_identity, _coin),
    }


REWARDS: dict[str, RuleGrader] = _graders(DEFAULT_TIMEOUT_S)  # the rule graders by --rm-type
BOXED_PREFIX = "boxed_"


def rule_names() -> list[str]:
    return sorted(REWARDS)


def is_rule(name: str) -> bool:
    return name in REWARDS or (name.startswith(BOXED_PREFIX) and name[len(BOXED_PREFIX) :] in REWARDS)


def unknown_rm_type_message(name: str) -> str:
    rules = ", ".join(rule_names())
    return (
        f"unknown reward {name!r} (--rm-type); valid: {rules}; `boxed_` + any of those (e.g. boxed_math: "
        "grade the last \\boxed{} only); remote_rm (with --rm-url); or a function via --custom-rm-path"
    )


def get_reward_fn(name: str, *, math_timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardFn:
    """The sync rule grader `(response, label, metadata=None) -> float` for `--rm-type name`; ValueError naming the
    valid types otherwise (remote_rm and custom functions are async: see `build_rewarder`)."""
    if not is_rule(name):
        raise ValueError(unknown_rm_type_message(name))
    graders = REWARDS if math_timeout_s == DEFAULT_TIMEOUT_S else _graders(math_timeout_s)
    if name.startswith(BOXED_PREFIX) and name not in graders:
        return graders[name[len(BOXED_PREFIX) :]].boxed()
    return graders[name]
