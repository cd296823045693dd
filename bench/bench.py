#!/usr/bin/env python3
"""Benchmark ccproxy against direct calls to the same fake upstream (the floor).

    python3 bench/bench.py [--quick] [--streams 1000,5000] [--peers litellm]

Loopback only, bounded in time (about two minutes).  The fake upstream is nginx (static
`return 200` locations) when it is installed, else bench/fake_upstream.py; requests/s
come from wrk when installed, else from a threaded stdlib client.  Prints one markdown
table; each ccproxy figure stands beside the floor measured in the same run.
"""
import argparse
import http.client
import json
import os
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ccproxy  # noqa: E402  (for the translated floor body)

from fake_upstream import SHORT_EVENTS  # noqa: E402  (streams timed to the first byte)

SAMPLE = os.path.join(ROOT, "..", "shared", "claude-code-wire", "samples",
                      "01-first-turn.request.json")
#: Sleep before each call of the idle rows: a client that pauses between calls, as
#: Claude Code does, finds both processes asleep, and waking one costs this VM 0.4 ms.
IDLE = 0.02
#: What the benchmark's client sends with every call.
CLIENT_HEADERS = {"content-type": "application/json", "x-api-key": "k",
                  "anthropic-version": "2023-06-01"}
ANTHROPIC_JSON = json.dumps({"id": "msg_b", "type": "message", "role": "assistant",
                             "model": "claude-x", "content": [{"type": "text", "text": "hi"}],
                             "stop_reason": "end_turn", "stop_sequence": None,
                             "usage": {"input_tokens": 12000, "output_tokens": 1}})
