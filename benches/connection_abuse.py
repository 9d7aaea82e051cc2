#!/usr/bin/env python3
"""Hostile connections against a relay binary, with the numbers an operator cares about.

    python3 benches/connection_abuse.py target/release/whatsapp-relay        # all but h2c
    python3 benches/connection_abuse.py target/release/whatsapp-relay h2     # 2,000 silent h2c

Starts the binary (under `prlimit`, soft open-files limit 1,024 and hard 20,000, as a service
manager often gives) on loopback with one Meta account, then: a webhook with and without
Meta's `sha256=` prefix; HTTP/1.1 requests without and with two `Host` headers; 1,100 idle
connections (from 127.0.0.2-6) and how long `/readyz` and a signed webhook take meanwhile and
12 s later, how many of the idle connections the relay closed and how many `accept failed`
lines it logged; with `h2`, the RSS before and after 2,000 connections that send the HTTP/2
preface and SETTINGS and then nothing, and how many are still open 14 s later. Bounded: about
40 s per run; every socket is closed and the relay stopped at the end.
"""
import asyncio, hmac, hashlib, json, os, re, socket, subprocess, sys, tempfile, time, urllib.request
BIN = sys.argv[1]
SECRET = "meta-app-secret"
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
http_port, admin_port = free_port(), free_port()
d = tempfile.mkdtemp()
cfg = f"""
[server]
http = "127.0.0.1:{http_port}"
[admin]
listen = "127.0.0.1:{admin_port}"
[storage]
path = "{d}/data"
[delivery]
mode = "queue"
[[motion]]
name = "acme"
url = "http://127.0.0.1:9"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"
"""
open(f"{d}/relay.toml", "w").write(cfg)
log = open(f"{d}/log", "w")
LIMIT = "--nofile=20000:20000" if len(sys.argv) > 2 else "--nofile=1024:20000"
p = subprocess.Popen(["prlimit", LIMIT, BIN, "--config", f"{d}/relay.toml"], stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "info"})
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", admin_port)).close(); break
    except OSError: time.sleep(0.1)
def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{p.pid}/status").read()).group(1)) / 1024
def timed(fn):
    t = time.time()
    try: r = fn()
    except Exception as e: r = f"error {type(e).__name__}"
    return r, round(time.time() - t, 2)
def readyz():
    return urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=10).status
def webhook(i, prefix=True):
    body = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1"}, "messages": [{"from": "16505550000", "id": f"wamid.{i}", "type": "text", "text": {"body": "x"}}]}}]}]}).encode()
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/acme/api/whatsapp/accounts/13/webhook", data=body, headers={"content-type": "application/json", "x-hub-signature-256": ("sha256=" if prefix else "") + sig})
    try: return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e: return e.code
def raw(data):
    s = socket.create_connection(("127.0.0.1", http_port)); s.sendall(data); s.settimeout(3)
    out = b""
    try:
        while True:
            c = s.recv(4096)
            if not c: break
            out += c
    except socket.timeout: pass
    return out.split(b"\r\n")[0].decode()
print("binary:", BIN)
ONLY_H2 = len(sys.argv) > 2
if not ONLY_H2:
  print("webhook, sha256= prefix:", webhook(0), "| without prefix:", webhook(1, prefix=False))
  print("HTTP/1.1 without Host:", raw(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"), "| two Hosts:", raw(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"))
  # 1,100 idle connections, with the process's soft limit at 1,024.
  conns = []
  for i in range(1100):
      s = socket.socket(); s.bind((f"127.0.0.{2 + i % 5}", 0)); s.connect(("127.0.0.1", http_port)); conns.append(s)
  time.sleep(0.5)
  print("1,100 idle connections open: /readyz", timed(readyz), "webhook", timed(lambda: webhook(2)))
  time.sleep(12)
  print("12 s later: /readyz", timed(readyz), "webhook", timed(lambda: webhook(3)))
  closed = 0
  for s in conns:
      s.setblocking(False)
      try:
          if s.recv(1) == b"": closed += 1
      except BlockingIOError: pass
      except OSError: closed += 1
  print(f"  idle connections closed by the relay after 12 s: {closed} of 1100")
  for s in conns: s.close()
  time.sleep(1)
  log.flush()
  print("  'accept failed' lines in the log:", open(f"{d}/log").read().count("accept failed"))
# 2,000 h2c connections: preface + SETTINGS, then nothing.
base = rss()
h2 = []
for i in range(2000):
    s = socket.socket(); s.connect(("127.0.0.1", http_port)); s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0,0,0,4,0,0,0,0,0])); h2.append(s)
time.sleep(2)
print(f"2,000 silent h2c connections: RSS {base:.0f} -> {rss():.0f} MiB after 2 s", end="")
time.sleep(12)
open_ = 0
for s in h2:
    s.setblocking(False)
    try:
        while True:
            c = s.recv(65536)
            if c == b"": break
    except BlockingIOError: open_ += 1
    except OSError: pass
print(f", {rss():.0f} MiB after 14 s; still open: {open_} of 2000")
for s in h2: s.close()
p.terminate(); p.wait()
