"""The main job on this machine, visibly: compressed images in, uncompressed out.

Starts a DCMTK storescp (a workstation that accepts only uncompressed images), Orthanc A (the
source, where a PACS would send) and Orthanc B (the target), loads pydicom's compressed sample
files into A, shows that A cannot send them to the workstation, runs `orthanc-bridge catch-up`,
and shows that B sends every one of them. Everything lives in ./demo-run.

    python scripts/demo.py          # stops the servers at the end
    python scripts/demo.py --keep   # leaves them running to explore (URLs are printed)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.uid import UID  # noqa: E402

from tests.orthanc import (  # noqa: E402
    OrthancServer,
    StoreSCP,
    free_ports,
    pydicom_test_files,
    stop_all,
)

SAMPLES = [
    "MR_small_jpeg_ls_lossless.dcm",
    "693_J2KI.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "JPGExtended.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "CT_small.dcm",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the servers running")
    args = parser.parse_args()
    workdir = REPO / "demo-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workstation = StoreSCP(workdir / "workstation")
    workstation.start()
    modalities = {"workstation": workstation.modality}
    source = OrthancServer("orthanc-a", workdir / "orthanc-a", modalities=modalities)
    target = OrthancServer("orthanc-b", workdir / "orthanc-b", modalities=modalities)
    servers: list[OrthancServer | StoreSCP] = [workstation, source, target]
    try:
        source.start()
        target.start()
        print(f"Orthanc A (source) {source.url}   Orthanc B (target) {target.url}")
        print(f"workstation: DCMTK storescp on port {workstation.port}, uncompressed only\n")
        names = {str(source.upload(pydicom_test_files() / n)["ID"]): n for n in SAMPLES}

        print("BEFORE: Orthanc A sends each instance to the workstation")
        before = show(source, names)
        config = write_config(workdir, source, target)
        print(f"\n$ orthanc-bridge catch-up -c {config.relative_to(REPO)}")
        bridge = subprocess.run(
            [sys.executable, "-m", "bridge", "catch-up", "-c", str(config)], cwd=REPO, check=False
        )
        print("\nAFTER: Orthanc B sends each instance to the workstation")
        after = show(target, names)
        print(
            f"\nThe workstation received {before} of {len(names)} from A, "
            f"{after} of {len(names)} from B; files in {workstation.output_dir}"
        )
        if args.keep:
            servers = []
            print("\nStill running. Stop them with: pkill -f demo-run")
        return 0 if bridge.returncode == 0 and after == len(names) else 1
    finally:
        stop_all(*servers)


def show(server: OrthancServer, names: dict[str, str]) -> int:
    """Print one line per instance: its transfer syntax and whether C-STORE worked."""
    delivered = 0
    for iid, name in names.items():
        syntax = UID(server.transfer_syntax(iid))
        answer = server.store_to_modality("workstation", [iid])
        ok = answer.status_code == 200
        delivered += ok
        outcome = "delivered" if ok else "REFUSED: " + error_text(answer.text)
        print(f"  {name:30} {syntax.name[:44]:44} {outcome}")
    return delivered


def error_text(body: str) -> str:
    """Orthanc's explanation of a failed C-STORE, on one line."""
    for key in ('"Details" : "', '"Message" : "'):
        if key in body:
            return body.split(key, 1)[1].split('"', 1)[0]
    return body.strip().replace("\n", " ")[:80]


def write_config(workdir: Path, source: OrthancServer, target: OrthancServer) -> Path:
    """The demo's bridge.yaml: the shipped defaults, pointed at the demo servers."""
    text = (REPO / "bridge.yaml").read_text()
    text = text.replace("http://localhost:8042", source.url)
    text = text.replace("http://localhost:8043", target.url)
    # A free port for the status page: a bridge already running here may hold 8242.
    text = text.replace("http_listen: 127.0.0.1:8242", f"http_listen: 127.0.0.1:{free_ports(1)[0]}")
    path = workdir / "bridge.yaml"
    path.write_text(text)
    return path


if __name__ == "__main__":
    sys.exit(main())
