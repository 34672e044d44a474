"""A counting proxy between one client and PostgreSQL, on a Unix socket of its own.

It forwards bytes unchanged and counts, per connection, round trips (each time the
server answers after the client spoke) and statements (Query and Execute messages of
the frontend protocol). Loopback and Unix sockets only; it stops with the benchmark.
"""

import contextlib
import os
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass


@dataclass
class Counts:
    round_trips: int = 0
    statements: int = 0


class CountingProxy:
    def __init__(self, upstream: tuple[int, object]) -> None:
        """upstream: (family, address), a Unix socket path or loopback (host, port)."""
        self._upstream = upstream
        self._directory = tempfile.mkdtemp(prefix="queue-bench-proxy-")
        self.socket_dir = self._directory
        self._path = os.path.join(self._directory, ".s.PGSQL.5432")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self._path)
        self._server.listen(16)
        self.counts = Counts()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> Counts:
        with self._lock:
            taken, self.counts = self.counts, Counts()
        return taken

    def close(self) -> None:
        self._closed = True
        self._server.close()
        for name in os.listdir(self._directory):
            os.unlink(os.path.join(self._directory, name))
        os.rmdir(self._directory)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            server = socket.socket(self._upstream[0], socket.SOCK_STREAM)
            server.connect(self._upstream[1])
            state = {"client_spoke": False}
            threading.Thread(
                target=self._pump_client, args=(client, server, state), daemon=True
            ).start()
            threading.Thread(
                target=self._pump_server, args=(server, client, state), daemon=True
            ).start()

    def _pump_client(self, source, sink, state) -> None:
        buffer = b""
        started = False
        while chunk := _recv(source):
            buffer += chunk
            while True:
                if not started:  # the startup message has no type byte
                    if len(buffer) < 4:
                        break
                    (length,) = struct.unpack("!I", buffer[:4])
                    if len(buffer) < length:
                        break
                    buffer, started = buffer[length:], True
                    continue
                if len(buffer) < 5:
                    break
                (length,) = struct.unpack("!I", buffer[1:5])
                if len(buffer) < 1 + length:
                    break
                if buffer[:1] in (b"Q", b"E"):
                    with self._lock:
                        self.counts.statements += 1
                buffer = buffer[1 + length :]
            state["client_spoke"] = True
            sink.sendall(chunk)
        _close(sink)

    def _pump_server(self, source, sink, state) -> None:
        while chunk := _recv(source):
            if state["client_spoke"]:
                state["client_spoke"] = False
                with self._lock:
                    self.counts.round_trips += 1
            sink.sendall(chunk)
        _close(sink)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
