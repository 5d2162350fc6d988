"""`glm-rl train` flags: parsed once into the typed config, validated with the offending values named."""

import json
import shutil

import pytest

from glm_rl.config import build_parser, parse_args
from glm_rl.models.presets import TINY_CHECKPOINT


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
