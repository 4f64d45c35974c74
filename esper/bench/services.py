"""Speed of the Esper servers (Urza, Oona), each figure next to a baseline measured in the same run.

``esper-bench services [--json PATH]``. Measured in one run, every server a real process on 127.0.0.1 started by the benchmark:

- baseline: a bare grpc.aio empty unary ping (`esper.bench.ping_server`), p50/p99 latency;
- Urza GetArtifact (metadata get) p50/p99 and its ratio to the ping (target: p50 <= 1.5x ping);
- Urza DownloadArtifact throughput (MB/s) of a large artifact, chunked stream, verified reads;
- Oona publish-to-delivery on the in-memory and on the Redis Streams backend: throughput (msg/s)
  with concurrent publishers and one subscriber stream, latency p50/p99 under that load and one
  message at a time; side by side with raw Redis Streams XADD/XREAD through redis-py on the same
  redis-server (the floor Oona-on-Redis adds gRPC and its own logic to).

Clients are Python in this process (the typed clients of esper.clients that Tolaria and the
services use, raw channels only for the ping baseline, redis.asyncio for raw Redis), so client-side
cost is included in every figure alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

PAYLOAD_BYTES = 256
MiB = 1024 * 1024


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _latency_summary(samples_us: list[float]) -> dict[str, float]:
    return {"p50_us": _percentile(samples_us, 50), "p99_us": _percentile(samples_us, 99),
            "mean_us": statistics.fmean(samples_us), "n": len(samples_us)}


def _time_calls(call: Callable[[], Any], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


async def _ping_throughput(address: str, calls: int, callers: int) -> dict[str, Any]:
    """Empty unary calls/s from `callers` concurrent grpc.aio callers (one channel each): the
    gRPC floor for Oona's unary Publish rate."""
    from esper.bench.ping_server import PING_METHOD
    from esper.serving import open_aio_channel

    channels = [open_aio_channel(address) for _ in range(callers)]
    try:
        methods = [c.unary_unary(PING_METHOD) for c in channels]

        async def caller(method) -> None:
            for _ in range(calls // callers):
                await method(b"", timeout=10)

        await asyncio.gather(*(caller(m) for m in methods))  # warm-up round
        started = time.perf_counter()
        await asyncio.gather(*(caller(m) for m in methods))
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    return {"calls": calls // callers * callers, "callers": callers, "calls_s": calls // callers * callers / elapsed}


def bench_ping_and_urza(work_dir: Path, calls: int, warmup: int, download_mib: int, downloads: int,
                        throughput_calls: int, publishers: int, rounds: int) -> dict[str, Any]:
    """Ping baselines (latency and concurrent throughput), Urza metadata get, Urza download.

    The three latency series run interleaved in `rounds` blocks (ping, bootstrap ping, Urza get,
    ping, ...) so background load on a shared machine hits baseline and subject alike.
    """
    from esper.bench.ping_server import PING_METHOD
    from esper.clients import UrzaClient
    from esper.serving import ServerProcess, open_sync_channel
    from esper.v1 import common_pb2

    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        ping_server = stack.enter_context(ServerProcess.python_module(
            "esper.bench.ping_server", "--port", "0", stderr_path=work_dir / "ping.log"))
        boot_server = stack.enter_context(ServerProcess.python_module(
            "esper.bench.ping_server", "--port", "0", "--bootstrap", stderr_path=work_dir / "ping_bootstrap.log"))
        urza = stack.enter_context(ServerProcess.python_module(
            "services.urza", "--port", "0", "--data-dir", str(work_dir / "urza"), "--log-level", "WARNING",
            stderr_path=work_dir / "urza.log"))
        ping = stack.enter_context(open_sync_channel(ping_server.address)).unary_unary(PING_METHOD)
        boot = stack.enter_context(open_sync_channel(boot_server.address)).unary_unary(PING_METHOD)
        # The client Tolaria and the services use (retries, error mapping, SHA-256 check on download).
        client = stack.enter_context(UrzaClient(urza.address, timeout_s=5, transfer_timeout_s=600))

        def meta(kernel_id: str, data: bytes) -> common_pb2.KernelArtifact:
            return common_pb2.KernelArtifact(
                kernel_id=kernel_id, blueprint_id="residual_mlp", blueprint_version=1,
                input_shape=common_pb2.TensorShape(dims=[-1, 16]), device=common_pb2.DEVICE_TYPE_CPU,
                dtype=common_pb2.D_TYPE_FLOAT32, status=common_pb2.ARTIFACT_STATUS_VALIDATED,
                sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), format="bench/raw")

        def upload(kernel_id: str, data: bytes) -> None:
            client.upload_artifact(meta(kernel_id, data), data)

        upload("bench-small", os.urandom(1024))
        series: dict[str, tuple[Callable[[], Any], list[float]]] = {
            "ping": (lambda: ping(b"", timeout=5), []),
            "ping_bootstrap": (lambda: boot(b"", timeout=5), []),
            "urza_get": (lambda: client.get_artifact("bench-small"), []),
        }
        for call, _ in series.values():
            _time_calls(call, 0, warmup)
        for _ in range(rounds):
            for call, samples in series.values():
                samples += _time_calls(call, max(1, calls // rounds), 0)
        for key, (_, samples) in series.items():
            out[key] = _latency_summary(samples)

        tp_rounds = [asyncio.run(_ping_throughput(ping_server.address, max(publishers, throughput_calls // rounds),
                                                  publishers)) for _ in range(rounds)]
        out["ping_throughput"] = {"calls": sum(r["calls"] for r in tp_rounds), "callers": publishers,
                                  "calls_s": statistics.median(r["calls_s"] for r in tp_rounds),
                                  "rounds_calls_s": [r["calls_s"] for r in tp_rounds]}

        big = os.urandom(download_mib * MiB)
        started = time.perf_counter()
        upload("bench-big", big)
        upload_s = time.perf_counter() - started
        rates = []
        for _ in range(downloads):
            started = time.perf_counter()
            received = len(client.download_artifact("bench-big")[1])  # SHA-256 verified, as in Tolaria
            elapsed = time.perf_counter() - started
            if received != len(big):
                raise RuntimeError(f"download returned {received} bytes, expected {len(big)}")
            rates.append(len(big) / 1e6 / elapsed)
        out["urza_download"] = {"size_mib": download_mib, "runs": downloads, "best_mb_s": max(rates),
                                "median_mb_s": statistics.median(rates), "upload_mb_s": len(big) / 1e6 / upload_s}
    out["bootstrap_over_ping_p50"] = out["ping_bootstrap"]["p50_us"] / out["ping"]["p50_us"]
    out["urza_get_over_ping_p50"] = out["urza_get"]["p50_us"] / out["ping"]["p50_us"]
    out["urza_get_over_ping_p99"] = out["urza_get"]["p99_us"] / out["ping"]["p99_us"]
    return out


def _stamp(payload_bytes: int) -> bytes:
    return struct.pack("<d", time.perf_counter()).ljust(payload_bytes, b"\0")


def _age_us(payload: bytes) -> float:
    return (time.perf_counter() - struct.unpack_from("<d", payload)[0]) * 1e6


class _Collector:
    """Receives messages, records publish-to-delivery latency, wakes waiters at counts."""

    def __init__(self):
        self.latencies: list[float] = []
        self.count = 0
        self.last_time = 0.0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def record(self, payload: bytes) -> None:
        self.latencies.append(_age_us(payload))
        self.count += 1
        self.last_time = time.perf_counter()
        for target, fut in self._waiters:
            if self.count >= target and not fut.done():
                fut.set_result(None)

    async def wait_for(self, target: int, timeout: float) -> None:
        if self.count >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        await asyncio.wait_for(fut, timeout)


async def _bus_run(publish_many: Callable[[list[bytes]], Awaitable[None]], collector: _Collector, messages: int,
                   publishers: int, sequential: int, batch: int) -> dict[str, Any]:
    """Throughput with `publishers` concurrent publishers sending `batch` messages per call, then
    `sequential` one-at-a-time messages (latency without load; skipped when 0)."""
    # Warm-up: the subscription is live once a marker makes it through.
    await publish_many([_stamp(PAYLOAD_BYTES)])
    await collector.wait_for(1, 30)
    collector.latencies.clear()
    base = collector.count
    per_publisher = messages // publishers

    async def publisher():
        for start in range(0, per_publisher, batch):
            await publish_many([_stamp(PAYLOAD_BYTES) for _ in range(min(batch, per_publisher - start))])

    started = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(publishers)))
    published = time.perf_counter()
    total = per_publisher * publishers
    await collector.wait_for(base + total, 120)
    loaded = _latency_summary(collector.latencies)
    loaded["samples_us"] = list(collector.latencies)
    result = {"messages": total, "publishers": publishers, "batch": batch,
              "publish_msg_s": total / (published - started),
              "delivered_msg_s": total / (collector.last_time - started), "loaded": loaded}
    collector.latencies.clear()
    for i in range(sequential):
        await publish_many([_stamp(PAYLOAD_BYTES)])
        await collector.wait_for(base + total + i + 1, 30)
    if sequential:
        result["one_at_a_time"] = _latency_summary(collector.latencies)
        result["one_at_a_time"]["samples_us"] = list(collector.latencies)
    return result


async def _oona_scenario(address: str, messages: int, publishers: int, sequential: int,
                         batch: int = 1) -> dict[str, Any]:
    from esper.clients import OonaClient
    from esper.oona.model import StartPosition
    from esper.v1 import oona_pb2

    topic = f"bench.{os.getpid()}.{time.monotonic_ns()}"
    collector = _Collector()
    # One client (channel) per publisher and one for the subscriber, as separate processes would have.
    clients = [OonaClient(address) for _ in range(publishers + 1)]
    subscribed = clients[-1].subscribe(topic, start=StartPosition.OFFSET, from_offset=0,
                                       max_batch=batch if batch > 1 else 0, timeout=600)

    async def subscriber():
        async for envelope in subscribed:
            collector.record(envelope.payload)

    reader = asyncio.ensure_future(subscriber())
    next_client = iter(range(1 << 62))

    async def publish_many(payloads: list[bytes]) -> None:
        client = clients[next(next_client) % publishers]
        if batch == 1:
            await client.publish(topic, payloads[0], timeout=30)
        else:
            await client.publish_batch([oona_pb2.PublishRequest(topic=topic, payload=p) for p in payloads],
                                       timeout=30)

    try:
        return await _bus_run(publish_many, collector, messages, publishers, sequential, batch)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await subscribed.aclose()
        for client in clients:
            await client.close()


async def _raw_redis_scenario(url: str, messages: int, publishers: int, sequential: int,
                              batch: int = 1) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    reader_client = aioredis.Redis.from_url(url)
    stream = f"bench:raw:{os.getpid()}:{time.monotonic_ns()}"
    collector = _Collector()

    async def reader():
        last = "0-0"
        # redis-py may swallow a cancel that lands as a blocking read times out; honour it anyway.
        while not asyncio.current_task().cancelling():
            reply = await reader_client.xread({stream: last}, count=256, block=1000)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    collector.record(fields[b"p"])
                    last = entry_id

    task = asyncio.ensure_future(reader())

    async def publish_many(payloads: list[bytes]) -> None:
        if batch == 1:
            await client.xadd(stream, {"p": payloads[0]}, maxlen=100_000, approximate=True)
            return
        async with client.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.xadd(stream, {"p": payload}, maxlen=100_000, approximate=True)
            await pipe.execute()

    try:
        return await _bus_run(publish_many, collector, messages, publishers, sequential, batch)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
        await reader_client.aclose()


def bench_bus(work_dir: Path, messages: int, publishers: int, sequential: int, rounds: int,
              batch: int) -> dict[str, Any]:
    """Oona (memory, redis) and raw Redis Streams, same workload, interleaved over `rounds` rounds;
    then the same with `batch` messages per call (PublishBatch + batched Subscribe for Oona, a
    pipeline of XADDs for raw Redis). Throughput is the median round, latencies are pooled."""
    from esper.oona.local_redis import LocalRedisServer
    from esper.serving import ServerProcess

    names = ["raw_redis", "oona_redis", "oona_memory"]
    per_round: dict[str, list[dict[str, Any]]] = {n: [] for n in names + [f"{n}_batched" for n in names]}
    with LocalRedisServer() as redis_server, contextlib.ExitStack() as stack:
        addresses = {}
        for name, backend in (("oona_memory", "memory://"), ("oona_redis", f"{redis_server.url}?namespace=bench")):
            addresses[name] = stack.enter_context(ServerProcess.python_module(
                "services.oona", "--port", "0", "--backend", backend, "--log-level", "WARNING",
                stderr_path=work_dir / f"{name}.log")).address
        per_round_messages = max(publishers, messages // rounds)
        per_round_sequential = max(1, sequential // rounds)
        for _ in range(rounds):
            for size, suffix, seq in ((1, "", per_round_sequential), (batch, "_batched", 0)):
                per_round[f"raw_redis{suffix}"].append(asyncio.run(_raw_redis_scenario(
                    redis_server.url, per_round_messages, publishers, seq, size)))
                for name, address in addresses.items():
                    per_round[f"{name}{suffix}"].append(asyncio.run(_oona_scenario(
                        address, per_round_messages, publishers, seq, size)))
    return {name: _merge_rounds(results) for name, results in per_round.items()}


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "messages": sum(r["messages"] for r in results), "publishers": results[0]["publishers"],
        "rounds": len(results),
        "publish_msg_s": statistics.median(r["publish_msg_s"] for r in results),
        "delivered_msg_s": statistics.median(r["delivered_msg_s"] for r in results),
        "rounds_delivered_msg_s": [r["delivered_msg_s"] for r in results], "batch": results[0]["batch"],
    }
    for key in ("loaded", "one_at_a_time"):
        if key in results[0]:
            merged[key] = _latency_summary([x for r in results for x in r[key]["samples_us"]])
    return merged


def format_table(results: dict[str, Any]) -> str:
    """A markdown table of every figure with its baseline."""
    ping, boot, get, dl = results["ping"], results["ping_bootstrap"], results["urza_get"], results["urza_download"]
    tp = results["ping_throughput"]
    lines = [
        "| measurement | p50 | p99 | vs baseline |",
        "|---|---|---|---|",
        f"| bare gRPC empty unary ping (baseline) | {ping['p50_us']:.0f} us | {ping['p99_us']:.0f} us | 1.00x |",
        f"| same ping through the shared bootstrap (esper.serving) | {boot['p50_us']:.0f} us | "
        f"{boot['p99_us']:.0f} us | {results['bootstrap_over_ping_p50']:.2f}x p50 |",
        f"| Urza GetArtifact (metadata get) | {get['p50_us']:.0f} us | {get['p99_us']:.0f} us | "
        f"{results['urza_get_over_ping_p50']:.2f}x p50, {results['urza_get_over_ping_p99']:.2f}x p99 "
        f"(target p50 <= 1.5x: {'met' if results['urza_get_over_ping_p50'] <= 1.5 else 'NOT met'}) |",
        "",
        "| Urza artifact transfer | MB/s |",
        "|---|---|",
        f"| DownloadArtifact {dl['size_mib']} MiB, median of {dl['runs']} | {dl['median_mb_s']:.0f} "
        f"(best {dl['best_mb_s']:.0f}) |",
        f"| UploadArtifact {dl['size_mib']} MiB (once) | {dl['upload_mb_s']:.0f} |",
        "",
        f"| bus ({PAYLOAD_BYTES} B payloads) | publish msg/s | publish-to-delivery msg/s | "
        "latency under load p50 / p99 | one at a time p50 / p99 |",
        "|---|---|---|---|---|",
        f"| bare gRPC empty unary ping, {tp['callers']} concurrent grpc.aio callers (gRPC floor) | "
        f"{tp['calls_s']:.0f} calls/s | | | |",
    ]
    labels = {"raw_redis": "raw Redis Streams XADD/XREAD (redis-py, baseline)",
              "oona_redis": "Oona over gRPC, Redis Streams backend", "oona_memory": "Oona over gRPC, in-memory backend"}
    for key in ("raw_redis", "oona_redis", "oona_memory"):
        r = results[key]
        lo, one = r["loaded"], r["one_at_a_time"]
        lines.append(f"| {labels[key]} | {r['publish_msg_s']:.0f} | {r['delivered_msg_s']:.0f} | "
                     f"{lo['p50_us'] / 1000:.2f} / {lo['p99_us'] / 1000:.2f} ms | "
                     f"{one['p50_us'] / 1000:.2f} / {one['p99_us'] / 1000:.2f} ms |")
    raw = results["raw_redis"]["delivered_msg_s"]
    lines.append("")
    lines.append(f"Oona delivered throughput vs the gRPC floor: redis backend "
                 f"{results['oona_redis']['delivered_msg_s'] / tp['calls_s']:.2f}x, memory backend "
                 f"{results['oona_memory']['delivered_msg_s'] / tp['calls_s']:.2f}x.")
    lines.append(f"Oona/raw-Redis delivered throughput: redis backend "
                 f"{results['oona_redis']['delivered_msg_s'] / raw:.2f}x, memory backend "
                 f"{results['oona_memory']['delivered_msg_s'] / raw:.2f}x "
                 f"({results['raw_redis']['messages']} messages per system over {results['raw_redis']['rounds']} "
                 f"interleaved rounds, {results['raw_redis']['publishers']} publishers; msg/s = median round, "
                 "latencies pooled).")
    batch = results["raw_redis_batched"]["batch"]
    lines += [
        "",
        f"| batched bus ({batch} messages per call) | publish msg/s | publish-to-delivery msg/s | "
        "latency under load p50 / p99 |",
        "|---|---|---|---|",
    ]
    labels_b = {"raw_redis_batched": f"raw Redis Streams, pipelines of {batch} XADD + XREAD (baseline)",
                "oona_redis_batched": "Oona PublishBatch + batched Subscribe, Redis Streams backend",
                "oona_memory_batched": "Oona PublishBatch + batched Subscribe, in-memory backend"}
    for key, label in labels_b.items():
        r = results[key]
        lo = r["loaded"]
        lines.append(f"| {label} | {r['publish_msg_s']:.0f} | {r['delivered_msg_s']:.0f} | "
                     f"{lo['p50_us'] / 1000:.2f} / {lo['p99_us'] / 1000:.2f} ms |")
    raw_b = results["raw_redis_batched"]["delivered_msg_s"]
    lines.append("")
    lines.append(f"Batched Oona/raw-Redis delivered throughput: redis backend "
                 f"{results['oona_redis_batched']['delivered_msg_s'] / raw_b:.2f}x, memory backend "
                 f"{results['oona_memory_batched']['delivered_msg_s'] / raw_b:.2f}x.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``esper-bench services``."""
    parser.add_argument("--json", type=Path, help="also write every figure as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run, noisier figures)")
    parser.add_argument("--calls", type=int, default=3000, help="timed unary calls per measurement")
    parser.add_argument("--messages", type=int, default=20000, help="messages per bus throughput run")
    parser.add_argument("--publishers", type=int, default=4, help="concurrent publishers")
    parser.add_argument("--download-mib", type=int, default=64, help="artifact size for the download run")
    parser.add_argument("--batch", type=int, default=100, help="messages per call in the batched bus runs")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of baseline and subjects (evens out background load)")
    parser.add_argument("--skip-adaptation", action="store_true",
                        help="leave out the Services II figures (esper.bench.services_ii: decision round trip, "
                             "germination latency with a real esper-train run)")


def run(args: argparse.Namespace) -> int:
    """Run every measurement, print the table, optionally write JSON."""
    calls, messages, download_mib, downloads, sequential = args.calls, args.messages, args.download_mib, 3, 500
    if args.quick:
        calls, messages, download_mib, downloads, sequential = 300, 2000, 8, 2, 50
    for name, value in (("--calls", calls), ("--messages", messages), ("--publishers", args.publishers),
                        ("--download-mib", download_mib), ("--rounds", args.rounds), ("--batch", args.batch)):
        if value <= 0:
            print(f"esper-bench services: {name} must be positive, got {value}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="esper-bench-services-") as tmp:
        work_dir = Path(tmp)
        results: dict[str, Any] = {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "loadavg_at_start": os.getloadavg(), "platform": platform.platform()},
            "settings": {"calls": calls, "messages": messages, "publishers": args.publishers,
                         "download_mib": download_mib, "sequential": sequential, "payload_bytes": PAYLOAD_BYTES,
                         "rounds": args.rounds, "batch": args.batch},
        }
        results.update(bench_ping_and_urza(work_dir, calls, max(50, calls // 10), download_mib, downloads,
                                           messages, args.publishers, args.rounds))
        results.update(bench_bus(work_dir, messages, args.publishers, sequential, args.rounds, args.batch))
        if not args.skip_adaptation:
            from esper.bench.services_ii import bench_adaptation

            results["adaptation"] = bench_adaptation(work_dir, calls, max(50, calls // 10),
                                                     epochs=12 if args.quick else 20)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
    print(format_table(results))
    if "adaptation" in results:
        from esper.bench.services_ii import format_table as adaptation_table

        ping_p99_ms = results["ping"]["p99_us"] / 1000
        print()
        print(adaptation_table(results["adaptation"]))
        decide_p99 = results["adaptation"]["decisions"]["round_trip_tolaria"]["p99_ms"]
        print(f"decision round trip p99 {decide_p99:.3f} ms = {decide_p99 / ping_p99_ms:.2f}x the bare gRPC ping p99 "
              f"({ping_p99_ms:.3f} ms); target 2 ms: {'met' if decide_p99 <= 2.0 else 'NOT met'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esper-bench services", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
