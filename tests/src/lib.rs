//! Integration-test helpers.

pub mod etcd;
