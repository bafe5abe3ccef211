//! `connect-agent doctor`: checks a running agent against Consul's Connect security
//! checklist and prints one `ok` / `not ok` line per item with the reason.
//!
//! The facts come from the agent itself (`GET /v1/agent/security`, which needs
//! `agent:read`): ACLs on with default deny; the HTTPS API on with client
//! verification; plaintext HTTP on loopback only; the data directory private to
//! the agent's user; eBPF ingress protection attached, so nothing reaches a
//! service's plaintext port except through the mesh. Exit 0 when every item is ok,
//! 1 when one is not, 2 when the agent cannot be asked.

use std::{io::Write, process::ExitCode};

use anyhow::Context;

use super::http::{Client, HttpArgs};
use crate::api::security::SecurityReport;

/// One checklist item's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub ok: bool,
    pub item: &'static str,
    pub reason: String,
}

/// Runs the checks and prints them to standard output.
pub async fn run(args: HttpArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match run_to(&args, &mut out).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the checks and prints them to `out`; errors mean the agent could not be
/// asked.
pub async fn run_to(args: &HttpArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let client = Client::new(args)?;
    let report: SecurityReport = client
        .get("/v1/agent/security")
        .await
        .context("cannot read the agent's security report (the token needs agent:read)")?;
    let checks = evaluate(&report);
    for c in &checks {
        writeln!(
            out,
            "{:<7} {}: {}",
            if c.ok { "ok" } else { "not ok" },
            c.item,
            c.reason
        )?;
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        writeln!(out, "all {} checks passed", checks.len())?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(out, "{failed} of {} checks failed", checks.len())?;
        Ok(ExitCode::from(1))
    }
}

/// The checklist, judged from a report. Pure, so it is tested table-wise.
pub fn evaluate(r: &SecurityReport) -> Vec<Check> {
    let mut checks = Vec::new();
    let acl = if !r.acl.enabled {
        (
            false,
            "ACLs are disabled (the agent runs --dev without --acl-default-policy)".to_owned(),
        )
    } else if r.acl.default_policy != "deny" {
        (
            false,
            format!(
                "the default policy is {:?}: anyone without a token may do what no rule forbids (use --acl-default-policy deny)",
                r.acl.default_policy
            ),
        )
    } else {
        (true, "ACLs are enabled with default policy deny".to_owned())
    };
    checks.push(Check {
        ok: acl.0,
        item: "ACLs enabled, default deny",
        reason: acl.1,
    });

    let https = match (&r.https.addr, r.https.enabled, r.https.verify_incoming) {
        (Some(addr), true, true) => (
            true,
            format!("HTTPS on {addr} requires verified client certificates"),
        ),
        (Some(addr), true, false) => (
            false,
            format!("HTTPS on {addr} does not verify clients (add --verify-incoming)"),
        ),
        _ => (
            false,
            "the HTTPS API is off: agent traffic is neither encrypted nor verified (add --https-addr and --verify-incoming)".to_owned(),
        ),
    };
    checks.push(Check {
        ok: https.0,
        item: "agent API encrypted and verified",
        reason: https.1,
    });

    checks.push(Check {
        ok: r.http.loopback,
        item: "plaintext HTTP on loopback only",
        reason: if r.http.loopback {
            format!("plaintext HTTP listens on {} only", r.http.addr)
        } else {
            format!(
                "plaintext HTTP listens on {}, reachable from the network",
                r.http.addr
            )
        },
    });

    let d = &r.data_dir;
    let path = d.path.display();
    let dir = if let Some(e) = &d.error {
        (false, format!("cannot inspect {path}: {e}"))
    } else if d.mode != "0700" {
        (
            false,
            format!("{path} has mode {} (run `chmod 700 {path}`)", d.mode),
        )
    } else if d.owner_uid != Some(d.agent_uid) {
        (
            false,
            format!(
                "{path} belongs to uid {}, not to the agent's uid {}",
                d.owner_uid.map_or("?".to_owned(), |u| u.to_string()),
                d.agent_uid
            ),
        )
    } else if let Some(first) = d.exposed.first() {
        (
            false,
            format!(
                "{} entr{} inside are open to group or others, e.g. {first}",
                d.exposed.len(),
                if d.exposed.len() == 1 { "y" } else { "ies" }
            ),
        )
    } else {
        let owner = if d.agent_uid == 0 {
            "root".to_owned()
        } else {
            format!("uid {}", d.agent_uid)
        };
        (
            true,
            format!(
                "{path} is 0700, owned by {owner} (the agent's user), nothing inside open to others"
            ),
        )
    };
    checks.push(Check {
        ok: dir.0,
        item: "data directory private",
        reason: dir.1,
    });

    let ingress = &r.ingress_protection;
    checks.push(Check {
        ok: ingress.attached,
        item: "no non-Connect traffic to services",
        reason: match (&ingress.cgroup, ingress.attached) {
            (Some(cg), true) => format!(
                "eBPF ingress protection is attached to {}: service ports accept loopback only",
                cg.display()
            ),
            _ => "eBPF ingress protection is not attached (start the agent with --cgroup): service ports are reachable directly".to_owned(),
        },
    });

    let no_ebpf = "no eBPF programs (start the agent with --cgroup)";
    let pinned: std::collections::BTreeSet<&str> =
        ingress.pinned_programs.iter().map(String::as_str).collect();
    let missing: Vec<&str> = connect_common::program::ALL
        .iter()
        .copied()
        .filter(|p| !pinned.contains(p))
        .collect();
    checks.push(Check {
        ok: ingress.attached && missing.is_empty(),
        item: "IPv4 and IPv6, TCP and UDP covered",
        reason: if !ingress.attached {
            no_ebpf.to_owned()
        } else if missing.is_empty() {
            "connect4/6, sendmsg4/6, getpeername4/6, sock_ops and ingress are attached: every address family and form, and UDP, is enforced".to_owned()
        } else {
            format!("programs missing: {}", missing.join(", "))
        },
    });
    let dir = ingress
        .pin_dir
        .as_ref()
        .map_or_else(|| "bpffs".to_owned(), |d| d.display().to_string());
    checks.push(Check {
        ok: ingress.attached && !pinned.is_empty(),
        item: "enforcement fails closed",
        reason: if !ingress.attached {
            no_ebpf.to_owned()
        } else if pinned.is_empty() {
            format!("nothing is pinned in {dir}: protection would end with the agent")
        } else {
            format!(
                "the programs are pinned in {dir}: they keep enforcing while no agent runs (only `connect-agent detach` removes them)"
            )
        },
    });
    checks.push(Check {
        ok: ingress.attached && ingress.unapplied_entries == 0,
        item: "every protected port enforced",
        reason: if !ingress.attached {
            no_ebpf.to_owned()
        } else if ingress.unapplied_entries == 0 {
            "every service port and mesh destination is in the eBPF maps".to_owned()
        } else {
            format!(
                "{} map entries could not be written (see connect_ebpf_map_write_failures_total and the agent's log): those ports are not protected",
                ingress.unapplied_entries
            )
        },
    });
    let store = match r.store.transport.as_str() {
        "embedded" => (true, "the embedded store: no state crosses a network".to_owned()),
        "etcd-tls" => (
            true,
            format!(
                "etcd over TLS, its certificate verified{}",
                if r.store.client_certificate {
                    ", with a client certificate"
                } else {
                    ""
                }
            ),
        ),
        "etcd-plaintext-loopback" => (true, "etcd without TLS, on loopback only".to_owned()),
        "etcd-plaintext-insecure" => (
            false,
            "etcd is reached without TLS over the network (--etcd-insecure-plaintext): its password and the CA's private keys cross it in the clear (use --etcd-ca-file)".to_owned(),
        ),
        other => (false, format!("unknown store transport {other:?}")),
    };
    checks.push(Check {
        ok: store.0,
        item: "store traffic encrypted",
        reason: store.1,
    });
    checks
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::api::security::{
        AclReport, DataDirReport, HttpReport, HttpsReport, IngressReport, StoreReport,
    };

    fn secure() -> SecurityReport {
        SecurityReport {
            acl: AclReport {
                enabled: true,
                default_policy: "deny".into(),
                bootstrapped: true,
            },
            http: HttpReport {
                addr: "127.0.0.1:8500".into(),
                loopback: true,
            },
            https: HttpsReport {
                enabled: true,
                addr: Some("198.18.0.1:8501".into()),
                verify_incoming: true,
                certificate: Some("builtin-ca".into()),
            },
            data_dir: DataDirReport {
                path: PathBuf::from("/var/lib/connect"),
                mode: "0700".into(),
                owner_uid: Some(0),
                agent_uid: 0,
                exposed: vec![],
                error: None,
            },
            ingress_protection: IngressReport {
                attached: true,
                cgroup: Some(PathBuf::from("/sys/fs/cgroup/app")),
                pin_dir: Some(PathBuf::from("/sys/fs/bpf/connect/sys%2Ffs%2Fcgroup%2Fapp")),
                pinned_programs: connect_common::program::ALL
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                unapplied_entries: 0,
            },
            store: StoreReport {
                transport: "etcd-tls".into(),
                client_certificate: true,
            },
        }
    }

    #[test]
    fn every_item_judged() {
        let all_ok = evaluate(&secure());
        assert_eq!(all_ok.len(), 9);
        assert!(all_ok.iter().all(|c| c.ok), "{all_ok:?}");

        type Break = fn(&mut SecurityReport);
        // Each break fails exactly its item (the first listed), except no eBPF at all,
        // which fails every eBPF item.
        let cases: &[(Break, &str, &str)] = &[
            (|r| r.acl.enabled = false, "ACLs enabled", "disabled"),
            (
                |r| r.acl.default_policy = "allow".into(),
                "ACLs enabled",
                "\"allow\"",
            ),
            (
                |r| r.https.verify_incoming = false,
                "encrypted",
                "--verify-incoming",
            ),
            (
                |r| {
                    r.https.enabled = false;
                    r.https.addr = None;
                },
                "encrypted",
                "HTTPS API is off",
            ),
            (
                |r| r.http.loopback = false,
                "loopback",
                "reachable from the network",
            ),
            (
                |r| r.data_dir.mode = "0755".into(),
                "data directory",
                "chmod 700",
            ),
            (
                |r| r.data_dir.owner_uid = Some(1000),
                "data directory",
                "uid 1000",
            ),
            (
                |r| r.data_dir.exposed = vec!["/var/lib/connect/x (mode 0644)".into()],
                "data directory",
                "1 entry",
            ),
            (
                |r| r.data_dir.error = Some("gone".into()),
                "data directory",
                "gone",
            ),
            (
                |r| {
                    r.ingress_protection.attached = false;
                    r.ingress_protection.cgroup = None;
                },
                "non-Connect",
                "--cgroup",
            ),
            (
                |r| {
                    r.ingress_protection
                        .pinned_programs
                        .retain(|p| p != "connect6")
                },
                "IPv6",
                "missing: connect6",
            ),
            (
                |r| r.ingress_protection.pinned_programs.clear(),
                "fails closed",
                "nothing is pinned",
            ),
            (
                |r| r.ingress_protection.unapplied_entries = 2,
                "every protected port",
                "2 map entries",
            ),
            (
                |r| r.store.transport = "etcd-plaintext-insecure".into(),
                "store traffic",
                "--etcd-insecure-plaintext",
            ),
        ];
        for (brk, item, reason) in cases {
            let mut r = secure();
            brk(&mut r);
            let checks = evaluate(&r);
            let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
            let expected = if r.ingress_protection.attached {
                // Dropping every pin also leaves programs "missing".
                1 + usize::from(r.ingress_protection.pinned_programs.is_empty())
            } else {
                4
            };
            assert_eq!(failed.len(), expected, "{item}: {checks:?}");
            assert!(
                failed
                    .iter()
                    .any(|c| c.item.contains(item) && c.reason.contains(reason)),
                "{item} / {reason}: {failed:?}"
            );
        }
    }
}
