"""Exceptions: one class per FdmoeStatus, all deriving from FdmoeError.

Every failed library call raises the class of its status with the library's own message
(fdmoe_last_error_message). Checks the binding does itself (array shapes, option strings,
a closed layer) raise the same classes with the status the library would have used, so a
caller handles one hierarchy whatever side found the problem.
"""

from __future__ import annotations

__all__ = [
    "FdmoeError",
    "InvalidArgumentError",
    "NullArgumentError",
    "UnsupportedError",
    "CapacityExceededError",
    "NoDeviceError",
    "CudaError",
    "NcclError",
    "OutOfMemoryError",
    "InvalidStateError",
    "InternalError",
    "LibraryLoadError",
]


class FdmoeError(Exception):
    """A libfdmoe call failed.

    Attributes:
        status: the status name as the C header spells it without its prefix
            ("INVALID_ARGUMENT", "CAPACITY_EXCEEDED", ...).
        code: the numeric FdmoeStatus (None for errors that have no library status).
        message: the library's message naming the argument or feature at fault.
    """

    status = "UNKNOWN_STATUS"
    code: "int | None" = None

    def __init__(self, message: str, status: "str | None" = None, code: "int | None" = None):
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(f"{self.status}: {message}" if message else self.status)


class InvalidArgumentError(FdmoeError, ValueError):
    """An argument has a value the call cannot take (size, option, shape, id range)."""

    status, code = "INVALID_ARGUMENT", 1


class NullArgumentError(FdmoeError, ValueError):
    """A required argument is missing (NULL at the C boundary)."""

    status, code = "NULL_ARGUMENT", 2


class UnsupportedError(FdmoeError):
    """Valid in the contract but not implemented by this backend or build."""

    status, code = "UNSUPPORTED", 3


class CapacityExceededError(FdmoeError):
    """The token count exceeds the layer's max_tokens."""

    status, code = "CAPACITY_EXCEEDED", 4


class NoDeviceError(FdmoeError):
    """No usable GPU, driver or CUDA library."""

    status, code = "NO_DEVICE", 5


class CudaError(FdmoeError):
    """A CUDA driver, runtime or NVRTC call failed."""

    status, code = "CUDA_ERROR", 6


class NcclError(FdmoeError):
    """A NCCL call failed."""

    status, code = "NCCL_ERROR", 7


class OutOfMemoryError(FdmoeError, MemoryError):
    """Host or device memory could not be allocated."""

    status, code = "OUT_OF_MEMORY", 8


class InvalidStateError(FdmoeError):
    """Not valid in the layer's current state (forward before load_weights, closed layer)."""

    status, code = "INVALID_STATE", 9


class InternalError(FdmoeError):
    """A bug in the library (including a caught panic)."""

    status, code = "INTERNAL", 10


class LibraryLoadError(FdmoeError, OSError):
    """libfdmoe.so could not be found or loaded, or its ABI does not match this binding."""

    status = "LIBRARY_LOAD"


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NullArgumentError,
        UnsupportedError,
        CapacityExceededError,
        NoDeviceError,
        CudaError,
        NcclError,
        OutOfMemoryError,
        InvalidStateError,
        InternalError,
    )
}


def error_for_status(code: int, name: str, message: str) -> FdmoeError:
    """The exception for a failed call's status code, name and message."""
    cls = _BY_CODE.get(code)
    if cls is None:
        # A status newer than this binding: keep the library's name and number.
        return FdmoeError(message, status=name, code=code)
    return cls(message)
