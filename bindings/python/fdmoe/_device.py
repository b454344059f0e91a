"""GPU arrays for the cuda backend: torch tensors, cupy arrays, and anything else exposing
__cuda_array_interface__ or DLPack, used in place.

The cuda backend reads device pointers. This module finds out which array library an argument
belongs to, checks its device, shape and dtype without copying, and hands back its address;
it copies only where the library needs something the array is not:

  - another element type (x of float32 for a bfloat16 layer: converted on the device, with
    round-to-nearest-even as on the host; int64 ids: converted to int32 without a range check,
    which would need a host sync; the GPU backend skips out-of-range ids, SPEC §3),
  - a non C-contiguous view (made contiguous on the device),
  - an x that is not 16-byte aligned (a view starting mid-row: copied).

Outputs are allocated with the library of x (torch in -> torch out, cupy in -> cupy out;
other __cuda_array_interface__ / DLPack objects are wrapped by torch if it is installed, else
by cupy) on the layer's device. torch and cupy are imported only when an argument needs them,
so nothing here is loaded for numpy-only use.

cupy has no bfloat16 dtype: for a bfloat16 layer a cupy array of uint16 is read as bfloat16 bit
patterns, float arrays are rounded to those bits on the device, and outputs are uint16 arrays
holding bfloat16 bits (`torch.from_dlpack(a).view(torch.bfloat16)` reads them).

Each array library is wrapped in a small adapter (`TorchLib`, `CupyLib`) with the same few
methods; `DeviceArrays` holds the checks and talks only to that interface, so it can be tested
without a GPU (tests/test_device_arrays.py gives it a numpy-backed fake).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from ._arrays import HostArrays, bfloat16, check_shape
from ._errors import InvalidArgumentError, UnsupportedError

# DLPack device types (dlpack.h): memory the cuda backend can read in place.
_KDL_CUDA = 2
_KDL_CUDA_MANAGED = 13

_FLOAT_NAMES = frozenset({"float16", "float32", "float64", "bfloat16"})
_INT_NAMES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})

# x and out are read and written with 16-byte vector accesses (cuda backend requirement).
X_ALIGNMENT = 16


# ---------------------------------------------------------------------------------------------
# What an argument is.


def _module_root(value: object) -> str:
    return type(value).__module__.partition(".")[0]


def is_torch_tensor(value: object) -> bool:
    """True for a torch.Tensor, without importing torch (it is loaded if a tensor exists)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_cupy_array(value: object) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(value, cupy.ndarray)


def cuda_array_interface(value: object) -> Optional[dict]:
    """The object's __cuda_array_interface__ dict, or None.

    Not for torch tensors: theirs raises KeyError for bfloat16 and RuntimeError when
    requires_grad is set, so `hasattr` would not be a safe test.
    """
    if is_torch_tensor(value):
        return None
    try:
        cai = value.__cuda_array_interface__  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - AttributeError, or a property that refuses
        return None
    return cai if isinstance(cai, dict) else None


def dlpack_device(value: object) -> Optional[Tuple[int, int]]:
    """(device_type, device_id) of a DLPack producer, or None."""
    fn = getattr(type(value), "__dlpack_device__", None)
    if fn is None or isinstance(value, np.ndarray):
        return None
    try:
        kind, ident = fn(value)
        return int(kind), int(ident)
    except Exception:  # noqa: BLE001
        return None


def kind_of(value: object) -> str:
    """Where an argument lives and who can read it in place:

    "torch" (a CUDA tensor), "cupy", "cai" (another __cuda_array_interface__ object),
    "dlpack" (a DLPack producer on a CUDA device), or "host" (numpy, lists, CPU tensors).
    """
    if is_torch_tensor(value):
        return "torch" if value.is_cuda else "host"
    if is_cupy_array(value):
        return "cupy"
    if cuda_array_interface(value) is not None:
        return "cai"
    dev = dlpack_device(value)
    if dev is not None and dev[0] in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        return "dlpack"
    return "host"


def is_device_array(value: object) -> bool:
    return kind_of(value) != "host"


