"""Quantized formats (SPEC §5) from Python, all through the library's one implementation:

- `quantize(array, format)` / `dequantize(...)`: the weight codecs (fdmoe_quantize_weights /
  fdmoe_dequantize_weights) over [..., N, K] matrices;
- `MoELayer.load_quantized_weights(...)`: pre-quantized experts with their scales (attached to
  MoELayer by the package; `MoELayer(weight_dtype=...)` + `load_weights` of float arrays is
  quantize-on-load);
- `pre_dispatch(...)`: the FP8 pre-dispatch (fdmoe_pre_dispatch_fp8).

Layouts of one [N, K] matrix (K, the last dimension, is the one packed and scaled; stacked
matrices add leading dimensions, e.g. [E, N, K] experts):

    format     data                     scales                                   global_scale
    fp8_block  [N, K] uint8 (E4M3)      [ceil(N/128), ceil(K/128)] float32       -
    mxfp4      [N, K/2] uint8 (2 E2M1)  [N, K/32] uint8 (UE8M0)                  -
    nvfp4      [N, K/2] uint8 (2 E2M1)  [N, K/16] uint8 (E4M3)                   float32

E2M1 pairs hold element 2i in the low nibble. 1-byte arrays of other types (ml_dtypes
float8_e4m3fn, float8_e8m0fnu, torch.float8_e4m3fn viewed as numpy) are read as their bytes.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int32, c_uint32, c_void_p
from typing import NamedTuple, Optional, Tuple

import numpy as np

from . import _lib
from ._errors import InvalidArgumentError, NullArgumentError, UnsupportedError

__all__ = ["FORMATS", "QuantizedTensor", "quantize", "dequantize", "pre_dispatch",
           "load_quantized_weights"]

FORMATS = ("fp8_block", "mxfp4", "nvfp4")

_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_I32 = np.dtype(np.int32)


class FdmoeQuantizedTensor(ctypes.Structure):
    """Mirror of the header's FdmoeQuantizedTensor."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("format", c_uint32),
        ("num_matrices", c_uint32),
        ("rows", c_uint32),
        ("cols", c_uint32),
        ("data", c_void_p),
        ("scales", c_void_p),
        ("global_scales", POINTER(c_float)),
    ]


class FdmoePreDispatchArgs(ctypes.Structure):
    """Mirror of the header's FdmoePreDispatchArgs."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("memory", c_uint32),
        ("x_dtype", c_uint32),
        ("num_tokens", c_uint32),
        ("hidden_size", c_uint32),
        ("top_k", c_uint32),
        ("max_tokens", c_uint32),
        ("x", c_void_p),
        ("topk_ids", POINTER(c_int32)),
        ("topk_weights", POINTER(c_float)),
        ("out_x", c_void_p),
        ("out_scales", POINTER(c_int32)),
        ("out_topk_ids", POINTER(c_int32)),
        ("out_topk_weights", POINTER(c_float)),
        ("stream", c_void_p),
    ]


def _library():
    """The loaded library with this module's prototypes declared (once)."""
    lib = _lib.load()
    if not getattr(lib, "_fdmoe_quant_declared", False):
        try:
            for name, argtypes in (
                ("fdmoe_quantized_tensor_init", [c_void_p]),
                ("fdmoe_quantize_weights", [c_void_p, c_uint32, POINTER(FdmoeQuantizedTensor)]),
                ("fdmoe_dequantize_weights", [POINTER(FdmoeQuantizedTensor), POINTER(c_float)]),
                ("fdmoe_pre_dispatch_args_init", [c_void_p]),
                ("fdmoe_pre_dispatch_fp8", [POINTER(FdmoePreDispatchArgs)]),
            ):
                fn = getattr(lib, name)
                fn.restype = c_uint32
                fn.argtypes = argtypes
        except AttributeError as e:
            raise UnsupportedError(
                f"the loaded libfdmoe has no quantized-format entry points ({e}); upgrade it"
            ) from None
        lib._fdmoe_quant_declared = True
    return lib


class QuantizedTensor(NamedTuple):
    """Matrices [..., N, K] in one quantized format (layouts in the module notes)."""

    format: str
    data: np.ndarray
    scales: np.ndarray
    #: nvfp4: float32 array of the leading shape (one per matrix); None otherwise.
    global_scale: Optional[np.ndarray]

    @property
    def shape(self) -> Tuple[int, ...]:
        """The [..., N, K] shape of the dense matrices."""
        n, packed = self.data.shape[-2:]
        return tuple(self.data.shape[:-2]) + (n, packed * (1 if self.format == "fp8_block" else 2))


