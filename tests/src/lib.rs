//! Integration-test helpers: real agent processes (`agent`), real etcd clusters
//! (`etcd`), and cgroups and processes for the privileged eBPF tests (`lab`).

pub mod agent;
pub mod etcd;
pub mod lab;
pub mod mesh;
