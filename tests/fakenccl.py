"""fakenccl: a test-only stand-in for ``cupy.cuda.nccl`` (``NETLIB_NCCL_MODULE=fakenccl``),
so netlib's NCCL path (netlib/nccl.py) runs on a machine without GPUs.

It has CuPy's names and calling convention: ``get_unique_id()`` (a tuple of
128 signed chars), ``NcclCommunicator(ndev, uid, rank)`` whose collectives
take raw buffer pointers, element counts and NCCL's datatype codes, and the
``NCCL_*`` constants.  The buffers are the memory behind
``__cuda_array_interface__`` (tests/fakecupy.py's host memory).  The
transport is a star of local sockets (``multiprocessing.connection``): the
id names rank 0's port and an authentication key.  Rank 0 computes every
reduction once, in rank order, so all ranks get the same bits, as NCCL's
all-reduce gives.  Not reproduced: streams (the calls are synchronous),
roots other than 0, and operations other than the sum.  ``FAKENCCL_FAIL_RANK=r`` makes
rank r's communicator fail (a test of a rank that dies).
"""
import ctypes
import os
import socket
import time
from multiprocessing.connection import Client, Listener

import numpy as np

available = True
NCCL_UINT8, NCCL_INT64, NCCL_FLOAT32, NCCL_FLOAT64 = 1, 4, 7, 8
NCCL_SUM = 0
_TYPES = {NCCL_UINT8: np.uint8, NCCL_INT64: np.int64, NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}


def get_unique_id():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = ("%d:%s" % (port, os.urandom(8).hex())).encode("ascii").ljust(128, b"\0")
    return tuple(c - 256 if c > 127 else c for c in text)


def _memory(ptr, count, datatype):
    dtype = np.dtype(_TYPES[datatype])
    return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype=dtype, count=count)


class NcclCommunicator:
    def __init__(self, ndev, commId, rank):
        port, key = bytes(c & 0xFF for c in commId).rstrip(b"\0").decode("ascii").split(":")
        address, key = ("127.0.0.1", int(port)), key.encode("ascii")
        self.size, self.rank = int(ndev), int(rank)
        if os.environ.get("FAKENCCL_FAIL_RANK") == str(self.rank):   # a test's failing rank
            raise RuntimeError("fakenccl: rank %d fails on purpose (FAKENCCL_FAIL_RANK)" % self.rank)
        if self.rank == 0:
            with Listener(address, authkey=key) as listener:
                joined = {}
                for _ in range(self.size - 1):
                    conn = listener.accept()
                    joined[conn.recv()] = conn
            self.peers = [joined[r] for r in range(1, self.size)]
        else:
            deadline = time.time() + 120
            while True:
                try:
                    self.root = Client(address, authkey=key)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
            self.root.send(self.rank)

    def _to_root(self, data):
        """Every rank's bytes, in rank order, on rank 0 (None elsewhere)."""
        if self.rank == 0:
            return [data] + [c.recv_bytes() for c in self.peers]
        self.root.send_bytes(data)
        return None

    def _from_root(self, data):
        if self.rank == 0:
            for c in self.peers:
                c.send_bytes(data)
            return data
        return self.root.recv_bytes()

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        if op != NCCL_SUM:
            raise NotImplementedError("fakenccl: only the sum")
        parts = self._to_root(_memory(sendbuf, count, datatype).tobytes())
        total = None
        if parts is not None:
            arrays = [np.frombuffer(p, dtype=_TYPES[datatype]) for p in parts]
            acc = arrays[0].copy()
            for a in arrays[1:]:
                acc += a
            total = acc.tobytes()
        _memory(recvbuf, count, datatype)[...] = np.frombuffer(self._from_root(total), dtype=_TYPES[datatype])

    def bcast(self, buff, count, datatype, root, stream):
        if root != 0:
            raise NotImplementedError("fakenccl: root 0 only")
        mine = _memory(buff, count, datatype)
        data = self._from_root(mine.tobytes() if self.rank == 0 else None)
        if self.rank:
            mine[...] = np.frombuffer(data, dtype=_TYPES[datatype])

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):
        parts = self._to_root(_memory(sendbuf, count, datatype).tobytes())
        data = self._from_root(b"".join(parts) if parts is not None else None)
        _memory(recvbuf, count * self.size, datatype)[...] = np.frombuffer(data, dtype=_TYPES[datatype])

    def abort(self):
        for c in getattr(self, "peers", []) + ([self.root] if hasattr(self, "root") else []):
            c.close()
