//! CA tests that span modules: independent parsers, restart, rotation, renewal.
