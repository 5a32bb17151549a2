//! The one atomic writer. Every file kps-sync puts on disk (keys, the state file) goes through
//! [`write_atomic`]; nothing else in the crate calls `fs::write`.
//!
//! Invariants:
//! - the bytes never exist on disk with a mode wider than the declared one: the temporary file
//!   is created with the final mode (umask can only narrow it), `O_EXCL` and `O_NOFOLLOW`;
//! - owner and group are set on the descriptor before any byte is written;
//! - the target is replaced by `rename(2)` after `fsync`, then the folder is synced, so a crash
//!   leaves either the old file or the new one, never a truncated one;
//! - a destination that is a symlink (or not a regular file) is refused, never followed;
//! - on any failure the temporary file is removed and the old target is untouched.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::observe::{self, Observed};

/// What the file must look like besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// Permission bits (at most 0o777; the manifest allows far less).
    pub mode: u32,
    /// chown to this uid; `None` keeps the writer's own.
    pub uid: Option<u32>,
    /// chown to this gid; `None` keeps the writer's own.
    pub gid: Option<u32>,
}

impl FileMeta {
    pub const PRIVATE: FileMeta = FileMeta {
        mode: 0o600,
        uid: None,
        gid: None,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "{path}: is a symlink; kps-sync never writes through a symlink. Remove the link or point the manifest at the real path"
    )]
    Symlink { path: PathBuf },
    #[error("{path}: exists and is not a regular file; move it away or change the manifest's path")]
    NotRegular { path: PathBuf },
    #[error("{path}: has no parent folder; use an absolute file path")]
    NoParent { path: PathBuf },
    #[error(
        "{path}: cannot create the folder: {source}; create it (mode 0700) or fix its parent's permissions"
    )]
    CreateDir { path: PathBuf, source: io::Error },
    #[error(
        "{path}: cannot create a temporary file in its folder: {source}; check the folder is writable (systemd: ReadWritePaths=)"
    )]
    TempFile { path: PathBuf, source: io::Error },
    #[error(
        "{path}: cannot set owner {uid:?} / group {gid:?}: {source}; kps-sync needs CAP_CHOWN to set another owner"
    )]
    Chown {
        path: PathBuf,
        uid: Option<u32>,
        gid: Option<u32>,
        source: io::Error,
    },
    #[error(
        "{path}: changed on disk while kps-sync was exporting (another writer?); it is kept as it is now and checked again on the next pass"
    )]
    Changed { path: PathBuf },
    #[error(
        "{path}: has other hard links; kps-sync does not change a file that is also elsewhere. Remove the extra links"
    )]
    HardLinked { path: PathBuf },
    #[error("{path}: {op} failed: {source}; the previous file, if any, is untouched")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

/// What the caller saw at the destination when it planned the write. The writer checks it is
/// still so just before the rename, so a file that appeared or changed meanwhile (while the key
/// was being exported) is never overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prior<'a> {
    /// Replace whatever is there (the state file, which only kps-sync writes).
    Anything,
    /// Nothing was there: the rename must not replace anything (`RENAME_NOREPLACE`).
    Absent,
    /// A regular file with this `sha256:<hex>` was there (or nothing, since).
    Sha256(&'a str),
}

/// Write `contents` to `path` atomically with `meta`. Missing parent folders are created 0700.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    meta: FileMeta,
    prior: Prior<'_>,
) -> Result<(), WriteError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| WriteError::NoParent {
            path: path.to_owned(),
        })?;
    create_dirs(dir)?;
    refuse_non_regular(path)?;

    let mode = meta.mode & 0o777;
    let mut temp = tempfile::Builder::new()
        .prefix(".kps-sync-")
        .suffix(".tmp")
        .make_in(dir, |temp_path| {
            OpenOptions::new()
                .write(true)
                .create_new(true) // O_CREAT | O_EXCL
                .mode(mode)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(temp_path)
        })
        .map_err(|source| WriteError::TempFile {
            path: path.to_owned(),
            source,
        })?;

    let io_err = |op: &'static str| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, op, source }
    };
    let file = temp.as_file_mut();
    chown(file, path, meta)?;
    // The umask may have narrowed the mode at creation; set it exactly, still before any byte.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(io_err("chmod"))?;
    file.write_all(contents).map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("fsync"))?;

    // A symlink planted between the check above and now is replaced by rename, not followed.
    match prior {
        Prior::Absent => temp.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == io::ErrorKind::AlreadyExists {
                WriteError::Changed {
                    path: path.to_owned(),
                }
            } else {
                io_err("rename")(e.error)
            }
        })?,
        Prior::Sha256(_) | Prior::Anything => {
            still_as_seen(path, prior)?;
            temp.persist(path).map_err(|e| io_err("rename")(e.error))?
        }
    };
    sync_dir(dir).map_err(io_err("fsync of the folder"))
}

