"""Colocated weight update on one GPU: the `tensor` transport's path vs a plain device copy of the same bytes.

    python benchmarks/colocated_update.py [--hidden 1024 --layers 8 --experts 64 --ffn 512] [--bucket-mb 512]

A sender process holds the trainer's weights of a GLM-4.5-shaped model (default ≈1.06 B parameters, bf16) on
the GPU; the receiver process (the engine's side) holds its own copy and loads what arrives. Two paths:
- flat (what `TensorTransport` does once the trainer's weights are flattened, `glm_rl/weights/flat.py`): the
  whole model is ONE CUDA IPC handle plus a layout; the receiver decodes it with `deserialize_flattened`
  (`glm_rl/weights/wire.py`, what the engine uses) and, its own weights being flattened with the same layout,
  copies it in one go;
- per-tensor buckets (the path before flattening): one IPC handle per tensor, `--bucket-mb` per message.
Baseline: one `copy_` of a flat buffer of the same bytes on the same device.
Prints a table and writes JSON (benchmarks/results/colocated_update.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from glm_rl.weights.flat import entries_to_json, plan_layout, views
from glm_rl.weights.wire import (deserialize_flattened, deserialize_named_tensors, serialize_flattened,
                                 serialize_named_tensors)


def glm45_shapes(hidden: int, layers: int, experts: int, ffn: int, vocab: int = 151552) -> dict[str, tuple]:
    """HF names and shapes of a GLM-4.5-shaped model (first layer dense, the rest MoE, 8 q-heads per kv-head)."""
    head_dim, kv = 128, max(1, hidden // 1024)
    q = 8 * kv * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, q),
                   p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        if i == 0:
            shapes |= {p + "mlp.gate_up_proj.weight": (8 * ffn, hidden), p + "mlp.down_proj.weight": (hidden, 4 * ffn)}
        else:
            shapes |= {p + "mlp.experts.gate_up_proj": (experts, 2 * ffn, hidden),
                       p + "mlp.experts.down_proj": (experts, hidden, ffn), p + "mlp.gate.weight": (experts, hidden),
                       p + "mlp.shared_experts.gate_up_proj.weight": (2 * ffn, hidden),
                       p + "mlp.shared_experts.down_proj.weight": (hidden, ffn)}
    return shapes


def buckets(shapes: dict[str, tuple], max_bytes: int) -> list[list[str]]:
    out, cur, size = [], [], 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        if cur and size + n > max_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    return out + [cur]


def receiver(shapes, conn) -> None:
    """The engine's side: its weights flattened with the same layout (as `EmbeddedEngine` keeps them)."""
    entries, nbytes = plan_layout([(n, torch.empty(s, dtype=torch.bfloat16, device="meta")) for n, s in shapes.items()])
    own = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    params = dict(views(own, entries))
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        kind, payload = msg
        if kind == "flat":
            flat, layout = deserialize_flattened(payload)
            assert layout == entries
            own.copy_(flat)  # EngineWeights.load_flattened: same layout → one copy
        else:
            for name, t in deserialize_named_tensors(payload):
                params[name].copy_(t)
        torch.cuda.synchronize()
        conn.send("ok")
    conn.send({n: float(p.float().sum()) for n, p in list(params.items())[:4]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/colocated_update.json"))
    args = ap.parse_args()
    shapes = glm45_shapes(args.hidden, args.layers, args.experts, args.ffn)
    entries, nbytes = plan_layout([(n, torch.empty(s, dtype=torch.bfloat16, device="meta")) for n, s in shapes.items()])
    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    weights = dict(views(flat, entries))  # the trainer's weights, flattened
    for t in weights.values():
        t.normal_()
    layout = entries_to_json(entries)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    plan = buckets(shapes, args.bucket_mb << 20)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(shapes, child))
    proc.start()
    assert parent.recv() == "ready"
    def sync(kind: str) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if kind == "flat":
            parent.send(("flat", serialize_flattened(flat, layout)))
            assert parent.recv() == "ok"
        else:
            for names in plan:
                parent.send(("named", serialize_named_tensors([(n, weights[n]) for n in names])))
                assert parent.recv() == "ok"
        return time.perf_counter() - t0

    first = {k: sync(k) for k in ("flat", "named")}  # the first sync opens the IPC handles: reported apart
    times = {k: min(sync(k) for _ in range(args.repeats)) for k in ("flat", "named")}
    parent.send(None)
    sums = parent.recv()
    proc.join()
    for n, v in sums.items():  # the receiver really holds the sender's weights
        assert abs(v - float(weights[n].float().sum())) <= 1e-3 * max(1.0, abs(v)), n

    flat_src = torch.empty(total, dtype=torch.uint8, device="cuda")
    flat_dst = torch.empty_like(flat_src)
    copies = []
    for _ in range(args.repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        flat_dst.copy_(flat_src)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    base = min(copies[1:])
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "params": total // 2, "bytes": total, "buckets": len(plan), "first_sync_s": first,
              "update_s": times, "update_GBps": {k: total / v / 1e9 for k, v in times.items()},
              "device_copy_s": base, "device_copy_GBps": total / base / 1e9,
              "ratio": {k: base / v for k, v in times.items()}}
    print(f"{'path':<36}{'seconds':>10}{'GB/s':>10}{'vs copy':>9}")
    for k, label in (("flat", "colocated update, flat (1 handle)"), ("named", "colocated update, per tensor")):
        print(f"{label:<36}{times[k]:>10.4f}{total / times[k] / 1e9:>10.1f}{base / times[k]:>9.2f}")
    print(f"{'device copy, same bytes':<36}{base:>10.4f}{total / base / 1e9:>10.1f}{1.0:>9.2f}")
    print(f"({total / 1e9:.2f} GB, {result['params'] / 1e9:.2f} B params, {len(plan)} buckets; first sync "
          f"flat {first['flat']:.3f}s, per tensor {first['named']:.3f}s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
