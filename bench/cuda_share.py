"""GPU memory that the trusted harness shares with the sandboxed forward worker, for logits.

On CUDA an evaluation batch's logits are gigabytes (32 x 1024 x 50304 floats on gpu-small):
too much to copy through the host for every batch. The harness allocates one buffer with
CUDA's virtual memory management as an allocation exportable as a POSIX file descriptor,
passes the descriptor over the worker's Unix socket (SCM_RIGHTS), and the worker maps the
same memory and writes its logits there; the harness then reads them in place. A file
descriptor crosses PID namespaces, where legacy CUDA IPC handles do not, so the forward
worker keeps a sandbox of its own.

The buffer is its own allocation, holding nothing but logits: the worker can reach no
other memory of the harness through it. Driver API through ctypes (libcuda.so.1 ships
with every driver); this module is used on CUDA only and never on the CPU path.
"""

from __future__ import annotations

import ctypes

import torch

_HANDLE_TYPE_POSIX_FD = 1
_ALLOCATION_PINNED = 1
_LOCATION_DEVICE = 1
_PROT_READWRITE = 3
_GRANULARITY_MINIMUM = 0


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class CudaShareError(RuntimeError):
    """The driver refused a step; the caller falls back to sending logits through the host."""


def _driver():
    cuda = ctypes.CDLL("libcuda.so.1")
    for name in ("cuMemCreate", "cuMemAddressReserve", "cuMemMap", "cuMemSetAccess",
                 "cuMemExportToShareableHandle", "cuMemImportFromShareableHandle",
                 "cuMemGetAllocationGranularity", "cuMemUnmap", "cuMemAddressFree",
                 "cuMemRelease"):
        getattr(cuda, name).restype = ctypes.c_int
    return cuda


def _check(code: int, step: str) -> None:
    if code != 0:
        raise CudaShareError(f"{step} failed with CUDA driver error {code}")


class SharedBuffer:
    """`nbytes` of device memory mapped into this process, as a flat float32 tensor."""

    def __init__(self, nbytes: int, device: torch.device, fd: int | None = None):
        torch.cuda.set_device(device)
        torch.cuda.synchronize(device)  # the primary context is current on this thread
        self.cuda = _driver()
        prop = _AllocationProp(type=_ALLOCATION_PINNED, requestedHandleTypes=_HANDLE_TYPE_POSIX_FD,
                               location=_Location(_LOCATION_DEVICE, device.index or 0))
        grain = ctypes.c_size_t()
        _check(self.cuda.cuMemGetAllocationGranularity(ctypes.byref(grain), ctypes.byref(prop),
                                                       _GRANULARITY_MINIMUM), "granularity")
        self.size = -(-nbytes // grain.value) * grain.value
        self.handle = ctypes.c_ulonglong()
        if fd is None:  # the harness: a new allocation
            _check(self.cuda.cuMemCreate(ctypes.byref(self.handle), ctypes.c_size_t(self.size),
                                         ctypes.byref(prop), ctypes.c_ulonglong(0)), "cuMemCreate")
        else:  # the worker: the harness's allocation, from its file descriptor
            _check(self.cuda.cuMemImportFromShareableHandle(
                ctypes.byref(self.handle), ctypes.c_void_p(fd), _HANDLE_TYPE_POSIX_FD), "import")
        self.ptr = ctypes.c_ulonglong()
        _check(self.cuda.cuMemAddressReserve(ctypes.byref(self.ptr), ctypes.c_size_t(self.size),
                                             ctypes.c_size_t(0), ctypes.c_ulonglong(0),
                                             ctypes.c_ulonglong(0)), "reserve")
        _check(self.cuda.cuMemMap(self.ptr, ctypes.c_size_t(self.size), ctypes.c_size_t(0),
                                  self.handle, ctypes.c_ulonglong(0)), "map")
        access = _AccessDesc(_Location(_LOCATION_DEVICE, device.index or 0), _PROT_READWRITE)
        _check(self.cuda.cuMemSetAccess(self.ptr, ctypes.c_size_t(self.size),
                                        ctypes.byref(access), ctypes.c_size_t(1)), "access")
        n = nbytes // 4
        self.tensor = torch.as_tensor(_ArrayInterface(self.ptr.value, n), device=device)

    def export_fd(self) -> int:
        """A file descriptor of the allocation, to send to the worker (then close it)."""
        fd = ctypes.c_int(-1)
        _check(self.cuda.cuMemExportToShareableHandle(ctypes.byref(fd), self.handle,
                                                      _HANDLE_TYPE_POSIX_FD,
                                                      ctypes.c_ulonglong(0)), "export")
        return fd.value

    def close(self) -> None:
        self.tensor = None
        self.cuda.cuMemUnmap(self.ptr, ctypes.c_size_t(self.size))
        self.cuda.cuMemAddressFree(self.ptr, ctypes.c_size_t(self.size))
        self.cuda.cuMemRelease(self.handle)


class _ArrayInterface:
    """Just enough of __cuda_array_interface__ for torch.as_tensor to wrap a raw pointer."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<f4", "data": (ptr, False),
                                         "version": 3, "strides": None}
