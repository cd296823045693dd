#!/usr/bin/env python3
"""make e2e: real clients through ccproxy, everything on loopback.

    python3 e2e/run.py            (what `make e2e` runs)

First, outside any sandbox, it installs what it needs into .cache/e2e (git-ignored):
the Claude Code CLI from npm, and the anthropic SDK into a venv.  Test-time only: never
a runtime dependency.  What cannot be installed is skipped with one line saying why.
Then, as root, it re-runs itself inside `unshare -n` (a network namespace with only
loopback), so nothing can leave the machine.

Each scenario prints `PASS name` or `FAIL name: why` (or `SKIP name: why`); the run ends
with `N passed, M failed` and exits non-zero on any failure.
"""
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, ".cache", "e2e")
sys.path.insert(0, HERE)
from fake_openai import FakeOpenAI  # noqa: E402
from fake_anthropic import FakeAnthropic as InRepoFakeAnthropic  # noqa: E402
from fake_bedrock import FakeBedrock  # noqa: E402
from fake_responses import FakeResponses  # noqa: E402

CLAUDE_PKG = "@anthropic-ai/claude-code@latest"
RESULTS = []


# ---- preparation (outside the sandbox) ------------------------------------------

def install_claude():
    """Path of the Claude Code CLI, or (None, why)."""
    if os.environ.get("CLAUDE"):
        return os.environ["CLAUDE"], ""
    binary = os.path.join(CACHE, "cc", "node_modules", ".bin", "claude")
    if os.path.exists(binary):
        return binary, ""
    if not shutil.which("npm"):
        return None, "npm is not installed"
    os.makedirs(os.path.join(CACHE, "cc"), exist_ok=True)
    out = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix",
                          os.path.join(CACHE, "cc"), CLAUDE_PKG], capture_output=True,
                         text=True, timeout=600)
    if out.returncode or not os.path.exists(binary):
        return None, "npm install %s failed: %s" % (CLAUDE_PKG, out.stderr.strip()[-200:])
    return binary, ""


def install_nginx():
    """nginx for the load-balancer scenario, from Debian's packages when missing."""
    return install_debian("nginx", "nginx-light")


def install_chromium():
    """Headless Chromium for the status page's scenario (Debian's chromium)."""
    return install_debian("chromium", "chromium")


def install_debian(command, package):
    """(path of `command`, "") installing Debian's `package` when it is missing and this
    is root with apt-get; else (None, why)."""
    if shutil.which(command):
        return shutil.which(command), ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "%s is not installed (and cannot be installed without root/apt)" % command
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], capture_output=True,
                   timeout=900, env=env)
    return (shutil.which(command), "") if shutil.which(command) else (
        None, "apt-get install %s failed" % package)


