"""Grader reference table: (rm-type, response, label, expected) from the published conventions, traps included.

Sources of the conventions (facts only; the graders are written in glm_rl/rollout/rewards):
- math: the final answer is the last \\boxed{} (braces matched), else the last number; equivalence as in
  math-verify (value equality to 6 decimals, percent read both ways, sets / intervals / equations understood).
- dapo: DAPO (Yu et al. 2025) and slime's `math_dapo_utils`: the last `Answer:` line (case-insensitive) in the
  last 300 characters, Minerva's answer normalisation, exact string match, +1 / -1; labels are integers.
- deepscaler: DeepScaleR (Agentica 2025) and slime's `deepscaler.py`: the part after the last `</think>` (none:
  0), its last \\boxed{} (none: 0), then Hendrycks' MATH normalisation or sympy equality, where an unreduced
  fraction is wrong, an integer label needs an integer answer, and `\\%` is dropped.
- f1: HotpotQA / SQuAD token F1 (lowercase, no punctuation or articles; yes / no / noanswer must match exactly).
- boxed_<type>: <type> applied to the content of the last \\boxed{} only.
"""

import threading
import time

import pytest

from glm_rl.rollout.rewards import get_reward_fn, math_equal
from glm_rl.rollout.rewards.math_grader import extract_math_answer, last_boxed

FILLER = "We keep going with the computation. " * 10  # 360 characters

