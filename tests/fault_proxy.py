"""A TCP proxy on 127.0.0.1 in front of a server (moto's S3, an MLflow server), whose behaviour a test switches
while clients talk through it, to play the faults a cluster's network and object store produce:

- "pass": forward bytes both ways;
- "reset": accept each connection and reset it at once (ECONNRESET), as a restarting load balancer does;
- "503": answer every request with S3's `503 SlowDown`;
- "silent": accept, read, and never answer (a hung server or a black-holed route).

Switching mode cuts the connections open at that moment (a client's keep-alive connection does not outlive an
outage). With no upstream, only the failing modes make sense: a socket that accepts and never answers.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

SLOW_DOWN = (b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code><Message>Please reduce your "
             b"request rate.</Message><RequestId>fault-proxy</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream: tuple[str, int] | None, mode: str = "pass"):
        self.upstream, self._mode = upstream, mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0  # connections accepted, in any mode
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        assert mode in ("pass", "reset", "503", "silent"), mode
        self._mode = mode
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            _reset(sock)

    def schedule(self, *phases: tuple[str, float]) -> threading.Thread:
        """Switch through (mode, seconds) phases from a thread, ending in "pass"; the thread is returned."""
        def run() -> None:
            for mode, seconds in phases:
                self.mode = mode
                time.sleep(seconds)
            self.mode = "pass"
        thread = threading.Thread(target=run, name="fault-proxy-schedule", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._closed = True
        self.mode = "pass"  # cuts what is open
        self.listener.close()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.update(socks)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        mode = self._mode
        if mode == "reset":
            _reset(client)
        elif mode == "503":
            self._track(client)
            with contextlib.suppress(OSError):
                head = _read_head(client)  # answered at once: a client that sent `Expect: 100-continue` waits
                body = b"" if head.startswith(b"HEAD ") else SLOW_DOWN
                client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(SLOW_DOWN), body))
                client.shutdown(socket.SHUT_WR)  # a clean end after the answer: the client reads the 503
                client.settimeout(5)
                while client.recv(65536):  # whatever body it still sends
                    pass
            with contextlib.suppress(OSError):
                client.close()
        elif mode == "silent":
            self._track(client)
            with contextlib.suppress(OSError):
                while client.recv(65536):
                    pass
        else:
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                _reset(client)
                return
            self._track(client, upstream)
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
            _pipe(client, upstream)


def _read_head(sock: socket.socket) -> bytes:
    """Read a request's line and headers (not its body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the peer sees ECONNRESET."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
