"""Lab echo service: answer every TCP request with the client's source address.

Runs on a lab node that stands in for the internet, so a test can see which address a
(NATed) packet really came from. Speaks just enough HTTP for curl and wget (one HTTP/1.0
response, then close); a client that sends no HTTP request gets the bare address.
Usage: echo.py ADDRESS:PORT (the systemd instance name of netloom-lab-echo@.service).
"""
from __future__ import annotations

import socket
import socketserver
import sys

HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(2)
        try:
            head = self.request.recv(65536)
        except OSError:  # a client that only connects (nc -z, or a plain TCP probe)
            head = b""
        body = f"{self.client_address[0]}\n".encode()
        method = head.split(b" ", 1)[0]
        if method in HTTP_METHODS:
            header = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                      "Connection: close\r\n\r\n").encode()
            reply = header if method == b"HEAD" else header + body
        else:
            reply = body
        self.request.sendall(reply)
        self.request.shutdown(socket.SHUT_WR)
        try:  # let the client close first so unread request bytes do not turn into a reset
            while self.request.recv(65536):
                pass
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    address, _, port = sys.argv[1].rpartition(":")
    with EchoServer((address, int(port)), EchoHandler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
