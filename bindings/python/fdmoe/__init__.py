"""fdmoe: Python binding of libfdmoe, a fused Mixture-of-Experts layer engine.

Pure ctypes over libfdmoe.so (found through $FDMOE_LIBRARY, next to this package, or in the
repository's target/release or target/debug). numpy arrays in, numpy arrays out; bfloat16
through ml_dtypes. On device="cuda", torch / cupy GPU arrays are used in place on their
library's current stream (torch in, torch out), and numpy arrays are copied to the device and
back.

    import fdmoe
    with fdmoe.MoELayer(8, 2, 64, 32, act_dtype="bfloat16") as layer:
        layer.load_weights(w13, w2, gate=gate)
        out = layer.forward(x)
"""

from ._errors import (
    CapacityExceededError,
    CudaError,
    FdmoeError,
    InternalError,
    InvalidArgumentError,
    InvalidStateError,
    LibraryLoadError,
    NcclError,
    NoDeviceError,
    NullArgumentError,
    OutOfMemoryError,
    UnsupportedError,
)
from ._lib import FEATURES
from .layer import FeatureSet, MoELayer, abi_version, memory_requirements, query_features, version

__version__ = "0.2.0"

__all__ = [
    "MoELayer",
    "abi_version",
    "version",
    "query_features",
    "memory_requirements",
    "FeatureSet",
    "FEATURES",
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

# ---- Quantized formats (fdmoe/quant.py): the codecs, the FP8 pre-dispatch, and
# MoELayer.load_quantized_weights for pre-quantized experts. MoELayer(weight_dtype="fp8_block" |
# "mxfp4" | "nvfp4") + load_weights(float arrays) quantizes at load.
from . import quant
from .quant import QuantizedTensor, dequantize, pre_dispatch, quantize

MoELayer.load_quantized_weights = quant.load_quantized_weights
__all__ += ["quantize", "dequantize", "pre_dispatch", "QuantizedTensor"]
