"""Hostile and careless input (issue 24): no code runs through an engine's port, the admin API needs the run's
secret, a stuck weight-group join frees its thread, bad sampling values and deep JSON are 400s, and a Ray
cluster someone else runs on this machine is never joined by `glm-rl train`."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.engine.http_parse import BadRequest, parse_json_body
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.ray.addresses import free_port
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.weights.wire import FORMAT, serialize_named_tensors, tensor_checksum

KEY = "run-secret"
PROMPT = [1, 2, 4, 23, 13, 10, 17, 11, 5, 23]
WEIGHT_ROUTES = [
    "/update_weights_from_tensor",
    "/update_weights_from_distributed",
    "/init_weights_update_group",
    "/destroy_weights_update_group",
    "/weights_checksum",
    "/p2p/prepare",
    "/p2p/commit",
    "/p2p/close",
]


@pytest.fixture(scope="module")
def engines():
    """(keyed, keyless) engines in this process; joins time out after 1 s."""
    keyed = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), api_key=KEY, weight_group_timeout_s=1))
    keyless = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), weight_group_timeout_s=1))
    keyed.start(), keyless.start()
    yield keyed, keyless
    keyed.shutdown(), keyless.shutdown()


def _post(url: str, data: bytes, key: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class _Touch:
    """Unpickling this creates `path` (through os.system, as an attacker's payload would run anything)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def _hostile_bodies(marker: Path) -> dict[str, list[bytes]]:
    """Per weight route: the raw pickle as the body, and JSON bodies carrying it (base64) in every field."""
    raw = pickle.dumps([("lm_head.weight", _Touch(marker))])
    b64 = base64.b64encode(raw).decode()
    fields = {
        "/update_weights_from_tensor": [
            {"serialized_named_tensors": [b64]},
            {"serialized_named_tensors": [b64], "load_format": "flattened_bucket"},
        ],
        "/update_weights_from_distributed": [{"names": [b64], "dtypes": [b64], "shapes": [[1]], "group_name": b64}],
        "/init_weights_update_group": [
            {
                "master_address": "127.0.0.1",
                "master_port": 1,
                "rank_offset": 1,
                "world_size": 2,
                "group_name": b64,
                "backend": b64,
            }
        ],
        "/destroy_weights_update_group": [{"group_name": b64}],
        "/weights_checksum": [{"names": [b64]}],
        "/p2p/prepare": [{"tensors": [b64], "buffer_bytes": 8}],
        "/p2p/commit": [{"weight_version": b64}],
        "/p2p/close": [],
    }
    return {route: [raw] + [json.dumps(b).encode() for b in bodies] for route, bodies in fields.items()}


def test_crafted_pickle_never_runs(engines, tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Touch(live)))  # the payload is live: plain unpickling runs it
    assert live.exists()
    marker = tmp_path / "pwned"
    keyed, keyless = engines
    bodies = _hostile_bodies(marker)
    assert set(bodies) == set(WEIGHT_ROUTES)
    for route, payloads in bodies.items():
        for data in payloads:
            for url, key, expected in (
                (keyless.url, None, 400),
                (keyless.url, KEY, 400),
                (keyed.url, None, 401),
                (keyed.url, "wrong", 401),
                (keyed.url, KEY, 400),
            ):
                status, answer = _post(url + route, data, key)
                assert status == expected, (route, key, status, answer)
                assert not marker.exists(), (route, key)
    assert keyed.weight_version == keyless.weight_version == 0


def test_sglang_pickled_form_only_with_the_key(engines):
    keyed, keyless = engines
    t = torch.full_like(keyed.weights.state["model.norm.weight"], 0.5)
    body = json.dumps(
        {"serialized_named_tensors": [serialize_named_tensors([("model.norm.weight", t)])], "weight_version": 3}
    ).encode()
    status, answer = _post(keyless.url + "/update_weights_from_tensor", body)
    assert status == 400 and "API key" in answer
    status, answer = _post(keyed.url + "/update_weights_from_tensor", body, KEY)  # SGLang's form, trusted caller
    assert status == 200 and json.loads(answer)["weight_version"] == 3
    assert keyed.weights.checksums(["model.norm.weight"])["checksums"]["model.norm.weight"] == tensor_checksum(t)


