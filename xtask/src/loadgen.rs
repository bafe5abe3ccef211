//! Load generators and the echo server the benchmarks run inside namespaces.
//!
//! Plain blocking sockets and threads: one connection's round trip should measure the
//! network path and the proxies, not an async runtime. Every load is bounded in count
//! and in time.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

/// Accepting threads of the echo server: enough for 16 concurrent clients plus the
/// round-trip connection without spawning per connection.
const ECHO_THREADS: usize = 48;

#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Request/response latency over one connection.
    Rr {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        count: u32,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Prints an agent's proxy handshake counters (`GET /v1/agent/metrics` on
    /// its plaintext API) as JSON: `{"full": n, "resumed": n}` of the outbound side.
    Handshakes {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// New connections per second: connect, one round trip, close.
    Cps {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// Serves echo on `listen` until killed.
pub fn echo(args: EchoArgs) -> Result<()> {
    let l = TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let l = Arc::new(l);
    let mut threads = Vec::new();
    for _ in 0..ECHO_THREADS {
        let l = l.clone();
        threads.push(std::thread::spawn(move || {
            loop {
                let Ok((mut s, _)) = l.accept() else { continue };
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct RrResult {
    pub count: u32,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

#[derive(Debug, Serialize)]
pub struct CpsResult {
    pub connections: u64,
    pub errors: u64,
    pub per_second: f64,
}

pub fn client(cmd: ClientCommand) -> Result<()> {
    let out = match cmd {
        ClientCommand::Rr { addr, count, size } => serde_json::to_string(&rr(addr, count, size)?)?,
        ClientCommand::Cps {
            addr,
            concurrency,
            seconds,
        } => serde_json::to_string(&cps(
            addr,
            concurrency,
            Duration::from_secs(seconds.min(60)),
        )?)?,
        ClientCommand::Handshakes { addr } => serde_json::to_string(&handshakes(addr)?)?,
    };
    println!("{out}");
    Ok(())
}

fn rr(addr: SocketAddr, count: u32, size: usize) -> Result<RrResult> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    // Warm up (handshakes, caches) before measuring.
    for _ in 0..200 {
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lat = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        lat.push(t.elapsed());
        if t > deadline {
            bail!("round trips took longer than 120 s");
        }
    }
    lat.sort();
    let pct = |p: f64| -> f64 {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e6
    };
    Ok(RrResult {
        count,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
    })
}

fn cps(addr: SocketAddr, concurrency: usize, duration: Duration) -> Result<CpsResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
            std::thread::spawn(move || {
                let msg = [0x5au8; 64];
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let r = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(&msg)?;
                        s.read_exact(&mut buf)?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let connections = ok.load(Ordering::Relaxed);
    Ok(CpsResult {
        connections,
        errors: errors.load(Ordering::Relaxed),
        per_second: connections as f64 / elapsed,
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Handshakes {
    pub full: u64,
    pub resumed: u64,
    /// Streams that rode a reused node-to-node connection (no handshake).
    pub reused: u64,
}

/// The outbound handshake and reused-stream counters of the agent whose HTTP API is `addr`.
fn handshakes(addr: SocketAddr) -> Result<Handshakes> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /v1/agent/metrics?format=prometheus HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .with_context(|| format!("reading metrics from {addr}"))?;
    let count = |key: &str| -> Result<u64> {
        body.lines()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("{addr} reported no {key}"))?
            .trim()
            .parse()
            .with_context(|| format!("{addr} reported a bad {key}"))
    };
    let handshakes = |kind: &str| {
        format!("connect_proxy_handshakes_total{{side=\"outbound\",kind=\"{kind}\"}} ")
    };
    Ok(Handshakes {
        full: count(&handshakes("full"))?,
        resumed: count(&handshakes("resumed"))?,
        reused: count("connect_proxy_streams_total{side=\"outbound\",connection=\"reused\"} ")?,
    })
}
