"""`python -m bench.compare REF`: this checkout against an earlier commit, in one run.

This machine's speed drifts by a third within an hour, so two `make bench` runs minutes
apart cannot tell a 0.2 ms change from the drift. This runs both versions at once: a
fresh PostgreSQL database (migrated and seeded by this checkout), the mock upstream, and
two gateways with production settings (gunicorn, 2 workers each) on that database, one
running this checkout and one a git worktree of REF. Then:

1. latency: small plain completions at concurrency 1, the mock directly, gateway A (REF)
   and gateway B (this checkout) in turn, the order alternating, after a warm-up.
   Reports p50/p99 of each, the added latency of each, and the median of the per-round
   difference B - A, which drift hits equally.
2. rps (with --rps): the plain load generator at a fixed concurrency against A and B in
   turn, several short rounds each, the order alternating.

REF must have this checkout's migrations (the database is migrated once, by this one).

    python -m bench.compare HEAD~3 [--requests 3000] [--rps] [--rps-rounds 6] [--limits]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .gateway import KeepAliveTarget, plain_body, plain_load_command
from .stack import ROOT, BenchEnv, database_prepare, gateway_start, mock_start
from .stats import summary, table


def _git(*args: str) -> str:
    return subprocess.run(  # noqa: S603 (git, fixed arguments)
        ["git", *args],  # noqa: S607 (git from PATH, as the developer runs it)
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def migrations_differ(ref: str) -> list[str]:
    changed = _git("diff", "--name-only", ref, "--", "*/migrations/*.py")
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", "*/migrations/*.py")
    return [line for line in (changed + "\n" + untracked).splitlines() if line]


def latency(targets: dict[str, KeepAliveTarget], requests: int, warmup: int) -> dict:
    body = json.dumps(plain_body()).encode()
    names = list(targets)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + requests):
        for name in names if round_ % 2 == 0 else names[::-1]:
            elapsed = targets[name].call(body)
            if round_ >= warmup:
                times[name].append(elapsed)
    pairs = [b - a for a, b in zip(times["A"], times["B"], strict=True)]
    return {
        "summaries": {name: summary(values) for name, values in times.items()},
        "b_minus_a_median_ms": statistics.median(pairs),
    }


def throughput(urls: dict[str, str], key: str, concurrency: int, rounds: int) -> dict:
    rps: dict[str, list[float]] = {"A": [], "B": []}
    for round_ in range(rounds):
        for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
            command = plain_load_command(
                urls[name], key, concurrency=concurrency, warmup=2.0, duration=8.0
            )
            result = subprocess.run(  # noqa: S603 (our own module)
                command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
            )
            outcome = json.loads(result.stdout.splitlines()[-1])
            if outcome["errors"]:
                raise RuntimeError(f"gateway {name}: {outcome['errors']} errors")
            rps[name].append(outcome["ok"] / outcome["duration_s"])
    return {"rps": rps, "median": {name: statistics.median(v) for name, v in rps.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref", help="the commit to compare against (A); this checkout is B")
    parser.add_argument("--requests", type=int, default=3000, help="latency rounds")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rps", action="store_true", help="also compare throughput")
    parser.add_argument("--rps-rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--limits",
        action="store_true",
        help="give the tenant and key hard budgets and rate limits (never reached)",
    )
    args = parser.parse_args(argv)

    commit = _git("rev-parse", "--short", args.ref)
    differ = migrations_differ(args.ref)
    if differ:
        print(f"{args.ref} has other migrations than this checkout: {', '.join(differ)}")
        return 2
    env = BenchEnv.create()
    with contextlib.ExitStack() as stack:
        worktree = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "ref"
        _git("worktree", "add", "--detach", "--quiet", str(worktree), commit)
        stack.callback(_git, "worktree", "remove", "--force", str(worktree))
        print(f"A = {commit} (worktree), B = this checkout; starting ...", flush=True)
        mock = mock_start()
        stack.callback(mock.stop)
        mock_url = mock.url("openai")
        key = database_prepare(env, mock_url, limits=args.limits)[0]
        logs = ROOT / "bench-results" / "compare-logs"
        gateways = {}
        for name, root in (("A", worktree), ("B", ROOT)):
            gateways[name] = gateway_start(env, key=key, log_dir=logs, root=root)
            stack.callback(gateways[name].stop)
        targets = {"direct": KeepAliveTarget(f"{mock_url}/chat/completions", "direct")}
        for name, gateway in gateways.items():
            targets[name] = KeepAliveTarget(f"{gateway.url}/v1/chat/completions", key)
        result = latency(targets, args.requests, args.warmup)
        s = result["summaries"]
        rows = [
            [name, s[name]["p50"], s[name]["p99"], _minus(s[name]["p50"], s["direct"]["p50"])]
            for name in ("direct", "A", "B")
        ]
        print(f"\nLatency, concurrency 1, {args.requests} rounds (ms); A = {commit}, B = this")
        print(table(rows, ["target", "p50", "p99", "added p50"]))
        difference = result["b_minus_a_median_ms"]
        print(f"B - A, median of the per-round differences: {difference:+.3f} ms")
        if args.rps:
            urls = {name: gateway.url for name, gateway in gateways.items()}
            rps = throughput(urls, key, args.concurrency, args.rps_rounds)
            print(f"\nThroughput, concurrency {args.concurrency}, {args.rps_rounds} rounds of 8 s")
            for name in ("A", "B"):
                rounds = ", ".join(f"{v:.0f}" for v in rps["rps"][name])
                print(f"{name}: median {rps['median'][name]:.1f} requests/s ({rounds})")
    return 0


def _minus(a: object, b: object) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) - float(b)
    return None


if __name__ == "__main__":
    sys.exit(main())
