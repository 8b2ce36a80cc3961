"""The beat channel's framing, shared by the daemon (spotwise.daemon.beats) and the agent
(spotwise.worker.agent.beats); the protocol is described in spotwise.daemon.beats.

Frames, both ways: a 4-byte big-endian length N (1 <= N <= MAX_FRAME), then N bytes whose
first is the frame's kind.
"""

from __future__ import annotations

import struct

HELLO, BEAT, ANSWER, REFUSED = 1, 2, 3, 4
MAX_FRAME = 64 * 1024
"""The longest frame either side sends (a beat lists at most a node's processes)."""
ACK_EVERY = 4
"""Every this many beats get an answer even without news."""

_LENGTH = struct.Struct("!I")


def frame(kind: int, payload: bytes) -> bytes:
    """One frame of `kind` carrying `payload`."""
    return _LENGTH.pack(len(payload) + 1) + bytes((kind,)) + payload


class FrameError(ValueError):
    """The peer broke the framing (too long, empty, unknown kind, undecodable)."""


class FrameReader:
    """Cuts a byte stream into (kind, payload) frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        while len(buf) >= 4:
            (n,) = _LENGTH.unpack_from(buf)
            if not 1 <= n <= MAX_FRAME:
                raise FrameError(f"a frame of {n} bytes (1 to {MAX_FRAME} allowed)")
            if len(buf) < 4 + n:
                break
            out.append((buf[4], bytes(buf[5:4 + n])))
            del buf[:4 + n]
        return out