def install_sdk():
    """Python of a venv that has the anthropic SDK, or (None, why)."""
    venv = os.path.join(CACHE, "venv")
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", "import anthropic"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    made = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
    if made.returncode:
        return None, "python3 -m venv failed: " + made.stderr.strip()[-200:]
    out = subprocess.run([python, "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", "anthropic", "openai"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        return None, "pip install anthropic failed: " + out.stderr.strip()[-200:]
    return python, ""


# ---- helpers --------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ccproxy:
    """`ccproxy.py run` on a free port (or `port`), with `env` on top."""

    def __init__(self, env, port=None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="ccproxy-e2e-")
        self.env = dict(os.environ, CCPROXY_PORT=str(self.port),
                        CCPROXY_PID_FILE=os.path.join(self.dir, "ccproxy.pid"),
                        CCPROXY_LOG_FILE=os.path.join(self.dir, "ccproxy.log"),
                        CCPROXY_USAGE_DB=os.path.join(self.dir, "usage.db"), **env)
        self.env.setdefault("CCPROXY_CONFIG", "")      # no default config file either
        if "CCPROXY_API_KEY" not in env:
            self.env.pop("CCPROXY_API_KEY", None)

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"),
                                      "run"], env=self.env, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError("ccproxy did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def cli_env(self):
        """What a shell needs for ccproxy's commands to find this daemon: its PID file
        and port, no config file (everything else comes from the runtime record)."""
        return {k: self.env[k] for k in ("CCPROXY_PID_FILE", "CCPROXY_PORT",
                                         "CCPROXY_CONFIG")}

    def log(self):
        with open(os.path.join(self.dir, "ccproxy.log")) as f:
            return f.read()


def config_file(doc):
    """`doc` as a config file in a directory of its own; its path."""
    path = os.path.join(tempfile.mkdtemp(prefix="cc-config-"), "config.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def openai_env(fake, ptype="openai"):
    return {"CCPROXY_PROVIDER": ptype, "CCPROXY_BASE_URL": fake.url,
            "CCPROXY_UPSTREAM_API_KEY": "sk-upstream", "CCPROXY_MODEL": "fake-model"}


def run_claude(claude, proxy, prompt, tools="", extra_env=None, workdir=None, args=()):
    """(exit code, parsed JSON result or None, stdout, seconds) of `claude -p`."""
    home = tempfile.mkdtemp(prefix="cc-home-")
    work = workdir or tempfile.mkdtemp(prefix="cc-work-")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TERM": "dumb",
           "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_API_KEY": "sk-test",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "ENABLE_TOOL_SEARCH": "false"}
    env.update(extra_env or {})
    env = {k: v for k, v in env.items() if v is not None}     # None: unset it
    args = [claude, "-p", prompt, "--output-format", "json"] + list(args)
    if tools:
        args += ["--allowedTools", tools]
    started = time.monotonic()
    out = subprocess.run(args, env=env, cwd=work, capture_output=True, text=True,
                         timeout=150, stdin=subprocess.DEVNULL)
    try:
        result = json.loads(out.stdout)
    except ValueError:
        result = None
    return out.returncode, result, out.stdout + out.stderr, time.monotonic() - started


def scenario(name, skip=""):
    """Decorator: run the function as one scenario and record PASS/FAIL/SKIP."""
    def wrap(fn):
        only = os.environ.get("E2E_ONLY", "")       # make e2e E2E_ONLY=interactive
        if only and only not in name:
            return fn
        if skip:
            print("SKIP %s: %s" % (name, skip), flush=True)
            RESULTS.append("skip")
            return fn
        try:
            fn()
            print("PASS %s" % name, flush=True)
            RESULTS.append("pass")
        except Exception as exc:           # a scenario failure, whatever its kind
            why = str(exc) or type(exc).__name__
            if not isinstance(exc, AssertionError):
                why = traceback.format_exc().strip().splitlines()[-1]
            print("FAIL %s: %s" % (name, why.replace("\n", " ")[:400]), flush=True)
            RESULTS.append("fail")
        return fn
    return wrap


def check(condition, why):
    if not condition:
        raise AssertionError(why)


def claude_through(claude, fake, prompt, tools="", ptype="openai", **kw):
    """Run `claude -p` through a ccproxy in front of `fake`; the parsed JSON result
    of a successful run (anything else fails the scenario), and the seconds it took."""
    with Ccproxy(openai_env(fake, ptype)) as proxy:
        rc, result, out, seconds = run_claude(claude, proxy, prompt, tools, **kw)
    check(rc == 0 and result, "exit %d: %s" % (rc, out[-300:]))
    return result, seconds


def assert_streamed(fake, calls):
    """Every call streamed (no stream:false fallback), and exactly `calls` of them."""
    streams = [r["body"].get("stream") for r in chat_calls(fake)]
    check(len(streams) == calls, "upstream got %d calls, expected %d" % (len(streams), calls))
    check(all(streams), "a stream:false fallback call reached the upstream: %s" % streams)


def chat_calls(fake):
    """The model calls a fake OpenAI server got (not ccproxy's questions about the
    model's window, such as Ollama's /api/show at start)."""
    return [r for r in fake.requests if r["path"].endswith("/chat/completions")]


def tool_messages(request):
    return [m for m in request["body"]["messages"] if m.get("role") == "tool"]


def png_file(directory):
    """A real 2x2 PNG for the Read tool to return."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (2).to_bytes(4, "big") * 2 + b"\x08\x02\x00"
                                        b"\x00\x00")
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path = os.path.join(directory, "red.png")
    with open(path, "wb") as f:
        f.write(png)
    return path


class FakeAnthropic:
    """e2e/fake_anthropic.py, in this process, as a context manager: a strict fake of
    the Messages API (it refuses a call without a key or anthropic-version)."""

    def __init__(self, scenario="text", tool_name="Bash", thinking=False, vendor="", key="",
                 vertex=""):
        self.fake = InRepoFakeAnthropic(scenario, tool_name, thinking, vendor, key, vertex)
        self.url = self.fake.url

    def __enter__(self):
        self.fake.start()
        return self

    def __exit__(self, *exc):
        self.fake.stop()

    def requests(self):
        return list(self.fake.requests)


# ---- scenarios --------------------------------------------------------------------

def cli_openai_scenarios(claude, skip):
    @scenario("claude-cli openai text", skip)
    def _():
        fake = FakeOpenAI("text").start()
        result, _ = claude_through(claude, fake, "say hi")
        check("Hello from the fake OpenAI server" in result["result"], result["result"])
        assert_streamed(fake, 1)

    @scenario("claude-cli openai bash tool round trip", skip)
    def _():
        fake = FakeOpenAI("tool").start()
        result, _ = claude_through(claude, fake, "run echo", "Bash")
        check("hello-from-tool" in result["result"], "answer: %s" % result["result"])
        assert_streamed(fake, 2)
        tools = tool_messages(fake.requests[1])
        check(tools and "hello-from-tool" in tools[0]["content"],
              "the tool result did not reach the upstream as role:tool: %s" % tools)

    @scenario("claude-cli openai two parallel tool calls", skip)
    def _():
        fake = FakeOpenAI("parallel").start()
        result, _ = claude_through(claude, fake, "run both", "Bash")
        assert_streamed(fake, 2)
        # Claude Code runs both calls at once and lists the results in the order they
        # finished, so match each result to its call by id, not by position.
        results = {m["tool_call_id"]: m["content"] for m in tool_messages(fake.requests[1])}
        check(len(results) == 2 and "one" in results.get("call_1", "")
              and "two" in results.get("call_2", ""), "tool results: %s" % results)
        check("one" in result["result"] and "two" in result["result"], result["result"])

    @scenario("claude-cli deepseek reasoning then tool, reasoning echoed back", skip)
    def _():
        fake = FakeOpenAI("reasoning", quirk="deepseek").start()
        result, _ = claude_through(claude, fake, "think, then run echo", "Bash",
                                   ptype="deepseek")
        assert_streamed(fake, 2)
        assistant = [m for m in fake.requests[1]["body"]["messages"]
                     if m.get("role") == "assistant"][-1]
        check(assistant.get("reasoning_content") == "I should run the command.",
              "reasoning not echoed: %s" % json.dumps(assistant)[:200])
        check("hello-from-tool" in result["result"], result["result"])

    @scenario("claude-cli openai image returned by the Read tool", skip)
    def _():
        work = tempfile.mkdtemp(prefix="cc-work-")
        fake = FakeOpenAI("image", image_path=png_file(work)).start()
        result, _ = claude_through(claude, fake, "look at red.png", "Read", workdir=work)
        assert_streamed(fake, 2)
        check("saw the image" in result["result"], "no image reached the model: %s"
              % result["result"])


def cli_stream_shape_scenarios(claude, skip):
    """Issue #20: tool-call streams in the shapes real OpenAI-compatible servers send."""
    for quirk, shape in (("zero-index", "every call on index 0"),
                         ("no-index", "calls with neither index nor id"),
                         ("text-beside", "text in the chunk of a call's arguments")):
        @scenario("claude-cli two tool calls, %s" % shape, skip)
        def _(quirk=quirk):
            fake = FakeOpenAI("parallel", quirk=quirk).start()
            result, _ = claude_through(claude, fake, "run both", "Bash")
            assert_streamed(fake, 2)
            results = [m["content"] for m in tool_messages(fake.requests[1])]
            check(len(results) == 2 and any("one" in r for r in results) and
                  any("two" in r for r in results), "tool results: %s" % results)
            check("one" in result["result"] and "two" in result["result"], result["result"])

    @scenario("claude-cli prompt caching: markers to OpenRouter's Claude, a key per session "
              "to OpenAI", skip)
    def _():
        fake = FakeOpenAI("tool", quirk="openrouter").start()
        env = dict(openai_env(fake, "openrouter"), CCPROXY_MODEL="anthropic/claude-sonnet-4.5")
        with Ccproxy(env) as proxy:
            rc, result, out, _ = run_claude(claude, proxy, "run echo", "Bash")
        check(rc == 0 and result, "exit %d: %s" % (rc, out[-300:]))
        markers = [json.dumps(r["body"]["messages"]).count('"cache_control"')
                   for r in fake.requests]
        check(len(markers) == 2 and all(1 <= n <= 4 for n in markers),
              "cache markers per call: %s" % markers)
        fake = FakeOpenAI("tool").start()
        with Ccproxy(openai_env(fake)) as proxy:
            for _ in range(2):            # two sessions, two calls each
                rc, result, out, _ = run_claude(claude, proxy, "run echo", "Bash")
                check(rc == 0 and result, "exit %d: %s" % (rc, out[-300:]))
        keys = [r["body"].get("prompt_cache_key") for r in fake.requests]
        check(len(keys) == 4 and all(keys) and keys[0] == keys[1] and keys[2] == keys[3]
              and keys[0] != keys[2], "prompt_cache_key per call: %s" % keys)

    @scenario("claude-cli through a 32K-window server (vLLM's rule): one retry, then sized "
              "to fit", skip)
    def _():
        fake = FakeOpenAI("tool", quirk="zero-index", window=32768).start()
        with Ccproxy(openai_env(fake, "openai-compatible")) as proxy:
            rc, result, out, _ = run_claude(claude, proxy, "run echo", "Bash")
        check(rc == 0 and result and "hello-from-tool" in result["result"],
              "exit %d: %s" % (rc, out[-300:]))
        # Claude Code asks for more than the window leaves (128000 for a name it does not
        # know); the server's 400 names the window, and each turn is retried at most once.
        fits = [len(json.dumps(r["body"])) // 4 + r["body"]["max_tokens"] <= 32768
                for r in fake.requests]
        check(len(fits) <= 4 and fits[-1] and not fits[0] and
              all(a or b for a, b in zip(fits, fits[1:])),
              "fits per upstream call: %s, max_tokens %s" % (
                  fits, [r["body"]["max_tokens"] for r in fake.requests]))

    @scenario("claude-cli with tool search on: the placeholder tool is never offered", skip)
    def _():
        fake = FakeOpenAI("tool").start()
        result, _ = claude_through(claude, fake, "run echo", "Bash",
                                   extra_env={"ENABLE_TOOL_SEARCH": None})
        check("hello-from-tool" in result["result"], result["result"])
        offered = {t["function"]["name"] for r in fake.requests for t in r["body"]["tools"]}
        check("Bash" in offered and "DeferredToolPlaceholder" not in offered,
              "tools offered: %s" % sorted(offered))


def cli_vendor_scenarios(claude, skip):
    """Issue #22: vendors' Anthropic-compatible endpoints, each fake refusing what that
    vendor refuses of Claude Code's own requests."""
    for ptype, vendor in (("kimi", "kimi"), ("glm", "glm"), ("minimax", "minimax"),
                          ("dashscope", "dashscope"), ("deepseek-anthropic", "deepseek")):
        @scenario("claude-cli %s: text, then a tool round trip with thinking" % ptype, skip)
        def _(ptype=ptype, vendor=vendor):
            env = {"CCPROXY_PROVIDER": ptype, "CCPROXY_UPSTREAM_API_KEY": "sk-vendor",
                   "CCPROXY_MODEL": "vendor-model"}
            with FakeAnthropic("tool", thinking=True, vendor=vendor, key="sk-vendor") as fake, \
                    Ccproxy(dict(env, CCPROXY_BASE_URL=fake.url)) as proxy:
                text_then_tool(claude, proxy)
                keys = {dict((k.lower(), v) for k, v in r["headers"]).get("x-api-key")
                        for r in fake.requests()}
            check(keys == {"sk-vendor"}, "keys the vendor got: %s" % keys)


def text_then_tool(claude, proxy):
    """`claude -p` twice through `proxy` to an e2e/fake_anthropic.py in its tool
    scenario: "say hi" gets its text, "run echo" a Bash round trip."""
    rc, result, out, _ = run_claude(claude, proxy, "say hi")
    check(rc == 0 and result and "Hello from the fake" in result["result"],
          "text turn: exit %d: %s" % (rc, out[-300:]))
    rc, result, out, _ = run_claude(claude, proxy, "run echo", "Bash")
    check(rc == 0 and result and "hello-from-tool" in result["result"],
          "tool turn: exit %d: %s" % (rc, out[-300:]))


def cloud_config(directory, provider):
    """A config file with one provider entry (clouds take fields no variable sets)."""
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump({"providers": [provider]}, f)
    return path


def cli_cloud_scenarios(claude, skip):
    """Issue #22: Claude on Vertex AI (a token from token_command) and on Bedrock."""
    @scenario("claude-cli vertex: text, then a tool round trip with thinking, token from a command",
              skip)
    def _():
        tmp = tempfile.mkdtemp(prefix="cc-vertex-")
        token = [sys.executable, "-c", "print('ya29.fake-token')"]
        with FakeAnthropic("tool", thinking=True, key="ya29.fake-token",
                           vertex="proj/us-east5") as fake, Ccproxy({"CCPROXY_CONFIG": cloud_config(
                               tmp, {"type": "vertex", "project": "proj", "region": "us-east5",
                                     "base_url": fake.url, "token_command": token,
                                     "model": "claude-sonnet-4-5@20250929"})}) as proxy:
            text_then_tool(claude, proxy)
            paths = {r["path"].rsplit(":", 1)[-1] for r in fake.requests()}
        check(paths == {"streamRawPredict"}, "Vertex methods called: %s" % paths)

    @scenario("claude-cli bedrock: text, then a tool round trip with thinking, SigV4, event stream", skip)
    def _():
        tmp = tempfile.mkdtemp(prefix="cc-bedrock-")
        with FakeBedrock("tool", credentials=("AKIDE2E", "e2e-secret", "e2e-session")) as fake:
            env = {"AWS_ACCESS_KEY_ID": "AKIDE2E", "AWS_SECRET_ACCESS_KEY": "e2e-secret",
                   "AWS_SESSION_TOKEN": "e2e-session", "AWS_EC2_METADATA_DISABLED": "true",
                   "CCPROXY_CONFIG": cloud_config(tmp, {
                       "type": "bedrock", "region": "us-east-1", "base_url": fake.url,
                       "model": "us.anthropic.claude-sonnet-4-5-20250929-v1:0"})}
            with Ccproxy(env) as proxy:
                text_then_tool(claude, proxy)
            paths = {r["path"] for r in fake.requests}
        check(paths == {"/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/"
                        "invoke-with-response-stream"}, "Bedrock paths: %s" % paths)


def cli_routing_scenarios(claude, skip):
    """Issue #21: four routes (background, thinking, long context, default) to four
    fakes; each of Claude Code's calls lands where the config says."""
    @scenario("claude-cli through four routes: background, thinking, long context, default",
              skip)
    def _():
        names = ("fast", "deep", "long", "main")
        fakes = {n: FakeOpenAI("text").start() for n in names}
        tmp = tempfile.mkdtemp(prefix="cc-routes-")
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump({"providers": [{"name": n, "type": "openai-compatible", "base_url":
                                      fakes[n].url, "model": n + "-model"} for n in names],
                       "routes": [{"when": "background", "provider": "fast"},
                                  {"when": "thinking", "provider": "deep"},
                                  {"when": "long_context", "min_tokens": 30000,
                                   "provider": "long"},
                                  {"match": "default", "provider": "main"}]}, f)
        runs = [(["--model", "claude-haiku-4-5"], "say hi", "fast"),
                (["--effort", "high"], "say hi", "deep"),
                ([], "say hi. " + "Some context to keep in mind. " * 3500, "long"),
                ([], "say hi", "main")]
        with Ccproxy({"CCPROXY_CONFIG": path}) as proxy:
            for args, prompt, expected in runs:
                before = {n: len(f.requests) for n, f in fakes.items()}
                rc, result, out, _ = run_claude(claude, proxy, prompt, args=args)
                check(rc == 0 and result, "%s: exit %d: %s" % (expected, rc, out[-300:]))
                got = {n for n, f in fakes.items() if len(f.requests) > before[n]}
                check(got == {expected}, "%s call went to %s" % (args or prompt[:20], got))


    @scenario("claude-cli's subagent (Agent tool) goes to the subagent route, the rest to "
              "the default", skip)
    def _():
        main, sub = FakeOpenAI("agent").start(), FakeOpenAI("text").start()
        tmp = tempfile.mkdtemp(prefix="cc-agent-")
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump({"providers": [{"name": n, "type": "openai-compatible",
                                      "base_url": fake.url, "model": n + "-model"}
                                     for n, fake in (("main", main), ("sub", sub))],
                       "routes": [{"when": "subagent", "provider": "sub"},
                                  {"match": "default", "provider": "main"}]}, f)
        with Ccproxy({"CCPROXY_CONFIG": path}) as proxy:
            rc, result, out, _ = run_claude(claude, proxy, "ask an agent to say hi", "Agent")
        check(rc == 0 and result, "exit %d: %s" % (rc, out[-300:]))
        check(len(sub.requests) == 1 and len(main.requests) == 2,
              "subagent calls %d, main calls %d" % (len(sub.requests), len(main.requests)))
        check("Hello from the fake" in tool_messages(chat_calls(main)[-1])[0]["content"],
              "the hand-back: %s" % tool_messages(chat_calls(main)[-1]))


def cli_search_scenarios(claude, skip):
    @scenario("claude-cli WebSearch on a route that cannot search: told so, in "
              "Anthropic's shape", skip)
    def _():
        fake = FakeOpenAI("websearch").start()
        result, _ = claude_through(claude, fake, "search the web", "WebSearch")
        said = [m["content"] for m in tool_messages(chat_calls(fake)[-1])]
        check(len(chat_calls(fake)) == 2 and said and "Web search error: unavailable" in
              said[0], "what the model got back: %s" % said)


    @scenario("claude-cli WebSearch through OpenRouter: its web plugin searches, the "
              "model gets the pages", skip)
    def _():
        fake = FakeOpenAI("websearch", quirk="openrouter").start()
        result, _ = claude_through(claude, fake, "search the web", "WebSearch",
                                   ptype="openrouter")
        searches = [r for r in chat_calls(fake) if r["body"].get("plugins")]
        said = [m["content"] for m in tool_messages(chat_calls(fake)[-1])]
        check(len(searches) == 1 and "tools" not in searches[0]["body"],
              "searches: %s" % [r["body"].get("plugins") for r in searches])
        check(said and "https://github.com/example/ccproxy" in said[0] and
              "ccproxy is a proxy" in said[0], "what the model got back: %s" % said)


def cli_responses_scenarios(claude, skip):
    """Issue #23: the Responses API, with reasoning carried across the tool call."""
    for kind in ("tool", "nosummary"):
        @scenario("claude-cli through the Responses API (%s): a Bash call, its reasoning "
                  "sent back as it came" % kind, skip)
        def _(kind=kind):
            fake = FakeResponses(kind).start()
            env = {"CCPROXY_PROVIDER": "openai-responses", "CCPROXY_BASE_URL": fake.url,
                   "CCPROXY_UPSTREAM_API_KEY": "sk-upstream", "CCPROXY_MODEL": "gpt-5-codex"}
            with Ccproxy(env) as proxy:
                rc, result, out, _ = run_claude(claude, proxy, "run echo", "Bash")
            check(rc == 0 and result and "hello-from-tool" in result.get("result", ""),
                  "exit %d: %s" % (rc, out[-300:]))
            calls = [r["body"] for r in fake.requests if r["path"] == "/v1/responses"]
            sent = [i for i in calls[-1]["input"] if i.get("type") == "reasoning"]
            made = fake.output(dict(calls[0], input=[]), 1)[0]
            check(len(calls) == 2 and sent == [made], "reasoning sent back: %s" % sent)


def cli_quirk_scenarios(claude, skip):
    for ptype in ("groq", "gemini", "deepseek", "ollama", "openrouter"):
        @scenario("claude-cli bash tool round trip, %s quirks" % ptype, skip)
        def _(ptype=ptype):
            fake = FakeOpenAI("tool", quirk=ptype).start()
            result, _ = claude_through(claude, fake, "run echo", "Bash", ptype=ptype)
            check("hello-from-tool" in result["result"], "answer: %s" % result["result"])
            if ptype == "ollama":     # asked without streaming when tools are present
                check(len(chat_calls(fake)) == 2, "%d upstream calls" % len(chat_calls(fake)))
            else:
                assert_streamed(fake, 2)
            if ptype == "gemini":
                calls = [m for m in fake.requests[1]["body"]["messages"] if m.get("tool_calls")]
                sig = calls[0]["tool_calls"][0].get("extra_content", {})
                check(sig.get("google", {}).get("thought_signature") == "sig-0",
                      "thought signature not replayed: %s" % calls)
                # Claude Code saw the id with the signature in it (sig_in_id); Gemini
                # gets its own id back, on the call and on the result.
                results = tool_messages(fake.requests[1])
                check(calls[0]["tool_calls"][0]["id"] == "call_1" and
                      [m["tool_call_id"] for m in results] == ["call_1"],
                      "ids sent back: %s" % calls)


def cli_probe_scenarios(claude, skip):
    """A server Claude Code cannot use as it stands: `check --probe` names the flag, and
    with the snippet it prints pasted into the config, Claude Code's tool call works."""
    for quirk in ("stream-drops-tools", "completion-tokens"):
        @scenario("check --probe finds the flag, then claude-cli works, %s" % quirk, skip)
        def _(quirk=quirk):
            fake = FakeOpenAI("tool", quirk=quirk).start()
            provider = {"name": "local", "type": "openai-compatible", "base_url": fake.url,
                        "model": "fake-model", "context_window": 65536}
            path = config_file({"providers": [provider]})
            code, out = probe(path)
            snippet = re.search(r'(?m)^     "quirks": (.*)$', out)
            check(code == 1 and snippet, "check --probe exit %d: %s" % (code, out[-600:]))
            provider["quirks"] = json.loads(snippet.group(1))
            with open(path, "w") as f:
                json.dump({"providers": [provider]}, f)
            code, out = probe(path)
            check(code == 0 and "no quirk flag to add" in out, "again: %s" % out[-600:])
            with Ccproxy({"CCPROXY_CONFIG": path}) as proxy:
                rc, result, out, _ = run_claude(claude, proxy, "run echo", "Bash")
                check(rc == 0 and result and "hello-from-tool" in result["result"],
                      "exit %d: %s" % (rc, out[-300:]))
                if quirk == "stream-drops-tools" and shutil.which("tmux"):
                    # Unfixed, interactive Claude Code ends the turn with nothing said.
                    interactive_turn(claude, dict(proxy.cli_env(), CCPROXY_CONFIG=path),
                                     "run echo", "Tool said: hello-from-tool", steps=[
                                         ("Do you want to proceed?", ["Enter"]),
                                         ("Enter to stay in auto mode", ["Enter"])])


def probe(path):
    """`ccproxy check --probe -c path` as a user runs it: (exit code, what it printed)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ccproxy.py"), "check",
                          "--probe", "-c", path, "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr


def cli_failure_scenarios(claude, skip):
    @scenario("claude-cli waits out a 429 with retry-after: 2, then succeeds", skip)
    def _():
        fake = FakeOpenAI("text", fail="429", retry_after=2).start()
        result, seconds = claude_through(claude, fake, "say hi")
        check(seconds >= 2.0, "answered after %.1f s, before retry-after" % seconds)
        check(len(chat_calls(fake)) == 2, "%d upstream calls" % len(chat_calls(fake)))

    @scenario("claude-cli fails at once on a 401, with the provider's message", skip)
    def _():
        fake = FakeOpenAI("text", fail="401", fail_count=100).start()
        with Ccproxy(openai_env(fake)) as proxy:
            rc, result, out, seconds = run_claude(claude, proxy, "say hi")
        check(rc != 0, "exit 0 on a 401")
        check("Incorrect API key provided" in out, "message not shown: %s" % out[-300:])
        check(len(fake.requests) == 1, "retry storm: %d calls" % len(fake.requests))
        check(seconds < 20, "took %.1f s" % seconds)

    @scenario("claude-cli retries a mid-stream error and succeeds", skip)
    def _():
        fake = FakeOpenAI("text", fail="midstream").start()
        result, _ = claude_through(claude, fake, "say hi")
        check("Hello from the fake OpenAI server" in result["result"], result["result"])
        check(len(fake.requests) >= 2, "%d upstream calls" % len(fake.requests))


def cli_usage_scenarios(claude, skip):
    """Issue #24: a named client key's calls in the ledger, and its budget enforced."""
    @scenario("claude-cli with a named client key: its call in `ccproxy usage`, then "
              "told it is over its budget", skip)
    def _():
        fake = FakeOpenAI("text").start()
        path = config_file({"providers": [{"name": "oa", "type": "openai-compatible",
                                           "base_url": fake.url, "model": "gpt-4o"}],
                            "client_keys": [{"name": "alice", "key_env": "ALICE_KEY",
                                             "monthly_budget_usd": 0.001}]})
        key = {"ANTHROPIC_AUTH_TOKEN": "sk-alice-e2e"}
        with Ccproxy({"CCPROXY_CONFIG": path, "ALICE_KEY": key["ANTHROPIC_AUTH_TOKEN"]}) as proxy:
            first = run_claude(claude, proxy, "say hi", extra_env=key)
            second = run_claude(claude, proxy, "say hi", extra_env=key)
            rows = usage_rows(proxy)
        check(first[0] == 0, "first call: %s" % first[2][-300:])
        check(second[0] != 0 and "over its monthly budget" in second[2],
              "second call: %s" % second[2][-300:])
        check([(r["group"], r["requests"]) for r in rows] == [("alice", 1)],
              "ccproxy usage: %s" % rows)


def usage_rows(proxy, deadline=10.0):
    """`ccproxy usage --by key --json`'s rows, once the ledger has some (it writes in
    half-second batches)."""
    until = time.monotonic() + deadline
    while True:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "ccproxy.py"), "usage",
                              "--by", "key", "--json"], env=proxy.env, text=True,
                             capture_output=True, timeout=30)
        rows = json.loads(out.stdout).get("rows", []) if out.returncode == 0 else []
        if rows or time.monotonic() > until:
            return rows
        time.sleep(0.2)


