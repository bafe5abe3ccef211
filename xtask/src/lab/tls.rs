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
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

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

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Connect lab etcd CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca(lab_dir), &ca_cert.pem(), 0o644)?;
    let issuer = Issuer::new(ca_params, ca_key);

    for (name, ip) in nodes {
        let mut p = CertificateParams::new(vec!["localhost".to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        for addr in [ip.as_str(), "127.0.0.1"] {
            p.subject_alt_names
                .push(SanType::IpAddress(addr.parse().context("node address")?));
        }
        // Server for clients and peers; client when dialing its peers.
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = member(lab_dir, name);
        write(&cert_path, &cert.pem(), 0o644)?;
        write(&key_path, &key.serialize_pem(), 0o600)?;
    }

    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "connect-agent");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = agent(lab_dir);
    write(&cert_path, &cert.pem(), 0o644)?;
    write(&key_path, &key.serialize_pem(), 0o600)?;
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
