#!/usr/bin/env python3
"""Compare two builds of ccproxy.py under the same conditions (an A/B run).

    python3 bench/ab.py [--rounds 40] [--calls 25] A [B]

A and B are git revisions (HEAD~1, a commit) or paths to a ccproxy.py; B defaults to
the working tree's.  Both builds run at once against one fake upstream, and each round
times a block of calls through each in turn (the order alternates), so a machine that
slows down for a while slows both alike.  On a shared 2-core VM, whole runs of
`make bench` differ by 0.2 ms from one to the next; a change of 30 us shows here.
Prints each build's median over the rounds, and CPU per call from /proc.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import bench

#: (measure, route in bench.ccproxy_config, streamed)
MEASURES = (("time to first byte, translated 1000-event stream", "tr_sse", True),
            ("time to first byte, translated 10-event stream", "tr_sse_short", True),
            ("time to first byte, pass-through 1000-event stream", "pass_sse", True),
            ("latency, translated, 50 KB body", "tr_json", False),
            ("latency, pass-through, 50 KB body", "pass_json", False))


def build(rev, tmp, label):
    """`rev`'s ccproxy.py in a directory of its own (its start re-imports it by name)."""
    path = os.path.join(tmp, label, "ccproxy.py")
    os.makedirs(os.path.dirname(path))
    if os.path.isfile(rev):
        shutil.copyfile(rev, path)
    else:
        with open(path, "wb") as f:
            f.write(subprocess.run(["git", "-C", bench.ROOT, "show", rev + ":ccproxy.py"],
                                   check=True, stdout=subprocess.PIPE).stdout)
    return path


def measure(builds, body, rounds, calls):
    """{(label, measure): ([block medians], CPU seconds, calls)} over all rounds."""
    out = {(label, name): ([], 0.0, 0) for label, _, _ in builds for name, _, _ in MEASURES}
    for name, model, stream in MEASURES:
        for _, port, _ in builds:                                        # warm up
            bench.sequential(port, "/v1/messages", dict(body, model=model, stream=stream),
                             calls, stream)
    for round_ in range(rounds):
        for name, model, stream in MEASURES:
            for label, port, pid in builds[::1 if round_ % 2 else -1]:
                cpu = bench.proc_stat(pid)[1]
                total, first = bench.sequential(
                    port, "/v1/messages", dict(body, model=model, stream=stream), calls, stream)
                medians, spent, n = out[label, name]
                medians.append(statistics.median(first if stream else total))
                out[label, name] = (medians, spent + bench.proc_stat(pid)[1] - cpu, n + calls)
    return out


def print_table(results, revs, body_source):
    print("A = %s, B = %s; median of the rounds' medians; body: %s\n" % (
        revs[0], revs[1], body_source))
    print("| measure | A | B | B - A |")
    print("|---|---|---|---|")
    for name, _, _ in MEASURES:
        a, b = (statistics.median(results[label, name][0]) * 1e3 for label in "AB")
        print("| %s | %.3f ms | %.3f ms | %+.3f ms |" % (name, a, b, b - a))
        a, b = (results[label, name][1] / results[label, name][2] * 1e3 for label in "AB")
        print("| CPU per call, %s | %.2f ms | %.2f ms | %+.2f ms |" % (
            name.split(", ", 1)[1], a, b, b - a))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a git revision or a path to ccproxy.py")
    parser.add_argument("b", nargs="?", default=os.path.join(bench.ROOT, "ccproxy.py"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=25, help="calls per block")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="ccproxy-ab-")
    body, source = bench.claude_code_body()
    fake, up, prefixes, _ = bench.start_fake(tmp)
    config = bench.ccproxy_config(tmp, up, *prefixes)
    procs, builds = [], []
    try:
        for label, rev in (("A", args.a), ("B", args.b)):
            proc, port, _ = bench.start_ccproxy(tmp, config, script=build(rev, tmp, label))
            procs.append(proc)
            builds.append((label, port, proc.pid))
        results = measure(builds, body, args.rounds, args.calls)
    finally:
        for proc in procs + [fake]:
            bench.stop(proc, 10)
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, (args.a, args.b), source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
