//! Look at the destinations on disk: the planner's view of the filesystem. Reads only; never
//! follows a symlink at a destination.
//!
//! A file kps-sync recorded is read and hashed only when its `stat` no longer vouches for the
//! recorded hash (a stat cache, as git's index keeps): the device, inode, size, mtime and ctime
//! recorded when its bytes last hashed to the record must all be the same, and that recording
//! must not be "racy" (see [`Stat::trusted`]). ctime cannot be set from user space, so an edit
//! that restores the size and the mtime (`touch -d`) is still seen.

use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// What is at one destination path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Missing,
    /// A symlink: never followed, never replaced.
    Symlink,
    /// A folder, socket, device...
    NotRegular,
    Regular(FileFacts),
    /// Could not be looked at (permissions...); the message says why.
    Unreadable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `sha256:<hex>` of the content.
    pub sha256: String,
}

/// What is at each path observed.
pub type ObservedFiles = PathMap<Observed>;

/// What the state vouches for: path -> the stat recorded when the file last hashed to `sha256`.
pub type Known = PathMap<(Stat, String)>;

/// The stat of every file that was read and hashed in [`observe_all`] (taken before reading),
/// by path: what the state may record to skip the read next time.
pub type Fresh = PathMap<Stat>;

/// A hash map by path, keyed by the path's bytes (FxHash of them): `Path`'s own `Hash` and
/// `Eq` walk components, and a no-op pass over 10,000 keys made 60,000 such hashes. Two
/// spellings of one file are two entries; every path looked up here was inserted in its own
/// spelling (the manifest's, normalized, or a record's), so each lookup finds its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMap<V>(rustc_hash::FxHashMap<OsString, V>);

impl<V> Default for PathMap<V> {
    fn default() -> Self {
        PathMap(Default::default())
    }
}

impl<V> PathMap<V> {
    pub fn with_capacity(n: usize) -> Self {
        PathMap(rustc_hash::FxHashMap::with_capacity_and_hasher(
            n,
            Default::default(),
        ))
    }

    pub fn get(&self, path: &Path) -> Option<&V> {
        self.0.get(path.as_os_str())
    }

    pub fn get_mut(&mut self, path: &Path) -> Option<&mut V> {
        self.0.get_mut(path.as_os_str())
    }

    pub fn contains_key(&self, path: &Path) -> bool {
        self.0.contains_key(path.as_os_str())
    }

    pub fn insert(&mut self, path: PathBuf, value: V) -> Option<V> {
        self.0.insert(path.into_os_string(), value)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V> FromIterator<(PathBuf, V)> for PathMap<V> {
    fn from_iter<I: IntoIterator<Item = (PathBuf, V)>>(items: I) -> Self {
        let mut map = PathMap::default();
        map.extend(items);
        map
    }
}

impl<V> Extend<(PathBuf, V)> for PathMap<V> {
    fn extend<I: IntoIterator<Item = (PathBuf, V)>>(&mut self, items: I) {
        self.0
            .extend(items.into_iter().map(|(p, v)| (p.into_os_string(), v)));
    }
}

/// How far back from the moment a stat was taken a file timestamp makes that stat racy:
/// file timestamps come from the kernel's coarse clock (a tick behind ours) and some
/// filesystems keep whole seconds (FAT two), so a write just after the stat could leave the
/// same timestamps.
const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// The identity and timestamps of a regular file, and when they were taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Nanoseconds since the epoch.
    pub mtime: i64,
    pub ctime: i64,
    /// When this stat was taken (our clock, ns since the epoch), before the file was read.
    pub seen: i64,
}

impl Stat {
    fn of(meta: &Metadata, seen: i64) -> Stat {
        Stat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            seen,
        }
    }

    /// Whether a file still showing this stat holds what was hashed after it was taken: git's
    /// racy-clean rule. A file modified within [`RACY_WINDOW_NS`] before the stat (or "in the
    /// future") could be modified again without its timestamps moving, so it is read again
    /// (a file just written is read once more on the next pass, then trusted).
    pub fn trusted(&self) -> bool {
        self.mtime.max(self.ctime) < self.seen - RACY_WINDOW_NS
    }

