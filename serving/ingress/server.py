"""The ingress replica's own HTTP server: uvicorn on `http.host:port` inside the replica's event loop.

Ray Serve's HTTP proxy would add a process hop: every request and every streamed chunk would cross
from the proxy actor to the ingress replica as a Ray task item. Serving the port from the ingress
replica itself (SO_REUSEPORT, so every ingress replica on a node shares it and the kernel spreads
connections) removes that hop, as Ray's own direct-ingress mode does on its per-replica ports.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from fastapi import FastAPI

from serving.launch import StartupError

logger = logging.getLogger(__name__)


class DirectServer:
    """uvicorn serving one ASGI app on a shared (SO_REUSEPORT) port in the current event loop."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task) -> None:
        self._server = server
        self._task = task

    @classmethod
    async def start(cls, app: FastAPI, host: str, port: int, *, timeout_keep_alive_s: float = 5.0) -> DirectServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"http: cannot listen on {host}:{port} ({exc.strerror}); another server holds the port. Stop it, "
                "pick another http.port, or set http.proxy: true to let Ray Serve's proxy serve the port."
            ) from None
        sock.set_inheritable(True)
        config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", access_log=False, log_level="warning",
            timeout_keep_alive=int(timeout_keep_alive_s), backlog=2048, http="httptools",
        )
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:  # bound already; wait for uvicorn's startup to finish
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        logger.info("ingress serving http://%s:%d directly", host, port)
        return cls(server, task)

    async def stop(self, drain_s: float) -> None:
        """Stop accepting, let open requests finish for up to `drain_s`, then close them."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_s)
        except TimeoutError:
            self._server.force_exit = True
            await self._task
