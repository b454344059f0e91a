"""One randomized test case: fresh inputs, a layer, a forward and its check against the
float64 reference (tests/reference.py), with the tolerances of SPEC §8."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

import fdmoe
import reference as ref

# SPEC §8: relative L2 error by activation dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
# Routing ids must agree wherever the k-th and (k+1)-th scores differ by more than this.
ROUTING_GAP = 1e-4


@dataclass
class Case:
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 24
    intermediate_size: int = 12
    tokens: int = 33
    routing: str = "softmax_topk"
    n_group: int = 1
    topk_group: int = 1
    scoring: str = "sigmoid"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    activation: str = "swiglu"
    latent_size: Optional[int] = None
    num_shared_experts: int = 0
    shared_intermediate_size: Optional[int] = None
    act_dtype: str = "float32"
    weight_dtype: str = "float32"
    layout: str = "torch"
    # Routing source: the loaded gate ("gate") or router logits passed to forward ("logits").
    source: str = "gate"
    correction_bias: bool = False
    seed: int = 0
    # Pass weights to load_weights already in weight_dtype (bfloat16/float16 arrays) instead of
    # float32 arrays the library rounds.
    weights_as_dtype: bool = False
    # Pass x already in act_dtype instead of float32.
    x_as_dtype: bool = False
    extra: dict = field(default_factory=dict)

    # -- inputs -------------------------------------------------------------------------------

    @property
    def shared_total(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        per = self.shared_intermediate_size or self.intermediate_size
        return self.num_shared_experts * per

    def make_inputs(self, rng: np.random.Generator) -> dict:
        """float32 arrays in the TORCH orientation, weights scaled by 1/sqrt(fan_in)."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        L = self.latent_size or H
        S = self.shared_total

        def mat(*shape):
            return (rng.normal(0.0, 1.0, shape) / np.sqrt(shape[-1])).astype(np.float32)

        d = {
            "x": rng.normal(0.0, 1.0, (self.tokens, H)).astype(np.float32),
            "w13": mat(E, 2 * I, L),
            "w2": mat(E, L, I),
            "gate": mat(E, H),
        }
        if self.latent_size:
            d["fc1"] = mat(L, H)
            d["fc2"] = mat(H, L)
        if S:
            d["shared_w13"] = mat(2 * S, H)
            d["shared_w2"] = mat(H, S)
        if self.correction_bias:
            d["correction_bias"] = rng.normal(0.0, 0.5, (E,)).astype(np.float32)
        if self.source == "logits":
            d["router_logits"] = rng.normal(0.0, 1.5, (self.tokens, E)).astype(np.float32)
        if self.routing == "given":
            d["topk_ids"] = rng.integers(0, E, (self.tokens, self.top_k)).astype(np.int32)
            d["topk_weights"] = rng.uniform(0.1, 1.0, (self.tokens, self.top_k)).astype(np.float32)
        return d

    # -- the layer ----------------------------------------------------------------------------

    def layer(self, **overrides) -> fdmoe.MoELayer:
        kw = dict(
            routing=self.routing, n_group=self.n_group, topk_group=self.topk_group,
            scoring=self.scoring, renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor, activation=self.activation,
            latent_size=self.latent_size, num_shared_experts=self.num_shared_experts,
            shared_intermediate_size=self.shared_intermediate_size, act_dtype=self.act_dtype,
            weight_dtype=self.weight_dtype, max_tokens=max(self.tokens, 1),
        )
        kw.update(overrides)
        return fdmoe.MoELayer(
            self.num_experts, self.top_k, self.hidden_size, self.intermediate_size, **kw
        )

    def load(self, layer: fdmoe.MoELayer, d: dict) -> None:
        names = ["w13", "w2", "fc1", "fc2", "shared_w13", "shared_w2"]
        kw = {}
        for name in names:
            if name in d:
                a = d[name]
                if self.layout == "paddle":
                    a = np.swapaxes(a, -1, -2)
                if self.weights_as_dtype:
                    a = a.astype(ref.NP_DTYPES[self.weight_dtype])
                kw[name] = a
        if self.routing != "given" and self.source == "gate":
            kw["gate"] = d["gate"].T if self.layout == "paddle" else d["gate"]
        if "correction_bias" in d:
            kw["correction_bias"] = d["correction_bias"]
        layer.load_weights(layout=self.layout, **kw)

    def forward(self, layer: fdmoe.MoELayer, d: dict):
        x = d["x"].astype(ref.NP_DTYPES[self.act_dtype]) if self.x_as_dtype else d["x"]
        if self.routing == "given":
            out = layer.forward(x, topk_ids=d["topk_ids"], topk_weights=d["topk_weights"])
            return out, None, None
        return layer.forward(x, router_logits=d.get("router_logits"), return_routing=True)

    # -- the check ----------------------------------------------------------------------------

    def routing_params(self, d: dict) -> ref.Routing:
        return ref.Routing(
            mode=self.routing, top_k=self.top_k, n_group=self.n_group,
            topk_group=self.topk_group, scoring=self.scoring, renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor,
            correction_bias=d.get("correction_bias"),
        )

    def check(self) -> dict:
        """Runs the case and asserts it against the reference; returns what it computed."""
        rng = np.random.default_rng(self.seed)
        d = self.make_inputs(rng)
        with self.layer() as layer:
            self.load(layer, d)
            out, ids, weights = self.forward(layer, d)
        return self.compare(d, out, ids, weights)

    def compare(self, d: dict, out, ids, weights) -> dict:
        T, E, k = self.tokens, self.num_experts, self.top_k
        assert out.shape == (T, self.hidden_size)
        assert out.dtype == ref.NP_DTYPES[self.act_dtype]
        x = ref.round_to(d["x"], self.act_dtype)
        wq = {n: ref.round_to(d[n], self.weight_dtype)
              for n in ("w13", "w2", "fc1", "fc2", "shared_w13", "shared_w2") if n in d}

        if self.routing == "given":
            ids_used, weights_used = d["topk_ids"], d["topk_weights"].astype(np.float64)
        else:
            assert ids.shape == (T, k) and ids.dtype == np.int32
            assert weights.shape == (T, k) and weights.dtype == np.float32
            assert ((ids >= 0) & (ids < E)).all(), ids
            for row in ids:
                assert len(set(row.tolist())) == k, f"repeated expert in {row}"
            if self.source == "logits":
                logits = d["router_logits"].astype(np.float64)
            else:
                # The gate is kept at the precision it was given (float32) and runs on x as the
                # layer received it (rounded to act_dtype).
                logits = x @ d["gate"].astype(np.float64).T
            ref_ids, ref_w, gap = ref.route(logits, self.routing_params(d))
            clear = gap > ROUTING_GAP
            got_sorted = np.sort(ids, axis=1)
            want_sorted = np.sort(ref_ids, axis=1)
            bad = np.nonzero(clear & (got_sorted != want_sorted).any(axis=1))[0]
            assert bad.size == 0, (
                f"routing differs on tokens {bad[:5]}: got {ids[bad[:5]]}, want {ref_ids[bad[:5]]}"
            )
            # Weights, matched by expert id, on tokens whose routing is clear.
            go = np.argsort(ids, axis=1)
            wo = np.argsort(ref_ids, axis=1)
            np.testing.assert_allclose(
                np.take_along_axis(weights, go, 1)[clear],
                np.take_along_axis(ref_w, wo, 1)[clear],
                rtol=2e-5, atol=1e-7, err_msg="routing weights",
            )
            if self.routing in ("softmax_topk", "sigmoid_topk") and not clear.all():
                # Where the choice is close, the library's picks must still be near-best.
                s = ref._softmax(logits) if self.routing == "softmax_topk" else ref._sigmoid(logits)
                kth = -np.sort(-s, axis=1)[:, k - 1]
                picked = np.take_along_axis(s, ids.astype(np.int64), 1).min(axis=1)
                assert (picked[~clear] >= kth[~clear] - ROUTING_GAP).all()
            # Near-ties may go either way in float32: score those tokens as the library routed.
            ids_used = np.where(clear[:, None], ref_ids, ids)
            weights_used = np.where(clear[:, None], ref_w, weights.astype(np.float64))

        want = ref.moe(
            x, ids_used, weights_used, wq["w13"], wq["w2"], self.activation,
            wq.get("fc1"), wq.get("fc2"), wq.get("shared_w13"), wq.get("shared_w2"),
        )
        got = out.astype(np.float64)
        assert np.isfinite(got).all(), "non-finite output for finite inputs"
        err = ref.rel_l2(got, want)
        tol = TOLERANCE[self.act_dtype]
        assert err <= tol, f"relative L2 error {err:.3e} > {tol:.0e}"
        return {"out": out, "ids": ids, "weights": weights, "err": err, "inputs": d}
