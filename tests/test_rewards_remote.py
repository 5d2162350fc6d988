"""Remote and custom rewards: a real reward-server process against the built-in grader, retries, timeouts,
bounded concurrency, group scoring, reply checking, and custom functions loaded by dotted path.

Every server here listens on 127.0.0.1 only: the `glm_rl.rollout.rewards.server` process, or small in-process
aiohttp apps that misbehave on purpose (fail, hang, answer garbage)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from aiohttp import web

from glm_rl.rollout.rewards import (
    RemoteRewardClient,
    RemoteRewardError,
    RewardError,
    RewardRequest,
    build_rewarder,
    get_reward_fn,
    reward_option_errors,
)
from glm_rl.rollout.rewards.custom import CustomRewardError, load_function
from glm_rl.rollout.rewards.server import make_app

SAMPLES = [  # (response, label) for the math grader, right and wrong
    (r"so \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{2/4}", "1/2"),
    (r"\boxed{0.33}", r"\frac13"),
    ("It costs 1,000 dollars.", "1000"),
    (r"\boxed{(1,2]}", "[1,2]"),
    (r"\boxed{x = 3}", "3"),
    (r"\boxed{50\%}", "0.5"),
    ("no answer here", "4"),
    (r"\boxed{\frac{1}{2}", "0.5"),
    (r"\boxed{-3}", "3"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    ("The result is 8, not 3.", "8"),
]


def requests(samples=SAMPLES, label=None):
    return [
        RewardRequest(r, label if label is not None else g, {"i": i}, "a prompt", f"s0-{i}")
        for i, (r, g) in enumerate(samples)
    ]


# -- a real reward-server process ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def math_server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "glm_rl.rollout.rewards.server", "--rm-type", "math", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while not any("reward server:" in x for x in lines) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    url = next((x.split(" on ")[-1].strip() for x in lines if "reward server:" in x), None)
    try:
        assert url, f"reward server did not start: {''.join(lines)}"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_server_process_matches_builtin_grader(math_server):
    expected = [get_reward_fn("math")(r, g) for r, g in SAMPLES]
    assert 0 < sum(expected) < len(expected)  # both kinds present

    async def run():
        client = RemoteRewardClient(math_server, max_concurrency=4, timeout_s=20)
        try:
            return await asyncio.gather(*(client.score(r) for r in requests()))
        finally:
            await client.close()

    assert asyncio.run(run()) == expected


def test_server_process_scores_a_group(math_server):
    group = requests([(r, "0.5") for r in (r"\boxed{\frac12}", r"\boxed{0.4}", "it is 0.5", r"\boxed{50\%}")])

    async def run():
        rewarder = build_rewarder("remote_rm", rm_url=math_server, group_rm=True, timeout_s=20)
        try:
            return await rewarder.score_group(group)
        finally:
            await rewarder.close()

    assert asyncio.run(run()) == [1.0, 0.0, 1.0, 1.0]


# -- misbehaving in-process servers -------------------------------------------------------------------------
def replying(value, status=200):
    async def handler(request):
        return web.json_response(value, status=status)

    return handler


async def _start(handler, path="/reward"):
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)  # don't wait for handlers that hang
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}{path}"


def _with_server(handler, body):
    async def run():
        runner, url = await _start(handler)
        try:
            return await body(url)
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def test_server_failing_twice_is_retried():
    calls = []

    async def flaky(request):
        calls.append(await request.json())
        return web.Response(status=503, text="warming up") if len(calls) <= 2 else web.json_response(0.75)

    async def body(url):
        client = RemoteRewardClient(url, max_retries=3, backoff_s=0.01)
        try:
            return await client.score(requests()[0]), client.retried
        finally:
            await client.close()

    assert _with_server(flaky, body) == (0.75, 2)
    assert len(calls) == 3 and calls[0]["name"] == "s0-0" and calls[0]["metadata"] == {"i": 0}


def test_server_that_never_answers_fails_naming_the_sample_within_the_timeout():
    async def hang(request):
        await asyncio.sleep(60)

    async def body(url):
        client = RemoteRewardClient(url, timeout_s=0.3, max_retries=1, backoff_s=0.05)
        t0 = time.monotonic()
        try:
            with pytest.raises(RemoteRewardError, match=r"sample s0-7: .*failed 2 times.*no answer within 0.3s"):
                await client.score(requests()[7])
        finally:
            await client.close()
        return time.monotonic() - t0

    assert _with_server(hang, body) < 2.0  # 2 attempts of 0.3 s, one 0.05 s backoff, and slack for a busy CPU


def test_nobody_listening_fails_naming_the_sample():
    async def run():
        runner, url = await _start(replying(1))
        await runner.cleanup()  # the port is free again: connections are refused
        client = RemoteRewardClient(url, max_retries=2, backoff_s=0.01)
        try:
            with pytest.raises(RemoteRewardError, match="sample s0-3: .*failed 3 times"):
                await client.score(requests()[3])
        finally:
            await client.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "reply,status,match",
    [
        ({"score": 1}, 200, r"sample s0-0: .*without 'reward' \(keys: \['score'\]\); set --reward-key"),
        ("not a number", 200, "sample s0-0: a reward must be a finite number"),
        (None, 200, "sample s0-0: a reward must be a finite number"),
        ({"error": "bad input"}, 400, "sample s0-0: .*HTTP 400"),
    ],
)
def test_unusable_replies_fail_at_once_naming_the_sample(reply, status, match):
    calls = []

    async def handler(request):
        calls.append(1)
        return web.json_response(reply, status=status)

    async def body(url):
        client = RemoteRewardClient(url, max_retries=3, backoff_s=0.01)
        try:
            with pytest.raises(RewardError, match=match):
                await client.score(requests()[0])
        finally:
            await client.close()

    _with_server(handler, body)
    assert len(calls) == 1  # not retried: the same question would get the same answer


def test_reward_key_reads_an_object_reply():
    async def body(url):
        client = RemoteRewardClient(url, reward_key="score")
        try:
            return await client.score(requests()[0])
        finally:
            await client.close()

    assert _with_server(replying({"score": 0.25, "why": "partial"}), body) == 0.25


def test_concurrency_is_bounded():
    state = {"now": 0, "peak": 0}

    async def slow(request):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return web.json_response(1)

    async def body(url):
        client = RemoteRewardClient(url, max_concurrency=3)
        try:
            return await client.score_group(requests())
        finally:
            await client.close()

    assert _with_server(slow, body) == [1.0] * len(SAMPLES)
    assert state["peak"] == 3


def test_group_reply_must_have_one_reward_per_sample():
    async def body(url):
        client = RemoteRewardClient(url, group=True)
        try:
            with pytest.raises(RewardError, match=r"samples s0-0, s0-1, s0-2, s0-3, … \(12 in all\): expected a list"):
                await client.score_group(requests(label="1"))
        finally:
            await client.close()

    _with_server(replying([1, 0]), body)


# -- custom functions ------------------------------------------------------------------------------------------
@pytest.fixture
def task_module(tmp_path, monkeypatch):
    (tmp_path / "my_task_rewards.py").write_text(
        textwrap.dedent("""
        import asyncio

        def exact(response, label, metadata=None):
            return float(response.strip() == label) + metadata.get("bonus", 0)

        async def exact_async(response, label, metadata=None, prompt=None):
            await asyncio.sleep(0)
            return float(response.strip() == label and prompt == "a prompt")

        def best_of_group(responses, label, metadata):
            return [float(len(r) == max(map(len, responses))) for r in responses]

        def broken(response, label, metadata=None):
            raise KeyError("label_id")

        NOT_A_FUNCTION = 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_task_rewards"


