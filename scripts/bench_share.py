#!/usr/bin/env python3
"""Shared-documents benchmark (`scripts/bench share`, or a section of `scripts/bench`): how
fast the controller stores documents on its disk and how fast a share reaches the cloud,
each beside a host baseline in the same run. Needs root, /dev/kvm, ip and nft.

The scene is `./scripts/demo --share`'s (scripts/demo_share.py): the device with its relay,
the controller with a 64 MiB disk, the mediator and the cloud in the WAN namespace.

1. Documents stored per second: BENCH_SHARE_DOCS (default 40) documents of 64 KiB put one
   after the other with `duplex box put` (each acknowledged once durable on the controller's
   disk), documents/s and MB/s. Baseline: the same bytes written to files on the host, each
   file written then fsync'd (`os.fsync`), one after the other.
2. Sync throughput: the box shared with the cloud, then one `duplex-cloud sync` carrying
   every document (snapshot and document data through the relay's tunnel), documents/s and
   MB/s over the sync's own time. Baseline: a plain HTTP upload of the same documents, one
   POST each on one connection, from the LAN host namespace to a Python server in the WAN
   namespace (the same routed, firewalled path the tunnel takes, without TLS or relay).

    sudo python3 scripts/bench_share.py --json share.json
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_common import figure  # noqa: E402
import demo_relay  # noqa: E402
from demo_share import ShareScene  # noqa: E402

DOCS = int(os.environ.get("BENCH_SHARE_DOCS", "40"))
DOC_BYTES = 64 * 1024
UPLOAD_PORT = 9099

SERVER = f"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers["Content-Length"]); self.rfile.read(n)
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("10.77.0.3", {UPLOAD_PORT}), H).serve_forever()
"""

CLIENT = f"""
import http.client, sys, time
n, size = int(sys.argv[1]), int(sys.argv[2])
body = bytes(i % 251 for i in range(size))
c = http.client.HTTPConnection("10.77.0.3", {UPLOAD_PORT}, timeout=30)
t = time.monotonic()
for i in range(n):
    c.request("POST", f"/doc/{{i}}", body=body); c.getresponse().read()
print((time.monotonic() - t) * 1000)
"""


def say(msg):
    print(f"  {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser(description="shared-documents benchmark (scripts/bench share)")
    ap.add_argument("--json")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--work")
    args = ap.parse_args()
    own = args.work is None
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="duplex-bench-share."))
    os.makedirs(work, exist_ok=True)

    def on_signal(signum, _frame):
        raise demo_relay.Interrupted(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    b = ShareScene(work, os.path.abspath(args.bin))
    b.prefix = f"bs{os.getpid() % 100000:05d}"
    figures, status, server = [], 0, None
    try:
        b.network()
        b.servers()
        b.device()
        b.step = "documents"
        b.box("admin", "account", "add", "alice", "--name", "Alice", "--email", "alice@example.com", "--verified")
        b.box("alice", "create", "inbox", "--name", "Inbox")
        files = []
        for i in range(DOCS):
            path = os.path.join(work, f"doc{i}.bin")
            with open(path, "wb") as f:
                f.write(bytes((i * 7 + j) % 251 for j in range(DOC_BYTES)))
            files.append(path)
        t = time.monotonic()
        for path in files:
            b.box("alice", "put", "inbox", path)
        put_s = time.monotonic() - t
        # Baseline: the same bytes, a file each, written and fsync'd on the host.
        t = time.monotonic()
        for i, path in enumerate(files):
            with open(path, "rb") as f:
                data = f.read()
            with open(os.path.join(work, f"copy{i}.bin"), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_s = time.monotonic() - t
        mb = DOCS * DOC_BYTES / 1e6
        say(f"stored {DOCS} documents of 64 KiB with duplex box put in {put_s * 1000:.0f} ms: "
            f"{DOCS / put_s:.1f} documents/s, {mb / put_s:.2f} MB/s; host files with fsync "
            f"{fsync_s * 1000:.0f} ms ({DOCS / fsync_s:.0f} documents/s)")

        b.step = "sync"
        b.box("alice", "share", "inbox", "--with", "cloud")
        out = b.sync("  sync of the whole share:")
        sync_ms = out["ms"]
        # Baseline: a plain HTTP upload of the same bytes on the same namespace path.
        server = subprocess.Popen(["ip", "netns", "exec", b.ns("wan"), sys.executable, "-c", SERVER])
        time.sleep(0.5)
        r = subprocess.run(["ip", "netns", "exec", b.ns("host"), sys.executable, "-c", CLIENT, str(DOCS),
                            str(DOC_BYTES)], capture_output=True, text=True, timeout=120)
        try:
            upload_ms = float(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            b.fail(f"the upload baseline printed no time: {r.stdout} {r.stderr[-300:]}")
        say(f"sync of {DOCS} documents ({mb:.1f} MB): {sync_ms} ms = {DOCS / (sync_ms / 1000):.1f} documents/s, "
            f"{mb / (sync_ms / 1000):.2f} MB/s; plain HTTP upload {upload_ms:.0f} ms "
            f"({mb / (upload_ms / 1000):.2f} MB/s) = {sync_ms / upload_ms:.2f} x its time")
        figures = [
            figure("share.store_docs_per_s", "documents of 64 KiB stored per second (duplex box put, durable)",
                   DOCS / put_s, "documents/s", f"{DOCS} in a row",
                   {"label": "host: the same bytes, a file each, written then fsync'd", "unit": "documents/s",
                    "value": round(DOCS / fsync_s, 3)}, (DOCS / put_s) / (DOCS / fsync_s)),
            figure("share.store_mb_per_s", "bytes stored per second", mb / put_s, "MB/s", f"{DOCS} documents"),
            figure("share.sync_docs_per_s", "documents per second in one sync to the cloud (through the tunnel)",
                   DOCS / (sync_ms / 1000), "documents/s", "one sync of the whole share",
                   {"label": "plain HTTP upload of the same documents, same namespace path", "unit": "documents/s",
                    "value": round(DOCS / (upload_ms / 1000), 3)}, upload_ms / sync_ms),
            figure("share.sync_mb_per_s", "sync throughput to the cloud", mb / (sync_ms / 1000), "MB/s",
                   "one sync of the whole share",
                   {"label": "plain HTTP upload", "unit": "MB/s", "value": round(mb / (upload_ms / 1000), 3)},
                   upload_ms / sync_ms),
        ]
    except demo_relay.Failed as e:
        say(f"FAILED at {e.step}: {e.error}")
        for name in ("controller", "relay", "cloud", "mediator"):
            for ln in b.tail(name):
                say(f"  {name}: {ln}")
        status = 1
    finally:
        if server is not None:
            server.kill()
            server.wait()
        b.stop()
        if own and not os.environ.get("DUPLEX_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    if args.json and status == 0:
        with open(args.json, "w") as f:
            json.dump({"bench": "share", "script": "scripts/bench_share.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "documents": DOCS, "document_bytes": DOC_BYTES, "figures": figures}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
