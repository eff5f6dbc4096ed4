"""Bounded loopback load test of `metactr serve`: latency and errors of /predict and /adapt.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py /tmp/serve_din/best \
        --data runs/prepared/ml-100k-random --label after --out benchmarks/results/serve_after.json
    # the same against another checkout (e.g. the old main), same data and checkpoint:
    ... benchmarks/serve_load.py ... --tree /work/baseline --label before --out .../serve_before.json

Starts `python -m metactr.cli serve` from ``--tree``'s ``src`` on 127.0.0.1 and a free port as a
subprocess, waits for /health, then runs fixed request counts, each phase also capped in time, with
httpx clients on loopback only, and stops the server. Phases:

    health_serial      one client, GET /health: the HTTP round trip alone
    predict_serial     one client, /predict with --candidates items and a 10-item session
    predict_concurrent --clients clients at once, the same requests
    adapt_serial       one client, /adapt with --interactions labelled interactions
    race               half the clients adapt fresh users while the others score one never-adapted
                       probe user; every probe answer is compared with its score before the phase

Prints p50 / p99 / max (ms) and error counts (non-200 answers, failed connections) per phase and
writes them with a ``machine`` block (CPU model, torch CPU capability, nproc, load average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import polars as pl


def machine() -> dict:
    from machine import machine as host  # benchmarks/machine.py: the block every benchmark JSON carries

    return host(httpx=httpx.__version__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(latencies: list[float], errors: int, wall: float) -> dict:
    xs = sorted(latencies)
    q = (lambda p: round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 3)) if xs else (lambda p: None)
    return {"n": len(xs), "errors": errors, "p50_ms": q(0.5), "p99_ms": q(0.99),
            "max_ms": round(xs[-1] * 1e3, 3) if xs else None, "wall_s": round(wall, 3),
            "rps": round(len(xs) / wall, 1) if wall > 0 else None}


class Workload:
    def __init__(self, prepared: Path, candidates: int, interactions: int, seed: int) -> None:
        self.users = pl.read_parquet(prepared / "vocab" / "user_id.parquet")["raw"].to_list()
        self.items = pl.read_parquet(prepared / "vocab" / "item_id.parquet")["raw"].to_list()
        self.rng = random.Random(seed)
        self.candidates, self.interactions = candidates, interactions

    def _inter(self, n: int) -> list[dict]:
        return [{"item": self.rng.choice(self.items), "label": self.rng.randint(0, 1)} for _ in range(n)]

    def predict(self, user=None) -> dict:
        return {"user": self.rng.choice(self.users) if user is None else user,
                "items": self.rng.sample(self.items, self.candidates), "history": self._inter(10)}

    def adapt(self, user=None) -> dict:
        return {"user": self.rng.choice(self.users) if user is None else user,
                "interactions": self._inter(self.interactions), "history": self._inter(10)}


class HttpxClient:
    """httpx.AsyncClient (what a Python user would write; costs ~1.5 ms of CPU per request)."""

    def __init__(self, base: str, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0)

    async def send(self, path: str, body: bytes | None) -> tuple[int, bytes]:
        if body is None:
            r = await self.client.get(path)
        else:
            r = await self.client.post(path, content=body, headers={"content-type": "application/json"})
        return r.status_code, r.content

    def connection(self):
        return self

    async def aclose(self) -> None:
        await self.client.aclose()


class RawClient:
    """Keep-alive HTTP/1.1 over asyncio streams, one connection per concurrent client: a client
    that costs little CPU, so that on a 2-core machine the figures are mostly the server's."""

    def __init__(self, base: str, connections: int) -> None:
        self.host, self.port = base.removeprefix("http://").split(":")
        self.conns: list[_RawConnection] = []

    def connection(self) -> _RawConnection:
        conn = _RawConnection(self.host, int(self.port))
        self.conns.append(conn)
        return conn

    async def aclose(self) -> None:
        for c in self.conns:
            c.close()


