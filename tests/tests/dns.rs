//! The DNS server as real clients see it: `dig` (Debian's dnsutils) over UDP and TCP
//! against in-process servers with a fake catalog; two servers sharing one store
//! agree on virtual IPs; and, in a network namespace of its own, `dns-setup` makes
//! glibc's resolver (`getent`) and a plain `dig` on port 53 go through the agent.
//! The namespace test needs root and `ip`; without them it fails saying so.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use connect_agent::{
    dns::{self, Settings, fake::FakeCatalog},
    identity::{Datacenter, ServiceName},
    store::{Store, memory::MemStore},
    vip,
};
use connect_tests::dig::Dig;
use tokio::{sync::oneshot, task::JoinHandle};

/// One in-process DNS server, stopped (and awaited) on drop of its handle.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(listeners: dns::Listeners, catalog: FakeCatalog, store: Arc<dyn Store>) -> Self {
        let addr = listeners.local_addr();
        let vips = vip::Allocator::start(store).await.expect("allocator");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(dns::serve(
            listeners,
            Arc::new(catalog),
            vips,
            Settings {
                datacenter: Datacenter::default(),
                recursor: None,
            },
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn on_loopback(catalog: FakeCatalog, store: Arc<dyn Store>) -> Self {
        let listeners = dns::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        Self::start(listeners, catalog, store).await
    }

    async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the DNS server stops")
                .expect("server task");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn svc(s: &str) -> ServiceName {
    s.parse().expect("service name")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Two nodes; `web` on both, `socat` on n2, `down` failing its checks.
fn catalog() -> FakeCatalog {
    let c = FakeCatalog::new();
    c.add_node(
        "n1",
        ip("198.18.0.1"),
        "198.18.0.1:20000".parse().expect("addr"),
    )
    .add_node(
        "n2",
        ip("198.18.0.2"),
        "198.18.0.2:20000".parse().expect("addr"),
    )
    .add_instance(&svc("web"), "n1", ip("198.18.0.1"), 8080, true)
    .add_instance(&svc("web"), "n2", ip("198.18.0.2"), 8080, true)
    .add_instance(&svc("socat"), "n2", ip("198.18.0.2"), 8181, true)
    .add_instance(&svc("down"), "n1", ip("198.18.0.1"), 9999, false);
    c
}

/// Runs `dig` against `server` (port given, or 53 from resolv.conf when `None`),
/// `prefix` before it (e.g. `ip netns exec NAME`), off the async runtime so
/// in-process servers keep answering, and parses its output.
async fn dig_with(prefix: &[&str], server: Option<SocketAddr>, args: &[&str]) -> Result<Dig> {
    let argv = connect_tests::dig::argv(prefix, server, args);
    tokio::task::spawn_blocking(move || connect_tests::dig::run(&argv)).await?
}

async fn dig(server: SocketAddr, args: &[&str]) -> Result<Dig> {
    dig_with(&[], Some(server), args).await
}

/// The same question over UDP and over TCP; both answers must be the same.
async fn dig_both(server: SocketAddr, name: &str, rtype: &str) -> Result<Dig> {
    let udp = dig(server, &[name, rtype]).await?;
    let tcp = dig(server, &["+tcp", name, rtype]).await?;
    ensure!(
        (&udp.status, &udp.answers, &udp.additional)
            == (&tcp.status, &tcp.answers, &tcp.additional),
        "UDP and TCP disagree for {name} {rtype}: {udp:?} vs {tcp:?}"
    );
    Ok(udp)
}

#[tokio::test]
async fn dig_gets_the_right_records_for_each_name() -> Result<()> {
    let server = Server::on_loopback(catalog(), Arc::new(MemStore::new())).await;
    let s = server.addr;

    let a = dig_both(s, "web.service.consul", "A").await?;
    assert_eq!(a.status, "NOERROR");
    assert!(a.flags.contains("aa"), "authoritative: {:?}", a.flags);
    assert_eq!(a.data("A"), ["198.18.0.1", "198.18.0.2"]);
    assert!(a.ttls.iter().all(|t| *t == 0), "TTL 0: {:?}", a.ttls);
    // Case does not matter, and the datacenter may be named.
    let upper = dig_both(s, "WEB.Service.DC1.consul", "A").await?;
    assert_eq!(upper.data("A"), a.data("A"));

    let srv = dig_both(s, "web.service.consul", "SRV").await?;
    assert_eq!(
        srv.data("SRV"),
        [
            "1 1 8080 n1.node.dc1.consul.",
            "1 1 8080 n2.node.dc1.consul."
        ]
    );
    let extra: Vec<(String, String)> = srv
        .additional
        .iter()
        .filter(|(_, t, _)| t == "A")
        .map(|(n, _, d)| (n.clone(), d.clone()))
        .collect();
    assert_eq!(
        extra,
        [
            ("n1.node.dc1.consul.".to_owned(), "198.18.0.1".to_owned()),
            ("n2.node.dc1.consul.".to_owned(), "198.18.0.2".to_owned())
        ]
    );
    let node = dig_both(s, "n2.node.dc1.consul", "A").await?;
    assert_eq!(node.data("A"), ["198.18.0.2"]);

    let connect = dig_both(s, "web.connect.consul", "SRV").await?;
    assert_eq!(
        connect.data("SRV"),
        [
            "1 1 20000 n1.node.dc1.consul.",
            "1 1 20000 n2.node.dc1.consul."
        ]
    );
    let connect_a = dig_both(s, "socat.connect.consul", "A").await?;
    assert_eq!(connect_a.data("A"), ["198.18.0.2"]);

    let virt = dig_both(s, "web.virtual.consul", "A").await?;
    let [vip_text] = virt
        .data("A")
        .try_into()
        .map_err(|v| anyhow::anyhow!("one A record expected: {v:?}"))?;
    let vip: Ipv4Addr = vip_text.parse()?;
    assert!(vip::is_virtual(vip), "{vip} is not in 240.0.0.0/4");
    let socat = dig_both(s, "socat.virtual.consul", "A").await?;
    assert_ne!(
        socat.data("A"),
        virt.data("A"),
        "services share a virtual IP"
    );

    for name in [
        "nope.service.consul",
        "down.service.consul",
        "nope.virtual.consul",
        "web.service.dc9.consul",
        "what.ever.consul",
    ] {
        let miss = dig_both(s, name, "A").await?;
        assert_eq!(miss.status, "NXDOMAIN", "{name}");
        assert!(miss.answers.is_empty(), "{name}");
        assert!(
            miss.authority
                .iter()
                .any(|(n, t, _)| n == "consul." && t == "SOA"),
            "{name}: SOA in the authority section"
        );
    }
    let refused = dig_both(s, "example.org", "A").await?;
    assert_eq!(refused.status, "REFUSED");

    // Garbage does not hurt the server.
    let junk = UdpSocket::bind("127.0.0.1:0")?;
    for len in [0usize, 1, 11, 12, 13, 100, 512, 3000] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
        junk.send_to(&bytes, s)?;
    }
    assert_eq!(
        dig_both(s, "web.service.consul", "A").await?.data("A"),
        a.data("A")
    );
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_sharing_a_store_give_the_same_answers() -> Result<()> {
    // Each agent has its own view of one cluster catalog, and one shared store.
    let names: Vec<String> = (0..12).map(|i| format!("svc-{i}")).collect();
    let cluster_catalog = || {
        let c = catalog();
        for n in &names {
            c.add_instance(&svc(n), "n1", ip("198.18.0.1"), 7000, true);
        }
        c
    };
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let one = Server::on_loopback(cluster_catalog(), store.clone()).await;
    let two = Server::on_loopback(cluster_catalog(), store.clone()).await;

    // Ask both at once, alternating which is first, so that both allocate.
    let mut asks = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let first = if i % 2 == 0 { one.addr } else { two.addr };
        let name = format!("{n}.virtual.consul");
        asks.push(tokio::spawn(async move { dig(first, &[&name, "A"]).await }));
    }
    for a in asks {
        a.await??;
    }
    let mut seen = BTreeSet::new();
    for n in names.iter().map(String::as_str).chain(["web", "socat"]) {
        let name = format!("{n}.virtual.consul");
        let from_one = dig_both(one.addr, &name, "A").await?;
        let from_two = dig_both(two.addr, &name, "A").await?;
        assert_eq!(from_one.data("A"), from_two.data("A"), "{name}");
        let [addr] = from_one
            .data("A")
            .try_into()
            .map_err(|v| anyhow::anyhow!("{name}: {v:?}"))?;
        assert!(seen.insert(addr.clone()), "{addr} handed out twice");
        // Service records agree too.
        assert_eq!(
            dig(one.addr, &[&format!("{n}.service.consul"), "SRV"])
                .await?
                .answers,
            dig(two.addr, &[&format!("{n}.service.consul"), "SRV"])
                .await?
                .answers
        );
    }
    one.shutdown().await;
    two.shutdown().await;
    Ok(())
}

/// A network namespace made for one test, deleted (with its /etc/netns files) on
/// drop even when the test fails.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "this test needs root: it creates network namespace {name} and writes /etc/netns/{name}"
            );
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Binds the DNS sockets inside the namespace, from a thread that enters it.
    fn bind_dns(&self, addr: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
        let path = self.path();
        std::thread::spawn(move || -> Result<(UdpSocket, TcpListener)> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            let udp = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
            let tcp = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
            Ok((udp, tcp))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bind thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`] off the async runtime, so in-process servers keep answering meanwhile.
async fn run_blocking(argv: &[&str]) -> Result<String> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&refs)
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_setup_makes_a_namespace_resolve_through_the_agent() -> Result<()> {
    let agent = connect_tests::agent::agent_binary()?;
    let agent = agent.to_string_lossy().into_owned();
    let ns = Netns::create(&format!("connect-dns-{}", std::process::id()))?;
    let resolv_conf = format!("/etc/netns/{}/resolv.conf", ns.name);

    // Before an agent listens, dns-setup refuses, says how to fix it, writes nothing.
    let refused = run_blocking(&[&agent, "dns-setup", "--netns", &ns.name]).await;
    let Err(refused) = refused else {
        bail!("dns-setup succeeded without an agent");
    };
    ensure!(
        format!("{refused:#}").contains("--dns-addr 127.0.0.1:53"),
        "the error should say how to fix it: {refused:#}"
    );
    ensure!(!std::path::Path::new(&resolv_conf).exists());

    let (udp, tcp) = ns.bind_dns(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)))?;
    let listeners = dns::Listeners::from_std(udp, tcp)?;
    let server = Server::start(listeners, catalog(), Arc::new(MemStore::new())).await;

    let out = run_blocking(&[&agent, "dns-setup", "--netns", &ns.name]).await?;
    ensure!(out.contains(&resolv_conf), "{out}");

    let exec = ["ip", "netns", "exec", ns.name.as_str()];
    // glibc's resolver, through /etc/netns/NAME/resolv.conf.
    let getent = |name: &str| {
        let mut argv = exec.to_vec();
        argv.extend(["getent", "hosts", name]);
        argv.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let argv = getent("web.service.consul");
    let hosts = run_blocking(&argv.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    let addrs: BTreeSet<&str> = hosts
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        addrs,
        BTreeSet::from(["198.18.0.1", "198.18.0.2"]),
        "{hosts}"
    );
    let argv = getent("web.virtual.consul");
    let hosts = run_blocking(&argv.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    let vip: Ipv4Addr = hosts
        .split_whitespace()
        .next()
        .context("no address")?
        .parse()?;
    assert!(vip::is_virtual(vip), "{hosts}");

    // dig without a port uses resolv.conf's nameserver on port 53.
    let plain = dig_with(&exec, None, &["socat.service.consul", "A"]).await?;
    assert_eq!(plain.data("A"), ["198.18.0.2"]);
    let miss = dig_with(&exec, None, &["nope.service.consul", "A"]).await?;
    assert_eq!(miss.status, "NXDOMAIN");

    server.shutdown().await;
    drop(ns);
    Ok(())
}
