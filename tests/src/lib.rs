//! Integration-test helpers: real agent processes (`agent`), real etcd clusters
//! (`etcd`), cgroups and processes for the privileged eBPF tests (`lab`), mesh
//! processes (`mesh`), python probes (`probes`) and `dig` (`dig`).

pub mod agent;
pub mod dig;
pub mod etcd;
pub mod lab;
pub mod mesh;
pub mod probes;
pub mod wait;
