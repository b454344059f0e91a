"""The device-array path of the binding (fdmoe/_device.py), tested without a GPU.

A fake array library stands in for torch/cupy: its "device arrays" are numpy arrays behind a
__cuda_array_interface__, so their addresses are host memory the cpu backend can read. A cpu
layer told it is a cuda layer (white box: `layer._kind = "cuda"`) then runs the whole cuda-side
code of the binding (argument checks, in-place use, conversions, outputs of the input's
library, the numpy round trip, the BORROW decision) against the cpu library, and must give the
bits the numpy path gives. test_cuda.py runs the real thing on a GPU.
"""

import contextlib
import ctypes

import ml_dtypes
import numpy as np
import pytest

import fdmoe
from fdmoe import _device, _lib

BF16 = np.dtype(ml_dtypes.bfloat16)
E, K, H, I = 8, 2, 32, 16


class FakeDev:
    """A "device array": numpy memory on a pretend CUDA device."""

    def __init__(self, a, device=0):
        self.a = a
        self.device_id = device

    @property
    def shape(self):
        return self.a.shape

    @property
    def __cuda_array_interface__(self):
        return {
            "data": (self.a.ctypes.data, False),
            "shape": self.a.shape,
            "typestr": self.a.dtype.str,
            "strides": None if self.a.flags.c_contiguous else self.a.strides,
            "version": 3,
        }


def _np_dtype(logical):
    return {"bfloat16": BF16, "float16": np.dtype(np.float16), "float32": np.dtype(np.float32),
            "int32": np.dtype(np.int32)}[logical]


class FakeLib:
    """The adapter interface of TorchLib/CupyLib over FakeDev; counts what it copies."""

    name = "fake"

    def __init__(self):
        self.copies = []
        self.syncs = []
        self.scopes = []

    def storage(self, logical):
        return logical

    def owns(self, v):
        return isinstance(v, FakeDev)

    def adopt(self, v, ordinal):
        if not isinstance(v, FakeDev):
            raise TypeError(type(v))
        return v

    def describe(self, v):
        return _device.ArrayInfo(v.a.shape, v.a.dtype.name, v.device_id,
                                 bool(v.a.flags.c_contiguous), v.a.ctypes.data)

    def convert(self, v, logical):
        self.copies.append("convert")
        a = v.a
        if logical != "int32" and a.dtype != np.float32:
            a = a.astype(np.float32)
        return FakeDev(a.astype(_np_dtype(logical)), v.device_id)

    def contiguous(self, v):
        self.copies.append("contiguous")
        return FakeDev(np.ascontiguousarray(v.a), v.device_id)

    def copy(self, v):
        self.copies.append("copy")
        return FakeDev(v.a.copy(), v.device_id)

    def empty(self, shape, logical, ordinal):
        return FakeDev(np.full(shape, np.nan if logical != "int32" else -7, _np_dtype(logical)), ordinal)

    def address(self, v):
        return v.a.ctypes.data

    def current_stream(self, ordinal):
        return None  # NULL: what the cpu backend accepts

    def upload(self, a, ordinal):
        self.copies.append("upload")
        return FakeDev(np.array(a, copy=True), ordinal)

    def download(self, v, logical=None):
        return v.a.copy()

    def synchronize(self, stream, ordinal):
        self.syncs.append(stream)

    @contextlib.contextmanager
    def stream_scope(self, stream, ordinal):
        self.scopes.append(stream)
        yield stream


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLib()
    monkeypatch.setattr(_device, "host_library", lambda: lib)
    return lib


def weights(seed=0, gate=True):
    rng = np.random.default_rng(seed)
    w = {
        "w13": (rng.normal(size=(E, 2 * I, H)) / np.sqrt(H)).astype(np.float32),
        "w2": (rng.normal(size=(E, H, I)) / np.sqrt(I)).astype(np.float32),
    }
    if gate:
        w["gate"] = (rng.normal(size=(E, H)) / np.sqrt(H)).astype(np.float32)
    return w


def x_of(t, seed=1):
    return np.random.default_rng(seed).normal(size=(t, H)).astype(np.float32)


