#!/usr/bin/env python3
"""Soak ccproxy: many concurrent streaming clients for a while, with a reload, a
worker killed with SIGKILL and a graceful restart in the middle.  Loopback only; stops
by itself.

    python3 bench/soak.py [--clients 300] [--seconds 60] [--events 20] [--delay 0.05]
                          [--workers 2]

The fake upstream sends a 103 Early Hints before every answer and repeats each
client's own marker in every delta: an answer that carries another client's marker
is counted as delivered to the wrong client (issue #17).

Prints requests sent, completed and failed, connection retries during the restart
gap (clients retry a refused connection before sending, as Claude Code does), and the
daemon's RSS and thread count over time.  The target: 0 wrong answers, 0 failed but
the requests the killed worker held, flat memory.
"""
import argparse
import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import free_port  # noqa: E402  (one helper for both scripts)
CCPROXY = os.path.join(HERE, "..", "ccproxy.py")
MARKERS = itertools.count()
MARKER = re.compile(rb"marker-\d+")


def body(marker):
    return json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 100, "stream": True,
                       "messages": [{"role": "user", "content": marker}]}).encode()


def wait_file(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + path)
        time.sleep(0.02)
    with open(path) as f:
        return f.read().strip()


def proc_status(pid):
    """(RSS in MB, threads) of a process and its children (a supervisor's workers),
    from /proc."""
    try:
        with open("/proc/%d/status" % pid) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, KeyError, ValueError):
        return None
    rss, threads = int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["Threads"])
    for child in children:
        more = proc_status(child)
        if more:
            rss, threads = rss + more[0], threads + more[1]
    return rss, threads


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = self.completed = self.failed = self.retries = self.wrong = 0
        self.errors, self.failed_at = {}, []

    def add(self, **kw):
        with self.lock:
            for key, n in kw.items():
                setattr(self, key, getattr(self, key) + n)

    def error(self, text):
        with self.lock:
            self.failed += 1
            self.failed_at.append(time.monotonic())
            self.errors[text] = self.errors.get(text, 0) + 1


def one_call(port, tally):
    """One streaming call; connection refusals before sending are retried."""
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.connect()
            break
        except (ConnectionRefusedError, ConnectionResetError):   # nothing was sent
            tally.add(retries=1)
            time.sleep(0.05)
    else:
        return tally.error("could not connect")
    tally.add(sent=1)
    marker = "marker-%d" % next(MARKERS)
    try:
        conn.request("POST", "/v1/messages", body(marker), {"content-type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if set(MARKER.findall(data)) - {marker.encode()}:
            tally.add(wrong=1)           # another client's answer: never acceptable
            return tally.error("an answer for another client")
        if resp.status != 200 or not data.rstrip().endswith(b'"message_stop"}'):
            return tally.error("status %d: %s" % (resp.status, data[-120:]))
        tally.add(completed=1)
    except (OSError, http.client.HTTPException) as exc:
        tally.error(type(exc).__name__)
    finally:
        conn.close()


def client_loop(port, tally, stop):
    while not stop.is_set():
        one_call(port, tally)


def cli(*args, env):
    return subprocess.run([sys.executable, CCPROXY] + list(args), env=env, timeout=120,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between events")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="ccproxy-soak-")
    fake = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_upstream.py"),
                             "--port-file", os.path.join(tmp, "fake.port"), "--interim",
                             "--echo", "--events", str(args.events), "--delay",
                             str(args.delay)])
    port = free_port()
    env = dict(os.environ, CCPROXY_BASE_URL="http://127.0.0.1:%s" % wait_file(
        os.path.join(tmp, "fake.port")), CCPROXY_PORT=str(port),
        CCPROXY_PID_FILE=os.path.join(tmp, "ccproxy.pid"),
        CCPROXY_LOG_FILE=os.path.join(tmp, "ccproxy.log"), CCPROXY_LOG_LEVEL="warning",
        CCPROXY_CONFIG="", CCPROXY_WORKERS=str(args.workers),
        CCPROXY_USAGE_DB=os.path.join(tmp, "usage.db"),
        CCPROXY_MAX_CONNECTIONS=str(args.clients * 2 + 64))
    started = cli("start", env=env)
    if started.returncode:
        fake.kill()
        raise SystemExit("ccproxy did not start: " + started.stderr)
    tally, stop, samples = Tally(), threading.Event(), []
    threads = [threading.Thread(target=client_loop, args=(port, tally, stop), daemon=True)
               for _ in range(args.clients)]
    for t in threads:
        t.start()
    t0, events, killed = time.monotonic(), [], []
    plan = [(args.seconds / 4, "reload"), (args.seconds / 2, "kill-worker"),
            (3 * args.seconds / 4, "restart")]
    try:
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1.0)
            pid = int(wait_file(env["CCPROXY_PID_FILE"]) or 0)
            samples.append((time.monotonic() - t0, proc_status(pid)))
            while plan and time.monotonic() - t0 >= plan[0][0]:
                what = plan.pop(0)[1]
                said = kill_worker(port, killed) if what == "kill-worker" else (lambda out: (
                    out.stdout + out.stderr).strip())(cli(what, env=env))
                events.append("%5.1fs %s: %s" % (time.monotonic() - t0, what, said))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        cli("stop", env=env)
        fake.send_signal(signal.SIGTERM)
        fake.wait(10)
    lost = sum(any(0 <= at - k < 3.0 for k in killed) for at in tally.failed_at)
    report(args, tally, samples, events, time.monotonic() - t0, lost)
    return 0 if tally.wrong == 0 and tally.failed == lost else 1


def kill_worker(port, killed):
    """SIGKILL the first worker /status lists: what an OOM kill or a crash does."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/status")
        workers = json.loads(conn.getresponse().read()).get("workers") or []
    finally:
        conn.close()
    if not workers:
        return "no workers listed (--workers 1?)"
    os.kill(workers[0]["pid"], signal.SIGKILL)
    killed.append(time.monotonic())
    return "SIGKILL to worker pid %d" % workers[0]["pid"]


def report(args, tally, samples, events, elapsed, lost):
    rss = [s[1][0] for s in samples if s[1]]
    threads = [s[1][1] for s in samples if s[1]]
    print("soak: %d clients, %.0f s, %d events per stream, %.0f ms apart"
          % (args.clients, elapsed, args.events, args.delay * 1000))
    for line in events:
        print("  " + line)
    print("requests sent %d, completed %d, failed %d, of them %d held by the killed worker; "
          "answers to the wrong client %d (connection retries during restart: %d)"
          % (tally.sent, tally.completed, tally.failed, lost, tally.wrong, tally.retries))
    for text, n in sorted(tally.errors.items(), key=lambda e: -e[1])[:5]:
        print("  %5d x %s" % (n, text))
    if rss:
        third = max(1, len(rss) // 3)
        print("ccproxy RSS MB: peak %.1f, first third avg %.1f, last third avg %.1f; "
              "peak threads %d" % (max(rss), sum(rss[:third]) / third,
                                   sum(rss[-third:]) / third, max(threads)))
    print("%.0f requests/s completed" % (tally.completed / max(elapsed, 1e-9)))


if __name__ == "__main__":
    sys.exit(main())
