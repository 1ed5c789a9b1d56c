# The C extension _directio.c (built by setup.py): directio.py's file writes and reads with the GIL released.
from typing import Union

_Buffer = Union[bytes, bytearray, memoryview]

ALIGN: int

def write_new(path: str, data: _Buffer, direct: bool, sync: bool, /) -> None: ...
def pwrite_direct(fd: int, data: _Buffer, offset: int, /) -> None: ...
def read_direct(path: str, size: int, /) -> bytes: ...
