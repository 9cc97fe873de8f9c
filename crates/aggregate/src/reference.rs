//! The plaintext reference of secure aggregation: the exact weighted mean of the uploads, in f64.
//! It is what `--privacy none` computes and what the secure path is checked against (within the
//! quantization bound).

use crate::rule::Upload;
use crate::AggregateError;

/// Running weighted sum of uploads, so a driver can fold clients in one at a time.
#[derive(Debug, Clone, Default)]
pub struct WeightedSum {
    sum: Vec<f64>,
    weight: u64,
    count: usize,
}

impl WeightedSum {
    /// An empty sum over `len` values.
    pub fn new(len: usize) -> Self {
        WeightedSum {
            sum: vec![0.0; len],
            weight: 0,
            count: 0,
        }
    }

    /// Adds `weight · values`.
    pub fn add(&mut self, upload: &Upload) -> Result<(), AggregateError> {
        if upload.values.len() != self.sum.len() {
            return Err(AggregateError::Shape(format!(
                "upload has {} values, the round needs {}",
                upload.values.len(),
                self.sum.len()
            )));
        }
        let w = f64::from(upload.weight);
        for (s, &v) in self.sum.iter_mut().zip(&upload.values) {
            *s += w * f64::from(v);
        }
        self.weight += u64::from(upload.weight);
        self.count += 1;
        Ok(())
    }

    /// Uploads added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `Σ w_i x_i / Σ w_i`.
    pub fn mean(&self) -> Result<Vec<f32>, AggregateError> {
        if self.weight == 0 {
            return Err(AggregateError::Shape("no upload has weight".into()));
        }
        let w = self.weight as f64;
        Ok(self.sum.iter().map(|s| (s / w) as f32).collect())
    }
}

/// The weighted mean of `uploads`.
pub fn weighted_mean(uploads: &[Upload]) -> Result<Vec<f32>, AggregateError> {
    let len = uploads.first().map_or(0, |u| u.values.len());
    let mut s = WeightedSum::new(len);
    for u in uploads {
        s.add(u)?;
    }
    s.mean()
}
