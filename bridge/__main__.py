"""`python -m bridge` and the `orthanc-bridge` command.

A command that decodes forks the decoding processes' parent (bridge.decoding.zygote) before anything
else is imported: its imports (pydicom, numpy, the codecs: ~0.25 s) then overlap the main
process's own (urllib3, requests, yaml: ~0.15 s), and the first instance is decoded that much
sooner.
"""

import logging
import os
import re
import sys

DECODING_COMMANDS = {"run", "catch-up", "retry", "reconcile"}


def main() -> int:
    """Entry point: start the decoders early when they will be needed, then run the CLI."""
    if DECODING_COMMANDS & set(sys.argv[1:]) and not _on_a_cluster(sys.argv[1:]):
        # Forked now, while this process has imported almost nothing and runs no thread.
        from bridge.decoding import zygote

        zygote.start()
    from bridge.cli import main as cli_main

    return cli_main()


def _on_a_cluster(args: list[str]) -> bool:
    """Whether the configuration sends the transfers to a Dask cluster (`cluster:`), where
    this process decodes nothing: a glance at the file, before yaml is even imported. Wrong
    either way, it costs only start-up time: decoding processes start when first needed."""
    path = "bridge.yaml"
    for index, arg in enumerate(args):
        if arg in ("-c", "--config") and index + 1 < len(args):
            path = args[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return re.search(r"^cluster:[ \t]*(\{|#|$)", file.read(), re.MULTILINE) is not None
    except OSError:
        return False


def run() -> None:
    """Run and exit without the interpreter's teardown.

    Everything is closed by then (state, connections, decoding processes): what is left is
    unloading the modules, 25-35 ms after the last instance of every catch-up.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
