#!/usr/bin/env python3
"""A fake Anthropic Messages upstream for end-to-end tests (stdlib, loopback).

It is as strict as the real API where a proxy could go wrong: a call without a key
(x-api-key or Authorization: Bearer) is a 401, one without anthropic-version, model,
messages or max_tokens a 400, and every answer is Anthropic's wire format (SSE frames with
their event: lines).  It answers from the conversation it is sent:
  * after a tool result: text that quotes it ("Tool said: ...");
  * scenario text:       "Hello from the fake Anthropic server!";
  * scenario tool:       a thinking block (--thinking), then a Bash call (--tool-name),
                         unless the prompt says "say hi".
POST /v1/messages/count_tokens answers {"input_tokens": N}; HEAD / and GET /v1/models too.

With --vendor it is a vendor's Anthropic-compatible endpoint instead, refusing what that
vendor is known to refuse (docs/providers.md): any anthropic-beta value and Anthropic's
own fields (context_management, safeguards) with a 400; kimi, minimax and dashscope
also `thinking: adaptive`, and kimi a tool-call turn without its thinking; glm answers a
call without max_tokens with its 500.  A vendor takes only its own key (--key).

With --vertex PROJECT/REGION it is Claude on Vertex AI: only POST
/v1/projects/P/locations/R/publishers/anthropic/models/MODEL:rawPredict (or
:streamRawPredict, which streams) is served, with `Authorization: Bearer` the --key token
(a 401 otherwise, as Google's front end answers), and a body that has
`anthropic_version: vertex-2023-10-16` and no `model` (400 otherwise).

Every request is kept in .requests (path, headers as [name, value] pairs, parsed body,
the body's bytes as raw).
"""
import argparse
import json
import re
import sys
import threading

from loopback import LoopbackFake, QuietHandler

TEXT = "Hello from the fake Anthropic server!"
VERTEX_PATH = re.compile(r"^/v1/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/"
                         r"models/([^/:]+):(rawPredict|streamRawPredict)$")


