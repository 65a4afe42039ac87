"""A minimal TCP responder for DNS over TCP: one request per connection.

Theory of operation
-------------------
The resolver answers TCP at each gateway address, port 53, so that a client
whose UDP answer came back truncated (TC set) can fetch the whole answer.
This module is that TCP server and nothing more general. It is sans-I/O like
the rest of the datapath: segments come in as `Segment` values with the time
passed in, frames to send come out, and the initial sequence number is drawn
from the caller's generator.

A connection goes through these steps:

1. A SYN creates it. The SYN-ACK carries an MSS option and nothing else, so
   neither side uses window scaling, SACK or timestamps.
2. The client's ACK of the SYN-ACK establishes it.
3. In-order data collects in a buffer until it holds one DNS message with its
   two-byte length prefix (RFC 1035, section 4.2.2). Out-of-order data is
   not kept, and the ACK that follows asks for it again. The callback
   `on_request(connection, message)` then returns the answer, or None when
   the answer comes later (a query forwarded upstream), in which case the
   caller passes it to `respond`.
4. The answer goes out with its length prefix in segments of at most the
   MSS, within the client's window, and the last segment carries the FIN.
   Further requests on the same connection are acknowledged but not
   answered.
5. When the client has acknowledged everything and sent its own FIN, which
   is acknowledged in turn, the connection is forgotten.

Unacknowledged output is retransmitted by `tick`: on timeout the first
unacknowledged segment is sent again, whatever the window (so it also probes
a zero window), and the timeout doubles. After `MAX_RETRANSMISSIONS`, or when
no request arrives within `IDLE_TIMEOUT`, the connection is reset. A segment
that belongs to no connection gets a RST, as RFC 9293 asks.

Invariants: at most `MAX_CONNECTIONS` connections per responder; a
connection never buffers more than one message and its prefix (65537 bytes);
every sequence comparison is modulo 2**32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tapnet import frames
from tapnet.frames import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN

INITIAL_RTO = 1.0  # seconds; RFC 6298, section 2.1
MAX_RTO = 60.0  # seconds; RFC 6298, section 2.5 allows a maximum of 60 s or more
# Retransmissions of one segment before the connection is reset. With the
# doubling timeout they span 1 + 2 + 4 + 8 + 16 = 31 s, longer than a stub
# resolver waits for a TCP answer.
MAX_RETRANSMISSIONS = 5
# Seconds a connection may go without delivering its request before it is
# reset, and an answered connection may wait for the client's FIN before it
# is forgotten. RFC 7766, section 6.2.3 asks servers to time out idle
# connections and suggests a few seconds.
IDLE_TIMEOUT = 10.0
DEFAULT_MSS = 536  # RFC 9293, section 3.7.1: the MSS to assume when the SYN carries no option
RECEIVE_WINDOW = 65535  # the largest window a header without window scaling can offer
MAX_CONNECTIONS = 256  # per node; a SYN beyond this is dropped
LENGTH_PREFIX = 2  # DNS over TCP prefixes each message with its length (RFC 1035, section 4.2.2)
MAX_MESSAGE = 65535

SEQ_MOD = 1 << 32

SYN_RECEIVED = "SYN-RECEIVED"
ESTABLISHED = "ESTABLISHED"


def seq_diff(a: int, b: int) -> int:
    """Return a - b as a signed distance in sequence space (modulo 2**32)."""
    return (a - b + (1 << 31)) % SEQ_MOD - (1 << 31)


@dataclass(frozen=True)
class Addressing:
    """Addresses of one connection's two ends, and the datapath port of the client."""

    port: int  # datapath port id of the client's endpoint
    client_mac: int
    client_ip: int
    client_port: int
    server_mac: int
    server_ip: int
    server_port: int

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.port, self.client_ip, self.client_port, self.server_ip)


@dataclass(frozen=True)
class Segment:
    """The fields of a received TCP segment that the responder reads."""

    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    mss: int | None = None  # the MSS option, read from SYN segments only


