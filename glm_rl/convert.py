"""HF ↔ Megatron torch_dist checkpoints for GLM-4.5.

`glm-rl convert import|export` and tools/convert_*.py are thin entry points over the two jobs here (greedy text
straight from a torch_dist checkpoint, `glm-rl generate --megatron-path`, is `glm_rl/megatron_generate.py`,
which runs on the same ranks). Choices, and why:
- Everything that can be wrong with the input (missing dirs, a config that contradicts the preset, an FP8 or
  non-GLM checkpoint, a layout Megatron cannot build, a non-empty output dir) is checked in the calling process
  before any process group or model exists (`check_*`).
- The Megatron work runs on ranks (`run`): under torchrun each process is one (RANK / WORLD_SIZE from the
  environment); otherwise the job spawns the layout's world size itself on this host (gloo, a file store), so
  a library caller (tests, the trainer) never gets megatron's process-wide CPU shims. Processes that exist
  for the job (the CLI, the tools) run a one-rank job themselves, saving an interpreter start.
- Weights go through the bridge's one HF ↔ Megatron table (`import_hf_weights` / `export_hf_weights`), which
  speaks `Glm4MoeForCausalLM.state_dict()` names; this module maps them to the files' names: experts are fused
  `(E, 2I, H)` / `(E, H, I)` in memory but stored per expert on disk, and the MTP layer's on-disk copies of the
  embedding / LM head (`model.layers.{N}.embed_tokens` / `shared_head.head`) are the main model's tensors in
  Megatron (refused on import if they differ, rewritten from the main ones on export).
- Export writes the template's file layout (same shard files, same names, the template's dtype per tensor)
  and copies its config / tokenizer files, so the result loads with `load_hf_model` and round-trips bitwise.
- Nothing already written is lost: output goes to a hidden `.<name>.partial` sibling, renamed at the end; an
  existing non-empty output dir is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from glm_rl.models.glm45.checkpoint import CheckpointError, check_matches_preset, read_spec
from glm_rl.models.glm45.hf_names import ConvertError, fuse, has_mtp_layer, unfuse
from glm_rl.models.glm45.presets import ModelSpec
from glm_rl.parallel import ParallelLayout, check_layout

# -- HF files ↔ the bridge's (state_dict) names ---------------------------------------------------------------


def read_hf_state(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under the bridge's names."""
    from safetensors.torch import load_file

    disk = {}
    for file in sorted(set(_weight_files(path).values())):
        disk |= load_file(path / file)
    return fuse(disk, spec, str(path))


def _weight_files(path: Path) -> dict[str, str]:
    from glm_rl.models.fp8 import Fp8Error, weight_files

    try:
        return weight_files(path)
    except Fp8Error as e:
        raise ConvertError(str(e)) from None


# -- jobs and their checks (cheap: no process group, no model) ------------------------------------------------
@dataclass(frozen=True)
class ImportJob:
    hf_checkpoint: Path
    save: Path
    layout: ParallelLayout
    spec: ModelSpec
    progress: bool = True


@dataclass(frozen=True)
class ExportJob:
    load: Path
    hf_checkpoint: Path  # template: config, tokenizer, file layout and dtypes
    save: Path
    progress: bool = True


def _check_output(save: Path, flag: str) -> None:
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise ConvertError(f"{flag} {save} exists and is not an empty directory (nothing is overwritten)")
    if not save.resolve().parent.is_dir():
        raise ConvertError(f"{flag} {save}: parent directory {save.resolve().parent} does not exist")


def _hf_spec(path: Path, flag: str, preset: str | None) -> ModelSpec:
    if not path.is_dir():
        raise ConvertError(f"{flag} {path}: no such directory (expected an HF GLM-4.5 checkpoint)")
    try:
        spec = check_matches_preset(path, preset) if preset else read_spec(path)
    except CheckpointError as e:  # (an unknown preset name raises its own ValueError, listing the valid ones)
        raise ConvertError(f"{flag}: {e}") from None
    if "quantization_config" in json.loads((path / "config.json").read_text()):
        raise ConvertError(f"{flag} {path}: an FP8 (quantized) checkpoint; import the unquantized one")
    return spec


def default_world_size(tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1) -> int:
    """The fewest ranks that hold the layout: TP×PP×CP×DP with the smallest DP whose stage ranks (TP×CP×DP)
    the expert grid (ETP×EP) divides."""
    if min(tp, pp, cp, ep, etp) < 1:
        return max(tp * pp * cp, 1)  # check_layout names the bad size
    dp = next(d for d in range(1, etp * ep + 1) if (tp * cp * d) % (etp * ep) == 0)
    return tp * pp * cp * dp


