"""Running the app: bind the address first, then serve on uvicorn until Ctrl-C, then exit cleanly.

Ctrl-C (or SIGTERM) stops accepting connections, lets every request in flight finish, stops the
batcher and returns normally.
"""

from __future__ import annotations

import signal
import socket
import threading

from tflow.errors import ServeError


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; port 0 picks a free one.

    Binding before the models load makes a taken port fail at once, and no client is accepted
    before the server can answer it.

    Raises:
        ServeError: the address cannot be bound (in use, not an address of this machine).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
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
    """A uvicorn server for `app` (no access log; run it with `.run(sockets=[sock])`)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))


def run(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve `app` on the bound `sock` until Ctrl-C or SIGTERM; in-flight requests finish first.

    uvicorn handles the signal (graceful shutdown) and then raises it again; the KeyboardInterrupt
    that follows is the end of a clean shutdown, not an error.
    """
    server = uvicorn_server(app, log_level)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
