"""HF ↔ Megatron torch_dist conversion on the shipped tiny GLM-4.5, with real files, real megatron-core and
real gloo ranks (spawned by `glm-rl convert`, or by torchrun for the tools), plus greedy text straight from a
converted checkpoint against HF's greedy text.

The conversions run as the user runs them — `python -m glm_rl.cli ...`, `torchrun tools/...` — in
subprocesses, so megatron's process-wide CPU shims never reach the pytest process. Bad-input tests call the
same checks in-process, with the worker launcher replaced by a tripwire: they must fail before any rank starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from glm_rl.models.glm45.presets import ASSETS, TINY_CHECKPOINT  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "glm_rl.cli", *args], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(f).items()}  # file name too: the layout must match
    return out


def _assert_bitwise_copy(exported: Path, original: Path = TINY_CHECKPOINT) -> None:
    got, want = _tensors(exported), _tensors(original)
    assert sorted(got) == sorted(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    unequal = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not unequal, f"not bitwise equal: {unequal[:5]}"
    assert len(want) == 183  # every tensor of the tiny checkpoint, MTP layer (model.layers.4.*) included
    others = sorted(p.name for p in original.iterdir() if p.suffix != ".safetensors")
    assert sorted(p.name for p in exported.iterdir() if p.suffix != ".safetensors") == others
    assert all((exported / n).read_bytes() == (original / n).read_bytes() for n in others)


@pytest.fixture(scope="module")
def tp1_checkpoint(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    save = tmp_path_factory.mktemp("convert") / "tiny_torch_dist"
    out = _cli(
        "convert",
        "import",
        "--hf-model",
        str(TINY_CHECKPOINT),
        "--megatron-path",
        str(save),
        "--model-preset",
        "glm45-tiny",
    )
    return save, out


# -- round trips -----------------------------------------------------------------------------------------------
def test_tp1_round_trip_is_bitwise(tp1_checkpoint, tmp_path):
    from glm_rl.models.glm45.checkpoint import load_hf_model
    from glm_rl.trainer.backends.megatron.dist_checkpoint import read_meta

    save, out = tp1_checkpoint
    assert "[convert import] 4/4 save torch_dist" in out.stderr  # a status line per stage
    meta = read_meta(save)
    assert meta["mtp"] and meta["written_with"]["tp"] == 1 and meta["hf_config"]["vocab_size"] == 32
    assert not list(save.parent.glob(".*.partial"))
    hf_out = tmp_path / "hf"
    _cli(
        "convert", "export", "--hf-model", str(TINY_CHECKPOINT), "--megatron-path", str(save), "--hf-path", str(hf_out)
    )
    _assert_bitwise_copy(hf_out)
    model, _ = load_hf_model(hf_out, preset="glm45-tiny")  # loads as an HF checkpoint
    assert model.config.num_hidden_layers == 4


@pytest.mark.slow  # 2 torchrun ranks + an export: ~40 s on the 2-core CI box
def test_tp2_ep2_save_loads_at_tp1_bitwise(tmp_path):
    """torchrun'd tools: TP2 × EP2 on 2 ranks (EP folded into the TP ranks, expert-TP 1) writes 2 shard
    files; the single-process export (TP1) reads them back."""
    from glm_rl.trainer.backends.megatron.dist_checkpoint import read_meta

    save, hf_out = tmp_path / "tp2ep2", tmp_path / "hf"
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(REPO / "tools/convert_hf_to_torch_dist.py"),
        "--hf-checkpoint",
        str(TINY_CHECKPOINT),
        "--save",
        str(save),
        "--tensor-model-parallel-size",
        "2",
        "--expert-model-parallel-size",
        "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in save.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    written = read_meta(save)["written_with"]
    assert (written["tp"], written["ep"], written["etp"]) == (2, 2, 1)
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/convert_torch_dist_to_hf.py"),
            "--load",
            str(save),
            "--hf-checkpoint",
            str(TINY_CHECKPOINT),
            "--save",
            str(hf_out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[convert export] 3/3 write HF checkpoint" in out.stderr
    _assert_bitwise_copy(hf_out)


# -- greedy text from the converted checkpoint ---------------------------------------------------------------
def test_generate_from_megatron_checkpoint_equals_hf_greedy(tp1_checkpoint):
    from glm_rl.evaluate import chat_prompt_ids
    from glm_rl.models.glm45.checkpoint import load_hf_model
    from glm_rl.rollout.data import load_prompts

    prompts = [r.prompt for r in load_prompts(ASSETS / "arith" / "eval.jsonl")[:3]]
    args = [
        "generate",
        "--megatron-path",
        str(tp1_checkpoint[0]),
        "--hf-model",
        str(TINY_CHECKPOINT),
        "--max-new-tokens",
        "10",
        "--json",
    ]
    out = _cli(*args, *(a for p in prompts for a in ("--prompt", p)))
    results = json.loads(out.stdout.strip().splitlines()[-1])["results"]

    hf, tokenizer = load_hf_model(TINY_CHECKPOINT)
    for prompt, got in zip(prompts, results, strict=True):
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
        with torch.no_grad():
            ref = hf.generate(
                input_ids=ids,
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=hf.generation_config.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        assert got["output_ids"] == ref, (prompt, got["text"])
        assert got["text"] == tokenizer.decode(ref, skip_special_tokens=True)
        assert got["text"].startswith(prompt + "=")  # the trained task: the model writes out its answer
        assert len(got["logprobs"]) == len(ref) and all(lp <= 0 for lp in got["logprobs"])


# -- bad input: a clear error before any rank starts ---------------------------------------------------------
@pytest.fixture
def no_ranks(monkeypatch):
    import glm_rl.convert as convert

    def tripwire(*args, **kwargs):
        raise AssertionError("workers were started before the input was checked")

    monkeypatch.setattr(convert, "run", tripwire)


def _edited_copy(tmp_path: Path, **config) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(TINY_CHECKPOINT, copy)
    data = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**data, **config}))
    return copy


def _cli_error(*args: str) -> BaseException:
    from typer.testing import CliRunner

    from glm_rl.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code != 0 and result.exception is not None, result.output
    return result.exception


def test_missing_directories_are_named(no_ranks, tmp_path):
    err = _cli_error("convert", "import", "--hf-model", str(tmp_path / "nope"), "--megatron-path", str(tmp_path / "o"))
    assert f"--hf-model {tmp_path / 'nope'}: no such directory" in str(err)
    err = _cli_error(
        "convert",
        "export",
        "--hf-model",
        str(TINY_CHECKPOINT),
        "--megatron-path",
        str(tmp_path / "nope"),
        "--hf-path",
        str(tmp_path / "o"),
    )
    assert f"{tmp_path / 'nope'}: no such directory" in str(err)
    err = _cli_error("generate", "--megatron-path", str(TINY_CHECKPOINT), "--prompt", "1+1")
    assert "no metadata.json — not a megatron torch_dist checkpoint" in str(err)
    assert not (tmp_path / "o").exists()


def test_config_contradicting_the_preset_names_the_fields(no_ranks, tmp_path):
    edited = _edited_copy(tmp_path, num_experts_per_tok=4, routed_scaling_factor=1.0)
    err = _cli_error(
        "convert",
        "import",
        "--hf-model",
        str(edited),
        "--megatron-path",
        str(tmp_path / "o"),
        "--model-preset",
        "glm45-tiny",
    )
    assert "contradicts preset 'glm45-tiny'" in str(err)
    assert "num_experts_per_tok: preset 2 vs checkpoint 4" in str(err)
    assert "routed_scaling_factor: preset 2.5 vs checkpoint 1.0" in str(err)
    assert not (tmp_path / "o").exists()


def test_export_template_contradicting_the_checkpoint_names_the_fields(no_ranks, tp1_checkpoint, tmp_path):
    edited = _edited_copy(tmp_path, moe_intermediate_size=32)
    err = _cli_error(
        "convert",
        "export",
        "--hf-model",
        str(edited),
        "--megatron-path",
        str(tp1_checkpoint[0]),
        "--hf-path",
        str(tmp_path / "o"),
    )
    assert "moe_intermediate_size: checkpoint 64 vs --hf-model 32" in str(err)


def test_invalid_layout_fails_before_any_rank(no_ranks, tmp_path):
    from glm_rl.parallel import LayoutError

    err = _cli_error(
        "convert",
        "import",
        "--hf-model",
        str(TINY_CHECKPOINT),
        "--megatron-path",
        str(tmp_path / "o"),
        "--tensor-model-parallel-size",
        "5",
        "--expert-model-parallel-size",
        "3",
    )
    assert isinstance(err, LayoutError)
    assert "num_attention_heads 4 is not divisible by --tensor-model-parallel-size 5" in str(err)
    assert "n_routed_experts 8 is not divisible by --expert-model-parallel-size 3" in str(err)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*.partial"))


def test_nothing_is_overwritten(no_ranks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _cli_error("convert", "import", "--hf-model", str(TINY_CHECKPOINT), "--megatron-path", str(out))
    assert f"--megatron-path {out} exists and is not an empty directory" in str(err)
    assert (out / "keep.txt").read_text() == "mine"


def test_tool_reports_bad_input_in_one_line(tmp_path):
    """The tools' own entry point (no torchrun): exit code 2, one `error:` line, nothing written."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/convert_hf_to_torch_dist.py"),
            "--hf-checkpoint",
            str(TINY_CHECKPOINT),
            "--save",
            str(tmp_path / "o"),
            "--tensor-model-parallel-size",
            "5",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: invalid parallel layout for glm45-tiny")
    assert not (tmp_path / "o").exists()
