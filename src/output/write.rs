//! The one atomic writer. Every file kps-sync puts on disk (keys, `.pub` files, the state file,
//! the metrics file) goes through [`write_atomic`]; `fix-meta` and `prune` go through
//! [`fix_meta`] and [`remove`]. The two exceptions live in the state folder, which the trust
//! check has already found owned by root or us and writable by no one else: the lock file
//! (opened 0600 with `O_NOFOLLOW`, never written) and the intent journal (append-only, 0600,
//! `O_NOFOLLOW`; see `state::journal`). Nothing else in the crate calls `fs::write` or changes a
//! file by path.
//!
//! kps-sync usually runs as root, and a key's folder is often owned by someone else (a deploy
//! user's `~/.ssh`). That user can swap any folder they own for a symlink at any instant, so a
//! path is resolved only once per operation, by hand, and every change is then made through
//! descriptors:
//!
//! Invariants:
//! - a destination's folder is reached by walking from `/` one component at a time with
//!   `O_NOFOLLOW | O_DIRECTORY` (`O_PATH` on the way, so a folder one may only traverse is
//!   fine), or in one `openat2` call with `RESOLVE_NO_SYMLINKS` when the path has no symlink
//!   and the kernel has it. A symlink on the way is followed only if it and the folder holding it are both
//!   owned by root (systemd's `CHASE_SAFE`); any other symlink stops the operation with an
//!   error naming it. Nothing an unprivileged user owns can steer the walk out of the tree
//!   they already own;
//! - every change (create, `fchown`, `fchmod`, write, `renameat`, `unlinkat`, the folder's
//!   `fsync`) is made through that folder's descriptor or the file's own, so a swap of a path
//!   component after the walk cannot redirect it: the change lands in the folder that was
//!   walked, or fails;
//! - missing folders are created with `mkdirat`, mode 0700, through the same walk; the
//!   innermost one gets the file's owner and group, so the owner can reach its key. Folders
//!   that already exist are never changed;
//! - the bytes never exist on disk with a mode wider than the declared one: the temporary file
//!   is created with the final mode (umask can only narrow it), `O_EXCL` and `O_NOFOLLOW`;
//! - owner and group are set on the descriptor before any byte is written;
//! - the target is replaced by `renameat` after `fsync` (`RENAME_NOREPLACE` when nothing was
//!   there), then the folder is synced, so a crash leaves either the old file or the new one,
//!   never a truncated one. [`publish`] stops before the folder's sync and hands back the
//!   walked folder's descriptor, so that a batch of files syncs each folder once
//!   ([`sync_folders`]); until then the rename is visible but may not survive a power loss;
//! - a destination that is a symlink (or not a regular file) is refused, never followed;
//!   `fix-meta` and `prune` act only on a regular file with one link that holds exactly the
//!   bytes kps-sync wrote;
//! - on any failure the temporary file is removed and the old target is untouched.
//!
//! Observing (the planner's stat and hash) may still go by path: what it sees only decides
//! what to attempt, and every attempt re-checks through the descriptor.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

use crate::observe::{self, Observed};
use crate::output::meta::FileMeta;
use crate::trust::names;

/// Linux's own limit on symlinks in one lookup.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "{path}: is a symlink; kps-sync never writes through a symlink. Remove the link or point the manifest at the real path"
    )]
    Symlink { path: PathBuf },
    #[error(
        "{path}: is a symlink owned by uid {owner} in a folder owned by uid {folder_owner}; kps-sync follows a symlink on the way to a file only when root owns both (like systemd's CHASE_SAFE), so that no other user can steer where it writes. Point the manifest at the real path"
    )]
    UnsafeSymlink {
        path: PathBuf,
        owner: u32,
        folder_owner: u32,
    },
    #[error(
        "{path}: more than {MAX_SYMLINKS} symlinks on the way (a loop?); point the manifest at the real path"
    )]
    SymlinkLoop { path: PathBuf },
    #[error("{path}: exists and is not a regular file; move it away or change the manifest's path")]
    NotRegular { path: PathBuf },
    #[error(
        "{path}: is on the way to a file but is not a folder; move it away or change the manifest's path"
    )]
    NotAFolder { path: PathBuf },
    #[error("{path}: has no parent folder; use an absolute file path")]
    NoParent { path: PathBuf },
    #[error(
        "{path}: cannot create the folder: {source}; create it (mode 0700) or fix its parent's permissions"
    )]
    CreateDir { path: PathBuf, source: io::Error },
    #[error(
        "{path}: cannot open the folder: {source}; check that it exists and that kps-sync may enter it"
    )]
    OpenDir { path: PathBuf, source: io::Error },
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

