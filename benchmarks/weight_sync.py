"""Weight-sync throughput: Mooncake P2P (TCP, loopback) vs gloo broadcast, same bytes, one receiver process;
then the transfer plan's predicted sync time for GLM-4.5-Air and GLM-4.5 (355B) at cluster scale.

Part 1 (measured, CPU): the source (this process) sends `--mib` MiB in `--tensors` fp32 tensors to a receiver
process. p2p: the receiver registers one buffer with its TransferEngine; the source packs the tensors into a
registered staging buffer and writes them with one `batch_transfer_sync_write` ("p2p" includes the pack copy,
"p2p write" is the write alone). broadcast: a 2-rank gloo group (`create_weight_group`), one broadcast per
tensor, timed until the receiver acknowledges. Best of `--reps`.

Part 2 (predicted): bf16 bytes of every HF tensor (parameter counts as in `glm_rl/models/glm45/presets.py`, the MTP
layer left out), a simple model of the Megatron trainer layout (`plan.megatron_sources`: PP stages by layer,
EP over the expert dim, TP over the TP dim, DP replicas) and 8-GPU engines (TP8 for dense weights, EP8 for
experts, `glm45.hf_names.split_dim`), priced by `plan.predict_sync_seconds` at one `--nic-gbps` NIC per GPU, against
the physical floor (all bytes spread evenly over the smaller side's NICs) and a single-source broadcast.

Usage: python benchmarks/weight_sync.py [--mib 128 --tensors 4 --reps 3 --nic-gbps 400]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

import torch

from glm_rl.models.glm45.hf_names import split_dim
from glm_rl.ray.addresses import free_port
from glm_rl.weights.group import create_weight_group
from glm_rl.weights.mooncake import new_transfer_engine
from glm_rl.weights.transfer_plan import (
    EngineLayout,
    TensorMeta,
    build_plan,
    floor_seconds,
    megatron_sources,
    predict_sync_seconds,
)

OUT = Path(__file__).parent / "results" / "weight_sync.json"


# -- part 1: measured ---------------------------------------------------------------------------------------
def _p2p_receiver(nbytes: int, conn) -> None:
    te = new_transfer_engine("127.0.0.1", "tcp")
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    te.register_memory(buf.data_ptr(), nbytes)
    conn.send((f"127.0.0.1:{te.get_rpc_port()}", buf.data_ptr()))
    conn.recv()  # until the source is done


def _bcast_receiver(port: int, shapes: list, reps: int, conn) -> None:
    torch.set_num_threads(1)
    group = create_weight_group("127.0.0.1", port, rank=1, world_size=2, group_name="bench")
    bufs = [torch.empty(s) for s in shapes]
    for _ in range(reps + 1):
        for b in bufs:
            group.broadcast(b)
        group.broadcast(torch.zeros(1))  # ack round: the source's timer stops after every byte arrived


def measure(mib: int, n_tensors: int, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    rows = (mib << 20) // 4 // n_tensors // 1024
    tensors = [torch.randn(rows, 1024) for _ in range(n_tensors)]
    nbytes = sum(t.numel() * 4 for t in tensors)
    out = {"bytes": nbytes, "tensors": n_tensors}

    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_p2p_receiver, args=(nbytes, child))
    proc.start()
    session, dst = parent.recv()
    te = new_transfer_engine("127.0.0.1", "tcp")
    staging = torch.empty(nbytes, dtype=torch.uint8)
    te.register_memory(staging.data_ptr(), nbytes)
    offs = [sum(t.numel() * 4 for t in tensors[:i]) for i in range(n_tensors)]
    lens = [t.numel() * 4 for t in tensors]
    best_total = best_write = float("inf")
    for _ in range(reps + 1):  # first round warms the connection
        t0 = time.perf_counter()
        for t, o, n in zip(tensors, offs, lens):
            staging[o : o + n].view(torch.float32).view(t.shape).copy_(t)
        t1 = time.perf_counter()
        rc = te.batch_transfer_sync_write(
            session, [staging.data_ptr() + o for o in offs], [dst + o for o in offs], lens
        )
        t2 = time.perf_counter()
        assert rc == 0, f"p2p write failed: rc {rc}"
        best_total, best_write = min(best_total, t2 - t0), min(best_write, t2 - t1)
    parent.send("done")
    proc.join(timeout=60)
    out["p2p_s"], out["p2p_write_s"] = best_total, best_write

    port = free_port()
    proc = ctx.Process(target=_bcast_receiver, args=(port, [tuple(t.shape) for t in tensors], reps, None))
    proc.start()
    group = create_weight_group("127.0.0.1", port, rank=0, world_size=2, group_name="bench")
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for t in tensors:
            group.broadcast(t)
        group.broadcast(torch.zeros(1))
        best = min(best, time.perf_counter() - t0)
    proc.join(timeout=60)
    out["broadcast_s"] = best
    for k in ("p2p", "p2p_write", "broadcast"):
        out[f"{k}_gbps"] = nbytes / out[f"{k}_s"] / 1e9
    out["ratio_p2p_over_broadcast"] = out["p2p_gbps"] / out["broadcast_gbps"]
    out["ratio_p2p_write_over_broadcast"] = out["p2p_write_gbps"] / out["broadcast_gbps"]
    return out


# -- part 2: predicted ----------------------------------------------------------------------------------------
def hf_tensors(spec) -> list[TensorMeta]:
    """Every HF tensor of the model (meta device: shapes only), as bf16."""
    from transformers import Glm4MoeForCausalLM

    with torch.device("meta"):
        model = Glm4MoeForCausalLM(spec.to_hf_config())
    return [TensorMeta(n, tuple(t.shape), "bfloat16") for n, t in model.state_dict().items()]


def predict(
    name: str, spec, *, trainer_gpus: int, tp: int, pp: int, ep: int, engines: int, engine_gpus: int, nic_bytes_s: float
) -> dict:
    tensors = hf_tensors(spec)
    sources = megatron_sources(
        tensors, world=trainer_gpus, tp=tp, pp=pp, ep=ep, num_layers=spec.num_hidden_layers, split=split_dim
    )
    layouts = [EngineLayout(e, engine_gpus, split_dim) for e in range(engines)]
    plan = build_plan(tensors, sources, layouts, chunk_bytes=256 << 20)
    model_bytes = sum(m.itemsize * int(torch.Size(m.shape).numel()) for m in tensors)
    n_dst = engines * engine_gpus
    return {
        "model": name,
        "params": model_bytes // 2,
        "model_bytes": model_bytes,
        "trainer_gpus": trainer_gpus,
        "trainer_layout": f"TP{tp} PP{pp} EP{ep}",
        "engines": f"{engines} x {engine_gpus} GPUs (TP{engine_gpus}/EP{engine_gpus})",
        "bytes_delivered": plan.total_bytes,
        "max_source_bytes": max(plan.bytes_per_source().values()),
        "max_dest_bytes": max(plan.bytes_per_destination().values()),
        "predicted_s": predict_sync_seconds(plan, nic_bytes_s),
        "floor_s": floor_seconds(plan.total_bytes, min(trainer_gpus, n_dst), nic_bytes_s),
        "single_source_broadcast_s": model_bytes / nic_bytes_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--nic-gbps", type=float, default=400.0, help="per-GPU NIC, Gb/s (400: one ConnectX-7 per GPU)")
    a = p.parse_args()
    torch.set_num_threads(1)
    from glm_rl.models.glm45.presets import glm45_355b_a32b, glm45_air_106b_a12b

    m = measure(a.mib, a.tensors, a.reps)
    print(f"CPU loopback, {m['bytes'] / 2**20:.0f} MiB in {m['tensors']} fp32 tensors, best of {a.reps}")
    print(f"{'transport':<28}{'seconds':>10}{'GB/s':>8}")
    for label, k in (
        ("p2p (pack + write)", "p2p"),
        ("p2p (write only)", "p2p_write"),
        ("broadcast (gloo)", "broadcast"),
    ):
        print(f"{label:<28}{m[k + '_s']:>10.3f}{m[k + '_gbps']:>8.2f}")
    print(
        f"p2p / broadcast throughput: {m['ratio_p2p_over_broadcast']:.2f} "
        f"(write only {m['ratio_p2p_write_over_broadcast']:.2f})"
    )

    nic = a.nic_gbps * 1e9 / 8
    preds = [
        predict(
            "GLM-4.5-Air",
            glm45_air_106b_a12b(),
            trainer_gpus=32,
            tp=1,
            pp=4,
            ep=8,
            engines=4,
            engine_gpus=8,
            nic_bytes_s=nic,
        ),
        predict(
            "GLM-4.5 (355B)",
            glm45_355b_a32b(),
            trainer_gpus=64,
            tp=8,
            pp=4,
            ep=16,
            engines=8,
            engine_gpus=8,
            nic_bytes_s=nic,
        ),
    ]
    print(f"\nPredicted P2P sync, one {a.nic_gbps:.0f} Gb/s NIC per GPU (bf16, Megatron layout model)")
    print(f"{'model':<16}{'trainer':<22}{'engines':<28}{'GB moved':>9}{'plan s':>8}{'floor s':>8}{'1-src s':>8}")
    for r in preds:
        trainer = f"{r['trainer_gpus']} GPU {r['trainer_layout']}"
        print(
            f"{r['model']:<16}{trainer:<22}{r['engines']:<28}"
            f"{r['bytes_delivered'] / 1e9:>9.1f}{r['predicted_s']:>8.2f}{r['floor_s']:>8.2f}"
            f"{r['single_source_broadcast_s']:>8.2f}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": platform.machine(),
                "cpus": mp.cpu_count(),
                "measured": m,
                "nic_gbps": a.nic_gbps,
                "predicted": preds,
            },
            indent=2,
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
