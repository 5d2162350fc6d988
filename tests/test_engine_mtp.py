"""MTP speculative decoding in the embedded engine, on the shipped tiny checkpoint (fp32, CPU).

What is checked, against the plain decode path and full-sequence recomputes (no fakes):
- greedy output with MTP is token-for-token the plain path's (batched; 1-3 drafts; eos, stop ids, length);
- the acceptance length with one draft on the eval prompts (the issue asks for >= 1.7);
- the drafts are the MTP layer's full-sequence predictions (the batched MTP cache + holes are right);
- the acceptance rule is distribution-exact (synthetic p / q, and end to end at temperature 1);
- logprobs and routed experts (R3) equal a full-sequence recompute of the main model;
- MTP weights live under the checkpoint's names and a weight update of them changes the drafts;
- every check runs over both caches: HF DynamicCaches and the StaticDecoder's preallocated ones (eager on CPU:
  the verify / MTP steps' CUDA graphs need the GPU box), and the static path equals the dynamic one token for
  token. The engine-level checks skip their static variant while the engine builds no decoder under MTP.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from glm_rl.engine import EmbeddedEngine, EngineConfig, routed_experts
from glm_rl.engine.batch import GenerationRequest, SamplingParams
from glm_rl.engine.decode import run_batch, spec_rules
from glm_rl.engine.decode.spec_rules import speculative_accept
from glm_rl.engine.decode.static import StaticDecoder
from glm_rl.engine.decode.static_speculative import StaticSpeculation
from glm_rl.evaluate import chat_prompt_ids
from glm_rl.models.glm45.checkpoint import load_hf_model, load_mtp
from glm_rl.models.glm45.presets import ASSETS, TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.weights.wire import tensor_checksum


@pytest.fixture(scope="module")
def hf():
    model, tokenizer = load_hf_model(TINY_CHECKPOINT)
    return model, load_mtp(model), tokenizer


@pytest.fixture(scope="module", params=["dynamic", "static"])
def static(request) -> bool:
    """Which cache the speculative loop runs over: HF DynamicCaches or a StaticDecoder."""
    return request.param == "static"


@pytest.fixture(scope="module")
def decoder(hf, static):
    """None (DynamicCache path) or a StaticDecoder with the MTP layer's cache (rows for the 800-sample test)."""
    model, mtp, _ = hf
    return StaticDecoder(model, max_batch=800, mtp=mtp) if static else None


@pytest.fixture(scope="module")
def eval_prompts(hf):
    rows = [json.loads(line) for line in (ASSETS / "arith" / "eval.jsonl").read_text().splitlines()]
    return [chat_prompt_ids(hf[2], r["prompt"]) for r in rows]


@pytest.fixture(scope="module")
def client(static):
    engine = EmbeddedEngine(
        EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), seed=1234, enable_mtp=True, static_kv_cache=static)
    )
    url = engine.start()
    if static and engine.decoder is None:
        engine.shutdown()
        pytest.skip("the engine builds no StaticDecoder when enable_mtp is on (yet)")
    yield EngineClient(url, timeout=60)
    engine.shutdown()


def _requests(prompts, **sampling) -> list[GenerationRequest]:
    return [
        GenerationRequest(rid=str(i), input_ids=tuple(p), sampling=SamplingParams(**sampling), seed=1000 + i)
        for i, p in enumerate(prompts)
    ]


def _run(hf, requests, num_steps: int | None, decoder=None, should_abort=lambda: False):
    model, mtp, _ = hf
    gates = [layer.mlp.gate for i, layer in enumerate(model.model.layers) if i >= model.config.first_k_dense_replace]
    common = dict(eos_ids=model.generation_config.eos_token_id, pad_id=0, gates=gates, should_abort=should_abort)
    if num_steps is None:
        return run_batch(model, requests, **common)
    return run_batch(model, requests, mtp=mtp, num_steps=num_steps, decoder=decoder, **common)


