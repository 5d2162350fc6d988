"""EmbeddedEngine HTTP API: info endpoints, pause / continue, bad input → 4xx (server stays up), API key."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient, EngineError

PROMPT = [1, 2, 4, 23, 13, 10, 17, 11, 5, 23]  # chat prompt of "63+4"


@pytest.fixture(scope="module")
def client():
    engine = EmbeddedEngine(
        EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), max_batch_size=4, max_request_bytes=64 << 10)
    )
    yield EngineClient(engine.start(), timeout=60)
    engine.shutdown()


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_info_endpoints(client):
    assert client.health() and client.health_generate()
    for path in ("/server_info", "/get_server_info"):
        info = client.get(path)
        assert info["weight_version"] == 0 and info["max_batch_size"] == 4 and info["context_length"] == 128
    for path in ("/model_info", "/get_model_info"):
        info = client.get(path)
        assert info["is_generation"] is True and info["model_path"] == str(TINY_CHECKPOINT)
        assert info["weight_version"] == 0
    assert client.get_load() == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    assert client.flush_cache() == "Cache flushed."
    client.release_memory_occupation()
    assert client.server_info()["memory_released"] == ["kv_cache", "weights"]
    assert client.get("/health_generate") is not None  # answered, not generated: no weights to generate with
    client.resume_memory_occupation(["weights"])  # SGLang's tags, one at a time
    assert client.server_info()["memory_released"] == ["kv_cache"]
    client.resume_memory_occupation()
    assert client.server_info()["memory_released"] == []
    with pytest.raises(EngineError, match="tags"):
        client.release_memory_occupation(["optimizer"])
    with pytest.raises(EngineError, match="tags"):
        client.post("/release_memory_occupation", {"tags": "weights"})


def test_answers_report_their_time_in_the_engine(client):
    """meta_info: SGLang's e2e_latency (arrival to answer) and the decoding batch's time and rows: a burst of
    three requests decodes as one batch, each answer's latency covering that batch."""
    body = {"input_ids": [[5, 6, 7], [8, 9], [10]], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    answers = client.post("/generate", body)
    for a in answers:
        meta = a["meta_info"]
        assert meta["decode_batch_rows"] == 3
        assert 0 < meta["decode_batch_s"] <= meta["e2e_latency"]
    assert len({a["meta_info"]["decode_batch_s"] for a in answers}) == 1


def _generate_in_thread(client, body):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", client.post("/generate", body)))
    thread.start()
    return thread, out


def test_pause_in_place_then_continue(client):
    client.pause(mode="in_place")
    thread, out = _generate_in_thread(client, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}})
    _wait_until(lambda: client.get_load()[0]["num_waiting_reqs"] == 1)
    time.sleep(0.2)
    assert "r" not in out and client.health() and client.server_info()["paused"]
    client.resume()
    thread.join(timeout=30)
    assert out["r"]["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_pause_abort_answers_queued_and_running_requests(client):
    client.pause(mode="in_place")
    thread, out = _generate_in_thread(client, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}})
    _wait_until(lambda: client.get_load()[0]["num_waiting_reqs"] == 1)
    assert client.pause(mode="abort")["num_aborted_queued"] == 1
    thread.join(timeout=30)
    assert out["r"]["meta_info"]["finish_reason"]["type"] == "abort" and out["r"]["output_ids"] == []
    client.resume()
    # a running batch: 4 long rows, aborted at the next decode step after the pause
    long = {
        "input_ids": [PROMPT] * 4,
        "sampling_params": {"max_new_tokens": 118, "ignore_eos": True, "temperature": 1.0},
    }
    thread, out = _generate_in_thread(client, long)
    _wait_until(lambda: client.get_load()[0]["num_reqs"] == 4 and client.get_load()[0]["num_waiting_reqs"] == 0)
    client.pause(mode="abort")
    thread.join(timeout=30)
    client.resume()
    for r in out["r"]:
        assert r["meta_info"]["finish_reason"]["type"] == "abort" and r["meta_info"]["completion_tokens"] < 118
    assert client.generate(PROMPT, {"max_new_tokens": 2})["meta_info"]["completion_tokens"] >= 1


