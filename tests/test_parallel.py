"""Parallel-layout validation: the seed recipes pass (or fail for a stated reason), every broken rule is named
with its numbers, all problems come back at once. Expected values are worked out by hand in the comments."""

import pytest

from glm_rl.models.glm45.presets import get_preset
from glm_rl.parallel import (
    LayoutError,
    ParallelLayout,
    check_layout,
    layer_split,
    local_experts,
    padded_vocab_size,
    validate_layout,
)

BIG = get_preset("glm45-355b-a32b")  # 92 layers, 96 heads, 8 KV heads, 160 experts, ffn 12288, moe ffn 1536
AIR = get_preset("glm45-air-106b-a12b")  # 46 layers, 96 heads, 8 KV heads, 128 experts
TINY = get_preset("glm45-tiny")  # 4 layers, 4 heads, 2 KV heads, 8 experts, vocab 32


# -- seed recipes ----------------------------------------------------------------------------------------------
def test_355b_seed_recipe_64_gpus():
    # TP8 PP4 CP2 EP16 ETP1 on 64 GPUs: DP = 64 / (8·4·2) = 1.
    # Megatron's EP rule: TP·CP·DP = 8·2·1 = 16 ranks per stage, ETP·EP = 1·16 = 16 → 16 % 16 == 0 ✓.
    # heads 96/8 = 12, KV 8/8 = 1, experts 160/16 = 10, layers 92/4 = 23, seq 16384 % (2·2·8 = 32) == 0.
    layout = ParallelLayout.for_world_size(64, tp=8, pp=4, cp=2, ep=16, etp=1, sequence_parallel=True)
    assert layout.dp == 1 and layout.world_size == 64
    assert validate_layout(BIG, layout, world_size=64, seq_len=16384) == []
    check_layout(BIG, layout, world_size=64, seq_len=16384)
    assert layer_split(BIG, layout) == [23, 23, 23, 23]
    assert local_experts(BIG, layout) == 10


def test_air_seed_tp1_pp4_ep8_needs_an_uneven_split():
    # TP1 PP4 EP8 on 32 GPUs: DP = 32 / 4 = 8; EP rule TP·CP·DP = 8, ETP·EP = 8 ✓; experts 128/8 = 16.
    # But 46 layers over 4 stages is 11.5: the even split is invalid as given.
    even = ParallelLayout.for_world_size(32, pp=4, ep=8)
    assert even.dp == 8
    (problem,) = validate_layout(AIR, even, world_size=32)
    assert "num_hidden_layers 46 is not divisible by --pipeline-model-parallel-size 4" in problem
    assert "46 / 4 = 11.5" in problem
    # Fix seen in a public GLM-4.5-Air config: --decoder-last-pipeline-num-layers 10 → 46 − 10 = 36 over the
    # other 3 stages = 12 each.
    last10 = ParallelLayout.for_world_size(32, pp=4, ep=8, decoder_last_pipeline_num_layers=10)
    assert validate_layout(AIR, last10, world_size=32) == []
    assert layer_split(AIR, last10) == [12, 12, 12, 10]
    # The error's own hint: first 11, last 11 → (46 − 22) / 2 = 12 per middle stage.
    assert "--decoder-first-pipeline-num-layers 11 --decoder-last-pipeline-num-layers 11" in problem
    assert "[11, 12, 12, 11]" in problem
    hinted = ParallelLayout.for_world_size(
        32, pp=4, ep=8, decoder_first_pipeline_num_layers=11, decoder_last_pipeline_num_layers=11
    )
    assert layer_split(AIR, hinted) == [11, 12, 12, 11]
    assert local_experts(AIR, hinted) == 16


@pytest.mark.parametrize("gpus, dp", [(8, 2), (16, 4), (32, 8)])
def test_355b_launcher_up_to_4_nodes(gpus, dp):
    # TP4 PP1 CP1 EP4: DP = gpus / 4; EP rule 4·1·DP % 4 == 0 ✓; 160/4 = 40 experts; 92 layers on one stage.
    layout = ParallelLayout.for_world_size(gpus, tp=4, ep=4, sequence_parallel=True)
    assert layout.dp == dp
    assert validate_layout(BIG, layout, world_size=gpus, seq_len=16384) == []
    assert layer_split(BIG, layout) == [92]
    assert local_experts(BIG, layout) == 40


