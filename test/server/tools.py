"""tools.py — small network helpers for the server tests: a fault-injecting
TCP proxy and a minimal WebSocket client. Loopback only."""
import base64
import hashlib
import json
import os
import socket
import struct
import threading


class Proxy:
    """Forwards 127.0.0.1:port -> target port. mode:
    'pass'      forward both ways;
    'drop_resp' forward the request, swallow the answer, then close (lost answer);
    'http503'   answer 503 itself for the next `count` connections, then pass;
    'hold_pull' on a connection whose first request is a pull, hold the
                server's answer (set `held` when it arrives) until `release`
                is set, then pass; other connections pass.
    """

    def __init__(self, target_port, mode="pass", count=0):
        self.target = target_port
        self.mode = mode
        self.count = count
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopped = False
        self.held = threading.Event()
        self.release = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        if self.mode == "http503" and self.count > 0:
            self.count -= 1
            try:
                c.recv(65536)
                body = b'{"error":"database unavailable","detail":"injected","hint":""}'
                c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                          b"Retry-After: 0\r\nConnection: close\r\nContent-Length: " +
                          str(len(body)).encode() + b"\r\n\r\n" + body)
            finally:
                c.close()
            return
        s = socket.create_connection(("127.0.0.1", self.target))
        drop = self.mode == "drop_resp"
        hold = False
        if self.mode == "hold_pull":
            first = c.recv(65536)
            hold = first.startswith(b"GET /v1/pull")
            s.sendall(first)

        def pump(a, b, swallow, hold=False):
            try:
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    if swallow:
                        # the server answered: lose the answer and hang up
                        break
                    if hold:
                        hold = False
                        self.held.set()
                        self.release.wait(30)
                    b.sendall(d)
            except OSError:
                pass
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(s, c, drop, hold), daemon=True)
        t.start()
        pump(c, s, False)
        t.join(5)
        c.close()
        s.close()

    def close(self):
        self.stopped = True
        self.sock.close()


class WebSocket:
    """Just enough RFC 6455 client to test /v1/ws."""

    def __init__(self, port, token, path="/v1/ws", ssl_context=None):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if ssl_context:  # wss://
            self.s = ssl_context.wrap_socket(self.s, server_hostname="127.0.0.1")
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                        f"Sec-WebSocket-Protocol: pgsync.v1\r\n"
                        + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            d = self.s.recv(1)
            if not d:
                break
            head += d
        self.head = head.decode(errors="replace")
        self.status = int(self.head.split(" ")[1]) if self.head else 0
        if self.status == 101:
            want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
                                    .digest()).decode()
            got = [ln.split(":", 1)[1].strip() for ln in self.head.split("\r\n")
                   if ln.lower().startswith("sec-websocket-accept:")]
            assert got == [want], f"bad Sec-WebSocket-Accept {got} != {want}"
        self.buf = b""

    def _read(self, n):
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise EOFError
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, timeout=5):
        """Returns (opcode, payload bytes)."""
        self.s.settimeout(timeout)
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
        assert not (b1 & 0x80), "server frames must not be masked"
        return b0 & 0x0F, self._read(n)

    def recv_json(self, timeout=5):
        while True:
            op, data = self.recv(timeout)
            if op == 1:
                return json.loads(data)

    def send(self, opcode, payload=b""):
        mask = os.urandom(4)
        n = len(payload)
        hdr = bytes([0x80 | opcode])
        if n < 126:
            hdr += bytes([0x80 | n])
        else:
            hdr += bytes([0x80 | 126]) + struct.pack(">H", n)
        self.s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self):
        self.s.close()


class RawHTTP:
    """A keep-alive HTTP/1.1 connection read without blocking: feed() takes
    what arrived and says when one whole response is in."""

    def __init__(self, port):
        self.port = port
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setblocking(False)
        self.buf = b""
        self.status = 0
        self.body = b""
        self.headers = {}

    def send(self, path, tok):
        if self.headers.get("connection", "").lower() == "close":
            self.s.close()             # the server said so: a new connection, as curl does
            self.s = socket.create_connection(("127.0.0.1", self.port))
        self.buf = b""
        self.headers = {}
        self.s.setblocking(True)
        self.s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n".encode())
        self.s.setblocking(False)

    def send_prepared(self, request):
        """send a request made beforehand (bytes) on the kept-alive, non-blocking
        connection: what a bench measuring the server sends, without building it"""
        self.buf = b""
        self.headers = {}
        self.s.sendall(request)  # a few hundred bytes: the socket buffer takes them at once

    def feed(self):
        try:
            d = self.s.recv(1 << 16)
        except BlockingIOError:
            return False
        if not d:
            raise EOFError("server closed the connection")
        self.buf += d
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(self.headers.get("content-length", "0"))
        if len(rest) < n:
            return False
        self.body = rest[:n]
        return True
