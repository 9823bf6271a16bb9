"""Load generators, run by bench.gateway in separate processes (asyncio + aiohttp).

    python -m bench.load plain   --url URL --key KEY[,KEY...] --concurrency N --warmup S
                                 --duration S
    python -m bench.load streams --url URL --key KEY --total N --index I --stride K ...

`plain`: N loops, each sending one small non-streaming chat completion after the other
over a pooled keep-alive connection. Requests completing inside the measured window (after
the warm-up) count towards rps and latency; every 200 (warm-up included) is reported, so
the caller can check it against the usage ledger.

`streams`: this process's share of `--total` streams (indices I, I+K, I+2K, ...), each
started at `--start-at` (a time.time() instant shared by all generator processes) plus
its index times `--ramp / --total`. Per stream: status, time to the first SSE event and
to the first content chunk (TTFT), content chunks received, and whether [DONE] arrived.

Both print one JSON object on stdout, with the CPU time the generator itself used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- plain -----------------------------------------------------------------------------


@dataclass
class PlainResult:
    concurrency: int
    duration_s: float
    ok: int = 0  # 200s completed inside the measured window
    errors: int = 0  # anything else completed inside the window
    total_ok: int = 0  # every 200, warm-up and the tail after the window included
    total_errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # of the measured 200s
    cpu_s: float = 0.0  # this generator's CPU time during the window


async def _plain(args: argparse.Namespace) -> PlainResult:
    body = args.body.encode()
    # --key may name several keys: connection i calls with key i modulo their number.
    keys = args.key.split(",")
    result = PlainResult(concurrency=args.concurrency, duration_s=args.duration)
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    loop = asyncio.get_running_loop()
    window_start = loop.time() + args.warmup
    window_end = window_start + args.duration
    cpu_marks: list[float] = []

    async def cpu_clock() -> None:
        await asyncio.sleep(max(0.0, window_start - loop.time()))
        cpu_marks.append(_cpu_seconds())
        await asyncio.sleep(max(0.0, window_end - loop.time()))
        cpu_marks.append(_cpu_seconds())

    def note_error(kind: str, measured: bool) -> None:
        result.total_errors += 1
        result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1
        if measured:
            result.errors += 1

    async def one_loop(session: aiohttp.ClientSession, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        while loop.time() < window_end:
            started = loop.time()
            try:
                async with session.post(args.url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                finished = loop.time()
                note_error(type(exc).__name__, window_start <= finished <= window_end)
                continue
            finished = loop.time()
            measured = window_start <= finished <= window_end
            if status == 200:
                result.total_ok += 1
                if measured:
                    result.ok += 1
                    result.latencies_ms.append((finished - started) * 1000)
            else:
                note_error(f"HTTP {status}", measured)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loops = (one_loop(session, keys[i % len(keys)]) for i in range(args.concurrency))
        await asyncio.gather(cpu_clock(), *loops)
    result.cpu_s = cpu_marks[1] - cpu_marks[0]
    return result


# --- streams ---------------------------------------------------------------------------


@dataclass
class StreamResult:
    index: int
    status: int = 0
    started_s: float = 0.0  # since the shared start instant
    first_event_ms: float | None = None  # first `data:` event of any kind
    ttft_ms: float | None = None  # first chunk with non-empty delta content
    content_chunks: int = 0
    events: int = 0
    done: bool = False  # `data: [DONE]` arrived
    duration_s: float = 0.0
    error: str = ""


def _has_content(payload: bytes) -> bool:
    try:
        chunk = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(chunk, dict):
        return False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("content"):
            return True
    return False


async def _one_stream(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    index: int,
    start_mono: float,
    body: bytes,
    headers: dict[str, str],
) -> StreamResult:
    result = StreamResult(index=index)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_mono + index * args.ramp / args.total - loop.time()))
    sent = loop.time()
    result.started_s = sent - start_mono
    try:
        async with session.post(args.url, data=body, headers=headers) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:300]
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if result.first_event_ms is None:
                    result.first_event_ms = (loop.time() - sent) * 1000
                if payload == b"[DONE]":
                    result.done = True
                    break
                result.events += 1
                if b'"error"' in payload and b'"choices"' not in payload:
                    result.error = payload.decode(errors="replace")[:300]
                    break
                if _has_content(payload):
                    result.content_chunks += 1
                    if result.ttft_ms is None:
                        result.ttft_ms = (loop.time() - sent) * 1000
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        result.duration_s = loop.time() - sent
    return result


async def _streams(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body.encode()
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    loop = asyncio.get_running_loop()
    start_mono = loop.time() + (args.start_at - time.time())
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=args.read_timeout)
    cpu_before = _cpu_seconds()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(
            *(
                _one_stream(session, args, index, start_mono, body, headers)
                for index in range(args.index, args.total, args.stride)
            )
        )
    return {"streams": [asdict(r) for r in results], "cpu_s": _cpu_seconds() - cpu_before}


# --- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("plain", "streams"):
        p = sub.add_parser(mode)
        p.add_argument("--url", required=True, help="the full chat completions URL")
        p.add_argument("--key", required=True)
        p.add_argument("--body", required=True, help="the JSON request body")
    plain = sub.choices["plain"]
    plain.add_argument("--concurrency", type=int, required=True)
    plain.add_argument("--warmup", type=float, default=3.0)
    plain.add_argument("--duration", type=float, default=20.0)
    streams = sub.choices["streams"]
    streams.add_argument("--total", type=int, required=True, help="streams over all processes")
    streams.add_argument("--index", type=int, default=0, help="this process's first index")
    streams.add_argument("--stride", type=int, default=1, help="number of processes")
    streams.add_argument("--start-at", type=float, required=True, help="time.time() instant")
    streams.add_argument("--ramp", type=float, default=0.0, help="seconds to start them all")
    streams.add_argument("--read-timeout", type=float, default=90.0)
    args = parser.parse_args(argv)

    if args.mode == "plain":
        output: dict[str, Any] = asdict(asyncio.run(_plain(args)))
    else:
        output = asyncio.run(_streams(args))
    json.dump(output, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