MATH = [
    # -- extraction: last box (braces matched), else last number ------------------------------------------
    (r"The answer is \boxed{42}.", "42", 1),
    (r"First \boxed{41}; no wait, \boxed{42}", "42", 1),  # the last box counts
    (r"\boxed{42} hmm, actually \boxed{41}", "42", 0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1),  # nested braces
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1),  # two levels
    (r"\boxed{\left\{1,2\right\}}", r"\{1,2\}", 1),  # escaped braces inside
    (r"\boxed{5} and 6 more", "5", 1),  # a box wins over a later number
    (r"\fbox{7}", "7", 1),
    (r"so $\boxed 7$", "7", 1),  # brace-less box
    ("So the total is 17 apples.", "17", 1),  # no box: last number
    ("First 3, then 5, so 8", "8", 1),
    ("The result is 8, not 3.", "8", 0),  # the last number is 3
    ("x = -3", "-3", 1),
    ("10-3=7", "7", 1),  # a minus between digits is not a sign
    ("The answer is \u22125", "-5", 1),  # unicode minus
    ("It costs 1,000 dollars.", "1000", 1),
    ("About 2.5 hours", "5/2", 1),
    ("The answer is 3/4.", "0.75", 1),
    ("The answer is .5", "1/2", 1),
    # -- empty and malformed ---------------------------------------------------------------------------------
    ("", "5", 0),
    ("I don't know.", "5", 0),
    (r"\boxed{}", "0", 0),
    (r"\boxed{\frac{1}{2}", "0.5", 0),  # the box never closes: no answer, no guess
    (r"\boxed{{1}", "1", 0),
    (r"\boxed{7} and then \boxed{8", "7", 0),  # the last box is malformed
    (r"\boxed{1}}", "1", 1),  # a stray brace after a closed box
    (r"\boxed{abc}", "5", 0),
    (r"\boxed{4}", "", 0),  # empty label
    # -- fractions and decimals ------------------------------------------------------------------------------
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1),
    (r"\boxed{\tfrac{3}{4}}", "3/4", 1),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1),
    (r"\boxed{\frac12}", "0.5", 1),
    (r"\boxed{0.25}", "1/4", 1),
    (r"\boxed{0.33}", r"\frac13", 0),  # equal to 6 decimals only
    (r"\boxed{0.333}", r"\frac{1}{3}", 0),
    (r"\boxed{0.333333}", r"\frac{1}{3}", 1),
    (r"\boxed{1.5}", r"\frac{3}{2}", 1),
    (r"\boxed{1\frac{1}{2}}", r"\frac32", 1),  # mixed number
    (r"\boxed{2/4}", "1/2", 1),  # math compares values (deepscaler does not: below)
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1),
    (r"\boxed{\frac{-1}{2}}", r"-\frac12", 1),
    (r"\boxed{4}", "4.0", 1),
    (r"\boxed{3.0}", "3", 1),
    (r"\boxed{7.00}", "7", 1),
    # -- percentages, thousands, money, units, degrees -----------------------------------------------------
    (r"\boxed{50\%}", "50", 1),
    (r"\boxed{50\%}", "0.5", 1),
    (r"\boxed{12.5\%}", r"\frac{1}{8}", 1),
    (r"\boxed{50\%}", "5", 0),
    (r"\boxed{1,000}", "1000", 1),
    (r"\boxed{1{,}000}", "1000", 1),
    (r"\boxed{1,000,000}", "1000000", 1),
    (r"\boxed{1000}", "1,000", 1),
    (r"\boxed{1,2}", "12", 0),  # not a thousands separator: a list
    (r"\boxed{\$5}", "5", 1),
    (r"\boxed{\$1,000}", "1000", 1),
    (r"\boxed{5 \text{ dollars}}", "5", 1),
    (r"\boxed{10\text{ cm}}", "10", 1),
    (r"\boxed{10\,\text{cm}}", "10", 1),
    (r"\boxed{3\text{ m}^2}", "3", 1),
    (r"\boxed{4 \text{ inches}}", "5", 0),
    (r"\boxed{90^\circ}", "90", 1),
    (r"\boxed{90^{\circ}}", "90", 1),
    # -- equations, text, choices ---------------------------------------------------------------------------
    (r"\boxed{x = 3}", "3", 1),
    (r"\boxed{3}", "x=3", 1),
    (r"\boxed{y = 2x + 1}", "2x+1", 1),
    (r"\boxed{x=4}", "3", 0),
    (r"\boxed{x=2, x=3}", "2,3", 1),
    (r"\boxed{\text{(B)}}", "B", 1),
    (r"\boxed{(C)}", "C", 1),
    (r"\boxed{B}", "C", 0),
    (r"\boxed{\text{yes}}", "Yes", 1),
    (r"\boxed{no}", "yes", 0),
    # -- symbolic --------------------------------------------------------------------------------------------
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1),
    (r"\boxed{x^2-1}", "(x-1)(x+1)", 1),
    (r"\boxed{x^2+1}", "(x-1)(x+1)", 0),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1),
    (r"\boxed{2\pi}", "6.28", 0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1),
    (r"\boxed{3+2i}", "2i+3", 1),
    (r"\boxed{10^3}", "1000", 1),
    (r"\boxed{\infty}", r"\infty", 1),
    (r"\boxed{-\infty}", r"\infty", 0),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1),
    (r"\boxed{\begin{pmatrix} 1 \\ 3 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 0),
    # -- intervals and sets ----------------------------------------------------------------------------------
    (r"\boxed{(1, 2)}", "(1,2)", 1),
    (r"\boxed{[1,2]}", "(1,2)", 0),
    (r"\boxed{(1,2]}", "(1,2]", 1),
    (r"\boxed{[1,2)}", "(1,2]", 0),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", 1),
    (r"\boxed{(-\infty,3)}", r"(-\infty,3]", 0),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", 1),
    (r"\boxed{(-\infty,-1)\cup(1,\infty)}", r"(-\infty,-1)\cup(1,\infty)", 1),
    (r"\boxed{x \in [1,2]}", "[1,2]", 1),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", 1),
    (r"\boxed{1, 2, 3}", r"\{1,2,3\}", 1),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0),
    # -- negatives -------------------------------------------------------------------------------------------
    (r"\boxed{-3}", "-3", 1),
    (r"\boxed{-3}", "3", 0),
    (r"\boxed{3}", "-3", 0),
    ("The answer is -7.", "-7", 1),
    ("\\boxed{\u22122}", "-2", 1),
    # -- labels that are worked solutions --------------------------------------------------------------------
    (r"\boxed{4}", r"The answer is $\boxed{4}$.", 1),
    (r"\boxed{5}", r"so $x=\boxed{4}$", 0),
]

