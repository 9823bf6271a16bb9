"""`python -m bench.profile`: where the gateway's CPU goes per plain request, at saturation.

Starts the same stack as bench.gateway (fresh PostgreSQL database, mock upstream, gunicorn
with production settings), drives it with `bench.load plain` at a fixed concurrency, and
records every gunicorn worker with py-spy while the load runs. py-spy samples only the
thread holding the GIL (`--gil`: Python CPU time, not threads waiting on sockets), and
without pausing the process (`--nonblocking`: the gateway keeps its full speed; a few
samples come out truncated and are reported as unattributed).

Output: the raw collapsed stacks, one file per worker, in
bench-results/profile-<timestamp>/ (input for flamegraph.pl or speedscope), and two
tables of sample shares: by hot-path step (the innermost step a sample is in wins), and
by kind of work across steps (ORM query building, the PostgreSQL driver, HTTP client).

    .venv/bin/pip install py-spy   # once
    python -m bench.profile [--concurrency 16] [--seconds 20] [--gunicorn-conf FILE] [--limits]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from . import procs
from .gateway import RESULTS_DIR, plain_load_command
from .stack import (
    GUNICORN_CONF,
    ROOT,
    VENV_BIN,
    BenchEnv,
    database_prepare,
    gateway_start,
    mock_start,
)
from .stats import table

# (step, marker): a sample belongs to the step of the innermost marker in its stack.
STEPS: tuple[tuple[str, str], ...] = (
    ("gunicorn worker thread (HTTP parse, write)", "ThreadWorker.handle ("),
    ("Django handler and middleware", "WSGIHandler.__call__ ("),
    ("DRF dispatch (Request, permissions, response)", "APIView.dispatch ("),
    ("view (ChatCompletionsView.post)", "ChatCompletionsView.post ("),
    ("key auth (ApiKeyAuthentication)", "ApiKeyAuthentication.authenticate ("),
    ("body parse and validation", "chat_request_parse ("),
    ("catalog and allowlist lookup (model_for_key)", "model_for_key ("),
    ("price lookup", "model_price_in_force ("),
    ("price lookup", "CatalogEntry.price_at ("),
    ("chat_complete: response shaping, JSON", "chat_complete ("),
    ("upstream_client()", "upstream_client ("),
    ("db_connection_release()", "db_connection_release ("),
    ("openai SDK: request building, response wrapping", "Completions.create ("),
    ("openai SDK: request building, response wrapping", "SyncAPIClient.post ("),
    ("upstream HTTP exchange (httpx2 Client.send)", "Client.send (httpx2"),
    ("ledger insert (usage_write)", "usage_write ("),
)

KINDS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    (
        "Django ORM: building and compiling queries, making model instances",
        lambda s: (
            "django/db/models/" in s
            and "psycopg/" not in s
            and "django/db/backends/utils.py" not in s
        ),
    ),
    ("PostgreSQL driver (psycopg execute, fetch, load)", lambda s: "psycopg/" in s),
    ("connection pool (psycopg_pool, Django connect/close)", lambda s: "psycopg_pool/" in s),
    ("transaction.atomic enter/exit", lambda s: "Atomic.__" in s),
    ("HTTP client (httpx2, httpcore2, h11)", lambda s: "httpx2/" in s or "httpcore2/" in s),
    ("openai SDK request-params transform", lambda s: "openai/_utils/_transform.py" in s),
    ("JSON (stdlib json)", lambda s: "json/encoder.py" in s or "json/decoder.py" in s),
)


def _step(frames: list[str]) -> str:
    best, depth = "unattributed (truncated stacks, gunicorn main loop)", -1
    for name, marker in STEPS:
        for index, frame in enumerate(frames):
            if marker in frame and index > depth:
                best, depth = name, index
    return best


def summarize(paths: list[Path]) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, samples per step, samples per kind) over py-spy raw files."""
    total = 0
    steps: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            steps[_step(stack.split(";"))] += n
            for name, matches in KINDS:
                if matches(stack):
                    kinds[name] += n
    return total, steps, kinds


def report(total: int, steps: Counter[str], kinds: Counter[str], cpu_ms: float | None) -> str:
    def rows(counter: Counter[str]) -> list[list[object]]:
        out: list[list[object]] = []
        for name, n in counter.most_common():
            share = n / total if total else 0.0
            ms = f"{share * cpu_ms:.2f}" if cpu_ms else "-"
            out.append([name, f"{100 * share:.1f}%", ms])
        return out

    header = ["", "share of GIL samples", "~ms CPU per request"]
    return "\n\n".join(
        [
            f"{total} samples",
            table(rows(steps), ["step", *header[1:]]),
            table(rows(kinds), ["kind of work (across steps)", *header[1:]]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="recording time")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--threads", type=int, default=300)
    parser.add_argument("--gunicorn-conf", default=GUNICORN_CONF)
    parser.add_argument(
        "--limits", action="store_true", help="the tenant and key under budgets and rate limits"
    )
    parser.add_argument("--summarize", nargs="+", type=Path, help="only summarize raw files")
    args = parser.parse_args(argv)

    if args.summarize:
        print(report(*summarize(args.summarize), cpu_ms=None))
        return 0
    py_spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if py_spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy")
        return 1

    out_dir = RESULTS_DIR / f"profile-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    out_dir.mkdir(parents=True)
    env = BenchEnv.create()
    warmup = 5.0
    with contextlib.ExitStack() as stack:
        mock = mock_start()
        stack.callback(mock.stop)
        key = database_prepare(env, mock.url("openai"), limits=args.limits)[0]
        gateway = gateway_start(
            env,
            key=key,
            threads=args.threads,
            log_dir=out_dir,
            gunicorn_conf=args.gunicorn_conf,
        )
        stack.callback(gateway.stop)
        load = subprocess.Popen(  # noqa: S603 (our own module, fixed arguments)
            plain_load_command(
                gateway.url,
                key,
                concurrency=args.concurrency,
                warmup=warmup,
                duration=args.seconds + 2.0,
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(warmup)
        workers = gateway.worker_pids()
        meter = procs.CpuMeter({"gateway": gateway.pids})
        meter.start()
        started = time.monotonic()
        recorders = [
            subprocess.Popen(  # noqa: S603 (py-spy on our own gunicorn workers)
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    str(args.rate),
                    "--gil",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    str(out_dir / f"worker-{pid}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid in workers
        ]
        for recorder in recorders:
            recorder.wait()
        cpu_per_s = meter.stop()["gateway"] / (time.monotonic() - started)
        stdout, _ = load.communicate(timeout=args.seconds + 120)
    result = json.loads(stdout.splitlines()[-1])
    rps = result["ok"] / result["duration_s"]
    cpu_ms = cpu_per_s / rps * 1000 if rps else None
    raw = sorted(out_dir.glob("worker-*.txt"))
    print(
        f"{rps:.1f} rps at concurrency {args.concurrency}, gateway CPU {cpu_per_s:.2f} cores"
        f" = {cpu_ms or 0:.2f} ms per request; raw stacks in {out_dir.relative_to(ROOT)}\n"
    )
    # ms per request spread the measured CPU per request like the samples: an
    # approximation (the samples cover Python time holding the GIL, not the kernel's).
    print(report(*summarize(raw), cpu_ms=cpu_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
