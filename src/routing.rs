//! Routing reference (SPEC §3): from one token's router logits to its top-k expert ids and
//! weights. Everything is f32; ties go to the lower expert index and NaN ranks below every
//! other value, so ids always stay in [0, E) whatever the logits hold.

use crate::config::{FdmoeRouting, FdmoeScoring, MoeConfig};

/// Added to the grouped-top-k renormalisation denominator, as DeepSeek-V3's reference does.
const GROUPED_RENORM_EPSILON: f32 = 1e-20;

/// The routing half of a `MoeConfig`, copied out so the per-token loop reads plain fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingParams {
    pub mode: FdmoeRouting,
    pub scoring: FdmoeScoring,
    pub num_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub renormalize: bool,
    pub routed_scaling_factor: f32,
}

impl RoutingParams {
    pub fn from_config(cfg: &MoeConfig) -> Self {
        RoutingParams {
            mode: cfg.routing,
            scoring: cfg.scoring,
            num_experts: cfg.num_experts,
            top_k: cfg.top_k,
            n_group: cfg.n_group.max(1),
            topk_group: cfg.topk_group.max(1),
            renormalize: cfg.renormalize,
            routed_scaling_factor: cfg.routed_scaling_factor,
        }
    }

    /// Scratch floats `route_token` needs.
    pub fn scratch_len(&self) -> usize {
        2 * self.num_experts + self.n_group
    }

    /// Routes one token. `logits` has E values; `bias` (grouped top-k only) has E values.
    /// Writes `top_k` ids and weights. Not valid for `GIVEN`, which has no logits.
    pub fn route_token(
        &self,
        logits: &[f32],
        bias: Option<&[f32]>,
        scratch: &mut [f32],
        ids: &mut [i32],
        weights: &mut [f32],
    ) {
        let e = self.num_experts;
        debug_assert_eq!(logits.len(), e);
        let (scores, rest) = scratch.split_at_mut(e);
        let (choice, group_scores) = rest.split_at_mut(e);
        match self.mode {
            FdmoeRouting::SoftmaxTopk => {
                softmax(logits, scores);
                top_k_into(scores, |_| true, ids);
                gather(scores, ids, weights);
                if self.renormalize {
                    renormalize(weights, 0.0);
                }
            }
            FdmoeRouting::SigmoidTopk => {
                sigmoid(logits, scores);
                top_k_into(scores, |_| true, ids);
                gather(scores, ids, weights);
                if self.renormalize {
                    renormalize(weights, 0.0);
                }
            }
            FdmoeRouting::GroupedTopk => {
                match self.scoring {
                    FdmoeScoring::Sigmoid => sigmoid(logits, scores),
                    FdmoeScoring::Softmax => softmax(logits, scores),
                }
                match bias {
                    Some(b) => choice
                        .iter_mut()
                        .zip(scores.iter().zip(b))
                        .for_each(|(c, (s, b))| *c = s + b),
                    None => choice.copy_from_slice(scores),
                }
                let group_size = e / self.n_group;
                let group_scores = &mut group_scores[..self.n_group];
                for (g, score) in group_scores.iter_mut().enumerate() {
                    let members = &choice[g * group_size..(g + 1) * group_size];
                    *score = if bias.is_some() {
                        sum_of_top_two(members)
                    } else {
                        best_of(members)
                    };
                }
                let mut kept_groups = [0i32; 64];
                let mut kept_heap;
                let kept: &mut [i32] = if self.topk_group <= kept_groups.len() {
                    &mut kept_groups[..self.topk_group]
                } else {
                    kept_heap = vec![0i32; self.topk_group];
                    &mut kept_heap
                };
                top_k_into(group_scores, |_| true, kept);
                let in_kept_group = |expert: usize| kept.contains(&((expert / group_size) as i32));
                top_k_into(choice, in_kept_group, ids);
                gather(scores, ids, weights);
                if self.renormalize {
                    renormalize(weights, GROUPED_RENORM_EPSILON);
                }
            }
            FdmoeRouting::Given => unreachable!("GIVEN routing has no logits to route"),
        }
        if self.routed_scaling_factor != 1.0 {
            weights
                .iter_mut()
                .for_each(|w| *w *= self.routed_scaling_factor);
        }
    }
}

/// True when `(a, ia)` ranks above `(b, ib)`: larger value, NaN lowest, then lower index.
#[inline]
fn ranks_above(a: f32, ia: usize, b: f32, ib: usize) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (false, true) => true,
        (true, false) => false,
        (true, true) => ia < ib,
        (false, false) => a > b || (a == b && ia < ib),
    }
}

/// Writes the indices of the `out.len()` best values among those `eligible`, best first.
fn top_k_into(values: &[f32], eligible: impl Fn(usize) -> bool, out: &mut [i32]) {
    let k = out.len();
    let mut filled = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if !eligible(i) {
            continue;
        }
        if filled == k {
            let last = out[k - 1] as usize;
            if !ranks_above(v, i, values[last], last) {
                continue;
            }
            filled -= 1;
        }
        let mut pos = filled;
        while pos > 0 {
            let prev = out[pos - 1] as usize;
            if ranks_above(v, i, values[prev], prev) {
                out[pos] = out[pos - 1];
                pos -= 1;
            } else {
                break;
            }
        }
        out[pos] = i as i32;
        filled += 1;
    }
    debug_assert_eq!(
        filled, k,
        "fewer eligible experts than top_k (validated at create)"
    );
}

