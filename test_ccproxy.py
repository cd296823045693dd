"""Tests for ccproxy.py, one TestCase class per section of the program.

Run: `make test` (pytest) or, with nothing but the system python3, `python3 -m unittest
test_ccproxy`.  Servers bind 127.0.0.1 port 0; every wait has a deadline; nothing leaves
loopback.  Tests that read ../shared (captured Claude Code bodies) skip when it is absent.
"""
import argparse
import base64
import calendar
import contextlib
import dataclasses
import errno
import fcntl
import functools
import email.message
import glob
import http.client
import http.server
import io
import json
import logging
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.parse
import zlib

import ccproxy

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ccproxy.py")
SAMPLES = os.path.join(HERE, "..", "shared", "claude-code-wire", "samples")
TIMEOUT = 10.0          # every wait in this file is bounded by this (CPython's LOOPBACK_TIMEOUT)


def headers_of(pairs):
    """An email.message.Message, as http.server and http.client hand headers over."""
    msg = email.message.Message()
    for name, value in pairs:
        msg[name] = value
    return msg


def free_port():
    """A port that was free a moment ago (for subprocesses that must be told a port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=TIMEOUT, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met within %gs" % timeout)


def running(pid):
    """True while `pid` runs; a zombie (exited, not yet reaped by a PID 1 that never
    reaps, as in some containers) counts as gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def config(**kw):
    """A Config built the real way, then with test-only overrides (port 0)."""
    cfg = ccproxy.build_config(kw.pop("data", {}), kw.pop("environ", {}), {})
    return dataclasses.replace(cfg, **kw)


def provider_cfg(name, url, **kw):
    return ccproxy.ProviderConfig(name=name, type="anthropic", base_url=url, **kw)


# ---- Fakes ---------------------------------------------------------------------

class FakeUpstream:
    """A loopback HTTP/1.1 server whose answers come from `behave(handler, body)`.

    It records every request and counts accepted connections (for connection reuse).
    """

    def __init__(self, behave=None):
        self.behave = behave or (lambda h, body: h.reply(200, MESSAGE_JSON))
        self.requests, self.connections, self.closed = [], 0, threading.Event()
        fake = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()      # head and body go out in two writes: no Nagle stall
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n)
                fake.requests.append({"path": self.path, "headers": self.headers,
                                      "body": body, "method": self.command})
                fake.behave(self, body)

            do_GET = do_POST

            def reply(self, status, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def start_stream(self, headers=()):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()

            def chunk(self, data):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

            def finish(self):
                super().finish()
                fake.closed.set()

        class S(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                conn = super().get_request()
                fake.connections += 1
                return conn

        self.server = S(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


MESSAGE_JSON = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 5, "output_tokens": 1}}


def thinking_upstream(before, release, after):
    """A fake upstream's behave: stream `before`, go silent (as a model that thinks)
    until `release` is set, then stream `after` and end."""
    def behave(h, body):
        h.start_stream()
        for piece in before:
            h.chunk(piece.encode())
        h.wfile.flush()
        release.wait(TIMEOUT)
        for piece in after:
            h.chunk(piece.encode())
        h.chunk(b"")
    return behave


def sse(event, data):
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data).encode())


STREAM = [
    sse("message_start", {"type": "message_start", "message": dict(
        MESSAGE_JSON, content=[], stop_reason=None, model="upstream-model")}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "hi"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                          "usage": {"output_tokens": 1}}),
    sse("message_stop", {"type": "message_stop"}),
]


class Proxy:
    """ccproxy's Server in-process on 127.0.0.1 port 0, for end-to-end tests."""

    def __init__(self, cfg):
        self.service = ccproxy.Service(cfg)
        self.server = ccproxy.Server(("127.0.0.1", 0), ccproxy.Handler, self.service)
        self.port = self.server.server_address[1]
        self.service.port, self.service.ready = self.port, True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.service.upstreams.close()
        if self.service.ledger is not None:
            self.service.ledger.close()
        self.thread.join(TIMEOUT)

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)

    def call(self, method, path, body=None, headers=None):
        conn = self.conn()
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, data, headers or {})
        resp = conn.getresponse()
        out = resp.read()
        conn.close()
        return resp, out


BODY = {"model": "claude-sonnet-5-5", "max_tokens": 10, "stream": False,
        "messages": [{"role": "user", "content": "hi"}]}


# ---- Configuration -------------------------------------------------------------

class TestConfig(unittest.TestCase):

    def test_zero_config_is_a_loopback_anthropic_passthrough(self):
        cfg = ccproxy.build_config({}, {}, {})
        self.assertEqual((cfg.host, cfg.port), ("127.0.0.1", 3456))
        self.assertEqual([(p.name, p.type, p.base_url, p.api_key) for p in cfg.providers],
                         [("anthropic", "anthropic", "https://api.anthropic.com", "")])

    def test_precedence_defaults_file_env_cli(self):
        data = {"port": 4000, "log_level": "debug", "host": "127.0.0.2"}
        env = {"CCPROXY_PORT": "5000", "CCPROXY_HOST": "127.0.0.3"}
        cfg = ccproxy.build_config(data, env, {"port": "6000"})
        self.assertEqual((cfg.port, cfg.host, cfg.log_level), (6000, "127.0.0.3", "debug"))
        self.assertEqual(ccproxy.build_config(data, env, {}).port, 5000)
        self.assertEqual(ccproxy.build_config(data, {}, {}).port, 4000)

    def test_bad_values_name_the_key(self):
        cases = [
            ({"CCPROXY_PORT": "abc"}, {}, 'CCPROXY_PORT must be 1-65535, got "abc"'),
            ({}, {"port": 70000}, "port must be 1-65535, got 70000"),
            ({}, {"port": True}, "port must be 1-65535"),
            ({"CCPROXY_METRICS": "maybe"}, {}, "CCPROXY_METRICS must be true or false"),
            ({"CCPROXY_LOG_LEVEL": "loud"}, {}, "CCPROXY_LOG_LEVEL must be one of"),
            ({"CCPROXY_LOG_FORMAT": "xml"}, {}, "CCPROXY_LOG_FORMAT must be text or json"),
            ({"CCPROXY_DRAIN_TIMEOUT": "-1"}, {}, "CCPROXY_DRAIN_TIMEOUT must be a number"),
            ({"CCPROXY_DRAIN_TIMEOUT": "nan"}, {}, "CCPROXY_DRAIN_TIMEOUT must be a number"),
            ({"CCPROXY_MAX_BODY_BYTES": "1.5"}, {}, "CCPROXY_MAX_BODY_BYTES must be a whole"),
            ({}, {"prot": 1}, "unknown key \"prot\""),
            ({}, {"providers": {}}, "providers must be a list"),
            ({}, {"providers": [{"type": "nope"}]}, "providers[0].type must be one of"),
            ({}, {"providers": [{"type": "openai", "quirks": {"colour": 1}}]},
             "providers[0].quirks: unknown flag \"colour\""),
            ({}, {"providers": [{"type": "openai", "quirks": {"no_vision": "yes"}}]},
             "providers[0].quirks.no_vision must be a bool"),
            ({}, {"providers": [{"type": "openai", "quirks": []}]},
             "providers[0].quirks must be an object"),
            ({}, {"providers": [{"type": "azure"}]}, "providers[0].base_url is required"),
            ({}, {"providers": [{"headers": ["X-Title"]}]},
             "providers[0].headers must be an object"),
            ({}, {"providers": [{"headers": {"Content-Length": "1"}}]},
             "providers[0].headers: \"Content-Length\" is not a header ccproxy can send"),
            ({}, {"providers": [{"headers": {"X Title": "a"}}]}, "is not a header"),
            ({}, {"providers": [{"headers": {"X-Title": "a\r\nHost: evil"}}]},
             "providers[0].headers.X-Title must be a one-line string"),
            ({}, {"providers": [{"base_url": "ftp://x"}]}, "providers[0].base_url must be"),
            ({}, {"providers": [{"base_url": "https://u:p@x"}]}, "must not carry a user"),
            ({}, {"providers": [{"name": "a b"}]}, "providers[0].name must be"),
            ({}, {"providers": [{"colour": "red"}]}, "providers[0]: unknown key"),
            ({}, {"providers": [{}, {}]}, "two providers are named \"anthropic\""),
            ({}, {"routes": [{"match": "x", "provider": "nobody"}]},
             "routes[0].provider must name a provider"),
            ({}, {"routes": [{"provider": "anthropic"}]}, "routes[0].match must be"),
            ({}, {"fallback": ["ghost"]}, "fallback must be a list of provider names"),
            ({"CCPROXY_HOST": "0.0.0.0"}, {}, "host 0.0.0.0 is not a loopback address"),
            ({"CCPROXY_HOST": "a b"}, {}, "CCPROXY_HOST must be a host name"),
            ({}, [1], "the config file must hold a JSON object"),
        ]
        for env, data, expected in cases:
            with self.subTest(expected=expected):
                with self.assertRaises(ccproxy.ConfigError) as cm:
                    ccproxy.build_config(data, env, {})
                self.assertIn(expected, str(cm.exception))
                self.assertTrue(str(cm.exception).startswith("config: "))

    def test_provider_headers_go_on_every_call_and_replace_ours(self):
        cfg = ccproxy.build_config({"providers": [
            {"name": "or", "type": "openrouter", "api_key": "sk-or", "headers": {
                "HTTP-Referer": "https://example.org", "X-Title": "ccproxy"}},
            {"name": "gw", "base_url": "http://127.0.0.1:9", "api_key": "k",
             "headers": {"X-Api-Key": "gateway-key"}}]}, {}, {})
        orp, gw = cfg.providers
        self.assertNotIn("sk-or", repr(cfg))
        for headers in (ccproxy.openai_headers(orp, True), ccproxy.probe_request(orp)[1]):
            self.assertEqual(headers[-2:], [("HTTP-Referer", "https://example.org"),
                                            ("X-Title", "ccproxy")])
            self.assertIn(("authorization", "Bearer sk-or"), headers)
        sent = ccproxy.passthrough_headers(headers_of([("x-api-key", "client")]), gw, cfg)
        self.assertEqual([v for n, v in sent if n.lower() == "x-api-key"], ["gateway-key"])

    def test_remote_bind_needs_a_key_or_explicit_permission(self):
        self.assertEqual(ccproxy.build_config(
            {}, {"CCPROXY_HOST": "0.0.0.0", "CCPROXY_API_KEY": "k"}, {}).host, "0.0.0.0")
        self.assertTrue(ccproxy.build_config({}, {"CCPROXY_HOST": "0.0.0.0"},
                                             {"allow_remote": True}).allow_remote)
        with self.assertRaises(ccproxy.ConfigError):
            ccproxy.build_config({"status_host": "0.0.0.0", "status_port": 9000}, {}, {})

    def test_a_reload_is_checked_on_the_listeners_that_stay(self):
        """Issue #17: the exposure check ran on the new file's host while the old
        listener stayed, so a reload could drop the key of a daemon open to the net."""
        remote = config(host="0.0.0.0", api_key="k")
        status = config(status_host="0.0.0.0", status_port=9000, api_key="k")
        rows = [  # running, new file's settings, refused?, restart-only changes
            (remote, {"host": "127.0.0.1"}, True, None),
            (remote, {"host": "0.0.0.0", "api_key": "k2"}, False, []),
            (remote, {"host": "127.0.0.1", "allow_remote": True}, False, ["host"]),
            (status, {}, True, None),
            (config(), {"port": 4000}, False, ["port"]),
        ]
        for running, data, refused, changed in rows:
            with self.subTest(data=data, running=running.host):
                new = ccproxy.build_config(data, {}, {})
                if refused:
                    with self.assertRaisesRegex(ccproxy.ConfigError, "reload refused: the "
                                                "daemon keeps listening on "):
                        ccproxy.reloaded_config(running, new)
                    continue
                effective, got = ccproxy.reloaded_config(running, new)
                self.assertEqual(got, changed)
                self.assertEqual((effective.host, effective.port, effective.api_key),
                                 (running.host, running.port, new.api_key))

    def test_an_unsafe_reload_keeps_the_running_config_and_counts_a_failure(self):
        running = config(host="0.0.0.0", api_key="k")
        daemon = ccproxy.Daemon(running, lambda: ccproxy.build_config({}, {}, {}), None, {})
        daemon.reload()
        service = daemon.service
        self.assertIs(service.config, running)
        self.assertEqual((service.reloads, service.reload_failures), (0, 1))
        self.assertIn("reload refused", service.last_reload_error)
        self.assertEqual(service.keys, [(ccproxy.key_digest("k"), "default")])
        daemon.close()

    def test_keys_come_only_from_what_names_them_for_that_host(self):
        """Issue #18: a provider's usual key variable goes only to its own host; a
        custom base_url takes a key from api_key, api_key_env, api_key_file or
        CCPROXY_UPSTREAM_API_KEY alone."""
        user = {"OPENAI_API_KEY": "sk-user", "AZURE_OPENAI_API_KEY": "az", "GOOGLE_API_KEY": "g"}
        rows = [  # provider entry, environment, (key, key_source)
            ({"type": "openai"}, user, ("sk-user", "OPENAI_API_KEY")),
            ({"type": "openai", "base_url": "https://gw.example/v1"}, user, ("", "")),
            ({"type": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1"}, user, ("", "")),
            ({"type": "azure", "base_url": "https://x.openai.azure.com/openai/deployments/d"},
             user, ("az", "AZURE_OPENAI_API_KEY")),
            ({"type": "azure", "base_url": "https://evil.example/openai"}, user, ("", "")),
            ({"type": "gemini"}, user, ("g", "GOOGLE_API_KEY")),
            ({"type": "openai", "api_key_env": "CHEAP_KEY"}, user, ("", "CHEAP_KEY")),
            ({"type": "openai", "api_key_env": "CHEAP_KEY"}, dict(user, CHEAP_KEY="c"),
             ("c", "CHEAP_KEY")),
            ({"type": "openai", "api_key": "inline"}, user, ("inline", "api_key")),
            ({"type": "anthropic"}, {"ANTHROPIC_API_KEY": "client"}, ("", "")),
        ]
        for entry, environ, expected in rows:
            with self.subTest(entry=entry):
                p = ccproxy.build_config({"providers": [entry]}, environ, {}).providers[0]
                self.assertEqual((p.api_key, p.key_source), expected)
        env = {"CCPROXY_PROVIDER": "openai-compatible", "CCPROXY_BASE_URL": "http://h:1/v1",
               "CCPROXY_UPSTREAM_API_KEY": "up", "OPENAI_API_KEY": "sk-user"}
        p = ccproxy.build_config({"providers": [{"api_key": "file-key"}]}, env, {}).providers[0]
        self.assertEqual((p.api_key, p.key_source), ("up", "CCPROXY_UPSTREAM_API_KEY"))
        with self.assertRaisesRegex(ccproxy.ConfigError, r"providers\[0\]: give one of api_key"):
            ccproxy.build_config({"providers": [{"api_key": "a", "api_key_env": "B"}]}, {}, {})

    def test_key_files_and_systemd_credentials(self):
        with tempfile.TemporaryDirectory() as tmp:
            creds = os.path.join(tmp, "creds")
            os.mkdir(creds)
            for name, text in (("upstream", "sk-file\n"), ("client", "ck\n"), ("empty", "")):
                with open(os.path.join(creds, name), "w") as f:
                    f.write(text)
            env = {"CREDENTIALS_DIRECTORY": creds}
            cfg = ccproxy.build_config({"api_key_file": "client", "providers": [
                {"type": "openai", "api_key_file": "upstream"},
                {"name": "abs", "type": "openai", "api_key_file": os.path.join(creds, "upstream")}]},
                env, {})
            self.assertEqual(cfg.api_key, "ck")
            self.assertEqual([(p.api_key, p.key_source) for p in cfg.providers],
                             [("sk-file", "file upstream"),
                              ("sk-file", "file " + os.path.join(creds, "upstream"))])
            self.assertNotIn("sk-file", repr(cfg))
            for data, message in (
                    ({"providers": [{"type": "openai", "api_key_file": "missing"}]},
                     r"providers\[0\].api_key_file: cannot read missing: no such file"),
                    ({"providers": [{"type": "openai", "api_key_file": "empty"}]},
                     r"providers\[0\].api_key_file: empty is empty"),
                    ({"api_key": "a", "api_key_file": "client"}, "give one of api_key")):
                with self.subTest(message), self.assertRaisesRegex(ccproxy.ConfigError, message):
                    ccproxy.build_config(data, env, {})

    def test_start_warns_of_what_cannot_work(self):
        """Issue #18: a misspelled variable was ignored, and a provider without the
        key it needs looked healthy until its first call got a 401."""
        cfg = ccproxy.build_config({"providers": [{"type": "groq"}, {"type": "ollama"}]},
                                   {"CCPROXY_PORTT": "3998", "CCPROXY_ZZZ": "1"}, {})
        self.assertEqual(cfg.warnings, (
            "CCPROXY_PORTT is not a ccproxy setting; did you mean CCPROXY_PORT?",
            "CCPROXY_ZZZ is not a ccproxy setting",
            "provider groq has no key: set GROQ_API_KEY"))
        self.assertEqual(ccproxy.build_config({}, {}, {}).warnings, ())
        with_key = ccproxy.build_config({}, {"CCPROXY_API_KEY": "k"}, {})
        self.assertIn("provider anthropic has no key", with_key.warnings[0])
        self.assertEqual(cfg.fingerprint, ccproxy.build_config(
            {"providers": [{"type": "groq"}, {"type": "ollama"}]}, {}, {}).fingerprint)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "c.json")
            with open(path, "w") as f:
                json.dump({"providers": [{"type": "openai", "api_key": "sk"}]}, f)
            os.chmod(path, 0o644)
            self.assertIn("other users can read it", ccproxy.load_config(path, {}).warnings[-1])
            os.chmod(path, 0o600)
            self.assertEqual(ccproxy.load_config(path, {}).warnings, ())

    def test_examples_are_init_output_and_each_loads(self):
        examples = os.path.join(HERE, "examples")
        for ptype in ccproxy.STARTER_FIELDS:
            with self.subTest(ptype), open(os.path.join(examples, ptype + ".json")) as f:
                self.assertEqual(f.read(), ccproxy.starter_config(ptype))
        for path in glob.glob(os.path.join(examples, "*.json")):
            with self.subTest(path):
                cfg = ccproxy.load_config(path, {"CCPROXY_CONFIG": ""})
                self.assertEqual(cfg.source, path)
                self.assertTrue(all(w.startswith("provider ") for w in cfg.warnings))

    def test_init_writes_a_private_starting_config_once(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sub", "config.json")
            args = argparse.Namespace(config=path, provider="openrouter")
            with contextlib.redirect_stdout(io.StringIO()) as out:
                self.assertEqual(ccproxy.cmd_init(args, {}), 0)
            self.assertIn("next: export OPENROUTER_API_KEY=...", out.getvalue())
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
            cfg = ccproxy.load_config(path, {"OPENROUTER_API_KEY": "sk-or"})
            self.assertEqual((cfg.providers[0].type, cfg.providers[0].api_key),
                             ("openrouter", "sk-or"))
            with contextlib.redirect_stderr(io.StringIO()) as err:
                self.assertEqual(ccproxy.cmd_init(args, {}), 1)
            self.assertIn("exists; not overwritten", err.getvalue())
            with open(path) as f:
                self.assertIn('"type": "openrouter"', f.read())

    def test_the_default_config_file_is_found_without_c(self):
        with tempfile.TemporaryDirectory() as tmp, \
                unittest.mock.patch("os.geteuid", return_value=1000):
            env = {"XDG_CONFIG_HOME": tmp, "HOME": "/nonexistent"}
            rows = [(env, os.path.join(tmp, "ccproxy", "config.json")),
                    ({"HOME": "/home/u"}, "/home/u/.config/ccproxy/config.json"),
                    ({"HOME": "/home/u", "RUNTIME_DIRECTORY": "/run/ccproxy"},
                     "/etc/ccproxy/config.json"),
                    ({"HOME": "/home/u", "RUNTIME_DIRECTORY": "/run/user/1000/ccproxy"},
                     "/home/u/.config/ccproxy/config.json")]
            for environ, expected in rows:
                self.assertEqual(ccproxy.default_config_file(environ), expected)
            self.assertEqual(ccproxy.load_config(None, env).source, "")      # none there yet
            os.mkdir(os.path.join(tmp, "ccproxy"))
            with open(os.path.join(tmp, "ccproxy", "config.json"), "w") as f:
                f.write('{"port": 4321}')
            self.assertEqual(ccproxy.load_config(None, env).port, 4321)
            self.assertEqual(ccproxy.load_config(None, dict(env, CCPROXY_CONFIG="")).port, 3456)
        with unittest.mock.patch("os.geteuid", return_value=0):
            self.assertEqual(ccproxy.default_config_file({}), "/etc/ccproxy/config.json")

    def test_secrets_never_appear_in_errors_or_repr(self):
        with self.assertRaises(ccproxy.ConfigError) as cm:
            ccproxy.build_config({"api_key": 12345678}, {}, {})
        self.assertNotIn("12345678", str(cm.exception))
        cfg = ccproxy.build_config({}, {"CCPROXY_API_KEY": "sekrit-1",
                                        "CCPROXY_UPSTREAM_API_KEY": "sekrit-2"}, {})
        self.assertNotIn("sekrit", repr(cfg))
        self.assertNotIn("sekrit", cfg.fingerprint)

    def test_provider_environment_and_usual_key_variables(self):
        env = {"CCPROXY_BASE_URL": "http://127.0.0.1:9/", "CCPROXY_MODEL": "m",
               "CCPROXY_BIG_MODEL": "big", "CCPROXY_SMALL_MODEL": "small",
               "CCPROXY_UPSTREAM_API_KEY": "up"}
        p = ccproxy.build_config({}, env, {}).providers[0]
        self.assertEqual((p.base_url, p.model, p.big_model, p.small_model, p.api_key),
                         ("http://127.0.0.1:9", "m", "big", "small", "up"))
        data = {"providers": [{"name": "a", "api_key_env": "MY_KEY"}]}
        self.assertEqual(ccproxy.build_config(data, {"MY_KEY": "v"}, {}).providers[0].api_key,
                         "v")
        # The anthropic type never picks up ANTHROPIC_API_KEY: that is the client's key.
        self.assertEqual(ccproxy.build_config({}, {"ANTHROPIC_API_KEY": "c"}, {})
                         .providers[0].api_key, "")

    def test_routes_fallback_and_fingerprint(self):
        data = {"providers": [{"name": "a", "base_url": "http://127.0.0.1:1"},
                              {"name": "b", "base_url": "http://127.0.0.1:2",
                               "read_timeout": 5}],
                "routes": [{"match": "*HAIKU*", "provider": "b", "model": "tiny"}],
                "fallback": ["a", "b"]}
        cfg = ccproxy.build_config(data, {}, {})
        self.assertEqual(cfg.routes[0], ccproxy.RouteConfig("*haiku*", "b", "tiny"))
        self.assertEqual(cfg.provider("b").read_timeout, 5.0)
        self.assertEqual(cfg.fallback, ("a", "b"))
        self.assertTrue(cfg.fingerprint.startswith("sha256:"))
        self.assertEqual(cfg.fingerprint, ccproxy.build_config(data, {}, {}).fingerprint)
        self.assertNotEqual(cfg.fingerprint, ccproxy.build_config({}, {}, {}).fingerprint)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.port = 1

    def test_load_config_reads_a_file_and_reports_bad_json(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "c.json")
            with open(path, "w") as f:
                f.write('{"port": 4444}')
            cfg = ccproxy.load_config(path, {}, {})
            self.assertEqual((cfg.port, cfg.source), (4444, path))
            self.assertEqual(ccproxy.load_config(None, {"CCPROXY_CONFIG": path}, {}).port, 4444)
            with open(path, "w") as f:
                f.write("{nope")
            with self.assertRaisesRegex(ccproxy.ConfigError, "is not valid JSON"):
                ccproxy.load_config(path, {}, {})
            with self.assertRaisesRegex(ccproxy.ConfigError, "cannot read"):
                ccproxy.load_config(path + ".missing", {}, {})


# ---- Pure protocol functions ---------------------------------------------------

class TestPureFunctions(unittest.TestCase):

    def test_is_loopback_host(self):
        for host, expected in [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                               ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                               ("::", False), ("", False), ("10.0.0.1", False),
                               ("example.com", False), ("::ffff:127.0.0.1", True),
                               ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False)]:
            with self.subTest(host=host):
                self.assertEqual(ccproxy.is_loopback_host(host), expected)

    def test_thought_signatures_ride_in_tool_ids(self):
        sig = "CiQB+/x=" * 40
        signed = ccproxy.id_with_signature("call_1", sig)
        self.assertRegex(signed, r"^call_1__ts_[A-Za-z0-9_-]+$")
        for tool_id, expected in [(signed, ("call_1", sig)), ("call_1", ("call_1", None)),
                                  ("a__ts_", ("a__ts_", None)), ("a__ts_%%", ("a__ts_%%", None)),
                                  ("a__ts_" + "_w", ("a__ts__w", None))]:     # not UTF-8
            with self.subTest(tool_id=tool_id[:20]):
                self.assertEqual(ccproxy.split_signature(tool_id), expected)

    def test_malloc_tunables_add_no_thread_cache_and_keep_the_users(self):
        ours = "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1"
        for current, expected in [
                ("", ours),
                ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:"
                                             "glibc.malloc.tcache_count=0"),
                ("glibc.malloc.tcache_count=7", "glibc.malloc.tcache_count=7:"
                                                "glibc.malloc.arena_max=1"),
                ("glibc.malloc.tcache_count=7:glibc.malloc.arena_max=4",
                 "glibc.malloc.tcache_count=7:glibc.malloc.arena_max=4"),
                ("glibc.rtld.nns=2", "glibc.rtld.nns=2:" + ours)]:
            with self.subTest(current=current):
                self.assertEqual(ccproxy.malloc_tunables(current), expected)
        env = ccproxy.reexec_environ({"HOME": "/h"}, 7)
        self.assertEqual(env, {"HOME": "/h", "CCPROXY_NO_REEXEC": "1", "CCPROXY_READY_FD": "7",
                               "GLIBC_TUNABLES": ours})
        self.assertNotIn("CCPROXY_READY_FD", ccproxy.reexec_environ({}, None))

    def test_presented_key_and_constant_time_match(self):
        ring = [(ccproxy.key_digest("secret"), "default")]
        for pairs, ok in [([("x-api-key", "secret")], True),
                          ([("Authorization", "Bearer secret")], True),
                          ([("Authorization", "bearer  secret ")], True),
                          ([("Authorization", "Basic secret")], False),
                          ([("x-api-key", "wrong")], False), ([], False),
                          ([("x-api-key", "sécret-ключ")], False),
                          # Both headers (both variables set): either may hold the key.
                          ([("x-api-key", "users-own"), ("Authorization", "Bearer secret")],
                           True),
                          ([("x-api-key", "secret"), ("Authorization", "Bearer other")], True),
                          ([("x-api-key", ""), ("Authorization", "Bearer ")], False)]:
            with self.subTest(pairs=pairs):
                self.assertEqual(ccproxy.key_owner(headers_of(pairs), ring),
                                 "default" if ok else None)

    def test_hop_by_hop_headers_are_removed_both_ways(self):
        # Go's TestReverseProxyStripHeadersPresentInConnection (golang/go#16875).
        h = headers_of([("Connection", "Upgrade, X-Custom"), ("X-Custom", "1"),
                        ("Upgrade", "h2c"), ("Keep-Alive", "5"), ("TE", "trailers"),
                        ("Proxy-Authorization", "p"), ("Content-Type", "a/b"),
                        ("X-Kept", "2"), ("Trailer", "x"), ("Transfer-Encoding", "chunked")])
        kept = ccproxy.filter_headers(h, ccproxy.HOP_BY_HOP)
        self.assertEqual(kept, [("Content-Type", "a/b"), ("X-Kept", "2")])

    def test_upstream_error_mapping(self):
        rows = [  # status, body, passthrough -> status, type, retry header
            (400, {"error": {"message": "bad"}}, False, 400, "invalid_request_error", "false"),
            (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "b"}},
             True, 400, "invalid_request_error", None),     # Anthropic: its downgrade loop
            (422, {"detail": "bad"}, False, 400, "invalid_request_error", "false"),
            (401, {"error": {"message": "key"}}, False, 401, "authentication_error", "false"),
            (402, {"error": {"message": "pay"}}, False, 402, "billing_error", "false"),
            (403, {"error": "nope"}, False, 403, "permission_error", "false"),
            (404, {"message": "no model"}, False, 404, "not_found_error", None),
            (408, b"timeout", False, 504, "timeout_error", None),
            (413, b"big", False, 413, "request_too_large", "false"),
            (429, {"error": {"message": "slow"}}, False, 429, "rate_limit_error", None),
            (500, b"<html>oops</html>", False, 500, "api_error", None),
            (502, b"bad gateway", False, 500, "api_error", None),
            (503, b"unavailable", False, 529, "overloaded_error", None),
            (504, b"gateway timeout", False, 504, "timeout_error", None),
            (529, {"type": "error", "error": {"type": "overloaded_error", "message": "o"}},
             True, 529, "overloaded_error", None),
            (500, [{"error": {"message": "The model is overloaded"}}], False, 529,
             "overloaded_error", None),
            (418, b"teapot", False, 400, "invalid_request_error", "false"),
            (599, b"weird", False, 500, "api_error", None),
        ]
        for status, body, passthrough, out_status, etype, should_retry in rows:
            with self.subTest(status=status, body=body):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                got, headers, out = ccproxy.map_upstream_error(
                    status, headers_of([]), raw, "p", passthrough)
                self.assertEqual(got, out_status)
                doc = json.loads(out)
                self.assertEqual((doc["type"], doc["error"]["type"]), ("error", etype))
                self.assertEqual(dict(headers).get("x-should-retry"), should_retry)

    def test_passthrough_errors_keep_status_body_and_retry_after(self):
        body = json.dumps({"type": "error", "error": {"type": "rate_limit_error",
                                                      "message": "slow down"}}).encode()
        status, headers, out = ccproxy.map_upstream_error(
            429, headers_of([("retry-after", "7")]), body, "p", True)
        self.assertEqual((status, out, dict(headers)["retry-after"]), (429, body, "7"))
        status, headers, out = ccproxy.map_upstream_error(
            429, headers_of([("retry-after-ms", "1500")]), b"{}", "p", False)
        self.assertEqual(dict(headers)["retry-after"], "2")
        self.assertIn("p upstream 429", json.loads(out)["error"]["message"])

    def test_failure_replies(self):
        for kind, status, etype, retry in [("connect", 500, "api_error", "false"),
                                           ("timeout", 504, "timeout_error", None),
                                           ("reset", 500, "api_error", None)]:
            with self.subTest(kind=kind):
                err = ccproxy.UpstreamError(kind, "http://127.0.0.1:9/v1/messages", "why")
                got = ccproxy.failure_reply(err, "p")
                self.assertEqual((got[0], got[1], dict(got[3]).get("x-should-retry")),
                                 (status, etype, retry))
                self.assertIn("http://127.0.0.1:9/v1/messages", got[2])

    def test_plan_route_and_model_mapping(self):
        data = {"providers": [
            {"name": "a", "base_url": "http://127.0.0.1:1", "model": "a-default",
             "small_model": "a-small"},
            {"name": "b", "base_url": "http://127.0.0.1:2", "big_model": "b-big"},
            {"name": "c", "base_url": "http://127.0.0.1:3"}],
            "routes": [{"match": "claude-*opus*", "provider": "b"},
                       {"match": "*haiku*", "provider": "a"},
                       {"match": "exact", "provider": "c", "model": "fixed"},
                       {"match": "default", "provider": "c"}],
            "fallback": ["a", "c"]}
        cfg = ccproxy.build_config(data, {}, {})
        rows = [("claude-opus-5-5", [("b", "b-big"), ("a", "a-default"), ("c", "claude-opus-5-5")]),
                ("claude-haiku-5-5", [("a", "a-small"), ("c", "claude-haiku-5-5")]),
                ("EXACT", [("c", "fixed"), ("a", "a-default")]),
                ("gpt-x", [("c", "gpt-x"), ("a", "a-default")])]
        for model, expected in rows:
            with self.subTest(model=model):
                plan = ccproxy.plan_route(cfg, model)
                self.assertEqual([(p.name, m) for p, m in plan], expected)
        plain = ccproxy.build_config({}, {}, {})
        self.assertEqual([(p.name, m) for p, m in ccproxy.plan_route(plain, "x")],
                         [("anthropic", "x")])

    def test_sanitize_for_anthropic(self):
        body = {"model": "m", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t", "signature": "ccproxy:abc"},
                {"type": "thinking", "thinking": "t", "signature": "EqQBreal"},
                {"type": "tool_use", "id": "call.1:x", "name": "Bash", "input": {}},
                {"type": "tool_use", "id": "toolu_ok-1", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call.1:x", "content": "r"}]}]}
        clean, changed = ccproxy.sanitize_for_anthropic(body)
        self.assertTrue(changed)
        blocks = clean["messages"][1]["content"]
        self.assertEqual([b.get("signature") for b in blocks if b["type"] == "thinking"],
                         ["EqQBreal"])
        new_id = blocks[1]["id"]
        self.assertRegex(new_id, r"^[a-zA-Z0-9_-]+$")
        self.assertEqual(clean["messages"][2]["content"][0]["tool_use_id"], new_id)
        self.assertEqual(blocks[2]["id"], "toolu_ok-1")
        self.assertEqual(body["messages"][1]["content"][0]["signature"], "ccproxy:abc")
        self.assertNotEqual(ccproxy._safe_tool_id("a.b"), ccproxy._safe_tool_id("a:b"))
        same = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}
        self.assertEqual(ccproxy.sanitize_for_anthropic(same), (same, False))

    def test_passthrough_body_is_byte_for_byte_unless_changed(self):
        raw = b'{"model":  "m", "messages": [] }'
        self.assertIs(ccproxy.passthrough_body(raw, json.loads(raw), "m"), raw)
        out = json.loads(ccproxy.passthrough_body(raw, json.loads(raw), "other"))
        self.assertEqual(out["model"], "other")

    def test_passthrough_headers(self):
        client = headers_of([("x-api-key", "client"), ("anthropic-version", "2023-06-01"),
                             ("anthropic-beta", "a,b"), ("Connection", "keep-alive, X-Hop"),
                             ("X-Hop", "1"), ("Accept-Encoding", "gzip"), ("Host", "h"),
                             ("Content-Length", "5"), ("User-Agent", "claude-cli/2")])
        free = ccproxy.build_config({}, {}, {})
        keyed = ccproxy.build_config({}, {"CCPROXY_API_KEY": "proxy"}, {})
        p = ccproxy.ProviderConfig(name="p", base_url="http://x")
        pk = ccproxy.ProviderConfig(name="p", base_url="http://x", api_key="route")
        rows = [(p, free, "client"), (pk, free, "route"), (p, keyed, None), (pk, keyed, "route")]
        for provider, cfg, key in rows:
            with self.subTest(provider=provider.api_key, proxy_key=cfg.api_key):
                out = ccproxy.passthrough_headers(client, provider, cfg)
                names = [n.lower() for n, _ in out]
                self.assertEqual(dict((n.lower(), v) for n, v in out).get("x-api-key"), key)
                self.assertEqual(names.count("x-api-key"), 1 if key else 0)
                for gone in ("connection", "x-hop", "host", "content-length"):
                    self.assertNotIn(gone, names)
                self.assertIn(("anthropic-beta", "a,b"), out)
                self.assertIn(("accept-encoding", "identity"), out)

    def test_urls(self):
        p = ccproxy.ProviderConfig(name="p", base_url="https://h/prefix/v1")
        self.assertEqual(ccproxy.anthropic_url(p, "messages", "beta=true"),
                         "https://h/prefix/v1/messages?beta=true")
        self.assertEqual(ccproxy.redact_url("https://u:p@h:8/x?key=s"), "https://h:8/x")

    def test_body_length(self):
        limit = 100
        rows = [([("Content-Length", "10")], 10, None),
                ([], 0, None),
                ([("Content-Length", "10"), ("Content-Length", "10")], 10, None),
                ([("Content-Length", "10"), ("Content-Length", "11")], None, 400),
                ([("Content-Length", "-1")], None, 400),
                ([("Content-Length", "1e3")], None, 400),
                ([("Content-Length", "101")], None, 413),
                ([("Transfer-Encoding", "chunked")], None, 411),
                ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], None, 400)]
        for pairs, length, status in rows:
            with self.subTest(pairs=pairs):
                if status is None:
                    self.assertEqual(ccproxy.body_length(headers_of(pairs), limit), length)
                else:
                    with self.assertRaises(ccproxy.HTTPError) as cm:
                        ccproxy.body_length(headers_of(pairs), limit)
                    self.assertEqual((cm.exception.status, cm.exception.close), (status, True))

    def test_parse_json_object(self):
        for members in (None, ccproxy.MemberCache(min_chars=1)):
            self.assertEqual(ccproxy.parse_json_object(b'{"a": 1}', members), {"a": 1})
            for raw in (b"", b"{", b"[1]", b"\xff\xfe", b"[" * 100000, b'"x"',
                        b'{"a": ' + b"[" * 100000, b'{"tools": ' + b"[" * 100000):
                with self.subTest(raw=raw[:10], members=members):
                    with self.assertRaises(ccproxy.HTTPError) as cm:
                        ccproxy.parse_json_object(raw, members)
                    self.assertEqual(cm.exception.status, 400)

    def test_member_cache_reads_bodies_as_json_loads_does(self):
        tools = json.dumps([{"name": "Read", "description": "d" * 40}])
        for raw in [
                b'{}', b' {\n} ', b'{"a": 1}', b'{"a":1,"a":2}', b'{"tools": [1, 2]}',
                ('{"tools": %s, "system": "s", "m": [1]}' % tools).encode(),
                ('{ "system" :\t"x\\u00fc\\"" ,"tools":%s\r}\n' % tools).encode(),
                '{"system": "\u00fc", "tools": []}'.encode("utf-16"),
                b'\xef\xbb\xbf{"a": 1}', b'{"tools": 12, "system": null}',
                b'{"\\u0074ools": [3], "tools": [4]}', b'{"a": NaN, "b": {"c": [{}]}}',
                # Not an object, or malformed: None here, and json.loads decides.
                b'', b'[1]', b'"x"', b'{', b'{,}', b'{"a":1,}', b'{"a" 1}',
                b'{"a":1 "b":2}', b'{"a":1} x', b'{"tools": [1,]}', b'{}}', b'{"a":}',
                b'\xff\xfe\xfd', b'{"tools": "\x01"}', b'{"a": 1', b'{"a"']:
            with self.subTest(raw=raw[:40]):
                try:
                    expected = json.loads(raw)
                except ValueError:
                    expected = None
                cache = ccproxy.MemberCache(min_chars=1)
                for _ in range(2):                       # parsed, then from the cache
                    self.assertEqual(cache.parse(raw),
                                     expected if isinstance(expected, dict) else None)

    def test_member_cache_gives_back_the_value_parsed_for_the_same_text(self):
        def body(tools, separators=(", ", ": ")):
            return json.dumps({"model": "m", "system": "s" * 20, "tools": tools},
                              separators=separators).encode()
        a, b, c = ([{"name": n, "input_schema": {"type": "object"}}] for n in "ABC")
        cache = ccproxy.MemberCache(size=2, min_chars=10)
        first, again = cache.parse(body(a)), cache.parse(body(a))
        self.assertIsNot(again, first)                   # each request has its own dict
        self.assertIs(again["tools"], first["tools"])
        self.assertIs(again["system"], first["system"])
        compact = cache.parse(body(a, (",", ":")))       # equal, but other text: parsed
        self.assertEqual(compact["tools"], a)
        self.assertIsNot(compact["tools"], first["tools"])
        # A member whose text begins with a kept one's is not taken for it.
        self.assertEqual(cache.parse(body(a + b))["tools"], a + b)
        self.assertEqual(cache.parse(json.dumps({"tools": a[0]["name"]}).encode()),
                         {"tools": "A"})                 # under min_chars: not kept
        cache.parse(body(c))
        self.assertEqual([json.loads(t) for t, _ in cache._seen["tools"]], [c, a + b])

    def test_take_body_hands_the_parsed_body_out_once(self):
        # A holder keeps only the raw bytes while an upstream thinks; a fallback attempt
        # gets the body parsed again.
        raw = b'{"model": "m", "messages": []}'
        for holder, expected, left in [
                ({"raw": raw, "body": {"model": "kept"}}, {"model": "kept"}, {"raw": raw}),
                ({"raw": raw}, {"model": "m", "messages": []}, {"raw": raw}),
                ({"raw": b"", "body": None}, None, {"raw": b""}),
                ({}, None, {})]:
            with self.subTest(holder=holder):
                self.assertEqual(ccproxy._take_body(holder), expected)
                self.assertEqual(holder, left)

    def test_model_rewrites(self):
        self.assertEqual(json.loads(ccproxy.rewrite_model_json(
            json.dumps(MESSAGE_JSON).encode(), "asked"))["model"], "asked")
        self.assertEqual(ccproxy.rewrite_model_json(b"not json", "a"), b"not json")
        stream = b"".join(STREAM)
        for seed in range(50):
            rng = random.Random(seed)
            renamer, out, i = ccproxy.SSEModelRenamer("asked"), b"", 0
            while i < len(stream):
                n = rng.randint(1, 40)
                out += renamer.feed(stream[i:i + n])
                i += n
            out += renamer.flush()
            self.assertEqual(out.replace(b'"asked"', b'"upstream-model"'), stream)
            self.assertIn(b'"model": "asked"', out)

    def test_format_duration_and_iso_time(self):
        for secs, text in [(0, "0s"), (59, "59s"), (60, "1m 0s"), (8130, "2h 15m 30s"),
                           (90061, "1d 1h 1m 1s")]:
            self.assertEqual(ccproxy.format_duration(secs), text)
        self.assertEqual(ccproxy.iso_time(0), "1970-01-01T00:00:00Z")
        self.assertIsNone(ccproxy.iso_time(None))

    def test_overall_health(self):
        rows = [([], "healthy"), (["unknown"], "healthy"), (["connected", "connected"], "healthy"),
                (["connected", "disconnected"], "degraded"), (["rate_limited"], "degraded"),
                (["connected", "rate_limited"], "degraded"), (["disconnected"], "unhealthy"),
                (["auth_failed", "disconnected"], "unhealthy")]
        for statuses, health in rows:
            with self.subTest(statuses=statuses):
                self.assertEqual(ccproxy.overall_health(statuses), health)

    def test_an_access_record_starts_with_every_field_unset(self):
        record = ccproxy.AccessRecord("req_1", "127.0.0.1")
        self.assertEqual({n: getattr(record, n) for n in record.__slots__},
                         dict({n: None for n in record.__slots__}, request_id="req_1",
                              client="127.0.0.1"))
        record.update(status=200, provider="p")
        self.assertEqual(record.items(), [("request_id", "req_1"), ("client", "127.0.0.1"),
                                          ("status", 200), ("provider", "p")])

    def test_access_record_escapes_control_characters(self):
        line = ccproxy.access_record({"request_id": "r", "client": "c", "method": "GET",
                                      "path": "/x\r\nFAKE 200", "status": 200,
                                      "provider": "p", "attempts": 1})
        self.assertNotIn("\n", line)
        self.assertIn("\\x0d\\x0a", line)
        self.assertIn("provider=p attempts=1", line)

    def test_read_git_build(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.assertEqual(ccproxy.read_git_build(tmp), ("unknown", "unknown"))
            git = os.path.join(tmp, ".git")
            sha = "ab" * 20
            os.makedirs(os.path.join(git, "refs", "heads"))
            os.makedirs(os.path.join(git, "objects", sha[:2]))
            with open(os.path.join(git, "HEAD"), "w") as f:
                f.write("ref: refs/heads/main\n")
            with open(os.path.join(git, "packed-refs"), "w") as f:
                f.write("# pack-refs\n%s refs/heads/main\n" % sha)
            self.assertEqual(ccproxy.read_git_build(tmp), (sha[:12], "unknown"))
            commit = b"tree x\nauthor a <a> 0 +0000\ncommitter c <c> 1764000000 +0000\n\nmsg\n"
            with open(os.path.join(git, "objects", sha[:2], sha[2:]), "wb") as f:
                f.write(zlib.compress(b"commit %d\0" % len(commit) + commit))
            self.assertEqual(ccproxy.read_git_build(tmp), (sha[:12], "2025-11-24T16:00:00Z"))


class TestStatusDocument(unittest.TestCase):

    def snapshot(self, **kw):
        cfg = ccproxy.build_config({"providers": [
            {"name": "groq-like", "base_url": "https://h/x", "api_key": "sk-secret-1",
             "model": "m"},
            {"name": "other", "base_url": "http://127.0.0.1:9", "api_key": "sk-secret-3"}]},
            {"CCPROXY_API_KEY": "sk-secret-2"}, {})
        snap = dict(config=cfg, now=1764000000.0, started=1764000000.0 - 8130,
                    pid=42, port=3456, draining=False, ready=True,
                    requests_served=7, in_flight=1, provider_stats={},
                    loaded_at=1764000000.0, reloads=0, reload_failures=0,
                    last_reload_error=None, build=ccproxy.build_info(), record={},
                    metrics=ccproxy.Metrics().snapshot(), upstream_connections=0)
        snap.update(kw)
        return ccproxy.Snapshot(**snap)

    def test_every_field_of_product_md_5_with_types(self):
        doc = ccproxy.status_document(self.snapshot())
        types = {"service": str, "version": str, "status": str, "health": str,
                 "timestamp": str, "uptime": str, "uptime_seconds": int, "pid": int,
                 "host": str, "port": int, "api_key_configured": bool,
                 "requests_served": int, "requests_in_flight": int, "providers": dict,
                 "provider": dict, "config": dict, "build": dict}
        for key, kind in types.items():
            with self.subTest(key=key):
                self.assertIsInstance(doc[key], kind)
        self.assertEqual((doc["service"], doc["status"], doc["uptime"]),
                         ("ccproxy", "running", "2h 15m 30s"))
        self.assertRegex(doc["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        providers = doc["providers"]
        for key, kind in {"count": int, "active": list, "healthy_count": int,
                          "healthy_percentage": float, "items": list,
                          "stats_by_type": dict}.items():
            self.assertIsInstance(providers[key], kind)
        item = providers["items"][0]
        for key in ("name", "type", "status", "health", "model", "last_check",
                    "response_time_ms", "tokens_per_second", "rate_limit_remaining",
                    "requests", "errors"):
            self.assertIn(key, item)
        self.assertEqual(set(providers["stats_by_type"]["anthropic"]),
                         {"total_count", "healthy_count", "healthy_percentage", "status"})
        for key in ("source", "fingerprint", "loaded_at", "reloads", "reload_failures"):
            self.assertIn(key, doc["config"])
        self.assertEqual(set(doc["build"]), {"version", "commit", "date"})

    def test_no_key_material(self):
        text = json.dumps(ccproxy.status_document(self.snapshot()))
        detailed = json.dumps(ccproxy.detailed_health_document(self.snapshot()))
        for blob in (text, detailed):
            self.assertNotIn("sk-secret", blob)
            self.assertNotIn(ccproxy.key_digest("sk-secret-1").hex(), blob)

    def test_health_words_and_problem_fields(self):
        now = 1764000000.0
        rows = [({}, "healthy", 100.0, None),
                ({"groq-like": {"status": "connected"}, "other": {"status": "disconnected"}},
                 "degraded", 50.0, None),
                ({"groq-like": {"status": "auth_failed"}, "other": {"status": "disconnected"}},
                 "unhealthy", 0.0, "provider_auth_failed"),
                ({"groq-like": {"status": "disconnected"}, "other": {"status": "auth_failed"}},
                 "unhealthy", 0.0, "provider_connection_failed"),
                ({"groq-like": {"status": "rate_limited", "rate_limited_until": now + 30}},
                 "degraded", 50.0, None),
                ({"groq-like": {"status": "rate_limited", "rate_limited_until": now - 1}},
                 "healthy", 100.0, None)]
        for stats, health, percent, error in rows:
            with self.subTest(stats=stats):
                doc = ccproxy.status_document(self.snapshot(provider_stats=stats, now=now))
                self.assertEqual(doc["health"], health)
                self.assertEqual(doc["providers"]["healthy_percentage"], percent)
                self.assertEqual(doc.get("error"), error)
                if error:
                    self.assertIn("provider", doc["details"])

    def test_a_provider_without_the_key_it_needs_is_unconfigured(self):
        cfg = ccproxy.build_config({"providers": [{"name": "a", "api_key_env": "A_KEY"},
                                                  {"name": "g", "type": "groq"}]},
                                   {"CCPROXY_API_KEY": "k"}, {})
        doc = ccproxy.status_document(self.snapshot(config=cfg, provider_stats={
            "a": {"status": "connected"}}))
        items = {i["name"]: i for i in doc["providers"]["items"]}
        self.assertEqual([(items[n]["status"], items[n]["health"], items[n]["api_key_source"])
                          for n in "ag"], [("unconfigured", "unhealthy", "A_KEY"),
                                           ("unconfigured", "unhealthy", "GROQ_API_KEY")])
        self.assertEqual((doc["health"], doc["error"], doc["details"]["error_code"]),
                         ("unhealthy", "provider_unconfigured", "no_key"))

    def test_draining(self):
        self.assertEqual(ccproxy.status_document(self.snapshot(draining=True))["status"],
                         "draining")


class TestProviderStats(unittest.TestCase):

    def test_status_words_from_outcomes(self):
        rows = [(200, "connected"), (429, "rate_limited"), (401, "auth_failed"),
                (403, "auth_failed"), (500, "disconnected"), ("connect", "disconnected"),
                ("timeout", "disconnected"), (404, "connected")]
        for outcome, word in rows:
            with self.subTest(outcome=outcome):
                stats = ccproxy.ProviderStats()
                stats.record("p", outcome, 0.1, headers_of([("retry-after", "3")]))
                snap = stats.snapshot()["p"]
                self.assertEqual(snap["status"], word)
                self.assertEqual(snap["errors"], 0 if word == "connected" else 1)
                self.assertEqual(snap["response_time_ms"], 100)


# ---- HTTP handler without sockets ----------------------------------------------

class _FakeServer:
    def __init__(self, service):
        self.service = service


class SocketlessHandler(ccproxy.Handler):
    """A Handler fed raw bytes through BytesIO (CPython's SocketlessRequestHandler)."""

    def __init__(self, raw, service, peer="127.0.0.1"):
        self.rfile, self.wfile = io.BufferedReader(io.BytesIO(raw)), io.BytesIO()
        self.connection, self.requests_here, self.fresh = None, 0, False
        self.server, self.client_address = _FakeServer(service), (peer, 50000)
        self.close_connection = True

    def run(self):
        self.handle_one_request()
        return self.wfile.getvalue()


def parse_response(raw, method="GET"):
    """(status, headers, body) of one raw HTTP response."""
    resp = http.client.HTTPResponse(ccproxy._Bytes(raw), method=method)
    resp.begin()
    return resp.status, resp.headers, resp.read()


def request_bytes(method, path, headers=(), body=b""):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: x"]
    lines += ["%s: %s" % h for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


class TestHandlerSocketless(unittest.TestCase):

    def setUp(self):
        self.service = ccproxy.Service(config(max_body_bytes=1000))
        self.service.ready = True

    def send(self, raw, peer="127.0.0.1", service=None):
        handler = SocketlessHandler(raw, service or self.service, peer)
        with self.assertLogs("ccproxy", "INFO") as logs:
            out = handler.run()
        self.logs = "\n".join(logs.output)
        self.handler = handler
        return out

    def get(self, path, headers=(), peer="127.0.0.1", method="GET", service=None):
        return parse_response(self.send(request_bytes(method, path, headers), peer, service),
                              method)

    def assertAnthropicError(self, body, etype):
        doc = json.loads(body)
        self.assertEqual((doc["type"], doc["error"]["type"]), ("error", etype))
        self.assertTrue(doc["request_id"].startswith("req_"))

    def test_health_endpoints(self):
        for path in ("/health", "/health/ready", "/status/ready", "/status",
                     "/health/detailed"):
            with self.subTest(path=path):
                status, headers, body = self.get(path)
                self.assertEqual(status, 200)
                self.assertEqual(headers["Cache-Control"], "no-store")
                self.assertEqual(headers["Content-Type"], "application/json")
                self.assertTrue(headers["request-id"].startswith("req_"))
                json.loads(body)
                status, headers, body = self.get(path, method="HEAD")
                self.assertEqual((status, body), (200, b""))
                self.assertGreater(int(headers["Content-Length"]), 0)

    def test_preconnect_head(self):
        for path in ("/", "/api/hello"):
            self.assertEqual(self.get(path, method="HEAD")[0], 200)

    def test_readiness_follows_start_and_drain_liveness_does_not(self):
        self.service.ready = False
        status, _, body = self.get("/status/ready")
        self.assertEqual((status, json.loads(body)["error"]), (503, "starting"))
        self.service.ready, self.service.draining = True, True
        status, headers, body = self.get("/health/ready")
        self.assertEqual((status, json.loads(body)["error"]), (503, "draining"))
        self.assertEqual(headers["Connection"], "close")
        self.assertEqual(self.get("/health")[0], 200)
        self.service.heartbeat -= ccproxy.HEARTBEAT_STALE + 1
        status, _, body = self.get("/health")
        self.assertEqual((status, json.loads(body)["status"]), (503, "unhealthy"))

    def test_unknown_path_and_wrong_method(self):
        status, _, body = self.get("/nope")
        self.assertEqual(status, 404)
        self.assertAnthropicError(body, "not_found_error")
        status, headers, body = self.get("/health", method="POST")
        self.assertEqual((status, headers["Allow"]), (405, "GET, HEAD"))
        status, headers, _ = self.get("/v1/messages")
        self.assertEqual((status, headers["Allow"]), (405, "POST"))

    def test_status_auth_loopback_key_and_spoofed_forwarded_for(self):
        keyed = ccproxy.Service(config(api_key="k-123", allow_remote=True))
        keyed.ready = True
        rows = [("127.0.0.1", (), 200), ("::1", (), 200), ("10.1.2.3", (), 401),
                ("10.1.2.3", (("X-Forwarded-For", "127.0.0.1"),), 401),
                ("10.1.2.3", (("X-Real-IP", "127.0.0.1"), ("Forwarded", "for=127.0.0.1")), 401),
                ("10.1.2.3", (("x-api-key", "k-123"),), 200),
                ("10.1.2.3", (("Authorization", "Bearer k-123"),), 200),
                ("10.1.2.3", (("x-api-key", "k-124"),), 401)]
        for path in ("/status", "/health/detailed"):
            for peer, headers, expected in rows:
                with self.subTest(path=path, peer=peer, headers=headers):
                    status, h, body = self.get(path, headers, peer, service=keyed)
                    self.assertEqual(status, expected)
                    if expected == 401:
                        self.assertAnthropicError(body, "authentication_error")
                        self.assertEqual(h["x-should-retry"], "false")
        # No key configured: status stays loopback-only, the health probe stays open.
        self.assertEqual(self.get("/status", peer="10.1.2.3")[0], 401)
        self.assertEqual(self.get("/health", peer="10.1.2.3")[0], 200)

    def test_non_ascii_key_is_401_not_500_and_never_logged(self):
        keyed = ccproxy.Service(config(api_key="correct-key"))
        raw = request_bytes("POST", "/v1/messages", [("Content-Length", "2")], b"{}")
        raw = raw.replace(b"Host: x", "Host: x\r\nx-api-key: ключ-sécret".encode("utf-8"))
        status, _, body = parse_response(self.send(raw, service=keyed))
        self.assertEqual(status, 401)
        self.assertAnthropicError(body, "authentication_error")
        status, _, _ = self.get("/v1/models", [("x-api-key", "wrong-key-xyz")], service=keyed)
        self.assertEqual(status, 401)
        self.assertNotIn("wrong-key-xyz", self.logs)
        self.assertNotIn("correct-key", self.logs)

    def test_limits_of_the_request_head(self):
        many = request_bytes("GET", "/health", [("X-H%d" % i, "v") for i in range(101)])
        status, _, body = parse_response(self.send(many))
        self.assertEqual(status, 431)
        self.assertAnthropicError(body, "invalid_request_error")
        long_header = request_bytes("GET", "/health", [("X-Long", "a" * 65537)])
        self.assertEqual(parse_response(self.send(long_header))[0], 431)
        long_line = request_bytes("GET", "/" + "a" * 65537)
        self.assertEqual(parse_response(self.send(long_line))[0], 414)

    def test_request_line_as_the_standard_library_reads_it(self):
        class Stdlib(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __init__(self, line):
                self.rfile, self.wfile = io.BufferedReader(io.BytesIO(b"\r\n")), io.BytesIO()
                self.raw_requestline, self.errors = line.encode() + b"\r\n", []

            def send_error(self, code, message=None, explain=None):
                self.errors.append((code, message))

        for line in ["GET / HTTP/1.1", "POST /v1/messages HTTP/1.0", "GET /", "POST /",
                     "GET / HTTP/2.0", "GET / HTTP/1", "GET / HTTP/1.1.1", "GET / FTP/1.1",
                     "GET / HTTP/x.1", "GET", "GET / x HTTP/1.1", "GET / HTTP/1.01",
                     "GET //evil.example/x HTTP/1.1", "OPTIONS * HTTP/1.1"]:
            with self.subTest(line=line):
                std = Stdlib(line)
                ok = std.parse_request()
                try:
                    mine = ccproxy.parse_request_line(line)
                except ccproxy.HTTPError as exc:
                    self.assertFalse(ok)
                    self.assertEqual([(exc.status, exc.message)], std.errors)
                else:
                    self.assertTrue(ok, std.errors)
                    self.assertEqual(mine, (std.command, std.path, std.request_version,
                                            not std.close_connection))
        with self.assertRaisesRegex(ccproxy.HTTPError, "Bad request version"):
            ccproxy.parse_request_line("GET / HTTP/1.00000000001")    # 3.13's length check

    def test_a_head_that_could_smuggle_is_refused(self):
        for extra, reason in [
                (b"Content-Length : 2", "a blank before the colon after 'Content-Length'"),
                (b"Transfer-Encoding\t: chunked", "after 'Transfer-Encoding'"),
                (b"X-A: 1\r\n folded", "obsolete line folding"),
                (b"Authorization Bearer sk-secret", "malformed header line: no colon")]:
            with self.subTest(extra=extra):
                raw = request_bytes("POST", "/v1/messages", [("Content-Length", "2")], b"{}")
                raw = raw.replace(b"Host: x\r\n", b"Host: x\r\n" + extra + b"\r\n")
                status, headers, body = parse_response(self.send(raw))
                self.assertEqual((status, headers["Connection"]), (400, "close"))
                self.assertAnthropicError(body, "invalid_request_error")
                self.assertIn(reason, json.loads(body)["error"]["message"])
                self.assertNotIn(b"sk-secret", body)

    def test_oversized_body_is_refused_unread(self):
        head = request_bytes("POST", "/v1/messages", [("Content-Length", "1001")])
        status, headers, body = parse_response(self.send(head + b"x" * 1001))
        self.assertEqual((status, headers["Connection"]), (413, "close"))
        self.assertAnthropicError(body, "request_too_large")
        self.assertEqual(self.handler.rfile.tell(), len(head))     # body never read

    def test_expect_100_is_answered_with_the_refusal(self):
        head = request_bytes("POST", "/v1/messages", [("Content-Length", "5000"),
                                                      ("Expect", "100-continue")])
        out = self.send(head)
        self.assertNotIn(b"100 Continue", out)
        self.assertEqual(parse_response(out)[0], 413)
        keyed = ccproxy.Service(config(api_key="k"))
        head = request_bytes("POST", "/v1/messages", [("Content-Length", "10"),
                                                      ("Expect", "100-continue")])
        out = self.send(head, service=keyed)
        self.assertNotIn(b"100 Continue", out)
        self.assertEqual(parse_response(out)[0], 401)

    def test_content_length_with_transfer_encoding_closes(self):
        raw = request_bytes("POST", "/v1/messages", [("Content-Length", "2"),
                                                     ("Transfer-Encoding", "chunked")], b"{}")
        status, headers, _ = parse_response(self.send(raw))
        self.assertEqual((status, headers["Connection"]), (400, "close"))
        self.assertTrue(self.handler.close_connection)

    def test_bad_bodies_are_400_with_a_clear_message(self):
        rows = [(b"{nope", "not valid JSON"), (b"[]", "must be a JSON object"),
                (b'{"messages": []}', "model"), (b'{"model": 5, "messages": []}', "model"),
                (b'{"model": "m"}', "messages"), (b"\xff\xfe\x00", "not valid JSON"),
                (b"[" * 450 + b"]" * 450, "")]
        for body, text in rows:
            with self.subTest(body=body[:20]):
                raw = request_bytes("POST", "/v1/messages",
                                    [("Content-Length", str(len(body)))], body)
                status, _, out = parse_response(self.send(raw))
                self.assertEqual(status, 400)
                self.assertAnthropicError(out, "invalid_request_error")
                self.assertIn(text, json.loads(out)["error"]["message"])

    def test_access_log_line_has_the_request_id(self):
        status, headers, _ = self.get("/health")
        self.assertIn(headers["request-id"], self.logs)
        self.assertIn("GET /health 200", self.logs)

    def test_cors_preflight_only_for_configured_origins(self):
        service = ccproxy.Service(config(cors_origins=("http://app.local",)))
        status, headers, _ = self.get("/v1/messages", [("Origin", "http://app.local")],
                                      method="OPTIONS", service=service)
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]),
                         (204, "http://app.local"))
        status, headers, _ = self.get("/v1/messages", [("Origin", "http://evil.local")],
                                      method="OPTIONS", service=service)
        self.assertEqual(status, 405)
        self.assertIsNone(headers["Access-Control-Allow-Origin"])


# ---- The proxy, end to end on loopback ------------------------------------------

def one_provider(url, **kw):
    return config(providers=(provider_cfg("up", url, **kw),))


class TestProxyEndToEnd(unittest.TestCase):

    def test_non_streaming_passthrough(self):
        with FakeUpstream() as up, Proxy(one_provider(up.url)) as px:
            resp, out = px.call("POST", "/some/prefix/v1/messages?beta=true", BODY,
                                {"x-api-key": "client-key", "anthropic-version": "2023-06-01",
                                 "anthropic-beta": "b1,b2", "Content-Type": "application/json"})
            self.assertEqual((resp.status, json.loads(out)), (200, MESSAGE_JSON))
            req = up.requests[0]
            self.assertEqual(req["path"], "/v1/messages?beta=true")
            self.assertEqual(json.loads(req["body"]), BODY)
            for name, value in (("x-api-key", "client-key"), ("anthropic-beta", "b1,b2"),
                                ("anthropic-version", "2023-06-01"),
                                ("accept-encoding", "identity")):
                self.assertEqual(req["headers"][name], value)
            self.assertTrue(resp.getheader("request-id").startswith("req_ccp_"))
            px.call("GET", "/health")
            socket.create_connection(("127.0.0.1", px.port), timeout=TIMEOUT).close()
            # Connections count as "connecting" (for the drain) until their first
            # request, or their end without one: nothing may stay counted.
            wait_for(lambda: (px.service.connecting, px.service.in_flight) == (0, 0))

    def test_heads_and_bodies_larger_than_the_read_buffers(self):
        # Both sides read through READ_BUFFER (512 B) buffers: 6 KB heads, 300 KB bodies.
        big = dict(MESSAGE_JSON, content=[{"type": "text", "text": "é" * 150000}])
        out_headers = [("x-up-%d" % i, "v" * 100) for i in range(60)]
        frames = [sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": "%d" % i * 3000}}) for i in range(20)]

        def behave(h, body):
            if not json.loads(body).get("stream"):
                return h.reply(200, big, out_headers)
            h.start_stream(out_headers)
            h.chunk(b"".join(frames))
            h.chunk(b"")
        in_headers = {"x-client-%d" % i: "w" * 100 for i in range(60)}
        body = dict(BODY, messages=[{"role": "user", "content": "q" * 300000}])
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            for stream in (False, True):
                with self.subTest(stream=stream):
                    resp, out = px.call("POST", "/v1/messages", dict(body, stream=stream),
                                        in_headers)
                    self.assertEqual(resp.status, 200)
                    self.assertEqual(out, b"".join(frames) if stream else
                                     json.dumps(big).encode())
                    self.assertEqual(resp.getheader("x-up-59"), "v" * 100)
                    self.assertEqual(json.loads(up.requests[-1]["body"]), dict(body, stream=stream))
                    self.assertEqual(up.requests[-1]["headers"]["x-client-59"], "w" * 100)

    def test_stream_is_relayed_chunk_by_chunk(self):
        gates = [threading.Event() for _ in STREAM]
        failures = []

        def behave(h, body):
            h.start_stream()
            for i, frame in enumerate(STREAM):
                h.chunk(frame)
                if not gates[i].wait(TIMEOUT):
                    failures.append(i)      # the proxy held frame i back
                    break
            h.chunk(b"")

        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            conn = px.conn()
            conn.request("POST", "/v1/messages", json.dumps(dict(BODY, stream=True)),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            self.assertEqual(resp.getheader("Transfer-Encoding"), "chunked")
            self.assertEqual(resp.getheader("Content-Type"), "text/event-stream")
            received = b""
            for i, frame in enumerate(STREAM):
                while frame not in received:
                    data = resp.read1(65536)
                    self.assertTrue(data, "stream ended before frame %d" % i)
                    received += data
                gates[i].set()         # only now may the fake send frame i+1
            self.assertEqual(resp.read(), b"")
            conn.close()
        self.assertEqual(failures, [])
        self.assertEqual(received, b"".join(STREAM))

    def test_hop_by_hop_headers_filtered_both_ways(self):
        def behave(h, body):
            h.reply(200, MESSAGE_JSON, [("Connection", "X-Up-Hop"), ("X-Up-Hop", "1"),
                                        ("Keep-Alive", "timeout=5"), ("X-Up-Kept", "1"),
                                        ("request-id", "req_upstream")])
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            resp, _ = px.call("POST", "/v1/messages", BODY, {
                "Connection": "keep-alive, X-Client-Hop", "X-Client-Hop": "1",
                "Keep-Alive": "300", "TE": "trailers", "X-Client-Kept": "1",
                "Proxy-Authorization": "Basic cA=="})
            sent = up.requests[0]["headers"]
            for name in ("X-Client-Hop", "Keep-Alive", "TE", "Proxy-Authorization"):
                self.assertIsNone(sent[name], name)
            self.assertEqual(sent["X-Client-Kept"], "1")
            self.assertIsNone(resp.getheader("X-Up-Hop"))
            self.assertIsNone(resp.getheader("Keep-Alive"))
            self.assertEqual(resp.getheader("X-Up-Kept"), "1")
            self.assertTrue(resp.getheader("request-id").startswith("req_ccp_"))

    def test_error_rows(self):
        anthropic_529 = {"type": "error", "error": {"type": "overloaded_error",
                                                    "message": "Overloaded"}}
        rows = [  # upstream status, body, headers -> client status, type, header checks
            (429, {"error": {"message": "slow"}}, [("retry-after", "7")], 429,
             "rate_limit_error", {"retry-after": "7"}),
            (503, b"<html>busy</html>", [], 529, "overloaded_error", {}),
            (529, anthropic_529, [("retry-after", "2")], 529, "overloaded_error",
             {"retry-after": "2"}),
            (401, {"type": "error", "error": {"type": "authentication_error",
                                              "message": "invalid x-api-key"}}, [],
             401, "authentication_error", {"x-should-retry": "false"}),
            (403, b"forbidden", [], 403, "permission_error", {"x-should-retry": "false"}),
            (500, b"boom", [], 500, "api_error", {}),
        ]
        for status, body, headers, out_status, etype, checks in rows:
            with self.subTest(status=status):
                def behave(h, _, status=status, body=body, headers=headers):
                    h.reply(status, body, headers)
                with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
                    resp, out = px.call("POST", "/v1/messages", BODY)
                    self.assertEqual(resp.status, out_status)
                    self.assertEqual(json.loads(out)["error"]["type"], etype)
                    for name, value in checks.items():
                        self.assertEqual(resp.getheader(name), value)
                    if status == 529:
                        self.assertEqual(json.loads(out), anthropic_529)   # passed through

    def test_connection_refused_is_a_fast_non_retryable_500_naming_the_url(self):
        url = "http://127.0.0.1:%d" % free_port()
        with Proxy(one_provider(url)) as px:
            started = time.monotonic()
            resp, out = px.call("POST", "/v1/messages", BODY)
            self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual((resp.status, resp.getheader("x-should-retry")), (500, "false"))
        self.assertEqual(json.loads(out)["error"]["type"], "api_error")
        self.assertIn(url + "/v1/messages", json.loads(out)["error"]["message"])

    def test_upstream_timeout_is_504(self):
        release = threading.Event()

        def behave(h, body):
            release.wait(TIMEOUT)
            h.reply(200, MESSAGE_JSON)
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url, read_timeout=0.3)) as px:
            resp, out = px.call("POST", "/v1/messages", BODY)
            release.set()
        self.assertEqual(resp.status, 504)
        self.assertEqual(json.loads(out)["error"]["type"], "timeout_error")

    def fallback_config(self, first_url, second_url):
        return config(providers=(provider_cfg("first", first_url),
                                 provider_cfg("second", second_url)),
                      fallback=("first", "second"))

    def test_fallback_on_refused_connection_and_on_503(self):
        refused = "http://127.0.0.1:%d" % free_port()
        with FakeUpstream() as second:
            with Proxy(self.fallback_config(refused, second.url)) as px:
                with self.assertLogs("ccproxy", "INFO") as logs:
                    resp, out = px.call("POST", "/v1/messages", BODY)
                    # The access line is written just after the response: wait for it.
                    wait_for(lambda: "attempts=2" in "\n".join(logs.output))
                self.assertEqual((resp.status, json.loads(out)), (200, MESSAGE_JSON))
                self.assertIn("provider=first failed", "\n".join(logs.output))
                self.assertIn("provider=second model=claude-sonnet-5-5 upstream_model=claude-"
                              "sonnet-5-5 upstream_status=200 attempts=2", "\n".join(logs.output))
            with FakeUpstream(lambda h, b: h.reply(503, b"down")) as first:
                with Proxy(self.fallback_config(first.url, second.url)) as px:
                    resp, out = px.call("POST", "/v1/messages", BODY)
                    self.assertEqual(resp.status, 200)
                    self.assertEqual(len(first.requests), 1)
                    stats = px.service.stats.snapshot()
                    self.assertEqual(stats["first"]["status"], "disconnected")
                    self.assertEqual(stats["second"]["status"], "connected")
        self.assertEqual(len(second.requests), 2)

    def test_fallback_to_a_translated_provider_parses_the_body_again(self):
        # The first attempt took the parsed body (see _take_body); the second, to an
        # OpenAI provider, must still see every message.
        def openai(h, body):
            return h.reply(200, reply({"role": "assistant", "content": "from oa"}))
        body = dict(BODY, messages=[{"role": "user", "content": "first"},
                                    {"role": "assistant", "content": "a"},
                                    {"role": "user", "content": "last"}])
        with FakeUpstream(lambda h, b: h.reply(503, b"down")) as first, \
                FakeUpstream(openai) as second:
            cfg = config(providers=(provider_cfg("first", first.url), ccproxy.ProviderConfig(
                name="oa", type="openai", base_url=second.url, api_key="k", model="gpt-4o")),
                fallback=("first", "oa"))
            with Proxy(cfg) as px:
                resp, out = px.call("POST", "/v1/messages", body)
        self.assertEqual(resp.status, 200)
        self.assertEqual(json.loads(out)["content"], [{"type": "text", "text": "from oa"}])
        sent = json.loads(second.requests[0]["body"])
        self.assertEqual([m["content"] for m in sent["messages"]], ["first", "a", "last"])
        self.assertEqual(json.loads(first.requests[0]["body"]), body)

    def test_connection_threads_leave_no_trace_in_threading(self):
        # Connections run on bare _thread threads: with the daemon's logging, serving
        # them must register nothing in threading (no _DummyThread per connection).
        cfg = config(providers=(provider_cfg("a", "http://127.0.0.1:9"),))
        saved = logging.logThreads, ccproxy.log.level
        try:
            ccproxy.configure_logging(cfg)
            self.assertFalse(logging.logThreads)
            with Proxy(cfg) as px:
                px.call("GET", "/health")         # starts the deadline thread
                before = threading.active_count()
                for _ in range(5):
                    resp, _ = px.call("GET", "/health")
                    self.assertEqual(resp.status, 200)
                self.assertEqual(threading.active_count(), before, threading.enumerate())
        finally:
            logging.logThreads, level = saved
            for handler in list(ccproxy.log.handlers):
                ccproxy.log.removeHandler(handler)
                handler.close()
            ccproxy.log.setLevel(level)
            ccproxy.log.propagate = True

    def test_handler_state_lives_in_slots(self):
        # An attribute missing from Handler.__slots__ would give every connection a
        # __dict__ again (about 1 KB per open stream).
        dicts = []
        finish = ccproxy.Handler.finish

        def spy(handler):
            dicts.append(dict(getattr(handler, "__dict__", {})))
            finish(handler)
        with FakeUpstream() as up, Proxy(config(providers=(provider_cfg("a", up.url),))) \
                as px, unittest.mock.patch.object(ccproxy.Handler, "finish", spy):
            for method, path, body in [("POST", "/v1/messages", BODY), ("GET", "/health", None),
                                       ("POST", "/v1/messages", dict(BODY, stream=True)),
                                       ("GET", "/nope", None), ("POST", "/v1/messages", b"{")]:
                px.call(method, path, body)
            wait_for(lambda: len(dicts) == 5)
        self.assertEqual(dicts, [{}] * 5)

    def test_a_thread_that_cannot_start_is_a_503_not_a_lost_slot(self):
        cfg = config(providers=(provider_cfg("a", "http://127.0.0.1:9"),), max_connections=1)
        with Proxy(cfg) as px:
            with unittest.mock.patch.object(ccproxy._thread, "start_new_thread",
                                            side_effect=RuntimeError("no memory")):
                with self.assertLogs("ccproxy", "WARNING") as logs:
                    resp, _ = px.call("GET", "/health")
            self.assertEqual(resp.status, 503)
            self.assertIn("cannot start a thread", "\n".join(logs.output))
            self.assertNotIn("connection limit", "\n".join(logs.output))
            self.assertEqual(px.service.connecting, 0)
            self.assertEqual(px.server.slots._value, 1)     # the one slot was given back
            resp, _ = px.call("GET", "/health")
            self.assertEqual(resp.status, 200)

    def test_no_fallback_on_401_nor_after_the_first_byte(self):
        def truncated(h, body):
            h.start_stream()
            h.chunk(STREAM[0])
            h.wfile.flush()
            h.close_connection = True      # ends without the terminating chunk
        with FakeUpstream(truncated) as first, FakeUpstream() as second:
            with Proxy(self.fallback_config(first.url, second.url)) as px:
                conn = px.conn()
                conn.request("POST", "/v1/messages", json.dumps(dict(BODY, stream=True)))
                resp = conn.getresponse()
                self.assertEqual(resp.status, 200)
                self.assertEqual(resp.read1(65536), STREAM[0])
                # The cut is relayed as a cut (no terminating chunk), as a direct
                # connection would show it; the client retries the stream.
                with self.assertRaises(http.client.IncompleteRead):
                    resp.read()
                conn.close()
            self.assertEqual(second.requests, [])
        with FakeUpstream(lambda h, b: h.reply(401, b"no")) as first, FakeUpstream() as second:
            with Proxy(self.fallback_config(first.url, second.url)) as px:
                resp, _ = px.call("POST", "/v1/messages", BODY)
                self.assertEqual(resp.status, 401)
            self.assertEqual(second.requests, [])

    def test_one_upstream_connection_for_sequential_calls(self):
        with FakeUpstream() as up, Proxy(one_provider(up.url)) as px:
            for _ in range(20):
                resp, _ = px.call("POST", "/v1/messages", BODY)
                self.assertEqual(resp.status, 200)
            for _ in range(5):
                resp, _ = px.call("POST", "/v1/messages", dict(BODY, stream=True))
            self.assertEqual(len(up.requests), 25)
            self.assertEqual(up.connections, 1)
            self.assertEqual(px.service.upstreams.connections_opened(), 1)

    def test_every_access_line_names_provider_and_both_models(self):
        """Issue #18: you could not tell which model served a call."""
        stream = chunk({"content": "hi"}) + chunk(finish="stop") + "data: [DONE]\n\n"
        cases = [(one_provider, None, "claude-sonnet-5-5"),
                 (lambda url: one_provider(url, model="claude-mapped"), None, "claude-mapped"),
                 (openai_provider, sse_behave(stream), "gpt-4o")]
        for make_config, behave, upstream in cases:
            with self.subTest(upstream), FakeUpstream(behave) as up, \
                    Proxy(make_config(up.url)) as px, self.assertLogs("ccproxy", "INFO") as logs:
                px.call("POST", "/v1/messages", BODY)
                wait_for(lambda: any("access" in r.__dict__ for r in logs.records))
            record = next(r for r in logs.records if "access" in r.__dict__)
            self.assertIn("provider=%s model=claude-sonnet-5-5 upstream_model=%s " % (
                record.access["provider"], upstream), record.getMessage())
            doc = json.loads(ccproxy.JsonFormatter().format(record))
            self.assertEqual((doc["model"], doc["upstream_model"]),
                             ("claude-sonnet-5-5", upstream))

    def test_a_users_provider_key_never_reaches_a_custom_base_url(self):
        """Issue #18: OPENAI_API_KEY from the environment went to any openai-compatible
        base_url.  It goes nowhere but api.openai.com; a provider that needs a key and
        has none is answered at once, naming what to set, with no upstream call."""
        stream = chunk({"content": "hi"}) + chunk(finish="stop") + "data: [DONE]\n\n"
        for ptype, answered in (("openai-compatible", 200), ("openai", 500)):
            env = {"CCPROXY_PROVIDER": ptype, "OPENAI_API_KEY": "sk-users-own",
                   "CCPROXY_MODEL": "m"}
            with self.subTest(ptype), FakeUpstream(sse_behave(stream)) as up:
                cfg = ccproxy.build_config({}, dict(env, CCPROXY_BASE_URL=up.url), {})
                with Proxy(cfg) as px:
                    resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
                    status = px.call("GET", "/status")[1]
                self.assertEqual(resp.status, answered, out)
                seen = [v for r in up.requests for v in r["headers"].values()]
                self.assertFalse([v for v in seen if "sk-users-own" in v])
                if answered == 500:
                    self.assertEqual(up.requests, [])
                    self.assertEqual(resp.getheader("x-should-retry"), "false")
                    self.assertIn("provider openai has no key: set api_key", out.decode())
                    self.assertIn('"status": "unconfigured"', status.decode())

    def test_interim_responses_never_reach_another_client(self):
        """Issue #17: a 103 Early Hints taken for the answer left the real one on the
        pooled connection, and the next client read it.  Every upstream answer names
        the request it answers; every client must get its own, on one connection."""
        def interim(h, codes):
            for code in codes:
                h.send_response_only(code)
                h.send_header("Link", "</style.css>; rel=preload")
                h.end_headers()

        def behave(h, body):
            doc = json.loads(body)
            marker = str(doc.get("messages", [{}])[0].get("content"))
            interim(h, doc.get("interim", [103]))
            if h.path.endswith("/chat/completions"):
                return sse_behave(chunk({"content": marker}) + chunk(finish="stop") +
                                  "data: [DONE]\n\n")(h, body)
            if not doc.get("stream"):
                return h.reply(200, dict(MESSAGE_JSON, content=[
                    {"type": "text", "text": marker}]))
            h.start_stream()
            h.chunk(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": marker}}))
            h.chunk(b"")
        cases = [("pass-through", one_provider, False), ("pass-through stream", one_provider,
                 True), ("translated", openai_provider, False),
                 ("translated stream", openai_provider, True)]
        for label, make_config, stream in cases:
            with self.subTest(label), FakeUpstream(behave) as up, \
                    Proxy(make_config(up.url)) as px:
                for n, codes in enumerate(([103], [100, 102, 103], [], [103, 103])):
                    marker = "answer-%d" % n
                    body = dict(BODY, stream=stream, interim=codes,
                                messages=[{"role": "user", "content": marker}])
                    resp, out = px.call("POST", "/v1/messages", body)
                    self.assertEqual(resp.status, 200, out[:300])
                    self.assertIn(marker.encode(), out)
                    self.assertNotIn(b"answer-%d" % (n - 1), out)
                self.assertEqual(up.connections, 1)

    def test_a_101_or_endless_interim_heads_fail_the_call_and_its_connection(self):
        def behave(h, body):
            codes = json.loads(body).get("interim")
            if codes == [101]:
                h.send_response_only(101)
                h.send_header("Upgrade", "websocket")
                h.end_headers()
            else:
                for code in codes or ():
                    h.send_response_only(code)
                    h.end_headers()
            h.reply(200, MESSAGE_JSON)
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            for codes in ([101], [103] * (ccproxy.MAX_INTERIM + 1)):
                with self.subTest(codes=codes[:2]):
                    resp, out = px.call("POST", "/v1/messages", dict(BODY, interim=codes))
                    self.assertEqual(resp.status, 500, out)
                    self.assertEqual(json.loads(out)["error"]["type"], "api_error")
            resp, out = px.call("POST", "/v1/messages", dict(BODY, interim=[]))
            self.assertEqual((resp.status, json.loads(out)), (200, MESSAGE_JSON))
            self.assertEqual(up.connections, 3)      # neither doubtful connection reused

    def test_one_upstream_connection_for_streams_framed_by_length(self):
        """nginx serving a file, caches and buffering gateways send an event stream
        with Content-Length instead of chunks.  Each such stream used to open a
        connection of its own: read1 never marks that body done."""
        openai_stream = (chunk({"content": "hi"}) + chunk(finish="stop") +
                         "data: [DONE]\n\n").encode()

        def behave(h, body):
            data = openai_stream if h.path.endswith("/chat/completions") else b"".join(STREAM)
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        for make_config in (one_provider, openai_provider):
            with self.subTest(make_config.__name__), FakeUpstream(behave) as up, \
                    Proxy(make_config(up.url)) as px:
                for _ in range(3):
                    resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
                    self.assertEqual(resp.status, 200)
                    self.assertTrue(out.endswith(b'"message_stop"}\n\n'), out[-200:])
                self.assertEqual(up.connections, 1)

    def test_client_disconnect_closes_the_upstream_within_a_second(self):
        upstream_gone = threading.Event()

        def behave(h, body):
            h.start_stream()
            try:
                for _ in range(400):
                    h.chunk(STREAM[2])
                    h.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                upstream_gone.set()
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            sock = socket.create_connection(("127.0.0.1", px.port), timeout=TIMEOUT)
            body = json.dumps(dict(BODY, stream=True)).encode()
            sock.sendall(request_bytes("POST", "/v1/messages",
                                       [("Content-Length", str(len(body)))], body))
            self.assertIn(b"200 OK", sock.recv(65536))
            sock.close()
            closed_at = time.monotonic()
            self.assertTrue(upstream_gone.wait(TIMEOUT))
            self.assertLess(time.monotonic() - closed_at, 1.0)

    def test_model_mapping_renames_the_reply(self):
        def behave(h, body):
            if json.loads(body).get("stream"):
                h.start_stream()
                for frame in STREAM:
                    h.chunk(frame)
                h.chunk(b"")
            else:
                h.reply(200, dict(MESSAGE_JSON, model="upstream-model"))
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url, model="upstream-model")) as px:
            resp, out = px.call("POST", "/v1/messages", BODY)
            self.assertEqual(json.loads(up.requests[0]["body"])["model"], "upstream-model")
            self.assertEqual(json.loads(out)["model"], BODY["model"])
            resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
            self.assertIn(b'"model": "%s"' % BODY["model"].encode(), out)
            self.assertNotIn(b"upstream-model", out)

    def test_count_tokens_and_models_are_forwarded(self):
        def behave(h, body):
            h.reply(200, {"input_tokens": 42} if h.command == "POST" else {"data": []})
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            resp, out = px.call("POST", "/v1/messages/count_tokens?beta=true",
                                {"model": "claude-x", "messages": []})
            self.assertEqual((resp.status, json.loads(out)), (200, {"input_tokens": 42}))
            resp, out = px.call("GET", "/v1/models")
            self.assertEqual((resp.status, json.loads(out)), (200, {"data": []}))
            self.assertEqual([r["path"] for r in up.requests],
                             ["/v1/messages/count_tokens?beta=true", "/v1/models"])

    def test_client_key_guards_the_api_and_is_not_forwarded(self):
        cfg = config(api_key="proxy-key", providers=(provider_cfg(
            "up", "", api_key="route-key"),))
        with FakeUpstream() as up:
            cfg = dataclasses.replace(cfg, providers=(dataclasses.replace(
                cfg.providers[0], base_url=up.url),))
            with Proxy(cfg) as px:
                self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 401)
                resp, _ = px.call("POST", "/v1/messages", BODY, {"x-api-key": "proxy-key"})
                self.assertEqual(resp.status, 200)
                resp, _ = px.call("POST", "/v1/messages", BODY,
                                  {"Authorization": "Bearer proxy-key"})
                self.assertEqual(resp.status, 200)
            for req in up.requests:
                self.assertEqual(req["headers"]["x-api-key"], "route-key")
                self.assertIsNone(req["headers"]["authorization"])

    @unittest.skipUnless(os.path.isdir(SAMPLES), "../shared/claude-code-wire absent")
    def test_real_claude_code_body_passes_byte_for_byte(self):
        for name in ("01-first-turn", "02-tool-result-turn", "07-thinking-roundtrip",
                     "09-image-tool-result"):
            with self.subTest(sample=name):
                with open(os.path.join(SAMPLES, name + ".request.json")) as f:
                    sample = json.load(f)
                raw = json.dumps(sample["body"], separators=(",", ":")).encode()
                headers = {k: v for k, v in sample["headers"]
                           if k.lower() not in ("host", "content-length", "connection")}
                with FakeUpstream() as up, Proxy(one_provider(up.url)) as px:
                    resp, _ = px.call("POST", sample["path"], raw, headers)
                    self.assertEqual(resp.status, 200)
                    got = up.requests[0]
                self.assertEqual(got["body"], raw)
                self.assertEqual(got["path"], sample["path"])
                for header in ("anthropic-version", "anthropic-beta", "x-api-key",
                               "User-Agent", "X-Claude-Code-Session-Id"):
                    self.assertEqual(got["headers"][header], headers.get(header) or dict(
                        (k.lower(), v) for k, v in headers.items())[header.lower()])


class TestReadHead(unittest.TestCase):
    """The upstream head parser against http.client's own (the email package)."""

    HEADS = [
        b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"content-length: 12\r\nX-A:  spaced  \r\nx-a: again\r\n\r\n",
        b"Retry-After:3\r\nEmpty:\r\nX-Bytes: caf\xe9\r\n\r\n",
        b"X-Folded: one\r\n  two\r\n\tthree\r\nNext: n\r\n\r\n",
        b"Bare-LF: yes\nOther: too\n\n",
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nConnection: keep-alive, X-A\r\n\r\n",
        b"No-Blank-Line: eof",
        b"\r\n",
    ]

    def test_same_fields_as_http_client(self):
        for head in self.HEADS:
            with self.subTest(head=head):
                mine = ccproxy.read_head(io.BytesIO(head))
                theirs = http.client.parse_headers(io.BytesIO(head))
                self.assertIsInstance(mine, http.client.HTTPMessage)
                self.assertEqual(mine.items(), theirs.items())
                self.assertEqual(mine.get_all("set-cookie"), theirs.get_all("set-cookie"))

    def test_a_line_that_is_not_a_field_is_dropped_alone(self):
        for head in [b"X-A: 1\r\ngarbage\r\nX-B: 2\r\n\r\n",
                     b"X-A: 1\r\nBad Name: x\r\nX-B: 2\r\n\r\n",
                     b"X-A: 1\r\nBad\t: x\r\nX-B: 2\r\n\r\n",
                     b"X-A: 1\r\n: no name\r\nX-B: 2\r\n\r\n"]:
            with self.subTest(head=head):
                self.assertEqual(ccproxy.read_head(io.BytesIO(head)).items(),
                                 [("X-A", "1"), ("X-B", "2")])

    def test_limits_as_http_client(self):
        with self.assertRaises(http.client.LineTooLong):
            ccproxy.read_head(io.BytesIO(b"X: " + b"a" * 70000 + b"\r\n\r\n"))
        with self.assertRaisesRegex(http.client.HTTPException, "more than 100 headers"):
            ccproxy.read_head(io.BytesIO(b"X: 1\r\n" * 101 + b"\r\n"))
        self.assertEqual(len(ccproxy.read_head(io.BytesIO(b"X: 1\r\n" * 99 + b"\r\n"))), 99)

    def test_begin_reads_a_response_as_http_client_does(self):
        responses = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\n\r\nhi",                       # no length: ends at close
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: -4\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\nHTTP/1.1 201 Created\r\n"
            b"Content-Length: 2\r\n\r\nok",
            b"HTTP/1.1 502\r\nContent-Length: x\r\n\r\n",
        ]
        for raw, method in [(r, "POST") for r in responses] + [(responses[0], "HEAD")]:
            with self.subTest(raw=raw[:40], method=method):
                mine = ccproxy._LeanResponse(ccproxy._Bytes(raw), method=method)
                theirs = http.client.HTTPResponse(ccproxy._Bytes(raw), method=method)
                mine.begin()
                theirs.begin()
                for attr in ("status", "reason", "version", "chunked", "length", "will_close"):
                    self.assertEqual(getattr(mine, attr), getattr(theirs, attr), attr)
                self.assertEqual(mine.headers.items(), theirs.headers.items())
                self.assertEqual(mine.read(), theirs.read())
        # Unlike http.client (which skips only 100), every interim head is skipped.
        raw = (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 102 Processing\r\n"
               b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        mine = ccproxy._LeanResponse(ccproxy._Bytes(raw), method="POST")
        mine.begin()
        self.assertEqual((mine.status, mine.headers.items(), mine.read()),
                         (200, [("Content-Length", "2")], b"hi"))
        for raw in (b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                    b"HTTP/1.1 103 Early Hints\r\n\r\n" * (ccproxy.MAX_INTERIM + 1)):
            with self.subTest(raw=raw[:30]), self.assertRaises(http.client.HTTPException):
                ccproxy._LeanResponse(ccproxy._Bytes(raw)).begin()
        for raw, error in [(b"HTTP/2.0 200 OK\r\n\r\n", http.client.UnknownProtocol),
                           (b"", http.client.RemoteDisconnected),
                           (b"SMTP ready\r\n\r\n", http.client.BadStatusLine)]:
            with self.subTest(raw=raw), self.assertRaises(error):
                ccproxy._LeanResponse(ccproxy._Bytes(raw)).begin()


class TestResolver(unittest.TestCase):
    """Upstream addresses: looked up once per RESOLVE_SECONDS, numeric hosts never (a
    getaddrinfo() in a stream's thread cost 6 KB per open stream)."""

    @staticmethod
    def lookups(table):
        """A getaddrinfo stand-in answering from `table`, counting its calls."""
        calls = []

        def lookup(host, port, family, kind):
            calls.append(host)
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET, kind, 6, "", addr) for addr in table[host]]
        return lookup, calls

    def test_numeric_hosts_are_never_looked_up(self):
        def lookup(*args):
            raise AssertionError("looked up %r" % (args,))
        resolver = ccproxy.Resolver(lookup=lookup)
        for host, port, want in [
                ("127.0.0.1", 80, [(socket.AF_INET, ("127.0.0.1", 80))]),
                ("10.1.2.3", 8080, [(socket.AF_INET, ("10.1.2.3", 8080))]),
                ("::1", 443, [(socket.AF_INET6, ("::1", 443, 0, 0))]),
                ("fd00::5", 11434, [(socket.AF_INET6, ("fd00::5", 11434, 0, 0))])]:
            with self.subTest(host=host):
                self.assertEqual(resolver.addresses(host, port), want)

    def test_names_are_looked_up_once_per_period(self):
        lookup, calls = self.lookups({"api.test": [("192.0.2.1", 443), ("192.0.2.2", 443)]})
        resolver = ccproxy.Resolver(lookup=lookup)
        for _ in range(3):
            self.assertEqual(resolver.addresses("api.test", 443),
                             [(socket.AF_INET, ("192.0.2.1", 443)),
                              (socket.AF_INET, ("192.0.2.2", 443))])
        self.assertEqual(calls, ["api.test"])
        resolver.seconds = 0.0                  # expired at once: every call looks up
        resolver.forget("api.test", 443)
        resolver.addresses("api.test", 443)
        resolver.addresses("api.test", 443)
        self.assertEqual(calls, ["api.test"] * 3)

    def test_a_failed_lookup_is_not_kept(self):
        lookup, calls = self.lookups({})
        resolver = ccproxy.Resolver(lookup=lookup)
        for _ in range(2):
            with self.assertRaises(socket.gaierror):
                resolver.addresses("gone.test", 80)
        self.assertEqual(calls, ["gone.test"] * 2)

    def test_connect_tries_each_address_and_forgets_a_host_that_moved(self):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))            # bound, never listening: refused
        dead = closed.getsockname()
        self.addCleanup(closed.close)
        lookup, calls = self.lookups({"two.test": [dead, listener.getsockname()],
                                      "one.test": [dead]})
        resolver = ccproxy.Resolver(lookup=lookup)
        sock = resolver.connect(("two.test", 80), TIMEOUT)
        self.addCleanup(sock.close)
        self.assertEqual(sock.getpeername(), listener.getsockname())
        self.assertEqual(sock.gettimeout(), TIMEOUT)
        for _ in range(2):
            with self.assertRaises(ConnectionRefusedError):
                resolver.connect(("one.test", 80), TIMEOUT)
        self.assertEqual(calls, ["two.test", "one.test", "one.test"])

    def test_the_upstream_client_connects_through_the_resolver(self):
        with FakeUpstream() as up:
            lookup, calls = self.lookups({"upstream.test": [("127.0.0.1", up.port)]})
            client = ccproxy.UpstreamClient(provider_cfg("p", "http://x"),
                                            ccproxy.ConnectionPool(),
                                            ccproxy.Resolver(lookup=lookup))
            url = "http://upstream.test:%d/v1/messages" % up.port
            with unittest.mock.patch.dict(os.environ, {"NO_PROXY": "*", "no_proxy": "*"}):
                for _ in range(2):
                    resp = client.open("POST", url, b"{}", [])
                    self.assertEqual(resp.status, 200)
                    resp.read()
                    client.discard(resp)            # a new connection each time
            self.assertEqual(up.requests[0]["headers"]["Host"], "upstream.test:%d" % up.port)
            self.assertEqual(calls, ["upstream.test"])


class TestUpstreamClient(unittest.TestCase):
    """The urllib side: proxies from the environment, TLS with a private CA, reuse."""

    def test_http_proxy_from_the_environment_and_no_proxy(self):
        with FakeUpstream() as proxy, FakeUpstream() as direct:
            target = "http://upstream.invalid:80/v1/messages"
            env = {"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": "",
                   "no_proxy": ""}
            with unittest.mock.patch.dict(os.environ, env):
                client = ccproxy.UpstreamClient(provider_cfg("p", "http://x"),
                                                ccproxy.ConnectionPool())
                resp = client.open("POST", target, b"{}", [("content-type", "a/b")])
                resp.read()
                client.release(resp)
                client.pool.close()
            self.assertEqual(proxy.requests[0]["path"], target)   # absolute-form via proxy
            env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
            with unittest.mock.patch.dict(os.environ, env):
                client = ccproxy.UpstreamClient(provider_cfg("p", "http://x"),
                                                ccproxy.ConnectionPool())
                resp = client.open("POST", direct.url + "/v1/messages", b"{}", [])
                self.assertEqual(resp.status, 200)
                resp.read()
                client.release(resp)
                client.pool.close()
            self.assertEqual(len(proxy.requests), 1)
            self.assertEqual(direct.requests[0]["path"], "/v1/messages")

    @unittest.skipUnless(shutil.which("openssl"), "openssl not installed")
    def test_tls_with_a_private_ca_reuses_one_connection(self):
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True, timeout=60)
            with FakeUpstream() as up:
                server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                server_ctx.load_cert_chain(cert, key)
                up.server.socket = server_ctx.wrap_socket(up.server.socket, server_side=True)
                url = "https://127.0.0.1:%d" % up.port
                with Proxy(one_provider(url)) as px:        # system store only: refused
                    resp, out = px.call("POST", "/v1/messages", BODY)
                    self.assertEqual(resp.status, 500)
                    self.assertIn("CERTIFICATE_VERIFY_FAILED", json.loads(out)["error"]["message"])
                with Proxy(one_provider(url, ca_bundle=cert)) as px:
                    for _ in range(5):
                        resp, out = px.call("POST", "/v1/messages", BODY)
                        self.assertEqual((resp.status, json.loads(out)), (200, MESSAGE_JSON))
                    self.assertEqual(px.service.upstreams.connections_opened(), 1)

    def test_tls_contexts_are_shared_per_bundle_made_when_needed_and_cleared_on_reload(self):
        contexts = ccproxy.TLSContexts()
        system = contexts.get("")
        self.assertIs(contexts.get(""), system)
        contexts.clear()
        self.assertIsNot(contexts.get(""), system)
        service = ccproxy.Service(one_provider("http://127.0.0.1:9"))
        with FakeUpstream() as up:                 # plain HTTP: no context at all
            client = service.upstreams.client(provider_cfg("p", up.url))
            resp = client.open("POST", up.url + "/v1/messages", b"{}", [])
            resp.read()
            client.release(resp)
            service.upstreams.close()
        self.assertEqual(service.upstreams.contexts._contexts, {})
        made = service.upstreams.contexts.get("")
        service.apply(service.config)
        self.assertIsNot(service.upstreams.contexts.get(""), made)

    def test_a_bad_ca_bundle_fails_start_naming_the_key(self):
        cfg = ccproxy.build_config({"providers": [{"ca_bundle": "/nonexistent/ca.pem"}]}, {}, {})
        with self.assertRaisesRegex(ccproxy.ConfigError,
                                    r"providers\[0\]\.ca_bundle: cannot load /nonexistent"):
            ccproxy.check_tls_files(cfg)

    def test_pool_drops_connections_the_server_closed(self):
        with FakeUpstream() as up:
            pool = ccproxy.ConnectionPool()
            client = ccproxy.UpstreamClient(provider_cfg("p", up.url), pool)
            resp = client.open("POST", up.url + "/v1/messages", b"{}", [])
            resp.read()
            client.release(resp)
            conn = pool._idle[next(iter(pool._idle))][0][0]
            conn.sock.shutdown(socket.SHUT_RDWR)     # as if the server had timed it out
            resp = client.open("POST", up.url + "/v1/messages", b"{}", [])
            self.assertEqual(resp.status, 200)
            resp.read()
            client.release(resp)
            pool.close()
            self.assertEqual(pool.opened, 2)

    def test_status_listener_serves_only_status_and_health(self):
        cfg = config()
        service = ccproxy.Service(cfg)
        service.ready = True
        server = ccproxy.Server(("127.0.0.1", 0), ccproxy.StatusHandler, service)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                              timeout=TIMEOUT)
            for method, path, expected in (("GET", "/status", 200), ("GET", "/health", 200),
                                           ("GET", "/status/ready", 200),
                                           ("POST", "/v1/messages", 404),
                                           ("GET", "/v1/models", 404)):
                conn.request(method, path, b"{}" if method == "POST" else None)
                resp = conn.getresponse()
                resp.read()
                self.assertEqual(resp.status, expected, path)
            conn.close()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(TIMEOUT)

    def test_install_stamping_lines_exist(self):
        # `make install` rewrites these two lines with sed; keep them greppable.
        with open(SCRIPT) as f:
            lines = f.read().splitlines()
        self.assertIn("BUILD_COMMIT = None", lines)
        self.assertIn("BUILD_DATE = None", lines)


class TestPackaging(unittest.TestCase):
    """make install DESTDIR=… PREFIX=/usr, as a distribution package builds it."""

    @unittest.skipUnless(shutil.which("make"), "make is not installed")
    def test_install_writes_a_unit_that_runs_the_installed_file(self):
        with tempfile.TemporaryDirectory() as dest:
            out = subprocess.run(["make", "-s", "-C", HERE, "install", "DESTDIR=" + dest,
                                  "PREFIX=/usr", "UNIT_DIR=/usr/lib/systemd/system"],
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr)
            unit = os.path.join(dest, "usr/lib/systemd/system/ccproxy.service")
            with open(unit) as f:
                text = f.read()
            self.assertIn("\nExecStart=/usr/bin/python3 /usr/bin/ccproxy run\n", text)
            self.assertNotIn("/usr/local", text)
            self.assertEqual(os.readlink(os.path.join(dest, "usr/bin/ccproxy")),
                             "../lib/ccproxy/ccproxy.py")
            if not shutil.which("systemd-analyze"):
                self.skipTest("systemd-analyze is not installed")
            verify = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True,
                                    text=True, timeout=60)
            self.assertEqual((verify.returncode, verify.stderr), (0, ""))


# ---- Translation: the conformance cases of translation.md §7 ------------------------

def translation(ptype="openai", model="gpt-4o", client_model="claude-sonnet-5-5", **quirks):
    provider = ccproxy.ProviderConfig(name="r", type=ptype, base_url="http://127.0.0.1:9",
                                      quirks=tuple(quirks.items()))
    return ccproxy.Translation(route="r", client_model=client_model, upstream_model=model,
                               quirks=ccproxy.quirks_for(provider), estimate=100,
                               raw_estimate=100, signatures=ccproxy.ThoughtSignatures())


def to_openai(body, ptype="openai", model="gpt-4o", **quirks):
    tr = translation(ptype, model, **quirks)
    body = dict({"model": "claude-sonnet-5-5", "max_tokens": 100}, **body)
    return ccproxy.anthropic_to_openai(body, tr), tr


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


PNG_1000 = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" +
                            (1000).to_bytes(4, "big") + (1000).to_bytes(4, "big") +
                            b"\x08\x02\x00\x00\x00" + b"\x00" * 64).decode()
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": PNG_1000}}


class TestTranslationRequest(unittest.TestCase):
    """Cases 1-18: Anthropic request -> OpenAI request."""

    def test_01_system_string(self):
        out, _ = to_openai({"system": "S", "messages": [user("hi")]})
        self.assertEqual(out["messages"][0], {"role": "system", "content": "S"})

    def test_02_system_blocks_billing_header_and_cache_control(self):
        system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
                  {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                  {"type": "text", "text": "b"}]
        out, _ = to_openai({"system": system, "messages": [user([
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}])]})
        self.assertEqual(out["messages"][0], {"role": "system", "content": "a\n\nb"})
        self.assertNotIn("cache_control", json.dumps(out))

    def test_03_mid_conversation_system(self):
        messages = [user("u"), {"role": "system", "content": "r"}, assistant("x"), user("v")]
        out, _ = to_openai({"messages": messages}, "openai")
        self.assertEqual([m["role"] for m in out["messages"]],
                         ["user", "system", "assistant", "user"])
        out, _ = to_openai({"messages": messages}, "openai-compatible")
        self.assertEqual(out["messages"][0],
                         {"role": "user", "content": "u\n\n<system-reminder>r</system-reminder>"})
        self.assertEqual([m["role"] for m in out["messages"]], ["user", "assistant", "user"])

    def test_04_text_collapses_to_a_string_images_make_an_array(self):
        out, _ = to_openai({"messages": [user([{"type": "text", "text": "t1"},
                                               {"type": "text", "text": " "}])]})
        self.assertEqual(out["messages"][0]["content"], "t1")
        out, _ = to_openai({"messages": [user([{"type": "text", "text": "t"}, IMAGE])]})
        parts = out["messages"][0]["content"]
        self.assertEqual(parts[1]["type"], "image_url")
        self.assertTrue(parts[1]["image_url"]["url"].startswith("data:image/png;base64,"))

    def test_05_assistant_text_and_tool_calls(self):
        msg = assistant([{"type": "text", "text": "ok"},
                         {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                          "input": {"command": "ls"}},
                         {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {}}])
        out, _ = to_openai({"messages": [user("go"), msg, user([
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "b"}])]})
        o = out["messages"][1]
        self.assertEqual(o["content"], "ok")
        self.assertEqual([c["id"] for c in o["tool_calls"]], ["toolu_1", "toolu_2"])
        self.assertEqual(o["tool_calls"][0]["function"],
                         {"name": "Bash", "arguments": '{"command":"ls"}'})
        self.assertEqual(o["tool_calls"][1]["function"]["arguments"], "{}")

    def test_06_tool_results_first_then_the_rest(self):
        calls = assistant([{"type": "tool_use", "id": i, "name": "T", "input": {}}
                           for i in ("toolu_1", "toolu_2")])
        out, _ = to_openai({"messages": [user("go"), calls, user([
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "B"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "A"},
            {"type": "text", "text": "go on"}])]})
        tail = out["messages"][2:]
        self.assertEqual([(m["role"], m.get("tool_call_id"), m["content"]) for m in tail],
                         [("tool", "toolu_2", "B"), ("tool", "toolu_1", "A"),
                          ("user", None, "go on")])

    def tool_turn(self, content, **extra):
        return [user("go"), assistant([{"type": "tool_use", "id": "t1", "name": "Read",
                                        "input": {}}]),
                user([dict({"type": "tool_result", "tool_use_id": "t1", "content": content},
                           **extra)])]

    def test_07_images_in_tool_results_follow_as_a_user_message(self):
        content = [{"type": "text", "text": "shot"}, IMAGE]
        out, _ = to_openai({"messages": self.tool_turn(content)})
        self.assertEqual(out["messages"][2]["content"], "shot\n[image 1 attached below]")
        self.assertEqual(out["messages"][3]["role"], "user")
        self.assertEqual(out["messages"][3]["content"][1]["type"], "image_url")
        out, _ = to_openai({"messages": self.tool_turn(content)}, "deepseek", "deepseek-chat")
        self.assertNotIn("image_url", json.dumps(out))
        self.assertEqual(out["messages"][2]["content"], "shot\n[image omitted]")

    def test_08_errors_and_empty_results(self):
        out, _ = to_openai({"messages": self.tool_turn("boom", is_error=True)})
        self.assertEqual(out["messages"][2]["content"], "[ERROR] boom")
        out, _ = to_openai({"messages": self.tool_turn("")})
        self.assertEqual(out["messages"][2]["content"], "(no output)")

    def test_09_tool_reference(self):
        out, _ = to_openai({"messages": self.tool_turn(
            [{"type": "tool_reference", "tool_name": "WebFetch"}])})
        self.assertEqual(out["messages"][2]["content"], "[tool_reference: WebFetch]")

    def test_10_interrupted_tool_call_gets_a_stand_in_result(self):
        out, _ = to_openai({"messages": [user("go"), assistant([
            {"type": "tool_use", "id": "toolu_9", "name": "Bash", "input": {}}]), user("next")]})
        self.assertEqual(out["messages"][2], {"role": "tool", "tool_call_id": "toolu_9",
                                              "content": "[no result: tool call was interrupted]"})
        self.assertEqual(out["messages"][3], {"role": "user", "content": "next"})

    def test_11_tool_result_moves_before_an_interruption(self):
        out, _ = to_openai({"messages": [user("go"), assistant([
            {"type": "tool_use", "id": "a", "name": "Bash", "input": {}}]),
            user("[Request interrupted by user]"),
            user([{"type": "tool_result", "tool_use_id": "a", "content": "r"}])]})
        self.assertEqual([m["role"] for m in out["messages"]],
                         ["user", "assistant", "tool", "user"])
        orphan, _ = to_openai({"messages": [user([
            {"type": "tool_result", "tool_use_id": "zz", "content": "r"}])]})
        self.assertEqual(orphan["messages"], [{"role": "user",
                                               "content": "[orphan tool result zz]\nr"}])

    SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "additionalProperties": False, "propertyNames": {"pattern": "^a"},
              "properties": {"a": {"type": "string", "default": "x", "$comment": "c"}},
              "required": ["a", "ghost"]}

    def test_12_schemas_openai_and_gemini(self):
        tools = [{"name": "T", "description": "d", "input_schema": self.SCHEMA}]
        out, _ = to_openai({"messages": [user("hi")], "tools": tools})
        params = out["tools"][0]["function"]["parameters"]
        expected = {k: v for k, v in self.SCHEMA.items() if k != "$schema"}
        expected["properties"] = {"a": {"type": "string", "default": "x"}}
        self.assertEqual(params, expected)
        out, _ = to_openai({"messages": [user("hi")], "tools": tools}, "gemini", "gemini-2.5-pro")
        self.assertEqual(out["tools"][0]["function"]["parameters"], {
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})

    def test_13_gemini_rewrites(self):
        schema = {"type": "object", "$defs": {"P": {"type": "integer", "exclusiveMinimum": 0}},
                  "properties": {"c": {"const": "x"}, "n": {"type": ["string", "null"]},
                                 "p": {"$ref": "#/$defs/P"}, "o": {"oneOf": [{"type": "string"}]},
                                 "loop": {"$ref": "#/$defs/Missing"}}}
        got = ccproxy.clean_schema(schema, "gemini")["properties"]
        self.assertEqual(got["c"], {"enum": ["x"]})
        self.assertEqual(got["n"], {"type": "string", "nullable": True})
        self.assertEqual(got["p"], {"type": "integer", "minimum": 0})
        self.assertEqual(got["o"], {"anyOf": [{"type": "string"}]})
        self.assertEqual(got["loop"], {"type": "object"})

    def test_14_long_tool_names_map_and_map_back(self):
        name = "mcp__server__" + "x" * 57
        out, tr = to_openai({"messages": [user("hi")],
                             "tools": [{"name": name, "input_schema": {}}]})
        upstream = out["tools"][0]["function"]["name"]
        self.assertEqual(len(upstream), 64)
        self.assertRegex(upstream, r"^[a-zA-Z0-9_-]{55}_[0-9a-f]{8}$")
        reply = {"choices": [{"message": {"tool_calls": [{"id": "c1", "type": "function",
                 "function": {"name": upstream, "arguments": "{}"}}]}, "finish_reason": "tool_calls"}]}
        self.assertEqual(ccproxy.openai_to_anthropic(reply, tr)["content"][0]["name"], name)
        self.assertEqual(ccproxy.upstream_tool_name("a.b c"), "a_b_c")

    def test_15_tool_choice(self):
        tools = [{"name": "Read", "input_schema": {}}]
        rows = [({"type": "any"}, "required", None), ({"type": "auto"}, "auto", None),
                ({"type": "tool", "name": "Read"},
                 {"type": "function", "function": {"name": "Read"}}, None),
                ({"type": "none"}, "none", None),
                ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False)]
        for choice, expected, parallel in rows:
            with self.subTest(choice=choice):
                out, _ = to_openai({"messages": [user("hi")], "tools": tools,
                                    "tool_choice": choice})
                self.assertEqual(out["tool_choice"], expected)
                self.assertEqual(out.get("parallel_tool_calls"), parallel)
        out, _ = to_openai({"messages": [user("hi")], "tools": [], "tool_choice": {"type": "any"}})
        self.assertNotIn("tool_choice", out)
        self.assertNotIn("parallel_tool_calls", out)
        out, _ = to_openai({"messages": [user("hi")], "tools": tools,
                            "tool_choice": {"type": "any"}}, no_required=True)
        self.assertEqual(out["tool_choice"], "auto")
        out, _ = to_openai({"messages": [user("hi")], "tools": tools,
                            "tool_choice": {"type": "tool", "name": "Read"}}, no_named_choice=True)
        self.assertEqual(out["tool_choice"], "required")
        out, _ = to_openai({"messages": [user("hi")], "tools": tools,
                            "tool_choice": {"type": "none"}}, "ollama", "qwen3")
        for key in ("tools", "tool_choice", "parallel_tool_calls"):     # ignored "none"
            self.assertNotIn(key, out)

    def test_16_reasoning(self):
        body = {"messages": [user("hi")], "temperature": 0.5,
                "thinking": {"type": "enabled", "budget_tokens": 10000}}
        out, _ = to_openai(body, "openai", "o3")
        self.assertEqual(out["reasoning_effort"], "high")
        self.assertIn("max_completion_tokens", out)
        self.assertNotIn("temperature", out)
        out, _ = to_openai({"messages": [user("hi")], "thinking": {"type": "adaptive"},
                            "output_config": {"effort": "medium"}}, "openai", "gpt-5")
        self.assertEqual(out["reasoning_effort"], "medium")
        out, _ = to_openai(body, "openai", "gpt-4o")
        self.assertNotIn("reasoning_effort", out)
        self.assertEqual(out["temperature"], 0.5)
        out, _ = to_openai(body, "openrouter", "openai/o3")
        self.assertEqual(out["reasoning"], {"effort": "high"})
        out, _ = to_openai(body, "openrouter", "anthropic/claude-sonnet-4.5")
        self.assertEqual(out["reasoning"], {"max_tokens": 10000})
        out, _ = to_openai(dict(body, thinking={"type": "adaptive"}), "openrouter",
                           "google/gemini-2.5-pro")
        self.assertEqual(out["reasoning"], {"effort": "medium"})
        out, _ = to_openai(body, "deepseek", "deepseek-reasoner")
        self.assertEqual(out["thinking"], {"type": "enabled"})
        for budget, effort in ((1024, "low"), (8192, "medium"), (8193, "high")):
            self.assertEqual(ccproxy.reasoning_effort(
                {"thinking": {"type": "enabled", "budget_tokens": budget}}), effort)

    def test_metadata_user_id_becomes_a_hashed_user_only_when_asked(self):
        body = {"messages": [user("hi")], "metadata": {"user_id": '{"device_id":"d"}'}}
        self.assertNotIn("user", to_openai(body)[0])
        out, _ = to_openai(body, send_user=True)
        self.assertRegex(out["user"], r"^[0-9a-f]{32}$")
        self.assertNotIn("device", out["user"])
        self.assertNotIn("user", to_openai({"messages": [user("hi")]}, send_user=True)[0])

    def test_17_unknown_fields_never_reach_the_upstream(self):
        body = {"messages": [user("hi")], "context_management": {"edits": []},
                "output_config": {"effort": "high"}, "metadata": {"user_id": "{}"},
                "top_k": 5, "betas": ["x"], "container": "c", "mcp_servers": [],
                "service_tier": "auto", "thinking": {"type": "adaptive", "display": "omitted"}}
        out, _ = to_openai(body, "groq", "llama-3.3-70b")
        self.assertLessEqual(set(out), {"model", "messages", "max_tokens"})

    def test_18_max_tokens_clamp_and_token_param(self):
        out, _ = to_openai({"messages": [user("hi")], "max_tokens": 128000}, "deepseek",
                           "deepseek-chat")
        self.assertEqual(out["max_tokens"], 8192)
        out, _ = to_openai({"messages": [user("hi")], "max_tokens": 128000}, max_output=4096)
        self.assertEqual(out["max_completion_tokens"], 4096)
        self.assertNotIn("max_tokens", out)

    def test_tools_cache_is_exact_and_the_spliced_body_is_the_same(self):
        name = "mcp__server__" + "x" * 57
        def tools():          # parsed afresh each call, as each request's are
            return json.loads(json.dumps([
                {"name": name, "description": "d ü", "input_schema": self.SCHEMA},
                {"name": "Read", "input_schema": {"type": "object"}}]))
        body = {"model": "claude-sonnet-5-5", "max_tokens": 100, "stream": True,
                "messages": [user("hi")], "tools": tools(), "tool_choice": {"type": "any"}}
        cache = ccproxy.ToolsCache(size=2)
        quirks, gemini = translation().quirks, translation("gemini").quirks
        first = cache.get(body["tools"], quirks)
        self.assertIs(cache.get(tools(), quirks), first)                  # a hit
        self.assertIsNot(cache.get(tools(), gemini), first)               # per dialect
        changed = tools()
        changed[1]["input_schema"]["required"] = ["x"]                    # same names
        self.assertEqual(cache.get(changed, quirks).tools[1]["function"]["parameters"],
                         {"type": "object", "required": ["x"], "properties": {}})
        self.assertLessEqual(len(cache._map), 2)
        lru = ccproxy.ToolsCache(size=2)
        a, b, c = ([{"name": n, "input_schema": {}}] for n in "ABC")
        kept = lru.get(a, quirks)
        lru.get(b, quirks)
        lru.get(json.loads(json.dumps(a)), quirks)                        # A used last
        lru.get(c, quirks)                                                # B goes
        self.assertIs(lru.get(a, quirks), kept)
        for prepared in (None, first):
            with self.subTest(cached=prepared is not None):
                tr = translation()
                data, stream = ccproxy.translated_request(body, tr, prepared)
                self.assertEqual(json.loads(data), ccproxy.anthropic_to_openai(body, translation()))
                self.assertTrue(data.isascii() and stream)
                self.assertEqual(tr.names[json.loads(data)["tools"][0]["function"]["name"]], name)
                self.assertEqual(ccproxy.estimate_input_tokens(body, tools_size=first.size),
                                 ccproxy.estimate_input_tokens(body))
        data, _ = ccproxy.translated_request(dict(body, tools=[]), translation())
        self.assertNotIn("tools", json.loads(data))

    def test_deepseek_echo_and_gemini_signature_round_trip(self):
        history = [user("go"), assistant([
            {"type": "thinking", "thinking": "hmm", "signature": "ccproxy:r:x"},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]),
            user([{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}])]
        out, _ = to_openai({"messages": history}, "deepseek", "deepseek-reasoner")
        self.assertEqual(out["messages"][1]["reasoning_content"], "hmm")
        out, _ = to_openai({"messages": history}, "openai", "gpt-4o")
        self.assertNotIn("reasoning_content", out["messages"][1])
        out, _ = to_openai({"messages": history}, tool_id_style="alnum9")
        self.assertRegex(out["messages"][1]["tool_calls"][0]["id"], r"^[A-Za-z0-9]{9}$")
        self.assertEqual(out["messages"][1]["tool_calls"][0]["id"],
                         out["messages"][2]["tool_call_id"])

    def test_documents(self):
        pdf = {"type": "document", "source": {"type": "base64", "media_type":
                                              "application/pdf", "data": "JVBERi0="}}
        out, _ = to_openai({"messages": [user([pdf, {"type": "text", "text": "sum"}])]})
        self.assertEqual(out["messages"][0]["content"][0]["type"], "file")
        out, _ = to_openai({"messages": [user([pdf])]}, "groq", "llama")
        self.assertEqual(out["messages"][0]["content"], "[PDF document omitted]")
        text_doc = {"type": "document", "title": "T", "source": {"type": "text", "data": "D"}}
        out, _ = to_openai({"messages": [user([text_doc])]})
        self.assertEqual(out["messages"][0]["content"], "T\nD")

    def test_stream_options_and_headers(self):
        out, _ = to_openai({"messages": [user("hi")], "stream": True})
        self.assertEqual(out["stream_options"], {"include_usage": True})
        azure = ccproxy.ProviderConfig(name="az", type="azure", base_url="https://h/openai/"
                                       "deployments/d", api_key="k", api_version="2024-10-21")
        self.assertEqual(ccproxy.openai_url(azure),
                         "https://h/openai/deployments/d/chat/completions?api-version=2024-10-21")
        self.assertIn(("api-key", "k"), ccproxy.openai_headers(azure, True))
        groq = ccproxy.ProviderConfig(name="g", type="groq", base_url="https://h", api_key="k")
        headers = dict(ccproxy.openai_headers(groq, False))
        self.assertEqual(headers["authorization"], "Bearer k")
        self.assertNotIn("x-api-key", headers)


def reply(message=None, finish="stop", usage=None, **extra):
    doc = {"id": "chatcmpl-1", "choices": [{"message": message or {}, "finish_reason": finish}]}
    if usage is not None:
        doc["usage"] = usage
    doc.update(extra)
    return doc


class TestTranslationReply(unittest.TestCase):
    """Cases 19-24: OpenAI reply -> Anthropic reply."""

    def convert(self, doc, **quirks):
        return ccproxy.openai_to_anthropic(doc, translation(**quirks))

    def test_19_text(self):
        msg = self.convert(reply({"content": "hi"}, usage={"prompt_tokens": 10,
                                                           "completion_tokens": 2}))
        self.assertRegex(msg["id"], r"^msg_")
        self.assertEqual((msg["model"], msg["content"], msg["stop_reason"]),
                         ("claude-sonnet-5-5", [{"type": "text", "text": "hi"}], "end_turn"))
        self.assertEqual(msg["usage"], {"input_tokens": 10, "output_tokens": 2,
                                        "cache_creation_input_tokens": 0,
                                        "cache_read_input_tokens": 0})

    def test_20_cache_hits_leave_input_tokens(self):
        for usage in ({"prompt_tokens": 1000, "completion_tokens": 5,
                       "prompt_tokens_details": {"cached_tokens": 800}},
                      {"prompt_tokens": 1000, "completion_tokens": 5,
                       "prompt_cache_hit_tokens": 800}):
            got = self.convert(reply({"content": "x"}, usage=usage))["usage"]
            self.assertEqual((got["input_tokens"], got["cache_read_input_tokens"]), (200, 800))

    def test_21_tool_calls_and_argument_repair(self):
        rows = [('{"a":1', {"a": 1}), ('"{\\"a\\":1}"', {"a": 1}), ("", {}), (None, {}),
                ({"a": 1}, {"a": 1}), ('```json\n{"a": [1, 2,]}\n```', {"a": [1, 2]}),
                ('{"s": "unterminated', {"s": "unterminated"}), ("[1]", {"value": [1]}),
                ("{nope", {"_ccproxy_invalid_arguments": "{nope"})]
        for args, expected in rows:
            with self.subTest(args=args):
                self.assertEqual(ccproxy.parse_tool_arguments(args), expected)
        msg = self.convert(reply({"content": None, "tool_calls": [
            {"id": "call.1", "type": "function", "function": {"name": "Bash", "arguments": '{"a":1'}},
            {"id": "call.1", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}]},
            finish="stop"))
        self.assertEqual(msg["stop_reason"], "tool_use")
        self.assertEqual([b["id"] for b in msg["content"]], ["call_1", "call_1_2"])
        self.assertEqual(msg["content"][0]["input"], {"a": 1})

    def test_22_finish_reasons(self):
        for finish, reason in (("length", "max_tokens"), ("content_filter", "refusal"),
                               (None, "end_turn"), ("eos", "end_turn"), ("stop", "end_turn")):
            with self.subTest(finish=finish):
                self.assertEqual(self.convert(reply({"content": "x"}, finish))["stop_reason"],
                                 reason)
        with self.assertRaises(ccproxy.UpstreamReplyError):
            self.convert(reply({"content": "x"}, "error"))
        tools = {"content": None, "tool_calls": [{"id": "c", "type": "function",
                                                  "function": {"name": "T", "arguments": "{}"}}]}
        self.assertEqual(self.convert(reply(tools, "length"))["stop_reason"], "max_tokens")
        refusal = self.convert(reply({"content": None, "refusal": "no"}))
        self.assertEqual((refusal["stop_reason"], refusal["content"][0]["text"]), ("refusal", "no"))

    def test_23_reasoning_becomes_signed_thinking(self):
        for message in ({"reasoning_content": "r", "content": "t"},
                        {"reasoning": "r", "content": "t"},
                        {"reasoning_details": [{"type": "reasoning.text", "text": "r"}],
                         "content": "t"}):
            msg = self.convert(reply(message))
            self.assertEqual([b["type"] for b in msg["content"]], ["thinking", "text"])
            self.assertTrue(msg["content"][0]["signature"].startswith("ccproxy:r:"))
        msg = self.convert(reply({"content": "<think>r</think>\nt"}), ptype="ollama",
                           model="qwen3")
        self.assertEqual([(b["type"], b.get("thinking") or b.get("text")) for b in msg["content"]],
                         [("thinking", "r"), ("text", "t")])

    def test_24_empty_reply(self):
        msg = self.convert(reply({"content": ""}))
        self.assertEqual(msg["content"], [])
        self.assertGreater(msg["usage"]["input_tokens"], 0)

    def test_groq_usage_in_x_groq(self):
        msg = self.convert(reply({"content": "x"}, x_groq={"usage": {"prompt_tokens": 7,
                                                                     "completion_tokens": 3}}))
        self.assertEqual((msg["usage"]["input_tokens"], msg["usage"]["output_tokens"]), (7, 3))


def chunk(delta=None, finish=None, usage=None, choices=True):
    doc = {"id": "c", "choices": [{"index": 0, "delta": delta or {},
                                   "finish_reason": finish}] if choices else []}
    if usage is not None:
        doc["usage"] = usage
    return "data: " + json.dumps(doc) + "\n\n"


def tc(index=None, id=None, name=None, args=None, sig=None):
    call = {"type": "function", "function": {}}
    if index is not None:
        call["index"] = index
    if id:
        call["id"] = id
    if name:
        call["function"]["name"] = name
    if args is not None:
        call["function"]["arguments"] = args
    if sig:
        call["extra_content"] = {"google": {"thought_signature": sig}}
    return call


def run_stream(text, tr=None, cuts=None, translator=None):
    """Feed an upstream SSE text through SSEParser + StreamTranslator (or `translator`)
    -> A events."""
    tr = tr or translation()
    parser, st = ccproxy.SSEParser(), (translator or ccproxy.StreamTranslator)(tr)
    raw, out = text.encode(), st.start()
    pieces = [raw] if cuts is None else [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    try:
        for piece in pieces:
            for payload in parser.feed(piece):
                out += st.feed(payload)
        for payload in parser.close():
            out += st.feed(payload)
        out += st.end()
    except ccproxy.UpstreamReplyError as exc:
        out += st.error(exc.etype, str(exc))
    return parse_events(out)


def parse_events(raw):
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith(
            "data: "), frame
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:], frame
        events.append(data)
    return events


def check_grammar(testcase, events):
    """The §3.1 invariants; returns the blocks' final content."""
    names = [e["type"] for e in events]
    testcase.assertEqual(names[:2], ["message_start", "ping"])
    if names[-1] == "error":
        testcase.assertNotIn("message_stop", names)
        testcase.assertNotIn("message_delta", names)
    else:
        testcase.assertEqual(names[-2:], ["message_delta", "message_stop"])
        testcase.assertEqual(names.count("message_delta"), 1)
        usage = events[-2]["usage"]
        testcase.assertEqual(set(usage) - {"server_tool_use"}, {
            "input_tokens", "output_tokens", "cache_creation_input_tokens",
            "cache_read_input_tokens"})
        testcase.assertGreater(usage["input_tokens"], 0)
    open_block, expected_index, blocks = None, 0, []
    for e in events:
        if e["type"] == "content_block_start":
            testcase.assertIsNone(open_block, "two blocks open")
            testcase.assertEqual(e["index"], expected_index)
            open_block, expected_index = e["index"], expected_index + 1
            block = dict(e["content_block"])
            if block["type"] in ("tool_use", "server_tool_use"):
                testcase.assertEqual(block["input"], {})
                block["json"] = ""
            blocks.append(block)
        elif e["type"] == "content_block_delta":
            testcase.assertEqual(e["index"], open_block)
            d, block = e["delta"], blocks[-1]
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                block["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                block["signature"] = d["signature"]
            else:
                testcase.assertIn(block["type"], ("tool_use", "server_tool_use"))
                block["json"] += d["partial_json"]
        elif e["type"] == "content_block_stop":
            testcase.assertEqual(e["index"], open_block)
            open_block = None
        elif e["type"] == "message_delta":
            testcase.assertIsNone(open_block, "a block left open")
        elif e["type"] == "error":     # as Anthropic's own: may cut a block; nothing after
            testcase.assertIs(e, events[-1])
    return blocks


TOOL_TRACE = "".join([
    chunk({"role": "assistant", "content": "Let me"}), chunk({"content": " check."}),
    chunk({"tool_calls": [tc(0, "a", "Read", '{"fi')]}),
    chunk({"tool_calls": [tc(1, "b", "Bash", '{"co')]}),
    chunk({"tool_calls": [tc(0, args='le":"x"}')]}),
    chunk({"tool_calls": [tc(1, args='mmand":"ls"}')]}),
    chunk(finish="tool_calls"), chunk(usage={"prompt_tokens": 900, "completion_tokens": 40},
                                      choices=False),
    "data: [DONE]\n\n"])


class TestTranslationStream(unittest.TestCase):
    """Cases 25-35 and the random-chunking property."""

    def test_25_text_stream(self):
        events = run_stream(chunk({"content": "Hel"}) + chunk({"content": "lo"}) +
                            chunk(finish="stop") + "data: [DONE]\n\n")
        self.assertEqual([e["type"] for e in events],
                         ["message_start", "ping", "content_block_start", "content_block_delta",
                          "content_block_delta", "content_block_stop", "message_delta",
                          "message_stop"])
        self.assertEqual(check_grammar(self, events)[0]["text"], "Hello")
        self.assertEqual(events[0]["message"]["model"], "claude-sonnet-5-5")

    def test_26_args_without_id_or_index(self):
        parts = ['{"com', 'mand"', ':"l', 's -la', '"}']
        text = chunk({"tool_calls": [tc(id="call_1", name="Bash", args="")]}) + "".join(
            chunk({"tool_calls": [tc(args=p)]}) for p in parts) + chunk(finish="tool_calls")
        events = run_stream(text + "data: [DONE]\n\n")
        blocks = check_grammar(self, events)
        self.assertEqual(len(blocks), 1)
        self.assertEqual(blocks[0]["json"], "".join(parts))
        self.assertEqual(events[-2]["delta"]["stop_reason"], "tool_use")

    def test_27_interleaved_tools_and_the_spec_trace(self):
        events = run_stream(TOOL_TRACE)
        blocks = check_grammar(self, events)
        self.assertEqual([(b["type"], b.get("id"), b.get("name")) for b in blocks],
                         [("text", None, None), ("tool_use", "a", "Read"),
                          ("tool_use", "b", "Bash")])
        self.assertEqual([json.loads(b["json"]) for b in blocks[1:]],
                         [{"file": "x"}, {"command": "ls"}])
        self.assertEqual(events[-2]["delta"]["stop_reason"], "tool_use")
        self.assertEqual((events[-2]["usage"]["input_tokens"],
                          events[-2]["usage"]["output_tokens"]), (900, 40))

    def test_28_gemini_whole_calls_without_index_and_signatures(self):
        text = chunk({"tool_calls": [tc(id="g1", name="Read", args='{"p":1}', sig="SIG1"),
                                     tc(id="g2", name="Bash", args='{"c":2}', sig="SIG2")]},
                     finish="stop") + "data: [DONE]\n\n"
        # The signatures come back from the process's LRU, and (sig_in_id, on by
        # default for Gemini) from the ids alone: after a restart, or in another worker.
        for sig_in_id in (False, True):
            with self.subTest(sig_in_id=sig_in_id):
                tr = translation("gemini", "gemini-3-pro", sig_in_id=sig_in_id)
                events = run_stream(text, tr)
                blocks = check_grammar(self, events)
                ids = [b["id"] for b in blocks]
                self.assertEqual([ccproxy.split_signature(i) for i in ids],
                                 [("g1", "SIG1" if sig_in_id else None),
                                  ("g2", "SIG2" if sig_in_id else None)])
                self.assertTrue(all(ccproxy.TOOL_ID_RE.match(i) for i in ids))
                self.assertEqual(events[-2]["delta"]["stop_reason"], "tool_use")
                history = {"messages": [user("go"), assistant([
                    {"type": "tool_use", "id": ids[0], "name": "Read", "input": {"p": 1}},
                    {"type": "tool_use", "id": ids[1], "name": "Bash", "input": {"c": 2}}]),
                    user([{"type": "tool_result", "tool_use_id": ids[0], "content": "a"},
                          {"type": "tool_result", "tool_use_id": ids[1], "content": "b"}])],
                    "model": "m", "max_tokens": 10}
                later = translation("gemini", "gemini-3-pro") if sig_in_id else tr
                out = ccproxy.anthropic_to_openai(history, later)
                calls = out["messages"][1]["tool_calls"]
                self.assertEqual([c["extra_content"]["google"]["thought_signature"]
                                  for c in calls], ["SIG1", "SIG2"])
                self.assertEqual([c["id"] for c in calls], ["g1", "g2"])
                self.assertEqual([m["tool_call_id"] for m in out["messages"][2:4]],
                                 ["g1", "g2"])

    def test_29_reasoning_then_text_and_the_deepseek_round_trip(self):
        tr = translation("deepseek", "deepseek-reasoner")
        events = run_stream(chunk({"reasoning_content": "Think"}) +
                            chunk({"reasoning_content": "ing"}) + chunk({"content": "Done"}) +
                            chunk(finish="stop") + "data: [DONE]\n\n", tr)
        blocks = check_grammar(self, events)
        self.assertEqual([(b["type"], b.get("thinking") or b.get("text")) for b in blocks],
                         [("thinking", "Thinking"), ("text", "Done")])
        self.assertTrue(blocks[0]["signature"].startswith("ccproxy:r:"))
        history = [user("go"), assistant([dict(blocks[0], type="thinking"),
                                          {"type": "tool_use", "id": "t", "name": "B",
                                           "input": {}}])]
        out = ccproxy.anthropic_to_openai({"messages": history, "model": "m"}, tr)
        self.assertEqual(out["messages"][1]["reasoning_content"], "Thinking")

    def test_30_usage_after_finish_and_nothing_after_stop(self):
        events = run_stream(chunk({"content": "x"}) + chunk(finish="stop") +
                            chunk(usage={"prompt_tokens": 50, "completion_tokens": 7},
                                  choices=False) + "data: [DONE]\n\n")
        check_grammar(self, events)
        self.assertEqual(events[-2]["usage"]["output_tokens"], 7)
        self.assertEqual(events[-1]["type"], "message_stop")

    def test_31_no_usage_at_all_is_estimated(self):
        events = run_stream(chunk({"content": "x" * 40}) + chunk(finish="stop") +
                            "data: [DONE]\n\n")
        usage = events[-2]["usage"]
        self.assertGreater(usage["input_tokens"], 0)
        self.assertEqual(usage["output_tokens"], 10)

    def test_32_usage_on_every_chunk_closes_nothing(self):
        u = {"prompt_tokens": 5, "completion_tokens": 1}
        text = "".join(chunk({"tool_calls": [tc(0, "a", "T", p)] if i == 0 else
                              [tc(0, args=p)]}, usage=u) for i, p in enumerate(['{"a"', ':1}']))
        events = run_stream(text + chunk(finish="tool_calls", usage=u) + "data: [DONE]\n\n")
        blocks = check_grammar(self, events)
        self.assertEqual(blocks[0]["json"], '{"a":1}')

    def test_33_snapshot_arguments(self):
        text = (chunk({"tool_calls": [tc(0, "a", "T", '{"a"')]}) +
                chunk({"tool_calls": [tc(0, args='{"a":1}')]}) + chunk(finish="tool_calls"))
        self.assertEqual(check_grammar(self, run_stream(text + "data: [DONE]\n\n"))[0]["json"],
                         '{"a":1}')

    def test_34_synthesised_stream_from_a_json_reply(self):
        msg = ccproxy.openai_to_anthropic(reply({"reasoning_content": "r", "content": "t",
            "tool_calls": [{"id": "c", "type": "function",
                            "function": {"name": "T", "arguments": '{"x":1}'}}]},
            "tool_calls"), translation())
        events = parse_events(ccproxy.synthesize_stream(msg))
        blocks = check_grammar(self, events)
        self.assertEqual([b["type"] for b in blocks], ["thinking", "text", "tool_use"])
        self.assertEqual(json.loads(blocks[2]["json"]), {"x": 1})

    def test_35_comments_and_crlf(self):
        text = (": OPENROUTER PROCESSING\r\n\r\n" + chunk({"content": "a"}).replace("\n", "\r\n")
                + "event: x\r\nid: 1\r\nretry: 5\r\n" + chunk(finish="stop").replace("\n", "\r\n")
                + "data: [DONE]\r\n\r\n")
        self.assertEqual(check_grammar(self, run_stream(text))[0]["text"], "a")

    def test_40_error_chunk_after_text(self):
        for error, etype in (({"code": 429, "message": "Rate limit"}, "overloaded_error"),
                             ({"message": "boom"}, "api_error")):
            events = run_stream(chunk({"content": "x"}) + "data: " + json.dumps(
                {"error": error}) + "\n\n" + chunk({"content": "after"}))
            check_grammar(self, events)
            self.assertEqual((events[-1]["type"], events[-1]["error"]["type"]), ("error", etype))

    def test_41_truncation_is_an_error_not_a_stop(self):
        events = run_stream(chunk({"content": "x"}))
        check_grammar(self, events)
        self.assertEqual(events[-1]["type"], "error")
        events = run_stream(chunk({"content": "x"}) + chunk(finish="stop"))   # no [DONE]
        self.assertEqual(events[-1]["type"], "message_stop")

    def test_think_tags_split_across_chunks(self):
        tr = translation("ollama", "qwen3")
        pieces = ["<thi", "nk>dee", "p tho", "ught</th", "ink>\n\nAns", "wer"]
        events = run_stream("".join(chunk({"content": p}) for p in pieces) +
                            chunk(finish="stop") + "data: [DONE]\n\n", tr)
        blocks = check_grammar(self, events)
        self.assertEqual([(b["type"], b.get("thinking") or b.get("text")) for b in blocks],
                         [("thinking", "deep thought"), ("text", "Answer")])

    def test_random_chunking_always_yields_the_same_valid_stream(self):
        tr_text = TOOL_TRACE.replace(chunk({"content": " check."}), chunk(
            {"reasoning_content": "hmm"}) + chunk({"content": " check."}))
        reference = check_grammar(self, run_stream(tr_text))
        for seed in range(300):
            rng = random.Random(seed)
            n = len(tr_text.encode())
            cuts = sorted(rng.sample(range(1, n), rng.randint(1, min(40, n - 1))))
            with self.subTest(seed=seed):
                blocks = check_grammar(self, run_stream(tr_text, cuts=cuts))
                self.assertEqual(blocks, reference)


def tool_stream(*chunks, finish="tool_calls", tr=None, cuts=None):
    """The blocks and stop reason of a translated stream of `chunks` (deltas)."""
    text = "".join(chunk(c) for c in chunks) + chunk(finish=finish) + "data: [DONE]\n\n"
    events = run_stream(text, tr, cuts)
    return events, events[-2]["delta"]["stop_reason"] if len(events) > 1 else None


def summary(testcase, events):
    """[("text", text) | (name, input object)] of a stream, checking its grammar and
    that every tool input parses as one JSON object."""
    out = []
    for block in check_grammar(testcase, events):
        if block["type"] == "tool_use":
            value = json.loads(block["json"])
            testcase.assertIsInstance(value, dict)
            out.append((block["name"], value))
        elif block["type"] == "text":
            out.append(("text", block["text"]))
    return out


class TestToolCallStreams(unittest.TestCase):
    """Issue #20: tool calls as real upstreams stream them.  Each call is its own
    tool_use block whose input parses and equals what the upstream meant; no text is
    lost; a call cut off still ends in valid JSON."""

    def shape(self, *chunks, **kw):
        events, stop = tool_stream(*chunks, **kw)
        return summary(self, events), stop

    def test_text_and_an_open_calls_arguments_in_one_chunk(self):
        got, stop = self.shape({"tool_calls": [tc(0, "a", "Bash", '{"command": "l')]},
                               {"content": "Running it.", "tool_calls": [tc(0, args='s"}')]})
        self.assertEqual(got, [("Bash", {"command": "ls"}), ("text", "Running it.")])
        self.assertEqual(stop, "tool_use")

    def test_text_in_the_middle_of_a_call_waits_for_it(self):
        got, _ = self.shape({"tool_calls": [tc(0, "a", "Bash", '{"comm')]},
                            {"content": "half"}, {"reasoning_content": "hmm"},
                            {"tool_calls": [tc(0, args='and": "ls"}')]}, {"content": " more"})
        self.assertEqual(got, [("Bash", {"command": "ls"}), ("text", "half"),
                               ("text", " more")])

    def test_a_new_id_on_an_index_already_used(self):
        got, stop = self.shape({"tool_calls": [tc(0, "a", "Read", '{"p": 1}')]},
                               {"tool_calls": [tc(0, "b", "Bash", '{"c": ')]},
                               {"tool_calls": [tc(0, args='2}')]})
        self.assertEqual(got, [("Read", {"p": 1}), ("Bash", {"c": 2})])
        self.assertEqual(stop, "tool_use")

    def test_calls_on_a_reused_index_after_text(self):
        for second in (tc(0, "b", "Bash", '{"c": 2}'), tc(0, None, "Bash", '{"c": 2}')):
            with self.subTest(second=second):
                got, _ = self.shape({"tool_calls": [tc(0, "a", "Read", '{"p": 1}')]},
                                    {"content": "and then"}, {"tool_calls": [second]})
                self.assertEqual(got, [("Read", {"p": 1}), ("text", "and then"),
                                       ("Bash", {"c": 2})])

    def test_calls_with_neither_index_nor_id(self):
        got, _ = self.shape({"tool_calls": [tc(name="A", args='{"x":')]},
                            {"tool_calls": [tc(args='1}')]},
                            {"tool_calls": [tc(name="B", args='{"y":2}')]},
                            {"tool_calls": [tc(name="A", args='{"x":3}'),
                                            tc(name="B", args='{"y":4}')]})
        self.assertEqual(got, [("A", {"x": 1}), ("B", {"y": 2}), ("A", {"x": 3}),
                               ("B", {"y": 4})])

    def test_whole_snapshots_and_split_arguments(self):
        cases = [
            (['{"a": 1}'], {"a": 1}),
            (['{"a"', '{"a": 1', '{"a": 1}', '{"a": 1}'], {"a": 1}),      # snapshots
            (['{"a": "x\\', 'n\\u00', 'e9 \\"q\\"', '"}'], {"a": "x\né \"q\""}),
            (['{"e": "\ud83d', '\ude00!"}'], {"e": "\U0001F600!"}),          # UTF-16 halves
            (['{"a": "line\nbreak\ttab"}'], {"a": "line\nbreak\ttab"}),    # raw controls
            (['"{\\"a\\": 1}"'], {"a": 1}),                                 # JSON in a string
            (['```json\n{"a": 1}\n```'], {"a": 1}),
            (['{"a": 1}}', '}'], {"a": 1}),
            ([{"a": 1}], {"a": 1}),                                         # an object
            ([''], {}),
        ]
        for pieces, expected in cases:
            with self.subTest(pieces=pieces):
                chunks = [{"tool_calls": [tc(0, "a", "T", pieces[0])]}] + [
                    {"tool_calls": [tc(0, args=p)]} for p in pieces[1:]]
                events, _ = tool_stream(*chunks)
                got = summary(self, events)
                self.assertEqual(got, [("T", expected)])
                json_text = "".join(e["delta"]["partial_json"] for e in events
                                    if e["type"] == "content_block_delta")
                self.assertFalse(re.search("[\ud800-\udfff]", json_text), json_text)

    def test_cut_by_the_output_limit_in_the_middle_of_a_call(self):
        cases = [('{"path": "a", "content": "abc', {"path": "a", "content": "abc"}),
                 ('{"path": "a", "n": [1, 2', {"path": "a", "n": [1, 2]}),
                 ('{"path": "a", "conte', {"path": "a"}),
                 ('{"path": "a", ', {"path": "a"}),
                 ('{"path": "a\\u00', {"path": "a"}),
                 ('{"ok": tr', {"ok": True}),
                 ('{"n": 1.', {"n": 1.0})]
        for args, expected in cases:
            with self.subTest(args=args), self.assertLogs("ccproxy", "WARNING") as logs:
                got, stop = self.shape({"content": "Writing."},
                                       {"tool_calls": [tc(0, "a", "Write", args)]},
                                       finish="length")
                self.assertEqual(got, [("text", "Writing."), ("Write", expected)])
                self.assertEqual(stop, "max_tokens")
                self.assertIn("input repaired", "\n".join(logs.output))

    def test_interleaved_and_sequential_parallel_calls_keep_their_order(self):
        got, _ = self.shape({"tool_calls": [tc(0, "a", "A", '{"x"')]},
                            {"tool_calls": [tc(1, "b", "B", '{"y"')]},
                            {"tool_calls": [tc(0, args=':1}')]},
                            {"tool_calls": [tc(2, "c", "C", '{"z":3}')]},
                            {"tool_calls": [tc(1, args=':2}')]})
        self.assertEqual(got, [("A", {"x": 1}), ("B", {"y": 2}), ("C", {"z": 3})])

    def test_json_object_stream_table(self):
        """The pure part: what is sent plus what closes it, for pieces of arguments."""
        cases = [
            (['{"a": 1, "b": [true, null]}'], '{"a": 1, "b": [true, null]}', ""),
            (['{"a":1,"b'], '{"a":1', "}"), (['{"a":1,'], '{"a":1', "}"),
            (['{"a":'], "{", "}"), (['{'], "{", "}"), ([''], "", "{}"),
            (['{"a":"x\\'], '{"a":"x', '"}'), (['{"a":[1,'], '{"a":[1', "]}"),
            (['{"a":-'], '{"a":-', "0}"), (['{"a":nu'], '{"a":nu', "ll}"),
            (['{"a":{"b":1,"c'], '{"a":{"b":1', "}}"), (['{"a":1}{"b":2}'], '{"a":1}', ""),
            (['{"a":1,}'], '{"a":1', "}"), (['{"a":01}'], '{"a":0', "}"),
            (['{"a":"\n"}'], '{"a":"\\n"}', ""), (['{"', 'a"', ': ', '"b"}'], '{"a": "b"}', ""),
            (['[1]'], "", None), (['"x"'], "", None),
        ]
        for pieces, sent, tail in cases:
            with self.subTest(pieces=pieces):
                stream = ccproxy.JsonObjectStream()
                self.assertEqual("".join(stream.feed(p) for p in pieces), sent)
                self.assertEqual(stream.close(), tail)

    def test_every_cut_of_arguments_is_completed_to_an_object(self):
        doc = ('{"file_path": "/tmp/a b.txt", "content": "l1\\nl2 \\u00e9 \\"q\\" \u4e2d", '
               '"n": [1, -2.5e3, 0.5E+2, true, false, null, {"k": {}}], "e": []}')
        reference = json.loads(doc)
        for cut in range(len(doc) + 1):
            stream = ccproxy.JsonObjectStream()
            value = json.loads(stream.feed(doc[:cut]) + stream.close())
            self.assertIsInstance(value, dict, cut)
            for step in (1, 3, 7):
                pieces = [doc[:cut]] + [doc[i:i + step] for i in range(cut, len(doc), step)]
                stream = ccproxy.JsonObjectStream()
                sent = "".join(stream.feed(p) for p in pieces)
                self.assertEqual(json.loads(sent + stream.close()), reference, (cut, step))

    def test_random_tool_streams_keep_every_call_and_all_text(self):
        """Seeded property: calls of random input, cut into random pieces, numbered in
        each way servers number them, mixed with text, and the SSE bytes cut anywhere:
        every call arrives whole, in order, and the text arrives in full."""
        for seed in range(200):
            rng = random.Random(seed)
            chunks, calls, text = self.random_tool_stream(rng)
            raw = ("".join(chunk(c) for c in chunks) + chunk(finish="tool_calls") +
                   "data: [DONE]\n\n")
            n = len(raw.encode())
            cuts = sorted(rng.sample(range(1, n), rng.randint(1, min(30, n - 1))))
            with self.subTest(seed=seed):
                got = summary(self, run_stream(raw, cuts=cuts))
                self.assertEqual([g for g in got if g[0] != "text"], calls)
                self.assertEqual("".join(g[1] for g in got if g[0] == "text"), text)

    @staticmethod
    def random_tool_stream(rng):
        style = rng.choice(["index", "zero", "none"])
        chunks, calls, text = [], [], ""
        for n in range(rng.randint(1, 4)):
            value = {"k%d" % i: random_json(rng, 2) for i in range(rng.randint(0, 4))}
            args = json.dumps(value, ensure_ascii=rng.random() < .5)
            cuts = sorted(rng.sample(range(1, len(args)), min(len(args) - 1, rng.randint(0, 6))))
            pieces = [args[a:b] for a, b in zip([0] + cuts, cuts + [len(args)])]
            name = rng.choice(["Bash", "Read", "mcp__x__y"])
            calls.append((name, value))
            for j, piece in enumerate(pieces):
                first = j == 0
                index = {"index": n, "zero": 0, "none": None}[style]
                call = tc(index, ("call_%d" % n) if first and style != "none" else None,
                          name if first else None, piece)
                delta = {"tool_calls": [call]}
                if rng.random() < 0.3:
                    words = rng.choice(["ok ", "\u00e9\u4e2d ", "\U0001F600 ", "\n"])
                    delta["content"], text = words, text + words
                chunks.append(delta)
        return chunks, calls, text


def claude_code_body(name="01-first-turn.request.json"):
    """A captured Claude Code body from ../shared, or None where it is absent."""
    path = os.path.join(SAMPLES, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["body"]


CACHED_BODY = dict(BODY, stream=False, system=[
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
    {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "Long instructions. " * 50, "cache_control": {"type": "ephemeral"}}],
    messages=[user("first"), assistant([{"type": "tool_use", "id": "t1", "name": "Read",
                                         "input": {}}]),
              user([{"type": "tool_result", "tool_use_id": "t1", "content": "file text",
                     "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "go on", "cache_control": {"type": "ephemeral"}}])])


def count_markers(doc):
    return json.dumps(doc).count('"cache_control"')


class TestWhatClaudeCodeSends(unittest.TestCase):
    """Issue #20: effort levels, deferred tools, prompt caching, gzip bodies, auto mode's
    safeguards and thinking from another family, as Claude Code 2.1.332 sends them."""

    def test_effort_levels_reach_routes_that_take_them(self):
        cases = [  # (type, model, client effort, sent)
            ("openai", "gpt-5.2", "xhigh", "xhigh"), ("openai", "gpt-5.2", "max", "xhigh"),
            ("openai", "gpt-5.1-codex-max", "xhigh", "xhigh"),
            ("openai", "gpt-5", "xhigh", "high"), ("openai", "o3", "max", "high"),
            ("openai", "gpt-5", "low", "low"), ("gemini", "gemini-2.5-pro", "xhigh", "high"),
            ("groq", "openai/gpt-oss-120b", "max", "high"),
            ("azure", "gpt-5.2", "xhigh", "xhigh")]
        for ptype, model, effort, sent in cases:
            with self.subTest(ptype=ptype, model=model, effort=effort):
                out, _ = to_openai({"messages": [user("hi")], "thinking": {"type": "adaptive"},
                                    "output_config": {"effort": effort}}, ptype, model)
                self.assertEqual(out["reasoning_effort"], sent)
        out, _ = to_openai({"messages": [user("hi")], "thinking": {"type": "adaptive"},
                            "output_config": {"effort": "max"}}, "openrouter", "openai/o3")
        self.assertEqual(out["reasoning"], {"effort": "xhigh"})
        # A route's own list, from the config's quirks.
        out, _ = to_openai({"messages": [user("hi")], "thinking": {"type": "adaptive"},
                            "output_config": {"effort": "max"}}, "openai-compatible", "m",
                           reasoning="reasoning_effort", efforts="low,high,max")
        self.assertEqual(out["reasoning_effort"], "max")
        for effort, quirks, expected in (("medium", {"efforts": "low,high"}, "low"),
                                         ("low", {"efforts": "medium,high"}, "medium"),
                                         ("bogus", {}, "high")):
            q = dict(ccproxy.QUIRK_DEFAULTS, **quirks)
            self.assertEqual(ccproxy.route_effort(effort, q, "m"), expected)

    def test_deferred_tools_are_callable_only_once_loaded(self):
        tools = [{"name": "Read", "input_schema": {"type": "object"}},
                 {"name": "WebFetch", "input_schema": {"type": "object"}, "defer_loading": True},
                 {"name": "DeferredToolPlaceholder", "description": "never call this tool",
                  "input_schema": {"type": "object"}, "defer_loading": True}]
        names = lambda out: [t["function"]["name"] for t in out.get("tools", [])]  # noqa
        out, _ = to_openai({"messages": [user("hi")], "tools": tools})
        self.assertEqual(names(out), ["Read"])
        loaded = [user("find"), assistant([{"type": "tool_use", "id": "s", "name": "ToolSearch",
                                            "input": {"query": "select:WebFetch"}}]),
                  user([{"type": "tool_result", "tool_use_id": "s", "content": [
                      {"type": "tool_reference", "tool_name": "WebFetch"}]}])]
        out, tr = to_openai({"messages": loaded, "tools": tools})
        self.assertEqual(names(out), ["Read", "WebFetch"])
        body, _ = ccproxy.translated_request(dict(BODY, messages=loaded, tools=tools), tr)
        self.assertEqual([t["function"]["name"] for t in json.loads(body)["tools"]],
                         ["Read", "WebFetch"])
        sample = claude_code_body("08-toolsearch-tool-reference.request.json")
        if sample is not None:         # the real capture: WebFetch loaded, the placeholder not
            offered = names(ccproxy.anthropic_to_openai(sample, translation()))
            self.assertIn("WebFetch", offered)
            self.assertNotIn("DeferredToolPlaceholder", offered)

    def test_cache_markers_go_on_the_blocks_claude_code_marked(self):
        out, _ = to_openai(CACHED_BODY, "openrouter", "anthropic/claude-sonnet-4.5")
        system, tool, last = out["messages"][0], out["messages"][3], out["messages"][4]
        self.assertEqual([("cache_control" in p) for p in system["content"]], [True, True])
        self.assertNotIn("billing", json.dumps(system))
        self.assertEqual(tool["content"][0]["cache_control"], {"type": "ephemeral"})
        self.assertEqual(last["content"][-1]["cache_control"], {"type": "ephemeral"})
        self.assertEqual(count_markers(out), 4)
        for ptype, model in (("openrouter", "openai/gpt-5"), ("openai", "gpt-5"),
                             ("deepseek", "deepseek-chat")):
            with self.subTest(ptype=ptype, model=model):
                out, _ = to_openai(CACHED_BODY, ptype, model)
                self.assertEqual(count_markers(out), 0)
                self.assertIsInstance(out["messages"][0]["content"], str)
        # More markers than Anthropic takes: the first and the newest three are kept.
        many = dict(CACHED_BODY, messages=CACHED_BODY["messages"] + [
            assistant("ok"), user([{"type": "text", "text": "again",
                                    "cache_control": {"type": "ephemeral"}}])])
        out, _ = to_openai(many, "openrouter", "anthropic/claude-sonnet-4.5")
        self.assertEqual(count_markers(out), 4)
        self.assertIn("cache_control", out["messages"][0]["content"][0])
        self.assertIn("cache_control", out["messages"][-1]["content"][-1])
        self.assertNotIn("cache_control", out["messages"][0]["content"][1])
        # Any route can take them, from the config (DashScope's OpenAI mode does).
        out, _ = to_openai(CACHED_BODY, "openai-compatible", "qwen3-coder-plus",
                           cache_control=True)
        self.assertEqual(count_markers(out), 4)

    def test_cache_usage_of_every_preset_shape(self):
        cases = [({"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 600}},
                  (400, 600, 0)),                                   # OpenAI, Groq, Gemini
                 ({"prompt_tokens": 1000, "prompt_cache_hit_tokens": 700}, (300, 700, 0)),
                 ({"prompt_tokens": 1000, "prompt_tokens_details": {
                     "cached_tokens": 100, "cache_write_tokens": 800}}, (100, 100, 800)),
                 ({"prompt_tokens": 1000, "prompt_tokens_details": {
                     "cached_tokens": 0, "cache_creation_input_tokens": 900}}, (100, 0, 900)),
                 ({"prompt_tokens": 10}, (10, 0, 0))]
        for usage, (fresh, read, write) in cases:
            with self.subTest(usage=usage):
                got = ccproxy.anthropic_usage(usage, 5, 1)
                self.assertEqual((got["input_tokens"], got["cache_read_input_tokens"],
                                  got["cache_creation_input_tokens"]), (fresh, read, write))

    def test_session_id_and_the_prompt_cache_key(self):
        sid = "c9aa74cb-cbc4-4854-9fce-273652089b3f"
        meta = {"metadata": {"user_id": json.dumps({"device_id": "d", "session_id": sid})}}
        self.assertEqual(ccproxy.session_id(headers_of([("X-Claude-Code-Session-Id", sid)]),
                                            {}), sid)
        self.assertEqual(ccproxy.session_id(headers_of([]), meta), sid)
        for body in ({}, {"metadata": {"user_id": "plain"}}, {"metadata": 5}):
            self.assertEqual(ccproxy.session_id(headers_of([]), body), "")
        key = ccproxy.prompt_cache_key(sid)
        self.assertRegex(key, r"^ccp-[0-9a-f]{32}$")
        self.assertNotIn(sid[:8], key)
        self.assertNotEqual(key, ccproxy.prompt_cache_key(sid + "x"))

    def test_gemini_gets_the_sentinel_for_calls_another_family_made(self):
        history = {"messages": [user("go"), assistant([
            {"type": "thinking", "thinking": "t", "signature": "EqQBCkYIBxgCKkB..."},
            {"type": "tool_use", "id": "toolu_01", "name": "Read", "input": {}}]),
            user([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "x"}])]}
        out, _ = to_openai(history, "gemini", "gemini-3-pro-preview")
        call = out["messages"][1]["tool_calls"][0]
        self.assertEqual(call["extra_content"]["google"]["thought_signature"],
                         "skip_thought_signature_validator")
        self.assertNotIn("EqQB", json.dumps(out))     # Anthropic's signature never goes
        out, _ = to_openai(history, "gemini", "gemini-2.5-pro")
        self.assertNotIn("extra_content", out["messages"][1]["tool_calls"][0])

    def test_decode_body_table(self):
        doc = json.dumps(BODY).encode()
        deflated, gzipped = zlib.compress(doc), self.gzip(doc)
        ok = [(doc, None), (doc, "identity"), (gzipped, "gzip"), (gzipped, " GZIP "),
              (gzipped, "x-gzip"), (deflated, "deflate"),
              (self.gzip(doc[:10]) + self.gzip(doc[10:]), "gzip")]     # two members
        for raw, coding in ok:
            with self.subTest(coding=coding):
                self.assertEqual(ccproxy.decode_body(raw, coding, 1 << 20), doc)
        bad = [(gzipped, "br", 415), (gzipped[:-9], "gzip", 400), (b"junk", "gzip", 400),
               (self.gzip(b"\0" * 3_000_000), "gzip", 413)]
        for raw, coding, status in bad:
            with self.subTest(coding=coding, status=status):
                with self.assertRaises(ccproxy.HTTPError) as caught:
                    ccproxy.decode_body(raw, coding, 1 << 20)
                self.assertEqual(caught.exception.status, status)

    @staticmethod
    def gzip(data):
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        return packer.compress(data) + packer.flush()

    def test_gzipped_bodies_end_to_end(self):
        body = claude_code_body() or dict(BODY, system=[{"type": "text", "text": "x" * 5000}])
        raw = json.dumps(body).encode()
        stream = chunk({"content": "hi"}) + chunk(finish="stop") + "data: [DONE]\n\n"
        for make, behave in ((one_provider, None),
                             (lambda url: openai_provider(url), sse_behave(stream))):
            with FakeUpstream(behave) as up, Proxy(make(up.url)) as px:
                resp, out = px.call("POST", "/v1/messages", self.gzip(raw), {
                    "Content-Encoding": "gzip", "Content-Type": "application/json"})
                self.assertEqual(resp.status, 200, out)
                sent = up.requests[0]
                self.assertIsNone(sent["headers"]["content-encoding"])
                if make is one_provider:
                    self.assertEqual(sent["body"], raw)       # byte for byte, inflated
                else:
                    self.assertEqual(json.loads(sent["body"])["model"], "gpt-4o")
        # A 1 KB body that inflates past max_body_bytes: 413, and nothing goes upstream.
        bomb = self.gzip(b" " * (2 << 20))
        self.assertLess(len(bomb), 4096)
        with FakeUpstream() as up, Proxy(dataclasses.replace(
                one_provider(up.url), max_body_bytes=1 << 20)) as px:
            resp, out = px.call("POST", "/v1/messages", bomb, {"Content-Encoding": "gzip"})
            self.assertEqual(resp.status, 413)
            self.assertEqual(json.loads(out)["error"]["type"], "request_too_large")
            self.assertEqual(up.requests, [])

    def test_auto_mode_safeguards_pass_through_untouched(self):
        """On pass-through, `safeguards` in the request and `safeguard_results` in
        message_delta are Anthropic's own: both go through byte for byte."""
        body = dict(BODY, stream=True, safeguards={"type": "auto_mode", "version": "x"})
        raw = json.dumps(body).encode()
        delta = sse("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": "end_turn"}, "usage": {"output_tokens": 1},
            "safeguard_results": [{"type": "classifier", "decision": "allow"}]})
        frames = STREAM[:4] + [delta, STREAM[-1]]

        def behave(h, got):
            h.start_stream()
            for frame in frames:
                h.chunk(frame)
            h.chunk(b"")
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            resp, out = px.call("POST", "/v1/messages", raw, {"x-api-key": "k"})
            self.assertEqual(resp.status, 200)
            self.assertEqual(up.requests[0]["body"], raw)
            self.assertEqual(out, b"".join(frames))

    def test_prompt_caching_end_to_end(self):
        """A fake OpenRouter that rejects more than four markers as Anthropic does and
        counts what it receives; a fake OpenAI that records prompt_cache_key."""
        seen = []

        def openrouter(h, body):
            doc = json.loads(body)
            seen.append(count_markers(doc["messages"]))
            if seen[-1] > 4:
                return h.reply(400, {"error": {"message": "A maximum of 4 blocks with "
                                               "cache_control may be provided."}})
            h.reply(200, {"id": "gen-1", "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "ok"}}],
                          "usage": {"prompt_tokens": 3000, "completion_tokens": 2,
                                    "prompt_tokens_details": {"cached_tokens": 2000,
                                                              "cache_write_tokens": 900}}})
        body = claude_code_body() or CACHED_BODY
        body = dict(body, stream=False)
        client_markers = count_markers(body.get("system")) + count_markers(body["messages"])
        with FakeUpstream(openrouter) as up, Proxy(openai_provider(
                up.url, "openrouter", model="anthropic/claude-sonnet-4.5")) as px:
            resp, out = px.call("POST", "/v1/messages", body)
            self.assertEqual(resp.status, 200, out)
            self.assertEqual(seen, [client_markers])
            usage = json.loads(out)["usage"]
            self.assertEqual((usage["cache_read_input_tokens"],
                              usage["cache_creation_input_tokens"], usage["input_tokens"]),
                             (2000, 900, 100))
        keys = []

        def openai(h, got):
            keys.append(json.loads(got).get("prompt_cache_key"))
            h.reply(200, reply({"content": "ok"}))
        with FakeUpstream(openai) as up, Proxy(openai_provider(up.url)) as px:
            for session in ("s-one", "s-one", "s-two"):
                resp, _ = px.call("POST", "/v1/messages", BODY,
                                  {"X-Claude-Code-Session-Id": session})
                self.assertEqual(resp.status, 200)
        self.assertEqual(keys[0], keys[1])
        self.assertNotEqual(keys[0], keys[2])
        self.assertFalse(any("s-one" in k or "s-two" in k for k in keys))


def e2e_module(name):
    """One of the fakes in e2e/ (they serve the suite and `make e2e` alike)."""
    sys.path.insert(0, os.path.join(HERE, "e2e"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(os.path.join(HERE, "e2e"))


def vendor_fake(vendor, **kw):
    """e2e/fake_anthropic.py as a vendor's endpoint: strict the way that vendor is."""
    kw.setdefault("key", "sk-vendor")
    return e2e_module("fake_anthropic").FakeAnthropic(vendor=vendor, **kw)


def vendor_config(ptype, url, **quirks):
    return config(providers=(ccproxy.ProviderConfig(
        name="v", type=ptype, base_url=url, api_key="sk-vendor", model="vendor-model",
        quirks=tuple(quirks.items())),))


#: What Claude Code 2.1.332 sends that vendors trip on: adaptive thinking with an effort,
#: its own fields, betas, a cache ttl.
VENDOR_BODY = dict(BODY, stream=True, thinking={"type": "adaptive", "display": "omitted"},
                   output_config={"effort": "high"}, safeguards={"type": "auto_mode"},
                   context_management={"edits": [{"type": "clear_thinking_20251015"}]},
                   max_tokens=32000, system=[{"type": "text", "text": "sys", "cache_control": {
                       "type": "ephemeral", "ttl": "1h"}}])
VENDOR_HEADERS = {"x-api-key": "client-key", "anthropic-version": "2023-06-01",
                  "anthropic-beta": "claude-code-20250219,context-management-2025-06-27"}


class TestAnthropicCompatibleVendors(unittest.TestCase):
    """Issue #22: vendors' Anthropic-compatible endpoints, each with the rewrites its
    quirk flags say; the request only, and only where a flag applies."""

    def test_vendor_body_per_preset(self):
        def body_for(ptype, body=VENDOR_BODY):
            quirks = ccproxy.quirks_for(ccproxy.ProviderConfig(name="v", type=ptype))
            return ccproxy.vendor_body(body, quirks, "m")
        out, changed = body_for("kimi")
        self.assertTrue(changed)
        self.assertEqual(out["thinking"], {"type": "enabled", "budget_tokens": 16384})
        self.assertNotIn("context_management", out)
        self.assertNotIn("safeguards", out)
        self.assertEqual(out["model"], "m")
        self.assertEqual(VENDOR_BODY["thinking"]["type"], "adaptive")   # not changed in place
        out, _ = body_for("glm", dict(VENDOR_BODY, max_tokens=None))
        self.assertEqual(out["max_tokens"], 32000)
        out, _ = body_for("glm", dict(VENDOR_BODY, max_tokens=200000))
        self.assertEqual(out["max_tokens"], 131072)
        self.assertEqual(out["thinking"], VENDOR_BODY["thinking"])           # GLM takes it
        for effort, budget in (("low", 2048), ("max", 31999)):
            out, _ = body_for("minimax", dict(VENDOR_BODY, output_config={"effort": effort}))
            self.assertEqual(out["thinking"], {"type": "enabled", "budget_tokens": budget})
        out, _ = body_for("dashscope", dict(VENDOR_BODY, max_tokens=800))
        self.assertEqual(out["thinking"], {"type": "disabled"})    # no room for a budget
        history = [user("go"), assistant([{"type": "tool_use", "id": "t", "name": "B",
                                           "input": {}}]),
                   user([{"type": "tool_result", "tool_use_id": "t", "content": "x"}])]
        out, _ = body_for("kimi", dict(VENDOR_BODY, messages=history))
        self.assertEqual(out["thinking"], {"type": "disabled"})
        quirks = dict(ccproxy.QUIRK_DEFAULTS, strip_cache_ttl=True)
        out, changed = ccproxy.vendor_body(VENDOR_BODY, quirks, "")
        self.assertEqual(out["system"][0]["cache_control"], {"type": "ephemeral"})
        self.assertEqual(VENDOR_BODY["system"][0]["cache_control"]["ttl"], "1h")
        out, changed = ccproxy.vendor_body(BODY, dict(ccproxy.QUIRK_DEFAULTS), "")
        self.assertFalse(changed)

    def test_kept_betas(self):
        value = "claude-code-20250219,interleaved-thinking-2025-05-14, effort-2025-11-24"
        for allowed, expected in (("*", value), ("", ""),
                                  ("interleaved-thinking-2025-05-14,x",
                                   "interleaved-thinking-2025-05-14"),
                                  ("effort-2025-11-24", "effort-2025-11-24")):
            self.assertEqual(ccproxy.kept_betas(value, allowed), expected)
        self.assertEqual(ccproxy.kept_betas(None, ""), "")

    def test_each_vendor_end_to_end_with_claude_codes_body(self):
        body = claude_code_body() or VENDOR_BODY
        body = dict(body, stream=False)
        for ptype, vendor in (("kimi", "kimi"), ("glm", "glm"), ("minimax", "minimax"),
                              ("dashscope", "dashscope"), ("deepseek-anthropic", "deepseek")):
            with self.subTest(ptype=ptype), vendor_fake(vendor) as fake, Proxy(vendor_config(
                    ptype, fake.url)) as px:
                sent = dict(body, max_tokens=None) if ptype == "glm" else body
                resp, out = px.call("POST", "/v1/messages?beta=true", json.dumps(
                    {k: v for k, v in sent.items() if v is not None}).encode(),
                    dict(VENDOR_HEADERS, **{"Content-Type": "application/json"}))
                self.assertEqual(resp.status, 200, out)
                got = dict((k.lower(), v) for k, v in fake.requests[0]["headers"])
                self.assertEqual(got["x-api-key"], "sk-vendor")
                self.assertNotIn("anthropic-beta", got)
                self.assertEqual(json.loads(out)["model"], body["model"])
        # The same body to the same strict fake through plain pass-through: refused.
        with vendor_fake("kimi") as fake, Proxy(vendor_config("anthropic", fake.url)) as px:
            resp, out = px.call("POST", "/v1/messages", dict(VENDOR_BODY, stream=False),
                                VENDOR_HEADERS)
            self.assertEqual(resp.status, 400, out)

    def test_a_vendor_never_gets_the_clients_key_and_bytes_pass_untouched(self):
        raw = json.dumps(dict(BODY, messages=[user("é \ud83d\ude00")]), indent=1).encode()
        with vendor_fake("deepseek") as fake, Proxy(config(providers=(ccproxy.ProviderConfig(
                name="v", type="anthropic-compatible", base_url=fake.url, api_key="sk-vendor",
                quirks=(("betas", ""),)),))) as px:
            resp, out = px.call("POST", "/v1/messages", raw, {"x-api-key": "client-key",
                                                              "anthropic-version": "2023-06-01"})
            self.assertEqual(resp.status, 200, out)
        self.assertEqual(fake.requests[0]["raw"], raw)          # not re-serialised
        # Keyless (a local server): nothing of the client's goes either.
        with vendor_fake("deepseek") as fake, Proxy(config(providers=(ccproxy.ProviderConfig(
                name="v", type="anthropic-compatible", base_url=fake.url),))) as px:
            resp, out = px.call("POST", "/v1/messages", BODY, {"x-api-key": "client-key",
                                                               "anthropic-version": "1"})
            self.assertEqual(resp.status, 401, out)


def token_command(directory, tokens=("tok-1",)):
    """A token_command (run without a shell) that prints the next of `tokens` each time
    and counts its runs in DIR/runs."""
    script = os.path.join(directory, "token.py")
    with open(script, "w") as f:
        f.write("import os, sys\np = os.path.join(%r, 'runs')\n"
                "n = int(open(p).read()) if os.path.exists(p) else 0\n"
                "open(p, 'w').write(str(n + 1))\nprint(%r[min(n, %d)])\n"
                % (directory, list(tokens), len(tokens) - 1))
    return (sys.executable, script)


def runs(directory):
    path = os.path.join(directory, "runs")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(f.read())


def vertex_config(url, command, **kw):
    return config(providers=(ccproxy.ProviderConfig(
        name="vx", type="vertex", base_url=url, project="proj", region="us-east5",
        token_command=command, model="claude-sonnet-4-5@20250929", **kw),))


class TestVertex(unittest.TestCase):
    """Issue #22: Claude on Vertex AI, the model in the URL, an OAuth token."""

    def test_config(self):
        ok = ccproxy.build_config({"providers": [{"type": "vertex", "project": "p",
                                                  "region": "europe-west1"}]}, {}, {})
        self.assertEqual(ok.providers[0].base_url, "https://europe-west1-aiplatform.googleapis.com")
        ok = ccproxy.build_config({"providers": [{"type": "vertex"}]}, {
            "ANTHROPIC_VERTEX_PROJECT_ID": "p", "CLOUD_ML_REGION": "global"}, {})
        self.assertEqual((ok.providers[0].project, ok.providers[0].base_url),
                         ("p", "https://aiplatform.googleapis.com"))
        for entry, words in (({"type": "vertex", "region": "us-east5"}, "project is required"),
                             ({"type": "vertex", "project": "p"}, "CLOUD_ML_REGION"),
                             ({"type": "vertex", "project": "p", "region": "us east"},
                              "region must be"),
                             ({"type": "vertex", "project": "p", "region": "r",
                               "token_command": "gcloud auth"}, "list of arguments")):
            with self.subTest(entry=entry), self.assertRaises(ccproxy.ConfigError) as caught:
                ccproxy.build_config({"providers": [entry]}, {}, {})
            self.assertIn(words, str(caught.exception))

    def test_url_and_body(self):
        p = ccproxy.ProviderConfig(name="v", type="vertex", project="my proj", region="us-east5",
                                   base_url="https://us-east5-aiplatform.googleapis.com")
        self.assertEqual(ccproxy.vertex_url(p, "claude-sonnet-4-5@20250929", True),
                         "https://us-east5-aiplatform.googleapis.com/v1/projects/my%20proj/"
                         "locations/us-east5/publishers/anthropic/models/"
                         "claude-sonnet-4-5@20250929:streamRawPredict")
        self.assertTrue(ccproxy.vertex_url(p, "m", False).endswith("/models/m:rawPredict"))
        quirks = ccproxy.quirks_for(p)
        out = ccproxy.cloud_body(BODY, "m", "vertex-2023-10-16", quirks)
        self.assertEqual(out, dict({k: v for k, v in BODY.items() if k != "model"},
                                   anthropic_version="vertex-2023-10-16"))
        self.assertIn("model", BODY)
        out = ccproxy.cloud_body(dict(BODY, safeguards={}), "m", "vertex-2023-10-16", quirks)
        self.assertNotIn("safeguards", out)          # auto mode's classifier is Anthropic's

    def test_tokens_from_a_command_cached_and_renewed(self):
        with tempfile.TemporaryDirectory() as tmp:
            p = ccproxy.ProviderConfig(name="v", type="vertex",
                                       token_command=token_command(tmp, ("a", "b")))
            tokens = ccproxy.Tokens(environ={})
            self.assertEqual([tokens.get(p), tokens.get(p)], ["a", "a"])
            self.assertEqual(runs(tmp), 1)
            tokens.forget(p)
            self.assertEqual(tokens.get(p), "b")
            bad = dataclasses.replace(p, token_command=(sys.executable, "-c", "exit(3)"))
            with self.assertRaises(ccproxy.HTTPError) as caught:
                tokens.get(bad)
            self.assertEqual(caught.exception.status, 500)
            self.assertIn("no access token for provider v from token_command", str(caught.exception))

    def test_tokens_from_the_metadata_server(self):
        def behave(h, body):
            if h.headers.get("Metadata-Flavor") != "Google":
                return h.reply(403, {"error": "Missing Metadata-Flavor:Google header"})
            h.reply(200, {"access_token": "meta-tok", "expires_in": 3599,
                          "token_type": "Bearer"})
        with FakeUpstream(behave) as meta:
            tokens = ccproxy.Tokens(environ={"GCE_METADATA_HOST": "127.0.0.1:%d" % meta.port})
            p = ccproxy.ProviderConfig(name="v", type="vertex")
            self.assertEqual(tokens.get(p), "meta-tok")
            self.assertEqual(tokens.get(p), "meta-tok")
            self.assertEqual(len(meta.requests), 1)
            self.assertEqual(meta.requests[0]["path"], ccproxy.METADATA_TOKEN)

    def test_end_to_end_streamed_and_not_with_a_token_renewed_after_a_401(self):
        with tempfile.TemporaryDirectory() as tmp, vendor_fake(
                "", key="tok-2", vertex="proj/us-east5") as fake:
            command = token_command(tmp, ("tok-1", "tok-2"))
            with Proxy(vertex_config(fake.url, command)) as px:
                ccproxy.DIALECTS["vertex"].tokens.forget(px.service.config.providers[0])
                resp, out = px.call("POST", "/v1/messages?beta=true", BODY,
                                    {"x-api-key": "client-key", "anthropic-beta": "x"})
                self.assertEqual(resp.status, 200, out)
                self.assertEqual(json.loads(out)["model"], BODY["model"])
                self.assertEqual(len(fake.requests), 2)       # a 401, then the renewed token
                self.assertEqual(runs(tmp), 2)
                resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
                self.assertEqual(resp.status, 200, out)
                events = parse_events(out)
                self.assertEqual(events[0]["message"]["model"], BODY["model"])
                self.assertEqual(runs(tmp), 2)                  # the token was kept
            sent = fake.requests[-1]
            self.assertTrue(sent["path"].endswith(
                "/models/claude-sonnet-4-5@20250929:streamRawPredict"))
            headers = dict((k.lower(), v) for k, v in sent["headers"])
            self.assertNotIn("x-api-key", headers)
            self.assertEqual(fake.requests[0]["body"]["anthropic_version"], "vertex-2023-10-16")


def bedrock_fake(**kw):
    """e2e/fake_bedrock.py: it checks SigV4 and answers in AWS's event stream."""
    return e2e_module("fake_bedrock").FakeBedrock(**kw)


AWS_SUITE = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "")
AWS_SUITE_TIME = 1440938160          # 2015-08-30T12:36:00Z, the suite's date
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIDFAKE", "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_EC2_METADATA_DISABLED": "true"}


class TestBedrock(unittest.TestCase):
    """Issue #22: Claude on Amazon Bedrock: SigV4, the event stream, credentials."""

    def test_sigv4_against_awss_published_suite(self):
        for method, url, signature in (
                ("GET", "https://example.amazonaws.com/",
                 "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
                ("GET", "https://example.amazonaws.com/?Param2=value2&Param1=value1",
                 "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
                ("POST", "https://example.amazonaws.com/",
                 "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b")):
            with self.subTest(method=method, url=url):
                headers = ccproxy.sigv4_headers(method, url, [], b"", AWS_SUITE, "us-east-1",
                                                "service", AWS_SUITE_TIME)
                self.assertEqual(headers[0], ("x-amz-date", "20150830T123600Z"))
                self.assertEqual(headers[-1][1], "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"
                                 "20150830/us-east-1/service/aws4_request, SignedHeaders=host;"
                                 "x-amz-date, Signature=" + signature)
        with_token = ccproxy.sigv4_headers("GET", "https://example.amazonaws.com/", [], b"",
                                           AWS_SUITE[:2] + ("session",), "us-east-1",
                                           "service", AWS_SUITE_TIME)
        self.assertEqual(with_token[1], ("x-amz-security-token", "session"))
        self.assertIn("SignedHeaders=host;x-amz-date;x-amz-security-token", with_token[2][1])

    def test_a_model_ids_colon_is_signed_as_aws_does(self):
        p = ccproxy.ProviderConfig(name="b", type="bedrock", region="us-east-1",
                                   base_url="https://bedrock-runtime.us-east-1.amazonaws.com")
        url = ccproxy.bedrock_url(p, "us.anthropic.claude-sonnet-4-5-20250929-v1:0", True)
        self.assertTrue(url.endswith("/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/"
                                     "invoke-with-response-stream"))
        canonical = ccproxy.sigv4_canonical("POST", urllib.parse.urlsplit(url), [], b"")
        self.assertEqual(canonical.split("\n")[1], "/model/us.anthropic.claude-sonnet-4-5-"
                         "20250929-v1%253A0/invoke-with-response-stream")

    def test_event_stream_frames_cut_at_every_byte(self):
        fb = e2e_module("fake_bedrock")
        events = [{"type": "message_start", "message": {"model": "anthropic.x", "usage": {}}},
                  {"type": "content_block_delta", "index": 0, "delta": {
                      "type": "text_delta", "text": "h\u00e9\U0001F600"}},
                  {"type": "message_stop"}]
        data = b"".join(fb.chunk_frame(e) for e in events)
        expected = b"".join(ccproxy.sse_event(e["type"], e) for e in [
            dict(events[0], message=dict(events[0]["message"], model="claude-x"))] + events[1:])
        for cut in range(1, len(data)):
            parser, out = ccproxy.EventStreamParser(), b""
            for piece in (data[:cut], data[cut:]):
                out += b"".join(ccproxy.bedrock_event(h, p, "claude-x")
                                for h, p in parser.feed(piece))
            self.assertEqual(out, expected, cut)
            self.assertEqual(parser.buffer, b"")

    def test_event_stream_refuses_what_does_not_check_out(self):
        fb = e2e_module("fake_bedrock")
        good = fb.chunk_frame({"type": "ping"})
        for bad, words in ((good[:8] + b"\0\0\0\0" + good[12:], "prelude's CRC"),
                           (good[:-1] + bytes([good[-1] ^ 1]), "frame's CRC"),
                           (good[:20] + bytes([good[20] ^ 1]) + good[21:], "frame's CRC")):
            with self.subTest(words=words), self.assertRaises(ccproxy.EventStreamError) as e:
                ccproxy.EventStreamParser().feed(bad)
            self.assertIn(words, str(e.exception))
        throttled = fb.frame({":message-type": "exception", ":exception-type":
                              "throttlingException"}, b'{"message":"slow down"}')
        (headers, payload), = ccproxy.EventStreamParser().feed(throttled)
        with self.assertRaises(ccproxy.EventStreamError) as e:
            ccproxy.bedrock_event(headers, payload)
        self.assertEqual(e.exception.etype, "overloaded_error")
        self.assertIn("slow down", str(e.exception))

    def test_credentials_where_the_sdks_find_them(self):
        p = ccproxy.ProviderConfig(name="b", type="bedrock", region="us-east-1")
        creds = ccproxy.AwsCredentials(dict(FAKE_AWS, AWS_SESSION_TOKEN="t"))
        self.assertEqual(creds.get(p), ("AKIDFAKE", "secret", "t"))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "credentials")
            with open(path, "w") as f:
                f.write("[default]\naws_access_key_id = AKIDDEF\naws_secret_access_key = s1\n"
                        "[work]\naws_access_key_id = AKIDWORK\naws_secret_access_key = s2\n")
            env = {"AWS_SHARED_CREDENTIALS_FILE": path, "AWS_EC2_METADATA_DISABLED": "true"}
            self.assertEqual(ccproxy.AwsCredentials(env).get(p), ("AKIDDEF", "s1", ""))
            named = dataclasses.replace(p, aws_profile="work")
            self.assertEqual(ccproxy.AwsCredentials(dict(env, **FAKE_AWS)).get(named),
                             ("AKIDWORK", "s2", ""))        # a named profile wins
            with self.assertRaises(ccproxy.HTTPError) as e:
                ccproxy.AwsCredentials(dict(env, AWS_SHARED_CREDENTIALS_FILE=tmp + "/none")
                                       ).get(p)
            self.assertIn("no AWS credentials for provider b", str(e.exception))

    def test_credentials_from_the_container_and_instance_endpoints(self):
        doc = {"AccessKeyId": "ASIACONT", "SecretAccessKey": "s", "Token": "tok",
               "Expiration": "2099-01-01T00:00:00Z"}

        def behave(h, body):
            if h.command == "PUT":
                return h.reply(200, b"imds-token")
            if h.path.endswith("/security-credentials/"):
                return h.reply(200, b"my-role")
            ok = h.headers.get("Authorization") == "ctoken" or h.headers.get(
                "X-aws-ec2-metadata-token") == "imds-token"
            h.reply(200 if ok else 401, doc)
        p = ccproxy.ProviderConfig(name="b", type="bedrock", region="us-east-1")
        with FakeUpstream(behave) as meta, tempfile.TemporaryDirectory() as tmp:
            base = {"AWS_SHARED_CREDENTIALS_FILE": tmp + "/none"}
            container = ccproxy.AwsCredentials(dict(base, AWS_CONTAINER_CREDENTIALS_FULL_URI=(
                meta.url + "/creds"), AWS_CONTAINER_AUTHORIZATION_TOKEN="ctoken"))
            self.assertEqual(container.get(p), ("ASIACONT", "s", "tok"))
            meta.server.RequestHandlerClass.do_PUT = meta.server.RequestHandlerClass.do_POST
            instance = ccproxy.AwsCredentials(dict(
                base, AWS_EC2_METADATA_SERVICE_ENDPOINT=meta.url))
            self.assertEqual(instance.get(p), ("ASIACONT", "s", "tok"))
            self.assertEqual([r["path"] for r in meta.requests][-3:], [
                "/latest/api/token", "/latest/meta-data/iam/security-credentials/",
                "/latest/meta-data/iam/security-credentials/my-role"])

    def bedrock(self, fake, **kw):
        return config(providers=(ccproxy.ProviderConfig(
            name="bd", type="bedrock", region="us-east-1", base_url=fake.url,
            model="anthropic.claude-sonnet-4-5-20250929-v1:0", **kw),))

    def test_end_to_end_signed_streamed_and_not(self):
        fake = bedrock_fake()
        with fake, unittest.mock.patch.object(ccproxy.DIALECTS["bedrock"], "credentials",
                                              ccproxy.AwsCredentials(FAKE_AWS)), \
                Proxy(self.bedrock(fake)) as px:
            resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True), {
                "anthropic-beta": "interleaved-thinking-2025-05-14,claude-code-20250219"})
            self.assertEqual(resp.status, 200, out)
            self.assertEqual(resp.getheader("Content-Type"), "text/event-stream; charset=utf-8")
            events = parse_events(out)         # Anthropic's own events, relayed
            self.assertEqual([e["type"] for e in events], [
                "message_start", "ping", "content_block_start", "content_block_delta",
                "content_block_stop", "message_delta", "message_stop"])
            self.assertEqual(events[3]["delta"]["text"], "Hello from the fake Anthropic server!")
            self.assertEqual(events[0]["message"]["model"], BODY["model"])
            self.assertEqual(fake.requests[0]["body"]["anthropic_beta"],
                             ["interleaved-thinking-2025-05-14"])
            resp, out = px.call("POST", "/v1/messages", BODY)
            self.assertEqual((resp.status, json.loads(out)["model"]), (200, BODY["model"]))
            self.assertEqual([r["path"].rsplit("/", 1)[1] for r in fake.requests],
                             ["invoke-with-response-stream", "invoke"])

    def test_a_bedrock_api_key_and_bedrocks_errors(self):
        fake = bedrock_fake(api_key="ABSKkey")
        with fake, Proxy(self.bedrock(fake, api_key="ABSKkey")) as px:
            resp, out = px.call("POST", "/v1/messages", BODY)
            self.assertEqual(resp.status, 200, out)
        fake = bedrock_fake(api_key="ABSKkey")
        with fake, Proxy(self.bedrock(fake, api_key="wrong")) as px:
            resp, out = px.call("POST", "/v1/messages", BODY)
            self.assertEqual((resp.status, json.loads(out)["error"]["type"]),
                             (403, "permission_error"))
            self.assertIn("signature we calculated", json.loads(out)["error"]["message"])
        for fail, status, etype in (("throttle", 429, "rate_limit_error"),):
            fake = bedrock_fake(api_key="k", fail=fail)
            with fake, Proxy(self.bedrock(fake, api_key="k")) as px:
                resp, out = px.call("POST", "/v1/messages", BODY)
                self.assertEqual((resp.status, json.loads(out)["error"]["type"]), (status, etype))
        fake = bedrock_fake(api_key="k", fail="midstream")
        with fake, Proxy(self.bedrock(fake, api_key="k")) as px:
            resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
            events = parse_events(out)
            self.assertEqual((events[-1]["type"], events[-1]["error"]["type"]),
                             ("error", "overloaded_error"))


VLLM_OUTPUT = ("'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's "
               "maximum context length is 32768 tokens and your request has 17459 input tokens."
               " (parameter=max_tokens, value=32000)")


def window_upstream(window, style, counted=None):
    """A fake OpenAI-compatible server that enforces a context window the way vLLM
    (style "vllm": max_tokens too large is a 400 naming both numbers) or llama.cpp
    ("llama": an input past n_ctx is exceed_context_size_error) does.  It counts input
    as a quarter of the body's bytes, and says so in usage, as ccproxy's calibration
    expects of a real server."""
    def behave(h, body):
        if h.command == "GET":
            return h.reply(200, {"data": [{"id": "my-model", "object": "model"}]})
        doc, used = json.loads(body), len(body) // 4
        asked = doc.get("max_tokens") or 0
        if counted is not None:
            counted.append((used, asked))
        if style == "llama" and used > window:
            return h.reply(400, {"error": {"code": 400, "message": "the request exceeds the "
                                           "available context size, try increasing it",
                                           "type": "exceed_context_size_error",
                                           "n_prompt_tokens": used, "n_ctx": window}})
        if style == "vllm" and used + asked > window:
            return h.reply(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                 "message": "'max_tokens' or 'max_completion_tokens' is too "
                                 "large: %d. This model's maximum context length is %d tokens "
                                 "and your request has %d input tokens." % (asked, window, used)})
        h.reply(200, reply({"content": "fits"}, usage={"prompt_tokens": used,
                                                       "completion_tokens": 2}))
    return behave


def responses_fake(scenario="tool"):
    return e2e_module("fake_responses").FakeResponses(scenario)


def responses_shapes(scenario="tool"):
    """The fake's answers and checks without its server (closed at once)."""
    fake = responses_fake(scenario)
    fake.server.server_close()
    return fake


def responses_config(url, model="gpt-5-codex", ptype="openai-responses"):
    return config(providers=(ccproxy.ProviderConfig(
        name="oai", type=ptype, base_url=url, api_key="sk-up", model=model),))


def to_responses(body, model="gpt-5-codex", session="", **quirks):
    tr = translation("openai-responses", model, **quirks)
    tr.session = session
    body = dict({"model": "claude-sonnet-5-5", "max_tokens": 100}, **body)
    data, stream = ccproxy.responses_request(body, tr)
    return json.loads(data), tr


def responses_sse(events):
    return "".join("event: %s\ndata: %s\n\n" % (e["type"], json.dumps(e)) for e in events)


def run_responses_stream(text, tr, cuts=None):
    return run_stream(text, tr, cuts, ccproxy.ResponsesStreamTranslator)


class TestResponsesAPI(unittest.TestCase):
    """Issue #23: OpenAI's Responses API as a translated upstream."""

    def fake_stream(self, scenario="tool", body=None):
        """The fake's own event sequence for one call, as the real API orders it."""
        fake = responses_shapes(scenario)
        body = body or {"model": "gpt-5-codex", "input": [], "tools": [{"name": "Bash"}]}
        events = [{"type": "response.created", "response": {}}]
        for index, item in enumerate(fake.output(body, 1)):
            events.extend(fake.item_events(index, item))
        events.append({"type": "response.completed", "response": fake.response(
            body, 1, fake.output(body, 1))})
        return events, fake.output(body, 1)

    def test_request_shape(self):
        body, tr = to_responses({
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [user([{"type": "text", "text": "look"}, {"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]),
                         assistant([{"type": "text", "text": "ok"}, {
                             "type": "tool_use", "id": "toolu_1", "name": "Bash",
                             "input": {"command": "ls"}}]),
                         user([{"type": "tool_result", "tool_use_id": "toolu_1",
                                "content": "a.txt"}, {"type": "text", "text": "go on"}])],
            "tools": [{"name": "Bash", "description": "run", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "Bash"}, "max_tokens": 8,
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
            "stream": True}, session="sess-1")
        self.assertEqual(body["instructions"], "be brief")
        self.assertEqual(body["input"], [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
                 "detail": "auto"}]},
            {"type": "message", "role": "assistant", "content": "ok"},
            {"type": "function_call", "call_id": "toolu_1", "name": "Bash",
             "arguments": '{"command":"ls"}'},
            {"type": "function_call_output", "call_id": "toolu_1", "output": "a.txt"},
            {"type": "message", "role": "user", "content": "go on"}])
        self.assertEqual(body["tools"], [{"type": "function", "name": "Bash",
                                          "description": "run", "strict": False,
                                          "parameters": body["tools"][0]["parameters"]}])
        self.assertEqual(body["tool_choice"], {"type": "function", "name": "Bash"})
        self.assertEqual(body["max_output_tokens"], 16)       # the API's floor
        self.assertEqual(body["reasoning"], {"effort": "high", "summary": "auto"})
        self.assertEqual(body["include"], ["reasoning.encrypted_content"])
        self.assertIs(body["store"], False)
        self.assertTrue(body["stream"])
        self.assertEqual(body["prompt_cache_key"], ccproxy.prompt_cache_key("sess-1"))
        self.assertFalse({"messages", "max_tokens", "max_completion_tokens",
                          "reasoning_effort", "stream_options"} & set(body))
        for choice, expected in (({"type": "any"}, "required"), ({"type": "auto"}, "auto"),
                                 ({"type": "none"}, "none")):
            got, _ = to_responses({"messages": [user("hi")], "tool_choice": choice,
                                   "tools": [{"name": "Bash", "input_schema": {}}]})
            self.assertEqual(got.get("tool_choice", "none"), expected, choice)
        plain, _ = to_responses({"messages": [user("hi")], "output_config": {"effort": "high"}},
                                model="gpt-4.1")
        self.assertFalse({"reasoning", "include"} & set(plain))
        xhigh, _ = to_responses({"messages": [user("hi")], "output_config": {"effort": "max"},
                                 "thinking": {"type": "adaptive"}}, model="gpt-5.2-codex")
        self.assertEqual(xhigh["reasoning"]["effort"], "xhigh")

    def test_stream_round_trip_sends_reasoning_back_as_it_came(self):
        """A reasoning item, a function call and its output, replayed as the next turn's
        input: the item exactly as the upstream sent it."""
        events, items = self.fake_stream("tool")
        tr = translation("openai-responses", "gpt-5-codex")
        blocks = check_grammar(self, run_responses_stream(responses_sse(events), tr))
        self.assertEqual([b["type"] for b in blocks], ["thinking", "tool_use"])
        self.assertEqual(blocks[0]["thinking"], "Thinking it over.\n\nPlanning a step.")
        self.assertEqual(json.loads(blocks[1]["json"]), {"command": "echo hello-from-tool",
                                                         "description": "say hello"})
        turn = [{"type": "thinking", "thinking": blocks[0]["thinking"],
                 "signature": blocks[0]["signature"]},
                {"type": "tool_use", "id": blocks[1]["id"], "name": blocks[1]["name"],
                 "input": json.loads(blocks[1]["json"])}]
        body, _ = to_responses({"messages": [user("run it"), assistant(turn), user([
            {"type": "tool_result", "tool_use_id": blocks[1]["id"], "content": "hi"}])]})
        self.assertEqual(json.dumps(body["input"][1]), json.dumps(items[0]))
        self.assertEqual(body["input"][2], {"type": "function_call", "call_id": items[1]["call_id"],
                                            "name": "Bash", "arguments": json.dumps(
                                                json.loads(items[1]["arguments"]),
                                                separators=(",", ":"))})
        self.assertEqual(body["input"][3]["type"], "function_call_output")
        self.assertEqual(responses_shapes().refuse(body), "")
        # Another provider's thinking (or another route's) is never sent as reasoning.
        for sig in (ccproxy.thinking_signature("oai", "x"), "EqQBCkYIBxgCKkA",
                    ccproxy.reasoning_signature("other", items[0])):
            turn[0]["signature"] = sig
            body, _ = to_responses({"messages": [user("run it"), assistant(turn), user([
                {"type": "tool_result", "tool_use_id": blocks[1]["id"], "content": "hi"}])]})
            self.assertNotIn("reasoning", [i["type"] for i in body["input"]], sig)

    def test_stream_cut_anywhere_keeps_grammar_and_content(self):
        rng = random.Random(23)
        tr = translation("openai-responses", "gpt-5-codex")
        for scenario in ("tool", "text", "nosummary"):
            text = responses_sse(self.fake_stream(scenario)[0])
            whole = check_grammar(self, run_responses_stream(text, tr))
            for _ in range(60):
                cuts = sorted(rng.sample(range(1, len(text.encode())), rng.randint(1, 12)))
                blocks = check_grammar(self, run_responses_stream(text, tr, cuts))
                self.assertEqual([(b["type"], b.get("text"), b.get("thinking"), b.get("json"))
                                  for b in blocks],
                                 [(b["type"], b.get("text"), b.get("thinking"), b.get("json"))
                                  for b in whole], scenario)

    def test_stream_ends(self):
        tr = translation("openai-responses", "gpt-5-codex")
        text = [{"type": "response.output_item.added", "output_index": 0,
                 "item": {"type": "message", "content": []}},
                {"type": "response.output_text.delta", "output_index": 0, "delta": "Hel"}]
        cases = [
            ({"type": "response.incomplete", "response": {
                "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
                "usage": {"input_tokens": 50, "output_tokens": 9}}}, "max_tokens"),
            ({"type": "response.completed", "response": {"status": "completed", "usage": {
                "input_tokens": 50, "input_tokens_details": {"cached_tokens": 20},
                "output_tokens": 9}}}, "end_turn")]
        for last, stop in cases:
            events = run_responses_stream(responses_sse(text + [last]), tr)
            check_grammar(self, events)
            self.assertEqual(events[-2]["delta"]["stop_reason"], stop)
        self.assertEqual(events[-2]["usage"]["cache_read_input_tokens"], 20)
        self.assertEqual(events[-2]["usage"]["input_tokens"], 30)
        for last in ({"type": "response.failed", "response": {"status": "failed", "error": {
                         "code": "server_error", "message": "The model failed"}}},
                     {"type": "error", "code": "rate_limit_exceeded",
                      "message": "Rate limit reached"}):
            events = run_responses_stream(responses_sse(text + [last]), tr)
            check_grammar(self, events)
            self.assertEqual(events[-1]["type"], "error")
        self.assertEqual(events[-1]["error"]["type"], "overloaded_error")
        cut = run_responses_stream(responses_sse(text), tr)        # no completed: cut
        self.assertEqual(cut[-1]["type"], "error")

    def test_whole_reply_and_done_only_servers(self):
        tr = translation("openai-responses", "gpt-5-codex")
        fake = responses_shapes("tool")
        body = {"model": "gpt-5-codex", "input": [], "tools": [{"name": "Bash"}]}
        message = ccproxy.responses_to_anthropic(fake.response(body, 1, fake.output(body, 1)),
                                                 tr)
        self.assertEqual([b["type"] for b in message["content"]], ["thinking", "tool_use"])
        self.assertEqual(message["stop_reason"], "tool_use")
        self.assertEqual(ccproxy.reasoning_item(message["content"][0]["signature"], "oai"),
                         None)
        self.assertEqual(ccproxy.reasoning_item(message["content"][0]["signature"], "r"),
                         fake.output(body, 1)[0])
        # A server that sends only the done events: each item comes whole.
        events = [{"type": "response.output_item.done", "output_index": i, "item": item}
                  for i, item in enumerate(fake.output(dict(body, tools=[]), 2))]
        events.append({"type": "response.completed", "response": {"status": "completed"}})
        blocks = check_grammar(self, run_responses_stream(responses_sse(events), tr))
        self.assertEqual([(b["type"], b.get("text")) for b in blocks],
                         [("thinking", None), ("text", "Hello from the fake Responses server!")])

    def test_through_the_proxy_against_a_strict_fake(self):
        with contextlib.ExitStack() as stack:
            fake = responses_fake("tool").start()
            stack.callback(fake.stop)
            px = stack.enter_context(Proxy(responses_config(fake.url)))
            tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
            first = dict(BODY, max_tokens=32000, tools=tools, stream=True,
                         thinking={"type": "adaptive"}, messages=[user("run echo")])
            resp, out = px.call("POST", "/v1/messages", first)
            blocks = check_grammar(self, parse_events(out))
            turn = [{"type": "thinking", "thinking": blocks[0]["thinking"],
                     "signature": blocks[0]["signature"]},
                    {"type": "tool_use", "id": blocks[1]["id"], "name": "Bash",
                     "input": json.loads(blocks[1]["json"])}]
            second = dict(first, stream=False, messages=first["messages"] + [
                assistant(turn), user([{"type": "tool_result", "tool_use_id": blocks[1]["id"],
                                        "content": "hello-from-tool"}])])
            resp, out = px.call("POST", "/v1/messages", second)
            message = json.loads(out)
            self.assertEqual((resp.status, message["content"][-1]["text"]),
                             (200, "Tool said: hello-from-tool"), out)
            self.assertEqual(fake.requests[0]["path"], "/v1/responses")
            self.assertEqual(fake.requests[0]["headers"]["Authorization"], "Bearer sk-up")
            # What the real API refuses comes back as Anthropic's error: here reasoning
            # that another organisation encrypted.
            item = ccproxy.reasoning_item(turn[0]["signature"], "oai")
            turn[0]["signature"] = ccproxy.reasoning_signature("oai", dict(
                item, encrypted_content="enc:elsewhere"))
            resp, out = px.call("POST", "/v1/messages", second)
            error = json.loads(out)["error"]
            self.assertEqual((resp.status, error["type"]), (400, "invalid_request_error"))
            self.assertIn("not persisted", error["message"])

    def test_errors_map_as_on_chat_completions(self):
        rows = [(429, {"code": "rate_limit_exceeded", "type": "requests",
                       "message": "Rate limit reached for gpt-5-codex"}, 429, "rate_limit_error"),
                (400, {"code": "context_length_exceeded", "type": "invalid_request_error",
                       "message": "Your input exceeds the context window of this model."},
                 400, "invalid_request_error"),
                (400, {"code": "invalid_prompt", "type": "invalid_request_error",
                       "message": "Invalid prompt: flagged"}, 400, "invalid_request_error"),
                (500, {"code": "server_error", "type": "server_error",
                       "message": "The server had an error"}, 500, "api_error")]
        for status, error, want_status, want_type in rows:
            def behave(h, body, status=status, error=error):
                h.reply(status, {"error": dict(error, param=None)})
            with FakeUpstream(behave) as up, Proxy(responses_config(up.url)) as px:
                resp, out = px.call("POST", "/v1/messages", BODY)
                got = json.loads(out)["error"]
            self.assertEqual((resp.status, got["type"]), (want_status, want_type), error)
            self.assertIn(error["message"][:20], got["message"])
            if error["code"] == "context_length_exceeded":
                self.assertTrue(got["message"].startswith("prompt is too long"), got)

    def test_check_probes_with_a_tiny_tool_call(self):
        fake = responses_fake("text").start()
        try:
            code, out = run_check(config(port=free_port(), providers=(ccproxy.ProviderConfig(
                name="oai", type="openai-responses", base_url=fake.url, api_key="sk-up",
                model="gpt-5-codex"),)))
        finally:
            fake.stop()
        self.assertEqual(code, 0, out)
        sent = fake.requests[-1]["body"]
        self.assertEqual((sent["max_output_tokens"], sent["tools"][0]["name"]), (16, "ping"))
        preset = ccproxy.build_config({"providers": [{"name": "o", "type": "openai-responses",
                                                      "api_key": "k"}]}, {}, {})
        self.assertEqual(ccproxy.responses_url(preset.providers[0]),
                         "https://api.openai.com/v1/responses")


# ---- Usage: the ledger, costs and client keys (issue #24) ------------------------------

CACHED_USAGE = {"input_tokens": 50, "output_tokens": 7, "cache_read_input_tokens": 900,
                "cache_creation_input_tokens": 40}


def usage_upstream(h, body):
    """Anthropic's and OpenAI's shapes, streamed or not, each with known usage."""
    doc = json.loads(body or b"{}")
    if h.path.endswith("/chat/completions"):
        usage = {"prompt_tokens": 300, "completion_tokens": 20,
                 "prompt_tokens_details": {"cached_tokens": 100}}
        if doc.get("stream"):
            return sse_behave(chunk({"content": "hi"}) + chunk(finish="stop") + chunk(
                usage=usage, choices=False) + "data: [DONE]\n\n")(h, body)
        return h.reply(200, reply({"role": "assistant", "content": "hi"}, usage=usage))
    message = dict(MESSAGE_JSON, usage=CACHED_USAGE)
    if not doc.get("stream"):
        return h.reply(200, message)
    h.start_stream()
    for frame in [sse("message_start", {"type": "message_start", "message": dict(
            message, content=[], stop_reason=None)})] + STREAM[1:]:
        h.chunk(frame)
    h.chunk(b"")


def ledger_proxy(url, directory, **kw):
    """Proxy with the ledger on, a pass-through and an OpenAI provider behind `url`."""
    cfg = config(data={"providers": [
        {"name": "anth", "type": "anthropic", "base_url": url, "api_key": "sk-up"},
        {"name": "oa", "type": "openai-compatible", "base_url": url + "/v1",
         "model": "gpt-4o", "price": {"input": 2.5, "output": 10, "cache_read": 1.25}}],
        "routes": [{"match": "*haiku*", "provider": "oa"}, {"match": "default",
                                                          "provider": "anth"}]},
        environ={}, usage_db=os.path.join(directory, "usage.db"), **kw)
    px = Proxy(cfg)
    px.service.open_ledger()
    return px


def drained(px, rows, timeout=TIMEOUT):
    """Wait until the ledger was offered `rows` rows (the handler offers a call's row
    after its client has the answer) and wrote or dropped them all."""
    ledger = px.service.ledger
    wait_for(lambda: ledger.offered >= rows and ledger.settled(), timeout=timeout)


class TestUsage(unittest.TestCase):
    """Issue #24: what the ledger keeps, what it costs, and the keys' limits."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_prices_and_costs(self):
        cfg = config(data={"prices": {"gpt-5*": {"input": 1, "output": 2}},
                           "providers": [{"name": "local", "type": "ollama", "model": "m",
                                          "price": {"input": 0, "output": 0}}]},
                     environ={})
        rows = [("claude-opus-5-5", (4, 20, 0.2, 5)), ("claude-opus-4-6", (5, 25, 0.5, 6.25)),
                ("claude-opus-4-1-20250805", (15, 75, 1.5, 18.75)),
                ("claude-sonnet-5-5", (2, 10, 0.1, 2.5)),
                ("claude-sonnet-4-5-20250929", (3, 15, 0.3, 3.75)),
                ("anthropic/claude-sonnet-4.5", (3, 15, 0.3, 3.75)),
                ("claude-haiku-5-5", (0.1, 0.5, 0.01, 0.125)),
                ("claude-haiku-4-5-20251001", (1, 5, 0.1, 1.25)),
                ("gpt-4.1", (2, 8, 0.5, 2)), ("gpt-4o-mini", (0.15, 0.6, 0.075, 0.15)),
                ("o3", (2, 8, 0.5, 2)), ("deepseek-chat", (0.28, 0.42, 0.028, 0.28)),
                ("gemini-2.5-pro", (1.25, 10, 0.125, 1.25)), ("my-own-model", (0, 0, 0, 0)),
                ("gpt-5-codex", (1.0, 2.0, 0.1, 1.25))]             # the config's pattern
        for model, price in rows:
            self.assertEqual(tuple(ccproxy.price_of(cfg, None, model)), price, model)
        self.assertEqual(ccproxy.price_of(cfg, cfg.providers[0], "claude-opus-5-5"),
                         (0, 0, 0, 0))
        self.assertAlmostEqual(ccproxy.call_cost((4, 20, 0.2, 5), (1000, 100, 10000, 200)),
                               (4000 + 2000 + 2000 + 1000) / 1e6)
        with self.assertRaisesRegex(ccproxy.ConfigError, r"prices\[\"x\"\]\.output"):
            config(data={"prices": {"x": {"input": 1, "output": -1}}}, environ={})

    def test_workers_opening_a_fresh_ledger_together_all_open_it(self):
        """Switching a fresh file to WAL answers "database is locked" at once to the
        others; unretried, about 1 open in 40 failed and its rows were lost."""
        failed = 0
        for trial in range(100):
            path = os.path.join(self.tmp.name, "u%d.db" % trial)
            ledgers, barrier = [ccproxy.Ledger(path, 30) for _ in range(4)], \
                threading.Barrier(4, timeout=TIMEOUT)
            threads = [threading.Thread(target=lambda l=l: (barrier.wait(), l._open()))
                       for l in ledgers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            failed += sum(l.conn is None for l in ledgers)
            for l in ledgers:
                if l.conn is not None:
                    l.conn.close()
        self.assertEqual(failed, 0)

    def test_pure_parts(self):
        now = calendar.timegm((2026, 12, 7, 12, 0, 0))
        self.assertEqual(ccproxy.parse_since("7d", now), now - 7 * 86400)
        self.assertEqual(ccproxy.parse_since("12h", now), now - 12 * 3600)
        self.assertEqual(ccproxy.parse_since("2026-12-01"), calendar.timegm((2026, 12, 1, 0, 0, 0)))
        for bad in ("yesterday", "7", "-1d"):
            with self.assertRaises(ValueError):
                ccproxy.parse_since(bad, now)
        self.assertEqual(ccproxy.month_start(now), calendar.timegm((2026, 12, 1, 0, 0, 0)))
        self.assertEqual(ccproxy.next_month(now), calendar.timegm((2027, 1, 1, 0, 0, 0)))
        self.assertEqual(ccproxy.usage_split(CACHED_USAGE), (50, 7, 900, 40))
        self.assertEqual(ccproxy.usage_split({"input_tokens": "x"}), (0, 0, 0, 0))
        cfg = routes_config([{"name": "p", "type": "openai-compatible",
                              "base_url": "http://127.0.0.1:9"}],
                            [{"when": "background", "provider": "p"},
                             {"name": "big", "match": "*opus*", "provider": "p"},
                             {"match": "default", "provider": "p"}])
        for route, reason, names in ((cfg.routes[0], "background", {"background", "routes[0]"}),
                                     (cfg.routes[1], "model", {"big", "routes[1]"}),
                                     (cfg.routes[2], "default", {"default", "routes[2]"}),
                                     (None, None, {"default"})):
            self.assertEqual(ccproxy.route_names(cfg, route, reason), names)
        self.assertEqual(ccproxy.default_usage_db({"STATE_DIRECTORY": "/var/lib/ccproxy"}),
                         "/var/lib/ccproxy/usage.db")
        self.assertEqual(ccproxy.default_usage_db({"HOME": "/home/u"}),
                         "/home/u/.local/state/ccproxy/usage.db")
        self.assertEqual(ccproxy.default_usage_db({}), "")

    def test_client_keys_config(self):
        env = {"ALICE_KEY": "sk-alice", "BOB_KEY": "sk-bob"}
        cfg = config(data={"client_keys": [
            {"name": "alice", "key_env": "ALICE_KEY", "monthly_budget_usd": 50,
             "requests_per_minute": 60, "routes": ["default"]},
            {"name": "bob", "key_env": "BOB_KEY"}]}, environ=env)
        self.assertEqual([(k.name, k.monthly_budget_usd, k.requests_per_minute, k.routes)
                          for k in cfg.client_keys],
                         [("alice", 50.0, 60, ("default",)), ("bob", 0.0, 0, ())])
        self.assertTrue(cfg.requires_key())
        self.assertNotIn("sk-alice", repr(cfg) + json.dumps(
            ccproxy.detailed_health_document(ccproxy.Service(cfg).snapshot()), default=str))
        self.assertNotIn("sk-alice", cfg.fingerprint)
        rows = [([{"name": "a", "key_env": "NOPE"}], r"client_keys\[0\] \(a\): NOPE is not set"),
                ([{"name": "a"}], "give one of key_env and key_file"),
                ([{"name": "a", "key_env": "ALICE_KEY", "key_file": "f"}], "give one of"),
                ([{"name": "a b", "key_env": "ALICE_KEY"}], r"client_keys\[0\]\.name"),
                ([{"name": "a", "key_env": "ALICE_KEY"}, {"name": "a", "key_env": "BOB_KEY"}],
                 "share the name of a"),
                ([{"name": "a", "key_env": "ALICE_KEY"}, {"name": "b", "key_env": "ALICE_KEY"}],
                 "share the key of a"),
                ([{"name": "a", "key_env": "ALICE_KEY", "monthly_budget_usd": "5"}],
                 "monthly_budget_usd must be a number"),
                ([{"name": "a", "key_env": "ALICE_KEY", "routes": "default"}],
                 "routes must be a list"),
                ([{"name": "a", "key_env": "ALICE_KEY", "rpm": 5}], "unknown key")]
        for keys, message in rows:
            with self.assertRaisesRegex(ccproxy.ConfigError, message):
                config(data={"client_keys": keys}, environ=env)
        with self.assertRaisesRegex(ccproxy.ConfigError, "api_key is not set"):
            config(data={"host": "0.0.0.0"}, environ=env)
        config(data={"host": "0.0.0.0", "client_keys": [{"name": "a", "key_env": "ALICE_KEY"}]},
               environ=env)                # named keys guard a public listener too

    def test_ledger_sums_what_the_upstreams_said(self):
        """Streamed and whole, pass-through and translated: the ledger's tokens are the
        upstream's usage, its costs the prices'."""
        with FakeUpstream(usage_upstream) as up, ledger_proxy(up.url, self.tmp.name) as px:
            headers = {"x-claude-code-session-id": "sess-1"}
            for model in ("claude-sonnet-5-5", "claude-haiku-5-5"):
                for stream in (False, True):
                    resp, out = px.call("POST", "/v1/messages", dict(
                        BODY, model=model, stream=stream), headers)
                    self.assertEqual(resp.status, 200, out)
            px.call("POST", "/v1/messages/count_tokens", BODY)        # not a Messages call
            drained(px, 4)
            path = px.service.config.usage_db
            by_model = ccproxy.usage_report(path, 0, "model")
            status = json.loads(px.call("GET", "/status")[1])["usage"]
        rows = {r["group"]: r for r in by_model["rows"]}
        anth = rows["claude-sonnet-5-5"]
        self.assertEqual((anth["requests"], anth["input_tokens"], anth["output_tokens"],
                          anth["cache_read_input_tokens"], anth["cache_creation_input_tokens"]),
                         (2, 100, 8, 1800, 80))   # whole: 7 out; stream: message_delta's 1
        self.assertAlmostEqual(anth["cost_usd"], ccproxy.call_cost(
            (2, 10, 0.1, 2.5), (100, 8, 1800, 80)), places=6)
        oa = rows["gpt-4o"]
        self.assertEqual((oa["requests"], oa["input_tokens"], oa["output_tokens"],
                          oa["cache_read_input_tokens"]), (2, 400, 40, 200))
        self.assertAlmostEqual(oa["cost_usd"], ccproxy.call_cost((2.5, 10, 1.25, 3.125),
                                                                 (400, 40, 200, 0)), places=6)
        self.assertEqual(by_model["total"]["requests"], 4)
        session = ccproxy.usage_report(path, 0, "session")["rows"]
        self.assertEqual([(r["group"], r["requests"]) for r in session], [("sess-1", 4)])
        self.assertEqual((status["enabled"], status["written"], status["dropped"]),
                         (True, 4, 0))
        with contextlib.closing(sqlite3.connect(path)) as db:   # never a prompt, a
            dump = "\n".join(db.iterdump())                     # completion or a key
        for secret in ("sk-up", "hi\"", "Hello"):
            self.assertNotIn(secret, dump)

    def test_a_locked_or_read_only_ledger_drops_rows_and_serving_goes_on(self):
        with FakeUpstream(usage_upstream) as up, ledger_proxy(up.url, self.tmp.name) as px:
            ledger = px.service.ledger
            px.call("POST", "/v1/messages", BODY)
            wait_for(lambda: ledger.written == 1)
            other = sqlite3.connect(ledger.path, timeout=0, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")                 # another process holds it
            try:
                for _ in range(3):
                    self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 200)
                wait_for(lambda: ledger.dropped >= 3, timeout=10)
            finally:
                other.execute("ROLLBACK")
                other.close()
            self.assertIn("locked", ledger.state()["error"])
            px.call("POST", "/v1/messages", BODY)
            wait_for(lambda: ledger.written == 2, timeout=10)      # it works again
            ledger.conn.execute("PRAGMA query_only = 1")          # read-only from now on
            self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 200)
            wait_for(lambda: ledger.dropped == 4, timeout=10)
            metrics = px.call("GET", "/metrics")[1].decode()
        self.assertIn("ccproxy_usage_rows_dropped_total 4", metrics)
        self.assertIn("ccproxy_usage_rows_written_total 2", metrics)
        broken = os.path.join(self.tmp.name, "a-file")
        open(broken, "w").close()
        with FakeUpstream(usage_upstream) as up, ledger_proxy(up.url, self.tmp.name) as px:
            px.service.ledger.close()
            px.service.ledger = ccproxy.Ledger(os.path.join(broken, "usage.db"), 90).start()
            self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 200)
            wait_for(lambda: px.service.ledger.dropped == 1, timeout=10)
            self.assertIn("cannot open", px.service.ledger.state()["error"])
            px.service.ledger.close()

    def test_retention_prunes_and_close_writes_what_is_queued(self):
        path = os.path.join(self.tmp.name, "u.db")
        ledger = ccproxy.Ledger(path, 1).start()
        row = lambda ts: (ts, 1, "s", "", "", "", "p", "m", "m", 1, 1, 0, 0, "200", 5, 9, 0.5)  # noqa
        for ts in (time.time() - 3 * 86400, time.time()):
            ledger.record(row(ts))
        ledger.close()
        self.assertEqual(ledger.written, 2)
        ledger = ccproxy.Ledger(path, 1)
        ledger._open()
        ledger._chores()
        self.assertEqual(ledger.rows, 1)
        ledger.conn.close()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def keyed_proxy(self, up, **kw):
        env = {"ALICE_KEY": "sk-alice", "BOB_KEY": "sk-bob", "CI_KEY": "sk-ci"}
        cfg = config(data={"providers": [{"name": "anth", "base_url": up.url,
                                          "api_key": "sk-up"}],
                           "routes": [{"name": "fast", "match": "*haiku*", "provider": "anth"},
                                      {"match": "default", "provider": "anth"}],
                           "client_keys": [
                               {"name": "alice", "key_env": "ALICE_KEY",
                                "monthly_budget_usd": 0.0001},
                               {"name": "bob", "key_env": "BOB_KEY", "requests_per_minute": 2},
                               {"name": "ci", "key_env": "CI_KEY", "routes": ["fast"]}]},
                     environ=env, usage_db=os.path.join(self.tmp.name, "usage.db"), **kw)
        px = Proxy(cfg)
        px.service.open_ledger()
        return px

    def test_client_key_limits(self):
        with FakeUpstream(usage_upstream) as up, self.keyed_proxy(up) as px, \
                self.assertLogs("ccproxy", "INFO") as logs:
            def call(key, **body):
                resp, out = px.call("POST", "/v1/messages", dict(BODY, **body),
                                    {"authorization": "Bearer " + key})
                return resp, json.loads(out)
            self.assertEqual(call("sk-alice")[0].status, 200)        # spends past $0.0001
            # The call's cost counts once it is accounted, just after its answer went.
            wait_for(lambda: px.service.limits.spent("alice") > 0)
            resp, doc = call("sk-alice")
            self.assertEqual((resp.status, doc["error"]["type"]), (429, "rate_limit_error"))
            self.assertRegex(doc["error"]["message"], r"alice is over its monthly budget of "
                                                      r"\$0\.0001 \(\$0\.0\d+ spent this month\)")
            self.assertGreater(int(resp.getheader("retry-after")), 60)
            self.assertEqual([call("sk-bob")[0].status for _ in range(3)], [200, 200, 429])
            resp, doc = call("sk-bob")
            self.assertIn("bob is over its rate of 2 requests per minute",
                          doc["error"]["message"])
            self.assertLessEqual(int(resp.getheader("retry-after")), 61)
            resp, doc = call("sk-ci")
            self.assertEqual((resp.status, doc["error"]["type"]), (403, "permission_error"))
            self.assertIn("ci may take the routes fast; this call took default",
                          doc["error"]["message"])
            self.assertEqual(call("sk-ci", model="claude-haiku-5-5")[0].status, 200)
            self.assertEqual(call("sk-nobody")[0].status, 401)
            drained(px, 4)
            by_key = ccproxy.usage_report(px.service.config.usage_db, 0, "key")
            status = json.loads(px.call("GET", "/status")[1])["usage"]["keys"]
            metrics = px.call("GET", "/metrics")[1].decode()
        self.assertEqual({r["group"]: r["requests"] for r in by_key["rows"]},
                         {"alice": 1, "bob": 2, "ci": 1})
        alice = next(k for k in status if k["name"] == "alice")
        self.assertGreater(alice["month_cost_usd"], 0)
        self.assertEqual(alice["monthly_budget_usd"], 0.0001)
        self.assertIn('ccproxy_key_tokens_total{key="bob",model="claude-sonnet-5-5",'
                      'type="output"} 14', metrics)
        text = "\n".join(logs.output)
        self.assertIn("key=alice", text)
        for secret in ("sk-alice", "sk-bob", "sk-ci", "sk-nobody"):
            self.assertNotIn(secret, text + metrics + json.dumps(status))

    def test_usage_endpoint_and_command(self):
        with FakeUpstream(usage_upstream) as up, ledger_proxy(up.url, self.tmp.name) as px:
            px.call("POST", "/v1/messages", BODY)
            drained(px, 1)
            resp, out = px.call("GET", "/usage?since=1d&by=provider")
            doc = json.loads(out)
            self.assertEqual((resp.status, set(doc)), (200, {"since", "by", "rows", "total"}), doc)
            self.assertEqual([(r["group"], r["requests"]) for r in doc["rows"]], [("anth", 1)])
            for query in ("since=soon", "by=colour"):
                self.assertEqual(px.call("GET", "/usage?" + query)[0].status, 400, query)
            path = px.service.config.usage_db
        env = dict(os.environ, CCPROXY_CONFIG="", CCPROXY_USAGE_DB=path, HOME=self.tmp.name,
                   CCPROXY_PID_FILE=os.path.join(self.tmp.name, "none.pid"),
                   CCPROXY_PORT=str(free_port()))
        run = lambda *a: subprocess.run([sys.executable, SCRIPT, "usage"] + list(a), env=env,  # noqa
                                        capture_output=True, text=True, timeout=TIMEOUT)
        out = run("--json", "--by", "model")
        self.assertEqual(json.loads(out.stdout)["total"]["requests"], 1, out.stderr)
        csv_lines = run("--csv").stdout.splitlines()
        self.assertEqual(csv_lines[0], "day,requests,input_tokens,output_tokens,"
                         "cache_read_input_tokens,cache_creation_input_tokens,cost_usd")
        self.assertTrue(csv_lines[-1].startswith("total,1,50,7,900,40,"))
        text = run().stdout
        self.assertIn("costs are estimates", text)
        self.assertRegex(text, r"total\s+1\s+50\s+7\s+900\s+40")
        missing = subprocess.run([sys.executable, SCRIPT, "usage"], env=dict(
            env, CCPROXY_USAGE_DB=os.path.join(self.tmp.name, "none.db")),
            capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(missing.returncode, 1)
        self.assertIn("no usage recorded yet", missing.stderr)

    def test_no_sqlite3_serves_without_a_ledger(self):
        with unittest.mock.patch.object(ccproxy, "sqlite3", None), FakeUpstream(usage_upstream) as up, \
                self.assertLogs("ccproxy", "WARNING") as logs:
            px = ledger_proxy(up.url, self.tmp.name)
            with px:
                self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 200)
                usage = json.loads(px.call("GET", "/status")[1])["usage"]
        self.assertIsNone(px.service.ledger)
        self.assertEqual((usage["enabled"], usage["why"]), (False, "no sqlite3 module in "
                                                                   "this Python"))
        self.assertIn("usage ledger off: this Python has no sqlite3 module", logs.output[0])


# ---- The status page (issue #25) -------------------------------------------------------

def page_snapshot(stats=None, **kw):
    """A Snapshot with two providers, a route, and the provider stats given."""
    cfg = config(data={"providers": [
        {"name": "main", "type": "openai-compatible", "base_url": "http://127.0.0.1:9/v1",
         "model": "qwen3"},
        {"name": "backup", "type": "openai-compatible", "base_url": "http://127.0.0.1:9/v1"}],
        "routes": [{"name": "bg", "when": "background", "provider": "backup"},
                   {"match": "default", "provider": "main"}]}, environ={},
                 source="/etc/ccproxy/<odd>.json")
    metrics = ccproxy.Metrics()
    for latency in (0.1, 0.2, 0.3, 2.0):
        metrics.observe_upstream("main", 200, latency)
    metrics.observe_upstream("main", 503, 0.05)
    metrics.observe_route("bg", "background")
    fields = dict(config=cfg, now=time.time(), started=time.time() - 7300, pid=42, port=3456,
                  ready=True, loaded_at=time.time(), build={"version": "x", "commit": "c",
                                                            "date": "d"},
                  provider_stats=stats or {}, metrics=metrics.snapshot(), reloads=0,
                  requests_served=5, reload_failures=0, in_flight=0)
    fields.update(kw)
    return ccproxy.Snapshot(**fields)


def page_of(snap, usage=None):
    doc = ccproxy.status_document(snap)
    trends = {p.name: ccproxy.minute_series(snap.metrics, p.name, snap.now)
              for p in snap.config.providers}
    return ccproxy.render_page(doc, trends, usage)


class TestStatusPage(unittest.TestCase):
    """Issue #25: the page for people, rendered on the server from /status's data."""

    def test_healthy_degraded_unhealthy_and_no_ledger(self):
        now = time.time()
        healthy = page_of(page_snapshot({"main": {"status": "connected", "requests": 4,
                                                  "tokens_per_second": 41.5}}))
        self.assertNotIn("role=alert", healthy)
        self.assertIn("<b class=ok><span class=dot></span>healthy</b>", healthy)
        self.assertIn("2h 1m", healthy)
        self.assertIn("&lt;odd&gt;.json", healthy)            # escaped, never markup
        self.assertIn("<b>bg</b>", healthy)
        self.assertIn("background 1", healthy)
        self.assertIn("41.5", healthy)
        self.assertRegex(healthy, r"\d+ / \d+ ms")            # p50 / p95 from the histogram
        self.assertIn('aria-label="5 calls in the last hour, 1 failed"', healthy)
        self.assertIn("Usage is off", healthy)
        degraded = page_of(page_snapshot({"main": {
            "status": "rate_limited", "rate_limited_until": now + 60,
            "rate_limit_remaining": 0, "last_error": "rate limited (HTTP 429)"}}))
        self.assertIn("banner warn", degraded)
        self.assertIn("Provider main is rate limited.", degraded)
        unhealthy = page_of(page_snapshot({
            "main": {"status": "disconnected", "circuit_open_until": now + 30,
                     "last_error": "server error (HTTP 503)"},
            "backup": {"status": "auth_failed", "last_error": "refused the key (HTTP 401)"}},
            last_reload_error="config: routes[0].when must be one of …"))
        self.assertIn("banner bad", unhealthy)
        for text in ("Provider main is disconnected, its circuit open: server error (HTTP "
                     "503).", "Provider backup is auth failed: refused the key (HTTP 401).",
                     "The last reload failed", "circuit open", "<code>ccproxy check</code>"):
            self.assertIn(text, unhealthy)
        self.assertIn("<b class=bad><span class=dot></span>unhealthy</b>", unhealthy)

    def test_usage_tables_and_the_fragment(self):
        report = {"since": "x", "by": "model", "rows": [dict(
            group="claude-opus-5-5", requests=3, input_tokens=100, output_tokens=20,
            cache_read_input_tokens=900, cache_creation_input_tokens=0, cost_usd=0.0123)],
            "total": dict(requests=3, input_tokens=100, output_tokens=20,
                          cache_read_input_tokens=900, cache_creation_input_tokens=0,
                          cost_usd=0.0123)}
        usage = {"today": report, "month": report, "sessions": dict(report, by="session")}
        page = page_of(page_snapshot(), usage)
        for text in ("Today", "This month", "Busiest sessions this month", "claude-opus-5-5",
                     "$0.0123", "1,000"):
            self.assertIn(text, page)
        doc = ccproxy.status_document(page_snapshot())
        fragment = ccproxy.render_page(doc, {}, usage, fragment=True)
        self.assertFalse(fragment.startswith("<!doctype"))
        self.assertNotIn("<script", fragment)
        whole = ccproxy.render_page(doc, {}, usage)
        self.assertIn(fragment, whole)
        # Nothing from anywhere: no URL with a scheme or a host, no external resource.
        self.assertNotRegex(whole, r"(?i)(https?:)?//[a-z0-9]|@import|url\(")

    def test_served_with_auth_as_status_is(self):
        cfg = config(api_key="sk-page-key", host="0.0.0.0")
        service = ccproxy.Service(cfg)
        service.ready = True
        def get(path, headers=(), peer="203.0.113.5"):   # noqa
            handler = SocketlessHandler(request_bytes("GET", path, headers), service, peer)
            with self.assertLogs("ccproxy", "INFO"):
                return parse_response(handler.run())
        html_accept = ("Accept", "text/html,application/xhtml+xml")
        basic = lambda user, key: ("Authorization", "Basic " + base64.b64encode(  # noqa
            ("%s:%s" % (user, key)).encode()).decode())
        status, headers, body = get("/", (html_accept,))
        self.assertEqual(status, 401)
        self.assertEqual(headers["WWW-Authenticate"], 'Basic realm="ccproxy", charset="UTF-8"')
        self.assertNotIn(b"sk-page-key", body)
        self.assertEqual(get("/ui", (basic("me", "wrong"),))[0], 401)
        status, headers, body = get("/ui", (basic("anyone", "sk-page-key"),))
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
        self.assertNotIn(b"sk-page-key", body)
        self.assertEqual(get("/", (html_accept, basic("", "sk-page-key")))[0], 200)
        self.assertEqual(get("/", (html_accept,), peer="127.0.0.1")[0], 200)   # loopback
        status, headers, body = get("/", peer="203.0.113.5")    # curl: what it got before
        self.assertEqual((status, json.loads(body)["service"]), (200, "ccproxy"))
        self.assertEqual(get("/status", (basic("x", "sk-page-key"),))[0], 200)
        # The CSP's hashes are those of the page's own style and script.
        self.assertIn(ccproxy._csp_hash(ccproxy.PAGE_CSS), headers.get(
            "Content-Security-Policy", "") or dict(ccproxy.PAGE_HEADERS)[
                "Content-Security-Policy"])

    def test_percentiles_and_minutes(self):
        h = ccproxy.Histogram(ccproxy.DURATION_BUCKETS)
        for v in [0.02] * 50 + [0.2] * 45 + [3.0] * 5:
            h.observe(v)
        state = h.state()
        self.assertEqual(ccproxy.percentile_ms(state, ccproxy.DURATION_BUCKETS, 0.5), 25)
        self.assertLessEqual(ccproxy.percentile_ms(state, ccproxy.DURATION_BUCKETS, 0.95),
                             250)
        self.assertIsNone(ccproxy.percentile_ms(([0] * 16, 0.0, 0), ccproxy.DURATION_BUCKETS,
                                                0.5))
        m = ccproxy.Metrics()
        m.observe_upstream("p", 200, 0.1)
        m.observe_upstream("p", "connect", 0.1)
        series = ccproxy.minute_series(m.snapshot(), "p", time.time())
        self.assertEqual((len(series), series[-1]), (60, (2, 1)))
        merged = ccproxy.merge_metrics([ccproxy.export_metrics(m.snapshot())] * 2)
        self.assertEqual(ccproxy.minute_series(merged, "p", time.time())[-1], (4, 2))
        self.assertEqual(merged["latency"]["p"][2], 4)


# ---- Recordings and replay (issue #26) ---------------------------------------------------

TOOL_STREAM = "".join([
    chunk({"role": "assistant", "content": "Let me look."}),
    chunk({"tool_calls": [tc(0, "call_1", "Bash", '{"comm')]}),
    chunk({"tool_calls": [tc(0, args='and": "ls -la"}')]}),
    chunk(finish="tool_calls"), chunk(usage={"prompt_tokens": 90, "completion_tokens": 9},
                                      choices=False), "data: [DONE]\n\n"])
CUT_STREAM = "".join([chunk({"content": "Hel"}), chunk({"content": "lo"}),
                      'data: {"error": {"message": "Upstream overloaded", "code": 503}}\n\n'])


def recording_proxy(url, directory, ptype="openai", mode="all", redact="keys", **kw):
    provider = dict({"name": "up", "type": ptype, "base_url": url, "api_key":
                     "sk-provider-secret-123456", "model": "gpt-4o"}, **kw)
    return Proxy(config(data={"providers": [provider], "usage": False,
                              "record": {"dir": directory, "mode": mode, "redact": redact}},
                        environ={}))


def recordings(directory):
    return sorted(glob.glob(os.path.join(directory, "*.jsonl")))


class TestRecordings(unittest.TestCase):
    """Issue #26: a call as it went on the wire, redacted; replayed through this build."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_content_redaction_keeps_the_shape(self):
        rows = [(b'{"type": "text", "text": "Hello, world"}', b'{"type": "text", "text": '
                 b'"xxxxx, xxxxx"}'),
                (b'{"name": "Bash", "arguments": "{\\"command\\": \\"ls -la\\"}"}',
                 b'{"name": "Bash", "arguments": "{\\"xxxxxxx\\": \\"xx -xx\\"}"}'),
                (b'data: {"delta": {"text": "caf\xc3\xa9\\n"}, "index": 3}\n\n',
                 b'data: {"delta": {"text": "xxxxx\\n"}, "index": 3}\n\n'),
                (b'{"content": ["a", {"type": "image", "media_type": "image/png"}]}',
                 b'{"content": ["x", {"type": "image", "media_type": "image/png"}]}'),
                (b'event: message_stop\ndata: {"type": "message_stop"}', None)]
        for raw, expected in rows:
            got = ccproxy.redact_content(raw)
            self.assertEqual(got, expected or raw)
            self.assertEqual(len(got), len(raw))
        args = json.loads(ccproxy.redact_content(
            b'{"arguments": "{\\"a\\": [1.5, true, null, \\"b c\\"]}"}'))
        self.assertEqual(json.loads(args["arguments"]), {"x": [1.5, True, None, "x x"]})

    def test_record_then_replay_gives_the_same_client_output(self):
        """A streamed tool call, a stream cut by an error, a pass-through stream."""
        cases = [("openai", sse_behave(TOOL_STREAM), dict(BODY, stream=True, tools=[
                     {"name": "Bash", "input_schema": {"type": "object"}}])),
                 ("openai", sse_behave(CUT_STREAM), dict(BODY, stream=True)),
                 ("anthropic", lambda h, body: (h.start_stream(), [h.chunk(f) for f in STREAM],
                                                h.chunk(b"")), dict(BODY, stream=True)),
                 ("openai", lambda h, body: h.reply(200, reply({"role": "assistant",
                                                                "content": "hi"})), BODY)]
        for index, (ptype, behave, body) in enumerate(cases):
            directory = os.path.join(self.tmp.name, str(index))
            with FakeUpstream(behave) as up, recording_proxy(
                    up.url + ("/v1" if ptype == "openai" else ""), directory, ptype) as px:
                resp, out = px.call("POST", "/v1/messages", body)
            files = recordings(directory)
            self.assertEqual(len(files), 1, index)
            recording = ccproxy.load_recording(files[0])
            then = ccproxy.recorded_reply(recording)
            self.assertEqual(then[2], out)                 # what the client really got
            now = ccproxy.replay(recording)
            self.assertEqual(ccproxy.replay_diff(then, now), [], index)
            self.assertEqual(ccproxy.comparable(now[2]), ccproxy.comparable(out))
        # And a change shows: the same recording, the answer's text altered.
        recording["attempts"][0]["reads"][0][1]["text"] = recording["attempts"][0]["reads"][
            0][1]["text"].replace("hi", "ho")
        diff = ccproxy.replay_diff(then, ccproxy.replay(recording))
        self.assertTrue(any(line.startswith("+") and "ho" in line for line in diff), diff)

    def test_no_key_reaches_a_recording(self):
        secrets = ("sk-provider-secret-123456", "sk-client-secret-987654",
                   "sk-body-secret-5555555555", "AIzaSyD-0123456789abcdefghijklmno",
                   "AIzaQUERYSECRET0123456789abcdef", "xoxb-12345678-abcdefgh")
        for redact in ("keys", "content"):
            directory = os.path.join(self.tmp.name, redact)
            cfg = config(data={"providers": [{"name": "up", "type": "openai",
                                              "base_url": "http://127.0.0.1:9/v1",
                                              "api_key": secrets[0], "model": "gpt-4o"}],
                               "usage": False, "record": {"dir": directory, "redact": redact}},
                         environ={}, api_key=secrets[1])
            def behave(h, body):    # noqa: E306 - the upstream echoes a key back
                h.reply(200, reply({"role": "assistant", "content": "your key " + secrets[0]}))
            with FakeUpstream(behave) as up:
                cfg = dataclasses.replace(cfg, providers=(dataclasses.replace(
                    cfg.providers[0], base_url=up.url + "/v1"),))
                with Proxy(cfg) as px:
                    body = dict(BODY, messages=[user("use %s and %s and %s" % secrets[2:5])],
                                metadata={"user_id": secrets[5]})
                    resp, _ = px.call("POST", "/v1/messages?key=" + secrets[4], body,
                                      {"x-api-key": secrets[1],
                                       "authorization": "Bearer " + secrets[1]})
                    self.assertEqual(resp.status, 200)
            files = recordings(directory)
            self.assertEqual(len(files), 1)
            with open(files[0]) as f:
                text = f.read()
            for secret in secrets:
                self.assertNotIn(secret, text, (redact, secret))
            self.assertEqual(stat.S_IMODE(os.stat(files[0]).st_mode), 0o600)
        self.assertNotIn("use ", text)                    # content: no prose either

    def test_errors_mode_keeps_only_what_went_wrong(self):
        calls = []
        def behave(h, body):        # noqa: E306
            calls.append(1)
            if len(calls) == 1:
                return h.reply(200, reply({"role": "assistant", "content": "hi"}))
            h.reply(429, {"error": {"message": "Rate limit reached"}}, (("retry-after", "1"),))
        with FakeUpstream(behave) as up, recording_proxy(up.url + "/v1", self.tmp.name,
                                                         mode="errors") as px:
            self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 200)
            self.assertEqual(recordings(self.tmp.name), [])
            self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 429)
        files = recordings(self.tmp.name)
        self.assertEqual(len(files), 1)
        meta = ccproxy.load_recording(files[0])["meta"]
        self.assertEqual((meta["status"], meta["upstream_status"]), (429, 429))
        with self.assertRaisesRegex(ccproxy.ConfigError, "record.mode"):
            config(data={"record": {"dir": "/tmp/x", "mode": "some"}}, environ={})

    def test_the_kept_recordings_still_replay_the_same(self):
        """Every recording under e2e/recordings is a regression test: a bug report's
        file goes there, and this build must answer as the recording says."""
        files = sorted(glob.glob(os.path.join(HERE, "e2e", "recordings", "*.jsonl")))
        self.assertTrue(files)
        for path in files:
            with self.subTest(os.path.basename(path)):
                recording = ccproxy.load_recording(path)
                self.assertEqual(ccproxy.replay_diff(
                    ccproxy.recorded_reply(recording), ccproxy.replay(recording),
                    recording["meta"]["redact"] == "content"), [])
        out = subprocess.run([sys.executable, SCRIPT, "replay", files[0]], capture_output=True,
                             text=True, timeout=TIMEOUT)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("the same as recorded", out.stderr)


class TestFileShape(unittest.TestCase):

    def test_no_top_level_name_is_defined_twice(self):
        """One file holds everything: a second def of a name replaces the first in
        silence (a recording's redact_url once replaced /status's)."""
        import ast
        with open(SCRIPT) as f:
            tree = ast.parse(f.read())
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        self.assertEqual(sorted({n for n in names if names.count(n) > 1}), [])


class TestContextWindows(unittest.TestCase):
    """Issue #21: each translated call sized to its upstream model's window."""

    def test_limits_and_where_they_come_from(self):
        p = ccproxy.ProviderConfig(name="p", type="openai", model="gpt-4o")
        cfg = config(providers=(p,))
        self.assertEqual(ccproxy.route_limits(cfg, p, "gpt-4o"), (128000, 16384, "table"))
        self.assertEqual(ccproxy.route_limits(cfg, p, "gpt-4o", 64000), (64000, 16384,
                                                                        "provider"))
        mine = dataclasses.replace(p, context_window=50000, quirks=(("max_output", 4096),))
        self.assertEqual(ccproxy.route_limits(config(providers=(mine,)), mine, "gpt-4o", 64000),
                         (50000, 4096, "config"))
        routed = config(providers=(mine,), routes=(ccproxy.RouteConfig(
            match="*haiku*", provider="p", model="gpt-4o", context_window=20000),))
        self.assertEqual(ccproxy.route_limits(routed, mine, "gpt-4o")[0], 20000)
        q = ccproxy.ProviderConfig(name="q", type="openai-compatible", model="my-model")
        self.assertEqual(ccproxy.route_limits(config(providers=(q,)), q, "my-model"), (0, 0, ""))
        for model, window in (("gpt-5.2", 400000), ("openai/o3", 200000), ("o4-mini", 200000),
                              ("deepseek-reasoner", 128000), ("gemini-2.5-pro", 1048576),
                              ("anthropic/claude-sonnet-4.5", 200000), ("gpt-oss-120b", 131072)):
            self.assertEqual(ccproxy.table_limits(model)[0], window, model)

    def test_max_tokens_cap(self):
        self.assertEqual(ccproxy.max_tokens_cap(0, 0, 5000), 0)
        self.assertEqual(ccproxy.max_tokens_cap(0, 8192, 5000), 8192)
        self.assertEqual(ccproxy.max_tokens_cap(32768, 0, 17000), 32768 - 17000 - 1024)
        self.assertEqual(ccproxy.max_tokens_cap(128000, 16384, 17000), 16384)
        with self.assertRaises(ccproxy.HTTPError) as caught:
            ccproxy.max_tokens_cap(32768, 0, 31000)
        self.assertEqual(caught.exception.status, 400)
        self.assertRegex(caught.exception.message, r"^prompt is too long: 31000 tokens > "
                                                   r"30720 maximum")

    def test_limit_error_wordings(self):
        rows = [
            (VLLM_OUTPUT, ("output", 32768, 17459)),
            ('{"error":{"code":400,"message":"the request exceeds the available context size",'
             '"type":"exceed_context_size_error","n_prompt_tokens":40012,"n_ctx":32768}}',
             ("overflow", 32768, 40012)),
            ("This model's maximum context length is 131072 tokens. However, you requested "
             "140000 tokens (100000 in the messages, 40000 in the completion).",
             ("output", 131072, 100000)),
            ("This model's maximum context length is 131072 tokens. However, you requested "
             "180000 tokens (140000 in the messages, 40000 in the completion).",
             ("overflow", 131072, 140000)),
            ("This endpoint's maximum context length is 131072 tokens. However, you requested "
             "about 140000 tokens (135000 of text input, 5000 in the output).",
             ("overflow", 131072, 135000)),
            ('{"error":{"code":"context_length_exceeded","message":"Your input exceeds the '
             'context window of this model."}}', ("overflow", 0, 0)),
            ("The input token count (1200000) exceeds the maximum number of tokens allowed "
             "(1048576).", ("overflow", 1048576, 1200000)),
            ("Trying to keep the first 9000 tokens when context the overflows. However, the "
             "model is loaded with context length of only 8192 tokens", ("overflow", 8192, 0)),
            ('{"error":{"message":"Rate limit reached"}}', None),
        ]
        for text, expected in rows:
            with self.subTest(text=text[:50]):
                got = ccproxy.limit_error(text.encode())
                self.assertEqual(got and (got["kind"], got["window"], got["input"]), expected)
        status, _, body = ccproxy.map_upstream_error(400, headers_of([]), json.dumps(
            {"message": VLLM_OUTPUT}).encode(), "p", False)
        self.assertNotIn("prompt is too long", json.loads(body)["error"]["message"])
        status, _, body = ccproxy.map_upstream_error(400, headers_of([]), rows[1][0].encode(),
                                                     "p", False)
        self.assertTrue(json.loads(body)["error"]["message"].startswith("prompt is too long"))

    def test_listed_windows(self):
        doc = {"data": [{"id": "a", "max_model_len": 32768}, {"id": "b", "context_length": 8192},
                        {"id": "c", "max_context_length": 4096}, {"id": "d"}, "x"]}
        self.assertEqual(ccproxy.listed_windows(json.dumps(doc).encode()),
                         {"a": 32768, "b": 8192, "c": 4096})
        self.assertEqual(ccproxy.listed_windows(b"not json"), {})

    def claude_body(self):
        body = claude_code_body() or dict(BODY, system=[{"type": "text", "text": "s " * 30000}])
        return dict(body, stream=False, max_tokens=32000)

    def test_a_vllm_window_found_by_one_retry_then_known(self):
        counted = []
        cfg = config(providers=(ccproxy.ProviderConfig(
            name="vllm", type="openai-compatible", model="my-model"),))
        with FakeUpstream(window_upstream(32768, "vllm", counted)) as up, Proxy(
                dataclasses.replace(cfg, providers=(dataclasses.replace(
                    cfg.providers[0], base_url=up.url),))) as px:
            resp, out = px.call("POST", "/v1/messages", self.claude_body())
            self.assertEqual(resp.status, 200, out)
            self.assertEqual(len(counted), 2)                 # one 400, one retry that fits
            self.assertLessEqual(sum(counted[-1]), 32768)
            resp, out = px.call("POST", "/v1/messages", self.claude_body())
            self.assertEqual(resp.status, 200, out)
            self.assertEqual(len(counted), 3)                 # the window is known now
            doc = json.loads(px.call("GET", "/status")[1])
            item = doc["providers"]["items"][0]
            self.assertEqual((item["context_window"], item["context_window_source"]),
                             (32768, "provider"))

    def test_a_configured_window_needs_no_retry_and_an_overflow_is_prompt_too_long(self):
        counted = []
        with FakeUpstream(window_upstream(32768, "vllm", counted)) as up, Proxy(config(
                providers=(ccproxy.ProviderConfig(name="vllm", type="openai-compatible",
                                                  base_url=up.url, model="my-model",
                                                  context_window=32768),))) as px:
            resp, out = px.call("POST", "/v1/messages", self.claude_body())
            self.assertEqual((resp.status, len(counted)), (200, 1), out)
        counted = []
        with FakeUpstream(window_upstream(4096, "llama", counted)) as up, Proxy(config(
                providers=(ccproxy.ProviderConfig(name="llama", type="openai-compatible",
                                                  base_url=up.url, model="my-model"),))) as px:
            for calls in (1, 1):          # the second is answered here: the window is known
                resp, out = px.call("POST", "/v1/messages", self.claude_body())
                error = json.loads(out)["error"]
                self.assertEqual((resp.status, error["type"]), (400, "invalid_request_error"))
                self.assertTrue(error["message"].startswith("prompt is too long"), error)
                self.assertEqual(len(counted), calls)

    def test_windows_local_servers_state(self):
        def behave(h, body):
            if h.path == "/props":                       # llama.cpp
                return h.reply(200, {"default_generation_settings": {"n_ctx": 16384}})
            if h.path == "/api/show":                    # Ollama
                return h.reply(200, {"parameters": "num_ctx 32768\ntemperature 1"})
            h.reply(200, {"data": [{"id": "my-model"}]})
        with FakeUpstream(behave) as up:
            upstreams = ccproxy.Upstreams()
            try:
                for ptype, expected in (("openai-compatible", {"my-model": 16384}),
                                        ("ollama", {"my-model": 32768}), ("openai", {})):
                    p = ccproxy.ProviderConfig(name="p", type=ptype, base_url=up.url + "/v1",
                                               model="my-model", api_key="k")
                    cfg = config(providers=(p,))
                    self.assertEqual(ccproxy.server_windows(cfg, p, upstreams.client(p)),
                                     expected, ptype)
            finally:
                upstreams.close()
            code, out = run_check(config(port=free_port(), providers=(
                ccproxy.ProviderConfig(name="llama", type="openai-compatible",
                                       base_url=up.url + "/v1", model="my-model"),)))
            self.assertIn("context window of my-model: 16384 tokens as its server says", out)

    def test_env_exports_the_default_routes_window(self):
        cfg = config(providers=(ccproxy.ProviderConfig(name="p", type="openai-compatible",
                                                       model="m", context_window=131072,
                                                       quirks=(("max_output", 8192),)),))
        lines = ccproxy.env_lines(cfg)
        self.assertIn("export CLAUDE_CODE_AUTO_COMPACT_WINDOW=131072", lines)
        self.assertIn("export CLAUDE_CODE_MAX_OUTPUT_TOKENS=8192", lines)
        table = ccproxy.env_lines(config(providers=(ccproxy.ProviderConfig(
            name="p", type="openai", model="gpt-4o", api_key="k"),)))
        self.assertIn("export CLAUDE_CODE_AUTO_COMPACT_WINDOW=128000", table)
        self.assertIn("export CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1", table)
        # Claude Code 2.1.332 takes no auto-compact window under 100k (it warns, and
        # uses 100k); the exact window goes in CLAUDE_CODE_MAX_CONTEXT_TOKENS.
        for window, expected in ((131072, ["export CLAUDE_CODE_AUTO_COMPACT_WINDOW=131072",
                                           "export CLAUDE_CODE_MAX_CONTEXT_TOKENS=131072"]),
                                 (32768, ["export CLAUDE_CODE_AUTO_COMPACT_WINDOW=100000",
                                          "export CLAUDE_CODE_MAX_CONTEXT_TOKENS=32768"]),
                                 (0, [])):
            got = [l for l in ccproxy.window_lines(window) if not l.startswith("#")]
            self.assertEqual(got, expected, window)
        self.assertIn("32768 tokens", ccproxy.window_lines(32768)[0])
        passthrough = ccproxy.env_lines(config())
        self.assertFalse([l for l in passthrough if "COMPACT" in l or "DISCOVERY" in l])

    def test_models_list_the_routed_claude_names(self):
        cfg = routes_config(
            [{"name": "main", "type": "openai", "api_key": "k", "model": "gpt-4o"},
             {"name": "fast", "type": "openai-compatible", "base_url": "http://127.0.0.1:9",
              "model": "qwen3-8b", "context_window": 32768}],
            [{"match": "claude-*haiku*", "provider": "fast"},
             {"match": "claude-sonnet-4-5-20250929", "provider": "main"},
             {"when": "thinking", "provider": "fast"},
             {"match": "default", "provider": "main"}])
        windows = ccproxy.Windows()
        doc = ccproxy.models_document(cfg, functools.partial(windows.limits, cfg))
        got = {m["id"]: (m["display_name"], m["description"], m["max_input_tokens"],
                         m["max_tokens"]) for m in doc["data"]}
        self.assertEqual(list(got)[:4], ["claude-sonnet-4-5-20250929", "claude-opus-5-5",
                                         "claude-sonnet-5-5", "claude-haiku-5-5"])
        self.assertEqual(got["claude-haiku-5-5"], ("Haiku 5.5 → qwen3-8b",
                                                   "qwen3-8b on fast, 32K context", 32768, None))
        self.assertEqual(got["claude-opus-5-5"], ("Opus 5.5 → gpt-4o",
                                                  "gpt-4o on main, 128K context", 128000, 16384))
        self.assertEqual(got["claude-sonnet-4-5-20250929"][0], "Sonnet 4.5 → gpt-4o")
        self.assertEqual(got["qwen3-8b"][0], "qwen3-8b")
        # Claude Code keeps only these ids for its /model picker (2.1.332's filter).
        self.assertTrue(all(re.search("claude|anthropic", i, re.I) for i in list(got)[:4]))
        windows.learn("main", "gpt-4o", 64000)
        doc = ccproxy.models_document(cfg, functools.partial(windows.limits, cfg))
        self.assertEqual(doc["data"][1]["max_input_tokens"], 64000)
        for name, label in (("claude-opus-4-1", "Opus 4.1"), ("claude-opus-5", "Opus 5"),
                            ("claude-haiku-4-5-20251001", "Haiku 4.5"), ("gpt-5", ""),
                            ("claude-x", "")):
            self.assertEqual(ccproxy.claude_label(name), label, name)


def routes_config(providers, routes):
    return ccproxy.build_config({"providers": providers, "routes": routes}, {}, {})


class TestScenarioRouting(unittest.TestCase):
    """Issue #21: a route matches on what the call is, not only on its model name."""

    PROVIDERS = [{"name": n, "type": "openai-compatible", "base_url": "http://127.0.0.1:9",
                  "model": n + "-model"} for n in ("main", "fast", "deep", "long", "vision")]

    def test_config(self):
        cfg = routes_config(self.PROVIDERS, [
            {"when": "long_context", "min_tokens": 60000, "provider": "long", "name": "big"},
            {"match": "*opus*", "when": "thinking", "min_effort": "xhigh", "provider": "deep"},
            {"match": "default", "provider": "main"}])
        self.assertEqual([(r.match, r.when, r.name) for r in cfg.routes],
                         [("", "long_context", "big"), ("*opus*", "thinking", ""),
                          ("default", "", "")])
        for route, words in (({"provider": "main"}, "match must be"),
                             ({"when": "sometimes", "provider": "main"}, "when must be one of"),
                             ({"when": "thinking", "min_effort": "huge", "provider": "main"},
                              "min_effort must be"),
                             ({"when": "long_context", "min_tokens": "lots", "provider": "main"},
                              "min_tokens must be")):
            with self.subTest(route=route), self.assertRaises(ccproxy.ConfigError) as caught:
                routes_config(self.PROVIDERS, [route])
            self.assertIn(words, str(caught.exception))

    def test_each_scenario(self):
        cfg = routes_config(self.PROVIDERS, [{"match": "default", "provider": "main",
                                              "context_window": 32768}])
        route = lambda when, **kw: ccproxy.RouteConfig(match="", provider="x", when=when, **kw)  # noqa
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "AAAA"}}
        tool_image = user([{"type": "tool_result", "tool_use_id": "t", "content": [image]}])
        rows = [
            ("background", {}, [], "claude-haiku-4-5", True),
            ("background", {}, [("x-claude-code-request-class", "auxiliary")], "claude-opus", True),
            ("background", {"output_config": {"format": {"type": "json_schema"}}}, [],
             "claude-opus-5-5", True),
            ("background", {"tools": [{"name": "Bash"}], "output_config": {"format": {}}}, [],
             "claude-opus-5-5", False),
            ("thinking", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"}},
             [], "m", False),
            ("thinking", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}},
             [], "m", True),
            ("thinking", {"thinking": {"type": "enabled", "budget_tokens": 10000}}, [], "m", True),
            ("thinking", {}, [], "m", False),
            ("long_context", {"messages": [user("x" * 200000)]}, [], "m", True),
            ("long_context", {"messages": [user("x" * 1000)]}, [], "m", False),
            ("web_search", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
             [], "m", True),
            ("web_search", {"tools": [{"name": "WebSearch"}]}, [], "m", False),
            ("images", {"messages": [user([image])]}, [], "m", True),
            ("images", {"messages": [tool_image]}, [], "m", True),
            ("images", {"messages": [user("no")]}, [], "m", False),
            ("subagent", {}, [("x-claude-code-agent-id", "a1")], "m", True),
            ("subagent", {}, [("x-claude-code-request-class", "subagent")], "m", True),
            ("subagent", {}, [], "m", False),
        ]
        for when, body, headers, model, expected in rows:
            with self.subTest(when=when, body=str(body)[:60], headers=headers):
                self.assertEqual(ccproxy.in_scenario(route(when), dict({"messages": []}, **body),
                                                     headers_of(headers), model.lower(), cfg),
                                 expected)
        low = route("thinking", min_effort="low")
        self.assertTrue(ccproxy.in_scenario(low, {"thinking": {"type": "adaptive"},
                                                  "output_config": {"effort": "low"}},
                                            headers_of([]), "m", cfg))
        sample = claude_code_body("03-title-generation.request.json")
        if sample is not None:
            self.assertTrue(ccproxy.is_background(None, sample, headers_of([]),
                                                  sample["model"], cfg))
            main = claude_code_body()
            self.assertFalse(ccproxy.is_background(None, main, headers_of([]), main["model"],
                                                   cfg))

    def test_first_match_wins_and_the_users_pick(self):
        cfg = routes_config(self.PROVIDERS, [
            {"when": "background", "provider": "fast", "name": "bg"},
            {"when": "thinking", "provider": "deep"},
            {"match": "*sonnet*", "provider": "long"},
            {"match": "default", "provider": "main"}])
        def choose(model, body=None, headers=()):
            route, why = ccproxy.choose_route(cfg, model, dict({"messages": []}, **(body or {})),
                                              headers_of(headers))
            plan = ccproxy.plan_route(cfg, model, route)
            return plan[0][0].name, plan[0][1], why
        self.assertEqual(choose("claude-haiku-4-5"), ("fast", "fast-model", "background"))
        self.assertEqual(choose("claude-opus-5-5", {"thinking": {"type": "enabled",
                                                                 "budget_tokens": 20000}}),
                         ("deep", "deep-model", "thinking"))
        self.assertEqual(choose("claude-sonnet-5"), ("long", "long-model", "model"))
        self.assertEqual(choose("claude-opus-5-5"), ("main", "main-model", "default"))
        self.assertEqual(choose("vision,llava:13b"), ("vision", "llava:13b", "pick"))
        self.assertEqual(choose("nobody,x")[:2], ("main", "main-model"))
        # Name-only planning (env, count_tokens' provider) never takes a scenario route.
        self.assertEqual(ccproxy.plan_route(cfg, "claude-haiku-4-5")[0][0].name, "main")

    def test_web_search_on_a_route_that_cannot_search(self):
        """Claude Code's WebSearch call (the server tool alone) is answered here with
        Anthropic's shape for a failed search, not sent upstream without its tool."""
        search = dict(BODY, messages=[user("Perform a web search for the query: ccproxy")],
                      tools=[{"type": "web_search_20250305", "name": "web_search",
                              "max_uses": 8}])
        self.assertTrue(ccproxy.search_only(search))
        self.assertFalse(ccproxy.search_only(dict(search, tools=search["tools"] + [
            {"name": "Bash", "input_schema": {"type": "object"}}])))
        with FakeUpstream() as up, Proxy(openai_provider(up.url)) as px:
            resp, out = px.call("POST", "/v1/messages", search)
            message = json.loads(out)
            self.assertEqual([b["type"] for b in message["content"]],
                             ["server_tool_use", "web_search_tool_result", "text"])
            self.assertEqual(message["content"][0]["input"], {"query": "ccproxy"})
            self.assertEqual(message["content"][1]["content"]["error_code"], "unavailable")
            self.assertEqual(message["content"][1]["tool_use_id"], message["content"][0]["id"])
            resp, out = px.call("POST", "/v1/messages", dict(search, stream=True))
            events = parse_events(out)
            starts = [e["content_block"]["type"] for e in events
                      if e["type"] == "content_block_start"]
            self.assertEqual(starts, ["server_tool_use", "web_search_tool_result", "text"])
            self.assertEqual([e["type"] for e in events][-2:], ["message_delta", "message_stop"])
            self.assertEqual(up.requests, [])
        with FakeUpstream() as up, Proxy(one_provider(up.url)) as px:     # Anthropic searches
            px.call("POST", "/v1/messages", search)
            self.assertEqual(len(up.requests), 1)

    SEARCH = dict(BODY, messages=[user("Perform a web search for the query: ccproxy")],
                  tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 8,
                          "allowed_domains": ["github.com"]}])
    CITES = [{"type": "url_citation", "url_citation": {
        "url": "https://github.com/x/ccproxy", "title": "x/ccproxy", "content": "a proxy",
        "start_index": 0, "end_index": 10}}]

    @staticmethod
    def openrouter_search(h, body):
        """OpenRouter as its web search guide has it: the web plugin runs the search,
        the answer carries url_citation annotations (in a late delta when streamed)."""
        doc = json.loads(body)
        if doc.get("plugins") != [{"id": "web", "include_domains": ["github.com"]}] or (
                "tools" in doc):
            return h.reply(400, {"error": {"message": "expected the web plugin alone"}})
        cites = TestScenarioRouting.CITES
        if not doc.get("stream"):
            return h.reply(200, reply({"role": "assistant", "content": "ccproxy is a proxy.",
                                       "annotations": cites}))
        h.start_stream()
        for data in (chunk({"role": "assistant", "content": "ccproxy is "}),
                     chunk({"content": "a proxy."}), chunk({"annotations": cites}),
                     chunk(finish="stop"), "data: [DONE]\n\n"):
            h.chunk(data.encode())
        h.chunk(b"")

    def test_web_search_through_openrouters_web_plugin(self):
        """A provider that can search (OpenRouter's web plugin) runs Claude Code's
        WebSearch: the answer is Anthropic's search shape, with the cited pages."""
        with FakeUpstream(self.openrouter_search) as up, \
                Proxy(openai_provider(up.url, ptype="openrouter")) as px:
            resp, out = px.call("POST", "/v1/messages", self.SEARCH)
            message = json.loads(out)
            self.assertEqual(resp.status, 200, out)
            self.assertEqual([b["type"] for b in message["content"]],
                             ["server_tool_use", "web_search_tool_result", "text"])
            self.assertEqual(message["content"][0]["input"], {"query": "ccproxy"})
            self.assertEqual([(r["url"], r["title"]) for r in message["content"][1]["content"]],
                             [("https://github.com/x/ccproxy", "x/ccproxy")])
            self.assertEqual(message["usage"]["server_tool_use"], {"web_search_requests": 1})
            resp, out = px.call("POST", "/v1/messages", dict(self.SEARCH, stream=True))
            blocks = check_grammar(self, parse_events(out))
            self.assertEqual([b["type"] for b in blocks],
                             ["server_tool_use", "text", "web_search_tool_result"])
            self.assertEqual(json.loads(blocks[0]["json"]), {"query": "ccproxy"})
            self.assertEqual(blocks[1]["text"], "ccproxy is a proxy.")
            self.assertEqual(blocks[2]["tool_use_id"], blocks[0]["id"])
            self.assertEqual(blocks[2]["content"][0]["url"], "https://github.com/x/ccproxy")
            self.assertEqual(len(up.requests), 2)
        # Any other call on that route: no plugin, no search cost.
        body, _ = to_openai({"messages": [user("hi")]}, ptype="openrouter")
        self.assertNotIn("plugins", body)

    def test_end_to_end_each_call_lands_where_the_config_says(self):
        fakes = [FakeUpstream(lambda h, body, n=n: h.reply(200, reply({"content": n})))
                 for n in ("main", "fast", "deep", "long")]
        with contextlib.ExitStack() as stack:
            for fake in fakes:
                stack.enter_context(fake)
            providers = [{"name": n, "type": "openai-compatible", "base_url": f.url,
                          "model": n + "-model"} for n, f in zip(
                              ("main", "fast", "deep", "long"), fakes)]
            cfg = dataclasses.replace(routes_config(providers, [
                {"when": "background", "provider": "fast", "name": "background"},
                {"when": "thinking", "provider": "deep", "name": "thinking"},
                {"when": "long_context", "min_tokens": 20000, "provider": "long", "name": "long"},
                {"match": "default", "provider": "main", "name": "default"}]), port=0)
            calls = [("claude-haiku-4-5", {}, "fast"),
                     ("claude-opus-5-5", {"thinking": {"type": "adaptive"},
                                          "output_config": {"effort": "max"}}, "deep"),
                     ("claude-opus-5-5", {"messages": [user("word " * 30000)]}, "long"),
                     ("claude-opus-5-5", {}, "main"),
                     ("main,other-model", {}, "main")]
            with Proxy(cfg) as px, self.assertLogs("ccproxy", "INFO") as logs:
                for model, extra, answered in calls:
                    with self.subTest(model=model, extra=str(extra)[:40]):
                        resp, out = px.call("POST", "/v1/messages", dict(BODY, model=model,
                                                                         **extra))
                        self.assertEqual((resp.status, json.loads(out)["content"][0]["text"]),
                                         (200, answered))
                        self.assertEqual(json.loads(out)["model"], model)
                status = json.loads(px.call("GET", "/status")[1])
                metrics = px.call("GET", "/metrics")[1].decode()
        self.assertEqual(json.loads(fakes[0].requests[-1]["body"])["model"], "other-model")
        lines = [l for l in logs.output if "POST /v1/messages" in l]
        self.assertIn("route=messages rule=thinking reason=thinking provider=deep", lines[1])
        self.assertIn("rule=pick reason=pick provider=main", lines[4])
        self.assertEqual({r["name"]: r["calls"] for r in status["routes"]}, {
            "background": {"background": 1}, "thinking": {"thinking": 1},
            "long": {"long_context": 1}, "default": {"default": 1}, "pick": {"pick": 1}})
        self.assertIn('ccproxy_routed_requests_total{rule="long",reason="long_context"} 1',
                      metrics)


class TestTranslationErrorsAndTokens(unittest.TestCase):
    """Cases 36-44."""

    def test_36_to_38_error_mapping(self):
        status, headers, body = ccproxy.map_upstream_error(
            429, headers_of([("retry-after", "7")]), b'{"error":{"message":"slow"}}', "r", False)
        self.assertEqual((status, dict(headers)["retry-after"]), (429, "7"))
        self.assertEqual(json.loads(body)["error"]["type"], "rate_limit_error")
        overflow = json.dumps({"error": {"message": "This model's maximum context length is "
                                         "128000 tokens", "code": "context_length_exceeded"}})
        status, headers, body = ccproxy.map_upstream_error(400, headers_of([]),
                                                           overflow.encode(), "r", False)
        self.assertEqual(status, 400)
        self.assertTrue(json.loads(body)["error"]["message"].startswith("prompt is too long"))
        self.assertEqual(dict(headers)["x-should-retry"], "false")
        gemini = json.dumps([{"error": {"code": 429, "message": "Resource has been exhausted",
                                        "status": "RESOURCE_EXHAUSTED"}}]).encode()
        status, _, body = ccproxy.map_upstream_error(429, headers_of([]), gemini, "g", False)
        self.assertIn("Resource has been exhausted", json.loads(body)["error"]["message"])
        openrouter = json.dumps({"error": {"message": "Provider returned error", "metadata": {
            "raw": "upstream said no", "provider_name": "Mistral"}}}).encode()
        _, _, body = ccproxy.map_upstream_error(502, headers_of([]), openrouter, "o", False)
        self.assertIn("Mistral: upstream said no", json.loads(body)["error"]["message"])

    def test_43_count_tokens_estimate(self):
        tools = [{"name": "Read", "description": "reads", "input_schema": {"type": "object"}}]
        body = {"model": "m", "messages": [user("hi")], "tools": tools}
        compact = len(json.dumps(tools[0], separators=(",", ":")).encode())
        base = ccproxy.estimate_input_tokens(body)
        self.assertGreaterEqual(base, compact / 4 + 304)
        with_image = {"model": "m", "messages": [user([{"type": "text", "text": "hi"}, IMAGE])],
                      "tools": tools}
        self.assertEqual(ccproxy.estimate_input_tokens(with_image) - base, 1334)

    def test_image_sizes(self):
        gif = b"GIF89a" + (300).to_bytes(2, "little") + (200).to_bytes(2, "little")
        jpeg = (b"\xff\xd8\xff\xe0\x00\x04ab\xff\xc0\x00\x11\x08" + (480).to_bytes(2, "big") +
                (640).to_bytes(2, "big") + b"\x03")
        webp = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x00" * 8 + (99).to_bytes(3, "little") + \
            (49).to_bytes(3, "little")
        for data, size in ((gif, (300, 200)), (jpeg, (640, 480)), (webp, (100, 50)),
                           (b"nope", None)):
            self.assertEqual(ccproxy.image_size(data), size)
        big = {"type": "base64", "data": base64.b64encode(
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (4000).to_bytes(4, "big") +
            (3000).to_bytes(4, "big")).decode()}
        self.assertLessEqual(ccproxy.image_tokens(big), 1534)     # scaled to 1.15 MP
        self.assertEqual(ccproxy.image_tokens({"type": "url", "url": "u"}), 1600)
        pdf = base64.b64encode(b"%PDF /Type /Pages /Type /Page x /Type/Page").decode()
        self.assertEqual(ccproxy.pdf_tokens({"type": "base64", "data": pdf}), 4000)

    def test_calibration(self):
        cal = ccproxy.Calibration()
        self.assertEqual(cal.scale("r", 100), 100)
        for _ in range(50):
            cal.learn("r", 100, 150)
        self.assertAlmostEqual(cal.ratio("r"), 1.5, places=2)
        for _ in range(50):
            cal.learn("r", 100, 10000)
        self.assertEqual(cal.ratio("r"), 2.0)
        self.assertEqual(cal.ratio("other"), 1.0)

    def test_44_passthrough_strips_only_ccproxy_thinking(self):
        genuine = {"type": "thinking", "thinking": "t", "signature": "EqQBCkgIARABGAIiQ"}
        body = {"model": "m", "messages": [user("hi"), assistant([
            genuine, {"type": "thinking", "thinking": "x", "signature": "ccproxy:r:0123"},
            {"type": "text", "text": "ok"}])]}
        clean, changed = ccproxy.sanitize_for_anthropic(body)
        self.assertTrue(changed)
        self.assertEqual(clean["messages"][1]["content"], [genuine, {"type": "text", "text": "ok"}])


def openai_provider(url, ptype="openai", **kw):
    kw.setdefault("model", "gpt-4o")
    return config(providers=(ccproxy.ProviderConfig(name="oa", type=ptype, base_url=url,
                                                    api_key="sk-up", **kw),))


def sse_behave(text, status=200):
    """A fake OpenAI upstream answering every call with `text` as an SSE body."""
    def behave(h, body):
        if status != 200:
            return h.reply(status, text)
        h.start_stream()
        for piece in text.split("\n\n"):
            if piece:
                h.chunk((piece + "\n\n").encode())
        h.chunk(b"")
    return behave


class TestTranslationEndToEnd(unittest.TestCase):
    """Through the daemon's handler to a fake OpenAI upstream on loopback."""

    def stream(self, text, body=None, ptype="openai"):
        with FakeUpstream(sse_behave(text)) as up, Proxy(openai_provider(up.url, ptype)) as px:
            resp, out = px.call("POST", "/v1/messages?beta=true",
                                body or dict(BODY, stream=True, tools=[
                                    {"name": "Read", "input_schema": {"type": "object"}}]),
                                {"x-api-key": "client", "anthropic-beta": "x"})
            sent = up.requests[0]
        return resp, out, sent

    def test_repeated_members_are_shared_and_never_changed(self):
        """Every request gets the same tools and system objects from MemberCache: a
        translation that changed one in place would change the next request's."""
        schema = {"type": "object", "$schema": "x", "required": ["a", "gone"], "properties": {
            "a": {"type": ["string", "null"], "const": "x", "format": "uri"},
            "b": {"oneOf": [{"type": "integer", "exclusiveMinimum": 0, "enum": [1]}]}}}
        body = dict(BODY, stream=True, tools=[
            {"name": "T%d" % i, "description": "d" * 100, "input_schema": schema}
            for i in range(8)], system=[
            {"type": "text", "text": "x" * 2000, "cache_control": {"type": "ephemeral"}}])
        stream = chunk({"content": "hi"}) + chunk(finish="stop") + "data: [DONE]\n\n"
        for make_config in (one_provider, lambda url: openai_provider(url, "openai"),
                            lambda url: openai_provider(url, "gemini")):
            behave = None if make_config is one_provider else sse_behave(stream)
            with FakeUpstream(behave) as up, Proxy(make_config(up.url)) as px:
                for _ in range(2):
                    resp, _ = px.call("POST", "/v1/messages", body)
                    self.assertEqual(resp.status, 200)
                seen = px.service.members._seen
            self.assertEqual(sorted(seen), ["system", "tools"])
            for source, value in seen["tools"] + seen["system"]:
                self.assertEqual(value, json.loads(source))
            self.assertEqual(seen["tools"][0][1], body["tools"])

    def test_text_stream_and_what_the_upstream_saw(self):
        resp, out, sent = self.stream(chunk({"content": "Hi"}) + chunk(finish="stop") +
                                      chunk(usage={"prompt_tokens": 9, "completion_tokens": 1},
                                            choices=False) + "data: [DONE]\n\n")
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.getheader("Content-Type"), "text/event-stream; charset=utf-8")
        events = parse_events(out)
        self.assertEqual(check_grammar(self, events)[0]["text"], "Hi")
        self.assertEqual(events[-2]["usage"]["input_tokens"], 9)
        self.assertEqual(sent["path"], "/chat/completions")
        self.assertEqual(sent["headers"]["authorization"], "Bearer sk-up")
        for leaked in ("x-api-key", "anthropic-beta"):
            self.assertIsNone(sent["headers"][leaked])
        doc = json.loads(sent["body"])
        self.assertEqual((doc["model"], doc["stream"]), ("gpt-4o", True))

    def test_a_whole_crlf_stream_in_one_read(self):
        # The head goes out after the first event; the rest of that read follows.
        text = (": OPENROUTER PROCESSING\r\n\r\n" + "".join(
            chunk({"content": c}) for c in "abc").replace("\n", "\r\n")
            + chunk(finish="stop").replace("\n", "\r\n") + "data: [DONE]\r\n\r\n")
        resp, out, _ = self.stream(text, ptype="openrouter")
        blocks = check_grammar(self, parse_events(out))
        self.assertEqual([b.get("text") for b in blocks], ["abc"])

    def test_a_first_chunk_with_only_the_role(self):
        # OpenAI's first chunk is {"role": "assistant", "content": ""}: no client event.
        resp, out, _ = self.stream(chunk({"role": "assistant", "content": ""}) +
                                   chunk({"content": "Hi"}) + chunk(finish="stop") +
                                   "data: [DONE]\n\n")
        events = parse_events(out)
        self.assertEqual(check_grammar(self, events)[0]["text"], "Hi")
        self.assertEqual(events[-1]["type"], "message_stop")

    def test_one_tool_and_two_interleaved(self):
        resp, out, _ = self.stream(TOOL_TRACE)
        blocks = check_grammar(self, parse_events(out))
        self.assertEqual([b["type"] for b in blocks], ["text", "tool_use", "tool_use"])
        resp, out, _ = self.stream(chunk({"tool_calls": [tc(0, "c1", "Read", '{"p":')]}) +
                                   chunk({"tool_calls": [tc(0, args='"x"}')]}) +
                                   chunk(finish="tool_calls") + "data: [DONE]\n\n")
        events = parse_events(out)
        self.assertEqual(json.loads(check_grammar(self, events)[0]["json"]), {"p": "x"})
        self.assertEqual(events[-2]["delta"]["stop_reason"], "tool_use")

    def test_reasoning_then_text_and_no_usage(self):
        resp, out, _ = self.stream(chunk({"reasoning_content": "r"}) + chunk({"content": "t"}) +
                                   chunk(finish="stop") + "data: [DONE]\n\n")
        events = parse_events(out)
        self.assertEqual([b["type"] for b in check_grammar(self, events)], ["thinking", "text"])
        self.assertGreater(events[-2]["usage"]["input_tokens"], 0)
        self.assertGreater(events[-2]["usage"]["output_tokens"], 0)

    def test_mid_stream_error_and_truncation(self):
        for text in (chunk({"content": "x"}) + 'data: {"error": {"message": "overloaded"}}\n\n',
                     chunk({"content": "x"})):
            with self.subTest(text=text[-40:]):
                resp, out, _ = self.stream(text)
                events = parse_events(out)
                check_grammar(self, events)
                self.assertEqual(events[-1]["type"], "error")

    def test_pings_while_the_upstream_is_silent(self):
        release = threading.Event()
        behave = thinking_upstream([chunk({"content": "x"})], release,
                                   [chunk(finish="stop"), "data: [DONE]\n\n"])
        with unittest.mock.patch.object(ccproxy, "PING_INTERVAL", 0.3), \
                FakeUpstream(behave) as up, Proxy(openai_provider(up.url)) as px:
            conn = px.conn()
            conn.request("POST", "/v1/messages", json.dumps(dict(BODY, stream=True)))
            resp = conn.getresponse()
            received = b""
            while received.count(b"event: ping") < 3:    # message_start's ping + 2
                received += resp.read1(65536)
            release.set()
            received += resp.read()
            conn.close()
        events = parse_events(received)
        self.assertEqual(check_grammar(self, events)[0]["text"], "x")
        self.assertGreaterEqual([e["type"] for e in events].count("ping"), 3)

    def test_a_late_first_event_commits_the_stream_at_the_wait(self):
        # §3.4 S0: after FIRST_EVENT_WAIT the head and message_start go out; an error
        # after that can only be an SSE error event.
        for tail, last in (([chunk({"content": "x"}), chunk(finish="stop"), "data: [DONE]\n\n"],
                            "message_stop"),
                           (['data: {"error": {"code": 429, "message": "slow down"}}\n\n'],
                            "error")):
            with self.subTest(last=last):
                release = threading.Event()
                behave = thinking_upstream([], release, tail)
                with unittest.mock.patch.object(ccproxy, "FIRST_EVENT_WAIT", 0.2), \
                        FakeUpstream(behave) as up, Proxy(openai_provider(up.url)) as px:
                    conn = px.conn()
                    conn.request("POST", "/v1/messages", json.dumps(dict(BODY, stream=True)))
                    started = time.monotonic()
                    resp = conn.getresponse()       # returns only once the head came
                    self.assertLess(time.monotonic() - started, TIMEOUT / 2)
                    self.assertEqual(resp.status, 200)
                    received = resp.read1(65536)
                    self.assertIn(b"event: message_start", received)
                    release.set()
                    received += resp.read()
                    conn.close()
                events = parse_events(received)
                check_grammar(self, events)
                self.assertEqual([e["type"] for e in events].count("message_start"), 1)
                self.assertEqual(events[-1]["type"], last)

    def test_39_error_as_first_event_is_a_plain_http_error(self):
        resp, out, _ = self.stream('data: {"error": {"code": 429, "message": "rate limit"}}\n\n')
        self.assertEqual(resp.status, 529)
        self.assertEqual(resp.getheader("Content-Type"), "application/json")
        self.assertEqual(json.loads(out)["error"]["type"], "overloaded_error")

    def test_upstream_http_errors_and_refused(self):
        with FakeUpstream(sse_behave(json.dumps({"error": {"message": "slow"}}), 429)) as up:
            with Proxy(openai_provider(up.url)) as px:
                resp, out = px.call("POST", "/v1/messages", BODY)
        self.assertEqual((resp.status, json.loads(out)["error"]["type"]),
                         (429, "rate_limit_error"))
        url = "http://127.0.0.1:%d/v1" % free_port()
        with Proxy(openai_provider(url, "ollama")) as px:
            started = time.monotonic()
            resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
            self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual((resp.status, resp.getheader("x-should-retry")), (500, "false"))
        self.assertIn(url + "/chat/completions", json.loads(out)["error"]["message"])

    def test_non_streaming_and_stream_ignored(self):
        doc = reply({"content": "hello"}, usage={"prompt_tokens": 3, "completion_tokens": 1})
        with FakeUpstream(lambda h, b: h.reply(200, doc)) as up:
            with Proxy(openai_provider(up.url)) as px:
                resp, out = px.call("POST", "/v1/messages", BODY)
                msg = json.loads(out)
                self.assertEqual((msg["model"], msg["content"][0]["text"]),
                                 (BODY["model"], "hello"))
                resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
                self.assertEqual(resp.getheader("Content-Type"),
                                 "text/event-stream; charset=utf-8")
                self.assertEqual(check_grammar(self, parse_events(out))[0]["text"], "hello")

    def test_ollama_asks_without_streaming_when_tools_are_present(self):
        doc = reply({"content": "", "tool_calls": [{"function": {"name": "Read",
                                                                  "arguments": {"p": 1}}}]})
        with FakeUpstream(lambda h, b: h.reply(200, doc)) as up:
            with Proxy(openai_provider(up.url, "ollama")) as px:
                resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True, tools=[
                    {"name": "Read", "input_schema": {}}]))
            self.assertNotIn("stream", json.loads(up.requests[0]["body"]))
        events = parse_events(out)
        block = check_grammar(self, events)[0]
        self.assertEqual((block["name"], json.loads(block["json"])), ("Read", {"p": 1}))
        self.assertEqual(events[-2]["delta"]["stop_reason"], "tool_use")

    def test_count_tokens_26_parallel_calls(self):
        with Proxy(openai_provider("http://127.0.0.1:9")) as px:
            results = []

            def one():
                results.append(px.call("POST", "/v1/messages/count_tokens?beta=true",
                                       {"model": "claude-x", "messages": [user("hi")]}))
            threads = [threading.Thread(target=one) for _ in range(26)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
        self.assertEqual(len(results), 26)
        for resp, out in results:
            self.assertEqual(resp.status, 200)
            self.assertGreater(json.loads(out)["input_tokens"], 0)

    def test_models_lists_configured_names(self):
        with Proxy(openai_provider("http://127.0.0.1:9")) as px:
            resp, out = px.call("GET", "/v1/models")
        self.assertEqual([m["id"] for m in json.loads(out)["data"]],
                         list(ccproxy.CLAUDE_FAMILY_NAMES) + ["gpt-4o"])

    @unittest.skipUnless(os.path.isdir(SAMPLES), "../shared/claude-code-wire absent")
    def test_real_claude_code_bodies_translate(self):
        for path in sorted(glob.glob(os.path.join(SAMPLES, "*.request.json"))):
            with open(path) as f:
                sample = json.load(f)
            body = sample.get("body")
            if not isinstance(body, dict) or "messages" not in body:
                continue
            for ptype, model in (("openai", "gpt-5"), ("gemini", "gemini-3-pro"),
                                 ("deepseek", "deepseek-chat"), ("ollama", "qwen3")):
                with self.subTest(sample=os.path.basename(path), ptype=ptype):
                    tr = translation(ptype, model)
                    out = ccproxy.anthropic_to_openai(body, tr)
                    text = json.dumps(out)
                    for banned in ("cache_control", "x-anthropic-billing-header"):
                        self.assertNotIn(banned, text)
                    self.assertLessEqual(set(out), {
                        "model", "messages", "max_tokens", "max_completion_tokens", "tools",
                        "tool_choice", "stream", "stream_options", "reasoning_effort",
                        "response_format", "temperature"})
                    self.assertNotIn("$schema", json.dumps(out.get("tools", [])))
                    roles = [m["role"] for m in out["messages"]]
                    for i, m in enumerate(out["messages"]):
                        if m.get("tool_calls"):      # every call answered right after
                            ids = [c["id"] for c in m["tool_calls"]]
                            self.assertEqual([x.get("tool_call_id") for x in
                                              out["messages"][i + 1:i + 1 + len(ids)]], ids)
                    self.assertNotIn(("user", "user"), list(zip(roles, roles[1:])))


# ---- Provider health, metrics, check and env -----------------------------------------

METRIC_LINE = re.compile(
    r'^(?:# (?:HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .*'
    r'|[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})?'
    r' (?:[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf)|NaN))$')


class TestMetricsFormat(unittest.TestCase):

    def test_golden_bytes_and_escaping(self):
        families = [
            ("x_requests_total", "counter", 'Requests\nby "code" \\ path.',
             [("", (("code", "200"), ("route", 'a"b\\c\nd')), 3)]),
            ("x_up", "gauge", "Up.", [("", (), 1), ("", (("p", "q"),), 0.5)]),
            ("x_seconds", "histogram", "Latency.",
             ccproxy.histogram_samples((("r", "m"),), (0.1, 1.0), [1, 2], 1.75, 4)),
        ]
        self.assertEqual(ccproxy.render_metrics(families), (
            '# HELP x_requests_total Requests\\nby "code" \\\\ path.\n'
            '# TYPE x_requests_total counter\n'
            'x_requests_total{code="200",route="a\\"b\\\\c\\nd"} 3\n'
            '# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\nx_up{p="q"} 0.5\n'
            '# HELP x_seconds Latency.\n# TYPE x_seconds histogram\n'
            'x_seconds_bucket{r="m",le="0.1"} 1\nx_seconds_bucket{r="m",le="1.0"} 3\n'
            'x_seconds_bucket{r="m",le="+Inf"} 4\nx_seconds_sum{r="m"} 1.75\n'
            'x_seconds_count{r="m"} 4\n'))
        for value, text in ((float("inf"), "+Inf"), (float("-inf"), "-Inf"),
                            (float("nan"), "NaN"), (2, "2"), (0.25, "0.25"), (True, "1")):
            self.assertEqual(ccproxy.format_value(value), text)

    def test_histogram_invariants(self):
        hist = ccproxy.Histogram(ccproxy.DURATION_BUCKETS)
        rng = random.Random(7)
        values = [rng.expovariate(2.0) for _ in range(500)] + [10000.0]
        for v in values:
            hist.observe(v)
        samples = ccproxy.histogram_samples((), hist.buckets, *hist.state())
        buckets = [v for suffix, _, v in samples if suffix == "_bucket"]
        self.assertEqual(buckets, sorted(buckets))                  # cumulative
        self.assertEqual(buckets[-1], len(values))                  # +Inf == _count
        self.assertEqual(samples[-1], ("_count", (), len(values)))
        self.assertAlmostEqual(samples[-2][2], sum(values), places=3)
        les = [dict(labels)["le"] for suffix, labels, _ in samples if suffix == "_bucket"]
        self.assertEqual(les[-1], "+Inf")
        self.assertEqual([float(x) for x in les[:-1]], sorted(float(x) for x in les[:-1]))

    def test_live_scrape_parses_line_by_line(self):
        def behave(h, body):
            if not json.loads(body).get("stream"):
                return h.reply(200, MESSAGE_JSON)
            h.start_stream()
            for frame in STREAM:
                h.chunk(frame)
            h.chunk(b"")
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            px.call("POST", "/v1/messages", BODY)
            px.call("POST", "/v1/messages", dict(BODY, stream=True))
            px.call("GET", "/nope")
            # A request is counted once its access line is written, just after the
            # client has its last byte: the scrape may race the stream's bookkeeping.
            def scrape():
                resp, out = px.call("GET", "/metrics")
                counted = (b'code="200",route="messages"} 2' in out
                           and b'code="404",route="other"} 1' in out)
                return counted and (resp, out)
            resp, out = wait_for(scrape)
        self.assertEqual(resp.getheader("Content-Type"), ccproxy.METRICS_CONTENT_TYPE)
        text = out.decode()
        self.assertTrue(text.endswith("\n"))
        names_typed = []
        for line in text.splitlines():
            self.assertRegex(line, METRIC_LINE)
            if line.startswith("# TYPE"):
                names_typed.append(line.split()[2])
        self.assertEqual(len(names_typed), len(set(names_typed)))   # one group per family
        for name in ("ccproxy_requests_total", "ccproxy_request_duration_seconds",
                     "ccproxy_time_to_first_byte_seconds", "ccproxy_upstream_requests_total",
                     "ccproxy_tokens_total", "ccproxy_inflight_requests", "ccproxy_provider_up",
                     "ccproxy_build_info", "process_start_time_seconds",
                     "ccproxy_config_reload_failures_total"):
            self.assertIn(name, names_typed)
        self.assertIn('ccproxy_requests_total{code="200",route="messages"} 2', text)
        self.assertIn('ccproxy_requests_total{code="404",route="other"} 1', text)
        self.assertIn('ccproxy_upstream_requests_total{provider="up",outcome="ok"} 2', text)
        self.assertIn('ccproxy_tokens_total{provider="up",direction="output"} 2', text)
        self.assertIn('ccproxy_tokens_total{provider="up",direction="input"} 10', text)
        self.assertIn('ccproxy_time_to_first_byte_seconds_count{provider="up"} 1', text)

    def test_metrics_off_and_auth(self):
        with Proxy(config(metrics=False)) as px:
            self.assertEqual(px.call("GET", "/metrics")[0].status, 404)
        service = ccproxy.Service(config())
        handler = SocketlessHandler(request_bytes("GET", "/metrics"), service, "10.0.0.1")
        with self.assertLogs("ccproxy", "INFO"):
            self.assertEqual(parse_response(handler.run())[0], 401)


def print_live_scrape():
    """For `make check-metrics`: some traffic of every kind, then one /metrics scrape."""
    def behave(h, body):
        doc = json.loads(body or b"{}")
        if doc.get("stream"):
            h.start_stream()
            for frame in STREAM:
                h.chunk(frame)
            return h.chunk(b"")
        h.reply(429 if doc.get("max_tokens") == 1 else 200, MESSAGE_JSON)
    with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
        for body in (BODY, dict(BODY, stream=True), dict(BODY, max_tokens=1)):
            px.call("POST", "/v1/messages", body)
        for path in ("/health", "/status", "/nope"):
            px.call("GET", path)
        sys.stdout.write(px.call("GET", "/metrics")[1].decode())


class TestProviderHealth(unittest.TestCase):

    def status_of(self, px, name="up"):
        doc = json.loads(px.call("GET", "/status")[1])
        return doc, next(i for i in doc["providers"]["items"] if i["name"] == name)

    def test_rate_limited_then_connected_again(self):
        answers = [(429, {"error": {"message": "slow"}}, [("retry-after", "1")])]

        def behave(h, body):
            status, doc, headers = answers.pop(0) if answers else (200, MESSAGE_JSON, [])
            h.reply(status, doc, headers + [("anthropic-ratelimit-requests-remaining", "41")])
        with FakeUpstream(behave) as up, Proxy(one_provider(up.url)) as px:
            self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 429)
            doc, item = self.status_of(px)
            self.assertEqual((item["status"], doc["health"], doc["warning"]),
                             ("rate_limited", "degraded", "rate_limited"))
            self.assertEqual(item["rate_limit_remaining"], 41)
            wait_for(lambda: self.status_of(px)[1]["status"] == "connected", timeout=3)
            self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 200)
            doc, item = self.status_of(px)
            self.assertEqual((item["status"], item["requests"], item["errors"]),
                             ("connected", 2, 1))
            self.assertIsNotNone(item["last_check"])

    def test_refused_is_disconnected_and_401_is_auth_failed(self):
        with Proxy(one_provider("http://127.0.0.1:%d" % free_port())) as px:
            px.call("POST", "/v1/messages", BODY)
            doc, item = self.status_of(px)
            self.assertEqual((item["status"], doc["health"], doc["error"]),
                             ("disconnected", "unhealthy", "provider_connection_failed"))
            self.assertEqual(doc["details"], {"provider": "up", "error_code": "connection_failed"})
            self.assertEqual(px.call("GET", "/health")[0].status, 200)      # liveness stays
            self.assertEqual(px.call("GET", "/status/ready")[0].status, 200)  # readiness too
        with FakeUpstream(lambda h, b: h.reply(401, b"no")) as up, Proxy(one_provider(up.url)) as px:
            px.call("POST", "/v1/messages", BODY)
            doc, item = self.status_of(px)
            self.assertEqual((item["status"], doc["error"]), ("auth_failed", "provider_auth_failed"))

    def test_circuit_opens_and_the_fallback_skips_it(self):
        refused = "http://127.0.0.1:%d" % free_port()
        with FakeUpstream() as second:
            cfg = config(providers=(provider_cfg("first", refused), provider_cfg("second",
                                                                                  second.url)),
                         fallback=("first", "second"))
            with Proxy(cfg) as px:
                for _ in range(ccproxy.CIRCUIT_THRESHOLD):
                    self.assertEqual(px.call("POST", "/v1/messages", BODY)[0].status, 200)
                doc, item = self.status_of(px, "first")
                self.assertEqual(item["circuit"], "open")
                with self.assertLogs("ccproxy", "INFO") as logs:
                    px.call("POST", "/v1/messages", BODY)
                    wait_for(lambda: "POST /v1/messages" in "\n".join(logs.output))
                self.assertNotIn("provider=first failed", "\n".join(logs.output))
                self.assertFalse(px.service.stats.available("first"))
                self.assertTrue(px.service.stats.available(
                    "first", time.time() + ccproxy.CIRCUIT_COOLDOWN + 1))

    def test_probe_records_health_without_counting_requests(self):
        with FakeUpstream(lambda h, b: h.reply(200, {"data": []})) as up:
            cfg = config(probe_interval=0.05, providers=(
                provider_cfg("up", up.url, api_key="k"), provider_cfg("keyless", up.url)))
            daemon = ccproxy.Daemon(cfg, None, None, {})
            thread = threading.Thread(target=daemon._probe_loop, daemon=True)
            thread.start()
            wait_for(lambda: "up" in daemon.service.stats.snapshot())
            daemon.stopping.set()
            thread.join(TIMEOUT)
            daemon.close()                          # its pooled probe connection too
            stats = daemon.service.stats.snapshot()
        self.assertEqual((stats["up"]["status"], stats["up"]["requests"]), ("connected", 0))
        self.assertNotIn("keyless", stats)          # clients bring their keys: not probed
        self.assertEqual(up.requests[0]["path"], "/v1/models")
        self.assertEqual(up.requests[0]["headers"]["x-api-key"], "k")


def run_check(cfg):
    """`ccproxy check` on `cfg`: (exit code, what it printed)."""
    args = argparse.Namespace(config=None, host=None, port=None, pid_file=None,
                              log_file=None, log_level=None, allow_remote=None, probe=None)
    # No daemon of this machine's may answer for the one under test.
    cfg = dataclasses.replace(cfg, pid_file=os.path.join(HERE, ".no-such-dir", "c.pid"))
    with unittest.mock.patch.object(ccproxy, "_load", lambda a, e: cfg), \
            contextlib.redirect_stdout(io.StringIO()) as out:
        code = ccproxy.cmd_check(args, {})
    return code, out.getvalue()


class TestCheckAndEnv(unittest.TestCase):

    def check(self, cfg):
        return run_check(cfg)

    def models_upstream(self, status=200, models=("gpt-4o",), num_ctx=None):
        def behave(h, body):
            if h.path.endswith("/api/show"):
                params = "num_ctx %d\ntemperature 1" % num_ctx if num_ctx else "temperature 1"
                return h.reply(200, {"parameters": params})
            h.reply(status, {"data": [{"id": m} for m in models]} if status == 200 else
                    {"error": {"message": "Incorrect API key provided"}})
        return FakeUpstream(behave)

    def test_keyless_local_servers_pass_and_hints_fit_the_type(self):
        """Issue #18: check FAILed the README's keyless vLLM setup, and told an
        Anthropic provider that OpenAI base URLs end in /v1."""
        with self.models_upstream(models=("my-model",)) as vllm:
            code, out = self.check(self.openai_cfg(vllm.url, "openai-compatible", "my-model"))
            self.assertEqual(code, 0, out)
        with FakeUpstream(lambda h, body: h.reply(404, {"error": "no"})) as up:
            code, out = self.check(config(port=free_port(), providers=(
                provider_cfg("a", up.url + "/anthropic", api_key="k"),)))
            self.assertIn("the part before /v1/messages", out)
            self.assertNotIn("/v1)", out)
            code, out = self.check(self.openai_cfg(up.url, "openai-compatible", "m"))
            self.assertIn("usually end in /v1", out)

    def openai_cfg(self, url, ptype="openai", model="gpt-4o", **kw):
        return config(port=free_port(), providers=(ccproxy.ProviderConfig(
            name="p", type=ptype, base_url=url, model=model, **kw),))

    def test_everything_works(self):
        with self.models_upstream() as up:
            code, out = self.check(self.openai_cfg(up.url, api_key="k"))
        self.assertEqual(code, 0, out)
        self.assertIn("model gpt-4o is available", out)
        self.assertTrue(out.strip().endswith("everything works"))
        # Issue #20: a translated route says what auto mode does there.
        self.assertIn("note p (openai, %s): Claude Code's auto mode has no safety "
                      "check here" % up.url, out)

    def test_a_vendor_is_checked_with_the_call_it_serves(self):
        """Issue #22: an Anthropic-compatible vendor has no free model list to probe;
        check makes the one-token call it really serves, with the vendor's rewrites."""
        with vendor_fake("kimi") as fake:
            code, out = self.check(dataclasses.replace(
                vendor_config("kimi", fake.url), port=free_port()))
            self.assertEqual(code, 0, out)
            self.assertEqual(fake.requests[0]["body"]["max_tokens"], 1)
            self.assertTrue(fake.requests[0]["path"].startswith("/v1/messages"))
            code, out = self.check(dataclasses.replace(vendor_config(
                "kimi", fake.url), port=free_port(), providers=(dataclasses.replace(
                    vendor_config("kimi", fake.url).providers[0], api_key="wrong"),)))
            self.assertIn("key rejected (HTTP 401", out)

    def test_clouds_are_checked_with_the_call_they_serve(self):
        with tempfile.TemporaryDirectory() as tmp, vendor_fake(
                "", key="tok-1", vertex="proj/us-east5") as fake:
            code, out = self.check(dataclasses.replace(vertex_config(
                fake.url, token_command(tmp, ("tok-1",))), port=free_port()))
            self.assertEqual(code, 0, out)
            self.assertTrue(fake.requests[0]["path"].endswith(":rawPredict"))
            code, out = self.check(dataclasses.replace(vertex_config(
                fake.url, (sys.executable, "-c", "exit(1)")), port=free_port()))
            self.assertIn("no access token for provider vx from token_command", out)
        fake = bedrock_fake()
        with fake, unittest.mock.patch.object(ccproxy.DIALECTS["bedrock"], "credentials",
                                              ccproxy.AwsCredentials(FAKE_AWS)):
            code, out = self.check(dataclasses.replace(config(providers=(
                ccproxy.ProviderConfig(name="bd", type="bedrock", region="us-east-1",
                                       base_url=fake.url, model="anthropic.m-v1:0"),)),
                port=free_port()))
            self.assertEqual(code, 0, out)
            self.assertEqual(fake.requests[0]["path"], "/model/anthropic.m-v1%3A0/invoke")

    def test_each_failure_is_explained(self):
        with self.models_upstream(status=401) as bad_key, self.models_upstream(
                models=("llama3",)) as other_models, self.models_upstream(
                models=("qwen3",), num_ctx=4096) as small_ollama:
            rows = [
                (self.openai_cfg("http://127.0.0.1:9"), "no key: set api_key, api_key_env or "
                 "api_key_file in its config entry"),
                (self.openai_cfg("http://127.0.0.1:9", key_source="CHEAP_KEY"),
                 "no key: set CHEAP_KEY"),
                (self.openai_cfg(bad_key.url, "openai-compatible"), "the server wants a key "
                 "(HTTP 401: Incorrect API "
                 "key provided)"),
                (self.openai_cfg("http://127.0.0.1:%d/v1" % free_port(), api_key="k"),
                 "unreachable: http://127.0.0.1:"),
                (self.openai_cfg(bad_key.url, api_key="k"), "key rejected (HTTP 401: "
                 "Incorrect API key provided)"),
                (self.openai_cfg(other_models.url, api_key="k"),
                 "model gpt-4o is not listed by the provider (it lists: llama3)"),
                (self.openai_cfg(small_ollama.url + "/v1", "ollama", "qwen3"),
                 "model qwen3 is served with a 4096-token context"),
            ]
            for cfg, expected in rows:
                with self.subTest(expected=expected):
                    code, out = self.check(cfg)
                    self.assertEqual(code, 1, out)
                    self.assertIn(expected, out)
                    self.assertIn("FAIL", out)

    def test_port_in_use_by_a_ccproxy_or_by_another_program(self):
        with Proxy(config()) as px:
            cfg = dataclasses.replace(self.openai_cfg("http://127.0.0.1:9", api_key="k"),
                                      port=px.port)
            status, text = ccproxy.check_port(cfg)
        self.assertEqual(status, "ok")
        self.assertIn("served by ccproxy pid %d" % os.getpid(), text)
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            cfg = config(port=other.getsockname()[1])
            status, text = ccproxy.check_port(cfg)
        self.assertEqual(status, "problem")
        self.assertIn("in use by another program", text)

    def test_env_output_evaluated_by_a_shell(self):
        """The shell has the user's own ANTHROPIC_API_KEY.  Where the proxy forwards it,
        it stays; elsewhere the key goes in ANTHROPIC_AUTH_TOKEN and ANTHROPIC_API_KEY is
        unset, or interactive Claude Code asks about "a custom API key" (issue #18)."""
        rows = [  # environment, (base URL, API key, auth token, tool search)
            ({}, ("http://127.0.0.1:PORT", "users-own", "", "")),
            ({"CCPROXY_PROVIDER": "ollama"}, ("http://127.0.0.1:PORT", "", "ccproxy", "false")),
            ({"CCPROXY_UPSTREAM_API_KEY": "sk-up"}, ("http://127.0.0.1:PORT", "", "ccproxy", "")),
            ({"CCPROXY_API_KEY": "k 'quoted' $x", "CCPROXY_HOST": "0.0.0.0",
              "CCPROXY_UPSTREAM_API_KEY": "sk-up"},
             ("http://127.0.0.1:PORT", "", "k 'quoted' $x", ""))]
        with tempfile.TemporaryDirectory() as tmp:
            for env, expected in rows:
                with self.subTest(env=env):
                    port = free_port()
                    full = dict({k: v for k, v in os.environ.items() if not k.startswith(
                        ("CCPROXY_", "ANTHROPIC_", "XDG_"))}, HOME=tmp, ANTHROPIC_API_KEY=
                        "users-own", CCPROXY_PID_FILE=os.path.join(tmp, "c.pid"),
                        CCPROXY_PORT=str(port), **env)
                    script = ('eval "$(%s %s env)" && printf "%%s\\n" "$ANTHROPIC_BASE_URL" '
                              '"$ANTHROPIC_API_KEY" "$ANTHROPIC_AUTH_TOKEN" '
                              '"$CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC" "$ENABLE_TOOL_SEARCH"'
                              % (shlex.quote(sys.executable), shlex.quote(SCRIPT)))
                    out = subprocess.run(["sh", "-c", script], env=full, capture_output=True,
                                         text=True, timeout=30)
                    self.assertEqual(out.returncode, 0, out.stderr)
                    base, key, token, traffic, search = out.stdout.split("\n")[:5]
                    self.assertEqual((base, key, token, search), (
                        expected[0].replace("PORT", str(port)),) + expected[1:])
                    self.assertEqual(traffic, "1")
                    self.assertIn("no ccproxy is running", out.stderr)


# ---- Hardening: limits, slow clients, faults, hostile input ---------------------------

LONE = "cut \\ud83d"          # as JSON text: what Claude Code sends for a half emoji


def surrogate_body(stream=False):
    """Claude Code's request with a lone surrogate in every text position, as raw JSON."""
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    text = json.dumps({
        "model": "claude-sonnet-5-5", "max_tokens": 100, "stream": stream,
        "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "U"}, "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "medium"}, "tool_choice": {"type": "auto"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "tools": [{"name": "T", "description": "D", "input_schema": {
            "type": "object", "properties": {"p": {"type": "string", "description": "P"}}}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "M"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "K", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "T", "input": {"p": "I"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "R"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}},
                {"type": "document", "source": {"type": "text", "data": "R"}}]}]})
    for marker in "SUDPMKIR":
        text = text.replace('"%s"' % marker, '"%s %s"' % (marker, LONE))
    return text.replace('"name": "T"', '"name": "T\\udc00"').encode()


class TestProbe(unittest.TestCase):
    """`check --probe` (issue #26): the flags a provider needs, from tiny calls."""

    #: (fake's quirk, flags in the config, flags the probe must ask for, what it reads
    #: with no flag): each fake shows one quirk (e2e/fake_openai.py).
    CASES = (
        ("", {}, {}, set()),
        ("ollama", {}, {}, {"arguments as objects", "calls without index",
                            "calls without ids"}),
        ("no-index", {}, {}, {"calls without index", "calls without ids"}),
        ("zero-index", {}, {}, {"every call on index 0"}),
        ("repeat-ids", {}, {}, {"repeated ids"}),
        ("reasons", {"reasoning": "reasoning_effort"}, {}, {"reasoning in reasoning_content"}),
        ("reasoning-field", {"reasoning": "reasoning_effort"}, {}, {"reasoning in reasoning"}),
        ("reasons", {}, {"reasoning": "reasoning_effort"}, {"reasoning in reasoning_content"}),
        ("think", {}, {}, set()),                    # openai-compatible has think_tags
        ("think", {"think_tags": False}, {"think_tags": True}, set()),
        ("usage-opt-in", {}, {}, set()),
        ("usage-opt-in", {"stream_options": False}, {"stream_options": True}, set()),
        ("completion-tokens", {}, {"token_param": "max_completion_tokens"}, set()),
        ("no-stream-options", {}, {"stream_options": False}, set()),
        ("no-required", {}, {"no_required": True}, set()),
        ("no-named", {}, {"no_named_choice": True}, set()),
        ("no-parallel-flag", {}, {"no_parallel_flag": True}, set()),
        ("choice-none-ignored", {}, {"no_choice_none": True}, set()),
        ("no-vision", {"send_user": True}, {"no_vision": True}, set()),
        ("stream-drops-tools", {}, {"stream_tools": False}, set()),
        ("image-404", {}, {"no_vision": True}, set()),
        ("text-only", {}, {"no_vision": True}, set()),
        ("no-effort", {"reasoning": "reasoning_effort"}, {"reasoning": ""}, set()),
        ("mistral-ids", {}, {"tool_id_style": "alnum9"}, set()),
        ("content-string", {}, {"empty_content_as_string": True}, set()),
        ("reasons", {"reasoning": "reasoning_effort", "reasoning_models": r"^o\d"},
         {"reasoning_models": r"^o\d|^fake\-model$"}, {"reasoning in reasoning_content"}),
        ("echo-needed", {"reasoning": "reasoning_effort"},
         {"reasoning_echo": "reasoning_content"}, {"reasoning in reasoning_content"}),
        ("echo-needed", {}, {"reasoning": "reasoning_effort",
                             "reasoning_echo": "reasoning_content"},
         {"reasoning in reasoning_content"}),
    )

    def probe(self, fake, quirks, name="", probe=True):
        """Write a config for `fake` with `quirks`, run `check --probe`: (exit code,
        output, the snippet it printed as a dict or None)."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "config.json")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump({"port": free_port(), "pid_file": os.path.join(folder, "p.pid"),
                       "providers": [{"name": "local", "type": "openai-compatible",
                                      "base_url": fake.url, "api_key": "sk-probe-secret-1",
                                      "model": "fake-model", "context_window": 32768,
                                      "quirks": quirks}]}, f)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = ccproxy.main(["check", "-c", path] + ["--probe"] * probe + (
                [name] if name else []), {})
        text = out.getvalue()
        self.assertNotIn("sk-probe-secret-1", text)
        snippet = re.search(r'(?m)^     ("quirks": .*)$', text)
        return code, text, json.loads("{%s}" % snippet.group(1))["quirks"] if snippet else None

    def test_each_quirk_gets_exactly_its_flags_and_the_printed_config_passes(self):
        module = e2e_module("fake_openai")
        for quirk, configured, needed, handled in self.CASES:
            with self.subTest(quirk=quirk, configured=configured):
                fake = module.FakeOpenAI(quirk=quirk).start()
                self.addCleanup(fake.stop)
                code, text, snippet = self.probe(fake, configured)
                read = re.search(r"read with no flag: (.*)", text)
                self.assertEqual(set(read.group(1).split(", ")) if read else set(), handled)
                if not needed:
                    self.assertEqual((code, snippet), (ccproxy.EXIT_OK, None), text)
                    self.assertIn("no quirk flag to add", text)
                    continue
                self.assertEqual(code, ccproxy.EXIT_FAIL, text)
                self.assertEqual(snippet, dict(configured, **needed), text)
                again, text, left = self.probe(fake, snippet)
                self.assertEqual((again, left), (ccproxy.EXIT_OK, None), text)
                self.assertIn("everything works", text)

    def test_plan_said_before_the_first_call_and_tokens_after(self):
        fake = e2e_module("fake_openai").FakeOpenAI().start()
        self.addCleanup(fake.stop)
        code, text, _ = self.probe(fake, {}, "local")
        plan = text.index("probing with 11 tiny calls to fake-model (up to 24 where one "
                          "needs another try): about 150 input tokens each, at most 2784 "
                          "output tokens in all (256 for a reasoning call)")
        self.assertLess(plan, text.index("plain text: answered"))
        self.assertEqual(set(ccproxy.PROBE_TRIES), set(ccproxy.PROBE_BODIES))
        self.assertRegex(text, r"the probe made 12 calls: \d+ input and \d+ output tokens")
        self.assertEqual([r["path"] for r in fake.requests], ["/v1/chat/completions"] * 12)
        self.assertEqual(code, ccproxy.EXIT_OK)

    def test_without_probe_no_call_is_made_and_unknown_names_are_refused(self):
        fake = e2e_module("fake_openai").FakeOpenAI().start()
        self.addCleanup(fake.stop)
        code, text, _ = self.probe(fake, {}, "nobody")
        self.assertEqual(code, ccproxy.EXIT_FAIL)
        self.assertIn("--probe \"nobody\": no such provider (providers: local)", text)
        code, text, _ = self.probe(fake, {}, probe=False)
        self.assertEqual(code, ccproxy.EXIT_OK, text)
        self.assertNotIn("probe", text)
        self.assertEqual(fake.requests, [])

    def test_only_chat_routes_are_probed(self):
        provider = ccproxy.ProviderConfig(name="a", type="anthropic",
                                          base_url="http://127.0.0.1:9", api_key="k")
        lines = ccproxy.probe_provider(config(providers=(provider,)), provider, None)
        self.assertEqual(lines, [("note", "not probed: its flags are for OpenAI-style "
                                  "Chat routes only")])
        keyless = ccproxy.ProviderConfig(name="g", type="groq", model="m",
                                         base_url="http://127.0.0.1:9")
        self.assertEqual(ccproxy.probe_provider(config(providers=(keyless,)), keyless, None),
                         [("note", "not probed: no key")])

    def test_raw_facts(self):
        def delta(**d):
            return {"choices": [{"index": 0, "delta": d}]}

        def start(index, tool_id, **fn):
            call = {"function": dict({"name": "ping", "arguments": ""}, **fn)}
            call.update({} if index is None else {"index": index})
            call.update({} if tool_id is None else {"id": tool_id})
            return call
        table = (
            ([delta(content="hi")], set()),
            ([delta(content=" <think>x</think>hi")], {"reasoning in <think> tags"}),
            ([delta(content="hi <think>")], set()),
            ([delta(reasoning_content="r")], {"reasoning in reasoning_content"}),
            ([delta(reasoning="r")], {"reasoning in reasoning"}),
            ([delta(reasoning="")], set()),
            ([{"choices": [], "usage": {"prompt_tokens": 1}}], {"usage"}),
            ([{"x_groq": {"usage": {"prompt_tokens": 1}}}], {"usage"}),
            ([delta(tool_calls=[start(0, "a"), start(1, "b")])], set()),
            ([delta(tool_calls=[start(0, "a")]), delta(tool_calls=[start(0, "b")])],
             {"every call on index 0"}),
            ([delta(tool_calls=[start(0, "a"), start(1, "a")])], {"repeated ids"}),
            ([delta(tool_calls=[start(None, "a")])], {"calls without index"}),
            ([delta(tool_calls=[start(0, None)])], {"calls without ids"}),
            ([delta(tool_calls=[start(0, "a", arguments={"n": 1})])], {"arguments as objects"}),
            ([delta(tool_calls=["junk", {"function": "x"}]), "junk", {"choices": "x"}],
             {"calls without index"}),
        )
        for docs, facts in table:
            with self.subTest(docs=docs):
                self.assertEqual(ccproxy.raw_facts(docs, True), facts)
        whole = {"choices": [{"message": {"tool_calls": [start(None, "a")]}}]}
        self.assertEqual(ccproxy.raw_facts([whole], False), set())   # no index: whole

    def test_anthropic_blocks(self):
        tr = translation("openai-compatible", "m")
        st = ccproxy.StreamTranslator(tr)
        chunks = [{"choices": [{"index": 0, "delta": d}]} for d in (
            {"reasoning_content": "hm"}, {"content": "Hi"}, {"tool_calls": [
                {"index": 0, "id": "c", "function": {"name": "ping", "arguments": '{"n"'}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]})]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        sse = st.start() + b"".join(st.feed(json.dumps(c)) for c in chunks) + st.feed(
            "[DONE]") + st.end()
        blocks, usage, error = ccproxy.anthropic_blocks(sse)
        self.assertEqual([(b["type"], b.get("thinking") or b.get("text") or b.get("input"))
                          for b in blocks], [("thinking", "hm"), ("text", "Hi"),
                                             ("tool_use", {"n": 1})])
        self.assertEqual((usage["output_tokens"], error), (3, ""))
        cut = ccproxy.anthropic_blocks(st.start() + ccproxy.StreamTranslator(tr).end())
        self.assertIn("ended early", cut[2])

    def test_snippet_keeps_the_configured_flags(self):
        for configured, fixes, want in (
                ((), {"no_required": True}, '"quirks": {"no_required": true}'),
                ((("send_user", True),), {"no_vision": True},
                 '"quirks": {"no_vision": true, "send_user": true}'),
                ((("stream_options", False),), {"stream_options": True},
                 '"quirks": {"stream_options": true}')):
            self.assertEqual(ccproxy.probe_snippet(configured, fixes), want)

    def test_a_rate_limit_stops_the_probe(self):
        fake = e2e_module("fake_openai").FakeOpenAI().start()
        self.addCleanup(fake.stop)
        real, calls = ccproxy.fetch, []

        def limited(client, method, url, *rest):
            calls.append(url)
            if url.endswith("/chat/completions") and calls.count(url) > 2:
                return 429, 0.0, {}, b'{"error": {"message": "Rate limit reached"}}'
            return real(client, method, url, *rest)
        with unittest.mock.patch.object(ccproxy, "fetch", limited):
            code, text, _ = self.probe(fake, {})
        self.assertEqual(code, ccproxy.EXIT_FAIL)
        self.assertIn("HTTP 429: Rate limit reached; the probe stopped here", text)
        self.assertIn("the probe made 3 calls", text)

    def test_text_only_models_get_no_image(self):
        fake = e2e_module("fake_openai").FakeOpenAI(quirk="text-only").start()
        self.addCleanup(fake.stop)
        code, text, snippet = self.probe(fake, {})
        self.assertIn("its model list says fake-model takes no images", text)
        self.assertNotIn("image_url", json.dumps([r["body"] for r in fake.requests]))

    def test_listed_vision(self):
        def listing(*entries):
            return json.dumps({"data": list(entries)}).encode()
        for body, want in (
                (listing({"id": "m", "architecture": {"input_modalities": ["text", "image"]}}),
                 True),
                (listing({"id": "m", "architecture": {"input_modalities": ["text"]}}), False),
                (listing({"id": "x", "architecture": {"input_modalities": ["text"]}}), None),
                (listing({"id": "m"}), None), (listing("m", None), None),
                (b'{"data": 5}', None), (b"not json", None), (b"[]", None)):
            self.assertIs(ccproxy.listed_vision(body, "m"), want, body)

    def test_refused(self):
        for status, want in ((400, True), (422, True), (401, False), (403, False),
                             (404, True), (429, False), (500, False), ("timeout", False),
                             (200, False)):
            self.assertEqual(ccproxy._refused(status), want, status)


class TestHostileInput(unittest.TestCase):
    """Issue #17: inputs that reached a 500, each now answered as Anthropic does."""

    def test_malformed_heads_are_a_400_naming_only_the_field(self):
        service = ccproxy.Service(config(providers=(provider_cfg("up", "http://127.0.0.1:9"),)))
        service.ready = True
        heads = [  # raw request (Host and Content-Length follow), what the 400 says
            (b"POST /v1/messages?a\x01b HTTP/1.1", "visible ASCII"),
            (b"POST /v1/messages?q=\xc3\xa9 HTTP/1.1", "visible ASCII"),
            (b"POST /v1/messages HTTP/1.1\r\nX-A: 1\rX-Secret: sk-a", "value of X-A"),
            (b"POST /v1/messages HTTP/1.1\r\nX(y): 1", "invalid header name 'X(y)'"),
            (b"POST /v1/messages HTTP/1.1\r\nX\x0bz: 1", "invalid header name 'X\\\\x0bz'"),
            (b"POST /v1/messages HTTP/1.1\r\nX-N: a\x00b", "value of X-N"),
        ]
        body = json.dumps(BODY).encode()
        for head, message in heads:
            with self.subTest(head=head):
                raw = head + b"\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                with self.assertLogs("ccproxy", "INFO") as logs:
                    out = SocketlessHandler(raw, service).run()
                status, _, answer = parse_response(out)
                self.assertEqual(status, 400, answer)
                self.assertIn(message, json.loads(answer)["error"]["message"])
                self.assertNotIn(b"sk-a", answer)
                self.assertEqual(len(logs.output), 1, logs.output)      # no traceback
        for length in ("\xb2", "1\xb9"):          # superscript digits: isdigit() is true
            raw = ("POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{}"
                   % length).encode("latin-1")
            self.assertEqual(parse_response(SocketlessHandler(raw, service).run())[0], 400)
        self.assertEqual(service.stats.snapshot(), {})        # no provider was blamed

    def test_what_fails_here_never_counts_against_the_provider(self):
        """Issue #17: a request that could not be built, or a descriptor shortage, was
        recorded as the provider's failure: three opened its circuit."""
        with FakeUpstream() as up, Proxy(one_provider(up.url)) as px:
            client = px.service.upstreams.client(px.service.config.providers[0])
            with self.assertRaises(ccproxy.HTTPError) as cm:
                client.open("POST", up.url + "/v1/messages", b"{}", [("x-bad", "a\rb")])
            self.assertEqual(cm.exception.status, 400)
            shortage = OSError(errno.EMFILE, "Too many open files")
            with unittest.mock.patch.object(ccproxy.Resolver, "connect", side_effect=shortage):
                for _ in range(ccproxy.CIRCUIT_THRESHOLD + 1):
                    resp, out = px.call("POST", "/v1/messages", BODY)
                    self.assertEqual((resp.status, resp.getheader("Retry-After")), (503, "1"))
                    self.assertEqual(json.loads(out)["error"]["type"], "overloaded_error")
            self.assertTrue(px.service.stats.available("up"))
            self.assertEqual(px.service.stats.snapshot(), {})
            resp, _ = px.call("POST", "/v1/messages", BODY)
            self.assertEqual(resp.status, 200)

    def test_pooled_connections_past_descriptor_1023_are_still_checked(self):
        """select() cannot watch a descriptor above 1023: past a thousand streams no
        pooled connection passed its check, so none was reused."""
        import resource
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 1500:
            self.skipTest("the open-file limit is too low to make descriptor 1500")
        a, b = socket.socketpair()
        os.dup2(a.fileno(), 1500)
        high = socket.socket(fileno=1500)
        try:
            self.assertFalse(ccproxy.readable_now(high))
            b.sendall(b"x")
            self.assertTrue(ccproxy.readable_now(high))
        finally:
            for sock in (a, b, high):
                sock.close()

    def test_the_open_file_limit_is_raised_to_what_max_connections_needs(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = ccproxy.descriptors_needed(config(max_connections=100))
        if hard != resource.RLIM_INFINITY and hard < need:
            self.skipTest("the hard open-file limit is below %d" % need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need - 10, hard))
            self.assertIsNone(ccproxy.raise_descriptor_limit(config(max_connections=100)))
            self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], need)
            if hard != resource.RLIM_INFINITY:
                warning = ccproxy.raise_descriptor_limit(config(max_connections=hard))
                self.assertIn("below the %d that max_connections=%d needs"
                              % (ccproxy.descriptors_needed(config(max_connections=hard)), hard),
                              warning)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_an_upstream_cannot_make_the_proxy_buffer_without_bound(self):
        """Issue #17: a 600 MB reply was read whole; a 100 MB SSE line was copied again
        with every chunk, which pinned a core for minutes."""
        big = dict(MESSAGE_JSON, content=[{"type": "text", "text": "x" * 5000}])
        for make_config in (one_provider, openai_provider):
            with self.subTest(make_config.__name__), \
                    FakeUpstream(lambda h, b: h.reply(200, big)) as up, \
                    Proxy(dataclasses.replace(make_config(up.url), max_reply_bytes=4000)) as px:
                resp, out = px.call("POST", "/v1/messages", BODY)
                self.assertEqual((resp.status, resp.getheader("x-should-retry")), (500, "false"))
                self.assertIn("larger than 4000 bytes (max_reply_bytes)", out.decode())
        huge = "data: " + json.dumps({"choices": [{"delta": {"content": "y" * 5000}}]})
        for before, status in (("", 500), (chunk({"content": "hi"}), 200)):
            with FakeUpstream(sse_behave(before + huge + "\n\n")) as up, Proxy(
                    dataclasses.replace(openai_provider(up.url), max_event_bytes=4000)) as px:
                resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
                self.assertEqual(resp.status, status)
                self.assertIn(b"larger than 4000 bytes (max_event_bytes)", out)
                if status == 200:
                    self.assertEqual(parse_events(out)[-1]["type"], "error")

    def test_long_lines_cost_linear_time(self):
        line = b"data: " + b"z" * (8 << 20)          # 8 MB in 512-byte reads: quadratic
        pieces = [line[i:i + 512] for i in range(0, len(line), 512)] + [b"\n\n"]
        started = time.monotonic()                    # copying would be 64 GB, hours
        parser, scanner = ccproxy.SSEParser(limit=16 << 20), ccproxy.UsageScanner()
        events = [e for piece in pieces for e in parser.feed(piece)]
        for piece in pieces + [b'data: {"type":"message_delta","usage":{"output_tokens":7}}\n']:
            scanner.feed(piece)
        self.assertLess(time.monotonic() - started, 10.0)
        self.assertEqual([len(e) for e in events], [8 << 20])
        self.assertEqual(scanner.output_tokens, 7)

    def test_a_redirect_or_an_html_page_is_no_success(self):
        """Issue #17: relayed as a success, and the provider counted healthy; a client
        that followed the redirect sent its key to the Location host."""
        def html(h):
            h.send_response(200)
            h.send_header("Content-Type", "text/html; charset=utf-8")
            h.send_header("Content-Length", "19")
            h.end_headers()
            h.wfile.write(b"<html>log in</html>")
        answers = {"redirect": lambda h: h.reply(302, b"", [("Location", "http://evil/")]),
                   "html": html}
        for kind, answer in answers.items():
            with self.subTest(kind), FakeUpstream(lambda h, b, a=answer: a(h)) as bad, \
                    FakeUpstream() as good:
                with Proxy(one_provider(bad.url)) as px:
                    resp, out = px.call("POST", "/v1/messages", BODY)
                    self.assertEqual(resp.status, 502, out)
                    self.assertIsNone(resp.getheader("Location"))
                    self.assertIn("not an API reply", json.loads(out)["error"]["message"])
                    self.assertEqual(px.service.stats.snapshot()["up"]["status"], "disconnected")
                cfg = config(providers=(provider_cfg("bad", bad.url), provider_cfg(
                    "good", good.url)), fallback=("bad", "good"))
                with Proxy(cfg) as px:
                    resp, out = px.call("POST", "/v1/messages", BODY)
                    self.assertEqual((resp.status, json.loads(out)), (200, MESSAGE_JSON))

    def test_the_clients_query_never_reaches_the_log(self):
        refused = "http://127.0.0.1:%d" % free_port()
        garbage = FakeUpstream(lambda h, b: h.wfile.write(b"garbage\r\n\r\n"))
        with garbage:
            for url in (refused, garbage.url):
                with Proxy(one_provider(url)) as px, self.assertLogs("ccproxy", "INFO") as logs:
                    px.call("POST", "/v1/messages?beta=true&token=QUERY-SECRET", BODY)
                    wait_for(lambda: any("access" in r.__dict__ for r in logs.records))
                self.assertNotIn("QUERY-SECRET", "\n".join(logs.output))

    def test_lone_surrogates_are_carried_through_every_route(self):
        raw = surrogate_body()
        self.assertIn(b"\\ud83d", raw)
        stream = chunk({"content": "ok"}) + chunk(finish="stop") + "data: [DONE]\n\n"
        routes = [("pass-through", one_provider, None),
                  ("pass-through, mapped", lambda u: one_provider(u, model="m2"), None),
                  ("openai", openai_provider, sse_behave(stream)),
                  ("gemini", lambda u: openai_provider(u, "gemini"), sse_behave(stream))]
        for label, make_config, behave in routes:
            with self.subTest(label), FakeUpstream(behave) as up, Proxy(make_config(up.url)) as px:
                for path in ("/v1/messages", "/v1/messages/count_tokens"):
                    resp, out = px.call("POST", path, raw)
                    self.assertEqual(resp.status, 200, out[:300])
                sent = up.requests[0]["body"]
                json.loads(sent)                       # valid JSON the upstream can read
                self.assertIn(b"\\ud83d", sent)       # the text carried, not dropped
                if label == "pass-through":
                    self.assertEqual(sent, raw)        # byte for byte

    def test_an_emoji_split_across_deltas_arrives_whole(self):
        halves = (chunk({"content": "a\ud83d"}) + chunk({"content": "\ude00b"}) +
                  chunk({"reasoning_content": "t\ud83d"}) + chunk({"content": "x"}) +
                  chunk(finish="stop") + "data: [DONE]\n\n")
        self.assertIn("\\ud83d", halves)                # escaped in the upstream's JSON
        events = run_stream(halves)
        blocks = check_grammar(self, events)
        self.assertEqual(events[-1]["type"], "message_stop")
        self.assertEqual([b.get("text", b.get("thinking")) for b in blocks],
                         ["a\U0001f600b", "t\ud83d", "x"])
        tr = translation()
        message = ccproxy.openai_to_anthropic(reply({"content": "end \ud83d"}), tr)
        self.assertIn(b"\\ud83d", ccproxy.json_bytes(message))

class TestSelfProtection(unittest.TestCase):

    def test_slow_drip_client_is_cut_at_the_head_deadline(self):
        with Proxy(config(header_timeout=1.0)) as px:
            sock = socket.create_connection(("127.0.0.1", px.port), timeout=TIMEOUT)
            started, sent = time.monotonic(), 0
            line = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            try:
                for byte in line:
                    sock.sendall(bytes([byte]))
                    sent += 1
                    readable, _, _ = select.select([sock], [], [], 0.5)
                    if readable and sock.recv(1024) == b"":
                        break
            except OSError:
                pass                       # reset by the server: cut off as well
            elapsed = time.monotonic() - started
            sock.close()
        self.assertLess(sent, len(line))
        self.assertLess(elapsed, 3.0)
        self.assertGreaterEqual(elapsed, 0.9)

    def test_keep_alive_idle_is_not_cut_by_the_head_deadline(self):
        with Proxy(config(header_timeout=0.3)) as px:
            conn = px.conn()
            conn.request("GET", "/health")
            conn.getresponse().read()
            time.sleep(0.6)                # idle between requests, longer than the deadline
            conn.request("GET", "/health")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()

    def test_connection_cap_reserve_and_fixed_503(self):
        with unittest.mock.patch.object(ccproxy, "RESERVE_CONNECTIONS", 1):
            with Proxy(config(max_connections=2, header_timeout=30)) as px:
                held = [socket.create_connection(("127.0.0.1", px.port), timeout=TIMEOUT)
                        for _ in range(2)]
                for sock in held:
                    sock.sendall(b"G")     # slow clients holding their slots
                wait_for(lambda: px.server.slots._value == 0)
                extra = px.conn()          # N+1: a reserve slot, probes only
                extra.request("POST", "/v1/messages", json.dumps(BODY))
                resp = extra.getresponse()
                self.assertEqual((resp.status, resp.getheader("Retry-After"),
                                  resp.getheader("Connection")), (503, "1", "close"))
                self.assertEqual(json.loads(resp.read())["error"]["type"], "overloaded_error")
                extra.close()
                wait_for(lambda: px.server.reserve._value == 1)
                probe = px.conn()
                probe.request("GET", "/health")
                self.assertEqual(probe.getresponse().status, 200)
                beyond = socket.create_connection(("127.0.0.1", px.port), timeout=TIMEOUT)
                answer = beyond.recv(65536)   # fixed reply, no thread, before any request
                self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
                self.assertIn(b"Retry-After: 1", answer)
                for sock in held + [beyond]:
                    sock.close()
                probe.close()

    def test_connections_that_never_send_a_byte_give_their_slots_back(self):
        """Issue #17: max_connections plus the reserve of silent sockets made everything
        answer 503 for idle_timeout, probes included."""
        with unittest.mock.patch.multiple(ccproxy, RESERVE_CONNECTIONS=2,
                                          FIRST_REQUEST_WAIT=1.5, RESERVE_FIRST_WAIT=0.2), \
                Proxy(config(max_connections=2)) as px:
            silent = [socket.create_connection(("127.0.0.1", px.port), timeout=TIMEOUT)
                      for _ in range(4)]                  # every slot and the reserve
            wait_for(lambda: (px.server.slots._value, px.server.reserve._value) == (0, 0))
            wait_for(lambda: px.server.reserve._value == 2, timeout=1.0)   # reserve freed
            probe = px.conn()
            probe.request("GET", "/health")
            self.assertEqual(probe.getresponse().status, 200)
            probe.close()
            started = time.monotonic()
            wait_for(lambda: px.server.slots._value == 2, timeout=3.0)
            self.assertGreater(time.monotonic() - started, 0.5)     # the longer wait
            self.assertEqual([s.recv(1) for s in silent], [b""] * 4)   # closed, no reply
            for sock in silent:
                sock.close()

    def test_upstream_reset_and_mid_stream_hang(self):
        def reset(h, body):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
            h.close_connection = True      # close with RST, no response
        with FakeUpstream(reset) as up, Proxy(one_provider(up.url)) as px:
            resp, out = px.call("POST", "/v1/messages", BODY)
        self.assertEqual((resp.status, json.loads(out)["error"]["type"]), (500, "api_error"))
        self.assertIsNone(resp.getheader("x-should-retry"))      # retryable

        release = threading.Event()

        def hang(h, body):
            h.start_stream()
            h.chunk(STREAM[0])
            h.wfile.flush()
            release.wait(TIMEOUT)
        with FakeUpstream(hang) as up, Proxy(one_provider(up.url, read_timeout=0.5)) as px:
            started = time.monotonic()
            conn = px.conn()
            conn.request("POST", "/v1/messages", json.dumps(dict(BODY, stream=True)))
            resp = conn.getresponse()
            self.assertEqual(resp.read1(65536), STREAM[0])
            with self.assertRaises(http.client.IncompleteRead):
                resp.read()
            self.assertLess(time.monotonic() - started, 3.0)
            conn.close()
            release.set()
        oa_hang = chunk({"content": "x"})

        def hang_openai(h, body):
            h.start_stream()
            h.chunk(oa_hang.encode())
            h.wfile.flush()
            release2.wait(TIMEOUT)
        release2 = threading.Event()
        with FakeUpstream(hang_openai) as up:
            cfg = dataclasses.replace(openai_provider(up.url), providers=(dataclasses.replace(
                openai_provider(up.url).providers[0], read_timeout=0.5),))
            with Proxy(cfg) as px:
                resp, out = px.call("POST", "/v1/messages", dict(BODY, stream=True))
            release2.set()
        events = parse_events(out)
        self.assertEqual((events[-1]["type"], events[-1]["error"]["type"]), ("error", "api_error"))
        self.assertIn("timed out", events[-1]["error"]["message"])

    def test_secrets_never_reach_the_logs(self):
        service = ccproxy.Service(config(api_key="sk-proxy-secret"))
        service.ready = True
        secrets = [("x-api-key", "sk-proxy-secret"), ("Authorization", "Bearer sk-bearer-secret"),
                   ("Proxy-Authorization", "Basic cHJveHktc2VjcmV0"), ("Cookie", "s=cookie-secret")]
        previous = ccproxy.log.level
        ccproxy.log.setLevel(logging.DEBUG)
        try:
            for path in ("/status?key=query-secret", "/v1/models", "/nope"):
                handler = SocketlessHandler(request_bytes("GET", path, secrets), service,
                                            "10.0.0.9")
                with self.assertLogs("ccproxy", "DEBUG") as logs:
                    handler.run()
                text = "\n".join(logs.output)
                for secret in ("sk-proxy-secret", "sk-bearer-secret", "cHJveHktc2VjcmV0",
                               "cookie-secret", "query-secret"):
                    self.assertNotIn(secret, text)
        finally:
            ccproxy.log.setLevel(previous)


def random_json(rng, depth=0):
    """Values of every JSON type, shaped now and then like Anthropic or OpenAI fields."""
    kind = rng.randrange(10 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 10 ** 30, 1.5, float("1e308")])
    if kind == 1:
        return rng.choice(["", "x", "<think>", "</think>", "\u00e9\u4e2d", "[DONE]", "tool_use",
                           "text", "image", "user", "assistant", "system", "tool", "\x00"])
    if kind in (2, 3, 4):
        return rng.choice(["a", "stop", "length", "tool_calls", '{"a":', "data: x"])
    if kind in (5, 6):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["type", "text", "content", "role", "id", "name", "input", "tool_use_id",
            "source", "data", "messages", "tools", "system", "model", "thinking", "stream",
            "tool_calls", "function", "arguments", "index", "delta", "choices", "usage",
            "finish_reason", "error", "max_tokens", "tool_choice", "input_schema", "media_type",
            "reasoning_content", "prompt_tokens", "properties", "$ref", "anyOf", "const"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


def random_chunk(rng):
    """An upstream SSE event: mostly chunk-shaped, with random values in every slot."""
    if rng.random() < 0.2:
        return "data: %s\n\n" % json.dumps(random_json(rng))
    delta = {k: random_json(rng) if rng.random() < 0.3 else v for k, v in rng.choice([
        {"content": "x"}, {"reasoning_content": "r"}, {"refusal": "no"},
        {"tool_calls": [tc(rng.choice([0, 1, None]), rng.choice(["a", "b", None]),
                           rng.choice(["T", None]), rng.choice(['{"a', '1}', {"o": 1}, None]))]},
        {"tool_calls": random_json(rng)}]).items()}
    return chunk(delta, rng.choice([None, None, "stop", "tool_calls", "length", "error"]),
                 rng.choice([None, {"prompt_tokens": 5}, random_json(rng)]))


FUZZ_ITERATIONS = int(os.environ.get("CCPROXY_FUZZ_ITERATIONS", "1500"))


def json_paths(doc, path=()):
    """Every position in a JSON document, as a tuple of keys and indices."""
    yield path
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(
        doc, list) else ()
    for key, value in items:
        yield from json_paths(value, path + (key,))


def mutate(rng, doc):
    """`doc` as JSON text (bytes), one position's value replaced by one of another
    shape: another type, a lone surrogate, control characters, or deep nesting (made as
    text: json.dumps cannot write 900 levels)."""
    doc = json.loads(json.dumps(doc))
    path = rng.choice(list(json_paths(doc))[1:])
    value = rng.choice([None, True, 0, -1, 1.5, "", "x\ud83d", [], {}, [1, "a"],
                        {"type": 5}, {"text": []}, "DEEP", "\x00\r\n", 10 ** 30])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    depth = rng.choice([5, 100, 900])
    deep = '{"type":"object","properties":{"p":' * depth + "{}" + "}}" * depth
    return json.dumps(doc).replace('"DEEP"', deep if rng.random() < .5 else
                                   "[" * depth + "]" * depth).encode()


class TestFuzz(unittest.TestCase):
    """Seeded: a failure prints its seed; `make fuzz` runs many more iterations."""

    EXPECTED = (ccproxy.HTTPError, ccproxy.UpstreamReplyError)

    def test_translation_never_raises_unexpectedly(self):
        for seed in range(FUZZ_ITERATIONS):
            rng = random.Random(seed)
            body = random_json(rng)
            body = body if isinstance(body, dict) else {"messages": body}
            body.setdefault("messages", [random_json(rng) for _ in range(rng.randrange(5))])
            ptype = rng.choice(list(ccproxy.PROVIDER_TYPES))
            tr = translation(ptype, rng.choice(["gpt-5", "o3", "deepseek-reasoner", "qwen3"]))
            try:
                ccproxy.anthropic_to_openai(body, tr)
                ccproxy.estimate_input_tokens(body)
                ccproxy.sanitize_for_anthropic(body)
                ccproxy.plan_route(config(), str(body.get("model")))
                reply_doc = random_json(rng)
                ccproxy.openai_to_anthropic(reply_doc if isinstance(reply_doc, dict) else {}, tr)
            except self.EXPECTED:
                pass
            except Exception as exc:
                self.fail("seed %d: %r" % (seed, exc))

    def test_member_cache_reads_as_json_loads_does(self):
        """One cache for all documents, as the daemon has: hits across bodies too."""
        cache = ccproxy.MemberCache(size=3, min_chars=1)
        for seed in range(FUZZ_ITERATIONS):
            rng = random.Random(seed)
            doc = {k: random_json(rng, 1) for k in rng.sample(
                ["tools", "system", "model", "messages"], rng.randrange(5))}
            raw = json.dumps(doc, indent=rng.choice([None, 0, 1]), ensure_ascii=rng.random() < .5,
                             separators=rng.choice([None, (",", ":"), (" ,", " : ")])).encode()
            if rng.random() < 0.3:
                at = rng.randrange(len(raw))
                raw = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:]
            try:
                expected = json.loads(raw)
            except (ValueError, RecursionError):
                expected = None
            if cache.parse(raw) != (expected if isinstance(expected, dict) else None):
                self.fail("seed %d: %r" % (seed, raw[:300]))

    def test_stream_translation_never_raises_unexpectedly(self):
        for seed in range(FUZZ_ITERATIONS):
            rng = random.Random(seed)
            st, parser = ccproxy.StreamTranslator(translation()), ccproxy.SSEParser()
            raw = "".join(random_chunk(rng) for _ in range(rng.randrange(8))).encode()
            if rng.random() < 0.5:
                raw += (chunk(finish="tool_calls") + "data: [DONE]\n\n").encode()
            else:
                raw += bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
            out = st.start()
            try:
                for i in range(0, len(raw), rng.randint(1, 30)):
                    for payload in parser.feed(raw[i:i + 30]):
                        out += st.feed(payload)
                out += st.end()
            except self.EXPECTED as exc:
                out += st.error("api_error", str(exc))
            except Exception as exc:
                self.fail("seed %d: %r" % (seed, exc))
            # Issue #20: whatever the upstream sent, each tool input that was finished
            # parses as one JSON object.
            blocks = check_grammar(self, parse_events(out))
            for block in blocks[:-1] if parse_events(out)[-1]["type"] == "error" else blocks:
                if block["type"] == "tool_use":
                    self.assertIsInstance(json.loads(block["json"]), dict, "seed %d" % seed)

    def test_mutated_claude_code_bodies_are_never_a_500(self):
        """Issue #17: 160 of 1,500 mutated bodies reached a 500.  Each mutation puts a
        value of another JSON type (or a lone surrogate, or deep nesting) at one
        position of a Claude Code body; the real handler parses, plans and translates
        it for each route (the upstream call itself answers 502)."""
        services = [ccproxy.Service(config(providers=(p,))) for p in (
            provider_cfg("up", "http://127.0.0.1:9"),
            provider_cfg("up", "http://127.0.0.1:9", model="m2"),
            ccproxy.ProviderConfig(name="oa", type="openai", base_url="http://127.0.0.1:9",
                                   api_key="k", model="gpt-5"),
            ccproxy.ProviderConfig(name="ge", type="gemini", base_url="http://127.0.0.1:9",
                                   api_key="k", model="gemini-2.5-pro"),
            ccproxy.ProviderConfig(name="ol", type="ollama", base_url="http://127.0.0.1:9"))]
        base = json.loads(surrogate_body(stream=True))
        refuse = lambda *a, **k: (_ for _ in ()).throw(ccproxy.HTTPError(502, "api_error", "x"))
        with unittest.mock.patch.object(ccproxy.Exchange, "_attempt", refuse):
            for seed in range(max(300, FUZZ_ITERATIONS // 4)):
                rng = random.Random(seed)
                raw = mutate(rng, base)
                path = rng.choice(["/v1/messages", "/v1/messages/count_tokens"])
                request = request_bytes("POST", path, [("Content-Length", str(len(raw)))], raw)
                for service in services:
                    logging.disable(logging.CRITICAL)
                    try:
                        out = SocketlessHandler(request, service).run()
                    finally:
                        logging.disable(logging.NOTSET)
                    status = parse_response(out)[0]
                    self.assertNotEqual(status, 500, "seed %d, %s: %s" % (
                        seed, service.config.providers[0].name, raw[:200]))

    def test_request_parser_answers_every_input(self):
        """Random heads and bodies, with control characters, NUL, bare CR and non-ASCII
        bytes put into the query, a header name or a header value (issue #17), through
        the real handler to a healthy pass-through upstream: never a 500."""
        paths = ["/v1/messages", "/v1/messages/count_tokens", "/status", "/health", "/x",
                 "/v1/models", "/%00", "/" + "a" * 300, "/v1/messages?beta=true"]
        with FakeUpstream() as up:
            service = ccproxy.Service(dataclasses.replace(one_provider(up.url),
                                                          max_body_bytes=4096))
            service.ready = True
            for seed in range(max(200, FUZZ_ITERATIONS // 5)):
                rng = random.Random(seed)
                raw = self.random_request(rng, paths)
                logging.disable(logging.CRITICAL)
                try:
                    out = SocketlessHandler(raw, service).run()
                finally:
                    logging.disable(logging.NOTSET)
                if out:
                    status = parse_response(out, "HEAD" if raw.startswith(b"HEAD") else "GET")[0]
                    self.assertNotEqual(status, 500, "seed %d: %r" % (seed, raw[:300]))
            service.upstreams.close()

    @staticmethod
    def random_request(rng, paths):
        body = json.dumps(random_json(rng)).encode() if rng.random() < 0.7 else bytes(
            rng.randrange(256) for _ in range(rng.randrange(64)))
        headers = [("Content-Length", str(len(body) if rng.random() < 0.9 else
                                          rng.choice(["-1", "x", "99999999", "\xb2"])))]
        if rng.random() < 0.1:
            headers.append(("Transfer-Encoding", "chunked"))
        headers.append(("X-Test", "value"))
        raw = request_bytes(rng.choice(["GET", "POST", "HEAD", "PUT", "OPTIONS"]),
                            rng.choice(paths), headers, body)
        if rng.random() < 0.5:                     # one hostile byte in the head
            head_end = raw.index(b"\r\n\r\n")
            at = rng.choice([raw.index(b" ") + 2 + rng.randrange(8),      # the target
                             raw.index(b"X-Test") + rng.randrange(6),      # a field name
                             raw.index(b"value") + rng.randrange(5)])      # a value
            at = min(at, head_end - 1)
            byte = bytes([rng.choice(list(range(32)) + [127, 0xb2, 0xe9, 0xff])])
            raw = raw[:at] + byte + raw[at:]
        if rng.random() < 0.1:
            raw = raw[:rng.randrange(len(raw))]
        return raw


# ---- Lifecycle -------------------------------------------------------------------

class TestPidFile(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "sub", "ccproxy.pid")

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, text):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            f.write(text)

    def test_read_pid_cases(self):
        # gunicorn's test_pidfile cases: no file, garbage, a number.
        self.assertIsNone(ccproxy.read_pid(self.path))
        self.write("a")
        self.assertIsNone(ccproxy.read_pid(self.path))
        self.write("123\n")
        self.assertEqual(ccproxy.read_pid(self.path), 123)

    def test_probe_trusts_the_lock_not_the_number(self):
        self.assertEqual(ccproxy.probe_pid_file(self.path), ("absent", None))
        self.write("%d\n" % os.getpid())      # a live PID, but nobody holds the lock
        self.assertEqual(ccproxy.probe_pid_file(self.path), ("stale", os.getpid()))
        pidfile = ccproxy.PidFile(self.path)
        pidfile.acquire()
        try:
            self.assertEqual(ccproxy.probe_pid_file(self.path), ("running", os.getpid()))
            ccproxy.read_pid(self.path)       # re-reading our own file keeps the lock
            with self.assertRaises(ccproxy.AlreadyRunning) as cm:
                ccproxy.PidFile(self.path).acquire()
            self.assertEqual(cm.exception.pid, os.getpid())
            self.assertEqual(ccproxy.read_pid(self.path), os.getpid())
        finally:
            pidfile.release()
        self.assertFalse(os.path.exists(self.path))

    def test_release_leaves_a_foreign_pid_alone(self):
        pidfile = ccproxy.PidFile(self.path)
        pidfile.acquire()
        self.write("999999\n")
        pidfile.release()
        self.assertEqual(ccproxy.read_pid(self.path), 999999)

    def test_unwritable_location_is_a_clear_error(self):
        self.write("")
        bad = ccproxy.PidFile(os.path.join(self.path, "ccproxy.pid"))   # under a file
        with self.assertRaisesRegex(ccproxy.PidFileError, "pid file .*ccproxy.pid"):
            bad.acquire()

    def test_default_locations(self):
        env = {"RUNTIME_DIRECTORY": "/run/ccproxy", "HOME": "/home/u"}
        self.assertEqual(ccproxy.default_pid_file(env), "/run/ccproxy/ccproxy.pid")
        if os.geteuid() != 0:
            self.assertEqual(ccproxy.default_pid_file({"XDG_RUNTIME_DIR": "/run/user/1"}),
                             "/run/user/1/ccproxy/ccproxy.pid")
            self.assertEqual(ccproxy.default_log_file({"HOME": "/home/u"}),
                             "/home/u/.local/state/ccproxy/ccproxy.log")
        else:
            self.assertEqual(ccproxy.default_pid_file({}), "/run/ccproxy/ccproxy.pid")
        self.assertEqual(ccproxy.default_log_file({"LOGS_DIRECTORY": "/var/log/x"}),
                         "/var/log/x/ccproxy.log")


class NotifyReceiver:
    """A SOCK_DGRAM socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.settimeout(TIMEOUT)
        self.address = address

    def next(self):
        return self.sock.recv(4096).decode()

    def close(self):
        self.sock.close()


class TestSdNotify(unittest.TestCase):

    def test_path_and_abstract_sockets(self):
        with tempfile.TemporaryDirectory() as tmp:
            for address in (os.path.join(tmp, "notify"), "@ccproxy-test-%d" % os.getpid()):
                with self.subTest(address=address):
                    rx = NotifyReceiver(address)
                    try:
                        self.assertTrue(ccproxy.sd_notify("READY=1", {"NOTIFY_SOCKET": address}))
                        self.assertEqual(rx.next(), "READY=1")
                    finally:
                        rx.close()

    def test_absent_or_unusable_socket_is_a_no_op(self):
        for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:123"},
                    {"NOTIFY_SOCKET": "/nonexistent/notify"}):
            self.assertFalse(ccproxy.sd_notify("READY=1", env))

    def test_watchdog_interval(self):
        pid = str(os.getpid())
        rows = [({}, None), ({"WATCHDOG_USEC": "200000"}, 0.1),
                ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": pid}, 0.1),
                ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),
                ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "x"}, None)]
        for env, expected in rows:
            self.assertEqual(ccproxy.watchdog_interval(env), expected)


class LifecycleCase(unittest.TestCase):
    """Runs the real CLI as subprocesses in a temp dir, on a free loopback port."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.port = free_port()
        self.pid_file = os.path.join(self.dir, "ccproxy.pid")
        self.log_file = os.path.join(self.dir, "ccproxy.log")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("CCPROXY_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        # CCPROXY_CONFIG= (empty): no default config file, not even root's /etc one.
        self.env.update(CCPROXY_PID_FILE=self.pid_file, CCPROXY_LOG_FILE=self.log_file,
                        CCPROXY_PORT=str(self.port), HOME=self.dir,
                        CCPROXY_DRAIN_TIMEOUT="5", CCPROXY_CONFIG="")
        self.procs = []

    def tearDown(self):
        self.cli("stop", "--force", "--timeout", "5")
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
        self.tmp.cleanup()

    def cli(self, *args, env=None, timeout=30):
        return subprocess.run([sys.executable, SCRIPT] + list(args), env=env or self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def run_foreground(self, env=None):
        proc = subprocess.Popen([sys.executable, SCRIPT, "run"], env=env or self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def get(self, path, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def accepts(self, timeout=1.0):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=timeout).close()
            return True
        except OSError:
            return False

    def write_config(self, doc):
        path = os.path.join(self.dir, "ccproxy.json")
        with open(path, "w") as f:
            f.write(doc if isinstance(doc, str) else json.dumps(doc))
        return path


class TestLifecycleSubprocess(LifecycleCase):

    def test_start_status_stop(self):
        self.env["CCPROXY_API_KEY"] = "sk-never-logged-123"
        started = time.monotonic()
        out = self.cli("start")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertRegex(out.stdout, r"ccproxy started \(pid \d+\) on http://127.0.0.1:%d"
                         % self.port)
        self.assertTrue(self.accepts())               # 0 means the port accepts
        pid = ccproxy.read_pid(self.pid_file)
        status = self.cli("status")
        self.assertEqual(status.returncode, 0, status.stdout)
        self.assertIn("pid %d" % pid, status.stdout)
        as_json = json.loads(self.cli("status", "--json").stdout)
        self.assertEqual((as_json["pid"], as_json["status"]), (pid, "running"))
        code, doc = self.get("/status")
        self.assertEqual((code, doc["pid"], doc["port"]), (200, pid, self.port))
        self.get("/v1/models", {"x-api-key": "sk-never-logged-123"})
        self.get("/v1/models", {"x-api-key": "sk-wrong-key-456"})
        stop = self.cli("stop")
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertFalse(self.accepts())
        self.assertEqual(self.cli("status").returncode, 3)
        self.assertFalse(os.path.exists(self.pid_file))
        with open(self.log_file) as f:
            logged = f.read()
        self.assertIn("GET /status 200", logged)
        self.assertNotIn("sk-never-logged-123", logged)
        self.assertNotIn("sk-wrong-key-456", logged)

    def test_second_start_reports_the_running_pid_and_changes_nothing(self):
        self.assertEqual(self.cli("start").returncode, 0)
        pid = ccproxy.read_pid(self.pid_file)
        again = self.cli("start")
        self.assertEqual(again.returncode, 0)
        self.assertIn("already running (pid %d)" % pid, again.stdout)
        self.assertEqual(ccproxy.read_pid(self.pid_file), pid)
        self.assertEqual(self.get("/status")[1]["pid"], pid)

    def test_kill_9_leaves_a_stale_file_that_never_blocks_start(self):
        self.assertEqual(self.cli("start").returncode, 0)
        pid = ccproxy.read_pid(self.pid_file)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: ccproxy.probe_pid_file(self.pid_file)[0] == "stale")
        status = self.cli("status")
        self.assertEqual(status.returncode, 1, status.stdout)
        self.assertIn("PID file", status.stdout)
        out = self.cli("start")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotEqual(ccproxy.read_pid(self.pid_file), pid)
        self.assertEqual(self.cli("status").returncode, 0)

    @unittest.skipUnless(os.path.exists("/proc/self/environ"), "needs /proc")
    def test_daemon_reexecs_into_cached_bytecode(self):
        # (Its /proc/PID/environ can't show the tunables: glibc 2.36 rewrites that
        # string in place while parsing it.  reexec_environ is tested on its own.)
        self.assertEqual(self.cli("start").returncode, 0)
        with open("/proc/%d/cmdline" % ccproxy.read_pid(self.pid_file), "rb") as f:
            argv = f.read().split(b"\0")
        self.assertEqual(argv[1:3], [b"-S", b"-c"])       # the cached-bytecode interpreter
        self.assertIn(b"import ccproxy", argv[3])

    def test_stop_when_not_running_is_success(self):
        out = self.cli("stop")
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "ccproxy is not running"))
        self.assertEqual(self.cli("status").returncode, 3)

    def test_busy_port_fails_start_fast_with_the_reason(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", self.port))
            busy.listen()
            started = time.monotonic()
            out = self.cli("start")
            run = self.cli("run", timeout=10)
        self.assertEqual(out.returncode, 1)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertIn("port %d on 127.0.0.1 is already in use" % self.port, out.stderr)
        self.assertEqual(self.cli("status").returncode, 3)
        self.assertEqual(run.returncode, 1)
        self.assertIn("already in use", run.stderr)

    def test_bad_config_fails_start_with_exit_2_naming_the_key(self):
        self.env["CCPROXY_PORT"] = "abc"
        out = self.cli("start")
        self.assertEqual(out.returncode, 2)
        self.assertEqual(out.stderr.strip(),
                         'ccproxy: config: CCPROXY_PORT must be 1-65535, got "abc"')
        self.env["CCPROXY_PORT"] = str(self.port)
        out = self.cli("start", "-c", self.write_config('{"providers": [{"type": "x"}]}'))
        self.assertEqual(out.returncode, 2)
        self.assertIn("providers[0].type must be one of", out.stderr)

    def test_version(self):
        out = self.cli("version")
        self.assertEqual(out.returncode, 0)
        self.assertRegex(out.stdout, r"^ccproxy %s \(commit \S+, built \S+\)"
                         % ccproxy.__version__)

    def test_reload_good_and_bad_config(self):
        upstream = "http://127.0.0.1:%d" % free_port()
        path = self.write_config({"providers": [{"name": "a", "base_url": upstream}]})
        out = self.cli("start", "-c", path)
        self.assertEqual(out.returncode, 0, out.stderr)
        before = self.get("/status")[1]["config"]
        self.write_config({"providers": [{"name": "b", "base_url": upstream}]})
        out = self.cli("reload", "-c", path)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("reloaded", out.stdout)
        doc = self.get("/status")[1]
        self.assertEqual(doc["providers"]["active"], ["b"])
        self.assertEqual(doc["config"]["reloads"], 1)
        self.assertNotEqual(doc["config"]["fingerprint"], before["fingerprint"])
        self.write_config('{"providers": [{"name": "c", "base_url": "nope"}]}')
        out = self.cli("reload", "-c", path)       # checked before the daemon is signalled
        self.assertEqual(out.returncode, 2)
        self.assertIn("providers[0].base_url must be", out.stderr)
        self.assertIn("nothing reloaded", out.stderr)
        self.assertEqual(self.get("/status")[1]["config"]["reload_failures"], 0)
        os.kill(ccproxy.read_pid(self.pid_file), signal.SIGHUP)    # systemd's ExecReload
        wait_for(lambda: self.get("/status")[1]["config"]["reload_failures"] == 1)
        doc = self.get("/status")[1]
        self.assertEqual(doc["providers"]["active"], ["b"])       # the old config serves
        self.assertEqual(doc["config"]["reload_failures"], 1)
        self.assertIn("base_url", doc["config"]["last_reload_error"])


class TestFindingTheDaemon(LifecycleCase):
    """Issue #18: given no flags, every command answers about the daemon that runs,
    found through the default PID file (here under RUNTIME_DIRECTORY, as systemd sets
    it) or the port, and its runtime record; never about its own defaults."""

    def setUp(self):
        super().setUp()
        for key in ("CCPROXY_PID_FILE", "CCPROXY_PORT"):
            del self.env[key]
        self.env["RUNTIME_DIRECTORY"] = os.path.join(self.dir, "run")
        self.pid_file = os.path.join(self.dir, "run", "ccproxy.pid")

    def plain(self, *args, **env):
        return self.cli(*args, env=dict(self.env, **env))

    def test_a_daemon_started_with_a_config_file(self):
        path = self.write_config({"port": self.port})
        self.assertEqual(self.cli("start", "-c", path).returncode, 0)
        status = self.plain("status")
        self.assertEqual(status.returncode, 0, status.stdout)
        self.assertIn("on http://127.0.0.1:%d" % self.port, status.stdout)
        self.assertIn("config %s" % path, status.stdout)
        self.assertIn("export ANTHROPIC_BASE_URL=http://127.0.0.1:%d" % self.port,
                      self.plain("env").stdout)
        other = self.plain("start", "--port", str(free_port()))
        self.assertEqual(other.returncode, 1)
        self.assertIn("already running (pid %d)" % ccproxy.read_pid(self.pid_file), other.stderr)
        self.assertIn("(--port)", other.stderr)
        again = self.plain("start")
        self.assertEqual(again.returncode, 0, again.stderr)
        other = self.plain("start", CCPROXY_PROVIDER="ollama")
        self.assertEqual(other.returncode, 1)
        self.assertIn("not with other providers, keys or options than these", other.stderr)
        noted = self.plain("status", "--port", "1")
        self.assertEqual(noted.returncode, 0)
        self.assertIn("does not use port 1 (--port)", noted.stderr)
        self.assertIn("stopped", self.plain("stop").stdout)
        self.assertEqual(self.plain("status").returncode, 3)
        self.assertEqual(os.listdir(os.path.join(self.dir, "run")), [])

    def test_env_of_a_daemon_started_with_a_translated_provider(self):
        started = self.cli("start", "--port", str(self.port), env=dict(
            self.env, CCPROXY_PROVIDER="openai-compatible",
            CCPROXY_BASE_URL="http://127.0.0.1:9/v1", CCPROXY_MODEL="m"))
        self.assertEqual(started.returncode, 0, started.stderr)
        out = self.plain("env").stdout
        for line in ("export ANTHROPIC_BASE_URL=http://127.0.0.1:%d" % self.port,
                     "export ANTHROPIC_AUTH_TOKEN=ccproxy", "unset ANTHROPIC_API_KEY",
                     "export ENABLE_TOOL_SEARCH=false"):
            self.assertIn(line + "\n", out)

    def test_stop_finds_a_daemon_started_with_another_pid_file(self):
        elsewhere = os.path.join(self.dir, "elsewhere.pid")
        self.assertEqual(self.cli("start", "--pid-file", elsewhere, "--port",
                                  str(self.port)).returncode, 0)
        pid = ccproxy.read_pid(elsewhere)
        try:
            out = self.plain("stop", CCPROXY_PORT=str(self.port))
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertIn("stopped (pid %d)" % pid, out.stdout)
            wait_for(lambda: not running(pid))      # the lock goes just before the exit
        finally:
            self.cli("stop", "--pid-file", elsewhere)

    def test_reload_c_loads_that_file_or_refuses(self):
        upstream = "http://127.0.0.1:%d" % free_port()
        first = self.write_config({"port": self.port, "providers": [
            {"name": "a", "base_url": upstream}]})
        self.assertEqual(self.cli("start", "-c", first).returncode, 0)
        second = os.path.join(self.dir, "second.json")
        with open(second, "w") as f:
            json.dump({"port": self.port, "providers": [{"name": "b", "base_url": upstream}]},
                      f)
        out = self.plain("reload", "-c", second)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("config %s" % second, out.stdout)
        doc = self.get("/status")[1]
        self.assertEqual((doc["config"]["source"], doc["providers"]["active"]), (second, ["b"]))
        again = self.plain("reload")             # the daemon's file now is the second
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("settings unchanged", again.stdout)
        self.assertEqual(self.get("/status")[1]["config"]["source"], second)
        with open(second, "w") as f:
            f.write("{")
        refused = self.plain("reload")
        self.assertEqual(refused.returncode, 2)
        self.assertIn("%s is not valid JSON" % second, refused.stderr)
        self.assertEqual(self.get("/status")[1]["config"]["reloads"], 2)

    def test_start_says_what_cannot_work(self):
        out = self.cli("start", "--port", str(self.port), env=dict(
            self.env, CCPROXY_PORTT="1", CCPROXY_PROVIDER="groq", GROQ_API_KEY=""))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("CCPROXY_PORTT is not a ccproxy setting; did you mean CCPROXY_PORT?",
                      out.stderr)
        self.assertIn("provider groq has no key: set GROQ_API_KEY", out.stderr)
        item = self.get("/status")[1]["providers"]["items"][0]
        self.assertEqual((item["status"], item["health"]), ("unconfigured", "unhealthy"))


class TestPidFileAbuse(LifecycleCase):
    """Issue #17: in a shared directory, the PID file could be locked by anyone who
    could read it, followed through a symlink, and made to name another process."""

    def test_a_symlinked_pid_file_is_refused_and_its_target_untouched(self):
        victim = os.path.join(self.dir, "victim")
        with open(victim, "w") as f:
            f.write("precious\n")
        os.symlink(victim, self.pid_file)
        out = self.cli("start")
        self.assertEqual(out.returncode, 1)
        self.assertIn("it is a symlink", out.stderr)
        with open(victim) as f:
            self.assertEqual(f.read(), "precious\n")
        self.assertEqual(self.cli("stop").returncode, 0)        # nothing to stop
        self.assertTrue(os.path.islink(self.pid_file))

    def test_a_lock_held_by_a_stranger_is_named_and_nothing_is_signalled(self):
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.procs.append(bystander)
        with open(self.pid_file, "w") as f:
            f.write("%d\n" % bystander.pid)
        os.chmod(self.pid_file, 0o644)
        holder = os.open(self.pid_file, os.O_RDONLY)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX)       # a reader can hold the lock
            for command, code in (("start", 1), ("stop", 1), ("status", 4)):
                with self.subTest(command):
                    out = self.cli(command)
                    self.assertEqual(out.returncode, code, out.stdout + out.stderr)
                    self.assertIn("locked by a process other than the pid %d" % bystander.pid,
                                  out.stdout + out.stderr)
            self.assertIsNone(bystander.poll())      # never signalled
        finally:
            os.close(holder)

    def test_pid_and_log_files_are_private_and_a_stale_pid_is_no_traceback(self):
        self.assertEqual(self.cli("start").returncode, 0)
        for path in (self.pid_file, self.log_file):
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, path)
        self.assertEqual(self.cli("stop").returncode, 0)
        with open(self.pid_file, "w") as f:
            f.write("999999999\n")              # stale: nobody holds the lock
        out = self.cli("stop")
        self.assertEqual((out.returncode, out.stderr), (0, ""))
        self.assertFalse(os.path.exists(self.pid_file))


class TestWorkers(LifecycleCase):
    """run --workers N: one service out of N processes."""

    def report(self, wid, pid, served, fingerprint="f", heartbeat=None, tokens=0):
        metrics = ccproxy.Metrics()
        metrics.observe_request("messages", 200, 0.1)
        metrics.add_tokens("p", 0, tokens)
        return {"id": wid, "pid": pid, "state": "running", "fingerprint": fingerprint,
                "heartbeat": time.time() if heartbeat is None else heartbeat,
                "requests_served": served, "in_flight": 1, "reloads": 0, "reload_failures": 0,
                "provider_stats": {"p": {"requests": served, "errors": 0, "status": "connected",
                                         "last_check": time.time()}},
                "metrics": ccproxy.export_metrics(metrics.snapshot())}

    def own(self, fingerprint="f"):
        cfg = dataclasses.replace(config(), fingerprint=fingerprint)
        return ccproxy.Snapshot(config=cfg, now=time.time(), pid=10, metrics={})

    def test_merge_snapshots(self):
        live = [self.report(0, 10, 5, tokens=3), self.report(1, 11, 7, tokens=4)]
        dead = [dict(self.report(0, 9, 100, tokens=50), state="stopped")]
        view = ccproxy.merge_snapshots(self.own(), live, dead, 2, 1)
        self.assertEqual((view.requests_served, view.in_flight, view.pid), (112, 2, 1))
        self.assertIsNone(view.ready_error)
        self.assertEqual([w["pid"] for w in view.workers], [10, 11])
        self.assertEqual(view.metrics["tokens"][("p", "output")], 57)   # dead ones count
        self.assertEqual(view.metrics["requests"][(200, "messages")], 3)
        self.assertEqual(view.metrics["duration"]["messages"][2], 3)
        self.assertEqual(view.provider_stats["p"]["requests"], 12)
        now = time.time()
        rows = [([live[0]], "worker count: 2 but status report count: 1"),
                ([live[0], dict(live[1], heartbeat=now - 60)],
                 "worker count: 2 but status report count: 1"),
                ([live[0], dict(live[1], fingerprint="old")],
                 "worker id: 1 has not received configuration")]
        for reports, error in rows:
            self.assertEqual(ccproxy.merge_snapshots(self.own(), reports, [], 2, 1).ready_error,
                             error)

    def test_every_snapshot_field_merges_as_it_says(self):
        """A new field is one line in Snapshot: its kind decides how workers merge it."""
        kinds = {f.name: f.metadata["merge"] for f in dataclasses.fields(ccproxy.Snapshot)}
        self.assertLessEqual(set(kinds.values()), {"own", "live", "total", "stats",
                                                   "metrics"})
        own = self.own()
        service = ccproxy.Service(config())
        report = ccproxy.snapshot_report(service.snapshot(), 0, "running")
        json.dumps(report)                             # what a worker writes is JSON
        self.assertEqual({n for n, k in kinds.items() if k != "own"},
                         set(report) - {"id", "pid", "state", "heartbeat", "fingerprint"})
        a, b, gone = (dict(report, heartbeat=time.time(), id=i) for i in range(3))
        for name, kind in kinds.items():
            if kind in ("live", "total"):
                a[name], b[name], gone[name] = 1, 10, 100
        merged = ccproxy.merge_snapshots(own, [a, b], [gone], 2, 1)
        for name, kind in kinds.items():
            with self.subTest(name):
                value = getattr(merged, name)
                if kind == "live":
                    self.assertEqual(value, 11)
                elif kind == "total":
                    self.assertEqual(value, 111)
                elif kind == "own" and name not in ("workers", "ready_error", "pid"):
                    self.assertEqual(value, getattr(own, name))

    def workers(self):
        try:
            return self.get("/status")[1]["workers"]
        except OSError:      # queued on a worker that was just killed: reset, retried
            return []

    def test_share_the_port_survive_a_worker_kill_reload_and_stop(self):
        path = self.write_config({"providers": [{"name": "a", "base_url": "http://127.0.0.1:9"}],
                                  "workers": 2})
        out = self.cli("start", "-c", path)
        self.assertEqual(out.returncode, 0, out.stderr)
        supervisor = ccproxy.read_pid(self.pid_file)
        for _ in range(30):
            self.assertEqual(self.get("/health")[0], 200)
        wait_for(lambda: self.get("/status")[1]["requests_served"] >= 30, timeout=5)
        doc = self.get("/status")[1]
        self.assertEqual(doc["pid"], supervisor)
        pids = [w["pid"] for w in doc["workers"]]
        self.assertEqual(len(set(pids)), 2)
        self.assertNotIn(supervisor, pids)
        self.assertEqual(self.get("/status/ready"), (200, {"status": "ok"}))
        served = doc["requests_served"]
        os.kill(pids[0], signal.SIGKILL)                 # the supervisor starts a new one
        wait_for(lambda: len(self.workers()) == 2 and pids[0] not in
                 [w["pid"] for w in self.workers()], timeout=10)
        self.assertGreaterEqual(self.get("/status")[1]["requests_served"], served)
        self.write_config({"providers": [{"name": "b", "base_url": "http://127.0.0.1:9"}],
                           "workers": 2})
        self.assertEqual(self.cli("reload", "-c", path).returncode, 0)
        wait_for(lambda: self.get("/status")[1]["providers"]["active"] == ["b"] and len(
            {w["config"] for w in self.workers()}) == 1, timeout=10)
        reloaded = self.workers()[0]["config"]
        victim = self.workers()[0]["pid"]           # one that dies after the reload...
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(self.workers()) == 2 and victim not in
                 [w["pid"] for w in self.workers()], timeout=10)
        self.assertEqual({w["config"] for w in self.workers()}, {reloaded})  # ...comes back new
        live = [w["pid"] for w in self.workers()]
        self.assertEqual(self.cli("stop", "-c", path).returncode, 0)
        self.assertEqual(self.cli("status", "-c", path).returncode, 3)
        wait_for(lambda: not any(running(pid) for pid in live + [supervisor]))


class TestUsageLifecycle(LifecycleCase):
    """Issue #24: the ledger with the real commands: two workers, a restart, a stop."""

    def post(self, stream):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request("POST", "/v1/messages", json.dumps(dict(BODY, stream=stream)))
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def test_the_ledger_across_workers_and_a_restart(self):
        with FakeUpstream(usage_upstream) as up:
            path = self.write_config({"providers": [{"name": "anth", "base_url": up.url,
                                                     "api_key": "sk-up"}], "workers": 2})
            out = self.cli("start", "-c", path)
            self.assertEqual(out.returncode, 0, out.stderr)
            statuses = [self.post(i % 2 == 1) for i in range(20)]
            out = self.cli("restart", "-c", path)
            self.assertEqual(out.returncode, 0, out.stderr)
            statuses += [self.post(i % 2 == 1) for i in range(10)]
            self.assertEqual(self.cli("stop", "-c", path).returncode, 0)
        self.assertEqual(statuses, [200] * 30)
        out = self.cli("usage", "--json", "-c", path)
        self.assertEqual(out.returncode, 0, out.stderr)
        total = json.loads(out.stdout)["total"]
        # Whole replies report 7 output tokens, streams 1 (their message_delta).
        self.assertEqual((total["requests"], total["input_tokens"], total["output_tokens"],
                          total["cache_read_input_tokens"],
                          total["cache_creation_input_tokens"]), (30, 1500, 15 * 7 + 15,
                                                                  27000, 1200))
        db = os.path.join(self.dir, ".local", "state", "ccproxy", "usage.db")
        with contextlib.closing(sqlite3.connect(db)) as conn:
            writers = conn.execute("SELECT COUNT(DISTINCT pid) FROM calls").fetchone()[0]
        self.assertGreaterEqual(writers, 3)     # two workers, then at least one more


class TestDrainAndSignals(LifecycleCase):

    def slow_upstream(self, delay_event):
        def behave(h, body):
            h.server.got_request.set()
            delay_event.wait(TIMEOUT)
            h.reply(200, MESSAGE_JSON)
        fake = FakeUpstream(behave)
        fake.server.got_request = threading.Event()
        return fake

    def start_with(self, upstream_url, **env):
        self.env.update(CCPROXY_BASE_URL=upstream_url, **env)
        proc = self.run_foreground()
        wait_for(self.accepts)
        return proc

    def post_in_thread(self):
        result = {}

        def go():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            try:
                conn.request("POST", "/v1/messages", json.dumps(BODY))
                resp = conn.getresponse()
                result["status"], result["body"] = resp.status, resp.read()
            except OSError as exc:
                result["error"] = exc
        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        return thread, result

    def test_sigterm_lets_the_slow_request_finish_and_refuses_new_ones(self):
        release = threading.Event()
        with self.slow_upstream(release) as up:
            proc = self.start_with(up.url)
            thread, result = self.post_in_thread()
            self.assertTrue(up.server.got_request.wait(TIMEOUT))
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not self.accepts())      # new connections refused
            self.assertIsNone(proc.poll())            # still draining the slow request
            release.set()
            thread.join(TIMEOUT)
            self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(result.get("status"), 200, result)
        self.assertEqual(json.loads(result["body"]), MESSAGE_JSON)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_idle_keep_alive_connections_close_when_the_drain_starts(self):
        release = threading.Event()
        with self.slow_upstream(release) as up:
            proc = self.start_with(up.url)
            idle = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            idle.request("GET", "/health")
            idle.getresponse().read()          # now idle, kept alive
            thread, result = self.post_in_thread()
            self.assertTrue(up.server.got_request.wait(TIMEOUT))
            proc.send_signal(signal.SIGTERM)
            idle.sock.settimeout(2.0)
            self.assertEqual(idle.sock.recv(1), b"")   # closed by the server, not reset
            self.assertIsNone(proc.poll())             # still draining the slow request
            idle.close()
            release.set()
            thread.join(TIMEOUT)
            self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(result.get("status"), 200, result)

    def test_a_connection_accepted_before_the_drain_still_gets_its_answer(self):
        # Its client connected, then the drain began, then its request arrived: it is
        # served (make soak lost such requests as ConnectionResetError at a restart).
        with FakeUpstream() as up:
            proc = self.start_with(up.url)
            fresh = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            wait_for(lambda: self.get("/health")[0] == 200)      # accepted, served
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not self.accepts(0.2))  # the listener is closed (or drops SYNs)
            body = json.dumps(BODY).encode()
            fresh.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                          b"\r\n\r\n%s" % (len(body), body))
            raw = b""
            while True:                                # Connection: close ends it
                data = fresh.recv(65536)
                if not data:
                    break
                raw += data
            fresh.close()
            status, headers, out = parse_response(raw, "POST")
            self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual((status, json.loads(out)), (200, MESSAGE_JSON))
        self.assertEqual(headers["Connection"], "close")

    def test_hung_upstream_exits_within_the_drain_timeout(self):
        release = threading.Event()
        with self.slow_upstream(release) as up:
            proc = self.start_with(up.url, CCPROXY_DRAIN_TIMEOUT="1")
            self.post_in_thread()
            self.assertTrue(up.server.got_request.wait(TIMEOUT))
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(TIMEOUT), 0)
            self.assertLess(time.monotonic() - started, 3.0)
            release.set()
        with open(self.log_file) as f:
            self.assertIn("1 request(s) abandoned", f.read())

    def test_second_signal_exits_at_once(self):
        release = threading.Event()
        with self.slow_upstream(release) as up:
            proc = self.start_with(up.url, CCPROXY_DRAIN_TIMEOUT="30")
            self.post_in_thread()
            self.assertTrue(up.server.got_request.wait(TIMEOUT))
            proc.send_signal(signal.SIGINT)
            wait_for(lambda: not self.accepts())
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            self.assertEqual(proc.wait(TIMEOUT), 1)
            self.assertLess(time.monotonic() - started, 2.0)
            release.set()

    def test_sd_notify_ready_only_once_the_port_accepts_then_stopping(self):
        for address in (os.path.join(self.dir, "notify"), "@ccproxy-test-%d" % os.getpid()):
            with self.subTest(address=address):
                rx = NotifyReceiver(address)
                try:
                    env = dict(self.env, NOTIFY_SOCKET=address)
                    proc = self.run_foreground(env)
                    first = rx.next()
                    self.assertIn("READY=1", first.split("\n"))
                    self.assertTrue(self.accepts())    # READY came after the listen()
                    proc.send_signal(signal.SIGTERM)
                    self.assertIn("STOPPING=1", rx.next().split("\n"))
                    self.assertEqual(proc.wait(TIMEOUT), 0)
                finally:
                    rx.close()

    def test_watchdog_pings_only_for_our_pid(self):
        for name, pid_env, at_least, at_most in (("ours", {}, 3, None),
                                                 ("foreign", {"WATCHDOG_PID": "1"}, 0, 0)):
            with self.subTest(name):
                address = os.path.join(self.dir, "notify-" + name)
                rx = NotifyReceiver(address)
                try:
                    proc = self.run_foreground(dict(self.env, NOTIFY_SOCKET=address,
                                                    WATCHDOG_USEC="200000", **pid_env))
                    self.assertIn("READY=1", rx.next())
                    rx.sock.settimeout(0.3)
                    started, pings = time.monotonic(), 0
                    while time.monotonic() - started < 1.0:
                        try:
                            pings += rx.next() == "WATCHDOG=1"
                        except socket.timeout:
                            pass
                    self.assertGreaterEqual(pings, at_least)
                    if at_most is not None:
                        self.assertLessEqual(pings, at_most)
                    proc.send_signal(signal.SIGTERM)
                    self.assertEqual(proc.wait(TIMEOUT), 0)
                finally:
                    rx.close()


class TestStreamThreadBudget(LifecycleCase):
    """An open stream's memory is its thread's stack: two 4 KB pages of C stack and one
    of Python frames on 3.11+ (docs/performance.md).  One more frame or C call level on
    the deepest path costs a page per open stream.  These tests fail when that path
    changes; a change that means it updates them, and the bench's figures."""

    PATH = ["_serve", "serve", "handle_one_request", "handle_one_request", "_dispatch",
            "_route", "_proxy", "forward"]
    DEEPEST = {   # relay loop -> the frames from its relay loop down to the socket read
        "pass-through": ["_relay", "_relay_stream", "_pump"],
        "translated, first event": ["_relay_translated", "_translate_stream",
                                    "_first_event", "_first_payloads"],
        "translated": ["_relay_translated", "_translate_stream", "_pump_translated"]}
    READ = ["read1", "_read1_chunked", "_get_chunk_left", "_read_next_chunk_size"]

    def deepest_frames(self):
        """The Python frames above each socket read of a proxy thread, deepest kept."""
        deepest, original = {}, socket.SocketIO.readinto

        def readinto(sock, buffer):
            frame, chain = sys._getframe(1), []
            while frame is not None:
                chain.append(frame.f_code)
                frame = frame.f_back
            names = [c.co_name for c in reversed(chain)]
            loop = next((k for k, v in self.DEEPEST.items() if names[8:8 + len(v)] == v
                         and names[:1] == ["_serve"]), None)
            if loop and len(chain) >= len(deepest.get(loop, [])):
                deepest[loop] = chain[::-1]
            return original(sock, buffer)

        def slow(pieces):
            def behave(h, body):       # every piece its own read, the head's too
                h.start_stream()
                for piece in pieces:
                    time.sleep(0.05)
                    h.chunk(piece)
                h.chunk(b"")
            return behave
        translated = [c.encode() for c in (chunk({"content": "a"}), chunk({"content": "b"}),
                                           chunk(finish="stop") + "data: [DONE]\n\n")]
        with unittest.mock.patch.object(socket.SocketIO, "readinto", readinto):
            for pieces, make_config in ((STREAM, one_provider), (translated, openai_provider)):
                with FakeUpstream(slow(pieces)) as up, Proxy(make_config(up.url)) as px:
                    px.call("POST", "/v1/messages", dict(BODY, stream=True))
        return deepest

    def test_the_deepest_point_of_a_stream_gains_no_frame(self):
        deepest = self.deepest_frames()
        self.assertEqual(sorted(deepest), sorted(self.DEEPEST))
        for loop, chain in deepest.items():
            with self.subTest(loop):
                self.assertEqual([c.co_name for c in chain],
                                 self.PATH + self.DEEPEST[loop] + self.READ)
                # Locals, value stack and a frame's own fields, in words (3.11+ frames).
                words = sum(c.co_nlocals + len(c.co_cellvars) + len(c.co_freevars) +
                            c.co_stacksize + 10 for c in chain)
                self.assertLessEqual(words * 8, 3072)

    @unittest.skipUnless(sys.version_info >= (3, 11) and os.path.exists("/proc/self/smaps"),
                         "before 3.11 Python calls recurse in C: a thread keeps 20 KB anyway")
    def test_an_open_streams_thread_keeps_two_pages_of_c_stack(self):
        release = threading.Event()
        streams = 20
        with FakeUpstream(thinking_upstream(["".join(s.decode() for s in STREAM[:2])],
                                            release, [s.decode() for s in STREAM[2:]])) as up:
            self.env["CCPROXY_BASE_URL"] = up.url
            proc = self.run_foreground()
            wait_for(self.accepts)
            socks = [socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
                     for _ in range(streams)]
            data = json.dumps(dict(BODY, stream=True)).encode()
            for sock in socks:
                sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                             b"\r\n\r\n%s" % (len(data), data))
            for sock in socks:
                self.assertIn(b"200 OK", sock.recv(65536))       # streaming, paused
            kb = stack_kb(proc.pid)
            release.set()
            for sock in socks:
                sock.close()
        # The median: a collection of garbage that runs in some stream's thread, or the
        # serve loop's and the reaper's own work, can touch a third page now and then.
        self.assertGreaterEqual(len(kb), streams)
        self.assertLessEqual(sorted(kb)[len(kb) // 2], 8, "KB of stack per thread: %s" % kb)


def stack_kb(pid):
    """Resident KB of each of a process's thread stacks, as the bench reads them."""
    sys.path.insert(0, os.path.join(HERE, "bench"))
    try:
        import bench
    finally:
        sys.path.remove(os.path.join(HERE, "bench"))
    return bench.thread_stack_sizes(pid)


class TestDocs(unittest.TestCase):
    """The repo explains itself (issue #19): what the code cites is in docs/, with the
    sections it names; every setting is in the operating reference; links resolve."""

    @staticmethod
    def tracked():
        out = subprocess.run(["git", "-C", HERE, "ls-files"], capture_output=True, text=True)
        if out.returncode:
            raise unittest.SkipTest("not a git checkout")
        return set(out.stdout.split())

    @staticmethod
    def headings(path):
        with open(os.path.join(HERE, path)) as f:
            return [line for line in f if line.startswith("#")]

    def has_section(self, path, number):
        return any(re.match(r"^#+ %s[. ]" % re.escape(number), h) for h in self.headings(path))

    def test_every_document_the_code_cites_exists_with_its_sections(self):
        with open(SCRIPT) as f:
            text = f.read()
        tracked = self.tracked()
        for name in set(re.findall(r"[\w./-]+\.md\b", text)):
            with self.subTest(name):
                self.assertTrue(name.startswith("docs/") or name in ("README.md",
                                                                     "CHANGELOG.md"))
                self.assertIn(name, tracked)
        for path, number in set(re.findall(r"(docs/[\w-]+\.md) §(\d+(?:\.\d+)?)", text)):
            with self.subTest(path=path, section=number):
                self.assertTrue(self.has_section(path, number))
        # A bare §N in the translation sections is docs/translation.md's; an RFC's is not.
        for line in text.splitlines():
            for m in re.finditer(r"(?<!md )§(\d+(?:\.\d+)?)", line):
                if not re.search(r"RFC \d+[^§]*(§[\d.]+[, ]*)*$|8259 $", line[:m.start()]):
                    with self.subTest(line=line.strip()[:60]):
                        self.assertTrue(self.has_section("docs/translation.md", m.group(1)))

    def test_every_setting_is_in_the_operating_reference(self):
        with open(os.path.join(HERE, "docs", "operating.md")) as f:
            reference = f.read()
        for key, variables, _, option in ccproxy.SETTINGS:
            for word in (key,) + variables + (("--" + option.replace("_", "-"),)
                                              if option else ()):
                with self.subTest(word):
                    self.assertIn("`%s`" % word, reference)
        for _, variable in ccproxy.PROVIDER_ENV:
            self.assertIn("`%s`" % variable, reference)
        for key in ccproxy.PROVIDER_KEYS:
            self.assertIn("`%s`" % key, reference)

    def test_local_links_resolve(self):
        tracked = self.tracked()
        for doc in ["README.md", "CHANGELOG.md"] + sorted(
                p for p in tracked if p.startswith("docs/")):
            with open(os.path.join(HERE, doc)) as f:
                text = f.read()
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if "://" in target:
                    continue
                path = os.path.normpath(os.path.join(os.path.dirname(doc), target))
                with self.subTest(doc=doc, link=target):
                    self.assertIn(path, tracked)

    def test_the_readme_is_for_its_readers(self):
        with open(os.path.join(HERE, "README.md")) as f:
            self.assertLess(len(f.read().splitlines()), 350)


class TestModule(unittest.TestCase):

    def test_all(self):
        for name in ccproxy.__all__:
            self.assertTrue(hasattr(ccproxy, name), name)

    def test_main_returns_exit_codes(self):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(ccproxy.main(["status"], {"CCPROXY_PORT": "x"}), 2)
        self.assertIn("CCPROXY_PORT", err.getvalue())
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as cm:
            ccproxy.main(["frobnicate"])
        self.assertEqual(cm.exception.code, 2)


if __name__ == "__main__":
    unittest.main()
