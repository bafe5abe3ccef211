//! The data directory's protection (Consul's security checklist: configuration and
//! data directories readable by the agent's user only).
//!
//! At start the agent sets its umask to 077, so everything it writes is private,
//! creates the directory with mode 0700 if it is missing, and refuses to start if
//! the directory, or anything in it, is open to group or others, or if the
//! directory belongs to another user: the store holds the CA's private keys and the
//! ACL system's state. Operator-supplied key files (`--key-file`) get the same
//! check. [`inspect`] reports the same facts to `connect-agent doctor`.
//! This module does not open the store; it only guards where the store lives, and
//! keeps the node's ID there ([`node_id`]).

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Permission bits nobody but the owner may have on the data directory and its
/// contents.
const GROUP_OTHER: u32 = 0o077;
/// How deep and how many entries the check walks: the store is a file or two.
const MAX_DEPTH: usize = 4;
const MAX_ENTRIES: usize = 10_000;

/// Why the agent refuses its data directory or a key file. The operator must act;
/// each message names the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the data directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot inspect {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "refusing to start: {what} {path} is accessible to group or others (mode {mode:04o}); run `chmod {fix} {path}`"
    )]
    Exposed {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        fix: &'static str,
    },
    #[error(
        "refusing to start: the data directory {path} belongs to uid {owner}, not to the agent's uid {uid}; run `chown {uid} {path}`"
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "the data directory {path} holds more than {MAX_ENTRIES} entries; it is not a Connect data directory"
    )]
    TooManyEntries { path: PathBuf },
    #[error("cannot read the node ID file {path}: {source}")]
    NodeIdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to start: the node ID file {path} does not hold a UUID (it holds {found:?}); restore it from a backup, or remove it to give this node a new ID"
    )]
    NodeIdCorrupt { path: PathBuf, found: String },
    #[error("cannot write the node ID file {path}: {source}")]
    NodeIdWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file in the data directory that holds the node's ID (as Consul's
/// `node-id`: the UUID as text).
pub const NODE_ID_FILE: &str = "node-id";

/// Largest node ID file read: a UUID is 36 characters; anything much larger is not
/// one, and is not read into memory whole.
const NODE_ID_MAX_BYTES: u64 = 256;

/// The node's ID: read from [`NODE_ID_FILE`] in `dir`, or, on first start, a new
/// random UUID written there. Why it exists: node names are chosen by people and
/// collide (agents in network namespaces share the host name); the ID tells two
/// agents of one name apart, so that the second can be refused instead of taking
/// over the first one's catalog entries (see `catalog::Catalog::start`).
///
/// The file is written whole or not at all (a temporary file, fsync, rename, fsync
/// of the directory): a crash leaves either no ID or the ID. A file that does not
/// hold a UUID is an error naming the file, never silently replaced, since a new
/// ID would make the node a stranger to the catalog that knows it.
pub fn node_id(dir: &Path) -> Result<uuid::Uuid, Error> {
    use std::io::{Read, Write};
    let path = dir.join(NODE_ID_FILE);
    match fs::File::open(&path) {
        Ok(f) => {
            let mut text = String::new();
            f.take(NODE_ID_MAX_BYTES)
                .read_to_string(&mut text)
                .map_err(|source| match source.kind() {
                    std::io::ErrorKind::InvalidData => Error::NodeIdCorrupt {
                        path: path.clone(),
                        found: "bytes that are not UTF-8".into(),
                    },
                    _ => Error::NodeIdRead {
                        path: path.clone(),
                        source,
                    },
                })?;
            let trimmed = text.trim();
            // Hyphenated form only: what we write, and what Consul writes.
            match uuid::Uuid::try_parse(trimmed) {
                Ok(id) if trimmed.len() == 36 && !id.is_nil() => Ok(id),
                _ => Err(Error::NodeIdCorrupt {
                    path,
                    found: trimmed.chars().take(64).collect(),
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4();
            let write_err = |source| Error::NodeIdWrite {
                path: path.clone(),
                source,
            };
            let tmp = dir.join(format!("{NODE_ID_FILE}.tmp"));
            // A temporary file left by a crash during an earlier first start.
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(write_err(e)),
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(write_err)?;
            f.write_all(id.hyphenated().to_string().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(write_err)?;
            drop(f);
            fs::rename(&tmp, &path).map_err(write_err)?;
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_err)?;
            tracing::info!(node_id = %id, path = %path.display(), "node ID created");
            Ok(id)
        }
        Err(source) => Err(Error::NodeIdRead { path, source }),
    }
}

/// Makes the data directory private and checks it; call before opening the store.
pub fn prepare(dir: &Path) -> Result<(), Error> {
    // Every file the agent creates from now on is private (0600/0700).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Create {
                path: dir.to_owned(),
                source,
            })?;
        // `recursive` applies the mode to the last component only through the
        // umask; make sure of it.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            Error::Create {
                path: dir.to_owned(),
                source,
            }
        })?;
        tracing::info!(path = %dir.display(), "data directory created (mode 0700)");
    }
    check(dir)
}

