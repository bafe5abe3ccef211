//! Integration-test helpers: real agent processes, and (see `lab`) nodes made of
//! network namespaces and cgroups.

pub mod agent;
pub mod mesh;
