"""Drafter (MTP layer) weight sync: every transport carries the MTP layer into the engine's drafter, verified.

The trap (SGLang issue 27718): a weight sync that updates the target model but not the speculative drafter
leaves the drafter at its first weights. Outputs stay right — the acceptance rule keeps them the target's — so
nothing fails; only acceptance decays. Here, for each `--update-weight-transfer-mode` (`tensor` by name and as
one flat buffer, `broadcast` over a real gloo group, `p2p` over real Mooncake on loopback TCP), the real
transport pushes the trainer's weights into one in-process EmbeddedEngine with `enable_mtp` (static KV cache,
the default), and the test checks:
(a) the drafter's tensors, read from the engine's live MTP module and from /weights_checksum, are bitwise the
    pushed ones (its embedding / head are the main model's, so those are checked through the drafter too);
(b) each of them differs from what the drafter held before the push;
(c) greedy output with speculation is the plain decode of the pushed main model, and the engine accepts exactly
    the drafts a local reference drafting with the PUSHED drafter accepts (a stale drafter accepts others: the
    test checks that this comparison can tell);
(d) the transport's verification covers the drafter: an engine that drops the drafter's tensors on load fails
    `push(verify=True)` naming them, and a drafter tensor changed in the engine after a push fails `verify`.
And the colocated one-copy sync of `--backend torch` (which trains no MTP layer, so sends none): the drafter's
embedding and head, the main model's modules, move with it; its own layer keeps its weights; decoding stays exact.

The trainer side: the checkpoint's tensors under the names the Megatron backend exports with
`--enable-mtp-training` (`bridge.weight_table(mtp=True)`: `model.layers.{num_hidden_layers}.*`, checked to be
exactly the engine's names), plus noise — building Megatron is not needed to produce them. One engine serves
every test (each pushes its own version), so each "before" is whatever the previous push left.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.engine.batch import GenerationRequest, SamplingParams
from glm_rl.engine.decode import run_batch
from glm_rl.evaluate import chat_prompt_ids
from glm_rl.models.glm45.checkpoint import load_hf_model, load_mtp, read_spec
from glm_rl.models.glm45.hf_names import mtp_named_tensors
from glm_rl.models.glm45.presets import ASSETS, TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.trainer.backends.megatron.bridge import weight_table
from glm_rl.weights.flat import plan_layout, views
from glm_rl.weights.modes import make_transport
from glm_rl.weights.wire import tensor_checksum

Named = list[tuple[str, torch.Tensor]]
API_KEY = "k"  # as in a run: `tensor` then shares CPU tensors by reference (shared memory)
MODES = {"tensor": 1, "tensor-flat": 2, "broadcast": 3, "p2p": 4}  # mode → the weight version it pushes
MAIN_NOISE, DRAFT_NOISE = 2e-3, 0.1  # std of the noise added to main-model / drafter tensors
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def reference():
    """The trainer's starting point (checkpoint main model + MTP layer) and the model a local reference decodes
    with: (HF model, MtpModel, tokenizer, prefix of the drafter's names)."""
    model, tokenizer = load_hf_model(TINY_CHECKPOINT)
    return model, load_mtp(model), tokenizer, f"model.layers.{model.config.num_hidden_layers}."


@pytest.fixture(scope="module")
def base(reference) -> Named:
    """The checkpoint's tensors under the engine's (and Megatron's export) names, main model then drafter."""
    model, mtp, _, _ = reference
    named = {**model.state_dict(), **mtp_named_tensors(mtp, model.config.num_hidden_layers)}
    return [(n, t.detach().clone()) for n, t in named.items()]


@pytest.fixture(scope="module")
def engine():
    e = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), enable_mtp=True, api_key=API_KEY))
    e.start()
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    rows = [json.loads(line) for line in (ASSETS / "arith" / "eval.jsonl").read_text().splitlines()[:6]]
    return [chat_prompt_ids(reference[2], r["prompt"]) for r in rows]


