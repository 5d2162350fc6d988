"""`glm-rl plan`: layout checks, per-GPU memory, weight-sync prediction, hostfiles (real CLI through Typer's
runner, real presets and transfer plans; nothing faked)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from glm_rl.cli import app
from glm_rl.cluster import H100, Host, parse_hostfile, uniform_slots
from glm_rl.models.glm45.presets import get_preset
from glm_rl.parallel import ParallelLayout
from glm_rl.planner.estimate import PlanInput, _layer_bytes_per_token, make_plan

RECIPE_355B = [
    "plan",
    "--model-preset",
    "glm45-355b-a32b",
    "--num-nodes",
    "8",
    "--gpus-per-node",
    "8",
    "--hardware",
    "H100",
    "--tensor-model-parallel-size",
    "8",
    "--pipeline-model-parallel-size",
    "4",
    "--context-parallel-size",
    "2",
    "--expert-model-parallel-size",
    "16",
    "--expert-tensor-parallel-size",
    "1",
    "--sequence-parallel",
    "--max-tokens-per-gpu",
    "16384",
    "--recompute-granularity",
    "full",
    "--optimizer-cpu-offload",
    "--colocate",
    "--rollout-num-gpus-per-engine",
    "32",
    "--update-weight-transfer-mode",
    "p2p",
]


def _run(args):
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def plan_355b():
    """The seed 355B recipe (64 H100s, CPU Adam), priced once for the module (the sync plan takes seconds)."""
    result = _run(RECIPE_355B + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_355b_recipe_fits_on_80gb(plan_355b):
    assert plan_355b["fits"] and plan_355b["problems"] == []
    assert plan_355b["gpu_capacity_gib"] < 80
    assert plan_355b["gpu_total_gib"] <= plan_355b["gpu_capacity_gib"]
    t = plan_355b["trainer"]
    assert t["optimizer"] == 0.0 and t["host_optimizer"] > 0  # CPU Adam: nothing on the GPU, 16 B/param on host
    # weights: ~6.0 B params per GPU (23 layers x (160/16 experts + attention/8) + LM head/8), bf16
    assert 5.5 < t["params_b"] < 6.5
    assert t["weights"] == pytest.approx(2 * t["params_b"] * 1e9 / 2**30)
    assert plan_355b["layers_per_stage"] == [23, 23, 23, 23]


def test_355b_sync_within_2x_of_floor(plan_355b):
    s = plan_355b["sync"]
    # two 32-GPU engines, each a full copy; norms and router weights reach every engine rank whole
    assert 2 * s["model_bytes"] < s["bytes_delivered"] < 1.02 * 2 * s["model_bytes"]
    assert s["floor_s"] > 0 and s["seconds"]["p2p"] <= 2 * s["floor_s"]
    assert s["seconds"]["broadcast"] > 10 * s["seconds"]["p2p"]  # one source NIC vs all 64


def _recipe_355b_input() -> dict:
    """The 355B recipe's PlanInput fields (64 H100s, TP8 PP4 CP2 EP16, full recompute), without colocation or
    optimizer placement."""
    return dict(
        spec=get_preset("glm45-355b-a32b"),
        hardware=H100,
        num_nodes=8,
        gpus_per_node=8,
        layout=ParallelLayout(tp=8, pp=4, cp=2, ep=16, etp=1, sequence_parallel=True),
        recompute_granularity="full",
        rollout_num_gpus_per_engine=32,
    )


def test_without_cpu_offload_the_355b_needs_more_gpu_memory():
    base = _recipe_355b_input() | {"colocate": True}
    on = make_plan(PlanInput(**base, optimizer_cpu_offload=True), with_sync=False)
    off = make_plan(PlanInput(**base, optimizer_cpu_offload=False), with_sync=False)
    # 12 B/param of Adam state on the GPU: experts unsharded (expert-DP 1), dense params over DP x CP = 2;
    # experts are ~95 % of a stage, so between 0.9x and 1x of 12 B/param (weights are 2 B/param)
    w = off.trainer["weights"]
    assert 0.9 * 6 * w < off.trainer["optimizer"] < 6 * w
    assert not off.fits and "H100 has 79.6 GiB" in off.problems[0]
    no_recompute = make_plan(
        PlanInput(**base | {"recompute_granularity": None}, optimizer_cpu_offload=True), with_sync=False
    )
    assert no_recompute.trainer["activations"] > 5 * on.trainer["activations"]


def test_tp7_fails_naming_heads_and_tp():
    result = _run(
        RECIPE_355B[: RECIPE_355B.index("--tensor-model-parallel-size")]
        + ["--tensor-model-parallel-size", "7", "--colocate", "--skip-sync"]
    )
    assert result.exit_code == 2
    assert "num_attention_heads 96 is not divisible by --tensor-model-parallel-size 7" in result.output


def test_a_layout_that_does_not_fit_exits_1_with_the_reason():
    result = _run(
        [
            "plan",
            "--model-preset",
            "glm45-air-106b-a12b",
            "--num-nodes",
            "4",
            "--colocate",
            "--tensor-model-parallel-size",
            "4",
            "--expert-model-parallel-size",
            "4",
            "--skip-sync",
            "--json",
        ]
    )
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert out["valid"] and not out["fits"] and "per GPU" in out["problems"][0]


def test_json_output_parses_for_the_tiny_model():
    result = _run(
        [
            "plan",
            "--model-preset",
            "glm45-tiny",
            "--num-nodes",
            "1",
            "--gpus-per-node",
            "4",
            "--rollout-num-gpus",
            "2",
            "--rollout-num-gpus-per-engine",
            "1",
            "--expert-model-parallel-size",
            "2",
            "--max-tokens-per-gpu",
            "128",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["gpus"] == {"nodes": 1, "per_node": 4, "trainer": 2, "rollout": 2, "engines": 2, "colocate": False}
    assert out["sync"]["seconds"]["tensor"] is None  # CUDA IPC needs --colocate
    assert out["sync"]["seconds"]["p2p"] >= out["sync"]["floor_s"] > 0


def test_table_output_names_every_item():
    result = _run(
        [
            "plan",
            "--model-preset",
            "glm45-tiny",
            "--gpus-per-node",
            "2",
            "--colocate",
            "--rollout-num-gpus-per-engine",
            "1",
            "--update-weight-transfer-mode",
            "tensor",
            "--max-tokens-per-gpu",
            "128",
        ]
    )
    assert result.exit_code == 0, result.output
    for item in (
        "trainer weights",
        "grads",
        "optimizer",
        "activations",
        "engine KV cache",
        "tensor (chosen)",
        "physical floor",
        "fits",
    ):
        assert item in result.output


def test_activation_formula_by_hand():
    """Tiny preset (h 96, 4 heads x 24, 2 KV heads, 8 experts top-2, FFN 64, 1 shared, dense FFN 192)."""
    spec = get_preset("glm45-tiny")
    h, q, kv = 96, 96, 48
    attn = 2 * h + 2 * h + 2 * (q + 2 * kv) + 2 * q + 4 * 4
    moe = 2 * h + 2 * h + 8 * 8 + 2 * (2 * h + 6 * 64) + 6 * 64
    assert _layer_bytes_per_token(spec, moe=True, selective=False) == attn + moe
    assert _layer_bytes_per_token(spec, moe=False, selective=False) == attn + 4 * h + 6 * 192
    assert _layer_bytes_per_token(spec, moe=True, selective=True) == attn + moe - 2 * (q + 2 * kv) - 4 * 4


def test_hostfile_with_comments(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text("# GPU nodes\n\nnode-a slots=8\n  node-b slots=8   # second rack\nnode-c slots=8 max_slots=8\n")
    hosts = parse_hostfile(f)
    assert hosts == [Host("node-a", 8), Host("node-b", 8), Host("node-c", 8)]
    assert uniform_slots(hosts) == 8
    result = _run(
        [
            "plan",
            "--model-preset",
            "glm45-tiny",
            "--hostfile",
            str(f),
            "--colocate",
            "--rollout-num-gpus-per-engine",
            "8",
            "--max-tokens-per-gpu",
            "128",
            "--skip-sync",
            "--json",
        ]
    )
    assert json.loads(result.output)["gpus"]["nodes"] == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("node-a slots=x\n", ":1: expected `host slots=N`"),
        ("# only a comment\n", "no hosts"),
        ("a slots=8\na slots=8\n", "listed twice"),
    ],
)
def test_bad_hostfiles_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "hostfile"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_hostfile(f)


@pytest.mark.parametrize("preset", ["glm45-355b-a32b", "glm45-air-106b-a12b"])
def test_stage_params_add_up_to_the_model(preset):
    """Per-GPU shares times their sharding, summed over stages, give back the preset's total (+ Megatron's
    vocab padding; + the MTP layer when it is trained)."""
    from glm_rl.parallel import padded_vocab_size
    from glm_rl.planner.estimate import _stage_params

    spec = get_preset(preset)
    counts = spec.param_counts()
    for mtp in (False, True):
        lo = ParallelLayout(
            tp=1,
            pp=4,
            ep=1,
            decoder_first_pipeline_num_layers=22 if spec.num_hidden_layers == 92 else 11,
            decoder_last_pipeline_num_layers=22 if spec.num_hidden_layers == 92 else 11,
        )
        from glm_rl.parallel import layer_split

        layers = layer_split(spec, lo)
        total = sum(sum(_stage_params(spec, lo, s, layers, mtp)) for s in range(lo.pp))
        padding = 2 * (padded_vocab_size(spec, 1) - spec.vocab_size) * spec.hidden_size
        assert total == counts["total_params"] + padding + (counts["mtp_params"] if mtp else 0)
    # sharded: TP 8 x EP 16 at PP 1, one GPU holds 1/8 of the dense weights and 1/16 of the experts
    lo = ParallelLayout(tp=8, ep=16, dp=16, sequence_parallel=True)
    dense, experts = _stage_params(spec, lo, 0, [spec.num_hidden_layers], False)
    routed = spec.num_moe_layers * spec.n_routed_experts * 3 * spec.hidden_size * spec.moe_intermediate_size
    assert experts == routed / 16
    h = spec.hidden_size
    replicated = spec.num_hidden_layers * 2 * h + spec.num_moe_layers * (spec.n_routed_experts * (h + 1)) + h
    padding8 = 2 * (padded_vocab_size(spec, 8) - spec.vocab_size) * h  # norms and router stay whole on every rank
    assert dense == pytest.approx(replicated + (counts["total_params"] + padding8 - routed - replicated) / 8)


def test_recompute_rules_by_hand():
    """Tiny preset, PP 2 (2 + 2 layers; layer 0 dense), 100 tokens: what each stage keeps per micro-batch."""
    from glm_rl.parallel import padded_vocab_size
    from glm_rl.planner.estimate import _activations

    spec = get_preset("glm45-tiny")
    lo = ParallelLayout(pp=2, dp=1)
    dense, moe = (_layer_bytes_per_token(spec, m, False) * 100 for m in (False, True))
    inp = 2 * 96 * 100
    logits = 8 * 100 * padded_vocab_size(spec, 1)

    def act(**kw):
        p = PlanInput(spec=spec, hardware=H100, num_nodes=1, gpus_per_node=2, layout=lo, max_tokens_per_gpu=100, **kw)
        return [_activations(p, lo, s, [2, 2]) for s in (0, 1)]

    # 1F1B: stage 0 holds 2 micro-batches in flight, the last stage 1 (plus its logits)
    assert act() == [2 * (dense + moe), moe + moe + logits]
    assert act(recompute_granularity="full") == [2 * 2 * inp + moe, 2 * inp + moe + logits]
    assert act(recompute_granularity="full", recompute_num_layers=2) == [2 * inp + dense + moe, inp + 2 * moe + logits]
    assert act(recompute_granularity="full", recompute_method="block") == [
        2 * (inp + moe) + dense,
        inp + moe + moe + logits,
    ]


def test_colocated_host_memory_holds_what_offload_moves():
    """Colocated, the trainer's rollout-time offload moves its weights and its GPU optimizer state to pinned host
    memory (colocation.py): the plan's host share is 2 B/param, plus Adam's 12 B/param unless already on the
    CPU; disaggregated, nothing is offloaded."""
    base = _recipe_355b_input()
    cpu_adam = make_plan(PlanInput(**base, colocate=True, optimizer_cpu_offload=True), with_sync=False).trainer
    gpu_adam = make_plan(PlanInput(**base, colocate=True, optimizer_cpu_offload=False), with_sync=False).trainer
    assert cpu_adam["host_offload"] == pytest.approx(cpu_adam["weights"])
    assert gpu_adam["host_offload"] == pytest.approx(gpu_adam["weights"] + gpu_adam["optimizer"])
    apart = make_plan(
        PlanInput(**base | {"num_nodes": 16}, colocate=False, rollout_num_gpus=64, optimizer_cpu_offload=True),
        with_sync=False,
    )
    assert apart.trainer["host_offload"] == 0.0
