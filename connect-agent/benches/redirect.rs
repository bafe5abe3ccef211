//! Redirect-record lookup: what the transparent listener does for every accepted
//! connection — `Redirector::take_redirect`, a lookup and a delete in the kernel's
//! by-port LRU hash map (two bpf(2) syscalls) — with the real programs loaded and
//! attached to a scratch cgroup, and 1,000 other records in the map.
//!
//! 1. `take/hit`: the record is there (the normal case).
//! 2. `take/miss`: it is not (a connection whose record was filed late or swept).
//!
//! Records are filed the way `sock_ops` files them, untimed, in batches; only the
//! claims are timed. Per-call p50/p99/p99.9 are printed as well.
//!
//! Needs root (BPF, cgroups), cgroup v2 and BTF; fails with the reason otherwise.
//! Run: `sudo -E cargo bench -p connect-agent --bench redirect`.

use std::{
    hint::black_box,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use connect_agent::redirect::{Redirect, RedirectConfig, Redirector};
use criterion::Criterion;

/// Records present besides the ones claimed.
const BACKGROUND: u16 = 1_000;
/// Records filed per untimed batch (well below the map's 65,536 entries).
const BATCH: u64 = 4_096;

/// A scratch cgroup removed on drop (after the programs detached).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

fn cgroup2_mount() -> Result<PathBuf, String> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| "no cgroup2 mount in /proc/mounts".to_string())
}

fn peer(i: u64) -> SocketAddrV4 {
    // Ports 10000..60000 on 127.0.0.2, distinct from the background's 127.0.0.3.
    SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 10_000 + (i % 50_000) as u16)
}

fn redirect() -> Redirect {
    Redirect {
        orig_dst: connect_agent::redirect::OrigDst(SocketAddrV4::new(
            Ipv4Addr::new(198, 18, 0, 10),
            8181,
        )),
        cgroup_id: connect_agent::redirect::CgroupId(4242),
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the redirect benchmark needs root (BPF and cgroups): run it with sudo -E");
        std::process::exit(1);
    }
    let root = match cgroup2_mount() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("the redirect benchmark needs cgroup v2: {e}");
            std::process::exit(1);
        }
    };
    let scratch = Scratch(root.join(format!("connect-bench-redirect-{}", std::process::id())));
    if let Err(e) = std::fs::create_dir(&scratch.0) {
        eprintln!("creating {}: {e}", scratch.0.display());
        std::process::exit(1);
    }
    let r = match Redirector::attach(
        &scratch.0,
        RedirectConfig {
            proxy: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
            debug: false,
        },
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loading the eBPF programs failed: {e}");
            drop(scratch);
            std::process::exit(1);
        }
    };
    for port in 0..BACKGROUND {
        let p = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), 20_000 + port);
        r.file_redirect(p, redirect())
            .expect("filing a background record");
    }

    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let mut g = c.benchmark_group("redirect");
    g.bench_function("take/hit", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let n = BATCH.min(iters - done);
                for i in 0..n {
                    r.file_redirect(peer(i), redirect()).expect("filing");
                }
                let t = Instant::now();
                for i in 0..n {
                    let got = r.take_redirect(black_box(peer(i))).expect("lookup");
                    debug_assert!(got.is_some());
                    black_box(got);
                }
                spent += t.elapsed();
                done += n;
            }
            spent
        })
    });
    g.bench_function("take/miss", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            black_box(r.take_redirect(black_box(peer(i))).expect("lookup"))
        })
    });
    g.finish();

    // Per-call percentiles of hits.
    let mut lat = Vec::with_capacity(20_000);
    for round in 0..5u64 {
        for i in 0..4_000 {
            r.file_redirect(peer(round * 4_000 + i), redirect())
                .expect("filing");
        }
        for i in 0..4_000 {
            let t = Instant::now();
            let got = r.take_redirect(peer(round * 4_000 + i)).expect("lookup");
            lat.push(t.elapsed());
            assert_eq!(got, Some(redirect()), "the filed record comes back");
        }
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "take_redirect hit, {} calls: p50 {:?}, p99 {:?}, p99.9 {:?}",
        lat.len(),
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
    c.final_summary();
    drop(r);
    drop(scratch);
}