fn best_of(values: &[f32]) -> f32 {
    let mut best = 0usize;
    for i in 1..values.len() {
        if ranks_above(values[i], i, values[best], best) {
            best = i;
        }
    }
    values[best]
}

/// Sum of the two best values; a group of one expert scores its single value.
fn sum_of_top_two(values: &[f32]) -> f32 {
    if values.len() == 1 {
        return values[0];
    }
    let mut top = [0i32; 2];
    top_k_into(values, |_| true, &mut top);
    values[top[0] as usize] + values[top[1] as usize]
}

fn softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

fn sigmoid(logits: &[f32], out: &mut [f32]) {
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = 1.0 / (1.0 + (-l).exp());
    }
}

fn gather(scores: &[f32], ids: &[i32], weights: &mut [f32]) {
    for (w, &id) in weights.iter_mut().zip(ids) {
        *w = scores[id as usize];
    }
}

fn renormalize(weights: &mut [f32], epsilon: f32) {
    let sum: f32 = weights.iter().sum::<f32>() + epsilon;
    weights.iter_mut().for_each(|w| *w /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: FdmoeRouting, e: usize, k: usize) -> RoutingParams {
        RoutingParams {
            mode,
            scoring: FdmoeScoring::Sigmoid,
            num_experts: e,
            top_k: k,
            n_group: 1,
            topk_group: 1,
            renormalize: false,
            routed_scaling_factor: 1.0,
        }
    }

    fn run(p: &RoutingParams, logits: &[f32], bias: Option<&[f32]>) -> (Vec<i32>, Vec<f32>) {
        let mut scratch = vec![0.0; p.scratch_len()];
        let mut ids = vec![-1; p.top_k];
        let mut w = vec![0.0; p.top_k];
        p.route_token(logits, bias, &mut scratch, &mut ids, &mut w);
        (ids, w)
    }

    #[test]
    fn softmax_topk_orders_and_renormalizes() {
        let mut p = params(FdmoeRouting::SoftmaxTopk, 4, 2);
        let logits = [0.5f32, 2.0, -1.0, 1.0];
        let (ids, w) = run(&p, &logits, None);
        assert_eq!(ids, vec![1, 3]);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((w[0] as f64 - 2f64.exp() / z).abs() < 1e-6);
        p.renormalize = true;
        p.routed_scaling_factor = 2.5;
        let (_, w) = run(&p, &logits, None);
        let expect0 = 2f64.exp() / (2f64.exp() + 1f64.exp()) * 2.5;
        assert!((w[0] as f64 - expect0).abs() < 1e-6);
    }

    #[test]
    fn ties_go_to_the_lower_index_and_nan_ranks_last() {
        let p = params(FdmoeRouting::SigmoidTopk, 5, 3);
        assert_eq!(run(&p, &[1.0; 5], None).0, vec![0, 1, 2]);
        let (ids, _) = run(
            &p,
            &[f32::NAN, -1.0, f32::NAN, 3.0, f32::NEG_INFINITY],
            None,
        );
        assert_eq!(ids, vec![3, 1, 4]);
        let (ids, _) = run(&p, &[f32::NAN; 5], None);
        assert_eq!(ids, vec![0, 1, 2]);
        let p = params(FdmoeRouting::SoftmaxTopk, 5, 2);
        let (ids, _) = run(&p, &[f32::INFINITY, 0.0, f32::NAN, 1.0, 2.0], None);
        assert!(ids.iter().all(|&i| (0..5).contains(&i)));
    }

    #[test]
    fn grouped_topk_keeps_best_groups() {
        // 8 experts in 4 groups of 2; keep 2 groups; pick 2 experts.
        let mut p = params(FdmoeRouting::GroupedTopk, 8, 2);
        p.n_group = 4;
        p.topk_group = 2;
        p.renormalize = true;
        // Without bias the group score is the max: groups 1 (expert 3) and 3 (expert 6) win,
        // although expert 4 (group 2) is the second-largest overall only after expert 3.
        let logits = [0.0f32, 0.1, 0.2, 3.0, 2.0, 0.0, 2.5, -5.0];
        let (ids, w) = run(&p, &logits, None);
        assert_eq!(ids, vec![3, 6]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let total = s(3.0) + s(2.5);
        assert!((w[0] - s(3.0) / total).abs() < 1e-6);
        // With a bias the group score sums the two best biased scores and weights stay unbiased.
        let bias = [0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0];
        let (ids, w) = run(&p, &logits, Some(&bias));
        assert_eq!(ids, vec![7, 3]);
        let total = s(-5.0) + s(3.0);
        assert!((w[0] - s(-5.0) / total).abs() < 1e-6);
    }
}