def test_355b_launcher_8_nodes_needs_first_and_last():
    # TP4 PP8 CP2 EP8 on 64: DP = 64 / (4·8·2) = 1; EP rule TP·CP·DP = 8, ETP·EP = 8 ✓; 160/8 = 20 experts.
    base = dict(tp=4, pp=8, cp=2, ep=8, sequence_parallel=True)
    (problem,) = validate_layout(BIG, ParallelLayout.for_world_size(64, **base), world_size=64)
    assert "num_hidden_layers 92 is not divisible by --pipeline-model-parallel-size 8 (92 / 8 = 11.5)" in problem
    # first 11, last 11 → 92 − 22 = 70 over 6 middle stages = 11.67: invalid.
    bad = ParallelLayout.for_world_size(
        64, **base, decoder_first_pipeline_num_layers=11, decoder_last_pipeline_num_layers=11
    )
    assert validate_layout(BIG, bad) == [
        "num_hidden_layers 92 minus first stage 11 and last stage 11 leaves 70 layers for 6 middle stages: "
        "70 is not divisible by 6 (70 / 6 = 11.6667)"
    ]
    # first 10, last 10 → 72 / 6 = 12 per middle stage (lighter ends carry embedding / LM head + MTP): valid,
    # and it is the hint the error gives.
    assert "--decoder-first-pipeline-num-layers 10 --decoder-last-pipeline-num-layers 10" in problem
    good = ParallelLayout.for_world_size(
        64, **base, decoder_first_pipeline_num_layers=10, decoder_last_pipeline_num_layers=10
    )
    assert validate_layout(BIG, good, world_size=64, seq_len=16384) == []
    assert layer_split(BIG, good) == [10, 12, 12, 12, 12, 12, 12, 10]
    assert sum(layer_split(BIG, good)) == 92
    assert local_experts(BIG, good) == 20


def test_tiny_tp2_ep2_on_cpu_ci_layouts():
    # The CPU CI layouts of issue 4: 4 heads, 2 KV heads, 8 experts, 4 layers.
    for layout in (
        ParallelLayout(tp=2, sequence_parallel=True),
        ParallelLayout(pp=2),
        ParallelLayout(ep=2, dp=2),
        ParallelLayout(cp=2),
        ParallelLayout(tp=2, ep=2, sequence_parallel=True),
    ):
        assert validate_layout(TINY, layout, seq_len=16) == [], layout


# -- each rule, naming its numbers -----------------------------------------------------------------------------
def test_tp7_names_heads_and_tp():
    problems = validate_layout(BIG, ParallelLayout(tp=7, sequence_parallel=True))
    assert "num_attention_heads 96 is not divisible by --tensor-model-parallel-size 7" in problems
    assert (
        "num_key_value_heads (query groups) 8 is neither a multiple nor a divisor of --tensor-model-parallel-size 7"
    ) in problems
    with pytest.raises(LayoutError, match="num_attention_heads 96 .* --tensor-model-parallel-size 7"):
        check_layout(BIG, ParallelLayout(tp=7, sequence_parallel=True))


def test_query_groups_follow_megatron_multiple_or_divisor():
    # 8 groups: TP16 replicates KV heads (16 % 8 == 0) and 96/16 = 6 heads → Megatron accepts it.
    assert not [p for p in validate_layout(BIG, ParallelLayout(tp=16, sequence_parallel=True)) if "groups" in p]
    # 2 groups, TP 4 heads 4: 4 % 2 == 0 accepted; TP3 fails heads and groups.
    problems = validate_layout(TINY, ParallelLayout(tp=3, sequence_parallel=True))
    assert "num_attention_heads 4 is not divisible by --tensor-model-parallel-size 3" in problems
    assert any("query groups) 2 is neither" in p for p in problems)


def test_experts_not_divisible_by_ep():
    # 160 / 24 = 6.67; world 24 (DP 24) so the EP rule itself holds.
    problems = validate_layout(BIG, ParallelLayout(ep=24, dp=24), world_size=24)
    assert problems == ["n_routed_experts 160 is not divisible by --expert-model-parallel-size 24 (160 / 24 = 6.66667)"]
    with pytest.raises(LayoutError, match="n_routed_experts 160"):
        local_experts(BIG, ParallelLayout(ep=24, dp=24))


