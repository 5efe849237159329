//! Tests of DestinationRule resolution.
