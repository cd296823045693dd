#!/usr/bin/env python3
"""A stdlib fake upstream for the soak and benchmark scripts (loopback only).

  POST /v1/messages         Anthropic: JSON, or SSE when the body says "stream": true
  POST /chat/completions    OpenAI: JSON, or SSE chunks ending in [DONE]
  GET  /v1/models, /models  a model list

Streams have EVENTS content deltas, DELAY seconds apart (query-less: set by options),
or SHORT_EVENTS under /short/ (the benchmark's time to first byte).
--interim sends a 103 Early Hints head before every final one (RFC 9110 §15.2), and
--echo puts the request's first message into every text delta instead of "tok ", so a
client can tell its own answer from another's (make soak).
Every socket gets TCP_NODELAY and each response goes out in as few writes as possible.
--loop serves every connection from one thread (selectors), for thousands of slow
streams at once: a thread per stream took 180% CPU and 730 MB at 5000 of them, and
sometimes left streams waiting past the benchmark's limit.
"""
import argparse
import heapq
import http.server
import json
import selectors
import socket
import sys
import time

TEXT = {"type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "end_turn",
        "id": "msg_fake", "content": [{"type": "text", "text": "hi"}],
        "usage": {"input_tokens": 10, "output_tokens": 1}}


def sse(event, data):
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data).encode())


def anthropic_stream(events, text="tok "):
    head = [sse("message_start", {"type": "message_start", "message": dict(
                TEXT, content=[], stop_reason=None)}),
            sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}})]
    delta = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": text}})
    tail = [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": events}}),
            sse("message_stop", {"type": "message_stop"})]
    return head, delta, tail


def openai_stream(events, text="tok "):
    def chunk(delta, finish=None):
        return b"data: " + json.dumps({"id": "c", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"
    usage = b"data: " + json.dumps({"id": "c", "choices": [], "usage": {
        "prompt_tokens": 10, "completion_tokens": events}}).encode() + b"\n\n"
    return ([chunk({"role": "assistant", "content": ""})], chunk({"content": text}),
            [chunk({}, "stop"), usage, b"data: [DONE]\n\n"])


SHORT_EVENTS = 10
OPENAI_JSON = {"id": "c", "choices": [{"message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 10, "completion_tokens": 1}}


INTERIM = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


def delta_text(body, echo):
    """What each text delta says: the first message's text with --echo."""
    messages = body.get("messages") or [{}]
    content = messages[0].get("content") if isinstance(messages[0], dict) else None
    return content if echo and isinstance(content, str) else "tok "


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    events, delay, interim, echo = 20, 0.0, False, False

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._json({"data": [{"id": "claude-x", "type": "model"}, {"id": "gpt-4o"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        openai = self.path.endswith("/chat/completions")
        first = INTERIM if self.interim else b""
        if not body.get("stream"):
            return self.wfile.write(first + json_reply(OPENAI_JSON if openai else TEXT))
        events = SHORT_EVENTS if self.path.startswith("/short/") else self.events
        head, delta, tail = (openai_stream if openai else anthropic_stream)(
            events, delta_text(body, self.echo))
        self.wfile.write(first + STREAM_HEAD + _chunk(b"".join(head)))
        for _ in range(events):
            if self.delay:
                time.sleep(self.delay)
            self.wfile.write(_chunk(delta))
        self.wfile.write(_chunk(b"".join(tail)) + b"0\r\n\r\n")

    def _json(self, doc):
        self.wfile.write((INTERIM if self.interim else b"") + json_reply(doc))


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def json_reply(doc):
    """A whole 200 response with `doc` as its JSON body, for one write."""
    data = json.dumps(doc).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


def _chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)    # a client that left is no bug


class LoopServer:
    """Every connection on one thread: read a request, answer it (a stream's events on
    timers), then wait for the connection's next request."""

    def __init__(self, listener, events, delay):
        self.listener, self.events, self.delay = listener, events, delay
        self.sel, self.timers, self.seq = selectors.DefaultSelector(), [], 0
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, None)

    def serve_forever(self):
        while True:
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else None
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.fileobj, key.data)
            while self.timers and self.timers[0][0] <= time.monotonic():
                _, _, conn, state = heapq.heappop(self.timers)
                self._tick(conn, state)

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.settimeout(10.0)          # sends: the client reads as fast as we write
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(conn, selectors.EVENT_READ, {"buf": b"", "left": 0})

    def _read(self, conn, state):
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            return self._close(conn)
        state["buf"] += data
        head_end = state["buf"].find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = state["buf"][:head_end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(state["buf"]) < head_end + 4 + length:
            return
        body = state["buf"][head_end + 4:head_end + 4 + length]
        state["buf"] = b""
        self._answer(conn, state, head.split(" ")[1], json.loads(body or b"{}"))

    def _answer(self, conn, state, path, body):
        openai = path.endswith("/chat/completions")
        if not body.get("stream"):
            return self._send(conn, json_reply(OPENAI_JSON if openai else TEXT))
        head, state["delta"], state["tail"] = (openai_stream if openai else
                                               anthropic_stream)(self.events)
        self.sel.unregister(conn)          # nothing to read until the stream is over
        state["left"] = self.events
        self._send(conn, STREAM_HEAD + _chunk(b"".join(head)))
        self._schedule(conn, state)

    def _schedule(self, conn, state):
        self.seq += 1
        heapq.heappush(self.timers, (time.monotonic() + self.delay, self.seq, conn, state))

    def _tick(self, conn, state):
        state["left"] -= 1
        if state["left"] > 0:
            if self._send(conn, _chunk(state["delta"])):
                self._schedule(conn, state)
            return
        if self._send(conn, _chunk(state["delta"]) + _chunk(b"".join(state["tail"])) +
                      b"0\r\n\r\n"):
            self.sel.register(conn, selectors.EVENT_READ, state)

    def _send(self, conn, data):
        try:
            conn.sendall(data)
            return True
        except OSError:
            self._close(conn)
            return False

    def _close(self, conn):
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--loop", action="store_true", help="one thread for all connections")
    parser.add_argument("--interim", action="store_true", help="a 103 before every answer")
    parser.add_argument("--echo", action="store_true", help="deltas repeat the prompt")
    args = parser.parse_args(argv)
    Handler.events, Handler.delay = args.events, args.delay
    Handler.interim, Handler.echo = args.interim, args.echo
    if args.loop:
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        server = LoopServer(listener, args.events, args.delay)
        port = listener.getsockname()[1]
    else:
        server = Server(("127.0.0.1", 0), Handler)
        port = server.server_address[1]
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port))
    import os
    os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
