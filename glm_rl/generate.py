"""`glm-rl generate`: prompts in, tokens / text / logprobs / speculation stats out, without Ray.

Two decoders behind one output: the embedded engine in-process (`generate_engine`: sampling, MTP speculative
decoding) or Megatron's model straight from a torch_dist checkpoint (`generate_megatron`: greedy, a check that
a conversion kept the model). Both answers take the engine's shape, so `print_generations` prints either as
JSON or lines. Kept out of `glm_rl/cli.py`, which only parses the flags.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def read_prompts(prompt_file: Path | None, prompt: list[str] | None) -> list[str]:
    """The prompts: the `--prompt` texts, or the lines of `--prompt-file` (exactly one of the two)."""
    if (prompt_file is None) == (not prompt):
        raise ValueError("give the prompts with --prompt TEXT (repeatable) or --prompt-file FILE (one of them)")
    if prompt:
        return list(prompt)
    return [prompt_text(line) for line in prompt_file.read_text().splitlines() if line.strip()]


def prompt_text(line: str) -> str:
    """A prompt-file line: a JSON object's `prompt`, or the line itself."""
    try:
        row = json.loads(line)
    except ValueError:
        return line
    if isinstance(row, dict):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"prompt file: JSON line without a string `prompt`: {line[:80]!r}")
        return row["prompt"]
    return line


def generate_engine(
    hf_checkpoint: Path,
    texts: list[str],
    *,
    dtype: str,
    seed: int,
    enable_mtp: bool,
    speculative_num_steps: int,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    chat_template: bool,
    as_json: bool,
) -> None:
    """Generate with the embedded engine in-process and print the results."""
    from glm_rl.engine import EmbeddedEngine, EngineConfig

    engine = EmbeddedEngine(
        EngineConfig(
            hf_checkpoint=str(hf_checkpoint),
            dtype=dtype,
            seed=seed,
            enable_mtp=enable_mtp,
            speculative_num_steps=speculative_num_steps,
        )
    )
    engine.start()
    try:
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        requests = _requests(engine, texts, sampling, max_new_tokens, chat_template, seed)
        t0 = time.perf_counter()
        answers = [f.result() for f in engine.submit(requests)]
        seconds = time.perf_counter() - t0
    finally:
        engine.shutdown()
    print_generations(texts, answers, seconds, enable_mtp, temperature, as_json)


def _requests(engine, texts: list[str], sampling: dict, max_new_tokens: int, chat_template: bool, seed: int) -> list:
    """One request per prompt (`sampling`: SamplingParams' other fields), its `max_new_tokens` clipped to the room
    the prompt leaves in the context."""
    from glm_rl.engine.batch import GenerationRequest, SamplingParams, request_seed
    from glm_rl.evaluate import chat_prompt_ids

    requests = []
    for i, text in enumerate(texts):
        ids = (
            chat_prompt_ids(engine.tokenizer, text)
            if chat_template
            else engine.tokenizer.encode(text, add_special_tokens=False)
        )
        room = engine.max_total_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt {i + 1}: {len(ids)} tokens fill the context")
        requests.append(
            GenerationRequest(
                rid=f"p{i}",
                input_ids=tuple(ids),
                sampling=SamplingParams(**sampling, max_new_tokens=min(max_new_tokens, room)),
                seed=request_seed(seed, ("generate", i)),
                return_logprob=True,
            )
        )
    return requests


def generate_megatron(
    megatron_path: Path,
    hf_model: Path,
    texts: list[str],
    *,
    max_new_tokens: int,
    chat_template: bool,
    temperature: float | None,
    enable_mtp: bool,
    as_json: bool,
) -> None:
    """`generate --megatron-path`: checks first (cheap), then Megatron's greedy decoding on one CPU rank."""
    from transformers import AutoTokenizer, GenerationConfig

    from glm_rl.evaluate import chat_prompt_ids
    from glm_rl.megatron_generate import check_generate, megatron_generate

    if temperature not in (None, 0.0) or enable_mtp:
        raise ValueError("--megatron-path decodes greedily: drop --temperature / --enable-mtp")
    spec = check_generate(megatron_path, hf_model)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_model))
    prompts = [
        chat_prompt_ids(tokenizer, t) if chat_template else tokenizer.encode(t, add_special_tokens=False) for t in texts
    ]
    for i, ids in enumerate(prompts):
        if len(ids) >= spec.max_position_embeddings:
            raise ValueError(f"prompt {i + 1}: {len(ids)} tokens fill the context")
    eos = GenerationConfig.from_pretrained(str(hf_model)).eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    t0 = time.perf_counter()
    outs = megatron_generate(megatron_path, prompts, max_new_tokens, eos, in_process=True)
    seconds = time.perf_counter() - t0
    answers = [
        {
            "output_ids": o["output_ids"],
            "text": tokenizer.decode(o["output_ids"], skip_special_tokens=True),
            "meta_info": {
                "output_token_logprobs": [(lp, t, None) for lp, t in zip(o["logprobs"], o["output_ids"])],
                "finish_reason": {"type": o["finish_reason"]},
            },
        }  # the engine's answer shape
        for o in outs
    ]
    print_generations(texts, answers, seconds, False, 0.0, as_json)


def print_generations(
    texts: list[str], answers: list[dict], seconds: float, enable_mtp: bool, temperature: float, as_json: bool
) -> None:
    """One result per prompt and a summary (tokens/s, speculation acceptance): a JSON object, or lines."""
    results = [
        {
            "prompt": text,
            "output_ids": a["output_ids"],
            "text": a["text"],
            "logprobs": [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]],
            "finish_reason": a["meta_info"]["finish_reason"]["type"],
            **{k: v for k, v in a["meta_info"].items() if k.startswith("spec_")},
        }
        for text, a in zip(texts, answers)
    ]
    tokens = sum(len(r["output_ids"]) for r in results)
    verify = sum(r.get("spec_verify_ct", 0) for r in results)
    summary = {
        "prompts": len(results),
        "completion_tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "enable_mtp": enable_mtp,
        "temperature": temperature,
        "spec_verify_ct": verify if enable_mtp else None,
        "spec_accept_length": round(tokens / verify, 4) if verify else None,
    }
    if as_json:
        typer.echo(json.dumps({"results": results, "summary": summary}))
        return
    for i, r in enumerate(results):
        spec = f", accept length {r['spec_accept_length']:.2f}" if "spec_accept_length" in r else ""
        typer.echo(
            f"[{i}] {r['prompt']!r} -> {r['text']!r}  ({len(r['output_ids'])} tokens, "
            f"{r['finish_reason']}{spec})\n    tokens {r['output_ids']}\n"
            f"    logprobs {[round(x, 4) for x in r['logprobs']]}"
        )
    typer.echo(json.dumps(summary))
