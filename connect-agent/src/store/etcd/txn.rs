//! Translation of a [`Txn`] into one etcd transaction with the same effect (see
//! [`translate`]). Pure data in, data out, so every case is tested without etcd;
//! sending it is the parent module's job.

use std::collections::BTreeMap;

use etcd_client::{Compare as EtcdCompare, CompareOp, DeleteOptions, Txn as EtcdTxn, TxnOp};

use crate::store::{Compare, Op, Txn};

/// An etcd transaction equivalent to a [`Txn`]: plain data, so the translation is
/// tested without etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub compares: Vec<EtcdCmp>,
    pub deletes: Vec<EtcdDelete>,
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One etcd compare clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdCmp {
    /// `create_revision(key) == 0`: the key does not exist.
    Absent(Vec<u8>),
    /// `mod_revision(key) == n`.
    ModRevision(Vec<u8>, i64),
    /// A guard that cannot hold: `create_revision == 0 && create_revision > 0`.
    /// Stands for [`Compare::ModIndex`] with an index no existing key can have
    /// (`0`, which etcd would read as "absent", or one past `i64::MAX`).
    Never(Vec<u8>),
}

/// One etcd delete: a single key, or the range `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdDelete {
    Key(Vec<u8>),
    Range(Vec<u8>, Vec<u8>),
}

/// Translates `txn` (keys relative to `root`) into one etcd transaction with the same
/// effect.
///
/// [`Txn`] runs its operations in order; etcd applies a transaction's operations as
/// one change and rejects a put of a key that another operation also puts or
/// deletes. So the net effect is computed first: a key's last put survives unless a
/// later delete covers it; every delete stays, minus the keys that survive as puts
/// (a deleted prefix becomes the ranges between those keys). The result has no
/// overlap between puts and deletes, so the order etcd applies them in is irrelevant.
///
/// The one observable difference from [`crate::store::memory`]: a key that existed, was
/// deleted and was put again within one transaction keeps its old create index on
/// etcd (in memory it gets a new one), because etcd cannot delete and put one key
/// in one revision.
pub fn translate(root: &str, txn: &Txn) -> Translated {
    let full = |k: &str| -> Vec<u8> { [root.as_bytes(), k.as_bytes()].concat() };
    let compares = txn
        .compare
        .iter()
        .map(|c| match c {
            Compare::Absent(k) => EtcdCmp::Absent(full(k)),
            Compare::ModIndex(k, n) => match i64::try_from(*n) {
                Ok(n) if n > 0 => EtcdCmp::ModRevision(full(k), n),
                _ => EtcdCmp::Never(full(k)),
            },
        })
        .collect();

    // Net effect, in operation order.
    enum Del {
        Key(Vec<u8>),
        Prefix(Vec<u8>),
    }
    let mut puts: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut dels: Vec<Del> = Vec::new();
    for op in &txn.ops {
        match op {
            Op::Put { key, value } => {
                puts.insert(full(key), value.clone());
            }
            Op::Delete { key } => {
                let k = full(key);
                puts.remove(&k);
                dels.push(Del::Key(k));
            }
            Op::DeletePrefix { prefix } => {
                let p = full(prefix);
                puts.retain(|k, _| !k.starts_with(&p));
                dels.push(Del::Prefix(p));
            }
        }
    }

    let mut deletes = Vec::new();
    for d in dels {
        match d {
            Del::Key(k) => {
                if !puts.contains_key(&k) {
                    deletes.push(EtcdDelete::Key(k));
                }
            }
            Del::Prefix(p) => {
                let end = prefix_end(&p);
                let mut from = p.clone();
                for kept in puts.keys().filter(|k| k.starts_with(&p)) {
                    if from < *kept {
                        deletes.push(EtcdDelete::Range(from, kept.clone()));
                    }
                    // The smallest key after `kept`.
                    from = [kept.as_slice(), &[0]].concat();
                }
                if from < end {
                    deletes.push(EtcdDelete::Range(from, end));
                }
            }
        }
    }
    Translated {
        compares,
        deletes,
        puts: puts.into_iter().collect(),
    }
}

