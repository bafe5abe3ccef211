//! Gives every mesh service in the catalog a virtual IP.
//!
//! A follower task watches the catalog and, for each typical service (any node)
//! that has no virtual IP yet, asks the [`vip::Allocator`] for one. Allocation goes
//! through a store transaction, so every agent sharing the store ends up with the
//! same address for a service whichever allocates first, and a service keeps its
//! address across deregistration and restarts. Failures (a store error) are logged
//! and retried with backoff; a catalog change retries at once.
//!
//! The DNS server also allocates on a `<svc>.virtual.consul` query for a service
//! this task has not reached yet; both paths end in the same transaction.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio_util::task::AbortOnDropHandle;

use super::{Catalog, CatalogSnapshot};
use crate::{identity::ServiceName, vip};

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// The services of `snap` that get a virtual IP: every typical service, any node.
pub fn mesh_services(snap: &CatalogSnapshot) -> BTreeSet<ServiceName> {
    snap.all()
        .filter(|i| i.service.kind.is_typical())
        .map(|i| i.service.service.clone())
        .collect()
}

/// Allocates what `snap` needs; returns how many allocations failed.
pub async fn allocate_missing(snap: &CatalogSnapshot, vips: &vip::Allocator) -> usize {
    let mut failed = 0;
    for service in mesh_services(snap) {
        if vips.vip_of(&service).is_some() {
            continue;
        }
        if let Err(error) = vips.get_or_allocate(&service).await {
            tracing::warn!(%service, %error, "cannot allocate a virtual IP; retrying");
            failed += 1;
        }
    }
    failed
}

/// Starts the follower. It stops when the handle is dropped or the catalog goes.
pub fn start(catalog: &Arc<Catalog>, vips: Arc<vip::Allocator>) -> AbortOnDropHandle<()> {
    let mut views = catalog.subscribe();
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut backoff = RETRY_MIN;
        loop {
            let snap = views.borrow_and_update().clone();
            let failed = allocate_missing(&snap, &vips).await;
            if failed == 0 {
                backoff = RETRY_MIN;
                if views.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                r = views.changed() => if r.is_err() { return },
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, store::memory::MemStore};

    #[tokio::test]
    async fn every_mesh_service_gets_one_stable_address() {
        let store: Arc<dyn crate::store::Store> = Arc::new(MemStore::new());
        let catalog = Catalog::start(
            &Config::for_tests().catalog(),
            &crate::catalog::NodeId::for_tests(),
            store.clone(),
        )
        .await
        .expect("catalog");
        let vips = vip::Allocator::start(store.clone()).await.expect("vips");
        let _follower = start(&catalog, vips.clone());
        let mut table = vips.subscribe();
        for body in [
            serde_json::json!({"ID": "socat-1", "Name": "socat", "Port": 8181}),
            serde_json::json!({"ID": "socat-2", "Name": "socat", "Port": 8182}),
            serde_json::json!({"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}}),
        ] {
            catalog.register(&body).await.expect("register");
        }
        let name = |s: &str| s.parse::<ServiceName>().expect("name");
        tokio::time::timeout(Duration::from_secs(5), async {
            while table.borrow_and_update().len() < 2 {
                table.changed().await.expect("allocator alive");
            }
        })
        .await
        .expect("socat and web get addresses");
        let socat = vips.vip_of(&name("socat")).expect("socat");
        assert!(vip::is_virtual(socat));
        assert_ne!(vips.vip_of(&name("web")), Some(socat));
        assert_eq!(
            vips.vip_of(&name("web-sidecar-proxy")),
            None,
            "a sidecar is not a destination"
        );

        // Deregistered and registered again: the same address. Another allocator on
        // the same store (another agent) sees the same table.
        catalog.deregister("socat-1").await.expect("deregister");
        catalog.deregister("socat-2").await.expect("deregister");
        catalog
            .register(&serde_json::json!({"ID": "socat-3", "Name": "socat", "Port": 8183}))
            .await
            .expect("register");
        let other = vip::Allocator::start(store).await.expect("other");
        assert_eq!(other.vip_of(&name("socat")), Some(socat));
        assert_eq!(vips.vip_of(&name("socat")), Some(socat));
        assert_eq!(vips.snapshot().len(), 2);
    }
}
