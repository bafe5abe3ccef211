//! The task behind each etcd [`crate::store::Store::watch`]: opens an etcd watch from
//! the first revision not yet delivered, forwards each revision's events as one
//! [`WatchMessage::Events`], and after any failure reopens with backoff from where it
//! stopped, or at once (after a short pause) when the store sees etcd answer again.
//! It ends (dropping its sender) on compaction or a consumer that fell
//! behind, after sending [`WatchMessage::Resync`], or when the consumer or the store
//! is gone.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use etcd_client::{Client, WatchOptions, WatchResponse, proto::PbEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    MAX_RESPONSE_BYTES, Reachability, WATCH_BACKOFF, is_transient, note_revision, rev_to_index,
    strip_root,
};
use crate::store::{Event, Index, KeyValue, WatchMessage, backoff::Backoff};

/// Follows one watch: opens it, forwards events grouped by revision, and reopens
/// after failures from the revision after the last one delivered.
pub(super) struct WatchTask {
    pub(super) client: Client,
    pub(super) root: String,
    pub(super) start: Vec<u8>,
    pub(super) end: Vec<u8>,
    /// The first revision not yet delivered.
    pub(super) next: Index,
    pub(super) tx: mpsc::Sender<WatchMessage>,
    pub(super) index: Arc<AtomicU64>,
    /// Told when this watch finds etcd unreachable or answering; wakes the task from
    /// its backoff when anything of the store gets through again.
    pub(super) reach: Arc<Reachability>,
    pub(super) stop: CancellationToken,
    pub(super) open_timeout: Duration,
    /// Events of a response that etcd split into fragments, until the last one.
    pub(super) pending: Vec<PbEvent>,
    /// Key and value bytes in `pending`, bounded by [`MAX_RESPONSE_BYTES`].
    pub(super) pending_bytes: usize,
}

/// Why a watch stream ended.
enum StreamEnd {
    /// The consumer is gone, the store was dropped, or the watch is over: stop.
    Done,
    /// The stream broke: reconnect.
    Broken,
}

impl WatchTask {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(WATCH_BACKOFF.0, WATCH_BACKOFF.1);
        let mut recovered = self.reach.subscribe();
        loop {
            // Recoveries from here on cut the backoff below short; earlier ones were
            // before this attempt and say nothing about it.
            recovered.borrow_and_update();
            match self.follow(&mut backoff).await {
                StreamEnd::Done => return,
                StreamEnd::Broken => {}
            }
            let delay = backoff.next_wait();
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(delay) => {}
                Ok(()) = recovered.changed() => {
                    // etcd answers again: reopen soon, after the shortest jittered
                    // pause, so the watches of a cluster's agents do not all reopen in
                    // one instant and a watch that fails while requests succeed
                    // retries at most a few times a second.
                    backoff.reset();
                    let pause = backoff.next_wait();
                    tracing::debug!(from = self.next, ?pause, "etcd answers again, reopening the watch");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Opens the watch and forwards its responses until it ends.
    async fn follow(&mut self, backoff: &mut Backoff) -> StreamEnd {
        let Ok(start_revision) = i64::try_from(self.next) else {
            // A revision past i64::MAX never comes: nothing will ever be delivered.
            return self.wait_until_dropped().await;
        };
        // Fragments keep each message below etcd's request size limit however
        // large one revision's events are; `deliver` joins them again.
        let opts = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(start_revision)
            .with_fragment();
        // Fragments of a broken stream are sent again by the new one.
        self.pending.clear();
        self.pending_bytes = 0;
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let open = client.watch(self.start.clone(), Some(opts));
        let opened = tokio::select! {
            _ = self.stop.cancelled() => return StreamEnd::Done,
            _ = self.tx.closed() => return StreamEnd::Done,
            r = tokio::time::timeout(self.open_timeout, open) => r,
        };
        let mut stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(error)) => {
                if is_transient(&error) {
                    self.reach.failed();
                }
                tracing::warn!(%error, from = self.next, "cannot open etcd watch, retrying");
                return StreamEnd::Broken;
            }
            Err(_) => {
                self.reach.failed();
                tracing::warn!(timeout = ?self.open_timeout, from = self.next, "opening etcd watch timed out, retrying");
                return StreamEnd::Broken;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = self.stop.cancelled() => return StreamEnd::Done,
                _ = self.tx.closed() => return StreamEnd::Done,
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    self.reach.failed();
                    tracing::warn!(
                        from = self.next,
                        "etcd closed the watch stream, reconnecting"
                    );
                    return StreamEnd::Broken;
                }
                Err(error) => {
                    if is_transient(&error) {
                        self.reach.failed();
                    }
                    tracing::warn!(%error, from = self.next, "etcd watch failed, reconnecting");
                    return StreamEnd::Broken;
                }
            };
            if resp.created() {
                // The watch is established: the next failure starts from a short
                // delay, and other watches waiting out a backoff may retry now.
                backoff.reset();
                self.reach.answered();
            }
            match self.deliver(resp) {
                Delivery::Continue => {}
                Delivery::Reopen => return StreamEnd::Broken,
                Delivery::Done => return StreamEnd::Done,
            }
        }
    }

    /// Forwards one watch response to the consumer.
    fn deliver(&mut self, mut resp: WatchResponse) -> Delivery {
        note_revision(&self.index, resp.header().map(|h| h.revision()));
        if resp.compact_revision() != 0 {
            // The history after `next - 1` is gone: only a fresh listing is correct.
            tracing::info!(
                from = self.next,
                compacted = resp.compact_revision(),
                "etcd history compacted, consumer must resync"
            );
            let _ = self.tx.try_send(WatchMessage::Resync);
            return Delivery::Done;
        }
        if resp.canceled() {
            tracing::warn!(reason = %resp.cancel_reason(), from = self.next, "etcd cancelled the watch, reopening");
            return Delivery::Reopen;
        }
        let fragment = std::mem::take(&mut resp.0.events);
        self.pending_bytes += fragment
            .iter()
            .filter_map(|e| e.kv.as_ref())
            .map(|kv| kv.key.len() + kv.value.len())
            .sum::<usize>();
        if self.pending_bytes > MAX_RESPONSE_BYTES {
            tracing::warn!(
                from = self.next,
                bytes = self.pending_bytes,
                "etcd watch response too large to buffer, consumer must resync"
            );
            let _ = self.tx.try_send(WatchMessage::Resync);
            return Delivery::Done;
        }
        self.pending.extend(fragment);
        if resp.0.fragment {
            return Delivery::Continue;
        }
        self.pending_bytes = 0;
        let events = std::mem::take(&mut self.pending);
        for (revision, group) in group_by_revision(&self.root, events) {
            if !group.is_empty() {
                // One slot is kept for the Resync (as in memory.rs), so a consumer
                // that falls behind is told so rather than finding its stream ended.
                if self.tx.capacity() <= 1 {
                    tracing::info!(from = self.next, "watch consumer fell behind, must resync");
                    let _ = self.tx.try_send(WatchMessage::Resync);
                    return Delivery::Done;
                }
                if self.tx.try_send(WatchMessage::Events(group)).is_err() {
                    return Delivery::Done;
                }
            }
            self.next = self.next.max(revision.saturating_add(1));
        }
        Delivery::Continue
    }

    async fn wait_until_dropped(&self) -> StreamEnd {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.tx.closed() => {}
        }
        StreamEnd::Done
    }
}

