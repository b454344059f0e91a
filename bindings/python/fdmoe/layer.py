"""MoELayer: one libfdmoe backend handle; numpy in and out on the cpu backend, device arrays
(or numpy, copied to the device and back) on the cuda backend.

Semantics are the library's (SPEC §3); this module only translates Python arguments into the C
structs, checks what the C API cannot see (array shapes, option strings) and turns statuses
into exceptions. Thread safety follows the library: calls on one layer are serialised by the
library, different layers may run concurrently (ctypes releases the GIL during each call).
"""

from __future__ import annotations

import ctypes
import numbers
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from . import _device, _lib
from ._arrays import HostArrays, check_shape, dense_name, numpy_dtype
from ._errors import InvalidArgumentError, InvalidStateError, NullArgumentError

__all__ = ["MoELayer", "memory_requirements", "query_features", "abi_version", "version", "FeatureSet"]

_U32_MAX = 2**32 - 1
_DTYPE_NAMES = {number: name for name, number in _lib.DTYPE.items()}

_DTYPE_ALIASES = {
    "float32": "float32",
    "f32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
}


# ---------------------------------------------------------------------------------------------
# Argument translation.


def _option(name: str, value: object, table: Dict[str, int]) -> int:
    """The enum number of an option string (case-insensitive)."""
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    raise InvalidArgumentError(
        f"{name} = {value!r} is not one of " + ", ".join(repr(k) for k in table)
    )


def _dtype_name(name: str, value: object) -> str:
    """Canonical dense dtype name of a string or numpy dtype-like ("bfloat16", ...)."""
    if isinstance(value, str):
        key = value.lower()
    else:
        try:
            key = np.dtype(value).name  # numpy dtypes, np.float32, ml_dtypes.bfloat16
        except TypeError:
            key = None
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    raise InvalidArgumentError(f"{name} = {value!r} is not one of 'float32', 'bfloat16', 'float16'")


def _u32(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} = {value!r} must be an integer")
    value = int(value)
    if not minimum <= value <= _U32_MAX:
        raise InvalidArgumentError(f"{name} = {value} must be in [{minimum}, {_U32_MAX}]")
    return value


def _parse_device(device: object) -> Tuple[str, int]:
    """("cpu", 0) or ("cuda", ordinal) from "cpu", "cuda", "cuda:N" (or a torch.device)."""
    text = str(device).strip().lower()
    kind, _, ordinal = text.partition(":")
    if kind == "cpu" and not ordinal:
        return "cpu", 0
    if kind == "cuda":
        if not ordinal:
            return "cuda", 0
        if ordinal.isdigit():
            return "cuda", int(ordinal)
    raise InvalidArgumentError(f"device = {device!r} must be 'cpu', 'cuda' or 'cuda:N'")


