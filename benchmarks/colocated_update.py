"""Colocated weight update: the `tensor` transport's path vs a plain copy of the same bytes on the same device.

    python benchmarks/colocated_update.py [--hidden 1024 --layers 8 --experts 64 --ffn 512] [--bucket-mb 512]
                                          [--device cuda|cpu] [--out FILE]

A sender process holds the trainer's weights of a GLM-4.5-shaped model (default ≈1.06 B parameters, bf16) on
the GPU (or CPU); the receiver process (the engine's side) holds its own copy and loads what arrives, decoding
each payload with `decode_flattened` / `decode_named_tensors` (`glm_rl/weights/wire.py`, what the engine uses,
as for an authenticated caller). Two paths, each in two wire formats:
- flat (what `TensorTransport` does once the trainer's weights are flattened, `glm_rl/weights/flat.py`): the
  whole model is ONE buffer by reference (a CUDA IPC handle, or a shared-memory file on CPU) plus a layout; the
  receiver's weights being flattened with the same layout, it copies it in one go;
- per-tensor buckets (the path before flattening): `--bucket-mb` per message, each bucket staged as the
  transport does (CPU: copied into shared memory; CUDA: the tensors themselves) and sent by reference.
Formats: `json` (`glm_rl.tensors.v1`, what our client sends an embedded engine) and `pickle` (SGLang's
ForkingPickler form, what it sent before; decoded through the engine's tensor-only unpickler).
Baseline: one `copy_` of a flat buffer of the same bytes on the same device.
Prints a table and writes JSON (default benchmarks/results/colocated_update.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from glm_rl.weights.flat import entries_to_json, plan_layout, views
from glm_rl.weights.wire import (
    decode_flattened,
    decode_named_tensors,
    encode_flattened,
    encode_named_tensors,
    serialize_flattened,
    serialize_named_tensors,
    shared_copy,
)

PATHS = {
    "flat": ("flat", "json"),
    "named": ("named", "json"),
    "flat_pickle": ("flat", "pickle"),
    "named_pickle": ("named", "pickle"),
}


def glm45_shapes(hidden: int, layers: int, experts: int, ffn: int, vocab: int = 151552) -> dict[str, tuple]:
    """HF names and shapes of a GLM-4.5-shaped model (first layer dense, the rest MoE, 8 q-heads per kv-head)."""
    head_dim, kv = 128, max(1, hidden // 1024)
    q = 8 * kv * head_dim
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
        if i == 0:
            shapes |= {p + "mlp.gate_up_proj.weight": (8 * ffn, hidden), p + "mlp.down_proj.weight": (hidden, 4 * ffn)}
        else:
            shapes |= {
                p + "mlp.experts.gate_up_proj": (experts, 2 * ffn, hidden),
                p + "mlp.experts.down_proj": (experts, hidden, ffn),
                p + "mlp.gate.weight": (experts, hidden),
                p + "mlp.shared_experts.gate_up_proj.weight": (2 * ffn, hidden),
                p + "mlp.shared_experts.down_proj.weight": (hidden, ffn),
            }
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


def _sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def receiver(shapes, device, conn) -> None:
    """The engine's side: its weights flattened with the same layout (as `EmbeddedEngine` keeps them)."""
    entries, nbytes = plan_layout([(n, torch.empty(s, dtype=torch.bfloat16, device="meta")) for n, s in shapes.items()])
    own = torch.empty(nbytes, dtype=torch.uint8, device=device)
    params = dict(views(own, entries))
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        kind, payload = msg
        if kind == "flat":
            flat, layout = decode_flattened(payload, trusted=True)
            assert layout == entries
            own.copy_(flat)  # EngineWeights.load_flattened: same layout → one copy
            del flat
        else:
            for name, t in decode_named_tensors(payload, trusted=True):
                params[name].copy_(t)
        _sync_device(device)
        conn.send("ok")
    conn.send({n: float(p.float().sum()) for n, p in list(params.items())[:4]})