/// Write `contents` to `path` atomically with `meta`, and make it durable. Missing parent
/// folders are created 0700, the innermost with `meta`'s owner and group.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    meta: FileMeta,
    prior: Prior<'_>,
) -> Result<(), WriteError> {
    publish(path, contents, meta, prior)?.sync()
}

/// A file renamed into place whose folder is not synced yet: the new file is there, whole (its
/// bytes were synced before the rename), but after a power loss the folder may still show the
/// old one. [`sync_folders`] makes a batch of them durable, one `fsync` per distinct folder.
#[must_use = "the rename is not durable until its folder is synced"]
pub struct Published {
    /// The walked folder's descriptor: the one the rename went through.
    folder: OwnedFd,
    path: PathBuf,
}

impl Published {
    /// Make this one rename durable.
    pub fn sync(self) -> Result<(), WriteError> {
        rfs::fsync(&self.folder).map_err(|e| self.folder_sync_failed(e))
    }

    fn folder_sync_failed(&self, e: Errno) -> WriteError {
        WriteError::Io {
            path: self.path.clone(),
            op: "fsync of the folder",
            source: e.into(),
        }
    }
}

/// Make every rename in `published` durable, syncing each distinct folder (by device and
/// inode) once. Returns each file's result, in order: a folder whose sync failed fails every
/// file renamed into it.
pub fn sync_folders(published: Vec<Published>) -> Vec<Result<(), WriteError>> {
    let mut synced: Vec<((u64, u64), Result<(), Errno>)> = Vec::new();
    published
        .into_iter()
        .map(|p| {
            let st = rfs::fstat(&p.folder).map_err(|e| p.folder_sync_failed(e))?;
            let id = (st.st_dev, st.st_ino);
            let result = match synced.iter().find(|(seen, _)| *seen == id) {
                Some((_, result)) => *result,
                None => {
                    let result = rfs::fsync(&p.folder);
                    synced.push((id, result));
                    result
                }
            };
            result.map_err(|e| p.folder_sync_failed(e))
        })
        .collect()
}

/// [`write_atomic`] up to the rename: everything but the folder's `fsync`, which the caller
/// makes with [`Published::sync`] or [`sync_folders`].
pub fn publish(
    path: &Path,
    contents: &[u8],
    meta: FileMeta,
    prior: Prior<'_>,
) -> Result<Published, WriteError> {
    let (dir, name) = split(path)?;
    let folder = match open_folder(dir, Some(meta)) {
        Ok(folder) => folder,
        Err(Reach::Failed(e)) => return Err(e),
        Err(Reach::Missing) => unreachable!("open_folder creates what is missing"),
    };
    let io_err = |op: &'static str| {
        let path = path.to_owned();
        move |source: io::Error| WriteError::Io { path, op, source }
    };
    match rfs::statat(&folder, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {}
            FileType::Symlink => return Err(WriteError::Symlink { path: path.into() }),
            _ => return Err(WriteError::NotRegular { path: path.into() }),
        },
        Err(Errno::NOENT) => {}
        Err(e) => return Err(io_err("stat")(e.into())),
    }

    let mode = meta.mode & 0o777;
    let mut temp = Temp::create(&folder, mode).map_err(|source| WriteError::TempFile {
        path: path.to_owned(),
        source,
    })?;
    let file = temp.file.as_mut().expect("open until persisted");
    chown(&*file, path, meta)?;
    // The umask may have narrowed the mode at creation; set it exactly, still before any byte.
    rfs::fchmod(&*file, Mode::from_raw_mode(mode)).map_err(|e| io_err("chmod")(e.into()))?;
    file.write_all(contents).map_err(io_err("write"))?;
    // The bytes are durable before the name points at them.
    file.sync_all().map_err(io_err("fsync"))?;
    drop(temp.file.take());

    match prior {
        Prior::Absent => temp.persist_noclobber(name).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                WriteError::Changed {
                    path: path.to_owned(),
                }
            } else {
                io_err("rename")(e)
            }
        })?,
        Prior::Sha256(_) | Prior::Anything => {
            still_as_seen(&folder, name, path, prior)?;
            // A symlink planted since the check above is replaced by the rename, not followed.
            temp.persist(name).map_err(io_err("rename"))?
        }
    };
    Ok(Published {
        folder,
        path: path.to_owned(),
    })
}

