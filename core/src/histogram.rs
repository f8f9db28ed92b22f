//! Histogram bucket layouts.
//!
//! A histogram with `k` buckets has `k + 1` strictly increasing, finite
//! edges. Bucket `i` holds values in `[edges[i], edges[i+1])`; the last bucket
//! also holds `edges[k]`. Values outside the range are clipped into the first
//! or last bucket, so one event always moves exactly one bucket by one: that
//! is what bounds its privacy sensitivity.
//!
//! The `*_EDGES` constants are the default layouts of the four standard
//! histograms. Every message declares its edges, so a device may use other
//! ones (up to [`MAX_BUCKETS`] buckets); the collector stores them beside the
//! counts.

/// Most buckets a histogram may have on the wire (and columns per histogram
/// in the lake).
pub const MAX_BUCKETS: usize = 16;

/// Default latency buckets, milliseconds (16 buckets, roughly 1-2-5 steps).
pub const LATENCY_MS_EDGES: [f64; 17] = [
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
    20_000.0, 50_000.0, 100_000.0,
];

/// Default output-confidence buckets (10 buckets of width 0.1 over 0..1).
pub const CONFIDENCE_EDGES: [f64; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Default token-count buckets for input and output size (powers of two).
pub const TOKEN_EDGES: [f64; 17] = [
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1_024.0, 2_048.0, 4_096.0,
    8_192.0, 16_384.0, 32_768.0,
];

/// Why a list of edges is not a valid bucket layout.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EdgesError {
    #[error("has {count} edges; a histogram needs 2 to {} edges", MAX_BUCKETS + 1)]
    BadEdgeCount { count: usize },
    #[error("edge {index} is not a finite number")]
    NotFinite { index: usize },
    #[error("edge {index} ({value}) is not greater than the edge before it")]
    NotIncreasing { index: usize, value: f64 },
}

/// Checks that `edges` is a valid layout: 2..=17 finite, strictly increasing values.
pub fn check_edges(edges: &[f64]) -> Result<(), EdgesError> {
    if !(2..=MAX_BUCKETS + 1).contains(&edges.len()) {
        return Err(EdgesError::BadEdgeCount { count: edges.len() });
    }
    for (index, value) in edges.iter().enumerate() {
        if !value.is_finite() {
            return Err(EdgesError::NotFinite { index });
        }
        if index > 0 && *value <= edges[index - 1] {
            return Err(EdgesError::NotIncreasing {
                index,
                value: *value,
            });
        }
    }
    Ok(())
}

/// The bucket a value falls in, clipping out-of-range values (and NaN) into
/// the first or last bucket. `edges` must be a valid layout.
pub fn bucket_index(edges: &[f64], value: f64) -> usize {
    let buckets = edges.len().saturating_sub(1);
    if buckets == 0 || value.is_nan() {
        return 0;
    }
    // Number of edges <= value, minus one, is the bucket of `value`.
    let at_or_below = edges.partition_point(|e| *e <= value);
    at_or_below.saturating_sub(1).min(buckets - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layouts_are_valid() {
        assert_eq!(check_edges(&LATENCY_MS_EDGES), Ok(()));
        assert_eq!(check_edges(&CONFIDENCE_EDGES), Ok(()));
        assert_eq!(check_edges(&TOKEN_EDGES), Ok(()));
    }

    #[test]
    fn values_land_in_their_bucket_and_clip_at_the_ends() {
        let e = [0.0, 1.0, 10.0, 100.0];
        assert_eq!(bucket_index(&e, -5.0), 0);
        assert_eq!(bucket_index(&e, 0.0), 0);
        assert_eq!(bucket_index(&e, 0.99), 0);
        assert_eq!(bucket_index(&e, 1.0), 1);
        assert_eq!(bucket_index(&e, 99.0), 2);
        assert_eq!(bucket_index(&e, 100.0), 2);
        assert_eq!(bucket_index(&e, 1e9), 2);
        assert_eq!(bucket_index(&e, f64::NAN), 0);
        assert_eq!(bucket_index(&e, f64::INFINITY), 2);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert_eq!(
            check_edges(&[1.0]),
            Err(EdgesError::BadEdgeCount { count: 1 })
        );
        assert_eq!(
            check_edges(&[0.0, 2.0, 2.0]),
            Err(EdgesError::NotIncreasing {
                index: 2,
                value: 2.0
            })
        );
        assert_eq!(
            check_edges(&[0.0, f64::NAN]),
            Err(EdgesError::NotFinite { index: 1 })
        );
        assert!(check_edges(&[0.0; 18]).is_err());
    }
}
