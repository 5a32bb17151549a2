//! Look at the destinations on disk: the planner's view of the filesystem. Reads only; never
//! follows a symlink at a destination.

use std::collections::HashMap;
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

/// Observe every path given.
/// Paths are compared component by component in ordered maps; a hash map keeps a no-op pass
/// over thousands of keys cheap.
pub type ObservedFiles = HashMap<PathBuf, Observed>;

pub fn observe_all<'a>(paths: impl IntoIterator<Item = &'a Path>) -> ObservedFiles {
    let paths: Vec<&Path> = paths.into_iter().collect();
    // Mostly syscalls and hashing of small files: spread over the cores for large manifests.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    if paths.len() < 256 || threads == 1 {
        return paths
            .iter()
            .map(|p| (p.to_path_buf(), observe(p)))
            .collect();
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = paths
            .chunks(paths.len().div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|p| (p.to_path_buf(), observe(p)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("observe does not panic"))
            .collect()
    })
}

/// Observe one path. The file is opened first (never following a symlink, never blocking on a
/// FIFO) and everything else is read through the descriptor, so what is reported is one file.
pub fn observe(path: &Path) -> Observed {
    match open_regular(path) {
        Ok((mut file, meta)) => match hash_open(&mut file) {
            Ok(sha256) => Observed::Regular(FileFacts {
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                sha256,
            }),
            Err(e) => Observed::Unreadable(e.to_string()),
        },
        Err(found) => found,
    }
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
