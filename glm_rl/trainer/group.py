"""TrainerGroup: one Ray actor per trainer rank, driven in lock step.

The driver shards samples over data-parallel ranks only: with the megatron backend the TP / PP / CP peers of a
DP rank (and, for weight export, every rank) take part in the same collectives, so each receives its DP rank's
shard, and only one rank per DP rank reports results (the backend's `dp_coords`: for megatron the last pipeline
stage's TP-rank-0, CP-rank-0 rank, which holds the logprobs and the loss), so nothing is counted twice.

Faults: every call waits on the ranks' results one by one (`_get`), so the first failure is seen at once. A rank
whose process died raises `TrainerRankDied` naming it (its shard and optimizer state are gone: the run must
stop and resume from a checkpoint); a checkpoint error raised by a rank comes back as itself (one line naming
the file and the OS's reason).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from glm_rl.checkpoint import CheckpointError
from glm_rl.config import AlgoConfig, LoraConfig, MegatronConfig, ModelConfig, RunConfig, SyncConfig, TrainConfig
from glm_rl.memory import reserved_gib
from glm_rl.ray.addresses import bind_gloo_to, free_port, host_for_url, node_ip
from glm_rl.ray.placement import Placement
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.base import TrainerBackend


class TrainerRankDied(RuntimeError):
    """A trainer rank's process died; `ranks` names them."""

    def __init__(self, ranks: list[int], detail: str) -> None:
        super().__init__(f"trainer rank {', '.join(map(str, ranks))} died ({detail})")
        self.ranks = ranks


@dataclass(frozen=True)
class TrainerSections:
    """The config sections a trainer rank reads, and nothing else of the run's config."""

    model: ModelConfig
    train: TrainConfig
    algo: AlgoConfig
    megatron: MegatronConfig
    lora: LoraConfig
    temperature: float  # the rollout's sampling temperature: logprobs are taken under it
    seed: int

    @classmethod
    def of(cls, cfg: RunConfig) -> TrainerSections:
        return cls(
            cfg.model,
            cfg.train,
            cfg.algo,
            cfg.megatron,
            cfg.lora,
            temperature=cfg.rollout.rollout_temperature,
            seed=cfg.seed,
        )


def make_backend(c: TrainerSections, device: str) -> TrainerBackend:
    """The backend --backend names, with its own section (megatron is imported only when chosen)."""
    match c.train.backend:
        case "torch":  # imported here: the driver imports this module too, and never builds a backend
            from glm_rl.trainer.backends.torch_backend import TorchBackend

            return TorchBackend(c.model, c.train, c.algo, lora_cfg=c.lora, temperature=c.temperature, device=device)
        case "megatron":
            from glm_rl.trainer.backends.megatron.backend import MegatronBackend

            return MegatronBackend(
                c.model, c.train, c.algo, megatron_cfg=c.megatron, temperature=c.temperature, seed=c.seed, device=device
            )
        case other:
            raise ValueError(f"--backend {other!r} unknown; valid: torch, megatron")