def test_expert_grid_must_fit_a_pipeline_stage():
    # TP8 PP4 CP2 DP1: 16 ranks per stage; EP32 (160/32 = 5 experts, fine) does not fit: 16 % 32 != 0.
    layout = ParallelLayout(tp=8, pp=4, cp=2, ep=32, sequence_parallel=True)
    assert validate_layout(BIG, layout, world_size=64) == [
        "--expert-tensor-parallel-size 1 × --expert-model-parallel-size 32 = 32 does not divide the 16 ranks "
        "of a pipeline stage (TP 8 × CP 2 × DP 1) that Megatron carves the expert grid from"
    ]
    # Expert-TP counts too: ETP2 × EP16 = 32 fails the same way; ETP2 × EP8 = 16 fits.
    assert validate_layout(BIG, ParallelLayout(tp=8, pp=4, cp=2, ep=16, etp=2, sequence_parallel=True))
    assert validate_layout(BIG, ParallelLayout(tp=8, pp=4, cp=2, ep=8, etp=2, sequence_parallel=True)) == []


def test_layers_vs_pp_names_layers_stages_and_rest():
    assert validate_layout(BIG, ParallelLayout(pp=5))[0].startswith(
        "num_hidden_layers 92 is not divisible by --pipeline-model-parallel-size 5 (92 / 5 = 18.4)"
    )
    # first 45 last 45 on PP4: 2 layers left for 2 middle stages → [45, 1, 1, 45] is legal (odd, but valid).
    assert layer_split(
        BIG, ParallelLayout(pp=4, decoder_first_pipeline_num_layers=45, decoder_last_pipeline_num_layers=45)
    ) == [45, 1, 1, 45]
    # first 46 last 45: 1 layer for 2 middle stages.
    assert validate_layout(
        BIG, ParallelLayout(pp=4, decoder_first_pipeline_num_layers=46, decoder_last_pipeline_num_layers=45)
    ) == [
        "num_hidden_layers 92 minus first stage 46 and last stage 45 leaves 1 layers for 2 middle stages: "
        "every stage needs ≥ 1 layer"
    ]
    # PP2 with both ends: no middle stage, so they must add to 92.
    assert (
        "must add up to 92"
        in validate_layout(
            BIG, ParallelLayout(pp=2, decoder_first_pipeline_num_layers=40, decoder_last_pipeline_num_layers=40)
        )[0]
    )
    # Only the first stage set: 92 − 2 = 90 over 3 stages = 30.
    assert layer_split(BIG, ParallelLayout(pp=4, decoder_first_pipeline_num_layers=2)) == [2, 30, 30, 30]
    assert "must be ≥ 1" in validate_layout(BIG, ParallelLayout(pp=4, decoder_last_pipeline_num_layers=0))[0]
    assert (
        "need --pipeline-model-parallel-size > 1"
        in validate_layout(BIG, ParallelLayout(decoder_first_pipeline_num_layers=92))[0]
    )
    with pytest.raises(LayoutError, match="num_hidden_layers 92"):
        layer_split(BIG, ParallelLayout(pp=5))


def test_sequence_vs_cp_and_sp():
    # CP2: chunks of 2·2 = 4 → 1001 fails, 1000 passes.
    assert validate_layout(TINY, ParallelLayout(cp=2), seq_len=1001) == [
        "sequence length 1001 is not a multiple of 2 × CP 2 = 4"
    ]
    assert validate_layout(TINY, ParallelLayout(cp=2), seq_len=1000) == []
    # CP2 + SP over TP2: 2·2·2 = 8 → 1004 fails.
    assert validate_layout(TINY, ParallelLayout(tp=2, cp=2, sequence_parallel=True), seq_len=1004) == [
        "sequence length 1004 is not a multiple of 2 × CP 2 × TP 2 (SP) = 8"
    ]
    assert validate_layout(TINY, ParallelLayout(), seq_len=1001) == []  # CP1, no SP: anything goes


def test_sequence_parallel_rules():
    assert validate_layout(TINY, ParallelLayout(sequence_parallel=True)) == [
        "--sequence-parallel needs --tensor-model-parallel-size > 1 (it is 1)"
    ]
    assert validate_layout(TINY, ParallelLayout(tp=2)) == [
        "MoE with --tensor-model-parallel-size 2 needs --sequence-parallel "
        "(megatron-core's MoELayer refuses to train without it)"
    ]


def test_world_size_mismatch():
    layout = ParallelLayout(tp=8, pp=4, cp=2, ep=16, sequence_parallel=True)
    assert validate_layout(BIG, layout, world_size=48) == ["world size 48 != TP 8 × PP 4 × CP 2 × DP 1 = 64"]
    with pytest.raises(LayoutError, match=r"world size 48 is not divisible by TP 8 × PP 4 × CP 2 = 64"):
        ParallelLayout.for_world_size(48, tp=8, pp=4, cp=2)
    assert ParallelLayout.for_world_size(128, tp=8, pp=4, cp=2).dp == 2