DAPO = [
    ("Let me compute.\nAnswer: 34", "34", 1),
    ("Answer: 34\n", "34", 1),
    ("answer: 34", "34", 1),  # case-insensitive
    ("ANSWER:34", "34", 1),
    ("Final Answer: 34", "34", 1),
    ("Answer: 33\nAnswer: 34", "34", 1),  # the last line counts
    ("Answer: 34\nAnswer: 33", "34", -1),
    ("The answer is 34", "34", -1),  # no `Answer:` line
    (r"\boxed{34}", "34", -1),  # a box is not read
    ("", "34", -1),
    ("Answer: $34$", "34", 1),
    (r"Answer: \boxed{34}", "34", 1),
    ("Answer: 1,000", "1000", 1),  # digit commas dropped
    ("Answer: 1000", "1,000", 1),
    ("Answer: x = 34", "34", 1),  # right of the last '='
    ("Answer: 34 degrees", "34", 1),  # unit words dropped
    (r"Answer: 34^\circ", "34", 1),
    ("Answer: 34 dollars", "34", 1),
    (r"Answer: \$34", "34", 1),
    (r"Answer: \text{34}", "34", 1),
    ("Answer: 34 square units", "34", 1),
    ("Answer: 3 4", "34", 1),  # spaces removed
    ("Answer: 34 apples", "34", -1),  # not a listed unit
    ("Answer: 34.", "34", -1),  # a period is dropped only before a closing $
    ("Answer: $34.$", "34", 1),
    ("Answer: 34.0", "34", -1),  # the prediction is compared as written
    ("Answer: 34", "34.0", 1),  # the label is an integer
    ("Answer: 35", "34", -1),
    ("Answer: -34", "-34", 1),
    (r"Answer: \frac12", r"\frac{1}{2}", 1),  # \fracab shorthand
    (r"Answer: \frac{1}{2}", "0.5", -1),  # no numeric equivalence
    (r"Answer: \sqrt2", r"\sqrt{2}", 1),
    ("Answer: 34\n" + FILLER, "34", -1),  # outside the last 300 characters
    (FILLER + "\nAnswer: 34", "34", 1),
]

DEEPSCALER = [
    (r"<think>work</think> The answer is \boxed{42}", "42", 1),
    (r"The answer is \boxed{42}", "42", 0),  # no </think>: format error
    (r"<think>\boxed{41}</think> \boxed{42}", "42", 1),
    (r"<think>\boxed{42}</think> so it is 42", "42", 0),  # a box inside the thinking does not count
    (r"reasoning</think>\boxed{42}", "42", 1),  # the template opened <think>
    (r"<think>a</think>b</think>\boxed{7}", "7", 1),  # after the last </think>
    (r"</think>\boxed{\frac{1}{2}}", "0.5", 1),
    (r"</think>\boxed{2/4}", "1/2", 0),  # an unreduced fraction is wrong
    (r"</think>\boxed{\frac{2}{4}}", r"\frac{1}{2}", 0),
    (r"</think>\boxed{\frac{1}{2}}", "1/2", 1),
    (r"</think>\boxed{\sqrt{9}}", "3", 0),  # an integer label needs an integer
    (r"</think>\boxed{3.0}", "3", 1),
    (r"</think>\boxed{50\%}", "50", 1),
    (r"</think>\boxed{50\%}", "0.5", 0),  # the percent sign is dropped, not read
    (r"</think>\boxed{1,000}", "1000", 1),
    (r"</think>\boxed{x=5}", "5", 1),
    (r"</think>\boxed{(1,2]}", "[1,2]", 0),
    (r"</think>\boxed{(1,2)}", "(1,2)", 1),
    (r"</think>\boxed{2\sqrt{2}}", r"\sqrt{8}", 1),
    (r"</think>\boxed{\dfrac{3}{4}}", "0.75", 1),
    (r"</think>\boxed{10\text{ cm}}", "10", 1),
    (r"</think>\boxed{\text{(A)}}", "A", 1),
    ("</think>", "1", 0),
    (r"</think> the answer is 5", "5", 0),  # no box: no last-number fallback
    (r"</think>\boxed{5}", r"\boxed{5}", 1),
    (r"</think>\boxed{5}", "", 0),
]