OPENAI_JSON = json.dumps({"id": "c", "object": "chat.completion", "choices": [{
    "index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12000, "completion_tokens": 1}})


# ---- bodies ---------------------------------------------------------------------

def claude_code_body():
    """A real ~50 KB Claude Code request (stream off), or a synthetic one of that size."""
    if os.path.exists(SAMPLE):
        with open(SAMPLE) as f:
            body = json.load(f)["body"]
        source = "captured Claude Code request"
    else:
        body = {"model": "claude-opus-5-5", "max_tokens": 32000, "system": "x" * 20000,
                "messages": [{"role": "user", "content": "y" * 28000}]}
        source = "synthetic 48 KB body"
    body["stream"] = False
    return body, source


def sse_bodies(events):
    def ev(name, data):
        return "event: %s\ndata: %s\n\n" % (name, json.dumps(data))
    start = {"type": "message_start", "message": json.loads(ANTHROPIC_JSON)}
    start["message"].update(content=[], stop_reason=None)
    anthropic = (ev("message_start", start) + ev("content_block_start", {
        "type": "content_block_start", "index": 0, "content_block": {"type": "text",
                                                                     "text": ""}})
        + "".join(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": "tok "}})
                  for _ in range(events))
        + ev("content_block_stop", {"type": "content_block_stop", "index": 0})
        + ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": events}})
        + ev("message_stop", {"type": "message_stop"}))
    chunk = lambda d, f=None: "data: %s\n\n" % json.dumps(  # noqa: E731
        {"id": "c", "choices": [{"index": 0, "delta": d, "finish_reason": f}]})
    openai = (chunk({"role": "assistant", "content": ""})
              + "".join(chunk({"content": "tok "}) for _ in range(events)) + chunk({}, "stop")
              + "data: %s\n\n" % json.dumps({"id": "c", "choices": [], "usage": {
                  "prompt_tokens": 12000, "completion_tokens": events}}) + "data: [DONE]\n\n")
    return anthropic, openai


# ---- processes --------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit("port %d did not open" % port)


NGINX_CONF = """
worker_processes 1;
daemon off;
error_log %(dir)s/error.log warn;
pid %(dir)s/nginx.pid;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  client_body_buffer_size 2m;
  client_max_body_size 20m;
  tcp_nodelay on;
  client_body_temp_path %(dir)s/body;
  proxy_temp_path %(dir)s/proxy;
  fastcgi_temp_path %(dir)s/fcgi;
  uwsgi_temp_path %(dir)s/uwsgi;
  scgi_temp_path %(dir)s/scgi;
  server {
    listen 127.0.0.1:%(port)d;
    location = /json/v1/messages { default_type application/json; return 200 '%(aj)s'; }
    location = /json/chat/completions { default_type application/json; return 200 '%(oj)s'; }
    location /sse/ { alias %(dir)s/sse/; default_type text/event-stream;
                     error_page 405 =200 $uri; }
    location /short/sse/ { alias %(dir)s/short/; default_type text/event-stream;
                           error_page 405 =200 $uri; }
  }
}
"""


def start_nginx(tmp, events):
    """nginx serving JSON replies and SSE files (`events` long under /sse/, SHORT_EVENTS
    under /short/sse/), on a free port."""
    for top, count in (("sse", events), ("short", SHORT_EVENTS)):
        for sub in ("v1", "chat"):
            os.makedirs(os.path.join(tmp, top, sub), exist_ok=True)
        anthropic, openai = sse_bodies(count)
        for rel, text in (("v1/messages", anthropic), ("chat/completions", openai)):
            with open(os.path.join(tmp, top, rel), "w") as f:
                f.write(text)
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF % {"dir": tmp, "port": port, "aj": ANTHROPIC_JSON,
                              "oj": OPENAI_JSON})
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", tmp], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def start_fake(tmp):
    """The fast fake upstream with 1000-event streams: nginx when installed, else the
    stdlib one.  (process, port, (JSON path prefix, SSE path prefix), is nginx)."""
    if shutil.which("nginx") is None:
        return start_stdlib_fake(tmp, 1000) + (("", ""), False)
    os.chmod(tmp, 0o755)          # nginx's worker runs as an unprivileged user
    return start_nginx(tmp, 1000) + (("/json", "/sse"), True)


def start_stdlib_fake(tmp, events, delay=0.0, name="fake", loop=False):
    port_file = os.path.join(tmp, name + ".port")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_upstream.py"),
                             "--port-file", port_file, "--events", str(events),
                             "--delay", str(delay)] + (["--loop"] if loop else []))
    deadline = time.monotonic() + 10
    while not os.path.exists(port_file) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(port_file) as f:
        return proc, int(f.read())


def ccproxy_config(tmp, upstream, prefix_json, prefix_sse):
    base = "http://127.0.0.1:%d" % upstream
    providers = [
        {"name": "pass_json", "type": "anthropic", "base_url": base + prefix_json},
        {"name": "pass_sse", "type": "anthropic", "base_url": base + prefix_sse},
        {"name": "tr_json", "type": "openai-compatible", "base_url": base + prefix_json,
         "api_key": "k", "model": "gpt-4o"},
        {"name": "tr_sse", "type": "openai-compatible", "base_url": base + prefix_sse,
         "api_key": "k", "model": "gpt-4o"}]
    providers += [dict(p, name=p["name"] + "_short", base_url=base + "/short" + prefix_sse)
                  for p in providers[1::2]]             # streams of SHORT_EVENTS
    routes = [{"match": p["name"], "provider": p["name"]} for p in providers]
    path = os.path.join(tmp, "ccproxy-%d.json" % upstream)
    with open(path, "w") as f:
        json.dump({"providers": providers, "routes": routes}, f)
    return path


def start_ccproxy(tmp, config_path, extra_env=None, script=os.path.join(ROOT, "ccproxy.py")):
    """`ccproxy.py run` on a free port; returns (process, port, seconds to first 200)."""
    port = free_port()
    env = dict(os.environ, CCPROXY_PORT=str(port), CCPROXY_LOG_LEVEL="warning",
               CCPROXY_PID_FILE=os.path.join(tmp, "ccproxy-%d.pid" % port),
               CCPROXY_MAX_CONNECTIONS="12000")
    # The usage ledger in the run's own directory (CCPROXY_USAGE=0 measures without).
    env.setdefault("CCPROXY_USAGE_DB", os.path.join(tmp, "usage-%d.db" % port))
    env.update(extra_env or {})                      # which may set any of these
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, script, "run", "-c", config_path], env=env,
                            stderr=subprocess.DEVNULL)
    while time.monotonic() - started < 10:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port, time.monotonic() - started
        except OSError:
            time.sleep(0.002)
    raise SystemExit("ccproxy did not become healthy")


def stop(proc, timeout):
    """SIGTERM, and SIGKILL after `timeout`: a daemon still draining streams the fake
    upstream is slow to end (25 s at most) must not fail the run."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def proc_stat(pid):
    """(RSS MB, CPU seconds) of a process, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024.0
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def thread_stacks(pid):
    """The mean resident KB of a process's thread stacks (its mappings of the stack
    size): 8 means every stream's thread stays within two pages of C stack
    (docs/performance.md)."""
    sizes = thread_stack_sizes(pid)
    return sum(sizes) / len(sizes) if sizes else 0.0