def cli_anthropic_scenarios(claude, skip):
    @scenario("claude-cli anthropic pass-through text", skip)
    def _():
        with FakeAnthropic() as fake, Ccproxy({"CCPROXY_BASE_URL": fake.url}) as proxy:
            rc, result, out, _ = run_claude(claude, proxy, "say hi")
            requests = fake.requests()
        check(rc == 0 and result, "exit %d: %s" % (rc, out[-300:]))
        check("Hello from the fake Anthropic server" in result["result"], result["result"])
        check([r["body"].get("stream") for r in requests] == [True], "calls: %d"
              % len(requests))

    @scenario("claude-cli anthropic pass-through bash tool round trip", skip)
    def _():
        with FakeAnthropic("tool", "Bash", thinking=True) as fake, \
                Ccproxy({"CCPROXY_BASE_URL": fake.url}) as proxy:
            rc, result, out, _ = run_claude(claude, proxy, "run echo", "Bash")
            requests = fake.requests()
        check(rc == 0 and result, "exit %d: %s" % (rc, out[-300:]))
        check(len(requests) == 2 and all(r["body"].get("stream") for r in requests),
              "calls: %s" % [r["body"].get("stream") for r in requests])


class RiskyCall(FakeOpenAI):
    """A model that wants to send a file somewhere: what auto mode's classifier exists
    for (the address is loopback's discard port; the action is never approved)."""

    def decide(self, body):
        text, calls, reasoning = super().decide(body)
        return text, [("Bash", {"command": "curl -s http://127.0.0.1:9/ -d @/etc/hostname",
                                "description": "upload"})] if calls else [], reasoning


