"""GLM-4.5 presets: published sizes, every architecture number, HF config round trip, bad names."""

import json
import subprocess
import sys

import pytest

from glm_rl.models.glm45.presets import PRESETS, ModelSpec, get_preset

PUBLISHED = {"glm45-355b-a32b": (355e9, 32e9), "glm45-air-106b-a12b": (106e9, 12e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_reproduce_published_sizes(name):
    counts = get_preset(name).param_counts()
    total, active = PUBLISHED[name]
    assert abs(counts["total_params"] / total - 1) < 0.03, counts
    assert abs(counts["active_params"] / active - 1) < 0.03, counts


def test_355b_numbers():
    s = get_preset("glm45-355b-a32b")
    assert (s.num_hidden_layers, s.first_k_dense_replace, s.hidden_size, s.intermediate_size) == (92, 3, 5120, 12288)
    assert (s.num_attention_heads, s.num_key_value_heads, s.head_dim) == (96, 8, 128)
    assert (s.partial_rotary_factor, s.rope_theta) == (0.5, 1e6)
    assert (s.n_routed_experts, s.num_experts_per_tok, s.routed_scaling_factor) == (160, 8, 2.5)
    assert (s.moe_intermediate_size, s.n_shared_experts, s.use_qk_norm) == (1536, 1, True)
    assert (s.max_position_embeddings, s.vocab_size, s.num_nextn_predict_layers) == (131072, 151552, 1)
    assert s.attention_bias and not s.tie_word_embeddings and s.hidden_act == "silu"


def test_air_numbers():
    s = get_preset("glm45-air-106b-a12b")
    assert (s.num_hidden_layers, s.first_k_dense_replace, s.hidden_size, s.intermediate_size) == (46, 1, 4096, 10944)
    assert (s.n_routed_experts, s.routed_scaling_factor, s.moe_intermediate_size) == (128, 1.0, 1408)
    assert s.use_qk_norm is False and s.num_key_value_heads == 8 and s.head_dim == 128


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    spec = get_preset(name)
    config = spec.to_hf_config()
    assert config.model_type == "glm4_moe"
    assert config.rope_parameters["rope_theta"] == spec.rope_theta
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.head_dim == spec.head_dim and config.use_qk_norm == spec.use_qk_norm
    back = ModelSpec.from_hf_config(config.to_dict(), name=spec.name)
    assert spec.diff(back) == {}
    # the round trip also goes through config.json text
    assert spec.diff(ModelSpec.from_hf_config(json.loads(config.to_json_string()))) == {}


def test_diff_names_fields_and_values():
    a = get_preset("glm45-355b-a32b")
    b = get_preset("glm45-air-106b-a12b")
    d = a.diff(b)
    assert d["hidden_size"] == (5120, 4096) and d["use_qk_norm"] == (True, False)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model preset 'glm45-9b'.*glm45-355b-a32b"):
        get_preset("glm45-9b")


def test_cli_models_json():
    out = subprocess.run(
        [sys.executable, "-m", "glm_rl.cli", "models", "--json"], capture_output=True, text=True, check=True
    ).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(PRESETS)
    assert abs(rows["glm45-355b-a32b"]["total_params"] / 355e9 - 1) < 0.03
    assert abs(rows["glm45-air-106b-a12b"]["active_params"] / 12e9 - 1) < 0.03
    assert rows["glm45-tiny"]["hf_checkpoint"].endswith("glm45-tiny")
    table = subprocess.run(
        [sys.executable, "-m", "glm_rl.cli", "models"], capture_output=True, text=True, check=True
    ).stdout
    assert "glm45-air-106b-a12b" in table and "355" in table
