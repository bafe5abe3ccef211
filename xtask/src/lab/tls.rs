//! The lab's etcd certificates: one CA, a certificate per node for its etcd member
//! (server and peer, for the node's address and loopback), and one client
//! certificate the agents present. The lab's etcd serves https only and checks
//! client and peer certificates, as a production cluster should: its raft traffic
//! and its answers to the agents carry the CA's private keys.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use xtask::pki::{TestCa, Usage, write};

/// Where the lab keeps its certificates, under its directory.
pub fn dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("tls")
}

/// The CA bundle.
pub fn ca(lab_dir: &Path) -> PathBuf {
    dir(lab_dir).join("ca.pem")
}

/// Node `node`'s member certificate and key.
pub fn member(lab_dir: &Path, node: &str) -> (PathBuf, PathBuf) {
    let d = dir(lab_dir);
    (d.join(format!("{node}.pem")), d.join(format!("{node}.key")))
}

/// The agents' client certificate and key.
pub fn agent(lab_dir: &Path) -> (PathBuf, PathBuf) {
    let d = dir(lab_dir);
    (d.join("agent.pem"), d.join("agent.key"))
}

/// Makes the CA and every certificate for `nodes` (name, IP). Keys are mode 600
/// in a directory of mode 700.
pub fn make(lab_dir: &Path, nodes: &[(String, String)]) -> Result<()> {
    let d = dir(lab_dir);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    let root = TestCa::new("Connect lab etcd CA")?;
    write(&ca(lab_dir), root.pem(), 0o644)?;
    for (name, ip) in nodes {
        // Server for clients and peers; client when dialing its peers.
        let (cert, key) = root.issue(
            name,
            &[ip, "127.0.0.1", "localhost"],
            Usage::ServerAndClient,
        )?;
        let (cert_path, key_path) = member(lab_dir, name);
        write(&cert_path, &cert, 0o644)?;
        write(&key_path, &key, 0o600)?;
    }
    let (cert, key) = root.issue("connect-agent", &[], Usage::Client)?;
    let (cert_path, key_path) = agent(lab_dir);
    write(&cert_path, &cert, 0o644)?;
    write(&key_path, &key, 0o600)?;
    Ok(())
}