def layers(**kw):
    """(numpy cpu layer, the same layer told it runs on cuda), both with the same weights."""
    kw = dict(act_dtype="bfloat16", weight_dtype="bfloat16", max_tokens=64, **kw)
    w = weights(gate=kw.get("routing") != "given")
    ref = fdmoe.MoELayer(E, K, H, I, **kw)
    ref.load_weights(**w)
    dev = fdmoe.MoELayer(E, K, H, I, **kw)
    dev.load_weights(**w)
    dev._kind = "cuda"  # white box: the cuda-side binding code over the cpu library
    return ref, dev


# -- pure helpers ---------------------------------------------------------------------------------


def test_kind_of():
    assert _device.kind_of(np.zeros(3)) == "host"
    assert _device.kind_of([1.0, 2.0]) == "host"
    assert _device.kind_of(FakeDev(np.zeros(3))) == "cai"

    class Dl:
        def __init__(self, kind):
            self.kind = kind

        def __dlpack__(self, stream=None):
            raise NotImplementedError

        def __dlpack_device__(self):
            return (self.kind, 0)

    assert _device.kind_of(Dl(2)) == "dlpack"  # kDLCUDA
    assert _device.kind_of(Dl(1)) == "host"  # kDLCPU


def test_cai_property_that_raises_is_not_an_array():
    class Refuses:
        @property
        def __cuda_array_interface__(self):
            raise KeyError("bfloat16")  # what a torch bf16 tensor's property does

    assert _device.kind_of(Refuses()) == "host"


def test_parse_cai():
    a = np.zeros((4, 6), np.float16)
    ptr, shape, dtype, contiguous = _device.parse_cai(FakeDev(a).__cuda_array_interface__)
    assert (ptr, shape, dtype, contiguous) == (a.ctypes.data, (4, 6), np.float16, True)
    t = a.T
    assert _device.parse_cai(FakeDev(t).__cuda_array_interface__)[3] is False
    # Size-1 dimensions may carry any stride.
    cai = {"data": (16, False), "shape": (1, 6), "typestr": "<f2", "strides": (999, 2)}
    assert _device.parse_cai(cai)[3] is True
    with pytest.raises(fdmoe.InvalidArgumentError):
        _device.parse_cai({"shape": (1,)})


def test_stream_handle():
    class TorchLike:
        cuda_stream = 0x1000

    class CupyLike:
        ptr = 0x2000

    assert _device.stream_handle(TorchLike()) == 0x1000
    assert _device.stream_handle(CupyLike()) == 0x2000
    assert _device.stream_handle(0) == 0
    assert _device.stream_handle(np.uint64(7)) == 7
    with pytest.raises(fdmoe.InvalidArgumentError, match="stream"):
        _device.stream_handle("default")
    with pytest.raises(fdmoe.InvalidArgumentError, match="stream"):
        _device.stream_handle(True)


def test_float_to_bf16_bits_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    vals = np.concatenate([
        rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 1000),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-40,
                  1.00390625, 1.01171875, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8], np.float32),
    ]).astype(np.float32)
    bits = _device.float_to_bf16_bits(np, vals)
    assert bits.dtype == np.uint16
    want = vals.astype(BF16).view(np.uint16)
    finite = ~np.isnan(vals)
    assert (bits[finite] == want[finite]).all()
    assert (bits[~finite] & 0x7F80 == 0x7F80).all() and (bits[~finite] & 0x7F).any()
    # float16 input goes through float32 exactly.
    h = rng.normal(size=100).astype(np.float16)
    assert (_device.float_to_bf16_bits(np, h) == h.astype(np.float32).astype(BF16).view(np.uint16)).all()


def test_no_array_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_device, "_importable", lambda name: False)
    with pytest.raises(fdmoe.UnsupportedError, match="torch or cupy"):
        _device.host_library()


# -- DeviceArrays --------------------------------------------------------------------------------