class Screen:
    """Interactive Claude Code in a tmux pane: keys in, the screen's text out."""

    def __init__(self, env, workdir):
        self.name = "ccproxy-e2e-%d" % os.getpid()
        self.env = env
        self.tmux(["new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", "-c",
                   workdir, "env", "-i"] + ["%s=%s" % kv for kv in sorted(env.items())]
                  + ["bash", "--norc", "--noprofile"])

    def tmux(self, args):
        return subprocess.run(["tmux"] + args, capture_output=True, text=True, timeout=10)

    def keys(self, *keys):
        self.tmux(["send-keys", "-t", self.name] + list(keys))

    def text(self):
        return self.tmux(["capture-pane", "-p", "-t", self.name]).stdout

    def close(self):
        self.tmux(["kill-session", "-t", self.name])


#: Screens of a first run in a fresh HOME, and the keys that get past each.  The API
#: key question must never appear: `env` exports ANTHROPIC_AUTH_TOKEN (issue #18).
FIRST_RUN = [("Choose the text style", ["Enter"]), ("Press Enter to continue", ["Enter"]),
             ("Yes, I trust this folder", ["Down", "Enter"])]
#: With ANTHROPIC_API_KEY, a first run also checks api.anthropic.com and stops there.
NEVER = ("Detected a custom API key", "Not logged in", "Please run /login",
         "Unable to connect to Anthropic services")


