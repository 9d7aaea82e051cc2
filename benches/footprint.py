#!/usr/bin/env python3
"""Memory, start and reload time of the relay against the number of configured accounts.

    benches/footprint.py [--accounts 10,10000,100000] [--reloads 20] [--load-rate 200] [--unit-env]
                         [--bin target/release/whatsapp-relay]

Run from the repository root after `cargo build --release`. For each size it writes a config of
Meta accounts with their own app secrets (inline) and phone number ids, one Motion per 1,000
accounts (queue mode, Motions on an address nothing listens on; the first account of each Motion
also has a verify_token), then, with RUST_LOG=warn:
  - start: from spawning the relay to its first 200 on /readyz;
  - idle RSS: VmRSS two seconds after ready;
  - reload: `POST /admin/reload` RELOADS times, one after the other; the median and worst of the
    relay's own `took_ms`, and the wall time of each call;
  - RSS after the first reload and after the last (the relay must give back what a reload
    replaced);
  - under load: while the reloads run, two keep-alive clients on the public listener send
    LOAD_RATE requests a second in all (0: none), each routed through the table and checked:
    Meta's verification handshake (GET, the challenge must come back), a signed webhook
    (POST, one in ten, must be stored: 200) and /healthz. A request that fails, answers
    anything else or takes over 5 s counts as failed; the worst latency is reported.
--unit-env sets what the systemd unit sets (MIMALLOC_ARENA_EAGER_COMMIT=0
MIMALLOC_PURGE_DELAY=50), as production runs; PURGE_DELAY=N in the environment replaces the 50
(milliseconds), to compare.
Prints a markdown table. Everything runs on 127.0.0.1 and is stopped at the end (or on error).
"""

import argparse
import hashlib
import hmac
import http.client as httpclient
import json
import random
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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
            if n == m * per_motion:
                out.append(f'  verify_token = "vt-{m}"')
    return "\n".join(out) + "\n"


class Load:
    """Checked requests on the public listener at `rate` a second, from two keep-alive clients,
    until stopped: every answer is compared with what the routing table must give."""

    def __init__(self, http_port, accounts, rate):
        self.port, self.accounts, self.rate = http_port, accounts, rate
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.sent, self.failed, self.worst, self.failures = 0, 0, 0.0, []
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(2)]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=30)

    def request(self, n):
        """(method, path, headers, body, expected status, expected body or None)."""
        motions = (self.accounts + 999) // 1000
        m = random.randrange(motions)
        if n % 10 == 0:
            a = random.randrange(m * 1000, min(self.accounts, (m + 1) * 1000))
            phone = f"1{a:014d}"
            body = json.dumps({
                "object": "whatsapp_business_account",
                "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550000000", "phone_number_id": phone},
                    "messages": [{"from": "15550001111", "id": f"wamid.load.{n}.{random.random()}",
                                  "timestamp": "1749416383", "type": "text", "text": {"body": "load"}}],
                }}]}],
            }).encode()
            sig = hmac.new(f"app-secret-{a:08d}".encode(), body, hashlib.sha256).hexdigest()
            headers = {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={sig}"}
            return "POST", f"/m{m}/api/whatsapp/accounts/{a}", headers, body, 200, None
        if n % 10 == 5:
            return "GET", "/healthz", {}, None, 200, None
        challenge = str(random.randrange(10**9))
        path = f"/m{m}/api/whatsapp/accounts/{m * 1000}?hub.mode=subscribe&hub.verify_token=vt-{m}&hub.challenge={challenge}"
        return "GET", path, {}, None, 200, challenge.encode()

    def client(self, i):
        interval = 2.0 / self.rate
        conn = None
        n = i
        next_at = time.monotonic()
        while not self.stop_flag.is_set():
            method, path, headers, body, status, want = self.request(n)
            n += 2
            t0 = time.monotonic()
            problem = None
            try:
                if conn is None:
                    conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                got = r.read()
                if r.status != status or (want is not None and got != want):
                    problem = f"{method} {path.split('?')[0]}: {r.status} {got[:100]!r}"
            except Exception as e:  # a dropped connection or a timeout is a failure too
                problem = f"{method} {path.split('?')[0]}: {type(e).__name__}: {e}"
                conn = None
            took = time.monotonic() - t0
            with self.lock:
                self.sent += 1
                self.worst = max(self.worst, took)
                if problem:
                    self.failed += 1
                    if len(self.failures) < 5:
                        self.failures.append(problem)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()


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


def measure(binary, accounts, reloads, load_rate, unit_env):
    tmp = tempfile.mkdtemp(prefix="footprint-")
    try:
        http_port, admin_port, dead_port = free_port(), free_port(), free_port()
        cfg = os.path.join(tmp, "relay.toml")
        with open(cfg, "w") as f:
            f.write(config_text(accounts, http_port, admin_port, os.path.join(tmp, "data"), dead_port))
        env = dict(os.environ, RUST_LOG="warn")
        if unit_env:
            env.update(MIMALLOC_ARENA_EAGER_COMMIT="0", MIMALLOC_PURGE_DELAY=os.environ.get("PURGE_DELAY", "50"))
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
            load = Load(http_port, accounts, load_rate) if load_rate > 0 and reloads > 0 else None
            if load:
                load.start()
                time.sleep(0.5)
            for i in range(reloads):
                t0 = time.monotonic()
                status, body = http("POST", f"http://127.0.0.1:{admin_port}/admin/reload", timeout=120)
                wall.append(time.monotonic() - t0)
                assert status == 200, body
                took.append(json.loads(body)["took_ms"])
                if i == 0:
                    time.sleep(0.5)
                    rss_first = rss_kib(proc.pid)
            if load:
                time.sleep(0.5)
                load.stop()
                for f in load.failures:
                    print(f"failed under load ({accounts} accounts): {f}", file=sys.stderr)
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
                "load": (load.sent, load.failed, load.worst * 1000) if load else None,
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
    p.add_argument("--load-rate", type=int, default=200, help="requests a second during the reloads (0: none)")
    p.add_argument("--unit-env", action="store_true", help="the systemd unit's allocator settings")
    p.add_argument("--bin", default="target/release/whatsapp-relay")
    a = p.parse_args()
    if not os.path.exists(a.bin):
        raise SystemExit(f"{a.bin} not found: run `cargo build --release` first")
    rows = [measure(a.bin, int(n), a.reloads, a.load_rate, a.unit_env) for n in a.accounts.split(",")]
    print(
        "| accounts | start to ready | idle RSS | bytes/account (idle RSS / accounts) | reload median (max) "
        "| RSS after 1st reload | after last | requests during reloads: failed / sent (worst latency) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        load = "–" if r["load"] is None else f"{r['load'][1]} / {r['load'][0]:,} ({r['load'][2]:.0f} ms)"
        print(
            f"| {r['accounts']:,} | {r['start_s']:.2f} s | {r['idle_mib']:.1f} MiB | {r['per_account_b']:,.0f} | "
            f"{r['reload_median_ms']:.0f} ms ({r['reload_max_ms']:.0f}) | {r['rss_first_mib']:.1f} MiB | {r['rss_last_mib']:.1f} MiB "
            f"| {load} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