BAD_BODIES = [
    ({"sampling_params": {}}, "input_ids"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [1, "a"]}, "input_ids[1]"),
    ({"input_ids": [1, 2.5]}, "input_ids[1]"),
    ({"input_ids": [1, True]}, "input_ids[1]"),
    ({"input_ids": [1, 32]}, "input_ids[1]"),
    ({"input_ids": [-1]}, "input_ids[0]"),
    ({"input_ids": [[1], [2, 99]]}, "input_ids[1][1]"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": "3"}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 128}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
    ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p"),
    ({"input_ids": [1], "sampling_params": {"stop_token_ids": [1.5]}}, "stop_token_ids"),
    ({"input_ids": [1], "sampling_params": "greedy"}, "sampling_params"),
    ({"input_ids": [[1]] * 5}, "batch of 5"),
    ({"input_ids": [1], "rid": 7}, "rid"),
    ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
    ({"input_ids": [1], "stream": True}, "stream"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES)
def test_bad_generate_input_is_400_naming_the_field(client, body, field):
    with pytest.raises(EngineError) as info:
        client.post("/generate", body)
    assert info.value.status == 400 and field in info.value.message


def _raw_post(url: str, data: bytes, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_malformed_and_oversized_bodies_and_bad_weight_requests(client):
    assert _raw_post(client.url + "/generate", b"{not json") == 400
    assert _raw_post(client.url + "/generate", b"[1, 2]") == 400
    big = json.dumps({"input_ids": [1] * 40000}).encode()  # > 64 KiB
    assert _raw_post(client.url + "/generate", big) == 413
    for path, body, field in [
        ("/weights_checksum", {"names": ["nope"]}, "nope"),
        ("/update_weights_from_tensor", {}, "serialized_named_tensors"),
        ("/update_weights_from_tensor", {"serialized_named_tensors": ["%%%"]}, "serialized_named_tensors"),
        (
            "/update_weights_from_distributed",
            {"names": [], "dtypes": [], "shapes": [], "group_name": "g"},
            "group_name",
        ),
        ("/init_weights_update_group", {"master_address": "127.0.0.1"}, "master_port"),
        ("/pause_generation", {"mode": "sideways"}, "mode"),
    ]:
        with pytest.raises(EngineError) as info:
            client.post(path, body)
        assert info.value.status == 400 and field in info.value.message, (path, info.value.message)
    assert client.health()
    assert client.generate(PROMPT, {"temperature": 0, "max_new_tokens": 3})["meta_info"]["completion_tokens"] >= 1


def test_api_key_required_and_routed_experts_switch():
    engine = EmbeddedEngine(
        EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), api_key="sekret", record_routed_experts=False)
    )
    url = engine.start()
    try:
        for key in (None, "wrong"):
            anonymous = EngineClient(url, api_key=key)
            assert anonymous.health()  # open, as in SGLang (the router health-checks without the key)
            for call in (
                lambda: anonymous.generate(PROMPT, {"max_new_tokens": 2}),
                anonymous.server_info,
                anonymous.get_load,
                lambda: anonymous.weights_checksum(["lm_head.weight"]),
            ):
                with pytest.raises(EngineError) as info:
                    call()
                assert info.value.status == 401
        good = EngineClient(url, api_key="sekret")
        assert good.health() and good.generate(PROMPT, {"max_new_tokens": 2})["output_ids"]
        with pytest.raises(EngineError) as info:  # like SGLang without --enable-return-routed-experts
            good.generate(PROMPT, {"max_new_tokens": 2}, return_routed_experts=True)
        assert info.value.status == 400 and "return_routed_experts" in info.value.message
    finally:
        engine.shutdown()


def test_engine_as_ray_actor():
    ray = pytest.importorskip("ray")
    from glm_rl.engine import engine_actor_class

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = engine_actor_class(num_cpus=1).remote(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT)))
        url = ray.get(actor.start.remote(), timeout=120)
        assert ray.get(actor.get_url.remote()) == url
        answer = EngineClient(url).generate(PROMPT, {"temperature": 0, "max_new_tokens": 3})
        assert answer["meta_info"]["completion_tokens"] >= 1
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.shutdown()
