"""Forward against the float64 reference: every routing mode (with and without latent), shared
experts, both layouts, each activation, every act/weight dtype pair, odd sizes."""

import itertools
import zlib

import numpy as np
import pytest

from moe_case import Case

# name -> routing settings (E = 8 throughout unless a case says otherwise).
ROUTINGS = {
    "softmax": dict(routing="softmax_topk"),
    "softmax_norenorm_scaled": dict(routing="softmax_topk", renormalize=False, routed_scaling_factor=2.5),
    "sigmoid": dict(routing="sigmoid_topk", top_k=3),
    "sigmoid_norenorm": dict(routing="sigmoid_topk", renormalize=False),
    "grouped": dict(routing="grouped_topk", n_group=4, topk_group=2, top_k=3),
    "grouped_bias": dict(routing="grouped_topk", n_group=4, topk_group=2, top_k=3, correction_bias=True,
                         routed_scaling_factor=2.5),
    "grouped_softmax": dict(routing="grouped_topk", n_group=2, topk_group=1, top_k=2, scoring="softmax"),
    "grouped_softmax_bias_norenorm": dict(routing="grouped_topk", n_group=4, topk_group=3, top_k=4,
                                          scoring="softmax", correction_bias=True, renormalize=False),
    "grouped_one_group": dict(routing="grouped_topk", n_group=1, topk_group=1, top_k=2, correction_bias=True),
    "given": dict(routing="given", top_k=3),
}


@pytest.mark.parametrize("latent", [None, 10], ids=["dense", "latent"])
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_routing_modes(name, latent):
    seed = zlib.crc32(f"{name}/{latent}".encode())
    Case(latent_size=latent, seed=seed, **ROUTINGS[name]).check()


@pytest.mark.parametrize("name", [n for n in ROUTINGS if n != "given"])
def test_routing_from_router_logits(name):
    Case(source="logits", seed=101 + len(name), **ROUTINGS[name]).check()


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh_and_mul", "swigluoai"])
@pytest.mark.parametrize("shared", [0, 1, 2], ids=["no_shared", "one_shared", "two_shared"])
def test_activations_and_shared_experts(activation, shared):
    Case(activation=activation, num_shared_experts=shared, shared_intermediate_size=7,
         seed=7 * shared + len(activation)).check()


def test_swigluoai_clamps_are_exercised():
    # Large weights push g above 7 and v outside [-7, 7], so the clamps matter.
    case = Case(activation="swigluoai", seed=5, tokens=16)
    rng = np.random.default_rng(case.seed)
    d = case.make_inputs(rng)
    d["w13"] *= 12.0
    with case.layer() as layer:
        case.load(layer, d)
        out, ids, w = case.forward(layer, d)
    h = np.einsum("eol,tl->teo", d["w13"].astype(np.float64), d["x"].astype(np.float64))
    assert (h > 7).any() and (h < -7).any()
    case.compare(d, out, ids, w)


@pytest.mark.parametrize("layout", ["torch", "paddle"])
@pytest.mark.parametrize("routing", ["softmax", "grouped_bias", "given"])
def test_layouts(layout, routing):
    Case(layout=layout, latent_size=16, num_shared_experts=1, shared_intermediate_size=6,
         seed=11 if layout == "torch" else 12, **ROUTINGS[routing]).check()