class Sender:
    """The trainer's side: flattened weights, and one update per call of `sync(path)` (seconds, round trip)."""

    def __init__(self, shapes: dict[str, tuple], device: str, bucket_bytes: int, conn) -> None:
        named = [(n, torch.empty(s, dtype=torch.bfloat16, device="meta")) for n, s in shapes.items()]
        entries, nbytes = plan_layout(named)
        self.flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.weights = dict(views(self.flat, entries))  # the trainer's weights, flattened
        for t in self.weights.values():
            t.normal_()
        self.layout, self.device, self.conn = entries_to_json(entries), device, conn
        self.plan = buckets(shapes, bucket_bytes)
        self.total = sum(t.numel() * t.element_size() for t in self.weights.values())

    def _stage(self, t: torch.Tensor, wire: str) -> torch.Tensor:
        """As `TensorTransport` stages a bucket (CPU: into shared memory; now `shared_copy`, before a clone
        moved to shared memory)."""
        if t.is_cuda:
            return t
        return shared_copy(t) if wire == "json" else t.detach().clone().share_memory_()

    def sync(self, path: str) -> float:
        layout_kind, wire = PATHS[path]
        _sync_device(self.device)
        t0 = time.perf_counter()
        if layout_kind == "flat":
            payload = (
                encode_flattened(self.flat, self.layout, by_reference=True)
                if wire == "json"
                else serialize_flattened(self.flat, self.layout)
            )
            self.conn.send(("flat", payload))
            assert self.conn.recv() == "ok"
        else:
            for names in self.plan:
                staged = [(n, self._stage(self.weights[n], wire)) for n in names]
                payload = (
                    encode_named_tensors(staged, by_reference=True)
                    if wire == "json"
                    else serialize_named_tensors(staged)
                )
                self.conn.send(("named", payload))
                assert self.conn.recv() == "ok"
                del staged
        return time.perf_counter() - t0


def device_copy_s(total: int, device: str, repeats: int) -> float:
    src = torch.empty(total, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(repeats + 1):
        _sync_device(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync_device(device)
        copies.append(time.perf_counter() - t0)
    return min(copies[1:])


def run(args: argparse.Namespace) -> dict:
    shapes = glm45_shapes(args.hidden, args.layers, args.experts, args.ffn)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(shapes, args.device, child))
    proc.start()
    assert parent.recv() == "ready"
    sender = Sender(shapes, args.device, args.bucket_mb << 20, parent)
    first = {k: sender.sync(k) for k in PATHS}  # the first sync opens handles / moves into shm: reported apart
    runs: dict[str, list[float]] = {k: [] for k in PATHS}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every path alike
        for k in PATHS:
            runs[k].append(sender.sync(k))
    parent.send(None)
    sums = parent.recv()
    proc.join()
    for n, v in sums.items():  # the receiver really holds the sender's weights
        assert abs(v - float(sender.weights[n].float().sum())) <= 1e-3 * max(1.0, abs(v)), n
    total, times = sender.total, {k: min(v) for k, v in runs.items()}
    base = device_copy_s(total, args.device, args.repeats)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    return {
        "device": name,
        "date": time.strftime("%Y-%m-%d"),
        "params": total // 2,
        "bytes": total,
        "buckets": len(sender.plan),
        "first_sync_s": first,
        "update_s": times,
        "update_median_s": {k: sorted(v)[len(v) // 2] for k, v in runs.items()},
        "update_GBps": {k: total / v / 1e9 for k, v in times.items()},
        "device_copy_s": base,
        "device_copy_GBps": total / base / 1e9,
        "ratio": {k: base / v for k, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/colocated_update.json"))
    args = ap.parse_args()
    result = run(args)
    total, times, base = result["bytes"], result["update_s"], result["device_copy_s"]
    labels = {
        "flat": "flat (1 buffer), json",
        "flat_pickle": "flat (1 buffer), pickle (before)",
        "named": "per tensor, json",
        "named_pickle": "per tensor, pickle (before)",
    }
    print(f"{'path':<36}{'seconds':>10}{'median':>10}{'GB/s':>10}{'vs copy':>9}")
    for k, label in labels.items():
        print(
            f"{label:<36}{times[k]:>10.4f}{result['update_median_s'][k]:>10.4f}{total / times[k] / 1e9:>10.1f}"
            f"{base / times[k]:>9.2f}"
        )
    print(f"{'copy, same bytes, same device':<36}{base:>10.4f}{'':>10}{total / base / 1e9:>10.1f}{1.0:>9.2f}")
    print(
        f"({result['device']}: {total / 1e9:.2f} GB, {result['params'] / 1e9:.2f} B params, {result['buckets']} "
        f"buckets; first sync " + ", ".join(f"{k} {v:.3f}s" for k, v in result["first_sync_s"].items()) + ")"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
