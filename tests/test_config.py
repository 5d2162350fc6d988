"""`glm-rl train` flags: parsed once into the typed config, validated with the offending values named."""

import argparse
import json
import shutil
from pathlib import Path

import pytest

import glm_rl
from glm_rl.config import RoutingReplay, build_parser, engines_return_routed_experts, parse_args
from glm_rl.models.glm45.presets import TINY_CHECKPOINT

SNAPSHOTS = Path(__file__).parent / "snapshots"


def test_defaults_are_the_tiny_demo():
    cfg = parse_args([])
    assert cfg.algo.advantage_estimator == "gspo" and cfg.algo.use_tis and cfg.algo.use_rollout_routing_replay
    assert cfg.rollout.num_engines == 2 and cfg.train.num_trainer_ranks == 2
    assert cfg.model.hf_checkpoint == str(TINY_CHECKPOINT)
    assert cfg.samples_per_rollout == 128


def test_slime_flag_names_reach_their_sections():
    cfg = parse_args(
        [
            "--eps-clip",
            "1e-4",
            "--eps-clip-high",
            "2e-4",
            "--no-use-tis",
            "--enable-mis",
            "--advantage-estimator",
            "grpo",
            "--kl-loss-type",
            "k3",
            "--kl-loss-coef",
            "0.01",
            "--max-tokens-per-gpu",
            "512",
            "--global-batch-size",
            "64",
            "--colocate",
            "--update-weight-transfer-mode",
            "tensor",
        ]
    )
    assert (cfg.algo.eps_clip, cfg.algo.eps_clip_high, cfg.algo.use_tis, cfg.algo.enable_mis) == (
        1e-4,
        2e-4,
        False,
        True,
    )
    assert (cfg.algo.kl_loss_type, cfg.algo.kl_loss_coef) == ("k3", 0.01)
    assert (cfg.train.max_tokens_per_gpu, cfg.train.global_batch_size) == (512, 64)
    assert cfg.sync.update_weight_transfer_mode == "tensor" and cfg.colocate
    json.loads(cfg.to_json())  # the run's config.json


def test_every_flag_has_help():
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


def _flag_lines() -> str:
    """Every `glm-rl train` flag, one per line: its spelling, kind (choices / bool / value type) and default."""
    lines = []
    for a in build_parser()._actions:
        if not a.option_strings or a.dest == "help":
            continue
        kind = (
            "choices=" + ",".join(map(str, a.choices))
            if a.choices
            else ("bool" if isinstance(a, argparse.BooleanOptionalAction) else a.metavar)
        )
        default = repr(a.default).replace(str(Path(glm_rl.__file__).parent), "<glm_rl>")
        lines.append(f"{' '.join(a.option_strings)}  {kind}  default={default}")
    return "\n".join(lines) + "\n"


def test_flags_snapshot(update_snapshots):
    """The flag names users (and the launchers) type never change by accident: the config's sections can move,
    the flags stay (regenerate with `pytest --update-snapshots` when a flag is meant to change, and review)."""
    path = SNAPSHOTS / "train_flags.txt"
    if update_snapshots:
        path.write_text(_flag_lines())
    assert path.exists(), f"no committed snapshot {path.name}: run pytest --update-snapshots and review it"
    assert _flag_lines() == path.read_text()


@pytest.mark.parametrize(
    "flags,replay,routed",
    [
        ([], RoutingReplay.R3, True),
        (["--no-use-rollout-routing-replay", "--use-routing-replay"], RoutingReplay.R2, False),
        (["--no-use-rollout-routing-replay"], RoutingReplay.OFF, False),
    ],
)
def test_routing_replay_is_one_decision(flags, replay, routed):
    """R2 / R3 come from two slime flags; the parsed config holds one enum, and engines return routed experts
    exactly for R3."""
    algo = parse_args(flags).algo
    assert algo.routing_replay is replay
    assert engines_return_routed_experts(algo.routing_replay) is routed


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--use-routing-replay"], "R2) and --use-rollout-routing-replay (R3) are exclusive"),
        (["--global-batch-size", "48"], "--global-batch-size 48 must divide"),
        (["--n-samples-per-prompt", "1"], "needs --n-samples-per-prompt >= 2"),
        (["--eps-clip-c", "0.9"], "--eps-clip-c must be > 1"),
        (["--update-weight-transfer-mode", "tensor"], "needs --colocate"),
        (["--max-tokens-per-gpu", "32"], "below one sample's maximum length"),
        (["--rm-type", "nope"], "--rm-type 'nope' unknown"),
        (["--model-preset", "glm45-355b-a32b"], "hidden_size: preset 5120 vs checkpoint 96"),
    ],
)
def test_contradictions_are_named(flags, message):
    with pytest.raises(ValueError, match="invalid configuration") as e:
        parse_args(flags)
    assert message in str(e.value)


