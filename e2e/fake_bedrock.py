#!/usr/bin/env python3
"""A fake Amazon Bedrock runtime for tests (stdlib, loopback): Claude's invoke and
invoke-with-response-stream, as strict as the real service where a proxy could go wrong.

  * POST /model/{modelId}/invoke and /invoke-with-response-stream only (404 otherwise);
  * the request must carry an AWS Signature Version 4 that checks out for the
    credentials it was given (the path signed as AWS does: a model id's ":" is %3A on
    the wire, %253A in the canonical request), or the Bedrock API key as a bearer token
    (403, with AWS's words, otherwise);
  * the body must have anthropic_version "bedrock-2023-05-31" and neither model nor
    stream (400 ValidationException otherwise);
  * a stream is AWS's binary event stream: each Anthropic event a frame whose payload is
    {"bytes": base64 of the event}, with the prelude and message CRCs.

It answers from the conversation the way e2e/fake_anthropic.py does.  --fail throttle
answers 429 ThrottlingException; --fail midstream sends a throttlingException frame
after two events.  Every request is kept in .requests (path, headers, body).
"""
import argparse
import base64
import calendar
import http.server
import json
import os
import struct
import sys
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import ccproxy  # noqa: E402  (the signer, to check what was signed against what arrived)
from fake_anthropic import FakeAnthropic, events  # noqa: E402


def frame(headers, payload):
    """One event-stream frame (string headers only, as Bedrock sends)."""
    head = b"".join(struct.pack(">B", len(k)) + k.encode() + b"\x07" +
                    struct.pack(">H", len(v)) + v.encode() for k, v in headers.items())
    total = 16 + len(head) + len(payload)
    prelude = struct.pack(">II", total, len(head))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return body + struct.pack(">I", zlib.crc32(body))


def chunk_frame(event):
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(event).encode()).decode()})
    return frame({":event-type": "chunk", ":content-type": "application/json",
                  ":message-type": "event"}, payload.encode())


class FakeBedrock(FakeAnthropic):
    """The server; start() binds 127.0.0.1 port 0.  `credentials`: (access key,
    secret, session token) it accepts; `api_key`: a Bedrock API key it accepts."""

    def __init__(self, scenario="text", credentials=("AKIDFAKE", "secret", ""), api_key="",
                 region="us-east-1", fail=""):
        super().__init__(scenario, thinking=scenario == "tool")
        self.credentials, self.api_key, self.region, self.fail = (credentials, api_key,
                                                                  region, fail)

    def answer(self, h, body):
        model, method = self.route(h.path)
        problem = self.check(h, body, model)
        if problem:
            return self.send_aws(h, *problem)
        if self.fail == "throttle":
            return self.send_aws(h, 429, "ThrottlingException", "Too many requests, please "
                                 "wait before trying again.")
        message = self.message(dict(body, model=model))
        if method == "invoke":
            return self.send_json(h, 200, message)
        self.send_events(h, message)

    @staticmethod
    def route(path):
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "model" and parts[3] in (
                "invoke", "invoke-with-response-stream"):
            from urllib.parse import unquote
            return unquote(parts[2]), parts[3]
        return None, None

    def check(self, h, body, model):
        if model is None:
            return 404, "UnknownOperationException", "unknown operation"
        auth = h.headers.get("authorization") or ""
        if self.api_key and auth == "Bearer " + self.api_key:
            pass
        elif not self.signed_right(h, auth):
            return 403, "InvalidSignatureException", ("The request signature we calculated "
                                                      "does not match the signature you "
                                                      "provided.")
        if body.get("anthropic_version") != "bedrock-2023-05-31" or "model" in body or \
                "stream" in body:
            return 400, "ValidationException", "Malformed input request: extraneous key " \
                "[model, stream] or anthropic_version missing"
        return None

    def signed_right(self, h, auth):
        stamp = h.headers.get("x-amz-date") or ""
        try:
            now = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
        except ValueError:
            return False
        names = auth.partition("SignedHeaders=")[2].partition(",")[0].split(";")
        extra = [(n, h.headers.get(n, "")) for n in names if n not in (
            "host", "x-amz-date", "x-amz-security-token")]
        if "x-amz-security-token" in names and h.headers.get(
                "x-amz-security-token") != self.credentials[2]:
            return False
        want = ccproxy.sigv4_headers("POST", "http://%s%s" % (h.headers["host"], h.path),
                                     extra, h.body, self.credentials, self.region, "bedrock",
                                     now)[-1][1]
        return auth == want

    def message(self, body):
        blocks = self.decide(body)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        return {"id": "msg_bdrk_fake", "type": "message", "role": "assistant",
                "model": body["model"], "content": blocks, "stop_reason": stop,
                "stop_sequence": None, "usage": {"input_tokens": 900, "output_tokens": 12}}

    def send_events(self, h, message):
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.amazon.eventstream"
                      b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        for n, (_, event) in enumerate(events(message)):
            if self.fail == "midstream" and n == 2:
                data = frame({":message-type": "exception", ":exception-type":
                              "throttlingException", ":content-type": "application/json"},
                             b'{"message":"Too many tokens, please wait."}')
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                break
            data = chunk_frame(event)
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def send_aws(h, status, kind, message):
        data = json.dumps({"message": message}).encode()
        h.wfile.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nx-amzn-ErrorType: "
                      b"%s:http://internal.amazon.com/coral/com.amazon.bedrock/\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (status, kind.encode(), len(data), data))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="text")
    parser.add_argument("--fail", default="", choices=("", "throttle", "midstream"))
    args = parser.parse_args(argv)
    fake = FakeBedrock(args.scenario, fail=args.fail).start()
    print(fake.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