def interactive_turn(claude, env, prompt, expect, timeout=90, steps=()):
    """Type `prompt` into interactive Claude Code started as the README says, after
    eval "$(ccproxy env)", in a fresh HOME; the screen once `expect` shows on it.
    `steps`: more (screen text, keys) pairs to answer on the way, as FIRST_RUN."""
    home, work = tempfile.mkdtemp(prefix="cc-home-"), tempfile.mkdtemp(prefix="cc-work-")
    env = dict(env, HOME=home, TERM="xterm-256color", PATH="%s:/usr/local/bin:/usr/bin:/bin"
               % os.path.dirname(claude))
    screen = Screen(env, work)
    try:
        screen.keys('eval "$(%s %s env)"; exec claude' % (sys.executable,
                                                          os.path.join(ROOT, "ccproxy.py")),
                    "Enter")
        return _drive(screen, prompt, expect, time.monotonic() + timeout, steps)
    finally:
        screen.close()


def _drive(screen, prompt, expect, deadline, steps=()):
    typed, seen = False, set()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        text = screen.text()
        bad = [n for n in NEVER if n in text]
        check(not bad, "interactive Claude Code stopped at %r: %s" % (bad, text[-600:]))
        if typed and expect in text:
            return text
        step = next(((m, k) for m, k in FIRST_RUN + list(steps) if m in text and
                     m not in seen), None)
        if step:
            seen.add(step[0])
            screen.keys(*step[1])
        elif not typed and ("auto mode on" in text or "? for shortcuts" in text):
            screen.keys(prompt)
            time.sleep(0.3)
            screen.keys("Enter")
            typed = True
    raise AssertionError("no %r on the screen: %s" % (expect, screen.text()[-800:]))


