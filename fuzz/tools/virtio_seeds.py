#!/usr/bin/env python3
"""Writes seed programs for the virtio targets (the program format is in fuzz/src/virtio.rs):
a driver that initialises the device, sets up its queues and passes well-formed requests
(vsock: a connection, data, credit, shutdown; net: frames both ways; blk: write, read,
flush, get-id), for the fuzzer to bend.

    fuzz/tools/virtio_seeds.py
"""
import hashlib
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seeds")
WRITE_REG, READ_REG, POKE, INIT, CHAIN, NOTIFY, SELECT, EXTRA = range(8)


def put(target, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def chunk(b):
    return struct.pack("<H", len(b)) + b


def init(features, queues_mask, size_exp=4):
    return bytes([INIT]) + struct.pack("<I", features) + bytes([queues_mask, size_exp])


def chain(q, descs):
    """descs: (addr offset into the buffers, length, flags, bytes written there)."""
    out = bytes([CHAIN, q, len(descs) - 1])
    for addr, ln, flags, data in descs:
        out += struct.pack("<HHB", addr, ln, flags) + chunk(data)
    return out


def notify(q):
    return bytes([NOTIFY, q])


def select(w):
    return bytes([SELECT, w])


def vsock_hdr(src, dst, sport, dport, op, length=0, buf_alloc=65536, fwd=0, flags=0):
    return struct.pack("<QQIIIHHIII", src, dst, sport, dport, length, 1, op, flags,
                       buf_alloc, fwd)


def vsock():
    rx = b"".join(chain(0, [(0x1000 * i, 4096, 1, b"")]) for i in range(4))
    setup = (init(1, 7) + rx + notify(0) + select(1) + init(1, 7) + rx + notify(0))
    # Partition 4 (window 1) connects to partition 3 (window 0) port 80.
    conn = chain(1, [(0x5000, 44, 0, vsock_hdr(4, 3, 1000, 80, 1))]) + notify(1)
    answer = select(0) + chain(1, [(0x5000, 44, 0, vsock_hdr(3, 4, 80, 1000, 2))]) + notify(1)
    data = select(1) + chain(1, [(0x5000, 44, 0, vsock_hdr(4, 3, 1000, 80, 5, 5)),
                                 (0x5100, 5, 0, b"hello")]) + notify(1)
    credit = select(0) + chain(1, [(0x5000, 44, 0, vsock_hdr(3, 4, 80, 1000, 7))]) + notify(1)
    bye = select(1) + chain(1, [(0x5000, 44, 0, vsock_hdr(4, 3, 1000, 80, 4, flags=3))])
    bye += notify(1) + chain(1, [(0x5000, 44, 0, vsock_hdr(4, 3, 1000, 80, 3))]) + notify(1)
    host = chain(1, [(0x5000, 44, 0, vsock_hdr(4, 2, 1001, 5000, 1))]) + notify(1)
    put("virtio_vsock", setup)
    put("virtio_vsock", setup + conn + answer + data)
    put("virtio_vsock", setup + conn + answer + data + credit + bye)
    put("virtio_vsock", setup + host + conn + bytes([EXTRA, 0]) + data)


def net():
    rx = b"".join(chain(0, [(0x1000 * i, 2048, 1, b"")]) for i in range(4))
    setup = init((1 << 5) | (1 << 16), 3) + rx + notify(0)
    frame = b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x57" + b"\x08\x06" + bytes(46)
    tx = chain(1, [(0x6000, 12 + len(frame), 0, bytes(12) + frame)]) + notify(1)
    tx2 = chain(1, [(0x6000, 12, 0, bytes(12)), (0x6100, len(frame), 0, frame)]) + notify(1)
    inject = bytes([EXTRA]) + chunk(bytes(12) + frame)
    magic = b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" * 16
    wol = bytes([EXTRA]) + chunk(bytes(12) + frame[:14] + magic)
    put("virtio_net", setup)
    put("virtio_net", setup + tx + tx2)
    put("virtio_net", setup + inject + wol + tx)


def blk():
    setup = init((1 << 6) | (1 << 9), 1)

    def req(kind, sector, data_len, writable, data=b""):
        hdr = struct.pack("<IIQ", kind, 0, sector)
        descs = [(0x0, 16, 0, hdr)]
        if data_len:
            descs.append((0x1000, data_len, 1 if writable else 0, data))
        descs.append((0x3000, 1, 1, b""))
        return chain(0, descs) + notify(0)

    write = req(1, 2, 512, False, b"\xab" * 512)
    read = req(0, 2, 512, True)
    flush = req(4, 0, 0, False)
    get_id = req(8, 0, 20, True)
    put("virtio_blk", setup)
    put("virtio_blk", setup + write + read)
    put("virtio_blk", setup + write + flush + get_id + bytes([EXTRA, 1]) + read)


if __name__ == "__main__":
    vsock()
    net()
    blk()