def test_inputs_are_used_in_place(fake):
    arrays = _device.DeviceArrays(fake, 0)
    x = FakeDev(x_of(5).astype(BF16))
    got = arrays.float_input("x", x, (None, H), ("T", "hidden_size"), BF16, align=16)
    assert got is x and fake.copies == []
    ids = FakeDev(np.zeros((5, K), np.int32))
    assert arrays.int32_input("topk_ids", ids, (5, K), ("T", "top_k")) is ids
    assert fake.copies == []


def test_conversions_and_layout_copies(fake):
    arrays = _device.DeviceArrays(fake, 0)
    x32 = FakeDev(x_of(5))
    got = arrays.float_input("x", x32, (None, H), ("T", "hidden_size"), BF16)
    assert got.a.dtype == BF16 and fake.copies == ["convert"]
    np.testing.assert_array_equal(got.a, x32.a.astype(BF16))

    fake.copies.clear()
    xt = FakeDev(np.asfortranarray(x_of(5).astype(BF16)))
    got = arrays.float_input("x", xt, (None, H), ("T", "hidden_size"), BF16)
    assert fake.copies == ["contiguous"] and got.a.flags.c_contiguous

    fake.copies.clear()
    buf = x_of(6).astype(BF16).reshape(-1)
    mis = FakeDev(buf[1:1 + 5 * H].reshape(5, H))  # starts 2 bytes into the buffer
    assert mis.a.ctypes.data % 16
    got = arrays.float_input("x", mis, (None, H), ("T", "hidden_size"), BF16, align=16)
    assert fake.copies == ["copy"] and got.a.ctypes.data % 16 == 0

    fake.copies.clear()
    ids = FakeDev(np.ones((5, K), np.int64))
    got = arrays.int32_input("topk_ids", ids, (5, K), ("T", "top_k"))
    assert got.a.dtype == np.int32 and fake.copies == ["convert"]


def test_checks(fake):
    arrays = _device.DeviceArrays(fake, 0)
    with pytest.raises(fdmoe.InvalidArgumentError, match=r"x has shape \[5, 31\]"):
        arrays.float_input("x", FakeDev(np.zeros((5, 31), BF16)), (None, H), ("T", "hidden_size"), BF16)
    with pytest.raises(fdmoe.InvalidArgumentError, match="x has dtype int32"):
        arrays.float_input("x", FakeDev(np.zeros((5, H), np.int32)), (None, H), ("T", "hidden_size"), BF16)
    with pytest.raises(fdmoe.InvalidArgumentError, match="topk_ids has dtype float32"):
        arrays.int32_input("topk_ids", FakeDev(np.zeros((5, K), np.float32)), (5, K), ("T", "top_k"))
    with pytest.raises(fdmoe.InvalidArgumentError, match="x is on cuda:1, but the layer runs on cuda:0"):
        arrays.float_input("x", FakeDev(np.zeros((5, H), BF16), device=1), (None, H), ("T", "hidden_size"), BF16)
    with pytest.raises(fdmoe.InvalidArgumentError, match="out has dtype float32"):
        arrays.output("out", FakeDev(np.zeros((5, H), np.float32)), (5, H), BF16)
    with pytest.raises(fdmoe.InvalidArgumentError, match="out must be a C-contiguous"):
        arrays.output("out", FakeDev(np.zeros((H, 5), BF16).T), (5, H), BF16)
    with pytest.raises(fdmoe.InvalidArgumentError, match="out must be a device array"):
        arrays.output("out", np.zeros((5, H), BF16), (5, H), BF16)


def test_host_arrays_beside_device_ones_are_uploaded(fake):
    arrays = _device.DeviceArrays(fake, 0)
    got = arrays.int32_input("topk_ids", np.zeros((5, K), np.int64), (5, K), ("T", "top_k"))
    assert isinstance(got, FakeDev) and got.a.dtype == np.int32 and fake.copies == ["upload"]