def test_bad_sizes_stop_before_dividing():
    assert validate_layout(BIG, ParallelLayout(tp=0, ep=-1)) == [
        "--tensor-model-parallel-size 0 must be an integer ≥ 1",
        "--expert-model-parallel-size -1 must be an integer ≥ 1",
    ]


def test_several_errors_at_once():
    # TP7 PP5 CP2 EP7 (DP1 → 70 ranks) asked of 60 GPUs with a 1001-token sequence and no SP.
    layout = ParallelLayout(tp=7, pp=5, cp=2, ep=7)
    problems = validate_layout(BIG, layout, world_size=60, seq_len=1001)
    expected_starts = [
        "world size 60 != TP 7 × PP 5 × CP 2 × DP 1 = 70",
        "num_attention_heads 96 is not divisible by --tensor-model-parallel-size 7",
        "num_key_value_heads (query groups) 8 is neither",
        "intermediate_size (dense MLP) 12288 is not divisible by --tensor-model-parallel-size 7",
        "shared expert width 1536 is not divisible by --tensor-model-parallel-size 7",
        "n_routed_experts 160 is not divisible by --expert-model-parallel-size 7",
        "num_hidden_layers 92 is not divisible by --pipeline-model-parallel-size 5",
        "MoE with --tensor-model-parallel-size 7 needs --sequence-parallel",
        "sequence length 1001 is not a multiple of 2 × CP 2 = 4",
    ]
    assert len(problems) == len(expected_starts)
    for problem, start in zip(problems, expected_starts):
        assert problem.startswith(start), (problem, start)
    with pytest.raises(LayoutError) as err:
        check_layout(BIG, layout, world_size=60, seq_len=1001)
    assert err.value.problems == problems
    assert str(err.value).startswith("invalid parallel layout for glm45-355b-a32b:\n  - world size 60")
    assert isinstance(err.value, ValueError)


def test_expert_tp_splits_the_expert_width():
    # moe_intermediate_size 1408 (Air) / ETP 3 is not whole; ETP3 × EP1 = 3 divides DP3.
    assert validate_layout(AIR, ParallelLayout(etp=3, dp=3)) == [
        "moe_intermediate_size 1408 is not divisible by --expert-tensor-parallel-size 3"
    ]


def test_padded_vocab_size():
    # 151552 = 1184 · 128 = 148 · 1024 = 296 · 512: already a multiple for TP 1, 4, 8.
    assert padded_vocab_size(BIG, 1) == 151552
    assert padded_vocab_size(BIG, 8) == 151552
    # TP7: multiple 896; 151552 / 896 = 169.14 → 170 · 896 = 152320.
    assert padded_vocab_size(BIG, 7) == 152320
    # Tiny vocab 32: TP1 → 128, TP2 → 256.
    assert padded_vocab_size(TINY, 1) == 128 and padded_vocab_size(TINY, 2) == 256
    # Not a layout error: at TP6 (vocab pads to 768·198 = 152064) the only complaint is the 8 query groups.
    assert padded_vocab_size(BIG, 6) == 152064
    assert validate_layout(BIG, ParallelLayout(tp=6, sequence_parallel=True)) == [
        "num_key_value_heads (query groups) 8 is neither a multiple nor a divisor of --tensor-model-parallel-size 6"
    ]


def test_megatron_args():
    layout = ParallelLayout(
        tp=4,
        pp=8,
        cp=2,
        ep=8,
        sequence_parallel=True,
        decoder_first_pipeline_num_layers=10,
        decoder_last_pipeline_num_layers=10,
    )
    assert layout.megatron_args() == [
        "--tensor-model-parallel-size",
        "4",
        "--pipeline-model-parallel-size",
        "8",
        "--context-parallel-size",
        "2",
        "--expert-model-parallel-size",
        "8",
        "--expert-tensor-parallel-size",
        "1",
        "--sequence-parallel",
        "--decoder-first-pipeline-num-layers",
        "10",
        "--decoder-last-pipeline-num-layers",
        "10",
    ]
    assert ParallelLayout().megatron_args()[-2:] == ["--expert-tensor-parallel-size", "1"]


def test_layout_is_frozen():
    with pytest.raises(AttributeError):
        ParallelLayout().tp = 2  # type: ignore[misc]
