//! Where enforcement lives between agents: the programs' BPF links and the maps are
//! pinned on bpffs, one directory per `--cgroup`, so they outlive the agent process.
//! A crash, an OOM kill or an upgrade leaves every protection in force; only
//! [`remove`] (`connect-agent detach`) takes it away.
//!
//! Layout, under [`ROOT`]`/<the cgroup's path, escaped>/`:
//! - `maps-v<MAP_LAYOUT>/<MAP>`: every map of [`connect_common::map::ALL`]. An agent
//!   of the same layout adopts them, so its programs start with the maps the old ones
//!   used and there is no moment with an empty map.
//! - `links/<program>@<token>`: one link per program; the token (PID and clock) tells
//!   one agent's set from the set it replaces.

use std::{
    io,
    path::{Path, PathBuf},
};

use connect_common::MAP_LAYOUT;

use super::Error;

/// The bpffs mount, and our directory on it.
pub const BPFFS: &str = "/sys/fs/bpf";
pub const ROOT: &str = "/sys/fs/bpf/connect";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);

/// The pin directory of one `--cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    /// The directory for `cgroup`: its absolute path with `%` and `/` escaped, so
    /// every cgroup has its own and the name says which it is. A cgroup that no
    /// longer exists still maps to the same name (for `detach` after the fact).
    pub fn for_cgroup(cgroup: &Path) -> Self {
        let abs = std::fs::canonicalize(cgroup)
            .or_else(|_| std::path::absolute(cgroup))
            .unwrap_or_else(|_| cgroup.to_owned());
        Self {
            path: Path::new(ROOT).join(escape(&abs)),
        }
    }

    /// Maps of this agent's layout.
    pub fn maps(&self) -> PathBuf {
        self.path.join(format!("maps-v{MAP_LAYOUT}"))
    }

    pub fn links(&self) -> PathBuf {
        self.path.join("links")
    }
}

fn escape(abs: &Path) -> String {
    let s = abs.to_string_lossy();
    let trimmed = s.trim_start_matches('/');
    if trimmed.is_empty() {
        return "%2F".to_owned();
    }
    trimmed.replace('%', "%25").replace('/', "%2F")
}

/// Makes sure bpffs is mounted at [`BPFFS`] (systemd mounts it; a bare VM or a
/// container may not), mounting it if needed.
pub fn ensure_bpffs() -> Result<(), Error> {
    let mounted =
        |p: &str| nix::sys::statfs::statfs(p).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC);
    if mounted(BPFFS) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(Error::Bpffs)?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| Error::Bpffs(io::Error::from(e)))?;
    tracing::info!(path = BPFFS, "mounted bpffs");
    Ok(())
}

/// Removes a cgroup's pins: its links (which detaches the programs, unless a live
/// process still holds a link) and its maps. Returns whether there was anything.
pub fn remove(dir: &PinDir) -> io::Result<bool> {
    match std::fs::remove_dir_all(&dir.path) {
        Ok(()) => {
            // Leave the shared root if this was the last cgroup in it.
            let _ = std::fs::remove_dir(ROOT);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Map directories of other layouts (left by an agent of another version).
pub fn other_layouts(dir: &PinDir) -> Vec<PathBuf> {
    let ours = dir.maps();
    std::fs::read_dir(&dir.path)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p != &ours
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("maps-v"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cgroup_has_its_own_readable_directory() {
        assert_eq!(
            escape(Path::new("/sys/fs/cgroup/app")),
            "sys%2Ffs%2Fcgroup%2Fapp"
        );
        assert_eq!(
            escape(Path::new("/a%2Fb")),
            "a%252Fb",
            "escapes cannot collide"
        );
        assert_ne!(escape(Path::new("/a/b")), escape(Path::new("/a%2Fb")));
        assert_eq!(escape(Path::new("/")), "%2F");
        let d = PinDir::for_cgroup(Path::new("/no/such/cgroup"));
        assert_eq!(d.path, Path::new(ROOT).join("no%2Fsuch%2Fcgroup"));
        assert_eq!(d.maps(), d.path.join(format!("maps-v{MAP_LAYOUT}")));
    }
}