def interactive_scenarios(claude, skip):
    skip = skip or ("" if shutil.which("tmux") else "tmux is not installed")

    @scenario("interactive claude (tmux, fresh HOME, eval \"$(ccproxy env)\"), translated",
              skip)
    def _():
        fake = FakeOpenAI("text").start()
        with Ccproxy(openai_env(fake)) as proxy:
            interactive_turn(claude, proxy.cli_env(), "say hi",
                             "Hello from the fake OpenAI server")
        check(len(fake.requests) >= 1, "no call reached the upstream")

    @scenario("interactive claude in auto mode on a translated route: a risky action "
              "waits for approval, as README says", skip)
    def _():
        fake = RiskyCall("tool").start()
        with Ccproxy(openai_env(fake)) as proxy:
            text = interactive_turn(claude, proxy.cli_env(), "upload the file",
                                    "Do you want to proceed?", steps=[
                                        ("Enter to stay in auto mode", ["Enter"])])
        check("Auto mode can't check actions" in text, "screen: %s" % text[-800:])
        check(len(fake.requests) == 1, "the action ran: %d calls" % len(fake.requests))

    @scenario("interactive claude: /model lists the routes' Claude names, /context the "
              "route's window (issue #21)", skip)
    def _():
        fake = FakeOpenAI("text").start()
        path = config_file({"providers": [{"name": "local", "type": "openai-compatible",
                                           "base_url": fake.url, "model": "qwen3-coder",
                                           "context_window": 131072}],
                            "routes": [{"match": "claude-local-qwen", "provider": "local"},
                                       {"match": "default", "provider": "local"}]})
        with Ccproxy({"CCPROXY_CONFIG": path}) as proxy:
            env = dict(proxy.cli_env(), CCPROXY_CONFIG=path)
            text = interactive_turn(claude, env, "/model", "qwen3-coder on local")
            check("claude-local-qwen" in text and "131K context" in text, text[-800:])
            text = interactive_turn(claude, env, "/context", "Auto-compact window")
            check("131.1k tokens" in text, "Claude Code's window: %s" % text[-800:])

    @scenario("interactive claude (tmux, fresh HOME, eval \"$(ccproxy env)\"), pass-through "
              "with CCPROXY_API_KEY", skip)
    def _():
        keys = {"CCPROXY_API_KEY": "proxy-client-key", "CCPROXY_UPSTREAM_API_KEY": "sk-up"}
        with FakeAnthropic() as fake, Ccproxy(dict(keys, CCPROXY_BASE_URL=fake.url)) as proxy:
            env = dict(proxy.cli_env(), CCPROXY_API_KEY=keys["CCPROXY_API_KEY"],
                       ANTHROPIC_API_KEY="sk-users-own")
            interactive_turn(claude, env, "say hi", "Hello from the fake Anthropic server")
            sent = [dict((k.lower(), v) for k, v in r["headers"]) for r in fake.requests()]
        check(sent and all(h.get("x-api-key") == "sk-up" and "authorization" not in h
                           for h in sent), "upstream keys: %s" % [
                               (h.get("x-api-key"), h.get("authorization")) for h in sent])


SDK_SCRIPT = r'''
import json, sys, anthropic
client = anthropic.Anthropic(base_url=sys.argv[1], api_key="sk-test", max_retries=0)
model = "claude-sonnet-5-5"
out = {}
msg = client.messages.create(model=model, max_tokens=100,
                             messages=[{"role": "user", "content": "say hi"}])
out["create"] = [msg.model, msg.content[0].text, msg.stop_reason]
with client.messages.stream(model=model, max_tokens=100,
                            messages=[{"role": "user", "content": "say hi"}]) as stream:
    out["stream_text"] = "".join(stream.text_stream)
tools = [{"name": "Bash", "description": "run a command", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}]
with client.messages.stream(model=model, max_tokens=100, tools=tools,
                            messages=[{"role": "user", "content": "run echo"}]) as stream:
    final = stream.get_final_message()
out["stream_tool"] = [[b.type, getattr(b, "name", None), getattr(b, "input", None)]
                      for b in final.content] + [final.stop_reason]
count = client.messages.count_tokens(model=model, tools=tools,
                                     messages=[{"role": "user", "content": "hi"}])
out["count_tokens"] = count.input_tokens
print(json.dumps(out))
'''


