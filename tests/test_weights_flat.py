"""Flattened weights (the colocated fast path): views keep the model's numbers and identities, and an engine
loads the whole model from one shared buffer, bitwise."""

import torch

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.weights.flat import ALIGN, entries_to_json, flatten_module_, plan_layout, views
from glm_rl.weights.wire import tensor_checksum


def test_layout_is_aligned_and_disjoint():
    named = [
        ("a", torch.zeros(3, dtype=torch.float32)),
        ("b", torch.zeros(5, 7, dtype=torch.bfloat16)),
        ("c", torch.zeros(1, dtype=torch.int64)),
    ]
    entries, total = plan_layout(named)
    assert [e.offset for e in entries] == [0, 64, 192]  # 12 B → a 64 B slot, 70 B → 128 B, 8 B → 64 B
    assert total == 256 and all(e.offset % ALIGN == 0 for e in entries)


def test_flatten_keeps_outputs_parameters_and_state():
    model, _ = load_hf_model(TINY_CHECKPOINT)
    x = torch.randint(7, 20, (2, 10))
    before = model(x).logits
    ids = {n: id(p) for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flat, entries = flatten_module_(model)
    assert torch.equal(model(x).logits, before)
    assert {n: id(p) for n, p in model.named_parameters()} == ids  # optimizer state stays valid
    got = dict(views(flat, entries))
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # the buffer sees writes to the model
    assert torch.equal(got["lm_head.weight"], state["lm_head.weight"] + 1.0)


def test_engine_loads_a_flattened_model_bitwise():
    model, _ = load_hf_model(TINY_CHECKPOINT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    flat, entries = flatten_module_(model)
    flat.share_memory_()
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT)))
    client = EngineClient(engine.start())
    try:
        out = client.update_weights_from_flat(flat, entries_to_json(entries), weight_version=7)
        assert out["weight_version"] == 7 and "one copy" in out["message"]  # same layout: the fast path
        answer = client.weights_checksum([e.name for e in entries])
        assert answer["checksums"] == {n: tensor_checksum(t) for n, t in views(flat, entries)}
    finally:
        engine.shutdown()
