"""A pod's test WebSocket service: echoes every message back (Debian's python3-websockets).

Usage: ws_echo.py PORT. Listens on 127.0.0.1 only; reached through the pod's nginx.
"""
import asyncio
import sys

import websockets


async def echo(connection: websockets.WebSocketServerProtocol) -> None:
    async for message in connection:
        await connection.send(message)


async def main(port: int) -> None:
    async with websockets.serve(echo, "127.0.0.1", port, ping_interval=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