enum Delivery {
    Continue,
    Reopen,
    Done,
}

/// Turns one watch response's events into store events, one group per revision (one
/// etcd transaction), each group sorted by key as [`crate::store::memory`] orders them.
/// Events of keys that are not ours, or of unknown types, are logged and dropped; their
/// revision still appears (possibly with no events) so the watch moves past it.
fn group_by_revision(
    root: &str,
    events: Vec<etcd_client::proto::PbEvent>,
) -> Vec<(Index, Vec<Event>)> {
    let mut groups: Vec<(Index, Vec<Event>)> = Vec::new();
    for ev in events {
        let Some(kv) = ev.kv else {
            tracing::warn!("etcd sent a watch event without a key, ignored");
            continue;
        };
        let revision = rev_to_index(kv.mod_revision);
        let create_index = rev_to_index(kv.create_revision);
        if groups.last().is_none_or(|(rev, _)| *rev != revision) {
            groups.push((revision, Vec::new()));
        }
        let Some(key) = strip_root(root, kv.key) else {
            continue;
        };
        let event = match ev.r#type {
            // mvccpb.Event.EventType: PUT = 0, DELETE = 1.
            0 => Event::Put(KeyValue {
                key,
                value: kv.value,
                create_index,
                mod_index: revision,
            }),
            1 => Event::Delete {
                key,
                index: revision,
            },
            other => {
                tracing::warn!(r#type = other, %key, "etcd sent a watch event of unknown type, ignored");
                continue;
            }
        };
        if let Some((_, group)) = groups.last_mut() {
            group.push(event);
        }
    }
    for (_, group) in &mut groups {
        group.sort_by(|a, b| a.key().cmp(b.key()));
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn watch_events_group_by_revision_sorted_by_key() {
        use etcd_client::proto::{PbEvent, PbKeyValue};
        let ev = |t: i32, key: &str, rev: i64| PbEvent {
            r#type: t,
            kv: Some(PbKeyValue {
                key: b(key),
                create_revision: 1,
                mod_revision: rev,
                value: b("v"),
                ..Default::default()
            }),
            prev_kv: None,
        };
        let groups = group_by_revision(
            "/r/",
            vec![
                ev(0, "/r/b", 5),
                ev(1, "/r/a", 5),
                ev(7, "/r/c", 6),
                ev(0, "/elsewhere", 6),
                ev(0, "/r/d", 7),
            ],
        );
        let summary: Vec<(Index, Vec<String>)> = groups
            .iter()
            .map(|(r, g)| (*r, g.iter().map(|e| e.key().to_owned()).collect()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (5, vec!["a".to_owned(), "b".to_owned()]),
                (6, vec![]),
                (7, vec!["d".to_owned()]),
            ]
        );
        assert_eq!(
            groups[0].1[0],
            Event::Delete {
                key: "a".into(),
                index: 5
            }
        );
    }
}
