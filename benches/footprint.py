#!/usr/bin/env python3
"""Memory, start and reload time of the relay against the number of configured accounts.

    benches/footprint.py [--accounts 10,10000,100000] [--reloads 20] [--bin target/release/whatsapp-relay]

Run from the repository root after `cargo build --release`. For each size it writes a config of
Meta accounts with their own app secrets (inline) and phone number ids, one Motion per 1,000
accounts (queue mode, Motions on an address nothing listens on), then, with RUST_LOG=warn:
  - start: from spawning the relay to its first 200 on /readyz;
  - idle RSS: VmRSS two seconds after ready;
  - reload: `POST /admin/reload` RELOADS times, one after the other; the median and worst of the
    relay's own `took_ms`, and the wall time of each call;
  - RSS after the first reload and after the last (the relay must give back what a reload
    replaced).
Prints a markdown table. Everything runs on 127.0.0.1 and is stopped at the end (or on error).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

TOKEN = "footprint-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(accounts, http_port, admin_port, data_dir, dead_port):
    out = [
        "[server]",
        f'http = "127.0.0.1:{http_port}"',
        "[admin]",
        f'listen = "127.0.0.1:{admin_port}"',
        f'token = "{TOKEN}"',
        "[storage]",
        f'path = "{data_dir}"',
        "[delivery]",
        'mode = "queue"',
    ]
    per_motion = 1000
    for m in range((accounts + per_motion - 1) // per_motion):
        out += ["", "[[motion]]", f'name = "m{m}"', f'url = "http://127.0.0.1:{dead_port}"']
        for n in range(m * per_motion, min(accounts, (m + 1) * per_motion)):
            out += [
                "  [[motion.account]]",
                f'  id = "{n}"',
                '  provider = "meta"',
                f'  app_secret = "app-secret-{n:08d}"',
                f'  phone_number_id = "1{n:014d}"',
            ]
    return "\n".join(out) + "\n"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def http(method, url, timeout=30):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def ready(admin_port):
    try:
        return http("GET", f"http://127.0.0.1:{admin_port}/readyz", timeout=1)[0] == 200
    except Exception:
        return False


def measure(binary, accounts, reloads):
    tmp = tempfile.mkdtemp(prefix="footprint-")
    try:
        http_port, admin_port, dead_port = free_port(), free_port(), free_port()
        cfg = os.path.join(tmp, "relay.toml")
        with open(cfg, "w") as f:
            f.write(config_text(accounts, http_port, admin_port, os.path.join(tmp, "data"), dead_port))
        env = dict(os.environ, RUST_LOG="warn")
        started = time.monotonic()
        proc = subprocess.Popen([binary, "--config", cfg], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not ready(admin_port):
                if proc.poll() is not None:
                    raise SystemExit(f"the relay exited at start ({accounts} accounts)")
                if time.monotonic() - started > 120:
                    raise SystemExit("not ready after 120 s")
                time.sleep(0.01)
            start_s = time.monotonic() - started
            time.sleep(2)
            idle = rss_kib(proc.pid)
            took, wall, rss_first = [], [], None
            for i in range(reloads):
                t0 = time.monotonic()
                status, body = http("POST", f"http://127.0.0.1:{admin_port}/admin/reload", timeout=120)
                wall.append(time.monotonic() - t0)
                assert status == 200, body
                took.append(json.loads(body)["took_ms"])
                if i == 0:
                    time.sleep(0.5)
                    rss_first = rss_kib(proc.pid)
            time.sleep(1)
            rss_last = rss_kib(proc.pid)
            return {
                "accounts": accounts,
                "start_s": start_s,
                "idle_mib": idle / 1024,
                "per_account_b": idle * 1024 / accounts,
                "reload_median_ms": statistics.median(took) if took else 0,
                "reload_max_ms": max(took) if took else 0,
                "reload_wall_median_ms": statistics.median(wall) * 1000 if wall else 0,
                "rss_first_mib": (rss_first or 0) / 1024,
                "rss_last_mib": rss_last / 1024,
            }
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", default="10,10000,100000")
    p.add_argument("--reloads", type=int, default=20)
    p.add_argument("--bin", default="target/release/whatsapp-relay")
    a = p.parse_args()
    if not os.path.exists(a.bin):
        raise SystemExit(f"{a.bin} not found: run `cargo build --release` first")
    rows = [measure(a.bin, int(n), a.reloads) for n in a.accounts.split(",")]
    print("| accounts | start to ready | idle RSS | bytes/account (idle RSS / accounts) | reload median (max) | RSS after 1st reload | after last |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['accounts']:,} | {r['start_s']:.2f} s | {r['idle_mib']:.1f} MiB | {r['per_account_b']:,.0f} | "
            f"{r['reload_median_ms']:.0f} ms ({r['reload_max_ms']:.0f}) | {r['rss_first_mib']:.1f} MiB | {r['rss_last_mib']:.1f} MiB |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