def _chi2_pvalue(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells expected below `min_expected` are pooled into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key in set(counts) | set(probs):
        expected, observed = n * probs.get(key, 0.0), counts.get(key, 0)
        if expected < min_expected:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
        else:
            stat, cells = stat + (observed - expected) ** 2 / expected, cells + 1
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    return float(torch.special.gammaincc(torch.tensor((cells - 1) / 2), torch.tensor(stat / 2)))


# -- exactness of outputs ------------------------------------------------------------------------------------
def test_greedy_with_mtp_is_token_for_token_the_plain_output(hf, eval_prompts, client):
    prompts = eval_prompts[:6]
    plain = _run(hf, _requests(prompts, temperature=0.0, max_new_tokens=16), None)
    answers = client.generate(prompts, {"temperature": 0.0, "max_new_tokens": 16})  # one padded batch over HTTP
    assert [a["output_ids"] for a in answers] == [r.output_ids for r in plain]
    assert any(a["meta_info"]["spec_accept_token_num"] > 0 for a in answers)
    for a in answers:
        meta = a["meta_info"]
        assert meta["spec_accept_length"] == pytest.approx(meta["completion_tokens"] / meta["spec_verify_ct"])
        assert meta["spec_draft_token_num"] == meta["spec_verify_ct"]  # one draft per verify
    info = client.server_info()
    assert info["speculative_algorithm"] == "MTP" and info["avg_spec_accept_length"] > 1.0


def test_greedy_batches_with_1_to_3_drafts_are_the_plain_output(hf, eval_prompts, decoder):
    # 1-3 drafts per verify; finishing by eos, by a stop id inside an accepted run, and by length mid-verify
    mixed = (
        _requests(eval_prompts[6:14], temperature=0.0, max_new_tokens=16)
        + _requests(eval_prompts[14:18], temperature=0.0, max_new_tokens=13, ignore_eos=True)
        + _requests(eval_prompts[18:22], temperature=0.0, max_new_tokens=16, stop_token_ids=(20,))
    )
    reference = [r.output_ids for r in _run(hf, mixed, None)]
    assert any(out[-1] == 20 for out in reference[12:20])  # the stop id '=' is reached
    one_token = _requests([[1]], temperature=0.0, max_new_tokens=8, ignore_eos=True)  # shorter than k + 1
    for k in (1, 2, 3):
        assert [r.output_ids for r in _run(hf, mixed, k, decoder)] == reference, k
        assert _run(hf, one_token, k, decoder)[0].output_ids == _run(hf, one_token, None)[0].output_ids, k
    # sampling reduced to the argmax by top-k = 1 / a tiny top-p: the acceptance rule must give greedy too
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = _run(hf, _requests(eval_prompts[6:14], temperature=1.0, max_new_tokens=16, **extra), 2, decoder)
        assert [r.output_ids for r in sampled] == reference[:8], extra


def test_acceptance_length_on_eval_prompts(hf, eval_prompts, decoder):
    """The issue's bar: acceptance length >= 1.7 with one draft token (greedy, 200 eval prompts, batches of 64).
    Measured 2026-11-23: 2.07 by SGLang's definition (completion_tokens / spec_verify_ct), 1.86 counting only
    the tokens the verify forwards emitted ((completion_tokens - 1) / spec_verify_ct)."""
    rows = []
    for start in range(0, len(eval_prompts), 64):
        rows += _run(hf, _requests(eval_prompts[start : start + 64], temperature=0.0, max_new_tokens=32), 1, decoder)
    completion, verify = sum(len(r.output_ids) for r in rows), sum(r.verify_ct for r in rows)
    print(f"acceptance length: {completion / verify:.3f} (SGLang), {(completion - len(rows)) / verify:.3f} (strict)")
    assert completion / verify >= 1.7 and (completion - len(rows)) / verify >= 1.7


@pytest.mark.parametrize("num_steps", [1, 2])
def test_drafts_are_the_mtp_layers_full_sequence_predictions(hf, eval_prompts, decoder, monkeypatch, num_steps):
    """Every draft's logits equal HF's MTP path over the whole sequence so far (no cache, batch 1); a chained
    second draft equals the layer run once more on (its own output state, the first draft)."""
    model, mtp, _ = hf
    seen: list = []
    draft_row = spec_rules.draft_row

    def record(logits, row, *best):
        token, q = draft_row(logits, row, *best)
        seen.append((row, len(row.output_ids), logits.clone(), token))
        return token, q

    monkeypatch.setattr(spec_rules, "draft_row", record)
    monkeypatch.setattr(StaticSpeculation, "fused_greedy", False)  # drafts through `draft_row`
    _run(hf, _requests(eval_prompts[:8], temperature=0.0, max_new_tokens=16), num_steps, decoder)
    assert len(seen) > 8 * num_steps
    worst, first = 0.0, {}
    for row, n_out, logits, token in seen:
        ids = torch.tensor([list(row.req.input_ids) + row.output_ids[:n_out]])
        positions = torch.arange(1, ids.shape[1])[None]
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state[:, :-1]
            inputs = ids[:, 1:]
            if (id(row), n_out) in first:  # the chain's second draft
                state = mtp.forward_layer(0, hidden, positions, None, input_ids=inputs)[:, -1:]
                hidden = torch.cat([hidden, state], dim=1)
                positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
                inputs = torch.cat([inputs, torch.tensor([[first[id(row), n_out]]])], dim=1)
            else:
                first[id(row), n_out] = token
            h = mtp.forward_layer(0, hidden, positions, None, input_ids=inputs)
            worst = max(worst, (mtp._project_to_logits(h)[0, -1] - logits).abs().max().item())
    assert worst <= 1e-4


def test_acceptance_rule_is_distribution_exact_on_synthetic_p_q():
    """Two chained drafts over a 4-token vocabulary: the first two emitted tokens must follow p1(x1) p2(x2|x1)
    exactly. q puts mass where p has none (always rejected) and p == q in one row (never rejected).
    Tolerance: chi-square goodness of fit at significance 1e-3 (seeded, so deterministic); the same test on
    the raw drafts (what a rule without the correction would emit) must fail by a wide margin."""
    gen = torch.Generator().manual_seed(0)
    p1 = torch.tensor([0.5, 0.3, 0.2, 0.0])
    p2 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    q1 = torch.tensor([0.25, 0.25, 0.25, 0.25])
    q2 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.7], [0.6, 0.2, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]])
    n, emitted, drafted = 6000, {}, {}
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=gen))
        d2 = int(torch.multinomial(q2[d1], 1, generator=gen))
        p = torch.stack([p1, p2[d1], torch.full((4,), 0.25)])
        tokens, accepted = speculative_accept(p, torch.stack([q1, q2[d1]]), [d1, d2], gen)
        assert len(tokens) == accepted + 1 and tokens[:accepted] == [d1, d2][:accepted]
        if len(tokens) == 1:  # the next verify step would draw x2 given x1
            tokens.append(int(torch.multinomial(p2[tokens[0]], 1, generator=gen)))
        emitted[tuple(tokens[:2])] = emitted.get(tuple(tokens[:2]), 0) + 1
        drafted[(d1, d2)] = drafted.get((d1, d2), 0) + 1
    exact = {(a, b): float(p1[a] * p2[a, b]) for a in range(4) for b in range(4)}
    assert not any(key[0] == 3 for key in emitted)  # p1(3) = 0
    assert _chi2_pvalue(emitted, exact, n) > 1e-3
    assert _chi2_pvalue(drafted, exact, n) < 1e-12


