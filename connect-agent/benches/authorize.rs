//! Authorization speed.
//!
//! 1. The in-process decision the proxy makes per inbound connection,
//!    `Intentions::authorize`, with 10, 1 000 and 100 000 intentions (target: p99
//!    under 1 µs at 100 000).
//! 2. `POST /v1/agent/connect/authorize` through the real router on 127.0.0.1, one
//!    keep-alive client (target: median under 100 µs).
//!
//! Criterion reports means; the targets are percentiles, so each part also times
//! calls one by one and prints p50/p99/p99.9. Per-call times include one
//! `Instant::now()` (~20-30 ns), so they overstate the decision slightly; the
//! per-batch-of-100 averages do not. Measurement times are short: the machine is
//! shared.
//!
//! Run: `cargo bench -p connect-agent --bench authorize`.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use connect_agent::{
    api, app,
    config::AgentArgs,
    identity::ServiceName,
    intentions::{Action, Intentions, Selector, Spec},
    shutdown::Shutdown,
    store::{Store, memory::MemStore},
};
use criterion::{BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 3] = [10, 1_000, 100_000];
/// Distinct queries cycled through, so the benchmark does not hit one hot key.
const QUERIES: usize = 4096;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);

    let mut report = Vec::new();
    for &n in &SIZES {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let ixns = rt.block_on(async {
            let ixns = Intentions::start(store, false).await.expect("start");
            populate(&ixns, n).await;
            ixns
        });
        let queries = queries(n);
        let mut g = c.benchmark_group("authorize_in_process");
        g.throughput(Throughput::Elements(1));
        for (kind, qs) in [("hit", &queries.hit), ("miss", &queries.miss)] {
            g.bench_with_input(BenchmarkId::new(kind, n), qs, |b, qs| {
                let mut i = 0;
                b.iter(|| {
                    let (s, d) = &qs[i % qs.len()];
                    i += 1;
                    black_box(ixns.authorize(black_box(s), black_box(d)))
                });
            });
        }
        g.finish();
        report.push((n, percentiles_in_process(&ixns, &queries)));
    }

    let http = http_bench(&rt, &mut c);

    c.final_summary();
    println!("\n== in-process Intentions::authorize (hit and miss queries alternating) ==");
    println!(
        "{:>8}  {:>9} {:>9} {:>9} {:>9}   {:>14} {:>14}",
        "ixns", "p50", "p99", "p99.9", "max", "batch100 p50", "batch100 p99"
    );
    for (n, p) in &report {
        println!(
            "{n:>8}  {:>9} {:>9} {:>9} {:>9}   {:>14} {:>14}",
            ns(p.single.p50),
            ns(p.single.p99),
            ns(p.single.p999),
            ns(p.single.max),
            ns(p.batch.p50),
            ns(p.batch.p99)
        );
    }
    println!("\n== HTTP POST /v1/agent/connect/authorize over loopback, keep-alive ==");
    println!(
        "{} requests: p50 {}  p99 {}  p99.9 {}  max {}",
        http.count,
        us(http.p50),
        us(http.p99),
        us(http.p999),
        us(http.max)
    );
}

