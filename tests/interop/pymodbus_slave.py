"""A third-party slave: pymodbus RTU server on a serial port (a pty from socat), or an
RTU-framed TCP server (`tcp:PORT`). Units 1 and 2; holding/input 0..299 and coils/discrete 0..1999 are
mapped (holding i = 1000 + i, input i = 2000 + i, coils/discrete alternate), 100.. are not.

Usage: socat pty,link=/tmp/a,raw,echo=0 pty,link=/tmp/b,raw,echo=0 &
       python3 tests/interop/pymodbus_slave.py /tmp/a      # then poll /tmp/b
       python3 tests/interop/pymodbus_slave.py tcp:5030     # then port = "tcp://127.0.0.1:5030"
       python3 tests/interop/pymodbus_slave.py /tmp/a --ascii  # Modbus ASCII slave
       python3 tests/interop/pymodbus_slave.py mbap:5031    # Modbus-TCP: poll --tcp 127.0.0.1:5031
       python3 tests/interop/pymodbus_slave.py mbap:0       # a free port: prints "listening on PORT"
"""
import asyncio
import logging
import sys

from pymodbus import FramerType
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import ModbusTcpServer, StartSerialServer

logging.basicConfig(level=logging.DEBUG if "-v" in sys.argv else logging.WARNING)


def device():
    # pymodbus data blocks are 1-based internally: address 1 is wire address 0.
    return ModbusDeviceContext(
        co=ModbusSequentialDataBlock(1, [i % 2 for i in range(2000)]),
        di=ModbusSequentialDataBlock(1, [(i // 2) % 2 for i in range(2000)]),
        hr=ModbusSequentialDataBlock(1, [1000 + i for i in range(300)]),
        ir=ModbusSequentialDataBlock(1, [2000 + i for i in range(300)]),
    )


async def serve_tcp(port, framer):
    """Port 0: bind a free port, and print it (`listening on PORT`) once it listens."""
    server = ModbusTcpServer(ctx, address=("127.0.0.1", port), framer=framer)
    await server.serve_forever(background=True)
    print(f"listening on {server.transport.sockets[0].getsockname()[1]}", flush=True)
    await server.serving


ctx = ModbusServerContext(devices={1: device(), 2: device()}, single=False)
where = sys.argv[1]
if where.startswith("mbap:"):
    asyncio.run(serve_tcp(int(where[5:]), FramerType.SOCKET))
elif where.startswith("tcp:"):
    asyncio.run(serve_tcp(int(where[4:]), FramerType.RTU))
else:
    framer = FramerType.ASCII if "--ascii" in sys.argv else FramerType.RTU
    StartSerialServer(ctx, framer=framer, port=where, baudrate=9600, parity="N")