def test_sampling_with_mtp_matches_the_target_distribution(hf, decoder):
    """Temperature 1, end to end: the first two answer digits of '12+34=' (spread out by the model's answer
    noise) over 800 seeded samples vs the exact joint p(x1) p(x2 | x1) from the main model. The second token
    comes from the acceptance rule (accepted draft or residual sample). Chi-square at significance 1e-3."""
    model, _, tokenizer = hf
    prompt = chat_prompt_ids(tokenizer, "12+34") + tokenizer.encode("12+34=", add_special_tokens=False)
    n = 800
    rows = _run(hf, _requests([prompt] * n, temperature=1.0, max_new_tokens=2), 1, decoder)
    accepted = sum(r.accepted_tokens for r in rows)
    assert 0 < accepted < sum(r.verify_ct for r in rows)  # both branches of the rule ran
    counts: dict = {}
    for r in rows:
        counts[tuple(r.output_ids)] = counts.get(tuple(r.output_ids), 0) + 1
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
        firsts = [int(t) for t in torch.nonzero(p1 > 1e-7)[:, 0]]
        p2 = torch.softmax(model(torch.tensor([prompt + [t] for t in firsts])).logits[:, -1], -1)
    exact = {(a, b): float(p1[a] * p2[i, b]) for i, a in enumerate(firsts) for b in range(p2.shape[1])}
    assert _chi2_pvalue(counts, exact, n) > 1e-3


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_logprobs_and_routed_experts_match_full_recompute(hf, eval_prompts, client, temperature):
    model, _, _ = hf
    n_dense, top_k = model.config.first_k_dense_replace, model.config.num_experts_per_tok
    prompts = eval_prompts[:4]
    params = {"temperature": temperature, "max_new_tokens": 12, "sampling_seed": 7}
    answers = client.generate(prompts, params, return_logprob=True, return_routed_experts=True)
    assert sum(a["meta_info"]["spec_accept_token_num"] for a in answers) > 0
    for p, ans in zip(prompts, answers):
        tokens, meta = p + ans["output_ids"], ans["meta_info"]
        choices: list[torch.Tensor] = []
        hooks = [
            layer.mlp.gate.register_forward_hook(lambda m, a, out: choices.append(out[2].clone()))
            for i, layer in enumerate(model.model.layers)
            if i >= n_dense
        ]
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
        finally:
            for h in hooks:
                h.remove()
        logp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
        got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
        assert [t for _, t, _ in meta["output_token_logprobs"]] == ans["output_ids"]
        assert (got - logp[len(p) - 1 :]).abs().max().item() <= 1e-5
        routed = torch.stack(choices, dim=1).sort(dim=-1).values  # (L-1, n_moe, top_k)
        assert torch.equal(torch.from_numpy(routed_experts.decode(meta)).to(routed.dtype), routed)
        assert routed.shape[1:] == (model.config.num_hidden_layers - n_dense, top_k)