def _format(value: object) -> str:
    key = str(value).lower() if isinstance(value, str) else None
    if key not in FORMATS:
        raise InvalidArgumentError(
            f"format = {value!r} is not one of " + ", ".join(repr(f) for f in FORMATS)
        )
    return key


def part_shapes(fmt: str, rows: int, cols: int):
    """(data shape, scale shape, scale dtype) of one [rows, cols] matrix in `fmt`."""
    if fmt == "fp8_block":
        return (rows, cols), (-(-rows // 128), -(-cols // 128)), _F32
    group = 32 if fmt == "mxfp4" else 16
    if cols % group:
        raise InvalidArgumentError(
            f"{fmt} needs K (the last dimension) to be a multiple of {group}, got K = {cols}"
        )
    return (rows, cols // 2), (rows, cols // group), _U8


def _host(name: str, value: object) -> np.ndarray:
    if hasattr(value, "__cuda_array_interface__"):
        raise UnsupportedError(f"{name} is a GPU array; the codecs read host (numpy) arrays")
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - any failure to view the object as an array
        raise InvalidArgumentError(f"{name} cannot be read as an array: {e}") from None


def _bytes(name: str, value: object, shape) -> np.ndarray:
    """A C-contiguous uint8 array of exactly `shape` (1-byte arrays are read as their bytes)."""
    arr = _host(name, value)
    if arr.dtype.itemsize != 1:
        raise InvalidArgumentError(f"{name} has dtype {arr.dtype}; expected 1-byte elements (uint8)")
    _check_shape(name, arr, shape)
    return np.ascontiguousarray(arr).view(_U8)


def _floats(name: str, value: object, shape, dtype=_F32) -> np.ndarray:
    """A C-contiguous floating array of exactly `shape`, converted to `dtype` (None: kept)."""
    arr = _host(name, value)
    if not (arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"):
        raise InvalidArgumentError(f"{name} has dtype {arr.dtype}; expected a floating-point array")
    _check_shape(name, arr, shape)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return np.ascontiguousarray(arr)


def _check_shape(name: str, arr: np.ndarray, shape, names=None) -> None:
    if tuple(arr.shape) != tuple(shape):
        want = "[" + ", ".join(str(d) for d in shape) + "]"
        named = "" if names is None else "[" + ", ".join(names) + "] = "
        raise InvalidArgumentError(
            f"{name} has shape [{', '.join(str(d) for d in arr.shape)}]; expected {named}{want}"
        )


def _tensor(fmt: str, batch: int, rows: int, cols: int, data, scales, globals_) -> FdmoeQuantizedTensor:
    t = _lib.init_struct(FdmoeQuantizedTensor, "fdmoe_quantized_tensor_init")
    t.format = _lib.DTYPE[fmt]
    t.num_matrices, t.rows, t.cols = batch, rows, cols
    t.data = data.ctypes.data
    t.scales = scales.ctypes.data
    if globals_ is not None:
        t.global_scales = ctypes.cast(globals_.ctypes.data, POINTER(c_float))
    return t


def _dense_source(array: np.ndarray) -> Tuple[np.ndarray, str]:
    """The array in a dtype the library reads (float32, bfloat16, float16 kept; others float32)."""
    name = array.dtype.name
    if name in ("float32", "bfloat16", "float16"):
        return np.ascontiguousarray(array), name
    return np.ascontiguousarray(array, dtype=_F32), "float32"


def quantize(array, format: str) -> QuantizedTensor:
    """Quantizes float matrices [..., N, K] (float32, bfloat16 or float16; other floats as
    float32) with the library's codec of `format` ("fp8_block", "mxfp4", "nvfp4"): round to
    nearest even, saturating; NVFP4's global scale per matrix from its amax. The codec that
    quantizes dense experts at load, so `load_quantized_weights` of its output gives the same
    layer bit for bit."""
    fmt = _format(format)
    arr = _host("array", array)
    if not (arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"):
        raise InvalidArgumentError(f"array has dtype {arr.dtype}; expected a floating-point array")
    if arr.ndim < 2:
        raise InvalidArgumentError(f"array has {arr.ndim} dimensions; expected [..., N, K]")
    lead, (rows, cols) = arr.shape[:-2], arr.shape[-2:]
    batch = int(np.prod(lead, dtype=np.int64))
    data_shape, scale_shape, scale_dtype = part_shapes(fmt, rows, cols)
    src, src_dtype = _dense_source(arr)
    data = np.empty(lead + data_shape, dtype=_U8)
    scales = np.empty(lead + scale_shape, dtype=scale_dtype)
    globals_ = np.empty(lead, dtype=_F32) if fmt == "nvfp4" else None
    if batch * rows * cols:
        t = _tensor(fmt, batch, rows, cols, data, scales, globals_)
        _lib.check(_library().fdmoe_quantize_weights(src.ctypes.data, _lib.DTYPE[src_dtype], ctypes.byref(t)))
    return QuantizedTensor(fmt, data, scales, globals_)


def dequantize(data, scales=None, format: Optional[str] = None, global_scale=None) -> np.ndarray:
    """float32 [..., N, K] values of quantized matrices: `dequantize(q)` for a QuantizedTensor,
    or `dequantize(data, scales, format, global_scale)` with the parts in the layouts of the
    module notes. decode(q) * scale exactly (NaN scales give NaN)."""
    if isinstance(data, QuantizedTensor):
        if scales is not None or global_scale is not None:
            raise InvalidArgumentError("pass either a QuantizedTensor or its parts, not both")
        fmt, data, scales, global_scale = data.format, data.data, data.scales, data.global_scale
        if format is not None and _format(format) != fmt:
            raise InvalidArgumentError(f"format = {format!r} but the tensor is {fmt!r}")
    else:
        if format is None:
            raise NullArgumentError("format is required with separate parts")
        fmt = _format(format)
        if scales is None:
            raise NullArgumentError("scales is required")
    raw = _host("data", data)
    if raw.ndim < 2:
        raise InvalidArgumentError(f"data has {raw.ndim} dimensions; expected [..., N, K or K/2]")
    lead, (rows, packed) = raw.shape[:-2], raw.shape[-2:]
    cols = packed if fmt == "fp8_block" else 2 * packed
    data_shape, scale_shape, scale_dtype = part_shapes(fmt, rows, cols)
    data_arr = _bytes("data", raw, lead + data_shape)
    if scale_dtype == _F32:
        scale_arr = _floats("scales", scales, lead + scale_shape)
    else:
        scale_arr = _bytes("scales", scales, lead + scale_shape)
    globals_ = None
    if fmt == "nvfp4":
        if global_scale is None:
            raise NullArgumentError("global_scale is required for nvfp4")
        globals_ = _floats("global_scale", global_scale, lead)
    elif global_scale is not None:
        raise InvalidArgumentError(f"global_scale applies only to nvfp4 (format is {fmt})")
    out = np.empty(lead + (rows, cols), dtype=_F32)
    batch = int(np.prod(lead, dtype=np.int64))
    if batch * rows * cols:
        t = _tensor(fmt, batch, rows, cols, data_arr, scale_arr, globals_)
        _lib.check(_library().fdmoe_dequantize_weights(
            ctypes.byref(t), ctypes.cast(out.ctypes.data, POINTER(c_float))))
    return out


def pre_dispatch(x, topk_ids, topk_weights, max_tokens: int, device="cpu"):
    """FP8 pre-dispatch (SPEC §5, the MegaMoE input format) of x [T, H] (bfloat16; float16
    and float32 are read as they are, other floats as float32) with its routing.

    Returns (x_e4m3 uint8 [T_max, H], scales int32 [T_max, H/128] (four UE8M0 bytes each,
    little-endian, byte j of column c = channels 32(4c+j) .. +32), topk_ids int32 [T_max, k],
    topk_weights float32 [T_max, k]) with T_max = max_tokens; rows past T are padding (zero
    data and scales, id -1, weight 0). T > max_tokens raises CapacityExceededError. H must be
    a multiple of 128. device="cpu" computes on the host (the library's CPU reference);
    device="cuda[:N]" runs the library's CUDA kernel (bitwise equal) on torch's current stream:
    torch CUDA tensors in give torch tensors out, numpy arrays make a round trip."""
    kind = str(device).strip().lower().partition(":")[0]
    if kind == "cuda":
        return _pre_dispatch_cuda(x, topk_ids, topk_weights, max_tokens, device)
    if kind != "cpu":
        raise InvalidArgumentError(f"device = {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    arr = _host("x", x)
    if not (arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"):
        raise InvalidArgumentError(f"x has dtype {arr.dtype}; expected a floating-point array")
    if arr.ndim != 2:
        raise InvalidArgumentError(f"x has shape {list(arr.shape)}; expected [T, hidden_size]")
    x_arr, x_dtype = _dense_source(arr)
    T, H = x_arr.shape
    ids = _host("topk_ids", topk_ids)
    if ids.ndim != 2 or ids.shape[0] != T:
        raise InvalidArgumentError(f"topk_ids has shape {list(ids.shape)}; expected [T = {T}, top_k]")
    k = ids.shape[1]
    if ids.dtype.kind not in "iu":
        raise InvalidArgumentError(f"topk_ids has dtype {ids.dtype}; expected int32")
    if ids.size and (ids.min() < np.iinfo(_I32).min or ids.max() > np.iinfo(_I32).max):
        raise InvalidArgumentError("topk_ids holds values outside the int32 range")
    ids = np.ascontiguousarray(ids, dtype=_I32)
    wts = _floats("topk_weights", topk_weights, (T, k))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise InvalidArgumentError(f"max_tokens = {max_tokens!r} must be a non-negative integer")
    t_max = int(max_tokens)
    if max(T, H, k, t_max) > 2**32 - 1:
        raise InvalidArgumentError("a size does not fit uint32")
    out_x = np.empty((t_max, H), dtype=_U8)
    out_scales = np.empty((t_max, H // 128 if H % 128 == 0 else 0), dtype=_I32)
    out_ids = np.empty((t_max, k), dtype=_I32)
    out_wts = np.empty((t_max, k), dtype=_F32)
    a = _lib.init_struct(FdmoePreDispatchArgs, "fdmoe_pre_dispatch_args_init")
    a.memory = _lib.MEMORY["host"]
    a.x_dtype = _lib.DTYPE[x_dtype]
    a.num_tokens, a.hidden_size, a.top_k, a.max_tokens = T, H, k, t_max
    a.x = x_arr.ctypes.data
    a.topk_ids = ctypes.cast(ids.ctypes.data, POINTER(c_int32))
    a.topk_weights = ctypes.cast(wts.ctypes.data, POINTER(c_float))
    a.out_x = out_x.ctypes.data
    a.out_scales = ctypes.cast(out_scales.ctypes.data, POINTER(c_int32))
    a.out_topk_ids = ctypes.cast(out_ids.ctypes.data, POINTER(c_int32))
    a.out_topk_weights = ctypes.cast(out_wts.ctypes.data, POINTER(c_float))
    _lib.check(_library().fdmoe_pre_dispatch_fp8(ctypes.byref(a)))
    return out_x, out_scales, out_ids, out_wts


def _pre_dispatch_cuda(x, topk_ids, topk_weights, max_tokens, device):
    """pre_dispatch on a GPU through torch (imported only here)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise UnsupportedError(f"pre_dispatch on {device!r} needs torch: {e}") from None
    dev = torch.device(str(device))
    as_numpy = not isinstance(x, torch.Tensor)

    def on_device(name, a, dtype=None):
        if isinstance(a, torch.Tensor):
            t = a
        else:
            arr = np.ascontiguousarray(np.asarray(a))
            t = (torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
                 if arr.dtype.name == "bfloat16" else torch.from_numpy(arr))
        t = t.to(device=dev)
        if dtype is not None:
            t = t.to(dtype)
        return t.contiguous()

    xt = on_device("x", x)
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if xt.dtype not in names:
        if not xt.is_floating_point():
            raise InvalidArgumentError(f"x has dtype {xt.dtype}; expected a floating-point array")
        xt = xt.float()
    if xt.dim() != 2:
        raise InvalidArgumentError(f"x has shape {list(xt.shape)}; expected [T, hidden_size]")
    T, H = xt.shape
    ids = on_device("topk_ids", topk_ids, torch.int32)
    if ids.dim() != 2 or ids.shape[0] != T:
        raise InvalidArgumentError(f"topk_ids has shape {list(ids.shape)}; expected [T = {T}, top_k]")
    k = ids.shape[1]
    wts = on_device("topk_weights", topk_weights, torch.float32)
    if list(wts.shape) != [T, k]:
        raise InvalidArgumentError(f"topk_weights has shape {list(wts.shape)}; expected [{T}, {k}]")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise InvalidArgumentError(f"max_tokens = {max_tokens!r} must be a non-negative integer")
    t_max = int(max_tokens)
    out_x = torch.empty((t_max, H), dtype=torch.uint8, device=dev)
    out_scales = torch.empty((t_max, H // 128 if H % 128 == 0 else 0), dtype=torch.int32, device=dev)
    out_ids = torch.empty((t_max, k), dtype=torch.int32, device=dev)
    out_wts = torch.empty((t_max, k), dtype=torch.float32, device=dev)
    a = _lib.init_struct(FdmoePreDispatchArgs, "fdmoe_pre_dispatch_args_init")
    a.memory = _lib.MEMORY["device"]
    a.x_dtype = _lib.DTYPE[names[xt.dtype]]
    a.num_tokens, a.hidden_size, a.top_k, a.max_tokens = T, H, k, t_max
    a.x = xt.data_ptr() if T else None
    a.topk_ids = ctypes.cast(ids.data_ptr(), POINTER(c_int32)) if T else None
    a.topk_weights = ctypes.cast(wts.data_ptr(), POINTER(c_float)) if T else None
    a.out_x = out_x.data_ptr() if t_max else None
    a.out_scales = ctypes.cast(out_scales.data_ptr(), POINTER(c_int32)) if t_max else None
    a.out_topk_ids = ctypes.cast(out_ids.data_ptr(), POINTER(c_int32)) if t_max else None
    a.out_topk_weights = ctypes.cast(out_wts.data_ptr(), POINTER(c_float)) if t_max else None
    stream = torch.cuda.current_stream(dev)
    a.stream = stream.cuda_stream
    _lib.check(_library().fdmoe_pre_dispatch_fp8(ctypes.byref(a)))
    outs = (out_x, out_scales, out_ids, out_wts)
    if as_numpy:
        stream.synchronize()
        return tuple(o.cpu().numpy() for o in outs)
    return outs


def load_quantized_weights(
    self,
    w13,
    w2,
    w13_scale=None,
    w2_scale=None,
    w13_global_scale=None,
    w2_global_scale=None,
    gate=None,
    correction_bias=None,
    fc1=None,
    fc2=None,
    shared_w13=None,
    shared_w2=None,
    *,
    format: Optional[str] = None,
    gate_layout: str = "experts_by_hidden",
    gate_up_interleaved: bool = False,
) -> None:
    """Loads pre-quantized experts with their scales (MoELayer method; torch orientation).

    w13 / w2: the packed data of [E, 2I, L] / [E, L, I] (L = latent_size or hidden_size) in
    `format` (default: the layer's weight_dtype, which it must equal), or QuantizedTensors
    from `fdmoe.quantize` (then the scales come with them). Layouts per format in the module
    notes: fp8_block data [E, N, K] + weight_scale_inv [E, N/128, K/128] float32 (DeepSeek-V3);
    mxfp4 data [E, N, K/2] + scales [E, N, K/32] (OCP MX, gpt-oss); nvfp4 data [E, N, K/2] +
    scales [E, N, K/16] E4M3 + global scales [E] float32 per matrix (ModelOpt weight_scale_2).
    gate, correction_bias, fc1/fc2 and shared experts are dense, as in load_weights (torch
    orientation). `gate_up_interleaved`: w13's rows (and their scales) alternate gate and up.
    """
    handle = self._live()
    layer_format = {v: k for k, v in _lib.DTYPE.items()}[int(self._cfg.weight_dtype)]
    fmt = layer_format if format is None else _format(format)
    if fmt not in FORMATS:
        raise InvalidArgumentError(
            f"load_quantized_weights needs a quantized format: the layer's weight_dtype is "
            f"{layer_format!r} (create it with weight_dtype='fp8_block', 'mxfp4' or 'nvfp4')"
        )
    E, I = self.num_experts, self.intermediate_size
    L = self.latent_size or self.hidden_size
    Ln = "latent_size" if self.latent_size else "hidden_size"
    parts = {}
    for name, value, scale, glob, (n, k), names in (
        ("w13", w13, w13_scale, w13_global_scale, (2 * I, L), ("2*intermediate_size", Ln)),
        ("w2", w2, w2_scale, w2_global_scale, (L, I), (Ln, "intermediate_size")),
    ):
        if isinstance(value, QuantizedTensor):
            if scale is not None or glob is not None:
                raise InvalidArgumentError(f"{name} is a QuantizedTensor: do not pass {name}_scale too")
            if value.format != fmt:
                raise InvalidArgumentError(f"{name} is {value.format!r}, the layer's format is {fmt!r}")
            value, scale, glob = value.data, value.scales, value.global_scale
        if value is None:
            raise NullArgumentError(f"{name} is required")
        if scale is None:
            raise NullArgumentError(f"{name}_scale is required ({fmt})")
        data_shape, scale_shape, scale_dtype = part_shapes(fmt, n, k)
        data = _bytes(name, value, (E,) + data_shape)
        if scale_dtype == _F32:
            scales = _floats(f"{name}_scale", scale, (E,) + scale_shape)
        else:
            scales = _bytes(f"{name}_scale", scale, (E,) + scale_shape)
        globals_ = None
        if fmt == "nvfp4":
            if glob is None:
                raise NullArgumentError(f"{name}_global_scale is required (nvfp4)")
            globals_ = _floats(f"{name}_global_scale", glob, (E,))
        elif glob is not None:
            raise InvalidArgumentError(f"{name}_global_scale applies only to nvfp4 (format is {fmt})")
        parts[name] = (data, scales, globals_)

    # Dense pieces, as load_weights takes them (torch orientation).
    shapes = self._weight_shapes("torch")
    given = {"fc1": fc1, "fc2": fc2, "shared_w13": shared_w13, "shared_w2": shared_w2}
    dense = {}
    for name, value in given.items():
        if value is not None:
            arr = _floats(name, value, shapes[name][0], dtype=None)
            dense[name] = _dense_source(arr)[0]
    kinds = {a.dtype.name for a in dense.values()}
    if len(kinds) > 1:
        dense = {name: np.ascontiguousarray(a, dtype=_F32) for name, a in dense.items()}
        kinds = {"float32"}
    dense_dtype = kinds.pop() if kinds else "float32"
    gate_layout_num = _lib.GATE_LAYOUT.get(str(gate_layout).lower())
    if gate_layout_num is None:
        raise InvalidArgumentError(
            f"gate_layout = {gate_layout!r} is not one of " + ", ".join(map(repr, _lib.GATE_LAYOUT))
        )
    gate_arr = bias_arr = None
    if gate is not None:
        E_, H = self.num_experts, self.hidden_size
        shape = (E_, H) if gate_layout_num == _lib.GATE_LAYOUT["experts_by_hidden"] else (H, E_)
        gate_arr = _dense_source(_floats("gate", gate, shape, dtype=None))[0]
    if correction_bias is not None:
        bias_arr = _floats("correction_bias", correction_bias, (self.num_experts,))

    w = _lib.init_struct(_lib.FdmoeWeights, "fdmoe_weights_init")
    w.layout = _lib.LAYOUT["torch"]
    w.dtype = _lib.DTYPE[fmt]
    w.dense_dtype = _lib.DTYPE[dense_dtype]
    w.memory = _lib.MEMORY["host"]
    w.ownership = _lib.OWNERSHIP["own"]
    w.gate_up_interleaved = 1 if gate_up_interleaved else 0
    w.gate_layout = gate_layout_num
    w.w13, w.w2 = parts["w13"][0].ctypes.data, parts["w2"][0].ctypes.data
    w.w13_scale, w.w2_scale = parts["w13"][1].ctypes.data, parts["w2"][1].ctypes.data
    for field, name in (("w13_global_scale", "w13"), ("w2_global_scale", "w2")):
        globals_ = parts[name][2]
        if globals_ is not None:
            setattr(w, field, ctypes.cast(globals_.ctypes.data, POINTER(c_float)))
    for name, arr in dense.items():
        setattr(w, name, arr.ctypes.data)
    if gate_arr is not None:
        w.gate = gate_arr.ctypes.data
        w.gate_dtype = _lib.DTYPE[gate_arr.dtype.name]
    if bias_arr is not None:
        w.correction_bias = ctypes.cast(bias_arr.ctypes.data, POINTER(c_float))
    # `parts`, `dense`, `gate_arr` and `bias_arr` keep every buffer alive through the call (OWN
    # copies them).
    _lib.check(_lib.load().fdmoe_load_weights(handle, ctypes.byref(w)))
    self._has_weights = True
    self._borrowed = None
