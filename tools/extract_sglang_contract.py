"""Extract, from a pinned SGLang release, the names glm_rl emits towards SGLang into a committed fixture.

    pip download --no-deps sglang==0.5.23 -d /tmp/w && mkdir /tmp/sgl && unzip -q /tmp/w/sglang-*.whl -d /tmp/sgl
    pip install --target /tmp/sgl-deps msgspec psutil pybase64 triton pyzmq   # what importing server_args needs
    PYTHONPATH=/tmp/sgl:/tmp/sgl-deps python tools/extract_sglang_contract.py --out glm_rl/rollout/sglang_contract.json

What it records (SGLang cannot run on our CPU machines, so tests check against this instead):
- `server_flags`: every option string of `python -m sglang.launch_server` (ServerArgs.add_cli_args), and which
  of them take no value (store_true / store_false style);
- `requests`: the field names of the request types our client sends (/generate, weight updates, pause, memory
  release, ...), read from `sglang/srt/managers/io_struct.py` (dataclasses and msgspec Structs);
- `sampling_params`: the fields of SGLang's `SamplingParams` (what `sampling_params` may carry).
What it does not record: value types and semantics, response formats, and HTTP routes.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

REQUESTS = [
    "GenerateReqInput",
    "UpdateWeightsFromDistributedReqInput",
    "UpdateWeightsFromTensorReqInput",
    "InitWeightsUpdateGroupReqInput",
    "DestroyWeightsUpdateGroupReqInput",
    "PauseGenerationReqInput",
    "ContinueGenerationReqInput",
    "ReleaseMemoryOccupationReqInput",
    "ResumeMemoryOccupationReqInput",
    "FlushCacheReqInput",
    "UpdateWeightVersionReqInput",
    "CheckWeightsReqInput",
]


def class_fields(source: Path) -> dict[str, list[str]]:
    """Annotated class attributes per class (what dataclasses and msgspec Structs take), bases included.

    Read with `ast`, not imported: io_struct.py imports multimodal packages that are beside the point."""
    tree = ast.parse(source.read_text())
    own, bases = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            own[node.name] = [
                n.target.id
                for n in node.body
                if isinstance(n, ast.AnnAssign)
                and isinstance(n.target, ast.Name)
                and "ClassVar" not in ast.unparse(n.annotation)
            ]
            bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]

    def collect(name: str) -> set[str]:
        return set(own.get(name, [])).union(*(collect(b) for b in bases.get(name, [])))

    return {name: sorted(collect(name)) for name in own}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import importlib.metadata

    import sglang
    from sglang.srt.server_args import ServerArgs

    root = Path(sglang.__file__).resolve().parent

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    flags, switches = set(), set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if action.nargs == 0:
            switches.update(action.option_strings)
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    fields = class_fields(root / "srt" / "managers" / "io_struct.py")
    contract = {
        "sglang_version": version,
        "server_flags": sorted(flags),
        "server_switches": sorted(switches),
        "requests": {name: fields[name] for name in REQUESTS},
        "sampling_params": class_fields(root / "srt" / "sampling" / "sampling_params.py")["SamplingParams"],
    }
    args.out.write_text(json.dumps(contract, indent=1) + "\n")
    print(f"wrote {args.out}: {len(flags)} flags, {len(REQUESTS)} request types")


if __name__ == "__main__":
    main()
