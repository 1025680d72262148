"""Third-party RTU master (pymodbus) against our simulator's RTU slave framing.

Usage: m2m-gateway simulate --units 1,2 --link /tmp/sim0 &
       python3 tests/interop/sim_rtu_client.py /tmp/sim0
"""
import sys
import time

from pymodbus.client import ModbusSerialClient
from pymodbus.pdu import ExceptionResponse
from pymodbus.pdu.diag_message import ReturnQueryDataRequest

port = sys.argv[1]
c = ModbusSerialClient(port, baudrate=9600, parity="N", timeout=1, retries=0)
assert c.connect()
fails = 0


def check(name, rsp, want_exc=None):
    global fails
    if isinstance(rsp, ExceptionResponse) or rsp.isError():
        code = getattr(rsp, "exception_code", None)
        ok = want_exc is not None and code == want_exc
        print(("ok  " if ok else "FAIL"), name, "exception", code)
    else:
        ok = want_exc is None
        print(("ok  " if ok else "FAIL"), name, getattr(rsp, "registers", None) or getattr(rsp, "bits", None) or rsp)
    if not ok:
        fails += 1
    return rsp


check("fc3", c.read_holding_registers(0, count=10, device_id=1))
check("fc4", c.read_input_registers(0, count=10, device_id=1))
r = check("fc1 x13", c.read_coils(0, count=13, device_id=1))
print("     coil bits returned", len(r.bits))
check("fc2 x13", c.read_discrete_inputs(0, count=13, device_id=1))
check("fc3 125", c.read_holding_registers(0, count=100, device_id=1))
check("fc3 unmapped", c.read_holding_registers(200, count=2, device_id=1), 2)
check("fc6", c.write_register(3, 4321, device_id=1))
check("fc6 readback", c.read_holding_registers(3, count=1, device_id=1))
check("fc16", c.write_registers(4, [1, 2, 3], device_id=1))
check("fc5", c.write_coil(4, True, device_id=1))
check("fc15", c.write_coils(0, [True, False, True, True, False, False, True, True, True], device_id=1))
check("fc1 readback", c.read_coils(0, count=9, device_id=1))
check("fc22", c.mask_write_register(address=3, and_mask=0x00F2, or_mask=0x0025, device_id=1))
check("fc23", c.readwrite_registers(read_address=3, read_count=4, write_address=4, values=[9, 8], device_id=1))
check("fc8 diag", c.execute(False, ReturnQueryDataRequest(message=[0xA537], dev_id=1)), 1)
check("fc43 devid", c.read_device_information(device_id=1), 1)
check("unit2 fc3", c.read_holding_registers(0, count=2, device_id=2))
t = time.time()
try:
    c.read_holding_registers(0, count=2, device_id=9)
    print("FAIL unit 9 answered")
    fails += 1
except Exception:  # noqa: BLE001 -- pymodbus raises on silence
    print("ok   unit 9 silent", round(time.time() - t, 2), "s")
c.close()
print("FAILS", fails)
sys.exit(1 if fails else 0)