/// Is the destination still what the plan saw?
fn still_as_seen(
    folder: &OwnedFd,
    name: &OsStr,
    path: &Path,
    prior: Prior<'_>,
) -> Result<(), WriteError> {
    let Prior::Sha256(expected) = prior else {
        return Ok(());
    };
    let changed = || WriteError::Changed {
        path: path.to_owned(),
    };
    match open_regular_at(folder, name) {
        Err(Observed::Missing) => Ok(()),
        Ok((mut file, _)) => match observe::hash_open(&mut file) {
            Ok(sha256) if sha256 == expected => Ok(()),
            _ => Err(changed()),
        },
        Err(_) => Err(changed()),
    }
}

/// Set mode, owner and group of an existing file without rewriting it (`fix-meta`). Everything
/// is checked and done through one descriptor, opened in the walked folder: it must be a
/// regular file with one link, holding exactly the bytes kps-sync wrote (`expected`).
pub fn fix_meta(path: &Path, meta: FileMeta, expected: &str) -> Result<(), WriteError> {
    let (dir, name) = split(path)?;
    let folder = match open_folder(dir, None) {
        Ok(folder) => folder,
        Err(Reach::Missing) => {
            return Err(WriteError::Changed {
                path: path.to_owned(),
            });
        }
        Err(Reach::Failed(e)) => return Err(e),
    };
    let file = open_ours(&folder, name, path, expected)?;
    chown(&file, path, meta)?;
    rfs::fchmod(&file, Mode::from_raw_mode(meta.mode & 0o777)).map_err(|e| WriteError::Io {
        path: path.to_owned(),
        op: "chmod",
        source: e.into(),
    })
}

