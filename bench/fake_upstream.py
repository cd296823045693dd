#!/usr/bin/env python3
"""A stdlib fake upstream for the soak and benchmark scripts (loopback only).

  POST /v1/messages         Anthropic: JSON, or SSE when the body says "stream": true
  POST /chat/completions    OpenAI: JSON, or SSE chunks ending in [DONE]
  GET  /v1/models, /models  a model list

Streams have EVENTS content deltas, DELAY seconds apart (query-less: set by options).
Every socket gets TCP_NODELAY and each response goes out in as few writes as possible.
"""
import argparse
import http.server
import json
import socket
import sys
import time

TEXT = {"type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "end_turn",
        "id": "msg_fake", "content": [{"type": "text", "text": "hi"}],
        "usage": {"input_tokens": 10, "output_tokens": 1}}


def sse(event, data):
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data).encode())


def anthropic_stream(events):
    head = [sse("message_start", {"type": "message_start", "message": dict(
                TEXT, content=[], stop_reason=None)}),
            sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}})]
    delta = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": "tok "}})
    tail = [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": events}}),
            sse("message_stop", {"type": "message_stop"})]
    return head, delta, tail


def openai_stream(events):
    def chunk(delta, finish=None):
        return b"data: " + json.dumps({"id": "c", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"
    usage = b"data: " + json.dumps({"id": "c", "choices": [], "usage": {
        "prompt_tokens": 10, "completion_tokens": events}}).encode() + b"\n\n"
    return ([chunk({"role": "assistant", "content": ""})], chunk({"content": "tok "}),
            [chunk({}, "stop"), usage, b"data: [DONE]\n\n"])


OPENAI_JSON = {"id": "c", "choices": [{"message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 10, "completion_tokens": 1}}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    events, delay = 20, 0.0

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
        if not body.get("stream"):
            return self._json(OPENAI_JSON if openai else TEXT)
        head, delta, tail = (openai_stream if openai else anthropic_stream)(self.events)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(b"".join(head)))
        for _ in range(self.events):
            if self.delay:
                time.sleep(self.delay)
            self.wfile.write(_chunk(delta))
        self.wfile.write(_chunk(b"".join(tail)) + b"0\r\n\r\n")

    def _json(self, doc):
        data = json.dumps(doc).encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


def _chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)    # a client that left is no bug


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    Handler.events, Handler.delay = args.events, args.delay
    server = Server(("127.0.0.1", 0), Handler)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