class TrainerActor:
    """One rank: joins the trainer process group and owns a backend."""

    def __init__(self, sections: TrainerSections, rank: int, world_size: int) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(sections.seed)
        self.rank, self.world_size, self.sections = rank, world_size, sections
        self.backend: TrainerBackend | None = None
        self.sync = None
        self.sync_cfg: SyncConfig | None = None
        bind_gloo_to(node_ip())

    def node_ip(self) -> str:
        return node_ip()

    def rendezvous(self) -> str:
        """Rank 0: the process group's address, on this rank's node (a port free there now)."""
        host = node_ip()
        return f"tcp://{host_for_url(host)}:{free_port(host)}"

    def setup(self, master: str) -> None:
        """Join the trainer process group at `master`, then build the backend (its groups need the world)."""
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=master,
            rank=self.rank,
            world_size=self.world_size,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = make_backend(self.sections, device)
        if device == "cuda":  # CUDA's one-off costs at startup, not in step 1 (a CPU has none worth it)
            t0, tokens = time.time(), self.sections.train.max_tokens_per_gpu
            self.backend.warm_up(tokens)
            print(f"trainer rank {self.rank}: warmed up on a {tokens}-token micro-batch in {time.time() - t0:.1f} s")

    def dp_coords(self) -> tuple[int, bool]:
        """(data-parallel rank, whether this rank reports for it)."""
        return self.backend.dp_coords()

    def logprobs(self, samples: list[Sample]) -> dict:
        return self.backend.logprobs(samples)

    def train_step(self, samples: list[Sample], global_tokens: int) -> dict:
        return self.backend.train_step(samples, global_tokens)

    def save(self, path: str) -> None:
        self.backend.save(Path(path) / f"rank{self.rank}")

    def load(self, path: str) -> None:
        self.backend.load(Path(path) / f"rank{self.rank}")

    def offload(self) -> dict[str, float]:
        """Free this rank's device memory; GiB moved and reserved before / after (colocation metrics)."""
        before = reserved_gib()
        moved = self.backend.offload()
        return {"moved_gib": moved, "active_reserved_gib": before, "reserved_gib": reserved_gib()}

    def onload(self) -> None:
        self.backend.onload()

    def rng_state(self) -> bytes:
        return torch.get_rng_state().numpy().tobytes()

    # weight sync runs on rank 0, which holds a full replica (data parallel); p2p runs on every rank (a source each)
    def setup_sync(
        self, sync: SyncConfig, engine_urls: list[str], api_key: str | None, group_backend: str = "gloo"
    ) -> None:
        from glm_rl.weights.modes import make_transport

        if self.sync is not None:  # rebuilt after an engine restart
            self.sync.close()
        mode, self.sync_cfg = sync.update_weight_transfer_mode, sync
        size, fp8 = sync.update_weight_buffer_size, sync.rollout_fp8
        self.sync = make_transport(mode, engine_urls, api_key, size, fp8=fp8, group_backend=group_backend)
        if mode == "tensor" and not sync.rollout_fp8:  # colocated: share the whole model as one buffer
            self.sync.flat = self.backend.flatten_weights()
        self.sync.prepare()

    def sync_source(self) -> bool:
        return self.backend.is_sync_source()

    def push_weights(self, version: int, defer_verify: bool = False) -> dict:
        """Send this rank's share: the whole model's planned pieces (p2p), else its pipeline stage's tensors,
        streamed bucket by bucket; `defer_verify`: other stages push too, `verify_pushed` follows."""
        offloaded = self.backend.is_offloaded()
        if offloaded:  # an engine restored mid-rollout needs the weights this rank has offloaded
            self.backend.onload()
        p2p = self.sync_cfg.update_weight_transfer_mode == "p2p"
        named = iter(self.backend.named_tensors() if p2p else self.backend.sync_tensors())
        verify = self.sync_cfg.check_weight_update_equal
        try:
            return self.sync.push(named, version, verify, defer_verify=defer_verify)
        finally:
            _drain(named)  # a push that failed midway: the stage's other ranks still wait in its gathers
            if offloaded:
                self.backend.offload()

    def verify_pushed(self, version: int) -> bool:
        return self.sync.verify_pushed(version)

    def export_weights(self) -> None:
        """Take part in a collective weight export without sending (megatron: TP/EP gathers need every rank)."""
        _drain(iter(self.backend.sync_tensors()))

    def shutdown(self) -> None:
        if self.sync is not None:
            self.sync.close()
        dist.destroy_process_group()


