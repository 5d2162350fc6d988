"""`glm-rl train` flags: parsed once into the typed config, validated with the offending values named."""

import json
import shutil

import pytest

from glm_rl.config import build_parser, parse_args
from glm_rl.models.glm45.presets import TINY_CHECKPOINT


def test_defaults_are_the_tiny_demo():
    cfg = parse_args([])
    assert cfg.algo.advantage_estimator == "gspo" and cfg.algo.use_tis and cfg.algo.use_rollout_routing_replay
    assert cfg.rollout.num_engines == 2 and cfg.train.num_trainer_ranks == 2
    assert cfg.model.hf_checkpoint == str(TINY_CHECKPOINT)
    assert cfg.samples_per_rollout == 128


def test_slime_flag_names_reach_their_sections():
    cfg = parse_args(["--eps-clip", "1e-4", "--eps-clip-high", "2e-4", "--no-use-tis", "--enable-mis",
                      "--advantage-estimator", "grpo", "--kl-loss-type", "k3", "--kl-loss-coef", "0.01",
                      "--max-tokens-per-gpu", "512", "--global-batch-size", "64", "--colocate",
                      "--update-weight-transfer-mode", "tensor"])
    assert (cfg.algo.eps_clip, cfg.algo.eps_clip_high, cfg.algo.use_tis, cfg.algo.enable_mis) == (1e-4, 2e-4, False, True)
    assert (cfg.algo.kl_loss_type, cfg.algo.kl_loss_coef) == ("k3", 0.01)
    assert (cfg.train.max_tokens_per_gpu, cfg.train.global_batch_size) == (512, 64)
    assert cfg.sync.update_weight_transfer_mode == "tensor" and cfg.colocate
    json.loads(cfg.to_json())  # the run's config.json


def test_every_flag_has_help():
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


@pytest.mark.parametrize("flags,message", [
    (["--use-routing-replay"], "R2) and --use-rollout-routing-replay (R3) are exclusive"),
    (["--global-batch-size", "48"], "--global-batch-size 48 must divide"),
    (["--n-samples-per-prompt", "1"], "needs --n-samples-per-prompt >= 2"),
    (["--eps-clip-c", "0.9"], "--eps-clip-c must be > 1"),
    (["--update-weight-transfer-mode", "tensor"], "needs --colocate"),
    (["--max-tokens-per-gpu", "32"], "below one sample's maximum length"),
    (["--rm-type", "nope"], "--rm-type 'nope' unknown"),
    (["--model-preset", "glm45-355b-a32b"], "hidden_size: preset 5120 vs checkpoint 96"),
])
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
    flags = ["--backend", "megatron", "--num-trainer-ranks", "2", "--context-parallel-size", "2", "--enable-mtp",
             "--enable-mtp-training"]
    assert parse_args(flags).train.context_parallel_size == 2
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

    rest, passed = split_sglang_args(["--lr", "1e-4", "--sglang-mem-fraction-static", "0.7",
                                      "--sglang-enable-dp-attention", "--sglang-dp-size=8", "--colocate"])
    assert rest == ["--lr", "1e-4", "--colocate"]
    assert passed == (("mem-fraction-static", "0.7"), ("enable-dp-attention", None), ("dp-size", "8"))
    with pytest.raises(ValueError, match=r"\['--sglang-no-such'\]: SGLang 0.5.23 has no such server flag"):
        parse_args(["--sglang-no-such", "1"])


# -- --backend megatron: the Megatron flags, validated at parse time --------------------------------------------
def test_megatron_flags_reach_the_train_section():
    cfg = parse_args(["--backend", "megatron", "--num-trainer-ranks", "4", "--tensor-model-parallel-size", "2",
                      "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather",
                      "--optimizer-cpu-offload", "--recompute-granularity", "full", "--recompute-method", "uniform",
                      "--recompute-num-layers", "1", "--global-batch-size", "16"])
    t = cfg.train
    assert (t.backend, t.tensor_model_parallel_size, t.expert_model_parallel_size) == ("megatron", 2, 2)
    assert t.sequence_parallel is None and t.sequence_parallel_on  # auto: on with TP > 1
    assert (t.dp_size, t.layout().dp, t.layout().etp) == (2, 2, 1)
    assert t.optimizer_cpu_offload and t.recompute_num_layers == 1
    assert parse_args(["--backend", "megatron", "--num-trainer-ranks", "1"]).train.sequence_parallel_on is False


