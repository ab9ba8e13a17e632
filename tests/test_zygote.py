"""The decoding processes' parent, forked or started afresh, and the workers it forks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bridge.decoding.zygote import Zygote
from tests.polling import wait_for

REPO = Path(__file__).resolve().parent.parent
# A light preload: these tests are about processes, not decoders.
PRELOAD = "json"


def echo(fd: int, text: str) -> None:
    """A worker that writes `text` and its process ID into its pipe, then ends."""
    os.write(fd, f"{text} {os.getpid()}".encode())
    os.close(fd)


def wait_for_eof(fd: int) -> None:
    """A worker that lives until its pipe's other end is closed."""
    while os.read(fd, 4096):
        pass


@contextmanager
def a_thread_running() -> Iterator[None]:
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


def _in_a_new_interpreter(body: str) -> None:
    """Run `body` in a new interpreter, which has no thread: there the parent is forked."""
    script = (
        "import socket, threading, tests.test_zygote as t\n"
        "from bridge.decoding.zygote import Zygote\n"
    )
    subprocess.run([sys.executable, "-c", script + body], check=True, cwd=REPO, timeout=60)


def _check_a_worker_runs(zygote: Zygote) -> None:
    read, write = os.pipe()
    child = zygote.fork(echo, [write], "hello")
    os.close(write)  # the worker's copy is now the only writer
    assert _read_all(read) == f"hello {child.pid}"
    child.join(10)
    assert child.exitcode == 0
    assert not child.is_alive()
    child.close()


def test_a_forked_parent_runs_workers_and_reports_their_exit() -> None:
    # In a process of its own: the fork happens only in a process without threads.
    _in_a_new_interpreter(
        "assert threading.active_count() == 1\n"
        "z = Zygote(t.PRELOAD)\n"
        "assert z.forked\n"
        "t._check_a_worker_runs(z)\n"
        "z.close()\n"
    )


def test_with_threads_running_the_parent_is_a_new_interpreter() -> None:
    with a_thread_running():
        zygote = Zygote(PRELOAD)
    try:
        assert not zygote.forked
        _check_a_worker_runs(zygote)
    finally:
        zygote.close()
    assert not zygote.alive()


def test_a_killed_worker_reports_its_signal() -> None:
    with a_thread_running():
        zygote = Zygote(PRELOAD)
    try:
        read, write = os.pipe()
        child = zygote.fork(wait_for_eof, [read])
        os.close(read)
        assert child.is_alive()
        child.kill()
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        os.close(write)
    finally:
        zygote.close()


def test_the_parent_ends_with_its_caller_and_its_workers_with_their_pipes() -> None:
    # The caller is SIGKILLed: nothing of it may stay behind.
    script = (
        "import os, sys, tests.test_zygote as t\n"
        "from bridge.decoding.zygote import Zygote\n"
        "z = Zygote(t.PRELOAD)\n"
        "read, write = os.pipe()\n"
        "child = z.fork(t.wait_for_eof, [read])\n"
        "print(z.pid, child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    caller = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert caller.stdout is not None
    pids = [int(pid) for pid in caller.stdout.readline().split()]
    caller.kill()
    caller.wait(10)
    wait_for(lambda: not any(_running(pid) for pid in pids), 10, "the parent and worker to end")


def test_the_parent_keeps_none_of_the_callers_files() -> None:
    # A listening socket the caller closes must stop accepting, not live on in the parent.
    _in_a_new_interpreter(
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "port = server.getsockname()[1]\n"
        "z = Zygote(t.PRELOAD)\n"
        "t._check_a_worker_runs(z)\n"
        "server.close()\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', port), timeout=5)\n"
        "    raise SystemExit('the closed socket still accepts')\n"
        "except ConnectionRefusedError:\n"
        "    pass\n"
        "z.close()\n"
    )


def test_a_dead_parent_is_started_again() -> None:
    from bridge.decoding import zygote

    first = zygote.start()
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: not first.alive(), 10, "the parent to end")
    read, write = os.pipe()
    child = zygote.fork(echo, [write], "again")
    os.close(write)
    assert _read_all(read) == f"again {child.pid}"
    assert zygote.start() is not first
    child.close()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_command_forks_the_parent_rather_than_starting_an_interpreter() -> None:
    # The fast start needs the command to start the parent while it runs no thread.
    _in_a_new_interpreter(
        "import bridge.__main__, contextlib, io, sys\n"
        "sys.argv = ['orthanc-bridge', 'catch-up', '-c', '/nonexistent/bridge.yaml']\n"
        "from bridge.decoding import zygote\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        "    assert bridge.__main__.main() == 2\n"
        "assert zygote.start().forked\n"
    )
