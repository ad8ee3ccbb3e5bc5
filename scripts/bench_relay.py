#!/usr/bin/env python3
"""Relay benchmark (`scripts/bench relay`, or a section of the full `scripts/bench`): the
relay guest against baselines measured in the same run, on the network of
scripts/relay-net (docs/relay-network.md). Needs root, /dev/kvm, ip and nft.

The scene is the relay demo's (scripts/demo_relay.py): the device of
examples/device-with-relay.json (engine, controller, relay with `profile=1`) under a
monitor in the LAN namespace, its card on a TAP behind the site's firewall;
`duplex-mediator` (10.77.0.2) and `duplex-cloud` (10.77.0.3), release builds, in the WAN
namespace. Beside it, in the plain LAN host namespace (10.77.1.2, the same router and
firewall), a host relay: `duplex-relay-sim` (relay `relay-sim`, device `sim-1`).

1. Request-to-tunnel-up latency: BENCH_RELAY_JOBS (default 12) jobs of 1 page and no
   document to the relay guest, each on a new tunnel, `timings_ms.tunnel_up` of
   `duplex-cloud submit` (from the cloud's request to the mediator to the relay's tunnel
   open at the cloud: HTTP request, TunnelRequest on the control session, the relay's TCP
   + TLS 1.3 dial with pin check, Dial/DialOk); median and p90. Baseline: the same jobs,
   interleaved, to the host relay (the same flow, rustls on the host).
2. Tunnel throughput: a job carrying a BENCH_RELAY_DOC_MIB MiB document (default 32)
   cloud -> relay through TLS over TAP/virtio-net, bytes / `timings_ms.job`, median of
   BENCH_RUNS (default 3). Baseline (the goal's, >= 0.5): a plain host TCP proxy on the
   same namespace path -- a Python forwarder in the LAN host namespace dials out through
   the firewall to a sender in the WAN (10.77.0.3) and forwards the same number of bytes
   to a sink on its loopback; bytes / (connect to the sink's last byte). Second baseline:
   the same job to the host relay (the whole protocol, TLS with AES-NI on the host).
   For each relay job: the card's frames, the relay partition's VM exits, the relay
   vCPU thread's CPU (guest and monitor), and the firmware's own profile (`relay: profile`
   lines, guests/relay/src/profile.rs): where the guest's time goes.
3. Mediator memory and CPU per session: a release `duplex-mediator` on loopback with
   BENCH_MEDIATOR_SESSIONS (default 10000) relays in its registry, 1 s heartbeats; RSS
   idle (the baseline) and with every session logged in by `duplex-relay-sim --sessions
   N`, CPU % of a core over 5 s of steady state.

`--json FILE` writes every figure for scripts/bench_report.py; `--only latency,throughput,
mediator` runs some parts; `--compare NAME=TREE` also measures the monitor and relay image
built in source tree TREE (part 1 after this tree's, part 2 interleaved run by run; the
device is restarted for each): before/after comparisons in one run (docs/bench/README.md). Helper
modes (run inside a namespace by the bench itself): `--tcp-sender ADDR:PORT BYTES`,
`--tcp-proxy ADDR:PORT`.

    sudo python3 scripts/bench_relay.py --json relay.json [--only throughput] [--compare base=/tmp/base]
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import figure, percentile  # noqa: E402
import demo_relay  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
JOBS = int(os.environ.get("BENCH_RELAY_JOBS", "12"))
DOC_MIB = int(os.environ.get("BENCH_RELAY_DOC_MIB", "32"))
SESSIONS = int(os.environ.get("BENCH_MEDIATOR_SESSIONS", "10000"))
TCK = os.sysconf("SC_CLK_TCK")
SIM_RELAY, SIM_DEVICE = "relay-sim", "sim-1"
DEVICE = "mfp-1"
SIM_SECRET = "5e" * 32
BASELINE_PORT = 9500
MIB = 1 << 20


def say(msg):
    print(f"bench relay: {msg}", flush=True)


# --- the plain TCP proxy baseline (helper modes) -----------------------------------------
def tcp_sender(addr, nbytes):
    """Listens at addr, sends nbytes to the first connection, closes. Prints 'ready'."""
    host, port = addr.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(1)
    ls.settimeout(60)
    print("ready", flush=True)
    c, _ = ls.accept()
    chunk = os.urandom(MIB)
    left = nbytes
    while left > 0:
        n = min(left, len(chunk))
        c.sendall(memoryview(chunk)[:n])
        left -= n
    c.shutdown(socket.SHUT_WR)
    c.settimeout(30)
    c.recv(1)  # the proxy's close
    c.close()


def tcp_proxy(addr):
    """Dials addr (through the firewall, as the relay does), forwards what comes to a sink
    on loopback; prints {"bytes", "seconds"}: connect to the sink's last byte."""
    host, port = addr.rsplit(":", 1)
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    done = {}

    def drain():
        c, _ = sink.accept()
        buf = bytearray(MIB)
        n = 0
        while True:
            got = c.recv_into(buf)
            if not got:
                break
            n += got
        done["bytes"], done["t"] = n, time.perf_counter()
        c.close()
    th = threading.Thread(target=drain)
    th.start()
    out = socket.create_connection(sink.getsockname())
    t0 = time.perf_counter()
    up = socket.create_connection((host, int(port)), timeout=30)
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    while True:
        got = up.recv_into(buf)
        if not got:
            break
        out.sendall(view[:got])
    out.shutdown(socket.SHUT_WR)
    th.join(60)
    up.close()
    out.close()
    print(json.dumps({"bytes": done.get("bytes", 0), "seconds": done.get("t", t0) - t0}), flush=True)


