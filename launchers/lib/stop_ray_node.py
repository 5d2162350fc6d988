"""Stop one Ray node started by the launcher, and nothing else on the host.

Run on the node's host as `python - < stop_ray_node.py`, behind a first line (sent by the launcher) that sets
sys.argv to [-, TEMP_DIR, GCS_PORT or ""]: arguments on a command line would match that command itself.
`ray stop` would end every Ray process on the host, including other users' clusters; this ends only the
processes whose command line names TEMP_DIR (gcs_server, raylet, dashboard, log monitor...), the head's Ray
client server for `...:GCS_PORT` (it names no directory), and all their descendants (workers and agents
rename themselves `ray::...`, so they are found through their parents). SIGTERM first, SIGKILL after a grace
period.
"""

import os
import re
import sys

import psutil


def _names_node(args: list[str], temp_dir: str, gcs_port: str) -> bool:
    dir_pattern = re.compile(re.escape(temp_dir.rstrip("/")) + r"(?=/|$|[^\w.-])")
    if any(dir_pattern.search(arg) for arg in args):
        return True
    # the head's Ray client server names neither the temp dir nor a session dir, only the GCS address
    return (
        bool(gcs_port)
        and "ray.util.client.server" in args
        and any(arg.startswith("--address=") and arg.endswith(":" + gcs_port) for arg in args)
    )


def node_processes(temp_dir: str, gcs_port: str) -> list[psutil.Process]:
    me = psutil.Process()
    spared = {me.pid} | {p.pid for p in me.parents()}  # this script and the remote shell that runs it
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in spared or not _names_node(proc.info["cmdline"] or [], temp_dir, gcs_port):
            continue
        try:
            for p in [proc, *proc.children(recursive=True)]:
                if p.pid not in spared:
                    found[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def main(temp_dir: str, gcs_port: str, grace_s: float = 5.0) -> int:
    procs = node_processes(os.path.abspath(temp_dir), gcs_port)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    print(f"stopped {len(procs)} Ray processes under {temp_dir} ({len(alive)} needed SIGKILL)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: (sys.argv = [-, TEMP_DIR, GCS_PORT]) python - < stop_ray_node.py")
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else ""))