def sdk_scenarios(python, skip):
    def run_sdk(proxy):
        out = subprocess.run([python, "-c", SDK_SCRIPT, proxy.url], capture_output=True,
                             text=True, timeout=60)
        check(out.returncode == 0, "SDK failed: %s" % out.stderr.strip()[-400:])
        return json.loads(out.stdout)

    @scenario("anthropic SDK on an OpenAI route: create, stream, tool stream, count_tokens",
              skip)
    def _():
        fake = FakeOpenAI("tool").start()
        with Ccproxy(openai_env(fake)) as proxy:
            got = run_sdk(proxy)
        check(got["create"][0] == "claude-sonnet-5-5", "model: %s" % got["create"])
        check("Hello" in got["create"][1] and "Hello" in got["stream_text"], got)
        check(got["stream_tool"][0][:2] == ["tool_use", "Bash"] and
              got["stream_tool"][-1] == "tool_use", "tool stream: %s" % got["stream_tool"])
        check(got["stream_tool"][0][2] == {"command": "echo hello-from-tool",
                                           "description": "say hello"}, got["stream_tool"])
        check(got["count_tokens"] > 0, "count_tokens: %s" % got["count_tokens"])

    @scenario("anthropic SDK on the Anthropic pass-through: create, stream, tool stream, "
              "count_tokens", skip)
    def _():
        with FakeAnthropic("tool", "Bash") as fake, \
                Ccproxy({"CCPROXY_BASE_URL": fake.url}) as proxy:
            got = run_sdk(proxy)
        check(any(b[:2] == ["tool_use", "Bash"] for b in got["stream_tool"][:-1]) and
              got["stream_tool"][-1] == "tool_use", got["stream_tool"])
        check(got["create"][1] and got["stream_text"], got)
        check(got["count_tokens"] > 0, "count_tokens: %s" % got["count_tokens"])


def readme_curl_scenarios():
    """The README's curl lines, run verbatim against a zero-config ccproxy on 3456 (free
    inside the network namespace)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    lines = []
    for block in re.findall(r"```(?:sh|console)\n(.*?)```", readme, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"^\$ ", "", line.strip())
            if line.startswith("curl ") or line.startswith("[ \"$(curl"):
                lines.append(line)
    skip = "" if in_sandbox() else "not in a private network namespace (port 3456 may be taken)"
    if not shutil.which("curl"):
        skip = "curl is not installed"

    @scenario("README curl examples, verbatim (%d lines)" % len(lines), skip)
    def _():
        for line in lines:            # each against a fresh proxy, as a reader would
            if "jq" in line and not shutil.which("jq"):
                continue
            with Ccproxy({}, port=3456):
                out = subprocess.run(["sh", "-c", line], capture_output=True, text=True,
                                     timeout=30)
                check(out.returncode == 0, "%s -> exit %d %s" % (line, out.returncode,
                                                                 out.stderr[-200:]))
                check("down" not in out.stdout and "trouble" not in out.stdout,
                      "%s -> %s" % (line, out.stdout[-200:]))
                text = out.stdout.strip()
                if text.startswith("{"):
                    json.loads(text)


NGINX_MAIN = """
%(user)s
daemon off;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %(dir)s/body;
  proxy_temp_path %(dir)s/proxy;
  include %(dir)s/ccproxy-upstream.conf;
}
"""


def load_balancer_scenario(nginx, skip):
    """examples/nginx-ccproxy.conf in front of two ccproxy instances; one restarts
    gracefully in the middle of the load: not one request may fail."""
    @scenario("two ccproxy instances behind nginx, one restarted under load: zero failed",
              skip)
    def _():
        tmp = tempfile.mkdtemp(prefix="e2e-lb-")
        os.chmod(tmp, 0o755)
        fake = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "fake_upstream.py"),
                                 "--port-file", os.path.join(tmp, "fake.port"), "--events",
                                 "10", "--delay", "0.05"])
        try:
            _run_behind_nginx(nginx, tmp, fake)
        finally:
            fake.terminate()
            fake.wait(10)


def _run_behind_nginx(nginx, tmp, fake):
    deadline = time.monotonic() + 10
    while not os.path.exists(os.path.join(tmp, "fake.port")):
        check(time.monotonic() < deadline, "fake upstream did not start")
        time.sleep(0.02)
    upstream = "http://127.0.0.1:%s" % open(os.path.join(tmp, "fake.port")).read()
    ports, lb = [free_port(), free_port()], free_port()
    envs = [dict(os.environ, CCPROXY_BASE_URL=upstream, CCPROXY_PORT=str(p),
                 CCPROXY_PID_FILE=os.path.join(tmp, "cc%d.pid" % p),
                 CCPROXY_LOG_FILE=os.path.join(tmp, "cc%d.log" % p), CCPROXY_CONFIG="")
            for p in ports]
    for env in envs:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "ccproxy.py"), "start"],
                             env=env, capture_output=True, text=True, timeout=60)
        check(out.returncode == 0, "start: " + out.stderr)
    with open(os.path.join(ROOT, "examples", "nginx-ccproxy.conf")) as f:
        snippet = f.read().replace("127.0.0.1:3456", "127.0.0.1:%d" % ports[0]).replace(
            "127.0.0.1:3457", "127.0.0.1:%d" % ports[1]).replace("127.0.0.1:8080",
                                                                 "127.0.0.1:%d" % lb)
    with open(os.path.join(tmp, "ccproxy-upstream.conf"), "w") as f:
        f.write(snippet)
    with open(os.path.join(tmp, "nginx.conf"), "w") as f:
        f.write(NGINX_MAIN % {"dir": tmp, "user": "user root;" if os.geteuid() == 0 else ""})
    proxy = subprocess.Popen([nginx, "-c", os.path.join(tmp, "nginx.conf"), "-p", tmp],
                             stderr=subprocess.DEVNULL)
    try:
        _load_and_restart(lb, envs[0])
    except AssertionError as exc:
        logs = [os.path.join(tmp, "nginx-error.log")] + [e["CCPROXY_LOG_FILE"] for e in envs]
        lines = [l.strip() for path in logs if os.path.exists(path)
                 for l in open(path) if "error" in l.lower() or "WARNING" in l]
        raise AssertionError("%s | logs: %s" % (exc, " || ".join(lines[-6:])))
    finally:
        proxy.terminate()
        proxy.wait(10)
        for env in envs:
            subprocess.run([sys.executable, os.path.join(ROOT, "ccproxy.py"), "stop"],
                           env=env, capture_output=True, timeout=60)


def _load_and_restart(port, restart_env, clients=32, seconds=8.0):
    import threading
    body = json.dumps({"model": "claude-x", "max_tokens": 10, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    counts, errors, stop = {"ok": 0}, [], time.monotonic() + seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            try:
                conn.request("POST", "/v1/messages", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status == 200 and data.rstrip().endswith(b'"message_stop"}'):
                    counts["ok"] += 1
                else:
                    errors.append("status %d %s" % (resp.status, data[-80:]))
            except (OSError, http.client.HTTPException) as exc:
                errors.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            check(time.monotonic() < deadline, "nginx did not start")
            time.sleep(0.05)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds / 3)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ccproxy.py"), "restart"],
                         env=restart_env, capture_output=True, text=True, timeout=60)
    for t in threads:
        t.join(60)
    check(out.returncode == 0, "restart: " + out.stderr)
    check(not errors, "%d of %d requests failed: %s" % (len(errors), len(errors) + counts["ok"],
                                                       sorted(set(errors))[:3]))
    check(counts["ok"] > 100, "only %d requests completed" % counts["ok"])


#: Chromium without its own traffic (updates, sync, dictionaries): what the net log then
#: holds is the page's.
CHROMIUM_QUIET = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-default-apps", "--disable-extensions",
                  "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                  "--disable-features=Translate,OptimizationHints,MediaRouter,SpellCheck",
                  "--enable-logging=stderr", "--v=0")


def status_page_scenario(chromium, skip):
    """Issue #25: the page in a real browser, with one provider failing."""
    @scenario("the status page in headless Chromium: nothing fetched from elsewhere, no "
              "console error, the failing provider shown, refreshed in place", skip)
    def _():
        good = FakeOpenAI("text").start()
        path = config_file({"providers": [
            {"name": "good", "type": "openai-compatible", "base_url": good.url,
             "model": "fake-model"},
            {"name": "broken", "type": "openai-compatible",
             "base_url": "http://127.0.0.1:%d/v1" % free_port(), "model": "fake-model"}],
            "routes": [{"name": "fast", "match": "*haiku*", "provider": "broken"},
                       {"match": "default", "provider": "good"}]})
        with Ccproxy({"CCPROXY_CONFIG": path}) as proxy:
            for model in ("claude-sonnet-5-5", "claude-haiku-5-5") * 2:
                post_json(proxy.url + "/v1/messages", {"model": model, "max_tokens": 8,
                                                       "messages": [{"role": "user",
                                                                     "content": "hi"}]})
            served = get_json(proxy.url + "/status")["requests_served"]
            dom, console, urls = run_chromium(chromium, proxy.url + "/")
            screenshot(chromium, proxy.url + "/ui")
        check(not console, "console: %s" % console[:3])
        check(urls and all(u.startswith(proxy.url + "/") for u in urls), "fetched: %s" % urls)
        check("Provider broken is disconnected" in dom and "could not connect" in dom,
              "the failing provider: %s" % dom[:600])
        now = int(re.search(r"(\d+) requests served", dom).group(1))
        check(now >= served + 2 and proxy.url + "/ui?fragment=1" in urls,
              "not refreshed: %d requests served on the page, %d before it" % (now, served))