@dataclass
class Connection:
    addressing: Addressing
    iss: int  # our initial sequence number
    irs: int  # the client's initial sequence number
    mss: int  # largest segment we send
    state: str = SYN_RECEIVED
    snd_una: int = 0
    snd_nxt: int = 0
    snd_max: int = 0  # highest sequence number sent, which acknowledgements may reach
    rcv_nxt: int = 0
    window: int = 0  # the client's latest window
    buffer: bytearray = field(default_factory=bytearray)
    request_done: bool = False
    output: bytes = b""  # the answer with its length prefix
    closing: bool = False  # our FIN follows the output
    peer_fin: bool = False
    timer: float | None = None
    rto: float = INITIAL_RTO
    retries: int = 0
    last_activity: float = 0.0

    @property
    def end(self) -> int:
        """Sequence number after everything we will send (output, then FIN if closing)."""
        return (self.iss + 1 + len(self.output) + (1 if self.closing else 0)) % SEQ_MOD

    def finished(self) -> bool:
        return self.closing and self.peer_fin and self.snd_una == self.end

    def request(self) -> bytes | None:
        """Return the buffered DNS message once it is complete."""
        if len(self.buffer) < LENGTH_PREFIX:
            return None
        length = int.from_bytes(self.buffer[:LENGTH_PREFIX], "big")
        if len(self.buffer) < LENGTH_PREFIX + length:
            return None
        return bytes(self.buffer[LENGTH_PREFIX : LENGTH_PREFIX + length])


@dataclass
class Reception:
    """Result of one received segment: frames to send back, and how to record it."""

    frames: list[bytes]
    event: str  # for the trace: syn, established, query, data, fin, ack, reset, ...
    reject: str | None = None  # reason code when the segment was not accepted
    detail: str = ""


@dataclass(frozen=True)
class TimerEvent:
    """A frame that a timer sends: a retransmission or a RST."""

    port: int
    frame: bytes
    decision: str  # tcp-retransmit or tcp-abort
    detail: str


# Returns the answer to a request, b"" to close without one, or None for "later".
RequestHandler = Callable[[Connection, bytes], "bytes | None"]


