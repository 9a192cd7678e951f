#!/usr/bin/python3
"""A client of a pod's external port (stdlib only, so it also runs on a lab node as is).

    pod_client.py get ADDRESS PORT HOST          -> prints the status line code and the body
    pod_client.py ws ADDRESS PORT HOST MESSAGE   -> WebSocket handshake, one echo; prints the reply

The WebSocket client is the RFC 6455 minimum: the upgrade request, a check of the 101 answer
and Sec-WebSocket-Accept, one masked text frame out and one unmasked text frame back.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import os
import socket
import sys

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def get(address: str, port: int, host: str, timeout: float = 10.0) -> tuple[int, str]:
    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("GET", "/", headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        data += chunk
    return data


def websocket_echo(address: str, port: int, host: str, message: str, timeout: float = 10.0) -> str:
    """Open a WebSocket through the pod's nginx, send `message`, return what comes back."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.sendall((f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError(f"no handshake answer: {head!r}")
            head += chunk
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"handshake refused: {lines[0]}")
        headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
                   for line in lines[1:] if ":" in line}
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise ConnectionError(f"bad Sec-WebSocket-Accept: {headers.get('sec-websocket-accept')}")
        payload = message.encode()
        if len(payload) > 125:
            raise ValueError("keep test messages under 126 bytes")
        mask = os.urandom(4)
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                     + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        first, second = _read_exact(sock, 2)
        if first & 0x0F != 1:
            raise ConnectionError(f"expected a text frame, got opcode {first & 0x0F}")
        return _read_exact(sock, second & 0x7F).decode()


def main(argv: list[str]) -> int:
    if len(argv) >= 5 and argv[1] == "get":
        status, body = get(argv[2], int(argv[3]), argv[4])
        print(status)
        print(body, end="")
        return 0
    if len(argv) == 6 and argv[1] == "ws":
        print(websocket_echo(argv[2], int(argv[3]), argv[4], argv[5]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
