"""Resident memory of `pagedllm serve` under sustained load, and after it (issue 15, item 5).

    OMP_NUM_THREADS=1 python benchmarks/memory_soak.py --minutes 20 [--concurrency 64] [-- flags]

Starts the server (the default model unless flags after ``--`` say otherwise), reads the
resident memory of its processes (the API server and the engine core: /proc/<pid>/status
VmRSS) at idle, then keeps ``--concurrency`` streaming completions in flight for ``--minutes``
(prompts of 16-400 tokens, 1-128 output tokens, some cancelled half way), sampling the memory
every ``--every`` seconds, then waits ``--settle`` seconds idle and reads it once more. Checks
that every request got an answer or a 4xx and that the KV cache is empty at the end
(``pagedllm:kv_cache_usage_perc`` 0). Prints one line per sample and a summary table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "a jovial sphinx of black quartz judging my vow").split()


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """(RSS of pid, RSS of its descendants) in MiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    own, rest, stack = _rss(pid), 0.0, list(children.get(pid, []))
    while stack:
        p = stack.pop()
        rest += _rss(p)
        stack += children.get(p, [])
    return own, rest


def _rss(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
        return int(m.group(1)) / 1024 if m else 0.0
    except OSError:
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def kv_usage(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^pagedllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def one_request(client: httpx.AsyncClient, rng: random.Random, counts: dict) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 300)))
    body = {"model": "", "prompt": prompt, "max_tokens": rng.randint(1, 128),
            "temperature": rng.choice([0.0, 0.8]), "stream": True}
    cancel_after = rng.randint(2, 20) if rng.random() < 0.1 else None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code >= 500:
                counts["5xx"] += 1
                return
            if r.status_code >= 400:
                counts["4xx"] += 1
                return
            chunks = 0
            async for line in r.aiter_lines():
                chunks += line.startswith("data: ")
                if cancel_after is not None and chunks >= cancel_after:
                    counts["cancelled"] += 1
                    return
                if line == "data: [DONE]":
                    counts["done"] += 1
                    return
            counts["no_done"] += 1
    except httpx.HTTPError:
        counts["transport_error"] += 1


async def load(url: str, concurrency: int, seconds: float, every: float, pid: int,
               samples: list) -> dict:
    counts = dict.fromkeys(("done", "cancelled", "4xx", "5xx", "no_done", "transport_error"), 0)
    rng = random.Random(0)
    stop = time.monotonic() + seconds
    start = time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            await one_request(client, rng, counts)

    async def sampler() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(every)
            own, rest = tree_rss_mib(pid)
            samples.append((time.monotonic() - start, own, rest))
            print(f"t={samples[-1][0]:6.0f}s api {own:7.0f} MiB core {rest:7.0f} MiB "
                  f"answered {counts['done']}", flush=True)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(concurrency)))
    return counts


def main() -> None:
    argv = sys.argv[1:]
    serve_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=30.0)
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve",
                             "--port", str(port), *serve_flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        time.sleep(5)
        idle = tree_rss_mib(proc.pid)
        print(f"idle: api {idle[0]:.0f} MiB, core {idle[1]:.0f} MiB", flush=True)
        samples: list = []
        counts = asyncio.run(load(url, args.concurrency, args.minutes * 60, args.every,
                                  proc.pid, samples))
        time.sleep(args.settle)
        after = tree_rss_mib(proc.pid)
        usage = kv_usage(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    warm = [s for s in samples if s[0] >= samples[-1][0] / 4] or samples
    print(f"\nrequests: {counts}; KV cache usage after: {usage}")
    print(f"{'':<28}{'API server':>12}{'engine core':>13}{'total':>9}  (MiB)")
    for name, (own, rest) in [("idle", idle),
                              ("peak under load", max((s[1:] for s in samples),
                                                      key=sum)),
                              ("min / max after warm-up", (min(s[1] for s in warm),
                                                           min(s[2] for s in warm))),
                              ("", (max(s[1] for s in warm), max(s[2] for s in warm))),
                              (f"after {args.settle:.0f} s idle", after)]:
        print(f"{name:<28}{own:>12.0f}{rest:>13.0f}{own + rest:>9.0f}")


if __name__ == "__main__":
    main()
