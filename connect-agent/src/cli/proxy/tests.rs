//! Tests of the explicit proxy.