def thread_stack_sizes(pid):
    """The resident KB of each of a process's thread stacks, from /proc/PID/smaps
    (test_ccproxy's stack budget test reads them the same way)."""
    limit = resource.getrlimit(resource.RLIMIT_STACK)[0]
    size = 8192 if limit in (resource.RLIM_INFINITY, 0) else limit >> 10
    sizes, current = [], None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:          # a mapping's first line
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = (hi - lo) >> 10
            elif line.startswith("Rss:") and current is not None and abs(current - size) <= 8:
                sizes.append(int(line.split()[1]))
    return sizes


# ---- measurements ---------------------------------------------------------------

def timed_call(conn, path, data, stream):
    """One call: (seconds to the whole answer, seconds to its first body byte)."""
    started = time.perf_counter()
    conn.request("POST", path, data, CLIENT_HEADERS)
    resp = conn.getresponse()
    chunk = resp.read1(65536) if stream else b""
    first = time.perf_counter() - started
    rest = resp.read()
    if resp.status != 200 or not (chunk + rest):
        raise SystemExit("bad answer %d on %s" % (resp.status, path))
    return time.perf_counter() - started, first


def sequential(port, path, body, n, stream=False, idle=0.0):
    """n calls on one keep-alive connection, each after `idle` seconds of sleep:
    (latencies, times to first body byte)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode()
    times = []
    for _ in range(n):
        time.sleep(idle)
        times.append(timed_call(conn, path, data, stream))
    conn.close()
    return [t[0] for t in times], [t[1] for t in times]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


WRK_LUA = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "k"
local f = io.open("%s", "rb")
wrk.body = f:read("*a")
f:close()
"""


def load(port, path, body, concurrency, seconds, tmp, pid=None):
    """(requests/s, errors, CPU ms per request of `pid`) under `concurrency` clients."""
    before = proc_stat(pid)[1] if pid else 0.0
    if shutil.which("wrk"):
        body_file = os.path.join(tmp, "wrk-body.json")
        with open(body_file, "w") as f:
            json.dump(body, f)
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_LUA % body_file)
        out = subprocess.run(["wrk", "-t", "2", "-c", str(concurrency), "-d", "%ds" % seconds,
                              "-s", script, "http://127.0.0.1:%d%s" % (port, path)],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        count = int(re.search(r"(\d+) requests in", out).group(1))
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = {"non-2xx": int(bad.group(1))} if bad else {}
        socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                                  r"timeout (\d+)", out)
        if socket_errors:
            errors.update((k, int(v)) for k, v in zip(("connect", "read", "write", "timeout"),
                                                      socket_errors.groups()) if int(v))
    else:
        rps, count, errors = threaded_load(port, path, body, concurrency, seconds)
    cpu = ((proc_stat(pid)[1] - before) * 1000.0 / max(count, 1)) if pid else None
    return rps, errors, cpu


