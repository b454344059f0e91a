"""Routing semantics beyond the randomized comparisons: ties, the routing record and its
replay, determinism, and non-finite inputs."""

import numpy as np
import pytest

from moe_case import Case

MODES = {
    "softmax": dict(routing="softmax_topk"),
    "sigmoid": dict(routing="sigmoid_topk"),
    "grouped": dict(routing="grouped_topk", n_group=4, topk_group=2),
    "grouped_bias": dict(routing="grouped_topk", n_group=4, topk_group=2, correction_bias=True),
    "grouped_softmax": dict(routing="grouped_topk", n_group=2, topk_group=2, scoring="softmax"),
}


def loaded(case, seed=0, **layer_kw):
    rng = np.random.default_rng(seed)
    d = case.make_inputs(rng)
    layer = case.layer(**layer_kw)
    case.load(layer, d)
    return layer, d


@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "grouped", "grouped_softmax"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_equal_logits_pick_the_lowest_indices(mode, top_k):
    case = Case(top_k=top_k, tokens=5, source="logits", **MODES[mode])
    layer, d = loaded(case, seed=top_k)
    with layer:
        logits = np.full((case.tokens, case.num_experts), 0.37, np.float32)
        logits[1] = -2.0
        logits[2] = 15.0
        out, ids, w = layer.forward(d["x"], router_logits=logits, return_routing=True)
    for row in ids:
        assert sorted(row.tolist()) == list(range(top_k)), ids
    np.testing.assert_allclose(w, np.full_like(w, 1.0 / top_k), rtol=1e-6)
    assert np.isfinite(out).all()


def test_equal_biased_scores_pick_the_lowest_indices():
    # Equal logits and equal bias: every group and expert ties.
    case = Case(top_k=3, tokens=3, source="logits", routing="grouped_topk", n_group=4, topk_group=2)
    rng = np.random.default_rng(3)
    d = case.make_inputs(rng)
    with case.layer() as layer:
        case.load(layer, dict(d, correction_bias=np.full(case.num_experts, 0.25, np.float32)))
        logits = np.full((case.tokens, case.num_experts), -0.5, np.float32)
        _, ids, _ = layer.forward(d["x"], router_logits=logits, return_routing=True)
    for row in ids:
        assert sorted(row.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "grouped"])
def test_partial_ties_choose_the_lower_index(mode):
    case = Case(top_k=2, tokens=2, source="logits", **MODES[mode])
    layer, d = loaded(case)
    with layer:
        logits = np.zeros((2, 8), np.float32) - 1.0
        logits[0, [6, 2, 5]] = 3.0  # three-way tie for two places: 2 and 5
        logits[1, [7, 4]] = 2.0
        logits[1, 1] = 2.5  # 1 first, then 4 over 7
        _, ids, _ = layer.forward(d["x"], router_logits=logits, return_routing=True)
    # grouped (groups of 2, keep 2): tied group maxima also go to the lower group.
    assert sorted(ids[0].tolist()) == [2, 5]
    assert sorted(ids[1].tolist()) == [1, 4]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("act_dtype", ["float32", "bfloat16"])
def test_record_then_replay_is_bitwise_identical(mode, act_dtype):
    case = Case(tokens=40, latent_size=12, num_shared_experts=1, act_dtype=act_dtype,
                weight_dtype=act_dtype, **MODES[mode])
    layer, d = loaded(case, seed=len(mode))
    with layer:
        out, ids, w = layer.forward(d["x"], return_routing=True)
        replay = layer.forward(d["x"], topk_ids=ids, topk_weights=w)
        # The record of a replay is the replayed routing.
        replay2, ids2, w2 = layer.forward(d["x"], topk_ids=ids, topk_weights=w, return_routing=True)
    assert out.tobytes() == replay.tobytes() == replay2.tobytes()
    assert (ids2 == ids).all() and w2.tobytes() == w.tobytes()
    # A routing="given" layer with the same weights reproduces it too.
    given = Case(**dict(case.__dict__, routing="given", n_group=1, topk_group=1, correction_bias=False))
    with given.layer() as g:
        given.load(g, {k: v for k, v in d.items() if k != "correction_bias"})
        again = g.forward(d["x"], topk_ids=ids, topk_weights=w)
    assert again.tobytes() == out.tobytes()


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_is_deterministic(mode):
    case = Case(tokens=64, latent_size=10, num_shared_experts=2, act_dtype="bfloat16", **MODES[mode])
    layer, d = loaded(case, seed=9)
    with layer:
        a = layer.forward(d["x"], return_routing=True)
        b = layer.forward(d["x"], return_routing=True)
    for u, v in zip(a, b):
        assert u.tobytes() == v.tobytes()
    # A second layer with the same weights gives the same bits.
    layer2, _ = loaded(case, seed=9)
    with layer2:
        c = layer2.forward(d["x"], return_routing=True)
    for u, v in zip(a, c):
        assert u.tobytes() == v.tobytes()