# -- the static cache against the DynamicCache path ---------------------------------------------------------
def _mixed_requests(eval_prompts, seed: int, max_new: int = 20) -> list[GenerationRequest]:
    """Chat prompts cut to mixed lengths plus short random ones; greedy, temperature, top-k and top-p rows;
    max_new_tokens, eos and a stop id end rows at different verify steps."""
    g = torch.Generator().manual_seed(seed)
    kinds = [
        SamplingParams(temperature=0.0, max_new_tokens=max_new),
        SamplingParams(temperature=1.0, max_new_tokens=max_new - 7),
        SamplingParams(temperature=0.8, top_k=5, max_new_tokens=max_new - 3, stop_token_ids=(20,)),
        SamplingParams(temperature=1.2, top_p=0.7, max_new_tokens=max_new - 11, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=max_new - 5, ignore_eos=True),
    ]
    out = []
    for i in range(13):
        if i % 3 == 2:
            ids = torch.randint(0, 32, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        else:
            prompt = eval_prompts[i]
            ids = prompt[: len(prompt) - int(torch.randint(0, 6, (1,), generator=g))]
        out.append(
            GenerationRequest(
                f"r{i}",
                tuple(ids),
                kinds[i % len(kinds)],
                seed=seed * 100 + i,
                return_logprob=True,
                return_routed_experts=True,
            )
        )
    return out


def _assert_same_rows(dynamic, static):
    for a, b in zip(dynamic, static, strict=True):
        assert b.output_ids == a.output_ids, a.req.rid
        assert b.finish == a.finish, a.req.rid
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) <= 1e-5, a.req.rid
        routed_a, routed_b = torch.cat(a.routed), torch.cat(b.routed)
        assert routed_b.shape[0] == len(a.req.input_ids) + len(a.output_ids) - 1, a.req.rid
        assert torch.equal(routed_b.sort(-1).values, routed_a.sort(-1).values), a.req.rid
        assert b.spec_meta() == a.spec_meta(), a.req.rid


