//! Integration-test helpers: real agent processes (`agent`), real etcd clusters
//! (`etcd`), cgroups and processes for the privileged eBPF tests (`lab`), mesh
//! processes (`mesh`), python probes (`probes`), `dig` (`dig`) and a Workload API
//! client over a connection it is given (`workload`).

pub mod agent;
pub mod dig;
pub mod etcd;
pub mod lab;
pub mod mesh;
pub mod probes;
pub mod wait;
pub mod workload;
