#!/usr/bin/env python3
"""A fake OpenAI Chat Completions upstream for end-to-end tests (stdlib, loopback).

It answers from the conversation it is sent, the way a model would:
  * after tool results: text that quotes them ("Tool said: …");
  * scenario text:      a short text answer;
  * scenario tool:      a Bash call (echo hello-from-tool), when the Bash tool is offered;
  * scenario parallel:  two Bash calls whose argument fragments interleave (0,1,0,1);
  * scenario reasoning: reasoning first, then a Bash call, then text after the result;
  * scenario image:     a Read call for --image-path, then text once the image came back;
  * scenario websearch: a call of Claude Code's WebSearch tool;
  * scenario agent:     a call of Claude Code's Agent tool (a subagent, in the foreground).

Provider quirks (translation.md §6) switch on with --quirk:
  groq        usage only in x_groq.usage of the last chunk
  gemini      tool calls without index, whole, several in one delta, finish "stop",
              with extra_content.google.thought_signature
  deepseek    reasoning_content before content; prompt_cache_hit_tokens in usage
  ollama      arguments as objects, no id or index, finish "stop"
  openrouter  ": OPENROUTER PROCESSING" comment lines and CRLF line endings; like
              Anthropic behind it, at most 4 cache_control markers (400 past that);
              its web plugin (plugins [{"id": "web"}]) answers with url_citation
              annotations, in a delta of their own when streamed
  zero-index  every call on index 0, each with its own id (several OpenAI-compatible
              servers number calls so)
  no-index    calls with neither index nor id: the name in a call's first delta only
  text-beside text in the same chunk as the rest of a call's arguments
  repeat-ids  every call with the same id (Groq)
  think       reasoning as <think>…</think> before the text (vLLM, Ollama, llama.cpp)
  reasons     reasoning_content when asked with reasoning_effort, else none;
  reasoning-field  the same in "reasoning" (OpenRouter, vLLM's newer servers)
  mistral-ids 400 to a tool id that is not 9 alphanumerics, as Mistral answers
  content-string 400 to an assistant turn whose content is null (a strict validator)
  echo-needed like reasons, and 400 to a tool-calling turn sent back without its
              reasoning_content while reasoning is asked for (DeepSeek's thinking mode)
  usage-opt-in     usage in a stream only with stream_options.include_usage (OpenAI)
  stream-drops-tools  a streamed answer loses its tool calls (Ollama before 0.8)
  choice-none-ignored tool_choice "none" is ignored
and these answer 400, in the wording of a server that refuses it: completion-tokens
(max_tokens), no-stream-options, no-required, no-named, no-parallel-flag,
no-vision (image_url parts), no-effort (reasoning_effort); image-404 answers images as
OpenRouter does where no endpoint takes them (404), and text-only does that too and
lists the model with architecture.input_modalities ["text"], as OpenRouter's list does.

Offered a tool named ping (ccproxy's `check --probe`), it calls it with n=1, or twice
(n=1, n=2) when the prompt says "twice", unless tool_choice is "none".

Like OpenAI, it answers 400 to cache_control on a route that does not take it (every
quirk but openrouter), and to a prompt_cache_key on the other providers' quirks.

Failure injection: --fail 429|401|midstream [--fail-count N] [--retry-after S].

--window N enforces a context window the way vLLM does: input (counted as a quarter of
the body's bytes) plus max_tokens past N is a 400 naming both numbers.

Every request is kept in .requests (path, headers, parsed body) for the test to inspect.
"""
import argparse
import json
import re
import sys
import threading

from loopback import LoopbackFake, QuietHandler

PNG_SIGNATURE = b"\x89PNG"


