"""Turning caller arrays into (pointer, dtype) pairs the C API can read, and allocating outputs.

The C API cannot see shapes, so every array is checked here against the shape its argument
documents before its address crosses the boundary. Arrays are made C-contiguous and of the
element type the call needs; the converted arrays are returned to the caller of these helpers,
which keeps them alive until the C call returns.

`HostArrays` handles numpy arrays in host memory (the cpu backend, numpy arguments of a cuda
layer, and weights the library copies). `DeviceArrays` (in _device.py: torch / cupy /
__cuda_array_interface__ / DLPack arrays for the cuda backend) implements the same methods
without copies and hands back device pointers; `MoELayer` only talks to this interface.
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


def check_shape(name: str, got: Sequence[int], shape: Shape, names: Sequence[str]) -> None:
    """Raises InvalidArgumentError unless `got` matches `shape` (None = any size)."""
    ok = len(got) == len(shape) and all(want is None or g == want for g, want in zip(got, shape))
    if not ok:
        want = format_shape(["*" if d is None else d for d in shape])
        raise InvalidArgumentError(
            f"{name} has shape {format_shape(got)}; expected {format_shape(names)} = {want}"
        )


class HostArrays:
    """numpy arrays in host memory (FDMOE_MEMORY_HOST)."""

    memory = "host"

    def asarray(self, name: str, value: object) -> np.ndarray:
        from . import _device  # imports this module

        if _device.is_device_array(value):
            raise UnsupportedError(
                f"{name} is a GPU array; this layer reads host (numpy) arrays"
            )
        if _device.is_torch_tensor(value):  # a CPU tensor: a numpy view (bfloat16 included)
            return _device.to_host(value)
        try:
            return np.asarray(value)
        except Exception as e:  # noqa: BLE001 - any failure to view the object as an array
            raise InvalidArgumentError(f"{name} cannot be read as an array: {e}") from None

    def shape_of(self, arr: np.ndarray) -> Tuple[int, ...]:
        return arr.shape

    def check_shape(self, name: str, arr: np.ndarray, shape: Shape, names: Sequence[str]) -> None:
        """Raises InvalidArgumentError unless arr.shape matches (None = any size)."""
        check_shape(name, arr.shape, shape, names)

    def float_input(
        self,
        name: str,
        value: object,
        shape: Shape,
        names: Sequence[str],
        dtype: np.dtype,
        align: int = 1,
    ) -> np.ndarray:
        """A C-contiguous array of `dtype` (converted with round-to-nearest-even if needed).
        `align` is for the device side (the cpu backend reads any address)."""
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