def _make_config(
    num_experts,
    top_k,
    hidden_size,
    intermediate_size,
    routing="softmax_topk",
    n_group=1,
    topk_group=1,
    scoring="sigmoid",
    renormalize=True,
    routed_scaling_factor=1.0,
    activation="swiglu",
    latent_size=None,
    num_shared_experts=0,
    shared_intermediate_size=None,
    act_dtype="float32",
    weight_dtype="float32",
    max_tokens=4096,
    device="cpu",
    num_threads=0,
    act_quant="none",
) -> Tuple[_lib.FdmoeConfig, dict]:
    """The C config of MoELayer's arguments, and the resolved settings the layer keeps."""
    kind, ordinal = _parse_device(device)
    num_shared = _u32("num_shared_experts", num_shared_experts)
    if num_shared == 0:
        shared_total = 0
    else:
        # Each shared expert defaults to the routed experts' intermediate size (DeepSeek-V3:
        # shared MLP size = n_shared_experts * moe_intermediate_size).
        per_expert = intermediate_size if shared_intermediate_size is None else shared_intermediate_size
        shared_total = num_shared * _u32("shared_intermediate_size", per_expert, 1)
        if shared_total > _U32_MAX:
            raise InvalidArgumentError(
                f"num_shared_experts * shared_intermediate_size = {shared_total} does not fit uint32"
            )
    settings = dict(
        num_experts=_u32("num_experts", num_experts),
        top_k=_u32("top_k", top_k),
        hidden_size=_u32("hidden_size", hidden_size),
        intermediate_size=_u32("intermediate_size", intermediate_size),
        latent_size=0 if latent_size is None else _u32("latent_size", latent_size),
        shared_intermediate_size=shared_total,
        routing=_option("routing", routing, _lib.ROUTING),
        scoring=_option("scoring", scoring, _lib.SCORING),
        n_group=_u32("n_group", n_group),
        topk_group=_u32("topk_group", topk_group),
        renormalize=1 if renormalize else 0,
        activation=_option("activation", activation, _lib.ACTIVATION),
        act_dtype=_lib.DTYPE[_dtype_name("act_dtype", act_dtype)],
        max_tokens=_u32("max_tokens", max_tokens),
        num_threads=_u32("num_threads", num_threads),
        act_quant=_option("act_quant", act_quant, _lib.ACT_QUANT),
    )
    # weight_dtype may name a quantized format the library knows; it answers UNSUPPORTED where
    # a backend lacks it.
    if isinstance(weight_dtype, str) and weight_dtype.lower() in _lib.DTYPE:
        settings["weight_dtype"] = _lib.DTYPE[weight_dtype.lower()]
    else:
        settings["weight_dtype"] = _lib.DTYPE[_dtype_name("weight_dtype", weight_dtype)]
    try:
        scale = float(routed_scaling_factor)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"routed_scaling_factor = {routed_scaling_factor!r} must be a number"
        ) from None

    cfg = _lib.init_struct(_lib.FdmoeConfig, "fdmoe_config_init")
    cfg.backend = _lib.BACKEND_KIND[kind]
    cfg.device_ordinal = ordinal
    for field, value in settings.items():
        setattr(cfg, field, value)
    cfg.routed_scaling_factor = scale
    settings.update(device_kind=kind, device_ordinal=ordinal, routed_scaling_factor=scale)
    return cfg, settings


# ---------------------------------------------------------------------------------------------
# Module-level queries.


def abi_version() -> int:
    """ABI version of the loaded library: major << 16 | minor."""
    return int(_lib.load().fdmoe_abi_version())


def version() -> str:
    """Version string of the loaded library ("0.2.0")."""
    return _lib.load().fdmoe_version_string().decode("ascii")


class FeatureSet(frozenset):
    """Names of the FDMOE_FEATURE_* bits a backend implements ("latent", "routing_given", ...).

    Membership ignores case and an "FDMOE_FEATURE_" prefix; `.bits` holds the raw mask.
    """

    bits: int = 0

    def __new__(cls, bits: int):
        names = [name for name, bit in _lib.FEATURES.items() if bits & bit]
        self = super().__new__(cls, names)
        self.bits = bits
        return self

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            key = name.lower()
            if key.startswith("fdmoe_feature_"):
                key = key[len("fdmoe_feature_"):]
            return frozenset.__contains__(self, key)
        return False

    def __repr__(self) -> str:
        return f"FeatureSet({sorted(self)!r})"


def query_features(device: object = "cpu") -> FeatureSet:
    """The features the backend of `device` ("cpu", "cuda") implements in the loaded library."""
    kind, _ = _parse_device(device)
    bits = ctypes.c_uint64(0)
    _lib.check(_lib.load().fdmoe_query_features(_lib.BACKEND_KIND[kind], ctypes.byref(bits)))
    return FeatureSet(bits.value)


_MEMORY_FIELDS = (
    "device_weight_bytes",
    "device_workspace_bytes",
    "device_graph_bytes",
    "host_weight_bytes",
    "host_workspace_bytes",
)


def _query_memory(cfg: _lib.FdmoeConfig) -> Dict[str, int]:
    out = _lib.FdmoeMemoryRequirements()
    out.struct_size = ctypes.sizeof(out)
    _lib.check(_lib.load().fdmoe_query_memory(ctypes.byref(cfg), ctypes.byref(out)))
    return {name: int(getattr(out, name)) for name in _MEMORY_FIELDS}