def run_chromium(chromium, url):
    """(the DOM after one refresh, console lines, every URL it fetched)."""
    netlog = os.path.join(tempfile.mkdtemp(prefix="cc-chromium-"), "net.json")
    out = subprocess.run([chromium] + list(CHROMIUM_QUIET) + [
        "--virtual-time-budget=8000", "--log-net-log=" + netlog, "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    return out.stdout, console, page_requests(netlog, url)


def page_requests(netlog, url):
    """The URLs the page fetched, from Chromium's net log: the requests made for its
    site (network_isolation_key), not the browser's own (updates and the like, which
    the sandbox's network namespace keeps off the network anyway)."""
    with open(netlog) as f:
        log = json.load(f)
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    site = "%s://%s" % (urllib.parse.urlsplit(url).scheme, urllib.parse.urlsplit(url).hostname)
    return sorted({e["params"]["url"] for e in log.get("events", [])
                   if e.get("type") == start and str(e.get("params", {}).get(
                       "network_isolation_key", "")).startswith(site)})


def screenshot(chromium, url):
    """The page as a person sees it, kept as an artefact in .cache/e2e/."""
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run([chromium] + list(CHROMIUM_QUIET) + [
        "--window-size=1280,900", "--screenshot=" + os.path.join(CACHE, "status-page.png"),
        url], capture_output=True, timeout=120)


def post_json(url, doc):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", parts.path, json.dumps(doc), {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get_json(url):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def in_sandbox():
    return os.environ.get("CCPROXY_E2E_NETNS") == "1"


def main(argv):
    if "--inside" not in argv:
        claude, why_cli = install_claude()
        python, why_sdk = install_sdk()
        nginx, why_nginx = install_nginx()
        chromium, why_chromium = install_chromium()
        env = dict(os.environ, E2E_CLAUDE=claude or "", E2E_WHY_CLI=why_cli,
                   E2E_PYTHON=python or "", E2E_WHY_SDK=why_sdk, E2E_NGINX=nginx or "",
                   E2E_WHY_NGINX=why_nginx, E2E_CHROMIUM=chromium or "",
                   E2E_WHY_CHROMIUM=why_chromium)
        inner = [sys.executable, os.path.abspath(__file__), "--inside"]
        if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
            env["CCPROXY_E2E_NETNS"] = "1"
            inner = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] + inner
        return subprocess.run(inner, env=env).returncode
    started = time.monotonic()
    claude, python = os.environ.get("E2E_CLAUDE"), os.environ.get("E2E_PYTHON")
    skip_cli = "" if claude else "Claude Code CLI unavailable: " + os.environ.get("E2E_WHY_CLI")
    skip_sdk = "" if python else "anthropic SDK unavailable: " + os.environ.get("E2E_WHY_SDK")
    cli_openai_scenarios(claude, skip_cli)
    cli_quirk_scenarios(claude, skip_cli)
    cli_stream_shape_scenarios(claude, skip_cli)
    cli_vendor_scenarios(claude, skip_cli)
    cli_cloud_scenarios(claude, skip_cli)
    cli_routing_scenarios(claude, skip_cli)
    cli_responses_scenarios(claude, skip_cli)
    cli_search_scenarios(claude, skip_cli)
    cli_probe_scenarios(claude, skip_cli)
    cli_failure_scenarios(claude, skip_cli)
    cli_anthropic_scenarios(claude, skip_cli)
    cli_usage_scenarios(claude, skip_cli)
    interactive_scenarios(claude, skip_cli)
    sdk_scenarios(python, skip_sdk)
    readme_curl_scenarios()
    nginx = os.environ.get("E2E_NGINX")
    load_balancer_scenario(nginx, "" if nginx else os.environ.get("E2E_WHY_NGINX"))
    chromium = os.environ.get("E2E_CHROMIUM")
    status_page_scenario(chromium, "" if chromium else os.environ.get("E2E_WHY_CHROMIUM"))
    passed, failed, skipped = (RESULTS.count(k) for k in ("pass", "fail", "skip"))
    print("e2e: %.0f s" % (time.monotonic() - started))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
