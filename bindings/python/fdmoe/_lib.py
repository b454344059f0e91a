"""The C surface of libfdmoe as ctypes: enum numbers, structs, prototypes and loading.

Everything here mirrors include/fdmoe.h field for field (tests/test_abi.py compiles the header
and compares sizes and offsets, and parses its constants); nothing here knows about numpy.

Library lookup order (first hit wins):
  1. $FDMOE_LIBRARY (a path to the shared library; an error if it does not load);
  2. libfdmoe.so next to this package (an installed wheel or a copied build);
  3. the repository's target/release, then target/debug (development checkout);
  4. the system loader's search (ctypes.util.find_library("fdmoe")).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from ctypes import POINTER, c_char_p, c_float, c_int32, c_uint32, c_uint64, c_void_p
from pathlib import Path

from ._errors import LibraryLoadError, error_for_status

# The header this binding mirrors: FDMOE_VERSION_MAJOR / FDMOE_VERSION_MINOR.
BINDING_ABI_MAJOR = 0
BINDING_ABI_MINOR = 2

# ---------------------------------------------------------------------------------------------
# Enum numbers (ABI: explicit, never reused). Keys are the lower-case names the Python API takes.

STATUS = {
    "OK": 0,
    "INVALID_ARGUMENT": 1,
    "NULL_ARGUMENT": 2,
    "UNSUPPORTED": 3,
    "CAPACITY_EXCEEDED": 4,
    "NO_DEVICE": 5,
    "CUDA_ERROR": 6,
    "NCCL_ERROR": 7,
    "OUT_OF_MEMORY": 8,
    "INVALID_STATE": 9,
    "INTERNAL": 10,
}
BACKEND_KIND = {"cpu": 0, "cuda": 1}
ROUTING = {"softmax_topk": 0, "sigmoid_topk": 1, "grouped_topk": 2, "given": 3}
SCORING = {"sigmoid": 0, "softmax": 1}
ACTIVATION = {"swiglu": 0, "gelu_tanh_and_mul": 1, "swigluoai": 2}
DTYPE = {"float32": 0, "bfloat16": 1, "float16": 2, "fp8_block": 3, "mxfp4": 4, "nvfp4": 5}
ACT_QUANT = {"none": 0, "fp8_mx": 1}
LAYOUT = {"torch": 0, "paddle": 1, "per_expert": 2}
GATE_LAYOUT = {"experts_by_hidden": 0, "hidden_by_experts": 1}
OWNERSHIP = {"own": 0, "borrow": 1}
MEMORY = {"host": 0, "device": 1}

# FDMOE_FEATURE_* bits, named without the prefix, lower case.
FEATURES = {
    "routing_softmax_topk": 1 << 0,
    "routing_sigmoid_topk": 1 << 1,
    "routing_grouped_topk": 1 << 2,
    "routing_given": 1 << 3,
    "routing_record": 1 << 4,
    "latent": 1 << 5,
    "shared_experts": 1 << 6,
    "act_f32": 1 << 7,
    "act_bf16": 1 << 8,
    "act_f16": 1 << 9,
    "weight_f32": 1 << 10,
    "weight_bf16": 1 << 11,
    "weight_f16": 1 << 12,
    "weight_fp8_block": 1 << 13,
    "weight_mxfp4": 1 << 14,
    "weight_nvfp4": 1 << 15,
    "layout_torch": 1 << 16,
    "layout_paddle": 1 << 17,
    "layout_per_expert": 1 << 18,
    "weights_own": 1 << 19,
    "weights_borrow": 1 << 20,
    "cuda_graphs": 1 << 21,
    "expert_parallel": 1 << 22,
    "fp8_pre_dispatch": 1 << 23,
    "act_quant_fp8_mx": 1 << 24,
}

FORWARD_FORCE_EAGER = 1

# ---------------------------------------------------------------------------------------------
# Structs: field order and C types exactly as in include/fdmoe.h. Fields are only ever appended.


class FdmoeConfig(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("backend", c_uint32),
        ("device_ordinal", c_int32),
        ("num_experts", c_uint32),
        ("top_k", c_uint32),
        ("hidden_size", c_uint32),
        ("intermediate_size", c_uint32),
        ("latent_size", c_uint32),
        ("shared_intermediate_size", c_uint32),
        ("routing", c_uint32),
        ("scoring", c_uint32),
        ("n_group", c_uint32),
        ("topk_group", c_uint32),
        ("renormalize", c_uint32),
        ("routed_scaling_factor", c_float),
        ("activation", c_uint32),
        ("act_dtype", c_uint32),
        ("weight_dtype", c_uint32),
        ("max_tokens", c_uint32),
        ("num_threads", c_uint32),
        ("ep_size", c_uint32),
        ("ep_rank", c_uint32),
        # Appended in 0.2.0.
        ("act_quant", c_uint32),
    ]


class FdmoeWeights(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("layout", c_uint32),
        ("dtype", c_uint32),
        ("memory", c_uint32),
        ("ownership", c_uint32),
        ("gate_up_interleaved", c_uint32),
        ("gate_dtype", c_uint32),
        ("gate_layout", c_uint32),
        ("w13", c_void_p),
        ("w2", c_void_p),
        ("gate_proj", POINTER(c_void_p)),
        ("up_proj", POINTER(c_void_p)),
        ("down_proj", POINTER(c_void_p)),
        ("gate", c_void_p),
        ("correction_bias", POINTER(c_float)),
        ("fc1", c_void_p),
        ("fc2", c_void_p),
        ("shared_w13", c_void_p),
        ("shared_w2", c_void_p),
        # Appended after 0.1.0: pre-quantized experts (the binding leaves them NULL/default).
        ("w13_scale", c_void_p),
        ("w2_scale", c_void_p),
        ("w13_global_scale", POINTER(c_float)),
        ("w2_global_scale", POINTER(c_float)),
        ("dense_dtype", c_uint32),
    ]


class FdmoeForwardArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("num_tokens", c_uint32),
        ("x", c_void_p),
        ("out", c_void_p),
        ("router_logits", POINTER(c_float)),
        ("topk_ids", POINTER(c_int32)),
        ("topk_weights", POINTER(c_float)),
        ("topk_ids_out", POINTER(c_int32)),
        ("topk_weights_out", POINTER(c_float)),
        ("stream", c_void_p),
        ("flags", c_uint32),
    ]


class FdmoeMemoryRequirements(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("device_weight_bytes", c_uint64),
        ("device_workspace_bytes", c_uint64),
        ("device_graph_bytes", c_uint64),
        ("host_weight_bytes", c_uint64),
        ("host_workspace_bytes", c_uint64),
    ]


class FdmoeBackend(ctypes.Structure):
    """Opaque handle; only ever used through a pointer."""


BackendPtr = POINTER(FdmoeBackend)

# Extra bytes behind a struct handed to a *_init function: a newer library writes its own
# (larger) struct there, and we keep only the fields this binding knows.
_INIT_SLACK = 1024

# ---------------------------------------------------------------------------------------------
# Loading.

_LIB_NAMES = {
    "linux": ["libfdmoe.so"],
    "darwin": ["libfdmoe.dylib", "libfdmoe.so"],
    "win32": ["fdmoe.dll"],
}.get(sys.platform, ["libfdmoe.so"])

_lock = threading.Lock()
_lib: "ctypes.CDLL | None" = None


def candidate_paths() -> "list[Path]":
    """Where the library is looked for when $FDMOE_LIBRARY is not set, in order."""
    package_dir = Path(__file__).resolve().parent
    repo_root = package_dir.parents[2]  # fdmoe -> python -> bindings -> repository
    paths = [package_dir / name for name in _LIB_NAMES]
    for profile in ("release", "debug"):
        paths += [repo_root / "target" / profile / name for name in _LIB_NAMES]
    return paths


def _declare(lib: ctypes.CDLL) -> None:
    def fn(name, restype, *argtypes):
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = list(argtypes)

    fn("fdmoe_abi_version", c_uint32)
    fn("fdmoe_version_string", c_char_p)
    fn("fdmoe_status_string", c_char_p, c_uint32)
    fn("fdmoe_last_error_message", c_char_p)
    fn("fdmoe_config_init", c_uint32, c_void_p)
    fn("fdmoe_weights_init", c_uint32, c_void_p)
    fn("fdmoe_forward_args_init", c_uint32, c_void_p)
    fn("fdmoe_create_backend", c_uint32, POINTER(FdmoeConfig), POINTER(BackendPtr))
    fn("fdmoe_load_weights", c_uint32, BackendPtr, POINTER(FdmoeWeights))
    fn("fdmoe_forward", c_uint32, BackendPtr, POINTER(FdmoeForwardArgs))
    fn("fdmoe_capture_prefill_graph", c_uint32, BackendPtr, POINTER(c_uint32), c_uint32, c_void_p)
    fn("fdmoe_destroy_backend", None, BackendPtr)
    fn("fdmoe_query_memory", c_uint32, POINTER(FdmoeConfig), POINTER(FdmoeMemoryRequirements))
    fn("fdmoe_query_features", c_uint32, c_uint32, POINTER(c_uint64))


def _open(path: "str | os.PathLike[str]") -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    try:
        _declare(lib)
    except AttributeError as e:
        raise LibraryLoadError(f"{path} is not libfdmoe (missing symbol: {e})") from None
    abi = lib.fdmoe_abi_version()
    major, minor = abi >> 16, abi & 0xFFFF
    if major != BINDING_ABI_MAJOR or minor < BINDING_ABI_MINOR:
        raise LibraryLoadError(
            f"{path} has ABI {major}.{minor}; this binding needs {BINDING_ABI_MAJOR}.x with "
            f"x >= {BINDING_ABI_MINOR}"
        )
    return lib


def load() -> ctypes.CDLL:
    """The loaded library (found and checked on first use, then cached)."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        explicit = os.environ.get("FDMOE_LIBRARY")
        if explicit:
            try:
                _lib = _open(explicit)
            except OSError as e:
                if isinstance(e, LibraryLoadError):
                    raise
                raise LibraryLoadError(f"FDMOE_LIBRARY={explicit} could not be loaded: {e}") from None
            return _lib
        tried = []
        for path in candidate_paths():
            if path.is_file():
                _lib = _open(path)
                return _lib
            tried.append(str(path))
        found = ctypes.util.find_library("fdmoe")
        if found:
            _lib = _open(found)
            return _lib
        raise LibraryLoadError(
            "libfdmoe was not found: set FDMOE_LIBRARY to its path, or build it with "
            "`cargo build --release`. Looked in: " + ", ".join(tried) + " and the system loader path"
        )


def check(status: int) -> None:
    """Raises the exception of a failed call (reads the thread's last error message)."""
    if status == 0:
        return
    lib = load()
    message = lib.fdmoe_last_error_message().decode("utf-8", "replace")
    name = lib.fdmoe_status_string(status).decode("ascii", "replace")
    raise error_for_status(status, name, message)


def init_struct(struct_type, init_name: str):
    """A struct filled with the library's defaults, struct_size set to the size we know.

    The init function writes the library's sizeof, which a newer library may make larger than
    ours, so it writes into a buffer with room to spare and we copy out our prefix.
    """
    size = ctypes.sizeof(struct_type)
    buf = ctypes.create_string_buffer(size + _INIT_SLACK)
    check(getattr(load(), init_name)(buf))
    value = struct_type.from_buffer_copy(buf.raw[:size])
    value.struct_size = size
    return value


def init_struct_raw_size(struct_type, init_name: str) -> int:
    """The struct_size the library's init function writes (its sizeof); used by the ABI test."""
    buf = ctypes.create_string_buffer(ctypes.sizeof(struct_type) + _INIT_SLACK)
    check(getattr(load(), init_name)(buf))
    return c_uint32.from_buffer_copy(buf.raw[:4]).value