# -- forward through the cuda-side code ----------------------------------------------------------


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
def test_forward_with_device_arrays_matches_numpy(fake, x_dtype):
    ref, dev = layers()
    with ref, dev:
        x = x_of(9)
        want = ref.forward(x, return_routing=True)
        xd = FakeDev(x.astype(BF16) if x_dtype == "bfloat16" else x)
        got = dev.forward(xd, return_routing=True)
        assert all(isinstance(g, FakeDev) for g in got)
        for g, w in zip(got, want):
            assert g.a.dtype == w.dtype and g.a.tobytes() == w.tobytes()
        # Replay of the record, and the library's routing from logits, both in place.
        again = dev.forward(xd, topk_ids=got[1], topk_weights=got[2])
        assert again.a.tobytes() == want[0].tobytes()
        logits = np.random.default_rng(3).normal(size=(9, E)).astype(np.float32)
        a = ref.forward(x, router_logits=logits)
        b = dev.forward(xd, router_logits=FakeDev(logits))
        assert a.tobytes() == b.a.tobytes()


def test_forward_out_is_written_in_place(fake):
    ref, dev = layers()
    with ref, dev:
        x = x_of(4)
        out = FakeDev(np.full((4, H), np.nan, BF16))
        assert dev.forward(FakeDev(x.astype(BF16)), out=out) is out
        assert out.a.tobytes() == ref.forward(x).tobytes()


def test_numpy_round_trip(fake):
    ref, dev = layers()
    with ref, dev:
        x = x_of(7)
        want = ref.forward(x, return_routing=True)
        got = dev.forward(x, return_routing=True)
        assert all(isinstance(g, np.ndarray) for g in got)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes()
        assert fake.syncs == [None] and fake.scopes == [None]
        out = np.empty((7, H), BF16)
        assert dev.forward(x, out=out) is out
        assert out.tobytes() == want[0].tobytes()


def test_numpy_round_trip_given_routing(fake):
    ref, dev = layers(routing="given")
    with ref, dev:
        x = x_of(6)
        ids = np.random.default_rng(2).integers(0, E, (6, K))
        w = np.random.default_rng(3).uniform(0.1, 1, (6, K)).astype(np.float32)
        assert dev.forward(x, topk_ids=ids, topk_weights=w).tobytes() == \
            ref.forward(x, topk_ids=ids, topk_weights=w).tobytes()


def test_round_trip_takes_the_stream_given(fake):
    _, dev = layers()
    with dev:
        class S:
            cuda_stream = 0  # what the cpu library accepts: NULL
        dev.forward(x_of(2), stream=S())
        assert fake.scopes == [0] and fake.syncs == [0]


def test_mixed_host_and_device_inputs(fake):
    ref, dev = layers()
    with ref, dev:
        with pytest.raises(fdmoe.InvalidArgumentError, match="router_logits is a GPU array but x is a host array"):
            dev.forward(x_of(2), router_logits=FakeDev(np.zeros((2, E), np.float32)))
        # The other way round, host arrays are uploaded.
        logits = np.random.default_rng(4).normal(size=(3, E)).astype(np.float32)
        x = x_of(3)
        got = dev.forward(FakeDev(x.astype(BF16)), router_logits=logits)
        assert got.a.tobytes() == ref.forward(x, router_logits=logits).tobytes()


def test_zero_tokens_on_device(fake):
    _, dev = layers()
    with dev:
        out, ids, w = dev.forward(FakeDev(np.zeros((0, H), BF16)), return_routing=True)
        assert out.a.shape == (0, H) and ids.a.shape == (0, K) and w.a.shape == (0, K)


def test_forward_raw_matches_forward():
    ref, _ = layers()
    with ref:
        x = x_of(5).astype(BF16)
        out = np.empty((5, H), BF16)
        ids = np.empty((5, K), np.int32)
        w = np.empty((5, K), np.float32)
        ref.forward_raw(5, x.ctypes.data, out.ctypes.data, topk_ids_out=ids.ctypes.data,
                        topk_weights_out=w.ctypes.data)
        want = ref.forward(x, return_routing=True)
        assert out.tobytes() == want[0].tobytes() and (ids == want[1]).all() and w.tobytes() == want[2].tobytes()
        with pytest.raises(fdmoe.CapacityExceededError):
            ref.forward_raw(65, x.ctypes.data, out.ctypes.data)
        with pytest.raises(fdmoe.NullArgumentError):
            ref.forward_raw(5, None, out.ctypes.data)