/// Refuses a data directory that others can read or enter, or that holds anything
/// others can read or write.
pub fn check(dir: &Path) -> Result<(), Error> {
    let report = inspect(dir)?;
    if !report.is_dir {
        return Err(Error::NotADirectory {
            path: dir.to_owned(),
        });
    }
    if report.owner_uid != report.agent_uid {
        return Err(Error::Owner {
            path: dir.to_owned(),
            owner: report.owner_uid,
            uid: report.agent_uid,
        });
    }
    if report.mode & GROUP_OTHER != 0 {
        return Err(Error::Exposed {
            what: "the data directory",
            path: dir.to_owned(),
            mode: report.mode,
            fix: "700",
        });
    }
    if let Some(e) = report.exposed.into_iter().next() {
        return Err(Error::Exposed {
            what: if e.is_dir {
                "the directory"
            } else {
                "the file"
            },
            fix: if e.is_dir { "700" } else { "600" },
            path: e.path,
            mode: e.mode,
        });
    }
    Ok(())
}

/// Refuses a private key file that group or others can read or write.
pub fn check_key_file(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Stat {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER != 0 {
        return Err(Error::Exposed {
            what: "the key file",
            path: path.to_owned(),
            mode,
            fix: "600",
        });
    }
    Ok(())
}

/// One entry of the data directory that is open to group or others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    pub path: PathBuf,
    pub mode: u32,
    pub is_dir: bool,
}

/// The data directory's protection as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub is_dir: bool,
    /// Permission bits (`0o700`).
    pub mode: u32,
    pub owner_uid: u32,
    /// The agent's effective uid.
    pub agent_uid: u32,
    /// Entries inside that group or others may access.
    pub exposed: Vec<Exposed>,
}

/// Reads the directory's mode and owner and walks its contents (bounded).
pub fn inspect(dir: &Path) -> Result<Report, Error> {
    let stat = |p: &Path| {
        fs::metadata(p).map_err(|source| Error::Stat {
            path: p.to_owned(),
            source,
        })
    };
    let meta = stat(dir)?;
    let mut report = Report {
        is_dir: meta.is_dir(),
        mode: meta.permissions().mode() & 0o7777,
        owner_uid: meta.uid(),
        agent_uid: nix::unistd::geteuid().as_raw(),
        exposed: Vec::new(),
    };
    if report.is_dir {
        let mut seen = 0;
        walk(dir, 0, &mut seen, &mut report.exposed)?;
    }
    Ok(report)
}

