#!/usr/bin/env python3
"""A fake OpenAI Responses API upstream for end-to-end tests (stdlib, loopback).

As strict as the real POST /v1/responses where ccproxy could go wrong (issue #23):
  * an unknown top-level parameter is a 400 "Unknown parameter" (so a Chat Completions
    field such as messages or max_tokens never passes);
  * max_output_tokens under 16 is a 400, as is `reasoning` for a model that does not
    reason (names not starting with o<digit>, gpt-5 or codex);
  * with store false, a reasoning item sent back must carry the encrypted_content this
    server issued (another organisation's, or none, is a 400), and a
    function_call_output must answer a function_call in the same input.

It answers from the conversation, the way a model would:
  * after a function_call_output: text that quotes it ("Tool said: ...");
  * scenario text: reasoning (a summary in two parts), then a short text;
  * scenario tool: reasoning, then a Bash call (echo hello-from-tool), when Bash is
    offered; the call's arguments stream in pieces.
  * scenario nosummary: as tool, but the reasoning has no summary text at all.
Streams follow OpenAI's event sequence: response.created, response.in_progress,
output_item.added/done around each item, content_part.added/done, the deltas, and
response.completed with usage (cached and reasoning tokens).

Every request is kept in .requests (path, headers, parsed body).
"""
import argparse
import hashlib
import hmac
import json
import sys
import threading

from loopback import LoopbackFake, QuietHandler

KNOWN = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
         "max_output_tokens", "temperature", "top_p", "reasoning", "include", "store",
         "stream", "prompt_cache_key", "text", "metadata", "truncation", "user",
         "previous_response_id", "service_tier", "background", "stream_options"}
SECRET = b"fake-responses-org"


def sealed(item_id, text):
    """The encrypted_content this server issues: only it can check it."""
    return "enc:" + hmac.new(SECRET, (item_id + "\0" + text).encode(),
                             hashlib.sha256).hexdigest()


