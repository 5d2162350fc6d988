"""Block-wise FP8: the converter, FP8 checkpoints on the loader / engine / eval path, and `--rollout-fp8` sync.

Error bound asserted (derivation in `glm_rl/models/fp8.py`): e4m3fn keeps 3 mantissa bits, so a value whose
scaled magnitude is normal (>= 2^-6) is rounded to nearest with error <= half an ulp = 2^-4 of its magnitude;
below 2^-6 the subnormal spacing is 2^-9, so the error is <= 2^-10 in scaled units, i.e. 2^-10 * s with the
block's scale s = amax / 448. Per element: |W - deq(W)| <= max(2^-4 |W|, 2^-10 s) (x (1 + 2^-20) for fp32
rounding of W / s and q * s). Consequences also checked: every block's relative Frobenius error is <= 2^-4
(< 2^-3, the bound the issue names; the subnormal term is at most 2^-10 / 448 of amax), all-zero blocks come
back exactly, and a scale grid shifted by one block breaks the bound (so the test sees a wrong block mapping).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.evaluate import evaluate
from glm_rl.models import fp8
from glm_rl.models.glm45.checkpoint import CheckpointError, load_hf_model, load_mtp
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.data import load_prompts
from glm_rl.rollout.engine_client import EngineClient, EngineError
from glm_rl.rollout.rewards import get_reward_fn
from glm_rl.weights.modes import make_transport
from glm_rl.weights.wire import tensor_checksum

TOOL = Path(__file__).resolve().parent.parent / "tools" / "convert_hf_to_fp8.py"
EVAL = TINY_CHECKPOINT.parent / "arith" / "eval.jsonl"
UNQUANTIZED = [
    "lm_head.weight",
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.layers.1.mlp.gate.weight",
    "model.layers.1.mlp.gate.e_score_correction_bias",
    "model.layers.0.input_layernorm.weight",
    "model.layers.2.self_attn.q_norm.weight",
    "model.layers.2.self_attn.q_proj.bias",
    "model.layers.4.eh_proj.weight",
    "model.layers.4.enorm.weight",
    "model.layers.4.hnorm.weight",
    "model.layers.4.shared_head.head.weight",
    "model.layers.4.shared_head.norm.weight",
    "model.layers.4.embed_tokens.weight",
    "model.layers.4.mlp.gate.weight",
]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_hf_to_fp8", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bound(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape[-2:]
    s_full = s.repeat_interleave(fp8.BLOCK, -2).repeat_interleave(fp8.BLOCK, -1)[..., :rows, :cols]
    return torch.maximum(2**-4 * w.abs(), 2**-10 * s_full) * (1 + 2**-20)


def _block_rel_errors(w: torch.Tensor, d: torch.Tensor) -> list[float]:
    out = []
    for i in range(0, w.shape[-2], fp8.BLOCK):
        for j in range(0, w.shape[-1], fp8.BLOCK):
            a, b = w[..., i : i + fp8.BLOCK, j : j + fp8.BLOCK], d[..., i : i + fp8.BLOCK, j : j + fp8.BLOCK]
            out.append(float((a - b).norm() / a.norm()) if a.norm() > 0 else float((b != 0).sum()))
    return out


@pytest.fixture(scope="module")
def originals() -> dict[str, torch.Tensor]:
    with safe_open(TINY_CHECKPOINT / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "glm45-tiny-fp8"
    summary = _tool().convert(TINY_CHECKPOINT, out, progress=False)
    assert summary["quantized"] == 131 and summary["bytes_out"] < summary["bytes_in"] / 3
    return out


# -- the format --------------------------------------------------------------------------------------------
def test_round_trip_within_e4m3_bound_partial_and_zero_blocks():
    gen = torch.Generator().manual_seed(0)
    # 300 x 257: 3 x 3 blocks, the last row / column partial; magnitudes 1e-5 .. 1e3 differ block to block
    w = torch.randn(300, 257, generator=gen) * torch.logspace(-5, 3, 257)[None, :]
    w[128:256, 128:256] = 0.0  # an all-zero block
    q, s = fp8.quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 3) and s[1, 1] == 1.0
    d = fp8.dequantize_blockwise(q, s)
    assert ((w - d).abs() <= _bound(w, s)).all()
    assert torch.equal(d[128:256, 128:256], torch.zeros(128, 128))
    assert max(_block_rel_errors(w, d)) <= 2**-4
    assert q.float().abs().amax() == fp8.FP8_MAX  # each block's largest value maps to 448
    # control: the same bytes with a scale grid shifted by one block column violate the bound
    shifted = fp8.dequantize_blockwise(q, s.roll(1, dims=1))
    assert not ((w - shifted).abs() <= _bound(w, s)).all()


def test_batched_and_fused_gate_up_match_per_matrix_quantization():
    gen = torch.Generator().manual_seed(1)
    experts = torch.randn(4, 2 * 64, 96, generator=gen)  # HF's fused gate_up_proj (E, 2I, H), I = 64 < 128
    q, s = fp8.quantize_blockwise(experts, parts=2)
    assert s.shape == fp8.scale_shape(experts.shape, parts=2) == (4, 2, 1)
    for e in range(4):
        for half in range(2):
            rows = slice(64 * half, 64 * (half + 1))
            q1, s1 = fp8.quantize_blockwise(experts[e, rows])
            assert torch.equal(q[e, rows].view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s[e, half], s1[0])
    d = fp8.dequantize_blockwise(q, s, parts=2)
    assert ((experts - d).abs() <= 2**-4 * experts.abs() * (1 + 2**-20) + 2**-10 * s.max()).all()
    with pytest.raises(fp8.Fp8Error, match="scale shape"):
        fp8.dequantize_blockwise(q, s)  # parts=1 expects (4, 1, 1)
    with pytest.raises(fp8.Fp8Error, match="inf / nan"):
        fp8.quantize_blockwise(torch.tensor([[1.0, float("nan")]]))


# -- the converter ---------------------------------------------------------------------------------------------
def test_converted_checkpoint_layout(converted, originals):
    config = json.loads((converted / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    assert {
        "lm_head",
        "model.embed_tokens",
        "model.layers.1.mlp.gate",
        "model.layers.4.eh_proj",
        "model.layers.4.shared_head.head",
    } <= set(qc["modules_to_not_convert"])
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (converted / name).read_bytes() == (TINY_CHECKPOINT / name).read_bytes()
    with safe_open(converted / "model.safetensors", framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    quantized = {n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    expected = {n for n, t in originals.items() if t.ndim == 2 and n.endswith("_proj.weight") and "eh_proj" not in n}
    assert quantized == expected and len(expected) == 131  # attention, dense, shared, routed experts, MTP layer
    assert any(".layers.4.mlp.experts.7.down_proj" in n for n in quantized)
    assert set(stored) == set(originals) | {fp8.scale_name(n) for n in quantized}
    for name in UNQUANTIZED:  # bitwise the original tensor, original dtype (fp32 for this checkpoint)
        assert stored[name].dtype == originals[name].dtype and torch.equal(stored[name], originals[name]), name
    worst = 0.0
    for name in quantized:
        w, s = originals[name], stored[fp8.scale_name(name)]
        assert s.dtype == torch.float32 and s.shape == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
        d = fp8.dequantize_blockwise(stored[name], s)
        assert ((w - d).abs() <= _bound(w, s)).all(), name
        worst = max(worst, *_block_rel_errors(w, d))
    assert 0 < worst <= 2**-4
    print(f"\nFP8 round trip, tiny checkpoint: worst per-block relative error {worst:.4f} (bound 2^-4 = 0.0625)")


def test_converter_rejects_bad_input_before_writing(tmp_path, converted):
    tool = _tool()
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((TINY_CHECKPOINT / "config.json").read_text())
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    cases = [
        (tmp_path / "missing", tmp_path / "out1", "not a directory"),
        (llama, tmp_path / "out2", "model_type is 'llama', expected 'glm4_moe'"),
        (converted, tmp_path / "out3", "already has a quantization_config"),
        (no_weights, tmp_path / "out4", "no *.safetensors"),
        (TINY_CHECKPOINT, occupied, "not an empty directory"),
        (TINY_CHECKPOINT, TINY_CHECKPOINT, "is the source checkpoint"),
    ]
    for src, dst, message in cases:
        before = sorted(p.name for p in dst.iterdir()) if dst.exists() else None
        with pytest.raises(tool.ConversionError, match=message.replace("*", r"\*")):
            tool.convert(src, dst, progress=False)
        assert (sorted(p.name for p in dst.iterdir()) if dst.exists() else None) == before, dst  # nothing written
    out = subprocess.run(
        [sys.executable, str(TOOL), "--hf-checkpoint", str(llama), "--save", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "error:" in out.stderr and "glm4_moe" in out.stderr
    assert not (tmp_path / "o").exists()


# -- loading FP8 checkpoints -----------------------------------------------------------------------------------
def test_loader_dequantizes_fp8_checkpoint(converted):
    model, tokenizer = load_hf_model(converted)
    state = model.state_dict()
    with safe_open(converted / "model.safetensors", framework="pt") as f:

        def deq(name):
            return fp8.dequantize_blockwise(f.get_tensor(name), f.get_tensor(fp8.scale_name(name)))

        q_proj = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(state[q_proj], deq(q_proj))
        fused = torch.cat(
            [deq("model.layers.2.mlp.experts.5.gate_proj.weight"), deq("model.layers.2.mlp.experts.5.up_proj.weight")]
        )
        assert torch.equal(state["model.layers.2.mlp.experts.gate_up_proj"][5], fused)
        assert torch.equal(state["lm_head.weight"], f.get_tensor("lm_head.weight"))
    assert load_mtp(model).layers[0].eh_proj.weight.shape == (96, 192)  # the MTP layer loads from the copy
    copy = Path(model.config.name_or_path)
    assert copy.is_dir() and copy != converted
    del model
    gc.collect()
    assert not copy.exists()  # the temporary dequantized copy goes with the model


def test_loader_rejects_unsupported_quantization(tmp_path, converted):
    for name, change in (("awq", {"quant_method": "awq"}), ("perchannel", {"weight_block_size": None})):
        bad = tmp_path / name
        bad.mkdir()
        for p in converted.iterdir():
            (bad / p.name).write_bytes(p.read_bytes())
        config = json.loads((converted / "config.json").read_text())
        config["quantization_config"].update(change)
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match="unsupported quantization_config"):
            load_hf_model(bad)


def test_eval_accuracy_fp8_close_to_original(converted):
    """Measured (200 eval prompts): greedy 0.810 original vs 0.815 FP8; temperature 1, seed 0: 0.320 vs 0.320."""
    rows, reward = load_prompts(EVAL), get_reward_fn("arithmetic")
    results = {}
    for label, path in (("original", TINY_CHECKPOINT), ("fp8", converted)):
        model, tokenizer = load_hf_model(path)
        for temperature in (0.0, 1.0):
            results[label, temperature] = evaluate(
                model, tokenizer, rows, reward, temperature=temperature, seed=0
            ).accuracy
    print("\naccuracy " + ", ".join(f"{k[0]} T={k[1]}: {v:.3f}" for k, v in results.items()))
    assert results["original", 0.0] >= 0.7  # the checkpoint is the one whose figures we know
    for temperature in (0.0, 1.0):
        assert abs(results["fp8", temperature] - results["original", temperature]) <= 0.03


def test_eval_cli_runs_fp8_checkpoint(converted, tmp_path):
    prompts = tmp_path / "few.jsonl"
    prompts.write_text("".join(EVAL.read_text().splitlines(keepends=True)[:20]))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm_rl.cli",
            "eval",
            "--hf-checkpoint",
            str(converted),
            "--prompt-data",
            str(prompts),
            "--temperature",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == 20


# -- --rollout-fp8 weight sync ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    eng = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), seed=7))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("mode", ["tensor", "broadcast"])
def test_rollout_fp8_sync_into_embedded_engine(engine, converted, mode):
    trainer_weights = list(load_hf_model(TINY_CHECKPOINT)[0].state_dict().items())  # what the trainer sends
    fp8_model = load_hf_model(converted)[0]
    reference = {n: tensor_checksum(t) for n, t in fp8_model.state_dict().items()}
    quantized = [n for n, t in trainer_weights if fp8.is_quantizable(n, t)]
    assert "model.layers.1.mlp.experts.gate_up_proj" in quantized and "lm_head.weight" not in quantized

    plain = make_transport(mode, [engine.url], None, bucket_bytes=256 << 10)
    plain.prepare()
    try:
        assert plain.push(trainer_weights, version=10, verify=True)["verified"]  # engine holds the originals
    finally:
        plain.close()
    transport = make_transport(mode, [engine.url], None, bucket_bytes=256 << 10, fp8=True)
    transport.prepare()
    try:
        assert transport.push(trainer_weights, version=11, verify=True)["verified"]
        with pytest.raises(RuntimeError, match="engine differs"):  # the check sees quantization: not a no-op
            transport.verify(trainer_weights, 11)
    finally:
        transport.close()
    # the engine now holds bitwise what loading the converted FP8 checkpoint gives
    assert engine.weights.checksums(None)["checksums"] == reference

    client = EngineClient(engine.url, timeout=60)
    prompt = [1, 2, 4, 23, 13, 10, 17, 11, 5, 23]
    answer = client.generate(prompt, {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True})
    with torch.no_grad():
        ref = fp8_model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert answer["output_ids"] == ref and answer["meta_info"]["weight_version"] == 11


def test_engine_refuses_unpaired_fp8_tensors(engine):
    client = EngineClient(engine.url, timeout=60)
    name = "model.layers.0.self_attn.o_proj.weight"
    q, s = fp8.quantize_blockwise(torch.randn(96, 96))
    version = engine.weight_version
    for bad, message in (
        ([(name, q)], "without a scale"),
        ([(fp8.scale_name(name), s)], "scales without"),
        ([(name, q), (fp8.scale_name(name), torch.ones(2, 2))], "scale shape"),
    ):
        with pytest.raises(EngineError) as info:
            client.update_weights_from_tensor(bad, weight_version=99)
        assert info.value.status == 400 and message in info.value.message
    assert engine.weight_version == version and client.health()


def test_engine_starts_from_fp8_checkpoint(converted):
    eng = EmbeddedEngine(EngineConfig(hf_checkpoint=str(converted)))
    eng.start()
    try:
        out = EngineClient(eng.url, timeout=60).generate([1, 2, 4, 23], {"temperature": 0.0, "max_new_tokens": 4})
        assert out["meta_info"]["completion_tokens"] >= 1
    finally:
        eng.shutdown()
