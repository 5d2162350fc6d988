"""The rollout manager's bring-your-own-task paths without a model (byot_helpers.FakeEngine answers /generate):
dynamic sampling (rounds, filter, abort accounting), custom generate and rollout functions, metadata reaching a
custom reward, filter and hook errors, the eval metrics (pass@k), rollout dumps, and parse-time errors."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math

import byot_helpers as helpers
import numpy as np
import pytest
import torch

from glm_rl.config import EvalConfig, RolloutConfig, parse_args
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.debug_data import load_rollout, save_rollout
from glm_rl.rollout.evaluation import pass_at_k, set_metrics
from glm_rl.rollout.filters import FilterError, check_reward_nonzero_std
from glm_rl.rollout.generation import HookError
from glm_rl.rollout.manager import RolloutManager
from glm_rl.rollout.samples import Sample

DATA = str(TINY_CHECKPOINT.parent / "arith" / "train.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_CHECKPOINT))


def make(tokenizer, engine=None, eval_cfg=None, **overrides):
    cfg = dataclasses.replace(RolloutConfig(rollout_batch_size=4, n_samples_per_prompt=4), **overrides)
    engine = engine or helpers.FakeEngine(tokenizer, DATA)
    m = RolloutManager(
        cfg,
        str(TINY_CHECKPOINT),
        engine.generate,
        seed=3,
        return_routed_experts=False,
        eval_cfg=eval_cfg,
        abort=engine.abort,
    )
    return m, engine


def test_dynamic_sampling_rounds_filter_and_abort(tokenizer):
    """Six groups rejected, so more rounds run; kept groups are exactly those the filter passed; the surplus in
    flight (requests of launch >= 10 hang until aborted) is aborted; launched = kept + filtered + surplus."""
    helpers.PASSED.clear()
    engine = helpers.FakeEngine(tokenizer, DATA, slow=lambda p: int(p["rid"].split("-")[1]) >= 10 * 4)
    m, _ = make(tokenizer, engine, dynamic_sampling_filter_path="byot_helpers.keep_from_launch_6")
    samples, metrics = asyncio.run(asyncio.wait_for(m.generate(0), timeout=30))
    assert len(samples) == 16 and [s.index for s in samples] == list(range(16))
    assert [s.group for s in samples] == [g for g in range(4) for _ in range(4)]
    groups = [samples[i : i + 4] for i in range(0, 16, 4)]
    assert {tuple(g[0].prompt_ids) for g in groups} <= set(helpers.PASSED)
    assert metrics["rollout/filtered_groups"] == 6 and metrics["rollout/sampling_rounds"] == 3
    assert (
        metrics["rollout/generated_groups"]
        == 4 + metrics["rollout/filtered_groups"] + metrics["rollout/aborted_groups"]
    )
    slow = [r for r in engine.requests if int(r.split("-")[1]) >= 40]
    assert engine.abort_calls >= 1 and metrics["rollout/aborted_requests"] == len(slow) > 0
    assert metrics["rollout/retried_requests"] == 0  # our own aborts are never re-issued


def test_nonzero_std_filter_keeps_groups_with_reward_spread(tokenizer):
    """Twice the prompts launched; every kept group has rewards that differ (prompts a+b with a even are always
    answered right, so their groups have zero spread and are filtered out)."""
    engine = helpers.FakeEngine(tokenizer, DATA, always_right=lambda a, b: a % 2 == 0)
    m, _ = make(tokenizer, engine, over_sampling_batch_size=8, dynamic_sampling_filter_path="check_reward_nonzero_std")
    for step in range(3):
        samples, metrics = asyncio.run(m.generate(step))
        assert len(samples) == 16
        for g in range(4):
            assert np.std([s.reward for s in samples[4 * g : 4 * g + 4]]) > 0
        assert (
            metrics["rollout/generated_groups"]
            == 4 + metrics["rollout/filtered_groups"] + metrics["rollout/aborted_groups"]
        )
    assert check_reward_nonzero_std(None, [Sample(0, 0, [1], [2], [0.0], reward=1.0)]) is False


def test_without_abort_function_surplus_is_cancelled(tokenizer):
    engine = helpers.FakeEngine(tokenizer, DATA, slow=lambda p: int(p["rid"].split("-")[1]) >= 4 * 4)
    cfg = RolloutConfig(rollout_batch_size=4, n_samples_per_prompt=4, over_sampling_batch_size=6)
    m = RolloutManager(cfg, str(TINY_CHECKPOINT), engine.generate, seed=3, return_routed_experts=False)
    samples, metrics = asyncio.run(asyncio.wait_for(m.generate(0), timeout=30))
    assert len(samples) == 16 and metrics["rollout/aborted_groups"] == 2
    assert metrics["rollout/aborted_requests"] == 8


def test_filter_returning_non_bool_names_the_filter(tokenizer):
    m, _ = make(tokenizer, dynamic_sampling_filter_path="byot_helpers.filter_returns_str")
    with pytest.raises(
        FilterError,
        match=r"--dynamic-sampling-filter-path byot_helpers.filter_returns_str "
        r"returned str 'yes' for the group of samples s0",
    ):
        asyncio.run(m.generate(0))


def test_custom_generate_function_gets_the_row_and_its_text_is_graded(tokenizer):
    """The hook sees label / metadata / tools / sampling params, reaches the engine through ctx.generate, and the
    reward grades its response_text ("= <label>": always right), not the decoded ids."""
    helpers.CALLS.clear()
    m, engine = make(tokenizer, custom_generate_function_path="byot_helpers.generate_and_tag")
    samples, metrics = asyncio.run(m.generate(2))
    assert len(samples) == 16 and all(s.reward == 1.0 for s in samples) and metrics["rollout/reward_mean"] == 1.0
    assert all(r.startswith("hook-2-") for r in engine.requests)
    call = helpers.CALLS[0]
    assert call["label"].isdigit() and call["metadata"] == {} and call["tools"] is None and call["step"] == 2
    assert set(call["params"]) >= {"temperature", "top_p", "max_new_tokens", "sampling_seed"}
    assert all(s.loss_mask == [1] * len(s.response_ids) for s in samples)


@pytest.mark.parametrize(
    "hook,message",
    [
        (
            "generate_raises",
            r"generate-function-path byot_helpers.generate_raises raised on sample s0-\d+: "
            r"KeyError\('no such tool'\)",
        ),
        ("generate_wrong_type", r"byot_helpers.generate_wrong_type returned dict for sample s0-\d+; expected a Sample"),
        ("generate_two", r"byot_helpers.generate_two: group s0-\d+… has 8 samples, expected 4"),
    ],
)
def test_hook_errors_name_the_function_and_the_sample(tokenizer, hook, message):
    m, _ = make(tokenizer, custom_generate_function_path=f"byot_helpers.{hook}")
    with pytest.raises(HookError, match=message):
        asyncio.run(m.generate(0))


def test_rollout_function_replaces_the_step(tokenizer):
    m, engine = make(tokenizer, rollout_function_path="byot_helpers.rollout_fixed")
    samples, metrics = asyncio.run(m.generate(0))
    assert [s.index for s in samples] == list(range(16)) and [s.group for s in samples][:5] == [0, 0, 0, 0, 1]
    assert metrics["rollout/reward_mean"] == 0.5 and not engine.requests
    short, _ = make(tokenizer, rollout_function_path="byot_helpers.rollout_short")
    with pytest.raises(
        RuntimeError,
        match=r"--rollout-function-path byot_helpers.rollout_short returned 3 "
        r"samples at step 0; expected .* = 16",
    ):
        asyncio.run(short.generate(0))


def test_metadata_reaches_a_custom_reward(tokenizer, tmp_path):
    rows = [{"question": [{"role": "user", "content": "1+2"}], "answer": 3, "metadata": {"source": "arith"}}]
    import json

    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 8))
    engine = helpers.FakeEngine(tokenizer, DATA)
    engine.labels[
        tuple(
            engine.tokenizer.apply_chat_template(
                rows[0]["question"], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    ] = "1+2"
    m, _ = make(
        tokenizer,
        engine,
        prompt_data=str(path),
        input_key="question",
        label_key="answer",
        custom_rm_path="byot_helpers.reward_needs_metadata",
    )
    samples, _ = asyncio.run(m.generate(0))
    assert all(s.reward == 1.0 and s.metadata == {"source": "arith"} and s.label == "3" for s in samples)


def test_eval_metrics_and_unbiased_pass_at_k(tokenizer):
    for n, c, k in itertools.product(range(1, 7), range(7), range(1, 7)):
        if c <= n and k <= n:  # brute force: every k-subset of n samples, c of them passing
            subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    groups = [[Sample(0, 0, [1], [2, 3], [0.0, 0.0], reward=r) for r in rewards] for rewards in ([1, 0, 0], [0, 0, 0])]
    m = set_metrics("x", groups)
    assert m["eval/x/pass@1"] == pytest.approx(1 / 6) and m["eval/x/pass@3"] == pytest.approx(0.5)
    assert m["eval/x/reward_mean"] == pytest.approx(1 / 6) and m["eval/x/response_len_mean"] == 2
    ev = EvalConfig(
        eval_prompt_data=("arith", str(TINY_CHECKPOINT.parent / "arith" / "eval.jsonl")),
        n_samples_per_eval_prompt=2,
        eval_max_response_len=8,
    )
    manager, engine = make(tokenizer, eval_cfg=ev)
    metrics = asyncio.run(manager.evaluate(5))
    assert 0 < metrics["eval/arith/pass@1"] < metrics["eval/arith/pass@2"] < 1
    assert len(engine.requests) == 400 and all(r.startswith("eval-arith-5-") for r in engine.requests)


def test_rollout_dump_round_trip(tmp_path):
    s = Sample(
        3,
        0,
        [1, 2],
        [3, 4],
        [-0.5, -0.25],
        reward=1.0,
        finish_reason="length",
        weight_version=7,
        routed_experts=np.arange(3 * 2 * 2, dtype=np.int16).reshape(3, 2, 2),
        label="7",
        metadata={"a": [1, {"b": None}]},
        tools=[{"name": "calc"}],
        loss_mask=[1, 0],
        response_text="x",
        advantage=0.3,
        old_logprobs=np.zeros(2),
    )
    path = tmp_path / "r_4.pt"
    save_rollout(path, 4, [s], {"rollout/reward_mean": 1.0})
    (back,), metrics = load_rollout(path, 4)
    assert metrics == {"rollout/reward_mean": 1.0} and back.advantage == 0.0 and back.old_logprobs is None
    for f in (
        "index",
        "prompt_ids",
        "response_ids",
        "rollout_logprobs",
        "reward",
        "finish_reason",
        "weight_version",
        "label",
        "metadata",
        "tools",
        "loss_mask",
        "response_text",
    ):
        assert getattr(back, f) == getattr(s, f), f
    assert back.routed_experts.dtype == np.int16 and (back.routed_experts == s.routed_experts).all()
    with pytest.raises(ValueError, match="holds rollout 4, expected 5"):
        load_rollout(path, 5)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a rollout dump"):
        load_rollout(tmp_path / "other.pt", 0)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--rm-type", "nope"], r"--rm-type 'nope' unknown; valid: arithmetic, dapo, deepscaler, f1, math, random"),
        (
            ["--custom-rm-path", "no_such_pkg.rewards.fn"],
            r"--custom-rm-path 'no_such_pkg.rewards.fn': cannot import "
            r"module 'no_such_pkg.rewards'",
        ),
        (
            ["--custom-generate-function-path", "nowhere_mod.gen"],
            r"--custom-generate-function-path 'nowhere_mod.gen': "
            r"cannot import module 'nowhere_mod'",
        ),
        (["--dynamic-sampling-filter-path", "byot_helpers.nope"], r"module 'byot_helpers' has no attribute 'nope'"),
        (
            ["--rollout-function-path", "byot_helpers.rollout_fixed", "--over-sampling-batch-size", "32"],
            r"--rollout-function-path replaces the whole rollout step",
        ),
        (["--over-sampling-batch-size", "8"], r"--over-sampling-batch-size 8 must be >= --rollout-batch-size 16"),
        (["--rm-type", "remote_rm"], r"--rm-type remote_rm needs --rm-url"),
        (["--eval-prompt-data", "a"], r"--eval-prompt-data takes NAME PATH pairs \(got 1 words: a\)"),
        (["--eval-interval", "5"], r"--eval-interval / --eval-before-train need --eval-prompt-data NAME PATH"),
        (["--eval-prompt-data", "a", "/no/such.jsonl"], r"--eval-prompt-data: /no/such.jsonl: prompt file not found"),
        (["--save-debug-rollout-data", "dump.pt"], r"--save-debug-rollout-data 'dump.pt' must contain \{rollout_id\}"),
        (
            ["--load-debug-rollout-data", "/no/r_{rollout_id}.pt", "--num-rollout", "2"],
            r"no saved rollout /no/r_0.pt, /no/r_1.pt \(--num-rollout 2\)",
        ),
    ],
)
def test_bad_input_is_named_at_parse_time(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(flags)


def test_eval_schedule():
    ev = EvalConfig(eval_prompt_data=("a", "p"), eval_interval=5, eval_before_train=True)
    assert [s for s in range(0, 13) if ev.due(s, 12)] == [0, 5, 10, 12]
    assert not EvalConfig().due(5, 10) and math.isclose(pass_at_k(4, 4, 1), 1.0)