# --- the scene ---------------------------------------------------------------------------
def thread_cpu(pid):
    """{tid:comm: (user, system, guest) seconds} for every thread of pid."""
    out = {}
    for t in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(t + "/stat") as f:
                st = f.read()
        except OSError:
            continue
        comm = st[st.index("(") + 1:st.rindex(")")]
        fl = st[st.rindex(")") + 2:].split()
        out[f"{t.rsplit('/', 1)[1]}:{comm}"] = (int(fl[11]) / TCK, int(fl[12]) / TCK, int(fl[40]) / TCK)
    return out


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fl = st[st.rindex(")") + 2:].split()
    return (int(fl[11]) + int(fl[12])) / TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def parse_profile(line):
    """The numbers of a `relay: profile conn=N k=v ...` line (guests/relay/src/profile.rs)."""
    return {k: int(v) for k, v in (w.split("=", 1) for w in line.split("profile ", 1)[1].split())}


class Bench(demo_relay.Scene):
    """The relay demo's scene, with release servers, a host relay beside the guest, and
    the relay's profile lines on."""

    def __init__(self, work, bin_dir):
        super().__init__(work, bin_dir)
        self.prefix = f"br{os.getpid() % 100000:05d}"
        with open(os.path.join(ROOT, "examples/device-with-relay.json")) as f:
            relay = next(p for p in json.load(f)["partitions"] if p["role"] == "relay")
        args = dict(w.split("=", 1) for w in relay["cmdline"].split() if "=" in w)
        self.mediator_pin, self.cloud_pin = args["mediator_pin"], args["cloud_pin"]

    def servers(self):
        self.step = "servers"
        for name in ("cloud.json", "keys"):
            src, dst = os.path.join(ROOT, "examples/relay", name), os.path.join(self.work, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
        with open(os.path.join(ROOT, "examples/relay/mediator.json")) as f:
            cfg = json.load(f)
        cfg["relays"].append({"id": SIM_RELAY, "secret": SIM_SECRET, "devices": [SIM_DEVICE]})
        cfg["heartbeat_ms"], cfg["heartbeat_timeout_ms"] = 30000, 45000
        with open(os.path.join(self.work, "mediator.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        self.spawn("mediator", "wan", [self.exe("duplex-mediator"), "serve", "--config",
                                       os.path.join(self.work, "mediator.json")])
        self.wait_log("mediator", "listening relays=", 30)
        self.spawn("cloud", "wan", [self.exe("duplex-cloud"), "serve", "--config",
                                    os.path.join(self.work, "cloud.json")])
        self.wait_log("cloud", "listening tunnels=", 30)
        self.spawn("sim", "host", [self.exe("duplex-relay-sim"), "--mediator", "10.77.0.2:7443",
                                   "--mediator-pin", self.mediator_pin, "--cloud-pin", self.cloud_pin,
                                   "--relay-id", SIM_RELAY, "--secret", SIM_SECRET, "--device", SIM_DEVICE])
        self.wait_log("mediator", f"relay {SIM_RELAY} logged in", 30)
        say("servers up (release builds); host relay relay-sim logged in from 10.77.1.2")

    def device(self, variant):
        """Boots the device of `variant` (name, folder of `duplex`, folder of the guest
        images); its consoles are NAME-*.log."""
        self.step = f"device {variant[0]}"
        name, bin_dir, guests = variant
        with open(os.path.join(ROOT, "examples/device-with-relay.json")) as f:
            cfg = json.load(f)
        for p in cfg["partitions"]:
            p["kernel"] = os.path.join(guests, os.path.basename(p["kernel"]))
            p["console"] = {"file": f"{name}-{p['name']}.log"}
            if "uds" in p.get("vsock", {}):
                p["vsock"]["uds"] = f"{name}-controller.vsock"
            if p["role"] == "relay":
                p["cmdline"] += " profile=1"
        path = os.path.join(self.work, f"{name}-device.json")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        self.api = os.path.join(self.work, f"{name}-api.sock")
        self.relay_log = f"{name}-relay"
        logins = self.count(self.relay_log, "session up")
        self.spawn("monitor", "lan", [os.path.join(bin_dir, "duplex"), "run", "--config", path,
                                      "--api-sock", self.api])
        t_end = time.monotonic() + 120
        while self.count(self.relay_log, "session up") <= logins:
            if time.monotonic() > t_end:
                self.fail(f"the relay did not log in; last lines: {self.tail(self.relay_log)}")
            self.check_alive("monitor")
            time.sleep(0.05)
        self.variant = name

    def stop_device(self):
        p = self.procs.pop("monitor", None)
        if p is None:
            return
        try:
            subprocess.run([self.exe("duplex"), "ctl", "--api-sock", self.api, "shutdown"], capture_output=True,
                           timeout=20)
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        self.variant = None

    def use(self, variant):
        """The device of `variant` running (the other one stopped)."""
        if getattr(self, "variant", None) != variant[0]:
            self.stop_device()
            self.device(variant)

    def submit(self, device, doc_bytes, seed):
        out, _ = self.run_json([self.exe("duplex-cloud"), "submit", "--device", device, "--pages", "1",
                                "--seed", str(seed), "--width", "64", "--height", "64",
                                "--document-bytes", str(doc_bytes), "--timeout-s", "300"], 400, side="wan")
        if out.get("state") != "done" or not out.get("checksums_ok"):
            self.fail(f"job to {device} did not finish well: {out}")
        return out

    def relay_status(self):
        st = self.ctl("status")
        return next(p for p in st["partitions"] if p["role"] == "relay")

    def profiles(self):
        with open(os.path.join(self.work, f"{self.relay_log}.log"), errors="replace") as f:
            return [parse_profile(ln) for ln in f if "relay: profile " in ln]

    def wait_profiles(self, n, timeout=10):
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            p = self.profiles()
            if len(p) >= n:
                return p
            time.sleep(0.05)
        self.fail(f"the relay printed {len(self.profiles())} profile lines, not {n}")

    def baseline_proxy(self, nbytes):
        me = os.path.abspath(__file__)
        sender = subprocess.Popen(["ip", "netns", "exec", self.ns("wan"), sys.executable, me, "--tcp-sender",
                                   f"10.77.0.3:{BASELINE_PORT}", str(nbytes)], stdout=subprocess.PIPE, text=True)
        try:
            if sender.stdout.readline().strip() != "ready":
                self.fail("the baseline sender did not start")
            r = subprocess.run(["ip", "netns", "exec", self.ns("host"), sys.executable, me, "--tcp-proxy",
                                f"10.77.0.3:{BASELINE_PORT}"], capture_output=True, text=True, timeout=120)
            out = json.loads(r.stdout.strip().splitlines()[-1])
            if out["bytes"] != nbytes:
                self.fail(f"the baseline proxy forwarded {out['bytes']} bytes, not {nbytes}: {r.stderr[-300:]}")
            return out
        finally:
            sender.wait(timeout=30)


def latency(b, variants, figures, summary):
    say(f"tunnel-up latency: {JOBS} jobs to the relay guest and {JOBS} to the host relay, interleaved")
    for vi, variant in enumerate(variants):
        b.use(variant)
        guest, host, guest_job = [], [], []
        b.submit(DEVICE, 0, 1)  # warm-up: the first job of a cold device
        b.submit(SIM_DEVICE, 0, 1)
        for i in range(JOBS):
            out = b.submit(DEVICE, 0, 100 + i)
            guest.append(out["timings_ms"]["tunnel_up"])
            guest_job.append(out["timings_ms"]["job"])
            host.append(b.submit(SIM_DEVICE, 0, 100 + i)["timings_ms"]["tunnel_up"])
        g50, g90 = statistics.median(guest), percentile(guest, 90)
        h50, h90 = statistics.median(host), percentile(host, 90)
        tag = "" if vi == 0 else f" [{variant[0]}]"
        say(f"  relay guest{tag}: median {g50:.1f} ms, p90 {g90:.1f} ms (all: {guest})")
        say(f"  host relay (baseline): median {h50:.1f} ms, p90 {h90:.1f} ms (all: {host})")
        say(f"  = {g50 / max(h50, 0.1):.2f} x the host relay (median); empty job (1 page, no document) "
            f"median {statistics.median(guest_job):.0f} ms")
        base = {"label": "host relay (duplex-relay-sim in the LAN host namespace), same flow, interleaved",
                "unit": "ms"}
        pre = "relay." if vi == 0 else f"relay.{variant[0]}."
        figures += [
            figure(pre + "tunnel_up_median", f"request to tunnel up, relay guest{tag}, median", g50, "ms",
                   f"median of {JOBS}", dict(base, value=round(h50, 3)), g50 / max(h50, 0.1), samples=guest,
                   baseline_samples=host),
            figure(pre + "tunnel_up_p90", f"request to tunnel up, relay guest{tag}, p90", g90, "ms", f"p90 of {JOBS}",
                   dict(base, value=round(h90, 3)), g90 / max(h90, 0.1)),
            figure(pre + "empty_job", f"job of 1 page and no document on an open tunnel (Job to JobResult), "
                   f"relay guest{tag}", statistics.median(guest_job), "ms", f"median of {JOBS}", samples=guest_job),
        ]
        if vi == 0:
            summary["empty_job_ms"] = statistics.median(guest_job)


def relay_job(b, nbytes, seed):
    """One job with a document of nbytes to the relay guest: its MB/s and what it cost."""
    mon = b.procs["monitor"].pid
    n_prof = len(b.profiles())
    st0, cpu0, t0 = b.relay_status(), thread_cpu(mon), time.monotonic()
    out = b.submit(DEVICE, nbytes, seed)
    wall = time.monotonic() - t0
    st1, cpu1 = b.relay_status(), thread_cpu(mon)
    job_ms = out["timings_ms"]["job"]
    c0, c1 = st0["net"]["counters"], st1["net"]["counters"]
    vcpu = next((k for k in cpu1 if k.endswith(":relay-vcpu0")), None)
    loop = next((k for k in cpu1 if k.endswith(":device-loop")), None)
    d = {"job_ms": job_ms, "mb_s": round(nbytes / (job_ms / 1000) / 1e6, 3), "wall_s": round(wall, 3),
         "exits": st1["exits"]["total"] - st0["exits"]["total"],
         "mmio_exits": st1["exits"]["mmio"] - st0["exits"]["mmio"],
         "rx_frames": c1["rx_frames"] - c0["rx_frames"], "tx_frames": c1["tx_frames"] - c0["tx_frames"],
         "rx_bytes": c1["rx_bytes"] - c0["rx_bytes"]}
    if vcpu in cpu0:
        u, s, g = (cpu1[vcpu][i] - cpu0[vcpu][i] for i in range(3))
        # utime includes the guest time; both are counted in clock ticks, so clamp the rounding.
        d.update(vcpu_guest_s=round(g, 2), vcpu_monitor_user_s=round(max(0.0, u - g), 2), vcpu_kernel_s=round(s, 2))
    if loop in cpu0:
        d["device_loop_s"] = round(sum(cpu1[loop][:2]) - sum(cpu0[loop][:2]), 2)
    try:
        p = b.wait_profiles(n_prof + 1)[-1]  # the tunnel's, printed at its close
        d["guest_profile_us"] = {k: p[k] for k in ("uptime_us", "sleep_us", "smoltcp_us", "tx_us", "rx_refill_us",
                                                   "tls_us", "logic_us")}
        d["guest_profile"] = {k: p[k] for k in ("turns", "sleeps", "tx_frames", "rx_frames", "plaintext_bytes")}
    except demo_relay.Failed:
        pass  # a relay image without profile lines (an older build under --compare)
    return d


def describe(name, runs):
    """Prints where the median run's time went."""
    mid = sorted(runs, key=lambda d: d["job_ms"])[len(runs) // 2]
    mib = mid["rx_bytes"] / MIB
    per = {k: round(mid[k] / mib, 1) for k in ("exits", "rx_frames", "tx_frames")}
    say(f"  {name}, median run ({mid['job_ms']} ms): per MiB {per['exits']} VM exits, {per['rx_frames']} frames "
        f"in, {per['tx_frames']} out")
    if "vcpu_guest_s" in mid:
        say(f"    relay vCPU thread: guest {mid['vcpu_guest_s']} s, monitor {mid['vcpu_monitor_user_s']} s, host "
            f"kernel {mid['vcpu_kernel_s']} s; device loop thread {mid.get('device_loop_s')} s")
    gp = mid.get("guest_profile_us")
    if gp:
        tot = gp["uptime_us"] or 1
        say("    guest time (tunnel open to close): " + ", ".join(
            f"{k[:-3]} {v / 1000:.0f} ms ({v / tot * 100:.0f}%)" for k, v in gp.items()))
        if gp["tls_us"]:
            say(f"    TLS in the guest: {mid['guest_profile']['plaintext_bytes'] / gp['tls_us']:.1f} MB/s of "
                f"plaintext while it runs")


def throughput(b, variants, figures, summary):
    nbytes = DOC_MIB * MIB
    names = ", ".join(v[0] for v in variants)
    say(f"tunnel throughput: {DOC_MIB} MiB documents, {RUNS} runs; each run: the plain TCP proxy, the relay "
        f"guest ({names}), the host relay")
    proxy, host = [], []
    guest = {v[0]: [] for v in variants}
    for run in range(RUNS):
        p = b.baseline_proxy(nbytes)
        proxy.append(nbytes / p["seconds"] / 1e6)
        for variant in variants:
            b.use(variant)
            guest[variant[0]].append(relay_job(b, nbytes, 1000 + run))
        host.append(nbytes / (b.submit(SIM_DEVICE, nbytes, 1000 + run)["timings_ms"]["job"] / 1000) / 1e6)
        say(f"  run {run + 1}: proxy {proxy[-1]:.0f} MB/s, relay guest " +
            ", ".join(f"{v[0]} {guest[v[0]][-1]['mb_s']:.1f} MB/s ({guest[v[0]][-1]['job_ms']} ms)" for v in variants)
            + f", host relay {host[-1]:.0f} MB/s")
    px, h = statistics.median(proxy), statistics.median(host)
    proxy_base = {"label": "plain host TCP proxy: Python forwarder in the LAN host namespace (10.77.1.2) dialing "
                           "out through the router/firewall to a WAN sender, forwarding to a loopback sink",
                  "value": round(px, 3), "unit": "MB/s"}
    figures += [
        figure("relay.proxy_throughput", "plain host TCP proxy on the same namespace path (baseline)", px, "MB/s",
               f"median of {RUNS}", samples=proxy, bytes=nbytes),
        figure("relay.host_relay_throughput", "host relay (duplex-relay-sim, rustls), same job and cloud", h, "MB/s",
               f"median of {RUNS}", samples=host, bytes=nbytes),
    ]
    for vi, variant in enumerate(variants):
        runs = guest[variant[0]]
        g = statistics.median(r["mb_s"] for r in runs)
        met = g / px >= 0.5
        tag = "" if vi == 0 else f" [{variant[0]}]"
        say(f"  relay guest{tag} {g:.1f} MB/s = {g / px:.3f} x the plain TCP proxy ({px:.0f} MB/s): goal >= 0.5 "
            f"{'MET' if met else 'NOT met'}; = {g / h:.3f} x the host relay ({h:.0f} MB/s)")
        describe(variant[0], runs)
        pre = "relay." if vi == 0 else f"relay.{variant[0]}."
        figures.append(figure(
            pre + "throughput", f"tunnel throughput{tag}, {DOC_MIB} MiB document cloud -> relay guest (TLS, TAP, "
            f"virtio-net), bytes / job time", g, "MB/s", f"median of {RUNS}", proxy_base, g / px,
            goal=">= 0.5 x the plain TCP proxy", goal_met=met, samples=[r["mb_s"] for r in runs], bytes=nbytes,
            ratio_to_host_relay=round(g / h, 4), runs=runs))
        if vi == 0:
            summary.update(throughput_mb_s=round(g, 3), proxy_mb_s=round(px, 3), goal_met=met)
    if len(variants) > 1:
        base = statistics.median(r["mb_s"] for r in guest[variants[0][0]])
        for variant in variants[1:]:
            other = statistics.median(r["mb_s"] for r in guest[variant[0]])
            say(f"  {variants[0][0]} / {variant[0]}: {base / other:.2f} x")


# --- mediator load -----------------------------------------------------------------------
def mediator_load(bin_dir, work, figures):
    n = SESSIONS
    say(f"mediator: {n} sessions of duplex-relay-sim --sessions with 1 s heartbeats, release build")
    d = os.path.join(work, "load")
    os.makedirs(d, exist_ok=True)
    secret = "7a" * 32
    cfg = {"relay_listen": "127.0.0.1:0", "api_listen": "127.0.0.1:0", "db": os.path.join(d, "mediator.db"),
           "cert": os.path.join(ROOT, "examples/relay/keys/mediator/cert.pem"),
           "key": os.path.join(ROOT, "examples/relay/keys/mediator/key.pem"),
           "heartbeat_ms": 1000, "heartbeat_timeout_ms": 5000,
           "clouds": [{"name": "bench", "token": "bench-token-0123456789", "ticket_key": "11" * 32}],
           "relays": [{"id": f"load-{i}", "secret": secret, "devices": []} for i in range(n)]}
    path = os.path.join(d, "mediator.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    log = open(os.path.join(d, "mediator.log"), "w+")
    med = subprocess.Popen([os.path.join(bin_dir, "duplex-mediator"), "serve", "--config", path],
                           stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    with open(os.path.join(work, "load-mediator.pid"), "w") as f:  # for scripts/bench's cleanup
        f.write(f"{med.pid}\n")
    sim = None
    # The simulator stops by itself after this long, even if this script is killed.
    bound_s = int(120 + n / 25)
    try:
        pin, addrs = None, None
        t_end = time.monotonic() + 60
        while addrs is None and time.monotonic() < t_end:
            line = med.stdout.readline()
            if not line:
                raise RuntimeError(f"the mediator exited: {open(log.name).read()[-500:]}")
            if line.startswith("pin "):
                pin = line.split()[1]
            elif line.startswith("listening "):
                addrs = dict(w.split("=", 1) for w in line.split()[1:])
        time.sleep(1.0)
        idle = rss_kib(med.pid)
        api = f"http://{addrs['api']}/v1/readyz"
        t0 = time.monotonic()
        sim = subprocess.Popen([os.path.join(bin_dir, "duplex-relay-sim"), "--mediator", addrs["relays"],
                                "--mediator-pin", pin, "--secret", secret, "--sessions", str(n),
                                "--concurrency", "64", "--seconds", str(bound_s)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        online, t_end = 0, time.monotonic() + 60 + n / 50
        while time.monotonic() < t_end:
            try:
                online = json.loads(urllib.request.urlopen(api, timeout=5).read())["relays_online"]
            except (OSError, ValueError, KeyError):
                pass
            if online >= n:
                break
            if sim.poll() is not None or med.poll() is not None:
                raise RuntimeError("the mediator or the simulator exited")
            time.sleep(0.2)
        ramp = time.monotonic() - t0
        if online < n:
            raise RuntimeError(f"only {online} of {n} sessions online after {ramp:.0f} s")
        time.sleep(2.0)  # past the login ramp's tail
        c0, w0 = proc_cpu(med.pid), time.monotonic()
        time.sleep(5.0)
        cpu = (proc_cpu(med.pid) - c0) / (time.monotonic() - w0) * 100
        rss = rss_kib(med.pid)
    finally:
        for p in (sim, med):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        log.close()
    per_kib = (rss - idle) / n
    say(f"  idle RSS {idle / 1024:.1f} MiB (baseline); {n} sessions: RSS {rss / 1024:.1f} MiB = {per_kib:.1f} KiB "
        f"per session = {per_kib * 1000 / 1024:.1f} MiB per 1,000 sessions; CPU {cpu:.0f} % of a core "
        f"({n} heartbeats/s); all online in {ramp:.1f} s")
    base = {"label": "idle mediator (same registry, no session)", "value": round(idle / 1024, 3), "unit": "MiB"}
    figures += [
        figure("mediator.idle_rss", "mediator RSS idle, registry of N relays (baseline)", idle / 1024, "MiB",
               "one run", sessions_in_registry=n),
        figure("mediator.rss", f"mediator RSS with {n} sessions (1 s heartbeats)", rss / 1024, "MiB", "one run",
               base, rss / idle, sessions=n),
        figure("mediator.per_session", "mediator memory per session (RSS - idle RSS) / N", per_kib, "KiB",
               "one run", sessions=n, mib_per_1000_sessions=round(per_kib * 1000 / 1024, 2)),
        figure("mediator.cpu", f"mediator CPU, {n} sessions, heartbeats only (5 s window)", cpu, "% of a core",
               "one run", sessions=n, heartbeats_per_s=n, login_ramp_s=round(ramp, 1)),
    ]


def main():
    ap = argparse.ArgumentParser(description="relay benchmark (scripts/bench relay)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--guests", default=os.path.join(ROOT, "guests/target/x86_64-unknown-none/release"))
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=TREE",
                    help="also measure the monitor and relay image built in source tree TREE (its "
                         "target/release/duplex and guests/target/x86_64-unknown-none/release), interleaved with "
                         "this tree's, as variant NAME (before/after comparisons in one run)")
    ap.add_argument("--work", help="work folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--only", default="latency,throughput,mediator")
    ap.add_argument("--tcp-sender", nargs=2, metavar=("ADDR", "BYTES"), help=argparse.SUPPRESS)
    ap.add_argument("--tcp-proxy", metavar="ADDR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tcp_sender:
        return tcp_sender(args.tcp_sender[0], int(args.tcp_sender[1]))
    if args.tcp_proxy:
        return tcp_proxy(args.tcp_proxy)
    parts = set(args.only.split(","))
    variants = [("current", os.path.abspath(args.bin), os.path.abspath(args.guests))]
    for c in args.compare:
        name, tree = c.split("=", 1)
        tree = os.path.abspath(tree)
        variants.append((name, os.path.join(tree, "target/release"),
                         os.path.join(tree, "guests/target/x86_64-unknown-none/release")))
    own = args.work is None
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="duplex-bench-relay."))
    os.makedirs(work, exist_ok=True)

    def on_signal(signum, _frame):
        raise demo_relay.Interrupted(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    figures, summary, status = [], {}, 0
    try:
        if parts & {"latency", "throughput"}:
            b = Bench(work, os.path.abspath(args.bin))
            try:
                b.network()
                b.servers()
                if "latency" in parts:
                    latency(b, variants, figures, summary)
                if "throughput" in parts:
                    throughput(b, variants, figures, summary)
            except demo_relay.Failed as e:
                say(f"FAILED at {e.step}: {e.error}")
                for name in (getattr(b, "relay_log", "relay"), "monitor", "cloud", "mediator", "sim"):
                    for ln in b.tail(name):
                        say(f"  {name}: {ln}")
                status = 1
            finally:
                b.stop()
        if "mediator" in parts and status == 0:
            mediator_load(os.path.abspath(args.bin), work, figures)
    finally:
        if own and not os.environ.get("DUPLEX_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "relay", "script": "scripts/bench_relay.py",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "runs": RUNS, "jobs": JOBS, "document_mib": DOC_MIB, "sessions": SESSIONS,
                       "variants": [v[0] for v in variants], "summary": summary, "figures": figures}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
