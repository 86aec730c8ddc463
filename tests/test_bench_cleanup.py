"""Stopping the benchmark (SIGTERM as `timeout` sends it, Ctrl-C's SIGINT to the whole process group, SIGHUP, or
SIGKILL) leaves none of the processes it started running: not mmserve, not LitServe and its workers, not the
in-process limit (bench/servers.py: process groups, signal handlers, parent-death signal, atexit).

Each case starts `python -m bench` on the tiny model with a load that would run for minutes, waits until the
system under test is up and loaded, signals the bench, and asserts that every process of the bench's tree is gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

psutil = pytest.importorskip("psutil")
pytest.importorskip("aiohttp")
pytest.importorskip("torch")  # building the tiny model (when not cached) trains and exports it


def _tree(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(procs: list) -> list:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _loaded(procs: list) -> bool:
    """Some process of the server's tree holds an established TCP connection (the load generator's)."""
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_ESTABLISHED and c.raddr for c in conns):
            return True
    return False


def _matches(p, marker: str) -> bool:
    try:
        return marker in " ".join(p.cmdline())
    except psutil.Error:
        return False


def _terminal_signals() -> None:
    """SIGHUP and SIGINT at their defaults, as in a terminal. Under nohup (SIGHUP) or as a non-interactive shell's
    background job (`.ci/run &`: SIGINT and SIGQUIT ignored) the test runner passes them on ignored, the bench
    rightly keeps ignoring them, and this test would wait for nothing."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


CASES = [  # (signal, to the whole process group?, systems, what must be running when the signal comes)
    pytest.param(signal.SIGTERM, False, "litserve", "peer_litserve.py", id="sigterm-litserve"),
    pytest.param(signal.SIGINT, True, "mmserve", "-m app", id="ctrl-c-group-mmserve"),
    pytest.param(signal.SIGINT, True, "litserve", "peer_litserve.py", id="ctrl-c-group-litserve"),
    pytest.param(signal.SIGTERM, True, "limit", "bench.limit", id="timeout-group-limit"),
    pytest.param(signal.SIGHUP, False, "nobatch", "-m app", id="sighup-mmserve"),
    pytest.param(signal.SIGKILL, False, "mmserve", "-m app", id="sigkill-mmserve"),
]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig, group, systems, marker", CASES)
def test_stopping_the_bench_leaves_no_process(tmp_path, sig, group, systems, marker):
    if systems == "litserve":
        pytest.importorskip("litserve")
    cmd = [sys.executable, "-m", "bench", "--quick", "--workloads", "tiny", "--systems", systems,
           "--concurrency", "2", "--requests", "1000000", "--name", "t", "--out-dir", str(tmp_path)]
    log = open(tmp_path / "bench.log", "wb")
    bench = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             preexec_fn=_terminal_signals)
    tree: list = []
    try:
        deadline = time.monotonic() + 300
        while True:  # the system under test is up (and, for servers, loaded by the bench's client)
            assert bench.poll() is None, (tmp_path / "bench.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the bench never got its system running"
            tree = _tree(bench.pid)
            ours = [p for p in tree if _matches(p, marker)]
            if ours and (systems == "limit" or _loaded(tree)):
                break
            time.sleep(0.3)
        if systems == "litserve":
            time.sleep(1.0)  # its inference worker and API server are running (they answer); let them settle
        tree = _tree(bench.pid)
        assert tree
        if group:
            os.killpg(bench.pid, sig)
        else:
            os.kill(bench.pid, sig)
        code = bench.wait(90)
        assert code != 0  # stopped, not finished
        gone, alive = psutil.wait_procs(tree, timeout=20 if sig == signal.SIGKILL else 3)
        left = _alive(alive)
        assert not left, [(p.pid, " ".join(p.cmdline())[:120]) for p in left]
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait(10)
        for p in _alive(tree):  # never leave anything behind, whatever the assertion said
            p.kill()
        log.close()


def test_a_swallowed_stop_still_ends_the_bench(tmp_path):
    """A signal whose SystemExit Python drops (it landed in a finaliser) still ends the bench and its children."""
    script = tmp_path / "swallow.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from bench import servers\n"
        "servers.UNWIND_S = 1.0\n"
        "servers.install_signal_handlers()\n"
        "child = servers.spawn(['sleep', '120'])\n"
        "print(child.pid, flush=True)\n"
        "class Finaliser:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)  # the handler runs here; its SystemExit is 'ignored in __del__'\n"
        "f = Finaliser()\n"
        "del f\n"
        "time.sleep(60)  # without the unwind timer the bench would carry on\n"
        "sys.exit(0)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert time.monotonic() - t0 < 30
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "Exception ignored" in r.stderr  # the swallowed SystemExit really happened
    child = int(r.stdout.split()[0])
    gone = False
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            gone = True
            break
        time.sleep(0.1)
    assert gone, "the bench's child outlived it"
