"""Time and peak memory of `reconcile` on a source and a target of N instances, old code and new.

Run as `python benchmarks/reconcile.py` (sizes 100,000 and 1,000,000 by default). Real Orthancs
holding a million instances take too long to fill here, so two fake servers stand in for them,
for the listing only: each answers `/system`, `/statistics` and `/instances?since=&limit=` as
Orthanc does (pages in the server's own order, which is not the IDs' order; the target lists its
instances in another order than the source), and 404 to everything else. The target lacks
`--missing` of the source's instances; the bridge asks the source for their files, is told 404,
and records them as vanished: the processing is there, but costs next to nothing, so the
figures are those of listing and comparing. `listed` is the time from the start of the command
to its "the targets lack N" log line, `total` the whole command, `peak` the VmHWM of the bridge's
main process (its decoding processes are apart and idle). The old code is the tree of a git
revision (`--old`, by default the last one before the streaming reconcile), run the same way.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

REPO = Path(__file__).resolve().parent.parent
OLD = "ac183a3"  # main before reconcile streamed its listings

# Runs one bridge command in this process's place and writes its main process's VmHWM
# (bridge.__main__.run would leave through os._exit before anything could read it).
_WRAPPER = r"""
import os, sys
sys.argv = ["orthanc-bridge", *sys.argv[1:]]
from bridge.__main__ import main
code = main()
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
with open(os.environ["PEAK_FILE"], "w") as out:
    out.write(str(peak))
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def instance_id(index: int) -> str:
    """An Orthanc-shaped ID (a SHA-1 in five groups of eight hex digits)."""
    digest = hashlib.sha1(f"fake instance {index}".encode()).hexdigest()
    return "-".join(digest[n : n + 8] for n in range(0, 40, 8))


def serve(port: int, listing: range | list[int]) -> None:
    """A fake Orthanc whose /instances lists `instance_id(i)` for each i of `listing`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            body: object
            if url.path == "/system":
                body = {"Name": "fake", "Version": "1.10.1", "ApiVersion": 16}
            elif url.path == "/statistics":
                body = {"CountInstances": len(listing)}
            elif url.path == "/instances":
                since, limit = int(query.get("since", 0)), int(query.get("limit", 100))
                body = [instance_id(i) for i in listing[since : since + limit]]
            elif url.path == "/changes":
                body = {"Changes": [], "Done": True, "Last": 0}
            else:
                self._answer(404, {"HttpError": "Not Found", "Message": "Unknown resource"})
                return
            self._answer(200, body)

        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_servers(size: int, missing: int) -> tuple[list[multiprocessing.Process], int, int]:
    """The source (IDs 0..size-1 in order) and a target lacking every (size/missing)-th, listed
    in a shuffled order (a multiplicative permutation)."""
    step = size // missing
    shuffled = [(j * 7919 + 13) % size for j in range(size)]
    target = [i for i in shuffled if i % step]
    ports = free_port(), free_port()
    processes = [
        multiprocessing.Process(target=serve, args=(ports[0], range(size)), daemon=True),
        multiprocessing.Process(target=serve, args=(ports[1], target), daemon=True),
    ]
    for process in processes:
        process.start()
    for port in ports:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    return processes, ports[0], ports[1]


def write_config(workdir: Path, source_port: int, target_port: int) -> Path:
    config = {
        "source": {"url": f"http://127.0.0.1:{source_port}", "timeout": 60},
        "target": {"url": f"http://127.0.0.1:{target_port}", "timeout": 60},
        "state_dir": str(workdir / "state"),
        "workers": 1,
        "catch_up_retry_seconds": 10,
        "progress_interval": 5,
        "http_listen": f"127.0.0.1:{free_port()}",
    }
    path = workdir / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(tree: Path, config: Path, missing: int) -> dict[str, float]:
    """Run `reconcile` from the bridge in `tree`; its times and peak."""
    peak_file = config.parent / "peak"
    env = dict(os.environ, PYTHONPATH=str(tree), PEAK_FILE=str(peak_file))
    started_wall = time.time()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, "reconcile", "-c", str(config)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    total = time.monotonic() - started
    if result.returncode != 0 or f"{missing} vanished" not in result.stdout:
        raise SystemExit(f"reconcile failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    found = re.search(r"^(\S+ \S+) .*the targets lack (\d+)", result.stderr, re.MULTILINE)
    if found is None or int(found.group(2)) != missing:
        raise SystemExit(f"no 'the targets lack {missing}' line:\n{result.stderr[-3000:]}")
    logged = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {
        "listed_s": round(logged - started_wall, 1),
        "total_s": round(total, 1),
        "peak_mib": round(int(peak_file.read_text()) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--missing", type=int, default=1000)
    parser.add_argument("--old", default=OLD, help=f"git revision of the old code ({OLD})")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reconcile-bench-") as tmp:
        old_tree = Path(tmp) / "old"
        old_tree.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.old, "bridge"], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
        for size in args.sizes:
            servers, source_port, target_port = start_servers(size, args.missing)
            try:
                for name, tree in (("old", old_tree), ("new", REPO)):
                    workdir = Path(tmp) / f"{name}-{size}"
                    workdir.mkdir()
                    config = write_config(workdir, source_port, target_port)
                    figures = measure(tree, config, args.missing)
                    print(json.dumps({"instances": size, "code": name, **figures}), flush=True)
            finally:
                for server in servers:
                    server.terminate()


if __name__ == "__main__":
    main()