/// Is the destination still what the plan saw?
fn still_as_seen(path: &Path, prior: Prior<'_>) -> Result<(), WriteError> {
    let Prior::Sha256(expected) = prior else {
        return Ok(());
    };
    match observe::observe(path) {
        Observed::Missing => Ok(()),
        Observed::Regular(facts) if facts.sha256 == expected => Ok(()),
        _ => Err(WriteError::Changed {
            path: path.to_owned(),
        }),
    }
}

/// Set mode, owner and group of an existing file without rewriting it (`fix-meta`). Everything
/// is checked and done through one descriptor: it must be a regular file with one link, holding
/// exactly the bytes kps-sync wrote (`expected`).
pub fn fix_meta(path: &Path, meta: FileMeta, expected: &str) -> Result<(), WriteError> {
    let mut file = open_ours(path, expected)?;
    chown(&file, path, meta)?;
    let file = &mut file;
    file.set_permissions(Permissions::from_mode(meta.mode & 0o777))
        .map_err(|source| WriteError::Io {
            path: path.to_owned(),
            op: "chmod",
            source,
        })
}

/// Open a file kps-sync wrote, checking through the descriptor that it still is.
fn open_ours(path: &Path, expected: &str) -> Result<File, WriteError> {
    let (mut file, meta) = observe::open_regular(path).map_err(|found| match found {
        Observed::Symlink => WriteError::Symlink {
            path: path.to_owned(),
        },
        _ => WriteError::Changed {
            path: path.to_owned(),
        },
    })?;
    if meta.nlink() != 1 {
        return Err(WriteError::HardLinked {
            path: path.to_owned(),
        });
    }
    match observe::hash_open(&mut file) {
        Ok(sha256) if sha256 == expected => Ok(file),
        Ok(_) => Err(WriteError::Changed {
            path: path.to_owned(),
        }),
        Err(source) => Err(WriteError::Io {
            path: path.to_owned(),
            op: "read",
            source,
        }),
    }
}

/// Delete a file kps-sync wrote (`prune`), only if it still holds exactly the bytes written.
pub fn remove(path: &Path, expected: &str) -> Result<(), WriteError> {
    match open_ours(path, expected) {
        Ok(_) => {}
        Err(WriteError::Changed { .. }) if !path.exists() => return Ok(()),
        Err(e) => return Err(e),
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(WriteError::Io {
                path: path.to_owned(),
                op: "remove",
                source,
            });
        }
    }
    match path.parent() {
        Some(dir) => sync_dir(dir).map_err(|source| WriteError::Io {
            path: path.to_owned(),
            op: "fsync of the folder",
            source,
        }),
        None => Ok(()),
    }
}

/// Create `dir` and any missing parents with mode 0700.
pub fn create_dirs(dir: &Path) -> Result<(), WriteError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| WriteError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// Set owner and group on the descriptor, if the manifest names them.
fn chown(file: &File, path: &Path, meta: FileMeta) -> Result<(), WriteError> {
    if meta.uid.is_none() && meta.gid.is_none() {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, meta.uid, meta.gid).map_err(|source| WriteError::Chown {
        path: path.to_owned(),
        uid: meta.uid,
        gid: meta.gid,
        source,
    })
}

