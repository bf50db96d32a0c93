#!/usr/bin/env python3
"""A fedslm peer in Python, written from PROTOCOL.md alone: QUIC (aioquic) with mutual TLS, ALPN fedslm/1,
Hello on the control stream, Welcome or Error back. It checks that a standards-compliant client that is not
written in Rust can join a federation with the files `fedslm certs` writes.

    python peer.py --server 127.0.0.1:7878 --server-name localhost \
        --ca ca.pem --cert center-a.pem --key center-a.key --center center-a

Prints the answer as JSON; exit status 0 on Welcome, 3 on Error, 1 on anything else.
"""
import argparse
import asyncio
import json
import struct
import sys

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

MAGIC = b"FSLM"
VERSION = 5
KINDS = {1: "Hello", 2: "Welcome", 3: "FitTask", 4: "FitResult", 5: "EvaluateTask", 6: "EvalReport",
         7: "Finish", 8: "Error"}
ROLES = ["Train", "Validate"]
ERROR_CODES = ["UnsupportedVersion", "NotEnrolled", "IdentityMismatch", "SettingsMismatch", "Malformed",
               "Unexpected", "Superseded", "Internal", "UpdateRefused", "PolicyRefused",
               "PrivacyRequired", "SecureAggregation"]


def varint(v: int) -> bytes:
    if v < 251:
        return bytes([v])
    if v < 1 << 16:
        return b"\xfb" + struct.pack("<H", v)
    if v < 1 << 32:
        return b"\xfc" + struct.pack("<I", v)
    return b"\xfd" + struct.pack("<Q", v)


def string(s: str) -> bytes:
    b = s.encode()
    return varint(len(b)) + b


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("payload ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        b = self.take(1)[0]
        if b < 251:
            return b
        size = {251: 2, 252: 4, 253: 8}.get(b)
        if size is None:
            raise ValueError(f"bad varint marker {b}")
        return int.from_bytes(self.take(size), "little")

    def string(self) -> str:
        return self.take(self.varint()).decode()


def frame(kind: int, payload: bytes, version: int = VERSION) -> bytes:
    return MAGIC + struct.pack("<HBBQ", version, kind, 0, len(payload)) + payload


def hello(center: str, settings_hash: bytes, counts, version: int) -> bytes:
    # The policy hash: this peer states no disclosure policy of its own (all zero), nor requires DP (false).
    payload = varint(version) + string("python-peer/1") + string(center) + settings_hash + bytes(32) + b"\x00"
    payload += b"".join(varint(c) for c in counts)
    return frame(1, payload)


def decode(header: bytes, payload: bytes) -> dict:
    magic, (version, kind, flags, length) = header[:4], struct.unpack("<HBBQ", header[4:])
    if magic != MAGIC or version != VERSION or flags != 0 or length != len(payload):
        raise ValueError(f"bad header {header.hex()}")
    r = Reader(payload)
    if kind == 2:
        msg = {"kind": "Welcome", "run_id": r.string(), "center": r.string(), "role": ROLES[r.varint()],
               "rounds": r.varint()}
    elif kind == 8:
        msg = {"kind": "Error", "code": ERROR_CODES[r.varint()], "message": r.string()}
    else:
        raise ValueError(f"unexpected {KINDS.get(kind, kind)}")
    if r.pos != len(payload):
        raise ValueError("trailing bytes")
    return msg


async def run(args) -> dict:
    config = QuicConfiguration(is_client=True, alpn_protocols=["fedslm/1"])
    config.load_verify_locations(args.ca)
    config.load_cert_chain(args.cert, args.key)
    config.server_name = args.server_name
    host, port = args.server.rsplit(":", 1)
    async with connect(host.strip("[]"), int(port), configuration=config) as client:
        reader, writer = await client.create_stream()
        writer.write(hello(args.center, bytes.fromhex(args.settings_hash), (60, 14, 60), args.version))
        header = await asyncio.wait_for(reader.readexactly(16), args.timeout)
        (length,) = struct.unpack("<Q", header[8:])
        if length > 64 * 1024:
            raise ValueError(f"answer of {length} bytes is larger than a Welcome or Error may be")
        payload = await asyncio.wait_for(reader.readexactly(length), args.timeout)
        return decode(header, payload)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--server-name", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--center", required=True)
    p.add_argument("--settings-hash", default="00" * 32)
    p.add_argument("--version", type=int, default=VERSION, help="protocol version to claim in the Hello")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    try:
        msg = asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except Exception as e:  # a peer tool: report any failure as data
        print(json.dumps({"kind": "failure", "error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(msg))
    return {"Welcome": 0, "Error": 3}[msg["kind"]]


if __name__ == "__main__":
    sys.exit(main())