def test_megatron_pipeline_and_context_parallel_layouts_parse():
    """PP and CP run in the RL loop (test_megatron_backend.py): the layouts parse, DP = world / (TP x PP x CP)."""
    pp = parse_args(["--backend", "megatron", "--pipeline-model-parallel-size", "2",
                     "--decoder-first-pipeline-num-layers", "1"]).train
    assert (pp.dp_size, pp.layout().pp, pp.layout().decoder_first_pipeline_num_layers) == (1, 2, 1)
    cp = parse_args(["--backend", "megatron", "--num-trainer-ranks", "8", "--context-parallel-size", "2",
                     "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"]).train
    assert (cp.dp_size, cp.layout().cp, cp.layout().dp) == (1, 2, 1)


@pytest.mark.parametrize("flags,message", [
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2 need --backend megatron"),
    (["--expert-model-parallel-size", "2", "--enable-mtp-training"],
     "--expert-model-parallel-size 2, --enable-mtp-training need --backend megatron"),
    (["--backend", "megatron", "--tensor-model-parallel-size", "3"],
     "world size 2 is not divisible by TP 3 × PP 1 × CP 1 = 3"),
    (["--backend", "megatron", "--num-trainer-ranks", "3", "--tensor-model-parallel-size", "3",
      "--global-batch-size", "16"], "num_attention_heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--backend", "megatron", "--expert-model-parallel-size", "3", "--num-trainer-ranks", "3",
      "--rollout-batch-size", "6"], "n_routed_experts 8 is not divisible by --expert-model-parallel-size 3"),
    (["--backend", "megatron", "--num-trainer-ranks", "4", "--tensor-model-parallel-size", "2",
      "--expert-model-parallel-size", "8"], "--expert-model-parallel-size 8 = 8 does not divide the 4"),
    (["--backend", "megatron", "--tensor-model-parallel-size", "2", "--no-sequence-parallel"],
     "MoE with --tensor-model-parallel-size 2 needs --sequence-parallel"),
    (["--backend", "megatron", "--num-trainer-ranks", "4", "--global-batch-size", "2",
      "--expert-model-parallel-size", "2"], "--global-batch-size 2 must be divisible by the data-parallel size 4"),
    (["--backend", "megatron", "--pipeline-model-parallel-size", "8", "--num-trainer-ranks", "8",
      "--global-batch-size", "16"], "num_hidden_layers 4 is not divisible by --pipeline-model-parallel-size 8"),
    (["--backend", "megatron", "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "4"],
     "minus first stage 4 leaves 0 layers"),
    (["--backend", "megatron", "--context-parallel-size", "2", "--tensor-model-parallel-size", "2"],
     "world size 2 is not divisible by TP 2 × PP 1 × CP 2 = 4"),
    (["--backend", "megatron", "--moe-enable-deepep", "--moe-token-dispatcher-type", "flex"],
     "--moe-enable-deepep needs the deep_ep package"),
    (["--backend", "megatron", "--moe-enable-deepep"], "needs --moe-token-dispatcher-type flex (got alltoall)"),
    (["--backend", "megatron", "--recompute-granularity", "full"], "needs --recompute-method and"),
    (["--backend", "megatron", "--colocate", "--update-weight-transfer-mode", "tensor"],
     "with --backend megatron use broadcast or p2p"),
    (["--backend", "megatron", "--enable-mtp-training"], "--enable-mtp-training needs --enable-mtp"),
])
def test_megatron_layout_and_flag_errors_are_named(flags, message):
    with pytest.raises(ValueError, match="invalid configuration") as e:
        parse_args(flags)
    assert message in str(e.value), str(e.value)