# -- weights: BORROW or copy ----------------------------------------------------------------------


def _capture_load(monkeypatch):
    """Replaces fdmoe_load_weights with a recorder of the struct it is given."""
    seen = []

    def fake_load(handle, wptr):
        w = ctypes.cast(wptr, ctypes.POINTER(_lib.FdmoeWeights)).contents
        seen.append({name: getattr(w, name) for name, _ in _lib.FdmoeWeights._fields_})
        return 0

    monkeypatch.setattr(_lib.load(), "fdmoe_load_weights", fake_load)
    return seen


def test_device_weights_are_borrowed(fake, monkeypatch):
    _, dev = layers(routing="grouped_topk", n_group=4, topk_group=2)
    w = weights(seed=5)
    w13 = FakeDev(w["w13"].astype(BF16))
    w2 = FakeDev(w["w2"].astype(BF16))
    bias = np.linspace(-0.1, 0.1, E).astype(np.float64)
    seen = _capture_load(monkeypatch)
    dev.load_weights(w13, w2, gate=w["gate"], correction_bias=bias)
    assert dev.weights_borrowed and "borrowed" in repr(dev)
    (s,) = seen
    assert s["memory"] == _lib.MEMORY["device"] and s["ownership"] == _lib.OWNERSHIP["borrow"]
    assert s["layout"] == _lib.LAYOUT["torch"] and s["dtype"] == _lib.DTYPE["bfloat16"]
    assert s["w13"] == w13.a.ctypes.data and s["w2"] == w2.a.ctypes.data
    assert s["gate_dtype"] == _lib.DTYPE["float32"]
    assert fake.syncs == [None]  # the current stream is drained before the library reads
    assert dev._borrowed[0] is w13 and dev._borrowed[1] is w2
    dev.close()
    assert not dev.weights_borrowed


@pytest.mark.parametrize(
    "case,reason",
    [
        ("paddle", "layout 'paddle'"),
        ("float32", "not the layer's weight_dtype bfloat16"),
        ("host_w2", "w2 in host memory"),
        ("other_device", "w13 is on cuda:1"),
        ("interleaved", "gate_up_interleaved"),
    ],
)
def test_weights_that_cannot_be_borrowed_are_copied(fake, monkeypatch, case, reason):
    ref, dev = layers()
    w = weights(seed=6)
    kw = {"gate": w["gate"]}
    w13, w2 = w["w13"].astype(BF16), w["w2"].astype(BF16)
    if case == "paddle":
        w13, w2 = np.ascontiguousarray(np.swapaxes(w13, 1, 2)), np.ascontiguousarray(np.swapaxes(w2, 1, 2))
        kw.update(layout="paddle", gate=np.ascontiguousarray(w["gate"].T))
    if case == "float32":
        w13, w2 = w["w13"], w["w2"]
    if case == "interleaved":
        kw["gate_up_interleaved"] = True
    d13 = FakeDev(w13, device=1 if case == "other_device" else 0)
    d2 = w2 if case == "host_w2" else FakeDev(w2)
    with ref, dev:
        with pytest.raises(fdmoe.InvalidArgumentError, match=reason):
            dev.load_weights(d13, d2, borrow=True, **kw)
        dev.load_weights(d13, d2, **kw)  # copied to the host, then OWN
        assert not dev.weights_borrowed
        ref.load_weights(w13, w2, **kw)
        x = x_of(5)
        assert dev.forward(x).tobytes() == ref.forward(x).tobytes()


def test_borrow_checks_shapes(fake):
    _, dev = layers()
    w = weights()
    with dev:
        with pytest.raises(fdmoe.InvalidArgumentError, match=r"w2 has shape \[8, 16, 32\]"):
            dev.load_weights(FakeDev(w["w13"].astype(BF16)), FakeDev(np.swapaxes(w["w2"], 1, 2).astype(BF16)))


def test_borrow_on_a_cpu_layer_is_refused():
    ref, _ = layers()
    with ref:
        with pytest.raises(fdmoe.InvalidArgumentError, match="borrow=True needs a cuda layer"):
            ref.load_weights(**weights(), borrow=True)