def test_given_routing_weights_are_used_as_given():
    # Repeated ids in one token and weights that do not sum to one are taken literally.
    case = Case(routing="given", tokens=4, top_k=3, seed=5)
    rng = np.random.default_rng(5)
    d = case.make_inputs(rng)
    d["topk_ids"][0] = [2, 2, 2]
    d["topk_weights"][1] = [3.0, -1.0, 0.0]
    with case.layer() as layer:
        case.load(layer, d)
        out, _, _ = case.forward(layer, d)
    case.compare(d, out, None, None)


@pytest.mark.parametrize("mode", list(MODES))
def test_non_finite_x_and_logits_stay_in_range(mode):
    case = Case(tokens=8, top_k=2, **MODES[mode])
    layer, d = loaded(case, seed=13)
    E = case.num_experts
    with layer:
        x = d["x"].copy()
        x[0, 3] = np.nan
        x[1, :] = np.nan
        x[2, 0] = np.inf
        x[3, 5] = -np.inf
        out, ids, w = layer.forward(x, return_routing=True)
        assert out.shape == x.shape
        assert ((ids >= 0) & (ids < E)).all()
        # Tokens with finite x are unaffected by their neighbours.
        ok = np.isfinite(x).all(axis=1)
        ref_out, ref_ids, ref_w = layer.forward(x[ok], return_routing=True)
        assert (ids[ok] == ref_ids).all()
        np.testing.assert_array_equal(out[ok], ref_out)

        logits = np.random.default_rng(1).normal(size=(8, E)).astype(np.float32)
        logits[0, :] = np.nan
        logits[1, 2] = np.nan
        logits[2, 4] = np.inf
        logits[3, :] = np.inf
        logits[4, 1] = -np.inf
        logits[5, :] = -np.inf
        logits[6, [0, 5]] = [np.inf, -np.inf]
        out, ids, w = layer.forward(d["x"], router_logits=logits, return_routing=True)
        assert ((ids >= 0) & (ids < E)).all(), ids
        for row in ids:
            assert len(set(row.tolist())) == case.top_k
        # NaN ranks below every finite value: token 1 never picks expert 2 (6 finite remain).
        assert 2 not in ids[1]
        assert np.isfinite(out[7]).all()


def test_near_ties_are_scored_as_the_library_routed():
    # Experts 0 and 1 differ by 1e-6 in logit: either may win in float32; the output must match
    # the reference for whichever the library picked.
    case = Case(source="logits", top_k=1, tokens=20, seed=17)
    rng = np.random.default_rng(case.seed)
    d = case.make_inputs(rng)
    d["router_logits"][:, 0] = 5.0
    d["router_logits"][:, 1] = 5.0 + 1e-6
    with case.layer() as layer:
        case.load(layer, d)
        out, ids, w = case.forward(layer, d)
    assert set(ids.ravel().tolist()) <= {0, 1}
    case.compare(d, out, ids, w)


def test_tiny_sizes():
    Case(num_experts=1, top_k=1, hidden_size=1, intermediate_size=1, tokens=3, latent_size=1,
         num_shared_experts=1, shared_intermediate_size=1, seed=19).check()
    Case(num_experts=2, top_k=1, hidden_size=1, intermediate_size=1, tokens=1, routing="grouped_topk",
         n_group=2, topk_group=1, correction_bias=True, seed=20).check()
