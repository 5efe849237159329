//! Tests of outlier detection.