/// Delete a file kps-sync wrote (`prune`), only if it still holds exactly the bytes written.
/// The check and the `unlinkat` go through one walked folder's descriptor.
pub fn remove(path: &Path, expected: &str) -> Result<(), WriteError> {
    let (dir, name) = split(path)?;
    let folder = match open_folder(dir, None) {
        Ok(folder) => folder,
        Err(Reach::Missing) => return Ok(()),
        Err(Reach::Failed(e)) => return Err(e),
    };
    let io_err = |op: &'static str| {
        let path = path.to_owned();
        move |e: Errno| WriteError::Io {
            path,
            op,
            source: e.into(),
        }
    };
    match open_ours(&folder, name, path, expected) {
        Ok(_) => {}
        Err(WriteError::Changed { .. })
            if matches!(
                rfs::statat(&folder, name, AtFlags::SYMLINK_NOFOLLOW),
                Err(Errno::NOENT)
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    match rfs::unlinkat(&folder, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(io_err("remove")(e)),
    }
    rfs::fsync(&folder).map_err(io_err("fsync of the folder"))
}

/// Create `dir` and any missing parents with mode 0700, walking as [`write_atomic`] does.
pub fn create_dirs(dir: &Path) -> Result<(), WriteError> {
    match open_folder(dir, Some(FileMeta::PRIVATE)) {
        Ok(_) => Ok(()),
        Err(Reach::Failed(e)) => Err(e),
        Err(Reach::Missing) => unreachable!("open_folder creates what is missing"),
    }
}

/// The folder and the file name of a destination.
fn split(path: &Path) -> Result<(&Path, &OsStr), WriteError> {
    let no_parent = || WriteError::NoParent {
        path: path.to_owned(),
    };
    let Some(Component::Normal(name)) = path.components().next_back() else {
        return Err(no_parent());
    };
    let dir = path
        .parent()
        .filter(|d| d.is_absolute())
        .ok_or_else(no_parent)?;
    Ok((dir, name))
}

/// Why a folder could not be reached.
enum Reach {
    /// A component does not exist (and was not to be created).
    Missing,
    Failed(WriteError),
}

/// Walk from `/` to `dir` one component at a time and return the folder's descriptor (read
/// only, so it can be synced). With `create`, missing folders are made 0700 on the way, the
/// innermost with `create`'s owner and group.
fn open_folder(dir: &Path, create: Option<FileMeta>) -> Result<OwnedFd, Reach> {
    if !dir.is_absolute() {
        return Err(Reach::Failed(WriteError::NoParent {
            path: dir.to_owned(),
        }));
    }
    let root = rfs::open("/", STEP, Mode::empty()).map_err(|e| open_err(Path::new("/"), e))?;
    // The common case in one call: `openat2` with RESOLVE_NO_SYMLINKS follows no symlink at
    // all, so it gives the same guarantee as the walk. Anything else (a symlink on the way, a
    // missing folder, a kernel before 5.6) takes the walk below, which decides and reports.
    let relative = dir.strip_prefix("/").unwrap_or(dir);
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    if let Ok(fd) = rfs::openat2(&root, relative, READ_DIR, Mode::empty(), resolve) {
        return Ok(fd);
    }
    let mut walk = Walk {
        walked: vec![root],
        at: PathBuf::from("/"),
        todo: names(dir),
        symlinks: 0,
    };
    while let Some(name) = walk.todo.pop_front() {
        walk.step(&name, create)?;
    }
    let last = walk.walked.pop().expect("never empty");
    rfs::openat(&last, ".", READ_DIR, Mode::empty()).map_err(|e| open_err(&walk.at, e))
}

/// One step of a walk: no symlink followed.
const STEP: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// The folder reached, opened so it can be synced.
const READ_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

fn open_err(at: &Path, e: Errno) -> Reach {
    Reach::Failed(WriteError::OpenDir {
        path: at.to_owned(),
        source: e.into(),
    })
}

/// A walk from `/` towards a folder, one name at a time, as the kernel would resolve it but
/// judging every symlink on the way.
struct Walk {
    /// The folders walked so far, `/` first, so `..` steps back without a lookup.
    walked: Vec<OwnedFd>,
    /// Where the walk is, for messages.
    at: PathBuf,
    /// The names still to walk (a followed symlink's target is pushed in front).
    todo: VecDeque<OsString>,
    symlinks: usize,
}

impl Walk {
    fn step(&mut self, name: &OsStr, create: Option<FileMeta>) -> Result<(), Reach> {
        if name == ".." {
            if self.walked.len() > 1 {
                self.walked.pop();
                self.at.pop();
            }
            return Ok(());
        }
        let here = self.walked.last().expect("never empty");
        let next = self.at.join(name);
        let fd = match rfs::openat(here, name, STEP, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                let Some(meta) = create else {
                    return Err(Reach::Missing);
                };
                let innermost = self.todo.is_empty();
                make_folder(here, name, &next, innermost.then_some(meta))?
            }
            Err(Errno::LOOP | Errno::NOTDIR) => return self.follow(name, next),
            Err(e) => return Err(open_err(&next, e)),
        };
        self.walked.push(fd);
        self.at = next;
        Ok(())
    }

    /// `name` in the current folder is not a folder: walk on through it if it is a symlink
    /// that only root could have made (owned by root, in a folder owned by root).
    fn follow(&mut self, name: &OsStr, next: PathBuf) -> Result<(), Reach> {
        let fail = Reach::Failed;
        let here = self.walked.last().expect("never empty");
        // The link itself, held open: its owner and its target are then read from one inode,
        // so a link swapped between the two reads cannot pass for root's.
        let link = rfs::openat(here, name, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| open_err(&next, e))?;
        let found = rfs::fstat(&link).map_err(|e| open_err(&next, e))?;
        if FileType::from_raw_mode(found.st_mode) != FileType::Symlink {
            return Err(fail(WriteError::NotAFolder { path: next }));
        }
        let folder_owner = rfs::fstat(here).map_err(|e| open_err(&self.at, e))?.st_uid;
        if found.st_uid != 0 || folder_owner != 0 {
            return Err(fail(WriteError::UnsafeSymlink {
                path: next,
                owner: found.st_uid,
                folder_owner,
            }));
        }
        self.symlinks += 1;
        if self.symlinks > MAX_SYMLINKS {
            return Err(fail(WriteError::SymlinkLoop { path: next }));
        }
        let target = rfs::readlinkat(&link, "", Vec::new()).map_err(|e| open_err(&next, e))?;
        let target = Path::new(OsStr::from_bytes(target.as_bytes()));
        if target.is_absolute() {
            self.walked.truncate(1);
            self.at = PathBuf::from("/");
        }
        for part in names(target).into_iter().rev() {
            self.todo.push_front(part);
        }
        Ok(())
    }
}

