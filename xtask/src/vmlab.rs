//! `cargo xtask vm-lab`: the lab on virtual machines with their own kernel.
//!
//! `box` builds a Vagrant box for the libvirt provider from Debian packages only
//! (no box can be downloaded here): debootstrap a minimal bookworm with Debian's
//! 6.1 LTS kernel, systemd, openssh-server, socat, netcat, iproute2 and
//! etcd-server; an ext4 image made from the directory with `mkfs.ext4 -d` (no loop
//! device, no mount); converted to qcow2; box metadata. The VM boots its kernel
//! directly (kernel and initrd are shipped beside the disk, as the libvirt
//! provider's `kernel`/`initrd`/`cmdline` settings take them): no bootloader to
//! install into an image we never mount.
//!
//! The box is cached under `~/.cache/connect/vm-box/<key>/`, where the key is a
//! hash of everything that goes into it (suite, mirror, packages, the setup
//! script below), so it is rebuilt only when one of those changes.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::{
    bootstrap,
    util::{is_root, run_status},
};

/// The Debian release of the box (its kernel is the 6.1 LTS).
const SUITE: &str = "bookworm";
/// Packages of the box beyond debootstrap's minbase.
const BOX_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "initramfs-tools",
    "systemd-sysv",
    "udev",
    "openssh-server",
    "sudo",
    "socat",
    "netcat-openbsd",
    "iproute2",
    "etcd-server",
    "ca-certificates",
    // The verifier's instruction counts per program (`bpftool prog show`).
    "bpftool",
    "curl",
    // The checks' probes (getpeername as the application sees it).
    "python3-minimal",
];
/// The root file system's size (sparse: the qcow2 holds only what is written).
const DISK_SIZE: &str = "4G";
/// The kernel command line the box boots with.
pub const CMDLINE: &str = "root=LABEL=connect-root rw console=ttyS0 net.ifnames=0 quiet";

/// Run inside the debootstrapped tree (chroot) to make it a Vagrant box: the
/// `vagrant` user with Vagrant's published insecure key and password-less sudo,
/// sshd, networking by systemd-networkd (DHCP on eth0 for Vagrant's management
/// network, static addresses from the kernel command line or Vagrant), fstab by
/// label.
const SETUP: &str = r#"set -eu
echo connect-vm > /etc/hostname
printf 'LABEL=connect-root / ext4 defaults 0 1\n' > /etc/fstab
useradd -m -s /bin/bash vagrant
echo 'vagrant:vagrant' | chpasswd
echo 'root:vagrant' | chpasswd
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\n' > /etc/sudoers.d/vagrant
chmod 440 /etc/sudoers.d/vagrant
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
cat /tmp/authorized_keys > /home/vagrant/.ssh/authorized_keys
chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys
chmod 600 /home/vagrant/.ssh/authorized_keys
printf 'UseDNS no\n' > /etc/ssh/sshd_config.d/connect.conf
mkdir -p /etc/systemd/network
printf '[Match]\nName=eth0\n[Network]\nDHCP=ipv4\n' > /etc/systemd/network/50-eth0.network
systemctl enable systemd-networkd ssh
# etcd is started by the lab's own unit, with the lab's flags.
systemctl disable etcd || true
# A static address given on the kernel command line (connect.ip=ADDR/LEN,
# connect.dev=DEV, default eth0), for VMs started by xtask without Vagrant: a
# networkd file in /run, which wins over the DHCP one in /etc (name order).
cat > /usr/local/sbin/connect-cmdline-net <<'EOF'
#!/bin/sh
for w in $(cat /proc/cmdline); do
  case "$w" in connect.ip=*) ip="${w#connect.ip=}";; connect.dev=*) dev="${w#connect.dev=}";; esac
done
# The hostname (systemd.hostname=) resolves, for sudo and etcd.
grep -q " $(hostname)\$" /etc/hosts || echo "127.0.1.1 $(hostname)" >> /etc/hosts
[ -n "${ip:-}" ] || exit 0
mkdir -p /run/systemd/network
printf '[Match]\nName=%s\n[Network]\nAddress=%s\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' "${dev:-eth0}" "$ip" \
  > /run/systemd/network/10-connect.network
