"""Third-party Modbus-TCP master (pymodbus) against the gateway's server.

Usage: python3 tests/interop/tcp_client.py HOST PORT PASS_UNIT AGENT_UNIT
The pass unit needs grants for holding 0..99 and coils 0..99.
"""
import asyncio
import sys

from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient
from pymodbus.pdu import ExceptionResponse

host, port, P, A = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fails = 0


def check(name, rsp, want_exc=None):
    global fails
    if rsp.isError():
        code = getattr(rsp, "exception_code", None)
        ok = want_exc is not None and code == want_exc
        print(("ok  " if ok else "FAIL"), name, "exception", code, "" if ok else rsp)
    else:
        ok = want_exc is None
        print(("ok  " if ok else "FAIL"), name, (rsp.registers or rsp.bits or [rsp])[:20])
    fails += 0 if ok else 1
    return rsp


c = ModbusTcpClient(host, port=port, timeout=2, retries=0)
assert c.connect()
check("fc3 pass", c.read_holding_registers(0, count=10, device_id=P))
check("fc4 pass", c.read_input_registers(0, count=3, device_id=P))
r = check("fc1 pass 13", c.read_coils(0, count=13, device_id=P))
check("fc2 pass 13", c.read_discrete_inputs(0, count=13, device_id=P))
check("fc3 agent", c.read_holding_registers(0, count=1, device_id=A))
check("fc6", c.write_register(7, 777, device_id=P))
check("fc16", c.write_registers(8, [1, 2, 3], device_id=P))
check("fc5", c.write_coil(3, True, device_id=P))
check("fc15", c.write_coils(10, [True] * 11, device_id=P))
check("fc22", c.mask_write_register(address=7, and_mask=0xF2, or_mask=0x25, device_id=P))
check("fc23", c.readwrite_registers(read_address=7, read_count=4, write_address=8, values=[5, 6], device_id=P))
check("readback", c.read_holding_registers(7, count=4, device_id=P))
check("fc3 unmapped", c.read_holding_registers(1000, count=1, device_id=P), 2)
check("fc6 outside grant", c.write_register(1000, 1, device_id=P), 2)
check("unserved unit", c.read_holding_registers(0, count=1, device_id=77), 0x0A)
check("fc17 report server id", c.report_device_id(device_id=P))
c.close()


async def pipelined():
    ac = AsyncModbusTcpClient(host, port=port, timeout=3, retries=0)
    await ac.connect()
    rs = await asyncio.gather(*[ac.read_holding_registers(i, count=1, device_id=P) for i in range(8)])
    vals = [r.registers[0] if not r.isError() else ("exc", r.exception_code) for r in rs]
    print("pipelined", vals)
    ac.close()


asyncio.run(pipelined())
print("FAILS", fails)
sys.exit(1 if fails else 0)
