"""Async RL pieces (issue 19) without engines: partial-rollout merging, the fully-async buffer's staleness and
accounting, the prompt stream's replay, off-policy masking, and the config checks.

The buffer's groups come from a coroutine written here (`_runner`): the producer's contract is only "an awaitable
that returns a rewarded group or raises", so no engine is needed to test its bookkeeping."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from glm_rl.config import parse_args
from glm_rl.overlap import mask_older_versions, staleness_metrics
from glm_rl.rollout import partial
from glm_rl.rollout.async_buffer import AsyncProducer
from glm_rl.rollout.data import PromptRow
from glm_rl.rollout.generation import RequestFailed
from glm_rl.rollout.manager import PromptStream
from glm_rl.rollout.samples import Sample


def _answer(ids, lps, version, finish, routed=None):
    meta = {
        "finish_reason": {"type": finish},
        "weight_version": version,
        "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)],
    }
    if routed is not None:
        meta["routed_experts"] = routed
    return {"text": "", "output_ids": ids, "meta_info": meta}


def test_continuation_asks_for_the_rest_with_its_own_seed_and_rid():
    payload = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 5, "sampling_seed": 10}, "rid": "s0-3"}
    assert partial.continuation(payload, []) is payload
    first = _answer([7, 8], [-0.1, -0.2], 0, "abort")
    body = partial.continuation(payload, [first])
    assert body["input_ids"] == [1, 2, 7, 8] and body["rid"] == "s0-3+1"
    assert body["sampling_params"] == {"max_new_tokens": 3, "sampling_seed": 10 + partial.SEED_STRIDE}
    assert payload["sampling_params"]["max_new_tokens"] == 5  # the original is untouched
    spent = _answer([9, 9, 9], [-1.0] * 3, 1, "abort")
    assert partial.continuation(payload, [first, spent]) is None


def test_merge_keeps_the_prefix_and_records_each_tokens_version():
    # prompt of 2 tokens: rows by position; segment 1 decided positions 0..2, the continuation re-decides them
    first = _answer([7, 8], [-0.1, -0.2], 3, "abort", routed=[[[1]], [[2]], [[3]]])
    rest = _answer([9], [-0.3], 4, "stop", routed=[[[5]], [[5]], [[5]], [[6]]])
    merged = partial.merge([first, rest])
    meta = merged["meta_info"]
    assert merged["output_ids"] == [7, 8, 9]
    assert [lp[0] for lp in meta["output_token_logprobs"]] == [-0.1, -0.2, -0.3]
    assert meta["weight_versions"] == [3, 3, 4] and meta["weight_version"] == 3
    assert meta["routed_experts"].tolist() == [[[1]], [[2]], [[3]], [[6]]]
    assert meta["finish_reason"]["type"] == "stop" and meta["completion_tokens"] == 3
    assert partial.merge([rest]) is rest
    spent = partial.merge([first], finish_if_spent=True)
    assert spent["meta_info"]["finish_reason"]["type"] == "length"


def _sample(version, versions=None, n=3):
    return Sample(
        index=0,
        group=0,
        prompt_ids=[1],
        response_ids=[5] * n,
        rollout_logprobs=[0.0] * n,
        weight_version=version,
        token_versions=versions,
    )


def test_mask_older_versions_and_staleness_metrics():
    mixed = _sample(2, [2, 2, 3])
    mixed.loss_mask = [1, 0, 1]
    same = _sample(3, [3, 3, 3])
    plain = _sample(3)
    assert mask_older_versions([mixed, same, plain]) == 1  # the masked observation is not counted twice
    assert mixed.loss_mask == [0, 0, 1] and same.loss_mask is None and plain.loss_mask is None
    assert staleness_metrics([mixed, same, plain], 4) == {"rollout/staleness_mean": 4 / 3, "rollout/staleness_max": 2}


def test_prompt_stream_replays_given_back_and_untrained_prompts_first():
    rows = [PromptRow(index=i, prompt=str(i), label=str(i), metadata={}, tools=None) for i in range(6)]
    stream = PromptStream(rows, seed=1, shuffle=True)
    first = [i for i, _ in stream.take_indexed(3)]
    stream.give_back(first[1])
    state = stream.state_dict(untrained=[first[2]])
    assert state == {"epoch": 0, "offset": 3, "replay": [first[2], first[1]]}
    resumed = PromptStream(rows, seed=1, shuffle=True)
    resumed.load_state_dict(state)
    order = PromptStream(rows, seed=1, shuffle=True)._make_order()
    assert [i for i, _ in resumed.take_indexed(5)] == [first[2], first[1], *order[3:6]]
    old = PromptStream(rows, seed=1, shuffle=True)
    old.load_state_dict({"epoch": 0, "offset": 2})  # checkpoints from before the replay list
    assert [i for i, _ in old.take_indexed(1)] == [order[2]]


class _Engines:
    """Groups of one sample carrying the version `self.version` held when they finished and their prompt's row in
    metadata; rows in `fail` raise RequestFailed once (an engine died under them)."""

    def __init__(self):
        self.version, self.fail = 0, set()

    async def run(self, launch, row):
        await asyncio.sleep(0.001 * (launch % 3))
        if row in self.fail:
            self.fail.discard(row)
            raise RequestFailed(f"row {row}: engine died")
        sample = _sample(self.version)
        sample.metadata = {"row": row}
        return [sample]


def _producer(engines, stream, batch=2, staleness=1):
    def next_prompt():
        [(i, row)] = stream.take_indexed(1)
        return i, i

    return AsyncProducer(
        batch_groups=batch, max_staleness=staleness, next_prompt=next_prompt, give_back=stream.give_back,
        run_group=engines.run,
    )  # fmt: skip


def test_producer_bounds_staleness_and_accounts_for_every_prompt():
    async def main():
        rows = [PromptRow(index=i, prompt=str(i), label="", metadata={}, tools=None) for i in range(50)]
        stream, engines = PromptStream(rows, seed=0, shuffle=False), _Engines()
        producer = _producer(engines, stream, batch=2, staleness=1)
        engines.fail = {3}
        trained, totals = [], {"launched": 0, "stale_dropped": 0, "failed": 0}
        for step in range(6):
            trainer_version = engines.version
            got = await producer.take(trainer_version, timeout_s=5)
            assert got is not None
            groups, stats = got
            assert len(groups) == 2
            assert all(s.staleness(trainer_version) <= 1 for g in groups for s in g)
            trained += [g[0].metadata["row"] for g in groups]
            for k in totals:
                totals[k] += getattr(stats, k)
            assert len(producer.untrained()) <= 4  # in flight + buffered never exceed (K + 1) x B
            engines.version += 1 if step < 3 else 2  # later steps skip a version: buffered groups go stale
        await producer.stop()
        assert totals["failed"] == 1 and totals["stale_dropped"] >= 1
        buffered, replay = producer.untrained(), list(stream.replay)
        # every prompt taken from the stream is in exactly one place: trained, still buffered, or to be replayed
        assert len(trained) == len(set(trained)) == 12
        assert sorted(trained + buffered + replay) == list(range(stream.offset))

    asyncio.run(main())


def test_producer_raises_a_group_error_that_is_not_an_engine_failure():
    async def main():
        rows = [PromptRow(index=i, prompt="x", label="", metadata={}, tools=None) for i in range(8)]
        stream = PromptStream(rows, seed=0, shuffle=False)

        async def broken(launch, prompt):
            raise ValueError("reward function bug")

        producer = _producer(_Engines(), stream)
        producer.run_group = broken
        with pytest.raises(ValueError, match="reward function bug"):
            await producer.take(0, timeout_s=5)
        await producer.stop()

    asyncio.run(main())


def test_take_times_out_with_none_so_the_driver_can_check_engines():
    async def main():
        rows = [PromptRow(index=i, prompt="x", label="", metadata={}, tools=None) for i in range(8)]
        stream = PromptStream(rows, seed=0, shuffle=False)

        async def hang(launch, prompt):
            await asyncio.sleep(60)

        producer = _producer(_Engines(), stream)
        producer.run_group = hang
        assert await producer.take(0, timeout_s=0.2) is None
        assert len(producer.untrained()) == 4
        await producer.stop()
        assert len(stream.replay) == 4  # cancelled in-flight prompts are given back

    asyncio.run(main())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--one-step-off", "--fully-async"], "exclusive"),
        (["--fully-async", "--max-weight-staleness", "0"], "--max-weight-staleness must be >= 1"),
        (["--partial-rollout"], "--partial-rollout needs --fully-async"),
        (["--fully-async", "--mask-offpolicy-in-partial-rollout"], "needs --partial-rollout"),
        (["--fully-async", "--colocate"], "--fully-async needs engines on their own devices"),
        (["--one-step-off", "--load-debug-rollout-data", "d/r_{rollout_id}.pt"], "--one-step-off overlaps"),
    ],
)
def test_async_flags_are_checked(argv, message):
    with pytest.raises((ValueError, SystemExit)) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_staleness_of_a_sample_is_its_oldest_token():
    s = _sample(2, [2, 3, 3])
    assert s.staleness(4) == 2
    assert np.isclose(staleness_metrics([s], 3)["rollout/staleness_mean"], 1.0)