def memory_requirements(num_experts, top_k, hidden_size, intermediate_size, **kwargs) -> Dict[str, int]:
    """Bytes a MoELayer of these arguments would allocate, without allocating.

    Takes MoELayer's arguments; returns a dict with device_weight_bytes,
    device_workspace_bytes, device_graph_bytes, host_weight_bytes and host_workspace_bytes.
    """
    cfg, _ = _make_config(num_experts, top_k, hidden_size, intermediate_size, **kwargs)
    return _query_memory(cfg)


# ---------------------------------------------------------------------------------------------
# The layer.


class MoELayer:
    """A fused MoE layer on one backend (SPEC §3).

    Create, `load_weights`, then `forward` as often as needed; `close()` (or a `with` block)
    frees the library's memory. See the package README for shapes and dtypes.

    On device="cuda", forward takes torch tensors, cupy arrays and other
    __cuda_array_interface__ / DLPack arrays in place (device pointers, the current stream of
    their library) and returns arrays of the same library; numpy arrays are copied to the
    device and back, so numpy scripts run on either backend.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        routing: str = "softmax_topk",
        n_group: int = 1,
        topk_group: int = 1,
        scoring: str = "sigmoid",
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        activation: str = "swiglu",
        latent_size: Optional[int] = None,
        num_shared_experts: int = 0,
        shared_intermediate_size: Optional[int] = None,
        act_dtype="float32",
        weight_dtype="float32",
        max_tokens: int = 4096,
        device="cpu",
        *,
        num_threads: int = 0,
        act_quant: str = "none",
    ):
        self._handle: Optional[_lib.BackendPtr] = None
        # Device tensors a BORROW load points the library at, kept alive until close() or
        # the next successful load_weights.
        self._borrowed: Optional[List[object]] = None
        self._has_weights = False
        cfg, settings = _make_config(
            num_experts, top_k, hidden_size, intermediate_size,
            routing=routing, n_group=n_group, topk_group=topk_group, scoring=scoring,
            renormalize=renormalize, routed_scaling_factor=routed_scaling_factor,
            activation=activation, latent_size=latent_size,
            num_shared_experts=num_shared_experts,
            shared_intermediate_size=shared_intermediate_size, act_dtype=act_dtype,
            weight_dtype=weight_dtype, max_tokens=max_tokens, device=device,
            num_threads=num_threads, act_quant=act_quant,
        )
        self._cfg = cfg
        self.num_experts = settings["num_experts"]
        self.top_k = settings["top_k"]
        self.hidden_size = settings["hidden_size"]
        self.intermediate_size = settings["intermediate_size"]
        self.latent_size = settings["latent_size"] or None
        # S of the C config: all shared experts together (0 = none).
        self.shared_intermediate_size = settings["shared_intermediate_size"]
        self.max_tokens = settings["max_tokens"]
        self.routing = str(routing).lower()
        self._kind = settings["device_kind"]
        self._ordinal = settings["device_ordinal"]
        self.device = "cpu" if self._kind == "cpu" else f"cuda:{self._ordinal}"
        self.act_dtype = numpy_dtype(_dtype_name("act_dtype", act_dtype))
        self.weight_dtype_name = _DTYPE_NAMES[settings["weight_dtype"]]
        self.act_quant = str(act_quant).lower()

        handle = _lib.BackendPtr()
        _lib.check(_lib.load().fdmoe_create_backend(ctypes.byref(cfg), ctypes.byref(handle)))
        self._handle = handle

    # -- lifetime ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def weights_borrowed(self) -> bool:
        """True when the loaded weights are the caller's device tensors (BORROW, no copy)."""
        return self._borrowed is not None

    def close(self) -> None:
        """Frees the layer's library memory and lets go of borrowed weight tensors.
        Idempotent; later calls raise InvalidStateError."""
        handle, self._handle = self._handle, None
        if handle:
            _lib.load().fdmoe_destroy_backend(handle)
        self._borrowed = None

    def __enter__(self) -> "MoELayer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down modules
            pass

    def _live(self) -> _lib.BackendPtr:
        if self._handle is None:
            raise InvalidStateError("the layer is closed")
        return self._handle

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        elif not self._has_weights:
            state = "no weights"
        else:
            state = "borrowed weights" if self.weights_borrowed else "loaded"
        return (
            f"MoELayer(num_experts={self.num_experts}, top_k={self.top_k}, "
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"routing={self.routing!r}, act_dtype={self.act_dtype.name!r}, "
            f"device={self.device!r}, {state})"
        )

    # -- queries ----------------------------------------------------------------------------

    def memory_requirements(self) -> Dict[str, int]:
        """Bytes this layer's backend allocates (see fdmoe.memory_requirements)."""
        self._live()
        return _query_memory(self._cfg)

    # -- weights ----------------------------------------------------------------------------

    def _weight_shapes(self, layout: str):
        """Expected shape and dimension names of each weight argument in `layout`."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        L = self.latent_size or H
        S = self.shared_intermediate_size
        Ln = "latent_size" if self.latent_size else "hidden_size"
        torch_shapes = {
            "w13": ((E, 2 * I, L), ("num_experts", "2*intermediate_size", Ln)),
            "w2": ((E, L, I), ("num_experts", Ln, "intermediate_size")),
            "fc1": ((L, H), ("latent_size", "hidden_size")),
            "fc2": ((H, L), ("hidden_size", "latent_size")),
            "shared_w13": ((2 * S, H), ("2*S", "hidden_size")),
            "shared_w2": ((H, S), ("hidden_size", "S")),
        }
        if layout == "torch":
            return torch_shapes
        # paddle: every matrix transposed (the expert index stays first).
        out = {}
        for name, (shape, names) in torch_shapes.items():
            if len(shape) == 3:
                out[name] = ((shape[0], shape[2], shape[1]), (names[0], names[2], names[1]))
            else:
                out[name] = (shape[::-1], names[::-1])
        return out

    def _gate_shape(self, gate_layout_num: int):
        E, H = self.num_experts, self.hidden_size
        if gate_layout_num == _lib.GATE_LAYOUT["experts_by_hidden"]:
            return (E, H), ("num_experts", "hidden_size")
        return (H, E), ("hidden_size", "num_experts")

    def load_weights(
        self,
        w13,
        w2,
        gate=None,
        correction_bias=None,
        fc1=None,
        fc2=None,
        shared_w13=None,
        shared_w2=None,
        layout: str = "torch",
        *,
        gate_layout: Optional[str] = None,
        gate_up_interleaved: bool = False,
        borrow: Optional[bool] = None,
    ) -> None:
        """Gives the layer its weights (see README for shapes).

        Host arrays (numpy, CPU tensors) are copied into the library (OWN): float32 arrays are
        rounded by the library to the layer's weight_dtype; bfloat16 and float16 arrays are
        taken as they are. `gate_layout` defaults to "experts_by_hidden" ([E, H]) for layout
        "torch" and "hidden_by_experts" ([H, E]) for "paddle". `gate_up_interleaved`: w13
        alternates gate and up rows (gpt-oss checkpoints).

        On a cuda layer, device arrays (torch CUDA tensors, cupy, ...) of every dense matrix in
        the torch layout, of the layer's weight_dtype, on the layer's device, are borrowed: the
        library reads them where they are (no copy; non-contiguous ones are first made
        contiguous on the device) and the layer keeps them alive until close() or the next
        load. The gate and correction bias are copied by the library. Other device arrays
        (paddle layout, another dtype, another device, mixed with host arrays) are copied to the
        host and loaded as host arrays. `borrow=True` raises InvalidArgumentError instead of
        copying; `borrow=False` always copies.
        """
        handle = self._live()
        layout_key = str(layout).lower()
        layout_num = _option("layout", layout, {"torch": 0, "paddle": 1})
        if gate_layout is None:
            gate_layout = "hidden_by_experts" if layout_key == "paddle" else "experts_by_hidden"
        gate_layout_num = _option("gate_layout", gate_layout, _lib.GATE_LAYOUT)
        shapes = self._weight_shapes(layout_key)

        given = {"w13": w13, "w2": w2, "fc1": fc1, "fc2": fc2,
                 "shared_w13": shared_w13, "shared_w2": shared_w2}
        if self.latent_size is None and (fc1 is not None or fc2 is not None):
            raise InvalidArgumentError("fc1/fc2 are given but the layer has no latent_size")
        if self.shared_intermediate_size == 0 and (shared_w13 is not None or shared_w2 is not None):
            raise InvalidArgumentError(
                "shared_w13/shared_w2 are given but the layer has no shared experts (num_shared_experts=0)"
            )
        for name in ("w13", "w2"):
            if given[name] is None:
                raise NullArgumentError(f"{name} is required")
        present = {name: value for name, value in given.items() if value is not None}

        if borrow and self._kind != "cuda":
            raise InvalidArgumentError("borrow=True needs a cuda layer (the cpu backend copies its weights)")
        if self._kind == "cuda" and borrow is not False:
            plan, why = self._borrow_plan(present, shapes, layout_key, gate_up_interleaved)
            if plan is not None:
                self._load_borrowed(handle, plan, gate, correction_bias, gate_layout_num)
                return
            if borrow:
                raise InvalidArgumentError(f"the weights cannot be borrowed: {why}")

        # OWN from host memory: device arrays are copied to the host first.
        bits = self.weight_dtype_name == "bfloat16"
        present = {name: _device.to_host(value, bits) for name, value in present.items()}
        gate = _device.to_host(gate, bits)
        correction_bias = _device.to_host(correction_bias)
        arrays = HostArrays()
        dense = {}
        for name, value in present.items():
            shape, names = shapes[name]
            dense[name] = arrays.weight_input(name, value, shape, names)
        # One FdmoeWeights.dtype covers every dense matrix: keep a common type as it is, else
        # widen all to float32 (exact from bfloat16/float16).
        kinds = {dense_name(a.dtype) for a in dense.values()}
        if len(kinds) > 1:
            dense = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in dense.items()}
            kinds = {"float32"}
        weights_dtype = kinds.pop()

        gate_arr = None
        if gate is not None:
            shape, names = self._gate_shape(gate_layout_num)
            gate_arr = arrays.weight_input("gate", gate, shape, names)
        bias_arr = None
        if correction_bias is not None:
            bias_arr = arrays.float_input(
                "correction_bias", correction_bias, (self.num_experts,), ("num_experts",),
                np.dtype(np.float32),
            )

        w = _lib.init_struct(_lib.FdmoeWeights, "fdmoe_weights_init")
        w.layout = layout_num
        w.dtype = _lib.DTYPE[weights_dtype]
        w.memory = _lib.MEMORY["host"]
        w.ownership = _lib.OWNERSHIP["own"]
        w.gate_up_interleaved = 1 if gate_up_interleaved else 0
        w.gate_layout = gate_layout_num
        for name, arr in dense.items():
            setattr(w, name, arrays.address(arr))
        if gate_arr is not None:
            w.gate = arrays.address(gate_arr)
            w.gate_dtype = _lib.DTYPE[dense_name(gate_arr.dtype)]
        if bias_arr is not None:
            w.correction_bias = _typed(arrays.address(bias_arr), ctypes.c_float)
        # `dense`, `gate_arr` and `bias_arr` keep every buffer alive through the call; OWN copies
        # them, so they may go once it returns.
        _lib.check(_lib.load().fdmoe_load_weights(handle, ctypes.byref(w)))
        self._has_weights = True
        self._borrowed = None

    def _borrow_plan(self, present: dict, shapes: dict, layout_key: str, interleaved: bool):
        """(adapter, DeviceArrays, {name: device array}) when every dense matrix can be borrowed,
        else (None, the reason). Wrong shapes raise InvalidArgumentError either way."""
        if layout_key != "torch":
            return None, f"layout {layout_key!r} (the cuda kernels read the torch layout)"
        if interleaved:
            return None, "gate_up_interleaved (the cuda kernels read gate rows, then up rows)"
        on_host = [name for name, value in present.items() if not _device.is_device_array(value)]
        if on_host:
            return None, f"{', '.join(on_host)} in host memory"
        lib = _device.library_for(present["w13"])
        arrays = _device.DeviceArrays(lib, self._ordinal)
        plan = {}
        for name, value in present.items():
            arr = lib.adopt(value, self._ordinal)
            info = lib.describe(arr)
            shape, names = shapes[name]
            check_shape(name, info.shape, shape, names)
            if info.device != self._ordinal:
                return None, f"{name} is on cuda:{info.device}, the layer on cuda:{self._ordinal}"
            if arrays.logical(info.dtype) != self.weight_dtype_name:
                return None, (
                    f"{name} has dtype {info.dtype}, not the layer's weight_dtype "
                    f"{self.weight_dtype_name}"
                )
            # Rows are read with 16-byte loads: a contiguous, aligned copy where needed.
            plan[name] = arrays._layout(arr, info, _device.X_ALIGNMENT)
        return (lib, arrays, plan), ""

    def _load_borrowed(self, handle, plan, gate, correction_bias, gate_layout_num: int) -> None:
        lib, arrays, dense = plan
        gate_arr = bias_arr = None
        if gate is not None:
            shape, names = self._gate_shape(gate_layout_num)
            gate_arr = arrays.weight_input("gate", gate, shape, names)
        if correction_bias is not None:
            bias_arr = arrays.float_input(
                "correction_bias", correction_bias, (self.num_experts,), ("num_experts",),
                np.dtype(np.float32),
            )
        w = _lib.init_struct(_lib.FdmoeWeights, "fdmoe_weights_init")
        w.layout = _lib.LAYOUT["torch"]
        w.dtype = _lib.DTYPE[self.weight_dtype_name]
        w.memory = _lib.MEMORY["device"]
        w.ownership = _lib.OWNERSHIP["borrow"]
        w.gate_up_interleaved = 0
        w.gate_layout = gate_layout_num
        for name, arr in dense.items():
            setattr(w, name, arrays.address(arr))
        if gate_arr is not None:
            w.gate = arrays.address(gate_arr)
            w.gate_dtype = _lib.DTYPE[arrays.dtype_name(gate_arr)]
        if bias_arr is not None:
            w.correction_bias = _typed(arrays.address(bias_arr), ctypes.c_float)
        # The weights may have just been written on the current stream, and the library copies
        # the gate and bias from the device with a synchronous copy: let that work finish.
        # It also makes dropping the previously borrowed tensors safe for work on this stream.
        lib.synchronize(lib.current_stream(self._ordinal), self._ordinal)
        _lib.check(_lib.load().fdmoe_load_weights(handle, ctypes.byref(w)))
        self._has_weights = True
        self._borrowed = list(dense.values())

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x,
        router_logits=None,
        topk_ids=None,
        topk_weights=None,
        return_routing: bool = False,
        *,
        out=None,
        stream=None,
        force_eager: bool = False,
    ):
        """out [T, H] = MoE(x [T, H]); returns an array of act_dtype.

        Routing comes from topk_ids [T, k] int32 + topk_weights [T, k] float32 (replay) if
        given, else router_logits [T, E] float32, else the loaded gate. With
        `return_routing=True` returns (out, topk_ids [T, k] int32, topk_weights [T, k] float32):
        the ids and final weights used. `out`: an optional preallocated [T, H] array of
        act_dtype to write into.

        cpu layer: host arrays in, numpy out; `stream` must stay None.

        cuda layer: with device arrays (torch CUDA tensors, cupy, __cuda_array_interface__,
        DLPack) the call enqueues on `stream` (an int cudaStream_t, a torch.cuda.Stream or a
        cupy Stream; default: the current stream of x's library on the layer's device) and
        returns at once with arrays of x's library on the layer's device (no host sync: it may
        run inside a CUDA graph capture). With host arrays (numpy) it copies them to the device
        (torch, else cupy), runs, waits for the stream and returns numpy arrays.
        `force_eager`: run the kernels directly even where a graph from capture_graphs covers T.
        """
        handle = self._live()
        flags = _lib.FORWARD_FORCE_EAGER if force_eager else 0
        if self._kind == "cpu":
            handle_of_stream = None if stream is None else _device.stream_handle(stream)
            return self._run(handle, HostArrays(), x, router_logits, topk_ids, topk_weights,
                             return_routing, out, handle_of_stream, flags)
        if not _device.is_device_array(x):
            return self._round_trip(handle, x, router_logits, topk_ids, topk_weights,
                                    return_routing, out, stream, flags)
        lib = _device.library_for(x)
        arrays = _device.DeviceArrays(lib, self._ordinal)
        s = lib.current_stream(self._ordinal) if stream is None else _device.stream_handle(stream)
        return self._run(handle, arrays, x, router_logits, topk_ids, topk_weights,
                         return_routing, out, s, flags)

    __call__ = forward

    def _run(self, handle, arrays, x, router_logits, topk_ids, topk_weights, return_routing,
             out, stream, flags):
        """Checks and converts the arguments with `arrays` (HostArrays or DeviceArrays), calls
        fdmoe_forward, returns the outputs as `arrays` made them."""
        H, E, k = self.hidden_size, self.num_experts, self.top_k
        x_arr = arrays.float_input(
            "x", x, (None, H), ("T", "hidden_size"), self.act_dtype, align=_device.X_ALIGNMENT
        )
        T = arrays.shape_of(x_arr)[0]
        f32 = np.dtype(np.float32)
        logits_arr = ids_arr = weights_arr = None
        if router_logits is not None:
            logits_arr = arrays.float_input(
                "router_logits", router_logits, (T, E), ("T", "num_experts"), f32
            )
        if topk_ids is not None:
            ids_arr = arrays.int32_input("topk_ids", topk_ids, (T, k), ("T", "top_k"))
        if topk_weights is not None:
            weights_arr = arrays.float_input(
                "topk_weights", topk_weights, (T, k), ("T", "top_k"), f32
            )
        if T > _U32_MAX:
            raise InvalidArgumentError(f"x has {T} tokens, more than uint32 can count")
        out_arr = arrays.output("out", out, (T, H), self.act_dtype)
        ids_out = weights_out = None
        if return_routing:
            ids_out = arrays.output("topk_ids_out", None, (T, k), np.dtype(np.int32))
            weights_out = arrays.output("topk_weights_out", None, (T, k), f32)

        a = _lib.init_struct(_lib.FdmoeForwardArgs, "fdmoe_forward_args_init")
        a.num_tokens = T
        a.x = arrays.address(x_arr)
        a.out = arrays.address(out_arr)
        a.router_logits = _typed(arrays.address(logits_arr), ctypes.c_float)
        a.topk_ids = _typed(arrays.address(ids_arr), ctypes.c_int32)
        a.topk_weights = _typed(arrays.address(weights_arr), ctypes.c_float)
        a.topk_ids_out = _typed(arrays.address(ids_out), ctypes.c_int32)
        a.topk_weights_out = _typed(arrays.address(weights_out), ctypes.c_float)
        a.stream = stream
        a.flags = flags
        # The *_arr locals keep every buffer alive until the call returns; on the GPU, the
        # caching allocator of their library keeps their memory for work queued on its stream.
        _lib.check(_lib.load().fdmoe_forward(handle, ctypes.byref(a)))
        if return_routing:
            return out_arr, ids_out, weights_out
        return out_arr

    def _round_trip(self, handle, x, router_logits, topk_ids, topk_weights, return_routing,
                    out, stream, flags):
        """Host arrays on a cuda layer: converted as on the cpu backend, copied to the device,
        run, and copied back once the stream is done."""
        for name, value in (("router_logits", router_logits), ("topk_ids", topk_ids),
                            ("topk_weights", topk_weights), ("out", out)):
            if value is not None and _device.is_device_array(value):
                raise InvalidArgumentError(
                    f"{name} is a GPU array but x is a host array; pass the arrays on one side "
                    "(all on the device, or all host arrays)"
                )
        host = HostArrays()
        H, E, k = self.hidden_size, self.num_experts, self.top_k
        f32 = np.dtype(np.float32)
        x_h = host.float_input("x", x, (None, H), ("T", "hidden_size"), self.act_dtype)
        T = x_h.shape[0]
        logits_h = ids_h = weights_h = None
        if router_logits is not None:
            logits_h = host.float_input("router_logits", router_logits, (T, E), ("T", "num_experts"), f32)
        if topk_ids is not None:
            ids_h = host.int32_input("topk_ids", topk_ids, (T, k), ("T", "top_k"))
        if topk_weights is not None:
            weights_h = host.float_input("topk_weights", topk_weights, (T, k), ("T", "top_k"), f32)
        out_h = None if out is None else host.output("out", out, (T, H), self.act_dtype)

        lib = _device.host_library()
        arrays = _device.DeviceArrays(lib, self._ordinal)
        wanted = None if stream is None else _device.stream_handle(stream)
        with lib.stream_scope(wanted, self._ordinal) as s:
            def up(a):
                return None if a is None else lib.upload(a, self._ordinal)

            result = self._run(handle, arrays, up(x_h), up(logits_h), up(ids_h), up(weights_h),
                               return_routing, None, s, flags)
            results = result if return_routing else (result,)
            lib.synchronize(s, self._ordinal)
            dtypes = (self.act_dtype.name, "int32", "float32")
            back = [lib.download(r, dt) for r, dt in zip(results, dtypes)]
        if out_h is not None:
            np.copyto(out_h, back[0])
            back[0] = out_h
        return tuple(back) if return_routing else back[0]

    def forward_raw(
        self,
        num_tokens: int,
        x: int,
        out: int,
        router_logits: Optional[int] = None,
        topk_ids: Optional[int] = None,
        topk_weights: Optional[int] = None,
        topk_ids_out: Optional[int] = None,
        topk_weights_out: Optional[int] = None,
        *,
        stream=None,
        force_eager: bool = False,
    ) -> None:
        """fdmoe_forward on raw addresses (ints; None is NULL), for callers that manage their
        own buffers. Nothing is checked here: the library checks what it can (device pointers
        on a cuda layer: a host pointer raises InvalidArgumentError); sizes and dtypes are the
        caller's promise (x/out [T, H] of act_dtype, logits [T, E] f32, ids [T, k] int32,
        weights [T, k] f32)."""
        handle = self._live()
        a = _lib.init_struct(_lib.FdmoeForwardArgs, "fdmoe_forward_args_init")
        a.num_tokens = _u32("num_tokens", num_tokens)
        a.x = x
        a.out = out
        a.router_logits = _typed(router_logits, ctypes.c_float)
        a.topk_ids = _typed(topk_ids, ctypes.c_int32)
        a.topk_weights = _typed(topk_weights, ctypes.c_float)
        a.topk_ids_out = _typed(topk_ids_out, ctypes.c_int32)
        a.topk_weights_out = _typed(topk_weights_out, ctypes.c_float)
        a.stream = None if stream is None else _device.stream_handle(stream)
        a.flags = _lib.FORWARD_FORCE_EAGER if force_eager else 0
        _lib.check(_lib.load().fdmoe_forward(handle, ctypes.byref(a)))

    # -- graphs -----------------------------------------------------------------------------

    def capture_graphs(self, token_counts: Optional[Iterable[int]] = None, *, stream=None) -> None:
        """Captures library-owned CUDA graphs for token buckets (None: the library's default
        buckets); later forwards with T up to the largest bucket replay the smallest bucket
        >= T. `stream`: where to capture (None: a stream of the library's own).

        cuda backend only; the cpu backend raises UnsupportedError.
        """
        handle = self._live()
        if token_counts is None:
            counts, n = None, 0
        else:
            values = [_u32("token_counts[]", c) for c in token_counts]
            n = len(values)
            counts = (ctypes.c_uint32 * n)(*values) if n else None
        s = None if stream is None else _device.stream_handle(stream)
        _lib.check(_lib.load().fdmoe_capture_prefill_graph(handle, counts, n, s))


def _typed(address: Optional[int], ctype):
    """A typed pointer for a struct field (None stays NULL)."""
    if address is None:
        return None
    return ctypes.cast(address, ctypes.POINTER(ctype))
