"""A small client for cmdrelayd's consumer socket (protocol v1, JSON lines).

Every wait is bounded: each call that reads takes a timeout and either returns
what arrived, None (nothing within the timeout), or raises Closed (the relay
closed the connection).

    c = ConsumerClient.connect(relay.socket_path)
    welcome = c.hello(consumer="lamp", filter="/cf/v1/+/+/+/set", from_="stored")
    cmds = c.collect(quiet=0.5, ack_every=64)
    c.ack(cmds[-1]["id"])
    c.stats()
    c.close()
"""
import collections
import errno
import json
import select
import socket
import time

DEFAULT_TIMEOUT = 10.0


class Closed(Exception):
    """The relay closed the connection (EOF or reset)."""


class ProtocolError(AssertionError):
    """The relay answered something else than expected (e.g. an error line)."""

    def __init__(self, message, reply=None):
        super().__init__(message)
        self.reply = reply


class ConsumerClient:
    def __init__(self, sock):
        self.sock = sock
        self.sock.setblocking(False)
        self.buf = b""
        self.pending = collections.deque()   # parsed lines not handed out yet
        self.eof = False
        self.welcome = None

    # -- connection ----------------------------------------------------------

    @classmethod
    def connect(cls, path, timeout=5.0):
        """Connects to the UNIX socket at path, retrying while it does not exist
        or refuses (a relay still starting) until timeout."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                s.connect(str(path))
                return cls(s)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                s.close()
                raise

    def close(self):
        """An orderly close from our side."""
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def abort(self):
        """Drop the connection like a killed process: no goodbye, whatever is
        unread stays unread."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sending -------------------------------------------------------------

    def send_raw(self, data, timeout=5.0):
        """Sends bytes as they are. Returns the number of bytes the relay took
        before timeout (it may stop reading a hostile client), or raises Closed
        when the relay is gone (EPIPE, reset)."""
        sent = 0
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while sent < len(data):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, w, _ = select.select([], [self.sock], [], left)
            if not w:
                break
            try:
                sent += self.sock.send(view[sent:])
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise Closed(f"send: {e}") from e
        return sent

    def send_json(self, obj, timeout=5.0):
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        n = self.send_raw(data, timeout)
        if n != len(data):
            raise ProtocolError(f"the relay took only {n} of {len(data)} bytes within {timeout}s")

    # -- receiving -----------------------------------------------------------

    def _fill(self, deadline):
        """Reads what is there, waiting until deadline; False on timeout.
        Raises Closed at EOF or reset (after buffered lines were handed out)."""
        if self.eof:
            raise Closed("EOF")
        left = max(0.0, deadline - time.monotonic())
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        except ConnectionResetError as e:
            self.eof = True
            raise Closed(f"reset: {e}") from e
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                self.eof = True
                raise Closed(str(e)) from e
            raise
        if not data:
            self.eof = True
            if self.buf:
                self.pending.append(("partial", self.buf))
                self.buf = b""
            return True
        self.buf += data
        return True

    def recv_line(self, timeout=DEFAULT_TIMEOUT):
        """One raw line (without its newline), or None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pending:
                return self.pending.popleft()[1]
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                return line
            if not self._fill(deadline) and time.monotonic() >= deadline:
                return None

    def _lines_available(self):
        """Moves every complete buffered line into pending (cheap batch parse)."""
        if b"\n" in self.buf:
            *lines, self.buf = self.buf.split(b"\n")
            self.pending.extend(("line", ln) for ln in lines)

    def recv_json(self, timeout=DEFAULT_TIMEOUT):
        """The next JSON line as a dict, None on timeout; Closed at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            self._lines_available()
            if self.pending:
                kind, line = self.pending.popleft()
                if kind == "partial":
                    raise ProtocolError(f"connection closed inside a line: {line[:200]!r}")
                try:
                    return json.loads(line)
                except ValueError as e:
                    raise ProtocolError(f"the relay sent a line that is not JSON: {line[:200]!r}") from e
            if not self._fill(deadline) and time.monotonic() >= deadline:
                return None

    def expect(self, type_, timeout=DEFAULT_TIMEOUT, keep_commands=None):
        """Reads until a line of the given type and returns it. Command lines met
        on the way go to keep_commands (a list) or raise; anything else raises."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv_json(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise ProtocolError(f"no {type_!r} line within {timeout}s")
            if msg.get("type") == type_:
                return msg
            if msg.get("type") == "command" and keep_commands is not None:
                keep_commands.append(msg)
                continue
            raise ProtocolError(f"expected a {type_!r} line, got {msg}", msg)

    def expect_error(self, code, timeout=DEFAULT_TIMEOUT):
        msg = self.expect("error", timeout)
        if msg.get("code") != code:
            raise ProtocolError(f"expected error {code!r}, got {msg}", msg)
        return msg

    def wait_closed(self, timeout=3.0):
        """True when the relay closes the connection within timeout; what it
        still sends before that is read and discarded (its line count kept in
        self.discarded)."""
        deadline = time.monotonic() + timeout
        self.discarded = 0
        try:
            while True:
                self._lines_available()
                self.discarded += len(self.pending)
                self.pending.clear()
                if not self._fill(deadline) and time.monotonic() >= deadline:
                    return False
        except Closed:
            return True

    # -- the protocol --------------------------------------------------------

    def hello(self, consumer=None, filter=None, from_=None, timeout=DEFAULT_TIMEOUT):
        """Says hello and returns the welcome dict; raises ProtocolError with
        the reply when the relay answers with an error."""
        msg = {"op": "hello"}
        if consumer is not None:
            msg["consumer"] = consumer
        if filter is not None:
            msg["filter"] = filter
        if from_ is not None:
            msg["from"] = from_
        self.send_json(msg)
        reply = self.recv_json(timeout)
        if reply is None:
            raise ProtocolError(f"no reply to hello within {timeout}s")
        if reply.get("type") != "welcome":
            raise ProtocolError(f"hello answered with {reply}", reply)
        self.welcome = reply
        return reply

    def ack(self, id_):
        self.send_json({"op": "ack", "id": id_})

    def stats(self, timeout=DEFAULT_TIMEOUT, keep_commands=None):
        """The stats reply; command lines arriving before it go to
        keep_commands (a list), so a working consumer can ask too."""
        self.send_json({"op": "stats"})
        return self.expect("stats", timeout, keep_commands if keep_commands is not None else [])

    def collect(self, quiet=0.5, timeout=DEFAULT_TIMEOUT, count=None, ack_every=None):
        """Command lines until `count` arrived or none came for `quiet`
        seconds, at most `timeout` seconds in all. With ack_every, acks
        cumulatively every that many commands (and the last one at the end),
        so a named consumer is not held by its window. Any non-command line
        raises ProtocolError."""
        got = []
        unacked = 0
        deadline = time.monotonic() + timeout
        while count is None or len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            msg = self.recv_json(min(quiet, left))
            if msg is None:
                if time.monotonic() >= deadline or count is None:
                    break
                continue
            if msg.get("type") != "command":
                raise ProtocolError(f"expected a command, got {msg}", msg)
            got.append(msg)
            unacked += 1
            if ack_every and unacked >= ack_every:
                self.ack(msg["id"])
                unacked = 0
        if ack_every and unacked and got:
            self.ack(got[-1]["id"])
        return got

    def no_command(self, wait=1.0):
        """True when nothing arrives within wait seconds."""
        msg = self.recv_json(wait)
        if msg is not None:
            raise ProtocolError(f"expected silence, got {msg}", msg)
        return True


def connect(path, timeout=5.0):
    return ConsumerClient.connect(path, timeout)
