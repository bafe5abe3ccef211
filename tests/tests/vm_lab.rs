//! `cargo xtask vm-lab`, end to end, on two VMs with Debian's 6.1 LTS kernel
//! (booted under qemu: TCG on this host, whose /dev/kvm does not run stock
//! guest kernels; KVM where it works). On each VM's own kernel:
//! - `up` boots the lab's box, provisions etcd and the agent as systemd units
//!   (vagrant/provision.sh) and sends a line from web on n1 to socat on n2
//!   through both node proxies;
//! - every eBPF program is loaded (`connect-agent programs` prints the
//!   verifier's instruction counts) and attached (`connect-agent doctor`);
//! - the application sees the address it dialed (getpeername in web's cgroup);
//! - socat's plaintext port is dropped for a connection from the other VM, while
//!   a port Connect does not protect (etcd's) answers (positive control);
//! - a deny intention is enforced live, and deleting it restores the path;
//! - `down` leaves no qemu, namespace or disk behind.
//!
//! The box is built once per machine and cached (`cargo xtask vm-lab box`); the
//! test fails loudly when qemu cannot run. Each phase's duration is printed.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use connect_tests::lab::require_privileges;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `cargo xtask vm-lab ARGS`, bounded by `timeout` (coreutils' `timeout`).
fn vm_lab(args: &[&str], timeout: Duration) -> Result<Output> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    Command::new("timeout")
        .arg(timeout.as_secs().to_string())
        .arg(cargo)
        .current_dir(workspace_root())
        .args(["xtask", "vm-lab"])
        .args(args)
        .output()
        .context("cargo xtask vm-lab")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A command on node `n` over ssh; its output, failing unless it succeeded.
fn on(n: usize, script: &str) -> Result<String> {
    let out = vm_lab(&["ssh", &n.to_string(), script], Duration::from_secs(120))?;
    ensure!(
        out.status.success(),
        "on n{n}: `{script}` failed ({}):\n{}",
        out.status,
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lab, brought down however the test ends.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        match vm_lab(&["down"], Duration::from_secs(120)) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("vm-lab down failed: {}", text(&o)),
            Err(e) => eprintln!("vm-lab down failed: {e:#}"),
        }
    }
}

/// The application's view, in web's cgroup on n1: connect to socat on n2,
/// print getpeername() and the echo of one line.
const PEER: &str = r#"sudo sh -c 'echo $$ > /sys/fs/cgroup/app/web/cgroup.procs && exec python3 -c "
import socket
s = socket.create_connection((\"198.18.0.12\", 8181), timeout=5)
print(\"peer=%s:%d\" % s.getpeername())
s.sendall(b\"line\n\")
print(\"echo=%s\" % s.recv(100).decode().strip())
"'"#;

#[test]
fn the_vm_lab_boots_debian_6_1_and_the_mesh_works_on_its_kernel() -> Result<()> {
    require_privileges()?;
    let started = Instant::now();
    let b = vm_lab(&["box"], Duration::from_secs(1800))?;
    ensure!(b.status.success(), "vm-lab box failed:\n{}", text(&b));
    let box_took = started.elapsed();
    let _down = Down;
    let t = Instant::now();
    let up = vm_lab(&["up", "--nodes", "2"], Duration::from_secs(900))?;
    let up_text = text(&up);
    ensure!(up.status.success(), "vm-lab up failed:\n{up_text}");
    ensure!(
        up_text.contains("ok: web on n1 reached socat on n2 through both node proxies"),
        "up did not send its line:\n{up_text}"
    );
    let up_took = t.elapsed();
    println!("{up_text}");

    let t = Instant::now();
    for n in [1, 2] {
        let release = on(n, "uname -r")?;
        ensure!(
            release.starts_with("6.1."),
            "n{n} runs {release}, not Debian's 6.1"
        );
        // Every program loaded, with the verifier's counts (the kernel's
        // bpf_prog_info.verified_insns, through `connect-agent programs`).
        let progs = on(n, "sudo connect-agent programs")?;
        println!("n{n}:\n{progs}");
        for name in [
            "connect4",
            "connect6",
            "sendmsg4",
            "sendmsg6",
            "getpeername4",
            "getpeername6",
            "sock_ops",
            "ingress",
        ] {
            let line = progs
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .with_context(|| format!("n{n}: {name} is not loaded:\n{progs}"))?;
            let insns: u32 = line
                .rsplit("verified_insns ")
                .next()
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("n{n}: no instruction count for {name}: {line}"))?;
            ensure!(insns > 0, "n{n}: {line}");
        }
        let doctor = on(n, "sudo connect-agent doctor 2>&1 || true")?;
        ensure!(
            doctor
                .lines()
                .any(|l| l.starts_with("ok") && l.contains("IPv4 and IPv6, TCP and UDP covered")),
            "n{n}: doctor does not see every program attached:\n{doctor}"
        );
    }

    // The application sees what it dialed, and the line comes back.
    let peer = on(1, PEER)?;
    ensure!(
        peer.contains("peer=198.18.0.12:8181") && peer.contains("echo=line"),
        "getpeername / echo in web's cgroup: {peer}"
    );

    // Off the node: socat's plaintext port is dropped for n1 (outside every
    // service cgroup, so not redirected); etcd's port on n2 answers.
    let control = on(1, "nc -z -w 3 198.18.0.12 2379 && echo open")?;
    ensure!(control.contains("open"), "positive control: {control}");
    let probe = on(1, "nc -z -w 3 198.18.0.12 8181 && echo open || echo closed")?;
    ensure!(
        probe.contains("closed"),
        "socat's plaintext port answered another VM: {probe}"
    );

    // A live deny, then allowed again (vagrant/check.sh, as a user runs it).
    let check = on(
        1,
        "sudo SOCAT_IP=198.18.0.12 bash /vagrant/vagrant/check.sh",
    )?;
    for want in [
        "ok: web reaches socat",
        "ok: deny intention enforced",
        "ok: allowed again",
    ] {
        ensure!(check.contains(want), "check.sh: missing {want:?}:\n{check}");
    }
    let checks_took = t.elapsed();

    let t = Instant::now();
    drop(_down);
    let qemu = Command::new("pgrep")
        .args(["-f", "connect-vm-lab-n"])
        .output()?;
    ensure!(
        qemu.stdout.is_empty(),
        "qemu still running after down: {}",
        String::from_utf8_lossy(&qemu.stdout)
    );
    ensure!(
        !std::path::Path::new("/var/run/netns/connect-vmlab").exists(),
        "the lab's namespace is still there"
    );
    let disks: Vec<_> = std::fs::read_dir(workspace_root().join("target/vm-lab"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
        .collect();
    ensure!(disks.is_empty(), "disks left behind: {disks:?}");
    println!(
        "vm lab phases: box {:.0} s (cached after the first), up {:.0} s, checks {:.0} s, down {:.0} s",
        box_took.as_secs_f64(),
        up_took.as_secs_f64(),
        checks_took.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