fn refuse_non_regular(path: &Path) -> Result<(), WriteError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(WriteError::Symlink {
            path: path.to_owned(),
        }),
        Ok(m) if !m.file_type().is_file() => Err(WriteError::NotRegular {
            path: path.to_owned(),
        }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(WriteError::Io {
            path: path.to_owned(),
            op: "stat",
            source,
        }),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn sha(bytes: &[u8]) -> String {
        observe::sha256_of(bytes)
    }

    #[test]
    fn writes_with_the_declared_mode_and_creates_parents_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("a/b/key.pem");
        let meta = FileMeta {
            mode: 0o640,
            ..FileMeta::PRIVATE
        };
        write_atomic(&target, b"secret", meta, Prior::Absent).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"secret");
        assert_eq!(mode_of(&target), 0o640);
        assert_eq!(mode_of(&tmp.path().join("a")), 0o700);
        assert_eq!(mode_of(&tmp.path().join("a/b")), 0o700);
        let leftovers: Vec<_> = fs::read_dir(tmp.path().join("a/b")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn replaces_the_file_it_saw_and_keeps_the_mode_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("key");
        write_atomic(&target, b"old", FileMeta::PRIVATE, Prior::Absent).unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        let meta = FileMeta {
            mode: 0o400,
            ..FileMeta::PRIVATE
        };
        write_atomic(&target, b"new", meta, Prior::Sha256(&sha(b"old"))).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(mode_of(&target), 0o400);
    }

    #[test]
    fn a_file_that_appeared_or_changed_since_the_plan_is_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("key");
        fs::write(&target, b"the admin's own file").unwrap();
        let err = write_atomic(&target, b"secret", FileMeta::PRIVATE, Prior::Absent).unwrap_err();
        assert!(matches!(err, WriteError::Changed { .. }), "{err}");
        let err = write_atomic(
            &target,
            b"secret",
            FileMeta::PRIVATE,
            Prior::Sha256(&sha(b"ours")),
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::Changed { .. }), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"the admin's own file");
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "temporary files removed"
        );
    }

    #[test]
    fn refuses_a_symlink_destination_and_leaves_its_target_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let link = tmp.path().join("key");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = write_atomic(&link, b"secret", FileMeta::PRIVATE, Prior::Anything).unwrap_err();
        assert!(matches!(err, WriteError::Symlink { .. }), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let err = fix_meta(&link, FileMeta::PRIVATE, &sha(b"precious")).unwrap_err();
        assert!(matches!(err, WriteError::Symlink { .. }), "{err}");
    }

    #[test]
    fn refuses_a_directory_destination() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(write_atomic(tmp.path(), b"x", FileMeta::PRIVATE, Prior::Anything).is_err());
    }

    #[test]
    fn sets_owner_and_group_on_the_descriptor() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("key");
        let meta = FileMeta {
            uid: Some(4242),
            gid: Some(4343),
            ..FileMeta::PRIVATE
        };
        write_atomic(&target, b"k", meta, Prior::Absent).unwrap();
        let m = fs::metadata(&target).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4242, 4343, 0o600));
    }

    #[test]
    fn fix_meta_and_remove_touch_only_our_intact_single_link_file() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("key");
        write_atomic(&target, b"k", FileMeta::PRIVATE, Prior::Absent).unwrap();
        let ours = sha(b"k");
        fix_meta(
            &target,
            FileMeta {
                mode: 0o400,
                ..FileMeta::PRIVATE
            },
            &ours,
        )
        .unwrap();
        assert_eq!(mode_of(&target), 0o400);

        let link = tmp.path().join("elsewhere");
        fs::hard_link(&target, &link).unwrap();
        let err = fix_meta(&target, FileMeta::PRIVATE, &ours).unwrap_err();
        assert!(matches!(err, WriteError::HardLinked { .. }), "{err}");
        assert!(remove(&target, &ours).is_err());
        fs::remove_file(&link).unwrap();

        assert!(remove(&target, &sha(b"not what is there")).is_err());
        assert!(target.exists());
        remove(&target, &ours).unwrap();
        assert!(!target.exists());
        remove(&target, &ours).unwrap();
    }

    #[test]
    fn a_fifo_at_the_destination_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("key");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(fix_meta(&fifo, FileMeta::PRIVATE, &sha(b"")).is_err());
        assert!(remove(&fifo, &sha(b"")).is_err());
        assert!(write_atomic(&fifo, b"x", FileMeta::PRIVATE, Prior::Absent).is_err());
    }
}