def threaded_load(port, path, body, concurrency, seconds):
    stop, counts, errors = time.monotonic() + seconds, [0] * concurrency, [0]

    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        data = json.dumps(body).encode()
        while time.monotonic() < stop:
            try:
                conn.request("POST", path, data, {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                counts[i] += resp.status == 200
                errors[0] += resp.status != 200
            except (OSError, http.client.HTTPException):
                errors[0] += 1
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds, sum(counts), errors[0]


def hold_streams(port, n, pid, body):
    """Open n streaming calls at once: (peak RSS of `pid` once 99% have their head, how
    many completed, how many were open at that peak, KB of C stack per thread once
    all were open)."""
    sel, data = selectors.DefaultSelector(), json.dumps(dict(body, stream=True)).encode()
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [b"", False])
        socks.append(s)
    peak, started, done, heads, open_at_peak, ended = 0.0, time.monotonic(), 0, 0, 0, 0
    failure, stacks = [], 0.0      # the first answer that was not a 200 head
    while done < n and time.monotonic() - started < 120:
        for key, _ in sel.select(timeout=0.5):
            state = key.data
            try:
                chunk = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if not state[1] and b"200 OK" in chunk[:64]:
                state[1], heads = True, heads + 1
            elif not state[1] and not state[0] and not failure:
                failure.append(chunk[:200] or b"connection closed")
            state[0] = (state[0] + chunk)[-64:]
            if not chunk or state[0].endswith(b"0\r\n\r\n"):
                done += state[0].endswith(b"0\r\n\r\n") and state[1]
                ended += 1
                sel.unregister(key.fileobj)
                key.fileobj.close()
        if heads - ended == n and not stacks:
            stacks = thread_stacks(pid)
        if heads >= n * 0.99:
            rss = proc_stat(pid)[0]
            if rss > peak:
                peak, open_at_peak = rss, heads - ended
    for s in socks:
        s.close()
    if failure:
        print("hold_streams(%d): first failure: %r" % (n, failure[0]), file=sys.stderr)
    return peak, done, open_at_peak, stacks


# ---- the run ----------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--streams", default="1000,5000", help="open-stream counts")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per load run")
    parser.add_argument("--peers", default=os.environ.get("PEERS", ""),
                        help="also measure these proxies (litellm)")
    args = parser.parse_args(argv)
    n = 100 if args.quick else 400
    tmp = tempfile.mkdtemp(prefix="ccproxy-bench-")
    body, source = claude_code_body()
    fake, up, prefixes, use_nginx = start_fake(tmp)
    proxy, port, start_time = start_ccproxy(tmp, ccproxy_config(tmp, up, *prefixes))
    rows, notes = [], []
    try:
        rows += latency_rows(up, port, body, n, prefixes)
        rows += load_rows(up, port, body, args.seconds, tmp, proxy.pid, prefixes)
        rows += connection_rows(port, body, proxy.pid)
        rows += worker_rows(tmp, up, prefixes, body, args.seconds)
        rows.append(("start to first 200 on /health", "%.0f ms" % (start_time * 1000),
                     "-", "-"))
        rows += stream_rows(tmp, body, [int(x) for x in args.streams.split(",") if x], notes)
        if "litellm" in args.peers:
            rows += litellm_rows(tmp, up, prefixes, body, n, args.seconds, notes)
    finally:
        stop(proxy, 40)
        stop(fake, 10)
    print_table(rows, source, use_nginx, notes)
    return 0


def latency_rows(up, port, body, n, prefixes):
    """Added latency and time to first byte: n calls of each kind in a block, on one
    keep-alive connection each, the direct block first.  (Interleaving them, a direct
    call then a proxied one, makes the floor slower, not only ccproxy: the direct
    call after a proxied stream took 0.19-0.26 ms against 0.16 in a block.)"""
    pj, ps = prefixes
    tr_body = ccproxy.anthropic_to_openai(body, ccproxy.Translation(
        route="b", client_model=body["model"], upstream_model="gpt-4o",
        quirks=ccproxy.quirks_for(ccproxy.ProviderConfig(name="b", type="openai-compatible"))))
    rows = []
    for label, direct_path, direct_body, model in (
            ("pass-through", pj + "/v1/messages", body, "pass_json"),
            ("translated to OpenAI", pj + "/chat/completions", tr_body, "tr_json")):
        sequential(up, direct_path, direct_body, 20)
        sequential(port, "/v1/messages", dict(body, model=model), 20)       # warm up
        floor, _ = sequential(up, direct_path, direct_body, n)
        via, _ = sequential(port, "/v1/messages", dict(body, model=model), n)
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            rows.append(added_row("latency %s, 50 KB body, %s" % (name, label), via, floor, q))
    for label, direct_path, direct_body, model in (
            ("pass-through", ps + "/v1/messages", dict(body, stream=True), "pass_sse"),
            ("translated", ps + "/chat/completions", dict(tr_body, stream=True), "tr_sse")):
        for events, prefix, suffix in ((SHORT_EVENTS, "/short", "_short"), (1000, "", "")):
            floor_total, floor_first = sequential(up, prefix + direct_path, direct_body,
                                                  n // 2, True)
            total, first = sequential(port, "/v1/messages", dict(
                body, model=model + suffix, stream=True), n // 2, True)
            rows.append(added_row("time to first byte, %d-event stream, %s" % (
                events, label), first, floor_first))
        _, floor_first = sequential(up, "/short" + direct_path, direct_body, n // 8, True, IDLE)
        _, first = sequential(port, "/v1/messages", dict(body, model=model + "_short",
                                                         stream=True), n // 8, True, IDLE)
        rows.append(added_row("time to first byte, %d-event stream, %s, %d ms idle before "
                              "each call" % (SHORT_EVENTS, label, IDLE * 1000), first, floor_first))
        rows.append(added_row("1000-event stream relayed, %s" % label, total, floor_total,
                              digits=1))
    return rows


def added_row(measure, via, floor, q=0.5, digits=2):
    """A table row: ccproxy's and the floor's q-quantile, in ms, and the difference."""
    via, floor = pct(via, q) * 1000, pct(floor, q) * 1000
    return (measure, "%.*f ms" % (digits, via), "%.*f ms" % (digits, floor),
            "+%.*f ms" % (digits, via - floor))


def load_rows(up, port, body, seconds, tmp, pid, prefixes):
    rows = []
    tr_body = dict(body, model="tr_json")
    for concurrency in (16, 64):
        floor, _, _ = load(up, prefixes[0] + "/v1/messages", body, concurrency, seconds, tmp)
        for label, model in (("pass-through", "pass_json"), ("translated", "tr_json")):
            rps, errors, cpu = load(port, "/v1/messages", dict(body, model=model) if model !=
                                    "tr_json" else tr_body, concurrency, seconds, tmp, pid)
            rows.append(("requests/s at concurrency %d, %s" % (concurrency, label),
                         "%.0f (%s)" % (rps, _errors(errors)), "%.0f" % floor,
                         "%.2f×" % (rps / floor if floor else 0)))
            if concurrency == 16:
                rows.append(("CPU per request under load, %s" % label, "%.2f ms" % cpu, "-",
                             "-"))
    return rows


def _errors(errors):
    if isinstance(errors, int):
        return "%d errors" % errors
    return ", ".join("%d %s" % (n, k) for k, n in errors.items()) or "0 errors"


def worker_rows(tmp, up, prefixes, body, seconds):
    """Requests/s with 1 and 2 workers (run --workers N), pass-through, concurrency 32."""
    results = {}
    for workers in (1, 2):
        proxy, port, _ = start_ccproxy(tmp, ccproxy_config(tmp, up, *prefixes),
                                       {"CCPROXY_WORKERS": str(workers)})
        try:
            load(port, "/v1/messages", dict(body, model="pass_json"), 32, 1, tmp)  # warm up
            results[workers] = load(port, "/v1/messages", dict(body, model="pass_json"), 32,
                                    seconds, tmp)
        finally:
            stop(proxy, 40)
    one, two = results[1][0], results[2][0]
    return [("requests/s, pass-through, concurrency 32, 1 worker", "%.0f (%s)" % (
                one, _errors(results[1][1])), "-", "-"),
            ("requests/s, pass-through, concurrency 32, 2 workers", "%.0f (%s)" % (
                two, _errors(results[2][1])), "-", "%.2f× one worker" % (two / one))]


def connection_rows(port, body, pid):
    """Upstream connections opened for sequential calls on warm routes: none, JSON or
    streamed, pass-through or translated (keep-alive)."""
    def opened():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health/detailed")
        doc = json.loads(conn.getresponse().read())
        return doc["components"]["upstream"]["connections_opened"]
    before = opened()
    for model in ("pass_json", "tr_json", "pass_sse", "tr_sse"):
        sequential(port, "/v1/messages", dict(body, model=model, stream=model.endswith("sse")),
                   25, model.endswith("sse"))
    return [("new upstream connections for 100 sequential calls, 25 on each route "
             "(after warm-up)", str(opened() - before), "-", "-"),
            ("RSS after the load runs", "%.1f MB" % proc_stat(pid)[0], "-", "-")]


def stream_rows(tmp, body, counts, notes):
    """RSS idle and with many open streams, against a slow one-thread stdlib fake (10
    events 2 s apart: every stream stays open about 20 s, long enough for 5000 to be
    open at once; the table says how many were open at the peak)."""
    fake, up = start_stdlib_fake(tmp, 10, 2.0, "slow", loop=True)
    proxy, port, _ = start_ccproxy(tmp, ccproxy_config(tmp, up, "", ""))
    rows = []
    try:
        time.sleep(0.5)
        rows.append(("RSS idle", "%.1f MB" % proc_stat(proxy.pid)[0], "-", "-"))
        for n in counts:
            try:
                peak, done, held, stacks = hold_streams(port, n, proxy.pid,
                                                        dict(body, model="pass_sse"))
            except OSError as exc:
                notes.append("%d streams: %s (raise ulimit -n)" % (n, exc))
                continue
            rows.append(("RSS holding %d open streams" % n, "%.1f MB" % peak,
                         "-", "%d/%d completed, %d open at the peak, %.1f KB of C stack "
                         "each" % (done, n, held, stacks)))
    finally:
        stop(proxy, 40)
        stop(fake, 10)
    return rows


LITELLM_CONFIG = """model_list:
  - model_name: tr_json
    litellm_params: {model: openai/gpt-4o, api_base: "%(base)s%(json)s", api_key: k}
  - model_name: tr_sse
    litellm_params: {model: openai/gpt-4o, api_base: "%(base)s%(sse)s", api_key: k}
litellm_settings:
  drop_params: true     # else it answers Claude Code's body with 400 (reasoning_effort)
"""


def install_litellm():
    """The LiteLLM proxy in a venv under .cache/bench (test-time only), or None."""
    venv = os.path.join(ROOT, ".cache", "bench", "litellm")
    binary = os.path.join(venv, "bin", "litellm")
    if not os.path.exists(binary):
        subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--quiet",
                        "litellm[proxy]"], capture_output=True, timeout=900)
    return binary if os.path.exists(binary) else None


def litellm_rows(tmp, up, prefixes, body, n, seconds, notes):
    """The same translated-route measurements through the LiteLLM proxy (one worker)."""
    binary = install_litellm()
    if not binary:
        notes.append("LiteLLM could not be installed (pip); its rows are missing")
        return []
    path = os.path.join(tmp, "litellm.yaml")
    with open(path, "w") as f:
        f.write(LITELLM_CONFIG % {"base": "http://127.0.0.1:%d" % up, "json": prefixes[0],
                                  "sse": prefixes[1]})
    port, started = free_port(), time.monotonic()
    env = dict(os.environ, LITELLM_MASTER_KEY="k", LITELLM_LOCAL_MODEL_COST_MAP="True",
               LITELLM_USE_CHAT_COMPLETIONS_URL_FOR_ANTHROPIC_MESSAGES="true")
    proc = subprocess.Popen([binary, "--config", path, "--host", "127.0.0.1", "--port",
                             str(port), "--num_workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_health(port, "/health/liveliness", 120)
        start = time.monotonic() - started
        return _peer_measures("LiteLLM", port, proc.pid, body, n, seconds, tmp, start)
    finally:
        stop(proc, 40)


def wait_health(port, path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("peer on port %d did not become healthy" % port)


def _peer_measures(name, port, pid, body, n, seconds, tmp, start):
    rss_idle = proc_stat(pid)[0]
    sequential(port, "/v1/messages", dict(body, model="tr_json"), 10)
    via, _ = sequential(port, "/v1/messages", dict(body, model="tr_json"), max(n // 4, 20))
    total, first = sequential(port, "/v1/messages", dict(body, model="tr_sse", stream=True),
                              10, True)
    rows = [("%s: latency p50, 50 KB body, translated" % name, "%.2f ms" % (
                pct(via, 0.5) * 1000), "-", "-"),
            ("%s: time to first byte, stream" % name, "%.2f ms" % (pct(first, 0.5) * 1000),
             "-", "-"),
            ("%s: 1000-event stream relayed" % name, "%.1f ms" % (pct(total, 0.5) * 1000),
             "-", "-")]
    for concurrency in (16, 64):
        rps, errors, cpu = load(port, "/v1/messages", dict(body, model="tr_json"),
                                concurrency, seconds, tmp, pid)
        rows.append(("%s: requests/s at concurrency %d" % (name, concurrency),
                     "%.0f (%s)" % (rps, _errors(errors)), "-",
                     "CPU %.1f ms/request" % cpu))
    rows.append(("%s: RSS idle, start to healthy" % name, "%.0f MB, %.1f s" % (
        rss_idle, start), "-", "-"))
    return rows


def print_table(rows, source, nginx, notes):
    print("ccproxy %s on Python %s, %d cores; fake upstream: %s; load: %s; body: %s\n" % (
        ccproxy.__version__, sys.version.split()[0], os.cpu_count() or 1,
        "nginx (static return 200)" if nginx else "stdlib fake_upstream.py",
        "wrk" if shutil.which("wrk") else "threaded stdlib client", source))
    print("| measure | ccproxy | direct (floor) | added / ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print("| %s | %s | %s | %s |" % row)
    for note in notes:
        print("\nnote: " + note)


if __name__ == "__main__":
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    sys.exit(main())