def test_admin_routes_need_the_key(engines):
    keyed, _ = engines
    routes = {(r.method, r.resource.canonical) for r in keyed._server.app.router.routes() if r.method != "HEAD"}
    open_routes = {("GET", "/health"), ("GET", "/health_generate")}  # as SGLang: the router health-checks
    assert {
        ("POST", "/pause_generation"),
        ("*", "/flush_cache"),
        ("POST", "/release_memory_occupation"),
        *(("POST", r) for r in WEIGHT_ROUTES),
    } <= routes
    for method, path in sorted(routes - open_routes):
        req = urllib.request.Request(
            keyed.url + path, data=b"{}" if method != "GET" else None, method="POST" if method == "*" else method
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 401, path
    info = EngineClient(keyed.url, api_key=KEY).server_info()
    assert not info["paused"] and not info["memory_released"] and info["weight_groups"] == []


def _recording(client: EngineClient) -> list[dict]:
    bodies, post = [], client.post
    client.post = lambda path, body=None: bodies.append(body) or post(path, body)
    return bodies


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed-by-reference", "keyless-inline"])
def test_our_client_sends_the_json_format(engines, keyed):
    engine = engines[0] if keyed else engines[1]
    client = EngineClient(engine.url, api_key=KEY if keyed else None)
    bodies = _recording(client)
    new = [
        ("lm_head.weight", torch.randn(engine.weights.state["lm_head.weight"].shape)),
        ("model.norm.weight", torch.randn(engine.weights.state["model.norm.weight"].shape).t()),
    ]
    assert client.update_weights_from_tensor(new, weight_version=7)["weight_version"] == 7
    flat = torch.cat([t.reshape(-1) for _, t in new]).view(torch.uint8)  # not the engine's layout: view by view
    layout = [
        ["lm_head.weight", "float32", list(new[0][1].shape), 0],
        ["model.norm.weight", "float32", list(new[1][1].shape), new[0][1].numel() * 4],
    ]
    assert client.update_weights_from_flat(flat, layout, weight_version=8)["weight_version"] == 8
    for body in bodies:
        doc = json.loads(body["serialized_named_tensors"][0])
        assert doc["format"] == FORMAT
        assert {b["kind"] for b in doc["buffers"]} == ({"shm"} if keyed else {"inline"})
    sums = client.weights_checksum([n for n, _ in new])["checksums"]
    assert sums == {n: tensor_checksum(t) for n, t in new}


def _doc(buffers: list, tensors: list) -> bytes:
    return json.dumps(
        {"serialized_named_tensors": [json.dumps({"format": FORMAT, "buffers": buffers, "tensors": tensors})]}
    ).encode()


def test_bad_json_payloads_are_400(engines):
    keyed, keyless = engines
    inline = {"kind": "inline", "nbytes": 8, "data": base64.b64encode(bytes(8)).decode()}
    spec = {"name": "model.norm.weight", "buffer": 0, "dtype": "float32", "shape": [2], "stride": [1], "offset": 0}
    shm = {"kind": "shm", "manager": "/tmp/x/manager.sock", "handle": "/torch_1_2_3", "nbytes": 8}
    cases = [
        (keyless, _doc([shm], [spec]), "authenticated"),
        (keyless, _doc([{**shm, "kind": "cuda_ipc"}], [spec]), "authenticated"),
        (keyed, _doc([{**shm, "handle": "/../etc/passwd"}], [spec]), "handle"),
        (keyed, _doc([shm], [spec]), "manager"),
        (keyless, _doc([inline], [{**spec, "offset": 1}]), "overruns"),
        (keyless, _doc([inline], [{**spec, "shape": [1, 2], "stride": [0]}]), "stride"),
        (keyless, _doc([inline], [{**spec, "dtype": "Tensor"}]), "dtype"),
        (keyless, _doc([{**inline, "data": "%%"}], [spec]), "base64"),
        (keyless, _doc([inline], [{**spec, "buffer": 3}]), "buffer"),
        (keyless, json.dumps({"serialized_named_tensors": ["{" * 50_000]}).encode(), "serialized_named_tensors"),
    ]
    for engine, body, word in cases:
        status, answer = _post(engine.url + "/update_weights_from_tensor", body, KEY if engine is keyed else None)
        assert status == 400 and word in answer, (word, status, answer)


def test_stuck_weight_group_joins_time_out_and_free_their_threads(engines):
    """Joins to a group whose other rank never comes (the store's host is this test) answer 400 after the 1 s
    timeout, more of them than the server has threads; the engine then serves and joins as before."""
    _, keyless = engines
    client = EngineClient(keyless.url, timeout=60)
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, 3, is_master=True, wait_for_workers=False)
    answers: list[tuple[int, str]] = []

    def join(name: str) -> None:
        body = {
            "master_address": "127.0.0.1",
            "master_port": port,
            "rank_offset": 1,
            "world_size": 3,
            "group_name": name,
        }
        answers.append(_post(keyless.url + "/init_weights_update_group", json.dumps(body).encode()))

    assert EngineConfig(hf_checkpoint="x").weight_group_timeout_s <= 30  # the default: seconds, not minutes
    first = threading.Thread(target=join, args=("g",))
    first.start()
    time.sleep(0.3)
    join("g")  # the name is taken while the first join waits: refused at once
    first.join(timeout=60)
    assert [s for s, _ in answers] == [400, 400]
    assert "already exists" in answers[0][1] and "timed out after 1 s" in answers[1][1]
    t0 = time.monotonic()
    threads = [threading.Thread(target=join, args=(f"g{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [s for s, _ in answers] == [400] * 10 and time.monotonic() - t0 < 20
    assert client.server_info()["weight_groups"] == [] and client.pause()["success"] and client.resume()
    assert client.generate(PROMPT, {"temperature": 0, "max_new_tokens": 2})["output_ids"]
    del store


BAD_SAMPLING = [
    ('{"temperature": NaN}', "temperature"),
    ('{"temperature": Infinity}', "temperature"),
    ('{"temperature": -Infinity}', "temperature"),
    ('{"temperature": 1e999}', "temperature"),
    ('{"temperature": 1' + "0" * 400 + "}", "temperature"),
    ('{"top_p": NaN}', "top_p"),
    ('{"top_p": 1.5}', "top_p"),
    ('{"top_p": -0.1}', "top_p"),
    ('{"top_p": Infinity}', "top_p"),
    ('{"top_k": 0}', "top_k"),
    ('{"top_k": -2}', "top_k"),
    ('{"max_new_tokens": -1}', "max_new_tokens"),
    ('{"max_new_tokens": 1e3}', "max_new_tokens"),
]


def test_bad_sampling_values_and_deep_bodies_are_400(engines):
    _, keyless = engines
    for sampling, field in BAD_SAMPLING:
        body = f'{{"input_ids": {PROMPT}, "sampling_params": {sampling}}}'.encode()
        status, answer = _post(keyless.url + "/generate", body)
        assert status == 400 and f"sampling_params.{field}" in answer, (sampling, status, answer)
    for depth in (50_000, 40):
        body = b'{"input_ids": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
        status, answer = _post(keyless.url + "/generate", body)
        assert status == 400 and "nested deeper" in answer, (depth, status, answer)
    assert EngineClient(keyless.url).generate(PROMPT, {"temperature": 0, "max_new_tokens": 2})["output_ids"]


def test_json_depth_cap_is_exact():
    def nested(depth: int) -> bytes:
        return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert parse_json_body(nested(32)) and parse_json_body(b"  ") == {}
    with pytest.raises(BadRequest, match="nested deeper than 32"):
        parse_json_body(nested(33))
    big = json.dumps({"input_ids": [[7] * 1000] * 64, "sampling_params": [{"top_p": 1.0}] * 64}).encode()
    assert len(parse_json_body(big)["input_ids"]) == 64  # many containers, shallow: fine


# -- someone else's Ray ---------------------------------------------------------------------------------------
@pytest.fixture
def foreign_ray():
    """A `ray start --head --block` cluster of this test (own temp dir and ports), stopped by its pid (SIGTERM:
    the blocking `ray start` drains and stops what it started). Yields its address. The temp dir is short: Ray's
    unix socket paths live under it."""
    ray = shutil.which("ray") or pytest.skip("no ray CLI")
    temp = Path(tempfile.mkdtemp(prefix="ray"))
    port = free_port()
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "1",
            "--num-gpus",
            "0",
            "--temp-dir",
            str(temp),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--ray-client-server-port",
            ports[0],
            "--dashboard-port",
            ports[1],
            "--dashboard-agent-listen-port",
            ports[2],
            "--object-store-memory",
            str(100 << 20),
        ],
        stdout=(temp / "start.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (temp / "start.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this test started
            proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_train_starts_its_own_ray_beside_a_running_cluster(foreign_ray, tmp_path):
    """RAY_ADDRESS names the foreign cluster, so a bare `ray.init()` would join it (and die: "num_cpus and
    num_gpus must not be provided"); `glm-rl train` without --ray-address starts its own and runs to the end.
    Colocated, `tensor` sync: the JSON weight format by reference, with the run's secret, in a real run."""
    env = dict(os.environ, RAY_ADDRESS=foreign_ray)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "glm_rl.cli",
        "train",
        "--output-dir",
        str(out),
        "--num-rollout",
        "2",
        "--rollout-batch-size",
        "2",
        "--n-samples-per-prompt",
        "2",
        "--no-report",
        "--colocate",
        "--update-weight-transfer-mode",
        "tensor",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["sync/verified"] == 1.0 for r in rows)