class FakeAnthropic(LoopbackFake):
    """The server; start() binds 127.0.0.1 port 0 and serves on a daemon thread."""

    def __init__(self, scenario="text", tool_name="Bash", thinking=False, vendor="",
                 key="", vertex=""):
        self.scenario, self.tool_name, self.thinking = scenario, tool_name, thinking
        self.vendor, self.key, self.vertex = vendor, key, vertex
        self.requests, self.lock = [], threading.Lock()
        fake = self

        class Handler(QuietHandler):
            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                fake.send_json(self, 200, {"data": [{"type": "model", "id": "claude-x"}]})

            def do_POST(self):
                raw = self.body = self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.loads(raw or b"{}")
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": self.headers.items(),
                                          "body": body, "raw": raw})
                fake.answer(self, body)

        self._serve(Handler)

    # -- answers ------------------------------------------------------------------

    def answer(self, h, body):
        if self.vertex:
            problem = self.vertex_refusal(h, body)
            if problem:
                return self.send_json(h, *problem)
            body = dict(body, model=VERTEX_PATH.match(h.path).group(3),
                        stream=h.path.endswith(":streamRawPredict"))
            h.headers["anthropic-version"] = "vertex"
        problem = self.refusal(h, body)
        if problem:
            return self.send_json(h, *problem)
        if h.path.partition("?")[0].endswith("/count_tokens"):
            return self.send_json(h, 200, {"input_tokens": len(json.dumps(body)) // 4})
        blocks = self.decide(body)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        message = {"id": "msg_fake", "type": "message", "role": "assistant",
                   "model": body["model"], "content": blocks, "stop_reason": stop,
                   "stop_sequence": None, "usage": {"input_tokens": 900, "output_tokens": 12}}
        if body.get("stream"):
            return self.send_stream(h, message)
        self.send_json(h, 200, message)

    def refusal(self, h, body):
        """(status, error document) for what the real API refuses, or None."""
        auth = h.headers.get("authorization") or ""
        if not h.headers.get("x-api-key") and not auth.lower().startswith("bearer "):
            return 401, error("authentication_error", "x-api-key header is required")
        if self.vendor:
            return self.vendor_refusal(h, body)
        if not h.headers.get("anthropic-version"):
            return 400, error("invalid_request_error", "anthropic-version header is required")
        counting = h.path.partition("?")[0].endswith("/count_tokens")
        for field in ("model", "messages") + (() if counting else ("max_tokens",)):
            if field not in body:
                return 400, error("invalid_request_error", "%s: Field required" % field)
        return None

    def vertex_refusal(self, h, body):
        match = VERTEX_PATH.match(h.path)
        if not match or "%s/%s" % match.group(1, 2) != self.vertex:
            return 404, {"error": {"code": 404, "message": "The requested URL %s was not "
                                   "found on this server." % h.path, "status": "NOT_FOUND"}}
        if (h.headers.get("authorization") or "") != "Bearer " + self.key:
            return 401, {"error": {"code": 401, "message": "Request had invalid "
                                   "authentication credentials.", "status": "UNAUTHENTICATED"}}
        if body.get("anthropic_version") != "vertex-2023-10-16" or "model" in body:
            return 400, error("invalid_request_error", "anthropic_version: must be "
                              "vertex-2023-10-16, and model goes in the URL")
        return None

    def vendor_refusal(self, h, body):
        key = h.headers.get("x-api-key") or (h.headers.get("authorization") or "")[7:]
        if self.key and key != self.key:
            return 401, error("authentication_error", "invalid api key")
        if h.headers.get("anthropic-beta"):
            return 400, error("invalid_request_error", "unsupported anthropic-beta: %s"
                              % h.headers["anthropic-beta"])
        extra = sorted({"context_management", "safeguards"} & set(body))
        if extra:
            return 400, error("invalid_request_error", "%s: Extra inputs are not permitted"
                              % extra[0])
        if self.vendor == "glm" and "max_tokens" not in body:
            return 500, error("api_error", "[500]['>' not supported between instances of "
                              "'int' and 'NoneType']")
        thinking = (body.get("thinking") or {}).get("type")
        if self.vendor in ("kimi", "minimax", "dashscope") and thinking == "adaptive":
            return 400, error("invalid_request_error", "thinking.type: adaptive is not "
                              "supported, use enabled with budget_tokens")
        if self.vendor == "kimi" and thinking == "enabled":
            for index, msg in enumerate(body.get("messages") or []):
                kinds = {b.get("type") for b in msg.get("content") or []
                         if isinstance(b, dict)} if isinstance(msg.get("content"), list) else set()
                if msg.get("role") == "assistant" and "tool_use" in kinds and \
                        "thinking" not in kinds:
                    return 400, error("invalid_request_error", "thinking is enabled but "
                                      "reasoning_content is missing in assistant tool call "
                                      "message at index %d" % index)
        return None

    def decide(self, body):
        """The content blocks of the answer to the conversation in `body`."""
        last = (body.get("messages") or [{}])[-1]
        content = last.get("content") if isinstance(last.get("content"), list) else []
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            said = results[0].get("content")
            said = said if isinstance(said, str) else " ".join(
                p.get("text", "") for p in said or [] if isinstance(p, dict))
            return [{"type": "text", "text": "Tool said: " + said.strip()[:80]}]
        tools = {t.get("name") for t in body.get("tools") or []}
        if self.scenario != "tool" or self.tool_name not in tools or "say hi" in json.dumps(
                body.get("messages")):
            return [{"type": "text", "text": TEXT}]
        blocks = [{"type": "thinking", "thinking": "I should run it.", "signature": "sig-1"}] if (
            self.thinking) else []
        return blocks + [{"type": "tool_use", "id": "toolu_fake_1", "name": self.tool_name,
                          "input": {"command": "echo hello-from-tool",
                                    "description": "say hello"}}]

    # -- wire ---------------------------------------------------------------------

    @staticmethod
    def send_json(h, status, doc):
        data = json.dumps(doc).encode()
        h.wfile.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (status, len(data), data))

    @staticmethod
    def send_stream(h, message):
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
        for name, data in events(message):
            frame = b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
            h.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        h.wfile.write(b"0\r\n\r\n")


def error(etype, message):
    return {"type": "error", "error": {"type": etype, "message": message}}


def events(message):
    """A message as Anthropic's stream of events."""
    start = dict(message, content=[], stop_reason=None, usage=dict(message["usage"],
                                                                   output_tokens=1))
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    for index, block in enumerate(message["content"]):
        empty = {"text": {"type": "text", "text": ""},
                 "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "tool_use": dict(block, input={})}[block["type"]]
        yield "content_block_start", {"type": "content_block_start", "index": index,
                                      "content_block": empty}
        for delta in deltas(block):
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield "message_delta", {"type": "message_delta", "delta": {
        "stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": message["usage"]["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}


def deltas(block):
    if block["type"] == "text":
        return [{"type": "text_delta", "text": block["text"]}]
    if block["type"] == "thinking":
        return [{"type": "thinking_delta", "thinking": block["thinking"]},
                {"type": "signature_delta", "signature": block["signature"]}]
    text = json.dumps(block["input"])
    return [{"type": "input_json_delta", "partial_json": text[:10]},
            {"type": "input_json_delta", "partial_json": text[10:]}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="text")
    parser.add_argument("--tool-name", default="Bash")
    parser.add_argument("--thinking", action="store_true")
    parser.add_argument("--vendor", default="", choices=("", "kimi", "glm", "minimax",
                                                         "dashscope", "deepseek"))
    parser.add_argument("--key", default="")
    parser.add_argument("--vertex", default="", metavar="PROJECT/REGION")
    args = parser.parse_args(argv)
    fake = FakeAnthropic(args.scenario, args.tool_name, args.thinking, args.vendor,
                         args.key, args.vertex).start()
    print(fake.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
