//! `cargo xtask lab down`: stops every process the lab started (by the PIDs it
//! recorded), removes its cgroups and namespaces, and finds what a crashed run left.

use super::*;

/// Namespaces named like this lab's (`<lab>-br`, `<lab>-n<i>`), whether recorded or
/// not (an `up` killed between creating and recording one).
pub(super) fn leftover_namespaces(name: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| {
            ns.strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|r| {
                    r == "br"
                        || r.strip_prefix('n')
                            .is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()))
                })
        })
        .map(str::to_owned)
        .collect()
}

pub(super) fn down(name: &str) -> Result<()> {
    let st = load_state(name)?;
    let mut problems = Vec::new();
    let mut removed = Vec::new();
    if let Some(st) = &st {
        // Agents first, then the demo services, then the etcd members one at a time
        // (members stopped together wait for each other's leadership transfer);
        // only the PIDs `up` recorded. The agents' eBPF programs outlive them
        // (pinned): `connect-agent detach` removes them, node by node.
        let role =
            |r: Role| -> Vec<&ProcRecord> { st.procs.iter().filter(|p| p.role == r).collect() };
        let live = st.procs.iter().filter(|p| alive(p)).count();
        let mut stuck = stop_procs(&role(Role::Agent));
        stuck.extend(stop_procs(&role(Role::Socat)));
        for member in role(Role::Etcd) {
            stuck.extend(stop_procs(&[member]));
        }
        if !stuck.is_empty() {
            problems.push(format!("processes {stuck:?} would not stop"));
        }
        let mut detached = 0;
        for node in &st.nodes {
            let out = Command::new(&st.agent_bin)
                .arg("detach")
                .arg("--cgroup")
                .arg(&node.cgroup)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    if String::from_utf8_lossy(&o.stdout).starts_with("Detached") {
                        detached += 1;
                    }
                }
                Ok(o) => problems.push(format!(
                    "connect-agent detach --cgroup {}: {}",
                    node.cgroup.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("cannot run {}: {e}", st.agent_bin.display())),
            }
        }
        if detached > 0 {
            removed.push(format!("the eBPF programs of {detached} nodes"));
        }
        removed.push(format!("{live} processes"));
    }
    // What is left in the lab's cgroups (socat's forked children, a client someone
    // started in a service cgroup) was started for the lab, inside it.
    let cg_root = match st.as_ref().and_then(|s| s.cgroup_root.clone()) {
        Some(r) => Some(r),
        None => util::cgroup2_mount()
            .ok()
            .map(|m| m.join(format!("connect-{name}"))),
    };
    if let Some(root) = cg_root.as_ref().filter(|r| r.is_dir()) {
        let killed = kill_cgroup_tree(root);
        if killed > 0 {
            removed.push(format!("{killed} processes left in its cgroups"));
        }
    }
    let mut namespaces: Vec<String> = st
        .as_ref()
        .map(|s| s.namespaces.clone())
        .unwrap_or_default();
    for ns in leftover_namespaces(name) {
        if !namespaces.contains(&ns) {
            namespaces.push(ns);
        }
    }
    let mut n_ns = 0;
    for ns in namespaces.iter().rev() {
        if !Path::new("/var/run/netns").join(ns).exists() {
            continue;
        }
        let ok = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            n_ns += 1;
        } else {
            problems.push(format!("cannot delete namespace {ns}"));
        }
    }
    if n_ns > 0 {
        removed.push(format!("{n_ns} namespaces"));
    }
    if let Some(root) = cg_root.as_ref().filter(|r| r.is_dir()) {
        match remove_cgroup_tree(root) {
            Ok(n) => removed.push(format!("{n} cgroups")),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    let dir = lab_dir(name);
    if dir.exists() {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(format!("{}", dir.display())),
            Err(e) => problems.push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    if !problems.is_empty() {
        bail!("lab {name} is not entirely down: {}", problems.join("; "));
    }
    if removed.is_empty() {
        println!("no lab {name} was up: nothing to remove");
    } else {
        println!("lab {name} is down: removed {}", removed.join(", "));
    }
    Ok(())
}

/// Every cgroup directory under `root` (itself included), deepest first.
pub(super) fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(dir);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// SIGKILLs, by PID, every process in the cgroups under `root`; waits (bounded) until
/// they are empty. Returns how many it signalled.
pub(super) fn kill_cgroup_tree(root: &Path) -> usize {
    let pids = |cgs: &[PathBuf]| -> Vec<u32> {
        cgs.iter()
            .filter_map(|cg| std::fs::read_to_string(cg.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    };
    let tree = cgroup_tree(root);
    let first = pids(&tree);
    for pid in &first {
        signal(*pid, "KILL");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !pids(&tree).is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    first.len()
}

pub(super) fn remove_cgroup_tree(root: &Path) -> Result<usize> {
    let tree = cgroup_tree(root);
    let mut n = 0;
    for cg in &tree {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match std::fs::remove_dir(cg) {
                Ok(()) => {
                    n += 1;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("removing cgroup {}", cg.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(n)
}

// ------------------------------------------------------ probes inside a namespace
