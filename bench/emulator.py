"""Appends per second the emulator sustains with 100 channels x 100-row batches, and commit lag.

    .venv/bin/python bench/emulator.py [--duration 15] [--clients 3] [--channels 100]

Starts the emulator as a subprocess (`--rate-limit 0`: 100 channels at 1000 appends/s is exactly
the default 10 RPS per channel, so the limiter would be measured instead of the server), opens the
channels, then client processes append round-robin over their share of the channels (each keeps
its channel's continuation-token chain) for a fixed time. A probe thread meanwhile measures the
commit lag a client sees: append, then poll bulk status every 10 ms until the offset is committed.

A baseline run drives a trivial Starlette endpoint (reads the body, returns a small JSON) under the
same uvicorn settings with the same clients, so the figures can be read against what this machine
can do at all. Client and server share the machine's cores; the server's own CPU time is read from
/proc, giving appends per server CPU-second as a load-independent figure.

Prints readable figures, then one JSON line with all of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.contract.refclient import RefClient  # noqa: E402
from tests.support.emulator import launch_emulator  # noqa: E402
from tests.support.keys import key_pair  # noqa: E402

ACCOUNT, USER = "BENCH", "LOADER"
DB, SCHEMA, PIPE = "BENCH", "PUBLIC", "EVENTS-STREAMING"
ROWS_PER_BATCH = 100
WARMUP = 2.0


def make_body(rows: int) -> bytes:
    """An NDJSON body of `rows` typical event rows (~100 bytes each)."""
    return b"".join(
        json.dumps(
            {
                "id": i,
                "ts": "2026-01-01T00:00:00.000000Z",
                "tenant": f"tenant-{i % 7}",
                "kind": "page_view",
                "value": i * 0.5,
                "ratio": 0.25,
                "msg": "hello world",
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for i in range(rows)
    )


def _client_loop(
    port: int,
    token: str,
    channels: list[tuple[str, str]],
    start_at: float,
    stop_at: float,
    path_prefix: str,
    out: Any,
) -> None:
    """One client process: round-robin appends over its channels until `stop_at`."""
    body = make_body(ROWS_PER_BATCH)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json",
        "Content-Type": "application/x-ndjson",
    }
    tokens = dict(channels)
    offsets = dict.fromkeys(tokens, 0)
    done = errors = 0
    latencies: list[float] = []
    while time.time() < start_at:
        time.sleep(0.001)
    while True:
        for ch in list(tokens):
            now = time.time()
            if now >= stop_at:
                out.put({"appends": done, "errors": errors, "latencies": latencies})
                return
            start = offsets[ch]
            query = urlencode(
                {
                    "startOffsetToken": start,
                    "endOffsetToken": start + ROWS_PER_BATCH - 1,
                    "continuationToken": tokens.get(ch, ""),
                }
            )
            t0 = time.perf_counter()
            conn.request("POST", f"{path_prefix}/channels/{ch}/rows?{query}", body, headers)
            response = conn.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - t0
            if response.status != 200:
                errors += 1
                continue
            tokens[ch] = json.loads(data)["next_continuation_token"]
            offsets[ch] = start + ROWS_PER_BATCH
            if now >= start_at + WARMUP:
                done += 1
                if done % 10 == 0:
                    latencies.append(elapsed)


def run_clients(
    port: int, token: str, channels: list[tuple[str, str]], clients: int, duration: float,
    path_prefix: str,
) -> dict[str, Any]:
    """Drive appends from `clients` processes; returns counts and latencies."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.5
    stop_at = start_at + WARMUP + duration
    procs = [
        ctx.Process(
            target=_client_loop,
            args=(port, token, channels[i::clients], start_at, stop_at, path_prefix, out),
        )
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration + 60) for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(x for r in results for x in r["latencies"])
    appends = sum(r["appends"] for r in results)
    return {
        "appends": appends,
        "errors": sum(r["errors"] for r in results),
        "appends_per_s": appends / duration,
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "latency_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def probe_commit_lag(client: RefClient, stop: threading.Event, lags: list[float]) -> None:
    """Append one row to a probe channel, poll status until committed; repeat until `stop`."""
    channel = "lag-probe"
    token = client.open(DB, SCHEMA, PIPE, channel)["next_continuation_token"]
    offset = 0
    while not stop.is_set():
        offset += 1
        response = client.append(
            DB, SCHEMA, PIPE, channel, [{"probe": offset}], continuation_token=token,
            end=str(offset),
        )
        if response.status_code != 200:
            time.sleep(0.05)
            continue
        token = response.json()["next_continuation_token"]
        sent = time.monotonic()
        while not stop.is_set():
            status = client.status(DB, SCHEMA, PIPE, [channel]).json()["channel_statuses"]
            if status[channel]["last_committed_offset_token"] == str(offset):
                lags.append(time.monotonic() - sent)
                break
            time.sleep(0.01)


BASELINE_APP = '''
import sys
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
import uvicorn

async def rows(request):
    body = await request.body()
    return Response(b'{"next_continuation_token":"0_%d"}' % body.count(b"\\n"),
                    media_type="application/json")

app = Starlette(routes=[Route("/base/channels/{ch}/rows", rows, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
            access_log=False, log_level="warning")
'''


def run_baseline(clients: int, duration: float, channels: int) -> dict[str, Any]:
    """The same load against a trivial Starlette endpoint under the same uvicorn settings."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_APP, str(port)])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        chans = [(f"ch{i}", "0_0") for i in range(channels)]
        cpu0 = cpu_seconds(proc.pid)
        result = run_clients(port, "x", chans, clients, duration, "/base")
        result["server_cpu_s"] = cpu_seconds(proc.pid) - cpu0
        return result
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per run")
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--commit-delay", type=float, default=1.0)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    emu = launch_emulator("--rate-limit", "0", "--commit-delay", str(args.commit_delay))
    try:
        kp = key_pair("bench")
        emu.register_key(ACCOUNT, USER, kp.public_pem)
        client = RefClient(emu.url, ACCOUNT, USER, kp.private_key).connect()
        assert client.scoped_token is not None
        channels = [
            (f"ch-{i}", client.open(DB, SCHEMA, PIPE, f"ch-{i}")["next_continuation_token"])
            for i in range(args.channels)
        ]
        stop = threading.Event()
        lags: list[float] = []
        probe = threading.Thread(target=probe_commit_lag, args=(client, stop, lags), daemon=True)
        cpu0 = cpu_seconds(emu.process.pid)
        probe.start()
        result = run_clients(
            emu.port, client.scoped_token, channels, args.clients, args.duration,
            f"/v2/streaming/data/databases/{DB}/schemas/{SCHEMA}/pipes/{PIPE}",
        )
        stop.set()
        probe.join(5)
        server_cpu = cpu_seconds(emu.process.pid) - cpu0
        # Let everything commit, then check nothing was lost.
        time.sleep(args.commit_delay + 0.5)
        stats = emu.stats()
        client.close()
    finally:
        emu.stop()

    wall = WARMUP + args.duration
    figures: dict[str, Any] = {
        "benchmark": "emulator_appends",
        "cpus": os.cpu_count(),
        "client_processes": args.clients,
        "channels": args.channels,
        "rows_per_batch": ROWS_PER_BATCH,
        "batch_bytes": len(make_body(ROWS_PER_BATCH)),
        "duration_s": args.duration,
        "appends_per_s": round(result["appends_per_s"], 1),
        "rows_per_s": round(result["appends_per_s"] * ROWS_PER_BATCH),
        "append_errors": result["errors"],
        "append_latency_p50_ms": _r(result["latency_p50_ms"]),
        "append_latency_p99_ms": _r(result["latency_p99_ms"]),
        "server_cpu_share": round(server_cpu / wall, 2),
        "appends_per_server_cpu_s": round(stats["appends"] / server_cpu, 1) if server_cpu else None,
        "commit_delay_s": args.commit_delay,
        "commit_lag_client_p50_ms": _r(1000 * statistics.median(lags)) if lags else None,
        "commit_lag_client_max_ms": _r(1000 * max(lags)) if lags else None,
        "commit_lag_server_avg_ms": stats["commit_lag_avg_ms"],
        "commit_lag_server_max_ms": stats["commit_lag_max_ms"],
        "rows_committed": stats["rows_committed"],
        "batches_pending_after": stats["batches_pending"],
    }
    if not args.no_baseline:
        base = run_baseline(args.clients, args.duration, args.channels)
        figures["baseline_appends_per_s"] = round(base["appends_per_s"], 1)
        figures["baseline_server_cpu_share"] = round(base["server_cpu_s"] / wall, 2)
        figures["ratio_to_baseline"] = round(result["appends_per_s"] / base["appends_per_s"], 2)

    print(f"emulator: {figures['appends_per_s']} appends/s "
          f"({figures['rows_per_s']} rows/s) with {args.channels} channels x "
          f"{ROWS_PER_BATCH}-row batches ({figures['batch_bytes']} B), "
          f"{args.clients} client processes, {args.duration:.0f} s")
    print(f"  append latency p50 {figures['append_latency_p50_ms']} ms, "
          f"p99 {figures['append_latency_p99_ms']} ms; errors {result['errors']}")
    print(f"  server CPU {figures['server_cpu_share']} cores busy; "
          f"{figures['appends_per_server_cpu_s']} appends per server CPU-second")
    print(f"  commit lag (delay {args.commit_delay} s): client-observed p50 "
          f"{figures['commit_lag_client_p50_ms']} ms, max {figures['commit_lag_client_max_ms']} ms;"
          f" server avg {figures['commit_lag_server_avg_ms']} ms, "
          f"max {figures['commit_lag_server_max_ms']} ms")
    if "baseline_appends_per_s" in figures:
        print(f"  baseline trivial Starlette endpoint: {figures['baseline_appends_per_s']} req/s "
              f"-> emulator is {figures['ratio_to_baseline']} of it")
    print(f"  machine: {figures['cpus']} CPUs shared by the clients and the server")
    print(json.dumps(figures))


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


if __name__ == "__main__":
    main()