fn walk(dir: &Path, depth: usize, seen: &mut usize, out: &mut Vec<Exposed>) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(|source| Error::Stat {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| Error::Stat {
            path: dir.to_owned(),
            source,
        })?;
        *seen += 1;
        if *seen > MAX_ENTRIES {
            return Err(Error::TooManyEntries {
                path: dir.to_owned(),
            });
        }
        let path = entry.path();
        // Follow symbolic links: what matters is who can read what they point to.
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            // A dangling link exposes nothing; an entry removed meanwhile neither.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Stat { path, source }),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER != 0 {
            out.push(Exposed {
                path: path.clone(),
                mode,
                is_dir: meta.is_dir(),
            });
        }
        let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
        if meta.is_dir() && !is_link && depth + 1 < MAX_DEPTH {
            walk(&path, depth + 1, seen, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn creates_private_and_refuses_exposed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("a/data");
        prepare(&dir).expect("fresh directory");
        assert_eq!(inspect(&dir).expect("inspect").mode, 0o700);
        // Files the agent writes are private thanks to the umask.
        fs::write(dir.join("connect.redb"), b"x").expect("write");
        assert_eq!(
            fs::metadata(dir.join("connect.redb"))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        check(&dir).expect("private");

        chmod(&dir, 0o755);
        let e = check(&dir).expect_err("world-readable dir").to_string();
        assert!(e.contains("mode 0755") && e.contains("chmod 700"), "{e}");
        chmod(&dir, 0o700);

        let file = dir.join("connect.redb");
        chmod(&file, 0o640);
        let e = check(&dir).expect_err("group-readable file").to_string();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("chmod 600"),
            "{e}"
        );
        chmod(&file, 0o600);

        let sub = dir.join("sub");
        fs::create_dir(&sub).expect("mkdir");
        fs::write(sub.join("k"), b"k").expect("write");
        chmod(&sub.join("k"), 0o604);
        assert!(check(&dir).is_err(), "nested files are checked");
        chmod(&sub.join("k"), 0o600);

        // A link to a readable file outside exposes that file.
        let outside = tmp.path().join("outside");
        fs::write(&outside, b"o").expect("write");
        chmod(&outside, 0o644);
        symlink(&outside, dir.join("link")).expect("symlink");
        assert!(check(&dir).is_err(), "links are followed");
        fs::remove_file(dir.join("link")).expect("rm");
        symlink(tmp.path().join("missing"), dir.join("dangling")).expect("symlink");
        check(&dir).expect("a dangling link exposes nothing");
    }

    #[test]
    fn key_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let key = tmp.path().join("key.pem");
        fs::write(&key, b"k").expect("write");
        chmod(&key, 0o600);
        check_key_file(&key).expect("private key");
        chmod(&key, 0o644);
        let e = check_key_file(&key).expect_err("readable key").to_string();
        assert!(e.contains("key file") && e.contains("chmod 600"), "{e}");
        assert!(check_key_file(&tmp.path().join("none")).is_err());
    }

    #[test]
    fn the_node_id_is_created_once_and_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let first = node_id(dir).expect("created");
        let file = dir.join(NODE_ID_FILE);
        assert_eq!(
            fs::read_to_string(&file).expect("read"),
            first.hyphenated().to_string()
        );
        assert_eq!(
            fs::metadata(&file).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(node_id(dir).expect("kept"), first, "a restart keeps the ID");
        assert!(!dir.join("node-id.tmp").exists());

        // Consul's file (or one edited by hand) may end with a newline.
        fs::write(&file, format!("{first}\n")).expect("write");
        assert_eq!(node_id(dir).expect("trailing newline"), first);

        // A crash during the first start may leave the temporary file behind.
        let other = tempfile::tempdir().expect("tmp");
        fs::write(other.path().join("node-id.tmp"), b"half").expect("write");
        let fresh = node_id(other.path()).expect("created over a stale temporary");
        assert_ne!(fresh, first, "IDs are random");
        assert_eq!(node_id(other.path()).expect("kept"), fresh);
    }

    #[test]
    fn a_corrupt_node_id_is_refused_and_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join(NODE_ID_FILE);
        for bad in [
            &b""[..],
            b"not-a-uuid",
            b"00000000-0000-0000-0000-000000000000",
            b"0123456789abcdef0123456789abcdef",
            b"\xff\xfe",
            &[b'7'; 4096],
        ] {
            fs::write(&file, bad).expect("write");
            let e = node_id(tmp.path()).expect_err("corrupt");
            assert!(matches!(e, Error::NodeIdCorrupt { .. }), "{bad:?}: {e}");
            let text = e.to_string();
            assert!(
                text.contains(&file.display().to_string()) && text.contains("remove it"),
                "{text}"
            );
            assert_eq!(fs::read(&file).expect("read"), bad, "left as it was");
        }
    }

    #[test]
    fn not_a_directory() {
        let tmp = tempfile::tempdir().expect("tmp");
        let f = tmp.path().join("file");
        fs::write(&f, b"x").expect("write");
        chmod(&f, 0o600);
        assert!(matches!(check(&f), Err(Error::NotADirectory { .. })));
    }
}
