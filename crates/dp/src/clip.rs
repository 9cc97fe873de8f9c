//! Per-client L2 clipping of the update that is sent (protocol-spec §7.1).

use serde::Serialize;

/// Errors of the clipping module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClipError {
    /// The clipping norm was NaN, infinite, zero or negative.
    #[error("clip norm must be finite and positive, got {0}")]
    InvalidNorm(f64),
    /// The update held a NaN or infinite value (at this flat index across all tensors).
    #[error("update value at index {0} is not finite")]
    NonFiniteValue(usize),
}

/// What clipping did to one client's update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClipReport {
    /// L2 norm of the update before clipping.
    pub norm_before: f64,
    /// L2 norm after clipping (at most the clip norm).
    pub norm_after: f64,
    /// Whether the update was scaled down.
    pub clipped: bool,
    /// The factor applied to every value (1 when not clipped).
    pub scale: f64,
}

/// Scales `values` so their L2 norm is at most `max_norm` (one tensor, or the flattened update).
///
/// Implements per-client clipping (protocol-spec §7.1).
pub fn clip_l2(values: &mut [f32], max_norm: f64) -> Result<ClipReport, ClipError> {
    clip_l2_many(&mut [values], max_norm)
}

/// Scales several tensors (e.g. LoRA A and B) jointly so that the L2 norm of their concatenation
/// is at most `max_norm`. The norm is accumulated in f64; after scaling, the f32 rounding is
/// checked and the factor nudged down so the bound holds for the values actually sent.
///
/// Implements per-client clipping over the tensors that are sent (protocol-spec §7.1).
pub fn clip_l2_many(tensors: &mut [&mut [f32]], max_norm: f64) -> Result<ClipReport, ClipError> {
    if !max_norm.is_finite() || max_norm <= 0.0 {
        return Err(ClipError::InvalidNorm(max_norm));
    }
    let mut sq = 0.0f64;
    let mut index = 0usize;
    for t in tensors.iter() {
        for &v in t.iter() {
            if !v.is_finite() {
                return Err(ClipError::NonFiniteValue(index));
            }
            sq += f64::from(v) * f64::from(v);
            index += 1;
        }
    }
    let norm_before = sq.sqrt();
    if norm_before <= max_norm {
        return Ok(ClipReport {
            norm_before,
            norm_after: norm_before,
            clipped: false,
            scale: 1.0,
        });
    }
    let mut scale = max_norm / norm_before;
    let originals: Vec<Vec<f32>> = tensors.iter().map(|t| t.to_vec()).collect();
    loop {
        let mut sq_after = 0.0f64;
        for (t, orig) in tensors.iter_mut().zip(&originals) {
            for (v, &o) in t.iter_mut().zip(orig) {
                *v = (f64::from(o) * scale) as f32;
                sq_after += f64::from(*v) * f64::from(*v);
            }
        }
        let norm_after = sq_after.sqrt();
        if norm_after <= max_norm {
            return Ok(ClipReport {
                norm_before,
                norm_after,
                clipped: true,
                scale,
            });
        }
        // f32 rounding pushed the norm over by a few ulps: shrink slightly and redo.
        scale *= 1.0 - 4.0 * f64::from(f32::EPSILON);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_update_untouched() {
        let mut v = vec![0.3f32, 0.4];
        let r = clip_l2(&mut v, 1.0).unwrap();
        assert!(!r.clipped);
        assert_eq!(v, vec![0.3, 0.4]);
        assert!((r.norm_before - 0.5).abs() < 1e-7);
    }

    #[test]
    fn large_update_scaled_to_norm() {
        let mut v = vec![3.0f32, 4.0];
        let r = clip_l2(&mut v, 1.0).unwrap();
        assert!(r.clipped);
        assert!((r.norm_before - 5.0).abs() < 1e-12);
        assert!(r.norm_after <= 1.0 && r.norm_after > 1.0 - 1e-6);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn joint_norm_over_a_and_b() {
        let mut a = vec![3.0f32];
        let mut b = vec![4.0f32];
        let r = clip_l2_many(&mut [&mut a, &mut b], 2.5).unwrap();
        assert!(r.clipped);
        assert!((a[0] - 1.5).abs() < 1e-6 && (b[0] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn rejects_bad_input() {
        let mut v = vec![1.0f32, f32::NAN];
        assert_eq!(clip_l2(&mut v, 1.0), Err(ClipError::NonFiniteValue(1)));
        let mut v = vec![1.0f32];
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                clip_l2(&mut v, bad),
                Err(ClipError::InvalidNorm(_))
            ));
        }
        let mut a = vec![1.0f32];
        let mut b = vec![f32::INFINITY];
        assert_eq!(
            clip_l2_many(&mut [&mut a, &mut b], 1.0),
            Err(ClipError::NonFiniteValue(1))
        );
    }

    proptest! {
        /// After clipping, the norm of the f32 values is at most the bound, the direction is
        /// kept, and clipping twice changes nothing more.
        #[test]
        fn clip_laws(v in proptest::collection::vec(-1e6f32..1e6, 1..64), c in 1e-3f64..1e3) {
            let orig = v.clone();
            let mut v = v;
            let r = clip_l2(&mut v, c).unwrap();
            let norm: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            prop_assert!(norm <= c);
            prop_assert!((norm - r.norm_after).abs() <= 1e-9 * c.max(1.0));
            if r.clipped {
                for (x, o) in v.iter().zip(&orig) {
                    prop_assert!((f64::from(*x) - f64::from(*o) * r.scale).abs() <= 1e-6 * f64::from(o.abs()).max(1e-30) + 1e-30);
                }
            } else {
                prop_assert_eq!(&v, &orig);
            }
            let again = v.clone();
            let r2 = clip_l2(&mut v, c).unwrap();
            prop_assert!(!r2.clipped);
            prop_assert_eq!(v, again);
        }
    }
}