F1 = [
    ("Paris", "Paris", 1.0),
    ("paris.", "Paris", 1.0),  # case and punctuation
    ("The Eiffel Tower", "Eiffel Tower", 1.0),  # articles
    ("Paris, France", "Paris", 2 / 3),
    ("Paris", "Paris France", 2 / 3),
    ("cat cat", "cat", 2 / 3),  # repeated tokens count once per match
    ("a b c d", "b", 0.5),  # "a" is an article: 3 tokens left
    ("London", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("yes", "no", 0.0),
    ("Yes.", "yes", 1.0),
    ("yes it is", "yes", 0.0),  # a yes/no label needs exactly yes/no
    ("no answer", "noanswer", 0.0),
]

ARITHMETIC_AND_BOXED = [
    ("arithmetic", "123+456=579", "579", 1),
    ("arithmetic", "579", "579", 0),
    ("arithmetic", "123+456=57a", "579", 0),
    ("arithmetic", "1=2=579", "579", 1),
    ("boxed_arithmetic", r"\boxed{2+3=5}", "5", 1),
    ("boxed_math", "The answer is 7", "7", 0),  # no box: no last-number fallback
    ("boxed_math", r"\boxed{7}", "7", 1),
    ("boxed_math", r"\boxed{\frac{1}{2}} and then 5", "0.5", 1),
    ("boxed_math", r"\boxed{\frac{1}{2}", "0.5", 0),
    ("boxed_f1", r"So: \boxed{Paris}", "Paris", 1),
    ("boxed_f1", "Paris", "Paris", 0),
    ("boxed_dapo", r"\boxed{34}", "34", 1),
    ("boxed_dapo", "Answer: 34", "34", -1),
    ("boxed_deepscaler", r"\boxed{2/4}", "1/2", 0),
    ("boxed_deepscaler", r"\boxed{\frac{1}{2}}", "1/2", 1),
]

TABLE = (
    [("math", *c) for c in MATH]
    + [("dapo", *c) for c in DAPO]
    + [("deepscaler", *c) for c in DEEPSCALER]
    + [("f1", *c) for c in F1]
    + ARITHMETIC_AND_BOXED
)


def test_table_size():
    assert len(TABLE) >= 150, len(TABLE)


@pytest.mark.parametrize("rm_type,response,label,expected", TABLE)
def test_reference_table(rm_type, response, label, expected):
    assert get_reward_fn(rm_type)(response, label) == pytest.approx(expected)


def test_metadata_is_accepted_and_rewards_are_floats():
    for name in ("arithmetic", "math", "dapo", "deepscaler", "f1", "random", "boxed_math"):
        value = get_reward_fn(name)(r"1+1=2 \boxed{2}", "2", {"source": "test"})
        assert type(value) is float


def test_extraction_helpers():
    assert last_boxed(r"a \boxed{x^{2}} b \boxed{\frac{1}{\sqrt{2}}} c") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{1") is None and last_boxed("no box") is None
    assert extract_math_answer("totals 1,234,567.5 units") == "1,234,567.5"
    assert extract_math_answer("nothing numeric") is None


def test_random_is_a_reproducible_fair_coin():
    coin = get_reward_fn("random")
    flips = [coin(f"response {i}", "x") for i in range(400)]
    assert set(flips) == {0.0, 1.0} and 150 < sum(flips) < 250
    assert flips == [coin(f"response {i}", "x") for i in range(400)]


def test_unknown_rm_type_lists_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown reward 'mathh'.*arithmetic, dapo, deepscaler, f1, math, random.*"
        r"boxed_.*remote_rm.*custom-rm-path",
    ):
        get_reward_fn("mathh")
    with pytest.raises(ValueError, match="unknown reward 'boxed_nope'"):
        get_reward_fn("boxed_nope")
    with pytest.raises(ValueError, match="remote_rm"):
        get_reward_fn("remote_rm")  # async only: build_rewarder


def test_slow_comparison_is_cut_at_the_time_limit():
    slow = "(a+b+c+d)^{30}-(a+b+c+d)^{29}"  # sympy needs ~30 s to decide this is not 0
    t0 = time.monotonic()
    assert math_equal(slow, "0", timeout_s=0.3) is False
    assert time.monotonic() - t0 < 2.0
    deadline = time.monotonic() + 5
    while any(t.name == "math-grader" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "math-grader" for t in threading.enumerate()), "the abandoned comparison kept running"
    assert get_reward_fn("math", math_timeout_s=0.3)(rf"\boxed{{{slow}}}", "0") == 0.0


def test_grading_works_off_the_main_thread():
    """math-verify's own timeouts need the main thread; graders run on worker threads (manager, server)."""
    out = []
    worker = threading.Thread(target=lambda: out.append(get_reward_fn("math")(r"\boxed{\frac{2}{4}}", "0.5")))
    worker.start()
    worker.join(30)
    assert out == [1.0]