def parse_cai(cai: dict) -> Tuple[int, Tuple[int, ...], np.dtype, bool]:
    """(address, shape, dtype, C-contiguous) of a __cuda_array_interface__ dict (v2/v3).

    `strides` None means C-contiguous; explicit strides are compared with the C-order ones
    (dimensions of size 1 may have any stride).
    """
    try:
        ptr = int(cai["data"][0])
        shape = tuple(int(d) for d in cai["shape"])
        dtype = np.dtype(cai["typestr"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InvalidArgumentError(f"malformed __cuda_array_interface__ {cai!r}: {e}") from None
    strides = cai.get("strides")
    contiguous = True
    if strides is not None:
        expect = dtype.itemsize
        for dim, stride in zip(reversed(shape), reversed(tuple(strides))):
            if dim != 1 and stride != expect:
                contiguous = False
                break
            expect *= dim
    return ptr, shape, dtype, contiguous


def stream_handle(stream: object) -> int:
    """The cudaStream_t address of `stream`: an int, a torch.cuda.Stream / ExternalStream
    (`.cuda_stream`), a cupy Stream (`.ptr`), or anything convertible with int()."""
    if isinstance(stream, bool):
        raise InvalidArgumentError("stream must be a CUDA stream handle, not a bool")
    for attr in ("cuda_stream", "ptr"):
        value = getattr(stream, attr, None)
        if value is not None:
            return int(value)
    try:
        return int(stream)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"stream = {stream!r} is not a CUDA stream (an int handle, a torch.cuda.Stream or a "
            "cupy Stream)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Array-library adapters.


@dataclass(frozen=True)
class ArrayInfo:
    shape: Tuple[int, ...]
    dtype: str  # element type as the library names it ("bfloat16", "float32", "int64", ...)
    device: Optional[int]  # CUDA ordinal, None for host memory
    c_contiguous: bool
    ptr: int


class TorchLib:
    """torch tensors (imported on first use)."""

    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self._dtypes = {
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "int32": torch.int32,
        }

    def storage(self, logical: str) -> str:
        return logical

    def owns(self, value: object) -> bool:
        return isinstance(value, self.torch.Tensor)

    def adopt(self, value: object, ordinal: int):
        """A tensor viewing `value`'s device memory (no copy)."""
        torch = self.torch
        if isinstance(value, torch.Tensor):
            return value.detach()
        kind = kind_of(value)
        if kind in ("cupy", "cai"):
            # Zero-copy through __cuda_array_interface__ when the memory is on `ordinal`.
            return torch.as_tensor(value, device=torch.device("cuda", ordinal))
        if kind == "dlpack":
            return torch.from_dlpack(value)
        raise TypeError(f"{type(value).__name__} is not a device array")

    def describe(self, t) -> ArrayInfo:
        return ArrayInfo(
            shape=tuple(t.shape),
            dtype=str(t.dtype).replace("torch.", ""),
            device=t.device.index if t.is_cuda else None,
            c_contiguous=t.is_contiguous(),
            ptr=t.data_ptr(),
        )

    def convert(self, t, logical: str):
        # torch rounds float32 -> bfloat16/float16 to nearest even, like ml_dtypes on the host.
        return t.to(self._dtypes[logical])

    def contiguous(self, t):
        return t.contiguous()

    def copy(self, t):
        return t.clone(memory_format=self.torch.contiguous_format)

    def empty(self, shape: Sequence[int], logical: str, ordinal: int):
        return self.torch.empty(
            tuple(shape), dtype=self._dtypes[logical], device=self.torch.device("cuda", ordinal)
        )

    def address(self, t) -> int:
        return t.data_ptr()

    def current_stream(self, ordinal: int) -> int:
        return self.torch.cuda.current_stream(ordinal).cuda_stream

    def upload(self, a: np.ndarray, ordinal: int):
        """A copy of a host array on the device (on the current stream)."""
        torch = self.torch
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:  # torch.from_numpy warns on read-only memory
            a = a.copy()
        dev = torch.device("cuda", ordinal)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).to(dev).view(torch.bfloat16)
        return torch.from_numpy(a).to(dev)

    def download(self, t, logical: Optional[str] = None) -> np.ndarray:
        """A host numpy copy (synchronous on the current stream)."""
        t = t.detach()
        if t.dtype == self.torch.bfloat16:
            return t.view(self.torch.int16).cpu().numpy().view(bfloat16())
        return t.cpu().numpy()

    def _stream(self, stream: int, ordinal: int):
        """A torch stream object of a cudaStream_t handle."""
        torch = self.torch
        dev = torch.device("cuda", ordinal)
        current = torch.cuda.current_stream(dev)
        if current.cuda_stream == stream:
            return current
        wrap = getattr(torch.cuda, "get_stream_from_external", None)  # torch >= 2.5
        if wrap is not None:
            return wrap(stream, dev)
        return torch.cuda.ExternalStream(stream, device=dev)

    def synchronize(self, stream: int, ordinal: int) -> None:
        self._stream(stream, ordinal).synchronize()

    @contextlib.contextmanager
    def stream_scope(self, stream: Optional[int], ordinal: int) -> Iterator[int]:
        """Makes `stream` (None: the current one) torch's current stream of `ordinal`."""
        torch = self.torch
        dev = torch.device("cuda", ordinal)
        with torch.cuda.device(dev):
            if stream is None:
                yield torch.cuda.current_stream(dev).cuda_stream
            else:
                with torch.cuda.stream(self._stream(stream, ordinal)):
                    yield stream


class CupyLib:
    """cupy arrays (imported on first use); bfloat16 is stored as uint16 bit patterns."""

    name = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy

    def storage(self, logical: str) -> str:
        return "uint16" if logical == "bfloat16" else logical

    def owns(self, value: object) -> bool:
        return isinstance(value, self.cp.ndarray)

    def adopt(self, value: object, ordinal: int):
        cp = self.cp
        if isinstance(value, cp.ndarray):
            return value
        kind = kind_of(value)
        if kind == "cai":
            with cp.cuda.Device(ordinal):
                return cp.asarray(value)  # zero-copy through __cuda_array_interface__
        if kind == "dlpack":
            return cp.from_dlpack(value)
        raise TypeError(f"{type(value).__name__} is not a device array")

    def describe(self, a) -> ArrayInfo:
        return ArrayInfo(
            shape=tuple(a.shape),
            dtype=a.dtype.name,
            device=a.device.id,
            c_contiguous=bool(a.flags.c_contiguous),
            ptr=int(a.data.ptr),
        )

    def convert(self, a, logical: str):
        cp = self.cp
        with cp.cuda.Device(a.device.id):
            if logical == "bfloat16":
                return float_to_bf16_bits(cp, a)
            return a.astype(logical)

    def contiguous(self, a):
        with self.cp.cuda.Device(a.device.id):
            return self.cp.ascontiguousarray(a)

    def copy(self, a):
        with self.cp.cuda.Device(a.device.id):
            return a.copy()

    def empty(self, shape: Sequence[int], logical: str, ordinal: int):
        with self.cp.cuda.Device(ordinal):
            return self.cp.empty(tuple(shape), dtype=self.storage(logical))

    def address(self, a) -> int:
        return int(a.data.ptr)

    def current_stream(self, ordinal: int) -> int:
        with self.cp.cuda.Device(ordinal):
            return int(self.cp.cuda.get_current_stream().ptr)

    def upload(self, a: np.ndarray, ordinal: int):
        a = np.ascontiguousarray(a)
        if a.dtype.name == "bfloat16":
            a = a.view(np.uint16)
        with self.cp.cuda.Device(ordinal):
            return self.cp.asarray(a)

    def download(self, a, logical: Optional[str] = None) -> np.ndarray:
        host = a.get()
        if logical == "bfloat16" and host.dtype == np.uint16:
            host = host.view(bfloat16())
        return host

    def synchronize(self, stream: int, ordinal: int) -> None:
        with self.cp.cuda.Device(ordinal):
            self.cp.cuda.ExternalStream(stream).synchronize()

    @contextlib.contextmanager
    def stream_scope(self, stream: Optional[int], ordinal: int) -> Iterator[int]:
        cp = self.cp
        with cp.cuda.Device(ordinal):
            if stream is None:
                yield int(cp.cuda.get_current_stream().ptr)
            else:
                with cp.cuda.ExternalStream(stream):
                    yield stream


def float_to_bf16_bits(xp, a):
    """bfloat16 bit patterns (uint16) of a float array, rounded to nearest even, NaN kept quiet.

    `xp` is cupy (or numpy, for the tests): only array operations every such module has.
    """
    f = a.astype(xp.float32)
    u = f.view(xp.uint32)
    rounded = ((u + xp.uint32(0x7FFF) + ((u >> xp.uint32(16)) & xp.uint32(1))) >> xp.uint32(16))
    bits = rounded.astype(xp.uint16)
    return xp.where(xp.isnan(f), xp.uint16(0x7FC0), bits)


_LIBS: dict = {}


def _load(name: str):
    lib = _LIBS.get(name)
    if lib is None:
        lib = _LIBS[name] = TorchLib() if name == "torch" else CupyLib()
    return lib


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        __import__(name)
    except (ImportError, OSError):  # not installed, or its native libraries do not load
        return False
    return True


def library_for(value: object):
    """The adapter that reads `value` in place and allocates outputs like it."""
    kind = kind_of(value)
    if kind in ("torch", "cupy"):
        return _load(kind)
    if kind in ("cai", "dlpack"):
        return host_library()
    raise TypeError(f"{type(value).__name__} is not a device array")


def host_library():
    """The library that copies host arrays to the device: torch if importable, else cupy."""
    for name in ("torch", "cupy"):
        if _importable(name):
            return _load(name)
    raise UnsupportedError(
        "device='cuda' with host (numpy) arrays needs torch or cupy to copy them to the GPU and "
        "back; install one of them, or pass torch/cupy arrays that are already on the device"
    )


def to_host(value: object, bf16_bits: bool = False) -> object:
    """A numpy copy of a device array or a CPU torch tensor; other values are returned as they are.

    `bf16_bits`: read uint16 arrays of libraries without bfloat16 (cupy) as bfloat16 bits.
    """
    if is_torch_tensor(value):
        return _load("torch").download(value)
    kind = kind_of(value)
    if kind == "host":
        return value
    lib = library_for(value)
    arr = lib.adopt(value, _device_of(value))
    host = lib.download(arr)
    if bf16_bits and host.dtype == np.uint16:
        host = host.view(bfloat16())
    return host


def _device_of(value: object) -> int:
    dev = dlpack_device(value)
    if dev is not None and dev[0] in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        return dev[1]
    device = getattr(value, "device", None)
    ident = getattr(device, "id", None)
    return int(ident) if ident is not None else 0


# ---------------------------------------------------------------------------------------------
# The checks, on any adapter.


class DeviceArrays:
    """Device arrays (FDMOE_MEMORY_DEVICE) of one adapter on one CUDA device; the same methods as
    HostArrays, so MoELayer's forward runs either. Host arrays given beside device ones are
    converted as on the host, then copied to the device (not capture-safe)."""

    memory = "device"

    def __init__(self, lib, ordinal: int):
        self.lib = lib
        self.ordinal = ordinal
        self._host = HostArrays()

    # -- helpers ----------------------------------------------------------------------------

    def _adopt(self, name: str, value: object):
        arr = self.lib.adopt(value, self.ordinal)
        info = self.lib.describe(arr)
        if info.device != self.ordinal:
            where = "host memory" if info.device is None else f"cuda:{info.device}"
            raise InvalidArgumentError(
                f"{name} is on {where}, but the layer runs on cuda:{self.ordinal}"
            )
        return arr, info

    def _layout(self, arr, info: ArrayInfo, align: int):
        """C-contiguous, and aligned to `align` bytes (copies only when needed)."""
        if not info.c_contiguous:
            arr = self.lib.contiguous(arr)
            info = self.lib.describe(arr)
        if align > 1 and info.ptr % align and info.ptr != 0:
            arr = self.lib.copy(arr)
        return arr

    def _is_float(self, dtype: str, want: str) -> bool:
        return dtype in _FLOAT_NAMES or (dtype == self.lib.storage(want) and want in _FLOAT_NAMES)

    def shape_of(self, arr) -> Tuple[int, ...]:
        return self.lib.describe(arr).shape

    # -- the HostArrays interface -------------------------------------------------------------

    def float_input(
        self, name: str, value: object, shape, names, dtype: np.dtype, align: int = 1
    ):
        """A C-contiguous device array of `dtype` (converted on the device if needed)."""
        want = np.dtype(dtype).name
        if kind_of(value) == "host":
            host = self._host.float_input(name, value, shape, names, dtype)
            return self.lib.upload(host, self.ordinal)
        arr, info = self._adopt(name, value)
        if not self._is_float(info.dtype, want):
            raise InvalidArgumentError(
                f"{name} has dtype {info.dtype}; expected a floating-point array"
            )
        check_shape(name, info.shape, shape, names)
        if info.dtype != self.lib.storage(want):
            arr = self.lib.convert(arr, want)
            info = self.lib.describe(arr)
        return self._layout(arr, info, align)

    def logical(self, dtype: str) -> str:
        """The dense type name of an element type as the adapter stores it (cupy: uint16 is
        bfloat16)."""
        return "bfloat16" if dtype == self.lib.storage("bfloat16") else dtype

    def dtype_name(self, arr) -> str:
        return self.logical(self.lib.describe(arr).dtype)

    def weight_input(self, name: str, value: object, shape, names):
        """A C-contiguous weight matrix on the device, kept in its own dense type (float32,
        bfloat16, float16); other floating types are converted to float32 on the device."""
        if kind_of(value) == "host":
            host = self._host.weight_input(name, value, shape, names)
            return self.lib.upload(host, self.ordinal)
        arr, info = self._adopt(name, value)
        logical = self.logical(info.dtype)
        if logical not in _FLOAT_NAMES:
            raise InvalidArgumentError(
                f"{name} has dtype {info.dtype}; expected a floating-point array"
            )
        check_shape(name, info.shape, shape, names)
        if logical not in ("float32", "float16", "bfloat16"):
            arr = self.lib.convert(arr, "float32")
            info = self.lib.describe(arr)
        return self._layout(arr, info, 1)

    def int32_input(self, name: str, value: object, shape, names):
        """A C-contiguous int32 device array. Other integer types are converted on the device
        without a range check (that would need a host sync)."""
        if kind_of(value) == "host":
            host = self._host.int32_input(name, value, shape, names)
            return self.lib.upload(host, self.ordinal)
        arr, info = self._adopt(name, value)
        if info.dtype not in _INT_NAMES:
            raise InvalidArgumentError(
                f"{name} has dtype {info.dtype}; expected an integer array (int32)"
            )
        check_shape(name, info.shape, shape, names)
        if info.dtype != "int32":
            arr = self.lib.convert(arr, "int32")
            info = self.lib.describe(arr)
        return self._layout(arr, info, 1)

    def output(self, name: str, out: object, shape: Tuple[int, ...], dtype: np.dtype):
        """A new device array, or the caller's `out` if it is exactly what the call writes."""
        logical = np.dtype(dtype).name
        if out is None:
            return self.lib.empty(shape, logical, self.ordinal)
        if kind_of(out) == "host":
            raise InvalidArgumentError(
                f"{name} must be a device array on cuda:{self.ordinal} (the inputs are device "
                f"arrays), got {type(out).__name__}"
            )
        arr, info = self._adopt(name, out)
        storage = self.lib.storage(logical)
        if info.dtype != storage:
            raise InvalidArgumentError(f"{name} has dtype {info.dtype}; expected {storage}")
        check_shape(name, info.shape, shape, [str(d) for d in shape])
        if not info.c_contiguous:
            raise InvalidArgumentError(f"{name} must be a C-contiguous array")
        if info.ptr % X_ALIGNMENT:
            raise InvalidArgumentError(f"{name} must be {X_ALIGNMENT}-byte aligned on the cuda backend")
        return out if self.lib.owns(out) else arr

    def address(self, arr) -> Optional[int]:
        if arr is None:
            return None
        return self.lib.address(arr)