/// Make the missing folder `name` (0700) in `here` and open it; a folder made here gets
/// `meta`'s owner and group when it is the innermost one.
fn make_folder(
    here: &OwnedFd,
    name: &OsStr,
    path: &Path,
    meta: Option<FileMeta>,
) -> Result<OwnedFd, Reach> {
    let created = match rfs::mkdirat(here, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => {
            return Err(Reach::Failed(WriteError::CreateDir {
                path: path.to_owned(),
                source: e.into(),
            }));
        }
    };
    let flags = READ_DIR | OFlags::NOFOLLOW;
    let fd = rfs::openat(here, name, flags, Mode::empty()).map_err(|e| open_err(path, e))?;
    if created {
        set_new_folder(&fd, path, meta).map_err(Reach::Failed)?;
    }
    Ok(fd)
}

/// A folder this walk just created: exactly 0700 (the umask may have narrowed it), and the
/// innermost one owned by the file's owner and group so they can reach their file.
fn set_new_folder(fd: &OwnedFd, path: &Path, owner: Option<FileMeta>) -> Result<(), WriteError> {
    rfs::fchmod(fd, Mode::from_raw_mode(0o700)).map_err(|e| WriteError::CreateDir {
        path: path.to_owned(),
        source: e.into(),
    })?;
    match owner {
        Some(meta) => chown(fd, path, meta),
        None => Ok(()),
    }
}

/// A temporary file in a walked folder, unlinked (through the folder) unless persisted.
struct Temp<'a> {
    folder: &'a OwnedFd,
    name: OsString,
    /// Open until the bytes are written and synced.
    file: Option<File>,
    persisted: bool,
}

impl<'a> Temp<'a> {
    /// `O_CREAT | O_EXCL | O_NOFOLLOW` with the final mode from the first instant.
    fn create(folder: &'a OwnedFd, mode: u32) -> io::Result<Temp<'a>> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut last = Errno::EXIST;
        for _ in 0..16 {
            let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(12)
                .collect();
            let name = OsString::from(format!(".kps-sync-{suffix}.tmp"));
            match rfs::openat(folder, &name, flags, Mode::from_raw_mode(mode)) {
                Ok(fd) => {
                    return Ok(Temp {
                        folder,
                        name,
                        file: Some(File::from(fd)),
                        persisted: false,
                    });
                }
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.into())
    }

    /// Rename over `name`, whatever is there.
    fn persist(mut self, name: &OsStr) -> io::Result<()> {
        rfs::renameat(self.folder, &self.name, self.folder, name)?;
        self.persisted = true;
        Ok(())
    }

    /// Rename to `name` only if nothing is there (`AlreadyExists` otherwise).
    fn persist_noclobber(mut self, name: &OsStr) -> io::Result<()> {
        match rfs::renameat_with(
            self.folder,
            &self.name,
            self.folder,
            name,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            // A file system without RENAME_NOREPLACE: a hard link also refuses to replace.
            Err(Errno::INVAL | Errno::NOSYS) => {
                rfs::linkat(self.folder, &self.name, self.folder, name, AtFlags::empty())?;
                let _ = rfs::unlinkat(self.folder, &self.name, AtFlags::empty());
            }
            Err(e) => return Err(e.into()),
        }
        self.persisted = true;
        Ok(())
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if !self.persisted {
            drop(self.file.take());
            let _ = rfs::unlinkat(self.folder, &self.name, AtFlags::empty());
        }
    }
}

/// Open `name` in `folder` read-only as a regular file, or say what is there instead, as
/// [`observe::open_regular`] does for a path.
fn open_regular_at(folder: &OwnedFd, name: &OsStr) -> Result<(File, Metadata), Observed> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = match rfs::openat(folder, name, flags, Mode::empty()) {
        Ok(fd) => File::from(fd),
        Err(Errno::NOENT) => return Err(Observed::Missing),
        Err(Errno::LOOP) => return Err(Observed::Symlink),
        Err(e) => {
            return Err(match rfs::statat(folder, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    Observed::Symlink
                }
                Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
                    Observed::NotRegular
                }
                _ => Observed::Unreadable(io::Error::from(e).to_string()),
            });
        }
    };
    match file.metadata() {
        Ok(meta) if meta.file_type().is_file() => Ok((file, meta)),
        Ok(_) => Err(Observed::NotRegular),
        Err(e) => Err(Observed::Unreadable(e.to_string())),
    }
}

