"""A worker announcing itself to a server: it gives up at once on answers
that retrying cannot change."""

import http.server
import socket
import threading
import time

import pytest
from mlx_dist.announce import announce


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_announcing_stops_at_a_refusal(status):
    asked = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            asked.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The port a worker would listen on: announcing waits for it to open.
    worker = socket.socket()
    worker.bind(("127.0.0.1", 0))
    worker.listen()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        started = time.monotonic()
        ok = announce(url, "w:1", "127.0.0.1", worker.getsockname()[1], None, within=20)
        assert not ok
        assert asked == ["/cluster/join"], asked
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()
        worker.close()
