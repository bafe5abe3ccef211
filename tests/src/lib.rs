//! Integration-test helpers: real agent processes (`agent`), cgroups and processes
//! for the privileged eBPF tests (`lab`), mesh processes (`mesh`) and `dig`
//! (`dig`).

pub mod agent;
pub mod dig;
pub mod lab;
pub mod mesh;
