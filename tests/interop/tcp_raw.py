"""Raw Modbus-TCP probes (MBAP edge cases) against a running gateway server.

Usage: python3 tests/interop/tcp_raw.py 127.0.0.1 5021 <agent-unit> <pass-unit>
Prints each request and the answer; no third-party package needed.
"""
import socket
import struct
import sys
import time

host, port, agent, pas = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def mbap(tid, unit, pdu, length=None):
    return struct.pack(">HHHB", tid, 0, length if length is not None else len(pdu) + 1, unit) + pdu


def conn():
    s = socket.create_connection((host, port))
    s.settimeout(2)
    return s


def recv_frame(s):
    head = b""
    while len(head) < 7:
        chunk = s.recv(7 - len(head))
        if not chunk:
            return None
        head += chunk
    tid, proto, length, unit = struct.unpack(">HHHB", head)
    body = b""
    while len(body) < length - 1:
        body += s.recv(length - 1 - len(body))
    return tid, proto, length, unit, body


def ask(name, unit, pdu, tid=0x1234):
    s = conn()
    s.sendall(mbap(tid, unit, pdu))
    try:
        r = recv_frame(s)
    except socket.timeout:
        r = "TIMEOUT"
    print(f"{name:40s} -> {r if isinstance(r, str) or r is None else (hex(r[0]), r[3], r[4].hex())}")
    s.close()
    return r


A, P = agent, pas
ask("fc3 agent", A, bytes([3, 0, 0, 0, 2]))
ask("fc1 agent qty 13", A, bytes([1, 0, 0, 0, 13]))
ask("fc1 pass qty 13", P, bytes([1, 0, 0, 0, 13]))
ask("fc2 pass qty 3", P, bytes([2, 0, 0, 0, 3]))
ask("fc1 pass qty 0", P, bytes([1, 0, 0, 0, 0]))
ask("fc3 qty 126", P, bytes([3, 0, 0, 0, 126]))
ask("fc3 range past 65535", P, bytes([3, 0xFF, 0xFF, 0, 2]))
ask("fc3 pass unmapped", P, bytes([3, 4, 0, 0, 2]))
ask("fc3 agent not polled", A, bytes([3, 4, 0, 0, 2]))
ask("fc5 value 0x1234", P, bytes([5, 0, 1, 0x12, 0x34]))
ask("fc5 on", P, bytes([5, 0, 1, 0xFF, 0]))
ask("fc6 echo", P, bytes([6, 0, 2, 0xAB, 0xCD]))
ask("fc15 bytecount mismatch", P, bytes([15, 0, 0, 0, 10, 1, 0xFF]))
ask("fc15 ok 10 coils", P, bytes([15, 0, 0, 0, 10, 2, 0xCD, 0x01]))
ask("fc16 bytecount mismatch", P, bytes([16, 0, 0, 0, 2, 2, 0, 1]))
ask("fc16 ok", P, bytes([16, 0, 0, 0, 2, 4, 0, 1, 0, 2]))
ask("fc16 qty 124", P, bytes([16, 0, 0, 0, 124, 248]) + bytes(248))
ask("fc23 ok", P, bytes([23, 0, 0, 0, 3, 0, 5, 0, 1, 2, 0, 7]))
ask("fc23 read 0", P, bytes([23, 0, 0, 0, 0, 0, 5, 0, 1, 2, 0, 7]))
ask("fc23 read 126", P, bytes([23, 0, 0, 0, 126, 0, 5, 0, 1, 2, 0, 7]))
ask("fc23 write 122", P, bytes([23, 0, 0, 0, 1, 0, 5, 0, 122, 244]) + bytes(244))
ask("fc3 125 regs", P, bytes([3, 0, 0, 0, 125]))
ask("fc1 2000 coils", P, bytes([1, 0, 0, 0x07, 0xD0]))
ask("fc2 1999 inputs", P, bytes([2, 0, 1, 0x07, 0xCF]))
ask("fc15 1968 coils", P, bytes([15, 0, 0, 0x07, 0xB0, 246]) + bytes(246))
ask("fc16 123 regs", P, bytes([16, 0, 0, 0, 123, 246]) + bytes(246))
ask("fc23 read 125 write 121", P, bytes([23, 0, 0, 0, 125, 0, 0, 0, 121, 242]) + bytes(242))
ask("fc22 ok", P, bytes([22, 0, 3, 0, 0xF2, 0, 0x25]))
for fc in (7, 8, 11, 12, 17, 20, 21, 24, 43, 0x41):
    pdu = bytes([fc]) + ({8: bytes([0, 0, 0xA5, 0x37]), 43: bytes([0x0E, 1, 0]), 24: bytes([0, 0]), 20: bytes([7, 6, 0, 1, 0, 0, 0, 1]),
                        21: bytes([9, 6, 0, 1, 0, 0, 0, 1, 0x12, 0x34])}.get(fc, b""))
    ask(f"fc{fc} pass", P, pdu)
    ask(f"fc{fc} agent", A, pdu)
ask("unit 0", 0, bytes([3, 0, 0, 0, 1]))
ask("unit 0 write", 0, bytes([6, 0, 0, 0, 1]))
ask("unit 255", 255, bytes([3, 0, 0, 0, 1]))
ask("unit unserved 77", 77, bytes([3, 0, 0, 0, 1]))
ask("silent device", 9, bytes([3, 0, 0, 0, 1]))
ask("agent write no grant? fc6", A, bytes([6, 0, 50, 0, 1]))
ask("fc0", P, bytes([0]))
ask("fc 0x83 (exception code as fc)", P, bytes([0x83, 2]))

# Pipelined: three requests in one segment, distinct tids.
s = conn()
s.sendall(mbap(1, P, bytes([3, 0, 0, 0, 1])) + mbap(2, A, bytes([3, 0, 0, 0, 1])) + mbap(3, P, bytes([3, 0, 1, 0, 1])))
got = sorted(recv_frame(s)[0] for _ in range(3))
print("pipelined tids", got)
# Split across segments, byte by byte.
for b in mbap(0xBEEF, P, bytes([3, 0, 0, 0, 1])):
    s.sendall(bytes([b]))
    time.sleep(0.01)
print("split tid", hex(recv_frame(s)[0]))
s.close()

# MBAP length shorter than the PDU sent / protocol id != 0 / length 1.
for name, raw in [
    ("length 1", mbap(5, P, b"", length=1)),
    ("protocol 1", struct.pack(">HHHB", 6, 1, 6, P) + bytes([3, 0, 0, 0, 1])),
    ("length 300", mbap(7, P, bytes([3, 0, 0, 0, 1]), length=300)),
    ("length too short (4 for 6)", mbap(8, P, bytes([3, 0, 0, 0, 1]), length=4) + bytes([0, 0])),
]:
    s = conn()
    s.sendall(raw)
    try:
        r = recv_frame(s)
        print(f"{name:40s} -> {r and (hex(r[0]), r[3], r[4].hex())}")
        r = recv_frame(s)
        print(f"{'':40s} -> then {r and (hex(r[0]), r[3], r[4].hex())}")
    except (socket.timeout, ConnectionResetError) as e:
        print(f"{name:40s} -> {type(e).__name__}")
    s.close()
