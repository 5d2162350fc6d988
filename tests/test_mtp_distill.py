"""The MTP drafter trained on the main model's own greedy outputs (`models/glm45/mtp_distill.py`,
`tools/train_mtp_drafter.py`), on the real tiny checkpoint: from a freshly initialised drafter that agrees with
the main model on few positions, training lifts held-out acceptance far up; the written checkpoint keeps every
main-model tensor bitwise and holds the trained drafter (its acceptance, recomputed after loading it, is the one
reported)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glm_rl.evaluate import chat_prompt_ids
from glm_rl.models.glm45.checkpoint import load_hf_model, load_mtp
from glm_rl.models.glm45.mtp_distill import DistillBatch, acceptance, batch_from, greedy_batches
from glm_rl.models.glm45.presets import ASSETS, TINY_CHECKPOINT

TOOL = Path(__file__).resolve().parent.parent / "tools" / "train_mtp_drafter.py"
PROMPTS = ASSETS / "arith" / "train.jsonl"


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_batch_from_counts_only_generated_targets():
    """Position t trains MTP's draft of token t+2: counted when t+2 is a generated token (not prompt, not pad)."""
    b = batch_from([[1, 2, 3, 4, 5], [1, 2, 3]], [2, 2], pad_id=0, device="cpu")
    assert b.ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    # row 0: targets are tokens 2..4 (positions 2, 3, 4 generated: 3, 4, 5) -> t = 0, 1, 2; row 1: token 2 -> t = 0
    assert b.mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


@pytest.fixture(scope="module")
def drafted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drafter") / "ckpt"
    cmd = [
        sys.executable, str(TOOL), "--hf-checkpoint", str(TINY_CHECKPOINT), "--prompt-data", str(PROMPTS),
        "--out", str(out), "--reinit-drafter", "--prompts", "96", "--held-out", "32", "--batch-size", "16",
        "--new-tokens", "16", "--steps", "120", "--lr", "3e-3", "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def test_training_lifts_a_fresh_drafters_acceptance(drafted):
    report = json.loads((drafted / "drafter.json").read_text())
    assert report["acceptance_before"] < 0.2, report  # a fresh drafter rarely agrees with the main model
    assert report["acceptance_after"] > 0.6, report  # (0.78 seen)


def test_written_checkpoint_keeps_the_main_model_and_holds_the_trained_drafter(drafted):
    old, new = _tensors(TINY_CHECKPOINT), _tensors(drafted)
    assert sorted(old) == sorted(new)
    mtp_prefix = f"model.layers.{json.loads((TINY_CHECKPOINT / 'config.json').read_text())['num_hidden_layers']}."
    main = [k for k in old if not k.startswith(mtp_prefix)]
    assert main and all(torch.equal(old[k], new[k]) for k in main)
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith(mtp_prefix))
    # the drafter loaded from the new checkpoint agrees with the main model as reported, on the same held-out set
    model, tok = load_hf_model(drafted)
    mtp = load_mtp(model)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[:32]]
    prompts = [chat_prompt_ids(tok, r["prompt"]) for r in rows]
    held: list[DistillBatch] = greedy_batches(
        model, prompts, new_tokens=16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id or 0, batch_size=16
    )
    reported = json.loads((drafted / "drafter.json").read_text())["acceptance_after"]
    assert acceptance(model, mtp, held) == pytest.approx(reported, abs=1e-6)


def test_bad_prompt_rows_are_named_before_any_model_loads(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "1+1"}\n{"question": "2+2"}\n')
    cmd = [sys.executable, str(TOOL), "--hf-checkpoint", str(TINY_CHECKPOINT), "--prompt-data", str(bad)]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"{bad}:2: missing field 'prompt'" in proc.stderr  # the RL loop's loader
    assert not (tmp_path / "o").exists()
