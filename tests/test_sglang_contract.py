"""Contract tests against the pinned SGLang (0.5.23), whose names are extracted into
glm_rl/rollout/sglang_contract.json by tools/extract_sglang_contract.py.

Verified: every server flag we emit exists in SGLang's launch_server parser; every field of every request body
our client and rollout manager send exists in SGLang's request types (io_struct.py) and sampling params.
NOT verified (SGLang cannot run here): value types and semantics, response formats (e.g. how SGLang encodes
routed experts), HTTP routes, and runtime behaviour. The lifecycle test uses a fake `sglang` package that serves
our embedded engine.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import AutoConfig

from glm_rl.config import RolloutConfig
from glm_rl.engine import EmbeddedEngine, EngineConfig, routed_experts
from glm_rl.engine.routed_experts import FORMAT_KEY, RoutingLayout
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.manager import RolloutManager
from glm_rl.rollout.sglang_engine import SGLangEngine, SGLangServerConfig, build_command, contract

SNAPSHOTS = Path(__file__).parent / "snapshots"

CONFIGS = {
    "plain": SGLangServerConfig(model_path="/models/GLM-4.5-Air", port=30000),
    "air_r3_colocate": SGLangServerConfig(
        model_path="/models/GLM-4.5-Air",
        port=30001,
        tp_size=8,
        ep_size=8,
        enable_dp_attention=True,
        dp_size=8,
        mem_fraction_static=0.7,
        context_length=32768,
        enable_return_routed_experts=True,
        enable_memory_saver=True,
        random_seed=1234,
    ),
    "355b_mtp_fp8": SGLangServerConfig(
        model_path="/models/GLM-4.5-FP8",
        port=30002,
        tp_size=8,
        ep_size=8,
        quantization="fp8",
        speculative_num_steps=1,
        speculative_eagle_topk=1,
        speculative_num_draft_tokens=2,
        extra_args=(("cuda-graph-max-bs-decode", "64"), ("disable-radix-cache", None)),
    ),
}


def test_contract_is_the_pinned_version():
    assert contract()["sglang_version"] == "0.5.23"
    assert "--enable-return-routed-experts" in contract()["server_flags"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_command_snapshot(name, update_snapshots):
    cmd = build_command(CONFIGS[name], python="python")
    text = "\n".join(cmd) + "\n"
    path = SNAPSHOTS / f"sglang_command_{name}.txt"
    if update_snapshots:  # pytest --update-snapshots
        path.write_text(text)
    assert path.exists(), f"no committed snapshot {path.name}: run pytest --update-snapshots and review it"
    assert text == path.read_text()
    flags = [t for t in cmd[3:] if t.startswith("--")]
    assert set(flags) <= set(contract()["server_flags"])


def test_unknown_pass_through_flag_is_refused():
    cfg = SGLangServerConfig(model_path="/m", extra_args=(("no-such-flag", "1"),))
    with pytest.raises(ValueError, match=r"no server flag\(s\) \['--no-such-flag'\]"):
        build_command(cfg)


def test_rollout_payload_fields_exist_in_sglang():
    m = RolloutManager(RolloutConfig(), str(TINY_CHECKPOINT), generate=None, seed=1, return_routed_experts=True)
    payload = m.payload([1, 2, 3], step=0, index=0)
    assert set(payload) <= set(contract()["requests"]["GenerateReqInput"])
    assert set(payload["sampling_params"]) <= set(contract()["sampling_params"])


class _Capture(http.server.BaseHTTPRequestHandler):
    bodies: dict[str, dict] = {}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        _Capture.bodies[self.path] = body
        out = json.dumps({"success": True, "weight_version": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_client_request_bodies_exist_in_sglang():
    """The client's bodies, captured by a recording HTTP server standing in for SGLang."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = EngineClient(f"http://127.0.0.1:{server.server_address[1]}")
        c.generate(
            [1, 2], {"temperature": 1.0, "max_new_tokens": 4}, return_logprob=True, return_routed_experts=True, rid="r"
        )
        c.init_weights_update_group("127.0.0.1", 1234, 1, 2, "g")
        c.update_weights_from_distributed(["a"], [torch.float32], [[2]], "g", weight_version=1)
        c.update_weights_from_tensor([("a", torch.zeros(2))], weight_version=1)
        c.destroy_weights_update_group("g")
        c.pause()
        c.resume()
        c.release_memory_occupation()
        c.resume_memory_occupation()
        c.flush_cache()
    finally:
        server.shutdown()
    req = contract()["requests"]
    expected = {
        "/generate": "GenerateReqInput",
        "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
        "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
        "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
        "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
        "/pause_generation": "PauseGenerationReqInput",
        "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
        "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
    }
    for path, request_type in expected.items():
        assert path in _Capture.bodies, path
        assert set(_Capture.bodies[path]) <= set(req[request_type]), (path, set(_Capture.bodies[path]))


def test_engine_lifecycle_with_fake_sglang(monkeypatch):
    """Process group start, health wait, generation through our client, shutdown kills the children."""
    fake = str(Path(__file__).parent / "fake_sglang")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([fake, os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = SGLangEngine(
        SGLangServerConfig(model_path=str(TINY_CHECKPOINT), port=port, enable_return_routed_experts=True),
        startup_timeout_s=120,
    )
    url = engine.start()
    try:
        prompt, greedy = [1, 2, 4, 23, 8, 17, 9, 5, 23], {"temperature": 0, "max_new_tokens": 6}
        out = EngineClient(url).generate(prompt, greedy, return_logprob=True, return_routed_experts=True)
        assert len(out["output_ids"]) == len(out["meta_info"]["output_token_logprobs"]) > 0
        # SGLang's routed-experts form (int32 over every layer) decodes to what the compact form carries
        assert isinstance(out["meta_info"]["routed_experts"], str) and FORMAT_KEY not in out["meta_info"]
        layout = RoutingLayout.of(AutoConfig.from_pretrained(TINY_CHECKPOINT))
        sglang_rows = routed_experts.decode(out["meta_info"], layout)
        local = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT)))
        try:
            ours = EngineClient(local.start()).generate(prompt, greedy, return_routed_experts=True)
        finally:
            local.shutdown()
        assert ours["output_ids"] == out["output_ids"]
        compact = routed_experts.decode(ours["meta_info"])
        assert compact.shape == (len(prompt) + len(out["output_ids"]) - 1, len(layout.moe_layers), layout.top_k)
        assert np.array_equal(sglang_rows, compact)
        children = psutil.Process(engine.proc.pid).children(recursive=True)
        assert children
    finally:
        engine.shutdown()
    assert engine.proc.poll() is not None
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
