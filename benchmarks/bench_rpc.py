"""Benchmark: MobileNetV2's per-layer latency table measured here and through two localhost TVM RPC servers.

The same compiled layer libraries (every conv/linear layer at 4 and 8 bits) are timed twice in
one run: loaded in this process, then uploaded to two RPC servers under one tracker key, which
share the layers between them. The section of BENCHMARKS.md compares the two tables: the
per-layer ratio remote/local (median and spread) and the totals. They should agree within noise:
TVM's time evaluator runs on the device, so the network is never inside a timing.

On a machine with at least 3 x --threads CPUs, each server is pinned to its own cores and this
process to the first ones, so the two servers never compete with each other or with the local run.

    python benchmarks/bench_rpc.py [--out BENCHMARKS.md] [--threads 1] [--repeats 5] [--min-ms 20]
                                   [--layers N] [--dry-run]

`--layers N` (the first N layers) and `--dry-run` (print the section, write nothing) make a quick check.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sections import cpu_info, lowbit_revision, write_section

from lowbit.codegen.tvm.latency import compile_layers, time_here, time_on_devices
from lowbit.codegen.tvm.remote import RpcTarget, registered_devices
from lowbit.codegen.tvm.target import parse_target, target_string
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.quantize import calibrate, quantize

SECTION = "rpc"
KEY = "lowbit-bench"
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f}s] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A tracker and `servers` RPC servers on localhost, each server optionally pinned to its own CPUs."""

    def __init__(self, directory: Path, servers: int, cpus: list[list[int]] | None) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen] = []
        port = _free_port()
        tracker = self._start("tracker", ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                                          "--port-end", str(port + 100)], None)
        self.rpc = RpcTarget("127.0.0.1", int(self._bound(tracker, "tracker").rsplit(":", 1)[1]), KEY)
        for i in range(servers):
            p = _free_port()
            self._start(f"server{i}", ["tvm.exec.rpc_server", "--tracker", self.rpc.tracker, "--key", KEY,
                                       "--host", "127.0.0.1", "--port", str(p), "--port-end", str(p + 50)],
                        cpus[i] if cpus else None)
        deadline = time.monotonic() + 120
        while len(registered_devices(self.rpc)) < servers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"servers did not register; logs in {directory}")
            time.sleep(0.5)

    def _start(self, name: str, args: list[str], cpus: list[int] | None) -> subprocess.Popen:
        log_file = open(self.directory / f"{name}.log", "w")  # noqa: SIM115 (the process owns it)
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        process = subprocess.Popen([*pin, sys.executable, "-m", *args], stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def _bound(self, process: subprocess.Popen, name: str) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"bind to (\S+:\d+)", (self.directory / f"{name}.log").read_text())
            if found:
                return found.group(1)
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not start: {(self.directory / f'{name}.log').read_text()}")

    def close(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait()


def compare(local: dict[str, dict[int, float]], remote: dict[str, dict[int, float]]) -> dict[int, dict[str, float]]:
    """Per bit-width: the median and 5th/95th percentiles of the per-layer ratio remote/local, and the totals."""
    out = {}
    for bits in sorted(next(iter(local.values()))):
        ratios = np.array([remote[layer][bits] / local[layer][bits] for layer in local])
        out[bits] = {"median": float(np.median(ratios)), "p5": float(np.percentile(ratios, 5)),
                     "p95": float(np.percentile(ratios, 95)), "worst": float(ratios[np.argmax(np.abs(np.log(ratios)))]),
                     "local_ms": sum(row[bits] for row in local.values()),
                     "remote_ms": sum(row[bits] for row in remote.values())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=1, help="cores per kernel, here and on each server")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per layer (median kept)")
    parser.add_argument("--min-ms", type=int, default=20, help="each repeat runs the kernel for at least this long")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers (a quick check)")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    # Every TVM runtime here and on the servers (which inherit the environment) runs kernels on --threads threads:
    # by default each would start one per CPU, and two servers timing at once would then share the cores.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 3 * args.threads
    if pinned:  # this process on the first cores, each server on its own
        os.sched_setaffinity(0, cpus[:args.threads])
        server_cpus = [cpus[args.threads * (i + 1):args.threads * (i + 2)] for i in range(2)]
    load_start = os.getloadavg()[0]

    entry = get_zoo_entry("zoo:mobilenet_v2")
    graph = capture(load_program("zoo:mobilenet_v2", None), "mobilenet_v2")
    calib = entry.calibration(0)
    log("calibrating")
    stats = calibrate(graph, calib)
    qgraphs = {b: quantize(graph, calib, QuantConfig(rounding="nearest"), BitPlan.uniform(graph, b), stats=stats)
               for b in (4, 8)}
    target = parse_target(f"llvm -mcpu=native -num-cores={args.threads}")
    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        log("compiling the layer kernels")
        compiled = compile_layers(qgraphs, target, Path(tmp), log, layers=args.layers)
        log(f"timing {len(compiled.rows)} layers here")
        t0 = time.perf_counter()
        local = time_here(compiled, args.repeats, args.min_ms)
        local_s = time.perf_counter() - t0
        remote, remote_s = {}, {}
        for servers in (1, 2):  # one device alone, then two sharing the layers
            log(f"starting a tracker and {servers} server(s)")
            cluster = LocalCluster(Path(tmp), servers, server_cpus if pinned else None)
            try:
                t0 = time.perf_counter()
                remote[servers] = time_on_devices(compiled, cluster.rpc, args.repeats, args.min_ms, log)
                remote_s[servers] = time.perf_counter() - t0
            finally:
                cluster.close()
    two = remote[2].meta["rpc"]
    shared = sum(1 for d in two["ran_on"].values() if d == two["device_names"][0])

    cpu, _ = cpu_info()
    lines = [
        "# Benchmarks: per-layer latency through TVM RPC", "",
        "Generated by `benchmarks/bench_rpc.py`; do not edit by hand.", "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; lowbit at {lowbit_revision()}",
        f"- Machine: {cpu}, {len(cpus)} CPUs; load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} "
        "at end",
        f"- MobileNetV2, {len(compiled.rows)} conv/linear layers at 4 and 8 bits, target "
        f"`{target_string(target)}` ({compiled.kernel_set} kernels), batch {compiled.batch}; median of "
        f"{args.repeats} repeats of at least {args.min_ms} ms each",
        f"- The same library files timed in this process ({local_s:.0f}s), then through a localhost tracker with "
        f"one server ({remote_s[1]:.0f}s) and with two servers under one key ({remote_s[2]:.0f}s; they took "
        f"{shared} and {len(compiled.rows) - shared} layers; devices dropped: {len(two['dropped'])}); "
        + ("each server pinned to its own cores, this process to others" if pinned else
           "not pinned (fewer than 3 x --threads CPUs): the two servers share the CPUs")
        + f"; TVM_NUM_THREADS={args.threads} here and on the servers", "",
        "| devices | weights | per-layer ratio remote/local: median | 5th-95th percentile | worst layer | total here | "
        "total over RPC | total ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for servers, table in remote.items():
        for bits, s in compare(local.ms, table.ms).items():
            lines.append(f"| {servers} server{'s' if servers > 1 else ''} | INT{bits} | {s['median']:.3f} | "
                         f"{s['p5']:.3f}-{s['p95']:.3f} | {s['worst']:.3f} | {s['local_ms']:.3f} ms | "
                         f"{s['remote_ms']:.3f} ms | {s['remote_ms'] / s['local_ms']:.3f} |")
    lines += ["", "A ratio near 1 says the table from the RPC servers can stand in for the local one: TVM's time "
                  "evaluator runs on the device, so uploads and the network stay outside the timings. Two servers "
                  "on one machine time their layers at the same moment, so unless each has cores of its own "
                  "(pinned), they measure each other's load as well.", ""]
    text = "\n".join(lines)
    if args.dry_run:
        print(text)
    else:
        write_section(args.out, SECTION, text)
        log(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
