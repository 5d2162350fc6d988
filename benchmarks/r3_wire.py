"""Routed experts (R3) on the wire: JSON numbers (before) vs one base64 buffer (engine/routed_experts.py).

    python benchmarks/r3_wire.py                      # issue 25's rollout: 512 requests x 200 positions x 7 x 8
    python benchmarks/r3_wire.py --requests 64 --positions 4096 --layers 89 --top-k 8   # GLM-4.5 355B, long

Per request, the engine side (ids tensor → meta_info value → JSON body) and the client side (JSON body → the
(positions, layers, top_k) int16 array R3 replays), for the old form (`tolist()` / `np.asarray`), the compact
form (uint8 base64) and SGLang's (int32 over every layer, base64; `--dense-layers` extra layers of zeros).
Prints a table and writes `--out`. CPU only: this is serialisation work, the same on any host.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_rl.engine import routed_experts  # noqa: E402
from glm_rl.engine.routed_experts import RoutingLayout  # noqa: E402


def _json_form(ids: torch.Tensor) -> dict:
    return {"routed_experts": ids.tolist()}


def measure(name, encode, decode, batch: list[torch.Tensor]) -> dict:
    t0 = time.perf_counter()
    bodies = [json.dumps({"meta_info": encode(ids)}) for ids in batch]
    t1 = time.perf_counter()
    arrays = [decode(json.loads(body)["meta_info"]) for body in bodies]
    t2 = time.perf_counter()
    for ids, arr in zip(batch, arrays):
        assert np.array_equal(arr, ids.numpy()), name
    return {
        "form": name,
        "bytes_per_request": sum(map(len, bodies)) / len(bodies),
        "engine_s": t1 - t0,
        "client_s": t2 - t1,
        "total_s": t2 - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--positions", type=int, default=200)
    p.add_argument("--layers", type=int, default=7, help="MoE layers")
    p.add_argument("--dense-layers", type=int, default=1, help="dense layers SGLang's form also carries")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/r3_wire.json")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.positions, args.layers, args.top_k)
    batch = [torch.randint(0, args.experts, shape, generator=g).sort(-1).values for _ in range(args.requests)]
    layout = RoutingLayout(
        num_layers=args.dense_layers + args.layers,
        moe_layers=tuple(range(args.dense_layers, args.dense_layers + args.layers)),
        top_k=args.top_k,
    )
    rows = [
        measure("json lists (before)", _json_form, routed_experts.decode, batch),
        measure("compact base64 (embedded engine)", routed_experts.encode, routed_experts.decode, batch),
        measure(
            "sglang int32 base64",
            lambda ids: routed_experts.encode_sglang(ids, layout),
            lambda meta: routed_experts.decode(meta, layout),
            batch,
        ),
    ]
    base = rows[0]["total_s"]
    print(f"{args.requests} requests x {shape} ids")
    print(f"{'form':<34}{'bytes/req':>11}{'engine s':>10}{'client s':>10}{'total s':>9}{'speed-up':>10}")
    for r in rows:
        r["speedup_vs_json"] = base / r["total_s"]
        print(
            f"{r['form']:<34}{r['bytes_per_request']:>11.0f}{r['engine_s']:>10.3f}{r['client_s']:>10.3f}"
            f"{r['total_s']:>9.3f}{r['speedup_vs_json']:>9.1f}×"
        )
    record = {
        "date": datetime.date.today().isoformat(),
        "host": platform.processor() or platform.machine(),
        "args": vars(args),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