def check_import(
    hf_checkpoint: str | Path,
    save: str | Path,
    *,
    model_preset: str | None = None,
    world_size: int | None = None,
    progress: bool = True,
    flags: tuple[str, str] = ("--hf-checkpoint", "--save"),
    **sizes,
) -> ImportJob:
    """Validate an import; `sizes`: tp, pp, cp, ep, etp, decoder_first/last_pipeline_num_layers (None = 1 /
    unset). `world_size` defaults to WORLD_SIZE (torchrun) or the fewest ranks that hold the layout.
    `flags`: how the caller names the two directories, for the messages."""
    hf_checkpoint, save = Path(hf_checkpoint), Path(save)
    spec = _hf_spec(hf_checkpoint, flags[0], model_preset)
    grid = {k: v if v is not None else 1 for k, v in sizes.items() if k in ("tp", "pp", "cp", "ep", "etp")}
    ends = {k: v for k, v in sizes.items() if k.startswith("decoder_") and v is not None}
    world = world_size or int(os.environ.get("WORLD_SIZE", 0)) or default_world_size(**grid)
    tp, pp, cp = grid.get("tp", 1), grid.get("pp", 1), grid.get("cp", 1)
    dp = world // (tp * pp * cp) if tp * pp * cp > 0 and world % (tp * pp * cp) == 0 else 1
    layout = ParallelLayout(**grid, **ends, dp=dp, sequence_parallel=tp > 1)
    check_layout(spec, layout, world_size=world)
    _weight_files(hf_checkpoint)
    _check_output(save, flags[1])
    return ImportJob(hf_checkpoint, save, layout, spec, progress)


def check_export(
    load: str | Path,
    hf_checkpoint: str | Path,
    save: str | Path,
    progress: bool = True,
    flags: tuple[str, str] = ("--hf-checkpoint", "--save"),
) -> ExportJob:
    """Validate an export: a glm_rl torch_dist checkpoint whose architecture equals the template's."""
    load, hf_checkpoint, save = Path(load), Path(hf_checkpoint), Path(save)
    check_pair(load, hf_checkpoint, flags[0])
    _weight_files(hf_checkpoint)
    if int(os.environ.get("WORLD_SIZE", 1)) != 1:
        raise ConvertError(
            "export runs on one process (the torch_dist checkpoint loads at any layout): run it without torchrun"
        )
    _check_output(save, flags[1])
    return ExportJob(load, hf_checkpoint, save, progress)


def check_pair(load: Path, hf_dir: Path, flag: str) -> ModelSpec:
    """The torch_dist checkpoint's spec, which must equal the HF directory's (the fields named if not)."""
    from glm_rl.trainer.backends.megatron.dist_checkpoint import read_meta

    spec = ModelSpec.from_hf_config(read_meta(load)["hf_config"], name=load.name)
    if diff := spec.diff(_hf_spec(hf_dir, flag, None)):
        fields = ", ".join(f"{k}: checkpoint {a!r} vs {flag} {b!r}" for k, (a, b) in diff.items())
        raise ConvertError(f"{flag} {hf_dir}/config.json contradicts the torch_dist checkpoint {load}: {fields}")
    return spec


# -- running on ranks ------------------------------------------------------------------------------------------
class _Status:
    """One status line per stage (rank 0): `[convert import] 2/4 build Megatron model ... 1.3 s`."""

    def __init__(self, title: str, total: int, enabled: bool):
        self.title, self.total, self.enabled, self.done = title, total, enabled, 0

    @contextmanager
    def __call__(self, what: str):
        self.done += 1
        t0 = time.perf_counter()
        if self.enabled:
            print(f"[{self.title}] {self.done}/{self.total} {what} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(
                f"[{self.title}] {self.done}/{self.total} {what}: done in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
                flush=True,
            )


# What spawned ranks start with: CPU only and TorchDynamo off (megatron's torch.compile'd fusions cost ~17 s
# cold on CPU; the variable must be set before megatron is imported). A conversion moves bytes and the greedy
# check decodes a few tokens, so they run on CPU/gloo on every host: one code path, the one CI runs.
RANK_ENV = {"CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"}


def run(fn, world: int, *args, in_process: bool = False) -> None:
    """`fn(rank, world, init_method, *args)` on every rank: this process under torchrun (the tools set
    `RANK_ENV` first); else `world` spawned processes with `RANK_ENV` — or, for one rank with `in_process` (a
    process that exists for this job: the CLI, the tools) on a host without CUDA, this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        fn(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", *args)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="glm_rl_convert_") as tmp:
        init = f"file://{tmp}/store"
        if in_process and world == 1 and not torch.cuda.is_available():
            fn(0, 1, init, *args)
            return
        saved = {k: os.environ.get(k) for k in RANK_ENV}
        os.environ.update(RANK_ENV)  # inherited by the children, restored here after
        try:
            mp.spawn(fn, args=(world, init, *args), nprocs=world, join=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v


@contextmanager
def megatron_ranks(rank: int, world: int, init_method: str, layout: ParallelLayout):
    """This rank in a gloo process group with Megatron's model-parallel groups for `layout`, torn down after."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from glm_rl.trainer.backends.megatron.model import setup_model_parallel

    torch.set_num_threads(1)  # copies and tiny matmuls: extra threads only contend (8 ms per tiny matmul seen)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        setup_model_parallel(tp=layout.tp, ep=layout.ep, pp=layout.pp, cp=layout.cp, etp=layout.etp)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def build_model(spec: ModelSpec, layout: ParallelLayout, dtype: torch.dtype, mtp: bool):
    """This rank's Megatron GPT model for `spec` at `layout`, in eval mode (weights not loaded)."""
    from glm_rl.trainer.backends.megatron.model import build_gpt_model

    return build_gpt_model(
        spec,
        tp=layout.tp,
        ep=layout.ep,
        params_dtype=dtype,
        mtp=mtp,
        first_stage_layers=layout.decoder_first_pipeline_num_layers,
        last_stage_layers=layout.decoder_last_pipeline_num_layers,
    ).eval()


