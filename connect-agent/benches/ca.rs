//! CA throughput: leaves signed per second (agent-generated key + signature, what
//! each renewal costs) and peer chains verified per second (the handshake path).
//!
//! `cargo bench -p connect-agent --bench ca`. Criterion reports time per
//! operation; the throughput line gives operations per second.

use std::{hint::black_box, sync::Arc, time::Duration};

use connect_agent::{
    ca::{BuiltinProvider, CaManager, PeerRole, verify_chain},
    identity::{Datacenter, ServiceName},
    store::memory::MemStore,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::pki_types::UnixTime;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = rt
        .block_on(CaManager::start_with(
            Arc::new(BuiltinProvider),
            Datacenter::default(),
            Arc::new(MemStore::new()),
        ))
        .expect("CA");
    let web: ServiceName = "web".parse().expect("name");
    let state = ca.state();
    let csr_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{}/ns/default/dc/dc1/svc/web", state.trust_domain)
            .try_into()
            .expect("uri"),
    )];
    let csr = params
        .serialize_request(&csr_key)
        .expect("csr")
        .der()
        .to_vec();

    let mut g = c.benchmark_group("ca");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));

    // A fresh leaf: key generation, signing, PEM and rustls key, as renewal does.
    let leaf = rt
        .block_on(ca.leaf(&web))
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    g.bench_function("sign_leaf_with_new_key", |b| {
        b.iter(|| black_box(ca.issue_leaf(&web).expect("issued")))
    });
    // Signing an external CSR (screening + signature).
    g.bench_function("sign_csr", |b| {
        b.iter(|| black_box(ca.sign_csr(&csr).expect("signed")))
    });
    // Verifying a peer's chain against the bundle, as every handshake does.
    let bundle = state.bundle.clone();
    let chain = leaf.cert.chain.clone();
    g.bench_function("verify_chain", |b| {
        b.iter(|| {
            black_box(
                verify_chain(&chain, &bundle, UnixTime::now(), PeerRole::Client).expect("valid"),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
