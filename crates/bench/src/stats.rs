//! Summaries of per-round measurements: median and spread.

use serde::Serialize;

/// A median with its spread over rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 90th percentile.
    pub p90: f64,
    /// How many rounds.
    pub n: usize,
}

impl Spread {
    /// Summarises `values` (at least one).
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if v.is_empty() {
                return f64::NAN;
            }
            let x = (v.len() - 1) as f64 * p;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
        };
        Spread {
            median: at(0.5),
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            p10: at(0.1),
            p90: at(0.9),
            n: v.len(),
        }
    }

    /// `0.987× (0.971–1.002)`: median, then min–max.
    pub fn ratio(&self) -> String {
        format!("{:.3}× ({:.3}–{:.3})", self.median, self.min, self.max)
    }
}

/// Ratios `a[i] / b[i]` of paired rounds.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    Spread::of(values).median
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 5.0, 4.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 5));
        assert_eq!(Spread::of(&[1.0, 2.0]).median, 1.5);
        assert_eq!(ratios(&[2.0, 3.0], &[1.0, 2.0]), vec![2.0, 1.5]);
    }
}
