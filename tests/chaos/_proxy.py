"""A TCP proxy the chaos test controls: forward, or blackhole (a half-dead network).

`Proxy` listens on a free port of 127.0.0.1 and forwards each accepted
connection to the upstream server, with two plain threads per connection.
`blackhole` stops moving bytes in both directions while every socket stays
open: to both ends the peer has gone silent, as when a network path dies
without a reset (no FIN, no RST; TCP keepalives are still answered by the
proxy's kernel, so only application-level timeouts notice). Connections
accepted meanwhile are opened upstream but carry nothing either. `heal`
resumes forwarding, and what was written meanwhile is delivered late, as TCP
would after a partition heals; connections a peer closed meanwhile are then
closed on the other side too.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

__all__ = ["Proxy"]

TICK: Final = 0.05
"""Seconds a pump thread waits before looking at the proxy's state again."""

CHUNK: Final = 65536


class _Pair:
    """A client socket and its upstream socket; closing one closes both."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Proxy:
    """Forwards 127.0.0.1:`port` to `upstream_host`:`upstream_port` until closed."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TICK)
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        """Connections accepted since start."""
        self.refused = 0
        """Connections closed at once because the upstream refused them."""
        self.bytes = 0
        """Bytes forwarded (both directions)."""

    # -- control -------------------------------------------------------------

    @property
    def blackholed(self) -> bool:
        """Whether bytes are being held back now."""
        return not self._flowing.is_set()

    def blackhole(self) -> None:
        """Stop forwarding in both directions; keep every socket open."""
        self._flowing.clear()

    def heal(self) -> None:
        """Forward again (including what was held back)."""
        self._flowing.set()

    def open_connections(self) -> int:
        """Client connections open now."""
        with self._lock:
            return len(self._pairs)

    def start(self) -> None:
        """Start accepting."""
        self._spawn(self._accept_loop, "chaos-proxy-accept")

    def close(self) -> None:
        """Stop accepting, close every connection, and wait (bounded) for the threads."""
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()
        for thread in list(self._threads):
            thread.join(timeout=2.0)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- threads -------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                self.refused += 1
                client.close()  # the client sees the connection end, as on a refusal
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                if self._closed.is_set():
                    pair.close()
                    return
                self._pairs.add(pair)
            self._spawn(self._pump, "chaos-proxy-up", pair, client, upstream)
            self._spawn(self._pump, "chaos-proxy-down", pair, upstream, client)

    def _pump(self, pair: _Pair, source: socket.socket, target: socket.socket) -> None:
        """Move bytes from `source` to `target` while flowing; close the pair at the end."""
        try:
            while not pair.closed and not self._closed.is_set():
                if not self._flowing.wait(TICK):
                    continue  # blackholed: leave the bytes where they are
                readable, _, _ = select.select([source], [], [], TICK)
                if not readable or not self._flowing.is_set():
                    continue
                data = source.recv(CHUNK)
                if not data:
                    return
                target.sendall(data)
                self.bytes += len(data)
        except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
            return
        finally:
            pair.close()
            with self._lock:
                self._pairs.discard(pair)