/// `n` intentions: mostly exact pairs spread over n/10 destinations, plus one
/// wildcard source and one wildcard destination so every lookup level is populated.
async fn populate(ixns: &Arc<Intentions>, n: usize) {
    let dests = (n / 10).max(1);
    let specs: Vec<Spec> = (0..n.saturating_sub(2))
        .map(|k| {
            spec(
                &format!("src-{}", k / dests),
                &format!("svc-{}", k % dests),
                k,
            )
        })
        .chain([spec("*", "svc-1", 1), spec("src-0", "*", 0)])
        .collect();
    let start = Instant::now();
    // A few writers at once so the store follower applies changes in batches.
    let chunks: Vec<Vec<Spec>> = specs
        .chunks(specs.len().div_ceil(8).max(1))
        .map(<[Spec]>::to_vec)
        .collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let ixns = ixns.clone();
            tokio::spawn(async move {
                for s in chunk {
                    ixns.create(s).await.expect("create");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("join");
    }
    assert_eq!(ixns.list().0.len(), n);
    eprintln!("created {n} intentions in {:?}", start.elapsed());
}

fn spec(src: &str, dst: &str, k: usize) -> Spec {
    Spec {
        source: Selector::parse("SourceName", src).expect("src"),
        destination: Selector::parse("DestinationName", dst).expect("dst"),
        action: if k.is_multiple_of(3) {
            Action::Deny
        } else {
            Action::Allow
        },
        description: String::new(),
        meta: Default::default(),
    }
}

struct Queries {
    /// Pairs with an exact intention (precedence 9).
    hit: Vec<(ServiceName, ServiceName)>,
    /// Unknown sources: every lookup level is tried before the default decides.
    miss: Vec<(ServiceName, ServiceName)>,
}

fn queries(n: usize) -> Queries {
    let dests = (n / 10).max(1);
    let exact = n.saturating_sub(2).max(1);
    let name = |s: String| -> ServiceName { s.parse().expect("name") };
    // A multiplicative hash spreads the queries over the table, deterministically.
    let pick = |i: usize| (i.wrapping_mul(2_654_435_761) >> 3) % exact;
    let hit = (0..QUERIES)
        .map(|i| {
            let k = pick(i);
            (
                name(format!("src-{}", k / dests)),
                name(format!("svc-{}", k % dests)),
            )
        })
        .collect();
    let miss = (0..QUERIES)
        .map(|i| {
            (
                name(format!("nobody-{i}")),
                name(format!("svc-{}", pick(i) % dests)),
            )
        })
        .collect();
    Queries { hit, miss }
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
}

struct InProcess {
    single: Percentiles,
    batch: Percentiles,
}

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: *v.last().expect("samples"),
    }
}

/// 1 000 000 calls timed one by one, then 10 000 batches of 100 timed as a whole.
fn percentiles_in_process(ixns: &Intentions, q: &Queries) -> InProcess {
    let pairs: Vec<&(ServiceName, ServiceName)> = q
        .hit
        .iter()
        .zip(&q.miss)
        .flat_map(|(a, b)| [a, b])
        .collect();
    let mut single = Vec::with_capacity(1_000_000);
    for i in 0..1_000_000 {
        let (s, d) = pairs[i % pairs.len()];
        let t = Instant::now();
        black_box(ixns.authorize(black_box(s), black_box(d)));
        single.push(t.elapsed());
    }
    let mut batch = Vec::with_capacity(10_000);
    for b in 0..10_000 {
        let t = Instant::now();
        for i in 0..100 {
            let (s, d) = pairs[(b * 100 + i) % pairs.len()];
            black_box(ixns.authorize(black_box(s), black_box(d)));
        }
        batch.push(t.elapsed() / 100);
    }
    InProcess {
        single: percentiles(single),
        batch: percentiles(batch),
    }
}

struct Http {
    count: usize,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    agent: AgentArgs,
}

fn http_bench(rt: &tokio::runtime::Runtime, c: &mut Criterion) -> Http {
    let data = tempfile::tempdir().expect("tempdir");
    let config = Flags::parse_from([
        "bench",
        "--dev",
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().expect("utf-8 path"),
    ])
    .agent
    .into_config()
    .expect("config");
    let (addr, stop) = rt.block_on(async {
        let agent = app::build(config, Arc::new(MemStore::new()), None, Shutdown::new())
            .await
            .expect("agent");
        populate(&agent.intentions, 1_000).await;
        let listener = api::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(api::serve(listener, agent, async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let url = format!("http://{addr}/v1/agent/connect/authorize");
    let body = serde_json::json!({
        "Target": "svc-1",
        "ClientCertURI": "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/src-3",
        "ClientCertSerial": "01:02",
    })
    .to_string();
    let call = || async {
        let resp = client
            .post(&url)
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert!(resp.status().is_success());
        black_box(resp.bytes().await.expect("body"));
    };

    let mut g = c.benchmark_group("authorize_http");
    g.throughput(Throughput::Elements(1));
    g.bench_function("loopback_keepalive", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    call().await;
                }
                t.elapsed()
            })
        })
    });
    g.finish();

    let count = 5_000;
    let samples = rt.block_on(async {
        let mut v = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            call().await;
            v.push(t.elapsed());
        }
        v
    });
    let _ = stop.send(());
    let p = percentiles(samples);
    Http {
        count,
        p50: p.p50,
        p99: p.p99,
        p999: p.p999,
        max: p.max,
    }
}

fn ns(d: Duration) -> String {
    format!("{} ns", d.as_nanos())
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