def test_static_cache_speculation_equals_the_dynamic_cache_path(hf, eval_prompts):
    model, mtp, _ = hf
    decoder = StaticDecoder(model, max_batch=16, mtp=mtp)
    for k, seed in ((1, 3), (2, 4), (3, 5)):
        requests = _mixed_requests(eval_prompts, seed)
        dynamic = _run(hf, requests, k)
        assert len({len(r.output_ids) for r in dynamic}) > 3, k  # rows finish at different steps: compaction
        assert {r.finish["type"] for r in dynamic} >= {"length", "stop"}, k
        assert sum(r.accepted_tokens for r in dynamic) > 0 and any(
            r.accepted_tokens < r.draft_tokens for r in dynamic if r.req.sampling.temperature > 0
        ), k
        _assert_same_rows(dynamic, _run(hf, requests, k, decoder))
    first = decoder.capacity
    long = [
        GenerationRequest(
            "long",
            tuple(eval_prompts[0]),
            SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True),
            seed=1,
            return_logprob=True,
            return_routed_experts=True,
        )
    ]
    _assert_same_rows(_run(hf, long, 2), _run(hf, long, 2, decoder))
    assert decoder.capacity > first  # both caches regrown for the longer row, results still exact

    def abort_after(n):
        calls = iter(range(10**6))
        return lambda: next(calls) >= n

    requests = _mixed_requests(eval_prompts, 6)
    dynamic, static = _run(hf, requests, 2, None, abort_after(3)), _run(hf, requests, 2, decoder, abort_after(3))
    assert {r.finish["type"] for r in static} >= {"abort"}
    _assert_same_rows(dynamic, static)


def test_fused_greedy_step_equals_the_general_loop(hf, eval_prompts, monkeypatch):
    """One draft, every row greedy: the static path runs `StaticDecoder.verify_greedy` (verify, acceptance and
    the next draft in one step) — same tokens, logprobs, routed experts and speculation counters as the general
    static loop and the DynamicCache path, with rows ending at different steps (eos, stop id, max_new_tokens),
    a compaction and an abort."""
    model, mtp, _ = hf
    greedy = [
        GenerationRequest(
            r.rid,
            r.input_ids,
            SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * j, stop_token_ids=(20,)),
            r.seed,
            True,
            True,
        )
        for j, r in enumerate(_mixed_requests(eval_prompts, 7))
    ]
    calls = []
    real = StaticDecoder.verify_greedy
    monkeypatch.setattr(StaticDecoder, "verify_greedy", lambda self, *a: calls.append(1) or real(self, *a))
    fused = _run(hf, greedy, 1, StaticDecoder(model, max_batch=16, mtp=mtp))
    assert calls and len({len(r.output_ids) for r in fused}) > 3
    dynamic = _run(hf, greedy, 1)
    _assert_same_rows(dynamic, fused)
    monkeypatch.setattr(StaticSpeculation, "fused_greedy", False)
    _assert_same_rows(_run(hf, greedy, 1, StaticDecoder(model, max_batch=16, mtp=mtp)), fused)
    monkeypatch.setattr(StaticSpeculation, "fused_greedy", True)

    def abort_after(n):
        calls = iter(range(10**6))
        return lambda: next(calls) >= n

    aborted = _run(hf, greedy, 1, StaticDecoder(model, max_batch=16, mtp=mtp), abort_after(3))
    assert {r.finish["type"] for r in aborted} >= {"abort"}
    _assert_same_rows(_run(hf, greedy, 1, None, abort_after(3)), aborted)


