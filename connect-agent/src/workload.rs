//! The SPIFFE Workload API's foundation: who is calling, told by the kernel.
//!
//! A workload connects to the agent's Unix socket; the kernel names the process
//! at the other end ([`attest`]): its PID from `SO_PEERCRED`, a pidfd that pins it
//! (`SO_PEERPIDFD`, or `pidfd_open` on kernels before 6.5), taken once when the
//! connection is accepted, and at each call its cgroup from
//! `/proc/<pid>/cgroup`. The caller is the registered local service whose cgroup
//! (the definition's `cgroup`, relative to `--cgroup`) contains that process. The
//! pidfd defeats PID reuse: the process is checked to be alive after its cgroup
//! was read, and a live process keeps its PID, so the cgroup read was its own.

pub mod attest;
pub mod server;

/// The generated messages and service of `proto/workload.proto`.
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("_");
}