    /// `meta` (from `lstat`) is the very file this stat was taken of, unchanged since.
    fn vouches_for(&self, meta: &Metadata) -> bool {
        let now = Stat::of(meta, self.seen);
        meta.file_type().is_file() && now == *self && self.trusted()
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Observe every path; a path the state vouches for (`known`) whose stat still matches is
/// reported with its recorded hash, without being opened. Returns, besides, the stat of each
/// file read this time.
pub fn observe_all<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    known: &Known,
) -> (ObservedFiles, Fresh) {
    let paths: Vec<&Path> = paths.into_iter().collect();
    // Mostly syscalls and hashing of small files: spread over the cores for large manifests.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let one = |p: &&Path| {
        let (observed, fresh) = observe_known(p, known.get(p));
        (p.to_path_buf(), observed, fresh)
    };
    let all: Vec<(PathBuf, Observed, Option<Stat>)> = if paths.len() < 256 || threads == 1 {
        paths.iter().map(one).collect()
    } else {
        std::thread::scope(|scope| {
            let workers: Vec<_> = paths
                .chunks(paths.len().div_ceil(threads))
                .map(|chunk| scope.spawn(move || chunk.iter().map(one).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("observe does not panic"))
                .collect()
        })
    };
    let mut observed = ObservedFiles::with_capacity(all.len());
    let mut fresh = Fresh::default();
    for (path, seen, stat) in all {
        if let Some(stat) = stat {
            fresh.insert(path.clone(), stat);
        }
        observed.insert(path, seen);
    }
    (observed, fresh)
}

/// Observe one path, trusting `known` when the file's `lstat` still matches it; otherwise read
/// it, and return the stat it had before the read.
fn observe_known(path: &Path, known: Option<&(Stat, String)>) -> (Observed, Option<Stat>) {
    if let Some((stat, sha256)) = known
        && let Ok(meta) = std::fs::symlink_metadata(path)
        && stat.vouches_for(&meta)
    {
        return (Observed::Regular(facts(&meta, sha256.clone())), None);
    }
    let seen = now_ns();
    match open_regular(path) {
        Ok((mut file, meta)) => match hash_open(&mut file) {
            Ok(sha256) => (
                Observed::Regular(facts(&meta, sha256)),
                Some(Stat::of(&meta, seen)),
            ),
            Err(e) => (Observed::Unreadable(e.to_string()), None),
        },
        Err(found) => (found, None),
    }
}

fn facts(meta: &Metadata, sha256: String) -> FileFacts {
    FileFacts {
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        sha256,
    }
}

/// Observe one path, reading it whatever is known. The file is opened first (never following
/// a symlink, never blocking on a FIFO) and everything else is read through the descriptor, so
/// what is reported is one file.
pub fn observe(path: &Path) -> Observed {
    observe_known(path, None).0
}

/// Open `path` read-only as a regular file, or say what is there instead (`Missing`,
/// `Symlink`, `NotRegular`, `Unreadable`).
pub fn open_regular(path: &Path) -> Result<(File, Metadata), Observed> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Observed::Missing),
        // O_NOFOLLOW on a symlink fails with ELOOP.
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Err(Observed::Symlink),
        Err(e) => {
            return Err(match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => Observed::Symlink,
                Ok(m) if !m.file_type().is_file() => Observed::NotRegular,
                _ => Observed::Unreadable(e.to_string()),
            });
        }
    };
    match file.metadata() {
        Ok(meta) if meta.file_type().is_file() => Ok((file, meta)),
        Ok(_) => Err(Observed::NotRegular),
        Err(e) => Err(Observed::Unreadable(e.to_string())),
    }
}

/// `sha256:<hex>` of bytes.
pub fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` of what is left to read in `file`.
pub fn hash_open(file: &mut File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    // The file may hold a plaintext key: wipe what was read into the buffer, and only that
    // (wiping is byte by byte, and a no-op pass reads ten thousand small files).
    let mut buf = [0u8; 8192];
    let mut used = 0;
    let result = loop {
        match file.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                used = used.max(n);
                hasher.update(&buf[..n]);
            }
            Err(e) => break Err(e),
        }
    };
    buf[..used].zeroize();
    result?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_stat_stands_for_the_hash_and_any_change_or_race_reads_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("k");
        std::fs::write(&file, b"key").unwrap();
        let meta = std::fs::symlink_metadata(&file).unwrap();
        let observed = |known: &Known| {
            let (all, fresh) = observe_all([file.as_path()], known);
            match all.get(&file).unwrap() {
                Observed::Regular(f) => (f.sha256.clone(), fresh.contains_key(&file)),
                other => panic!("{other:?}"),
            }
        };
        // Taken long after the file's last change: trusted, and the file is not read (the
        // hash reported is the recorded one, whatever the bytes).
        let old = Stat::of(&meta, now_ns() + 10 * RACY_WINDOW_NS);
        let known = Known::from_iter([(file.clone(), (old, "sha256:recorded".to_owned()))]);
        assert_eq!(observed(&known), ("sha256:recorded".into(), false));
        // Taken right after the change: racy, so read, and its stat offered for the record.
        let racy = Stat::of(&meta, now_ns());
        assert!(!racy.trusted());
        let known = Known::from_iter([(file.clone(), (racy, "sha256:recorded".to_owned()))]);
        assert_eq!(observed(&known), (sha256_of(b"key"), true));
        // Any change of the file (here its mode: the ctime moves) reads it again.
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        let known = Known::from_iter([(file.clone(), (old, "sha256:recorded".to_owned()))]);
        assert_eq!(observed(&known), (sha256_of(b"key"), true));
        // A symlink put there is never taken for the file.
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &file).unwrap();
        let (all, _) = observe_all([file.as_path()], &known);
        assert_eq!(all.get(&file), Some(&Observed::Symlink));
    }

    #[test]
    fn sees_each_kind_of_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(observe(&tmp.path().join("none")), Observed::Missing);
        assert_eq!(observe(&link), Observed::Symlink);
        assert_eq!(observe(tmp.path()), Observed::NotRegular);
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(
            observe(&fifo),
            Observed::NotRegular,
            "a FIFO never blocks the pass"
        );
        match observe(&file) {
            Observed::Regular(f) => assert_eq!(f.sha256, sha256_of(b"abc")),
            other => panic!("{other:?}"),
        }
    }
}