def test_r3_on_a_model_without_moe_layers(tmp_path):
    dense = tmp_path / "dense"
    shutil.copytree(TINY_CHECKPOINT, dense)
    cfg = json.loads((dense / "config.json").read_text())
    cfg["first_k_dense_replace"] = cfg["num_hidden_layers"]
    (dense / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="routing replay \\(R2/R3\\) needs MoE layers"):
        parse_args(["--hf-checkpoint", str(dense)])
    parse_args(["--hf-checkpoint", str(dense), "--no-use-rollout-routing-replay"])  # fine without replay


def test_mtp_training_with_context_parallel(tmp_path):
    """CP + MTP training runs (the MTP loss is weighted exactly per CP rank: test_megatron_backend.py) for one
    MTP layer, GLM-4.5's; a checkpoint with two is refused, named, before any work."""
    flags = [
        "--backend",
        "megatron",
        "--num-trainer-ranks",
        "2",
        "--context-parallel-size",
        "2",
        "--enable-mtp",
        "--enable-mtp-training",
    ]
    assert parse_args(flags).megatron.context_parallel_size == 2
    two = tmp_path / "two_mtp_layers"
    shutil.copytree(TINY_CHECKPOINT, two)
    cfg = json.loads((two / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 2
    (two / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="invalid configuration") as e:
        parse_args([*flags, "--hf-checkpoint", str(two)])
    assert f"--enable-mtp-training with --context-parallel-size 2: {two} has 2 MTP layers" in str(e.value)
    parse_args([*flags[:-1], "--hf-checkpoint", str(two)])  # fine without MTP training


def test_unknown_flag_and_bad_choice_exit():
    with pytest.raises(SystemExit):
        parse_args(["--advantage-estimator", "ppo"])
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag"])


def test_sglang_pass_through_flags():
    from glm_rl.config import split_sglang_args

    rest, passed = split_sglang_args(
        [
            "--lr",
            "1e-4",
            "--sglang-mem-fraction-static",
            "0.7",
            "--sglang-enable-dp-attention",
            "--sglang-dp-size=8",
            "--colocate",
        ]
    )
    assert rest == ["--lr", "1e-4", "--colocate"]
    assert passed == (("mem-fraction-static", "0.7"), ("enable-dp-attention", None), ("dp-size", "8"))
    with pytest.raises(ValueError, match=r"\['--sglang-no-such'\]: SGLang 0.5.23 has no such server flag"):
        parse_args(["--sglang-no-such", "1"])


# -- --backend megatron: the Megatron flags, validated at parse time --------------------------------------------
def test_megatron_flags_reach_the_megatron_section():
    cfg = parse_args(
        [
            "--backend",
            "megatron",
            "--num-trainer-ranks",
            "4",
            "--tensor-model-parallel-size",
            "2",
            "--expert-model-parallel-size",
            "2",
            "--moe-token-dispatcher-type",
            "allgather",
            "--optimizer-cpu-offload",
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "uniform",
            "--recompute-num-layers",
            "1",
            "--global-batch-size",
            "16",
        ]
    )
    t, m = cfg.train, cfg.megatron
    assert (t.backend, m.tensor_model_parallel_size, m.expert_model_parallel_size) == ("megatron", 2, 2)
    assert m.sequence_parallel is None and m.sequence_parallel_on  # auto: on with TP > 1
    layout = m.layout(t.num_trainer_ranks)
    assert (cfg.dp_size, layout.dp, layout.etp) == (2, 2, 1)
    assert m.optimizer_cpu_offload and m.recompute_num_layers == 1
    assert parse_args(["--backend", "megatron", "--num-trainer-ranks", "1"]).megatron.sequence_parallel_on is False


def test_megatron_pipeline_and_context_parallel_layouts_parse():
    """PP and CP run in the RL loop (test_megatron_backend.py): the layouts parse, DP = world / (TP x PP x CP)."""
    pp = parse_args(
        ["--backend", "megatron", "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"]
    )
    lay = pp.megatron.layout(pp.train.num_trainer_ranks)
    assert (pp.dp_size, lay.pp, lay.decoder_first_pipeline_num_layers) == (1, 2, 1)
    cp = parse_args(
        [
            "--backend",
            "megatron",
            "--num-trainer-ranks",
            "8",
            "--context-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--tensor-model-parallel-size",
            "2",
        ]
    )
    lay = cp.megatron.layout(cp.train.num_trainer_ranks)
    assert (cp.dp_size, lay.cp, lay.dp) == (1, 2, 1)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2 need --backend megatron"),
        (
            ["--expert-model-parallel-size", "2", "--enable-mtp-training"],
            "--expert-model-parallel-size 2, --enable-mtp-training need --backend megatron",
        ),
        (
            ["--backend", "megatron", "--tensor-model-parallel-size", "3"],
            "world size 2 is not divisible by TP 3 × PP 1 × CP 1 = 3",
        ),
        (
            [
                "--backend",
                "megatron",
                "--num-trainer-ranks",
                "3",
                "--tensor-model-parallel-size",
                "3",
                "--global-batch-size",
                "16",
            ],
            "num_attention_heads 4 is not divisible by --tensor-model-parallel-size 3",
        ),
        (
            [
                "--backend",
                "megatron",
                "--expert-model-parallel-size",
                "3",
                "--num-trainer-ranks",
                "3",
                "--rollout-batch-size",
                "6",
            ],
            "n_routed_experts 8 is not divisible by --expert-model-parallel-size 3",
        ),
        (
            [
                "--backend",
                "megatron",
                "--num-trainer-ranks",
                "4",
                "--tensor-model-parallel-size",
                "2",
                "--expert-model-parallel-size",
                "8",
            ],
            "--expert-model-parallel-size 8 = 8 does not divide the 4",
        ),
        (
            ["--backend", "megatron", "--tensor-model-parallel-size", "2", "--no-sequence-parallel"],
            "MoE with --tensor-model-parallel-size 2 needs --sequence-parallel",
        ),
        (
            [
                "--backend",
                "megatron",
                "--num-trainer-ranks",
                "4",
                "--global-batch-size",
                "2",
                "--expert-model-parallel-size",
                "2",
            ],
            "--global-batch-size 2 must be divisible by the data-parallel size 4",
        ),
        (
            [
                "--backend",
                "megatron",
                "--pipeline-model-parallel-size",
                "8",
                "--num-trainer-ranks",
                "8",
                "--global-batch-size",
                "16",
            ],
            "num_hidden_layers 4 is not divisible by --pipeline-model-parallel-size 8",
        ),
        (
            [
                "--backend",
                "megatron",
                "--pipeline-model-parallel-size",
                "2",
                "--decoder-first-pipeline-num-layers",
                "4",
            ],
            "minus first stage 4 leaves 0 layers",
        ),
        (
            ["--backend", "megatron", "--context-parallel-size", "2", "--tensor-model-parallel-size", "2"],
            "world size 2 is not divisible by TP 2 × PP 1 × CP 2 = 4",
        ),
        (
            ["--backend", "megatron", "--moe-enable-deepep", "--moe-token-dispatcher-type", "flex"],
            "--moe-enable-deepep needs the deep_ep package",
        ),
        (["--backend", "megatron", "--moe-enable-deepep"], "needs --moe-token-dispatcher-type flex (got alltoall)"),
        (["--backend", "megatron", "--recompute-granularity", "full"], "needs --recompute-method and"),
        (
            ["--backend", "megatron", "--colocate", "--update-weight-transfer-mode", "tensor"],
            "with --backend megatron use broadcast or p2p",
        ),
        (["--backend", "megatron", "--enable-mtp-training"], "--enable-mtp-training needs --enable-mtp"),
    ],
)
def test_megatron_layout_and_flag_errors_are_named(flags, message):
    with pytest.raises(ValueError, match="invalid configuration") as e:
        parse_args(flags)
    assert message in str(e.value), str(e.value)
