"""Running the app: bind the address first, then serve on uvicorn until Ctrl-C, then exit cleanly.

Ctrl-C (or SIGTERM) stops accepting connections, lets every request in flight finish, stops the
batcher and returns normally.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading

from tflow.errors import ServeError


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; port 0 picks a free one.

    Binding before the models load makes a taken port fail at once, and no client is accepted
    before the server can answer it. The socket is made with proto IPPROTO_TCP because asyncio
    sets TCP_NODELAY only on such sockets' connections: with proto 0, Nagle's algorithm held
    each response's body behind its headers until the client's delayed ACK, 40 ms a request.

    Raises:
        ServeError: the address cannot be bound (in use, not an address of this machine).
    """
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0][:3]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port "
                         "(0 picks a free one)") from None
    return sock


def listen(sock: socket.socket) -> str:
    """Start accepting connections on `sock` (they wait until the app runs); returns its URL."""
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app, log_level: str = "warning"):
    """A uvicorn server for `app` (no access log; run it with `.run(sockets=[sock])`).

    Ctrl-C and SIGTERM start uvicorn's graceful shutdown and are not raised again once it is done
    (uvicorn's own handling re-raises them). A second one stops the process at once with exit
    code 130, dropping the requests in flight, where uvicorn would print the app's cancelled
    lifespan as a traceback.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                print("stopped at once: the requests in flight were dropped", file=sys.stderr, flush=True)
                os._exit(130)
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))


def run(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve `app` on the bound `sock` until Ctrl-C or SIGTERM; in-flight requests finish first."""
    try:
        uvicorn_server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
