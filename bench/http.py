"""HTTP enqueue throughput and latency of one ``reframe serve`` process, measured with ``wrk``.

    .venv/bin/python -m bench.http                 # 1 uvicorn process, 4, 16 and 64 connections
    .venv/bin/python -m bench.http --workers 2 --duration-s 20

Starts a real redis-server and a real ``reframe serve`` (no workers: the jobs only queue, so the
figures are the API's and Redis', not fal's), creates an API key with a rate limit far above the
load, and drives ``POST /v1/jobs`` with wrk (Debian's ``wrk``; one wrk thread, closed loop, every
request a new job through auth, the per-key GCRA, strict validation, the enqueue script and the
tenant index). wrk runs in its own process on the same 2 cores, so it competes with the server:
the figures are a floor for a dedicated machine. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.table import Table

from config.settings import child_environment
from reframe.api.keys import KeyStore
from reframe.localproc import free_port, spawn, start_redis, wait_until

FLOOR = "≥ 1,000/s at p99 < 50 ms"

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
local n = 0
request = function()
  n = n + 1
  local body = '{"video_url":"https://cdn.example.com/bench/' .. n .. '.mp4","aspect_ratio":"9:16",' ..
               '"metadata":{"bench":' .. n .. '}}'
  return wrk.format(nil, "/v1/jobs", nil, body)
end
"""

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        return float("nan")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def run_wrk(url: str, script: Path | None, *, connections: int, duration_s: int) -> dict[str, float]:
    """One wrk run; requests/s, latency percentiles (ms) and non-2xx count."""
    with_script = ["-s", str(script)] if script is not None else []
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", *with_script, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration_s + 60,
    ).stdout
    result: dict[str, float] = {"connections": connections}
    for q in ("50", "90", "99"):
        match = re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", out, re.M)
        result[f"p{q}_ms"] = _ms(match.group(1)) if match else float("nan")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(rps.group(1)) if rps else float("nan")
    total = re.search(r"(\d+) requests in", out)
    result["requests"] = float(total.group(1)) if total else float("nan")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    errors = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = (
        0.0 if errors is None else float(sum(int(x) for x in re.findall(r"\d+", errors.group(1))))
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="uvicorn processes of reframe serve")
    parser.add_argument("--duration-s", type=int, default=15)
    parser.add_argument("--connections", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    server = start_redis(work / "redis")
    serve = None
    try:
        port = free_port()
        env = child_environment({"REFRAME_REDIS_URL": server.url, "REFRAME_LOG_LEVEL": "INFO"})
        argv_serve = [
            sys.executable,
            "-m",
            "reframe",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
        ]
        serve = spawn("serve", argv_serve, log_dir=work, env=env)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=60, what="reframe serve")
        r = redis.Redis.from_url(server.url)
        token, _ = KeyStore(r, prefix="reframe").create("bench", ["enqueue"], rate_per_s=1e6, burst=1_000_000)
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT % {"token": token})
        run_wrk(url, script, connections=8, duration_s=3)  # warm-up: connections, scripts, caches
        rows = []
        for connections in args.connections:
            before = r.zcard("{reframe}:tenant:bench:jobs")
            result = run_wrk(url, script, connections=connections, duration_s=args.duration_s)
            made = r.zcard("{reframe}:tenant:bench:jobs") - before
            rows.append(("POST /v1/jobs", result, f"{made:,}"))
        # the framework alone (no auth, no Redis): the ceiling this machine allows one process
        baseline = run_wrk(f"{url}/healthz", None, connections=16, duration_s=max(3, args.duration_s // 2))
        rows.append(("GET /healthz", baseline, "-"))
        table = Table(
            title=f"HTTP API, {args.workers} uvicorn process(es), wrk -t1 on the same cores; floor {FLOOR}"
        )
        for col in ("request", "connections", "req/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx", "jobs made"):
            table.add_column(col, justify="right")
        for name, result, made in rows:
            table.add_row(
                name,
                str(int(result["connections"])),
                f"{result['rps']:,.0f}",
                f"{result['p50_ms']:.1f}",
                f"{result['p90_ms']:.1f}",
                f"{result['p99_ms']:.1f}",
                f"{int(result['non_2xx'])}",
                made,
            )
        console.print(table)
        r.close()
    finally:
        if serve is not None:
            serve.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