def test_layouts_agree():
    base = dict(latent_size=12, num_shared_experts=2, shared_intermediate_size=5, seed=3)
    a = Case(layout="torch", **base).check()["out"]
    b = Case(layout="paddle", **base).check()["out"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


DTYPES = ["float32", "bfloat16", "float16"]


@pytest.mark.parametrize("act_dtype,weight_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_dtypes(act_dtype, weight_dtype):
    Case(act_dtype=act_dtype, weight_dtype=weight_dtype, num_shared_experts=1,
         seed=DTYPES.index(act_dtype) * 3 + DTYPES.index(weight_dtype)).check()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_arrays_taken_as_is(dtype):
    # Weights and x already in the low-precision type, with latent and shared experts.
    Case(act_dtype=dtype, weight_dtype=dtype, weights_as_dtype=True, x_as_dtype=True,
         latent_size=16, num_shared_experts=1, routing="grouped_topk", n_group=4, topk_group=2,
         top_k=2, correction_bias=True, seed=21).check()


def test_bfloat16_weights_into_float32_layer():
    # bfloat16 arrays are exact in float32: the layer computes from the same values.
    case = Case(weight_dtype="bfloat16", seed=22)
    rng = np.random.default_rng(case.seed)
    d = case.make_inputs(rng)
    import ml_dtypes
    with case.layer(weight_dtype="float32") as layer:
        layer.load_weights(d["w13"].astype(ml_dtypes.bfloat16), d["w2"].astype(ml_dtypes.bfloat16),
                           gate=d["gate"])
        out, ids, w = layer.forward(d["x"], return_routing=True)
    case.compare(d, out, ids, w)


def test_mixed_weight_dtypes_are_widened():
    # w13 bfloat16 and w2 float32 in one call: the binding widens both to float32.
    import ml_dtypes
    case = Case(weight_dtype="bfloat16", seed=23)
    rng = np.random.default_rng(case.seed)
    d = case.make_inputs(rng)
    d["w2"] = d["w2"].astype(ml_dtypes.bfloat16).astype(np.float32)
    with case.layer() as layer:
        layer.load_weights(d["w13"].astype(ml_dtypes.bfloat16), d["w2"], gate=d["gate"])
        out, ids, w = layer.forward(d["x"], return_routing=True)
    case.compare(d, out, ids, w)


ODD = dict(num_experts=3, top_k=3, hidden_size=37, intermediate_size=5)


@pytest.mark.parametrize("tokens", [1, 2, 19])
@pytest.mark.parametrize("routing", ["softmax", "sigmoid", "grouped", "given"])
def test_odd_sizes(routing, tokens):
    r = dict(ROUTINGS[routing])
    r.pop("top_k", None)
    if routing == "grouped":
        r.update(n_group=3, topk_group=3, correction_bias=True)
    Case(tokens=tokens, latent_size=7, num_shared_experts=1, shared_intermediate_size=3,
         seed=tokens * 10 + len(routing), **ODD, **r).check()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_odd_sizes_low_precision(dtype):
    Case(tokens=1, act_dtype=dtype, weight_dtype=dtype, seed=31, **ODD).check()


def test_top1_single_expert():
    Case(num_experts=1, top_k=1, hidden_size=9, intermediate_size=3, tokens=4, seed=41).check()


def test_many_tokens_more_than_one_task_per_expert():
    # More rows per expert than one CPU task takes (128), so experts split across tasks.
    Case(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, tokens=300, seed=51).check()


def test_zero_tokens():
    case = Case()
    rng = np.random.default_rng(0)
    d = case.make_inputs(rng)
    with case.layer() as layer:
        case.load(layer, d)
        out, ids, w = layer.forward(np.empty((0, case.hidden_size), np.float32), return_routing=True)
    assert out.shape == (0, case.hidden_size) and ids.shape == (0, case.top_k) and w.shape == (0, case.top_k)


def test_forward_writes_every_element_of_out():
    case = Case(act_dtype="bfloat16", latent_size=10, num_shared_experts=1, seed=61)
    rng = np.random.default_rng(case.seed)
    d = case.make_inputs(rng)
    with case.layer() as layer:
        case.load(layer, d)
        poison = np.full((case.tokens, case.hidden_size), np.nan, dtype=layer.act_dtype)
        result = layer.forward(d["x"], out=poison)
    assert result is poison
    assert np.isfinite(poison.astype(np.float32)).all()
    case.compare(d, poison, *layer_free_routing(case, d))


def layer_free_routing(case, d):
    """Routing of a fresh identical layer (for checks that ran forward without the record)."""
    with case.layer() as layer:
        case.load(layer, d)
        _, ids, w = layer.forward(d["x"], return_routing=True)
    return ids, w


def test_accepts_non_contiguous_and_float64_inputs():
    case = Case(seed=71)
    rng = np.random.default_rng(case.seed)
    d = case.make_inputs(rng)
    with case.layer() as layer:
        # Fortran-ordered float64 weights and a strided x view.
        layer.load_weights(np.asfortranarray(d["w13"].astype(np.float64)), d["w2"][:, :, :],
                           gate=d["gate"].T.copy().T)
        wide = np.repeat(d["x"], 2, axis=1)[:, ::2]
        assert not wide.flags.c_contiguous
        out, ids, w = layer.forward(wide, return_routing=True)
    case.compare(d, out, ids, w)


def test_layers_run_concurrently_from_threads():
    # ctypes releases the GIL during each call; different layers may run at once.
    import threading

    cases = [Case(seed=s, tokens=64, latent_size=8) for s in range(4)]
    expected = [c.check()["out"] for c in cases]
    results = [None] * len(cases)

    def work(i):
        c = cases[i]
        d = c.make_inputs(np.random.default_rng(c.seed))
        with c.layer() as layer:
            c.load(layer, d)
            for _ in range(3):
                results[i] = c.forward(layer, d)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert got.tobytes() == want.tobytes()
