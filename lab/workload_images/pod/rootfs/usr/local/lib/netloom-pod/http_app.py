"""A pod's test HTTP service: answers every GET with JSON naming itself and what nginx passed on.

Usage: http_app.py NAME PORT. It listens on 127.0.0.1 only: it is reached through the pod's
nginx (or, for the benchmark, directly from inside the pod).
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real app behind nginx
    # Headers and body go out in two writes: without TCP_NODELAY the second waits for the
    # peer's delayed ACK (40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = json.dumps({
            "service": self.server.service_name,
            "port": self.server.server_port,
            "pod": os.environ.get("POD_ID", ""),
            "path": self.path,
            "host": self.headers.get("Host"),
            "x_real_ip": self.headers.get("X-Real-IP"),
            "x_forwarded_for": self.headers.get("X-Forwarded-For"),
        }).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no per-request log lines (the benchmark sends thousands)


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.service_name = name
    server.serve_forever()


if __name__ == "__main__":
    main()