class _RawConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.streams = host, port, None

    async def send(self, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        method = "GET" if body is None else "POST"
        body = body or b""
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        try:
            status = int((await reader.readline()).split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            data = await reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
            self.close()
            raise ConnectionError(str(e)) from None
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


CLIENTS = {"httpx": HttpxClient, "raw": RawClient}
REQUEST_TIMEOUT_S = 30.0


async def _loop(conn, path: str, bodies: list[bytes | None], deadline: float, out: list, check=None) -> int:
    errors = 0
    for body in bodies:
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        try:
            status, data = await asyncio.wait_for(conn.send(path, body), REQUEST_TIMEOUT_S)
        except (httpx.HTTPError, ConnectionError, TimeoutError):
            status, data = 0, b""
            if isinstance(conn, _RawConnection):
                conn.close()  # a half-read answer: start afresh
        dt = time.perf_counter() - t
        if status == 200:
            out.append(dt)
            if check is not None:
                check(body, json.loads(data))
        else:
            errors += 1
    return errors


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def phase(base: str, kind: str, jobs: list[tuple[str, list[dict | None]]], cap_s: float, pid: int,
                check=None) -> dict:
    """One client connection per job, all at once; each sends its bodies in order until done or
    ``cap_s``. Besides latencies: the server's CPU time per request (a loaded, shared machine
    inflates it far less than the wall-clock latencies) and the client's own."""
    jobs = [(p, [None if b is None else json.dumps(b).encode() for b in bodies]) for p, bodies in jobs]
    client = CLIENTS[kind](base, len(jobs))
    try:
        lat: list[float] = []
        cpu0, client0 = cpu_seconds(pid), time.process_time()
        t = time.perf_counter()
        errs = await asyncio.gather(*(_loop(client.connection(), p, b, t + cap_s, lat, check) for p, b in jobs))
        out = stats(lat, sum(errs), time.perf_counter() - t)
        n = max(1, out["n"] + out["errors"])
        out["server_cpu_ms_per_req"] = round((cpu_seconds(pid) - cpu0) * 1e3 / n, 3)
        out["client_cpu_ms_per_req"] = round((time.process_time() - client0) * 1e3 / n, 3)
        return out
    finally:
        await client.aclose()


def run(args) -> dict:
    tree = Path(args.tree).resolve()
    work = Workload(Path(args.data), args.candidates, args.interactions, args.seed)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), *args.extra_path])}
    cmd = [args.python, "-m", "metactr.cli", "serve", str(args.checkpoint), "--data", str(args.data),
           "--host", "127.0.0.1", "--port", str(port), *args.serve_args.split()]
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_load_", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    result: dict = {"label": args.label, "tree": str(tree), "command": cmd, "machine": machine(),
                    "candidates": args.candidates, "interactions": args.interactions, "clients": args.clients,
                    "client": args.client}
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"server did not start (exit {server.poll()}); log {log.name}:\n{log.read()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        n, c, cap, pid = args.requests, args.clients, args.cap_s, server.pid
        go = lambda jobs: asyncio.run(phase(base, args.client, jobs, cap, pid))  # noqa: E731
        go([("/predict", [work.predict() for _ in range(50)]), ("/adapt", [work.adapt() for _ in range(10)])])
        phases = {  # /health: the HTTP round trip alone (client and server), a floor for the others
            "health_serial": lambda: [("/health", [None] * n)],
            "predict_serial": lambda: [("/predict", [work.predict() for _ in range(n)])],
            "predict_concurrent": lambda: [("/predict", [work.predict() for _ in range(n // c)]) for _ in range(c)],
            "adapt_serial": lambda: [("/adapt", [work.adapt() for _ in range(n // 2)])],
        }
        for name, jobs in phases.items():
            result[name] = go(jobs())
            print(f"{name:20s} " + " ".join(f"{k}={v}" for k, v in result[name].items()), flush=True)
        result["race"] = race(base, work, args, server.pid)
        print("race                 " + " ".join(f"{k}={v}" for k, v in result["race"].items()), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        os.unlink(log.name)
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    return result


def race(base: str, work: Workload, args, server_pid: int) -> dict:
    """Scores of a never-adapted probe user while other users are adapted at the same time."""
    probe_user = "serve-load-probe-never-adapted"
    probe = work.predict(probe_user)
    answer = httpx.post(base + "/predict", json=probe, timeout=30.0)
    if answer.status_code != 200:
        raise SystemExit(f"race: reference /predict answered {answer.status_code}: {answer.text[:300]}")
    reference = answer.json()["scores"]
    changed, worst, answers = [0], [0.0], [0]

    probe_body = json.dumps(probe).encode()

    def check(body, answer):
        if body == probe_body:
            answers[0] += 1
            d = max(abs(a - b) for a, b in zip(answer["scores"], reference, strict=True))
            changed[0] += d > 0
            worst[0] = max(worst[0], d)

    half, per = max(1, args.clients // 2), args.requests // args.clients
    jobs = [("/adapt", [work.adapt(f"serve-load-adapted-{k}-{i}") for i in range(per)]) for k in range(half)]
    jobs += [("/predict", [probe] * per) for _ in range(half)]
    out = asyncio.run(phase(base, args.client, jobs, args.cap_s, server_pid, check))
    return {**out, "probe_answers": answers[0], "probe_changed": changed[0], "probe_max_abs_diff": worst[0]}


PHASES = ("health_serial", "predict_serial", "predict_concurrent", "adapt_serial", "race")


def table(paths: list[Path]) -> str:
    """A markdown table of result files: p50 / p99 ms and server CPU ms per request per phase."""
    rows = ["| file | client | load | " + " | ".join(PHASES) + " | probe changed | errors |",
            "|---|---|---|" + "---|" * (len(PHASES) + 2)]
    for path in paths:
        d = json.loads(path.read_text())
        cells = [f"{d[k]['p50_ms']:.1f} / {d[k]['p99_ms']:.1f} ({d[k]['server_cpu_ms_per_req']:.2f})"
                 if d[k]["n"] else f"none answered ({d[k]['errors']} errors)" for k in PHASES]
        errors = sum(d[k]["errors"] for k in PHASES)
        rows.append(f"| {path.stem.removeprefix('serve_')} | {d['client']} | {d['machine']['loadavg'][0]:.1f} | " + " | ".join(cells)
                    + f" | {d['race']['probe_changed']} of {d['race'].get('probe_answers', '?')} | {errors} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, nargs="?")
    ap.add_argument("--data", type=Path, help="prepared dataset directory")
    ap.add_argument("--table", type=Path, nargs="+", help="only print a markdown table of these result files")
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout whose src/ the server runs (default: this one)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--extra-path", action="append", default=[], help="more PYTHONPATH entries for the server")
    ap.add_argument("--serve-args", default="", help="extra `metactr serve` options, one string")
    ap.add_argument("--label", default="run")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="httpx",
                    help="httpx.AsyncClient, or a minimal keep-alive client that costs the machine little CPU")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--interactions", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400, help="requests per phase (adapt: half)")
    ap.add_argument("--cap-s", type=float, default=60.0, help="time cap of each phase")
    ap.add_argument("--start-timeout", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.checkpoint is None or args.data is None:
        ap.error("a checkpoint and --data are required")
    result = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
