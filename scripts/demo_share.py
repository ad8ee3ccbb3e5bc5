#!/usr/bin/env python3
"""The shared-documents scene `./scripts/demo --share` plays (Python 3, standard library).

1. the relay's network and the servers, as `--relay` (scripts/demo_relay.py); the cloud
   has three users (examples/relay/cloud.json plus `users`): Alice and Bob with verified
   emails, Carol with an unverified one;
2. the device of examples/device-with-relay.json, its controller given a 64 MiB disk;
3. on the device (`duplex box`): accounts alice, bob and carol (verified emails); alice
   creates the box `inbox` and scans 3 pages into it (the engine halftones them); she grants
   bob `read` on the scan and shares the box with the cloud;
4. `duplex-cloud sync`: the cloud opens a share tunnel through the relay; the controller
   fetches the cloud's users, pairs alice and bob (same verified email), puts carol in the
   conflict list (her cloud email is unverified), and sends the share;
5. Bob's cloud user reads the scan (byte-exact with the device's copy);
6. alice revokes bob's right; after the next sync Bob's cloud user is refused.

The last line of stdout is one JSON object, `{"demo":"share","paired":2,"conflicts":1,
"revoked_effective":true,...}` (`conflicts`: device accounts in the conflict list) or `{"demo":"failed","step":...,"error":...}` (exit status 1).

    python3 scripts/demo_share.py --work DIR [--bin target/release]
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from demo_relay import Scene, run_scene  # noqa: E402
from demo_scene import write_device_config  # noqa: E402

CLOUD_API = "http://127.0.0.1:9080"
USERS = [
    {"id": "c-alice", "displayName": "Alice", "token": "alice-demo-token",
     "emails": [{"value": "Alice@Example.com", "verified": True}]},
    {"id": "c-bob", "displayName": "Bob", "token": "bob-demo-token",
     "emails": [{"value": "bob@example.com", "verified": True}]},
    {"id": "c-carol", "displayName": "Carol", "token": "carol-demo-token",
     "emails": [{"value": "carol@example.com", "verified": False}]},
]


class ShareScene(Scene):
    def servers(self):
        super().servers()
        # The cloud's users: restart it with them (the demo's copy of its config).
        path = os.path.join(self.work, "cloud.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["users"] = USERS
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        p = self.procs.pop("cloud")
        p.terminate()
        p.wait(timeout=10)
        # spawn() starts the log afresh.
        self.spawn("cloud", "wan", [self.exe("duplex-cloud"), "serve", "--config", path])
        t_end = time.monotonic() + 30
        while self.count("cloud", "listening tunnels=") < 1:
            if time.monotonic() > t_end:
                self.fail(f"the cloud did not start again; last lines: {self.tail('cloud')}")
            time.sleep(0.05)
        self.say(f"   cloud users: {', '.join(u['displayName'] + ' <' + u['emails'][0]['value'] + '>' + ('' if u['emails'][0]['verified'] else ' (unverified)') for u in USERS)}")

    def device(self):
        self.step = "device"
        path, cfg = write_device_config(self.work, "device-with-relay.json")
        for p in cfg["partitions"]:
            if p["role"] == "controller":
                p["disk"] = {"file": "controller.disk", "size_mib": 64}
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        self.spawn("monitor", "lan", [self.exe("duplex"), "run", "--config", path, "--api-sock", self.api])
        self.wait_log("controller", "store ready", 120)
        self.wait_log("controller", "controller READY", 180)
        self.wait_log("relay", "session up", 120)
        self.say(f"3. device {cfg.get('device')}: engine ready, controller (64 MiB disk: "
                 f"\"{self.log_line('controller', 'store ready')}\"), relay logged in")

    def box(self, who, *args):
        r = subprocess.run([self.exe("duplex"), "box", "--vsock", os.path.join(self.work, "controller.vsock"),
                            "--as", who, *args], capture_output=True, timeout=120)
        if r.returncode != 0:
            self.fail(f"duplex box {' '.join(args)} as {who}: {r.stderr.decode(errors='replace').strip()}")
        if args and args[0] == "get" and "--out" not in args:
            return r.stdout
        return json.loads(r.stdout)

    def http(self, path, token):
        code = ("import urllib.request,urllib.error,sys\n"
                f"r=urllib.request.Request('{CLOUD_API}{path}',headers={{'Authorization':'Bearer {token}'}})\n"
                "try:\n b=urllib.request.urlopen(r,timeout=10).read();sys.stdout.write('200 ');"
                "sys.stdout.flush();sys.stdout.buffer.write(b)\n"
                "except urllib.error.HTTPError as e:\n sys.stdout.write(f'{e.code} ')")
        r = subprocess.run(["ip", "netns", "exec", self.ns("wan"), "python3", "-c", code], capture_output=True,
                           timeout=20)
        status, _, body = r.stdout.partition(b" ")
        try:
            return int(status), body
        except ValueError:
            self.fail(f"GET {path}: {r.stdout[:200]!r} {r.stderr.decode(errors='replace')[-300:]}")

    def sync(self, label):
        out, _ = self.run_json([self.exe("duplex-cloud"), "sync", "--device", "mfp-1", "--server", CLOUD_API,
                                "--timeout-s", "60"], 90, side="wan")
        if out.get("state") != "done":
            self.fail(f"the sync did not finish: {out}")
        self.result.setdefault("sync_ms", []).append(out.get("ms"))
        self.say(f"{label} duplex-cloud sync: tunnel {out.get('tunnel_id')}, {out.get('users_sent')} users sent, "
                 f"{out.get('syncs')} sync messages, shares {json.dumps(out.get('shares'))}, {out.get('ms')} ms")
        return out

    def documents(self):
        self.step = "documents"
        for who in ("alice", "bob", "carol"):
            self.box("admin", "account", "add", who, "--name", who.title(), "--email", f"{who}@example.com",
                     "--verified")
        self.box("alice", "create", "inbox", "--name", "Inbox")
        scan = self.box("alice", "scan", "inbox", "--pages", "3", "--name", "scan-1")
        self.doc = scan["stored"]["id"]
        self.scan_bytes = self.box("alice", "get", self.doc)
        self.box("alice", "grant", f"doc:{self.doc}", "read", "bob")
        self.box("alice", "share", "inbox", "--with", "cloud")
        self.say(f"4. accounts alice, bob, carol; alice scanned 3 pages into box inbox: document {self.doc} "
                 f"({len(self.scan_bytes)} bytes, PBM pages halftoned by the engine); bob may read it; "
                 f"inbox shared with the cloud")

    def pair_and_share(self):
        self.step = "sync"
        self.sync("5.")
        conflicts = self.box("admin", "conflicts")["conflicts"]
        paired = [u["id"] for u in USERS if self.http("/v1/shared/documents", u["token"])[0] == 200
                  and json.loads(self.http("/v1/shared/documents", u["token"])[1] or b"{}").get("documents")]
        self.result["paired"] = len(paired)
        # The conflict list has both sides of a case (carol's account finds no verified
        # match; Carol's cloud email is unverified): the summary counts device accounts.
        self.result["conflicts"] = len([c for c in conflicts if c.get("kind") == "account"])
        self.result["conflict_accounts"] = [c["id"] for c in conflicts if c.get("kind") == "account"]
        self.say(f"   paired with the cloud: {', '.join(paired)}; conflicts: "
                 f"{json.dumps(conflicts)}")
        status, body = self.http(f"/v1/shared/documents/{self.doc}", "bob-demo-token")
        if status != 200 or body != self.scan_bytes:
            self.fail(f"Bob's cloud user could not read the scan: {status}, {len(body)} bytes")
        self.result["bob_read_bytes"] = len(body)
        self.say(f"6. Bob's cloud user reads {self.doc}: {len(body)} bytes, the same as on the device")

    def revoke(self):
        self.step = "revoke"
        self.box("alice", "revoke", f"doc:{self.doc}", "read", "bob")
        self.sync("7. alice revoked bob's read;")
        status, _ = self.http(f"/v1/shared/documents/{self.doc}", "bob-demo-token")
        if status != 403:
            self.fail(f"after the revocation Bob's cloud user got {status}, not 403")
        alice, _ = self.http(f"/v1/shared/documents/{self.doc}", "alice-demo-token")
        self.result["revoked_effective"] = True
        self.say(f"   Bob's cloud user is refused ({status}); Alice's still reads it ({alice})")


def play(scene):
    scene.network()
    scene.servers()
    scene.device()
    scene.documents()
    scene.pair_and_share()
    scene.revoke()
    scene.step = "shutdown"
    scene.stop()
    scene.say("8. monitor and servers stopped, network removed")
    r = scene.result
    return {"demo": "share", "paired": r["paired"], "conflicts": r["conflicts"],
            "conflict_accounts": r["conflict_accounts"], "document": scene.doc,
            "scan_pages": 3, "bob_read_bytes": r["bob_read_bytes"], "sync_ms": r["sync_ms"],
            "revoked_effective": r["revoked_effective"]}


def main():
    return run_scene(__doc__, ShareScene, play, ("monitor", "controller", "relay", "mediator", "cloud"),
                     "duplex-demo-share.")


if __name__ == "__main__":
    sys.exit(main())
