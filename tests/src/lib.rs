//! Integration-test helpers: real agent processes (`agent`), and cgroups and
//! processes for the privileged eBPF tests (`lab`).

pub mod agent;
pub mod lab;
pub mod mesh;