class FakeOpenAI(LoopbackFake):
    """The server; start() binds 127.0.0.1 port 0 and serves on a daemon thread."""

    def __init__(self, scenario="text", quirk="", fail="", fail_count=1, retry_after=2,
                 image_path="", window=0, model="fake-model"):
        self.scenario, self.quirk, self.fail, self.window = scenario, quirk, fail, window
        self.model = model
        self.fail_count, self.retry_after, self.image_path = fail_count, retry_after, image_path
        self.requests, self.lock = [], threading.Lock()
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):
                model = {"id": fake.model}
                if fake.quirk == "text-only":
                    model["architecture"] = {"input_modalities": ["text"]}
                fake.send_json(self, 200, {"data": [model]})

            def do_POST(self):
                raw = self.raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.loads(raw or b"{}")
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body})
                    failing = bool(fake.fail) and fake.fail_count > 0
                    fake.fail_count -= failing
                if fake.quirk in ("image-404", "text-only") and '"image_url"' in json.dumps(
                        body.get("messages")):
                    return fake.send_json(self, 404, {"error": {
                        "message": "No endpoints found that support image input",
                        "code": 404}})
                refused = fake.refuse(body) or fake.too_large(raw, body)
                if refused:
                    return fake.send_json(self, 400, {"error": {
                        "message": refused, "type": "invalid_request_error"}})
                fake.answer(self, body, failing)

        self._serve(Handler, "/v1")

    # -- answers ------------------------------------------------------------------

    def too_large(self, raw, body):
        used, asked = len(raw) // 4, body.get("max_tokens") or body.get(
            "max_completion_tokens") or 0
        if self.window and used + asked > self.window:
            return ("'max_tokens' or 'max_completion_tokens' is too large: %d. This model's "
                    "maximum context length is %d tokens and your request has %d input "
                    "tokens." % (asked, self.window, used))
        return ""

    def refuse(self, body):
        """What the real service would answer 400 to, or ""."""
        markers = json.dumps(body.get("messages")).count('"cache_control"')
        if self.quirk == "openrouter" and markers > 4:
            return "A maximum of 4 blocks with cache_control may be provided. Found %d." % (
                markers)
        if self.quirk != "openrouter" and markers:
            return "Unrecognized request argument supplied: cache_control"
        if "plugins" in body and self.quirk != "openrouter":
            return "Unrecognized request argument supplied: plugins"
        if "prompt_cache_key" in body and self.quirk in (
                "groq", "gemini", "deepseek", "ollama", "openrouter"):
            return "Unrecognized request argument supplied: prompt_cache_key"
        return PROBE_REFUSALS.get(self.quirk, lambda b: "")(body)

    def answer(self, h, body, failing):
        if failing and self.fail == "429":
            return self.send_json(h, 429, {"error": {"message": "Rate limit reached",
                                                     "type": "rate_limit"}},
                                  [("retry-after", str(self.retry_after))])
        if failing and self.fail == "401":
            return self.send_json(h, 401, {"error": {
                "message": "Incorrect API key provided: sk-te***", "code": "invalid_api_key"}})
        text, calls, reasoning = self.decide(body)
        if self.quirk == "think":
            text, reasoning = "<think>%s</think>" % (reasoning or "Let me see.") + text, ""
        elif self.quirk in ("reasons", "reasoning-field", "echo-needed") and body.get(
                "reasoning_effort"):
            reasoning = reasoning or "The user wants a short answer."
        if self.quirk == "stream-drops-tools" and body.get("stream"):
            calls = []
        self.counted = len(h.raw) // 4 if self.window else 0
        searched = {"id": "web"} in (body.get("plugins") or [])
        if searched:
            text = "ccproxy is a proxy for Claude Code [github.com](%s)." % SEARCH_HIT["url"]
        notes = [{"type": "url_citation", "url_citation": dict(
            SEARCH_HIT, start_index=0, end_index=len(text))}] if searched else []
        if not body.get("stream"):
            doc = self.whole(text, calls, reasoning)
            doc["choices"][0]["message"].update({"annotations": notes} if notes else {})
            return self.send_json(h, 200, doc)
        usage = self.quirk != "usage-opt-in" or (body.get("stream_options") or {}).get(
            "include_usage")
        chunks = self.chunks(text, calls, reasoning, usage)
        if notes:
            chunks.insert(-2, {"choices": [{"index": 0, "delta": {"annotations": notes}}]})
        if failing and self.fail == "midstream":
            chunks = chunks[:2] + [{"error": {"message": "Upstream overloaded", "code": 503}}]
        self.send_stream(h, chunks)

    def decide(self, body):
        """(text, tool calls, reasoning) for the conversation in `body`."""
        messages = body.get("messages") or []
        tools = {t["function"]["name"] for t in body.get("tools") or []}
        results = []
        for msg in reversed(messages):
            if msg.get("role") == "tool":         # a string, or text parts
                content = msg.get("content") or ""
                results.insert(0, content if isinstance(content, str) else "".join(
                    part.get("text", "") for part in content))
            elif msg.get("role") == "assistant":
                break
        if results:
            saw_image = any(isinstance(m.get("content"), list) and any(
                p.get("type") == "image_url" for p in m["content"]) for m in messages)
            text = "Tool said: " + " | ".join(r.strip()[:60] for r in results)
            return (text + (" (and I saw the image)" if saw_image else "")), [], ""
        if "ping" in tools and (body.get("tool_choice") != "none" or
                                self.quirk == "choice-none-ignored"):
            asked = json.dumps(messages[-1].get("content"))
            return "", [("ping", {"n": n}) for n in ((1, 2) if "twice" in asked else (1,))], ""
        if self.scenario in ("tool", "reasoning") and "Bash" in tools:
            return "", [("Bash", {"command": "echo hello-from-tool",
                                  "description": "say hello"})], (
                "I should run the command." if self.scenario == "reasoning" else "")
        if self.scenario == "parallel" and "Bash" in tools:
            return "", [("Bash", {"command": "echo one", "description": "first"}),
                        ("Bash", {"command": "echo two", "description": "second"})], ""
        if self.scenario == "agent" and "Agent" in tools:
            return "", [("Agent", {"description": "greet", "prompt": "say hi",
                                   "subagent_type": "general-purpose",
                                   "run_in_background": False})], ""
        if self.scenario == "websearch" and "WebSearch" in tools:
            return "", [("WebSearch", {"query": "ccproxy proxy"})], ""
        if self.scenario == "image" and "Read" in tools:
            return "", [("Read", {"file_path": self.image_path})], ""
        return "Hello from the fake OpenAI server!", [], ""

    def usage(self):
        prompt = getattr(self, "counted", 0) or 1200      # a windowed server says its count
        usage = {"prompt_tokens": prompt, "completion_tokens": 12,
                 "total_tokens": prompt + 12}
        if self.quirk == "deepseek":
            usage["prompt_cache_hit_tokens"] = 200
        return usage

    def whole(self, text, calls, reasoning):
        message = {"role": "assistant", "content": text or None}
        if reasoning:
            message[self.reasoning_key()] = reasoning
        if calls:
            message["tool_calls"] = [self.call(i, name, args, whole=True)
                                     for i, (name, args) in enumerate(calls)]
        finish = "tool_calls" if calls and self.quirk not in ("gemini", "ollama") else "stop"
        return {"id": "chatcmpl-fake", "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": finish}], "usage": self.usage()}

    def reasoning_key(self):
        return "reasoning" if self.quirk == "reasoning-field" else "reasoning_content"

    def call(self, i, name, args, whole=False):
        number = 1 if self.quirk == "repeat-ids" else i + 1
        call = {"id": "call_%d" % number, "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)}}
        if self.quirk == "zero-index" and not whole:
            call["index"] = 0
            return call
        if self.quirk == "no-index" and not whole:
            return {"type": "function", "function": call["function"]}
        if self.quirk == "ollama":
            call = {"function": {"name": name, "arguments": args}}      # object, no id
        elif self.quirk == "gemini":
            call["extra_content"] = {"google": {"thought_signature": "sig-%d" % i}}
        elif not whole:
            call["index"] = i
        return call

    def chunks(self, text, calls, reasoning, usage=True):
        out = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        for piece in _pieces(reasoning):
            out.append({"choices": [{"index": 0, "delta": {self.reasoning_key(): piece}}]})
        for piece in _pieces(text):
            out.append({"choices": [{"index": 0, "delta": {"content": piece}}]})
        out.extend(self.call_chunks(calls))
        finish = "tool_calls" if calls and self.quirk not in ("gemini", "ollama") else "stop"
        out.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if self.quirk == "groq":
            out[-1]["x_groq"] = {"usage": self.usage()}
        elif usage:
            out.append({"choices": [], "usage": self.usage()})
        return out

    def call_chunks(self, calls):
        if not calls:
            return []
        if self.quirk in ("gemini", "ollama"):       # whole calls, all in one delta
            return [{"choices": [{"index": 0, "delta": {"tool_calls": [
                self.call(i, n, a, whole=True) for i, (n, a) in enumerate(calls)]}}]}]
        if self.quirk in ("zero-index", "no-index", "text-beside"):
            return self.sequential_call_chunks(calls)
        out = [{"choices": [{"index": 0, "delta": {"tool_calls": [dict(
            self.call(i, name, {}), function={"name": name, "arguments": ""})]}}]}
            for i, (name, _) in enumerate(calls)]
        halves = [_halves(json.dumps(args)) for _, args in calls]
        for part in (0, 1):                            # fragments interleave 0,1,0,1
            for i in range(len(calls)):
                out.append({"choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": i, "function": {"arguments": halves[i][part]}}]}}]})
        return out

    def sequential_call_chunks(self, calls):
        """Each call whole before the next, its arguments in two pieces: the first
        delta with the name (and id), the second with neither index nor id where the
        quirk says so, and text beside it with text-beside."""
        out = []
        for i, (name, args) in enumerate(calls):
            first, second = _halves(json.dumps(args))
            call = self.call(i, name, {})
            call["function"] = {"name": name, "arguments": first}
            rest = {"function": {"arguments": second}}
            if self.quirk != "no-index":
                rest["index"] = call.get("index", i)
            delta = {"tool_calls": [rest]}
            if self.quirk == "text-beside":
                delta["content"] = "Running %s. " % name
            out.append({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
            out.append({"choices": [{"index": 0, "delta": delta}]})
        return out

    # -- wire ---------------------------------------------------------------------

    def send_json(self, h, status, doc, headers=()):
        data = json.dumps(doc).encode()
        head = "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
            status, len(data)) + "".join("%s: %s\r\n" % kv for kv in headers) + "\r\n"
        h.wfile.write(head.encode() + data)

    def send_stream(self, h, chunks):
        nl = "\r\n" if self.quirk == "openrouter" else "\n"
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            text = ""
            if self.quirk == "openrouter":
                text += ": OPENROUTER PROCESSING" + nl + nl
            text += "data: " + json.dumps(dict(chunk, id="chatcmpl-fake")) + nl + nl
            _write_chunk(h, text.encode())
            if "error" in chunk:
                break
        else:
            _write_chunk(h, ("data: [DONE]" + nl + nl).encode())
        h.wfile.write(b"0\r\n\r\n")


def _refusal(field, message):
    return lambda body: message if field(body) else ""


#: Quirks that refuse a request, with the wording of a server that does.
PROBE_REFUSALS = {
    "completion-tokens": _refusal(lambda b: "max_tokens" in b, (
        "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
        "'max_completion_tokens' instead.")),
    "no-stream-options": _refusal(lambda b: "stream_options" in b, (
        "Unrecognized request argument supplied: stream_options")),
    "no-required": _refusal(lambda b: b.get("tool_choice") == "required", (
        'tool_choice must either be a named tool, "auto", or "none".')),
    "no-named": _refusal(lambda b: isinstance(b.get("tool_choice"), dict), (
        "Only 'auto', 'none' and 'required' are supported for tool_choice")),
    "no-parallel-flag": _refusal(lambda b: "parallel_tool_calls" in b, (
        "Unrecognized request argument supplied: parallel_tool_calls")),
    "no-vision": _refusal(lambda b: '"image_url"' in json.dumps(b.get("messages")), (
        "Invalid content type. image_url is only supported by certain models.")),
    "no-effort": _refusal(lambda b: "reasoning_effort" in b, (
        "Unrecognized request argument supplied: reasoning_effort")),
    "mistral-ids": lambda b: next((
        "Tool call id was %s but must be a-z, A-Z, 0-9, with a length of 9." % i
        for i in _tool_ids(b) if not re.match(r"^[a-zA-Z0-9]{9}$", i)), ""),
    "content-string": _refusal(lambda b: any(
        m.get("role") == "assistant" and m.get("content") is None
        for m in b.get("messages") or []), (
            "messages.1.content: Input should be a valid string")),
    # DeepSeek's thinking mode (its guide, "Tool Calls"; its wording, as users report it
    # in abhigyanpatwari/GitNexus#43).
    "echo-needed": _refusal(lambda b: b.get("reasoning_effort") and any(
        m.get("tool_calls") and not m.get("reasoning_content")
        for m in b.get("messages") or []), (
            "Missing `reasoning_content` field in the assistant message at message index 1. "
            "For more information, please refer to "
            "https://api-docs.deepseek.com/guides/thinking_mode#tool-calls")),
}

def _tool_ids(body):
    """Every tool id in a conversation: on the calls, and on the results."""
    for m in body.get("messages") or []:
        for call in m.get("tool_calls") or []:
            yield str(call.get("id"))
        if m.get("role") == "tool":
            yield str(m.get("tool_call_id"))


#: What the fake web plugin finds.
SEARCH_HIT = {"url": "https://github.com/example/ccproxy", "title": "example/ccproxy",
              "content": "A proxy daemon for Claude Code."}


def _write_chunk(h, data):
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    h.wfile.flush()


def _pieces(text, n=3):
    if not text:
        return []
    step = max(1, len(text) // n)
    return [text[i:i + step] for i in range(0, len(text), step)]


def _halves(text):
    return text[:len(text) // 2], text[len(text) // 2:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="text")
    parser.add_argument("--quirk", default="")
    parser.add_argument("--fail", default="")
    parser.add_argument("--fail-count", type=int, default=1)
    parser.add_argument("--retry-after", type=int, default=2)
    parser.add_argument("--image-path", default="")
    parser.add_argument("--window", type=int, default=0)
    args = parser.parse_args(argv)
    fake = FakeOpenAI(args.scenario, args.quirk, args.fail, args.fail_count,
                      args.retry_after, args.image_path, args.window).start()
    print(fake.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
