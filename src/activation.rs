//! The gated activations of SPEC §3, in f32: `a = act(g) * v` over the gate and up halves.

use crate::config::FdmoeActivation;

/// gpt-oss clamps the gate from above and the up projection on both sides at this limit.
const SWIGLUOAI_LIMIT: f32 = 7.0;
/// gpt-oss's sigmoid sharpness.
const SWIGLUOAI_ALPHA: f32 = 1.702;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// Overwrites `gate` with `act(gate) * up`, element by element.
pub fn apply_gated(activation: FdmoeActivation, gate: &mut [f32], up: &[f32]) {
    match activation {
        FdmoeActivation::Swiglu => gate
            .iter_mut()
            .zip(up)
            .for_each(|(g, &v)| *g = *g * sigmoid(*g) * v),
        FdmoeActivation::GeluTanhAndMul => gate
            .iter_mut()
            .zip(up)
            .for_each(|(g, &v)| *g = gelu_tanh(*g) * v),
        FdmoeActivation::Swigluoai => gate.iter_mut().zip(up).for_each(|(g, &v)| {
            let gc = g.min(SWIGLUOAI_LIMIT);
            let vc = v.clamp(-SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT);
            *g = (vc + 1.0) * gc * sigmoid(SWIGLUOAI_ALPHA * gc);
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let mut g = [1.0f32, -2.0, 10.0];
        apply_gated(FdmoeActivation::Swiglu, &mut g, &[2.0, 1.0, 1.0]);
        assert!((g[0] - 2.0 * 0.731_058_6).abs() < 1e-6);
        assert!((g[1] - (-2.0 * 0.119_202_92)).abs() < 1e-6);
        let mut g = [1.0f32];
        apply_gated(FdmoeActivation::GeluTanhAndMul, &mut g, &[3.0]);
        assert!((g[0] - 3.0 * 0.841_191_9).abs() < 1e-5);
        // Clamps: gate 10 -> 7, up 9 -> 7.
        let mut g = [10.0f32];
        apply_gated(FdmoeActivation::Swigluoai, &mut g, &[9.0]);
        let expect = 8.0 * 7.0 * (1.0 / (1.0 + (-1.702f32 * 7.0).exp()));
        assert!((g[0] - expect).abs() < 1e-4);
    }
}