impl Translated {
    pub(super) fn to_etcd(&self) -> EtcdTxn {
        let mut compares = Vec::with_capacity(self.compares.len());
        for c in &self.compares {
            match c {
                EtcdCmp::Absent(k) => {
                    compares.push(EtcdCompare::create_revision(k.clone(), CompareOp::Equal, 0));
                }
                EtcdCmp::ModRevision(k, n) => {
                    compares.push(EtcdCompare::mod_revision(k.clone(), CompareOp::Equal, *n));
                }
                EtcdCmp::Never(k) => {
                    compares.push(EtcdCompare::create_revision(k.clone(), CompareOp::Equal, 0));
                    compares.push(EtcdCompare::create_revision(
                        k.clone(),
                        CompareOp::Greater,
                        0,
                    ));
                }
            }
        }
        let mut ops = Vec::with_capacity(self.deletes.len() + self.puts.len());
        for d in &self.deletes {
            ops.push(match d {
                EtcdDelete::Key(k) => TxnOp::delete(k.clone(), None),
                EtcdDelete::Range(start, end) => TxnOp::delete(
                    start.clone(),
                    Some(DeleteOptions::new().with_range(end.clone())),
                ),
            });
        }
        for (k, v) in &self.puts {
            ops.push(TxnOp::put(k.clone(), v.clone(), None));
        }
        EtcdTxn::new().when(compares).and_then(ops)
    }
}

/// The end of the range of keys that start with `prefix` (etcd's `range_end`): the
/// prefix with its last byte that is not 0xff incremented and the rest cut.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: etcd spells "to the end of the key space" as "\0".
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    fn range(start: &str, end: &str) -> EtcdDelete {
        EtcdDelete::Range(b(start), b(end))
    }

    #[test]
    fn translation_matches_in_order_semantics() {
        // (name, txn, expected deletes, expected puts)
        type Case = (
            &'static str,
            Txn,
            Vec<EtcdDelete>,
            Vec<(&'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (
                "plain put",
                Txn::new().put("a", "1"),
                vec![],
                vec![("/r/a", "1")],
            ),
            (
                "last put of a key wins",
                Txn::new().put("a", "1").put("a", "2"),
                vec![],
                vec![("/r/a", "2")],
            ),
            (
                "put then delete: deleted",
                Txn::new().put("a", "1").delete("a"),
                vec![EtcdDelete::Key(b("/r/a"))],
                vec![],
            ),
            (
                "delete then put: put only",
                Txn::new().delete("a").put("a", "1"),
                vec![],
                vec![("/r/a", "1")],
            ),
            (
                "delete prefix alone",
                Txn::new().delete_prefix("p/"),
                vec![range("/r/p/", "/r/p0")],
                vec![],
            ),
            (
                "put, delete prefix, put: the later put is cut out of the range",
                Txn::new()
                    .put("p/b", "2")
                    .delete_prefix("p/")
                    .put("p/c", "3"),
                vec![range("/r/p/", "/r/p/c"), range("/r/p/c\0", "/r/p0")],
                vec![("/r/p/c", "3")],
            ),
            (
                "several kept keys split the range",
                Txn::new()
                    .delete_prefix("p/")
                    .put("p/x", "1")
                    .put("p/a", "2")
                    .put("q", "3"),
                vec![
                    range("/r/p/", "/r/p/a"),
                    range("/r/p/a\0", "/r/p/x"),
                    range("/r/p/x\0", "/r/p0"),
                ],
                vec![("/r/p/a", "2"), ("/r/p/x", "1"), ("/r/q", "3")],
            ),
            (
                "a kept key equal to the prefix leaves no empty range",
                Txn::new().delete_prefix("p").put("p", "1"),
                vec![range("/r/p\0", "/r/q")],
                vec![("/r/p", "1")],
            ),
            (
                "the empty prefix covers the whole root",
                Txn::new().put("a", "1").delete_prefix(""),
                vec![range("/r/", "/r0")],
                vec![],
            ),
        ];
        for (name, txn, deletes, puts) in cases {
            let t = translate("/r/", &txn);
            assert_eq!(t.deletes, deletes, "{name}");
            let puts: Vec<(Vec<u8>, Vec<u8>)> =
                puts.into_iter().map(|(k, v)| (b(k), b(v))).collect();
            assert_eq!(t.puts, puts, "{name}");
        }
    }

    #[test]
    fn compares_translate_and_impossible_indexes_never_hold() {
        let txn = Txn::new()
            .when(Compare::Absent("a".into()))
            .when(Compare::ModIndex("b".into(), 7))
            .when(Compare::ModIndex("c".into(), 0))
            .when(Compare::ModIndex("d".into(), u64::MAX));
        assert_eq!(
            translate("/r/", &txn).compares,
            vec![
                EtcdCmp::Absent(b("/r/a")),
                EtcdCmp::ModRevision(b("/r/b"), 7),
                EtcdCmp::Never(b("/r/c")),
                EtcdCmp::Never(b("/r/d")),
            ]
        );
    }

    #[test]
    fn prefix_ends() {
        for (prefix, end) in [
            (&b"/connect/"[..], &b"/connect0"[..]),
            (b"a", b"b"),
            (b"a\xff", b"b"),
            (b"\xff\xff", b"\0"),
        ] {
            assert_eq!(prefix_end(prefix), end.to_vec(), "{prefix:?}");
        }
    }
}