class TcpResponder:
    """Every TCP connection to one node's resolver addresses."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS):
        self.max_connections = max_connections
        self.connections: dict[tuple[int, int, int, int], Connection] = {}

    # ---- segments in ------------------------------------------------------

    def receive(
        self,
        addressing: Addressing,
        segment: Segment,
        now: float,
        rng: np.random.Generator,
        local_mss: int,
        on_request: RequestHandler,
    ) -> Reception:
        """Process one segment from a client and return the frames it causes."""
        conn = self.connections.get(addressing.key)
        if conn is None:
            return self._listen(addressing, segment, now, rng, local_mss)
        if segment.flags & TCP_RST:
            return self._reset_by_peer(conn, segment)
        if segment.flags & TCP_SYN:
            return self._syn_again(conn, segment)
        if not segment.flags & TCP_ACK:
            return Reception([], "no-ack", "dns-tcp-unexpected", "segment without ACK on a connection")

        if conn.state == SYN_RECEIVED:
            if segment.ack != (conn.iss + 1) % SEQ_MOD:
                reset = self._frame(conn, segment.ack, TCP_RST)
                return Reception([reset], "bad-ack", "dns-tcp-unexpected", "ACK does not match the SYN-ACK")
            conn.state = ESTABLISHED
            conn.snd_una = conn.snd_nxt = conn.snd_max = segment.ack
            self._progress(conn, now)
            event = "established"
        else:
            if seq_diff(segment.ack, conn.snd_max) > 0:
                ack = self._frame(conn, conn.snd_nxt, TCP_ACK)
                return Reception([ack], "ack-ahead", "dns-tcp-unexpected", "ACK for data never sent")
            if seq_diff(segment.ack, conn.snd_una) > 0:
                conn.snd_una = segment.ack
                if seq_diff(conn.snd_nxt, segment.ack) < 0:
                    conn.snd_nxt = segment.ack
                self._progress(conn, now)
            event = "ack"
        conn.window = segment.window

        accepted, must_ack = self._take_data(conn, segment)
        if accepted:
            event = "data"
            conn.last_activity = now
        if segment.flags & TCP_FIN and not conn.peer_fin:
            fin_seq = (segment.seq + len(segment.payload)) % SEQ_MOD
            if fin_seq == conn.rcv_nxt:
                conn.rcv_nxt = (conn.rcv_nxt + 1) % SEQ_MOD
                conn.peer_fin = True
                conn.last_activity = now
                must_ack = True
                event = "fin"

        detail = ""
        if not conn.request_done:
            message = conn.request()
            if message is not None:
                conn.request_done = True
                event = "query"
                answer = on_request(conn, message)
                if answer is not None:
                    self._queue(conn, answer)
            elif conn.peer_fin:
                conn.request_done = True
                detail = "client closed before sending a whole message"
                self._queue(conn, b"")

        out = self._send_new(conn, now)
        if must_ack and not out:
            out.append(self._frame(conn, conn.snd_nxt, TCP_ACK))
        if conn.finished():
            del self.connections[addressing.key]
            event = "closed"
        return Reception(out, event, None, detail)

    def respond(self, conn: Connection, answer: bytes, now: float) -> list[bytes]:
        """Send an answer that `on_request` deferred; nothing if the connection is gone."""
        if self.connections.get(conn.addressing.key) is not conn or conn.closing:
            return []
        self._queue(conn, answer)
        return self._send_new(conn, now)

    # ---- timers -----------------------------------------------------------

    def tick(self, now: float) -> list[TimerEvent]:
        """Retransmit, reset and forget connections whose time has come; return what was sent."""
        events: list[TimerEvent] = []
        for key, conn in list(self.connections.items()):
            port = conn.addressing.port
            if conn.timer is not None and now >= conn.timer:
                if conn.retries >= MAX_RETRANSMISSIONS:
                    reset = self._frame(conn, conn.snd_nxt, TCP_RST | TCP_ACK)
                    detail = f"{self._name(conn)}: no ACK after {conn.retries} retransmissions; RST sent"
                    events.append(TimerEvent(port, reset, "tcp-abort", detail))
                    del self.connections[key]
                    continue
                frame = self._retransmit(conn)
                conn.retries += 1
                detail = f"{self._name(conn)}: retransmission {conn.retries} from seq {conn.snd_una}"
                events.append(TimerEvent(port, frame, "tcp-retransmit", detail))
                conn.rto = min(conn.rto * 2, MAX_RTO)
                conn.timer = now + conn.rto
                continue
            idle = now - conn.last_activity >= IDLE_TIMEOUT
            if idle and not conn.request_done:
                reset = self._frame(conn, conn.snd_nxt, TCP_RST | TCP_ACK)
                detail = f"{self._name(conn)}: no request within {IDLE_TIMEOUT:g} s; RST sent"
                events.append(TimerEvent(port, reset, "tcp-abort", detail))
                del self.connections[key]
            elif idle and conn.closing and conn.snd_una == conn.end:
                del self.connections[key]  # answered and acknowledged, but the client's FIN never came
        return events

    # ---- steps --------------------------------------------------------------

    def _listen(self, addressing: Addressing, segment: Segment, now: float, rng, local_mss: int) -> Reception:
        flags = segment.flags
        if flags & TCP_RST:
            return Reception([], "reset", "dns-tcp-unexpected", "RST for no connection")
        if flags & TCP_SYN and not flags & (TCP_ACK | TCP_FIN):
            if len(self.connections) >= self.max_connections:
                return Reception([], "syn", "dns-busy", f"{len(self.connections)} TCP connections open")
            iss = int(rng.integers(0, SEQ_MOD))
            conn = Connection(
                addressing=addressing,
                iss=iss,
                irs=segment.seq,
                mss=max(1, min(segment.mss or DEFAULT_MSS, local_mss)),
                snd_una=iss,
                snd_nxt=(iss + 1) % SEQ_MOD,
                snd_max=(iss + 1) % SEQ_MOD,
                rcv_nxt=(segment.seq + 1) % SEQ_MOD,
                window=segment.window,
                last_activity=now,
            )
            self.connections[addressing.key] = conn
            conn.timer = now + conn.rto
            return Reception([self._syn_ack(conn, local_mss)], "syn", None, f"mss {conn.mss}")
        # RFC 9293, section 3.10.7.1: answer a segment for no connection with a RST.
        if flags & TCP_ACK:
            reset = frames.tcp_frame(
                addressing.server_mac, addressing.client_mac, addressing.server_ip, addressing.client_ip,
                addressing.server_port, addressing.client_port, segment.ack, 0, TCP_RST, 0,
            )
        else:
            # SYN and FIN each take one sequence number.
            length = len(segment.payload)
            if flags & TCP_SYN:
                length += 1
            if flags & TCP_FIN:
                length += 1
            reset = frames.tcp_frame(
                addressing.server_mac, addressing.client_mac, addressing.server_ip, addressing.client_ip,
                addressing.server_port, addressing.client_port, 0, segment.seq + length, TCP_RST | TCP_ACK, 0,
            )
        return Reception([reset], "no-connection", "dns-tcp-unexpected", "segment for no connection; RST sent")

    def _reset_by_peer(self, conn: Connection, segment: Segment) -> Reception:
        # RFC 5961, section 3: only a RST inside the receive window ends the connection.
        offset = seq_diff(segment.seq, conn.rcv_nxt)
        if 0 <= offset < RECEIVE_WINDOW:
            del self.connections[conn.addressing.key]
            return Reception([], "reset")
        return Reception([], "reset", "dns-tcp-unexpected", "RST outside the receive window")

    def _syn_again(self, conn: Connection, segment: Segment) -> Reception:
        if conn.state == SYN_RECEIVED and segment.seq == conn.irs and not segment.flags & TCP_ACK:
            return Reception([self._syn_ack(conn, conn.mss)], "syn", None, "SYN repeated; SYN-ACK sent again")
        # RFC 5961, section 4: a SYN on a synchronized connection gets a challenge ACK.
        ack = self._frame(conn, conn.snd_nxt, TCP_ACK)
        return Reception([ack], "syn", "dns-tcp-unexpected", "SYN on an open connection; challenge ACK sent")

    def _take_data(self, conn: Connection, segment: Segment) -> tuple[bool, bool]:
        """Keep the in-order part of the segment's data; return (accepted, must_ack)."""
        payload = segment.payload
        if not payload or conn.peer_fin:
            return False, bool(payload)
        already = seq_diff(conn.rcv_nxt, segment.seq)  # bytes of this segment received before
        if already < 0 or already >= len(payload):
            return False, True  # a gap before it, or all of it seen: ACK what we have
        new = payload[already:]
        conn.rcv_nxt = (conn.rcv_nxt + len(new)) % SEQ_MOD
        if not conn.request_done:
            conn.buffer += new
            if len(conn.buffer) >= LENGTH_PREFIX:
                wanted = LENGTH_PREFIX + int.from_bytes(conn.buffer[:LENGTH_PREFIX], "big")
                del conn.buffer[wanted:]
        return True, True

    def _queue(self, conn: Connection, answer: bytes) -> None:
        if len(answer) > MAX_MESSAGE:
            raise ValueError(f"DNS answer of {len(answer)} bytes exceeds the TCP maximum of {MAX_MESSAGE}")
        conn.output = len(answer).to_bytes(LENGTH_PREFIX, "big") + answer if answer else b""
        conn.closing = True

    def _send_new(self, conn: Connection, now: float) -> list[bytes]:
        """Send what the window allows of the output, then the FIN."""
        out = []
        if conn.state != ESTABLISHED:
            return out
        data_start = (conn.iss + 1) % SEQ_MOD
        while True:
            offset = seq_diff(conn.snd_nxt, data_start)
            if offset < len(conn.output):
                room = seq_diff((conn.snd_una + conn.window) % SEQ_MOD, conn.snd_nxt)
                if room <= 0:
                    break
                chunk = conn.output[offset : offset + min(conn.mss, room)]
                out.append(self._data_segment(conn, conn.snd_nxt, chunk))
                conn.snd_nxt = (conn.snd_nxt + len(chunk) + (1 if self._carries_fin(conn, offset, chunk) else 0)) % SEQ_MOD
            elif conn.closing and offset == len(conn.output):
                out.append(self._frame(conn, conn.snd_nxt, TCP_FIN | TCP_ACK))
                conn.snd_nxt = (conn.snd_nxt + 1) % SEQ_MOD
            else:
                break
        if seq_diff(conn.snd_nxt, conn.snd_max) > 0:
            conn.snd_max = conn.snd_nxt
        self._arm(conn, now)
        return out

    def _arm(self, conn: Connection, now: float) -> None:
        """Run the retransmission timer while output is unacknowledged or held back by the window."""
        if conn.snd_una == conn.end:
            conn.timer = None
        elif conn.timer is None:
            conn.timer = now + conn.rto

    def _carries_fin(self, conn: Connection, offset: int, chunk: bytes) -> bool:
        return conn.closing and offset + len(chunk) == len(conn.output)

    def _data_segment(self, conn: Connection, seq: int, chunk: bytes) -> bytes:
        offset = seq_diff(seq, (conn.iss + 1) % SEQ_MOD)
        flags = TCP_ACK
        if offset + len(chunk) == len(conn.output):
            flags |= TCP_PSH
            if conn.closing:
                flags |= TCP_FIN
        return self._frame(conn, seq, flags, chunk)

    def _retransmit(self, conn: Connection) -> bytes:
        if conn.state == SYN_RECEIVED:
            return self._syn_ack(conn, conn.mss)
        conn.snd_nxt = conn.snd_una
        offset = seq_diff(conn.snd_una, (conn.iss + 1) % SEQ_MOD)
        if offset < len(conn.output):
            chunk = conn.output[offset : offset + conn.mss]
            frame = self._data_segment(conn, conn.snd_una, chunk)
            conn.snd_nxt = (conn.snd_una + len(chunk) + (1 if self._carries_fin(conn, offset, chunk) else 0)) % SEQ_MOD
            return frame
        conn.snd_nxt = (conn.snd_una + 1) % SEQ_MOD
        return self._frame(conn, conn.snd_una, TCP_FIN | TCP_ACK)

    def _progress(self, conn: Connection, now: float) -> None:
        """Restart the retransmission timer after an ACK that acknowledged something new."""
        conn.retries = 0
        conn.rto = INITIAL_RTO
        conn.timer = None
        self._arm(conn, now)

    # ---- frames -----------------------------------------------------------

    def _syn_ack(self, conn: Connection, local_mss: int) -> bytes:
        a = conn.addressing
        return frames.tcp_frame(
            a.server_mac, a.client_mac, a.server_ip, a.client_ip, a.server_port, a.client_port,
            conn.iss, conn.rcv_nxt, TCP_SYN | TCP_ACK, RECEIVE_WINDOW, options=frames.mss_option(local_mss),
        )

    def _frame(self, conn: Connection, seq: int, flags: int, payload: bytes = b"") -> bytes:
        a = conn.addressing
        return frames.tcp_frame(
            a.server_mac, a.client_mac, a.server_ip, a.client_ip, a.server_port, a.client_port,
            seq, conn.rcv_nxt, flags, RECEIVE_WINDOW, payload,
        )

    @staticmethod
    def _name(conn: Connection) -> str:
        a = conn.addressing
        client = ".".join(str(b) for b in a.client_ip.to_bytes(4, "big"))
        return f"TCP {client}:{a.client_port}"
