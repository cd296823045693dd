"""What every fake upstream in e2e/ shares: a quiet HTTP/1.1 handler with Nagle off, and
a server on 127.0.0.1 port 0 served on a daemon thread (stdlib only)."""
import http.server
import socket
import threading


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no log lines, and head and body never held back by Nagle."""
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass


class LoopbackFake:
    """A fake's server: _serve(Handler, path) binds it; start() serves, stop() ends."""

    def _serve(self, handler, path=""):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d%s" % (self.port, path)

    def start(self):
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