@contextmanager
def _atomic_dir(save: Path, rank: int):
    """Rank 0 prepares `.<name>.partial` next to `save`; after the body every rank has finished and rank 0
    renames it into place."""
    import torch.distributed as dist

    partial = save.resolve().parent / f".{save.name}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run of ours
        partial.mkdir()
    dist.barrier()
    yield partial
    dist.barrier()
    if rank == 0:
        if save.exists():
            save.rmdir()  # checked empty before any work
        partial.rename(save)


def import_worker(rank: int, world: int, init_method: str, job: ImportJob) -> None:
    from glm_rl.trainer.backends.megatron.bridge import import_hf_weights
    from glm_rl.trainer.backends.megatron.dist_checkpoint import save_model

    status = _Status("convert import", 4, job.progress and rank == 0)
    with megatron_ranks(rank, world, init_method, job.layout):
        with status("read HF checkpoint"):
            state = read_hf_state(job.hf_checkpoint, job.spec)
            mtp = has_mtp_layer(state, job.spec)
            dtype = state["model.embed_tokens.weight"].dtype
        with status(f"build Megatron model ({world} ranks: {_layout_text(job.layout)}, mtp={mtp})"):
            model = build_model(job.spec, job.layout, dtype, mtp)
        with status("import weights through the bridge"):
            import_hf_weights(model, job.spec, state)
        with status(f"save torch_dist to {job.save}"), _atomic_dir(job.save, rank) as partial:
            config = json.loads((job.hf_checkpoint / "config.json").read_text())
            meta = {
                "hf_config": config,
                "written_with": dataclasses.asdict(job.layout),
                "mtp": mtp,
                "dtype": str(dtype).removeprefix("torch."),
            }
            save_model(model, partial, meta)


def export_worker(rank: int, world: int, init_method: str, job: ExportJob) -> None:
    from glm_rl.trainer.backends.megatron.bridge import export_hf_weights
    from glm_rl.trainer.backends.megatron.dist_checkpoint import load_model, read_meta

    status = _Status("convert export", 3, job.progress and rank == 0)
    meta = read_meta(job.load)
    spec = ModelSpec.from_hf_config(meta["hf_config"], name=job.load.name)
    with megatron_ranks(rank, world, init_method, ParallelLayout()):
        with status("build Megatron model and load torch_dist"):
            model = build_model(spec, ParallelLayout(), getattr(torch, meta["dtype"]), meta["mtp"])
            load_model(model, job.load)
        with status("export weights through the bridge"):
            state = {name: t.clone() for name, t in export_hf_weights(model, spec)}
        with status(f"write HF checkpoint to {job.save}"), _atomic_dir(job.save, rank) as partial:
            write_like_template(state, spec, job.hf_checkpoint, partial, job.progress)


def write_like_template(
    state: dict[str, torch.Tensor], spec: ModelSpec, template: Path, out: Path, progress: bool
) -> None:
    """Safetensors shards named and laid out as the template's (its dtype per tensor), plus its other files."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    where = _weight_files(template)
    tensors = unfuse(state, spec, set(where))
    missing, extra = sorted(set(where) - set(tensors)), sorted(set(tensors) - set(where))
    if missing or extra:
        raise ConvertError(
            f"exported tensors do not match the template {template}: missing {missing[:5]}, "
            f"not in the template {extra[:5]}"
        )
    for file in tqdm(sorted(set(where.values())), desc="write", unit="file", disable=not progress):
        with safe_open(template / file, framework="pt") as f:
            names = list(f.keys())
            dtypes = {n: f.get_slice(n).get_dtype() for n in names}
        save_file(
            {n: tensors[n].to(_DTYPES[dtypes[n]]).contiguous() for n in names}, out / file, metadata={"format": "pt"}
        )
    for item in template.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)


_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
}


def _layout_text(lo: ParallelLayout) -> str:
    return f"TP{lo.tp} PP{lo.pp} CP{lo.cp} EP{lo.ep} ETP{lo.etp} DP{lo.dp}"


def import_checkpoint(job: ImportJob, in_process: bool = False) -> None:
    run(import_worker, job.layout.world_size, job, in_process=in_process)


def export_checkpoint(job: ExportJob, in_process: bool = False) -> None:
    run(export_worker, 1, job, in_process=in_process)
