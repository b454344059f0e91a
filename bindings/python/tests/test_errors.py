"""Every error path: the exception class, its .status and a message naming the culprit."""

import numpy as np
import pytest

import fdmoe

E, K, H, I = 8, 2, 16, 6


def make(**kw):
    kw.setdefault("max_tokens", 16)
    return fdmoe.MoELayer(E, K, H, I, **kw)


def weights(seed=0, layout="torch", latent=None):
    rng = np.random.default_rng(seed)
    L = latent or H
    w = {
        "w13": (rng.normal(size=(E, 2 * I, L)) / np.sqrt(L)).astype(np.float32),
        "w2": (rng.normal(size=(E, L, I)) / np.sqrt(I)).astype(np.float32),
        "gate": (rng.normal(size=(E, H)) / np.sqrt(H)).astype(np.float32),
    }
    if layout == "paddle":
        w = {k: np.ascontiguousarray(np.swapaxes(v, -1, -2)) for k, v in w.items()}
    return w


def x_of(t, seed=1):
    return np.random.default_rng(seed).normal(size=(t, H)).astype(np.float32)


def raises(cls, status, *fragments):
    """pytest.raises that also checks .status and the message."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(cls)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            e = self.info.value
            assert isinstance(e, fdmoe.FdmoeError)
            assert e.status == status, (e.status, str(e))
            assert e.message and status in str(e)
            for f in fragments:
                assert f in e.message, (f, e.message)
            return handled

    return _Check()


# -- create -------------------------------------------------------------------------------------


def test_top_k_above_num_experts():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "top_k"):
        fdmoe.MoELayer(3, 4, H, I)


def test_top_k_zero():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "top_k"):
        fdmoe.MoELayer(3, 0, H, I)


def test_num_experts_not_divisible_by_n_group():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "n_group"):
        make(routing="grouped_topk", n_group=3, topk_group=1)


def test_topk_group_above_n_group():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "topk_group"):
        make(routing="grouped_topk", n_group=4, topk_group=5)


def test_top_k_above_experts_in_kept_groups():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "top_k"):
        fdmoe.MoELayer(8, 3, H, I, routing="grouped_topk", n_group=4, topk_group=1)


def test_groups_with_non_grouped_routing():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "n_group"):
        make(routing="softmax_topk", n_group=2, topk_group=1)


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(routing="topk_softmax"), "routing"),
        (dict(routing=3), "routing"),
        (dict(activation="relu"), "activation"),
        (dict(scoring="tanh"), "scoring"),
        (dict(act_dtype="float64"), "act_dtype"),
        (dict(act_dtype="mxfp4"), "act_dtype"),
        (dict(weight_dtype="int8"), "weight_dtype"),
        (dict(device="tpu"), "device"),
        (dict(device="cuda:x"), "device"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(latent_size=2.5), "latent_size"),
        (dict(n_group=-2), "n_group"),
    ],
)
def test_bad_options_are_invalid_arguments(kw, fragment):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", fragment):
        make(**kw)


def test_negative_and_zero_sizes():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "num_experts"):
        fdmoe.MoELayer(-1, K, H, I)
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "hidden_size"):
        fdmoe.MoELayer(E, K, 0, I)


def test_non_finite_scaling_factor():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "routed_scaling_factor"):
        make(routed_scaling_factor=float("nan"))


def test_quantized_weight_dtype_needs_its_block_size():
    # FP8_BLOCK scales 128x128 blocks: K = hidden_size = 16 cannot take it (a build without
    # quantized formats on the cpu backend says UNSUPPORTED instead).
    with pytest.raises((fdmoe.InvalidArgumentError, fdmoe.UnsupportedError)) as info:
        make(weight_dtype="fp8_block")
    e = info.value
    assert e.status in ("INVALID_ARGUMENT", "UNSUPPORTED")
    assert "fp8_block" in e.message.lower()


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_device(device):
    try:
        layer = make(device=device)
    except (fdmoe.UnsupportedError, fdmoe.NoDeviceError) as e:
        assert e.status in ("UNSUPPORTED", "NO_DEVICE") and "cuda" in e.message
    else:  # a build with a CUDA backend on a machine with a GPU
        layer.close()
        pytest.skip("this build has a working cuda backend")


# -- load_weights -------------------------------------------------------------------------------


def test_forward_before_load_weights():
    with make() as layer:
        with raises(fdmoe.InvalidStateError, "INVALID_STATE", "load_weights"):
            layer.forward(x_of(2))


def test_capture_before_load_weights():
    # The cpu backend has no graphs at all (UNSUPPORTED); a cuda layer says INVALID_STATE.
    with make() as layer:
        with pytest.raises((fdmoe.InvalidStateError, fdmoe.UnsupportedError)) as info:
            layer.capture_graphs()
        assert info.value.status in ("INVALID_STATE", "UNSUPPORTED")


@pytest.mark.parametrize(
    "name,shape",
    [
        ("w13", (E, 2 * I + 1, H)),
        ("w13", (E, H, 2 * I)),  # paddle orientation given to a torch layer
        ("w13", (2 * I, H)),
        ("w2", (E, I, H)),
        ("w2", (E - 1, H, I)),
        ("gate", (H, E)),
        ("gate", (E,)),
    ],
)
def test_wrong_weight_shapes(name, shape):
    w = weights()
    w[name] = np.ones(shape, np.float32)
    with make() as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", name, str(list(shape))):
            layer.load_weights(**w)


def test_wrong_shape_message_names_the_expected_shape():
    w = weights()
    w["w2"] = np.ones((E, I, H), np.float32)
    with make() as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "w2", f"[{E}, {I}, {H}]", f"[{E}, {H}, {I}]"):
            layer.load_weights(**w)


def test_paddle_layout_expects_transposed_shapes():
    with make() as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "w13"):
            layer.load_weights(layout="paddle", **weights(layout="torch"))
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "layout"):
            layer.load_weights(layout="tensorflow", **weights())
        layer.load_weights(layout="paddle", **weights(layout="paddle"))
        assert layer.forward(x_of(2)).shape == (2, H)


def test_latent_weights_shapes_and_presence():
    with make(latent_size=6) as layer:
        w = weights(latent=6)
        with raises(fdmoe.NullArgumentError, "NULL_ARGUMENT", "fc1"):
            layer.load_weights(**w)
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "fc1"):
            layer.load_weights(fc1=np.ones((H, 6), np.float32), fc2=np.ones((H, 6), np.float32), **w)
        layer.load_weights(fc1=np.ones((6, H), np.float32), fc2=np.ones((H, 6), np.float32), **w)
    with make() as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "latent"):
            layer.load_weights(fc1=np.ones((6, H), np.float32), fc2=np.ones((H, 6), np.float32), **weights())


def test_shared_weights_shapes_and_presence():
    with make(num_shared_experts=2, shared_intermediate_size=3) as layer:
        with raises(fdmoe.NullArgumentError, "NULL_ARGUMENT", "shared"):
            layer.load_weights(**weights())
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "shared_w13"):
            layer.load_weights(shared_w13=np.ones((6, H), np.float32), shared_w2=np.ones((H, 6), np.float32),
                               **weights())
        layer.load_weights(shared_w13=np.ones((12, H), np.float32), shared_w2=np.ones((H, 6), np.float32),
                           **weights())
    with make() as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "shared"):
            layer.load_weights(shared_w13=np.ones((12, H), np.float32), shared_w2=np.ones((H, 6), np.float32),
                               **weights())


def test_correction_bias_with_non_grouped_routing():
    for routing in ("softmax_topk", "sigmoid_topk"):
        with make(routing=routing) as layer:
            with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "correction_bias"):
                layer.load_weights(correction_bias=np.zeros(E, np.float32) + 0.1, **weights())


def test_correction_bias_shape():
    with make(routing="grouped_topk", n_group=2, topk_group=1) as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "correction_bias"):
            layer.load_weights(correction_bias=np.zeros(E + 1, np.float32), **weights())


def test_gate_with_given_routing():
    with make(routing="given") as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "gate"):
            layer.load_weights(**weights())


def test_non_float_weights():
    w = weights()
    w["w13"] = w["w13"].astype(np.int32)
    with make() as layer:
        with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "w13", "int32"):
            layer.load_weights(**w)


# -- forward ------------------------------------------------------------------------------------


@pytest.fixture
def layer():
    with make() as layer:
        layer.load_weights(**weights())
        yield layer


def test_tokens_above_max_tokens(layer):
    layer.forward(x_of(16))
    with raises(fdmoe.CapacityExceededError, "CAPACITY_EXCEEDED", "max_tokens"):
        layer.forward(x_of(17))


@pytest.mark.parametrize("shape", [(4, H + 1), (H,), (1, 4, H), (4, H - 1)])
def test_wrong_x_shape(layer, shape):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "x", "hidden_size"):
        layer.forward(np.ones(shape, np.float32))


def test_non_float_x(layer):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "x"):
        layer.forward(np.ones((2, H), np.int64))


def test_wrong_router_logits_shape(layer):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "router_logits", "num_experts"):
        layer.forward(x_of(4), router_logits=np.ones((4, E + 1), np.float32))
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "router_logits"):
        layer.forward(x_of(4), router_logits=np.ones((3, E), np.float32))


def test_wrong_topk_shapes(layer):
    ids = np.zeros((4, K), np.int32)
    w = np.ones((4, K), np.float32)
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "topk_ids"):
        layer.forward(x_of(4), topk_ids=ids[:, :1], topk_weights=w)
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "topk_weights"):
        layer.forward(x_of(4), topk_ids=ids, topk_weights=w[:3])
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "topk_ids"):
        layer.forward(x_of(4), topk_ids=ids.astype(np.float32), topk_weights=w)


@pytest.mark.parametrize("bad", [E, -1, 1000])
def test_ids_out_of_range(layer, bad):
    ids = np.zeros((4, K), np.int32)
    ids[2, 1] = bad
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "topk_ids"):
        layer.forward(x_of(4), topk_ids=ids, topk_weights=np.ones((4, K), np.float32))


def test_ids_that_do_not_fit_int32(layer):
    ids = np.zeros((4, K), np.int64)
    ids[0, 0] = 2**32 + 1  # would wrap to 1
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "topk_ids", "int32"):
        layer.forward(x_of(4), topk_ids=ids, topk_weights=np.ones((4, K), np.float32))


def test_ids_without_weights(layer):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "topk"):
        layer.forward(x_of(4), topk_ids=np.zeros((4, K), np.int32))


def test_two_routing_sources(layer):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "router_logits"):
        layer.forward(x_of(4), router_logits=np.ones((4, E), np.float32),
                      topk_ids=np.zeros((4, K), np.int32), topk_weights=np.ones((4, K), np.float32))


def test_no_gate_and_no_logits():
    w = weights()
    del w["gate"]
    with make() as layer:
        layer.load_weights(**w)
        with raises(fdmoe.NullArgumentError, "NULL_ARGUMENT", "router_logits"):
            layer.forward(x_of(2))
        assert layer.forward(x_of(2), router_logits=np.ones((2, E), np.float32)).shape == (2, H)


def test_given_routing_needs_ids():
    w = weights()
    del w["gate"]
    with make(routing="given") as layer:
        layer.load_weights(**w)
        with raises(fdmoe.NullArgumentError, "NULL_ARGUMENT", "topk_ids"):
            layer.forward(x_of(2))


def test_bad_out_buffer(layer):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "out"):
        layer.forward(x_of(2), out=np.empty((2, H), np.float64))
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "out"):
        layer.forward(x_of(2), out=np.empty((3, H), np.float32))
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "out"):
        layer.forward(x_of(2), out=np.empty((H, 2), np.float32).T)


def test_stream_on_cpu(layer):
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "stream"):
        layer.forward(x_of(2), stream=0x1234)


def test_capture_graphs_on_cpu(layer):
    with raises(fdmoe.UnsupportedError, "UNSUPPORTED", "cpu"):
        layer.capture_graphs()
    with raises(fdmoe.UnsupportedError, "UNSUPPORTED"):
        layer.capture_graphs([1, 2, 4])
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "token_counts"):
        layer.capture_graphs([-1])


# -- lifetime -----------------------------------------------------------------------------------


def test_closed_layer():
    layer = make()
    layer.load_weights(**weights())
    layer.close()
    layer.close()  # idempotent
    assert layer.closed
    for call in (
        lambda: layer.forward(x_of(2)),
        lambda: layer.load_weights(**weights()),
        lambda: layer.capture_graphs(),
        lambda: layer.memory_requirements(),
    ):
        with raises(fdmoe.InvalidStateError, "INVALID_STATE", "closed"):
            call()


def test_context_manager_closes():
    with make() as layer:
        layer.load_weights(**weights())
        layer.forward(x_of(1))
    assert layer.closed
    with raises(fdmoe.InvalidStateError, "INVALID_STATE"):
        layer.forward(x_of(1))


def test_reload_replaces_weights(layer):
    x = x_of(3)
    a = layer.forward(x)
    layer.load_weights(**weights(seed=5))
    b = layer.forward(x)
    layer.load_weights(**weights(seed=0))
    c = layer.forward(x)
    assert not np.array_equal(a, b)
    assert a.tobytes() == c.tobytes()


def test_error_hierarchy():
    for cls, status in [
        (fdmoe.InvalidArgumentError, "INVALID_ARGUMENT"),
        (fdmoe.NullArgumentError, "NULL_ARGUMENT"),
        (fdmoe.UnsupportedError, "UNSUPPORTED"),
        (fdmoe.CapacityExceededError, "CAPACITY_EXCEEDED"),
        (fdmoe.NoDeviceError, "NO_DEVICE"),
        (fdmoe.CudaError, "CUDA_ERROR"),
        (fdmoe.NcclError, "NCCL_ERROR"),
        (fdmoe.OutOfMemoryError, "OUT_OF_MEMORY"),
        (fdmoe.InvalidStateError, "INVALID_STATE"),
        (fdmoe.InternalError, "INTERNAL"),
    ]:
        assert issubclass(cls, fdmoe.FdmoeError)
        assert cls.status == status
    assert issubclass(fdmoe.InvalidArgumentError, ValueError)


def test_out_overlapping_x(layer):
    x = x_of(3)
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "overlap"):
        layer.forward(x, out=x)


def test_zero_max_tokens():
    with raises(fdmoe.InvalidArgumentError, "INVALID_ARGUMENT", "max_tokens"):
        make(max_tokens=0)


def test_missing_expert_weights():
    with make() as layer:
        with raises(fdmoe.NullArgumentError, "NULL_ARGUMENT", "w2"):
            layer.load_weights(weights()["w13"], None)
