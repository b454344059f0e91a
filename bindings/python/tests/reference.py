"""An independent float64 numpy reference of SPEC §3, written from the spec (not the library).

Every function takes float64 arrays in the TORCH orientation (nn.Linear [out, in]); tests round
inputs and weights to the layer's dtypes first, so the reference sees exactly the values the
library computes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

import ml_dtypes

GROUPED_RENORM_EPSILON = 1e-20
SWIGLUOAI_LIMIT = 7.0
SWIGLUOAI_ALPHA = 1.702

NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (to nearest even) to `dtype`, returned as float64."""
    return np.asarray(a, dtype=np.float32).astype(NP_DTYPES[dtype]).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Routing.


def _softmax(r: np.ndarray) -> np.ndarray:
    z = np.exp(r - r.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _sigmoid(r: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-r))


def _ranked(values: np.ndarray) -> np.ndarray:
    """Indices by descending value, ties to the lower index (stable sort of the negation)."""
    return np.argsort(-values, axis=-1, kind="stable")


def _gap(sorted_values: np.ndarray, k: int) -> np.ndarray:
    """k-th minus (k+1)-th largest per row (inf when there is no (k+1)-th or it is -inf)."""
    if sorted_values.shape[-1] <= k:
        return np.full(sorted_values.shape[:-1], np.inf)
    with np.errstate(invalid="ignore"):
        g = sorted_values[..., k - 1] - sorted_values[..., k]
    return np.where(np.isneginf(sorted_values[..., k]), np.inf, g)


@dataclass
class Routing:
    mode: str = "softmax_topk"
    top_k: int = 2
    n_group: int = 1
    topk_group: int = 1
    scoring: str = "sigmoid"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    correction_bias: Optional[np.ndarray] = field(default=None, repr=False)


def route(logits: np.ndarray, p: Routing):
    """(ids [T, k] best first, weights [T, k], gap [T]) for router logits [T, E].

    `gap` is how far apart the last chosen and the first rejected candidate are (in the score
    that ranks them; for grouped top-k also the group scores): where it is tiny, float32 and
    float64 may legitimately choose differently.
    """
    r = np.asarray(logits, dtype=np.float64)
    T, E = r.shape
    k = p.top_k
    if p.mode in ("softmax_topk", "sigmoid_topk"):
        s = _softmax(r) if p.mode == "softmax_topk" else _sigmoid(r)
        order = _ranked(s)
        ids = order[:, :k]
        w = np.take_along_axis(s, ids, axis=1)
        gap = _gap(np.take_along_axis(s, order, axis=1), k)
        if p.renormalize:
            w = w / w.sum(axis=1, keepdims=True)
    elif p.mode == "grouped_topk":
        s = _softmax(r) if p.scoring == "softmax" else _sigmoid(r)
        c = s if p.correction_bias is None else s + np.asarray(p.correction_bias, np.float64)
        G = p.n_group
        grouped = c.reshape(T, G, E // G)
        grouped_sorted = -np.sort(-grouped, axis=2)
        if p.correction_bias is not None:
            group_score = grouped_sorted[:, :, : min(2, E // G)].sum(axis=2)
        else:
            group_score = grouped_sorted[:, :, 0]
        group_order = _ranked(group_score)
        kept = group_order[:, : p.topk_group]
        keep = np.zeros((T, G), dtype=bool)
        np.put_along_axis(keep, kept, True, axis=1)
        masked = np.where(np.repeat(keep, E // G, axis=1), c, -np.inf)
        order = _ranked(masked)
        ids = order[:, :k]
        w = np.take_along_axis(s, ids, axis=1)
        gap = np.minimum(
            _gap(np.take_along_axis(masked, order, axis=1), k),
            _gap(np.take_along_axis(group_score, group_order, axis=1), p.topk_group),
        )
        if p.renormalize:
            w = w / (w.sum(axis=1, keepdims=True) + GROUPED_RENORM_EPSILON)
    else:
        raise ValueError(f"no reference routing for mode {p.mode!r}")
    return ids.astype(np.int32), w * p.routed_scaling_factor, gap


# ---------------------------------------------------------------------------------------------
# Experts.


def activate(name: str, g: np.ndarray, v: np.ndarray) -> np.ndarray:
    if name == "swiglu":
        return g * _sigmoid(g) * v
    if name == "gelu_tanh_and_mul":
        gelu = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3)))
        return gelu * v
    if name == "swigluoai":
        gc = np.minimum(g, SWIGLUOAI_LIMIT)
        vc = np.clip(v, -SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
        return (vc + 1.0) * gc * _sigmoid(SWIGLUOAI_ALPHA * gc)
    raise ValueError(f"no reference activation {name!r}")


def moe(
    x: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    w13: np.ndarray,
    w2: np.ndarray,
    activation: str = "swiglu",
    fc1: Optional[np.ndarray] = None,
    fc2: Optional[np.ndarray] = None,
    shared_w13: Optional[np.ndarray] = None,
    shared_w2: Optional[np.ndarray] = None,
) -> np.ndarray:
    """out [T, H] for x [T, H], ids/weights [T, k], w13 [E, 2I, L], w2 [E, L, I] (float64)."""
    x = np.asarray(x, np.float64)
    I = w13.shape[1] // 2
    u = x @ fc1.T if fc1 is not None else x  # [T, L]
    h = np.einsum("tkol,tl->tko", w13[ids], u)  # [T, k, 2I]
    a = activate(activation, h[..., :I], h[..., I:])  # [T, k, I]
    y = np.einsum("tkli,tki->tkl", w2[ids], a)  # [T, k, L]
    z = np.einsum("tk,tkl->tl", np.asarray(weights, np.float64), y)
    out = z @ fc2.T if fc2 is not None else z
    if shared_w13 is not None:
        S = shared_w13.shape[0] // 2
        hs = x @ shared_w13.T
        out = out + activate(activation, hs[:, :S], hs[:, S:]) @ shared_w2.T
    return out


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