class TrainerGroup:
    def __init__(
        self,
        sections: TrainerSections,
        placement: Placement,
        share: float,
        on_start: Callable[[list], None] | None = None,
    ) -> None:
        """`on_start(actors)` is called as soon as the actors exist (the runtime registers their cleanup)."""
        n = sections.train.num_trainer_ranks
        options = {}
        if sections.train.backend == "megatron" and not torch.cuda.is_available():
            # megatron's jit_fuser is torch.compile, chosen when megatron is imported (17 s cold per process on
            # CPU for tiny fused ops): the actor process must start with dynamo off (FACTS.md, cpu_shims.py).
            options["runtime_env"] = {"env_vars": {"TORCHDYNAMO_DISABLE": "1"}}
        remote = ray.remote(TrainerActor)
        self.actors = [
            remote.options(**placement.actor_options(placement.trainer_bundles[r], share), **options).remote(
                sections, r, n
            )
            for r in range(n)
        ]
        if on_start is not None:
            on_start(self.actors)
        master = ray.get(self.actors[0].rendezvous.remote())  # rank 0's node, not the driver's
        ray.get([a.setup.remote(master) for a in self.actors])
        coords = ray.get([a.dp_coords.remote() for a in self.actors])
        self.dp_rank = [dp for dp, _ in coords]  # the shard each actor trains on
        self.reporters = [i for i, (_, lead) in enumerate(coords) if lead]  # one per DP rank
        self.dp_size = len(self.reporters)
        self.collective_export = sections.train.backend == "megatron"
        # the broadcast group: NCCL between GPUs; gloo on CPUs, and colocated (NCCL refuses two ranks on one GPU)
        self.weight_group_backend = "nccl" if placement.use_gpu and share >= 1.0 else "gloo"

    @property
    def rank0(self):
        return self.actors[0]

    def setup_sync(self, sync: SyncConfig, engine_urls: list[str], api_key: str | None) -> None:
        """Weight-sync sources: every rank for p2p (each sends its share of the plan), else one rank per
        pipeline stage (rank 0 alone without PP), each with a transport (a broadcast group) of its own."""
        self._sync_cfg = sync
        if sync.update_weight_transfer_mode == "p2p":
            self._sync_ranks = list(range(len(self.actors)))
        else:
            sources = ray.get([a.sync_source.remote() for a in self.actors])
            self._sync_ranks = [r for r, source in enumerate(sources) if source]
        self._get(
            [
                self.actors[r].setup_sync.remote(sync, engine_urls, api_key, self.weight_group_backend)
                for r in self._sync_ranks
            ],
            self._sync_ranks,
        )

    def push_weights(self, version: int) -> dict:
        """Push on every source rank at once (verified when --check-weight-update-equal). With a collective
        export (megatron), the other ranks run the export alongside without sending. p2p: rank 0's result (it
        commits and verifies); per-stage sources: each verifies once all have pushed, results summed."""
        staged = self._sync_cfg.update_weight_transfer_mode != "p2p" and len(self._sync_ranks) > 1
        pushes = [self.actors[r].push_weights.remote(version, staged) for r in self._sync_ranks]
        helpers = [r for r in range(len(self.actors)) if self.collective_export and r not in self._sync_ranks]
        results = self._get(
            pushes + [self.actors[r].export_weights.remote() for r in helpers], self._sync_ranks + helpers
        )[: len(pushes)]
        if not staged:
            return results[0] | {"sources": len(self._sync_ranks)}  # p2p: every rank writes its share
        t0 = time.time()
        verified = self._sync_cfg.check_weight_update_equal and all(
            self._get([self.actors[r].verify_pushed.remote(version) for r in self._sync_ranks], self._sync_ranks)
        )
        return {
            "verified": verified,
            "bytes": sum(r["bytes"] for r in results),
            "tensors": sum(r["tensors"] for r in results),
            "seconds": max(r["seconds"] for r in results),
            "verify_seconds": max(r["verify_seconds"] for r in results) + time.time() - t0,  # digests, then checks
            "dead": sorted({i for r in results for i in r["dead"]}),
            "sources": len(results),
        }

    def _per_dp(
        self, call: Callable[[ray.actor.ActorHandle, list[Sample]], ray.ObjectRef], shards: list[list[Sample]]
    ) -> list[dict]:
        """`call(actor, shard)` on every actor with its DP rank's shard; the reporting ranks' results, by DP rank."""
        if len(shards) != self.dp_size:
            raise ValueError(f"{len(shards)} sample shards for {self.dp_size} data-parallel ranks")
        results = self._get([call(a, shards[dp]) for a, dp in zip(self.actors, self.dp_rank)], self.ranks)
        return [results[i] for i in self.reporters]

    def logprobs(self, shards: list[list[Sample]]) -> list[dict]:
        return self._per_dp(lambda a, shard: a.logprobs.remote(shard), shards)

    def train_step(self, shards: list[list[Sample]], global_tokens: float) -> list[dict]:
        return self._per_dp(lambda a, shard: a.train_step.remote(shard, global_tokens), shards)

    def save(self, path: Path) -> None:
        self._get([a.save.remote(str(path)) for a in self.actors], self.ranks)

    def load(self, path: Path) -> None:
        self._get([a.load.remote(str(path)) for a in self.actors], self.ranks)

    def offload(self) -> dict[str, float]:
        """Every rank frees its device memory (colocation.py): GiB moved (summed), reserved before / after (the
        largest rank)."""
        rows = self._get([a.offload.remote() for a in self.actors], self.ranks)
        return {
            "memory/trainer_offloaded_gib": sum(r["moved_gib"] for r in rows),
            "memory/trainer_active_gib": max(r["active_reserved_gib"] for r in rows),
            "memory/trainer_idle_gib": max(r["reserved_gib"] for r in rows),
        }

    def onload(self) -> None:
        self._get([a.onload.remote() for a in self.actors], self.ranks)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        ray.get([a.shutdown.remote() for a in self.actors], timeout=timeout_s)

    def check_alive(self) -> None:
        """TrainerRankDied when a rank's process is gone (a no-op call on every rank, answered at once by idle
        ranks)."""
        self._get([a.__ray_ready__.remote() for a in self.actors], self.ranks)

    @property
    def ranks(self) -> list[int]:
        return list(range(len(self.actors)))

    def _get(self, refs: list, ranks: list[int]) -> list:
        """`ray.get(refs)`, refs[i] running on rank ranks[i], raising at the first failure (a stuck collective on
        the other ranks is not waited for): TrainerRankDied when ranks died, a rank's CheckpointError as itself."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as e:
                dead = _dead_ranks(refs, ranks)
                if dead:
                    raise TrainerRankDied(dead, (str(e).strip().splitlines() or [""])[-1][:300]) from None
                if isinstance(getattr(e, "cause", None), CheckpointError):
                    raise CheckpointError(str(e.cause)) from None
                raise
        return ray.get(refs)


def _dead_ranks(refs: list, ranks: list[int], wait_s: float = 10.0) -> list[int]:
    """The ranks among `ranks` whose call failed because their actor died (waiting up to `wait_s` in all)."""
    deadline, dead = time.monotonic() + wait_s, set()
    for ref, rank in zip(refs, ranks):
        ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        try:
            ray.get(ready[0])
        except ray.exceptions.RayActorError:
            dead.add(rank)
        except Exception:  # noqa: BLE001 - another failure: not a death
            pass
    return sorted(dead)


def _drain(named) -> None:
    """Iterate a weight export to its end (its remaining collectives), whatever it raises: the caller's own
    error is what matters."""
    try:
        for _ in named:
            pass
    except Exception:  # noqa: BLE001, S110 - a rank that died mid-export is reported by the group's calls
        pass
