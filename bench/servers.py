"""Start and stop the servers under test: 127.0.0.1, a free port, pinned to the server cores, always cleaned up.

Each server runs in its own process group (start_new_session) so stopping it ends LitServe's worker processes
too: SIGTERM to the group first, SIGKILL after a bounded wait. Nothing the benchmark started outlives it:

* SIGTERM, SIGINT (Ctrl-C) and SIGHUP to the benchmark (`timeout`, a closed terminal, CI) send SIGTERM to every
  live server's group at once, then unwind (KeyboardInterrupt / SystemExit 128+signal), so `finally` blocks and
  the atexit hook stop whatever is left, SIGKILL included (a second signal kills the groups at once). The
  handlers are installed by the first `Server.start()` from the main thread (where the handlers are Python's
  defaults) or by `install_signal_handlers()`;
* every child also gets the kernel's parent-death signal (Linux `PR_SET_PDEATHSIG`: SIGTERM when the benchmark
  dies, even of SIGKILL);
* the atexit hook stops anything still up on a normal exit or an exception.

`spawn()` starts any other helper process (the in-process limit) the same way.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.workload import BENCH_DIR, ROOT

_LIVE: list["Server"] = []
_GROUPS: dict[int, subprocess.Popen] = {}  # process group id -> its leader, for everything started here
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_signalled = 0
UNWIND_S = 30.0  # after a signal, the most the bench spends unwinding before it exits regardless


def _pdeathsig() -> None:
    """In the child (preexec): SIGTERM when the parent dies, whatever it died of (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _preexec(cpus: set[int] | None):
    def run() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # spawn() blocks them around the fork
        _pdeathsig()
        if cpus:
            os.sched_setaffinity(0, cpus)
    return run


def spawn(argv: list[str], *, cpus: set[int] | None = None, **popen) -> subprocess.Popen:
    """Popen in a new process group, registered for the signal handlers and the atexit hook (unregister with
    `reap`). Signals are blocked between the fork and the registration, so no child escapes them."""
    if threading.current_thread() is threading.main_thread():
        install_signal_handlers()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_preexec(cpus), **popen)
        _GROUPS[proc.pid] = proc
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return proc


def kill_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout`; then whatever is left of the group is killed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    # LitServe's workers may outlive their parent briefly: clear the group
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _GROUPS.pop(proc.pid, None)


def reap(proc: subprocess.Popen) -> None:
    """`proc` has ended: forget it (and kill any process it left in its group)."""
    kill_group(proc, timeout=0.1)


def _on_signal(signum: int, frame) -> None:
    global _signalled
    _signalled += 1
    for pgid in list(_GROUPS):  # at once, without waiting: the unwinding below waits and escalates
        try:
            os.killpg(pgid, signal.SIGTERM if _signalled == 1 else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if _signalled > 1:
        return  # already unwinding
    # The exception below unwinds the bench (finally blocks, atexit). Python drops an exception raised
    # while a finaliser runs ("Exception ignored in ..."), and a signal landing there left the bench
    # running its million requests against dead servers (seen once in CI, under load): this timer ends
    # the process anyway once the normal unwinding has had its time.
    timer = threading.Timer(UNWIND_S, _force_exit, args=(signum,))
    timer.daemon = True
    timer.start()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _force_exit(signum: int) -> None:
    for pgid in list(_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os._exit(128 + signum)


def install_signal_handlers() -> bool:
    """Our handler for SIGTERM / SIGINT / SIGHUP where Python's defaults are in place (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in _SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _on_signal)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    predict_path: str
    cpus: set[int] | None
    log_path: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    started_s: float = 0.0
    notes: dict = field(default_factory=dict)
    cwd: Path | None = None  # the checkout to run from (default: this one)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = spawn(self.argv, cpus=self.cpus, env=self.env, cwd=self.cwd or ROOT, stdout=log,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        _LIVE.append(self)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                   f"log: {self.log_path}\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        self.started_s = time.monotonic() - t0
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log: {self.log_path}\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu_by_process(self) -> dict[int, float]:
        """User + system CPU seconds of each live process of the server's tree (the root first): with
        MMSERVE_WORKERS > 1 the root is the engine and its children the front-ends, LitServe runs workers."""
        import psutil

        out = {}
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def cpu_seconds(self) -> float:
        """CPU seconds of the server's whole process tree so far (take the difference around a measurement)."""
        return sum(self.cpu_by_process().values())

    def rss_bytes(self) -> int:
        """Resident memory of the server's whole process tree (LitServe runs several processes)."""
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        kill_group(proc, timeout)
        if self in _LIVE:
            _LIVE.remove(self)
        self.proc = None

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _cleanup() -> None:
    for s in list(_LIVE):
        s.stop(timeout=5)
    for proc in list(_GROUPS.values()):
        kill_group(proc, timeout=5)


def _base_env(root: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def mmserve(repository: Path, *, name: str, max_batch_size: int | str, threads: int, cpus: set[int] | None,
            device: str, log_dir: Path, extra_env: dict[str, str] | None = None, root: Path | None = None) -> Server:
    """mmserve (`python -m app`) from `root` (default: this checkout; another one for a before/after run)."""
    port = free_port()
    env = _base_env(root or ROOT)
    env.update({
        "MMSERVE_REPOSITORY": str(repository), "MMSERVE_HOST": "127.0.0.1", "MMSERVE_PORT": str(port),
        "MMSERVE_DEVICE": device, "MMSERVE_INTRA_OP_THREADS": str(threads), "MMSERVE_INTER_OP_THREADS": "1",
        "MMSERVE_MAX_BATCH_SIZE": str(max_batch_size), "MMSERVE_QUEUE_SIZE": "1024",
        "MMSERVE_GRPC_PORT": "0",  # the benchmark drives HTTP; a fixed gRPC port would collide between servers
        "MMSERVE_DRAIN_PERIOD_S": "0",  # no load balancer to tell: stop at once
    })
    env.update(extra_env or {})
    s = Server(name, [sys.executable, "-m", "app"], env, "/readyz", "/v1/classify", cpus,
               log_dir / f"{name}.log", port, cwd=root)
    s.notes = {k: v for k, v in env.items() if k.startswith("MMSERVE_")}
    return s


def litserve(version_dir: Path, *, max_batch_size: int, batch_timeout: float, threads: int, cpus: set[int] | None,
             device: str, log_dir: Path, name: str = "litserve", backend: str = "onnx") -> Server:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "peer_litserve.py"), str(version_dir), "--port", str(port),
            "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout),
            "--threads", str(threads), "--device", device] + (["--backend", backend] if backend != "onnx" else [])
    s = Server(name, argv, _base_env(), "/health", "/predict", cpus, log_dir / f"{name}.log", port)
    s.notes = {"max_batch_size": max_batch_size, "batch_timeout_s": batch_timeout, "threads": threads}
    return s
