"""What the bench_*.py scripts share: one figure of a results file (see
scripts/bench_report.py), with its baseline from the same run; one request to a monitor's
control socket."""
import json
import socket


def figure(fid, label, value, unit, stat, baseline=None, ratio=None, goal=None, **extra):
    f = {"id": fid, "label": label, "value": round(value, 3), "unit": unit, "stat": stat,
         "baseline": baseline, "ratio": None if ratio is None else round(ratio, 3),
         "ratio_meaning": "value / baseline" if ratio is not None else None, "goal": goal}
    f.update(extra)
    if "samples" in f:
        f["samples"] = [round(x, 3) for x in f["samples"]]
    return f


def percentile(values, p):
    """The p-th percentile of values (linear between the closest ranks, as numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ctl(sock, req, timeout=300):
    """One request to the control socket at `sock`; its result, or RuntimeError with the
    error answer."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock)
    s.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    s.close()
    r = json.loads(buf)
    if not r.get("ok"):
        raise RuntimeError(f"{req}: {r}")
    return r["result"]
