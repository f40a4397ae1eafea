"""Remote targets through TVM's RPC: a tracker hands out sessions on the devices registered under a key.

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190 --port-end 9290        (anywhere)
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY                       (on each device)

lowbit compiles here, uploads the library to a device, runs or times it there with TVM's time
evaluator, and brings the results back. `run_on_devices` spreads independent jobs (the layers of a
latency table) over every device under the key, one session and one process per device; a device
that fails or is too slow is dropped and its job retried on another one, a bounded number of times,
so a result is either complete or a `LowbitError`, never partial.

The tracker is spoken to directly (its protocol is four JSON messages, `tvm.rpc.base`) rather than
through `tvm.rpc.connect_tracker`: that retries a refused connection for a minute, waits for a free
device forever, and does not say which device it handed out, which an error message must name.
"""

from __future__ import annotations

import collections
import gc
import multiprocessing
import multiprocessing.connection
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import tvm
from tvm import rpc
from tvm.rpc import base

from ...errors import LowbitError

T = TypeVar("T")
Log = Callable[[str], None]
SERVER_HINT = "python -m tvm.exec.rpc_server --tracker {tracker} --key {key}"


@dataclass(frozen=True)
class RpcTarget:
    """Where the devices are: a TVM RPC tracker and the key their servers registered under."""

    host: str
    port: int
    key: str
    # The server kills a session older than this (TVM's `session_timeout`): a hung device cannot hold a session
    # forever. A latency table keeps one session per device for all its layers: MobileNetV2's takes about 30 s.
    session_timeout_s: float = 600.0
    # One job (upload, load, time one layer at every bit-width) slower than this marks its device slow: the job
    # goes to another device. A layer takes well under a second on a CPU; uploads are a few MB at most.
    job_timeout_s: float = 120.0
    # How long to wait for the tracker to answer and hand out a free device.
    wait_s: float = 30.0
    # A job whose device failed is tried again on another device at most this many times.
    retries: int = 2

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            raise LowbitError(f"--rpc-tracker: bad host {self.host!r}; expected HOST:PORT, e.g. 127.0.0.1:9190")
        if not 0 < self.port < 65536:
            raise LowbitError(f"--rpc-tracker: port {self.port} is out of range; expected HOST:PORT, e.g. "
                              "127.0.0.1:9190")
        if not self.key or any(c.isspace() for c in self.key) or ":" in self.key:
            raise LowbitError(f"--rpc-key {self.key!r}: expected the key the servers registered with (--key), "
                              "without spaces or ':'")
        for name in ("session_timeout_s", "job_timeout_s", "wait_s"):
            if not getattr(self, name) > 0:
                raise LowbitError(f"RpcTarget.{name} must be positive, got {getattr(self, name)!r}")
        if self.retries < 0:
            raise LowbitError(f"RpcTarget.retries must be at least 0, got {self.retries}")

    @classmethod
    def parse(cls, tracker: str, key: str, **options: Any) -> RpcTarget:
        """"HOST:PORT" (an IPv6 host in brackets: "[::1]:9190") and the key -> an `RpcTarget`."""
        host, sep, port = tracker.strip().rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit():
            raise LowbitError(f"--rpc-tracker {tracker!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
        return cls(host, int(port), key, **options)

    @property
    def tracker(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def describe(self) -> str:
        return f"key {self.key!r} at tracker {self.tracker}"

    def to_json(self) -> dict[str, Any]:
        return {"tracker": self.tracker, "key": self.key}


def rpc_target(tracker: str | None, key: str | None) -> RpcTarget | None:
    """The CLI's --rpc-tracker and --rpc-key: both (a remote target) or neither (this machine)."""
    if tracker is None and key is None:
        return None
    if tracker is None or key is None:
        given, missing = ("--rpc-tracker", "--rpc-key") if key is None else ("--rpc-key", "--rpc-tracker")
        raise LowbitError(f"{given} needs {missing} too: the tracker HOST:PORT and the key its servers registered "
                          "with, e.g. --rpc-tracker 127.0.0.1:9190 --rpc-key my-board")
    return RpcTarget.parse(tracker, key)


# -- the tracker ----------------------------------------------------------------------------------------------------

@contextmanager
def _tracker(target: RpcTarget, timeout_s: float) -> Iterator[socket.socket]:
    """A connection to the tracker whose reads give up after `timeout_s`."""
    try:
        sock = socket.create_connection((target.host, target.port), timeout=min(timeout_s, target.wait_s))
    except OSError as e:
        raise LowbitError(f"cannot reach the RPC tracker at {target.tracker}: {e}; start one with `python -m "
                          f"tvm.exec.rpc_tracker --host 0.0.0.0 --port {target.port} --port-end "
                          f"{target.port + 100}`, or fix --rpc-tracker") from None
    try:
        sock.settimeout(timeout_s)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise LowbitError(f"{target.tracker} answered, but is not a TVM RPC tracker")
        yield sock
    except (OSError, EOFError) as e:  # EOFError: tvm.rpc.base.recvall's "connection reset"
        raise LowbitError(f"the RPC tracker at {target.tracker} stopped answering: {e}") from None
    finally:
        sock.close()


def tracker_summary(target: RpcTarget) -> dict[str, Any]:
    """What the tracker reports: {"server_info": [{"key": "server:KEY", "addr": [host, port]}], "queue_info":
    {KEY: {"free": n, "pending": n}}}."""
    with _tracker(target, target.wait_s) as sock:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        code, summary = base.recvjson(sock)
    if code != base.TrackerCode.SUCCESS:
        raise LowbitError(f"the RPC tracker at {target.tracker} refused a summary: {summary}")
    return summary


def registered_devices(target: RpcTarget) -> list[str]:
    """HOST:PORT of every server registered under the key, busy or free."""
    servers = tracker_summary(target).get("server_info", [])
    return sorted(":".join(map(str, s["addr"])) for s in servers if s.get("key") == f"server:{target.key}")


def require_devices(target: RpcTarget) -> list[str]:
    """`registered_devices`, or a `LowbitError` when there are none: callers check before their slow part."""
    devices = registered_devices(target)
    if not devices:
        raise LowbitError(_no_device_message(target))
    return devices


def free_devices(target: RpcTarget) -> int:
    """How many devices under the key the tracker could hand out now."""
    return int(tracker_summary(target).get("queue_info", {}).get(target.key, {}).get("free", 0))


def _no_device_message(target: RpcTarget) -> str:
    return (f"no RPC server is registered under {target.describe()}; start one on the device with "
            f"`{SERVER_HINT.format(tracker=target.tracker, key=target.key)}`")


# -- sessions -------------------------------------------------------------------------------------------------------

@dataclass
class Device:
    """One session on one device: upload libraries, load them, time or run their functions there."""

    name: str  # the server's HOST:PORT, as the tracker knows it
    session: Any  # tvm.rpc.RPCSession
    _uploads: int = 0

    @property
    def cpu(self) -> Any:
        return self.session.cpu(0)

    def use_threads(self, threads: int) -> None:
        """Size the device's thread pool, as `runtime.loader.use_threads` does for this machine."""
        self.session.get_function("runtime.config_threadpool")(1, max(1, int(threads)))

    def load(self, path: Path) -> tvm.runtime.Module:
        """Upload a library (`export_library`'s .so) and load it on the device."""
        self._uploads += 1
        remote_name = f"lowbit{self._uploads}-{path.name}"  # unique: a server may cache a loaded file by name
        self.session.upload(str(path), remote_name)
        return self.session.load_module(remote_name)

    def tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(array, self.cpu)

    def close(self) -> None:
        """End the session: the server then registers as free again. Dropping the last reference ends it, but the
        remote modules and tensors made through it refer to it too, through reference cycles that only the garbage
        collector breaks: until it runs, the device would stay busy for everyone else."""
        self.session = None
        gc.collect()


def request_device(target: RpcTarget) -> Device:
    """A session on one free device under the key, waiting at most `wait_s` for one."""
    with _tracker(target, target.wait_s) as sock:
        base.sendjson(sock, [base.TrackerCode.REQUEST, target.key, "", 1])
        try:
            code, answer = base.recvjson(sock)
        except TimeoutError:
            registered = registered_devices(target)
            if not registered:
                raise LowbitError(_no_device_message(target)) from None
            raise LowbitError(f"no device under {target.describe()} became free within {target.wait_s:.0f}s "
                              f"({len(registered)} registered, all busy)") from None
    if code != base.TrackerCode.SUCCESS:
        raise LowbitError(f"the RPC tracker at {target.tracker} refused a session for key {target.key!r}: {answer}")
    host, port, match_key = answer
    name = f"{host}:{port}"
    try:
        session = rpc.connect(host, port, match_key, session_timeout=target.session_timeout_s)
    except Exception as e:  # TVM raises its own error types for refused or reset connections
        raise LowbitError(f"the tracker handed out device {name} under key {target.key!r}, but it cannot be "
                          f"reached: {e}") from None
    return Device(name, session)


@contextmanager
def device_session(target: RpcTarget) -> Iterator[Device]:
    """`request_device`, closed afterwards."""
    device = request_device(target)
    try:
        yield device
    finally:
        device.close()


def time_function(library: tvm.runtime.Module, function: str, device: Any, args: list[Any], repeats: int,
                  min_ms: float, number: int = 10) -> list[float]:
    """Milliseconds of each of `repeats` timed runs of `library[function](*args)` on `device`, local or remote.

    Each repeat runs the function `number` times, or more until it lasts `min_ms`; TVM's time evaluator
    runs where the device is, so a remote device's timings never include the network.
    """
    timer = library.time_evaluator(function, device, number=number, repeat=repeats, min_repeat_ms=int(min_ms))
    return [float(t) * 1e3 for t in timer(*args).results]


def _last_line(error: Exception) -> str:
    """An error in one line: TVM's carry a C++ traceback first and the message last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


# -- jobs spread over the devices -----------------------------------------------------------------------------------
#
# One worker *process* per device, forked from this one (so the jobs need no pickling; only results travel back).
# Threads were tried first: a call into a device that stops answering can block while holding the GIL (TVM frees
# remote objects through the RPC link in a destructor), and then the coordinator cannot even notice the deadline.
# A process can also be killed, which closes its session at once.


@dataclass
class _Worker:
    """The coordinator's view of one device's process, and its end of their private pipe (a shared queue would
    not do: killing a process that holds a shared queue's lock blocks every other writer)."""

    process: Any
    conn: Any
    device: str | None = None
    job: str | None = None
    started: float = 0.0
    alive: bool = True

    def assign(self, job: str) -> None:
        self.conn.send(job)
        self.job, self.started = job, time.monotonic()


def _work(target: RpcTarget, jobs: dict[str, Callable[[Device], Any]], conn: Any) -> None:
    """A worker process: one session, then the jobs it is sent until None or a failure."""
    try:
        device = request_device(target)
    except LowbitError as e:
        conn.send(("no-session", str(e)))
        return
    conn.send(("ready", device.name))
    while (name := conn.recv()) is not None:
        try:
            result = jobs[name](device)
        except Exception as e:  # whatever the device or the link raised: the coordinator decides
            conn.send(("failed", _last_line(e)))
            return
        conn.send(("done", result))
    device.close()


@dataclass
class DeviceRun(Generic[T]):
    """Every job's result, and how it went: which device measured which job, which devices were dropped."""

    results: dict[str, T]
    devices: list[str]
    ran_on: dict[str, str]
    dropped: list[dict[str, str]] = field(default_factory=list)

    def meta(self, target: RpcTarget) -> dict[str, Any]:
        return {**target.to_json(), "devices": len(self.devices), "device_names": self.devices,
                "dropped": self.dropped, "ran_on": self.ran_on}


def run_on_devices(target: RpcTarget, jobs: dict[str, Callable[[Device], T]], what: str = "job",
                   log: Log = lambda _: None) -> DeviceRun[T]:
    """Run every job on some device under the key, all devices in parallel, one session (and process) each.

    A job that raises, or that runs past `job_timeout_s`, drops its device and goes back in the queue for
    another device, at most `retries` times. Returns every job's result, or raises `LowbitError` naming
    the job, the devices it failed on and why: a partial result never leaves this function.
    Results must be picklable; jobs need not be (the workers are forked).
    """
    registered = require_devices(target)
    log(f"{len(registered)} device(s) under {target.describe()}, {free_devices(target)} free now")
    context = multiprocessing.get_context("fork")
    workers = []
    for i in range(min(len(registered), len(jobs))):
        mine, theirs = context.Pipe()
        process = context.Process(target=_work, args=(target, jobs, theirs), daemon=True, name=f"lowbit-rpc-{i}")
        process.start()
        theirs.close()
        workers.append(_Worker(process, mine))

    todo = collections.deque(jobs)
    results: dict[str, T] = {}
    ran_on: dict[str, str] = {}
    failures: dict[str, list[str]] = {}
    dropped: list[dict[str, str]] = []
    used: list[str] = []
    no_session: list[str] = []

    def drop(worker: _Worker, reason: str) -> None:
        worker.alive = False
        worker.process.kill()  # ends its session too
        job = worker.job
        if job is None:
            return
        dropped.append({"device": str(worker.device), "job": job, "reason": reason})
        failures.setdefault(job, []).append(f"{worker.device}: {reason}")
        log(f"device {worker.device} dropped ({what} {job}: {reason})")
        if len(failures[job]) > target.retries:
            raise LowbitError(f"{what} {job} failed on {len(failures[job])} devices under {target.describe()} "
                              f"({'; '.join(failures[job])}); nothing was measured in part")
        todo.appendleft(job)  # the next idle device takes it: never the dropped one

    try:
        while len(results) < len(jobs):
            alive = [w for w in workers if w.alive]
            if not alive:
                lost = "; ".join(f"{d['device']} ({d['job']}: {d['reason']})" for d in dropped) or "; ".join(
                    no_session)
                raise LowbitError(f"every device under {target.describe()} was lost with "
                                  f"{len(jobs) - len(results)} of {len(jobs)} {what}s left: {lost}; nothing was "
                                  "measured in part")
            for worker in alive:  # idle devices take the next jobs
                if worker.device is not None and worker.job is None and todo:
                    worker.assign(todo.popleft())
            ready = multiprocessing.connection.wait([w.conn for w in alive], timeout=0.5)
            for worker in alive:
                if worker.conn not in ready:
                    if worker.job is not None and time.monotonic() - worker.started > target.job_timeout_s:
                        drop(worker, f"no result after {target.job_timeout_s:.0f}s")
                    continue
                try:
                    kind, value = worker.conn.recv()
                except (EOFError, OSError):  # the process died without a word (killed from outside)
                    drop(worker, "its worker process died")
                    continue
                if kind == "no-session":
                    worker.alive = False
                    no_session.append(value)
                elif kind == "ready":
                    worker.device = value
                    used.append(value)
                elif kind == "failed":
                    drop(worker, value)
                elif kind == "done":
                    assert worker.job is not None
                    results[worker.job] = value
                    ran_on[worker.job] = str(worker.device)
                    log(f"{what} {len(results)}/{len(jobs)} ({worker.job}) on {worker.device}")
                    worker.job = None
    finally:
        _stop(workers)
    return DeviceRun(results, used, ran_on, dropped)


def _stop(workers: list[_Worker]) -> None:
    """Let idle workers close their sessions; kill whatever has not ended within a few seconds."""
    for worker in workers:
        if worker.alive:
            try:
                worker.conn.send(None)
            except OSError:
                pass
    deadline = time.monotonic() + 5
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