/// Open a file kps-sync wrote, checking through the descriptor that it still is.
fn open_ours(
    folder: &OwnedFd,
    name: &OsStr,
    path: &Path,
    expected: &str,
) -> Result<File, WriteError> {
    let (mut file, meta) = open_regular_at(folder, name).map_err(|found| match found {
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

/// Set owner and group on the descriptor, if the manifest names them.
fn chown(fd: impl AsFd, path: &Path, meta: FileMeta) -> Result<(), WriteError> {
    if meta.uid.is_none() && meta.gid.is_none() {
        return Ok(());
    }
    rfs::fchown(
        fd,
        meta.uid.map(rfs::Uid::from_raw),
        meta.gid.map(rfs::Gid::from_raw),
    )
    .map_err(|e| WriteError::Chown {
        path: path.to_owned(),
        uid: meta.uid,
        gid: meta.gid,
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, Permissions};
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn sha(bytes: &[u8]) -> String {
        observe::sha256_of(bytes)
    }

    /// Whether the test can run: root is needed to chown. Under CI (which runs as root) its
    /// absence is a failure, never a silent skip.
    fn need_root() -> bool {
        if nix::unistd::Uid::effective().is_root() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the tests as root"
        );
        eprintln!("skipped: needs root to chown");
        false
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
    fn a_batch_published_then_synced_reports_each_file_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("one/a"),
            tmp.path().join("one/b"),
            tmp.path().join("two/c"),
        );
        let published: Vec<Published> = [&a, &b, &c]
            .iter()
            .map(|p| write_atomic_unsynced(p, b"k"))
            .collect();
        // Visible at once, before any folder sync.
        for p in [&a, &b, &c] {
            assert_eq!(fs::read(p).unwrap(), b"k");
        }
        let results = sync_folders(published);
        assert_eq!(results.len(), 3);
        assert!(results.iter().all(Result::is_ok));
        assert!(sync_folders(Vec::new()).is_empty());
    }

    fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> Published {
        publish(path, bytes, FileMeta::PRIVATE, Prior::Absent).unwrap()
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
        if !need_root() {
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

    #[test]
    fn a_symlink_on_the_way_owned_by_another_user_is_refused() {
        if !need_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let link = tmp.path().join("keys");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(4242), Some(4242)).unwrap();
        let target = link.join("key");
        let err = write_atomic(&target, b"k", FileMeta::PRIVATE, Prior::Absent).unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::UnsafeSymlink {
                    owner: 4242,
                    folder_owner: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("CHASE_SAFE"), "{err}");
        assert_eq!(
            fs::read_dir(&victim).unwrap().count(),
            0,
            "nothing written through it"
        );

        // Root's link in a folder another user owns is refused too: that user can swap it.
        std::os::unix::fs::lchown(&link, Some(0), Some(0)).unwrap();
        std::os::unix::fs::chown(tmp.path(), Some(4242), None).unwrap();
        let err = write_atomic(&target, b"k", FileMeta::PRIVATE, Prior::Absent).unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::UnsafeSymlink {
                    owner: 0,
                    folder_owner: 4242,
                    ..
                }
            ),
            "{err}"
        );
        std::os::unix::fs::chown(tmp.path(), Some(0), None).unwrap();
    }

    #[test]
    fn a_root_owned_symlink_swapped_for_another_users_mid_walk_is_never_followed() {
        // In a root-owned folder others may write (no sticky bit), another user can exchange
        // root's link with their own at any instant: the owner judged must be the owner of the
        // very link whose target is followed.
        if !need_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, Permissions::from_mode(0o777)).unwrap();
        let (real, victim) = (tmp.path().join("real"), tmp.path().join("victim"));
        fs::create_dir(&real).unwrap();
        fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&real, shared.join("keys")).unwrap();
        std::os::unix::fs::symlink(&victim, shared.join("decoy")).unwrap();
        std::os::unix::fs::lchown(shared.join("decoy"), Some(4242), Some(4242)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::spawn(move || {
                let dir =
                    rfs::open(&shared, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    rfs::renameat_with(&dir, "keys", &dir, "decoy", RenameFlags::EXCHANGE).unwrap();
                }
            })
        };
        let target = shared.join("keys/key");
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(5) {
            let _ = write_atomic(&target, b"k", FileMeta::PRIVATE, Prior::Anything);
            if fs::read_dir(&victim).unwrap().count() > 0 {
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        assert_eq!(
            fs::read_dir(&victim).unwrap().count(),
            0,
            "a key was written through another user's symlink"
        );
    }

    #[test]
    fn a_root_owned_symlink_in_a_root_owned_folder_is_followed() {
        if !need_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink("real/../real", tmp.path().join("keys")).unwrap();
        let target = tmp.path().join("keys/sub/key");
        write_atomic(&target, b"k", FileMeta::PRIVATE, Prior::Absent).unwrap();
        assert_eq!(fs::read(real.join("sub/key")).unwrap(), b"k");
        fix_meta(
            &target,
            FileMeta {
                mode: 0o400,
                ..FileMeta::PRIVATE
            },
            &sha(b"k"),
        )
        .unwrap();
        assert_eq!(mode_of(&real.join("sub/key")), 0o400);
        remove(&target, &sha(b"k")).unwrap();
        assert!(!real.join("sub/key").exists());
    }

    #[test]
    fn the_innermost_new_folder_gets_the_owner_the_others_stay_root_0700() {
        if !need_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("a/b/key");
        let meta = FileMeta {
            mode: 0o400,
            uid: Some(4242),
            gid: Some(4343),
        };
        write_atomic(&target, b"k", meta, Prior::Absent).unwrap();
        let owner = |p: &Path| {
            let m = fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o7777)
        };
        assert_eq!(owner(&tmp.path().join("a")), (0, 0, 0o700));
        assert_eq!(owner(&tmp.path().join("a/b")), (4242, 4343, 0o700));
        assert_eq!(owner(&target), (4242, 4343, 0o400));

        // An existing folder is left as it is.
        fs::set_permissions(tmp.path().join("a/b"), Permissions::from_mode(0o750)).unwrap();
        write_atomic(&target, b"k2", meta, Prior::Sha256(&sha(b"k"))).unwrap();
        assert_eq!(owner(&tmp.path().join("a/b")), (4242, 4343, 0o750));
    }

    #[test]
    fn a_file_on_the_way_is_not_a_folder() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"x").unwrap();
        let err = write_atomic(
            &tmp.path().join("f/key"),
            b"k",
            FileMeta::PRIVATE,
            Prior::Absent,
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::NotAFolder { .. }), "{err}");
        assert!(matches!(
            write_atomic(Path::new("key"), b"k", FileMeta::PRIVATE, Prior::Absent),
            Err(WriteError::NoParent { .. })
        ));
    }

    #[test]
    fn fix_meta_and_remove_of_a_file_whose_folder_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("gone/key");
        assert!(matches!(
            fix_meta(&target, FileMeta::PRIVATE, &sha(b"k")),
            Err(WriteError::Changed { .. })
        ));
        remove(&target, &sha(b"k")).unwrap();
        assert!(!tmp.path().join("gone").exists(), "remove creates nothing");
    }
}