def _trainer_weights(base: Named, prefix: str, seed: int) -> Named:
    """The trainer after a step: every tensor moved, the drafter's by more (so its acceptance visibly moves)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (n, t + (DRAFT_NOISE if n.startswith(prefix) else MAIN_NOISE) * torch.randn(t.shape, generator=gen))
        for n, t in base
    ]


def _drafter(engine: EmbeddedEngine) -> dict[str, torch.Tensor]:
    """What the engine's drafter computes with, read from its live MTP module: its own layer under checkpoint
    names, plus the embedding and head it shares with the main model."""
    mtp = engine.mtp
    own = mtp_named_tensors(mtp, engine.model.config.num_hidden_layers)
    return {**own, "model.embed_tokens.weight": mtp.embed_tokens.weight, "lm_head.weight": mtp.shared_head.weight}


def test_trainer_export_names_are_the_engines_names(engine, base, reference):
    """Megatron's export (`--enable-mtp-training`) names every tensor the engine holds, the drafter's included,
    and nothing else: the name set each transport below pushes."""
    prefix = reference[3]
    exported = {r.name for e in weight_table(read_spec(TINY_CHECKPOINT), mtp=True) for r in e.hf}
    held = set(EngineClient(engine.url, api_key=API_KEY).weights_checksum()["checksums"])
    assert exported == held == {n for n, _ in base}
    drafter = set(mtp_named_tensors(engine.mtp, engine.model.config.num_hidden_layers))
    assert {n for n in held if n.startswith(prefix)} == drafter and len(drafter) == 22


def _transport(mode: str, url: str, named: Named):
    """The real transport for `mode`, prepared, and the named tensors to push. `tensor-flat`: `tensor` sharing
    `named` as one flat buffer (the colocated form); a layout other than the engine's own (its buffer holds the
    main model only) is loaded view by view, by name."""
    if mode == "p2p":
        try:
            import mooncake.engine  # noqa: F401
        except (ImportError, OSError) as e:  # OSError: libibverbs missing
            pytest.skip(f"Mooncake TransferEngine unavailable: {e}")
    transport = make_transport(mode.removesuffix("-flat"), [url], API_KEY, 64 << 10)
    if mode == "tensor-flat":
        entries, total = plan_layout(named)
        flat = torch.zeros(total, dtype=torch.uint8).share_memory_()
        for (_, t), (_, view) in zip(named, views(flat, entries)):
            view.copy_(t)
        transport.flat, named = (flat, entries), views(flat, entries)
    transport.prepare()
    return transport, named


def _greedy(engine: EmbeddedEngine, prompts: list[list[int]]) -> list[dict]:
    client = EngineClient(engine.url, api_key=API_KEY, timeout=120)
    sampling = {"temperature": 0.0, "max_new_tokens": GREEDY.max_new_tokens}
    return client.generate(prompts, sampling)


def _local(reference, named: dict[str, torch.Tensor], prompts: list[list[int]], speculative: bool):
    """Decode `prompts` greedily on the reference model loaded with `named` (plain, or drafting with its MTP)."""
    model, mtp, _, prefix = reference
    with torch.no_grad():
        model.load_state_dict({n: t for n, t in named.items() if not n.startswith(prefix)})
        for n, t in mtp_named_tensors(mtp, model.config.num_hidden_layers).items():
            t.copy_(named[n])
    requests = [
        GenerationRequest(rid=str(i), input_ids=tuple(p), sampling=GREEDY, seed=i) for i, p in enumerate(prompts)
    ]
    gates = [layer.mlp.gate for i, layer in enumerate(model.model.layers) if i >= model.config.first_k_dense_replace]
    common = dict(eos_ids=model.generation_config.eos_token_id, pad_id=0, gates=gates, should_abort=lambda: False)
    if speculative:
        return run_batch(model, requests, mtp=mtp, num_steps=1, **common)
    return run_batch(model, requests, **common)


def _check_drop_is_caught(engine, transport, named: Named, version: int, prefix: str, p2p: bool, monkeypatch):
    """(d) An engine whose load drops the drafter's tensors (SGLang's trap) fails the verified push, by name."""
    before = {n: t.clone() for n, t in _drafter(engine).items() if n.startswith(prefix)}
    # every load path: EngineWeights.load, and the P2P receiver's own handle on it (made first, unpatched)
    for owner in [engine.weights, engine.weights.p2p] if p2p else [engine.weights]:
        load = owner.load
        monkeypatch.setattr(owner, "load", lambda nt, v, load=load: load([x for x in nt if x[0] not in before], v))
    with pytest.raises(RuntimeError, match=rf"differs on {len(before)} tensors, e\.g\. \['{re.escape(prefix)}"):
        transport.push(named, version, verify=True)
    monkeypatch.undo()
    assert all(torch.equal(t, before[n]) for n, t in _drafter(engine).items() if n in before)  # really stale


def _check_decoding(engine, reference, prompts, expected: dict, version: int, not_like: dict) -> None:
    """(c) The engine's greedy speculative output is the plain decode of `expected`'s main model, and it accepts
    exactly the drafts a local reference drafting with `expected`'s MTP layer accepts — which a reference with
    `not_like`'s MTP layer does not (so the comparison can tell the two drafters apart)."""
    answers = _greedy(engine, prompts)
    assert [a["output_ids"] for a in answers] == [r.output_ids for r in _local(reference, expected, prompts, False)]
    accepted = [a["meta_info"]["spec_accept_token_num"] for a in answers]
    assert accepted == [r.accepted_tokens for r in _local(reference, expected, prompts, True)]
    assert sum(accepted) > 0 and all(a["meta_info"]["weight_version"] == version for a in answers)
    assert accepted != [r.accepted_tokens for r in _local(reference, not_like, prompts, True)]