def test_custom_functions_sync_async_and_group(task_module):
    group = [RewardRequest(r, "ab", {"bonus": 0.5}, "a prompt", f"s1-{i}") for i, r in enumerate(["ab", "abc", "x"])]

    async def run():
        sync = build_rewarder(custom_rm_path=f"{task_module}.exact")
        asyn = build_rewarder(custom_rm_path=f"{task_module}.exact_async")
        grouped = build_rewarder(custom_rm_path=f"{task_module}.best_of_group", group_rm=True)
        return (
            await sync.score_group(group),
            await asyn.score_group(group),
            await grouped.score_group(group),
            await grouped.score(group[0]),
        )

    assert asyncio.run(run()) == ([1.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 1.0)


def test_custom_function_that_raises_names_the_sample(task_module):
    rewarder = build_rewarder(custom_rm_path=f"{task_module}.broken")
    with pytest.raises(RewardError, match=r"sample s0-2 \(my_task_rewards.broken\) raised KeyError\('label_id'\)"):
        asyncio.run(rewarder.score(requests()[2]))


@pytest.mark.parametrize(
    "path,match",
    [
        (
            "no_such_pkg_xyz.rewards.fn",
            r"cannot import module 'no_such_pkg_xyz.rewards' \(No module named 'no_such_pkg",
        ),
        ("my_task_rewards.missing", "module 'my_task_rewards' has no attribute 'missing'"),
        ("my_task_rewards.NOT_A_FUNCTION", "int object is not callable"),
        ("justonename", "expected 'package.module.function'"),
    ],
)
def test_custom_path_errors_name_the_module(task_module, path, match):
    with pytest.raises(CustomRewardError, match=rf"--custom-rm-path '{path}': {match}"):
        load_function(path)
    assert reward_option_errors("math", custom_rm_path=path)  # what config validation will show


def test_option_errors_name_the_flags():
    assert reward_option_errors("remote_rm") == ["--rm-type remote_rm needs --rm-url"]
    assert "expected an http" in reward_option_errors("remote_rm", rm_url="localhost:9000")[0]
    assert "--group-rm needs" in reward_option_errors("math", group_rm=True)[0]
    assert "only read with --rm-type remote_rm" in reward_option_errors("math", rm_url="http://x")[0]
    assert reward_option_errors("boxed_math") == []
    with pytest.raises(ValueError, match="unknown reward 'nope'.*arithmetic, dapo"):
        build_rewarder("nope")


def test_server_app_serves_a_custom_group_function(task_module):
    rewarder = build_rewarder(custom_rm_path=f"{task_module}.best_of_group", group_rm=True)

    async def run():
        runner = web.AppRunner(make_app(rewarder, description="custom"), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/reward"
        client = RemoteRewardClient(url, group=True, max_retries=0)
        try:
            rewards = await client.score_group(requests([("a", "x"), ("abc", "x")], label="x"))
            with pytest.raises(RemoteRewardError, match="HTTP 400.*'responses' must be a non-empty list"):
                await client._post({"responses": []}, "a bad body")
            return rewards
        finally:
            await client.close()
            await runner.cleanup()

    assert asyncio.run(run()) == [0.0, 1.0]
