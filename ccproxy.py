#!/usr/bin/env python3
"""ccproxy: a proxy daemon for Claude Code and every Anthropic Messages API client.

One file, Python standard library only, CPython 3.9 or newer.  Not to be confused with
the archived Go orchestre-dev/ccproxy, CaddyGlow/ccproxy-api or starbaser/ccproxy.

Clients set ANTHROPIC_BASE_URL=http://127.0.0.1:3456; ccproxy forwards each call to the
provider its route names: Anthropic itself (pass-through) or any OpenAI Chat Completions
provider (OpenAI, Azure, Groq, OpenRouter, DeepSeek, Gemini, Ollama, vLLM…), translating
requests, streams, tools, images, thinking, usage and errors both ways.  Every chunk is
written the moment it arrives; a provider that fails before the first byte reached the
client hands the call to the next one in the fallback order.

Synopsis::

    python3 ccproxy.py run      [options]   foreground (what systemd runs, Type=notify)
    python3 ccproxy.py start    [options]   daemonise; exit 0 once the port accepts
    python3 ccproxy.py stop     [--force] [--timeout S]
    python3 ccproxy.py restart  [options]
    python3 ccproxy.py reload               re-read the config (SIGHUP), keep connections
    python3 ccproxy.py status   [--json]    exit 0 running, 1 dead with PID file, 3 stopped
    python3 ccproxy.py check                validate config, probe providers, explain
    python3 ccproxy.py env                  exports that point Claude Code at the proxy
    python3 ccproxy.py version

Options: -c/--config FILE, --host, --port, --pid-file, --log-file, --log-level,
--workers N, --allow-remote.

Endpoints: POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models (any path
prefix, any query), GET /status, /health, /health/detailed, /status/ready, /health/ready,
/metrics (Prometheus 0.0.4), HEAD / and HEAD /api/hello.

Configuration precedence: built-in defaults < JSON config file (-c) < CCPROXY_* environment
< command line.  One pure function (build_config) turns the three into a frozen Config;
a bad value fails start-up with exit 2 and one line naming the key.

Exit codes: 0 ok, 1 failure, 2 usage or config error; `status` uses the LSB codes
0 running, 1 dead but PID file left, 3 not running, 4 unknown.

Design notes
------------
Thread model: ThreadingHTTPServer, one daemon thread per connection, at most
max_connections of them (then a few reserve slots that serve only the probes, then a
fixed 503).  The main thread never serves: it owns signals (handlers only queue the
signal number and wake it), the systemd watchdog, reload and drain.  serve_forever runs
on its own thread so that shutdown() can be called from the main thread without
deadlock.  `run --workers N` forks N such processes sharing the port (SO_REUSEPORT)
under a supervisor; they write reports to a shared directory so that any of them can
answer /status, /metrics and /status/ready for the whole service.

Start-up: a script is compiled from source at every start (never cached), and the
compiler leaves ~13 MB in RSS; `run` therefore re-executes itself (same PID) into an
interpreter that imports ccproxy from its cached bytecode, when it can write or find it,
without site (-S) and without glibc's per-thread malloc cache (see malloc_tunables).

Shutdown (SIGTERM/SIGINT): readiness turns 503, STOPPING=1 is sent, the connections the
kernel already queued are accepted, the listener is closed, idle keep-alive connections
are closed, in-flight requests (streams included) finish within drain_timeout, responses
still running carry Connection: close, the PID file is removed, exit 0.  A second signal
exits at once.

The PID file is locked with flock() for the daemon's whole life: status and stop trust
the lock, never the number in the file, so a stale file after kill -9 never blocks a
start and a recycled PID never fools stop.

Security: keys are compared as SHA-256 digests in constant time; only the socket peer
counts as loopback (X-Forwarded-For never grants anything); binding beyond loopback
without CCPROXY_API_KEY is refused unless allow_remote is set; no key, prompt or
completion is ever logged; /status shows only whether a key is configured.

Translation (OpenAI routes) is built from allow-lists: the upstream body carries only
fields that route is known to accept, because Claude Code answers a 400 with six
downgraded re-sends.  Provider differences are rows of quirk flags (PROVIDER_QUIRKS),
never branches in the code; a config file overrides any flag per provider.

Not supported (deliberately): TLS termination (put a TLS proxy in front), HTTP/2,
request bodies with Transfer-Encoding: chunked (answered 411; every known client sends
Content-Length).
"""

__version__ = "0.3.0"

#: Stamped by `make install`; otherwise read from the checkout's .git, else "unknown".
BUILD_COMMIT = None
BUILD_DATE = None

__all__ = [
    "Config", "ConfigError", "CcproxyError", "ProviderConfig", "RouteConfig",
    "Service", "build_config", "load_config", "main",
]

import _thread
import argparse
import base64
import calendar
import collections
import csv
import dataclasses
import datetime
import errno
import fcntl
import fnmatch
import functools
import hashlib
import hmac
import html
import http.client
import http.server
import importlib.util
import io
import ipaddress
import json
import logging
import os
import py_compile
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

try:                      # some distributions build Python without it (issue #24)
    import sqlite3
except ImportError:       # pragma: no cover - the ledger is off then
    sqlite3 = None

# ---- Constants -----------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3456
DEFAULT_DRAIN_TIMEOUT = 25.0      # below the unit's TimeoutStopSec=35
DEFAULT_USAGE_RETENTION_DAYS = 90 # the ledger prunes older rows (docs/operating.md §10)
DEFAULT_IDLE_TIMEOUT = 120.0      # keep-alive idle limit per client connection
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 600.0      # Claude Code's own API_TIMEOUT_MS default
#: Claude Code's biggest real bodies (images and PDFs in history) reach tens of MB.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: An upstream's reply read whole (not streamed), and one event of a translated stream:
#: read without a bound, a 600 MB reply took the daemon to 1.9 GB (issue #17).
DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
LISTEN_BACKLOG = 1024             # ThreadingHTTPServer's default of 5 makes SYNs retry
HEARTBEAT_STALE = 10.0            # /health fails when the serve loop is this late
POOL_MAX_IDLE = 128               # idle upstream connections kept per host (64 busy
                                  # streams to one host must not churn connections)
POOL_IDLE_SECONDS = 60.0          # idle upstream connections older than this are closed
RESOLVE_SECONDS = 30.0            # an upstream host's addresses are looked up again after
                                  # this (Java's default DNS cache time)
RELAY_CHUNK = 65536
MAX_HEAD_LINE = 65536             # an HTTP head's limits, both sides (http.client's)
MAX_HEAD_FIELDS = 100
MAX_INTERIM = 16                  # 1xx heads skipped before a final one (RFC 9110 §15.2)
READ_BUFFER = 512                 # per-socket read buffer, both sides.  Bodies and
                                  # streams bypass it (read1); a head takes a few reads.
                                  # At 512 bytes it comes from Python's small-object
                                  # allocator, not malloc, so a thousand long-lived buffers
                                  # do not fragment the C heap.  8 KB (the default) cost
                                  # 12 MB per 1000 open streams, 2 KB 3 MB (make bench).
DEFAULT_HEADER_TIMEOUT = 30.0     # absolute: first byte to the end of the request head
DEFAULT_BODY_TIMEOUT = 300.0      # absolute: the whole body (64 MiB on a slow link)
FRESH_GRACE = 1.0                 # seconds a drain waits for new connections' requests
DEFAULT_MAX_CONNECTIONS = 1024    # client connections served at once
START_WAIT = 15.0                 # seconds `start` (and a supervisor) waits for "ready"
RESERVE_CONNECTIONS = 16          # beyond the cap: slots that serve only /health, /status
#: Seconds a new connection may wait before its first byte (then idle_timeout between
#: requests); one in a reserve slot gets far less, as probes send at once.  Silent
#: connections held their slot for idle_timeout: max_connections and the reserve of
#: them made everything answer 503, probes included (issue #17).
FIRST_REQUEST_WAIT = 10.0
RESERVE_FIRST_WAIT = 1.0
PING_INTERVAL = 15.0              # a translated stream silent this long gets an SSE ping
FIRST_EVENT_WAIT = 10.0           # a translated stream commits (head, message_start) once
                                  # its first upstream event is this late (§3.4 S0)
STOP_AND_RELOAD = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
CIRCUIT_THRESHOLD = 3             # consecutive failures that open a provider's circuit
CIRCUIT_COOLDOWN = 30.0           # seconds it stays open before one trial call
MINUTES = 60                      # the status page's history, per provider and minute
#: Histogram buckets (seconds): whole requests run from milliseconds to many minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
CLIENT_KEY_HEADERS = ("x-api-key", "authorization")

#: RFC 9110 §7.6.1 plus the single-hop proxy fields and Go's `Trailer`.
HOP_BY_HOP = frozenset((
    "connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
))
#: Request headers never copied upstream: hop-by-hop, framing we recompute, credentials
#: we set ourselves, Accept-Encoding (we ask for identity to relay bytes untouched), and
#: Content-Encoding (a compressed body is decoded on arrival: decode_body).
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect",
                             "content-encoding"}
#: Response headers never copied to the client: hop-by-hop, framing, and ids we replace.
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server", "request-id"}

class ProviderType(collections.namedtuple("ProviderType", "base_url key_vars key_hosts "
                                                           "needs_key dialect")):
    """What a provider type brings: its default base URL; the environment variables
    that may hold its key, and the hosts (fnmatch patterns) such a key may be sent to;
    whether its calls need a key at all (local servers need none); the wire format it
    speaks (a name in DIALECTS, issue #22).  A custom base_url never gets a key from
    those variables: a user's OPENAI_API_KEY must not reach a self-hosted or
    third-party host (issue #18)."""


#: The anthropic type reads no usual variable on purpose: with no key configured the
#: client's own key is forwarded (the zero-config pass-through), and ANTHROPIC_API_KEY
#: in the proxy's environment is usually the client's.
_OPENAI_KEY = (("OPENAI_API_KEY",), ("api.openai.com",))       # key variables, hosts
_AZURE_KEY = (("AZURE_OPENAI_API_KEY",), ("*.openai.azure.com",
                                          "*.cognitiveservices.azure.com",
                                          "*.services.ai.azure.com"))
PROVIDER_TYPES = {
    "anthropic": ProviderType("https://api.anthropic.com", (), (), False, "anthropic"),
    "openai": ProviderType("https://api.openai.com/v1", *_OPENAI_KEY, True, "openai"),
    "azure": ProviderType("", *_AZURE_KEY, True, "openai"),
    "groq": ProviderType("https://api.groq.com/openai/v1", ("GROQ_API_KEY",),
                         ("api.groq.com",), True, "openai"),
    "openrouter": ProviderType("https://openrouter.ai/api/v1", ("OPENROUTER_API_KEY",),
                               ("openrouter.ai",), True, "openai"),
    "deepseek": ProviderType("https://api.deepseek.com", ("DEEPSEEK_API_KEY",),
                             ("api.deepseek.com",), True, "openai"),
    "gemini": ProviderType("https://generativelanguage.googleapis.com/v1beta/openai",
                           ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
                           ("generativelanguage.googleapis.com",), True, "openai"),
    "ollama": ProviderType("http://127.0.0.1:11434/v1", (), (), False, "openai"),
    # OpenAI's Responses API (issue #23): api.openai.com, Azure's v1 API, or any server
    # that implements it.
    "openai-responses": ProviderType("https://api.openai.com/v1", *_OPENAI_KEY, True,
                                     "responses"),
    "azure-responses": ProviderType("", *_AZURE_KEY, True, "responses"),
    "openai-compatible": ProviderType("", (), (), False, "openai"),
    # Vendors' Anthropic-compatible endpoints (issue #22), each from its own docs.
    "kimi": ProviderType("https://api.moonshot.ai/anthropic", ("MOONSHOT_API_KEY",),
                         ("api.moonshot.ai", "api.moonshot.cn", "api.kimi.com"), True,
                         "anthropic-compatible"),
    "glm": ProviderType("https://api.z.ai/api/anthropic", ("ZAI_API_KEY",),
                        ("api.z.ai", "open.bigmodel.cn"), True, "anthropic-compatible"),
    "minimax": ProviderType("https://api.minimax.io/anthropic", ("MINIMAX_API_KEY",),
                            ("api.minimax.io", "api.minimaxi.com"), True,
                            "anthropic-compatible"),
    "dashscope": ProviderType("https://dashscope-intl.aliyuncs.com/apps/anthropic",
                              ("DASHSCOPE_API_KEY",), ("dashscope-intl.aliyuncs.com",
                                                       "dashscope.aliyuncs.com"), True,
                              "anthropic-compatible"),
    "deepseek-anthropic": ProviderType("https://api.deepseek.com/anthropic",
                                       ("DEEPSEEK_API_KEY",), ("api.deepseek.com",), True,
                                       "anthropic-compatible"),
    "anthropic-compatible": ProviderType("", (), (), False, "anthropic-compatible"),
    # Claude on the clouds: Vertex authenticates with OAuth tokens, not keys.
    "vertex": ProviderType("https://{region}-aiplatform.googleapis.com", (), (), False,
                           "vertex"),
    # Bedrock signs with AWS credentials; a Bedrock API key (Claude Code's variable) is
    # a bearer token instead, for Bedrock's own hosts only.
    "bedrock": ProviderType("https://bedrock-runtime.{region}.amazonaws.com",
                            ("AWS_BEARER_TOKEN_BEDROCK",), ("bedrock-runtime.*.amazonaws.com",
                                                            "bedrock-runtime-fips.*"), False,
                            "bedrock"),
}

#: Every quirk flag with its default (docs/translation.md §6).  A provider type is a row of
#: overrides below; a config file can override any flag per provider under "quirks".
#: Adding a provider is adding a row, never a branch in the code.
QUIRK_DEFAULTS = {
    "token_param": "max_tokens",       # or max_completion_tokens (OpenAI, Azure)
    "max_output": 0,                   # clamp max_tokens to this (0: no clamp)
    "mid_system": "merge_user",        # a role:"system" inside messages: inplace | merge_user
    "developer_role": False,           # the leading system message as role "developer"
    "no_vision": False,                # images become "[image omitted]"
    "supports_pdf": False,             # PDFs as file parts, else "[PDF document omitted]"
    "supports_top_k": False,
    "stream_options": True,            # stream_options.include_usage on streams
    "reasoning": "",                   # reasoning_effort | openrouter | deepseek | "" (none)
    "reasoning_models": "",            # regex on the upstream model; "" = every model
    "reasoning_echo": "",              # history thinking -> reasoning_content | reasoning
                                       # | items (the Responses API's reasoning items)
    "reasoning_summary": "",           # Responses: reasoning.summary (auto | concise |
                                       # detailed; "" none) (§8.1)
    "efforts": "low,medium,high",      # the effort levels the route takes (§1.6)
    "xhigh_models": "",                # regex: models that take xhigh and max ("" = all)
    "cache_control": False,            # Anthropic cache markers on the same blocks (§1.7)
    "cache_models": "",                # regex: models that honour them ("" = every model)
    "prompt_cache_key": False,         # a cache key from a hash of the session id (§1.7)
    "schema_dialect": "openai",        # or gemini
    "think_tags": False,               # a leading <think>…</think> in content is reasoning
    "stream_tools": True,              # False: call non-streaming when tools are present
    "empty_content_as_string": False,  # assistant tool calls with content "" (not null)
    "tool_id_style": "",               # alnum9 (Mistral): ids of 9 alphanumerics
    "auth": "bearer",                  # or api-key (Azure)
    "no_required": False,              # tool_choice "required" unsupported: send "auto"
    "no_named_choice": False,          # a named tool_choice unsupported: send "required"
    "no_choice_none": False,           # tool_choice "none" ignored: send no tools instead
    "no_parallel_flag": False,         # drop parallel_tool_calls
    "gemini_signatures": False,        # keep and replay extra_content.google.thought_signature
    "send_user": False,                # metadata.user_id -> user, as sha256 hex[:32] (§1.1)
    "web_search": "",                  # how the provider searches for Claude Code's
                                       # WebSearch (§1.10): plugin (OpenRouter's web
                                       # plugin) | "" (it cannot: answered "unavailable")
    "sig_in_id": False,                # ...carried in the tool id itself (§3.4): survives
                                       # restarts and reaches whichever worker answers next
    # Anthropic-compatible endpoints (docs/providers.md): rewrites of the request only.
    "betas": "*",                      # anthropic-beta values passed on: * all, "" none,
                                       # or a comma list
    "drop_fields": "",                 # top-level body fields removed (comma list)
    "thinking_mode": "",               # "" as sent | enabled (adaptive -> a budget) | off
    "thinking_history": False,         # thinking off when a tool-call turn has none
    "default_max_tokens": 0,           # max_tokens filled in when the client sent none
    "strip_cache_ttl": False,          # cache_control without its ttl
}
_OPENAI_REASONING = r"^(o\d|gpt-5)"
_VENDOR_DROPS = "context_management,safeguards"
_BEDROCK_BETAS = ("interleaved-thinking-2025-05-14,context-1m-2025-08-07,"
                  "context-management-2025-06-27,fine-grained-tool-streaming-2025-05-14,"
                  "token-efficient-tools-2025-02-19,output-128k-2025-02-19")
_OPENAI_XHIGH = r"^(gpt-5\.1-codex-max|gpt-5\.[2-9]|gpt-5\.\d\d|gpt-[6-9])"
#: OpenAI's Responses API (issue #23): reasoning kept across turns as encrypted items.
_RESPONSES = {"mid_system": "inplace", "supports_pdf": True, "reasoning": "reasoning_effort",
              "reasoning_models": r"^(o\d|gpt-5|codex)", "efforts": "low,medium,high,xhigh",
              "xhigh_models": _OPENAI_XHIGH, "reasoning_echo": "items",
              "reasoning_summary": "auto"}
PROVIDER_QUIRKS = {
    # xhigh: OpenAI's reasoning guide, "supported for all models after gpt-5.1-codex-max".
    "openai": {"token_param": "max_completion_tokens", "mid_system": "inplace",
               "supports_pdf": True, "reasoning": "reasoning_effort",
               "reasoning_models": _OPENAI_REASONING, "efforts": "low,medium,high,xhigh",
               "xhigh_models": _OPENAI_XHIGH, "prompt_cache_key": True},
    "azure": {"token_param": "max_completion_tokens", "mid_system": "inplace",
              "auth": "api-key", "reasoning": "reasoning_effort",
              "reasoning_models": _OPENAI_REASONING, "efforts": "low,medium,high,xhigh",
              "xhigh_models": _OPENAI_XHIGH},
    "groq": {"reasoning": "reasoning_effort", "reasoning_models": r"(gpt-oss|qwen3)",
             "reasoning_echo": ""},
    # OpenRouter normalises reasoning.effort, xhigh included, for every reasoning model
    # (enricoros/big-AGI#940); it passes cache_control on to Anthropic's and Gemini's
    # models (its prompt-caching guide), where the cache is the provider's own.
    "openrouter": {"supports_pdf": True, "reasoning": "openrouter",
                   "reasoning_models": r"(o\d|gpt-5|claude|gemini-2\.5|gemini-3|deepseek-r|"
                                       r"reasoner|thinking|qwen3|grok)",
                   "efforts": "low,medium,high,xhigh", "cache_control": True,
                   "cache_models": r"^(anthropic/|google/gemini)", "web_search": "plugin"},
    "deepseek": {"no_vision": True, "max_output": 8192, "reasoning": "deepseek",
                 "reasoning_models": r"reasoner", "reasoning_echo": "reasoning_content"},
    "gemini": {"schema_dialect": "gemini", "reasoning": "reasoning_effort",
               "reasoning_models": r"(2\.5|gemini-3)", "gemini_signatures": True,
               "sig_in_id": True},
    "ollama": {"stream_tools": False, "think_tags": True, "no_parallel_flag": True,
               "no_choice_none": True},
    "openai-compatible": {"think_tags": True},
    # Anthropic-compatible endpoints.  None implements Anthropic's betas, and Claude Code's
    # own fields (context_management, safeguards) are Anthropic's: both go.
    # Kimi rejects unknown betas (MoonshotAI/Kimi-K2.5#5); its adaptive thinking reasons
    # far less than a budget (MoonshotAI/Kimi-K2#141, clacky-ai/openclacky#389); "thinking
    # is enabled but reasoning_content is missing in assistant tool call message" when a
    # tool-call turn lacks its thinking (farion1231/cc-switch#3377, #3219).
    "kimi": {"auth": "x-api-key", "betas": "", "thinking_mode": "enabled",
             "thinking_history": True, "drop_fields": _VENDOR_DROPS},
    # GLM answers 500 without max_tokens (zai-org/zai-coding-plugins#15); 131072 is its
    # output cap (Z.AI's parameter guide, mnfst/modelparams.dev#327).
    "glm": {"auth": "x-api-key", "betas": "", "default_max_tokens": 32000,
            "max_output": 131072, "drop_fields": _VENDOR_DROPS},
    # MiniMax takes thinking with budget_tokens (its Anthropic API guide), not adaptive.
    "minimax": {"auth": "x-api-key", "betas": "", "thinking_mode": "enabled",
                "drop_fields": _VENDOR_DROPS},
    # Model Studio documents thinking as enabled + budget_tokens, for some models only.
    "dashscope": {"auth": "x-api-key", "betas": "", "thinking_mode": "enabled",
                  "drop_fields": _VENDOR_DROPS},
    # DeepSeek ignores anthropic-beta, container and mcp_servers (its compatibility table).
    "deepseek-anthropic": {"auth": "x-api-key", "betas": "", "drop_fields": _VENDOR_DROPS},
    "anthropic-compatible": {"auth": "x-api-key"},
    "openai-responses": dict(_RESPONSES, prompt_cache_key=True),
    "azure-responses": dict(_RESPONSES, auth="api-key"),
    # Claude on the clouds: auto mode's classifier is Anthropic's own (safeguards).
    "vertex": {"drop_fields": "safeguards"},
    # Bedrock takes the betas its Claude guide lists, in the body (anthropic_beta).
    "bedrock": {"drop_fields": "safeguards", "betas": _BEDROCK_BETAS},
}

#: Provider status words that still take calls: a provider nobody has called yet counts.
#: The others: rate_limited, disconnected, auth_failed, unconfigured (it has no key).
USABLE = ("connected", "unknown")
TOOL_ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
CCPROXY_SIGNATURE_PREFIX = "ccproxy:"

#: http.server's log escaping (CPython gh-100001): control characters become \\xNN so a
#: request line can never forge a log line, and a backslash is doubled, as its
#: follow-up does, so that a literal "\\x0a" cannot pass for an escaped newline.
_CONTROL_CHARS = str.maketrans(
    dict({c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7F, 0xA0))},
         **{"\\": "\\\\"}))

log = logging.getLogger("ccproxy")


# ---- Errors --------------------------------------------------------------------------

class CcproxyError(Exception):
    """Base class of every error ccproxy raises on purpose."""


class ConfigError(CcproxyError):
    """A configuration value is wrong; the message names the key."""

    def __str__(self):
        return "config: " + super().__str__()


class UsageError(CcproxyError):
    """There is no usage ledger to read, or it cannot be read."""


class PidFileError(CcproxyError):
    """The PID file cannot be created, locked or written."""


class HTTPError(CcproxyError):
    """A request-path failure, rendered as an Anthropic-shaped JSON error."""

    def __init__(self, status, etype, message, headers=(), close=False):
        super().__init__(message)
        self.status, self.etype, self.message = status, etype, message
        self.headers, self.close = tuple(headers), close


class UpstreamError(CcproxyError):
    """An upstream call failed before a response head arrived.

    kind is "connect" (refused, DNS, TLS: nothing was sent), "timeout" or "reset".
    """

    def __init__(self, kind, url, detail):
        super().__init__("%s: %s" % (url, detail))
        self.kind, self.url, self.detail = kind, url, detail


# ---- Configuration -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    """One upstream: where it is, how to authenticate, which models to use."""
    name: str
    type: str = "anthropic"
    base_url: str = ""
    api_key: str = dataclasses.field(default="", repr=False)
    key_source: str = ""           # where the key comes (or would come) from: "api_key",
                                   # a variable's name, or "file PATH"; never the key
    model: str = ""
    big_model: str = ""
    small_model: str = ""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    ca_bundle: str = ""
    api_version: str = ""          # Azure: sent as ?api-version=
    quirks: tuple = ()             # (flag, value) overrides of the type's preset
    headers: tuple = dataclasses.field(default=(), repr=False)   # (name, value), every call
    project: str = ""              # Vertex: the Google Cloud project
    region: str = ""               # Vertex, Bedrock: where the model runs
    token_command: tuple = ()      # Vertex: argv printing an OAuth access token
    aws_profile: str = ""          # Bedrock: a profile of ~/.aws/credentials
    context_window: int = 0        # the model's window in tokens (0: learn it, or look it up)
    price: tuple = ()              # USD per million tokens: (input, output, cache read,
                                   # cache write) for all it serves; () = the table's


@dataclasses.dataclass(frozen=True)
class ClientKey:
    """A named client key (issue #24): who calls, within which limits.  The ledger,
    logs and metrics carry the name, never the key."""
    name: str
    key: str = dataclasses.field(default="", repr=False)
    monthly_budget_usd: float = 0.0      # 0: no budget
    requests_per_minute: int = 0         # 0: no rate limit
    routes: tuple = ()                   # route names it may take; () = every route


@dataclasses.dataclass(frozen=True)
class RouteConfig:
    """Requests whose model matches `match` (fnmatch, or "default") go to `provider`."""
    match: str
    provider: str
    model: str = ""
    context_window: int = 0        # the route's model's window in tokens (0: see provider)
    name: str = ""                 # for the log and metrics (else "routes[N]")
    when: str = ""                 # a scenario (SCENARIOS) the call must be in, or ""
    min_tokens: int = 0            # long_context: estimated input above this
    min_effort: str = ""           # thinking: the effort at least this (default high)


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole effective configuration.  Reload builds a new one and swaps it."""
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str = dataclasses.field(default="", repr=False)
    allow_remote: bool = False
    pid_file: str = ""
    log_file: str = ""
    log_level: str = "info"
    log_format: str = "text"
    metrics: bool = True
    status_host: str = ""
    status_port: int = 0
    cors_origins: tuple = ()
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    probe_interval: float = 0.0       # seconds between provider probes; 0 = off
    workers: int = 1                  # processes sharing the port (SO_REUSEPORT)
    usage: bool = True                # keep the usage ledger (docs/operating.md §10)
    usage_db: str = ""                # its SQLite file ("" with usage on: nowhere to keep it)
    usage_retention_days: int = DEFAULT_USAGE_RETENTION_DAYS
    client_keys: tuple = ()           # ClientKey, beside the single api_key
    prices: tuple = ()                # (model pattern, (input, output, cache read, write))
    record: tuple = ()                # (dir, mode, redact, max files, max MB); () = off
    providers: tuple = ()
    routes: tuple = ()
    fallback: tuple = ()
    source: str = ""
    fingerprint: str = ""
    warnings: tuple = ()              # what start-up says but does not refuse
    given: tuple = ()                 # (setting, where it was set): file key, variable
                                      # or --option; the rest are defaults

    def provider(self, name):
        """The provider called `name` (config validation guarantees it exists)."""
        return next(p for p in self.providers if p.name == name)

    def provider_names(self):
        return [p.name for p in self.providers]

    def requires_key(self):
        """Whether clients must present a key: the api_key, or one of client_keys."""
        return bool(self.api_key or self.client_keys)

    def client_key(self, name):
        """The ClientKey called `name`, or None (the single api_key has no limits)."""
        return next((k for k in self.client_keys if k.name == name), None)


#: Scalar settings: (key, environment variables, kind, CLI option name).
#: Kinds: host, port, str, bool, seconds, size, level, format, origins.
SETTINGS = (
    ("host", ("CCPROXY_HOST",), "host", "host"),
    ("port", ("CCPROXY_PORT",), "port", "port"),
    ("api_key", ("CCPROXY_API_KEY",), "secret", None),
    ("api_key_file", ("CCPROXY_API_KEY_FILE",), "str", None),
    ("allow_remote", ("CCPROXY_ALLOW_REMOTE",), "bool", "allow_remote"),
    ("pid_file", ("CCPROXY_PID_FILE",), "str", "pid_file"),
    ("log_file", ("CCPROXY_LOG_FILE",), "str", "log_file"),
    ("log_level", ("CCPROXY_LOG_LEVEL",), "level", "log_level"),
    ("log_format", ("CCPROXY_LOG_FORMAT",), "format", None),
    ("metrics", ("CCPROXY_METRICS", "ENABLE_METRICS"), "bool", None),
    ("status_host", ("CCPROXY_STATUS_HOST",), "host", None),
    ("status_port", ("CCPROXY_STATUS_PORT",), "port0", None),
    ("cors_origins", ("CCPROXY_CORS_ORIGINS",), "origins", None),
    ("drain_timeout", ("CCPROXY_DRAIN_TIMEOUT",), "seconds", None),
    ("idle_timeout", ("CCPROXY_IDLE_TIMEOUT",), "seconds", None),
    ("header_timeout", ("CCPROXY_HEADER_TIMEOUT",), "seconds", None),
    ("body_timeout", ("CCPROXY_BODY_TIMEOUT",), "seconds", None),
    ("max_connections", ("CCPROXY_MAX_CONNECTIONS",), "size", None),
    ("max_body_bytes", ("CCPROXY_MAX_BODY_BYTES",), "size", None),
    ("max_reply_bytes", ("CCPROXY_MAX_REPLY_BYTES",), "size", None),
    ("max_event_bytes", ("CCPROXY_MAX_EVENT_BYTES",), "size", None),
    ("probe_interval", ("CCPROXY_PROBE_INTERVAL",), "seconds0", None),
    ("workers", ("CCPROXY_WORKERS",), "size", "workers"),
    ("usage", ("CCPROXY_USAGE",), "bool", None),
    ("usage_db", ("CCPROXY_USAGE_DB",), "str", None),
    ("usage_retention_days", ("CCPROXY_USAGE_RETENTION_DAYS",), "size", None),
)
#: Environment variables that configure the primary (first) provider.
PROVIDER_ENV = (
    ("type", "CCPROXY_PROVIDER"), ("base_url", "CCPROXY_BASE_URL"),
    ("api_key", "CCPROXY_UPSTREAM_API_KEY"), ("api_key_file", "CCPROXY_UPSTREAM_API_KEY_FILE"),
    ("model", "CCPROXY_MODEL"),
    ("big_model", "CCPROXY_BIG_MODEL"), ("small_model", "CCPROXY_SMALL_MODEL"),
)
FILE_ONLY_KEYS = ("providers", "routes", "fallback", "client_keys", "prices", "record")
RECORD_KEYS = ("dir", "mode", "redact", "max_files", "max_mb")
KEY_FIELDS = ("api_key", "api_key_env", "api_key_file")
PROVIDER_KEYS = ("name", "type", "base_url") + KEY_FIELDS + (
    "model", "big_model", "small_model", "connect_timeout", "read_timeout", "ca_bundle",
    "api_version", "quirks", "headers", "project", "region", "token_command", "aws_profile",
    "context_window", "price")
CLIENT_KEY_KEYS = ("name", "key_env", "key_file", "monthly_budget_usd",
                   "requests_per_minute", "routes")
PRICE_KEYS = ("input", "output", "cache_read", "cache_write")
#: Where a cloud's fields come from when the entry leaves them out: the variables Claude
#: Code's own Vertex and Bedrock modes read (docs/providers.md).
CLOUD_FIELDS = {
    "vertex": (("project", ("ANTHROPIC_VERTEX_PROJECT_ID", "GOOGLE_CLOUD_PROJECT")),
               ("region", ("CLOUD_ML_REGION",))),
    "bedrock": (("region", ("AWS_REGION", "AWS_DEFAULT_REGION")),),
}
ROUTE_KEYS = ("match", "provider", "model", "context_window", "name", "when",
              "min_tokens", "min_effort")
#: What a route's "when" may name (docs/operating.md §9, issue #21).
SCENARIOS = ("background", "thinking", "long_context", "web_search", "images", "subagent")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _shown(value):
    """A value quoted for an error message (never used for secrets)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _convert(key, kind, value):
    """Check and convert one scalar setting; raise ConfigError naming `key`."""
    if kind == "secret":
        if not isinstance(value, str):
            raise ConfigError("%s must be a string" % key)  # never echo a key
        return value
    if kind in ("port", "port0"):
        lo = 0 if kind == "port0" else 1
        try:
            port = int(str(value).strip()) if not isinstance(value, bool) else None
        except ValueError:
            port = None
        if port is None or not lo <= port <= 65535:
            raise ConfigError("%s must be %d-65535, got %s" % (key, lo, _shown(value)))
        return port
    if kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ConfigError("%s must be true or false, got %s" % (key, _shown(value)))
    if kind in ("seconds", "size"):
        return _convert_number(key, kind, value)
    if kind == "seconds0":       # 0 switches the feature off
        return 0.0 if str(value).strip() in ("0", "0.0") else _convert_number(
            key, "seconds", value)
    if kind == "origins":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError("%s must be a list of origins, got %s" % (key, _shown(value)))
        return tuple(i.strip() for i in items if i.strip())
    if not isinstance(value, str):
        raise ConfigError("%s must be a string, got %s" % (key, _shown(value)))
    return _convert_word(key, kind, value.strip())


def _convert_number(key, kind, value):
    """Seconds (float > 0) or a size in bytes (int > 0)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if kind == "seconds" else int(str(value).strip())
    except (TypeError, ValueError):
        number = None
    if number is None or not number > 0 or number != number or number == float("inf"):
        unit = "a number of seconds" if kind == "seconds" else "a whole number of bytes"
        raise ConfigError("%s must be %s > 0, got %s" % (key, unit, _shown(value)))
    return number


def _convert_word(key, kind, value):
    """Strings with a closed vocabulary or a syntax."""
    if kind == "level" and value.lower() not in LOG_LEVELS:
        raise ConfigError("%s must be one of %s, got %s"
                          % (key, ", ".join(LOG_LEVELS), _shown(value)))
    if kind == "format" and value.lower() not in ("text", "json"):
        raise ConfigError("%s must be text or json, got %s" % (key, _shown(value)))
    if kind == "host" and (any(c in value for c in "/ ?#@") or not value and key == "host"):
        raise ConfigError("%s must be a host name or IP address, got %s"
                          % (key, _shown(value)))
    return value.lower() if kind in ("level", "format") else value


def _check_url(key, url):
    """A provider base URL: http(s), a host, no query; userinfo is refused (it would leak
    into logs and error messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s must be an http:// or https:// URL, got %s" % (key, _shown(url)))
    if parts.username or parts.password:
        raise ConfigError("%s must not carry a user or password; set api_key instead" % key)
    if parts.query or parts.fragment:
        raise ConfigError("%s must not have a query or fragment" % key)
    return url.rstrip("/")


def _known_object(where, raw, keys):
    """Check that `raw` is an object with none but `keys` (`where` names it; "" is the
    file's top level): a misspelled key fails start-up, with the closest known one."""
    if not isinstance(raw, dict):
        raise ConfigError("%s must be an object" % where if where else
                          "the config file must hold a JSON object")
    unknown = next((k for k in raw if k not in keys), None)
    if unknown is None:
        return
    import difflib            # here: only for a key that is wrong
    close = difflib.get_close_matches(str(unknown), keys, 1, 0.6)
    raise ConfigError("%sunknown key %s%s" % (where + ": " if where else "", _shown(unknown),
                                              "; did you mean %s?" % _shown(close[0])
                                              if close else ""))


def _provider(index, raw, environ, read_key):
    """Validate one provider entry of the config file into a ProviderConfig."""
    where = "providers[%d]" % index
    _known_object(where, raw, PROVIDER_KEYS)
    ptype = raw.get("type", "anthropic")
    if ptype not in PROVIDER_TYPES:
        raise ConfigError("%s.type must be one of %s, got %s"
                          % (where, ", ".join(PROVIDER_TYPES), _shown(ptype)))
    name = raw.get("name", ptype)
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
        raise ConfigError("%s.name must be 1-64 letters, digits, '_', '.' or '-', got %s"
                          % (where, _shown(name)))
    return _provider_fields(where, name, ptype, raw, environ, read_key)


def _provider_fields(where, name, ptype, raw, environ, read_key):
    """The typed fields of one provider, defaults from PROVIDER_TYPES."""
    cloud = _cloud_fields(where, ptype, raw, environ)
    url = raw.get("base_url") or cloud_base_url(PROVIDER_TYPES[ptype].base_url,
                                                cloud.get("region", ""))
    if not url:
        raise ConfigError("%s.base_url is required for type %s" % (where, _shown(ptype)))
    url = _check_url(where + ".base_url", str(url))
    key, source = _provider_key(where, ptype, url, raw, environ, read_key)
    fields = dict(cloud, name=name, type=ptype, base_url=url, key_source=source,
                  api_key=_convert(where + ".api_key", "secret", key))
    for field in ("model", "big_model", "small_model", "ca_bundle", "api_version"):
        fields[field] = _convert(where + "." + field, "str", raw.get(field, ""))
    fields["quirks"] = _quirks(where + ".quirks", raw.get("quirks", {}))
    fields["context_window"] = _window(where, raw)
    fields["headers"] = _extra_headers(where + ".headers", raw.get("headers", {}))
    if "price" in raw:
        fields["price"] = _price(where + ".price", raw["price"])
    for field in ("connect_timeout", "read_timeout"):
        if field in raw:
            fields[field] = _convert(where + "." + field, "seconds", raw[field])
    return ProviderConfig(**fields)


def _cloud_fields(where, ptype, raw, environ):
    """project, region, token_command and aws_profile: required ones named when missing,
    else from the variables Claude Code's own cloud modes read (CLOUD_FIELDS)."""
    fields = {f: _convert(where + "." + f, "str", raw[f]) for f in ("project", "region",
                                                                    "aws_profile") if f in raw}
    for field, variables in CLOUD_FIELDS.get(ptype, ()):
        fields.setdefault(field, next((environ[v] for v in variables if environ.get(v)), ""))
        if not fields[field]:
            raise ConfigError("%s.%s is required for type %s (or set %s)" % (
                where, field, ptype, " or ".join(variables)))
    if fields.get("region") and not re.match(r"^[a-z0-9-]{1,40}$", fields["region"]):
        raise ConfigError("%s.region must be a region name such as us-east5, got %s"
                          % (where, _shown(fields["region"])))
    if "token_command" in raw:
        command = raw["token_command"]
        if not isinstance(command, list) or not command or not all(
                isinstance(a, str) and a for a in command):
            raise ConfigError("%s.token_command must be a list of arguments, e.g. "
                              "[\"gcloud\", \"auth\", \"print-access-token\"]" % where)
        fields["token_command"] = tuple(command)
    return fields


def _window(where, raw):
    """A context_window of a provider or a route: tokens, from 1024 up."""
    value = raw.get("context_window", 0)
    if value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise ConfigError("%s.context_window must be a number of tokens (1024 or more), got %s"
                          % (where, _shown(value)))
    return value


def cloud_base_url(template, region):
    """A type's default base URL with its region in it; Vertex's "global" region has
    no regional host."""
    if "{region}" not in template:
        return template
    if region == "global":
        return template.replace("{region}-", "")
    return template.replace("{region}", region)


def _provider_key(where, ptype, url, raw, environ, read_key):
    """(key, where it comes from) for one provider: api_key, api_key_file or api_key_env
    (at most one of them), else the type's usual variable, but only for the type's own
    hosts (issue #18).  An unset api_key_env is no key (start warns, /status says
    unconfigured); an unreadable api_key_file is a config error."""
    given = [k for k in KEY_FIELDS if k in raw]
    if len(given) > 1:
        raise ConfigError("%s: give one of %s, not %s" % (where, ", ".join(KEY_FIELDS),
                                                          " and ".join(given)))
    if "api_key" in raw:
        return raw["api_key"], "api_key"
    if "api_key_file" in raw:
        path = _convert(where + ".api_key_file", "str", raw["api_key_file"])
        return read_key(where + ".api_key_file", path, environ), "file " + path
    if "api_key_env" in raw:
        var = _convert(where + ".api_key_env", "str", raw["api_key_env"])
        return environ.get(var, ""), var
    kind = PROVIDER_TYPES[ptype]
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if not any(fnmatch.fnmatchcase(host, pattern) for pattern in kind.key_hosts):
        return "", ""
    var = next((v for v in kind.key_vars if environ.get(v)), kind.key_vars[0])
    return environ.get(var, ""), var


def read_key_file(where, path, environ):
    """A key kept in a file: systemd's credentials first for a relative path
    ($CREDENTIALS_DIRECTORY/NAME, from LoadCredential=), else the path itself.  The
    key is the file's first line."""
    candidates = [path]
    if not os.path.isabs(path) and environ.get("CREDENTIALS_DIRECTORY"):
        candidates.insert(0, os.path.join(environ["CREDENTIALS_DIRECTORY"], path))
    for index, candidate in enumerate(candidates):
        try:
            with open(candidate, encoding="utf-8") as f:
                key = f.readline().strip()
        except FileNotFoundError:
            if index + 1 < len(candidates):
                continue
            raise ConfigError("%s: cannot read %s: no such file" % (where, path)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("%s: cannot read %s: %s" % (
                where, path, getattr(exc, "strerror", None) or "not UTF-8")) from None
        if not key:
            raise ConfigError("%s: %s is empty" % (where, path))
        return key
    return ""


#: Headers a provider's "headers" may not set: ccproxy frames the message itself.
FRAMING_HEADERS = REQUEST_DROP | {"transfer-encoding"}
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")      # RFC 9110 §5.6.2 token


def _extra_headers(where, raw):
    """A provider's own headers (OpenRouter's HTTP-Referer and X-Title, a gateway's
    tenant header): names are tokens, values single-line strings, framing is ours."""
    if not isinstance(raw, dict):
        raise ConfigError("%s must be an object of header names to strings" % where)
    for name, value in raw.items():
        if not HEADER_NAME_RE.match(name) or name.lower() in FRAMING_HEADERS:
            raise ConfigError("%s: %s is not a header ccproxy can send" % (where, _shown(name)))
        if not isinstance(value, str) or not header_value_ok(value):
            raise ConfigError("%s.%s must be a one-line string" % (where, name))
    return tuple(raw.items())


def with_provider_headers(headers, provider):
    """`headers` with the provider's own added; one of theirs replaces ours."""
    if not provider.headers:
        return headers
    mine = {name.lower() for name, _ in provider.headers}
    return [h for h in headers if h[0].lower() not in mine] + list(provider.headers)


def _quirks(where, raw):
    """Per-provider quirk overrides, checked against the flag table (docs/translation.md §6)."""
    if not isinstance(raw, dict):
        raise ConfigError("%s must be an object of flags" % where)
    for flag, value in raw.items():
        if flag not in QUIRK_DEFAULTS:
            raise ConfigError("%s: unknown flag %s (known: %s)"
                              % (where, _shown(flag), ", ".join(sorted(QUIRK_DEFAULTS))))
        want = type(QUIRK_DEFAULTS[flag])
        if type(value) is not want:
            raise ConfigError("%s.%s must be a %s, got %s" % (where, flag, want.__name__,
                                                               _shown(value)))
    return tuple(sorted(raw.items()))


def _routes(raw_routes, names):
    """Validate the routes list against the provider names."""
    if not isinstance(raw_routes, list):
        raise ConfigError("routes must be a list")
    routes = []
    for index, raw in enumerate(raw_routes):
        where = "routes[%d]" % index
        _known_object(where, raw, ROUTE_KEYS)
        when = raw.get("when", "")
        match = raw.get("match", "" if when else None)
        if not isinstance(match, str) or not (match or when):
            raise ConfigError("%s.match must be a model pattern or \"default\" (or give "
                              "\"when\")" % where)
        if when not in ("",) + SCENARIOS:
            raise ConfigError("%s.when must be one of %s, got %s" % (
                where, ", ".join(SCENARIOS), _shown(when)))
        provider = raw.get("provider")
        if provider not in names:
            raise ConfigError("%s.provider must name a provider (%s), got %s"
                              % (where, ", ".join(names), _shown(provider)))
        routes.append(RouteConfig(
            match=match.lower(), provider=provider, when=when,
            model=_convert(where + ".model", "str", raw.get("model", "")),
            context_window=_window(where, raw), name=_convert(
                where + ".name", "str", raw.get("name", "")),
            min_tokens=_route_tokens(where, raw), min_effort=_route_effort(where, raw)))
    return tuple(routes)


def _route_tokens(where, raw):
    value = raw.get("min_tokens", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("%s.min_tokens must be a number of tokens, got %s"
                          % (where, _shown(value)))
    return value


def _route_effort(where, raw):
    value = raw.get("min_effort", "")
    if value not in ("",) + EFFORT_LEVELS:
        raise ConfigError("%s.min_effort must be one of %s, got %s"
                          % (where, ", ".join(EFFORT_LEVELS), _shown(value)))
    return value


def _primary_from_env(raw_providers, environ):
    """Apply CCPROXY_PROVIDER, CCPROXY_BASE_URL, … to the first provider (creating it)."""
    overrides = {field: environ[var] for field, var in PROVIDER_ENV if environ.get(var)}
    if not overrides:
        return raw_providers
    first = dict(raw_providers[0]) if raw_providers else {}
    if "type" in overrides and overrides["type"] != first.get("type"):
        # A new type means the file's URL, key and name were for another provider.
        first = {k: v for k, v in first.items() if k not in ("base_url", "name") + KEY_FIELDS}
    if "api_key" in overrides:               # named by its variable, never copied
        overrides["api_key_env"] = "CCPROXY_UPSTREAM_API_KEY"
        del overrides["api_key"]
    if any(k in overrides for k in KEY_FIELDS):
        first = {k: v for k, v in first.items() if k not in KEY_FIELDS}
    first.update(overrides)
    return [first] + list(raw_providers[1:])


def _file_settings(data):
    """Check the top level of a config file for unknown keys and wrong shapes."""
    _known_object("", data, [s[0] for s in SETTINGS] + list(FILE_ONLY_KEYS))
    if not isinstance(data.get("providers", []), list):
        raise ConfigError("providers must be a list")
    return data


def _merge_scalars(data, environ, cli):
    """defaults < file < environment < command line, one setting at a time; `given`
    says which were set and where ((key, source) pairs)."""
    values, given = {}, []
    for key, env_vars, kind, option in SETTINGS:
        value, source = dataclasses.MISSING, key
        if key in data:
            value = data[key]
        for var in env_vars:
            if var in environ:
                value, source = environ[var], var
                break
        if option and cli.get(option) is not None:
            value, source = cli[option], "--" + option.replace("_", "-")
        if value is not dataclasses.MISSING:
            values[key] = _convert(source, kind, value)
            given.append((key, source))
    values["given"] = tuple(given)
    return values


def build_config(data, environ, cli, source="", read_key=read_key_file):
    """Build and validate a Config from parsed file data, an environment and CLI options.

    Pure but for the key files, read through `read_key(where, path, environ)`.  Raises
    ConfigError with a message that names the offending key.
    """
    data = _file_settings(data or {})
    values = _merge_scalars(data, environ, cli)
    key_file = values.pop("api_key_file", "")
    if key_file and values.get("api_key"):
        raise ConfigError("give one of api_key (CCPROXY_API_KEY) and api_key_file, not both")
    if key_file:
        values["api_key"] = read_key("api_key_file", key_file, environ)
    raw_providers = _primary_from_env(data.get("providers") or [], environ)
    providers = tuple(_provider(i, p, environ, read_key) for i, p in enumerate(raw_providers))
    providers = providers or (ProviderConfig(name="anthropic",
                                             base_url=PROVIDER_TYPES["anthropic"].base_url),)
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        raise ConfigError("providers: two providers are named %s; give each a unique name"
                          % _shown(next(n for n in names if names.count(n) > 1)))
    routes = _routes(data.get("routes", []), names)
    fallback = data.get("fallback", [])
    if not isinstance(fallback, list) or any(n not in names for n in fallback):
        raise ConfigError("fallback must be a list of provider names (%s)" % ", ".join(names))
    if values.get("usage", True) and not values.get("usage_db"):
        values["usage_db"] = default_usage_db(environ)
    config = Config(providers=providers, routes=routes, fallback=tuple(fallback),
                    source=source, client_keys=_client_keys(data.get("client_keys", []),
                                                            environ, read_key),
                    prices=_prices("prices", data.get("prices", {})),
                    record=_record(data.get("record"), cli.get("record")), **values)
    _check_exposure(config)
    if config.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("workers > 1 needs SO_REUSEPORT, which this system lacks")
    warnings = tuple(unknown_variables(environ)) + tuple(
        "provider %s has no key: %s" % (p.name, key_hint(p)) for p in providers
        if unconfigured(config, p))
    return dataclasses.replace(config, fingerprint=config_fingerprint(config),
                               warnings=warnings)


def _client_keys(raw_keys, environ, read_key):
    """Validate client_keys: each a name, a key from key_env or key_file, limits."""
    if not isinstance(raw_keys, list):
        raise ConfigError("client_keys must be a list")
    keys = [_client_key("client_keys[%d]" % i, raw, environ, read_key)
            for i, raw in enumerate(raw_keys)]
    for attr, what in (("name", "name"), ("key", "key")):
        values = [getattr(k, attr) for k in keys]
        twice = next((k.name for k, v in zip(keys, values) if values.count(v) > 1), None)
        if twice:
            raise ConfigError("client_keys: two entries share the %s of %s" % (what, twice))
    return tuple(keys)


def _client_key(where, raw, environ, read_key):
    _known_object(where, raw, CLIENT_KEY_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.@-]{1,64}$", name):
        raise ConfigError("%s.name must be 1-64 letters, digits, '_', '.', '@' or '-'" % where)
    if ("key_env" in raw) == ("key_file" in raw):
        raise ConfigError("%s (%s): give one of key_env and key_file" % (where, name))
    if "key_env" in raw:
        key = environ.get(str(raw["key_env"]), "").strip()
        if not key:
            raise ConfigError("%s (%s): %s is not set" % (where, name, raw["key_env"]))
    else:
        key = read_key(where + ".key_file", str(raw["key_file"]), environ)
    budget = raw.get("monthly_budget_usd", 0)
    rpm = raw.get("requests_per_minute", 0)
    routes = raw.get("routes", [])
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise ConfigError("%s.monthly_budget_usd must be a number >= 0" % where)
    if isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 0:
        raise ConfigError("%s.requests_per_minute must be a whole number >= 0" % where)
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        raise ConfigError("%s.routes must be a list of route names" % where)
    return ClientKey(name=name, key=key, monthly_budget_usd=float(budget),
                     requests_per_minute=rpm, routes=tuple(routes))


def _price(where, raw):
    """{"input", "output", "cache_read", "cache_write"} in USD per million tokens ->
    a tuple in that order (cache prices default to the input price's 0.1 and 1.25)."""
    _known_object(where, raw, PRICE_KEYS)
    values = []
    for key in PRICE_KEYS:
        value = raw.get(key)
        if value is None and key.startswith("cache") and "input" in raw:
            value = raw["input"] * (0.1 if key == "cache_read" else 1.25)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError("%s.%s must be a number >= 0 (USD per million tokens)"
                              % (where, key))
        values.append(float(value))
    return tuple(values)


def _prices(where, raw):
    """The config's prices: {model pattern: price} -> ((pattern, price), …)."""
    if not isinstance(raw, dict):
        raise ConfigError("%s must be an object of model patterns" % where)
    return tuple((str(k).lower(), _price("%s[%s]" % (where, _shown(k)), v))
                 for k, v in raw.items())


def _record(raw, cli_dir=None):
    """The recordings' settings (docs/operating.md §12): `record` in the file, or
    --record DIR (every call, keys redacted)."""
    if raw is None and not cli_dir:
        return ()
    raw = dict(raw or {}, **({"dir": cli_dir} if cli_dir else {}))
    _known_object("record", raw, RECORD_KEYS)
    directory, mode, redact = raw.get("dir"), raw.get("mode", "all"), raw.get("redact", "keys")
    if not isinstance(directory, str) or not directory:
        raise ConfigError("record.dir must be a directory")
    if mode not in RECORD_MODES or redact not in RECORD_REDACTIONS:
        raise ConfigError("record.mode must be all or errors, record.redact keys or content")
    sizes = [raw.get("max_files", 1000), raw.get("max_mb", 256)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise ConfigError("record.max_files and record.max_mb must be whole numbers > 0")
    return (os.path.abspath(directory), mode, redact) + tuple(sizes)


def default_usage_db(environ):
    """The ledger's file: systemd's StateDirectory, else the user's state directory;
    "" where neither is known (an embedded Service, a test): no ledger then."""
    if environ.get("STATE_DIRECTORY"):
        return os.path.join(environ["STATE_DIRECTORY"].split(":")[0], "usage.db")
    if environ.get("XDG_STATE_HOME") or environ.get("HOME"):
        return os.path.join(_state_dir(environ), "usage.db")
    return ""


def unconfigured(config, provider):
    """True when calls to `provider` cannot work for want of its own key.  Anthropic
    needs none while ccproxy has no client key: each client's own is forwarded then."""
    if provider.api_key:
        return False
    if dialect_of(provider).forwards_client_key:
        return config.requires_key()
    return PROVIDER_TYPES[provider.type].needs_key


def dialect_of(provider):
    """The provider's wire format (the Dialects section), from its type's row."""
    return DIALECTS[PROVIDER_TYPES[provider.type].dialect]


def key_hint(provider):
    """How to give `provider` its key, naming the variable or file its config names."""
    if provider.key_source.startswith("file "):
        return "%s is empty" % provider.key_source[5:]
    if provider.key_source and provider.key_source != "api_key":
        return "set %s" % provider.key_source
    return ("set api_key, api_key_env or api_key_file in its config entry (for the first "
            "provider, CCPROXY_UPSTREAM_API_KEY)")


#: Variables ccproxy reads itself, beside the settings': the config file, the start-up
#: pipe and the re-exec mark (both internal), and the fuzz tests' iteration count.
OTHER_VARIABLES = ("CCPROXY_CONFIG", "CCPROXY_READY_FD", "CCPROXY_NO_REEXEC",
                   "CCPROXY_FUZZ_ITERATIONS")


def unknown_variables(environ):
    """A warning for each CCPROXY_* variable ccproxy does not read, with the closest
    name it does: a misspelled CCPROXY_PORTT was ignored in silence (issue #18)."""
    known = [v for _, names, _, _ in SETTINGS for v in names] + [
        v for _, v in PROVIDER_ENV] + list(OTHER_VARIABLES)
    suffixes = [v[8:] for v in known if v.startswith("CCPROXY_")]
    for name in sorted(environ):
        if name.startswith("CCPROXY_") and name not in known:
            import difflib    # here: only for a variable ccproxy does not know
            # Compared without the prefix, which every candidate shares.
            close = difflib.get_close_matches(name[8:], suffixes, 1, 0.6)
            yield "%s is not a ccproxy setting%s" % (
                name, "; did you mean CCPROXY_%s?" % close[0] if close else "")


def _check_exposure(config):
    """Refuse to serve provider keys to the network with no client key (docs/security.md §1)."""
    exposed = [h for h in (config.host, config.status_host if config.status_port else "")
               if h and not is_loopback_host(h)]
    if exposed and not config.requires_key() and not config.allow_remote:
        raise ConfigError("host %s is not a loopback address and api_key is not set: set "
                          "CCPROXY_API_KEY, or allow_remote=true to serve without one"
                          % exposed[0])


#: Settings a running daemon keeps until it restarts: its listeners, its PID file, its
#: worker count and connection cap.  A reload that changes one logs a warning.
RESTART_ONLY = ("host", "port", "pid_file", "status_host", "status_port", "workers",
                "max_connections")


def reloaded_config(running, new):
    """(the config a reload of `new` would really run, the restart-only settings it
    changed): the new settings on the listeners that stay.  Exposure is checked on
    that, not on `new`: a reload to host 127.0.0.1 without api_key, on a daemon bound
    to 0.0.0.0, kept the open listener and dropped its key (issue #17)."""
    changed = [f for f in RESTART_ONLY if getattr(running, f) != getattr(new, f)]
    effective = dataclasses.replace(new, **{f: getattr(running, f) for f in RESTART_ONLY})
    try:
        _check_exposure(effective)
    except ConfigError as exc:
        raise ConfigError("reload refused: the daemon keeps listening on %s until it "
                          "restarts, and %s" % (running.host, exc.args[0])) from None
    return effective, changed


def config_fingerprint(config):
    """sha256 over the effective settings; keys enter only as their own hashes."""
    doc = dataclasses.asdict(dataclasses.replace(config, source="", fingerprint="",
                                                 warnings=(), given=()))
    doc["api_key"] = _digest(config.api_key)
    for entry in doc["client_keys"]:
        entry["key"] = _digest(entry["key"])
    for provider in doc["providers"]:
        provider["api_key"] = _digest(provider["api_key"])
    blob = json.dumps(doc, sort_keys=True, default=list).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def settings_fingerprint(config):
    """The fingerprint of what a daemon serves, apart from where it listens and logs
    (which `start` compares one by one): `start` uses it to tell a daemon started with
    other providers, keys or options from its own settings."""
    return config_fingerprint(dataclasses.replace(config, host="", port=0, workers=1,
                                                  pid_file="", log_file=""))


def _digest(text):
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() if text else ""


def read_config_file(path):
    """Read and parse a JSON config file; ConfigError names the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("%s is not UTF-8" % path) from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError("%s is not valid JSON: %s" % (path, exc)) from exc


def load_config(path=None, environ=None, cli=None):
    """Read the config file (if any) and build the Config: the one place that does I/O."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("CCPROXY_CONFIG")
    if path is None:                       # CCPROXY_CONFIG= (empty) reads no file
        default = default_config_file(environ)
        path = default if os.path.isfile(default) else ""
    data = read_config_file(path) if path else {}
    config = build_config(data, environ, cli or {},
                          source=os.path.abspath(path) if path else "")
    if path and holds_keys(data) and _others_may_read(path):
        config = dataclasses.replace(config, warnings=config.warnings + (
            "%s holds keys and other users can read it: chmod 600 it, or move the keys "
            "to api_key_file (systemd: LoadCredential=)" % path,))
    return config


def default_config_file(environ):
    """The config file read without -c or CCPROXY_CONFIG, when it exists (issue #18):
    /etc/ccproxy/config.json for root and for the systemd unit (its RUNTIME_DIRECTORY
    is not a user's), else $XDG_CONFIG_HOME/ccproxy/config.json, by default under
    ~/.config."""
    runtime = environ.get("RUNTIME_DIRECTORY", "")
    if os.geteuid() == 0 or (runtime and not runtime.startswith("/run/user/")):
        return "/etc/ccproxy/config.json"
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "ccproxy", "config.json")


def holds_keys(data):
    """True when a parsed config file carries a key itself (not a variable's name)."""
    providers = data.get("providers") if isinstance(data, dict) else None
    entries = [data] + (providers if isinstance(providers, list) else [])
    return any(isinstance(e, dict) and e.get("api_key") for e in entries)


def _others_may_read(path):
    try:
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


# ---- Pure protocol functions ---------------------------------------------------------

def is_loopback_host(host):
    """True for 127.0.0.0/8, ::1 and localhost names; False for wildcards and others."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    # Bound to "::", an IPv4 client is ::ffff:127.0.0.1, which ipaddress calls loopback
    # only from 3.13 on: /status from localhost answered 401 (issue #17).
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def key_digest(key):
    """SHA-256 of a key as bytes.  Comparing digests makes compare_digest safe for any
    input: with str it is ASCII-only and a non-ASCII key would raise (a 500, not a 401)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def presented_keys(headers):
    """The keys a client presents: its x-api-key (Claude Code's ANTHROPIC_API_KEY) and
    its Authorization Bearer token (ANTHROPIC_AUTH_TOKEN), "" for each it lacks.  With
    both variables set, Claude Code sends both headers.  A browser sends the key as
    its Basic password (the status page, docs/operating.md §11)."""
    auth = headers.get("authorization") or ""
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "basic":        # a browser's (RFC 7617): any user, the key
        try:
            token = base64.b64decode(token.strip(), validate=True).decode(
                "utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            token = ""
        scheme = "bearer"
    return ((headers.get("x-api-key") or "").strip(),
            token.strip() if scheme.lower() == "bearer" else "")


def key_ring(config):
    """(digest, name) of every key a client may present: the api_key as "default",
    then client_keys by name."""
    ring = [(key_digest(config.api_key), "default")] if config.api_key else []
    return ring + [(key_digest(k.key), k.name) for k in config.client_keys]


def key_owner(headers, ring):
    """The name of the key the client presents, or None.  Either header may carry it
    (issue #18); every presented key is compared with every configured one, in
    constant time, with no early exit."""
    owner = None
    for key in presented_keys(headers):
        digest = key_digest(key)
        for expected, name in ring:
            if hmac.compare_digest(digest, expected) and key:
                owner = owner or name
    return owner


def header_value_ok(value):
    """Header values we build must never carry CR, LF or NUL (response splitting)."""
    return not any(c in value for c in "\r\n\0")


def connection_tokens(headers):
    """Field names listed in Connection (RFC 9110 §7.6.1), lower-cased."""
    tokens = set()
    for value in headers.get_all("connection") or ():
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def filter_headers(headers, drop):
    """(name, value) pairs of `headers` (an email.message.Message) without hop-by-hop
    fields, without those named in Connection, and without names in `drop`."""
    listed = connection_tokens(headers)
    return [(name, value) for name, value in headers.items()
            if name.lower() not in drop and name.lower() not in listed]


def random_hex(n):
    """n hex digits from os.urandom, as uuid4 draws them (uuid's import costs the
    daemon 0.2 MB of RSS for nothing else)."""
    return os.urandom((n + 1) // 2).hex()[:n]


def new_request_id():
    """An id in the shape of Anthropic's request ids."""
    return "req_ccp_" + random_hex(24)


def error_body(etype, message, request_id=""):
    """The Anthropic error document (docs/translation.md §4)."""
    doc = {"type": "error", "error": {"type": etype, "message": message}}
    if request_id:
        doc["request_id"] = request_id
    return json.dumps(doc).encode()


#: Upstream status -> (status for the client, Anthropic error type, extra headers).
#: docs/translation.md §4; x-should-retry: false where retrying cannot help (Claude Code
#: otherwise retries a 401 eight times over 100 s).
UPSTREAM_STATUS_MAP = {
    400: (400, "invalid_request_error", ()),
    401: (401, "authentication_error", (("x-should-retry", "false"),)),
    402: (402, "billing_error", (("x-should-retry", "false"),)),
    403: (403, "permission_error", (("x-should-retry", "false"),)),
    404: (404, "not_found_error", ()),
    408: (504, "timeout_error", ()),
    413: (413, "request_too_large", (("x-should-retry", "false"),)),
    422: (400, "invalid_request_error", ()),
    429: (429, "rate_limit_error", ()),
    500: (500, "api_error", ()),
    502: (500, "api_error", ()),
    503: (529, "overloaded_error", ()),
    504: (504, "timeout_error", ()),
    529: (529, "overloaded_error", ()),
}


def upstream_message(body):
    """The human message inside an upstream error body, whatever its dialect."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace").strip()
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        doc = doc[0]                              # Gemini sometimes sends a list
    if isinstance(doc, dict):
        err = doc.get("error")
        for candidate in ((err or {}).get("message") if isinstance(err, dict) else err,
                          doc.get("detail"), doc.get("message")):
            if isinstance(candidate, str) and candidate:
                return candidate + _openrouter_detail(err)
    return body[:300].decode("utf-8", "replace").strip()


def _openrouter_detail(err):
    """OpenRouter hides the real provider's words in error.metadata."""
    meta = err.get("metadata") if isinstance(err, dict) else None
    if not isinstance(meta, dict):
        return ""
    extra = [str(meta[k]) for k in ("provider_name", "raw") if meta.get(k)]
    return (" (" + ": ".join(extra)[:500] + ")") if extra else ""


#: Upstream wording for a prompt over the model's context (OpenAI, vLLM, Groq, …).
CONTEXT_OVERFLOW = re.compile(r"context_length_exceeded|maximum context length|reduce the "
                              r"length|context window|too many tokens|prompt is too long|"
                              r"context size", re.I)


def is_anthropic_error(body):
    """True when `body` already is an Anthropic error document."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return (isinstance(doc, dict) and doc.get("type") == "error"
            and isinstance(doc.get("error"), dict) and "type" in doc["error"])


def retry_after_seconds(headers):
    """retry-after in whole seconds, from retry-after or Azure's retry-after-ms."""
    value = (headers.get("retry-after") or "").strip()
    if value.isdigit():
        return value
    ms = (headers.get("retry-after-ms") or "").strip()
    if ms.isdigit():
        return str(max(1, -(-int(ms) // 1000)))
    return ""


def map_upstream_error(status, headers, body, label, passthrough):
    """An upstream error response -> (status, headers, body) for the client.

    An Anthropic pass-through keeps an Anthropic-shaped body and its status (529
    included); everything else becomes the error Claude Code's retry logic expects.
    """
    if status not in UPSTREAM_STATUS_MAP:
        status_family = 500 if status >= 500 else 400
        mapped = UPSTREAM_STATUS_MAP[status_family]
    else:
        mapped = UPSTREAM_STATUS_MAP[status]
    out_status, etype, extra = mapped
    message = upstream_message(body)
    if "overloaded" in message.lower() and out_status >= 500:
        out_status, etype = 529, "overloaded_error"
    extra = list(extra)
    retry_after = retry_after_seconds(headers)
    if retry_after:
        extra.append(("retry-after", retry_after))
    if passthrough and is_anthropic_error(body) and status != 503:
        return status, extra, body
    text = "%s upstream %d: %s" % (label, status, message or http.client.responses.get(
        status, "error"))
    limit = limit_error(body)
    overflow = limit["kind"] == "overflow" if limit else (
        CONTEXT_OVERFLOW.search(message) or CONTEXT_OVERFLOW.search(
            body[:2000].decode("utf-8", "replace")))
    if out_status in (400, 413) and overflow:
        # Anthropic's wording, which Claude Code's overflow handling (compact) knows.
        out_status, etype, text = 400, "invalid_request_error", "prompt is too long: " + text
    if out_status == 400 and not passthrough and ("x-should-retry", "false") not in extra:
        # A translated 400 will not heal on a re-send (Claude Code would send six).
        extra.append(("x-should-retry", "false"))
    return out_status, extra, error_body(etype, text)


def failure_reply(error, label):
    """An UpstreamError (no response head) -> (status, etype, message, headers)."""
    if error.kind == "timeout":
        return 504, "timeout_error", "%s upstream timed out: %s" % (label, error.url), ()
    if error.kind == "connect":
        # Not retried by Claude Code: a provider that is down stays down for minutes,
        # and the user should see the URL at once (docs/translation.md §4).
        return (500, "api_error", "%s upstream unreachable: %s (%s)"
                % (label, error.url, error.detail), (("x-should-retry", "false"),))
    return 500, "api_error", "%s upstream connection failed: %s (%s)" % (
        label, error.url, error.detail), ()


def misdirected_reply(status, headers):
    """Why a reply that looks like a success is not one, or "": a redirect (a client
    that followed it would send its key to the Location host), or an HTML page (a
    captive portal, a login page).  Relayed, such replies counted the provider healthy
    (issue #17); they fail the attempt, the next provider is tried, and the last is
    answered 502."""
    if 300 <= status < 400:
        return "answered a %d redirect, not an API reply: check base_url" % status
    if status < 300 and "text/html" in (headers.get("content-type") or "").lower():
        return "answered an HTML page, not an API reply: check base_url and any proxy"
    return ""


def fallback_worthy(status):
    """Statuses after which the next provider in the fallback order is tried."""
    return status == 429 or status == 408 or status >= 500


def route_model_kind(model):
    """"small" for haiku-class names, "big" for opus and sonnet, else ""."""
    name = model.lower()
    if "haiku" in name:
        return "small"
    if "opus" in name or "sonnet" in name:
        return "big"
    return ""


def upstream_model(provider, route_model, client_model):
    """The model name sent upstream: the route's, the provider's by size, or the client's."""
    if route_model:
        return route_model
    kind = route_model_kind(client_model)
    if kind == "small" and provider.small_model:
        return provider.small_model
    if kind == "big" and provider.big_model:
        return provider.big_model
    return provider.model or client_model


def plan_route(config, model, route=None):
    """[(provider, upstream model), …] to try in order for a client `model`.

    The route (choose_route's, else the first that matches the name alone: fnmatch on
    the lower-cased name, "default" matches all) picks the first provider; the
    fallback list adds the others in its order.
    """
    name = (model or "").lower()
    route = route or next((r for r in config.routes if not r.when and names_model(r, name)),
                          None)
    first = config.provider(route.provider) if route else config.providers[0]
    plan = [(first, upstream_model(first, route.model if route else "", model))]
    for pname in config.fallback:
        provider = config.provider(pname)
        if all(provider is not p for p, _ in plan):
            plan.append((provider, upstream_model(provider, "", model)))
    return plan


def names_model(route, name):
    """Whether a route's match takes the lower-cased model name ("" or default: all)."""
    return route.match in ("", "default") or fnmatch.fnmatchcase(name, route.match)


def callable_plan(config, plan, available):
    """The attempts of `plan` worth making: none to a provider without the key it needs
    (answered at once, naming what to set, rather than by the provider's 401), and none
    to one whose circuit is open (`available(name)` False) unless no other is left."""
    ready = [p for p in plan if not unconfigured(config, p[0])]
    if not ready:
        provider = plan[0][0]
        raise HTTPError(500, "api_error", "ccproxy: provider %s has no key: %s"
                        % (provider.name, key_hint(provider)), (("x-should-retry", "false"),))
    return [p for p in ready if available(p[0].name)] or ready


def _safe_tool_id(tool_id):
    """A tool id Anthropic accepts, derived deterministically so that tool_use and
    tool_result map to the same value (ids minted by other providers carry '.' or ':')."""
    if TOOL_ID_RE.match(tool_id):
        return tool_id
    digest = hashlib.sha256(tool_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return "toolu_" + re.sub(r"[^a-zA-Z0-9_-]", "_", tool_id)[:40] + "_" + digest


#: Top-level request members that come back byte for byte with every call of a
#: session: Claude Code sends 32 KB of tools and 7 KB of system prompt in its 50 KB
#: body, and parsing them was 64 of the 84 us json.loads took (see MemberCache).
REPEATED_MEMBERS = frozenset(("tools", "system"))
_JSON_SPACE = re.compile(r"[ \t\n\r]*")          # JSON's whitespace (RFC 8259 §2)
_JSON_DECODER = json.JSONDecoder()
#: Compact JSON text, UTF-8 kept.  One encoder for every call: json.dumps with options
#: builds a new one each time, 2.8 against 2.0 us for a stream's text delta event.
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_ascii_json = json.JSONEncoder(separators=(",", ":")).encode


def json_bytes(doc):
    """`doc` as JSON in UTF-8, spaced as json.dumps spaces it.  A string with a lone
    UTF-16 surrogate (Claude Code sends "\\ud83d" when a tool's output was cut inside an
    emoji) has no UTF-8 form: the document then goes as ASCII JSON, the surrogate
    escaped as the client sent it.  Such text used to fail the call with a 500, and
    every later turn with it (issue #17)."""
    try:
        return json.dumps(doc, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(doc).encode()


def utf8_len(text):
    """UTF-8 bytes of `text`, a lone surrogate counted as the 3 bytes of its code point.
    (Plain encode() first: an errors argument costs it its ASCII fast path, 53 -> 133 ns.)"""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def scan_json_object(raw, member):
    """json.loads(raw) for a top-level object, each REPEATED_MEMBERS value read by
    member(key, text, index) -> (value, end); the rest is parsed by json's own scanner,
    one member at a time.  None for anything else, malformed or not an object:
    json.loads then decides, with its own message."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")   # as json.loads
        i = _JSON_SPACE.match(text).end()
        if not text.startswith("{", i):
            return None
        doc, i = _json_members(text, _JSON_SPACE.match(text, i + 1).end(), member)
    except ValueError:
        return None
    ok = doc is not None and text.startswith("}", i)
    return doc if ok and _JSON_SPACE.match(text, i + 1).end() == len(text) else None


def _json_members(text, i, member):
    """(the object's members as a dict, index of its closing brace) from text[i], the
    first non-space after "{"; (None, i) when they are malformed."""
    doc, space = {}, _JSON_SPACE.match
    while text.startswith('"', i):
        key, i = json.decoder.scanstring(text, i + 1)
        i = space(text, i).end()
        if not text.startswith(":", i):
            return None, i
        i = space(text, i + 1).end()
        doc[key], i = (member(key, text, i) if key in REPEATED_MEMBERS
                       else _JSON_DECODER.raw_decode(text, i))
        i = space(text, i).end()
        if not text.startswith(",", i):
            return doc, i
        i = space(text, i + 1).end()
    return (doc, i) if not doc else (None, i)     # "{}", or a "," with no member after


def _sanitize_block(block):
    """One content block for Anthropic, or None to drop it."""
    if not isinstance(block, dict):
        return block
    kind = block.get("type")
    if kind == "thinking" and str(block.get("signature", "")).startswith(
            CCPROXY_SIGNATURE_PREFIX):
        return None        # signed by ccproxy for another provider: Anthropic rejects it
    # A client's value is never a dict key unchecked: a list there was a 500 (issue #17).
    key = {"tool_use": "id", "tool_result": "tool_use_id"}.get(kind) if isinstance(
        kind, str) else None
    if key and isinstance(block.get(key), str) and not TOOL_ID_RE.match(block[key]):
        return dict(block, **{key: _safe_tool_id(block[key])})
    return block


def sanitize_for_anthropic(body):
    """Remove only what Anthropic would reject; return (body, changed)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body, False
    changed, out = False, []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            blocks = [b for b in (_sanitize_block(b) for b in content) if b is not None]
            if len(blocks) != len(content) or any(a is not b for a, b in zip(blocks, content)):
                message, changed = dict(message, content=blocks), True
        out.append(message)
    return (dict(body, messages=out) if changed else body), changed


def passthrough_body(raw, body, model):
    """The bytes to send an Anthropic upstream: `raw` untouched unless the model is
    mapped or something must be removed (so a plain pass-through is byte for byte)."""
    clean, changed = sanitize_for_anthropic(body)
    if model and model != body.get("model"):
        clean, changed = dict(clean, model=model), True
    return json_bytes(clean) if changed else raw


def passthrough_headers(client_headers, provider, config):
    """Headers for an Anthropic upstream: the client's, minus hop-by-hop and credentials,
    plus the route key (or, with no route key and no ccproxy key, the client's own)."""
    headers = filter_headers(client_headers, REQUEST_DROP | set(CLIENT_KEY_HEADERS))
    if provider.api_key:
        headers.append(("x-api-key", provider.api_key))
    elif not config.api_key:
        # Zero-config pass-through: the client's key (or OAuth token) goes upstream.
        headers.extend((n, v) for n, v in client_headers.items()
                       if n.lower() in CLIENT_KEY_HEADERS)
    headers.append(("accept-encoding", "identity"))
    return with_provider_headers(headers, provider)


#: Endpoint name -> path under {base}/v1/ on an Anthropic upstream.
ANTHROPIC_PATHS = {"messages": "messages", "count_tokens": "messages/count_tokens",
                   "models": "models"}


def anthropic_url(provider, endpoint, query):
    """{base}/v1/{path}: a base that already ends in /v1 is accepted."""
    base = provider.base_url
    if base.endswith("/v1"):
        base = base[:-3]
    return base + "/v1/" + ANTHROPIC_PATHS[endpoint] + ("?" + query if query else "")


def redact_url(url):
    """A URL fit for messages: no userinfo, no query (Gemini keys travel in ?key=)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += ":%d" % parts.port
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def rewrite_model_json(body, model):
    """A JSON response body with its top-level `model` replaced (the name the client
    asked for); unchanged when it does not parse."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if isinstance(doc, dict) and "model" in doc:
        doc["model"] = model
        return json_bytes(doc)
    return body


def rewrite_message_start(frame, model):
    """An SSE frame; if it is message_start, with message.model set to `model`."""
    lines = frame.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data:") and b'"message_start"' in line:
            try:
                doc = json.loads(line[5:])
                doc["message"]["model"] = model
            except (ValueError, KeyError, TypeError):
                return frame
            lines[i] = b"data: " + json_bytes(doc)
    return b"\n".join(lines)


class UsageScanner:
    """Token usage out of a relayed Anthropic stream, without parsing every event: only
    the lines that carry "usage" (message_start and message_delta) are decoded."""

    LIMIT = 1 << 20                   # a longer line is no usage line: skipped unread

    def __init__(self, tape=None):
        self.tail, self.input_tokens, self.output_tokens = b"", None, None
        self.skipping = False             # inside a line longer than LIMIT
        self.usage = {}                   # the Anthropic usage fields seen, newest wins
        self.tape = tape                  # the call's recording (it sees every read)

    def feed(self, data):
        if self.tape is not None:
            self.tape.read(data)
        if self.skipping:
            end = data.find(b"\n")
            if end < 0:
                return
            data, self.skipping = data[end + 1:], False
        text = self.tail + data if self.tail else data
        if b'"usage"' not in text:
            return self._keep(text[text.rfind(b"\n") + 1:])
        lines = text.split(b"\n")
        self._keep(lines.pop())
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._line(line[5:])

    def _keep(self, tail):
        """The start of a line that has not ended, or nothing once it is too long: its
        end, kept and copied again with every chunk, made a long line quadratic."""
        self.tail, self.skipping = (b"", True) if len(tail) > self.LIMIT else (tail, False)

    def _line(self, raw):
        doc = _loads(raw)
        if not isinstance(doc, dict):
            return
        usage = _obj(doc.get("message")).get("usage") if doc.get(
            "type") == "message_start" else doc.get("usage")
        if isinstance(usage, dict):
            self.usage.update((k, v) for k, v in usage.items() if k in USAGE_KEYS and
                              isinstance(v, int))
            total_in = sum(v for k, v in usage.items() if k in (
                "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
                and isinstance(v, int))
            if total_in:
                self.input_tokens = total_in
            if isinstance(usage.get("output_tokens"), int):
                self.output_tokens = usage["output_tokens"]


#: Anthropic's usage fields a ledger row splits (usage_split).
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens",
              "cache_creation_input_tokens")


def usage_split(usage):
    """(input not cached, output, cache read, cache write) of an Anthropic usage."""
    usage = usage if isinstance(usage, dict) else {}
    return tuple(usage.get(k) if isinstance(usage.get(k), int) else 0 for k in (
        "input_tokens", "output_tokens", "cache_read_input_tokens",
        "cache_creation_input_tokens"))


def _obj(value):
    """`value` when it is a JSON object, else {}: a client's or an upstream's field is
    never assumed to have the shape it should (issue #17: an image "source" that was a
    string, an "effort" that was an object, reached a 500)."""
    return value if isinstance(value, dict) else {}


def _loads(text):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _INVALID


_INVALID = object()


# ---- Status documents and log lines --------------------------------------------------

def format_duration(seconds):
    """8130 -> '2h 15m 30s' (the /status uptime field)."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")]
    text = " ".join("%d%s" % (n, u) for n, u in parts if n)
    return (text + " %ds" % secs).strip()


def iso_time(epoch):
    """UTC RFC 3339 time with a Z suffix, or None."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def provider_health_word(status):
    """A provider's status word -> its health word."""
    return {"connected": "healthy", "unknown": "unknown",
            "rate_limited": "degraded"}.get(status, "unhealthy")


def overall_health(statuses):
    """healthy: every provider usable; degraded: some not, or rate limited; unhealthy:
    none usable.  A provider nobody has called yet counts as usable."""
    usable = [s in USABLE for s in statuses]
    if statuses and not any(usable) and "rate_limited" not in statuses:
        return "unhealthy"
    if all(usable):
        return "healthy"
    return "degraded"


def _merged(how):
    """A Snapshot field, and how the workers' values of it merge (merge_snapshots)."""
    return dataclasses.field(default=None, metadata={"merge": how})


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The service at one moment, read once: /status, /health/detailed and /metrics are
    rendered from it.  Each field says how the snapshots of a supervisor's workers
    merge into the service's (issue #19: dicts indexed by position, merged by hand):

    - own:     the answering process's (the same in every worker, or its own view);
    - live:    summed over the workers that run now;
    - total:   summed over every worker that ran, the last reports of dead ones
               included, so that counters never go back;
    - stats:   provider health: each provider's newest status, its counts summed;
    - metrics: counters and histogram buckets summed (merge_metrics).
    """
    config: object = _merged("own")
    now: float = _merged("own")
    started: float = _merged("own")
    pid: int = _merged("own")                 # a worker's answer gives the supervisor's
    port: int = _merged("own")
    draining: bool = _merged("own")
    ready: bool = _merged("own")
    loaded_at: float = _merged("own")
    last_reload_error: object = _merged("own")
    build: dict = _merged("own")
    record: dict = _merged("own")             # the runtime record, once serving
    workers: tuple = _merged("own")           # set by the merge: a summary per live worker
    ready_error: object = _merged("own")      # set by the merge: why not every worker is
    requests_served: int = _merged("total")
    reload_failures: int = _merged("total")
    upstream_connections: int = _merged("total")
    in_flight: int = _merged("live")
    reloads: int = _merged("live")
    provider_stats: dict = _merged("stats")
    metrics: dict = _merged("metrics")        # a Metrics.snapshot(); exported in reports
    usage: dict = _merged("own")              # the ledger's state, the keys' spend
    ledger_written: int = _merged("total")
    ledger_dropped: int = _merged("total")


def route_items(config, routed):
    """The /status routes: each as configured, with the calls it took and why."""
    items = []
    for index, r in enumerate(config.routes):
        name = r.name or "routes[%d]" % index
        items.append({"name": name, "match": r.match or None, "when": r.when or None,
                      "provider": r.provider, "model": r.model or None,
                      "calls": {why: n for (rule, why), n in routed.items() if rule == name}})
    picks = {why: n for (rule, why), n in routed.items() if rule == "pick"}
    return items + ([{"name": "pick", "match": "PROVIDER,MODEL", "calls": picks}] if picks
                    else [])


def provider_items(config, stats, now):
    """The /status provider entries: configuration plus what traffic showed."""
    items = []
    for p in config.providers:
        s = stats.get(p.name, {})
        status = s.get("status", "unknown")
        if status == "rate_limited" and s.get("rate_limited_until", 0) <= now:
            status = "connected"
        if unconfigured(config, p):
            status = "unconfigured"          # no call can work: it has no key
        items.append({
            "name": p.name, "type": p.type, "status": status,
            "health": provider_health_word(status), "model": p.model or None,
            "base_url": redact_url(p.base_url), "api_key_configured": bool(p.api_key),
            "api_key_source": p.key_source or None,
            "last_check": iso_time(s.get("last_check")),
            "response_time_ms": s.get("response_time_ms"),
            "tokens_per_second": s.get("tokens_per_second"),
            "rate_limit_remaining": s.get("rate_limit_remaining"),
            "requests": s.get("requests", 0), "errors": s.get("errors", 0),
            "circuit": "open" if s.get("circuit_open_until", 0) > now else "closed",
            "last_error": s.get("last_error"), "last_error_at": iso_time(s.get("last_error_at")),
        })
        window, output, source = route_limits(config, p, p.model, s.get("learned_window", 0))
        items[-1].update(context_window=window or None, context_window_source=source or None,
                         max_output=output or None)
    return items


def percentile_ms(state, buckets, q):
    """The q-quantile, in ms, of a histogram's (counts, sum, count), interpolated in its
    bucket as Prometheus's histogram_quantile does; None without observations."""
    counts, _, count = state
    if not count:
        return None
    target, seen, low = q * count, 0, 0.0
    for bound, n in zip(buckets, counts):
        if n and seen + n >= target:
            return int(round((low + (bound - low) * (target - seen) / n) * 1000))
        seen, low = seen + n, bound
    return int(round(low * 1000))


def latency_fields(metrics, name):
    """A provider's p50 and p95 upstream latency and time to first byte, in ms."""
    out = {}
    for field, family, buckets in (("latency_ms", "latency", DURATION_BUCKETS),
                                   ("ttfb_ms", "ttfb", TTFB_BUCKETS)):
        state = metrics.get(family, {}).get(name)
        for q in (50, 95):
            out["%s_p%d" % (field, q)] = percentile_ms(state, buckets, q / 100.0) if (
                state) else None
    return out


def minute_series(metrics, name, now):
    """A provider's last hour: (calls, errors) for each of the last MINUTES minutes."""
    minutes, last = metrics.get("minutes", {}), int(now // 60)
    return [(minutes.get((name, m, "calls"), 0), minutes.get((name, m, "errors"), 0))
            for m in range(last - MINUTES + 1, last + 1)]


def providers_document(items):
    """The `providers` object of /status: counts, percentages and stats by type."""
    healthy = [i for i in items if i["status"] in USABLE]
    by_type = {}
    for item in items:
        entry = by_type.setdefault(item["type"], {"total_count": 0, "healthy_count": 0})
        entry["total_count"] += 1
        entry["healthy_count"] += item in healthy
    for entry in by_type.values():
        entry["healthy_percentage"] = _percent(entry["healthy_count"], entry["total_count"])
        entry["status"] = "ok" if entry["healthy_count"] == entry["total_count"] else (
            "degraded" if entry["healthy_count"] else "down")
    return {"count": len(items), "active": [i["name"] for i in items],
            "healthy_count": len(healthy),
            "healthy_percentage": _percent(len(healthy), len(items)),
            "items": items, "stats_by_type": by_type}


def _percent(part, whole):
    return round(100.0 * part / whole, 1) if whole else 0.0


def health_problem(items, health, now_stats, now):
    """The error/warning fields /status adds when health is not healthy."""
    if health == "unhealthy":
        bad = next(i for i in items if i["status"] not in USABLE)
        code = {"auth_failed": ("provider_auth_failed", "authentication_failed"),
                "unconfigured": ("provider_unconfigured", "no_key")}.get(
            bad["status"], ("provider_connection_failed", "connection_failed"))
        return {"error": code[0], "message": "no provider is usable; %s is %s"
                % (bad["name"], bad["status"]),
                "details": {"provider": bad["name"], "error_code": code[1]}}
    limited = [i for i in items if i["status"] == "rate_limited"]
    if limited:
        until = now_stats.get(limited[0]["name"], {}).get("rate_limited_until", 0)
        return {"warning": "rate_limited", "retry_after": max(0, int(until - now + 0.999))}
    return {}


def status_document(snap):
    """The /status document (docs/operating.md §4) from a Snapshot of the service."""
    config, now = snap.config, snap.now
    items = provider_items(config, snap.provider_stats, now)
    for item in items:
        item.update(latency_fields(snap.metrics, item["name"]))
    health = overall_health([i["status"] for i in items])
    record = snap.record or {}
    doc = {
        "service": "ccproxy", "version": __version__,
        "status": "draining" if snap.draining else "running",
        "health": health, "timestamp": iso_time(now),
        "uptime": format_duration(now - snap.started),
        "uptime_seconds": int(now - snap.started),
        "pid": snap.pid, "host": config.host, "port": snap.port,
        "pid_file": record.get("pid_file"), "log_file": record.get("log_file"),
        "api_key_configured": bool(config.api_key),
        "requests_served": snap.requests_served,
        "requests_in_flight": snap.in_flight,
        "providers": providers_document(items),
        "provider": items[0] if items else None,
        "routes": route_items(config, snap.metrics.get("routed", {})),
        "usage": dict(snap.usage or {"enabled": False}, written=snap.ledger_written,
                      dropped=snap.ledger_dropped),
        "config": {"source": config.source or None, "fingerprint": config.fingerprint,
                   "loaded_at": iso_time(snap.loaded_at), "reloads": snap.reloads,
                   "reload_failures": snap.reload_failures,
                   "last_reload_error": snap.last_reload_error},
        "build": snap.build,
    }
    if snap.workers is not None:
        doc["workers"] = list(snap.workers)
    doc.update(health_problem(items, health, snap.provider_stats, now))
    return doc


def health_document(alive, service):
    """/health: alive or not, the version and the uptime."""
    return {"status": "healthy" if alive else "unhealthy", "version": __version__,
            "uptime_seconds": int(time.time() - service.started),
            "timestamp": iso_time(time.time())}


def detailed_health_document(snap):
    """/health/detailed: components and the effective configuration, no secrets."""
    config = snap.config
    items = provider_items(config, snap.provider_stats, snap.now)
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in ("api_key", "providers", "routes", "client_keys")}
    settings["api_key_configured"] = bool(config.api_key)
    settings["client_keys"] = [k.name for k in config.client_keys]
    settings["routes"] = [dataclasses.asdict(r) for r in config.routes]
    return {
        "status": "pass" if snap.ready else "fail",
        "version": __version__, "serviceId": "ccproxy", "timestamp": iso_time(snap.now),
        "components": {
            "server": {"status": "pass" if snap.ready else "fail",
                       "draining": snap.draining, "in_flight": snap.in_flight},
            "config": {"status": "pass" if not snap.last_reload_error else "warn",
                       "fingerprint": config.fingerprint,
                       "reload_failures": snap.reload_failures},
            "providers": items,
            # Keep-alive at work: far fewer connections than upstream calls.
            "upstream": {"connections_opened": snap.upstream_connections or 0},
        },
        "config": settings,
    }


def escape_log(text):
    """Control characters and backslashes escaped, as http.server does for its own
    log; a lone surrogate, which a UTF-8 log file cannot hold, as \\udxxx."""
    text = str(text).translate(_CONTROL_CHARS)
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


def access_record(fields):
    """One access-log line in text form (docs/operating.md §6)."""
    order = ("request_id", "client", "method", "path", "status", "route", "rule", "reason",
             "key", "provider", "model", "upstream_model", "upstream_status", "attempts",
             "latency_ms", "ttfb_ms", "input_tokens", "output_tokens")
    head = "%s %s %s %s %s" % tuple(escape_log(fields.get(k, "-")) for k in order[:5])
    tail = " ".join("%s=%s" % (k, escape_log(fields[k])) for k in order[5:]
                    if fields.get(k) not in (None, ""))
    return (head + " " + tail).strip()


# ---- Metrics text (Prometheus exposition format 0.0.4) -------------------------------

def escape_label(value):
    """A label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text):
    """HELP text: backslash and newline escaped (quotes stay as they are)."""
    return str(text).replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value):
    """A sample value as Go's ParseFloat reads it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(pairs):
    if not pairs:
        return ""
    return "{" + ",".join('%s="%s"' % (k, escape_label(v)) for k, v in pairs) + "}"


def render_metrics(families):
    """[(name, type, help, [(suffix, label pairs, value), …]), …] -> exposition text:
    one HELP and TYPE per family before its samples, one group per family, final
    newline."""
    lines = []
    for name, kind, text, samples in families:
        lines.append("# HELP %s %s" % (name, escape_help(text)))
        lines.append("# TYPE %s %s" % (name, kind))
        lines.extend("%s%s%s %s" % (name, suffix, _labels(labels), format_value(value))
                     for suffix, labels, value in samples)
    return "\n".join(lines) + "\n"


def histogram_samples(labels, buckets, counts, total, count):
    """_bucket (cumulative, le ascending, +Inf = _count), _sum and _count samples."""
    samples, running = [], 0
    for bound, n in zip(buckets, counts):
        running += n
        samples.append(("_bucket", labels + (("le", format_value(float(bound))),), running))
    samples.append(("_bucket", labels + (("le", "+Inf"),), count))
    samples.append(("_sum", labels, total))
    samples.append(("_count", labels, count))
    return samples


def upstream_outcome(status):
    """A fixed, low-cardinality word for an upstream attempt's outcome."""
    if isinstance(status, str):
        return {"connect": "connect_error"}.get(status, status)
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    return "client_error" if status >= 400 else "ok"


def metrics_families(snap):
    """The families of /metrics from a Snapshot of the service."""
    m = snap.metrics
    items = provider_items(snap.config, snap.provider_stats, snap.now)
    return [
        ("ccproxy_requests_total", "counter", "Requests answered, by status code and route.",
         [("", (("code", str(c)), ("route", r)), n) for (c, r), n in sorted(m["requests"].items())]),
        ("ccproxy_request_duration_seconds", "histogram", "Time from request to last byte.",
         [x for r, h in sorted(m["duration"].items())
          for x in histogram_samples((("route", r),), DURATION_BUCKETS, *h)]),
        ("ccproxy_time_to_first_byte_seconds", "histogram",
         "Time from request to the first streamed byte, streaming responses only.",
         [x for p, h in sorted(m["ttfb"].items())
          for x in histogram_samples((("provider", p),), TTFB_BUCKETS, *h)]),
        ("ccproxy_upstream_requests_total", "counter", "Upstream attempts by outcome.",
         [("", (("provider", p), ("outcome", o)), n)
          for (p, o), n in sorted(m["upstream"].items())]),
        ("ccproxy_tokens_total", "counter", "Tokens reported by upstreams (or estimated).",
         [("", (("provider", p), ("direction", d)), n)
          for (p, d), n in sorted(m["tokens"].items())]),
        ("ccproxy_routed_requests_total", "counter", "Calls the routes sent, by route name "
         "and why (a scenario, the model name, default or the user's pick).",
         [("", (("rule", r), ("reason", w)), n)
          for (r, w), n in sorted(m.get("routed", {}).items())]),
    ] + usage_families(snap) + [
        ("ccproxy_inflight_requests", "gauge", "Requests being served now.",
         [("", (), snap.in_flight)]),
        ("ccproxy_provider_up", "gauge", "1 when the provider is usable (connected or "
         "untried), else 0.", [("", (("provider", i["name"]),), int(
             i["status"] in USABLE)) for i in items]),
        ("ccproxy_build_info", "gauge", "Build of the running ccproxy; always 1.",
         [("", (("version", snap.build["version"]), ("commit", snap.build["commit"])),
           1)]),
        ("ccproxy_config_reload_failures_total", "counter", "Reloads refused for a bad config.",
         [("", (), snap.reload_failures)]),
        ("process_start_time_seconds", "gauge", "Start time of the process since the epoch.",
         [("", (), round(snap.started, 3))]),
    ]


def usage_families(snap):
    """The usage families of /metrics: per client key and model, and the ledger's."""
    m = snap.metrics
    return [
        ("ccproxy_key_tokens_total", "counter", "Tokens of Messages calls by client key "
         "name (- for none), model and type (input, output, cache_read, cache_write).",
         [("", (("key", k), ("model", md), ("type", t)), n)
          for (k, md, t), n in sorted(m.get("key_tokens", {}).items())]),
        ("ccproxy_key_cost_usd_total", "counter", "Estimated cost in USD of Messages calls "
         "by client key name and model (prices: docs/operating.md §10).",
         [("", (("key", k), ("model", md)), round(n, 6))
          for (k, md), n in sorted(m.get("key_cost", {}).items())]),
        ("ccproxy_usage_rows_written_total", "counter", "Rows the usage ledger wrote.",
         [("", (), snap.ledger_written)]),
        ("ccproxy_usage_rows_dropped_total", "counter", "Rows the usage ledger could not "
         "write (queue full; database locked, read-only, full or broken).",
         [("", (), snap.ledger_dropped)]),
    ]


# ---- The status page (docs/operating.md §11) -------------------------------------------

PAGE_REFRESH = 5                 # seconds between the page's refreshes
#: The page's style and script, inline (an air-gapped host fetches nothing); the
#: Content-Security-Policy allows exactly these by their hashes.
PAGE_CSS = """
:root{color-scheme:light dark;--bg:#fff;--fg:#1f2328;--muted:#656d76;--line:#d0d7de;
--card:#f6f8fa;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#8d96a0;
--line:#30363d;--card:#161b22;--ok:#3fb950;--warn:#d29922;--bad:#f85149}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",sans-serif}
main{max-width:1280px;margin:0 auto;padding:16px}
h1{font-size:20px;margin:0 0 4px}h1 small{color:var(--muted);font-weight:normal}
h2{font-size:16px;margin:24px 0 8px}
.meta{color:var(--muted);margin:0}.meta b{color:var(--fg);font-weight:600}
.wrap{overflow-x:auto;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);
vertical-align:top;white-space:nowrap}
th{background:var(--card);font-weight:600}tr:last-child td{border-bottom:0}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.w{white-space:normal;min-width:10em;max-width:28em}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px;
background:var(--muted)}
.ok .dot{background:var(--ok)}.warn .dot{background:var(--warn)}.bad .dot{background:var(--bad)}
.ok{color:var(--ok)}.warn{color:var(--warn)}.bad{color:var(--bad)}
.banner{border:1px solid var(--bad);border-left-width:6px;border-radius:6px;
padding:10px 14px;margin:12px 0;background:var(--card)}
.banner.warn{border-color:var(--warn)}.banner p{margin:4px 0}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
.spark rect{fill:var(--muted)}.spark rect.e{fill:var(--bad)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px}
.muted,footer{color:var(--muted)}footer{margin-top:24px}footer a{color:inherit}
@media (max-width:640px){main{padding:10px}.opt{display:none}}
@media (prefers-reduced-motion:reduce){*{transition:none!important;animation:none!important}}
"""
PAGE_JS = """(function(){var t=%d;function r(){fetch("ui?fragment=1",{cache:"no-store"})
.then(function(x){return x.ok?x.text():null}).then(function(h){if(h!==null){
document.getElementById("page").innerHTML=h}}).catch(function(){})
.then(function(){setTimeout(r,t)})}setTimeout(r,t)})();""" % (PAGE_REFRESH * 1000)


def _csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src %s; script-src %s; "
     "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'" % (_csp_hash(PAGE_CSS), _csp_hash(PAGE_JS))),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))


def wants_html(headers):
    """A browser's request: it asks for text/html (curl and scripts do not)."""
    return "text/html" in (headers.get("accept") or "") if headers is not None else False


def render_page(doc, trends, usage, fragment=False):
    """The status page from /status's document, each provider's last hour (`trends`:
    name -> [(calls, errors)] a minute) and the ledger's summaries (`usage`, None when
    there is no ledger).  Rendered here, so it reads right with JavaScript off; with it
    on, it fetches its fragment again every PAGE_REFRESH seconds."""
    main = "".join((page_header(doc), page_banner(doc), page_providers(doc, trends),
                    page_routes(doc), page_usage(usage), page_footer(doc)))
    if fragment:
        return main
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            "<title>ccproxy: %s</title><link rel=icon href=\"data:,\"><style>%s</style>"
            "</head><body><main id=page>%s</main><script>%s</script></body></html>" % (
                _h(doc.get("health", "")), PAGE_CSS, main, PAGE_JS))


def _h(value):
    return html.escape("" if value is None else str(value), quote=True)


def _tone(word):
    """ok, warn or bad for a health or status word."""
    if word in ("healthy", "connected", "unknown", "ok", "closed", "running"):
        return "ok"
    return "warn" if word in ("degraded", "rate_limited", "draining") else "bad"


def page_header(doc):
    """The service line: health, uptime, pid, workers, config."""
    workers = doc.get("workers")
    bits = ["<b class=%s><span class=dot></span>%s</b>" % (_tone(doc["health"]),
                                                          _h(doc["health"])),
            _h(doc["status"]), "up " + _h(doc["uptime"]), "pid %s" % _h(doc["pid"]),
            "%s requests served" % _h(doc["requests_served"]),
            "%d workers" % len(workers) if workers else "1 process",
            "config " + _h(doc["config"]["source"] or "built-in defaults")]
    return ("<h1>ccproxy <small>%s on port %s</small></h1><p class=meta>%s</p>" % (
        _h(doc["version"]), _h(doc["port"]), " · ".join(bits)))


def page_problems(doc):
    """What is wrong, in words: (tone, sentence) each."""
    out = []
    for p in doc["providers"]["items"]:
        if p["status"] in ("disconnected", "auth_failed", "unconfigured") or (
                p["circuit"] == "open"):
            out.append(("bad", "Provider %s is %s%s%s." % (
                p["name"], p["status"].replace("_", " "), ", its circuit open" if p[
                    "circuit"] == "open" else "", ": " + p["last_error"] if p.get(
                        "last_error") and p["status"] != "unconfigured" else "")))
        elif p["status"] == "rate_limited":
            out.append(("warn", "Provider %s is rate limited." % p["name"]))
    if doc["config"].get("last_reload_error"):
        out.append(("bad", "The last reload failed (the running config stays): %s"
                    % doc["config"]["last_reload_error"]))
    usage = doc.get("usage") or {}
    if usage.get("dropped") and usage.get("error"):
        out.append(("warn", "The usage ledger is dropping rows: %s" % usage["error"]))
    if doc["status"] == "draining":
        out.append(("warn", "ccproxy is stopping: it finishes running calls, takes no new "
                    "ones."))
    return out


def page_banner(doc):
    """What is wrong, if anything, and what to run."""
    problems = page_problems(doc)
    if not problems:
        return ""
    tone = "bad" if any(t == "bad" for t, _ in problems) else "warn"
    return "<div class=\"banner %s\" role=alert>%s<p>Run <code>ccproxy check</code> on " \
           "the host: it says what is wrong and how to fix it.</p></div>" % (
               tone, "".join("<p class=%s>%s</p>" % (t, _h(text)) for t, text in problems))


def sparkline(series):
    """The last hour as SVG bars: calls a minute, errors in red on top."""
    top = max([c for c, _ in series] + [1])
    bars = []
    for i, (calls, errors) in enumerate(series):
        h, e = 20.0 * calls / top, 20.0 * min(errors, calls) / top
        if h:
            bars.append("<rect x=%d y=%.1f width=2 height=%.1f></rect>" % (i * 2, 20 - h, h))
        if e:
            bars.append("<rect class=e x=%d y=%.1f width=2 height=%.1f></rect>" % (
                i * 2, 20 - h, e))
    label = "%d calls in the last hour, %d failed" % (sum(c for c, _ in series),
                                                      sum(e for _, e in series))
    return ("<svg class=spark width=120 height=20 viewBox=\"0 0 120 20\" role=img "
            "aria-label=\"%s\"><title>%s</title>%s</svg>" % (label, label, "".join(bars)))


def _ms(p50, p95):
    return "–" if p50 is None else "%s / %s ms" % (p50, p95)


def page_providers(doc, trends):
    """Each provider: health, last error, latency, last hour."""
    rows = []
    for p in doc["providers"]["items"]:
        circuit = "<br><span class=bad>circuit open</span>" if p["circuit"] == "open" else ""
        rows.append("<tr><td><b>%s</b><br><span class=muted>%s · %s</span></td>"
                    "<td class=%s><span class=dot></span>%s%s</td>"
                    "<td class=w>%s</td><td class=n>%s</td><td class=\"n opt\">%s</td>"
                    "<td class=\"n opt\">%s</td><td class=\"n opt\">%s</td><td>%s</td></tr>" % (
                        _h(p["name"]), _h(p["type"]), _h(p["model"] or "client's model"),
                        _tone(p["status"]), _h(p["status"].replace("_", " ")), circuit,
                        _h(p.get("last_error") or "–"),
                        _ms(p.get("latency_ms_p50"), p.get("latency_ms_p95")),
                        _ms(p.get("ttfb_ms_p50"), p.get("ttfb_ms_p95")),
                        _h(p.get("tokens_per_second") or "–"),
                        _h(p.get("rate_limit_remaining") if p.get("rate_limit_remaining")
                           is not None else "–"),
                        sparkline(trends.get(p["name"]) or [(0, 0)] * MINUTES)))
    return ("<h2>Providers</h2><div class=wrap><table><thead><tr><th>Provider</th>"
            "<th>Health</th><th>Last error</th><th class=n>Latency<br>p50 / p95</th>"
            "<th class=\"n opt\">First byte<br>p50 / p95</th><th class=\"n opt\">"
            "Tokens/s</th><th class=\"n opt\">Rate limit<br>left</th><th>Last hour</th></tr>"
            "</thead><tbody>%s</tbody></table></div>" % "".join(rows))


def page_routes(doc):
    """The routes and the calls each took, by why."""
    routes = doc.get("routes") or []
    if not routes:
        return ("<h2>Routes</h2><p class=muted>No routes: every call goes to %s.</p>"
                % _h(doc["providers"]["active"][0] if doc["providers"]["active"] else "-"))
    rows = "".join(
        "<tr><td><b>%s</b></td><td>%s</td><td>%s</td><td class=w>%s</td></tr>" % (
            _h(r["name"]), _h(" + ".join(x for x in (r.get("when"), r.get("match")) if x)),
            _h("%s%s" % (r.get("provider", ""), " · " + r["model"] if r.get("model")
                         else "")),
            _h(", ".join("%s %d" % kv for kv in sorted(r["calls"].items())) or "none yet"))
        for r in routes)
    return ("<h2>Routes</h2><div class=wrap><table><thead><tr><th>Route</th><th>Takes</th>"
            "<th>Goes to</th><th>Calls, by why</th></tr></thead><tbody>%s</tbody></table>"
            "</div>" % rows)


def usage_table(title, report, first="Model"):
    """One usage summary as a table, with its total."""
    rows = "".join("<tr><td>%s</td><td class=n>%s</td><td class=\"n opt\">%s</td>"
                   "<td class=\"n opt\">%s</td><td class=n>$%.4f</td></tr>" % (
                       _h(r["group"] if len(str(r["group"])) < 40 else str(r["group"])[:37]
                          + "…"), "{:,}".format(r["requests"]),
                       "{:,}".format(r["input_tokens"] + r["cache_read_input_tokens"] +
                                     r["cache_creation_input_tokens"]),
                       "{:,}".format(r["output_tokens"]), r["cost_usd"])
                   for r in report["rows"][:8])
    total = report["total"]
    return ("<div><h3>%s</h3><div class=wrap><table><thead><tr><th>%s</th><th class=n>"
            "Calls</th><th class=\"n opt\">Input</th><th class=\"n opt\">Output</th>"
            "<th class=n>Cost (est.)</th></tr></thead><tbody>%s<tr><td><b>total</b></td>"
            "<td class=n><b>%s</b></td><td class=\"n opt\"></td><td class=\"n opt\"></td>"
            "<td class=n><b>$%.4f</b></td></tr></tbody></table></div></div>" % (
                _h(title), _h(first), rows or "", "{:,}".format(total["requests"]),
                total["cost_usd"]))


def page_usage(usage):
    """The ledger's summaries, or why there are none."""
    if not usage or usage.get("off"):
        why = ((usage or {}).get("off") or "usage is off").capitalize()
        return ("<h2>Usage</h2><p class=muted>%s (the usage ledger: "
                "docs/operating.md §10).</p>" % _h(why))
    return ("<h2>Usage</h2><div class=grid>%s%s%s</div><p class=muted>Costs are estimates "
            "from a price table (docs/operating.md §10).</p>" % (
                usage_table("Today", usage["today"]), usage_table("This month",
                                                                  usage["month"]),
                usage_table("Busiest sessions this month", usage["sessions"], "Session")))


def page_footer(doc):
    """When the page was made, and the machine-readable views."""
    return ("<footer>Updated %s · refreshes every %d s with JavaScript on · "
            "<a href=status>/status</a> · <a href=metrics>/metrics</a> · "
            "<a href=usage>/usage</a></footer>" % (_h(doc["timestamp"]), PAGE_REFRESH))


PAGE_USAGE_TTL = 30.0            # seconds the page reuses the ledger's summaries


def page_usage_data(config, now):
    """The ledger's summaries for the page: today and this month by model, the month's
    busiest sessions; {"off": why} without them."""
    if not (config.usage and config.usage_db):
        return {"off": "usage is off" if not config.usage else "no usage_db is set"}
    t = time.gmtime(now)
    today = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    try:
        return {"today": usage_report(config.usage_db, today, "model"),
                "month": usage_report(config.usage_db, month_start(now), "model"),
                "sessions": usage_report(config.usage_db, month_start(now), "session")}
    except UsageError as exc:
        return {"off": str(exc)}


# ---- Workers: one service out of several processes' reports --------------------------

#: The counter families of a Metrics snapshot, keyed by label tuples.
COUNTERS = ("requests", "upstream", "tokens", "routed", "key_tokens", "key_cost",
            "minutes")
HISTOGRAMS = ("duration", "ttfb", "latency")


def export_metrics(m):
    """A Metrics snapshot as JSON-able lists (tuple keys do not survive JSON)."""
    out = {name: [list(k) + [n] for k, n in m.get(name, {}).items()] for name in COUNTERS}
    out.update({name: [[k] + list(v) for k, v in m.get(name, {}).items()]
                for name in HISTOGRAMS})
    return out


def merge_metrics(exports):
    """The sum of several workers' exported metrics, as one Metrics snapshot: counters
    and histogram buckets add up (prometheus_client's multiprocess mode does the same)."""
    out = {name: {} for name in COUNTERS + HISTOGRAMS}
    for e in exports:
        for name in COUNTERS:
            for row in e.get(name, []):
                key = tuple(row[:-1])
                out[name][key] = out[name].get(key, 0) + row[-1]
        for name in HISTOGRAMS:
            for key, counts, total, count in e.get(name, []):
                old = out[name].get(key, ([0] * len(counts), 0.0, 0))
                out[name][key] = ([x + y for x, y in zip(old[0], counts)], old[1] + total,
                                  old[2] + count)
    return out


def merge_provider_stats(reports):
    """Per provider: the newest status of any worker; requests and errors summed."""
    merged = {}
    for report in reports:
        for name, s in report.get("provider_stats", {}).items():
            m = merged.setdefault(name, {"requests": 0, "errors": 0})
            requests, errors = m["requests"] + s.get("requests", 0), m["errors"] + s.get(
                "errors", 0)
            if s.get("last_check", 0) >= m.get("last_check", 0):
                m.update(s)
            m["requests"], m["errors"] = requests, errors
    return merged


def snapshot_report(snap, worker_id, state):
    """A worker's Snapshot as the JSON report it writes for the others: its fields that
    merge (metrics exported: tuple keys do not survive JSON), and who wrote it."""
    report = {f.name: getattr(snap, f.name) for f in dataclasses.fields(Snapshot)
              if f.metadata["merge"] != "own"}
    report["metrics"] = export_metrics(snap.metrics)
    report.update(id=worker_id, pid=os.getpid(), state=state, heartbeat=snap.now,
                  fingerprint=snap.config.fingerprint)
    return report


#: How each kind of Snapshot field merges: (the live reports, every report) -> value.
MERGES = {
    "live": lambda live, everyone, name: sum(r.get(name) or 0 for r in live),
    "total": lambda live, everyone, name: sum(r.get(name) or 0 for r in everyone),
    "stats": lambda live, everyone, name: merge_provider_stats(live),
    "metrics": lambda live, everyone, name: merge_metrics([r.get(name) or {}
                                                          for r in everyone]),
}


def merge_snapshots(own, reports, dead, expected, service_pid):
    """The whole service out of the answering worker's own Snapshot and the workers'
    reports (live ones, and the last reports of dead ones): each field as its kind
    says (Snapshot), the worker list, the readiness error, the supervisor's PID."""
    live = [r for r in reports if own.now - r.get("heartbeat", 0) < 5]
    merged = {f.name: MERGES[f.metadata["merge"]](live, reports + dead, f.name)
              for f in dataclasses.fields(Snapshot) if f.metadata["merge"] != "own"}
    workers = tuple({"id": r.get("id"), "pid": r.get("pid"), "state": r.get("state"),
                     "requests_served": r.get("requests_served", 0),
                     "config": r.get("fingerprint")} for r in sorted(
                         live, key=lambda r: r.get("id", 0)))
    return dataclasses.replace(own, workers=workers, pid=service_pid, ready_error=(
        readiness_error(live, expected, own.config.fingerprint)), **merged)


def readiness_error(live, expected, fingerprint):
    """Why the service is not ready although this worker is, or None (APISIX's words)."""
    if len(live) < expected:
        return "worker count: %d but status report count: %d" % (expected, len(live))
    stale = [r for r in live if r.get("fingerprint") != fingerprint]
    if stale:
        return "worker id: %s has not received configuration" % stale[0].get("id")
    return None


# ---- Translation: provider quirks ----------------------------------------------------

def quirks_for(provider):
    """The effective quirk flags of a provider: defaults < its type's row < config."""
    flags = dict(QUIRK_DEFAULTS)
    flags.update(PROVIDER_QUIRKS.get(provider.type, {}))
    flags.update(dict(provider.quirks))
    return flags


# ---- Translation: Anthropic request -> OpenAI request (docs/translation.md §1) -------

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
BILLING_PREFIX = "x-anthropic-billing-header:"
GEMINI_SCHEMA_KEYS = frozenset((
    "type", "format", "description", "nullable", "enum", "items", "properties", "required",
    "minItems", "maxItems", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "anyOf", "title"))
SCHEMA_META_KEYS = ("$schema", "$id", "$comment")


@dataclasses.dataclass
class Translation:
    """What one translated request needs to remember for its reply."""
    route: str
    client_model: str
    upstream_model: str
    quirks: dict
    names: dict = dataclasses.field(default_factory=dict)   # upstream name -> original
    estimate: int = 1                                        # input tokens, §5, calibrated
    raw_estimate: int = 1                                    # before calibration
    signatures: object = None                                # ThoughtSignatures or None
    session: str = ""                                        # Claude Code's session id
    max_tokens_cap: int = 0                                  # what fits (§1.9); 0: no cap
    search: dict = None                  # a WebSearch call the provider runs (§1.10)
    dialect: object = None               # the Dialect that reads the reply


def upstream_tool_name(name):
    """A tool name OpenAI accepts (§1.4): bad characters become _, long names are cut
    to 55 characters plus a hash, so distinct names stay distinct."""
    if TOOL_NAME_RE.match(name):
        return name
    clean = re.sub(r"[^a-zA-Z0-9_-]", "_", name) or "tool"
    if len(clean) > 64 or clean != name:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        clean = clean[:55] + "_" + digest if len(clean) > 64 else clean
    return clean


def alnum9(tool_id):
    """A deterministic 9-character alphanumeric id (Mistral's rule, via OpenRouter)."""
    number = int(hashlib.sha256(tool_id.encode("utf-8", "surrogatepass")).hexdigest(), 16)
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while len(out) < 9:
        number, digit = divmod(number, 62)
        out += alphabet[digit]
    return out


def _tool_id(tool_id, quirks):
    tool_id = split_signature(tool_id)[0]
    return alnum9(tool_id) if quirks["tool_id_style"] == "alnum9" else tool_id


SIG_IN_ID = "__ts_"


def id_with_signature(tool_id, sig):
    """A tool id that carries a Gemini thought signature (§3.4 sig_in_id, as LiteLLM
    does): base64url, so the id stays in Anthropic's [a-zA-Z0-9_-] alphabet."""
    return tool_id + SIG_IN_ID + base64.urlsafe_b64encode(
        sig.encode("utf-8", "surrogatepass")).decode("ascii").rstrip("=")


def split_signature(tool_id):
    """(upstream id, thought signature or None) of a tool id from id_with_signature."""
    base, sep, encoded = tool_id.partition(SIG_IN_ID)
    if not sep or not encoded:
        return tool_id, None
    try:
        sig = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_",
                               validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):      # binascii.Error is a ValueError
        return tool_id, None
    return (base, sig) if sig else (tool_id, None)


def clean_schema(schema, dialect):
    """A tool's input_schema for an OpenAI upstream: meta keys removed at every depth,
    an object root, and Gemini's much smaller dialect when the route speaks it."""
    if not isinstance(schema, dict):
        schema = {}
    if dialect == "gemini":
        defs = dict(_obj(schema.get("$defs")), **_obj(schema.get("definitions")))
        out = _gemini_node(schema, defs, 0)
    else:
        out = _strip_meta(schema)
    out.setdefault("type", "object")
    if out.get("type") == "object":
        out.setdefault("properties", {})
    return out


def _strip_meta(node):
    if isinstance(node, dict):
        return {k: _strip_meta(v) for k, v in node.items() if k not in SCHEMA_META_KEYS}
    if isinstance(node, list):
        return [_strip_meta(v) for v in node]
    return node


def _gemini_node(node, defs, depth):
    """One schema node in Gemini's dialect (§1.4): allow-listed keys and rewrites."""
    if not isinstance(node, dict) or depth > 8:
        return {"type": "object"}
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        return _gemini_node(target, defs, depth + 1) if target is not None else {
            "type": "object"}
    node = _gemini_rewrite(dict(node))
    out = {}
    for key, value in node.items():
        if key not in GEMINI_SCHEMA_KEYS:
            continue
        if key == "properties" and isinstance(value, dict):
            value = {k: _gemini_node(v, defs, depth + 1) for k, v in value.items()}
        elif key == "items":
            value = _gemini_node(value, defs, depth + 1)
        elif key == "anyOf" and isinstance(value, list):
            value = [_gemini_node(v, defs, depth + 1) for v in value]
        out[key] = value
    return _gemini_tidy(out)


def _gemini_rewrite(node):
    if "const" in node:
        node["enum"] = [str(node.pop("const"))]
    kind = node.get("type")
    if isinstance(kind, list):
        rest = [t for t in kind if t != "null"]
        node["type"] = rest[0] if rest else "string"
        if "null" in kind:
            node["nullable"] = True
    for src, dst in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(src), (int, float)) and not isinstance(node[src], bool):
            node.setdefault(dst, node[src])
    if "oneOf" in node and "anyOf" not in node:
        node["anyOf"] = node.pop("oneOf")
    return node


def _gemini_tidy(out):
    if "enum" in out and out.get("type") not in (None, "string"):
        del out["enum"]                                  # enum only on strings
    elif "enum" in out:
        out["enum"] = [str(v) for v in out["enum"]]
    if out.get("format") not in (None, "enum", "date-time"):
        del out["format"]
    if isinstance(out.get("required"), list):
        props = _obj(out.get("properties"))
        out["required"] = [r for r in out["required"] if r in props]
        if not out["required"]:
            del out["required"]
    return out


def system_text(system):
    """The system prompt as one string, without Claude Code's billing block (it changes
    with every version and defeats prefix caching)."""
    if isinstance(system, str):
        return "" if system.startswith(BILLING_PREFIX) else system
    if not isinstance(system, list):
        return ""
    texts = [b.get("text") for b in system if isinstance(b, dict)]
    return "\n\n".join(t for t in texts if isinstance(t, str) and t.strip()
                       and not t.startswith(BILLING_PREFIX))


#: Anthropic's limit on cache breakpoints in one request; OpenRouter passes the markers
#: on to Anthropic, which answers 400 past it.
MAX_CACHE_MARKERS = 4


def caches_blocks(quirks, model):
    """Whether the route caches by Anthropic's cache_control markers for this model."""
    pattern = quirks["cache_models"]
    return quirks["cache_control"] and (not pattern or re.search(pattern, model or "")
                                        is not None)


def _cache_marker(block):
    marker = block.get("cache_control") if isinstance(block, dict) else None
    return marker if isinstance(marker, dict) and marker.get("type") == "ephemeral" else None


def _marked(parts, block, cache):
    """`parts` (text parts made from `block`), the last one carrying the block's cache
    marker; None where there is no marker to carry."""
    marker = _cache_marker(block) if cache else None
    if not marker or not parts:
        return None
    return parts[:-1] + [dict(parts[-1], cache_control=dict(marker))]


def system_parts(system):
    """The system prompt as text parts with Claude Code's cache markers, for a route
    that caches by markers; None when no block is marked (then it is one string)."""
    if not isinstance(system, list) or not any(_cache_marker(b) for b in system):
        return None
    parts = []
    for block in system:
        text = block.get("text") if isinstance(block, dict) else None
        if isinstance(text, str) and text.strip() and not text.startswith(BILLING_PREFIX):
            part = {"type": "text", "text": text}
            parts.append((_marked([part], block, True) or [part])[0])
    return parts or None


def limit_cache_markers(msgs, limit=MAX_CACHE_MARKERS):
    """At most `limit` markers: the first (the system prompt's long prefix) and the
    last ones (the newest turns) are kept, as Anthropic counts them."""
    marked = [part for msg in msgs if isinstance(msg.get("content"), list)
              for part in msg["content"] if "cache_control" in part]
    for part in marked[1:len(marked) - limit + 1] if len(marked) > limit else ():
        del part["cache_control"]
    return msgs


def _text_of_blocks(blocks, joiner="\n"):
    return joiner.join(b.get("text", "") for b in blocks
                       if isinstance(b, dict) and b.get("type") == "text" and b.get("text"))


def _image_part(block, quirks):
    """An image block as an image_url part, or the text that stands in for it."""
    src = _obj(block.get("source"))
    if quirks["no_vision"]:
        return {"type": "text", "text": "[image omitted]"}
    if src.get("type") == "base64" and src.get("data"):
        url = "data:%s;base64,%s" % (src.get("media_type") or "image/png", src["data"])
        return {"type": "image_url", "image_url": {"url": url}}
    if src.get("type") == "url" and src.get("url"):
        return {"type": "image_url", "image_url": {"url": src["url"]}}
    return {"type": "text", "text": "[image file %s omitted]" % src.get("file_id", "")}


def _document_part(block, quirks):
    """A document block as a file part (PDF routes) or as text."""
    src = _obj(block.get("source"))
    kind = src.get("type")
    if kind == "base64" and "pdf" in str(src.get("media_type", "pdf")):
        if not quirks["supports_pdf"]:
            return {"type": "text", "text": "[PDF document omitted]"}
        return {"type": "file", "file": {"filename": "document.pdf", "file_data":
                "data:application/pdf;base64,%s" % src.get("data", "")}}
    title = (block.get("title") + "\n") if isinstance(block.get("title"), str) else ""
    if kind == "text":
        return {"type": "text", "text": title + str(src.get("data", ""))}
    if kind == "content":
        return {"type": "text", "text": title + _text_of_blocks(src.get("content") or [])}
    if kind == "url":
        return {"type": "text", "text": "[document: %s]" % src.get("url", "")}
    return {"type": "text", "text": "[document omitted]"}


def _user_part(block, quirks):
    """One non-tool_result user block as an O content part, or None to drop it."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return {"type": "text", "text": text} if isinstance(text, str) and text.strip() else None
    if kind == "image":
        return _image_part(block, quirks)
    if kind == "document":
        return _document_part(block, quirks)
    if kind == "search_result":
        text = "\n".join([str(block.get("title", "")), str(block.get("source", "")),
                          _text_of_blocks(block.get("content") or [])])
        return {"type": "text", "text": text}
    return None       # thinking, redacted_thinking, unknown blocks


def _collapse(parts):
    """All-text parts become one string (some upstreams reject arrays); arrays only
    when an image or file part, or a cache marker, is there."""
    if all(p["type"] == "text" and "cache_control" not in p for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def tool_result_text(block, images, quirks):
    """A tool_result's content as the string an O tool message carries (§1.3); image
    parts are collected into `images` for one user message after the tool messages."""
    content = block.get("content")
    if isinstance(content, str):
        text = content
    else:
        pieces = []
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(part.get("text", ""))
            elif kind == "tool_reference":
                pieces.append("[tool_reference: %s]" % part.get("tool_name", ""))
            elif kind == "document":
                pieces.append(_document_part(part, dict(quirks, supports_pdf=False))["text"])
            elif kind == "image":
                if quirks["no_vision"]:
                    pieces.append("[image omitted]")
                else:
                    images.append(_image_part(part, quirks))
                    pieces.append("[image %d attached below]" % len(images))
        text = "\n".join(pieces)
    text = text if text.strip() else "(no output)"
    return "[ERROR] " + text if block.get("is_error") else text


def _user_messages(content, quirks, cache=False):
    """One A user message -> tool messages first, then the images they returned, then
    one user message with the rest (O needs tool messages right after the calls)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}] if content.strip() else []
    out, images, parts = [], [], []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":
            text = tool_result_text(block, images, quirks)
            out.append({"role": "tool", "tool_call_id": _tool_id(
                str(block.get("tool_use_id", "")), quirks),
                "content": _marked([{"type": "text", "text": text}], block, cache) or text})
        else:
            part = _user_part(block, quirks)
            if part:
                parts.append((_marked([part], block, cache) or [part])[0])
    if images:
        out.append({"role": "user", "content": [
            {"type": "text", "text": "Images returned by tool calls:"}] + images})
    if parts:
        out.append({"role": "user", "content": _collapse(parts)})
    return out


def _assistant_message(content, quirks, tr):
    """One A assistant message -> one O assistant message (or None when empty)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content} if content else None
    texts, calls, thinking, items = [], [], [], []
    for block in content if isinstance(content, list) else []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and block.get("text"):
            texts.append(block["text"])
        elif kind == "thinking" and quirks["reasoning_echo"] == "items":
            items.extend(i for i in [reasoning_item(block.get("signature"), tr.route)] if i)
        elif kind == "thinking" and block.get("thinking"):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            calls.append(_tool_call(block, quirks, tr))
    if not texts and not calls:
        return None            # thinking-only turns are omitted
    msg = {"role": "assistant", "content": "\n\n".join(texts) if texts else (
        "" if quirks["empty_content_as_string"] else None)}
    if calls:
        msg["tool_calls"] = calls
    if thinking and quirks["reasoning_echo"]:
        # DeepSeek 400s unless tool-calling turns carry their reasoning back.
        msg[quirks["reasoning_echo"]] = "\n\n".join(thinking)
    if items:            # the Responses API's reasoning, as it came (§8.1)
        msg["_reasoning"] = items
    return msg


def _tool_call(block, quirks, tr):
    name = str(block.get("name", ""))
    mapped = upstream_tool_name(name)
    tr.names[mapped] = name
    args = block.get("input")
    call = {"id": _tool_id(str(block.get("id", "")), quirks), "type": "function",
            "function": {"name": mapped, "arguments": _compact(args if args else {})}}
    if quirks["gemini_signatures"]:
        raw_id = str(block.get("id", ""))
        sig = split_signature(raw_id)[1] or (
            tr.signatures.get(raw_id) if tr.signatures is not None else None)
        if not sig and re.search(r"gemini-[3-9]", tr.upstream_model or ""):
            # A call another provider made (a fallback switched family mid-session):
            # Gemini 3 answers 400 "Function call is missing a thought_signature" and
            # documents this sentinel for such calls (vercel/ai#15560, issue #20).
            sig = GEMINI_NO_SIGNATURE
        if sig:
            call["extra_content"] = {"google": {"thought_signature": sig}}
    return call


GEMINI_NO_SIGNATURE = "skip_thought_signature_validator"


def _system_message(text, quirks, leading):
    role = "developer" if quirks["developer_role"] and leading else "system"
    return {"role": role, "content": text}


def convert_messages(body, quirks, tr):
    """system + messages -> O messages, then the repair pass (§1.2, §1.3); on routes
    that cache by markers, the cache_control of the blocks Claude Code marked (§1.7)."""
    out, cache = [], caches_blocks(quirks, tr.upstream_model)
    system = system_parts(body.get("system")) if cache else None
    system = system or system_text(body.get("system"))
    if system:
        out.append(_system_message(system, quirks, True))
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), message.get("content")
        if role == "assistant":
            out.extend(m for m in [_assistant_message(content, quirks, tr)] if m)
        elif role == "system":
            out.extend(_mid_system(content, quirks, cache))
        else:
            out.extend(_user_messages(content, quirks, cache))
    out = repair_messages(out)
    return limit_cache_markers(out) if cache else out


def _mid_system(content, quirks, cache=False):
    """A role:"system" message in `messages` (Claude Code 2.1.330 sends its environment
    so, with the request's last cache marker on it)."""
    text = content if isinstance(content, str) else _text_of_blocks(content or [], "\n\n")
    if not text.strip():
        return []
    inplace = quirks["mid_system"] == "inplace"
    if not inplace:
        # Many chat templates reject a system message after the first: hand it to the
        # model as the user turn it belongs to (merged in the repair pass).
        text = "<system-reminder>%s</system-reminder>" % text
    marked = next((b for b in content if _cache_marker(b)), None) if (
        cache and isinstance(content, list)) else None
    text = _marked([{"type": "text", "text": text}], marked, True) if marked else text
    return [_system_message(text, quirks, False) if inplace else
            {"role": "user", "content": text}]


def repair_messages(msgs):
    """Make the message list one an OpenAI upstream accepts (§1.3 repair pass):
    tool messages right after their calls, a stand-in result for an interrupted call,
    orphan results as user text, consecutive user messages merged, empties dropped."""
    out, pending, held = [], [], []

    def settle():
        out.extend({"role": "tool", "tool_call_id": call_id,
                    "content": "[no result: tool call was interrupted]"} for call_id in pending)
        pending.clear()
        out.extend(held)
        held.clear()

    for msg in msgs:
        if msg["role"] == "tool" and msg["tool_call_id"] in pending:
            pending.remove(msg["tool_call_id"])
            out.append(msg)
            if not pending:
                settle()
            continue
        if msg["role"] == "tool":          # answers no call we know of
            msg = {"role": "user", "content": "[orphan tool result %s]\n%s"
                   % (msg["tool_call_id"], _content_text(msg["content"]))}
        if msg["role"] == "assistant":
            settle()
            out.append(msg)
            pending[:] = [c["id"] for c in msg.get("tool_calls") or []]
        elif pending:
            held.append(msg)               # e.g. "[Request interrupted by user]"
        else:
            out.append(msg)
    settle()
    return _merge_users(out)


def _content_text(content):
    return content if isinstance(content, str) else "\n".join(
        part.get("text", "") for part in content if part.get("type") == "text")


def _merge_users(msgs):
    out = []
    for msg in msgs:
        if msg.get("content") in ("", None, []) and not msg.get("tool_calls"):
            continue                       # Gemini rejects empty parts
        if out and msg["role"] == "user" and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": _join_content(out[-1]["content"],
                                                               msg["content"])}
        else:
            out.append(msg)
    return out


def _join_content(a, b):
    if isinstance(a, str) and isinstance(b, str):
        return a + "\n\n" + b
    as_parts = lambda c: [{"type": "text", "text": c}] if isinstance(c, str) else c  # noqa
    return as_parts(a) + as_parts(b)


def convert_tools(tools, quirks, names, deferred=None):
    """A tools -> O function tools; server tools (web_search_*, bash_*, …) dropped.
    `names` learns upstream name -> original, to map tool calls back; `deferred` gets
    the tools marked defer_loading instead of the list (see callable_tools)."""
    out = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            log.warning("dropping server tool %s: OpenAI routes have no equivalent",
                        escape_log(tool.get("name") if isinstance(tool, dict) else tool)[:100])
            continue
        name = str(tool.get("name", ""))
        mapped = upstream_tool_name(name)
        names[mapped] = name
        converted = {"type": "function", "function": {
            "name": mapped, "description": tool.get("description") or "",
            "parameters": clean_schema(tool.get("input_schema"), quirks["schema_dialect"])}}
        if tool.get("defer_loading") is True and deferred is not None:
            deferred[name] = converted
        else:
            out.append(converted)
    return out


def referenced_tools(body):
    """The names of the tools that tool_reference blocks in the history load (the
    client-side ToolSearch answers with them, then sends the tool with defer_loading)."""
    names, messages = set(), body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            inner = block.get("content") if isinstance(block, dict) else None
            if isinstance(inner, list) and block.get("type") == "tool_result":
                names.update(part["tool_name"] for part in inner if isinstance(part, dict)
                             and part.get("type") == "tool_reference"
                             and isinstance(part.get("tool_name"), str))
    return names


@dataclasses.dataclass(frozen=True)
class PreparedTools:
    """A request's tools, converted, sized and serialised once.  Claude Code sends the
    same ~30 KB of tools with every call of a session; doing this per call was 0.27 ms
    of the 0.4 ms that translating its 50 KB body costs (make bench).  Shared between
    threads by ToolsCache: nothing may change it."""
    source: list        # the client's tools, to recognise them again
    tools: list         # O function tools
    names: dict         # upstream name -> original
    json: str           # `tools`, serialised for the upstream body (ASCII, as the rest)
    responses_json: str  # the same in the Responses API's shape (§8.1)
    size: int           # UTF-8 bytes of the client's tools, compact (the estimator's)
    deferred: dict      # original name -> O tool, for the tools marked defer_loading


def prepare_tools(tools, quirks):
    """The client's tools as PreparedTools (uncached; ToolsCache.get keeps them)."""
    names, deferred = {}, {}
    converted = convert_tools(tools, quirks, names, deferred)
    size = utf8_len(_compact(tools)) if isinstance(tools, list) and tools else 0
    return PreparedTools(source=tools, tools=converted, names=names,
                         json=json.dumps(converted), size=size, deferred=deferred,
                         responses_json=json.dumps(responses_function_tools(converted)))


def responses_function_tools(tools):
    """Chat function tools in the Responses API's shape: the function's fields at the
    top, strict off (Claude Code's schemas are not all strict-mode schemas)."""
    return [dict(t["function"], type="function", strict=False) for t in tools]


def callable_tools(prepared, body):
    """The O tools a call offers.  A tool marked defer_loading is not callable until a
    tool_reference in the history loads it, as on Anthropic's API; Claude Code's
    DeferredToolPlaceholder ("never call this tool") never is (issue #20)."""
    if not prepared.deferred:
        return prepared.tools
    loaded = [prepared.deferred[name] for name in sorted(
        referenced_tools(body) & set(prepared.deferred))]
    return prepared.tools + loaded if loaded else prepared.tools


def convert_tool_choice(choice, quirks):
    """A tool_choice -> (O tool_choice or None, parallel_tool_calls or None)."""
    if not isinstance(choice, dict):
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "tool" and choice.get("name") and quirks["no_named_choice"]:
        kind = "any"
    if kind == "any":
        return ("auto" if quirks["no_required"] else "required"), parallel
    if kind == "tool" and choice.get("name"):
        return {"type": "function", "function": {
            "name": upstream_tool_name(str(choice["name"]))}}, parallel
    if kind in ("auto", "none"):
        return kind, parallel
    return None, parallel


def is_reasoning_model(quirks, model):
    """Whether the route takes a reasoning knob for this model (reasoning_models regex)."""
    pattern = quirks["reasoning_models"]
    return bool(quirks["reasoning"]) and (not pattern or re.search(pattern, model or "") is not None)


def thinking_budget(body):
    """thinking.budget_tokens when the client set one, else None."""
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    budget = thinking.get("budget_tokens") if thinking.get("type") == "enabled" else None
    return budget if isinstance(budget, int) and not isinstance(budget, bool) else None


def reasoning_effort(body):
    """The effort the client asked for (§1.6), or None for no reasoning."""
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    kind = thinking.get("type")
    if kind == "enabled":
        budget = thinking_budget(body)
        budget = 8192 if budget is None else budget
        return "low" if budget <= 1024 else "medium" if budget <= 8192 else "high"
    if kind == "adaptive":
        effort = (body.get("output_config") or {}).get("effort") if isinstance(
            body.get("output_config"), dict) else None
        effort = effort if isinstance(effort, str) else None
        return effort if effort in EFFORT_LEVELS else "high" if effort else "medium"
    return None


#: Claude Code's effort levels, lowest first (Anthropic's effort guide).
EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")


def route_effort(effort, quirks, model):
    """The level to send for the one asked: itself where the route takes it, else the
    nearest below, as Anthropic's API falls back on a model without xhigh (issue #20:
    xhigh and max were flattened to high everywhere)."""
    levels = [level.strip() for level in quirks["efforts"].split(",") if level.strip()]
    pattern = quirks["xhigh_models"]
    if pattern and not re.search(pattern, model or ""):
        levels = [level for level in levels if level not in ("xhigh", "max")]
    wanted = EFFORT_LEVELS.index(effort) if effort in EFFORT_LEVELS else 2
    return next((level for level in reversed(EFFORT_LEVELS[:wanted + 1]) if level in levels),
                levels[0] if levels else effort)


def _reasoning_fields(body, quirks, model):
    """The reasoning knob in the place the route expects it, or nothing."""
    effort = reasoning_effort(body)
    if not effort or not is_reasoning_model(quirks, model):
        return {}
    effort, placement = route_effort(effort, quirks, model), quirks["reasoning"]
    if placement == "openrouter":
        # OpenRouter takes Claude Code's own budget for Anthropic and Gemini models
        # (reasoning.max_tokens); OpenAI's models think in efforts.
        budget = thinking_budget(body)
        if budget and budget > 0 and not re.search(r"^(openai/)?(o\d|gpt-5)", model or ""):
            return {"reasoning": {"max_tokens": budget}}
        return {"reasoning": {"effort": effort}}
    if placement == "deepseek":
        return {"thinking": {"type": "enabled"}}
    return {"reasoning_effort": effort}


def prompt_cache_key(session):
    """OpenAI's prompt_cache_key for a Claude Code session: stable across its calls,
    different between sessions, and not the id itself (issue #20)."""
    digest = hashlib.sha256(("ccproxy-cache\0" + session).encode("utf-8", "surrogatepass"))
    return "ccp-" + digest.hexdigest()[:32]


def session_id(headers, body):
    """Claude Code's session id: its X-Claude-Code-Session-Id header, else the
    session_id in metadata.user_id (a JSON text, as 2.1.x sends it); "" when neither."""
    value = headers.get("x-claude-code-session-id") if headers is not None else None
    if isinstance(value, str) and value.strip():
        return value.strip()[:200]
    user = _obj(body.get("metadata")).get("user_id")
    doc = _loads(user) if isinstance(user, str) and user.startswith("{") else None
    session = doc.get("session_id") if isinstance(doc, dict) else None
    return session[:200] if isinstance(session, str) else ""


def _user_field(body):
    """{"user": …} from metadata.user_id, hashed: Claude Code's value is a JSON blob
    of device and session ids that no provider needs to read."""
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    user = metadata.get("user_id")
    if not isinstance(user, str) or not user:
        return {}
    return {"user": hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]}


def anthropic_to_openai(body, tr, prepared=None):
    """An Anthropic Messages body -> an OpenAI Chat Completions body, built from an
    allow-list: a field the upstream does not know is never copied (Claude Code answers
    a 400 with six downgraded re-sends).  `prepared`: the body's tools, if at hand."""
    quirks, model = tr.quirks, tr.upstream_model
    out = {"model": model, "messages": convert_messages(body, quirks, tr)}
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        if quirks["max_output"]:
            max_tokens = min(max_tokens, quirks["max_output"])
        if tr.max_tokens_cap:
            max_tokens = min(max_tokens, tr.max_tokens_cap)
        out[quirks["token_param"]] = max_tokens
    reasoning = is_reasoning_model(quirks, model)
    for key in ("temperature", "top_p"):
        if isinstance(body.get(key), (int, float)) and not reasoning:
            out[key] = body[key]
    if quirks["supports_top_k"] and isinstance(body.get("top_k"), int):
        out["top_k"] = body["top_k"]
    stops = body.get("stop_sequences")
    if isinstance(stops, list) and stops and not reasoning:
        out["stop"] = [str(s) for s in stops[:4]]
    out.update(_reasoning_fields(body, quirks, model))
    if quirks["send_user"]:
        out.update(_user_field(body))
    if quirks["prompt_cache_key"] and tr.session:
        out["prompt_cache_key"] = prompt_cache_key(tr.session)
    _add_tools(out, body, tr, prepared or prepare_tools(body.get("tools"), quirks))
    if tr.search is not None:
        out["plugins"] = [web_plugin(tr.search)]
    fmt = (body.get("output_config") or {}).get("format") if isinstance(
        body.get("output_config"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt.get("schema") or {}, "strict": False}}
    if body.get("stream") is True:
        out["stream"] = True
        if quirks["stream_options"]:
            out["stream_options"] = {"include_usage": True}
    return out


SEARCH_PROMPT = "Perform a web search for the query: "      # Claude Code's WebSearch tool


def search_request(body):
    """Claude Code's WebSearch call: its query (the last user message, less the tool's
    own words) and the domain lists of Anthropic's web search tool."""
    messages, query = body.get("messages"), ""
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        query = content if isinstance(content, str) else _text_of_blocks(content or [])
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    tool = next((t for t in tools if isinstance(t, dict) and
                 str(t.get("type", "")).startswith("web_search")), {})
    return {"query": query.split(SEARCH_PROMPT, 1)[-1].strip()[:500],
            "allowed_domains": _strings(tool.get("allowed_domains")),
            "blocked_domains": _strings(tool.get("blocked_domains"))}


def _strings(value):
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def web_plugin(search):
    """OpenRouter's web plugin for one search (its web search guide: id "web",
    include_domains, exclude_domains; the last user message is what it searches for)."""
    plugin = {"id": "web"}
    if search["allowed_domains"]:
        plugin["include_domains"] = search["allowed_domains"]
    if search["blocked_domains"]:
        plugin["exclude_domains"] = search["blocked_domains"]
    return plugin


def _add_tools(out, body, tr, prepared):
    quirks = tr.quirks
    tr.names.update(prepared.names)
    choice, parallel = convert_tool_choice(body.get("tool_choice"), quirks)
    tools = callable_tools(prepared, body)
    if not tools or (choice == "none" and quirks["no_choice_none"]):
        return                           # OpenAI 400s on tool_choice without tools
    out["tools"] = tools
    if choice is not None:
        out["tool_choice"] = choice
    if parallel is not None and not quirks["no_parallel_flag"]:
        out["parallel_tool_calls"] = parallel


def openai_url(provider):
    """{base}/chat/completions (Azure: plus ?api-version=)."""
    query = "?api-version=" + urllib.parse.quote(provider.api_version) if (
        provider.api_version) else ""
    return provider.base_url + "/chat/completions" + query


def openai_headers(provider, stream):
    """Headers for an OpenAI upstream: nothing of the client's is forwarded (no
    x-api-key, anthropic-*, x-stainless-*, x-claude-code-*)."""
    headers = [("content-type", "application/json"), ("accept-encoding", "identity"),
               ("accept", "text/event-stream" if stream else "application/json")]
    if provider.api_key:
        quirks = quirks_for(provider)
        headers.append(("api-key", provider.api_key) if quirks["auth"] == "api-key" else
                       ("authorization", "Bearer " + provider.api_key))
    return with_provider_headers(headers, provider)


def translated_request(body, tr, prepared=None):
    """(upstream body bytes, wants a stream from upstream) for a translated call; routes
    that lose streamed tool calls (Ollama) are asked without streaming (§3.2)."""
    prepared = prepared or prepare_tools(body.get("tools"), tr.quirks)
    doc = anthropic_to_openai(body, tr, prepared)
    if doc.get("stream") and doc.get("tools") and not tr.quirks["stream_tools"]:
        doc.pop("stream")
        doc.pop("stream_options", None)
    # ASCII output serialises 40 % faster (0.27 vs 0.44 ms for Claude Code's 50 KB body)
    # and every JSON parser reads \u escapes.  The tools go in already serialised.
    tools = doc.pop("tools", None)
    text = json.dumps(doc)
    if tools is not None:
        text = text[:-1] + ', "tools": ' + (prepared.json if tools is prepared.tools
                                            else json.dumps(tools)) + "}"
    return text.encode(), bool(doc.get("stream"))


# ---- Translation: OpenAI reply -> Anthropic reply (docs/translation.md §2) -----------

FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "function_call": "tool_use", "content_filter": "refusal"}


class UpstreamReplyError(CcproxyError):
    """The upstream answered 200 but the reply says it failed (finish_reason "error",
    an error object in the body or stream)."""

    def __init__(self, etype, message):
        super().__init__(message)
        self.etype = etype


def new_message_id():
    """An id in the shape of Anthropic's message ids."""
    return "msg_" + random_hex(24)


def thinking_signature(route, text):
    """A signature ccproxy recognises on the way back (pass-through strips it)."""
    digest = hashlib.sha256((route + "\0" + text).encode("utf-8", "surrogatepass"))
    return "%s%s:%s" % (CCPROXY_SIGNATURE_PREFIX, route, digest.hexdigest()[:16])


def _close_json(text):
    """Close the strings, objects and arrays a cut-off JSON text left open."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            escaped = ch == "\\" and not escaped
            if ch == '"' and not escaped:
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    return text + ('"' if in_string else "") + "".join(reversed(stack))


def parse_tool_arguments(args):
    """Tool-call arguments as an input object, repaired where models break them (§2.2)."""
    if isinstance(args, dict):
        return args
    if args is None or (isinstance(args, str) and not args.strip()):
        return {}
    value = _loads(args) if isinstance(args, str) else args
    if value is _INVALID:
        text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", args)
        text = re.sub(r",\s*([}\]])", r"\1", text)
        value = _loads(_close_json(text.rstrip().rstrip(",")))
    if isinstance(value, str):
        inner = _loads(value)               # a JSON string holding the object
        value = inner if isinstance(inner, dict) else value
    if value is _INVALID:
        return {"_ccproxy_invalid_arguments": args}
    return value if isinstance(value, dict) else {"value": value}


def _first_positive(*values):
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)
                 and v > 0), 0)


def anthropic_usage(usage, estimate, output_estimate):
    """O usage -> the four A usage keys (§2.4): A's input excludes cache hits, O's
    includes them; missing numbers come from the estimator."""
    usage = usage if isinstance(usage, dict) else {}
    details = _obj(usage.get("prompt_tokens_details"))
    read = _first_positive(details.get("cached_tokens"), usage.get("prompt_cache_hit_tokens"),
                           usage.get("cache_read_input_tokens"))
    # Writes: OpenRouter's cache_write_tokens; DashScope's explicit cache reports
    # cache_creation_input_tokens inside prompt_tokens_details (Model Studio's guide).
    write = _first_positive(details.get("cache_write_tokens"),
                            details.get("cache_creation_input_tokens"),
                            usage.get("cache_creation_input_tokens"))
    prompt = _first_positive(usage.get("prompt_tokens"), usage.get("input_tokens"))
    output = _first_positive(usage.get("completion_tokens"), usage.get("output_tokens"))
    return {"input_tokens": max(prompt - read - write, 0) if prompt else max(estimate, 1),
            "output_tokens": output or max(output_estimate, 1),
            "cache_creation_input_tokens": write, "cache_read_input_tokens": read}


def stop_reason(finish, had_tool_use, refusal=False):
    """finish_reason -> stop_reason with the tool override (§2.3): Gemini, Ollama and
    gpt-4o under forced tool_choice say "stop" with tool calls, and Claude Code skips
    the tools unless it sees tool_use (anthropics/claude-code#16785)."""
    if finish == "error":
        raise UpstreamReplyError("api_error", "upstream reported finish_reason error")
    finish = finish if isinstance(finish, str) else None
    reason = FINISH_TO_STOP.get(finish, "end_turn")
    if finish not in FINISH_TO_STOP and finish is not None:
        log.debug("unknown finish_reason %s taken as end_turn", escape_log(finish))
    if refusal and reason != "max_tokens":
        return "refusal"
    if had_tool_use and reason != "max_tokens":
        return "tool_use"
    return reason


def reasoning_of(obj):
    """Reasoning text from a message or a delta: reasoning_content, reasoning, or the
    text entries of reasoning_details, whichever comes first."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(obj.get(key), str) and obj[key]:
            return obj[key]
    details = obj.get("reasoning_details")
    if isinstance(details, list):
        return "".join(d.get("text") or "" for d in details
                       if isinstance(d, dict) and isinstance(d.get("text"), str))
    return ""


def split_think_tags(text):
    """A leading <think>…</think> (Ollama, vLLM, generic) -> (reasoning, rest)."""
    match = re.match(r"^\s*<think>(.*?)</think>\s*", text, re.S)
    return (match.group(1).strip(), text[match.end():]) if match else ("", text)


class ToolIds:
    """Anthropic-safe tool ids for one message: sanitised, minted when missing, and
    made unique (Groq repeats ids across parallel calls)."""

    def __init__(self):
        self.seen = set()

    def make(self, upstream_id):
        base = re.sub(r"[^A-Za-z0-9_-]", "_", upstream_id) if upstream_id else ""
        base = base or "toolu_" + random_hex(24)
        tool_id, n = base, 1
        while tool_id in self.seen:
            n += 1
            tool_id = "%s_%d" % (base, n)
        self.seen.add(tool_id)
        return tool_id


def _message_parts(message, tr):
    """(thinking, text, refusal) of a non-streamed O message."""
    thinking = reasoning_of(message)
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    if tr.quirks["think_tags"] and not thinking:
        thinking, text = split_think_tags(text)
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else ""
    return thinking, text, refusal


def openai_to_anthropic(doc, tr):
    """A non-streamed O reply -> an A message (§2)."""
    if not isinstance(doc, dict) or doc.get("error"):
        err = (doc or {}).get("error") if isinstance(doc, dict) else None
        raise UpstreamReplyError("api_error", "%s upstream error: %s" % (
            tr.route, upstream_message(json.dumps(doc).encode()) if err else "no reply"))
    choices = doc.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(
        choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    thinking, text, refusal = _message_parts(message, tr)
    content = []
    if thinking:
        content.append({"type": "thinking", "thinking": thinking,
                        "signature": thinking_signature(tr.route, thinking)})
    for piece in (text, refusal):
        if piece:
            content.append({"type": "text", "text": piece})
    content.extend(_tool_uses(message, tr))
    if tr.search is not None:
        content[:0] = search_blocks(tr.search["query"], "srvtoolu_" + random_hex(24),
                                    search_results(url_citations(message.get(
                                        "annotations"), {})))
    out_bytes = utf8_len(text) + sum(len(json.dumps(b.get("input", "")))
                                         for b in content if b["type"] == "tool_use")
    upstream_id = str(doc.get("id") or "")
    return {"id": upstream_id if upstream_id.startswith("msg_") else new_message_id(),
            "type": "message", "role": "assistant", "model": tr.client_model,
            "content": content,
            "stop_reason": stop_reason(choice.get("finish_reason"),
                                       any(b["type"] == "tool_use" for b in content),
                                       bool(refusal)),
            "stop_sequence": None,
            "usage": dict(anthropic_usage(_usage_of(doc), tr.estimate, -(-out_bytes // 4)),
                          **search_usage(tr))}


def url_citations(annotations, into):
    """OpenRouter's url_citation annotations (its web search guide) added to `into`,
    {url: title}, in the order they come, each URL once."""
    for note in annotations if isinstance(annotations, list) else ():
        cite = note.get("url_citation") if isinstance(note, dict) else None
        if isinstance(cite, dict) and isinstance(cite.get("url"), str) and cite["url"]:
            into.setdefault(cite["url"], str(cite.get("title") or cite["url"]))
    return into


def search_results(citations):
    """{url: title} -> the content of Anthropic's web_search_tool_result."""
    return [{"type": "web_search_result", "url": url, "title": title,
             "encrypted_content": "", "page_age": None} for url, title in citations.items()]


def search_blocks(query, tool_id, content):
    """A search in Anthropic's shape: its server_tool_use and web_search_tool_result
    (`content`: the results, or a web_search_tool_result_error)."""
    return [{"type": "server_tool_use", "id": tool_id, "name": "web_search",
             "input": {"query": query}},
            {"type": "web_search_tool_result", "tool_use_id": tool_id, "content": content}]


def search_usage(tr):
    """usage.server_tool_use of a reply to a search the provider ran."""
    return {"server_tool_use": {"web_search_requests": 1}} if tr.search is not None else {}


def _usage_of(chunk):
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        usage = (chunk.get("x_groq") or {}).get("usage") if isinstance(
            chunk.get("x_groq"), dict) else None
    return usage if isinstance(usage, dict) else None


def _tool_uses(message, tr):
    calls = message.get("tool_calls")
    calls = calls if isinstance(calls, list) else []
    if not calls and isinstance(message.get("function_call"), dict):
        calls = [{"type": "function", "function": message["function_call"]}]
    ids, out = ToolIds(), []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name") or not isinstance(fn["name"], str):
            continue
        tool_id = _signed_id(tr, ids.make(str(call.get("id") or "")), (
            thought_signature_of(call)))
        out.append({"type": "tool_use", "id": tool_id,
                    "name": tr.names.get(fn["name"], fn["name"]),
                    "input": parse_tool_arguments(fn.get("arguments"))})
    return out


def thought_signature_of(call):
    """Gemini's extra_content.google.thought_signature of a tool call, or None."""
    return _obj(_obj(call.get("extra_content")).get("google")).get("thought_signature")


def _signed_id(tr, tool_id, sig):
    """The client's id for a tool call that came with a thought signature: the
    signature kept in the LRU and, on sig_in_id routes, in the id itself."""
    if not sig or not isinstance(sig, str):
        return tool_id
    if tr.quirks["sig_in_id"]:
        tool_id = id_with_signature(tool_id, sig)
    if tr.signatures is not None:
        tr.signatures.put(tool_id, sig)
    return tool_id


def sse_event(name, data):
    """One Anthropic SSE frame: the event line is mandatory (without it Claude Code's
    SDK ignores the frame and silently re-sends the turn as stream:false)."""
    try:                   # inline, not json_bytes(): a frame less, 1000 times a stream
        payload = _compact(data).encode()
    except UnicodeEncodeError:
        payload = _ascii_json(data).encode()
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


def synthesize_stream(message):
    """A complete A message as the SSE event sequence of a stream (§3.2): each block as
    start, one full delta, stop; tool input only as input_json_delta."""
    start = dict(message, content=[], stop_reason=None,
                 usage=dict(message["usage"], output_tokens=1))
    events = [sse_event("message_start", {"type": "message_start", "message": start}),
              sse_event("ping", {"type": "ping"})]
    for index, block in enumerate(message["content"]):
        events.extend(_block_events(index, block))
    events.append(sse_event("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": message["usage"]}))
    events.append(sse_event("message_stop", {"type": "message_stop"}))
    return b"".join(events)


def _block_events(index, block):
    kind = block["type"]
    empty = {"text": {"type": "text", "text": ""},
             "thinking": {"type": "thinking", "thinking": "", "signature": ""},
             "tool_use": {"type": "tool_use", "id": block.get("id"),
                          "name": block.get("name"), "input": {}},
             "server_tool_use": dict(block, input={}),
             "web_search_tool_result": block}[kind]
    deltas = {"text": [{"type": "text_delta", "text": block.get("text")}],
              "thinking": [{"type": "thinking_delta", "thinking": block.get("thinking")},
                           {"type": "signature_delta", "signature": block.get("signature")}],
              "tool_use": [{"type": "input_json_delta",
                            "partial_json": _compact(block.get("input"))}],
              "server_tool_use": [{"type": "input_json_delta",
                                   "partial_json": _compact(block.get("input"))}],
              "web_search_tool_result": []}[kind]
    out = [sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": empty})]
    out.extend(sse_event("content_block_delta", {"type": "content_block_delta",
                                                 "index": index, "delta": d}) for d in deltas)
    out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return out


# ---- Translation: the streaming state machine (docs/translation.md §3) ---------------

SSE_EVENT_END = re.compile(rb"\n\r?\n")      # a line end, then the blank line


class SSEParser:
    """Upstream SSE bytes -> the data payload of each event (§3.2).  Lines may end in
    \\r\\n; comments (OpenRouter's ": OPENROUTER PROCESSING"), event:, id: and retry:
    lines are ignored.  An event larger than `limit` bytes is an UpstreamReplyError.

    A line that has not ended yet is kept in pieces, copied once when it ends: copied
    again with each chunk, one 100 MB line pinned a core for minutes (issue #17)."""

    def __init__(self, limit=DEFAULT_MAX_EVENT_BYTES, tape=None):
        self.partial, self.data, self.limit = [], [], limit
        self.partial_size = 0             # bytes of the line not ended yet
        self.pending = 0                  # bytes of the event's data lines so far
        self.tape = tape                  # the call's recording (it sees every read)

    def feed(self, chunk):
        if self.tape is not None:
            self.tape.read(chunk)
        out = []
        if b"\n" not in chunk:
            self._keep(chunk)
            return out
        if self.partial:
            chunk = b"".join(self.partial) + chunk
            self.partial, self.partial_size = [], 0
        lines = chunk.split(b"\n")
        last = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"), out)
        if last:
            self._keep(last)
        return out

    def _keep(self, piece):
        """A piece of the line that has not ended: kept, not copied."""
        self.partial.append(piece)
        self.partial_size += len(piece)
        if self.pending + self.partial_size > self.limit:
            self._too_large()

    def _too_large(self):
        raise UpstreamReplyError("api_error", "upstream event larger than %d bytes "
                                 "(max_event_bytes)" % self.limit)

    def close(self):
        out = []
        if self.partial:
            self._line(b"".join(self.partial).rstrip(b"\r"), out)
            self.partial, self.partial_size = [], 0
        self._line(b"", out)
        return out

    def _line(self, line, out):
        if not line:
            if self.data:
                out.append(b"\n".join(self.data).decode("utf-8", "replace"))
                self.data, self.pending = [], 0
        elif line.startswith(b"data:"):      # only what is kept counts toward the limit
            self.data.append(line[6:] if line[5:6] == b" " else line[5:])
            self.pending += len(line)
            if self.pending > self.limit:
                self._too_large()


def stream_error_type(error):
    """overloaded_error when an error says 429/503/529, overloaded or rate (Claude Code
    then treats it as a 529); api_error otherwise (§3.5)."""
    text = json.dumps(error).lower() if not isinstance(error, str) else error.lower()
    if any(word in text for word in ("429", "503", "529", "overloaded", "rate")):
        return "overloaded_error"
    return "api_error"


_JSON_SPACE_RUN = re.compile(r"[ \t\n\r]*")
#: The inside of a string up to a quote, a raw control character or an escape cut off:
#: whole escapes are taken in the same run (most fragments then pass in one match).
_JSON_STRING_RUN = re.compile(r'(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_JSON_NUMBER_RUN = re.compile(r"[-+0-9.eE]*")
_JSON_NUMBER_PREFIX = re.compile(
    r"-?(?:(?:0|[1-9][0-9]*)(?:\.|\.[0-9]+(?:[eE][+-]?[0-9]*)?|[eE][+-]?[0-9]*)?)?\Z")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_JSON_ESCAPES = frozenset('"\\/bfnrtu')
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class _NotJson(Exception):
    """The arguments text stopped being the start of one JSON object."""


class JsonObjectStream:
    """Tool input as it streams (docs/translation.md §3.5, issue #20): feed() passes on
    the arguments text that keeps what was sent the start of one JSON object, and
    close() gives what completes it, so that what a client concatenates always parses.

    Held back until what follows decides: a member whose value has not begun (from its
    comma, or from the "{", to the value's first character) and half an escape.  A call
    cut off by max_tokens loses only the member it was writing: {"a":1,"b -> {"a":1}.
    A raw control character in a string, which JSON forbids and some models write, is
    sent escaped.  Text after what can no longer be JSON is dropped and counted.
    Arguments that do not begin with "{" are not streamed at all: `whole` is set, and
    the caller sends the repaired value at the end (parse_tool_arguments)."""

    __slots__ = ("state", "stack", "token", "in_key", "mark", "held", "broken", "whole",
                 "notes", "dropped")

    def __init__(self):
        self.state, self.stack, self.token, self.in_key = "start", [], "", False
        self.mark, self.held = None, ""    # mark: "member" or "escape" while holding back
        self.broken = self.whole = False
        self.notes, self.dropped = [], 0

    @property
    def complete(self):
        """The object is whole: only whitespace may follow."""
        return self.state == "done"

    def feed(self, text):
        """The part of `text` (after what was held back before) to send on now."""
        if self.broken or self.whole:
            self.dropped += len(text)
            return ""
        if self.state == "string" and not self.held and not self.token and (
                _JSON_STRING_RUN.match(text).end() == len(text)):
            return text                       # most pieces: the middle of a string
        out, i = [self.held], 0
        start = 0 if self.mark else None      # where in `out` holding back began
        try:
            while i < len(text):
                i, start = self._step(text, i, out, start)
        except _NotJson:
            self.broken = not self.whole
            self.dropped += len(text) - i
        self.held = "" if start is None else "".join(out[start:])
        return "".join(out if start is None else out[:start])

    def close(self):
        """What completes what was sent ("" when nothing is missing); None when whole."""
        if self.whole:
            return None
        if self.state == "start":
            return "{}"
        tail = ""
        if self.held:                      # a member or an escape that never finished
            self.dropped += len(self.held)
        if self.mark != "member" or not self.held:
            if self.state == "string":
                tail = '"'
            elif self.state == "literal":
                tail = self._literal()[len(self.token):]
            elif self.state == "number" and not _JSON_NUMBER.match(self.token):
                tail = "0"
        if self.dropped:
            self.notes.append("dropped %d characters" % self.dropped)
        if self.state != "done":
            self.notes.append("closed a cut-off object")
        return tail + "".join(reversed(self.stack))

    # -- one step: a run of a string or of whitespace, or one token -----------------

    def _step(self, text, i, out, start):
        """(index after the step, where holding back begins now)."""
        state = self.state
        if state == "string":
            return self._string(text, i, out, start)
        if state in ("number", "literal"):
            return self._scalar(text, i, out), start
        j = _JSON_SPACE_RUN.match(text, i).end()
        if j > i:
            if state != "start":
                out.append(text[i:j])
            return j, start
        return i + 1, self._token(text[i], out, start)

    def _token(self, ch, out, start):
        """One structural character, or the first of a value."""
        state = self.state
        if state in ("start", "value", "value?") and ch != "]":
            return self._value(ch, out)
        if ch == '"' and state in ("key?", "key"):
            self.state, self.in_key = "string", True
        elif ch == ":" and state == "colon":
            self.state = "value"
        elif ch == "," and state == "after":
            self.state, self.mark = ("key" if self.stack[-1] == "}" else "value"), "member"
            start = len(out)
        elif ch in "}]" and self.stack and ch == self.stack[-1] and state in (
                "after", "key?" if ch == "}" else "value?"):
            self.stack.pop()
            self._end_value()
            self.mark = start = None
        else:
            raise _NotJson()
        out.append(ch)
        return start

    def _value(self, ch, out):
        """The first character of a value: what was held back with its member goes."""
        if self.state == "start" and ch != "{":
            self.whole = True               # a string holding JSON, a code fence, …
            raise _NotJson()
        self.mark = None
        out.append(ch)
        if ch == "{":
            self.stack.append("}")
            self.state, self.mark = "key?", "member"
            return len(out)
        if ch == "[":
            self.stack.append("]")
            self.state = "value?"
        elif ch == '"':
            self.state, self.in_key = "string", False
        elif ch in "-0123456789":
            self.state, self.token = "number", ch
        elif ch in "tfn":
            self.state, self.token = "literal", ch
        else:
            raise _NotJson()
        return None

    def _end_value(self):
        self.state, self.token = ("after" if self.stack else "done"), ""

    # -- strings, numbers and literals -------------------------------------------

    def _string(self, text, i, out, start):
        if self.token:                      # inside an escape
            return i + 1, self._escape(text[i], out, start)
        j = _JSON_STRING_RUN.match(text, i).end()
        if j > i:
            out.append(text[i:j])
        if j == len(text):
            return j, start
        ch = text[j]
        if ch == '"':
            if self.in_key:
                self.state = "colon"
            else:
                self._end_value()
        elif ch == "\\":
            self.token = ch
            if self.mark is None:
                self.mark, start = "escape", len(out)
        else:                               # a raw control character
            ch = json.dumps(ch)[1:-1]
            if "escaped control characters" not in self.notes:
                self.notes.append("escaped control characters")
        out.append(ch)
        return j + 1, start

    def _escape(self, ch, out, start):
        """One more character of an escape sequence; where holding back begins now."""
        token = self.token
        if ch not in (_JSON_ESCAPES if token == "\\" else _HEX_DIGITS):
            raise _NotJson()
        out.append(ch)
        token += ch
        self.token = token if token == "\\u" or 2 < len(token) < 6 else ""
        if not self.token and self.mark == "escape":
            self.mark = start = None
        return start

    def _scalar(self, text, i, out):
        """A number's or a literal's next characters; the index after them."""
        if self.state == "literal":
            word = self._literal()
            if text[i] != word[len(self.token)]:
                raise _NotJson()
            self.token += text[i]
            out.append(text[i])
            if self.token == word:
                self._end_value()
            return i + 1
        j = _JSON_NUMBER_RUN.match(text, i).end()
        token = self.token + text[i:j]
        if not _JSON_NUMBER_PREFIX.match(token) or (j < len(text) and
                                                     not _JSON_NUMBER.match(token)):
            raise _NotJson()
        out.append(text[i:j])
        self.token = token
        if j < len(text):                   # the character after the number ends it
            self._end_value()
        return j

    def _literal(self):
        return next(w for w in ("true", "false", "null") if w.startswith(self.token))


class StreamTranslator:
    """O stream chunks -> A SSE events, one upstream event at a time (§3.3–§3.4).

    Grammar kept for every upstream chunking: one message_start, at most one open
    block, indices 0,1,2…, tool input only in input_json_delta, every block stopped
    before the one message_delta, then message_stop; or an error event and nothing more.
    Interleaved parallel tool calls are serialised losslessly: a call that arrives while
    another tool block is open is buffered and emitted whole at the end.
    """

    def __init__(self, tr):
        self.tr, self.msg_id = tr, new_message_id()
        self.open, self.next_index, self.tools, self.deferred = None, 0, {}, []
        self.finish, self.usage, self.done, self.refusal = None, None, False, False
        self.ids, self.out_bytes, self.had_tool = ToolIds(), 0, False
        self.slots, self.last_slot = {}, None          # see _tool_key
        self.think_buffer, self.in_think = "", None
        self.thinking_text, self.held = "", None      # held: see _whole
        self.waiting = []        # text that came while a call's input was unfinished
        self.repairs = 0         # calls whose input had to be repaired
        self.citations = {}      # a search's url_citation annotations (§1.10)

    def start(self):
        """message_start (with the estimated input tokens, which Claude Code shows) and
        one ping."""
        usage = {"input_tokens": max(self.tr.estimate, 1), "output_tokens": 1,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        return sse_event("message_start", {"type": "message_start", "message": {
            "id": self.msg_id, "type": "message", "role": "assistant",
            "model": self.tr.client_model, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": usage}}) + sse_event("ping", {"type": "ping"}) + (
                self._search_start() if self.tr.search is not None else b"")

    def _search_start(self):
        """A search the provider runs: its server_tool_use block first, as Anthropic
        streams it (input {} then the input as one input_json_delta)."""
        self.search_id = "srvtoolu_" + random_hex(24)
        block = search_blocks(self.tr.search["query"], self.search_id, [])[0]
        out = self._open_block("search", dict(block, input={}))
        out.append(self._delta({"type": "input_json_delta",
                                "partial_json": json.dumps(block["input"])}))
        return b"".join(out + self._close_open())

    def feed(self, payload):
        """One upstream data payload -> the A events it produces (bytes, maybe empty).
        Raises UpstreamReplyError for an error chunk."""
        if payload.strip() == "[DONE]":
            self.done = True
            return b""
        chunk = _loads(payload)
        if not isinstance(chunk, dict):
            log.debug("skipping an unparsable upstream event")
            return b""
        if chunk.get("error"):
            raise UpstreamReplyError(stream_error_type(chunk["error"]), "%s upstream error: %s"
                                     % (self.tr.route, upstream_message(
                                         payload.encode("utf-8", "surrogatepass"))))
        self.usage = _usage_of(chunk) or self.usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return b""          # usage-only, or Azure's prompt_filter_results
        return b"".join(self._choice(choices[0]))

    def _choice(self, choice):
        delta = choice.get("delta") or choice.get("message")
        delta = delta if isinstance(delta, dict) else {}
        out = []
        url_citations(delta.get("annotations"), self.citations)
        reasoning = reasoning_of(delta)
        if reasoning:
            out += self._thinking(reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            out += self._content(content)
        if isinstance(delta.get("refusal"), str) and delta["refusal"]:
            self.refusal = True
            out += self._text(delta["refusal"])
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict):
                out += self._tool_delta(call)
        # A finish_reason is recorded, and reading goes on: with include_usage the usage
        # comes in a later chunk with empty choices (fuergaosi233 stops here and loses it).
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
            if self.finish == "error":
                raise UpstreamReplyError("api_error", "%s upstream stream failed "
                                         "(finish_reason error)" % self.tr.route)
        return out

    # -- blocks ------------------------------------------------------------------

    def _open_block(self, kind, block, key=None):
        out = self._close_open()
        index, self.next_index = self.next_index, self.next_index + 1
        self.open = (kind, index, key)
        out.append(sse_event("content_block_start", {"type": "content_block_start",
                                                     "index": index, "content_block": block}))
        return out

    def _delta(self, delta):
        return sse_event("content_block_delta", {"type": "content_block_delta",
                                                 "index": self.open[1], "delta": delta})

    def _close_open(self):
        if not self.open:
            return []
        kind, index, key = self.open
        out = []
        if self.held and self.held[0] == kind:       # a surrogate half that stays alone
            half, self.held = self.held[1], None
            out.append(self._delta({"text": {"type": "text_delta", "text": half},
                                    "thinking": {"type": "thinking_delta", "thinking": half},
                                    "tool": {"type": "input_json_delta", "partial_json": half}
                                    }[kind]))
            self.thinking_text += half if kind == "thinking" else ""
        if kind == "thinking":
            # Claude Code stores and echoes thinking with its signature; ours lets the
            # pass-through strip it and the DeepSeek round trip find it.
            out.append(self._delta({"type": "signature_delta", "signature":
                                    self._signature()}))
            self.thinking_text = ""
        elif kind == "tool":
            out += self._finish_tool(self.tools[key])
        out.append(sse_event("content_block_stop", {"type": "content_block_stop",
                                                    "index": index}))
        self.open = None
        if self.waiting:                 # text that came while the call was written
            waiting, self.waiting = self.waiting, []
            for method, text in waiting:
                out += method(text)
            out += self._close_open()
        return out

    def _signature(self):
        return thinking_signature(self.tr.route, self.thinking_text)

    def _writing_tool(self):
        """Whether the open block is a call whose input is not a whole object yet: text
        now waits for it, since closing the block would cut the call (issue #20)."""
        return self.open is not None and self.open[0] == "tool" and not self.tools[
            self.open[2]]["json"].complete

    def _whole(self, text, kind):
        """`text` with the high surrogate the last delta of `kind` ended in before it,
        and without one it ends in now: an emoji whose UTF-16 halves come in two
        deltas is sent whole (issue #17).  A half that never finds its pair is sent
        as it came when its block closes (_close_open)."""
        held = self.held
        if held and held[0] == kind:
            text, self.held = held[1] + text, None
            if "\ud800" <= text[0] <= "\udbff" and "\udc00" <= text[1:2] <= "\udfff":
                text = text[:2].encode("utf-16-le", "surrogatepass").decode(
                    "utf-16-le") + text[2:]
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self.held = text[:-1], (kind, text[-1])
        return text

    def _thinking(self, text):
        if self._writing_tool():
            self.waiting.append((self._thinking, text))
            return []
        out = []
        if not self.open or self.open[0] != "thinking":
            out += self._open_block("thinking", {"type": "thinking", "thinking": "",
                                                 "signature": ""})
        if self.held or "\ud800" <= text[-1:] <= "\udbff":   # rare: half an emoji
            text = self._whole(text, "thinking")
        if text:
            self.thinking_text += text
            out.append(self._delta({"type": "thinking_delta", "thinking": text}))
        return out

    def _text(self, text):
        if self._writing_tool():
            self.waiting.append((self._text, text))
            return []
        out = []
        if not self.open or self.open[0] != "text":
            out += self._open_block("text", {"type": "text", "text": ""})
        if self.held or "\ud800" <= text[-1:] <= "\udbff":   # rare: half an emoji
            text = self._whole(text, "text")
        if text:
            try:            # utf8_len() inline: once per delta, a call is 10 % of it
                self.out_bytes += len(text.encode())
            except UnicodeEncodeError:
                self.out_bytes += utf8_len(text)
            out.append(self._delta({"type": "text_delta", "text": text}))
        return out

    def _content(self, text):
        if not self.tr.quirks["think_tags"] or self.in_think is False:
            return self._text(text)
        return self._think_tags(text)

    def _think_tags(self, text):
        """Route a leading <think>…</think> in streamed content to a thinking block,
        holding back only the few characters that may be half a tag."""
        buf, out = self.think_buffer + text, []
        if self.in_think is None:
            stripped = buf.lstrip()
            if len(stripped) < 7 and "<think>".startswith(stripped):
                self.think_buffer = buf
                return out
            self.in_think = stripped.startswith("<think>")
            buf = stripped[7:] if self.in_think else buf
            if not self.in_think:
                self.think_buffer = ""
                return self._text(buf)
        end = buf.find("</think>")
        if end >= 0:
            if buf[:end].strip():
                out += self._thinking(buf[:end])
            self.in_think, self.think_buffer = False, ""
            rest = buf[end + 8:].lstrip()
            return out + (self._text(rest) if rest else [])
        keep = next((n for n in range(min(7, len(buf)), 0, -1)
                     if "</think>".startswith(buf[-n:])), 0)
        self.think_buffer = buf[len(buf) - keep:] if keep else ""
        body = buf[:len(buf) - keep] if keep else buf
        return out + (self._thinking(body) if body else [])

    # -- tools -------------------------------------------------------------------

    def _tool_key(self, call, name):
        """The call a delta belongs to: by its index, else its id, else the call before.
        A slot already used gets a new call when the delta starts one: a new id, or a
        name after the call's input was whole.  Several servers number every call 0,
        and some send neither index nor id (issue #20)."""
        index = call.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            slot = "i:%d" % index
        elif call.get("id"):
            slot = "id:%s" % call["id"]
        else:
            slot = self.last_slot or "i:0"
        self.last_slot = slot
        key = self.slots.get(slot)
        if key is None or self._starts_another(self.tools[key], call, name):
            key = self.slots[slot] = "%s#%d" % (slot, len(self.tools))
            self.tools[key] = {"id": "", "name": "", "args": "", "unsent": "",
                               "started": False, "closed": False, "sig": None,
                               "json": JsonObjectStream()}
        return key

    @staticmethod
    def _starts_another(tool, call, name):
        new_id = call.get("id")
        if new_id and tool["id"]:
            return str(new_id) != tool["id"]
        return bool(name) and bool(tool["name"]) and (tool["closed"] or
                                                      tool["json"].complete)

    def _tool_delta(self, call):
        fn = _obj(call.get("function"))
        key = self._tool_key(call, fn.get("name"))
        tool = self.tools[key]
        tool["id"] = tool["id"] or str(call.get("id") or "")
        tool["name"] = tool["name"] or str(fn.get("name") or "")
        tool["sig"] = tool["sig"] or thought_signature_of(call)
        fragment = self._fragment(tool, fn.get("arguments"))
        if tool["closed"]:
            if fragment.strip():
                log.warning("dropping arguments for a closed tool call (%d bytes)",
                            len(fragment))
            return []
        tool["args"] += fragment
        piece = tool["json"].feed(fragment) if fragment else ""
        if not tool["started"]:
            tool["unsent"] += piece
            return self._start_when_free(key)
        # Tool input travels only in input_json_delta: the SDK ignores the input of
        # content_block_start (inflaborg/ccrelay#119).
        if not (self.open and self.open[2] == key):
            return []
        out = self._json_delta(piece)
        if self.waiting and tool["json"].complete:
            out += self._close_open()              # the text that waited goes out now
        return out

    def _start_when_free(self, key):
        """Open the call's block now, or after the call being written: parallel calls
        that interleave are sent one after another, whole."""
        if not self.tools[key]["name"]:
            return []                              # buffered until the name is known
        if self._writing_tool() or self.deferred:
            if key not in self.deferred:
                self.deferred.append(key)
            return []
        return self._start_tool(key)

    def _json_delta(self, piece):
        if self.held or "\ud800" <= piece[-1:] <= "\udbff":   # rare: half an emoji
            piece = self._whole(piece, "tool")
        return [self._delta({"type": "input_json_delta", "partial_json": piece})] if (
            piece) else []

    @staticmethod
    def _fragment(tool, args):
        if isinstance(args, dict):                 # Ollama sends whole objects
            args = _compact(args)
        if not isinstance(args, str):
            return ""
        if tool["args"] and len(args) >= len(tool["args"]) and args.startswith(tool["args"]):
            return args[len(tool["args"]):]        # a snapshot, not a delta
        return args

    def _start_tool(self, key):
        tool = self.tools[key]
        tool["started"], self.had_tool = True, True
        tool_id = _signed_id(self.tr, self.ids.make(tool["id"]), tool["sig"])
        out = self._open_block("tool", {"type": "tool_use", "id": tool_id, "name":
                                        self.tr.names.get(tool["name"], tool["name"]),
                                        "input": {}}, key)
        unsent, tool["unsent"] = tool["unsent"], ""
        return out + self._json_delta(unsent)

    def _finish_tool(self, tool):
        """The end of a call's input: what completes it, or, for arguments that were
        no object, the repaired value whole; each repair logged (issue #20)."""
        stream, tool["closed"] = tool["json"], True
        tail = stream.close()
        if tail is None:
            tail = _compact(parse_tool_arguments(tool["args"]))
            stream.notes.append("arguments did not begin with {")
        if stream.notes:
            self.repairs += 1
            log.warning("%s tool call %s: input repaired (%s)", self.tr.route,
                        escape_log(tool["name"])[:100], "; ".join(stream.notes))
        return [self._delta({"type": "input_json_delta", "partial_json": tail})] if (
            tail) else []

    # -- the end -----------------------------------------------------------------

    def end(self):
        """The closing events after the upstream ended: an error event when it stopped
        with neither [DONE] nor a finish_reason (truncation never looks finished)."""
        if self.think_buffer:
            pending, self.think_buffer, self.in_think = self.think_buffer, "", False
            tail = b"".join(self._text(pending))
        else:
            tail = b""
        # EOF with neither [DONE] nor a finish_reason is a truncation: it must never
        # look like a finished answer, or the client keeps half a reply (§3.4 S6).
        if not self.done and not self.finish:
            return tail + self.error("api_error", "%s upstream stream ended early"
                                     % self.tr.route)
        out = self._close_open()
        for key in self.deferred + [k for k, t in self.tools.items()
                                    if t["name"] and not t["started"] and k not in self.deferred]:
            out += self._start_tool(key)
            out += self._close_open()
        if self.tr.search is not None:       # the results, once all citations are in
            out += self._open_block("search", search_blocks(
                "", self.search_id, search_results(self.citations))[1])
            out += self._close_open()
        self.out_bytes += sum(len(t["args"]) for t in self.tools.values())
        # All four usage keys, input_tokens > 0: Claude Code keeps message_start's
        # input_tokens unless this one is positive (MadAppGang/claudish#123).
        usage = dict(anthropic_usage(self.usage, self.tr.estimate, -(-self.out_bytes // 4)),
                     **search_usage(self.tr))
        out.append(sse_event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": stop_reason(self.finish, self.had_tool, self.refusal),
            "stop_sequence": None}, "usage": usage}))
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        return tail + b"".join(out)

    @staticmethod
    def error(etype, message):
        return sse_event("error", {"type": "error", "error": {"type": etype,
                                                              "message": message}})


# ---- Translation: Anthropic <-> OpenAI Responses API (docs/translation.md §8) ---------

def reasoning_signature(route, item):
    """The signature of a thinking block made from a Responses reasoning item: the item
    itself (id, summary, encrypted_content), so that the next turn sends it back as it
    came; tied to the route, since another organisation cannot decrypt it."""
    data = json.dumps(item, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return "%s%s:rs:%s" % (CCPROXY_SIGNATURE_PREFIX, route,
                           base64.urlsafe_b64encode(data).decode("ascii"))


def reasoning_item(signature, route):
    """The reasoning item a signature of this route carries, or None (another
    provider's thinking is never sent to OpenAI as reasoning)."""
    prefix = "%s%s:rs:" % (CCPROXY_SIGNATURE_PREFIX, route)
    if not isinstance(signature, str) or not signature.startswith(prefix):
        return None
    try:
        item = json.loads(base64.urlsafe_b64decode(signature[len(prefix):].encode("ascii")))
    except (ValueError, UnicodeError):            # binascii.Error is a ValueError
        return None
    return item if isinstance(item, dict) and item.get("type") == "reasoning" else None


def responses_request(body, tr, prepared=None):
    """(upstream body bytes, wants a stream) for a call on the Responses API: the Chat
    Completions body built as everywhere else (§1), then moved into the Responses
    shape (§8.1).  No state lives at OpenAI: store false, reasoning comes back
    encrypted and rides in the thinking block's signature."""
    prepared = prepared or prepare_tools(body.get("tools"), tr.quirks)
    chat = anthropic_to_openai(body, tr, prepared)
    instructions, items = responses_input(chat["messages"])
    out = {"model": chat["model"], "input": items, "store": False}
    if instructions:
        out["instructions"] = instructions
    for key in ("temperature", "top_p", "prompt_cache_key"):
        if key in chat:
            out[key] = chat[key]
    tokens = chat.get(tr.quirks["token_param"])
    if tokens:
        out["max_output_tokens"] = max(tokens, 16)      # the API's floor
    out.update(responses_reasoning(chat.get("reasoning_effort"), tr.quirks,
                                   is_reasoning_model(tr.quirks, tr.upstream_model)))
    out.update(responses_tool_choice(chat))
    fmt = _obj(chat.get("response_format")).get("json_schema")
    if isinstance(fmt, dict):
        out["text"] = {"format": dict(fmt, type="json_schema")}
    if chat.get("stream"):
        out["stream"] = True
    # The tools go in serialised once per tool set, as on Chat Completions.
    tools, text = chat.get("tools"), json.dumps(out)
    if tools:
        text = text[:-1] + ', "tools": ' + (prepared.responses_json if tools is prepared.tools
                                            else json.dumps(responses_function_tools(tools))) + "}"
    return text.encode(), bool(out.get("stream"))


def responses_reasoning(effort, quirks, reasoning_model):
    """For a reasoning model: reasoning.effort at the level the route takes (when the
    client asked for one), a summary so that the user sees the model think
    (reasoning_summary: "" where an organisation may not have them), and the
    encrypted reasoning back in the reply, to be sent back with the next turn."""
    if not reasoning_model:
        return {}
    reasoning = {"effort": effort} if effort else {}
    if quirks["reasoning_summary"]:
        reasoning["summary"] = quirks["reasoning_summary"]
    return {"reasoning": reasoning, "include": ["reasoning.encrypted_content"]}


def responses_tool_choice(chat):
    """A Chat tool_choice in the Responses shape (the name at the top)."""
    out = {}
    choice = chat.get("tool_choice")
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "function", "name": choice["function"]["name"]}
    elif choice is not None:
        out["tool_choice"] = choice
    if "parallel_tool_calls" in chat:
        out["parallel_tool_calls"] = chat["parallel_tool_calls"]
    return out


def responses_input(messages):
    """Chat messages -> (instructions, Responses input items): the leading system
    message is the instructions; an assistant turn is its reasoning items, its text
    and its function_call items; a tool message is a function_call_output."""
    instructions = ""
    if messages and messages[0]["role"] in ("system", "developer"):
        instructions = _content_text(messages[0]["content"])
        messages = messages[1:]
    items = []
    for msg in messages:
        role = msg["role"]
        if role == "assistant":
            items.extend(_responses_assistant(msg))
        elif role == "tool":
            items.append({"type": "function_call_output", "call_id": msg["tool_call_id"],
                          "output": _content_text(msg["content"])})
        else:
            items.append({"type": "message", "role": role,
                          "content": _responses_content(msg["content"], role)})
    return instructions, items


def _responses_assistant(msg):
    items = list(msg.get("_reasoning") or ())
    if msg.get("content"):
        items.append({"type": "message", "role": "assistant", "content": msg["content"]})
    for call in msg.get("tool_calls") or ():
        items.append({"type": "function_call", "call_id": call["id"],
                      "name": call["function"]["name"],
                      "arguments": call["function"]["arguments"]})
    return items


def _responses_content(content, role):
    """User (or system) content: a string as it is, parts as input_text, input_image
    and input_file parts."""
    if isinstance(content, str) or role != "user":
        return content if isinstance(content, str) else _content_text(content)
    out = []
    for part in content:
        if part["type"] == "text":
            out.append({"type": "input_text", "text": part["text"]})
        elif part["type"] == "image_url":
            out.append({"type": "input_image", "image_url": part["image_url"]["url"],
                        "detail": "auto"})
        elif part["type"] == "file":
            out.append(dict(part["file"], type="input_file"))
    return out


def responses_url(provider):
    """{base}/responses (Azure's preview API: plus ?api-version=)."""
    query = "?api-version=" + urllib.parse.quote(provider.api_version) if (
        provider.api_version) else ""
    return provider.base_url + "/responses" + query


def responses_usage(usage):
    """Responses usage -> the Chat Completions usage the rest reads (§2.4)."""
    usage = usage if isinstance(usage, dict) else {}
    return {"prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": {"cached_tokens": _obj(usage.get(
                "input_tokens_details")).get("cached_tokens")}} if usage else None


def responses_finish(response, had_call):
    """The Chat finish_reason of a Responses status: incomplete by the output limit is
    length, by the content filter content_filter."""
    reason = _obj(_obj(response).get("incomplete_details")).get("reason")
    if _obj(response).get("status") == "incomplete" or reason:
        return "length" if reason == "max_output_tokens" else "content_filter"
    return "tool_calls" if had_call else "stop"


def responses_failure(error, route):
    """An UpstreamReplyError for a response.failed or error event."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    return UpstreamReplyError(stream_error_type(error), "%s upstream error: %s" % (
        route, upstream_message(json.dumps({"error": error}).encode())))


def responses_to_anthropic(doc, tr):
    """A non-streamed Responses reply -> an A message (§8.2)."""
    if not isinstance(doc, dict) or doc.get("error") or doc.get("status") == "failed":
        raise responses_failure(_obj(doc).get("error") or "no reply", tr.route)
    content, calls, refusal = [], [], False
    for item in doc.get("output") if isinstance(doc.get("output"), list) else ():
        kind = _obj(item).get("type")
        if kind == "reasoning":
            text = "\n\n".join(s.get("text", "") for s in item.get("summary") or ()
                               if isinstance(s, dict))
            content.append({"type": "thinking", "thinking": text,
                            "signature": reasoning_signature(tr.route, item)})
        elif kind == "message":
            for part in item.get("content") or ():
                text = _obj(part).get("text") or _obj(part).get("refusal")
                refusal = refusal or _obj(part).get("type") == "refusal"
                if isinstance(text, str) and text:
                    content.append({"type": "text", "text": text})
        elif kind == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments")}})
    content.extend(_tool_uses({"tool_calls": calls}, tr))
    out_bytes = sum(utf8_len(b.get("text", "")) for b in content)
    return {"id": new_message_id(), "type": "message", "role": "assistant",
            "model": tr.client_model, "content": content,
            "stop_reason": stop_reason(responses_finish(doc, bool(calls)), bool(calls), refusal),
            "stop_sequence": None,
            "usage": anthropic_usage(responses_usage(doc.get("usage")), tr.estimate,
                                     -(-out_bytes // 4))}


class ResponsesStreamTranslator(StreamTranslator):
    """Responses API events -> A SSE events (§8.3), through the same block machinery
    as Chat Completions chunks: the same grammar, tool-input streaming and repair.  A
    function call is a Chat tool-call delta keyed by its output_index."""

    def __init__(self, tr):
        super().__init__(tr)
        self.sig, self.seen = None, set()    # the reasoning item's signature; output
                                             # indices whose text or arguments streamed

    def feed(self, payload):
        event = _loads(payload)
        if not isinstance(event, dict):
            return b""
        handler = self.EVENTS.get(event.get("type"))
        return b"".join(handler(self, event)) if handler else b""

    def _signature(self):
        sig, self.sig = self.sig, None
        return sig or super()._signature()

    def _text_delta(self, event):
        self.seen.add(event.get("output_index"))
        return self._content(str(event.get("delta") or ""))

    def _refusal_delta(self, event):
        self.refusal = True
        return self._text_delta(event)

    def _summary_delta(self, event):
        return self._thinking(str(event.get("delta") or ""))

    def _summary_part(self, event):
        return self._thinking("\n\n") if event.get("summary_index") else []

    def _item_added(self, event):
        item = _obj(event.get("item"))
        if item.get("type") != "function_call":
            return []
        self.seen.add(event.get("output_index"))
        return self._tool_delta({"index": event.get("output_index"), "id": item.get("call_id"),
                                 "type": "function", "function": {
                                     "name": item.get("name"),
                                     "arguments": item.get("arguments") or ""}})

    def _args_delta(self, event):
        return self._tool_delta({"index": event.get("output_index"), "function": {
            "arguments": str(event.get("delta") or "")}})

    def _item_done(self, event):
        """A reasoning item ends its thinking block, signed with the item; an item
        whose text or arguments never streamed comes whole (servers that send only
        the done events)."""
        item, index = _obj(event.get("item")), event.get("output_index")
        if item.get("type") == "reasoning":
            out = [] if self.open and self.open[0] == "thinking" else self._thinking("")
            self.sig = reasoning_signature(self.tr.route, item)
            return out + self._close_open()
        if index in self.seen:
            return []
        if item.get("type") == "function_call":
            self.seen.add(index)
            return self._item_added(event)
        return [b"".join(self._text_delta(dict(event, delta=_obj(p).get("text") or "")))
                for p in item.get("content") or () if _obj(p).get("text")]

    def _completed(self, event):
        response = _obj(event.get("response"))
        self.usage = responses_usage(response.get("usage")) or self.usage
        self.finish = responses_finish(response, bool(self.tools))
        self.done = True
        return []

    def _failed(self, event):
        raise responses_failure(_obj(event.get("response")).get("error") or event,
                                self.tr.route)

    EVENTS = {"response.output_text.delta": _text_delta,
              "response.refusal.delta": _refusal_delta,
              "response.reasoning_summary_text.delta": _summary_delta,
              "response.reasoning_summary_part.added": _summary_part,
              "response.output_item.added": _item_added,
              "response.function_call_arguments.delta": _args_delta,
              "response.output_item.done": _item_done,
              "response.completed": _completed, "response.incomplete": _completed,
              "response.failed": _failed, "error": _failed}


# ---- Translation: token estimation (docs/translation.md §5) --------------------------

TOOLS_OVERHEAD = 300        # Anthropic's hidden tool-use system prompt
UNKNOWN_IMAGE_TOKENS = 1600
PDF_PAGE_TOKENS = 2000


def image_size(data):
    """(width, height) from the first bytes of a PNG, GIF, WebP or JPEG, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:4] == b"GIF8" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data):
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30:
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    if kind == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    return None


def _jpeg_size(data):
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (int.from_bytes(data[i + 7:i + 9], "big"),
                    int.from_bytes(data[i + 5:i + 7], "big"))
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _b64_prefix(text, limit=65536):
    """The first `limit` decoded bytes of base64 text (bounded work for any size)."""
    chunk = text[:limit * 4 // 3 + 4]
    chunk = chunk[:len(chunk) - len(chunk) % 4]
    try:
        return base64.b64decode(chunk)
    except (ValueError, TypeError):
        return b""


def image_tokens(source):
    """Anthropic's image cost: long edge ≤ 1568, ≤ 1.15 MP, then w·h/750."""
    if not isinstance(source, dict) or source.get("type") != "base64":
        return UNKNOWN_IMAGE_TOKENS
    size = image_size(_b64_prefix(str(source.get("data", ""))))
    if not size or not all(size):
        return UNKNOWN_IMAGE_TOKENS
    w, h = size
    scale = min(1.0, 1568.0 / max(w, h))
    w, h = w * scale, h * scale
    if w * h > 1.15e6:
        scale = (1.15e6 / (w * h)) ** 0.5
        w, h = w * scale, h * scale
    return int(-(-(int(w) * int(h)) // 750))


def pdf_tokens(source):
    """2000 tokens a page; pages counted as /Type /Page objects in the decoded PDF."""
    if not isinstance(source, dict) or source.get("type") != "base64":
        return PDF_PAGE_TOKENS
    try:
        data = base64.b64decode(str(source.get("data", "")))
    except (ValueError, TypeError):
        data = b""
    pages = len(re.findall(rb"/Type\s*/Page(?![s\w])", data))
    return PDF_PAGE_TOKENS * max(pages, 1)


def _block_cost(block):
    """(text bytes, fixed tokens) of one content block."""
    if not isinstance(block, dict):
        return utf8_len(str(block)), 0
    kind = block.get("type")
    if kind == "text":
        return utf8_len(str(block.get("text", ""))), 0
    if kind == "thinking":
        return utf8_len(str(block.get("thinking", ""))), 0
    if kind == "tool_use":
        return utf8_len(str(block.get("name", "")) + _compact(block.get("input", {}))), 0
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return _blocks_cost(content)
        return utf8_len(str(content or "")), 0
    if kind == "image":
        return 0, image_tokens(block.get("source"))
    if kind == "document":
        src = _obj(block.get("source"))
        if src.get("type") == "text":
            return utf8_len(str(src.get("data", ""))), 0
        return 0, pdf_tokens(src) if src.get("type") == "base64" else UNKNOWN_IMAGE_TOKENS
    if kind == "tool_reference":
        return 0, 10
    return utf8_len(_compact(block)), 0


def _blocks_cost(blocks):
    total_bytes = fixed = 0
    for block in blocks:
        b, f = _block_cost(block)
        total_bytes, fixed = total_bytes + b, fixed + f
    return total_bytes, fixed


def estimate_input_tokens(body, tools_overhead=TOOLS_OVERHEAD, tools_size=None):
    """Input tokens of an A request without a tokenizer (§5): UTF-8 bytes ÷ 4 (measured
    +1…+7 % against Claude's tokenizer on Claude Code bodies), 4 per message, images
    and PDFs by their size, and the tools' hidden prompt.  `tools_size`: the compact
    tools' bytes when already known (PreparedTools.size)."""
    system = body.get("system")
    total = utf8_len(system) if isinstance(system, str) else _blocks_cost(
        system if isinstance(system, list) else [])[0]
    fixed, messages = 0, body.get("messages") if isinstance(body.get("messages"), list) else []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            b, f = _blocks_cost(content)
            total, fixed = total + b, fixed + f
        else:
            total += utf8_len(str(content or ""))
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    if tools:               # one dumps of the list: 40 % faster than one per tool
        total += utf8_len(_compact(tools)) if tools_size is None else tools_size
    return -(-total // 4) + 4 * len(messages) + fixed + (tools_overhead if tools else 0)


# ---- Context windows (docs/translation.md §1.9) -------------------------------------

#: Windows and output limits, in tokens, of well-known models (their providers' model
#: pages, 2026-12): for a model neither the config nor its own server sizes.  Claude Code
#: assumes 1,000,000 for a model name it does not know (issue #21).
MODEL_LIMITS = (
    (r"gpt-5", 400000, 128000), (r"gpt-4\.1", 1047576, 32768), (r"gpt-4o", 128000, 16384),
    (r"(^|/)o[34](-|$)", 200000, 100000), (r"deepseek-reasoner", 128000, 64000),
    (r"deepseek-(chat|v3)", 128000, 8192), (r"gemini-(2\.5|3)", 1048576, 65536),
    (r"(^|/)claude", 200000, 64000), (r"qwen3-coder", 262144, 65536),
    (r"gpt-oss", 131072, 32768), (r"codex-mini", 200000, 100000),
)
WINDOW_MARGIN = 1024        # tokens kept free beside the input estimate (an estimate)
MIN_OUTPUT_ROOM = 1024      # less room than this for the answer: the prompt is too long


def table_limits(model):
    """(window, output limit) of a well-known model, or (0, 0)."""
    return next(((w, o) for pattern, w, o in MODEL_LIMITS if re.search(pattern, model or "")),
                (0, 0))


def route_limits(config, provider, model, learned=0):
    """(window, output limit, where the window comes from) of `model` on `provider`:
    the config (a route's context_window for that provider and model, then the
    provider's), what its own server said (`learned`), the built-in table, or unknown
    (0, "").  The output limit is the max_output flag, else the table's."""
    table = table_limits(model)
    output = quirks_for(provider)["max_output"] or table[1]
    route = next((r.context_window for r in config.routes if r.context_window and
                  r.provider == provider.name and r.model in ("", model)), 0)
    for window, source in ((route, "config"), (provider.context_window, "config"),
                           (learned, "provider"), (table[0], "table")):
        if window:
            return window, output, source
    return 0, output, ""


def max_tokens_cap(window, output, estimate):
    """The most max_tokens may be (0: no cap): the output limit, and the window less
    the estimated input and a margin.  HTTPError with Anthropic's "prompt is too long"
    when the input alone leaves no room, so Claude Code compacts at once."""
    if not window:
        return output
    room = window - estimate - WINDOW_MARGIN
    if room < MIN_OUTPUT_ROOM:
        raise HTTPError(400, "invalid_request_error", "prompt is too long: %d tokens > %d "
                        "maximum (ccproxy's estimate against the model's window of %d)"
                        % (estimate, window - WINDOW_MARGIN - MIN_OUTPUT_ROOM, window),
                        (("x-should-retry", "false"),))
    return min(output, room) if output else room


#: How servers say a call did not fit, (pattern, kind): "output" asked for more output
#: than the window leaves (clamp and try again), "overflow" the input alone is too long
#: (Claude Code must compact), "either" says both numbers and the input decides.
LIMIT_ERRORS = (
    # vLLM: 'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's
    # maximum context length is 32768 tokens and your request has 17459 input tokens
    (r"is too large: (?P<asked>\d+)\. This model's maximum context length is "
     r"(?P<window>\d+) tokens and your request has (?P<input>\d+) input tokens", "output"),
    # vLLM before 0.6, DeepSeek, OpenAI's older wording
    (r"maximum context length is (?P<window>\d+) tokens\. However, you requested "
     r"(?P<total>\d+) tokens \((?P<input>\d+) in the messages, (?P<asked>\d+) in the "
     r"completion\)", "either"),
    # OpenRouter
    (r"maximum context length is (?P<window>\d+) tokens\. However, you requested about "
     r"(?P<total>\d+) tokens \((?P<input>\d+) of text input", "either"),
    # llama.cpp: exceed_context_size_error, with n_prompt_tokens and n_ctx
    (r"exceed_context_size_error|exceeds the available context size", "overflow"),
    # Gemini's OpenAI endpoint
    (r"input token count \((?P<input>\d+)\) exceeds the maximum number of tokens allowed "
     r"\((?P<window>\d+)\)", "overflow"),
    # OpenAI, Groq (context_length_exceeded); LM Studio; Ollama
    (r"context_length_exceeded|Please reduce the length of the messages|context length "
     r"of only (?P<window>\d+)|exceeded max context length", "overflow"),
)
_LIMIT_ERRORS = tuple((re.compile(p, re.I), kind) for p, kind in LIMIT_ERRORS)


def limit_error(body):
    """{"kind": output | overflow, "window", "input"} of an upstream's error body that
    says the call did not fit, or None.  Numbers it does not give are 0."""
    text = body[:4000].decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    for pattern, kind in _LIMIT_ERRORS:
        match = pattern.search(text)
        if match:
            numbers = {k: int(v) for k, v in match.groupdict().items() if v}
            window = numbers.get("window") or _json_number(text, "n_ctx")
            used = numbers.get("input") or _json_number(text, "n_prompt_tokens")
            if kind == "either":
                kind = "output" if used + MIN_OUTPUT_ROOM < window else "overflow"
            return {"kind": kind, "window": window, "input": used}
    return None


def _json_number(text, key):
    match = re.search(r'"%s"\s*:\s*(\d+)' % key, text)
    return int(match.group(1)) if match else 0


def listed_windows(body):
    """{model id: window} from a model list that says them: vLLM's max_model_len,
    OpenRouter's context_length, LM Studio's max_context_length."""
    doc = _loads(body)
    entries = doc.get("data") if isinstance(doc, dict) else None
    out = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        window = next((entry[k] for k in ("max_model_len", "context_length",
                                          "loaded_context_length", "max_context_length")
                       if isinstance(entry.get(k), int) and entry[k] > 0), 0)
        if window:
            out[entry["id"]] = window
    return out


#: The Claude names GET /v1/models always lists on translated routes, one per family as
#: Claude Code 2.1.332 names them.  Its /model picker (with
#: CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1) keeps only ids matching
#: /(claude|anthropic)/i, so without them it shows nothing from a proxy (issue #21).
CLAUDE_FAMILY_NAMES = ("claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5")


def models_document(config, limits):
    """GET /v1/models on routes that are not Anthropic: the Claude names the routes
    serve, then the configured names, each in Anthropic's ModelInfo shape with the
    window and output limit of the route it lands on.  `limits(provider, model)` gives
    (window, output, source), as Windows.limits does."""
    names = [r.match for r in config.routes if "claude" in r.match and
             not any(c in r.match for c in "*?[")] + list(CLAUDE_FAMILY_NAMES)
    for p in config.providers:
        names.extend(n for n in (p.model, p.big_model, p.small_model) if n)
    names.extend(r.model for r in config.routes if r.model)
    names.extend(r.match for r in config.routes if not any(c in r.match for c in "*?["))
    names = [n for i, n in enumerate(names) if n and n != "default" and n not in names[:i]]
    data = [model_info(config, n, limits) for n in names]
    return {"data": data, "has_more": False,
            "first_id": names[0] if names else None, "last_id": names[-1] if names else None}


def model_info(config, name, limits):
    """One /v1/models entry: where `name` goes, and its window there (null: unknown)."""
    provider, upstream = plan_route(config, name)[0]
    window, output, _ = limits(provider, upstream)
    where = "%s on %s" % (upstream, provider.name)
    if window:
        where += ", %sK context" % (window // 1000)
    label = claude_label(name)
    return {"type": "model", "id": name, "created_at": "1970-01-01T00:00:00Z",
            "display_name": "%s → %s" % (label, upstream) if label else name,
            "description": where, "max_input_tokens": window or None,
            "max_tokens": output or None}


def claude_label(name):
    """"Sonnet 5.5" for claude-sonnet-5-5 (a dated id too); "" for other names."""
    m = re.match(r"claude-([a-z]+)-(\d+)(?:-(\d))?(?:-\d{8})?$", name)
    if not m:
        return ""
    return m.group(1).capitalize() + " " + m.group(2) + ("." + m.group(3) if m.group(3) else "")


# ---- Routing by scenario (docs/operating.md §9) -------------------------------------

def choose_route(config, model, body, headers):
    """(the route for one call, or None, and why): the user's own pick, a model name
    PROVIDER,MODEL (as typed into /model); else the first route whose match takes the
    name and whose scenario the call is in.  Why: pick, a scenario, default or model."""
    provider, sep, picked = (model or "").partition(",")
    if sep and picked and provider in config.provider_names():
        return RouteConfig(match=model.lower(), provider=provider, model=picked,
                           name="pick"), "pick"
    name = (model or "").lower()
    for route in config.routes:
        if names_model(route, name) and (not route.when or in_scenario(
                route, body, headers, name, config)):
            return route, route.when or ("default" if route.match in ("", "default")
                                         else "model")
    return None, None


#: The request classes Claude Code names in x-claude-code-request-class.
BACKGROUND_CLASSES = ("auxiliary", "side_reply")


def in_scenario(route, body, headers, name, config):
    """Whether a call is in the scenario a route's `when` names (issue #21)."""
    return SCENARIO_TESTS[route.when](route, body, headers, name, config)


def is_background(route, body, headers, name, config):
    """Claude Code's small and fast calls: a haiku-class model name, a request class it
    marks as auxiliary, or a call with no tools that asks for structured output (its
    session titles, 2.1.330 and later, which use the main model's name)."""
    request_class = (headers.get("x-claude-code-request-class") or "").lower()
    fmt = _obj(body.get("output_config")).get("format")
    return "haiku" in name or request_class in BACKGROUND_CLASSES or (
        not body.get("tools") and isinstance(fmt, dict))


def is_thinking(route, body, headers, name, config):
    """Thinking on, at the route's min_effort or above (high by default: Claude Code
    sends adaptive thinking at medium with nearly every call)."""
    effort = reasoning_effort(body)
    floor = EFFORT_LEVELS.index(route.min_effort or "high")
    return effort in EFFORT_LEVELS and EFFORT_LEVELS.index(effort) >= floor


def is_long_context(route, body, headers, name, config):
    """The estimated input above the route's min_tokens, else above what the default
    route's window leaves (the call would not fit there)."""
    limit = route.min_tokens
    if not limit:
        provider, model = plan_route(config, "")[0]
        window, _, _ = route_limits(config, provider, model or provider.model)
        limit = window - WINDOW_MARGIN - MIN_OUTPUT_ROOM if window else 0
    return bool(limit) and estimate_input_tokens(body) > limit


def has_web_search(route, body, headers, name, config):
    """Anthropic's web search server tool is offered (web_search_20250305, …)."""
    tools = body.get("tools")
    return isinstance(tools, list) and any(isinstance(t, dict) and str(
        t.get("type", "")).startswith("web_search") for t in tools)


def has_images(route, body, headers, name, config):
    """An image or a document anywhere in the messages (tool results included)."""
    messages = body.get("messages")
    return any(_has_image(message.get("content")) for message in messages
               if isinstance(message, dict)) if isinstance(messages, list) else False


def _has_image(content):
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict) and (block.get("type") in ("image", "document") or (
                block.get("type") == "tool_result" and _has_image(block.get("content")))):
            return True
    return False


def is_subagent(route, body, headers, name, config):
    """A call Claude Code makes for a subagent: it sends the agent's id, and a request
    class, with such calls."""
    request_class = (headers.get("x-claude-code-request-class") or "").lower()
    return bool(headers.get("x-claude-code-agent-id")) or request_class == "subagent"


SCENARIO_TESTS = {"background": is_background, "thinking": is_thinking,
                  "long_context": is_long_context, "web_search": has_web_search,
                  "images": has_images, "subagent": is_subagent}

def search_only(body):
    """Whether a call is Claude Code's WebSearch request: Anthropic's web search server
    tool and no other tool.  A translated route has no search, and dropped the tool."""
    tools = body.get("tools")
    return isinstance(tools, list) and bool(tools) and all(
        isinstance(t, dict) and str(t.get("type", "")).startswith("web_search") for t in tools)


def search_unavailable(body, route, estimate):
    """The answer to a WebSearch request on a route that cannot search: Anthropic's own
    shape for a search that failed (a server_tool_use and its web_search_tool_result
    with error_code unavailable), which Claude Code reports as such, instead of a
    model's guess passed off as search results (issue #21)."""
    failed = {"type": "web_search_tool_result_error", "error_code": "unavailable"}
    return {"id": new_message_id(), "type": "message", "role": "assistant",
            "model": body.get("model", ""), "stop_reason": "end_turn", "stop_sequence": None,
            "content": search_blocks(search_request(body)["query"],
                                     "srvtoolu_" + random_hex(24), failed) + [
                {"type": "text", "text": "Web search is not available on this route (%s): "
                 "its provider cannot search." % route}],
            "usage": {"input_tokens": max(estimate, 1), "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "server_tool_use": {"web_search_requests": 0}}}


# ---- Anthropic-compatible endpoints: request rewrites (docs/providers.md) -------------

#: Thinking budgets for an effort, where a vendor takes thinking only as enabled + budget.
EFFORT_BUDGETS = {"low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768, "max": 65536}
MIN_THINKING_BUDGET = 1024              # Anthropic's floor, which the vendors copy


def vendor_body(body, quirks, model):
    """The client's body as a vendor's Anthropic-compatible endpoint takes it, with
    what its quirk flags say (issue #22): (body, changed).  The request only: replies
    are relayed byte for byte."""
    out, changed = sanitize_for_anthropic(body)
    out = dict(out)
    if model and model != out.get("model"):
        out["model"], changed = model, True
    for field in _flag_list(quirks["drop_fields"]):
        changed = out.pop(field, None) is not None or changed
    changed = _vendor_max_tokens(out, quirks) or changed
    changed = _vendor_thinking(out, quirks) or changed
    if quirks["strip_cache_ttl"]:
        changed = _strip_cache_ttl(out) or changed
    return out, changed


def _flag_list(value):
    return [item.strip() for item in value.split(",") if item.strip()]


def _vendor_max_tokens(out, quirks):
    """max_tokens filled in (GLM answers 500 without it) and clamped to max_output."""
    value = out.get("max_tokens")
    if not isinstance(value, int) or isinstance(value, bool):
        if not quirks["default_max_tokens"]:
            return False
        value = quirks["default_max_tokens"]
    wanted = min(value, quirks["max_output"]) if quirks["max_output"] else value
    if wanted == out.get("max_tokens"):
        return False
    out["max_tokens"] = wanted
    return True


def _vendor_thinking(out, quirks):
    """thinking as the vendor takes it: removed (off), turned off for a history whose
    tool-call turns lack thinking (thinking_history), or adaptive made enabled with a
    budget from Claude Code's effort (thinking_mode enabled)."""
    thinking = out.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return False
    mode = quirks["thinking_mode"]
    if mode == "off":
        del out["thinking"]
        return True
    if quirks["thinking_history"] and tool_turn_without_thinking(out.get("messages")):
        out["thinking"] = {"type": "disabled"}
        return True
    if mode != "enabled" or thinking.get("type") != "adaptive":
        return False
    effort = reasoning_effort(out) or "high"
    budget = min(EFFORT_BUDGETS.get(effort, EFFORT_BUDGETS["high"]),
                 out.get("max_tokens", 0) - 1 if isinstance(out.get("max_tokens"), int) else 0)
    out["thinking"] = ({"type": "enabled", "budget_tokens": budget}
                       if budget >= MIN_THINKING_BUDGET else {"type": "disabled"})
    return True


def tool_turn_without_thinking(messages):
    """Whether an assistant turn with a tool call has no thinking block (after a
    fallback from another provider, or a history Claude Code trimmed)."""
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if message.get("role") != "assistant" or not isinstance(content, list):
            continue
        kinds = {b.get("type") for b in content if isinstance(b, dict)}
        if "tool_use" in kinds and not kinds & {"thinking", "redacted_thinking"}:
            return True
    return False


def _strip_cache_ttl(out):
    """Every cache_control as {"type": "ephemeral"}: a vendor that rejects or mis-bills
    Anthropic's ttl gets its own default."""
    changed = False
    for block in _cache_marked(out):
        if set(block["cache_control"]) - {"type"}:
            block["cache_control"], changed = {"type": "ephemeral"}, True
    return changed


def _cache_marked(out):
    """The blocks of the body's system, messages and tools that carry cache_control
    (copied where changed: the client's parsed body is shared with MemberCache)."""
    found = []
    for key in ("system", "tools", "messages"):
        value = out.get(key)
        if isinstance(value, list):
            out[key] = value = [dict(v) if isinstance(v, dict) else v for v in value]
            found.extend(v for v in value if isinstance(v, dict) and isinstance(
                v.get("cache_control"), dict))
            for message in value if key == "messages" else ():
                if isinstance(message, dict) and isinstance(message.get("content"), list):
                    message["content"] = [dict(b) if isinstance(b, dict) else b
                                          for b in message["content"]]
                    found.extend(b for b in message["content"] if isinstance(b, dict)
                                 and isinstance(b.get("cache_control"), dict))
    return found


def vendor_headers(client_headers, provider, quirks):
    """Headers for a vendor's endpoint: the client's, minus hop-by-hop and credentials
    (a client's Anthropic key never goes to a vendor), the anthropic-beta values the
    vendor takes, and the provider's own key as its docs say (x-api-key or Bearer)."""
    if client_headers is None:                   # a call of ccproxy's own (check)
        headers, betas = [("anthropic-version", "2023-06-01")], ""
    else:
        headers = filter_headers(client_headers, REQUEST_DROP | set(CLIENT_KEY_HEADERS) |
                                 {"anthropic-beta"})
        betas = kept_betas(client_headers.get("anthropic-beta"), quirks["betas"])
    if betas:
        headers.append(("anthropic-beta", betas))
    if provider.api_key:
        headers.append(("authorization", "Bearer " + provider.api_key) if quirks["auth"] ==
                       "bearer" else ("x-api-key", provider.api_key))
    headers.append(("accept-encoding", "identity"))
    return with_provider_headers(headers, provider)


def kept_betas(value, allowed):
    """The anthropic-beta values a vendor takes: all ("*"), none (""), or those listed.
    Unknown values make some vendors answer 400 (MoonshotAI/Kimi-K2.5#5,
    router-for-me/CLIProxyAPI#2866)."""
    if not value or allowed == "*":
        return value or ""
    keep = set(_flag_list(allowed))
    return ",".join(v.strip() for v in value.split(",") if v.strip() in keep)


# ---- AWS: Signature Version 4 and event streams (docs/providers.md) ------------------

AWS_UNRESERVED = "-_.~"                       # RFC 3986 §2.3, as SigV4 encodes


def sigv4_headers(method, url, headers, body, credentials, region, service, now):
    """The headers that sign one request with AWS Signature Version 4: x-amz-date, the
    session token if any, and Authorization.  `headers`: (name, value) pairs to sign
    beside host and x-amz-date; `credentials`: (access key, secret, session token);
    `now`: seconds since the epoch.  The path, already percent-encoded once as sent, is
    encoded once more for the canonical request, as AWS does for every service but S3:
    a Bedrock model id's ":" is %3A on the wire and %253A in what is signed."""
    access, secret, token = credentials
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    parts = urllib.parse.urlsplit(url)
    signed = [("host", parts.netloc), ("x-amz-date", stamp)] + [
        (n.lower(), " ".join(str(v).split())) for n, v in headers]
    if token:
        signed.append(("x-amz-security-token", token))
    signed.sort()
    names = ";".join(n for n, _ in signed)
    canonical = sigv4_canonical(method, parts, signed, body)
    scope = "%s/%s/%s/aws4_request" % (stamp[:8], region, service)
    to_sign = "AWS4-HMAC-SHA256\n%s\n%s\n%s" % (
        stamp, scope, hashlib.sha256(canonical.encode()).hexdigest())
    key = ("AWS4" + secret).encode()
    for part in (stamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = [("x-amz-date", stamp)] + ([("x-amz-security-token", token)] if token else [])
    return out + [("authorization", "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, "
                   "Signature=%s" % (access, scope, names, signature))]


def sigv4_canonical(method, parts, signed, body):
    """SigV4's canonical request: `parts` a urlsplit() URL, `signed` the sorted
    (lower-case name, trimmed value) pairs."""
    return "\n".join([method, urllib.parse.quote(parts.path or "/", safe="/~"),
                      _canonical_query(parts.query), "".join("%s:%s\n" % kv for kv in signed),
                      ";".join(n for n, _ in signed), hashlib.sha256(body or b"").hexdigest()])


def _canonical_query(query):
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return "&".join("%s=%s" % (urllib.parse.quote(k, safe=AWS_UNRESERVED),
                               urllib.parse.quote(v, safe=AWS_UNRESERVED))
                    for k, v in sorted(pairs))


class EventStreamError(UpstreamReplyError):
    """A frame of AWS's event stream that does not check out, or an exception frame."""


class EventStreamParser:
    """AWS's binary event stream (application/vnd.amazon.eventstream) -> frames, as
    bytes arrive, cut anywhere: each frame is a 12-byte prelude (total length, headers
    length, the prelude's CRC-32), headers, the payload and the message's CRC-32.
    feed() returns [(headers dict, payload bytes), …]; a CRC that does not match is an
    EventStreamError, never a frame passed on."""

    def __init__(self, limit=DEFAULT_MAX_EVENT_BYTES):
        self.buffer, self.limit = b"", limit

    def feed(self, data):
        self.buffer += data
        frames = []
        while len(self.buffer) >= 12:
            total, head_len, crc = struct.unpack(">III", self.buffer[:12])
            if zlib.crc32(self.buffer[:8]) != crc:
                raise EventStreamError("api_error", "upstream event stream: the prelude's "
                                       "CRC does not match")
            if total > self.limit or total < 16 or head_len > total - 16:
                raise EventStreamError("api_error", "upstream event stream: a frame of "
                                       "%d bytes (max_event_bytes)" % total)
            if len(self.buffer) < total:
                break
            frame, self.buffer = self.buffer[:total], self.buffer[total:]
            if zlib.crc32(frame[:-4]) != struct.unpack(">I", frame[-4:])[0]:
                raise EventStreamError("api_error", "upstream event stream: a frame's CRC "
                                       "does not match")
            frames.append((_eventstream_headers(frame[12:12 + head_len]),
                           frame[12 + head_len:-4]))
        return frames


#: Header value types of AWS's event stream: type -> (size, or None for 2-byte length).
_EVENTSTREAM_TYPES = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 6: None, 7: None, 8: 8, 9: 16}


def _eventstream_headers(data):
    """The headers of one frame: strings (type 7) decoded, the rest as raw bytes."""
    out, i = {}, 0
    while i < len(data):
        name_len = data[i]
        name = data[i + 1:i + 1 + name_len].decode("utf-8", "replace")
        kind = data[i + 1 + name_len]
        i += 2 + name_len
        size = _EVENTSTREAM_TYPES.get(kind, -1)
        if size == -1:
            raise EventStreamError("api_error", "upstream event stream: header type %d" % kind)
        if size is None:
            size, i = struct.unpack(">H", data[i:i + 2])[0], i + 2
        value = data[i:i + size]
        out[name] = value.decode("utf-8", "replace") if kind == 7 else value
        i += size
    return out


def bedrock_event(headers, payload, rename=""):
    """One event-stream frame of Bedrock's invoke-with-response-stream -> the
    Anthropic SSE frame it carries (a base64 JSON chunk), with message_start's model
    renamed.  An exception frame is an EventStreamError that says what Bedrock said
    (throttling becomes overloaded_error, which Claude Code retries)."""
    if headers.get(":message-type") == "exception" or headers.get(":message-type") == "error":
        kind = headers.get(":exception-type") or headers.get(":error-code") or "error"
        message = upstream_message(payload) or kind
        etype = "overloaded_error" if re.search(r"(?i)throttl|unavailable|overload",
                                                kind) else "api_error"
        raise EventStreamError(etype, "bedrock %s: %s" % (kind, message))
    doc = _loads(payload)
    chunk = base64.b64decode(doc.get("bytes", "")) if isinstance(doc, dict) else b""
    event = _loads(chunk) if chunk else None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return b""
    if rename and event["type"] == "message_start" and isinstance(event.get("message"), dict):
        event["message"]["model"] = rename
    return sse_event(event["type"], event)


# ---- Probes, check and env: the pure parts -------------------------------------------

def probe_request(provider):
    """(url, headers) of a light call that spends no tokens (the provider's model list),
    as its dialect makes it; None where there is nothing to ask with (an Anthropic
    route without its own key: clients bring theirs)."""
    return dialect_of(provider).probe(provider)


def listed_models(body):
    """Model ids in a model-list reply (OpenAI, Anthropic and Ollama shapes)."""
    doc = _loads(body)
    entries = (doc.get("data") or doc.get("models") or []) if isinstance(doc, dict) else []
    ids = [e.get("id") or e.get("name") for e in entries if isinstance(e, dict)]
    return [i for i in ids if isinstance(i, str)]


def configured_models(config, provider):
    """The upstream model names a provider will be asked for."""
    names = [provider.model, provider.big_model, provider.small_model]
    names += [r.model for r in config.routes if r.provider == provider.name]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def ollama_context(show_body):
    """The num_ctx an Ollama model is served with, from /api/show, or None."""
    doc = _loads(show_body)
    params = doc.get("parameters") if isinstance(doc, dict) else None
    match = re.search(r"(?m)^num_ctx\s+(\d+)", params) if isinstance(params, str) else None
    return int(match.group(1)) if match else None


#: Claude Code's system prompt and tools alone are 12-20K tokens.
MIN_CONTEXT = 16384


def forwards_client_key(config):
    """True when the default route forwards each client's own Anthropic credentials."""
    provider = plan_route(config, "")[0][0]
    return dialect_of(provider).forwards_client_key and not provider.api_key and not (
        config.api_key)


#: What `ccproxy init --provider TYPE` writes for each type beside its name and type:
#: the fields it needs, its key named by a variable (never the key itself), and a model
#: to start from.  examples/TYPE.json holds the same (test_examples_are_init_output).
STARTER_FIELDS = {
    "anthropic": {},
    "openai": {"api_key_env": "OPENAI_API_KEY", "model": "gpt-5"},
    "azure": {"base_url": "https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT",
              "api_version": "2024-10-21", "api_key_env": "AZURE_OPENAI_API_KEY"},
    "groq": {"api_key_env": "GROQ_API_KEY", "model": "moonshotai/kimi-k2-instruct"},
    "openrouter": {"api_key_env": "OPENROUTER_API_KEY", "model": "anthropic/claude-sonnet-4.5"},
    "deepseek": {"api_key_env": "DEEPSEEK_API_KEY", "model": "deepseek-chat"},
    "gemini": {"api_key_env": "GEMINI_API_KEY", "model": "gemini-2.5-pro"},
    "ollama": {"model": "qwen3-coder:30b"},
    "openai-compatible": {"base_url": "http://127.0.0.1:8000/v1", "model": "my-model"},
    "openai-responses": {"api_key_env": "OPENAI_API_KEY", "model": "gpt-5-codex"},
    "azure-responses": {"base_url": "https://NAME.openai.azure.com/openai/v1",
                        "api_key_env": "AZURE_OPENAI_API_KEY", "model": "DEPLOYMENT"},
    "kimi": {"api_key_env": "MOONSHOT_API_KEY", "model": "kimi-k2.6"},
    "glm": {"api_key_env": "ZAI_API_KEY", "model": "glm-5.1"},
    "minimax": {"api_key_env": "MINIMAX_API_KEY", "model": "MiniMax-M2.7"},
    "dashscope": {"api_key_env": "DASHSCOPE_API_KEY", "model": "qwen3-coder-plus"},
    "deepseek-anthropic": {"api_key_env": "DEEPSEEK_API_KEY", "model": "deepseek-v4-pro"},
    "anthropic-compatible": {"base_url": "http://127.0.0.1:11434", "model": "qwen3-coder:30b",
                             "quirks": {"betas": "", "drop_fields": _VENDOR_DROPS}},
    "vertex": {"project": "my-project", "region": "us-east5",
               "token_command": ["gcloud", "auth", "print-access-token"],
               "model": "claude-sonnet-4-5@20250929"},
    "bedrock": {"region": "us-east-1", "model": "us.anthropic.claude-sonnet-4-5-20250929-v1:0"},
}
#: What to do after `init`, per type.
STARTER_NEXT = {
    "anthropic": "each client's own Anthropic key is forwarded; to keep one key on the "
                 "proxy instead, add \"api_key_env\": \"VARIABLE\"",
    "azure": "put your resource and deployment in base_url, then export "
             "AZURE_OPENAI_API_KEY=...",
    "azure-responses": "put your resource in base_url and your deployment in model, then "
                       "export AZURE_OPENAI_API_KEY=...",
    "ollama": "start Ollama with OLLAMA_CONTEXT_LENGTH=32768 or more",
    "openai-compatible": "put your server's URL in base_url and its model name in model "
                         "(vLLM, LM Studio, llama.cpp)",
    "anthropic-compatible": "put the server's Anthropic base URL (the part before "
                            "/v1/messages) in base_url; this one is Ollama's (0.14 or newer)",
    "vertex": "put your project and region in the file; on Google Cloud, drop "
              "token_command to use the metadata server",
    "bedrock": "AWS credentials as the AWS CLI finds them (AWS_PROFILE, ~/.aws, the "
               "instance's role), or export AWS_BEARER_TOKEN_BEDROCK=... for an API key",
}


def starter_config(ptype):
    """The JSON text `init` writes for a provider type."""
    entry = dict({"name": ptype, "type": ptype}, **STARTER_FIELDS[ptype])
    return json.dumps({"port": DEFAULT_PORT, "providers": [entry]}, indent=2) + "\n"


def starter_next(ptype):
    """What to do after `init` wrote a config for `ptype`."""
    fields = STARTER_FIELDS[ptype]
    return STARTER_NEXT.get(ptype) or "export %s=..." % fields["api_key_env"]


def runtime_facts(config, port=None):
    """What a client must know of a proxy run with `config`: where it listens, whether
    it wants a client key, whether it forwards each client's own Anthropic credentials,
    and whether any route is translated (the runtime record carries the same)."""
    provider, model = plan_route(config, "")[0]
    window, output, _ = route_limits(config, provider, model or provider.model)
    return {"host": config.host, "port": port or config.port,
            "client_key": bool(config.api_key),
            "forwards_client_key": forwards_client_key(config),
            "translated": any(dialect_of(p).translated for p in config.providers),
            "context_window": window if dialect_of(provider).translated else 0,
            "max_output": output if dialect_of(provider).translated else 0}


def env_lines(config, record=None):
    """The exports that point Claude Code at this proxy (`eval "$(ccproxy.py env)"`):
    for the running daemon its runtime record says, else for `config`.

    A key goes in ANTHROPIC_AUTH_TOKEN (sent as Authorization: Bearer), never in
    ANTHROPIC_API_KEY: given that, interactive Claude Code asks whether to use "a custom
    API key", and its default answer leaves it logged out (issue #18).  The shell's own
    ANTHROPIC_API_KEY is unset for the same reason, except where the proxy forwards
    the client's own credentials to Anthropic: there it is what is sent."""
    facts = record or runtime_facts(config)
    host = facts["host"] if facts["host"] not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = "[%s]" % host if ":" in host else host
    lines = ["export ANTHROPIC_BASE_URL=%s" % shlex.quote(
        "http://%s:%d" % (host, facts["port"]))]
    if facts["forwards_client_key"]:
        lines.append("# your own Anthropic credentials (ANTHROPIC_API_KEY, "
                     "ANTHROPIC_AUTH_TOKEN or /login) are forwarded to Anthropic")
    elif facts["client_key"] and not config.api_key:
        lines.append("# the proxy wants its client key: export ANTHROPIC_AUTH_TOKEN=<key>")
    else:
        # The proxy's own key, or a placeholder: the proxy holds the provider's key, and
        # Claude Code only needs some key to start.
        lines += ["export ANTHROPIC_AUTH_TOKEN=%s" % shlex.quote(config.api_key or "ccproxy"),
                  "unset ANTHROPIC_API_KEY"]
    lines.append("export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1")
    if facts["translated"]:
        # /model lists the Claude names the routes serve, from GET /v1/models (#21).
        lines += ["export ENABLE_TOOL_SEARCH=false",
                  "export CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1"]
    lines += window_lines(facts.get("context_window"))
    if facts.get("max_output"):
        lines.append("export CLAUDE_CODE_MAX_OUTPUT_TOKENS=%d" % facts["max_output"])
    return lines


#: The smallest auto-compact window Claude Code 2.1.332 takes: below it, it warns and
#: uses this (its "treats it as the 100k minimum").
MIN_COMPACT_WINDOW = 100000


def window_lines(window):
    """Claude Code assumes 1,000,000 tokens for Opus 5.5 and for names it does not know:
    it must compact in the window of the model that really answers (issue #21).  The
    auto-compact window covers Claude names, CLAUDE_CODE_MAX_CONTEXT_TOKENS the others
    (a PROVIDER,MODEL pick); below 100k the call past the window gets "prompt is too
    long" from ccproxy, and Claude Code compacts then."""
    if not window:
        return []
    lines = ["export CLAUDE_CODE_AUTO_COMPACT_WINDOW=%d" % max(window, MIN_COMPACT_WINDOW),
             "export CLAUDE_CODE_MAX_CONTEXT_TOKENS=%d" % window]
    if window < MIN_COMPACT_WINDOW:
        lines.insert(0, "# the window is %d tokens; Claude Code compacts at 100k at the "
                        "earliest, and ccproxy says \"prompt is too long\" past the window"
                     % window)
    return lines


# ---- Registries ----------------------------------------------------------------------

def plain_error(status):
    """An upstream attempt's failure in plain words, for /status and the status page."""
    words = {"connect": "could not connect", "timeout": "timed out",
             "reset": "the connection was cut", "misdirected": "answered with a page that "
             "is no API reply (a proxy, a captive portal, a wrong base_url?)"}
    if isinstance(status, str):
        return words.get(status, status)
    if status == 429:
        return "rate limited (HTTP 429)"
    if status in (401, 403):
        return "refused the key (HTTP %d)" % status
    return "server error (HTTP %d)" % status if status >= 500 else "HTTP %d" % status


class ProviderStats:
    """Per-provider health from real traffic and probes, behind one lock.

    A provider that fails CIRCUIT_THRESHOLD times in a row (connection errors,
    timeouts, 5xx) opens its circuit: the fallback order skips it for CIRCUIT_COOLDOWN
    seconds, then lets one trial call through; a success (or a probe) closes it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._stats = {}

    def record(self, name, status, latency, headers=None, probe=False):
        """Record one upstream attempt (or probe): an HTTP status, or "connect",
        "timeout", "reset"."""
        now, headers = time.time(), headers or {}
        word = self._status_word(status)
        with self._lock:
            s = self._stats.setdefault(name, {"requests": 0, "errors": 0, "failures": 0})
            if not probe:
                s["requests"] += 1
                s["errors"] += word != "connected"
            s.update(last_check=now, response_time_ms=int(latency * 1000), status=word)
            if word != "connected":
                s.update(last_error=plain_error(status), last_error_at=now)
            self._circuit(s, word, now)
            if status == 429:
                s["rate_limited_until"] = now + int(retry_after_seconds(headers) or "30")
            remaining = headers.get("anthropic-ratelimit-requests-remaining") or headers.get(
                "x-ratelimit-remaining-requests")
            if remaining and remaining.isdigit():
                s["rate_limit_remaining"] = int(remaining)

    @staticmethod
    def _circuit(s, word, now):
        if word == "disconnected":
            s["failures"] += 1
            if s["failures"] >= CIRCUIT_THRESHOLD:
                s["circuit_open_until"] = now + CIRCUIT_COOLDOWN
        else:
            s["failures"], s["circuit_open_until"] = 0, 0

    def record_tokens(self, name, output_tokens, seconds):
        """Output tokens per second of the last call that reported them."""
        if output_tokens and seconds > 0:
            with self._lock:
                s = self._stats.setdefault(name, {"requests": 0, "errors": 0, "failures": 0})
                s["tokens_per_second"] = round(output_tokens / seconds, 1)

    def available(self, name, now=None):
        """False while the provider's circuit is open."""
        with self._lock:
            until = self._stats.get(name, {}).get("circuit_open_until", 0)
        return until <= (now or time.time())

    @staticmethod
    def _status_word(status):
        if status == 429:
            return "rate_limited"
        if status in (401, 403):
            return "auth_failed"
        if isinstance(status, str) or status >= 500:
            return "disconnected"
        return "connected"

    def snapshot(self):
        with self._lock:
            return {k: dict(v) for k, v in self._stats.items()}


class Histogram:
    """Counts per bucket (not cumulative: render makes them so), sum and count."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value):
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def state(self):
        return list(self.counts), round(self.sum, 6), self.count


def _histogram(histograms, label, buckets):
    """histograms[label], made on first use (not a new Histogram per call to setdefault)."""
    found = histograms.get(label)
    if found is None:
        found = histograms[label] = Histogram(buckets)
    return found


class Metrics:
    """The counters and histograms behind /metrics.  Labels come from fixed sets
    (endpoint names, status codes, configured provider names): never a key, a client
    address or a raw path."""

    MODEL_LABELS = 64        # distinct model labels of the key families; then "other"

    def __init__(self):
        self._lock = threading.Lock()
        self.requests, self.upstream, self.tokens, self.routed = {}, {}, {}, {}
        self.key_tokens, self.key_cost, self.models = {}, {}, set()
        self.duration, self.ttfb, self.latency = {}, {}, {}
        self.minutes, self._pruned = {}, 0       # (provider, minute, kind) -> count

    def observe_route(self, rule, reason):
        """A call the routes sent somewhere (labels from the configured route names)."""
        with self._lock:
            self.routed[(rule, reason)] = self.routed.get((rule, reason), 0) + 1

    def observe_request(self, route, code, seconds, ttfb=None, provider=None):
        with self._lock:
            key = (code, route)
            self.requests[key] = self.requests.get(key, 0) + 1
            _histogram(self.duration, route, DURATION_BUCKETS).observe(seconds)
            if ttfb is not None and provider:
                _histogram(self.ttfb, provider, TTFB_BUCKETS).observe(ttfb)

    def observe_upstream(self, provider, status, latency=None):
        """One upstream attempt: its outcome, its latency (the status page's p50 and
        p95) and its minute (the page's last hour, MINUTES minutes kept)."""
        outcome = upstream_outcome(status)
        key, minute = (provider, outcome), int(time.time() // 60)
        with self._lock:
            self.upstream[key] = self.upstream.get(key, 0) + 1
            if latency is not None:
                _histogram(self.latency, provider, DURATION_BUCKETS).observe(latency)
            for kind in ("calls", "errors") if outcome != "ok" else ("calls",):
                self.minutes[(provider, minute, kind)] = self.minutes.get(
                    (provider, minute, kind), 0) + 1
            if minute != self._pruned:
                self._pruned = minute
                self.minutes = {k: n for k, n in self.minutes.items()
                                if k[1] > minute - MINUTES}

    def add_tokens(self, provider, input_tokens, output_tokens):
        with self._lock:
            for direction, n in (("input", input_tokens), ("output", output_tokens)):
                if isinstance(n, int) and n > 0:
                    key = (provider, direction)
                    self.tokens[key] = self.tokens.get(key, 0) + n

    def add_key_usage(self, key, model, tokens, cost):
        """A call's tokens and estimated cost on its client key's name and model (the
        names come from the config; models are capped at MODEL_LABELS, then "other")."""
        with self._lock:
            if model not in self.models and len(self.models) >= self.MODEL_LABELS:
                model = "other"
            self.models.add(model)
            for kind, n in zip(("input", "output", "cache_read", "cache_write"), tokens):
                if n:
                    self.key_tokens[(key, model, kind)] = self.key_tokens.get(
                        (key, model, kind), 0) + n
            self.key_cost[(key, model)] = self.key_cost.get((key, model), 0.0) + cost

    def snapshot(self):
        with self._lock:
            return {"requests": dict(self.requests), "upstream": dict(self.upstream),
                    "tokens": dict(self.tokens), "routed": dict(self.routed),
                    "key_tokens": dict(self.key_tokens), "key_cost": dict(self.key_cost),
                    "duration": {k: h.state() for k, h in self.duration.items()},
                    "ttfb": {k: h.state() for k, h in self.ttfb.items()},
                    "latency": {k: h.state() for k, h in self.latency.items()},
                    "minutes": dict(self.minutes)}


class Calibration:
    """Per-route ratio of real prompt_tokens to our estimate (docs/translation.md §5):
    r <- 0.8 r + 0.2 P/E, clamped to [0.5, 2]; estimates are multiplied by r."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ratio = {}

    def ratio(self, route):
        with self._lock:
            return self._ratio.get(route, 1.0)

    def scale(self, route, estimate):
        return max(1, int(estimate * self.ratio(route) + 0.5))

    def learn(self, route, estimate, prompt_tokens):
        if estimate <= 0 or not isinstance(prompt_tokens, int) or prompt_tokens <= 0:
            return
        with self._lock:
            r = 0.8 * self._ratio.get(route, 1.0) + 0.2 * prompt_tokens / estimate
            self._ratio[route] = min(2.0, max(0.5, r))


class Windows:
    """Context windows the providers' own servers gave (a model list, a limit error),
    per provider and model (docs/translation.md §1.9)."""

    def __init__(self):
        self._lock, self._learned = threading.Lock(), {}

    def learn(self, provider, model, window):
        if isinstance(window, int) and window >= 1024 and model:
            with self._lock:
                self._learned[(provider, model)] = window

    def learned(self, provider, model):
        with self._lock:
            return self._learned.get((provider, model), 0)

    def limits(self, config, provider, model):
        """(window, output limit, source) of `model` on `provider`: route_limits."""
        return route_limits(config, provider, model, self.learned(provider.name, model))

    def into(self, stats, config):
        """`stats` (ProviderStats.snapshot) with each provider's learned window for its
        model, so that /status shows it and workers share it (a newest-wins field)."""
        for provider in config.providers:
            window = self.learned(provider.name, provider.model)
            if window:
                stats.setdefault(provider.name, {})["learned_window"] = window
        return stats


class ThoughtSignatures:
    """tool_use id -> Gemini thought_signature, bounded LRU (Gemini 3 answers 400
    "Function call is missing a thought_signature" when history calls lack it)."""

    def __init__(self, size=10000):
        self._lock, self._map, self.size = threading.Lock(), collections.OrderedDict(), size

    def put(self, tool_id, sig):
        with self._lock:
            self._map[tool_id] = sig
            self._map.move_to_end(tool_id)
            while len(self._map) > self.size:
                self._map.popitem(last=False)

    def get(self, tool_id):
        with self._lock:
            return self._map.get(tool_id)


class ToolsCache:
    """The PreparedTools of the last few distinct tool sets (a session's main agent,
    its subagents), found again by equality with the client's list.  (Equality holds
    between 1, 1.0 and true inside a schema; a client that swaps one for the other in
    mid-session gets the form it sent first.  Nothing else can differ.)"""

    def __init__(self, size=8):
        self._lock, self._map, self.size = threading.Lock(), collections.OrderedDict(), size

    def get(self, tools, quirks):
        if not isinstance(tools, list) or not tools:
            return prepare_tools(tools, quirks)
        key = (quirks["schema_dialect"], tuple(  # hashable, whatever the client sent
            t.get("name") if isinstance(t, dict) and isinstance(t.get("name"), str)
            else None for t in tools))
        with self._lock:
            hit = self._map.get(key)
            if hit is not None:
                self._map.move_to_end(key)
        if hit is not None and hit.source == tools:
            return hit
        prepared = prepare_tools(tools, quirks)
        with self._lock:
            self._map[key] = prepared
            self._map.move_to_end(key)
            while len(self._map) > self.size:
                self._map.popitem(last=False)
        return prepared


class MemberCache:
    """The values of REPEATED_MEMBERS seen last, found again by their text: a member
    whose text is one seen before is not parsed again (a JSON array, object or string
    ends where its text does, so the same text is the same value).  The values are
    shared between requests and threads: nothing may change them (as with
    PreparedTools.source).  For Claude Code's 50 KB body: 84 -> 31 us."""

    def __init__(self, size=4, min_chars=1024):
        self._lock, self._seen = threading.Lock(), {}   # key -> ((text, value), ...)
        self.size, self.min_chars = size, min_chars

    def parse(self, raw):
        """scan_json_object with this cache: a dict, or None (see there)."""
        return scan_json_object(raw, self.member)

    def member(self, key, text, i):
        """(value, end) of the member value that starts at text[i]."""
        for source, value in self._seen.get(key, ()):
            if text.startswith(source, i):
                return value, i + len(source)
        value, end = _JSON_DECODER.raw_decode(text, i)
        if end - i >= self.min_chars and isinstance(value, (list, dict, str)):
            with self._lock:
                kept = self._seen.get(key, ())[:self.size - 1]
                self._seen[key] = ((text[i:end], value),) + kept
        return value, end


# ---- Usage: prices, the ledger and client keys (docs/operating.md §10) ----------------

PRICES_TAKEN = "2026-12-07"
#: USD per million tokens: (input, output, cache read, cache write), first match wins, on
#: the model name lower-cased with dots as dashes.  Claude: Claude Code 2.1.332's own
#: model catalog; the others: their providers' price pages as known on PRICES_TAKEN.
#: Estimates: the config's `prices` and a provider's `price` override them.
PRICES = (
    (r"claude-opus-5-5", (4, 20, 0.2, 5)), (r"claude-opus-(4-[5-9]|5)", (5, 25, 0.5, 6.25)),
    (r"claude-(3-)?opus", (15, 75, 1.5, 18.75)),
    (r"claude-sonnet-5-5", (2, 10, 0.1, 2.5)), (r"claude-sonnet-5", (2, 10, 0.2, 2.5)),
    (r"claude-(3-[57]-)?sonnet", (3, 15, 0.3, 3.75)),
    (r"claude-haiku-5-5", (0.1, 0.5, 0.01, 0.125)), (r"claude-haiku-4-5", (1, 5, 0.1, 1.25)),
    (r"claude-3-5-haiku", (0.8, 4, 0.08, 1)),
    (r"claude-(fable|mythos)-5-2", (8, 40, 0.2, 10)),
    (r"claude-(fable-5-1|mythos-5)", (10, 50, 0.25, 12.5)), (r"claude-fable", (10, 50, 1, 12.5)),
    (r"gpt-5[-0-9]*-nano", (0.05, 0.4, 0.005, 0.05)),
    (r"gpt-5[-0-9]*-mini", (0.25, 2, 0.025, 0.25)), (r"gpt-5", (1.25, 10, 0.125, 1.25)),
    (r"gpt-4-1-mini", (0.4, 1.6, 0.1, 0.4)), (r"gpt-4-1", (2, 8, 0.5, 2)),
    (r"gpt-4o-mini", (0.15, 0.6, 0.075, 0.15)), (r"gpt-4o", (2.5, 10, 1.25, 2.5)),
    (r"(^|/)o3-pro", (20, 80, 20, 20)), (r"(^|/)o4-mini", (1.1, 4.4, 0.275, 1.1)),
    (r"(^|/)o3", (2, 8, 0.5, 2)), (r"codex-mini", (1.5, 6, 0.375, 1.5)),
    (r"deepseek", (0.28, 0.42, 0.028, 0.28)),
    (r"gemini-3-pro", (2, 12, 0.2, 2)), (r"gemini-2-5-pro", (1.25, 10, 0.125, 1.25)),
    (r"gemini-2-5-flash", (0.3, 2.5, 0.03, 0.3)),
    (r"kimi-k2", (0.6, 2.5, 0.15, 0.6)), (r"glm-4", (0.6, 2.2, 0.11, 0.6)),
)


def price_of(config, provider, model):
    """(input, output, cache read, cache write) USD per million tokens of `model` on
    `provider` (a ProviderConfig or None): the provider's price, the config's prices,
    the built-in table, else nothing known (0)."""
    if provider is not None and provider.price:
        return provider.price
    name = (model or "").lower()
    found = next((price for pattern, price in config.prices
                  if fnmatch.fnmatchcase(name, pattern)), None)
    return found or table_price(name)


@functools.lru_cache(maxsize=256)
def table_price(name):
    """The built-in price of a lower-cased model name (cached: a call's accounting
    must not scan thirty patterns each time)."""
    name = name.replace(".", "-")
    return next((p for pattern, p in PRICES if re.search(pattern, name)), (0, 0, 0, 0))


def call_cost(price, tokens):
    """USD of one call: `tokens` are (input, output, cache read, cache write)."""
    return sum((n or 0) * p for n, p in zip(tokens, price)) / 1e6


def ledger_row(config, record, now):
    """The ledger row of one call's AccessRecord: its usage split and estimated cost."""
    tokens = record.usage or (record.input_tokens or 0, record.output_tokens or 0, 0, 0)
    model = record.upstream_model or record.model or ""
    provider = next((p for p in config.providers if p.name == record.provider), None)
    ttfb = record.ttfb_ms if record.ttfb_ms is not None else (
        int(record.stream_ttfb * 1000) if record.stream_ttfb is not None else None)
    return (now, os.getpid(), record.session or "", record.key or "", record.rule or "",
            record.reason or "", record.provider, record.model or "", model) + tuple(
        tokens) + (str(record.status), ttfb, record.latency_ms,
                   round(call_cost(price_of(config, provider, model), tokens), 8))


#: One ledger row, in this order (never a prompt, a completion or a key).
LEDGER_COLUMNS = ("ts", "pid", "session", "key", "route", "reason", "provider", "model",
                  "upstream_model", "input_tokens", "output_tokens", "cache_read_tokens",
                  "cache_write_tokens", "status", "ttfb_ms", "duration_ms", "cost_usd")
LEDGER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS calls (ts REAL NOT NULL, pid INTEGER, session TEXT, "
    "key TEXT, route TEXT, reason TEXT, provider TEXT, model TEXT, upstream_model TEXT, "
    "input_tokens INTEGER, output_tokens INTEGER, cache_read_tokens INTEGER, "
    "cache_write_tokens INTEGER, status TEXT, ttfb_ms INTEGER, duration_ms INTEGER, "
    "cost_usd REAL);"
    "CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts);")
LEDGER_INSERT = "INSERT INTO calls (%s) VALUES (%s)" % (
    ", ".join(LEDGER_COLUMNS), ", ".join("?" * len(LEDGER_COLUMNS)))
LEDGER_QUEUE = 20000         # rows waiting for the writer; past it they are dropped
LEDGER_BATCH = 500           # rows per transaction at most
LEDGER_GATHER = 0.5          # seconds rows gather after the first before they are written:
                             # one transaction a row cost 0.2 ms of CPU a call (make ab)
LEDGER_BUSY = 1.0            # seconds a write waits for another writer's lock
LEDGER_CHORES = 60.0         # seconds between pruning and re-counting


def _wal(conn):
    """PRAGMA journal_mode=WAL, tried again while another connection holds the lock it
    needs: SQLite answers "database is locked" at once there, without waiting out the
    busy timeout, and workers opening a fresh ledger together hit it (1 open in 40 did,
    measured; each lost its worker's rows until the next open, 10 s later)."""
    deadline = time.monotonic() + LEDGER_BUSY
    while True:
        try:
            return conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Ledger:
    """The usage ledger (issue #24): one SQLite row per call that reached an upstream,
    written by one thread in batches, never in a request's path.  A row that cannot be
    written (the queue full; the database locked, read-only, full or broken) is counted
    as dropped, and serving goes on.  Every worker writes the same file (WAL mode)."""

    def __init__(self, path, retention_days, limits=None):
        self.path, self.retention, self.limits = path, retention_days, limits
        self.queue = queue.Queue(LEDGER_QUEUE)
        self._lock, self._stop, self._thread, self.conn = threading.Lock(), False, None, None
        self.offered = self.written = self.dropped = self.rows = self.size = 0
        self.error, self._warned, self._last_open = "", 0.0, 0.0

    def start(self):
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self._thread.start()
        return self

    def record(self, row):
        with self._lock:
            self.offered += 1
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            self._drop(1, "the write queue is full")

    def settled(self):
        """Whether every row offered so far was written or dropped."""
        with self._lock:
            return self.written + self.dropped >= self.offered

    def close(self, timeout=5.0):
        """Write what is queued (within `timeout`), then stop."""
        self._stop = True
        if self._thread:
            self._thread.join(timeout)

    def state(self):
        with self._lock:
            return {"enabled": True, "path": self.path, "rows": self.rows,
                    "size_bytes": self.size, "written": self.written,
                    "dropped": self.dropped, "error": self.error or None}

    # -- the writer thread ------------------------------------------------------

    def _run(self):
        chores = 0.0
        self._open()                       # the file exists from the start
        while not (self._stop and self.queue.empty()):
            batch = self._take()
            if self.conn is None and time.monotonic() - self._last_open > 10.0:
                self._open()
            if batch:
                self._write(batch)
            elif self.conn is not None and self.limits is not None and self.limits.active:
                self.limits.refresh(self.conn, [])
            if self.conn is not None and time.monotonic() - chores > LEDGER_CHORES:
                chores = time.monotonic()
                self._chores()
        if self.conn is not None:
            self.conn.close()

    def _take(self):
        """Up to LEDGER_BATCH rows: the first waited for (a second at most), then what
        comes within LEDGER_GATHER (nothing more once stopping)."""
        try:
            batch = [self.queue.get(timeout=0.2 if self._stop else 1.0)]
        except queue.Empty:
            return []
        until = time.monotonic() + (0.0 if self._stop else LEDGER_GATHER)
        while len(batch) < LEDGER_BATCH:
            try:
                batch.append(self.queue.get(timeout=max(0.0, until - time.monotonic()))
                             if time.monotonic() < until else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _open(self):
        self._last_open, conn = time.monotonic(), None
        try:
            os.makedirs(os.path.dirname(self.path) or ".", 0o700, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            conn = sqlite3.connect(self.path, timeout=LEDGER_BUSY, isolation_level=None,
                                   check_same_thread=False)
            _wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(LEDGER_SCHEMA)
            self.conn = conn
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()              # a half-opened connection is not kept open
            self._failed("cannot open %s: %s" % (self.path, exc))

    def _write(self, batch):
        if self.conn is None:
            return self._drop(len(batch), self.error or "no database")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(LEDGER_INSERT, batch)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            return self._drop(len(batch), "cannot write %s: %s" % (self.path, exc))
        with self._lock:
            self.written += len(batch)
            self.rows += len(batch)           # recounted exactly by _chores
            self.error = ""
        if self.limits is not None and self.limits.active:
            self.limits.refresh(self.conn, batch)

    def _rollback(self):
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass                          # no transaction was open

    def _drop(self, n, why):
        with self._lock:
            self.dropped += n
        self._failed(why)

    def _failed(self, why):
        """Note why rows are lost; say it in the log once a minute at most."""
        now = time.monotonic()
        with self._lock:
            self.error = why
            loud = now - self._warned > 60.0
            if loud:
                self._warned = now
        if loud:
            log.warning("usage ledger: %s; rows are dropped until it works again", why)

    def _chores(self):
        """Prune rows past the retention; count the rows and the bytes on disk."""
        try:
            self.conn.execute("DELETE FROM calls WHERE ts < ?",
                              (time.time() - self.retention * 86400.0,))
            rows = self.conn.execute("SELECT count(*) FROM calls").fetchone()[0]
        except sqlite3.Error as exc:
            return self._failed("cannot prune %s: %s" % (self.path, exc))
        size = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal")
                   if os.path.exists(p))
        with self._lock:
            self.rows, self.size = rows, size


def month_start(now=None):
    """The epoch seconds at which the current month (UTC) began."""
    t = time.gmtime(time.time() if now is None else now)
    return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))


def next_month(now=None):
    """The epoch seconds at which the next month (UTC) begins."""
    t = time.gmtime(time.time() if now is None else now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


class KeyLimits:
    """Each client key's calls in the last minute and spend this month, against its
    limits (issue #24).  This process counts its own calls at once; the ledger's writer
    adds what the other workers of the host wrote (refresh), so limits hold across
    `--workers N`.  Without a ledger, the counts are this process's since it started."""

    def __init__(self):
        self._lock = threading.Lock()
        self.active = False         # some key has a limit: the ledger's writer refreshes
        self.recent = {}            # name -> deque of this process's admission times
        self.pending = {}           # name -> USD of rows not yet in the ledger
        self.month = {}             # name -> USD this month in the ledger (every worker)
        self.others = {}            # name -> other workers' calls in the last minute
        self.since, self.last_rowid = month_start(), 0

    def admit(self, key, now=None):
        """Count a call of `key` (a ClientKey) or refuse it: HTTPError 429 naming the
        limit, with retry-after."""
        now = time.time() if now is None else now
        with self._lock:
            self._roll(now)
            recent = self.recent.setdefault(key.name, collections.deque())
            while recent and recent[0] <= now - 60.0:
                recent.popleft()
            calls = len(recent) + self.others.get(key.name, 0)
            spent = self.month.get(key.name, 0.0) + self.pending.get(key.name, 0.0)
            if key.requests_per_minute and calls >= key.requests_per_minute:
                wait = int(recent[0] + 60.0 - now) + 1 if recent else 60
                raise limit_refused(key, "is over its rate of %d requests per minute"
                                    % key.requests_per_minute, wait)
            if key.monthly_budget_usd and spent >= key.monthly_budget_usd:
                raise limit_refused(key, "is over its monthly budget of %s (%s spent this "
                                    "month)" % (usd(key.monthly_budget_usd), usd(spent)),
                                    int(next_month(now) - now) + 1)
            recent.append(now)

    def spend(self, name, usd):
        with self._lock:
            self.pending[name] = self.pending.get(name, 0.0) + usd

    def spent(self, name):
        with self._lock:
            return self.month.get(name, 0.0) + self.pending.get(name, 0.0)

    def _roll(self, now):
        if now >= next_month(self.since):
            self.since, self.last_rowid = month_start(now), 0
            self.month, self.pending = {}, {}

    def refresh(self, conn, written):
        """In the ledger's writer, after `written` (this process's rows) went in: the
        month's spend from the ledger (only the rows since the last look), the other
        workers' calls of the last minute.  Errors leave the counts as they were."""
        key_at, cost_at = LEDGER_COLUMNS.index("key"), LEDGER_COLUMNS.index("cost_usd")
        try:
            rows = conn.execute(
                "SELECT key, COALESCE(SUM(cost_usd), 0), MAX(rowid) FROM calls WHERE "
                "rowid > ? AND ts >= ? GROUP BY key", (self.last_rowid, self.since)).fetchall()
            others = conn.execute(
                "SELECT key, COUNT(*) FROM calls WHERE ts > ? AND pid != ? GROUP BY key",
                (time.time() - 60.0, os.getpid())).fetchall()
        except sqlite3.Error:
            return
        with self._lock:
            for name, usd, top in rows:
                self.month[name] = self.month.get(name, 0.0) + usd
                self.last_rowid = max(self.last_rowid, top)
            for row in written:
                name = row[key_at]
                self.pending[name] = max(0.0, self.pending.get(name, 0.0) - row[cost_at])
            self.others = dict(others)


def usd(amount):
    """$50.00, or $0.0012 for amounts under a dollar."""
    return "$%.2f" % amount if amount >= 1 else "$%.4f" % amount


def has_limits(config):
    """Whether some client key has a rate or a budget (then the limits are kept)."""
    return any(k.requests_per_minute or k.monthly_budget_usd for k in config.client_keys)


def limit_refused(key, what, retry_after):
    """Anthropic's rate_limit_error for a key over one of its limits."""
    return HTTPError(429, "rate_limit_error", "ccproxy: client key %s %s" % (key.name, what),
                     (("retry-after", str(max(1, retry_after))),))


def route_names(config, route, reason):
    """The names a client key's `routes` may give for the route a call took: its name,
    its place (routes[N]), its scenario, "default" for the default route (or for no
    routes at all), "pick" for a PROVIDER,MODEL pick."""
    if route is None:
        return {"default"}
    if reason == "pick":
        return {"pick"}
    names = {route.name, route.when} - {""}
    if route in config.routes:
        names.add("routes[%d]" % config.routes.index(route))
    if route.match in ("", "default") and not route.when:
        names.add("default")
    return names


#: ccproxy usage --by: the column (an SQL expression) each grouping reads.
USAGE_GROUPS = {"day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
                "model": "COALESCE(NULLIF(upstream_model, ''), model)",
                "provider": "provider", "session": "session", "key": "key", "route": "route"}
USAGE_SUMS = ("requests", "input_tokens", "output_tokens", "cache_read_input_tokens",
              "cache_creation_input_tokens", "cost_usd")


def usage_report(path, since, by):
    """{"since", "by", "rows", "total"} of the ledger at `path` from `since` (epoch
    seconds), grouped `by` one of USAGE_GROUPS; read-only, so it works while the daemon
    runs or is stopped.  UsageError when there is no ledger to read."""
    if sqlite3 is None:
        raise UsageError("this Python has no sqlite3 module: there is no usage ledger")
    if not path or not os.path.exists(path):
        raise UsageError("no usage recorded yet: %s does not exist" % (
            path or "no usage_db is set"))
    sql = ("SELECT %s AS grp, COUNT(*), SUM(input_tokens), SUM(output_tokens), "
           "SUM(cache_read_tokens), SUM(cache_write_tokens), SUM(cost_usd) FROM calls "
           "WHERE ts >= ? GROUP BY grp" % USAGE_GROUPS[by])
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path), uri=True,
                               timeout=5.0)
        try:
            found = conn.execute(sql, (since,)).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise UsageError("cannot read %s: %s" % (path, exc)) from None
    rows = [dict(zip(("group",) + USAGE_SUMS, (r[0] or "-",) + tuple(n or 0 for n in r[1:6])
                     + (round(r[6] or 0.0, 6),))) for r in found]
    rows.sort(key=lambda r: r["group"] if by == "day" else (-r["cost_usd"], -r["requests"]))
    total = {k: sum(r[k] for r in rows) for k in USAGE_SUMS}
    total["cost_usd"] = round(total["cost_usd"], 6)
    return {"since": iso_time(since), "by": by, "rows": rows, "total": total}


def usage_answer(path, query):
    """GET /usage: the report for ?since= (default 30d) and ?by= (default day);
    HTTPError 400 for a bad parameter, 404 while there is nothing to read."""
    args = urllib.parse.parse_qs(query or "")
    since, by = args.get("since", ["30d"])[-1], args.get("by", ["day"])[-1]
    try:
        start = parse_since(since)
    except ValueError:
        raise HTTPError(400, "invalid_request_error", "since: 7d, 12h, 30m or a date such "
                        "as 2026-12-01, got %s" % _shown(since)[:40]) from None
    if by not in USAGE_GROUPS:
        raise HTTPError(400, "invalid_request_error", "by: one of %s" % ", ".join(
            USAGE_GROUPS))
    try:
        return usage_report(path, start, by)
    except UsageError as exc:
        raise HTTPError(404, "not_found_error", str(exc)) from None


def parse_since(text, now=None):
    """--since 7d, 12h, 30m or a date (2026-12-01, UTC) -> epoch seconds; ValueError."""
    now = time.time() if now is None else now
    m = re.match(r"^(\d+)([dhm])$", text.strip())
    if m:
        return now - int(m.group(1)) * {"d": 86400, "h": 3600, "m": 60}[m.group(2)]
    return calendar.timegm(time.strptime(text.strip(), "%Y-%m-%d"))


# ---- Background threads and the workers' directory -----------------------------------

class Deadlines:
    """Absolute deadlines for reading a request head and body.  The socket timeout is
    per recv, so one byte every few seconds would hold a thread forever (slowloris);
    one reaper thread shuts down the socket of any read past its deadline."""

    TICK = 0.1

    def __init__(self):
        self._lock, self._armed, self._thread = threading.Lock(), {}, None

    def arm(self, sock, seconds, what):
        if sock is None:
            return
        with self._lock:
            self._armed[id(sock)] = (sock, time.monotonic() + seconds, what)
            if self._thread is None:
                self._thread = threading.Thread(target=self._reap, name="deadlines",
                                                daemon=True)
                self._thread.start()

    def disarm(self, sock):
        with self._lock:
            self._armed.pop(id(sock), None)

    def _reap(self):
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                expired = [k for k, (_, deadline, _) in self._armed.items() if deadline <= now]
                expired = [self._armed.pop(k) for k in expired]
            for sock, _, what in expired:
                log.warning("closing a connection whose request %s did not arrive in time",
                            what)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Cluster:
    """The state directory one supervisor's workers share: each writes its report there
    every second; whichever answers /status, /metrics or /status/ready reads them all.
    A dead worker's report is kept (renamed dead-PID.json) so counters never go back."""

    def __init__(self, state_dir, worker_id, expected):
        self.dir, self.id, self.expected = state_dir, worker_id, expected

    def write(self, report):
        path = os.path.join(self.dir, "w%d.json" % self.id)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        try:
            with open(tmp, "w") as f:
                json.dump(report, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the worker report %s: %s", path, exc)

    def read(self):
        live, dead = [], []
        try:
            names = sorted(os.listdir(self.dir))
        except OSError:
            return live, dead
        for name in names:
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.dir, name)) as f:
                        (dead if name.startswith("dead-") else live).append(json.load(f))
                except (OSError, ValueError):
                    continue            # being replaced right now
        return live, dead



class Pinger:
    """SSE pings for translated streams whose upstream has gone quiet (docs/translation.md
    §3.4): reasoning models think for minutes before their first token, and proxies in
    between cut idle connections (nginx's default proxy_read_timeout is 60 s).  One
    thread for all streams.  A stream is an object with ping_if_idle(interval) and
    stop_pinging(), which serialise their writes with the stream's own (Exchange)."""

    def __init__(self):
        self._lock, self._streams, self._thread = threading.Lock(), set(), None

    def add(self, stream):
        with self._lock:
            self._streams.add(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pinger", daemon=True)
                self._thread.start()

    def remove(self, stream):
        with self._lock:
            self._streams.discard(stream)
        stream.stop_pinging()              # no ping is being written after this

    def _run(self):
        while True:
            time.sleep(min(1.0, PING_INTERVAL / 4, FIRST_EVENT_WAIT / 4))
            with self._lock:
                streams = list(self._streams)
            for stream in streams:
                stream.ping_if_idle(PING_INTERVAL)


# ---- Upstream client -----------------------------------------------------------------

class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, tunnel), shared by all threads."""

    def __init__(self, max_idle=POOL_MAX_IDLE, idle_seconds=POOL_IDLE_SECONDS):
        self._lock = threading.Lock()
        self._idle = {}
        self.max_idle, self.idle_seconds = max_idle, idle_seconds
        self.opened = 0                      # connections created (tests, benchmarks)
        self.closed = False

    def get(self, key):
        """An idle connection still usable for `key`, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn, since = idle.pop()
            if time.monotonic() - since < self.idle_seconds and _still_open(conn):
                return conn
            conn.close()

    def put(self, key, conn):
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self.closed and len(idle) < self.max_idle:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self):
        with self._lock:
            conns = [c for idle in self._idle.values() for c, _ in idle]
            self._idle.clear()
            self.closed = True      # a connection still in use closes when it comes back
        for conn in conns:
            conn.close()


def _still_open(conn):
    """An idle connection the server has not closed: readable now means EOF or junk.
    Checking before reuse spares most stale-connection retries (servers close idle
    keep-alive connections after their own timeout, nginx's is 75 s)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        return not readable_now(sock)
    except (OSError, ValueError):
        return False


def readable_now(sock):
    """True when `sock` has bytes, or its end, to read at once.  poll(), not select():
    select cannot watch a descriptor above 1023 (FD_SETSIZE), so past a thousand open
    streams every pooled connection failed its check and none was reused."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Resolver:
    """Upstream host addresses, looked up once per RESOLVE_SECONDS and shared by all
    threads; a numeric host is never looked up.

    Memory, not only latency: getaddrinfo() takes glibc 12 KB deep into a thread's
    stack, even for "127.0.0.1", and keeps resolver state per thread: 6 KB more for
    each thread that calls it, and a touched stack page stays with the thread for as
    long as its stream lasts.  A connect to a ready address costs 0.2 KB.
    """

    def __init__(self, seconds=RESOLVE_SECONDS, lookup=socket.getaddrinfo):
        self._lock = threading.Lock()
        self._cache = {}                 # (host, port) -> (expires, [(family, address)])
        self.seconds, self._lookup = seconds, lookup

    def addresses(self, host, port):
        """[(family, sockaddr)] for host:port, in getaddrinfo's order."""
        numeric = _numeric_address(host, port)
        if numeric:
            return numeric
        key, now = (host, port), time.monotonic()
        with self._lock:
            expires, found = self._cache.get(key, (0.0, None))
        if found and now < expires:
            return found
        found = [(info[0], info[4]) for info in
                 self._lookup(host, port, 0, socket.SOCK_STREAM)]
        with self._lock:
            self._cache[key] = (now + self.seconds, found)
        return found

    def forget(self, host, port):
        with self._lock:
            self._cache.pop((host, port), None)

    def connect(self, address, timeout, source_address=None):
        """socket.create_connection() over the cached addresses: each in turn, the
        first that answers wins.  When none does, the host is looked up afresh next
        time (it may have moved)."""
        host, port = address
        error = None
        for family, sockaddr in self.addresses(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if isinstance(timeout, (int, float)):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        self.forget(host, port)
        raise error or OSError("no address for %s" % host)


def _numeric_address(host, port):
    """[(family, sockaddr)] when `host` is an IPv4 or IPv6 literal, else None."""
    for family, sockaddr in ((socket.AF_INET, (host, port)),
                             (socket.AF_INET6, (host, port, 0, 0))):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return [(family, sockaddr)]
    return None


class KeepAliveHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib handler that reuses connections (urllib's own sends Connection: close).

    The response carries ._ccproxy_conn; UpstreamClient.release() puts the connection
    back once the body was read to the end, discard() closes it.
    """

    def __init__(self, pool, provider, resolver, contexts):
        # Not HTTPSHandler.__init__: since 3.12 it makes a TLS context of its own, and
        # https_open is ours.
        urllib.request.HTTPHandler.__init__(self)
        self.pool, self.resolver, self.contexts = pool, resolver, contexts
        self.connect_timeout, self.read_timeout = provider.connect_timeout, provider.read_timeout
        self.ca_bundle = provider.ca_bundle

    def http_open(self, req):
        """An idle connection to the host if there is one, else a new one.  (One
        method for both schemes: a frame less under the deepest point of every
        stream's thread, see _LeanResponse.begin.)"""
        key = (req.type, req.host, req._tunnel_host)
        headers = dict(req.unredirected_hdrs)
        headers.update((k, v) for k, v in req.headers.items() if k not in headers)
        conn = self.pool.get(key)
        if conn is not None:
            try:
                return self._exchange(conn, key, req, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()    # a stale keep-alive connection: the server never saw it
        return self._exchange(self._connect(req, headers), key, req, headers)

    https_open = http_open

    def _connect(self, req, headers):
        if req.type == "https":
            conn = http.client.HTTPSConnection(req.host, timeout=self.connect_timeout,
                                               context=self.contexts.get(self.ca_bundle))
        else:
            conn = http.client.HTTPConnection(req.host, timeout=self.connect_timeout)
        conn.response_class = _LeanResponse
        # http.client's hook for how it opens its socket (set in __init__ since 3.2).
        conn._create_connection = self.resolver.connect
        if req._tunnel_host:
            tunnel = {}
            if "Proxy-Authorization" in headers:
                tunnel["Proxy-Authorization"] = headers.pop("Proxy-Authorization")
            conn.set_tunnel(req._tunnel_host, headers=tunnel)
        try:
            conn.connect()
        except socket.timeout as exc:
            conn.close()
            raise UpstreamError("timeout", redact_url(req.full_url), "connect timed out") from exc
        except OSError as exc:
            conn.close()
            if exc.errno in LOCAL_SHORTAGE:
                # Ours, not the provider's: no descriptor or memory for a socket.  It
                # was reported as "upstream unreachable" and opened the circuit.
                log.error("cannot open a connection to %s: %s (raise LimitNOFILE / "
                          "ulimit -n)", redact_url(req.full_url), _os_error_text(exc))
                raise HTTPError(503, "overloaded_error", "ccproxy is out of resources "
                                "(%s); retry shortly" % _os_error_text(exc),
                                (("Retry-After", "1"),)) from exc
            raise UpstreamError("connect", redact_url(req.full_url),
                                _os_error_text(exc)) from exc
        self.pool.opened += 1
        return conn

    def _exchange(self, conn, key, req, headers):
        conn.sock.settimeout(self.read_timeout)
        try:
            conn.request(req.get_method(), req.selector, req.data, headers)
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            raise
        except (ValueError, UnicodeError, http.client.InvalidURL) as exc:
            # http.client refused what we would send (a header value, the URL): the
            # caller's request, not the provider, is at fault, and nothing was sent.
            # Counted as an upstream failure, it let any client open a healthy
            # provider's circuit (issue #17).
            conn.close()
            raise HTTPError(400, "invalid_request_error", "this request cannot be sent "
                            "upstream: %s" % str(exc)[:200]) from exc
        except socket.timeout as exc:
            conn.close()
            raise UpstreamError("timeout", redact_url(req.full_url),
                                "no response within %gs" % self.read_timeout) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise UpstreamError("reset", redact_url(req.full_url),
                                _os_error_text(exc)) from exc
        resp._ccproxy_conn, resp._ccproxy_pool_key = conn, key
        resp.msg = resp.reason        # what urllib's own do_open does
        return resp


#: Connect errors that are this host's shortage, not the provider's fault.
LOCAL_SHORTAGE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class _LeanResponse(http.client.HTTPResponse):
    """An upstream response that reads through a READ_BUFFER buffer instead of 8 KB
    (read1, which relays streams, reads past the buffer anyway), and parses its head
    without the email package."""

    class _Socket:
        def __init__(self, sock):
            self.sock = sock

        def makefile(self, mode):
            return self.sock.makefile(mode, READ_BUFFER)

    def __init__(self, sock, debuglevel=0, method=None, url=None):
        # Arguments spelt out: passing on *args, **kwargs is a call through C (CPython
        # 3.11), 240 bytes further down the thread's stack at the deepest point of a
        # stream's thread, which is then 7.9 KB; past 8 KB each open stream would keep
        # a third 4 KB stack page (see Handler.__init__).
        super().__init__(self._Socket(sock), debuglevel, method, url)

    def begin(self):
        """HTTPResponse.begin() (unchanged from 3.9 to 3.13) with read_head() for
        http.client.parse_headers(): the email package's parser took 22 us per head,
        and 1.3 KB of frame stack at the deepest point of every stream's thread."""
        if self.headers is not None:
            return
        version, status, reason = self._read_status()
        interim = 0
        while status < 200:
            # RFC 9110 §15.2: any number of interim (1xx) heads may precede the final
            # one, and each is read and dropped.  Taking a 103 Early Hints for the answer
            # left the real one on the wire, and the next client to borrow the pooled
            # connection read it (issue #17).  101 answers an Upgrade we never ask for.
            interim += 1
            if status == 101 or interim > MAX_INTERIM:
                raise http.client.HTTPException("upstream sent %s" % (
                    "101 Switching Protocols unasked" if status == 101
                    else "more than %d interim responses" % MAX_INTERIM))
            read_head(self.fp)
            version, status, reason = self._read_status()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.code = self.status = status
        self.reason = reason.strip()
        self.headers = self.msg = read_head(self.fp)
        self.chunked = (self.headers.get("transfer-encoding") or "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None if self.chunked else _content_length(self.headers)
        if status in (204, 304) or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True               # the body ends when the connection does


#: Field names already found to be tokens: Claude Code sends the same 21 with every call.
_TOKEN_NAMES = set()


def read_head(fp, strict=False):
    """The fields of an HTTP head read from `fp` up to its blank line, as the
    http.client.HTTPMessage that http.client.parse_headers() returns, with the same
    values (leading blanks and the line end stripped, folded lines kept: compat32).
    A line that is not a field (no colon, or a blank before it: RFC 9112 §5.1) is
    dropped, where the email package drops it and every field after it; `strict`
    (a request's head) raises ValueError for it, and for obs-fold (RFC 9112 §5.2)."""
    fields = []
    while True:
        line = fp.readline(MAX_HEAD_LINE + 1)
        if len(line) > MAX_HEAD_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            break
        if len(fields) >= MAX_HEAD_FIELDS:
            raise http.client.HTTPException("got more than %d headers" % MAX_HEAD_FIELDS)
        text = line.decode("iso-8859-1")
        if text[0] in " \t":
            if strict:
                raise ValueError("obsolete line folding in the request head")
            if fields:
                fields[-1][1] += text
            continue
        name, colon, value = text.partition(":")
        if colon and name and " " not in name and "\t" not in name:
            if strict:
                _check_field(name, value)
            fields.append([name, value.lstrip(" \t")])
        elif strict:      # the name alone: the rest of the line may hold a credential
            raise ValueError("malformed header line: %s" % (
                "a blank before the colon after %r" % name.strip()[:40] if colon
                else "no colon"))
    msg = http.client.HTTPMessage()
    for name, value in fields:
        msg.set_raw(name, value.rstrip("\r\n"))
    return msg


def _check_field(name, value):
    """A request's field as RFC 9110 §5 has it, refused (ValueError, naming the field
    only) as nginx refuses it: a name that is no token (X(y), X\\x0bz), a NUL or a bare
    CR in the value.  Such fields reached the upstream, or a 500 (issue #17)."""
    if name not in _TOKEN_NAMES:
        if not HEADER_NAME_RE.match(name):
            raise ValueError("invalid header name %r" % escape_log(name)[:40])
        if len(_TOKEN_NAMES) < 1024:
            _TOKEN_NAMES.add(name)
    if "\0" in value or "\r" in value.rstrip("\r\n"):
        raise ValueError("invalid character in the value of %s" % name[:40])


def _content_length(headers):
    """Content-Length as http.client reads it: None when absent, bad or negative."""
    try:
        length = int(headers.get("content-length") or "")
    except ValueError:
        return None
    return length if length >= 0 else None


def _os_error_text(exc):
    """A short reason for a socket error, without the traceback noise."""
    reason = getattr(exc, "reason", None) or exc.strerror if isinstance(exc, OSError) else None
    return str(reason or exc or type(exc).__name__)


class _NoRaise(urllib.request.HTTPErrorProcessor):
    """Hand every status back to the caller: errors are relayed, not raised."""

    def http_response(self, request, response):
        return response

    https_response = http_response


def tls_context(ca_bundle=""):
    """The system CA store, plus `ca_bundle` when given.  (create_default_context(cafile=)
    would load the bundle *instead of* the system store.)"""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


def check_tls_files(config):
    """Load every provider's ca_bundle now, so a bad one fails start-up (or a reload)
    with the key named, not the first request."""
    for index, provider in enumerate(config.providers):
        if provider.ca_bundle:
            try:
                tls_context(provider.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("providers[%d].ca_bundle: cannot load %s: %s" % (
                    index, provider.ca_bundle, getattr(exc, "strerror", None) or exc)) from exc
    return config


class TLSContexts:
    """One TLS context per CA bundle, made at the first HTTPS connection that needs it.
    A context loads the system CA store: 20 ms and 1.2 MB each.  Every provider had
    its own, made at its first request, and plain-HTTP ones (a local Ollama or vLLM)
    need none."""

    def __init__(self):
        self._lock = threading.Lock()
        self._contexts = {}

    def get(self, ca_bundle=""):
        with self._lock:
            context = self._contexts.get(ca_bundle)
            if context is None:
                context = self._contexts[ca_bundle] = tls_context(ca_bundle)
            return context

    def clear(self):
        with self._lock:
            self._contexts.clear()


class UpstreamClient:
    """One urllib opener per provider (its own timeouts and CA bundle), one pool; the
    resolver and the TLS contexts are shared by all providers (see Upstreams)."""

    def __init__(self, provider, pool, resolver=None, contexts=None):
        self.pool = pool
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(),      # HTTPS_PROXY / NO_PROXY as urllib does
            KeepAliveHandler(pool, provider, resolver or Resolver(),
                             contexts or TLSContexts()),
            _NoRaise())

    def open(self, method, url, body, headers):
        """Send one request; return the response once its head has arrived."""
        req = urllib.request.Request(url, data=body, method=method)
        for name, value in headers:
            req.add_header(name, value)
        try:
            return self.opener.open(req)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            raise UpstreamError("reset", redact_url(url), _os_error_text(exc)) from exc
        except urllib.error.URLError as exc:     # proxy errors and the like
            raise UpstreamError("connect", redact_url(url), str(exc.reason)) from exc

    def release(self, resp):
        """Return a fully read response's connection to the pool, else close it."""
        conn = resp._ccproxy_conn
        if resp.length == 0 and not resp.chunked:
            # A Content-Length body relayed with read1 (an event stream from nginx or a
            # cache): read1 marks the response closed only on EOF, never at its length.
            resp.close()
        if resp.isclosed() and not resp.will_close and conn.sock is not None:
            self.pool.put(resp._ccproxy_pool_key, conn)
        else:
            self.discard(resp)

    @staticmethod
    def discard(resp):
        """Close the upstream socket now: a client that left must not keep a generation
        running (and burning tokens) upstream."""
        resp.close()
        resp._ccproxy_conn.close()


def fetch(client, method, url, body=None, headers=()):
    """One small upstream call read to its end: (status or failure kind, seconds,
    headers, body).  For probes and `check`, never for the proxy path."""
    started = time.monotonic()
    try:
        resp = client.open(method, url, body, list(headers))
    except UpstreamError as exc:
        return exc.kind, time.monotonic() - started, {}, exc.detail.encode("utf-8", "replace")
    except HTTPError as exc:              # failed here: says nothing of the provider
        return "local", time.monotonic() - started, {}, exc.message.encode("utf-8", "replace")
    try:
        data = resp.read(1 << 22)
    except (OSError, http.client.HTTPException) as exc:
        client.discard(resp)
        return "reset", time.monotonic() - started, {}, str(exc).encode()
    client.release(resp)
    return resp.status, time.monotonic() - started, resp.headers, data


def server_windows(config, provider, client):
    """{model: window} a local server states beside its model list (§1.9): Ollama's
    num_ctx (/api/show), llama.cpp's n_ctx (/props)."""
    learn = WINDOW_PROBES.get(provider.type)
    return learn(config, provider, client, re.sub(r"/v1$", "", provider.base_url)) if (
        learn) else {}


def _ollama_windows(config, provider, client, root):
    out = {}
    for model in configured_models(config, provider):
        status, _, _, body = fetch(client, "POST", root + "/api/show", json.dumps(
            {"model": model}).encode(), [("content-type", "application/json")])
        ctx = ollama_context(body) if status == 200 else None
        if ctx:
            out[model] = ctx
    return out


def _llama_windows(config, provider, client, root):
    """llama.cpp's server serves one model, with the n_ctx it was started with."""
    status, _, _, body = fetch(client, "GET", root + "/props", None, [])
    doc = _loads(body) if status == 200 else None
    ctx = _obj(_obj(doc).get("default_generation_settings")).get("n_ctx")
    return {provider.model: ctx} if isinstance(ctx, int) and ctx > 0 and provider.model else {}


WINDOW_PROBES = {"ollama": _ollama_windows, "openai-compatible": _llama_windows}


class Upstreams:
    """The clients for the current config; rebuilt for providers that changed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._clients = {}
        self.resolver, self.contexts = Resolver(), TLSContexts()

    def client(self, provider):
        with self._lock:
            entry = self._clients.get(provider.name)
            if entry is None or entry[0] != provider:
                if entry is not None:
                    entry[1].pool.close()
                entry = (provider, UpstreamClient(provider, ConnectionPool(), self.resolver,
                                                     self.contexts))
                self._clients[provider.name] = entry
            return entry[1]

    def connections_opened(self):
        with self._lock:
            return sum(c.pool.opened for _, c in self._clients.values())

    def close(self):
        with self._lock:
            for _, client in self._clients.values():
                client.pool.close()


# ---- The running service: its state and its build ------------------------------------

def read_git_build(repo_dir):
    """(commit, date) of a checkout, read from .git without running git."""
    git = os.path.join(repo_dir, ".git")
    try:
        head = _read_text(os.path.join(git, "HEAD"))
        commit = head
        if head.startswith("ref: "):
            ref = head[5:]
            commit = _read_text(os.path.join(git, ref)) if os.path.exists(
                os.path.join(git, ref)) else _packed_ref(git, ref)
    except OSError:
        return "unknown", "unknown"
    if not re.match(r"^[0-9a-f]{40}$", commit or ""):
        return "unknown", "unknown"
    return commit[:12], _commit_date(git, commit)


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _packed_ref(git, ref):
    for line in _read_text(os.path.join(git, "packed-refs")).splitlines():
        if line.endswith(" " + ref):
            return line.split()[0]
    return ""


def _commit_date(git, commit):
    """The committer date of a loose commit object; "unknown" when packed."""
    try:
        with open(os.path.join(git, "objects", commit[:2], commit[2:]), "rb") as f:
            raw = zlib.decompress(f.read())
    except (OSError, zlib.error):
        return "unknown"
    match = re.search(rb"\ncommitter .* (\d+) [+-]\d{4}\n", raw)
    return iso_time(int(match.group(1))) if match else "unknown"


def build_info():
    """{"version", "commit", "date"}: stamped, else from .git beside this file."""
    commit, date = BUILD_COMMIT, BUILD_DATE
    if not commit:
        commit, date = read_git_build(os.path.dirname(os.path.abspath(__file__)))
    return {"version": __version__, "commit": commit or "unknown", "date": date or "unknown"}


class Service:
    """The running daemon's state: the current config, counters, readiness, upstreams.

    Handlers read `config` once per request; reload swaps the reference (never mutates).
    """

    def __init__(self, config):
        self.config = config
        self.started = self.loaded_at = time.time()
        self.port = config.port
        self.reloads = self.reload_failures = 0
        self.last_reload_error = None
        self.ready = self.draining = False
        self.heartbeat = time.monotonic()
        self.stats = ProviderStats()
        self.upstreams = Upstreams()
        self.calibration = Calibration()
        self.signatures = ThoughtSignatures()
        self.windows = Windows()
        self.tools = ToolsCache()
        self.members = MemberCache()
        self.metrics = Metrics()
        self.deadlines = Deadlines()
        self.pinger = Pinger()
        self.cluster = None          # set in a worker of `run --workers N`
        self.record = {}             # the runtime record (runtime_record), once serving
        self.build = build_info()
        self.keys = key_ring(config)
        self.limits = KeyLimits()
        self.limits.active = has_limits(config)
        self.ledger = None           # open_ledger(): the usage ledger, when it is kept
        self._page_usage = None      # (when, page_usage_data) for the status page
        self.recorder = make_recorder(config)
        self._idle = threading.Condition()
        self.in_flight = self.requests_served = 0
        self.waiting = set()         # keep-alive connections idle between requests
        self.connecting = 0          # accepted connections whose first request is not in

    def begin_request(self, first=False):
        """A request is in flight; `first`: its connection's first, which stops counting
        as connecting in the same step (the drain must never see neither)."""
        with self._idle:
            self.in_flight += 1
            self.connecting -= first

    def connection_opened(self, delta=1):
        """Count a connection from its accept until its first request begins (then
        begin_request(first=True)) or it ends without one (delta -1): its client has
        sent, or is sending, a request the drain must not lose."""
        with self._idle:
            self.connecting += delta
            if not self.in_flight and not self.connecting:
                self._idle.notify_all()

    def end_request(self):
        with self._idle:
            self.in_flight -= 1
            self.requests_served += 1
            if self.in_flight == 0:
                self._idle.notify_all()

    def close_waiting(self):
        """Close keep-alive connections that sit between requests, so clients (nginx's
        upstream pool, Claude Code) stop reusing them now rather than meet a reset after
        sending their next request to a process that is going away."""
        with self._idle:
            waiting = list(self.waiting)
        for sock in waiting:
            try:
                # A request whose bytes are here already is served (Connection: close):
                # shutting it down would reset a request the client counts as sent.
                if not readable_now(sock):
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass

    def wait_idle(self, timeout):
        """Wait until no request is in flight; return how many are still running."""
        deadline = time.monotonic() + timeout
        # New connections get a moment for their request's first bytes; one that sends
        # nothing (a TCP health check) must not hold the drain for long.
        fresh = time.monotonic() + min(FRESH_GRACE, timeout)
        with self._idle:
            while time.monotonic() < deadline and (
                    self.in_flight or (self.connecting and time.monotonic() < fresh)):
                self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return self.in_flight

    def apply(self, config):
        """Swap in a new config; return the names of settings that need a restart.
        ConfigError, and nothing changed, when the result would be unsafe."""
        self.config, changed = reloaded_config(self.config, config)
        self.keys = key_ring(config)
        self.limits.active = has_limits(config)
        self.recorder = make_recorder(config)
        self.loaded_at = time.time()
        self.reloads += 1
        self.last_reload_error = None
        self.upstreams.contexts.clear()      # new connections read the CA files again
        return changed

    def open_ledger(self):
        """Start the usage ledger's writer where the config keeps one (see
        docs/operating.md §10); without sqlite3 in this Python, say so once and serve."""
        config = self.config
        if not (config.usage and config.usage_db):
            return
        if sqlite3 is None:
            log.warning("usage ledger off: this Python has no sqlite3 module")
            return
        self.ledger = Ledger(config.usage_db, config.usage_retention_days,
                             self.limits).start()

    def not_ready(self):
        """Why the service is not ready (draining, starting, a worker without the
        config), or None."""
        reason = "draining" if self.draining else None if self.ready else "starting"
        if reason is None and self.cluster is not None:
            reason = self.whole_service().ready_error    # every worker has the config?
        return reason

    def authorise(self, auth, peer, headers, challenge=False):
        """The name of the client key a request presents (None when it needs none):
        endpoints of auth "local" answer loopback peers, "client" ones anyone when no
        key is configured; else HTTPError 401 (`challenge`: a page, whose 401 asks a
        browser for the key as a Basic password, RFC 7617)."""
        if auth == "none" or (auth == "local" and is_loopback_host(peer)):
            return None
        if auth == "client" and not self.config.requires_key():
            return None
        # Only the socket peer counts as loopback: X-Forwarded-For never grants anything
        # (Sonarr CVE-2026-30975, gin CVE-2020-28483).
        owner = key_owner(headers, self.keys) if self.keys else None
        if owner:
            return owner
        raise HTTPError(401, "authentication_error", "invalid x-api-key"
                        if self.config.requires_key() else "this endpoint answers "
                        "loopback clients only (no api_key is configured)",
                        (("x-should-retry", "false"),) + ((
                            ("WWW-Authenticate", 'Basic realm="ccproxy", charset="UTF-8"'),)
                            if challenge else ()))

    def count_tokens(self, provider, body):
        """count_tokens on a translated route: the estimator, calibrated per route."""
        tools = self.tools.get(body.get("tools"), quirks_for(provider))
        return self.calibration.scale(provider.name, estimate_input_tokens(
            body, tools_size=tools.size))

    def admit(self, name, route, reason):
        """A named client key's limits (docs/operating.md §10): the routes it may take
        (HTTPError 403), its rate and its monthly budget (429)."""
        key = self.config.client_key(name)
        if key is None:
            return
        taken = route_names(self.config, route, reason)
        if key.routes and not taken & set(key.routes):
            raise HTTPError(403, "permission_error", "ccproxy: client key %s may take the "
                            "routes %s; this call took %s" % (key.name, ", ".join(
                                key.routes), " / ".join(sorted(taken))),
                            (("x-should-retry", "false"),))
        self.limits.admit(key)

    def account(self, record):
        """A Messages call that reached an upstream: its ledger row, its cost on its
        client key, its key's metrics (issue #24)."""
        if not record.provider or not isinstance(record.upstream_status, int) or (
                record.route != "messages"):
            return                   # no upstream answered (not reached, or refused here)
        row = ledger_row(self.config, record, time.time())
        cost = row[LEDGER_COLUMNS.index("cost_usd")]
        if self.ledger is not None:
            self.ledger.record(row)
        if record.key:
            self.limits.spend(record.key, cost)
        self.metrics.add_key_usage(record.key or "-", row[LEDGER_COLUMNS.index(
            "upstream_model")] or record.model or "-", record.usage or (), cost)

    def record_upstream(self, provider, status, latency, headers=None):
        """One upstream attempt: provider health, its circuit, and the metrics."""
        self.stats.record(provider, status, latency, headers)
        self.metrics.observe_upstream(provider, status, latency)

    def report(self, worker_id, state):
        """This worker's report for the shared state directory."""
        return snapshot_report(self.snapshot(), worker_id, state)

    def whole_service(self):
        """The Snapshot of the whole service: for one process its own; for a worker,
        what the workers' reports say together."""
        snap = self.snapshot()
        if self.cluster is None:
            return snap
        live, dead = self.cluster.read()
        return merge_snapshots(snap, live, dead, self.cluster.expected, os.getppid())

    def alive(self):
        """Liveness: the serve loop has polled recently."""
        return time.monotonic() - self.heartbeat < HEARTBEAT_STALE

    def snapshot(self):
        """This process's Snapshot, read once."""
        with self._idle:
            served, in_flight = self.requests_served, self.in_flight
        return Snapshot(
            config=self.config, now=time.time(), started=self.started, pid=os.getpid(),
            port=self.port, draining=self.draining, ready=self.ready and not self.draining,
            loaded_at=self.loaded_at, last_reload_error=self.last_reload_error,
            build=self.build, record=self.record, requests_served=served,
            reload_failures=self.reload_failures,
            upstream_connections=self.upstreams.connections_opened(), in_flight=in_flight,
            reloads=self.reloads, provider_stats=self.windows.into(
                self.stats.snapshot(), self.config),
            metrics=self.metrics.snapshot(), usage=self.usage_state(),
            ledger_written=self.ledger.written if self.ledger else 0,
            ledger_dropped=self.ledger.dropped if self.ledger else 0)

    def page(self, fragment=False):
        """The status page (or its body) of the whole service, now."""
        snap = self.whole_service()
        trends = {p.name: minute_series(snap.metrics, p.name, snap.now)
                  for p in snap.config.providers}
        return render_page(status_document(snap), trends, self.page_usage(snap.now),
                           fragment)

    def page_usage(self, now):
        """page_usage_data, kept PAGE_USAGE_TTL seconds: the page refreshes every few
        seconds, and a month of a busy ledger takes a while to sum."""
        cached = self._page_usage
        if cached is None or now - cached[0] > PAGE_USAGE_TTL:
            cached = self._page_usage = (now, page_usage_data(self.config, now))
        return cached[1]

    def usage_state(self):
        """The ledger's state and each client key's spend this month, for /status."""
        state = self.ledger.state() if self.ledger else {
            "enabled": False, "path": self.config.usage_db or None, "why": (
                "usage is off" if not self.config.usage else "no sqlite3 module in this "
                "Python" if sqlite3 is None else "no state directory (set usage_db)"
                if not self.config.usage_db else "not started")}
        state["keys"] = [{"name": k.name, "month_cost_usd": round(self.limits.spent(
            k.name), 4), "monthly_budget_usd": k.monthly_budget_usd or None,
            "requests_per_minute": k.requests_per_minute or None,
            "routes": list(k.routes) or None} for k in self.config.client_keys]
        return state


# ---- HTTP: endpoints, request heads, framing -----------------------------------------

#: path -> (endpoint name, methods, auth).  auth: "none", "local" (loopback peer or the
#: client key), "client" (the client key when one is configured).
LOCAL_ENDPOINTS = {
    "/health": ("health", ("GET",), "none"),
    "/health/ready": ("ready", ("GET",), "none"),
    "/status/ready": ("ready", ("GET",), "none"),
    "/health/detailed": ("detailed", ("GET",), "local"),
    "/status": ("status", ("GET",), "local"),
    "/metrics": ("metrics", ("GET",), "local"),
    "/usage": ("usage", ("GET",), "local"),
    "/ui": ("ui", ("GET",), "local"),
    "/": ("hello", ("GET",), "none"),
    "/api/hello": ("hello", ("GET",), "none"),
}
#: Path suffix -> endpoint, so that a base URL with a path prefix works.
API_ENDPOINTS = (
    ("/v1/messages/count_tokens", ("count_tokens", ("POST",), "client")),
    ("/v1/messages", ("messages", ("POST",), "client")),
    ("/v1/models", ("models", ("GET",), "client")),
)


def resolve_endpoint(path, status_only=False):
    """(name, methods, auth) for a request path without its query, or None."""
    if path in LOCAL_ENDPOINTS:
        return LOCAL_ENDPOINTS[path]
    if status_only:
        return None
    return next((e for suffix, e in API_ENDPOINTS if path.endswith(suffix)), None)


VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]+$")


def parse_request_line(line, protocol="HTTP/1.1"):
    """(method, target, version, keep_alive) of a request line, by the rules of
    BaseHTTPRequestHandler.parse_request (3.13); HTTPError for one it refuses."""
    words, version, keep_alive = line.split(), "HTTP/0.9", False
    if len(words) >= 3:
        version = words[-1]
        numbers = version[5:].split(".") if version.startswith("HTTP/") else ()
        if len(numbers) != 2 or not all(n.isdigit() and len(n) <= 10 for n in numbers):
            raise HTTPError(400, "invalid_request_error",
                            "Bad request version (%r)" % version)
        number = int(numbers[0]), int(numbers[1])
        if number >= (2, 0):
            raise HTTPError(505, "invalid_request_error",
                            "Invalid HTTP version (%s)" % version[5:])
        keep_alive = number >= (1, 1) and protocol >= "HTTP/1.1"
    if not 2 <= len(words) <= 3:
        raise HTTPError(400, "invalid_request_error", "Bad request syntax (%r)" % line)
    method, target = words[:2]
    if len(words) == 2 and method != "GET":
        raise HTTPError(400, "invalid_request_error",
                        "Bad HTTP/0.9 request type (%r)" % method)
    if not VISIBLE_ASCII.match(target):
        # RFC 9112 §3.2: the target is visible ASCII.  A control byte in the query made
        # the upstream request unbuildable (counted against the provider), and a
        # non-ASCII one a 500 (issue #17).
        raise HTTPError(400, "invalid_request_error", "the request target must be "
                        "visible ASCII (percent-encode the rest, RFC 3986 §2.1)")
    if target.startswith("//"):            # gh-87389: never an absolute-form open redirect
        target = "/" + target.lstrip("/")
    return method, target, version, keep_alive


def body_length(headers, limit):
    """The request body length from its headers; HTTPError for framing we refuse."""
    te, cl = headers.get("transfer-encoding"), headers.get_all("content-length") or []
    if te and cl:
        # RFC 9112 §6.1: both together is a request-smuggling vector; reject and close.
        raise HTTPError(400, "invalid_request_error",
                        "Content-Length with Transfer-Encoding is not allowed", close=True)
    if te:
        raise HTTPError(411, "invalid_request_error",
                        "a request body needs Content-Length (chunked bodies are not "
                        "accepted)", close=True)
    # ASCII digits only: "²".isdigit() is true, and int() then raised (a 500).
    if len(set(v.strip() for v in cl)) > 1 or any(not re.match(r"^[0-9]+$", v.strip())
                                                   for v in cl):
        raise HTTPError(400, "invalid_request_error", "invalid Content-Length", close=True)
    length = int(cl[0]) if cl else 0
    if length > limit:
        raise HTTPError(413, "request_too_large", "request body of %d bytes exceeds the "
                        "limit of %d bytes (max_body_bytes)" % (length, limit),
                        (("x-should-retry", "false"),), close=True)
    return length


#: Content codings a request body may come in (RFC 9110 §8.4.1): Claude Code gzips its
#: bodies with CLAUDE_CODE_GZIP_REQUEST_BODIES (issue #20).  zlib's wbits for each.
BODY_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                "deflate": zlib.MAX_WBITS}


def decode_body(raw, coding, limit):
    """A request body without its Content-Encoding, inflated to at most `limit` bytes:
    a few KB can inflate to gigabytes, so the cap holds while inflating, not after."""
    coding = (coding or "identity").strip().lower()
    if coding == "identity":
        return raw
    if coding not in BODY_CODINGS:
        raise HTTPError(415, "invalid_request_error", "Content-Encoding %s is not "
                        "supported (gzip, deflate)" % escape_log(coding)[:40],
                        (("accept-encoding", "gzip, deflate"),))
    out, size, data = [], 0, raw
    while data:                                  # gzip may hold several members
        inflater = zlib.decompressobj(BODY_CODINGS[coding])
        try:
            piece = inflater.decompress(data, limit - size + 1)
        except zlib.error as exc:
            raise HTTPError(400, "invalid_request_error", "request body is not valid %s: "
                            "%s" % (coding, exc))
        size += len(piece)
        if size > limit:
            raise HTTPError(413, "request_too_large", "request body inflates past the "
                            "limit of %d bytes (max_body_bytes)" % limit,
                            (("x-should-retry", "false"),))
        if not inflater.eof:
            raise HTTPError(400, "invalid_request_error", "request body: %s data cut "
                            "short" % coding)
        out.append(piece)
        data = inflater.unused_data if coding != "deflate" else b""
    return b"".join(out)


def parse_json_object(raw, members=None):
    """A request body as a JSON object; HTTPError 400 with a clear message otherwise.
    `members`: a MemberCache, to take repeated members from instead of parsing them."""
    try:
        doc = members.parse(raw) if members is not None else None
        if doc is None:
            doc = json.loads(raw)
    except RecursionError:
        raise HTTPError(400, "invalid_request_error", "request body is nested too deeply")
    except ValueError as exc:
        raise HTTPError(400, "invalid_request_error", "request body is not valid JSON: %s"
                        % str(exc)[:200])
    if not isinstance(doc, dict):
        raise HTTPError(400, "invalid_request_error", "request body must be a JSON object")
    return doc


def _take_body(request, members=None):
    """The parsed body for one attempt, taken out of the request holder.  While the
    upstream thinks (seconds, for a model), the request keeps only its raw bytes: a
    thousand streams opening at once would otherwise each pin 100 KB of parsed objects,
    and the heap stays fragmented after they are freed (make bench: 1000 streams with
    Claude Code's 50 KB bodies, 74 -> 66 MB).  A fallback attempt parses the bytes again."""
    body = request.pop("body", None)
    if body is None and request.get("raw"):
        body = parse_json_object(request["raw"], members)
    return body


class SSEModelRenamer:
    """Rewrites message.model in the first message_start frame of a relayed stream, then
    passes every later byte through untouched."""

    LIMIT = 1 << 20

    def __init__(self, model):
        self.model, self.pending, self.done = model, b"", False

    def feed(self, data):
        if self.done:
            return data
        self.pending += data
        end = self.pending.find(b"\n\n")
        if end < 0 and len(self.pending) < self.LIMIT:
            return b""
        self.done = True
        if end < 0:
            return self.pending
        head, rest = self.pending[:end], self.pending[end:]
        return rewrite_message_start(head, self.model) + rest

    def flush(self):
        out, self.pending, self.done = (b"" if self.done else self.pending), b"", True
        return out


def _chunk(data):
    """One HTTP/1.1 chunk (RFC 9112 §7.1), in one buffer so it goes out in one send.
    Nothing for no data: an empty chunk would end the body (the last-chunk is
    written on its own, as b"0\\r\\n\\r\\n")."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


_DATE_CACHE = [0, ""]


def _http_date():
    """The Date header value, formatted at most once a second."""
    now = int(time.time())
    if _DATE_CACHE[0] != now:
        _DATE_CACHE[:] = [now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))]
    return _DATE_CACHE[1]


#: The head of a translated stream (docs/translation.md §3.1).
SSE_HEADERS = (("Content-Type", "text/event-stream; charset=utf-8"),
               ("Cache-Control", "no-cache"))


# ---- One proxied call ----------------------------------------------------------------

class AccessRecord:
    """One request's access-log line and metrics, filled in as it goes: by its handler
    (method, path, status, route, model), by its Exchange (provider, upstream model and
    status, attempts, first byte, tokens).  Handler._log_access writes it once."""

    FIELDS = ("request_id", "client", "key", "method", "path", "status", "route", "rule",
              "reason", "provider", "model", "upstream_model", "upstream_status", "attempts",
              "latency_ms", "ttfb_ms", "input_tokens", "output_tokens", "error")
    # stream_ttfb: seconds to a stream's first byte; usage: usage_split of the reply;
    # session: Claude Code's session id (the ledger's, not the log's).
    __slots__ = FIELDS + ("stream_ttfb", "usage", "session", "tape")

    def __init__(self, request_id, client):
        self.request_id, self.client = request_id, client
        self.key = self.method = self.path = self.status = self.route = self.provider = None
        self.rule = self.reason = None
        self.model = self.upstream_model = self.upstream_status = self.attempts = None
        self.latency_ms = self.ttfb_ms = self.input_tokens = self.output_tokens = None
        self.error = self.stream_ttfb = self.usage = self.session = self.tape = None

    def update(self, **values):
        for name, value in values.items():
            setattr(self, name, value)

    def items(self):
        """(field, value) of the fields that are set, in log order."""
        return [(k, getattr(self, k)) for k in self.FIELDS if getattr(self, k) is not None]


class Exchange:
    """One proxied call: planning, attempts and fallback, the commit of the response
    head, pings, and relaying or translating the answer.  Handler._proxy makes one per
    call and drops it after; its state lives here, not in the connection's handler
    (issue #19).  It writes through its handler (_head, _send) and, for a stream, under
    its own write_lock, which the Pinger takes too."""

    __slots__ = ("handler", "service", "access", "write_lock", "pinging", "last_write",
                 "pending_head", "ping_frame", "upstream_started", "cap")

    def __init__(self, handler):
        self.handler, self.service = handler, handler.server.service
        self.access = handler.access
        self.write_lock, self.pinging, self.last_write = threading.Lock(), False, 0.0
        self.pending_head = self.ping_frame = self.upstream_started = None
        self.cap = 0                  # max_tokens a server said fits (see _refit)

    def _write(self, data):
        with self.write_lock:
            self.handler._write(data)
            self.last_write = time.monotonic()

    def stop_pinging(self):
        with self.write_lock:
            self.pinging = False

    def ping_if_idle(self, interval):
        """Called by the Pinger thread: one SSE ping if nothing was written lately; for
        a stream still waiting for its first event, after FIRST_EVENT_WAIT, the head
        and message_start (which ends in a ping) instead."""
        with self.write_lock:
            head = self.pending_head
            wait = FIRST_EVENT_WAIT if head is not None else interval
            if not self.pinging or time.monotonic() - self.last_write < wait:
                return
            self.pending_head = None
            if head is not None:
                self.access.stream_ttfb = time.monotonic() - self.handler.t0
            try:
                self.handler._write(head if head is not None else self.ping_frame)
            except OSError:
                pass                # the stream's own thread sees the broken client
            self.last_write = time.monotonic()

    def forward(self, plan, endpoint, query, method, request):
        """Relay the first answer of the providers in `plan` (see _answer).
        `request` holds the body ({"raw", "body"}, or empty for a GET)."""
        body = request.get("body") or {}
        client_model, stream = body.get("model", ""), body.get("stream") is True
        body = None                      # no reference here may outlive _take_body's pop
        answer = self._answer(plan, endpoint, query, method, request)
        if answer is None:
            return                       # an upstream error was relayed
        request.clear()                  # answered: the body is needed no more
        client, resp, tr, model, relay = answer
        try:      # the dialect's relay, called from here: no frame more under a stream
            return relay(self, client, resp, tr, stream,
                         client_model if model and model != client_model else "")
        finally:
            self._note_speed()

    def _note_speed(self):
        """The provider's output tokens per second, from this call."""
        access = self.access
        if self.upstream_started and access.output_tokens and access.provider:
            self.service.stats.record_tokens(access.provider, access.output_tokens,
                                             time.monotonic() - self.upstream_started)

    def _answer(self, plan, endpoint, query, method, request):
        """Try each (provider, model) in order until one answers: (client, response,
        Translation or None, upstream model, the dialect's relay), or None once an
        error was relayed.

        A provider that fails before any byte reached the client (connection error, 5xx,
        429, timeout) passes the request on; once bytes are sent there is no retry.  A
        frame of its own: the upstream body, headers and URL are gone before a stream
        that may last minutes is relayed (about 0.5 KB per open stream).
        """
        service = self.service
        plan = callable_plan(service.config, plan, service.stats.available)
        for attempt, (provider, model) in enumerate(plan, 1):
            last = attempt == len(plan)
            # Which model served the call: the one the client asked for is `model`.
            self.access.update(provider=provider.name, attempts=attempt,
                               upstream_model=model or self.access.model)
            client, resp, tr, body = self._call(provider, model, endpoint, query, method,
                                                request, last)
            if resp is None:
                continue
            if resp.status < 400:
                return client, resp, tr, model, dialect_of(provider).relay
            if self._relay_error(client, provider, resp, last, body):
                return None
        return None                      # not reached: the last attempt answers or raises

    def _call(self, provider, model, endpoint, query, method, request, last):
        """One provider's attempt: (client, response or None, Translation or None).  Once
        more with fresh credentials after a 401 (or what else the dialect's renew_on
        says) where the dialect can renew them: a Vertex token or AWS session
        credentials that expired before their time."""
        dialect, body = dialect_of(provider), None
        for retried in (False, True):
            url, data, headers, tr = dialect.prepare(
                self, provider, model, endpoint, query, request.get("raw"),
                _take_body(request, self.service.members))
            client, resp = self._attempt(provider, method, url, data, headers, last)
            if resp is None or retried:
                return client, resp, tr, None
            if resp.status in dialect.renew_on and dialect.renew(provider):
                client.discard(resp)
                log.info("%s provider=%s answered %d: renewing its credentials and trying "
                         "again", self.handler.request_id, provider.name, resp.status)
                continue
            if resp.status != 400 or tr is None:
                return client, resp, tr, None
            again, body = self._refit(client, provider, model or tr.client_model, resp, tr)
            if not again:
                return client, resp, tr, body
        return client, resp, tr, body                # not reached

    def _refit(self, client, provider, model, resp, tr):
        """A translated call's 400 read: (try again, its body).  A server that says
        max_tokens was more than its window leaves (vLLM names both numbers) gets the
        call once more with what fits, before any byte reached the client; a window a
        server names is remembered for the next calls (docs/translation.md §1.9)."""
        try:
            body = resp.read(1 << 20)
        except (OSError, http.client.HTTPException):
            body = b""
        if self.access.tape is not None:
            self.access.tape.read(body)
        limit = limit_error(body)
        if limit and limit["window"]:
            self.service.windows.learn(provider.name, model, limit["window"])
        if limit and limit["input"]:          # the server's own count: calibrate by it
            self.service.calibration.learn(provider.name, tr.raw_estimate, limit["input"])
        if not limit or limit["kind"] != "output" or not limit["input"]:
            return False, body
        client.release(resp) if resp.isclosed() else client.discard(resp)
        self.cap = max(limit["window"] - limit["input"] - 64, 1)
        log.info("%s provider=%s: max_tokens too large for the window of %d; trying again "
                 "with %d", self.handler.request_id, provider.name, limit["window"], self.cap)
        return True, body

    def translation(self, provider, model, body):
        """The Translation a translating dialect's call needs, and the body's tools."""
        service, quirks = self.service, quirks_for(provider)
        tools = service.tools.get(body.get("tools"), quirks)
        raw_estimate = estimate_input_tokens(body, tools_size=tools.size)
        estimate = service.calibration.scale(provider.name, raw_estimate)
        window, output, _ = service.windows.limits(service.config, provider, model or
                                                   body.get("model", ""))
        cap = max_tokens_cap(window, output, estimate)
        cap = min(cap, self.cap) if cap and self.cap else cap or self.cap
        return Translation(route=provider.name, client_model=body.get("model", ""),
                           upstream_model=model, quirks=quirks, estimate=estimate,
                           raw_estimate=raw_estimate, signatures=service.signatures,
                           session=session_id(self.handler.headers, body),
                           max_tokens_cap=cap, search=search_request(body) if (
                               quirks["web_search"] and search_only(body)) else None), tools

    def _attempt(self, provider, method, url, data, headers, last):
        """Open one upstream call: (client, response), the response None when it failed
        and the next provider should be tried."""
        service, tape = self.service, self.access.tape
        client = service.upstreams.client(provider)
        if tape is not None:
            tape.attempt(provider, url, headers, data)
        started = time.monotonic()
        try:
            resp = client.open(method, url, data, headers)
        except UpstreamError as exc:
            service.record_upstream(provider.name, exc.kind, time.monotonic() - started)
            log.warning("%s attempt provider=%s failed: %s", self.handler.request_id, provider.name,
                        exc)
            self.access.upstream_status = exc.kind
            if last:
                status, etype, message, headers = failure_reply(exc, provider.name)
                raise HTTPError(status, etype, message, headers) from exc
            return client, None
        latency = time.monotonic() - started
        if tape is not None:
            tape.answer(resp.status, resp.headers)
        misdirected = misdirected_reply(resp.status, resp.headers)
        service.record_upstream(provider.name, "misdirected" if misdirected else resp.status,
                                latency, resp.headers)
        self.upstream_started = time.monotonic()
        self.access.update(upstream_status=resp.status, ttfb_ms=int(
            (time.monotonic() - self.handler.t0) * 1000))
        if not misdirected:
            return client, resp
        client.discard(resp)
        log.warning("%s attempt provider=%s: %s", self.handler.request_id, provider.name,
                    misdirected)
        if last:
            raise HTTPError(502, "api_error", "%s upstream %s" % (provider.name, misdirected))
        return client, None

    def _relay_error(self, client, provider, resp, last, body=None):
        """Relay an upstream error (its body, if read already), or return False to let
        the next provider try."""
        if body is None:
            try:
                body = resp.read(1 << 20)
            except (OSError, http.client.HTTPException):
                body = b""
            if self.access.tape is not None:
                self.access.tape.read(body)
        client.release(resp) if resp.isclosed() else client.discard(resp)
        if fallback_worthy(resp.status) and not last:
            log.warning("%s attempt provider=%s status=%d, trying the next provider",
                        self.handler.request_id, provider.name, resp.status)
            return False
        status, headers, out = map_upstream_error(resp.status, resp.headers, body,
                                                  provider.name,
                                                  dialect_of(provider).anthropic_errors)
        self.handler._send(status, headers + [("Content-Type", "application/json")], out)
        return True

    def _relay(self, client, resp, tr, want_stream, rename):
        """Relay a successful answer: a stream chunk by chunk, anything else whole."""
        headers = filter_headers(resp.headers, RESPONSE_DROP | connection_tokens(resp.headers))
        if "text/event-stream" in (resp.headers.get("content-type") or ""):
            return self._relay_stream(client, resp, headers, rename)
        data = self._read_all(client, resp)
        if rename:
            data = rewrite_model_json(data, rename)
        doc = _loads(data) if b'"usage"' in data else None
        if isinstance(doc, dict) and isinstance(doc.get("usage"), dict):
            self._note_tokens(doc["usage"])
        self.handler._send(resp.status, headers, data)

    def _read_all(self, client, resp):
        limit = self.service.config.max_reply_bytes
        try:
            data = resp.read(limit + 1)
        except (OSError, http.client.HTTPException) as exc:
            client.discard(resp)
            raise HTTPError(500, "api_error", "upstream response cut short: %s"
                            % _os_error_text(exc)) from exc
        if len(data) > limit:
            client.discard(resp)
            raise HTTPError(500, "api_error", "upstream reply larger than %d bytes "
                            "(max_reply_bytes)" % limit, (("x-should-retry", "false"),))
        client.release(resp)
        if self.access.tape is not None:
            self.access.tape.read(data)
        return data

    # -- translated replies -------------------------------------------------------

    def _relay_translated(self, client, resp, tr, want_stream, rename=""):
        """An OpenAI reply to the client in Anthropic form, streamed when it streams."""
        if "text/event-stream" in (resp.headers.get("content-type") or ""):
            return self._translate_stream(client, resp, tr)
        doc = _loads(self._read_all(client, resp))
        try:
            message = tr.dialect.reply(doc if isinstance(doc, dict) else None, tr)
        except UpstreamReplyError as exc:
            raise HTTPError(529 if exc.etype == "overloaded_error" else 500, exc.etype,
                            str(exc)) from exc
        self._learn(tr, tr.dialect.usage(doc))
        self._note_tokens(message["usage"])
        if want_stream:     # the upstream ignored stream:true, or was asked without it
            return self.handler._send(200, SSE_HEADERS, synthesize_stream(message))
        self.handler._send(200, [("Content-Type", "application/json")], json_bytes(message))

    def _learn(self, tr, usage):
        prompt = (usage or {}).get("prompt_tokens") if isinstance(usage, dict) else None
        self.service.calibration.learn(tr.route, tr.raw_estimate, prompt)

    def _note_tokens(self, usage):
        self.access.update(input_tokens=usage.get("input_tokens"),
                           output_tokens=usage.get("output_tokens"), usage=usage_split(usage))

    def _translate_stream(self, client, resp, tr):
        """S0 (§3.4): wait for the first upstream event.  An error before it becomes a
        plain HTTP error (so 429 + retry-after works); the event commits the stream, and
        so does a wait past FIRST_EVENT_WAIT (the Pinger writes the head then: a model
        that thinks for minutes must not leave the client, or a proxy, without one)."""
        parser = SSEParser(self.service.config.max_event_bytes, self.access.tape)
        st = tr.dialect.stream_translator(tr)
        resp.headers = None       # read already; a long stream need not keep them
        chunked = self.handler.request_version == "HTTP/1.1"
        self.handler.close_connection = self.handler.close_connection or not chunked
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")
        frame = _chunk if chunked else bytes
        self.ping_frame = frame(sse_event("ping", {"type": "ping"}))
        self.pending_head = self.handler._head(200, SSE_HEADERS, (framing,)) + frame(st.start())
        self.pinging, self.last_write = True, time.monotonic()
        self.service.pinger.add(self)
        done = False
        try:
            rest = self._first_event(resp, parser, st, frame)
            done = rest is not None and self._pump_translated(resp, parser, st, frame, rest)
        finally:
            self.service.pinger.remove(self)
            client.release(resp) if done else client.discard(resp)
            self._learn(tr, st.usage)
            if st.usage:
                self._note_tokens(anthropic_usage(st.usage, tr.estimate, 1))
            if st.repairs and parser.tape is not None:
                parser.tape.flags.add("repaired_tool_input")
        if chunked:
            self._write(b"0\r\n\r\n")

    def _first_event(self, resp, parser, st, frame):
        """Read and write the first event (with the head, unless the Pinger sent it);
        the bytes read after it, or None when the stream ended in an error event."""
        try:
            payloads, rest = self._first_payloads(resp, parser)
            if not payloads:
                raise UpstreamReplyError("api_error", "%s upstream stream was empty"
                                         % st.tr.route)
            first = b"".join(st.feed(p) for p in payloads)
        except (UpstreamReplyError, OSError, http.client.HTTPException, ValueError) as exc:
            etype, message = (exc.etype, str(exc)) if isinstance(exc, UpstreamReplyError) else (
                "api_error", "%s upstream stream failed before the first event: %s"
                % (st.tr.route, _os_error_text(exc)))
            head = self._take_pending_head()
            if head is not None:                  # not committed: a plain HTTP error
                raise HTTPError(529 if etype == "overloaded_error" else 500, etype,
                                message) from exc
            self.access.upstream_status = "stream_error"
            self._write(frame(st.error(etype, message)))
            return None
        head = self._take_pending_head()
        if head is not None:
            self.access.stream_ttfb = time.monotonic() - self.handler.t0
        self._write((head or b"") + frame(first))
        return rest

    def _take_pending_head(self):
        """The head the Pinger has not written yet (now it never will), or None."""
        with self.write_lock:
            head, self.pending_head = self.pending_head, None
        return head

    @staticmethod
    def _first_payloads(resp, parser):
        """The payloads of the first upstream event, and the bytes read after it.  Commit
        on the first event alone: a read that brought hundreds (a burst after a silent
        reasoning phase, a cached reply) is parsed after the head went out; parsing
        64 KB of events first cost 0.33 ms of time to first byte."""
        rest = b""
        while True:
            data = rest or resp.read1(RELAY_CHUNK)
            end = SSE_EVENT_END.search(data)
            if end:
                data, rest = data[:end.end()], data[end.end():]
            else:
                rest = b""
            payloads = parser.feed(data) if data else parser.close()
            if payloads or not data:
                return payloads, rest

    def _pump_translated(self, resp, parser, st, frame, pending):
        """Translate and write each upstream chunk the moment it is read; True when the
        upstream ended cleanly.  Errors after the commit end in an SSE error event and
        nothing after it (§3.5).  `pending`: bytes read but not yet parsed."""
        while True:
            try:
                data, pending = pending or resp.read1(RELAY_CHUNK), b""
            except (OSError, http.client.HTTPException, ValueError) as exc:
                kind = "timed out" if isinstance(exc, socket.timeout) else "broken"
                self.access.upstream_status = "stream_error"
                self._write(frame(st.error("api_error", "%s upstream stream %s: %s" % (
                    st.tr.route, kind, _os_error_text(exc)))))
                return False
            out = []
            try:
                payloads = parser.feed(data) if data else parser.close()
                for payload in payloads:
                    out.append(st.feed(payload))
                if not data:
                    out.append(st.end())
            except UpstreamReplyError as exc:
                self.access.upstream_status = "stream_error"
                self._write(frame(b"".join(out) + st.error(exc.etype, str(exc))))
                return False
            if out and any(out):
                self._write(frame(b"".join(out)))
            if not data:
                return True

    def _relay_stream(self, client, resp, headers, rename):
        """Write each upstream chunk to the client the moment it is read (never buffer
        a stream); a client that leaves closes the upstream socket at once."""
        chunked = self.handler.request_version == "HTTP/1.1"
        resp.headers = None       # the head is built; a long stream need not keep them
        if not chunked:
            self.handler.close_connection = True      # HTTP/1.0: the body ends with the connection
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")
        renamer = SSEModelRenamer(rename) if rename else None
        self._write(self.handler._head(resp.status, headers, (framing,)))
        self.access.stream_ttfb = time.monotonic() - self.handler.t0
        ending, scanner = None, UsageScanner(self.access.tape)
        try:
            ending = self._pump(resp, renamer, chunked, scanner)
        finally:
            client.release(resp) if ending is not None else client.discard(resp)
            self.access.update(input_tokens=scanner.input_tokens,
                               output_tokens=scanner.output_tokens,
                               usage=usage_split(scanner.usage))
        # The connection went back to the pool before the client gets the last bytes:
        # a client that sends its next call at once finds it there (seen under load).
        if ending:
            self._write(ending)

    def _pump(self, resp, renamer, chunked, scanner):
        """The relay loop: the bytes that end the client's stream once the upstream
        body ended cleanly, None when it broke."""
        frame = _chunk if chunked else bytes
        while True:
            try:
                data = resp.read1(RELAY_CHUNK)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._stream_failed(exc, chunked)
                return None
            scanner.feed(data)
            if not data:
                tail = renamer.flush() if renamer else b""
                return (frame(tail) if tail else b"") + (b"0\r\n\r\n" if chunked else b"")
            if renamer:
                data = renamer.feed(data)
            if data:
                self._write(frame(data))

    def _stream_failed(self, exc, chunked):
        """The upstream stream broke: break ours the same way (no terminating chunk), so
        the client sees exactly what a direct connection would and retries the stream.
        Seen with Claude Code 2.1.330: an SSE error event instead makes it give up on
        streaming and re-send the turn as stream:false.  HTTP/1.0 has no way to signal
        a cut in a close-delimited body, so there an error event ends it."""
        kind = "timeout" if isinstance(exc, socket.timeout) else "reset"
        self.access.upstream_status = "stream_" + kind
        self.handler.close_connection = True
        log.warning("%s upstream stream %s: %s", self.handler.request_id, kind, _os_error_text(exc))
        if not chunked:
            event = {"type": "error", "error": {"type": "api_error", "message":
                     "upstream stream %s: %s" % (kind, _os_error_text(exc))}}
            self._write(b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n")


# ---- Dialects: one upstream wire format each (docs/architecture.md) -------------------

class Dialect:
    """Everything about one upstream wire format (issue #22): the URL, body and
    authentication of a call, how its answer reaches the client, its errors, the probe
    `check` sends, and whether the upstream lists models and counts tokens.  A provider
    gets its dialect once, from its type's row in PROVIDER_TYPES (dialect_of); the rest
    of the file asks the dialect, never the type.  Stateless: one instance serves every
    provider of the format."""

    translated = False           # the upstream does not speak Anthropic's Messages API
    forwards_client_key = False  # with no key of its own, each client's key goes upstream
    lists_models = False         # GET /v1/models is asked of the upstream
    counts_tokens = False        # count_tokens is asked of the upstream (else estimated)
    anthropic_errors = True      # its error bodies are Anthropic's, relayed as they are
    renew_on = (401,)            # statuses after which renew() may help (see Exchange._call)
    #: The Exchange method that relays a successful answer, called by Exchange.forward
    #: itself so that a stream's thread has no frame more.
    relay = None

    def prepare(self, call, provider, model, endpoint, query, raw, body):
        """(url, body bytes, headers, Translation or None) of one attempt of `call` (an
        Exchange): the client's body as `raw` bytes and parsed as `body`."""
        raise NotImplementedError

    def probe(self, provider):
        """(url, headers) of a light GET that spends no tokens (the health probes and
        `check` send it), or None where there is none."""
        raise NotImplementedError

    def check_call(self, provider):
        """(method, url, headers, body) of the call `check` makes: the free probe, or a
        one-token call where the format has no free one; None for none at all."""
        probe = self.probe(provider)
        return ("GET",) + probe + (None,) if probe else None

    def renew(self, provider):
        """Drop the provider's cached credentials after a 401; True when the next call
        will have fresh ones (then it is tried once more)."""
        return False


class AnthropicDialect(Dialect):
    """Anthropic's Messages API, passed through: the client's bytes go as they came
    unless the model is mapped or something Anthropic rejects must go (§6 of
    docs/translation.md), and the answer is relayed byte for byte."""

    forwards_client_key = lists_models = counts_tokens = True
    relay = staticmethod(Exchange._relay)

    def prepare(self, call, provider, model, endpoint, query, raw, body):
        data = passthrough_body(raw, body, model) if body else None
        return (anthropic_url(provider, endpoint, query), data,
                passthrough_headers(call.handler.headers, provider, call.service.config), None)

    def probe(self, provider):
        if not provider.api_key:
            return None
        return anthropic_url(provider, "models", ""), with_provider_headers([
            ("x-api-key", provider.api_key), ("anthropic-version", "2023-06-01"),
            ("accept-encoding", "identity")], provider)


class OpenAIChatDialect(Dialect):
    """OpenAI's Chat Completions, translated both ways (docs/translation.md)."""

    translated, anthropic_errors = True, False
    relay = staticmethod(Exchange._relay_translated)
    stream_translator = StreamTranslator            # upstream events -> A events
    reply = staticmethod(openai_to_anthropic)       # a whole reply -> an A message
    usage = staticmethod(lambda doc: _usage_of(doc) if isinstance(doc, dict) else None)
    request = staticmethod(translated_request)
    url = staticmethod(openai_url)

    def prepare(self, call, provider, model, endpoint, query, raw, body):
        tr, tools = call.translation(provider, model, body)
        tr.dialect = self
        data, stream = self.request(body, tr, tools)
        return self.url(provider), data, openai_headers(provider, stream), tr

    def probe(self, provider):
        return provider.base_url + "/models", openai_headers(provider, False)


#: The one-token call `check` makes where a format has no free probe.
CHECK_CALL = {"max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}


class ResponsesDialect(OpenAIChatDialect):
    """OpenAI's Responses API (issue #23), translated both ways: the Chat Completions
    translation, moved into the Responses shape (docs/translation.md §8)."""

    stream_translator = ResponsesStreamTranslator
    reply = staticmethod(responses_to_anthropic)
    usage = staticmethod(lambda doc: responses_usage(_obj(doc).get("usage")))
    request = staticmethod(responses_request)
    url = staticmethod(responses_url)

    def check_call(self, provider):
        """A tiny tool call (16 output tokens, the API's least): the route must take
        tools, which is what Claude Code needs of it."""
        body = {"model": provider.model or "gpt-5", "input": "ping", "store": False,
                "max_output_tokens": 16, "tools": [{
                    "type": "function", "name": "ping", "description": "answer ping",
                    "parameters": {"type": "object", "properties": {}}}]}
        return ("POST", responses_url(provider), openai_headers(provider, False),
                json_bytes(body))


class AnthropicCompatibleDialect(AnthropicDialect):
    """A vendor's Anthropic-compatible endpoint (Kimi, GLM, MiniMax, DashScope,
    DeepSeek, local servers): Anthropic's format with the rewrites its quirk flags say,
    on the request only.  With no flag that applies, the client's bytes go as they came.
    It needs a key of its own: a client's Anthropic key is never sent to a vendor."""

    forwards_client_key = lists_models = counts_tokens = False

    def prepare(self, call, provider, model, endpoint, query, raw, body):
        quirks = quirks_for(provider)
        clean, changed = vendor_body(body, quirks, model) if body else (body, False)
        data = (json_bytes(clean) if changed else raw) if body else None
        return (anthropic_url(provider, endpoint, query), data,
                vendor_headers(call.handler.headers, provider, quirks), None)

    def probe(self, provider):
        return None                 # no free call: vendors' model lists differ or 404

    def check_call(self, provider):
        body = dict(CHECK_CALL, model=provider.model or "claude-sonnet-4-5")
        return ("POST", anthropic_url(provider, "messages", ""), vendor_headers(
            None, provider, quirks_for(provider)) + [("content-type", "application/json")],
                json_bytes(body))


VERTEX_VERSION = "vertex-2023-10-16"     # Anthropic's Vertex API version, in the body
TOKEN_SECONDS = 600.0                    # a command's token is used this long at most
TOKEN_MARGIN = 60.0                      # a token is renewed this long before it expires
METADATA_TOKEN = ("/computeMetadata/v1/instance/service-accounts/default/token")


class Tokens:
    """OAuth access tokens for Vertex, per provider: printed by its token_command (run
    without a shell, e.g. gcloud auth print-access-token), else from the GCE/GKE
    metadata server.  One at a time is fetched; each is kept until shortly before it
    expires (a command's for TOKEN_SECONDS, since gcloud prints no lifetime) and
    dropped at once after a 401.  A token goes only to the provider's own host."""

    def __init__(self, environ=None):
        self.environ = os.environ if environ is None else environ
        self._lock, self._cache = threading.Lock(), {}

    def get(self, provider):
        key = (provider.name, provider.token_command)
        with self._lock:
            token, until = self._cache.get(key, ("", 0.0))
            if not token or time.monotonic() >= until:
                token, lifetime = self._fetch(provider)
                until = time.monotonic() + max(lifetime - TOKEN_MARGIN, 30.0)
                self._cache[key] = (token, until)
            return token

    def forget(self, provider):
        with self._lock:
            self._cache.pop((provider.name, provider.token_command), None)

    def _fetch(self, provider):
        """(token, its lifetime in seconds); HTTPError when none can be had."""
        try:
            return (self._run(provider.token_command) if provider.token_command
                    else self._metadata())
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            how = ("token_command %s" % provider.token_command[0] if provider.token_command
                   else "the metadata server (set token_command off Google Cloud)")
            raise HTTPError(500, "api_error", "ccproxy: no access token for provider %s "
                            "from %s: %s" % (provider.name, how, str(exc)[:200]),
                            (("x-should-retry", "false"),)) from exc

    @staticmethod
    def _run(command):
        out = subprocess.run(list(command), capture_output=True, timeout=30, text=True,
                             stdin=subprocess.DEVNULL)
        token = out.stdout.strip()
        if out.returncode or not token or any(c.isspace() for c in token):
            raise ValueError("exit %d, %s" % (out.returncode, (out.stderr.strip() or
                                                               "no token printed")[-200:]))
        return token, TOKEN_SECONDS

    def _metadata(self):
        host = self.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
        request = urllib.request.Request("http://%s%s" % (host, METADATA_TOKEN),
                                         headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            doc = json.loads(resp.read(65536))
        if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str):
            raise ValueError("no access_token in its answer")
        return doc["access_token"], float(doc.get("expires_in") or TOKEN_SECONDS)


def vertex_url(provider, model, stream):
    """Claude on Vertex: the model in the path, streamRawPredict for a stream (Google's
    Claude guide).  base_url replaces only the scheme and host (a private or VPC
    endpoint, or a test's loopback fake)."""
    return "%s/v1/projects/%s/locations/%s/publishers/anthropic/models/%s:%s" % (
        provider.base_url, urllib.parse.quote(provider.project, safe=""),
        urllib.parse.quote(provider.region, safe=""), urllib.parse.quote(model, safe="@"),
        "streamRawPredict" if stream else "rawPredict")


def cloud_body(body, model, version, quirks):
    """The client's body for Claude on a cloud: the rewrites its quirk flags say, the
    model out (it is in the URL), anthropic_version in; `stream` too goes on Bedrock,
    where the URL says it."""
    out = vendor_body(body, quirks, "")[0]
    out.pop("model", None)
    if version.startswith("bedrock"):
        out.pop("stream", None)
    out["anthropic_version"] = version
    return out


class VertexDialect(AnthropicDialect):
    """Claude on Google Cloud's Vertex AI: Anthropic's format with the model in the
    URL and an OAuth token; the stream is Anthropic's SSE, relayed as it comes."""

    forwards_client_key = lists_models = counts_tokens = False

    def __init__(self):
        self.tokens = Tokens()

    def prepare(self, call, provider, model, endpoint, query, raw, body):
        model = model or body.get("model", "")
        data = json_bytes(cloud_body(body, model, VERTEX_VERSION, quirks_for(provider)))
        return (vertex_url(provider, model, body.get("stream") is True), data,
                self._headers(call.handler.headers, provider), None)

    def _headers(self, client_headers, provider):
        quirks = quirks_for(provider)
        headers = [("content-type", "application/json"), ("accept-encoding", "identity"),
                   ("authorization", "Bearer " + self.tokens.get(provider))]
        betas = kept_betas(client_headers.get("anthropic-beta"), quirks["betas"]) if (
            client_headers is not None) else ""
        return with_provider_headers(headers + ([("anthropic-beta", betas)] if betas else []),
                                     provider)

    def renew(self, provider):
        self.tokens.forget(provider)
        return True

    def probe(self, provider):
        return None                       # no free call; check makes a one-token one

    def check_call(self, provider):
        body = dict(CHECK_CALL, anthropic_version=VERTEX_VERSION)
        return ("POST", vertex_url(provider, provider.model or "claude-sonnet-4-5", False),
                self._headers(None, provider), json_bytes(body))


BEDROCK_VERSION = "bedrock-2023-05-31"
IMDS = "http://169.254.169.254"          # EC2's instance metadata (IMDSv2)
CONTAINER_CREDENTIALS = "http://169.254.170.2"    # ECS's, for a relative URI


class AwsCredentials:
    """AWS credentials for Bedrock, found as the AWS SDKs find them: the environment
    (unless the provider names a profile), a profile of the shared credentials file,
    the container endpoint (ECS, EKS Pod Identity), then the instance metadata (IMDSv2,
    unless AWS_EC2_METADATA_DISABLED).  Kept until five minutes before they expire."""

    def __init__(self, environ=None):
        self.environ = os.environ if environ is None else environ
        self._lock, self._cache = threading.Lock(), {}

    def get(self, provider):
        """(access key, secret, session token); HTTPError when there are none."""
        with self._lock:
            creds, until = self._cache.get(provider.aws_profile, (None, 0.0))
            if creds is None or time.time() >= until:
                creds, until = self._find(provider)
                self._cache[provider.aws_profile] = (creds, until - 300.0)
            return creds

    def forget(self, provider):
        with self._lock:
            self._cache.pop(provider.aws_profile, None)

    def _find(self, provider):
        env = self.environ
        if not provider.aws_profile and env.get("AWS_ACCESS_KEY_ID") and env.get(
                "AWS_SECRET_ACCESS_KEY"):
            return (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                    env.get("AWS_SESSION_TOKEN", "")), time.time() + 3600.0
        found = self._profile(provider.aws_profile or env.get("AWS_PROFILE") or "default")
        try:
            found = found or self._container() or self._instance()
        except (OSError, ValueError) as exc:
            found = None
            why = str(exc)[:200]
        else:
            why = "none in the environment, the shared credentials file or the metadata"
        if not found:
            raise HTTPError(500, "api_error", "ccproxy: no AWS credentials for provider %s "
                            "(%s); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a "
                            "profile, or api_key for a Bedrock API key"
                            % (provider.name, why), (("x-should-retry", "false"),))
        return found

    def _profile(self, name):
        import configparser              # here: only where the environment has none
        path = self.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(
            os.path.expanduser("~"), ".aws", "credentials")
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            return None
        if not parser.has_option(name, "aws_access_key_id"):
            return None
        get = lambda key: parser.get(name, key, fallback="")  # noqa: E731
        return (get("aws_access_key_id"), get("aws_secret_access_key"),
                get("aws_session_token")), time.time() + 3600.0

    def _container(self):
        env = self.environ
        url = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or (
            CONTAINER_CREDENTIALS + env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] if env.get(
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") else "")
        if not url:
            return None
        token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
        return self._credentials_document(_get_json(url, {"Authorization": token} if token
                                                    else {}))

    def _instance(self):
        env = self.environ
        if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            return None
        base = (env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS).rstrip("/")
        request = urllib.request.Request(base + "/latest/api/token", method="PUT", headers={
            "X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        with urllib.request.urlopen(request, timeout=2) as resp:
            token = resp.read(4096).decode()
        headers = {"X-aws-ec2-metadata-token": token}
        path = base + "/latest/meta-data/iam/security-credentials/"
        role = _get_text(path, headers).split()[0]
        return self._credentials_document(_get_json(path + role, headers))

    @staticmethod
    def _credentials_document(doc):
        if not isinstance(doc, dict) or not doc.get("AccessKeyId"):
            raise ValueError("no AccessKeyId in the metadata's answer")
        expiry = doc.get("Expiration") or ""
        try:
            until = calendar_seconds(expiry)
        except ValueError:
            until = time.time() + 900.0
        return (doc["AccessKeyId"], doc.get("SecretAccessKey", ""), doc.get("Token", "")), until


def calendar_seconds(stamp):
    """Seconds since the epoch of an ISO 8601 UTC time (2026-12-07T10:00:00Z)."""
    parsed = datetime.datetime.strptime(stamp.replace("Z", "+0000")[:24],
                                        "%Y-%m-%dT%H:%M:%S%z")
    return parsed.timestamp()


def _get_text(url, headers):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=2) as resp:
        return resp.read(65536).decode()


def _get_json(url, headers):
    return json.loads(_get_text(url, headers))


def bedrock_url(provider, model, stream):
    """Claude on Bedrock (its Claude guide): the model id in the path, percent-encoded
    (its ":" is %3A), invoke-with-response-stream for a stream."""
    return "%s/model/%s/%s" % (provider.base_url, urllib.parse.quote(model, safe=""),
                               "invoke-with-response-stream" if stream else "invoke")


class BedrockDialect(AnthropicDialect):
    """Claude on Amazon Bedrock: Anthropic's body with anthropic_version and the betas
    in it, the model id in the URL, signed with SigV4 (or a Bedrock API key as a bearer
    token); a stream comes back in AWS's binary event stream and is relayed to the
    client as Anthropic SSE, event by event as it arrives."""

    forwards_client_key = lists_models = counts_tokens = False
    anthropic_errors = False
    renew_on = (401, 403)        # AWS answers an expired session token with a 403

    def __init__(self):
        self.credentials = AwsCredentials()

    def prepare(self, call, provider, model, endpoint, query, raw, body):
        model = model or body.get("model", "")
        return self._request(provider, model, body, call.handler.headers,
                             body.get("stream") is True)

    def _request(self, provider, model, body, client_headers, stream):
        quirks = quirks_for(provider)
        out = cloud_body(body, model, BEDROCK_VERSION, quirks)
        betas = kept_betas(client_headers.get("anthropic-beta") if client_headers is not None
                           else "", quirks["betas"])
        if betas:
            out["anthropic_beta"] = betas.split(",")
        data, url = json_bytes(out), bedrock_url(provider, model, stream)
        headers = [("content-type", "application/json"), ("accept", "application/json")]
        if provider.api_key:
            auth = [("authorization", "Bearer " + provider.api_key)]
        else:
            auth = sigv4_headers("POST", url, headers, data, self.credentials.get(provider),
                                 provider.region, "bedrock", time.time())
        return (url, data, with_provider_headers(headers + auth + [
            ("accept-encoding", "identity")], provider), None)

    @staticmethod
    def relay(call, client, resp, tr, want_stream, rename):
        """Bedrock's answer, relayed by the call's Exchange (`call`; called by
        Exchange.forward, so no frame more): an event stream as Anthropic SSE, frame by
        frame as it arrives; anything else (a whole message) as Exchange._relay does."""
        if "eventstream" not in (resp.headers.get("content-type") or ""):
            return call._relay(client, resp, tr, want_stream, rename)
        chunked = call.handler.request_version == "HTTP/1.1"
        call.handler.close_connection = call.handler.close_connection or not chunked
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")
        resp.headers = None
        call._write(call.handler._head(200, SSE_HEADERS, (framing,)))
        call.access.stream_ttfb = time.monotonic() - call.handler.t0
        done, scanner = False, UsageScanner()
        try:
            done = BedrockDialect.pump(call, resp, rename, _chunk if chunked else bytes,
                                       scanner)
        finally:
            client.release(resp) if done else client.discard(resp)
            call.access.update(input_tokens=scanner.input_tokens,
                               output_tokens=scanner.output_tokens,
                               usage=usage_split(scanner.usage))
        if chunked:
            call._write(b"0\r\n\r\n")

    @staticmethod
    def pump(call, resp, rename, frame, scanner):
        """Read, decode and write each frame the moment it is read; True when the
        upstream ended cleanly.  A broken frame or an exception frame ends the stream
        with an SSE error event (the head is out by then)."""
        parser = EventStreamParser(call.service.config.max_event_bytes)
        while True:
            try:
                data = resp.read1(RELAY_CHUNK)
                out = b"".join(bedrock_event(h, p, rename) for h, p in parser.feed(data))
            except (OSError, http.client.HTTPException, ValueError, UpstreamReplyError) as exc:
                etype = exc.etype if isinstance(exc, UpstreamReplyError) else "api_error"
                call.access.upstream_status = "stream_error"
                call._write(frame(StreamTranslator.error(etype, "upstream stream failed: %s"
                                                         % _os_error_text(exc))))
                return False
            if not data and parser.buffer:        # the upstream ended inside a frame
                out += StreamTranslator.error("api_error", "upstream stream ended early")
            if out:
                scanner.feed(out)
                call._write(frame(out))
            if not data:
                return not parser.buffer

    def renew(self, provider):
        self.credentials.forget(provider)
        return not provider.api_key

    def probe(self, provider):
        return None

    def check_call(self, provider):
        body = dict(CHECK_CALL)
        url, data, headers, _ = self._request(provider, provider.model or
                                              "anthropic.claude-sonnet-4-5-20250929-v1:0",
                                              body, None, False)
        return "POST", url, headers, data


#: The dialects by the name PROVIDER_TYPES gives them.
DIALECTS = {"anthropic": AnthropicDialect(), "openai": OpenAIChatDialect(),
            "responses": ResponsesDialect(),
            "anthropic-compatible": AnthropicCompatibleDialect(), "vertex": VertexDialect(),
            "bedrock": BedrockDialect()}


# ---- HTTP server and handler ---------------------------------------------------------

class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a real backlog, no DNS at bind, and a heartbeat."""

    request_queue_size = LISTEN_BACKLOG      # must be a class attribute: read in __init__
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, service, reuse_port=False):
        self.service, self.reuse_port = service, reuse_port
        self.address_family = _address_family(address[0])
        self.slots = threading.BoundedSemaphore(service.config.max_connections)
        self.reserve = threading.BoundedSemaphore(RESERVE_CONNECTIONS)
        overflow = type("Overflow" + handler.__name__, (handler,), {"overflow": True})
        # Built once: every thread keeps its arguments for as long as its connection.
        self.normal, self.spare = (self.slots, handler), (self.reserve, overflow)
        self.started = _thread.allocate_lock()       # see _serve; only the accept loop
        self.started.acquire()                       # waits on it
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        """A thread per connection up to max_connections; then a few reserve slots that
        serve only the probe endpoints (long streams must not starve /health); then a
        fixed 503 written without a thread."""
        self.service.connection_opened()
        if self.slots.acquire(blocking=False):
            slot = self.normal
        elif self.reserve.acquire(blocking=False):
            slot = self.spare
        else:
            log.warning("connection limit (%d) reached: answering 503",
                        self.service.config.max_connections)
            self.service.connection_opened(-1)
            return self._refuse(request)
        try:
            _thread.start_new_thread(self._serve, (request, client_address, slot))
        except RuntimeError as exc:           # "can't start new thread": out of memory
            log.error("cannot start a thread for %s: %s", client_address[0], exc)
            slot[0].release()
            self.service.connection_opened(-1)
            return self._refuse(request)
        self.started.acquire()

    def _serve(self, request, client_address, slot):
        """One connection, on its own thread.  A bare _thread, not threading.Thread:
        that one costs 2.5 KB more per connection (an Event, a Condition, a name, a
        registry entry), which is 2.5 MB per 1000 open streams.  What Thread.start did
        that matters is kept: process_request waits on `self.started` until this thread
        runs, so the accept loop never runs ahead of the threads it starts; a burst of
        1000 connections is taken in turn and few of them parse a body at the same moment
        (make bench: without the wait, 1000 streams took 64-73 MB instead of 61)."""
        self.started.release()
        try:
            slot[1](request, client_address, self).serve()
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot[0].release()

    def _refuse(self, request):
        try:
            request.settimeout(1.0)
            request.sendall(REFUSAL)
        except OSError:
            pass
        self.shutdown_request(request)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that stalls start-up
        # for seconds on hosts without a resolver; we never need the name.
        if self.reuse_port:      # workers share the port; the kernel spreads connections
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        http.server.socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def service_actions(self):
        self.service.heartbeat = time.monotonic()

    def handle_error(self, request, client_address):
        log.exception("unhandled error serving %s", client_address)


_REFUSAL_BODY = error_body("overloaded_error", "ccproxy is at its connection limit; "
                           "retry shortly")
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
           % (len(_REFUSAL_BODY), _REFUSAL_BODY))


def _address_family(host):
    try:
        return socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, IndexError):
        return socket.AF_INET


class Handler(http.server.BaseHTTPRequestHandler):
    """One client connection.  Methods read the request, call a pure function, write.

    Every failure goes through _send_error as an Anthropic-shaped JSON error; no
    exception reaches the socket.
    """

    protocol_version = "HTTP/1.1"
    server_version = "ccproxy/" + __version__
    rbufsize = READ_BUFFER
    status_only = False          # the optional status listener serves /status* only
    overflow = False             # a reserve slot past max_connections: probes only
    # Every attribute, the base classes' included, in slots: no per-connection __dict__
    # (about 1 KB each; 1000 open streams 58 -> 57 MB).  A new attribute belongs here
    # (test_handler_state_lives_in_slots).
    __slots__ = ("request", "client_address", "server", "connection", "rfile", "wfile",
                 "timeout", "raw_requestline", "requestline", "command", "request_version",
                 "close_connection", "path", "headers", "_headers_buffer",
                 "requests_here", "fresh", "request_id", "t0", "sent", "access", "body_read",
                 "length")

    def __init__(self, request, client_address, server):
        # The state only; Server._serve calls serve().  BaseRequestHandler.__init__
        # serves the whole connection inside the constructor, one C call level (0.8 KB
        # of C stack) deeper.  The budget that matters is 8 KB: glibc and the thread's
        # entry take 5.4 KB, and a thread that never goes past 8 KB keeps two stack
        # pages, not three (1000 open streams: 58 -> 54 MB; measured by reading the
        # stack high-water mark of each thread from /proc/PID/mem).
        self.request, self.client_address, self.server = request, client_address, server

    def serve(self):
        """The connection from start to end: BaseRequestHandler.__init__, with
        BaseHTTPRequestHandler.handle's loop inline (a frame less, as above)."""
        self.setup()
        try:
            self.close_connection = True
            self.handle_one_request()
            while not self.close_connection:
                self.handle_one_request()
        finally:
            self.finish()

    def setup(self):
        self.timeout = self.server.service.config.idle_timeout
        self.requests_here, self.fresh = 0, True     # fresh: counted as connecting
        self.access = None                           # a request's AccessRecord
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass                 # not TCP (tests use socketpairs)

    def finish(self):
        try:
            super().finish()
        finally:
            if self.fresh:               # the connection ended without a request
                self.fresh = False
                self.server.service.connection_opened(-1)

    def handle_one_request(self):
        deadlines = self.server.service.deadlines
        try:
            # Wait (up to idle_timeout) for the first byte of the next request; the head
            # deadline runs from there, so keep-alive idling is not cut short.
            if not self._await_request():
                self.close_connection = True
                return
            self.request_id, self.t0, self.sent = new_request_id(), time.monotonic(), False
            self.access, self.body_read = AccessRecord(self.request_id,
                                                       self.client_address[0]), False
            deadlines.arm(self.connection, self.server.service.config.header_timeout, "head")
            super().handle_one_request()
        except (ConnectionError, socket.timeout):
            self.close_connection = True      # the client left; nothing to answer
        finally:
            deadlines.disarm(self.connection)

    def _await_request(self):
        """True once the next request's first byte is here; False when the client left,
        or when a keep-alive connection would wait for another request while draining.
        A request whose bytes arrived is always served (with Connection: close)."""
        service = self.server.service
        if service.draining and self.requests_here:
            return False
        if self.connection is not None and self.requests_here:
            with service._idle:
                service.waiting.add(self.connection)
        elif self.connection is not None:
            self.connection.settimeout(min(self.timeout, RESERVE_FIRST_WAIT if self.overflow
                                           else FIRST_REQUEST_WAIT))
        try:
            return bool(self.rfile.peek(1))
        finally:
            if not self.requests_here and self.connection is not None:
                self.connection.settimeout(self.timeout)
            self.requests_here += 1
            with service._idle:
                service.waiting.discard(self.connection)

    # -- dispatch -------------------------------------------------------------

    def _dispatch(self):
        service = self.server.service
        service.deadlines.disarm(self.connection)        # the head is in
        service.begin_request(self.fresh)
        self.fresh = False
        try:
            self._route()
        except HTTPError as exc:
            self._send_error(exc.status, exc.etype, exc.message, exc.headers, exc.close)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except RecursionError:
            self._send_error(400, "invalid_request_error", "request is nested too deeply")
        except Exception:
            log.exception("%s internal error on %s %s", self.request_id, self.command,
                          escape_log(self.path.partition("?")[0]))
            if self.sent:
                self.close_connection = True
            else:
                self._send_error(500, "api_error", "internal error in ccproxy (request id "
                                 "%s)" % self.request_id, close=True)
        finally:
            service.end_request()
            self._log_access()

    # Every method straight to _dispatch (no do_GET calling it: a frame less under
    # the deepest point of every stream's thread, see _LeanResponse.begin).
    do_GET = do_POST = do_HEAD = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = _dispatch

    def _route(self):
        path, _, query = self.path.partition("?")
        endpoint = self._precheck(path)
        if self.command == "OPTIONS":
            return self._send(204, self._cors_preflight())
        name = self.access.route = endpoint[0]
        if name in ("messages", "count_tokens"):
            return self._proxy(name, query)
        getattr(self, "_ep_" + name)(query)

    def _precheck(self, path):
        """Everything decided before the body is read: endpoint, method, auth, size."""
        endpoint = resolve_endpoint(path, self.status_only)
        if path == "/" and wants_html(self.headers):
            endpoint = LOCAL_ENDPOINTS["/ui"]      # a browser gets the status page
        if endpoint is None:
            raise HTTPError(404, "not_found_error", "no endpoint %s %s" % (
                self.command, escape_log(path)[:200]))
        if self.overflow and path not in LOCAL_ENDPOINTS:
            raise HTTPError(503, "overloaded_error", "ccproxy is at its connection limit; "
                            "retry shortly", (("Retry-After", "1"),), close=True)
        name, methods, auth = endpoint
        allowed = methods + ("HEAD",) if "GET" in methods else methods
        if self.command == "OPTIONS" and self._cors_origin():
            return endpoint
        if self.command not in allowed:
            raise HTTPError(405, "invalid_request_error", "method %s not allowed on %s"
                            % (self.command, path), (("allow", ", ".join(allowed)),))
        # Auth and size are decided from the head alone (docs/security.md §3): a refused
        # request never makes us read, or wait for, a body of tens of MB.
        self._check_auth(auth, challenge=name == "ui")
        if self.command == "POST":
            self.length = body_length(self.headers, self.server.service.config.max_body_bytes)
        return endpoint

    def _check_auth(self, auth, challenge=False):
        """Loopback, or a client key; the key's name goes on the access line."""
        self.access.key = self.server.service.authorise(auth, self.client_address[0],
                                                        self.headers, challenge)

    def parse_request(self):
        """BaseHTTPRequestHandler.parse_request with read_head() for the email package:
        a Claude Code request's head (21 fields) in 20 us instead of 43.  Stricter
        where a proxy must be: a blank before a colon, a line that is no field, or
        obs-fold is refused with 400 (RFC 9112 §5.1, §5.2: request smuggling), where
        the email package ended the head there and took the rest for the body."""
        self.command, self.request_version = None, self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if not self.requestline.split():
            return False
        error = None
        try:
            self.command, self.path, self.request_version, keep_alive = parse_request_line(
                self.requestline, self.protocol_version)
            self.close_connection = not keep_alive
            self.headers = read_head(self.rfile, strict=True)
        except HTTPError as exc:
            error = exc.status, exc.message
        except http.client.LineTooLong:
            error = 431, "Line too long"
        except http.client.HTTPException:
            error = 431, "Too many headers"
        except ValueError as exc:
            error = 400, str(exc)
        if error:
            self.send_error(*error)
            return False
        return self._connection_and_expect()

    def _connection_and_expect(self):
        """The end of BaseHTTPRequestHandler.parse_request: Connection, then Expect."""
        connection = (self.headers.get("Connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = (self.headers.get("Expect") or "").lower()
        if (expect == "100-continue" and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def handle_expect_100(self):
        """Answer Expect: 100-continue with the final error instead of 100 when the
        request will be refused anyway (a 413 or 401 before the client sends MBs)."""
        try:
            self._precheck(self.path.partition("?")[0])
        except HTTPError:
            return True           # no 100; _dispatch re-runs the check and answers
        return super().handle_expect_100()

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (400, 414, 431, 501) in Anthropic shape."""
        etype = {413: "request_too_large", 404: "not_found_error"}.get(
            code, "invalid_request_error")
        if self.access is not None:
            self.access.method = self.access.method or escape_log(self.command or "-")
        self._send_error(code, etype, message or http.client.responses.get(code, "error"),
                         close=True)
        self._log_access()

    # -- reading and writing ---------------------------------------------------

    def _read_body(self):
        """Exactly Content-Length bytes (checked against the limit in _precheck), within
        body_timeout from the end of the head."""
        deadlines = self.server.service.deadlines
        deadlines.arm(self.connection, self.server.service.config.body_timeout, "body")
        try:
            data = self.rfile.read(self.length) if self.length else b""
        finally:
            deadlines.disarm(self.connection)
        if len(data) != self.length:
            raise ConnectionResetError("client sent %d of %d body bytes"
                                       % (len(data), self.length))
        self.body_read = True
        return data

    def _head(self, status, headers, extra=()):
        """The status line and headers as bytes, with our own request-id and framing."""
        lines = ["HTTP/1.1 %d %s" % (status, http.client.responses.get(status, "Unknown")),
                 "Server: " + self.server_version, "Date: " + _http_date(),
                 "request-id: " + self.request_id]
        for name, value in list(headers) + list(extra) + self._cors_headers():
            if header_value_ok(name) and header_value_ok(str(value)):
                lines.append("%s: %s" % (name, value))
        if self._closing():
            lines.append("Connection: close")
        self.access.status = status
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    def _closing(self):
        if self.server.service.draining or (self.command == "POST" and not self.body_read):
            self.close_connection = True      # Envoy's "discourage" while draining
        return self.close_connection

    def _write(self, data):
        self.sent = True
        if self.access is not None and self.access.tape is not None:
            self.access.tape.wrote(data)
        self.wfile.write(data)

    def _send(self, status, headers=(), body=b"", close=False):
        """A complete response in one write (head and body together: no Nagle stall)."""
        if close:
            self.close_connection = True
        if not any(n.lower() == "content-type" for n, _ in headers) and body:
            headers = list(headers) + [("Content-Type", "application/json")]
        head = self._head(status, headers, (("Content-Length", str(len(body))),))
        self._write(head if self.command == "HEAD" else head + body)

    def _send_json(self, status, doc, headers=()):
        body = json.dumps(doc, indent=None).encode()
        self._send(status, list(headers) + [("Content-Type", "application/json"),
                                            ("Cache-Control", "no-store")], body)

    def _send_error(self, status, etype, message, headers=(), close=False):
        if self.sent:
            self.close_connection = True
            return
        self.access.error = etype
        body = error_body(etype, message, self.request_id)
        self._send(status, list(headers) + [("Content-Type", "application/json")], body,
                   close)

    def _log_access(self):
        """The request's access line and metrics, once: the record is dropped after."""
        record, self.access = self.access, None
        if record is None:
            return
        record.update(method=record.method or self.command or "-",
                      path=(getattr(self, "path", "") or "-").partition("?")[0][:300],
                      latency_ms=int((time.monotonic() - self.t0) * 1000))
        record.status = "-" if record.status is None else record.status
        if log.isEnabledFor(logging.INFO):   # 20 us per request to build, seen by no one
            fields = dict(record.items())
            log.info(access_record(fields), extra={"access": fields})
        self._observe(record)
        self.server.service.account(record)
        if record.tape is not None:
            self.server.service.recorder.finish(record, record.tape)

    def _observe(self, record):
        """Metrics for the request just answered (labels from fixed sets only)."""
        metrics = self.server.service.metrics
        code = record.status if isinstance(record.status, int) else 0
        metrics.observe_request(record.route or "other", code, record.latency_ms / 1000.0,
                                record.stream_ttfb, record.provider)
        if record.provider:
            metrics.add_tokens(record.provider, record.input_tokens, record.output_tokens)

    def log_message(self, format, *args):
        log.debug("%s %s", self.client_address[0], escape_log(format % args))

    # -- CORS -------------------------------------------------------------------

    def _cors_origin(self):
        headers = getattr(self, "headers", None)     # unset when the request line failed
        origin = headers.get("origin") if headers else None
        return origin if origin and origin in self.server.service.config.cors_origins else ""

    def _cors_headers(self):
        origin = self._cors_origin()
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")] if origin else []

    def _cors_preflight(self):
        return [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                ("Access-Control-Allow-Headers", self.headers.get(
                    "access-control-request-headers") or "content-type, x-api-key"),
                ("Access-Control-Max-Age", "600")]

    # -- local endpoints --------------------------------------------------------

    def _ep_health(self, query):
        alive = self.server.service.alive()
        self._send_json(200 if alive else 503, health_document(alive, self.server.service))

    def _ep_ready(self, query):
        reason = self.server.service.not_ready()
        if reason is None:
            return self._send_json(200, {"status": "ok"})
        self._send_json(503, {"status": "error", "error": reason}, (("Retry-After", "1"),))

    def _ep_status(self, query):
        self._send_json(200, status_document(self.server.service.whole_service()))

    def _ep_detailed(self, query):
        snap = self.server.service.snapshot()
        self._send_json(200 if snap.ready else 503, detailed_health_document(snap))

    def _ep_metrics(self, query):
        service = self.server.service
        if not service.config.metrics:
            raise HTTPError(404, "not_found_error", "metrics are off (CCPROXY_METRICS=0)")
        text = render_metrics(metrics_families(service.whole_service()))
        self._send(200, [("Content-Type", METRICS_CONTENT_TYPE),
                         ("Cache-Control", "no-store")], text.encode())

    def _ep_usage(self, query):
        """The ledger's totals as `ccproxy usage --json` prints them (?since=&by=)."""
        self._send_json(200, usage_answer(self.server.service.config.usage_db, query))

    def _ep_ui(self, query):
        """The status page for people (docs/operating.md §11); ?fragment=1 is its body,
        which the page fetches to refresh itself."""
        page = self.server.service.page(fragment="fragment=1" in (query or ""))
        self._send(200, list(PAGE_HEADERS), page.encode())

    def _ep_hello(self, query):
        self._send_json(200, {"service": "ccproxy", "version": __version__})

    def _ep_models(self, query):
        config = self.server.service.config
        provider = config.providers[0]
        if not dialect_of(provider).lists_models:
            return self._send_json(200, models_document(config, functools.partial(
                self.server.service.windows.limits, config)))
        Exchange(self).forward([(provider, "")], "models", query, "GET", {})

    # -- the proxy --------------------------------------------------------------

    def _proxy(self, endpoint, query):
        """Read and check the call's body, then hand it to the call's Exchange."""
        raw = decode_body(self._read_body(), self.headers.get("content-encoding"),
                          self.server.service.config.max_body_bytes)
        if self.server.service.recorder is not None:
            self.access.tape = Tape(self.command, self.path, self.headers, raw)
        body = parse_json_object(raw, self.server.service.members)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPError(400, "invalid_request_error", "model: a model name is required")
        if not isinstance(body.get("messages"), list):
            raise HTTPError(400, "invalid_request_error", "messages: a list is required")
        self.access.update(model=model, session=session_id(self.headers, body))
        plan = self._plan(model, body, endpoint)
        if self._answered_here(endpoint, plan[0][0], body):
            return
        # Handed over in a holder that forward() empties as it goes, so a long stream
        # does not keep a 50 KB body (100 KB parsed) alive (see _take_body).
        request = {"raw": raw, "body": body}
        del raw, body
        Exchange(self).forward(plan, endpoint, query, "POST", request)

    def _plan(self, model, body, endpoint):
        """The call's plan: its route (by scenario, name or the user's pick), logged and
        counted with why (docs/operating.md §6), and a Messages call admitted by its
        client key's limits (a frame of its own: _proxy's stays small, see
        TestStreamThreadBudget)."""
        service = self.server.service
        config = service.config
        route, reason = choose_route(config, model, body, self.headers) if (
            config.routes or "," in model) else (None, None)
        if reason:
            name = route.name or "routes[%d]" % config.routes.index(route)
            self.access.update(rule=name, reason=reason)
            service.metrics.observe_route(name, reason)
        if endpoint == "messages":
            service.admit(self.access.key, route, reason)
        return plan_route(config, model, route)

    def _answered_here(self, endpoint, provider, body):
        """True once a call was answered without an upstream call: count_tokens on a
        translated route (estimated), WebSearch on a route that cannot search."""
        if endpoint == "count_tokens" and not dialect_of(provider).counts_tokens:
            doc = {"input_tokens": self.server.service.count_tokens(provider, body)}
        elif dialect_of(provider).translated and search_only(body) and not quirks_for(
                provider)["web_search"]:
            doc = search_unavailable(body, provider.name, estimate_input_tokens(body))
        else:
            return False
        self.access.provider = provider.name
        if endpoint == "messages" and body.get("stream") is True:
            self._send(200, SSE_HEADERS, synthesize_stream(doc))
        else:
            self._send_json(200, doc)
        return True

class StatusHandler(Handler):
    """The optional second listener: /status*, /health* only (APISIX status server)."""
    status_only = True


# ---- Recordings: a call as it went on the wire (docs/operating.md §12) ----------------

#: Headers whose values are credentials: never written to a recording.
SECRET_HEADERS = frozenset((
    "authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization",
    "cookie", "set-cookie", "x-amz-security-token", "x-amz-content-sha256"))
#: What looks like a key wherever it appears (OpenAI's and Anthropic's sk-, Google's AIza,
#: AWS access key ids, GitHub and Slack tokens, a bearer token in text).
KEY_LIKE = re.compile(rb"sk-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{20,}|AKIA[0-9A-Z]{16}|"
                      rb"gh[pousr]_[A-Za-z0-9]{20,}|xox[abpr]-[A-Za-z0-9\-]{8,}|"
                      rb"(?<=[Bb]earer )[A-Za-z0-9_\-.~+/=]{8,}")
#: URL query parameters that carry credentials (Gemini's key=, signed URLs).
SECRET_PARAMS = re.compile(r"(?i)([?&](?:key|api[-_]?key|token|access_token|sig|"
                           r"signature|x-amz-[a-z-]+)=)[^&]*")
#: Under "redact": "content", the string values kept (structure, not prose): the rest
#: become same-length placeholders.
STRUCTURE_KEYS = frozenset((b"type", b"role", b"id", b"tool_use_id", b"call_id", b"name",
                            b"model", b"stop_reason", b"finish_reason", b"object",
                            b"status", b"media_type", b"code", b"event", b"effort"))
#: String values that hold JSON text (a tool call's arguments, streamed or whole): their
#: numbers and true/false/null stay too, so the JSON stays JSON.
JSON_TEXT_KEYS = frozenset((b"arguments", b"partial_json"))
_JSON_WORDS = re.compile(rb"\b(?:true|false|null)\b")
RECORD_MAX_BYTES = 8 << 20        # a call's bytes kept for its recording; past it, cut
RECORD_MODES = ("all", "errors")
RECORD_REDACTIONS = ("keys", "content")


class Tape:
    """One proxied call on the wire as it happens (issue #26): the client's request,
    each upstream attempt (its request, its answer's every read with its time), and
    what ccproxy wrote back.  Kept in memory until the call ends; Recorder writes it."""

    __slots__ = ("t0", "client", "attempts", "writes", "size", "flags")

    def __init__(self, method, path, headers, body):
        self.t0, self.size, self.flags = time.monotonic(), len(body), set()
        self.client = {"method": method, "path": path, "headers": list(headers.items()),
                       "body": body}
        self.attempts, self.writes = [], []

    def attempt(self, provider, url, headers, body):
        self.attempts.append({"provider": recorded_provider(provider), "url": url,
                              "headers": list(headers), "body": body or b"",
                              "status": None, "reply_headers": [], "reads": []})

    def answer(self, status, headers):
        if self.attempts:
            self.attempts[-1].update(status=status, reply_headers=list(headers.items()))

    def read(self, data):
        if self.attempts and self.size < RECORD_MAX_BYTES:
            self.size += len(data)
            self.attempts[-1]["reads"].append((time.monotonic() - self.t0, data))

    def wrote(self, data):
        if self.size < RECORD_MAX_BYTES:
            self.size += len(data)
            self.writes.append((time.monotonic() - self.t0, data))


def recorded_provider(provider):
    """What a replay needs of a provider: its type and translation settings, never its
    key, its headers or where it is."""
    return {"name": provider.name, "type": provider.type, "model": provider.model,
            "big_model": provider.big_model, "small_model": provider.small_model,
            "api_version": provider.api_version, "quirks": dict(provider.quirks),
            "context_window": provider.context_window}


def redact_bytes(data, secrets, content):
    """`data` with every configured secret and whatever looks like a key replaced by
    asterisks of the same length, and with `content`, prose replaced too
    (redact_content): the length of each read stays, so its boundaries do."""
    for secret in secrets:
        data = data.replace(secret, b"*" * len(secret))
    data = KEY_LIKE.sub(lambda m: b"*" * len(m.group()), data)
    return redact_content(data) if content else data


def redact_content(data):
    """JSON string values that are not structure (STRUCTURE_KEYS) with their letters,
    digits and other text as "x", byte for byte; keys, escapes and JSON punctuation
    stay, so a stream's shape and a tool call's JSON stay reproducible.  Text outside
    strings (SSE field names, numbers) stays too."""
    out, stack, pending, i, n = bytearray(data), [], None, 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x22:                                   # a string
            j = _string_end(data, i + 1)
            k = j + 1
            while k < n and data[k] in b" \t\r\n":
                k += 1
            if k < n and data[k] == 0x3A:               # a key
                pending = data[i + 1:j]
            else:
                owner = pending if pending is not None else (stack[-1] if stack else None)
                if owner not in STRUCTURE_KEYS:
                    _blank(out, i + 1, j, owner in JSON_TEXT_KEYS)
                pending = None
            i = j + 1
            continue
        if c in b"{[":
            stack.append(pending)
            pending = None
        elif c in b"}]" and stack:
            stack.pop()
        elif c not in b" \t\r\n:,":
            pending = None                              # a number or a literal
        i += 1
    return bytes(out)


def _string_end(data, i):
    """The index of the quote that ends the string whose content starts at `i`."""
    n = len(data)
    while i < n and data[i] != 0x22:
        i += 2 if data[i] == 0x5C else 1
    return min(i, n)


def _blank(out, start, end, json_text=False):
    """Text between `start` and `end` as x, escapes and JSON punctuation kept (and in
    JSON text, numbers and true/false/null)."""
    keep = bytearray(end - start)
    if json_text:
        for m in _JSON_WORDS.finditer(bytes(out[start:end])):
            keep[m.start():m.end()] = b"\x01" * (m.end() - m.start())
    i = start
    while i < end:
        if out[i] == 0x5C:                              # an escape: \\n, \\", \\uXXXX
            i += 6 if i + 1 < end and out[i + 1] == 0x75 else 2
            continue
        if out[i] not in b"{}[]:, \t\r\n" and not keep[i - start] and not (
                json_text and out[i] in b"0123456789.-+"):
            out[i] = 0x78
        i += 1


def recorded_url(url, secrets=()):
    """A URL without userinfo and without credential parameters."""
    url = SECRET_PARAMS.sub(lambda m: m.group(1) + "[redacted]", url)
    for secret in secrets:
        url = url.replace(secret.decode("utf-8", "replace"), "[redacted]")
    return re.sub(r"//[^/@]*@", "//", url)


def redact_headers(headers, secrets=()):
    """Headers as a recording holds them: credentials out."""
    return [[k, "[redacted]" if k.lower() in SECRET_HEADERS else redact_bytes(
        v.encode("utf-8", "surrogateescape"), secrets, False).decode(
            "utf-8", "surrogateescape")] for k, v in headers]


def tape_bytes(data):
    """Bytes as a recording holds them: text where they are UTF-8, else base64."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def tape_data(doc):
    """A recording's data back to bytes."""
    return doc["text"].encode("utf-8") if "text" in doc else base64.b64decode(doc["b64"])


def redact_reads(reads, secrets, content):
    """Each read redacted as one text, then cut again at the same boundaries."""
    whole = redact_bytes(b"".join(d for _, d in reads), secrets, content)
    out, at = [], 0
    for t, data in reads:
        out.append([round(t, 6), tape_bytes(whole[at:at + len(data)])])
        at += len(data)
    return out


def recording_lines(tape, meta, secrets, content):
    """The recording of one call, as JSON lines (docs/operating.md §12)."""
    client = tape.client
    lines = [dict(meta, ccproxy_recording=1, version=__version__,
                  redact="content" if content else "keys"),
             {"client_request": {"method": client["method"], "path": recorded_url(
                 client["path"], secrets), "headers": redact_headers(client["headers"],
                                                                     secrets),
                 "body": tape_bytes(redact_bytes(client["body"], secrets, content))}}]
    for a in tape.attempts:
        lines.append({"attempt": {
            "provider": a["provider"], "url": recorded_url(a["url"], secrets),
            "headers": redact_headers(a["headers"], secrets),
            "body": tape_bytes(redact_bytes(a["body"], secrets, content)),
            "status": a["status"], "reply_headers": redact_headers(a["reply_headers"],
                                                                   secrets),
            "reads": redact_reads(a["reads"], secrets, content)}})
    lines.append({"client_response": {"writes": redact_reads(tape.writes, secrets,
                                                             content)}})
    return [json.dumps(line, ensure_ascii=False) for line in lines]


def make_recorder(config):
    """The config's Recorder, or None; it redacts every key the config holds."""
    if not config.record:
        return None
    directory, mode, redact, max_files, max_mb = config.record
    secrets = [config.api_key] + [p.api_key for p in config.providers] + [
        k.key for k in config.client_keys]
    return Recorder(directory, mode, redact, secrets, max_files, max_mb << 20)


class Recorder:
    """Writes the tapes of finished calls (all, or those that ended badly) as files of
    one call each, in `dir`, at most `max_files` and `max_bytes` of them: the oldest go
    first.  Writing happens after the call answered; a failure to write is logged."""

    def __init__(self, directory, mode, redact, secrets, max_files=1000,
                 max_bytes=256 << 20):
        self.dir, self.mode, self.content = directory, mode, redact == "content"
        self.secrets = sorted({s.encode("utf-8", "surrogatepass") for s in secrets if s},
                              key=len, reverse=True)
        self.max_files, self.max_bytes, self._lock = max_files, max_bytes, threading.Lock()

    def keeps(self, record, tape):
        """Whether this call is recorded: every call, or (errors) one that ended in an
        error, with a repaired tool call, or with a stream cut or fixed."""
        if self.mode == "all":
            return True
        status = record.status if isinstance(record.status, int) else 500
        return status >= 400 or bool(tape.flags) or record.upstream_status in (
            "stream_error",) or bool(record.error)

    def finish(self, record, tape):
        if not self.keeps(record, tape):
            return None
        meta = {"request_id": record.request_id, "time": iso_time(time.time()),
                "route": record.route, "status": record.status,
                "upstream_status": record.upstream_status, "error": record.error,
                "flags": sorted(tape.flags)}
        path = os.path.join(self.dir, "%s-%s.jsonl" % (time.strftime(
            "%Y%m%dT%H%M%S", time.gmtime()), record.request_id))
        try:
            text = "\n".join(recording_lines(tape, meta, self.secrets, self.content)) + "\n"
            with self._lock:
                os.makedirs(self.dir, 0o700, exist_ok=True)
                write_new_file(path, text.encode("utf-8"), 0o600)
                self._rotate()
        except OSError as exc:
            log.warning("recording %s: cannot write %s: %s", record.request_id, path, exc)
            return None
        return path

    def _rotate(self):
        """Oldest recordings out, past max_files or max_bytes."""
        names = sorted(n for n in os.listdir(self.dir) if n.endswith(".jsonl"))
        sizes = [os.path.getsize(os.path.join(self.dir, n)) for n in names]
        while names and (len(names) > self.max_files or sum(sizes) > self.max_bytes):
            os.unlink(os.path.join(self.dir, names.pop(0)))
            sizes.pop(0)


def load_recording(path):
    """A recording's lines as {"meta", "client_request", "attempts", "client_response"}."""
    out = {"attempts": []}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                raise UsageError("%s:%d: not a JSON line" % (path, number)) from None
            if "ccproxy_recording" in doc:
                out["meta"] = doc
            elif "attempt" in doc:
                out["attempts"].append(doc["attempt"])
            else:
                out.update(doc)
    if "meta" not in out or "client_request" not in out:
        raise UsageError("%s is not a ccproxy recording" % path)
    return out


class ReplayUpstream(http.server.BaseHTTPRequestHandler):
    """A fake upstream that answers each call with the next recorded answer of its
    provider: the same status and headers, the body in the recorded reads (a chunk
    each), at the recorded pace with `timing`."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        answers, timing = self.server.answers, self.server.timing
        attempt = answers.pop(0) if answers else {"status": 500, "reply_headers": [],
                                                  "reads": []}
        self.send_response(attempt["status"] or 500)
        for name, value in attempt["reply_headers"]:
            if name.lower() not in HOP_BY_HOP | {"content-length", "date", "server"}:
                self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        last = 0.0
        for t, data in attempt["reads"]:
            data = tape_data(data)
            if timing and t > last:
                time.sleep(min(t - last, 30.0))
            last = t
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_POST = do_GET = _answer


class ReplayServer(http.server.ThreadingHTTPServer):
    """The fake upstreams' server: quiet when ccproxy drops a kept-alive connection."""
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


def replay_config(recording, upstreams):
    """The config that replays a recording: each recorded provider (its type, model
    and quirks) at its fake upstream, or at a closed port where no answer came."""
    providers, seen = [], []
    for a in recording["attempts"]:
        p = dict(a["provider"])
        if p["name"] in seen:
            continue
        seen.append(p["name"])
        p = {k: v for k, v in p.items() if v not in ("", 0, {}, None)}
        p.update(base_url=upstreams.get(p["name"], "http://127.0.0.1:9") + "/v1",
                 api_key="replay-key")
        providers.append(p)
    return build_config({"providers": providers, "fallback": seen, "usage": False,
                         "port": 3456}, {}, {})


def replay(recording, timing=False):
    """(status, headers, body) the recorded client request gets from this build, fed
    the recorded upstream answers."""
    servers, upstreams = [], {}
    for a in recording["attempts"]:
        name = a["provider"]["name"]
        if a["status"] is None:
            continue
        if name not in upstreams:
            server = ReplayServer(("127.0.0.1", 0), ReplayUpstream)
            server.answers, server.timing = [], timing
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            servers.append(server)
            upstreams[name] = "http://127.0.0.1:%d" % server.server_address[1]
            server.name = name
        next(s for s in servers if s.name == name).answers.append(a)
    try:
        return _replay_call(recording, replay_config(recording, upstreams))
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _replay_call(recording, config):
    service = Service(config)
    service.ready = True
    server = Server(("127.0.0.1", 0), Handler, service)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    request = recording["client_request"]
    headers = {k: v for k, v in request["headers"] if k.lower() not in SECRET_HEADERS | {
        "host", "content-length", "connection", "transfer-encoding", "content-encoding"}}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
        conn.request(request["method"], request["path"], tape_data(request["body"]), headers)
        resp = conn.getresponse()
        result = resp.status, dict(resp.getheaders()), resp.read()
        conn.close()
        return result
    finally:
        server.shutdown()
        server.server_close()
        service.upstreams.close()


def recorded_reply(recording):
    """(status, headers, body) ccproxy sent then, parsed from the recorded bytes."""
    raw = b"".join(tape_data(d) for _, d in recording["client_response"]["writes"])
    resp = http.client.HTTPResponse(_Bytes(raw), method=recording["client_request"]["method"])
    resp.begin()
    return resp.status, dict(resp.getheaders()), resp.read()


class _Bytes:
    """What http.client.HTTPResponse reads a recorded response from."""

    def __init__(self, data):
        self.data = data

    def makefile(self, mode, buffering=None):
        return io.BufferedReader(io.BytesIO(self.data))


#: Parts of a reply that differ between two runs of the same build: ids ccproxy mints,
#: and the pings it writes while a stream is quiet.
REPLAY_NOISE = (
    (re.compile(rb"\b(msg|req_ccp|toolu|srvtoolu)_[0-9a-f]{24}\b"), rb"\1_<id>"),
    (re.compile(rb"event: ping\r?\ndata: \{\"type\": \"ping\"\}\r?\n\r?\n"), b""))


def comparable(body):
    """A reply's body without what differs between runs."""
    for pattern, replacement in REPLAY_NOISE:
        body = pattern.sub(replacement, body)
    return body


def replay_diff(then, now, content=False):
    """The differences between what the client got then and now (status and body,
    noise aside), as unified-diff lines; [] when they are the same.  `content`: the
    recording's prose was redacted, so now's is too before they are compared (what
    ccproxy writes itself, an error's message, was redacted then)."""
    now_body = redact_content(now[2]) if content else now[2]
    a = [("status %s" % then[0]).encode()] + comparable(then[2]).split(b"\n")
    b = [("status %s" % now[0]).encode()] + comparable(now_body).split(b"\n")
    if a == b:
        return []
    import difflib            # here: only when there is a difference to show
    return list(difflib.unified_diff([x.decode("utf-8", "replace") for x in a],
                                     [x.decode("utf-8", "replace") for x in b],
                                     "then", "now", lineterm=""))


# ---- Lifecycle -----------------------------------------------------------------------

class AlreadyRunning(CcproxyError):
    """The PID file is locked by a live ccproxy."""

    def __init__(self, pid):
        super().__init__("ccproxy is already running (pid %s)" % (pid or "?"))
        self.pid = pid


class PidFile:
    """A PID file locked with flock() for the daemon's whole life (docs/operating.md §2).

    flock, never lockf: a POSIX lock vanishes when the process closes *any* descriptor
    of the file, for instance after re-reading its own PID file.  No O_TRUNC at open:
    it would wipe a live daemon's PID before we know we own the lock.
    """

    def __init__(self, path):
        self.path, self.fd = path, None

    def acquire(self):
        """Open (never through a symlink) and lock the file: it must be a regular file
        of this user, mode 0600, so that nobody else can hold its lock (a lock needs only
        a descriptor, and one opened for reading will do: issue #17)."""
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise PidFileError("pid file %s: %s" % (self.path, "it is a symlink" if (
                exc.errno == errno.ELOOP) else exc.strerror)) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise PidFileError("pid file %s is not a regular file of this user (uid %d): "
                               "remove it, or choose another --pid-file"
                               % (self.path, os.geteuid()))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            state, pid = probe_pid_file(self.path)
            if state == "foreign":
                raise PidFileError(foreign_lock(self.path, pid)) from None
            raise AlreadyRunning(pid) from None
        os.fchmod(fd, 0o600)              # an older ccproxy made it 0644
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        os.fsync(fd)
        self.fd = fd
        # What a daemon killed with -9 left beside it is not this daemon's.
        remove_quietly(runtime_path(self.path), reload_request_path(self.path))

    def publish(self, record):
        """Write (or rewrite) the runtime record beside the PID file."""
        try:
            write_file_atomically(runtime_path(self.path), json.dumps(record).encode())
        except OSError as exc:
            log.warning("cannot write %s: %s", runtime_path(self.path), exc.strerror)

    def release(self):
        """Unlink only our own file (its content is our PID), then drop the lock."""
        if self.fd is None:
            return
        if read_pid(self.path) == os.getpid():
            remove_quietly(runtime_path(self.path), reload_request_path(self.path), self.path)
        os.close(self.fd)
        self.fd = None


def read_pid(path):
    """The PID in a PID file, or None when absent or not a number."""
    try:
        with open(path, "rb") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def probe_pid_file(path):
    """(state, pid) of a PID file, decided by its lock, so a recycled PID can never make
    a dead daemon look alive: "running" (the PID it names holds the lock), "stale"
    (nobody holds it), "absent", "foreign" (someone else holds it: the file names a PID
    that does not) or "unknown" (unreadable, or not a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return "absent", None
    except OSError:
        return "unknown", None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "unknown", None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pid = _pid_of_locked(path)
        holders = lock_holders(st.st_ino)
        return ("running" if pid and (holders is None or pid in holders) else "foreign"), pid
    finally:
        os.close(fd)
    return "stale", read_pid(path)


def lock_holders(inode):
    """The PIDs holding an flock() on the file with this inode, from /proc/locks
    (Linux), or None where it cannot be told.  Waiters ("->" lines) hold nothing."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    holders = set()
    for line in lines:
        fields = line.split()        # 1: FLOCK  ADVISORY  WRITE 9926 fe:00:2146436 0 EOF
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4].isdigit() and (
                fields[5].rsplit(":", 1)[-1] == str(inode)):
            holders.add(int(fields[4]))
    return holders


def foreign_lock(path, pid):
    """The line that says a PID file is locked by a process other than the one it names."""
    return ("the PID file %s is locked by a process other than the pid %s it names: it is "
            "no ccproxy of this user's; remove the file, or choose another --pid-file"
            % (path, pid))


def _pid_of_locked(path, wait=1.0):
    """A locked file's PID; a daemon that just locked it may not have written it yet."""
    deadline = time.monotonic() + wait
    pid = read_pid(path)
    while pid is None and time.monotonic() < deadline:
        time.sleep(0.01)
        pid = read_pid(path)
    return pid


def runtime_path(pid_path):
    """The runtime record beside a PID file: ccproxy.pid -> ccproxy.runtime.json."""
    base = pid_path[:-4] if pid_path.endswith(".pid") else pid_path
    return base + ".runtime.json"


def reload_request_path(pid_path):
    """Where `reload -c FILE` names the file the daemon loads from then on."""
    base = pid_path[:-4] if pid_path.endswith(".pid") else pid_path
    return base + ".reload.json"


def runtime_record(config, pid_path, port, log_file):
    """What `status`, `env`, `stop`, `reload` and `check` need to know of a running
    daemon, which they read beside its PID file instead of guessing from their own flags
    and environment (issue #18): where it listens, the files it uses, what a client must
    send.  Never a key."""
    return dict(runtime_facts(config, port), service="ccproxy", version=__version__,
                pid=os.getpid(), status_host=config.status_host or None,
                status_port=config.status_port or None, pid_file=os.path.abspath(pid_path),
                config=config.source or None,
                log_file=os.path.abspath(log_file) if log_file else None,
                usage_db=os.path.abspath(config.usage_db) if config.usage and
                config.usage_db else None,
                workers=config.workers, fingerprint=config.fingerprint,
                settings=settings_fingerprint(config), written=iso_time(time.time()))


def write_file_atomically(path, data, mode=0o644):
    """`data` (bytes) at `path`, replaced in one rename: a reader sees the old file or
    the new one, never half of one.  The temporary file is created exclusively and
    without following a symlink, so a planted link cannot redirect the write."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_own_json(path, owner=None):
    """A small JSON file that only its owner (this user, root, or `owner`) may have
    written, or None: not a symlink, a regular file, not writable by group or others.
    The runtime record and the reload request live in a directory others may share."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid(), owner)
                or st.st_mode & 0o022):
            return None
        doc = _loads(os.read(fd, 1 << 16))
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


def remove_quietly(*paths):
    """Unlink each path that exists; one that does not, or cannot go, is no error."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def descriptors_needed(config):
    """Open files a full daemon holds: a client and an upstream socket for each
    connection, the reserve's included, plus pooled connections, listeners and logs."""
    return 2 * (config.max_connections + RESERVE_CONNECTIONS) + POOL_MAX_IDLE + 64


def raise_descriptor_limit(config):
    """Raise the soft open-file limit as far as `config` needs, never past the hard
    limit (as Go's runtime does at start); a warning when even that is too low, else
    None.  Past the limit, calls failed as "upstream unreachable" (issue #17)."""
    try:
        import resource           # here: Unix only, and only the daemon needs it
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = descriptors_needed(config)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (
            need if hard == resource.RLIM_INFINITY else min(need, hard), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        pass
    if soft >= need:
        return None
    return ("the open-file limit is %d, below the %d that max_connections=%d needs (two "
            "sockets a connection): raise it (ulimit -n, LimitNOFILE=) or lower "
            "max_connections" % (soft, need, config.max_connections))


def sd_notify(message, environ=None):
    """Send one datagram to $NOTIFY_SOCKET (sd_notify(3)); a no-op without it.

    '@' starts an abstract socket name; vsock: addresses are not supported.
    """
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval(environ):
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class JsonFormatter(logging.Formatter):
    """One JSON object per line (CCPROXY_LOG_FORMAT=json)."""

    def format(self, record):
        doc = {"time": iso_time(record.created), "level": record.levelname.lower()}
        access = getattr(record, "access", None)
        if access:
            doc.update(access)
        else:
            doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(config, log_file=None):
    """The ccproxy logger: to `log_file` (reopened after logrotate) or stderr."""
    import logging.handlers   # here: 0.6 MB of RSS (pickle, queue) a journald setup never uses
    handler = (logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
               if log_file else logging.StreamHandler(sys.stderr))
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                      "%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(config.log_level.upper())
    log.propagate = False
    # No record needs the thread name, and looking it up from a connection thread (a
    # bare _thread, see Server._serve) would register a threading._DummyThread for it.
    logging.logThreads = False


class Daemon:
    """Serve a Config until told to stop: the one serve path of `run` and `start`."""

    def __init__(self, config, reloader, pid_path, environ=None, cluster=None, log_file=None):
        self.config, self.reloader, self.pid_path = config, reloader, pid_path
        self.environ = os.environ if environ is None else environ
        self.signals, self.wake = [], threading.Event()
        self.service = Service(config)
        self.service.cluster, self.parent = cluster, os.getppid()
        self.servers, self.threads = [], []
        self.pidfile = PidFile(pid_path) if pid_path else None
        self.log_file = log_file
        self.stopping = threading.Event()

    def _publish(self):
        """The runtime record, for /status and beside the PID file (a worker has its
        supervisor's, see Supervisor._spawn)."""
        if self.pidfile:
            self.service.record = runtime_record(self.service.config, self.pid_path,
                                                 self.service.port, self.log_file)
            self.pidfile.publish(self.service.record)

    def open(self):
        """Lock the PID file and bind every listener; errors say what and where."""
        if self.pidfile:
            self.pidfile.acquire()
        try:
            for host, port, handler in self._listeners():
                self.servers.append(_bind(host, port, handler, self.service,
                                          reuse_port=self.service.cluster is not None))
        except CcproxyError:
            self.close()
            raise
        self.service.port = self.servers[0].server_address[1]

    def _listeners(self):
        c = self.config
        yield c.host, c.port, Handler
        if c.status_port:
            yield c.status_host or DEFAULT_HOST, c.status_port, StatusHandler

    def run(self, on_ready=None):
        """Serve until SIGTERM/SIGINT; return the exit code."""
        self._install_signals()
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, args=(0.5,),
                                      name="serve-%d" % server.server_address[1], daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.config.probe_interval:
            threading.Thread(target=self._probe_loop, name="probe", daemon=True).start()
        threading.Thread(target=self._learn_windows, name="windows", daemon=True).start()
        self.service.open_ledger()
        self._publish()
        self.service.ready = True
        # The sockets listen since bind: a connect succeeds from here on (daemon(7)).
        sd_notify("READY=1\nSTATUS=serving on %s:%d\nMAINPID=%d"
                  % (self.config.host, self.service.port, os.getpid()), self.environ)
        log.info("ccproxy %s serving on http://%s:%d (pid %d, config %s)", __version__,
                 self.config.host, self.service.port, os.getpid(),
                 self.config.source or "built-in defaults")
        self._report("running")
        if on_ready:
            on_ready(self.service.port)
        self._loop()
        return self.drain()

    def _install_signals(self):
        for sig in STOP_AND_RELOAD:
            signal.signal(sig, self._on_signal)
        # A worker is forked with these blocked (Supervisor._spawn): one that arrived
        # since is delivered now, to these handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_AND_RELOAD)

    def _on_signal(self, signum, frame):
        # Runs in the main thread between bytecodes: only queue and wake, except a
        # second stop signal while draining, which exits at once.
        if self.service.draining and signum != signal.SIGHUP:
            log.warning("second signal: exiting now, %d request(s) abandoned",
                        self.service.in_flight)
            os._exit(1)
        self.signals.append(signum)
        self.wake.set()

    def _loop(self):
        interval = watchdog_interval(self.environ)
        while True:
            self.wake.wait(interval or 1.0)
            self.wake.clear()
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    log.info("%s: draining", signal.Signals(signum).name)
                    return
            if interval and self.service.alive():
                sd_notify("WATCHDOG=1", self.environ)   # proof the serve loop runs
            if self.service.cluster is not None:
                self._report("running")
                if os.getppid() != self.parent:
                    log.warning("the supervisor is gone: draining")
                    return

    def _report(self, state):
        """A worker's report for the supervisor's state directory (one service)."""
        if self.service.cluster is not None:
            self.service.cluster.write(self.service.report(self.service.cluster.id, state))

    def _learn_windows(self):
        """Once at start (and after a reload), off the request path: the windows the
        translated providers' own servers state in their model lists (vLLM's
        max_model_len, OpenRouter's context_length, LM Studio's; §1.9)."""
        service = self.service
        for provider in service.config.providers:
            request = probe_request(provider) if dialect_of(provider).translated and not (
                unconfigured(service.config, provider)) else None
            if request is None or self.stopping.is_set():
                continue
            client = service.upstreams.client(provider)
            status, _, _, body = fetch(client, "GET", request[0], None, request[1])
            windows = listed_windows(body) if status == 200 else {}
            if provider.model not in windows:
                windows.update(server_windows(service.config, provider, client))
            for model, window in windows.items():
                service.windows.learn(provider.name, model, window)

    def _probe_loop(self):
        """Light probes on one background thread, never in a request path; a daemon
        thread that checks `stopping`, so it never holds up shutdown."""
        while not self.stopping.wait(self.service.config.probe_interval):
            for provider in self.service.config.providers:
                request = probe_request(provider)
                if request is None or self.stopping.is_set():
                    continue
                client = self.service.upstreams.client(provider)
                status, seconds, headers, _ = fetch(client, "GET", request[0], None, request[1])
                if status != "local":
                    self.service.stats.record(provider.name, status, seconds, headers,
                                              probe=True)

    def reload(self):
        """Validate the new config to the side; keep the old one if it is bad (nginx)."""
        sd_notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic() * 1e6), self.environ)
        try:
            changed = self.service.apply(self.reloader())
        except CcproxyError as exc:
            self.service.reload_failures += 1
            self.service.last_reload_error = str(exc)
            log.error("reload failed, keeping the running config: %s", exc)
        else:
            threading.Thread(target=self._learn_windows, name="windows", daemon=True).start()
            for name in changed:
                log.warning("reload: %s changed; it takes effect after a restart", name)
            log.setLevel(self.service.config.log_level.upper())
            self._publish()
            log.info("reloaded config %s", self.service.config.fingerprint)
        sd_notify("READY=1\nSTATUS=serving", self.environ)

    def drain(self):
        """Stop accepting, let in-flight requests finish, release the PID file."""
        service = self.service
        service.draining = True
        self.stopping.set()
        self._report("draining")
        sd_notify("STOPPING=1\nSTATUS=draining", self.environ)
        for server in self.servers:
            server.shutdown()
            _accept_backlog(server)
            server.server_close()        # new connections are refused from here on
        service.close_waiting()
        abandoned = service.wait_idle(service.config.drain_timeout)
        if abandoned:
            log.warning("drain timeout (%gs): %d request(s) abandoned",
                        service.config.drain_timeout, abandoned)
        if service.ledger is not None:
            service.ledger.close()       # the queued rows are written before exit
        log.info("stopped (served %d requests)", service.requests_served)
        self._report("stopped")
        self.close()
        return 0

    def close(self):
        for server in self.servers:
            server.server_close()
        self.service.upstreams.close()
        if self.pidfile:
            self.pidfile.release()


def _accept_backlog(server, limit=1.0):
    """Serve the connections the kernel already queued before the listener closes:
    closing a listening socket resets them, and each would be a request lost mid-send
    (seen in `make soak` as ConnectionResetError at a restart).  Later arrivals are
    refused outright, which clients retry safely since nothing was sent.  The queue is
    first cut to its minimum: under steady reconnects it never ran empty within
    `limit`, and closing then reset dozens at once.  A connection that finds it full
    has its SYN dropped and retried, and meets the closed port: refused, not lost."""
    try:
        server.socket.listen(0)
    except OSError:
        pass
    server.socket.setblocking(False)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            request, address = server.socket.accept()
        except OSError:
            return          # the queue is empty: close now, before another one lands
        request.setblocking(True)
        server.process_request(request, address)


def _bind(host, port, handler, service, reuse_port=False):
    """A bound, listening Server, or CcproxyError with the reason in plain words."""
    try:
        return Server((host, port), handler, service, reuse_port)
    except OSError as exc:
        raise _bind_error(exc, host, port) from exc


def _bind_error(exc, host, port):
    """A CcproxyError that says why binding host:port failed."""
    if exc.errno == errno.EADDRINUSE:
        reason = "port %d on %s is already in use" % (port, host)
    elif exc.errno == errno.EACCES:
        reason = ("permission denied binding %s:%d (ports below 1024 need root or "
                  "CAP_NET_BIND_SERVICE)" % (host, port))
    elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        reason = "cannot bind %s:%d: no such local address" % (host, port)
    else:
        reason = "cannot bind %s:%d: %s" % (host, port, exc.strerror or exc)
    return CcproxyError(reason)


class Supervisor:
    """`run --workers N`: N forked workers share the port with SO_REUSEPORT (the kernel
    spreads connections across them); this process holds the PID file, restarts a
    worker that dies, and forwards HUP (reload) and TERM (drain) to all of them.

    Workers write reports into a state directory beside the PID file; whichever worker
    answers /status, /metrics or /status/ready speaks for the whole service.
    """

    RESPAWN_PAUSE = 1.0          # a worker that died younger than this waits (no crash loop)

    def __init__(self, config, reloader, pid_path, environ, log_file=None):
        self.config, self.reloader, self.environ = config, reloader, environ
        self.pidfile = PidFile(pid_path) if pid_path else None
        self.dir = os.path.dirname(pid_path) if pid_path else None
        self.workers, self.signals, self.wake = {}, [], threading.Event()
        self.stopping = False
        self.pid_path, self.log_file, self.record = pid_path, log_file, {}

    def _publish(self):
        if self.pidfile:
            self.record = runtime_record(self.config, self.pid_path, self.config.port,
                                         self.log_file)
            self.pidfile.publish(self.record)

    def open(self):
        """Lock the PID file and check the port can be bound (fail fast, with the reason)."""
        if self.pidfile:
            self.pidfile.acquire()
        probe = socket.socket(_address_family(self.config.host), socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((self.config.host, self.config.port))     # bound, never listening
        except OSError as exc:
            if self.pidfile:
                self.pidfile.release()
            raise _bind_error(exc, self.config.host, self.config.port) from exc
        finally:
            probe.close()
        self.dir = tempfile.mkdtemp(prefix="ccproxy-workers-", dir=self.dir)

    def run(self, on_ready=None):
        """Start the workers, supervise them until SIGTERM, then drain them all."""
        for sig in STOP_AND_RELOAD:
            signal.signal(sig, self._on_signal)
        for wid in range(self.config.workers):
            self._spawn(wid)
        if not self._wait_running():
            self._stop()
            raise CcproxyError("the workers did not start; see the log")
        self._publish()
        sd_notify("READY=1\nSTATUS=%d workers serving on %s:%d\nMAINPID=%d" % (
            self.config.workers, self.config.host, self.config.port, os.getpid()),
            self.environ)
        log.info("ccproxy %s serving on http://%s:%d with %d workers (supervisor pid %d)",
                 __version__, self.config.host, self.config.port, self.config.workers,
                 os.getpid())
        if on_ready:
            on_ready(self.config.port)
        self._loop()
        return self._stop()

    def _on_signal(self, signum, frame):
        if self.stopping and signum != signal.SIGHUP:
            self._forward(signal.SIGKILL)           # a second signal: at once
            os._exit(1)
        self.signals.append(signum)
        self.wake.set()

    def _spawn(self, wid):
        # Until the worker has its own handlers, the supervisor's would swallow a HUP
        # or TERM sent to it (a reload lost for good): block them across the fork.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_AND_RELOAD)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:                        # the worker
            code = EXIT_FAIL
            try:
                if self.pidfile and self.pidfile.fd is not None:
                    os.close(self.pidfile.fd)       # the lock stays with the supervisor
                env = {k: v for k, v in self.environ.items()
                       if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
                daemon = Daemon(self.config, self.reloader, None, env,
                                Cluster(self.dir, wid, self.config.workers))
                daemon.service.record = runtime_record(self.config, self.pid_path or "",
                                                       self.config.port, self.log_file)
                daemon.open()
                code = daemon.run()
            except BaseException:
                log.exception("worker %d failed", wid)
            finally:
                os._exit(code)
        self.workers[wid] = (pid, time.monotonic())

    def _wait_running(self, timeout=START_WAIT):
        deadline = time.monotonic() + timeout
        cluster = Cluster(self.dir, -1, self.config.workers)
        while time.monotonic() < deadline:
            live, _ = cluster.read()
            if sum(r.get("state") == "running" for r in live) >= self.config.workers:
                return True
            if any(os.waitpid(pid, os.WNOHANG)[0] for pid, _ in self.workers.values()):
                return False
            time.sleep(0.02)
        return False

    def _loop(self):
        interval = watchdog_interval(self.environ)
        while True:
            self.wake.wait(min(interval or 0.5, 0.5))
            self.wake.clear()
            while self.signals:
                signum = self.signals.pop(0)
                if signum != signal.SIGHUP:
                    log.info("%s: draining %d workers", signal.Signals(signum).name,
                             len(self.workers))
                    return
                log.info("SIGHUP: each worker reloads its config")
                self._reload_own()
                self._forward(signal.SIGHUP)
            self._reap()
            if interval:
                sd_notify("WATCHDOG=1", self.environ)

    def _reload_own(self):
        """The config a worker started from now on gets: the new one when it is valid
        (else the workers keep theirs too, and count the failure)."""
        try:
            self.config = reloaded_config(self.config, self.reloader())[0]
        except CcproxyError as exc:
            log.error("reload: %s", exc)
        else:
            self._publish()

    def _reap(self):
        for wid, (pid, born) in list(self.workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._bury(wid, pid)
                log.warning("worker %d (pid %d) exited (status %d); starting a new one",
                            wid, pid, status)
                if time.monotonic() - born < self.RESPAWN_PAUSE:
                    time.sleep(self.RESPAWN_PAUSE)
                self._spawn(wid)

    def _bury(self, wid, pid):
        """Keep a dead worker's last report (its counters) under another name."""
        try:
            os.replace(os.path.join(self.dir, "w%d.json" % wid),
                       os.path.join(self.dir, "dead-%d.json" % pid))
        except OSError:
            pass

    def _forward(self, signum):
        for pid, _ in self.workers.values():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _stop(self):
        """Drain every worker (each within drain_timeout), then release the PID file."""
        self.stopping = True
        sd_notify("STOPPING=1\nSTATUS=draining", self.environ)
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout + 5
        for wid, (pid, _) in self.workers.items():
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.pidfile:
            self.pidfile.release()
        log.info("stopped")
        return 0


def default_pid_file(environ):
    """systemd's RuntimeDirectory, /run/ccproxy for root, else the user's runtime dir."""
    if environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(environ["RUNTIME_DIRECTORY"].split(":")[0], "ccproxy.pid")
    if os.geteuid() == 0:
        return "/run/ccproxy/ccproxy.pid"
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "ccproxy", "ccproxy.pid")
    return os.path.join(_state_dir(environ), "ccproxy.pid")


def default_log_file(environ):
    """Where `start` logs when no log_file is set (`run` logs to stderr/journald)."""
    if environ.get("LOGS_DIRECTORY"):
        return os.path.join(environ["LOGS_DIRECTORY"].split(":")[0], "ccproxy.log")
    if os.geteuid() == 0:
        return "/var/log/ccproxy/ccproxy.log"
    return os.path.join(_state_dir(environ), "ccproxy.log")


def _state_dir(environ):
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "ccproxy")


# ---- check --probe: a provider's quirks from tiny calls (issue #26) ------------------

#: The one tool the probe offers: a single integer, so a call's input is easy to judge.
PROBE_TOOL = {"name": "ping", "description": "Answers pong. Call it when asked to.",
              "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                               "required": ["n"]}}
#: A 1x1 red PNG: the smallest image a vision model takes.
PROBE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAA"
             "AAAElFTkSuQmCC")


def _ask(text, max_tokens, **fields):
    """A probe call's Anthropic body: one user turn."""
    return dict({"max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]},
                **fields)


_CALL_ONE, _CALL_TWO = "Call the ping tool with n=1.", (
    "Call the ping tool twice, in parallel: once with n=1 and once with n=2.")
#: Every body the probe may send, by step (docs/operating.md §13).  The caps leave a
#: model that reasons by default (gpt-5) room to reach its answer after some thought.
PROBE_BODIES = {
    "text": _ask("Reply with the word OK.", 32),
    "stream": _ask("Reply with the word OK.", 32, stream=True),
    "tool": _ask(_CALL_ONE, 128, stream=True, tools=[PROBE_TOOL]),
    "parallel": _ask(_CALL_TWO, 192, stream=True, tools=[PROBE_TOOL]),
    "required": _ask(_CALL_ONE, 96, tools=[PROBE_TOOL], tool_choice={"type": "any"}),
    "named": _ask(_CALL_ONE, 96, tools=[PROBE_TOOL],
                  tool_choice={"type": "tool", "name": "ping"}),
    "serial": _ask(_CALL_ONE, 96, tools=[PROBE_TOOL],
                   tool_choice={"type": "auto", "disable_parallel_tool_use": True}),
    "none": _ask(_CALL_ONE, 96, tools=[PROBE_TOOL], tool_choice={"type": "none"}),
    "image": _ask([{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                "data": PROBE_PNG}},
                   {"type": "text", "text": "What colour is this pixel? One word."}], 32),
    # A tool-call turn and its result sent back, with an id as Claude Code mints them.
    "history": {"max_tokens": 64, "tools": [PROBE_TOOL], "messages": [
        {"role": "user", "content": _CALL_ONE},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01Probe",
                                           "name": "ping", "input": {"n": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01Probe",
                                      "content": "pong"}]}]},
    "reasoning": _ask("What is 2+2? Answer with the number.", 256, stream=True,
                      thinking={"type": "enabled", "budget_tokens": 1024}),
    # A tool-call turn sent back with its reasoning, as Claude Code's next call does.
    "echo": {"max_tokens": 256, "thinking": {"type": "enabled", "budget_tokens": 1024},
             "tools": [PROBE_TOOL], "messages": [
                 {"role": "user", "content": _CALL_ONE},
                 {"role": "assistant", "content": [
                     {"type": "thinking", "thinking": "Call ping with n=1.", "signature": "p"},
                     {"type": "tool_use", "id": "toolu_probe", "name": "ping",
                      "input": {"n": 1}}]},
                 {"role": "user", "content": [{"type": "tool_result",
                                               "tool_use_id": "toolu_probe",
                                               "content": "pong"}]}]},
}
#: What the probe may see in the upstream's own bytes, and whether ccproxy needs a flag.
PROBE_FACTS = ("arguments as objects", "calls without index", "every call on index 0",
               "repeated ids", "calls without ids", "reasoning in reasoning_content",
               "reasoning in reasoning", "reasoning in <think> tags")
ProbeReply = collections.namedtuple("ProbeReply", "blocks facts usage error")
#: How often each step may be sent at most: again with each flag that may fix it.
PROBE_TRIES = {"text": 2, "stream": 2, "tool": 2, "parallel": 1, "required": 2, "named": 2,
               "serial": 2, "none": 1, "image": 2, "history": 3, "reasoning": 2, "echo": 3}


def probe_plan(model):
    """What `check --probe` says before its first call: its ceiling, honestly."""
    cap = sum(PROBE_BODIES[step]["max_tokens"] * n for step, n in PROBE_TRIES.items())
    return ("probing with %d tiny calls to %s (up to %d where one needs another try): "
            "about %d input tokens each, at most %d output tokens in all (%d for a "
            "reasoning call); a model that answers briefly uses a few hundred" % (
                len(PROBE_TRIES) - 1, model, sum(PROBE_TRIES.values()), 150, cap,
                PROBE_BODIES["reasoning"]["max_tokens"]))


def raw_facts(docs, stream):
    """PROBE_FACTS seen in an upstream reply's JSON documents (a stream's chunks, or the
    one whole reply), plus "usage" when a usage object came (Groq: x_groq.usage)."""
    facts, starts, text = set(), [], ""
    for doc in docs:
        doc = _obj(doc)
        if doc.get("usage") or _obj(doc.get("x_groq")).get("usage"):
            facts.add("usage")
        for choice in doc.get("choices") if isinstance(doc.get("choices"), list) else ():
            part = _obj(_obj(choice).get("delta" if stream else "message"))
            facts.update("reasoning in " + key for key in ("reasoning_content", "reasoning")
                         if isinstance(part.get(key), str) and part[key])
            text += part["content"] if isinstance(part.get("content"), str) else ""
            for call in part.get("tool_calls") if isinstance(part.get("tool_calls"),
                                                             list) else ():
                starts.extend(_call_facts(_obj(call), stream, facts))
    if text.lstrip().startswith("<think>"):
        facts.add("reasoning in <think> tags")
    return facts | _start_facts(starts)


def _call_facts(call, stream, facts):
    """One tool-call entry's facts; [(index, id)] when it starts a call (has a name)."""
    function = _obj(call.get("function"))
    if "arguments" in function and not isinstance(function["arguments"], str):
        facts.add("arguments as objects")
    if stream and "index" not in call:
        facts.add("calls without index")
    return [(call.get("index"), call.get("id"))] if function.get("name") else []


def _start_facts(starts):
    ids = [tool_id for _, tool_id in starts if tool_id]
    facts = {"repeated ids"} if len(ids) > len(set(ids)) else set()
    if len(ids) < len(starts):
        facts.add("calls without ids")
    if len(starts) > 1 and len(set(ids)) > 1 and all(i == 0 for i, _ in starts):
        facts.add("every call on index 0")
    return facts


def anthropic_blocks(sse):
    """An Anthropic event stream -> (content blocks, message_delta usage, error message)."""
    blocks, usage, error, partial = [], {}, "", {}
    for frame in sse.decode("utf-8", "replace").split("\n\n"):
        doc = _obj(_loads(frame.partition("data: ")[2]))
        kind, delta = doc.get("type"), _obj(doc.get("delta"))
        if kind == "content_block_start":
            blocks.append(dict(_obj(doc.get("content_block"))))
        elif kind == "content_block_delta" and blocks:
            for key in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(key), str):
                    partial[len(blocks) - 1] = partial.get(len(blocks) - 1, "") + delta[key]
        elif kind == "message_delta":
            usage = _obj(doc.get("usage"))
        elif kind == "error":
            error = str(_obj(doc.get("error")).get("message"))
    for i, piece in partial.items():
        block = blocks[i]
        key = {"text": "text", "thinking": "thinking"}.get(block.get("type"))
        block.update({key: piece} if key else {"input": _loads(piece)})
    return blocks, usage, error


def probe_reply(raw, stream, tr):
    """A probe call's answer as this build reads it: Anthropic blocks, facts, usage."""
    if not stream:
        doc = _loads(raw)
        try:
            message = openai_to_anthropic(doc, tr)
        except UpstreamReplyError as exc:
            return ProbeReply([], set(), (0, 0), str(exc))
        usage = message["usage"]
        return ProbeReply(message["content"], raw_facts([doc], False),
                          (usage["input_tokens"], usage["output_tokens"]), "")
    parser, translator = SSEParser(), StreamTranslator(tr)
    try:
        payloads = parser.feed(raw) + parser.close()
        sse = translator.start() + b"".join(translator.feed(p) for p in payloads)
        sse += translator.end()
    except UpstreamReplyError as exc:
        return ProbeReply([], set(), (0, 0), str(exc))
    blocks, usage, error = anthropic_blocks(sse)
    return ProbeReply(blocks, raw_facts([_loads(p) for p in payloads], True),
                      (usage.get("input_tokens", 0), usage.get("output_tokens", 0)), error)


def tool_inputs(reply):
    """The inputs of a reply's tool calls, [{...}, ...]."""
    return [b.get("input") for b in reply.blocks if b.get("type") == "tool_use"]


def probe_snippet(configured, fixes):
    """The "quirks" member to paste: the provider's own flags with the fixes over them."""
    return '"quirks": ' + json.dumps(dict(dict(configured), **fixes), sort_keys=True)


def _refused(status):
    """A 4xx that is about the request itself, not the key or a rate limit.  A 404 is
    one too: the same URL took the plain call, and OpenRouter answers 404 "No endpoints
    found that support image input" (NousResearch/hermes-agent#23411) or "... tool use"."""
    return isinstance(status, int) and 400 <= status < 500 and status not in (
        401, 403, 429)


def listed_vision(body, model):
    """Whether a model list says `model` takes images (OpenRouter's
    architecture.input_modalities); None where it does not say."""
    doc = _obj(_loads(body))
    for entry in doc.get("data") if isinstance(doc.get("data"), list) else ():
        modalities = _obj(_obj(entry).get("architecture")).get("input_modalities")
        if _obj(entry).get("id") == model and isinstance(modalities, list):
            return "image" in modalities
    return None


class Probe:
    """`check --probe` for one OpenAI-style Chat route: tiny calls sent through this
    build's own translation, with the flags found so far; a refused call is tried again
    with the flag that would fix it, and the flag is needed when that passes."""

    def __init__(self, provider, client, model):
        self.provider, self.client, self.model = provider, client, model
        self.quirks, self.fixes = quirks_for(provider), {}
        self.lines, self.facts, self.used, self.calls = [], set(), [0, 0], 0
        self.tools_ok, self.stopped, self.reasoned = True, False, False

    def run(self):
        """[(level, text), …]: what it saw, what it needs, what it could not tell.  A
        call that failed for a reason no flag changes (the key, a rate limit, the
        network) stops it: the rest would only fail the same way."""
        if self.text():
            for step in (self.stream, self.tool, self.parallel, self.choices, self.image,
                         self.history, self.think_tags, self.reasoning, self.echo):
                if not self.stopped:
                    step()
        return self.lines + self.summary()

    def flags(self, extra=None):
        return dict(self.quirks, **self.fixes, **(extra or {}))

    def call(self, step, extra=None):
        """PROBE_BODIES[step] through the translation, with the flags found so far and
        `extra`: (200, ProbeReply) or (HTTP status or failure kind, what it said)."""
        tr = Translation(route=self.provider.name, client_model="probe",
                         upstream_model=self.model, quirks=self.flags(extra),
                         signatures=ThoughtSignatures())
        data, stream = translated_request(dict(PROBE_BODIES[step], model="probe"), tr)
        status, _, _, raw = fetch(self.client, "POST", openai_url(self.provider), data,
                                  openai_headers(self.provider, stream))
        self.calls += 1
        if status != 200:
            return status, (upstream_message(raw) if isinstance(status, int) else
                            raw.decode("utf-8", "replace"))[:200]
        reply = probe_reply(raw, stream, tr)
        self.used = [self.used[0] + reply.usage[0], self.used[1] + reply.usage[1]]
        self.facts |= reply.facts
        return (200, reply) if not reply.error else ("broken", reply.error)

    def attempt(self, step, what, *fixes, ok=""):
        """Call; when refused, call again with each fix in turn: the first that passes
        is needed.  (status, reply) of the call that counts; `ok` is said when the
        first call passes as it is."""
        status, reply = self.call(step)
        if status == 200 and ok:
            self.lines.append(("ok", ok))
        for fix in fixes if _refused(status) else ():
            again, second = self.call(step, fix)
            if again == 200:
                self.need(fix, "%s refused (HTTP %d: %s)" % (what, status, reply))
                return again, second
        if status != 200:
            self.stopped = not _refused(status)
            self.lines.append(("problem", "%s: %s %s: %s%s" % (
                what, "HTTP" if isinstance(status, int) else "failed:", status, reply,
                "; the probe stopped here" if self.stopped else "")))
        return status, reply

    def need(self, fix, why):
        self.fixes.update(fix)
        self.lines.append(("problem", "%s: needs %s" % (why, ", ".join(
            '"%s": %s' % (k, json.dumps(v)) for k, v in sorted(fix.items())))))

    def text(self):
        """A plain answer; max_tokens refused -> the other token parameter."""
        other = ("max_completion_tokens" if self.quirks["token_param"] == "max_tokens"
                 else "max_tokens")
        status, reply = self.attempt("text", "a plain call with %s" % self.quirks[
            "token_param"], {"token_param": other})
        if status == 200:
            self.lines.append(("ok", "plain text: answered %s" % _shown(
                "".join(b.get("text", "") for b in reply.blocks))))
        return status == 200

    def stream(self):
        """A streamed answer, with usage: stream_options refused, or needed for it."""
        fixes = [{"stream_options": False}] if self.quirks["stream_options"] else []
        status, reply = self.attempt("stream", "stream_options", *fixes)
        if status != 200:
            return
        self.lines.append(("ok", "streamed text read"))
        if _thought(reply):
            self.lines.append(("note", "the model reasons even when not asked to"))
        if "usage" in reply.facts:
            return
        if not self.flags()["stream_options"]:
            again, second = self.call("stream", {"stream_options": True})
            if again == 200 and "usage" in second.facts:
                return self.need({"stream_options": True}, "streams carry usage only when "
                                 "asked with stream_options")
        self.lines.append(("note", "could not tell: streams carry no usage, so ccproxy "
                           "estimates their output tokens"))

    def tool(self):
        """One streamed tool call; none streamed but one whole -> stream_tools false."""
        status, reply = self.attempt("tool", "a streamed call offering a tool")
        if status != 200:
            self.tools_ok = False
            return
        if not tool_inputs(reply) and self.flags()["stream_tools"]:
            again, second = self.call("tool", {"stream_tools": False})
            if again == 200 and tool_inputs(second):
                self.need({"stream_tools": False}, "streamed answers lose the tool call "
                          "the whole answer has")
                reply = second
        inputs = tool_inputs(reply)
        if not inputs:
            self.tools_ok = False
            self.lines.append(("note", "could not tell how it streams tool calls: the "
                               "model did not call the tool (can it call tools?)"))
        elif inputs[0] == {"n": 1}:
            self.lines.append(("ok", "a streamed tool call read: ping %s" % json.dumps(
                inputs[0])))
        else:
            self.lines.append(("problem", "the tool call was read as %s, not {\"n\": 1}: "
                               "please report it with a recording (docs/operating.md §12)"
                               % _shown(json.dumps(inputs[0]))))

    def parallel(self):
        """Two calls in one answer, read back as two."""
        if not self.tools_ok:
            return
        status, reply = self.attempt("parallel", "a streamed call asking for two tools")
        inputs = tool_inputs(reply) if status == 200 else []
        if sorted(json.dumps(i) for i in inputs) == ['{"n": 1}', '{"n": 2}']:
            self.lines.append(("ok", "two parallel tool calls read"))
        elif len(inputs) < 2 and status == 200:
            self.lines.append(("note", "could not tell how it streams parallel calls: the "
                               "model made %d call(s), not two" % len(inputs)))
        elif status == 200:
            self.lines.append(("problem", "two parallel calls were read as %s: please report "
                               "it with a recording (docs/operating.md §12)"
                               % _shown(json.dumps(inputs))))

    def choices(self):
        """tool_choice "required", a named choice and parallel_tool_calls: each refused
        one has its flag; "none" ignored (the tool called anyway) has its own."""
        if not self.tools_ok:
            return
        for step, what, fix in (
                ("required", 'tool_choice "required"', {"no_required": True}),
                ("named", "a named tool_choice", {"no_named_choice": True}),
                ("serial", "parallel_tool_calls", {"no_parallel_flag": True})):
            self.attempt(step, what, fix)
        status, reply = self.call("none")
        if status == 200 and tool_inputs(reply):
            self.need({"no_choice_none": True}, 'tool_choice "none" ignored: the model '
                      "called the tool anyway")
        self.lines.append(("ok", "tool_choice forms tried: required, named, none, "
                           "parallel_tool_calls"))

    def image(self):
        """A 1x1 PNG, unless the model list says the model takes none: refused (or
        listed so) -> no_vision (images become "[image omitted]")."""
        if self.flags()["no_vision"]:
            self.lines.append(("note", "images not tried: no_vision is set"))
            return
        url, headers = dialect_of(self.provider).probe(self.provider)
        status, _, _, body = fetch(self.client, "GET", url, None, headers)
        if status == 200 and listed_vision(body, self.model) is False:
            return self.need({"no_vision": True}, "its model list says %s takes no images"
                             % self.model)
        self.attempt("image", "an image", {"no_vision": True}, ok="an image taken")

    def history(self):
        """A tool-call turn sent back, as every call after a tool use carries: its id
        refused -> tool_id_style alnum9 (Mistral: "Tool call id was … but must be a-z,
        A-Z, 0-9, with a length of 9"), its null content -> empty_content_as_string."""
        self.attempt("history", "a tool-call turn sent back", {"tool_id_style": "alnum9"},
                     {"empty_content_as_string": True},
                     ok="a tool-call turn and its result taken back")

    def think_tags(self):
        """Reasoning as <think>…</think> at the start of the text needs think_tags."""
        if "reasoning in <think> tags" in self.facts and not self.flags()["think_tags"]:
            self.need({"think_tags": True}, "reasoning comes as <think> tags in the text")

    def reasoning(self):
        """Asked to reason: refused -> no reasoning knob; none unless asked with
        reasoning_effort -> the knob."""
        sent = is_reasoning_model(self.flags(), self.model)
        status, reply = self.attempt("reasoning", "reasoning (%s)" % self.flags()[
            "reasoning"], *([{"reasoning": ""}] if sent else []))
        if status != 200:
            return
        if not sent and not _thought(reply):
            knob = self.knob()
            again, second = self.call("reasoning", knob)
            if again == 200 and _thought(second):
                self.reasoned = True
                return self.need(knob, "the model reasons only when asked to")
        self.reasoned = _thought(reply)
        if _thought(reply):
            self.lines.append(("ok", "reasoning read as thinking (it came %s)" % " and ".join(
                f[len("reasoning "):] for f in PROBE_FACTS if f in reply.facts and
                f.startswith("reasoning in "))))
        else:
            self.lines.append(("note", "could not tell how it streams reasoning: none came "
                               "back (not a reasoning model?)"))

    def knob(self):
        """The flags that send the reasoning knob for this model: the route's own
        placement (reasoning_effort where it has none), its model pattern widened to
        this model where it leaves it out."""
        knob = {"reasoning": self.flags()["reasoning"] or "reasoning_effort"}
        if not is_reasoning_model(self.flags(knob), self.model):
            knob["reasoning_models"] = self.flags()["reasoning_models"] + "|^%s$" % (
                re.escape(self.model))
        return knob

    def echo(self):
        """A tool-call turn sent back with its reasoning (the next call of every tool
        use): refused -> reasoning_echo (DeepSeek: "The `reasoning_content` in the
        thinking mode must be passed back to the API")."""
        if self.reasoned and self.tools_ok:
            self.attempt("echo", "a tool-call turn sent back without its reasoning",
                         {"reasoning_echo": "reasoning_content"},
                         {"reasoning_echo": "reasoning"})

    def summary(self):
        handled = [f for f in PROBE_FACTS if f in self.facts and f != (
            "reasoning in <think> tags")]
        out = [("ok", "read with no flag: " + ", ".join(handled))] if handled else []
        out.append(("note", "the probe made %d calls: %d input and %d output tokens" % (
            self.calls, self.used[0], self.used[1])))
        return out


def _thought(reply):
    return any(b.get("type") == "thinking" for b in reply.blocks)


def run_probes(config, name, upstreams):
    """`check --probe [NAME]`: every provider, or the one named, printed as it goes (the
    plan before the first call); the number of problems found."""
    chosen = [p for p in config.providers if name in ("", p.name)]
    if not chosen:
        return _print_report([("problem", "--probe %s: no such provider (providers: %s)" % (
            _shown(name), ", ".join(p.name for p in config.providers)))])
    problems = 0
    for provider in chosen:
        problems += _print_report((level, "probe %s: %s" % (provider.name, text)) for
                                  level, text in probe_provider(config, provider,
                                                                upstreams.client(provider)))
    return problems


def probe_provider(config, provider, client):
    """One provider's probe lines, with the plan printed first and the snippet last."""
    models = configured_models(config, provider)
    if type(dialect_of(provider)) is not OpenAIChatDialect:
        return [("note", "not probed: its flags are for OpenAI-style Chat routes only")]
    if unconfigured(config, provider) or not models:
        return [("note", "not probed: %s" % ("no key" if models else "no model"))]
    _print_report([("note", "probe %s (%s, %s): %s" % (
        provider.name, provider.type, redact_url(provider.base_url), probe_plan(models[0])))])
    probe = Probe(provider, client, models[0])
    lines = probe.run()
    if probe.fixes:
        lines.append(("note", "paste this into its entry in %s, then run `check --probe` "
                      "again:\n     %s" % (config.source or "the config file",
                                           probe_snippet(provider.quirks, probe.fixes))))
    else:
        lines.append(("ok", "no quirk flag to add"))
    return lines


def _print_report(report):
    """Print `check`'s lines; the number of problems among them."""
    problems = 0
    for level, text in report:
        print("%-4s %s" % ({"ok": "ok", "warn": "WARN", "problem": "FAIL",
                            "note": "note"}[level], text), flush=True)
        problems += level == "problem"
    return problems


# ---- Command line --------------------------------------------------------------------

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
STATUS_RUNNING, STATUS_DEAD, STATUS_STOPPED, STATUS_UNKNOWN = 0, 1, 3, 4


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="JSON config file (also CCPROXY_CONFIG)")
    common.add_argument("--host", help="address to bind (default 127.0.0.1)")
    common.add_argument("--port", help="port to bind (default 3456)")
    common.add_argument("--pid-file", dest="pid_file", help="PID file path")
    common.add_argument("--log-file", dest="log_file", help="log file path")
    common.add_argument("--log-level", dest="log_level", help="debug, info, warning, error")
    common.add_argument("--workers", help="processes sharing the port (default 1)")
    common.add_argument("--allow-remote", dest="allow_remote", action="store_const",
                        const=True, help="bind beyond loopback without CCPROXY_API_KEY")
    common.add_argument("--record", metavar="DIR", help="record every call to DIR, keys "
                        "redacted (docs/operating.md §12)")
    parser = argparse.ArgumentParser(
        prog="ccproxy.py", description="Proxy daemon for Claude Code and Anthropic "
        "Messages API clients.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, text in (("run", "serve in the foreground (systemd)"),
                       ("start", "start in the background"), ("restart", "stop, then start"),
                       ("reload", "re-read the config without dropping connections")):
        sub.add_parser(name, parents=[common], help=text)
    stop = sub.add_parser("stop", parents=[common], help="stop, finishing running requests")
    stop.add_argument("--force", action="store_true", help="SIGKILL after the timeout")
    stop.add_argument("--timeout", type=float, help="seconds to wait (default drain + 10)")
    status = sub.add_parser("status", parents=[common], help="is it running? (LSB codes)")
    status.add_argument("--json", action="store_true", help="print the /status document")
    check = sub.add_parser("check", parents=[common],
                           help="validate the config, probe each provider, say what is wrong")
    check.add_argument("--probe", nargs="?", const="", metavar="PROVIDER", help="then make "
                       "a few tiny calls (a few hundred tokens) to each OpenAI-style provider "
                       "(or PROVIDER) and print the quirk flags it needs")
    sub.add_parser("env", parents=[common],
                   help='print the exports for Claude Code: eval "$(ccproxy.py env)"')
    _ledger_commands(sub, common)
    init = sub.add_parser("init", help="write a starting config file (never over one)")
    init.add_argument("-c", "--config", help="where (default: where ccproxy looks without -c)")
    init.add_argument("--provider", default="anthropic", choices=sorted(STARTER_FIELDS),
                      help="provider type (default anthropic)")
    sub.add_parser("version", help="print version and build")
    return parser


def _ledger_commands(sub, common):
    """`usage` and `replay`: reading what the daemon kept (the ledger, recordings)."""
    usage = sub.add_parser("usage", parents=[common],
                           help="tokens and estimated cost from the usage ledger")
    usage.add_argument("--since", default="30d", help="7d, 12h, 30m or a date such as "
                       "2026-12-01 (UTC; default 30d)")
    usage.add_argument("--by", default="day", choices=list(USAGE_GROUPS),
                       help="group rows by (default day)")
    form = usage.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON")
    form.add_argument("--csv", action="store_true", help="print CSV")
    replay = sub.add_parser("replay", help="feed a recording's upstream answers through "
                            "this build; print what the client gets, and what changed")
    replay.add_argument("file", help="a recording (docs/operating.md §12)")
    replay.add_argument("--timing", action="store_true", help="keep the recorded pacing")


def _cli_options(args):
    return {k: getattr(args, k, None) for k in
            ("host", "port", "pid_file", "log_file", "log_level", "allow_remote", "workers",
             "record")}


def _load(args, environ):
    return check_tls_files(load_config(args.config, environ, _cli_options(args)))


def _pid_path(config, environ):
    return config.pid_file or default_pid_file(environ)


def cmd_run(args, environ, ready_fd=None, log_file=None):
    """Serve in the foreground until SIGTERM; used by `run` and by `start`'s daemon.
    `ready_fd` (or CCPROXY_READY_FD) is the pipe on which `start` waits for word."""
    if ready_fd is None and environ.get("CCPROXY_READY_FD", "").isdigit():
        ready_fd = int(environ["CCPROXY_READY_FD"])
    _reexec_from_bytecode(args, log_file, ready_fd)       # returns only when it cannot
    try:
        config = _load(args, environ)
        configure_logging(config, log_file or config.log_file or None)
        for warning in config.warnings + (raise_descriptor_limit(config),):
            if warning:
                log.warning("%s", warning)
        kind = Supervisor if config.workers > 1 else Daemon
        pid_path = _pid_path(config, environ)
        daemon = kind(config, ConfigSource(args, environ, pid_path), pid_path, environ,
                      log_file=log_file or config.log_file or None)
        daemon.open()
    except CcproxyError as exc:
        _tell(ready_fd, "error %s" % exc)
        raise
    return daemon.run(lambda port: _tell(ready_fd, "ready %d %d" % (os.getpid(), port)))


class ConfigSource:
    """A daemon's reloader: its config read again from the file it started with, or
    from the one `reload -c FILE` named since (issue #18: reload -c validated the new
    file, then signalled a daemon that re-read its old one).  The request beside the
    PID file is read at every reload and stays until the daemon exits, so each worker
    of a supervisor reads it too."""

    def __init__(self, args, environ, pid_path):
        self.args, self.environ = args, environ
        self.request = reload_request_path(pid_path)

    def __call__(self):
        path = (read_own_json(self.request) or {}).get("config")
        args = self.args
        if isinstance(path, str) and path:
            args = argparse.Namespace(**dict(vars(args), config=path))
        return _load(args, self.environ)


def _tell(fd, line):
    """One line to `start` on the start-up pipe (then closed), if there is one."""
    if fd is None:
        return
    try:
        os.write(fd, line.encode("utf-8", "replace") + b"\n")
        os.close(fd)
    except OSError:
        pass


def fresh_bytecode(path):
    """True when __pycache__ holds current bytecode for `path` (written now if missing
    or stale); False when it cannot be written (a read-only install without it)."""
    cfile = importlib.util.cache_from_source(path)
    try:
        st = os.stat(path)
        with open(cfile, "rb") as f:
            head = f.read(16)
        if (head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == b"\0\0\0\0"
                and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF):
            return True
    except OSError:
        pass
    try:
        py_compile.compile(path, cfile=cfile, doraise=True)
        return True
    except (py_compile.PyCompileError, OSError):
        return False


#: glibc malloc settings for the daemon (see malloc_tunables), each kept out when the
#: user set it.
MALLOC_TUNABLES = (("glibc.malloc.tcache_count", "0"), ("glibc.malloc.arena_max", "1"))


def malloc_tunables(current):
    """GLIBC_TUNABLES for the daemon: the user's, plus a malloc made for a thread per
    connection.  Measured with Claude Code's 50 KB bodies (make bench):
    - tcache_count=0: glibc keeps up to 7 freed chunks per size class in every thread,
      memory no other stream can use.  1000 open streams 105 -> 87 MB RSS.
    - arena_max=1: glibc gives threads up to 8 heaps per core; a burst of connections
      spread over them leaves each heap holed.  The GIL serialises the allocating code
      anyway.  1000 streams 61 -> 59 MB.
    Latency unchanged.  A setting the user made wins; other C libraries ignore these."""
    added = ["%s=%s" % (name, value) for name, value in MALLOC_TUNABLES
             if name + "=" not in current]
    return ":".join(filter(None, [current] + added))


def reexec_environ(environ, ready_fd):
    """The environment of the re-executed daemon: marked so it does not re-exec again,
    with the start-up pipe and the malloc tunables (read by glibc before Python starts)."""
    env = dict(environ, CCPROXY_NO_REEXEC="1",
               GLIBC_TUNABLES=malloc_tunables(environ.get("GLIBC_TUNABLES", "")))
    if ready_fd is not None:
        env["CCPROXY_READY_FD"] = str(ready_fd)
    return env


def _reexec_from_bytecode(args, log_file, ready_fd):
    """Hand the long-running process to a fresh interpreter that imports ccproxy from
    its cached bytecode.  A script is compiled from source at every start and never
    cached; measured here, CPython's compiler leaves 13 MB of the daemon's 36 MB idle
    RSS behind.  Same PID (execv), so systemd, NOTIFY_SOCKET and the PID file are
    unaffected; nothing changes when the bytecode cannot be cached.  -S: the daemon
    needs nothing from site-packages, and the .pth files there cost up to 1.2 MB."""
    if __name__ != "__main__" or os.environ.get("CCPROXY_NO_REEXEC") == "1":
        return
    path = os.path.realpath(__file__)
    if not path.endswith(".py") or not fresh_bytecode(path):
        return
    if ready_fd is not None:
        os.set_inheritable(ready_fd, True)
    env = reexec_environ(os.environ, ready_fd)
    code = ("import sys; sys.path.insert(0, %r); import ccproxy; sys.exit(ccproxy.main())"
            % os.path.dirname(path))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-S", "-c", code, "run"]
              + _option_argv(args, log_file), env)


def _option_argv(args, log_file):
    """The common options of `args` as command-line words again."""
    words = []
    for key in ("config", "host", "port", "pid_file", "log_level", "workers"):
        if getattr(args, key, None) is not None:
            words += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    if log_file or getattr(args, "log_file", None):
        words += ["--log-file", log_file or args.log_file]
    if getattr(args, "allow_remote", None):
        words.append("--allow-remote")
    return words


@dataclasses.dataclass
class Target:
    """The daemon a command is about (issue #18: commands re-read their own flags and
    environment instead of asking the daemon).  It is found through the PID file the
    caller's settings name, else through the port they name, and its runtime record
    says where it listens and what it uses."""
    config: Config            # the caller's settings; the daemon's own file when it was
                              # found and no -c or CCPROXY_CONFIG was given
    pid_path: str
    state: str                # as probe_pid_file says
    pid: object = None
    record: object = None     # the running daemon's runtime record, or None
    config_given: bool = False

    @property
    def running(self):
        return self.state == "running" and self.pid is not None

    def address(self):
        """(host, port) where the daemon listens, or where the settings say it would."""
        record = self.record or {}
        return record.get("host") or self.config.host, record.get("port") or self.config.port

    def listener_config(self):
        """The caller's config on the running daemon's listeners (what a reload keeps)."""
        r = self.record
        if not r:
            return self.config
        return dataclasses.replace(self.config, host=r["host"], port=r["port"],
                                   status_host=r.get("status_host") or "",
                                   status_port=r.get("status_port") or 0,
                                   workers=r.get("workers") or 1)

    def disagreements(self, with_config=True):
        """What the caller named that the running daemon does not use, one phrase each."""
        record, shown, out = self.record or {}, dict(self.config.given), []
        for key in ("host", "port", "workers"):
            if key in shown and record and getattr(self.config, key) != record.get(key):
                out.append("%s %s (%s)" % (key, getattr(self.config, key), shown[key]))
        if with_config and self.config_given and record and (
                self.config.source or None) != record.get("config"):
            out.append("config %s" % (self.config.source or "(none)"))
        return out

    def describe(self):
        record = self.record or {}
        host, port = self.address()
        return "(pid %s) on http://%s:%s, config %s" % (
            self.pid, host, port, record.get("config") or "(none)")


def find_target(args, environ, strict=False):
    """The Target of a command.  `strict`: a daemon's config file that no longer loads
    raises ConfigError (reload and check are about that file); otherwise the caller's
    settings stand in for it."""
    config = _load(args, environ)
    path = _pid_path(config, environ)
    state, pid = probe_pid_file(path)
    if state in ("absent", "stale"):
        other = _pid_file_by_port(config)
        if other and other != path and probe_pid_file(other)[0] == "running":
            path, (state, pid) = other, probe_pid_file(other)
    record = _read_record(path, pid) if state == "running" else None
    given = bool(getattr(args, "config", None) or environ.get("CCPROXY_CONFIG"))
    if record and record.get("config") and not given and record["config"] != config.source:
        try:
            config = _load(argparse.Namespace(**dict(vars(args), config=record["config"])),
                           environ)
        except ConfigError:
            if strict:
                raise
    return Target(config, path, state, pid, record, given)


def _pid_file_by_port(config):
    """The PID file of a ccproxy answering on the port `config` names, or None: how
    `stop` finds a daemon started with another --pid-file."""
    doc = fetch_status(config.host, config.port, config.api_key)
    return doc.get("pid_file") if doc and doc.get("service") == "ccproxy" else None


def _read_record(pid_path, pid):
    """The runtime record of the daemon `pid`, if it wrote one (an older ccproxy did not)."""
    doc = read_own_json(runtime_path(pid_path), _process_owner(pid))
    return doc if doc and doc.get("pid") == pid else None


def _process_owner(pid):
    """The uid a process runs as (a systemd DynamicUser daemon's record is its own), or
    None where /proc cannot tell."""
    try:
        return os.stat("/proc/%d" % pid).st_uid
    except (OSError, TypeError):
        return None


def _note(target, with_config=True):
    """One line on stderr when the caller's flags disagree with the running daemon."""
    differ = target.disagreements(with_config)
    if differ and target.running:
        print("ccproxy: note: the running daemon %s does not use %s; this is about it"
              % (target.describe(), ", ".join(differ)), file=sys.stderr)


def is_ccproxy(pid, record):
    """Whether `pid` runs ccproxy: its command line says so, or its own runtime record
    names it.  True where /proc cannot tell."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return b"ccproxy" in cmdline or bool(record and record.get("pid") == pid)


def cmd_start(args, environ):
    """Daemonise (daemon(7)): exit 0 only once the port accepts, else 1 with the reason.
    Already running: 0 when the settings agree, else 1 saying what runs."""
    target = find_target(args, environ)
    config, path = target.config, target.pid_path
    for warning in config.warnings:
        print("ccproxy: warning: %s" % warning, file=sys.stderr)
    if target.running:
        differ = target.disagreements()
        if target.record and target.record.get("settings") != settings_fingerprint(config):
            differ.append("other providers, keys or options than these")
        if differ:
            print("ccproxy: already running %s, not with %s: stop it first, or give "
                  "another instance its own --pid-file and --port"
                  % (target.describe(), ", ".join(differ)), file=sys.stderr)
            return EXIT_FAIL
        print("ccproxy is already running %s" % target.describe())
        return EXIT_OK
    if target.state == "foreign":
        print("ccproxy: %s" % foreign_lock(path, target.pid), file=sys.stderr)
        return EXIT_FAIL
    log_file = config.log_file or default_log_file(environ)
    try:
        create_private_file(log_file)
    except OSError as exc:
        print("ccproxy: cannot write the log file %s: %s" % (log_file, exc.strerror),
              file=sys.stderr)
        return EXIT_FAIL
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        _daemon_child(args, environ, write_end, log_file)   # never returns
    os.close(write_end)
    os.waitpid(child, 0)
    return _report_start(read_end, config, log_file)


def create_private_file(path):
    """Create `path` (and its directory) readable by its owner alone, if it is not
    there yet; an existing file keeps its mode.  A log names clients, models and
    upstream errors, which others need not read (issue #17)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))


def _daemon_child(args, environ, write_end, log_file):
    """The double-forked daemon: new session, stdio to /dev/null (stderr to the log)."""
    code = EXIT_FAIL
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        _redirect_stdio(log_file)
        code = cmd_run(args, environ, ready_fd=write_end, log_file=log_file)
    except BaseException as exc:      # any start-up failure goes back to `start`
        message = str(exc) if isinstance(exc, CcproxyError) else repr(exc)
        try:
            os.write(write_end, b"error " + message.encode("utf-8", "replace") + b"\n")
        except OSError:
            pass
        log.error("start-up failed: %s", message)
    finally:
        os._exit(code)


def _redirect_stdio(log_file):
    null = os.open(os.devnull, os.O_RDWR)
    err = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    os.close(null)
    os.close(err)


def _report_start(read_end, config, log_file):
    """Wait for the daemon's word on the pipe and say it in one line."""
    deadline, data = time.monotonic() + START_WAIT, b""
    while b"\n" not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    word, _, rest = data.decode("utf-8", "replace").strip().partition(" ")
    if word == "ready":
        pid, port = rest.split()
        print("ccproxy started (pid %s) on http://%s:%s, log %s"
              % (pid, config.host, port, log_file))
        return EXIT_OK
    if word == "error":
        print("ccproxy: start failed: %s" % rest, file=sys.stderr)
    else:
        print("ccproxy: the daemon exited during start-up; see %s" % log_file,
              file=sys.stderr)
    return EXIT_FAIL


def cmd_stop(args, environ):
    """SIGTERM the lock holder and wait for the lock to go (never trust the PID alone)."""
    target = find_target(args, environ)
    path, pid = target.pid_path, target.pid
    if target.state == "foreign":
        print("ccproxy: not stopping anything: %s" % foreign_lock(path, pid), file=sys.stderr)
        return EXIT_FAIL
    if not target.running:
        if target.state == "stale":
            remove_quietly(path, runtime_path(path), reload_request_path(path))
        print("ccproxy is not running")
        return EXIT_OK
    _note(target)
    if not is_ccproxy(pid, target.record):
        print("ccproxy: pid %d holds %s but is not a ccproxy: not signalling it"
              % (pid, path), file=sys.stderr)
        return EXIT_FAIL
    timeout = args.timeout if args.timeout is not None else target.config.drain_timeout + 10
    if not _signal(pid, signal.SIGTERM):
        return EXIT_FAIL
    if _wait_unlocked(path, timeout):
        print("ccproxy stopped (pid %d)" % pid)
        return EXIT_OK
    if args.force and _signal(pid, signal.SIGKILL) and _wait_unlocked(path, 5.0):
        remove_quietly(path, runtime_path(path), reload_request_path(path))
        print("ccproxy killed (pid %d) after %gs" % (pid, timeout))
        return EXIT_OK
    print("ccproxy: pid %d still running after %gs (use --force to kill it)"
          % (pid, timeout), file=sys.stderr)
    return EXIT_FAIL


def _signal(pid, signum):
    """os.kill, with the reason in one line instead of a traceback."""
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return True                  # gone already: what stop wanted
    except PermissionError:
        print("ccproxy: no permission to signal pid %d (it runs as another user)" % pid,
              file=sys.stderr)
        return False


def _wait_unlocked(path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe_pid_file(path)[0] != "running":
            return True
        time.sleep(0.05)
    return False


def fetch_status(host, port, key="", timeout=2.0):
    """GET /status from a daemon over loopback, or None."""
    host = host if is_loopback_host(host) else ("::1" if ":" in host else "127.0.0.1")
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"x-api-key": key} if key else {}
    try:
        conn.request("GET", "/status", headers=headers)
        resp = conn.getresponse()
        return json.loads(resp.read()) if resp.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def status_summary(doc, pid):
    """A few lines for a terminal: state, pid, address, uptime, health, providers."""
    if not doc:
        return "ccproxy is running (pid %s); /status did not answer" % pid
    lines = ["ccproxy %s is %s (pid %s) on http://%s:%s, up %s, health %s" % (
        doc["version"], doc["status"], doc["pid"], doc["host"], doc["port"], doc["uptime"],
        doc["health"])]
    source = (doc.get("config") or {}).get("source")
    lines.append("  config %s, log %s" % (source or "(none: defaults and environment)",
                                          doc.get("log_file") or "stderr"))
    for item in doc["providers"]["items"]:
        rtt = item.get("response_time_ms")
        lines.append("  %-12s %-17s %-13s %-7s %s%s" % (
            item["name"], item["type"], item["status"], "%dms" % rtt if rtt is not None else "-",
            item.get("base_url") or "", "  (circuit open)" if item.get("circuit") == "open"
            else ""))
    return "\n".join(lines)


def cmd_status(args, environ):
    """LSB status: 0 running, 1 dead with PID file, 3 not running, 4 unknown."""
    target = find_target(args, environ)
    code = STATUS_RUNNING if target.running else {
        "stale": STATUS_DEAD, "absent": STATUS_STOPPED}.get(target.state, STATUS_UNKNOWN)
    _note(target)
    doc = fetch_status(*target.address(), key=target.config.api_key) if target.running else None
    if args.json:
        print(json.dumps(doc or {"service": "ccproxy", "status": {
            0: "running", 1: "dead", 3: "stopped"}.get(code, "unknown"), "pid": target.pid},
            indent=2))
    elif target.running:
        print(status_summary(doc, target.pid))
    elif target.state == "stale":
        print("ccproxy is not running, but its PID file %s is left (pid %s)"
              % (target.pid_path, target.pid))
    elif target.state == "foreign":
        print("ccproxy: %s" % foreign_lock(target.pid_path, target.pid))
    else:
        print("ccproxy is not running")
    return code


def cmd_reload(args, environ):
    """Validate the config here first (as `nginx -t` before a reload), against the
    listener the daemon keeps, then make the daemon load it and report whether it did.
    With -c FILE, the daemon loads FILE from then on (the request beside its PID file)."""
    try:
        target = find_target(args, environ, strict=True)
        if target.running:
            reloaded_config(target.listener_config(), target.config)
    except ConfigError as exc:
        print("ccproxy: %s; nothing reloaded, the daemon keeps its config" % exc,
              file=sys.stderr)
        return EXIT_USAGE
    if not target.running:
        print("ccproxy is not running", file=sys.stderr)
        return EXIT_FAIL
    _note(target, with_config=False)
    return _reload(target)


def _reload(target):
    """Signal the daemon, then wait for /status to say how the reload went."""
    wanted = target.config.source or None
    request = reload_request_path(target.pid_path)
    if wanted != (target.record or {}).get("config"):
        write_file_atomically(request, json.dumps({"config": wanted or ""}).encode(), 0o600)
    address = target.address() + (target.config.api_key,)
    before = (fetch_status(*address) or {}).get("config") or {}
    if not _signal(target.pid, signal.SIGHUP):
        return EXIT_FAIL
    deadline = time.monotonic() + 5.0
    while before and time.monotonic() < deadline:
        after = (fetch_status(*address) or {}).get("config") or {}
        if after.get("reload_failures", 0) > before.get("reload_failures", 0):
            # The daemon refused the config: a configuration error, as when it is
            # refused here (exit 2).
            print("ccproxy: reload failed, still serving the old config: %s"
                  % after.get("last_reload_error"), file=sys.stderr)
            return EXIT_USAGE
        if after.get("reloads", 0) > before.get("reloads", 0):
            return _reloaded(target, before, after, wanted)
        time.sleep(0.05)
    print("ccproxy: sent SIGHUP to pid %d; it did not say how the reload went" % target.pid)
    return EXIT_OK


def _reloaded(target, before, after, wanted):
    if (after.get("source") or None) != wanted:
        print("ccproxy: the daemon (pid %d) reloaded %s, not %s (an older ccproxy?): "
              "restart it with -c %s" % (target.pid, after.get("source") or "no file",
                                         wanted, wanted), file=sys.stderr)
        return EXIT_USAGE
    same = after.get("fingerprint") == before.get("fingerprint")
    print("ccproxy reloaded (pid %d): config %s, %s %s" % (
        target.pid, wanted or "(none)", "settings unchanged," if same else "now",
        after.get("fingerprint")))
    return EXIT_OK


def cmd_restart(args, environ):
    """stop (waiting for the drain), then start with the same options."""
    stop_args = argparse.Namespace(**vars(args), force=False, timeout=None)
    if cmd_stop(stop_args, environ) != EXIT_OK:
        return EXIT_FAIL
    return cmd_start(args, environ)


def cmd_env(args, environ):
    """Print the exports that point Claude Code at the running daemon (or, when none
    runs, at what these settings would start)."""
    target = find_target(args, environ)
    _note(target)
    if not target.running:
        print("ccproxy: note: no ccproxy is running; these exports are for the settings "
              "here", file=sys.stderr)
    lines = env_lines(target.config, target.record)
    if any(line.startswith("# the proxy wants its client key") for line in lines):
        print("ccproxy: note: the running daemon wants a client key this shell cannot "
              "see (CCPROXY_API_KEY or api_key_file): export ANTHROPIC_AUTH_TOKEN=<key>",
              file=sys.stderr)
    print("\n".join(lines))
    return EXIT_OK


def cmd_check(args, environ):
    """Validate the config, then the port and each provider; explain each problem and
    how to fix it.  Exit 0 only when everything works."""
    try:
        target = find_target(args, environ, strict=True)
    except ConfigError as exc:
        print("FAIL %s" % exc)
        return EXIT_USAGE
    config = target.config
    report = [("ok", "config %s is valid (%s)" % (config.source or "(defaults and "
                                                    "environment)", config.fingerprint[:19]))]
    report.extend(("warn", w) for w in config.warnings if not w.startswith("provider "))
    if target.running:
        report.append(("ok", "ccproxy runs %s" % target.describe()))
        if (target.record or {}).get("fingerprint", config.fingerprint) != config.fingerprint:
            report.append(("warn", "the running daemon's settings differ from these (its "
                           "own environment or flags, or an edit not reloaded yet); these "
                           "are the ones checked"))
    else:
        report.append(check_port(config))
    upstreams = Upstreams()
    for provider in config.providers:
        label = "%s (%s, %s)" % (provider.name, provider.type, redact_url(provider.base_url))
        report.extend((level, label + ": " + text) for level, text in
                      check_provider(config, provider, upstreams.client(provider)))
    problems = _print_report(report)
    if args.probe is not None:
        problems += run_probes(config, args.probe, upstreams)
    upstreams.close()
    print("everything works" if not problems else "%d problem(s)" % problems)
    return EXIT_OK if not problems else EXIT_FAIL


def check_port(config):
    """Is the port free, held by a ccproxy (which pid), or by something else?"""
    try:
        Server((config.host, config.port), Handler, Service(config)).server_close()
        return "ok", "port %d on %s is free" % (config.port, config.host)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return "problem", "cannot bind %s:%d: %s" % (config.host, config.port, exc.strerror)
    doc = fetch_status(config.host, config.port, config.api_key)
    if doc and doc.get("service") == "ccproxy":
        return "ok", "port %d is served by ccproxy pid %s (running)" % (config.port, doc["pid"])
    return "problem", ("port %d on %s is in use by another program: pick another with --port "
                       "or CCPROXY_PORT (`ss -ltnp 'sport = :%d'` shows which)"
                       % (config.port, config.host, config.port))


def check_provider(config, provider, client):
    """[(level, text), …] for one provider: key, reachability, key accepted, models."""
    if unconfigured(config, provider):
        return [("problem", "no key: %s" % key_hint(provider))]
    try:
        request = dialect_of(provider).check_call(provider) or (
            "GET", anthropic_url(provider, "models", ""), [], None)
    except HTTPError as exc:                       # a token that cannot be had
        return [("problem", exc.message)]
    status, seconds, _, body = fetch(client, request[0], request[1], request[3], request[2])
    if status == "local":
        return [("problem", "cannot call it from here: %s" % body.decode())]
    if isinstance(status, str):
        return [("problem", "unreachable: %s (%s); is the server running? check base_url, "
                 "DNS and HTTPS_PROXY" % (redact_url(request[1]), body.decode()))]
    if status in (401, 403) and dialect_of(provider).forwards_client_key and not (
            provider.api_key):
        return [("ok", "reachable; no key configured, so each client's own key is forwarded")]
    if status in (401, 403) and not provider.api_key:
        return [("problem", "the server wants a key (HTTP %d: %s): %s" % (
            status, upstream_message(body)[:200], key_hint(provider)))]
    if status in (401, 403):
        return [("problem", "key rejected (HTTP %d: %s): check the key from %s"
                 % (status, upstream_message(body)[:200], provider.key_source or "api_key"))]
    if status == 404:
        return [("problem", "%s answered 404: is base_url right? (%s)" % (
            redact_url(request[1]), BASE_URL_HINTS.get(provider.type, BASE_URL_HINTS[None])))]
    if status >= 400:
        return [("problem", "answered HTTP %d: %s" % (status, upstream_message(body)[:200]))]
    out = [("ok", "reachable in %d ms, key accepted" % (seconds * 1000))]
    out.extend(_check_models(config, provider, listed_models(body)))
    if dialect_of(provider).translated:            # the windows ccproxy sizes calls to
        windows = listed_windows(body)
        if provider.model not in windows:
            windows.update(server_windows(config, provider, client))
        out.append(_check_window(config, provider, windows))
    extra = TYPE_CHECKS.get(provider.type)
    if extra:
        out.extend(extra(config, provider, client))
    if dialect_of(provider).translated:
        out.append(("note", AUTO_MODE_NOTE))
    return out


#: What `check` says of every translated route (issue #20): auto mode's classifier
#: answers only on Anthropic's API.
AUTO_MODE_NOTE = ("Claude Code's auto mode has no safety check here (it runs on "
                  "Anthropic's API): Claude Code says \"Auto mode can't check actions\" and "
                  "asks you to approve each risky action; Shift+Tab or `claude "
                  "--permission-mode acceptEdits` works without the questions")


#: What a provider type's base_url looks like, for `check` after a 404.
BASE_URL_HINTS = {
    "anthropic": "an Anthropic-compatible base URL is the part before /v1/messages, e.g. "
                 "https://api.deepseek.com/anthropic",
    "azure": "Azure's is https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT",
    "ollama": "Ollama's is http://HOST:11434/v1",
    None: "OpenAI-compatible base URLs usually end in /v1",
}


#: Where a window came from, as check says it.
WINDOW_SOURCES = {"config": "from the config", "provider": "as its server says",
                  "table": "from ccproxy's table of well-known models"}


def _check_window(config, provider, listed):
    """The model's context window and where it comes from (docs/translation.md §1.9)."""
    model = provider.model
    window, output, source = route_limits(config, provider, model, listed.get(model, 0))
    if not window:
        return ("warn", "context window of %s unknown: Claude Code will assume 1,000,000 "
                "tokens; set context_window (tokens) for this provider" % (model or "the model"))
    return ("ok", "context window of %s: %d tokens %s%s" % (
        model or "the model", window, WINDOW_SOURCES[source],
        ", output up to %d" % output if output else ""))


def _check_models(config, provider, listed):
    out = []
    for model in configured_models(config, provider):
        if listed and model not in listed:
            out.append(("problem", "model %s is not listed by the provider (it lists: %s)"
                        % (model, ", ".join(listed[:8]) + (", …" if len(listed) > 8 else ""))))
        else:
            out.append(("ok", "model %s is available" % model))
    return out


def _check_ollama(config, provider, client):
    """Ollama's /v1 ignores num_ctx and defaults to a small context: Claude Code's
    prompts would be cut silently (ollama/ollama#5902)."""
    windows, out = _ollama_windows(config, provider, client,
                                   re.sub(r"/v1$", "", provider.base_url)), []
    for model in configured_models(config, provider):
        ctx = windows.get(model)
        if ctx is not None and ctx < MIN_CONTEXT:
            out.append(("problem", "model %s is served with a %d-token context; Claude Code's "
                        "prompts are 12-20K tokens and would be cut: set num_ctx 32768 in a "
                        "Modelfile, or OLLAMA_CONTEXT_LENGTH=32768 for the server"
                        % (model, ctx)))
        elif ctx is None:
            out.append(("warn", "model %s: context length unknown (no num_ctx); unless the "
                        "server runs with OLLAMA_CONTEXT_LENGTH=32768 or more, Claude Code's "
                        "prompts will be cut" % model))
    return out


#: Checks one provider type has beside the probe: Ollama's context size (/api/show).
TYPE_CHECKS = {"ollama": _check_ollama}


def cmd_init(args, environ):
    """Write a starting config where ccproxy looks without -c (or at -c FILE): the
    fields the provider needs, mode 0600; an existing file is never overwritten.  The
    system file (/etc/ccproxy/config.json) is 0644: the unit's dynamic user reads it,
    and what init writes names keys by their variables, never holds one."""
    path = args.config or environ.get("CCPROXY_CONFIG") or default_config_file(environ)
    system = path.startswith("/etc/")
    try:
        os.makedirs(os.path.dirname(path) or ".", 0o755 if system else 0o700, exist_ok=True)
        write_new_file(path, starter_config(args.provider).encode(), 0o644 if system else 0o600)
    except FileExistsError:
        print("ccproxy: %s exists; not overwritten (edit it, remove it, or give -c OTHER)"
              % path, file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        print("ccproxy: cannot write %s: %s" % (path, exc.strerror), file=sys.stderr)
        return EXIT_FAIL
    print("ccproxy: wrote %s (provider %s)\nnext: %s; then `ccproxy check`, `ccproxy "
          "start`" % (path, args.provider, starter_next(args.provider)))
    return EXIT_OK


def write_new_file(path, data, mode):
    """Create `path` with `data`, failing (FileExistsError) if anything is there, a
    symlink included."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def cmd_usage(args, environ):
    """Print the ledger's totals; it reads the database itself, so it works with the
    daemon stopped (the running daemon's own database, where one runs)."""
    target = find_target(args, environ)
    path = (target.record or {}).get("usage_db") or target.config.usage_db
    try:
        since = parse_since(args.since)
    except ValueError:
        raise ConfigError("--since: 7d, 12h, 30m or a date such as 2026-12-01, got %s"
                          % _shown(args.since)) from None
    doc = usage_report(path, since, args.by)
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.csv:
        print(usage_csv(doc), end="")
    else:
        print(usage_text(doc, path))
    return EXIT_OK


def usage_csv(doc):
    """The report as CSV: a header, a line per group, then the total."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((doc["by"],) + USAGE_SUMS)
    for row in doc["rows"] + [dict(doc["total"], group="total")]:
        writer.writerow([row["group"]] + [row[k] for k in USAGE_SUMS])
    return out.getvalue()


def usage_text(doc, path):
    """The report as an aligned table, ccusage's way: a line per group, the total."""
    heads = (doc["by"].upper(), "REQUESTS", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE",
             "COST (USD)")
    lines = [[str(r["group"])] + ["{:,}".format(r[k]) for k in USAGE_SUMS[:-1]] +
             ["%.4f" % r["cost_usd"]] for r in doc["rows"] + [dict(doc["total"], group="total")]]
    widths = [max(len(x) for x in col) for col in zip(heads, *lines)]
    return "\n".join(["usage since %s (%s)" % (doc["since"], path),
                      _table_line(heads, widths)] +
                     [_table_line(cells, widths) for cells in lines] +
                     ["costs are estimates (prices of %s; set prices in the config to "
                      "override)" % PRICES_TAKEN])


def _table_line(cells, widths):
    """The first cell to the left, the numbers to the right."""
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))


def cmd_replay(args, environ):
    """Replay a recording through this build: the client's answer now, and its
    differences from the one recorded (exit 1 when there are some)."""
    try:
        recording = load_recording(args.file)
    except OSError as exc:
        raise UsageError("cannot read %s: %s" % (args.file, exc.strerror)) from None
    now = replay(recording, timing=args.timing)
    sys.stdout.write("status %d\n%s" % (now[0], now[2].decode("utf-8", "replace")))
    diff = replay_diff(recorded_reply(recording), now,
                       recording["meta"].get("redact") == "content")
    if diff:
        print("\n".join(["", "ccproxy: the client gets something else now:"] + diff))
        return EXIT_FAIL
    print("\nccproxy: the same as recorded (ids and pings aside)", file=sys.stderr)
    return EXIT_OK


def cmd_version(args, environ):
    """Print the version and the build stamp."""
    info = build_info()
    print("ccproxy %s (commit %s, built %s)" % (info["version"], info["commit"], info["date"]))
    return EXIT_OK


COMMANDS = {"run": cmd_run, "start": cmd_start, "stop": cmd_stop, "restart": cmd_restart,
            "reload": cmd_reload, "status": cmd_status, "check": cmd_check, "env": cmd_env,
            "init": cmd_init, "usage": cmd_usage, "replay": cmd_replay,
            "version": cmd_version}


def main(argv=None, environ=None):
    """Parse the command line and run one command; return the exit code."""
    args = _parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    try:
        return COMMANDS[args.command](args, environ)
    except ConfigError as exc:
        print("ccproxy: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    except AlreadyRunning as exc:
        print("ccproxy: %s" % exc, file=sys.stderr)
        return EXIT_FAIL
    except CcproxyError as exc:
        print("ccproxy: %s" % exc, file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
