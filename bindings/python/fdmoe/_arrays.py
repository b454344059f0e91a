"""Turning caller arrays into (pointer, dtype) pairs the C API can read, and allocating outputs.

The C API cannot see shapes, so every array is checked here against the shape its argument
documents before its address crosses the boundary. Arrays are made C-contiguous and of the
element type the call needs; the converted arrays are returned to the caller of these helpers,
which keeps them alive until the C call returns.

`HostArrays` handles numpy arrays in host memory (the cpu backend, and weights of every backend:
the library copies host weights to the device itself). A later `DeviceArrays` (torch / cupy
through __cuda_array_interface__ or DLPack, for the cuda backend's forward) implements the same
methods without copies and hands back device pointers; `MoELayer` only talks to this interface.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ._errors import InvalidArgumentError, UnsupportedError

Shape = Tuple[Optional[int], ...]

_FLOAT32 = np.dtype(np.float32)
_FLOAT16 = np.dtype(np.float16)
_INT32 = np.dtype(np.int32)


def bfloat16() -> np.dtype:
    """ml_dtypes.bfloat16 as a numpy dtype (imported on first use)."""
    try:
        import ml_dtypes
    except ImportError as e:  # pragma: no cover - ml_dtypes is a declared dependency
        raise UnsupportedError(
            f"bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes): {e}"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a dense FdmoeDtype name ("float32", "bfloat16", "float16")."""
    if name == "float32":
        return _FLOAT32
    if name == "float16":
        return _FLOAT16
    if name == "bfloat16":
        return bfloat16()
    raise InvalidArgumentError(f"{name!r} is not a dense element type")


def dense_name(dtype: np.dtype) -> Optional[str]:
    """FdmoeDtype name of a numpy dtype the library reads directly, else None."""
    if dtype == _FLOAT32:
        return "float32"
    if dtype == _FLOAT16:
        return "float16"
    if dtype.name == "bfloat16":
        return "bfloat16"
    return None


def is_floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def format_shape(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _is_gpu_array(value: object) -> bool:
    return hasattr(value, "__cuda_array_interface__")


class HostArrays:
    """numpy arrays in host memory (FDMOE_MEMORY_HOST)."""

    memory = "host"

    def asarray(self, name: str, value: object) -> np.ndarray:
        if _is_gpu_array(value):
            raise UnsupportedError(
                f"{name} is a GPU array; this layer reads host (numpy) arrays"
            )
        try:
            return np.asarray(value)
        except Exception as e:  # noqa: BLE001 - any failure to view the object as an array
            raise InvalidArgumentError(f"{name} cannot be read as an array: {e}") from None

    def check_shape(self, name: str, arr: np.ndarray, shape: Shape, names: Sequence[str]) -> None:
        """Raises InvalidArgumentError unless arr.shape matches (None = any size)."""
        ok = arr.ndim == len(shape) and all(
            want is None or got == want for got, want in zip(arr.shape, shape)
        )
        if not ok:
            got = format_shape(arr.shape)
            want = format_shape(["*" if d is None else d for d in shape])
            raise InvalidArgumentError(
                f"{name} has shape {got}; expected {format_shape(names)} = {want}"
            )

    def float_input(
        self, name: str, value: object, shape: Shape, names: Sequence[str], dtype: np.dtype
    ) -> np.ndarray:
        """A C-contiguous array of `dtype` (converted with round-to-nearest-even if needed)."""
        arr = self.asarray(name, value)
        if not is_floating(arr.dtype):
            raise InvalidArgumentError(f"{name} has dtype {arr.dtype}; expected a floating-point array")
        self.check_shape(name, arr, shape, names)
        if arr.dtype != dtype:
            if dtype.name == "bfloat16" and arr.dtype not in (_FLOAT32,):
                # ml_dtypes rounds float32 -> bfloat16 to nearest even; go through float32 so
                # every source type takes that one, well-defined path.
                arr = arr.astype(_FLOAT32)
            arr = arr.astype(dtype)
        return np.ascontiguousarray(arr)

    def weight_input(
        self, name: str, value: object, shape: Shape, names: Sequence[str]
    ) -> np.ndarray:
        """A weight matrix kept in its own dense type (float32, bfloat16, float16); any other
        floating type is converted to float32."""
        arr = self.asarray(name, value)
        if not is_floating(arr.dtype):
            raise InvalidArgumentError(f"{name} has dtype {arr.dtype}; expected a floating-point array")
        self.check_shape(name, arr, shape, names)
        if dense_name(arr.dtype) is None:
            arr = arr.astype(_FLOAT32)
        return np.ascontiguousarray(arr)

    def int32_input(self, name: str, value: object, shape: Shape, names: Sequence[str]) -> np.ndarray:
        """A C-contiguous int32 array; other integer types must convert without loss."""
        arr = self.asarray(name, value)
        if arr.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{name} has dtype {arr.dtype}; expected an integer array (int32)")
        self.check_shape(name, arr, shape, names)
        if arr.dtype != _INT32:
            info = np.iinfo(_INT32)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise InvalidArgumentError(f"{name} holds values outside the int32 range")
            arr = arr.astype(_INT32)
        return np.ascontiguousarray(arr)

    def output(self, name: str, out: object, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer the library writes: a new array, or the caller's `out` if it fits exactly."""
        if out is None:
            return np.empty(shape, dtype=dtype)
        if not isinstance(out, np.ndarray):
            raise InvalidArgumentError(f"{name} must be a numpy array, got {type(out).__name__}")
        if out.dtype != dtype:
            raise InvalidArgumentError(f"{name} has dtype {out.dtype}; expected {dtype}")
        self.check_shape(name, out, shape, [str(d) for d in shape])
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise InvalidArgumentError(f"{name} must be a writeable C-contiguous array")
        return out

    @staticmethod
    def address(arr: Optional[np.ndarray]) -> Optional[int]:
        """The address of the first element, or None (NULL) for a missing array."""
        if arr is None:
            return None
        return arr.ctypes.data


class DeviceArrays:
    """Placeholder of the GPU path (FDMOE_MEMORY_DEVICE).

    The cuda backend's forward reads device pointers. The plan: accept objects exposing
    __cuda_array_interface__ (cupy, numba) or __dlpack__ (torch), check shape, dtype and
    contiguity without copying, allocate outputs with the caller's array library, and pass the
    caller's stream. Until then every method answers UnsupportedError.
    """

    memory = "device"

    def _unsupported(self, *_args, **_kwargs):
        raise UnsupportedError(
            "GPU arrays are not handled by this version of the fdmoe Python binding"
        )

    asarray = float_input = weight_input = int32_input = output = address = _unsupported