@pytest.mark.parametrize("mode", list(MODES))
def test_sync_moves_the_drafter(mode, engine, base, reference, prompts, monkeypatch):
    version, prefix = MODES[mode], reference[3]
    stale = {n: t.clone() for n, t in _drafter(engine).items()}
    transport, named = _transport(mode, engine.url, _trainer_weights(base, prefix, seed=version))
    try:
        _check_drop_is_caught(engine, transport, named, version, prefix, mode == "p2p", monkeypatch)
        result = transport.push(named, version, verify=True)
        assert result["verified"] and result["tensors"] == len(base) and result["dead"] == []
        pushed = dict(named)

        # (a) bitwise the pushed tensors, in the live drafter and on the checksum route; (b) none as before
        drafter = _drafter(engine)
        assert sum(n.startswith(prefix) for n in drafter) == 22
        for n, t in drafter.items():
            assert torch.equal(t, pushed[n]), n
            assert not torch.equal(t, stale[n]), n
        sums = EngineClient(engine.url, api_key=API_KEY).weights_checksum(sorted(drafter))
        assert sums == {"weight_version": version, "checksums": {n: tensor_checksum(pushed[n]) for n in drafter}}

        # (c) outputs are plain decoding's; the drafts accepted are those of the pushed drafter, not the stale one
        with_stale = {**pushed, **{n: t for n, t in stale.items() if n.startswith(prefix)}}
        _check_decoding(engine, reference, prompts, pushed, version, not_like=with_stale)

        # (d) a drafter tensor changed in the engine after the push fails verification, by name
        weight = engine.mtp.layers[0].eh_proj.weight
        saved = weight.detach().clone()
        with engine.weights.lock:
            weight.data[0, 0] += 1.0
        try:
            with pytest.raises(RuntimeError, match=re.escape(f"differs on 1 tensors, e.g. ['{prefix}eh_proj.weight']")):
                transport.verify(named, version)
        finally:
            with engine.weights.lock:
                weight.data.copy_(saved)
        assert transport.verify(named, version)
    finally:
        transport.close()


def test_colocated_one_copy_moves_the_drafters_shared_embedding_and_head(engine, base, reference, prompts, monkeypatch):
    """`--backend torch` trains no MTP layer, so its colocated sync is the main model's flat buffer alone, in the
    engine's own layout: one copy, no per-name load. The drafter's embedding and head are the main model's
    modules, so they move with it (bitwise); its own layer keeps what it held; decoding stays exact."""
    prefix, version = reference[3], max(MODES.values()) + 1
    trainer = _trainer_weights(base, prefix, seed=version)
    main = [(n, t) for n, t in trainer if not n.startswith(prefix)]
    stale = {n: t.clone() for n, t in _drafter(engine).items()}
    transport, named = _transport("tensor-flat", engine.url, main)
    assert transport.flat[1] == engine.weights.flat[1]  # the engine's own layout: its one-copy path
    monkeypatch.setattr(engine.weights, "load", lambda *a: pytest.fail("the one-copy path loaded by name"))
    try:
        assert transport.push(named, version, verify=True)["verified"]
    finally:
        transport.close()
    pushed = dict(named)
    for n, t in _drafter(engine).items():
        assert torch.equal(t, pushed[n] if n in pushed else stale[n]), n
        assert (n in pushed) != torch.equal(t, stale[n]), n
    expected = {**pushed, **{n: t for n, t in stale.items() if n.startswith(prefix)}}
    unsent = {n: t for n, t in trainer if n.startswith(prefix)}  # a drafter it does not have: drafts differ
    _check_decoding(engine, reference, prompts, expected, version, not_like={**expected, **unsent})