class FakeResponses(LoopbackFake):
    """The server; start() binds 127.0.0.1 port 0 and serves on a daemon thread."""

    def __init__(self, scenario="text"):
        self.scenario, self.requests, self.lock, self.count = scenario, [], threading.Lock(), 0
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):
                fake.send_json(self, 200, {"object": "list", "data": [{"id": "gpt-5-codex"}]})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.loads(raw or b"{}")
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body})
                    fake.count += 1
                    n = fake.count
                if not self.path.split("?")[0].endswith("/responses"):
                    return fake.send_json(self, 404, {"error": {"message": "Not found"}})
                refused = fake.refuse(body)
                if refused:
                    return fake.send_json(self, 400, {"error": {
                        "message": refused, "type": "invalid_request_error",
                        "param": None, "code": None}})
                fake.answer(self, body, n)

        self._serve(Handler, "/v1")

    # -- what the real service refuses ---------------------------------------------

    def refuse(self, body):
        unknown = sorted(set(body) - KNOWN)
        if unknown:
            return "Unknown parameter: '%s'." % unknown[0]
        if not isinstance(body.get("input"), (str, list)):
            return "Missing required parameter: 'input'."
        if isinstance(body.get("max_output_tokens"), int) and body["max_output_tokens"] < 16:
            return ("Invalid 'max_output_tokens': integer below minimum value. Expected a "
                    "value >= 16, but got %d instead." % body["max_output_tokens"])
        model = str(body.get("model", ""))
        reasons = model.startswith(("o1", "o3", "o4", "gpt-5", "codex"))
        if "reasoning" in body and not reasons:
            return ("Unsupported parameter: 'reasoning.effort' is not supported with "
                    "this model.")
        return self.refuse_items(body["input"] if isinstance(body["input"], list) else [],
                                 body.get("store", True))

    @staticmethod
    def refuse_items(items, store):
        calls = set()
        for item in items:
            kind = item.get("type", "message")
            if kind == "reasoning" and store is False:
                summary = "".join(s.get("text", "") for s in item.get("summary") or [])
                if item.get("encrypted_content") != sealed(item.get("id", ""), summary):
                    return ("Item with id '%s' not found. Items are not persisted when "
                            "`store` is set to false." % item.get("id"))
            elif kind == "function_call":
                calls.add(item.get("call_id"))
            elif kind == "function_call_output" and item.get("call_id") not in calls:
                return ("No tool call found for function call output with call_id %s."
                        % item.get("call_id"))
            elif kind == "message" and item.get("role") not in (
                    "user", "assistant", "system", "developer"):
                return "Invalid value: '%s'." % item.get("role")
        return ""

    # -- answers --------------------------------------------------------------------

    def decide(self, body):
        """(summary parts, text, calls) for the input in `body`."""
        items = body["input"] if isinstance(body["input"], list) else []
        tools = {t.get("name") for t in body.get("tools") or []}
        outputs = []
        for item in reversed(items):
            if item.get("type") == "function_call_output":
                outputs.insert(0, str(item.get("output", "")))
            elif item.get("type") in ("function_call", "message") and item.get(
                    "role", "") != "tool":
                break
        if outputs:
            return [], "Tool said: " + " | ".join(o.strip()[:60] for o in outputs), []
        summary = [] if self.scenario == "nosummary" else ["Thinking it over.",
                                                           "Planning a step."]
        if self.scenario in ("tool", "nosummary") and "Bash" in tools:
            return summary, "", [("Bash", {"command": "echo hello-from-tool",
                                           "description": "say hello"})]
        return summary, "Hello from the fake Responses server!", []

    def output(self, body, n):
        summary, text, calls = self.decide(body)
        items = []
        if str(body.get("model", "")).startswith(("o", "gpt-5", "codex")):
            rid = "rs_%04d" % n
            items.append({"id": rid, "type": "reasoning", "summary": [
                {"type": "summary_text", "text": s} for s in summary],
                "encrypted_content": sealed(rid, "".join(summary))})
        if text:
            items.append({"id": "msg_%04d" % n, "type": "message", "status": "completed",
                          "role": "assistant", "content": [{
                              "type": "output_text", "text": text, "annotations": []}]})
        for i, (name, args) in enumerate(calls):
            items.append({"id": "fc_%04d_%d" % (n, i), "type": "function_call",
                          "status": "completed", "call_id": "call_%04d_%d" % (n, i),
                          "name": name, "arguments": json.dumps(args)})
        return items

    def response(self, body, n, items, status="completed"):
        return {"id": "resp_%04d" % n, "object": "response", "status": status,
                "model": body.get("model"), "output": items, "incomplete_details": None,
                "usage": {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 200},
                          "output_tokens": 40,
                          "output_tokens_details": {"reasoning_tokens": 16},
                          "total_tokens": 1240}}

    def answer(self, h, body, n):
        items = self.output(body, n)
        if not body.get("stream"):
            return self.send_json(h, 200, self.response(body, n, items))
        events = [{"type": "response.created",
                   "response": self.response(body, n, [], "in_progress")},
                  {"type": "response.in_progress",
                   "response": self.response(body, n, [], "in_progress")}]
        for index, item in enumerate(items):
            events.extend(self.item_events(index, item))
        events.append({"type": "response.completed", "response": self.response(body, n, items)})
        self.send_stream(h, events)

    @staticmethod
    def item_events(index, item):
        start = dict(item, status="in_progress")
        if item["type"] == "message":
            start["content"] = []
        elif item["type"] == "function_call":
            start["arguments"] = ""
        elif item["type"] == "reasoning":
            start["summary"] = []
        out = [{"type": "response.output_item.added", "output_index": index, "item": start}]
        if item["type"] == "reasoning":
            for s, part in enumerate(item["summary"]):
                out.append({"type": "response.reasoning_summary_part.added",
                            "item_id": item["id"], "output_index": index, "summary_index": s,
                            "part": {"type": "summary_text", "text": ""}})
                out.extend({"type": "response.reasoning_summary_text.delta",
                            "item_id": item["id"], "output_index": index, "summary_index": s,
                            "delta": piece} for piece in _pieces(part["text"]))
        elif item["type"] == "message":
            text = item["content"][0]["text"]
            out.append({"type": "response.content_part.added", "item_id": item["id"],
                        "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}})
            out.extend({"type": "response.output_text.delta", "item_id": item["id"],
                        "output_index": index, "content_index": 0, "delta": piece}
                       for piece in _pieces(text))
            out.append({"type": "response.content_part.done", "item_id": item["id"],
                        "output_index": index, "content_index": 0,
                        "part": item["content"][0]})
        else:
            out.extend({"type": "response.function_call_arguments.delta",
                        "item_id": item["id"], "output_index": index, "delta": piece}
                       for piece in _pieces(item["arguments"]))
            out.append({"type": "response.function_call_arguments.done",
                        "item_id": item["id"], "output_index": index,
                        "arguments": item["arguments"]})
        out.append({"type": "response.output_item.done", "output_index": index, "item": item})
        return out

    # -- wire -----------------------------------------------------------------------

    @staticmethod
    def send_json(h, status, doc):
        data = json.dumps(doc).encode()
        h.wfile.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % (status, len(data)) + data)

    @staticmethod
    def send_stream(h, events):
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
        for seq, event in enumerate(events):
            event = dict(event, sequence_number=seq)
            data = ("event: %s\ndata: %s\n\n" % (event["type"], json.dumps(event))).encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()
        h.wfile.write(b"0\r\n\r\n")


def _pieces(text, n=3):
    if not text:
        return []
    step = max(1, len(text) // n)
    return [text[i:i + step] for i in range(0, len(text), step)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="text")
    args = parser.parse_args(argv)
    fake = FakeResponses(args.scenario).start()
    print(fake.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