EOF
chmod 755 /usr/local/sbin/connect-cmdline-net
cat > /etc/systemd/system/connect-cmdline-net.service <<'EOF'
[Unit]
Description=Static address from the kernel command line
DefaultDependencies=no
Before=systemd-networkd.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/connect-cmdline-net
[Install]
WantedBy=sysinit.target
EOF
systemctl enable connect-cmdline-net
# Smaller image: no apt caches, no docs.
apt-get clean
rm -rf /usr/share/doc/* /usr/share/man/* /var/lib/apt/lists/*
"#;

/// Vagrant's published insecure public key (what every base box accepts first;
/// Vagrant replaces it with a key of its own on first boot).
const VAGRANT_INSECURE_KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== vagrant insecure public key";

#[derive(Debug, Args)]
pub struct VmLabArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Build (or reuse from the cache) the Vagrant box; prints where it is.
    Box,
    /// Start the VMs (qemu) and wait until each answers ssh.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Show each VM: running, answering ssh, its kernel and agent.
    Status,
    /// Run a shell command on node N (1-based) over ssh.
    Ssh {
        node: usize,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Stop every VM, remove the lab's network and disks.
    Down,
}

pub fn run(args: VmLabArgs) -> Result<()> {
    match args.command {
        VmCommand::Box => {
            let b = build_box()?;
            println!("xtask: box {}", b.box_file.display());
            println!(
                "xtask: kernel {} ({}) initrd {}",
                b.kernel.display(),
                b.kernel_release,
                b.initrd.display()
            );
            Ok(())
        }
        VmCommand::Up { nodes } => {
            // The agent that goes into every VM: this tree's, built now.
            crate::build()?;
            let b = build_box()?;
            let up = (|| {
                let t = Instant::now();
                qemu_up(&b, nodes)?;
                println!("xtask: VMs up in {:.0} s", t.elapsed().as_secs_f64());
                let t = Instant::now();
                provision(nodes)?;
                println!("xtask: provisioned in {:.0} s", t.elapsed().as_secs_f64());
                let took = first_line(nodes, std::time::Duration::from_secs(120))?;
                println!(
                    "xtask: ok: web on n1 reached socat on n{nodes} through both node proxies ({:.0} s after provisioning)",
                    took.as_secs_f64()
                );
                Ok(())
            })();
            if up.is_err() {
                let _ = qemu_down();
            }
            up
        }
        VmCommand::Ssh { node, command } => {
            let script = if command.is_empty() {
                "uname -a".to_owned()
            } else {
                command.join(" ")
            };
            run_status(&mut ssh(node, &script)?)
        }
        VmCommand::Down => qemu_down(),
        VmCommand::Status => status(),
    }
}

/// A built box and the parts a direct boot needs.
#[derive(Debug, Clone)]
pub struct BuiltBox {
    /// The `.box` archive for `vagrant box add`.
    pub box_file: PathBuf,
    /// The disk (qcow2), the kernel and the initrd, unpacked.
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel release in the box (e.g. `6.1.0-39-amd64`).
    pub kernel_release: String,
}

fn cache_root() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/connect/vm-box"))
}

/// The mirror the host's apt uses (the registry this machine reaches), or
/// Debian's own.
fn mirror() -> String {
    std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|s| {
            s.lines()
                .filter_map(|l| l.strip_prefix("URIs:"))
                .map(|u| u.trim().to_owned())
                .find(|u| u.ends_with("/debian"))
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The cache key of the box: a hash of every input.
fn box_key(mirror: &str) -> String {
    let mut inputs = String::new();
    let _ = write!(
        inputs,
        "{SUITE}\n{mirror}\n{}\n{DISK_SIZE}\n{CMDLINE}\n{SETUP}\n{VAGRANT_INSECURE_KEY}\n{}",
        BOX_PACKAGES.join(","),
        box_vagrantfile()
    );
    // FNV-1a, 64 bits: a cache key, not a security boundary.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in inputs.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{SUITE}-{h:016x}")
}

/// The Vagrantfile inside the box: direct kernel boot from the box's own files.
fn box_vagrantfile() -> String {
    format!(
        r#"Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv, override|
    box_dir = File.dirname(__FILE__)
    lv.driver = File.exist?("/dev/kvm") && File.readable?("/dev/kvm") ? "kvm" : "qemu"
    lv.kernel = File.join(box_dir, "vmlinuz")
    lv.initrd = File.join(box_dir, "initrd.img")
    lv.cmdline = "{CMDLINE}"
    lv.disk_bus = "virtio"
  end
end
"#
    )
}

/// Builds the box, or returns the cached one.
pub fn build_box() -> Result<BuiltBox> {
    let mirror = mirror();
    let dir = cache_root()?.join(box_key(&mirror));
    let built = BuiltBox {
        box_file: dir.join("connect-debian12.box"),
        disk: dir.join("box.img"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        kernel_release: std::fs::read_to_string(dir.join("kernel-release"))
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    if built.box_file.is_file() && !built.kernel_release.is_empty() {
        println!("xtask: box cached in {}", dir.display());
        return Ok(built);
    }
    if !is_root() {
        bail!("building the VM box needs root (debootstrap): run `sudo cargo xtask vm-lab box`");
    }
    bootstrap::vm_lab_packages()?;
    let work = dir.with_extension("work");
    if work.exists() {
        // A build that was killed may have left debootstrap's mounts (proc, sys,
        // dev/pts) inside the tree: never delete through them.
        unmount_under(&work)?;
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("remove the unfinished build {}", work.display()))?;
    }
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let started = Instant::now();
    println!("xtask: debootstrap {SUITE} from {mirror} (a few minutes)");
    run_status(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", BOX_PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&rootfs)
            .arg(&mirror),
    )?;
    println!(
        "xtask: debootstrap took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(
        rootfs.join("tmp/authorized_keys"),
        format!("{VAGRANT_INSECURE_KEY}\n"),
    )?;
    run_status(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/bin/sh", "-c", SETUP]),
    )?;
    let _ = std::fs::remove_file(rootfs.join("tmp/authorized_keys"));
    let (kernel, initrd, release) = kernel_files(&rootfs)?;
    std::fs::copy(&kernel, work.join("vmlinuz"))?;
    std::fs::copy(&initrd, work.join("initrd.img"))?;
    std::fs::write(work.join("kernel-release"), format!("{release}\n"))?;
    let raw = work.join("root.ext4");
    run_status(Command::new("truncate").args(["-s", DISK_SIZE]).arg(&raw))?;
    run_status(
        Command::new("mkfs.ext4")
            .args(["-q", "-L", "connect-root", "-d"])
            .arg(&rootfs)
            .arg(&raw),
    )?;
    run_status(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(work.join("box.img")),
    )?;
    std::fs::remove_file(&raw)?;
    std::fs::remove_dir_all(&rootfs).with_context(|| format!("remove {}", rootfs.display()))?;
    std::fs::write(
        work.join("metadata.json"),
        r#"{"provider": "libvirt", "format": "qcow2", "virtual_size": 4}"#,
    )?;
    std::fs::write(work.join("Vagrantfile"), box_vagrantfile())?;
    run_status(
        Command::new("tar")
            .arg("-C")
            .arg(&work)
            .args(["-czf", "connect-debian12.box"])
            .args([
                "metadata.json",
                "Vagrantfile",
                "box.img",
                "vmlinuz",
                "initrd.img",
            ])
            .current_dir(&work),
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&work, &dir).with_context(|| format!("move the box into {}", dir.display()))?;
    // Boxes of other inputs are stale: one box is ~1 GiB.
    for e in std::fs::read_dir(cache_root()?)?.filter_map(|e| e.ok()) {
        let p = e.path();
        if p != dir {
            unmount_under(&p)?;
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("remove the stale box {}", p.display()))?;
        }
    }
    println!(
        "xtask: box built in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(BuiltBox {
        kernel_release: release,
        ..built
    })
}

/// Unmounts (lazily, deepest first) everything mounted under `dir`.
fn unmount_under(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        run_status(Command::new("umount").args(["-l", p]))?;
    }
    Ok(())
}

/// The kernel and initrd debootstrap installed, and the kernel's release.
fn kernel_files(rootfs: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let boot = rootfs.join("boot");
    let mut releases: Vec<String> = std::fs::read_dir(&boot)
        .with_context(|| format!("read {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .collect();
    releases.sort();
    let release = releases
        .pop()
        .with_context(|| format!("no kernel in {}", boot.display()))?;
    let kernel = boot.join(format!("vmlinuz-{release}"));
    let initrd = boot.join(format!("initrd.img-{release}"));
    if !initrd.is_file() {
        bail!(
            "{} is missing: initramfs-tools did not run",
            initrd.display()
        );
    }
    Ok((kernel, initrd, release))
}

/// The network namespace the VMs' taps and bridge live in: nothing in it routes
/// anywhere, so the VMs reach each other and the host side of the bridge only.
pub const NETNS: &str = "connect-vmlab";
const BRIDGE: &str = "vmbr0";
/// The host's address on the lab network.
pub const HOST_ADDR: &str = "198.18.0.1";

/// Node `i`'s address (1-based), as in `vagrant/Vagrantfile`.
pub fn node_ip(i: usize) -> String {
    format!("198.18.0.{}", 10 + i)
}

/// Where a running lab keeps its disks, logs, pid files and ssh key.
pub fn state_dir() -> PathBuf {
    crate::util::workspace_root().join("target/vm-lab")
}

/// How VMs are run: KVM when it runs the box's kernel (a workstation), qemu's
/// TCG otherwise (this PVM host's /dev/kvm creates VMs but does not run stock
/// guest kernels). `CONNECT_VM_ACCEL=kvm|tcg` overrides.
fn accel(b: &BuiltBox) -> &'static str {
    const TCG: &str = "tcg,thread=multi";
    match std::env::var("CONNECT_VM_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        Ok("tcg") => TCG,
        _ if kvm_runs(b) => "kvm",
        _ => TCG,
    }
}

/// Whether KVM runs the box's kernel here: it must print its banner on the
/// serial console within 15 s (under working KVM it does in about one). The
/// answer is kept for the host's boot (`/proc/sys/kernel/random/boot_id`).
fn kvm_runs(b: &BuiltBox) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = state_dir().join("kvm-probe");
    if let Ok(c) = std::fs::read_to_string(&cache)
        && let Some(answer) = c.strip_prefix(boot_id.trim()).map(str::trim)
        && !boot_id.trim().is_empty()
    {
        return answer == "kvm";
    }
    let log = state_dir().join("kvm-probe.console");
    let _ = std::fs::create_dir_all(state_dir());
    let _ = std::fs::remove_file(&log);
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-m",
            "256",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&b.kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(15);
    let mut works = false;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Linux version")) {
            works = true;
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::write(
        &cache,
        format!("{} {}\n", boot_id.trim(), if works { "kvm" } else { "tcg" }),
    );
    works
}

/// The ssh key for the box's `vagrant` user (Vagrant's published insecure key,
/// which the box accepts; the lab network is a namespace of its own).
fn ssh_key() -> Result<PathBuf> {
    let dst = state_dir().join("ssh-key");
    if !dst.is_file() {
        let src = std::fs::read_dir("/usr/share/rubygems-integration/all/gems")
            .context("Vagrant's gem directory (Debian package vagrant)")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("keys/vagrant"))
            .find(|p| p.is_file())
            .context("Vagrant's insecure key is missing (Debian package vagrant)")?;
        std::fs::create_dir_all(state_dir())?;
        std::fs::copy(&src, &dst)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(dst)
}

/// `ssh` to node `i` from inside the lab's namespace, running `script` with sh.
pub fn ssh(i: usize, script: &str) -> Result<Command> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{NETNS}"))
        .arg("ssh")
        .arg("-i")
        .arg(ssh_key()?)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "BatchMode=yes",
        ])
        .arg(format!("vagrant@{}", node_ip(i)))
        .arg(script);
    Ok(cmd)
}

/// Starts `nodes` VMs of the box under qemu, each with its own overlay disk,
/// on the lab's bridge, and waits until each answers ssh.
pub fn qemu_up(b: &BuiltBox, nodes: usize) -> Result<()> {
    bootstrap::vm_lab_packages()?;
    // A lab left running (or half started) goes first: one lab at a time.
    qemu_down()?;
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    let ns = crate::netns::Netns::create(NETNS)?.keep();
    ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ns.ip(&["addr", "add", &format!("{HOST_ADDR}/24"), "dev", BRIDGE])?;
    ns.ip(&["link", "set", BRIDGE, "up"])?;
    let accel = accel(b);
    println!("xtask: {nodes} VMs, accelerator {accel}");
    for i in 1..=nodes {
        let tap = format!("tap{i}");
        ns.ip(&["tuntap", "add", &tap, "mode", "tap"])?;
        ns.ip(&["link", "set", &tap, "master", BRIDGE])?;
        ns.ip(&["link", "set", &tap, "up"])?;
        let disk = dir.join(format!("n{i}.qcow2"));
        let _ = std::fs::remove_file(&disk);
        run_status(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&b.disk)
                .arg(&disk),
        )?;
        let append = format!(
            "{CMDLINE} systemd.hostname=n{i} connect.ip={}/24 connect.dev=eth0",
            node_ip(i)
        );
        run_status(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{NETNS}"))
                .arg("qemu-system-x86_64")
                .args(["-name", &format!("connect-vm-lab-n{i}")])
                .args(["-machine", "q35", "-accel", accel, "-cpu", "max"])
                .args(["-smp", "2", "-m", "1536"])
                .arg("-kernel")
                .arg(&b.kernel)
                .arg("-initrd")
                .arg(&b.initrd)
                .args(["-append", &append])
                .arg("-drive")
                .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
                .args([
                    "-netdev",
                    &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
                ])
                .args([
                    "-device",
                    &format!(
                        "virtio-net-pci,netdev=net0,mac=52:54:00:18:00:{:02x}",
                        10 + i
                    ),
                ])
                .args(["-display", "none", "-nodefaults"])
                .arg("-serial")
                .arg(format!(
                    "file:{}",
                    dir.join(format!("n{i}.console")).display()
                ))
                .arg("-pidfile")
                .arg(dir.join(format!("n{i}.pid")))
                .arg("-daemonize"),
        )?;
    }
    let started = Instant::now();
    for i in 1..=nodes {
        loop {
            let ok = ssh(i, "true")?
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                println!(
                    "xtask: n{i} answers ssh after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if started.elapsed() > std::time::Duration::from_secs(600) {
                bail!(
                    "n{i} did not answer ssh within 600 s; its console: {}",
                    dir.join(format!("n{i}.console")).display()
                );
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    Ok(())
}

/// Stops every VM this lab started (by the PIDs in its pid files), removes the
/// namespace with its bridge and taps, and the disks. Safe to run after a failed
/// `up`, and twice.
pub fn qemu_down() -> Result<()> {
    let dir = state_dir();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pid") {
                if let Some(pid) = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    && is_our_qemu(pid)
                {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    if Path::new("/var/run/netns").join(NETNS).exists() {
        run_status(Command::new("ip").args(["netns", "del", NETNS]))?;
    }
    for e in std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "qcow2") {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Whether `pid` is a qemu this lab started (its command line names a disk in
/// the lab's state directory): a stale pid file never kills someone else.
fn is_our_qemu(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("qemu-system") && cmdline.contains(&*state_dir().to_string_lossy())
}

/// Copies `local` to `remote` on node `i` (root-owned, `mode`).
fn upload(i: usize, local: &Path, remote: &str, mode: &str) -> Result<()> {
    let file = std::fs::File::open(local).with_context(|| format!("open {}", local.display()))?;
    run_status(ssh(i, &format!("sudo install -D -m {mode} /dev/stdin {remote}"))?.stdin(file))
}

/// Provisions every node the way `vagrant up` does (vagrant/provision.sh: an
/// etcd member and the agent as systemd units, the demo services), in
/// parallel: a member's etcd waits for the others to form the cluster.
pub fn provision(nodes: usize) -> Result<()> {
    let root = crate::util::workspace_root();
    let agent = root.join("target/dist/connect-agent");
    if !agent.is_file() {
        bail!(
            "{} is missing: run `cargo xtask build` first",
            agent.display()
        );
    }
    let initial_cluster = (1..=nodes)
        .map(|i| format!("n{i}=http://{}:2380", node_ip(i)))
        .collect::<Vec<_>>()
        .join(",");
    let endpoints = (1..=nodes)
        .map(|i| format!("{}:2379", node_ip(i)))
        .collect::<Vec<_>>()
        .join(",");
    for i in 1..=nodes {
        upload(i, &agent, "/vagrant/target/dist/connect-agent", "755")?;
        for f in ["provision.sh", "check.sh"] {
            upload(
                i,
                &root.join("vagrant").join(f),
                &format!("/vagrant/vagrant/{f}"),
                "755",
            )?;
        }
    }
    let mut running = Vec::new();
    for i in 1..=nodes {
        let role = if i == nodes {
            "socat"
        } else if i == 1 {
            "web"
        } else {
            "none"
        };
        let script = format!(
            "sudo env NODE_NAME=n{i} NODE_IP={ip} ETCD_INITIAL_CLUSTER={initial_cluster} \
             CONNECT_STORE=etcd://{endpoints} DEMO_ROLE={role} bash /vagrant/vagrant/provision.sh",
            ip = node_ip(i)
        );
        let log = std::fs::File::create(state_dir().join(format!("n{i}.provision.log")))?;
        let child = ssh(i, &script)?
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("ssh")?;
        running.push((i, child));
    }
    let mut failed = Vec::new();
    for (i, mut child) in running {
        if !child.wait()?.success() {
            failed.push(format!(
                "n{i} (see {})",
                state_dir().join(format!("n{i}.provision.log")).display()
            ));
        }
    }
    if !failed.is_empty() {
        bail!("provisioning failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Sends a line from web on node 1 to socat on the last node, through both
/// node proxies (the transparent path), retrying while the agents converge.
pub fn first_line(nodes: usize, within: std::time::Duration) -> Result<std::time::Duration> {
    let started = Instant::now();
    let script = format!(
        "echo hello-from-web | sudo sh -c 'echo $$ > /sys/fs/cgroup/app/web/cgroup.procs && exec nc -N -w 3 {} 8181'",
        node_ip(nodes)
    );
    loop {
        let out = ssh(1, &script)?.output()?;
        if String::from_utf8_lossy(&out.stdout).contains("hello-from-web") {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!(
                "web on n1 did not reach socat on n{nodes} within {within:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// `vm-lab status`: one line per VM the lab started.
fn status() -> Result<()> {
    let dir = state_dir();
    let mut nodes: Vec<usize> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix('n')?.strip_suffix(".pid")?.parse().ok()
        })
        .collect();
    nodes.sort_unstable();
    if nodes.is_empty() {
        println!("no VM lab is running");
        return Ok(());
    }
    for i in nodes {
        let pid = std::fs::read_to_string(dir.join(format!("n{i}.pid")))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let running = pid.is_some_and(is_our_qemu);
        let facts = if running {
            ssh(i, "echo $(uname -r) agent=$(sudo systemctl is-active connect-agent) etcd=$(sudo systemctl is-active etcd)")?
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "not answering ssh".to_owned())
        } else {
            "not running".to_owned()
        };
        println!(
            "n{i}  {}  qemu {}  {facts}",
            node_ip(i),
            pid.map_or("-".to_owned(), |p| p.to_string())
        );
    }
    Ok(())
}