def test_static_speculation_refuses_a_decoder_without_this_mtp_layer(hf):
    model, mtp, _ = hf
    requests = _requests([[1, 2, 3]] * 3, temperature=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="mtp=mtp"):
        _run(hf, requests, 1, StaticDecoder(model, max_batch=4))
    with pytest.raises(ValueError, match="max_batch=2"):
        _run(hf, requests, 1, StaticDecoder(model, max_batch=2, mtp=mtp))


# -- weights -------------------------------------------------------------------------------------------------
def test_mtp_weights_use_checkpoint_names_and_updates_change_the_drafts(hf, eval_prompts, client):
    model, _, _ = hf
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    sums = client.weights_checksum()["checksums"]
    mtp_names = sorted(n for n in sums if n.startswith(prefix))
    assert {
        prefix + n
        for n in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "mlp.experts.gate_up_proj",
            "mlp.experts.down_proj",
        )
    } <= set(mtp_names)
    experts = range(model.config.n_routed_experts)
    with safe_open(str(TINY_CHECKPOINT / "model.safetensors"), "pt") as disk:
        expert = lambda e, w: disk.get_tensor(f"{prefix}mlp.experts.{e}.{w}_proj.weight")  # noqa: E731
        for name in mtp_names:  # the engine's MTP tensors are the checkpoint's, under the same names
            if name.endswith("experts.gate_up_proj"):  # fused in memory: per expert, gate rows then up rows
                expected = torch.stack([torch.cat([expert(e, "gate"), expert(e, "up")]) for e in experts])
            elif name.endswith("experts.down_proj"):
                expected = torch.stack([expert(e, "down") for e in experts])
            else:
                expected = disk.get_tensor(name)
            assert sums[name] == tensor_checksum(expected), name
        original = disk.get_tensor(prefix + "eh_proj.weight")

    greedy = {"temperature": 0.0, "max_new_tokens": 16}
    before = client.generate(eval_prompts[:8], greedy)
    zeroed = torch.zeros_like(original)
    assert client.update_weights_from_tensor([(prefix + "eh_proj.weight", zeroed)], weight_version=3)["success"]
    assert client.weights_checksum([prefix + "eh_proj.weight"])["checksums"] == {
        prefix + "eh_proj.weight": tensor_checksum(zeroed)
    }
    after = client.generate(eval_prompts[:8], greedy)
    assert [a["output_ids"] for a in after] == [b["output_ids"] for b in before]  # drafts never change outputs
    accepted = [sum(a["meta_info"]["spec_accept_token_num"] for a in answers) for answers in (before, after)]
    assert accepted[1] < accepted[0]  # ... but they did change
    client.update_weights_from_tensor([(prefix + "eh_proj.weight", original)], weight_version=4)
    restored = client.generate(eval_prompts[:8], greedy)
    assert [a["meta_info"]["spec_accept_token_num"] for a in restored] == [
        b["meta_info"]["spec_accept_token_num"] for b in before
    ]


# -- command line --------------------------------------------------------------------------------------------
def test_generate_command_reports_speculation(hf, eval_prompts, tmp_path):
    rows = (ASSETS / "arith" / "eval.jsonl").read_text().splitlines()[:3]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("\n".join(rows) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm_rl.cli",
            "generate",
            "--prompt-file",
            str(prompt_file),
            "--enable-mtp",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    plain = _run(hf, _requests(eval_prompts[:3], temperature=0.0, max_new_tokens=16), None)
    assert [r["output_ids"] for r in result["results"]] == [r.output_ids for r in plain]
    assert all(len(r["logprobs"]) == len(r["output_ids"]) and r["spec_verify_ct"] >= 1 for r in result["results"])
    summary = result["summary"]
    assert summary["enable_mtp"] and summary["spec_accept_length"] == pytest.approx(
        summary["completion_tokens"] / summary["spec_verify_ct"], abs=1e-3
    )
