//! Noticing changes: the manifest's folder and the folders of every managed file, by inotify
//! (notify's recommended watcher) or by a stat loop (`settings.watch: poll`, for filesystems
//! without inotify, such as some network and FUSE mounts).
//!
//! Events only wake the daemon's loop; they never say what to do. The pass re-plans from disk
//! (level-triggered), so a lost or spurious event costs at most a late fix or one no-op plan,
//! and the daemon's interval pass is the safety net for anything missed here.
//!
//! Invariants:
//! - folders are watched, not files: editors save by rename and Kubernetes swaps a `..data`
//!   symlink, both of which leave a watch on the old file looking at nothing;
//! - our own temporary files (`.kps-sync-*.tmp`) and read-only accesses (opens, which our own
//!   plan makes by hashing each file) never wake anyone; they are dropped on notify's thread;
//! - memory is bounded: at most [`QUEUE`] raw events wait; past that, one [`Wake::Rescan`]
//!   stands for all that were dropped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::manifest::WatchMode;

/// Raw events waiting for the loop; more than this means a storm, and one rescan covers it.
pub const QUEUE: usize = 1024;

/// Why the daemon's loop should look again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wake {
    /// The manifest file, or a symlink on the way to it, was replaced, written or removed; the
    /// content hash decides whether the manifest changed.
    Manifest,
    /// A managed file (or the folder holding it) was created, removed, renamed, written or
    /// had its metadata changed.
    Drift(PathBuf),
    /// Events were lost (kernel queue overflow, our queue full, a watcher error): check all.
    Rescan,
}

/// What to watch, derived from the manifest in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    /// The manifest as the daemon was told (absolute); polled in `poll` mode.
    pub manifest: PathBuf,
    /// The manifest's path and every symlink met resolving it, and the file it resolves to:
    /// replacing any of them (an editor's rename, a `..data` swap) may change the manifest.
    pub manifest_paths: BTreeSet<PathBuf>,
    /// The folders holding those.
    pub manifest_dirs: BTreeSet<PathBuf>,
    /// Every managed file's path.
    pub keys: BTreeSet<PathBuf>,
}

impl Targets {
    /// `manifest_paths` are the manifest's path as given plus what it resolves through (see
    /// [`resolution_chain`]).
    pub fn new(
        manifest: &Path,
        manifest_paths: impl IntoIterator<Item = PathBuf>,
        keys: impl IntoIterator<Item = PathBuf>,
    ) -> Targets {
        let manifest_paths: BTreeSet<PathBuf> = std::iter::once(manifest.to_path_buf())
            .chain(manifest_paths)
            .collect();
        Targets {
            manifest: manifest.to_path_buf(),
            manifest_dirs: manifest_paths
                .iter()
                .filter_map(|p| p.parent().map(Path::to_path_buf))
                .collect(),
            manifest_paths,
            keys: keys.into_iter().collect(),
        }
    }

    /// Every folder to watch: the manifest's and each managed file's parent.
    pub fn dirs(&self) -> BTreeSet<PathBuf> {
        self.manifest_dirs
            .iter()
            .cloned()
            .chain(
                self.keys
                    .iter()
                    .filter_map(|k| k.parent().map(Path::to_path_buf)),
            )
            .collect()
    }

    fn key_dirs(&self) -> BTreeSet<&Path> {
        self.keys.iter().filter_map(|k| k.parent()).collect()
    }
}

/// Every path met while resolving `path` (absolute) through symlinks: each symlink, in any
/// component, and the file it ends at. A Kubernetes ConfigMap gives
/// `cfg/manifest.yaml -> ..data/manifest.yaml`, `cfg/..data -> ..2024_01_01`, ending at
/// `cfg/..2024_01_01/manifest.yaml`; the update renames a new `..data` into place. A missing
/// component ends the walk there (the chain is recomputed after the next change).
pub fn resolution_chain(path: &Path) -> Vec<PathBuf> {
    use std::path::Component;
    const MAX_HOPS: usize = 40; // as the kernel's ELOOP limit
    let mut chain = Vec::new();
    let mut resolved = PathBuf::from("/");
    let mut pending: VecDeque<std::ffi::OsString> = VecDeque::new();
    let push_components = |pending: &mut VecDeque<_>, p: &Path, front: bool| {
        let parts: Vec<std::ffi::OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        if front {
            for part in parts.into_iter().rev() {
                pending.push_front(part);
            }
        } else {
            pending.extend(parts);
        }
    };
    push_components(&mut pending, path, false);
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        match std::fs::read_link(&candidate) {
            Ok(target) if hops < MAX_HOPS => {
                hops += 1;
                chain.push(candidate);
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                push_components(&mut pending, &target, true);
            }
            Ok(_) => break,
            Err(_) => resolved = candidate,
        }
    }
    chain.push(resolved);
    chain
}

/// The atomic writer's temporary files: `.kps-sync-XXXXXX.tmp` in the destination's folder.
pub fn is_own_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".kps-sync-") && n.ends_with(".tmp"))
}

/// Can this kind of event mean a change? Opens and read-closes cannot (and our own plan makes
/// them for every managed file, so keeping them would wake the loop after every pass).
pub fn may_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Turn one notify event into the wakes it stands for, given what is watched.
pub fn classify(event: &Event, targets: &Targets) -> Vec<Wake> {
    if event.need_rescan() {
        return vec![Wake::Rescan];
    }
    if !may_change(&event.kind) {
        return Vec::new();
    }
    let key_dirs = targets.key_dirs();
    let mut wakes = BTreeSet::new();
    for path in &event.paths {
        if is_own_temp(path) {
            continue;
        }
        if targets.keys.contains(path) {
            wakes.insert(Wake::Drift(path.clone()));
        }
        // The folder itself removed or renamed away takes its files with it.
        if key_dirs.contains(path.as_path())
            && matches!(event.kind, EventKind::Remove(_) | EventKind::Modify(_))
        {
            wakes.insert(Wake::Drift(path.clone()));
        }
        if targets.manifest_paths.contains(path) || targets.manifest_dirs.contains(path) {
            wakes.insert(Wake::Manifest);
        }
    }
    wakes.into_iter().collect()
}

/// What `stat` says about a path, enough to notice a replace, a write or a chmod/chown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    /// The path itself (a symlink is not followed): what the planner judges.
    pub fn of_path(path: &Path) -> Option<Fingerprint> {
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| Fingerprint::of(&m))
    }

    /// The path and, through symlinks, what it points to: a `..data` swap changes the latter.
    pub fn of_link_and_target(path: &Path) -> (Option<Fingerprint>, Option<Fingerprint>) {
        (
            Fingerprint::of_path(path),
            std::fs::metadata(path).ok().map(|m| Fingerprint::of(&m)),
        )
    }
}

/// Paths whose fingerprint differs between two scans (appeared, vanished or changed).
pub fn changed_paths(
    before: &BTreeMap<PathBuf, Option<Fingerprint>>,
    after: &BTreeMap<PathBuf, Option<Fingerprint>>,
) -> Vec<PathBuf> {
    after
        .iter()
        .filter(|(path, fp)| before.get(*path).is_some_and(|old| old != *fp))
        .map(|(path, _)| path.clone())
        .collect()
}

/// The identity of a watched folder, to notice it was removed and made again (which leaves an
/// inotify watch on the old, deleted folder).
type DirId = (u64, u64);

enum Backend {
    Notify {
        watcher: notify::RecommendedWatcher,
        rx: mpsc::Receiver<notify::Result<Event>>,
        /// Set on notify's thread when the queue was full and an event was dropped.
        overflow: Arc<AtomicBool>,
        watched: BTreeMap<PathBuf, DirId>,
        /// The watcher thread is gone; stop asking it (the interval pass remains).
        closed: bool,
    },
    Poll {
        every: Duration,
        next: Instant,
        manifest: (Option<Fingerprint>, Option<Fingerprint>),
        keys: BTreeMap<PathBuf, Option<Fingerprint>>,
    },
}

/// The daemon's source of [`Wake`]s.
pub struct Watcher {
    backend: Backend,
    targets: Targets,
    /// Wakes classified but not yet handed out; kept here so [`Watcher::next`] is cancel-safe.
    queue: VecDeque<Wake>,
}

impl Watcher {
    /// Start watching nothing yet; [`Watcher::set_targets`] says what. `Inotify` falls back to
    /// polling (with a warning) when inotify cannot start, e.g. out of instances.
    pub fn new(mode: WatchMode, poll_every: Duration) -> Watcher {
        let backend = match mode {
            WatchMode::Inotify => match notify_backend() {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start inotify; polling instead (settings.watch: poll)");
                    poll_backend(poll_every)
                }
            },
            WatchMode::Poll => poll_backend(poll_every),
        };
        Watcher {
            backend,
            targets: Targets::default(),
            queue: VecDeque::new(),
        }
    }

    /// Is this the stat loop?
    pub fn is_polling(&self) -> bool {
        matches!(self.backend, Backend::Poll { .. })
    }

    /// Watch what `targets` names; called after every pass. With inotify it also re-checks
    /// folders already watched, since one removed and made again (by the pass itself, for a
    /// missing parent) needs a new watch; folders that do not exist are skipped (the pass
    /// creates them, and the next call watches them). Polling takes the files as they are now
    /// as its new baseline.
    pub fn set_targets(&mut self, targets: Targets) {
        match &mut self.backend {
            Backend::Notify {
                watcher, watched, ..
            } => rewatch(watcher, watched, &targets),
            Backend::Poll { manifest, keys, .. } => {
                if targets.manifest != self.targets.manifest {
                    *manifest = Fingerprint::of_link_and_target(&targets.manifest);
                }
                // The daemon calls this after each pass: what the pass left is the new baseline,
                // so its own writes are not taken for drift. (A change made during the pass
                // itself is left to the interval pass; with inotify it is seen.)
                *keys = targets
                    .keys
                    .iter()
                    .map(|k| (k.clone(), Fingerprint::of_path(k)))
                    .collect();
            }
        }
        self.targets = targets;
    }

    /// The next reason to look again. Cancel-safe: meant for `tokio::select!`.
    pub async fn next(&mut self) -> Wake {
        loop {
            if let Some(wake) = self.queue.pop_front() {
                return wake;
            }
            let wake = match &mut self.backend {
                Backend::Notify {
                    watcher,
                    rx,
                    overflow,
                    watched,
                    closed,
                } => {
                    if overflow.swap(false, Ordering::Relaxed) {
                        return Wake::Rescan;
                    }
                    next_event(rx, closed).await.map(|event| {
                        forget_gone_dirs(&event, watcher, watched);
                        classify(&event, &self.targets)
                    })
                }
                Backend::Poll {
                    every,
                    next,
                    manifest,
                    keys,
                } => {
                    tokio::time::sleep_until(*next).await;
                    *next = Instant::now() + *every;
                    Ok(poll_once(&self.targets.manifest, manifest, keys))
                }
            };
            match wake {
                Ok(wakes) => self.queue.extend(wakes),
                Err(rescan) => return rescan,
            }
        }
    }
}

/// Watch the folders `targets` names that exist, and stop watching those gone or replaced.
fn rewatch(
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut BTreeMap<PathBuf, DirId>,
    targets: &Targets,
) {
    let wanted: BTreeMap<PathBuf, DirId> = targets
        .dirs()
        .into_iter()
        .filter_map(|d| {
            let meta = std::fs::metadata(&d)
                .ok()
                .filter(std::fs::Metadata::is_dir)?;
            Some((d, (meta.dev(), meta.ino())))
        })
        .collect();
    watched.retain(|dir, id| {
        let keep = wanted.get(dir) == Some(id);
        if !keep {
            // Fails when the folder is already gone, which is the common case here.
            let _ = watcher.unwatch(dir);
        }
        keep
    });
    for (dir, id) in wanted {
        if watched.contains_key(&dir) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(dir = %dir.display(), "watching");
                watched.insert(dir, id);
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot watch this folder; changes there are noticed by the interval pass only (raise fs.inotify.max_user_watches, or set watch: poll)"
            ),
        }
    }
}

/// notify's next event; `Err(Wake::Rescan)` when it reported an error. A closed channel (the
/// watcher thread gone) is said once and then never fires: the interval pass remains.
async fn next_event(
    rx: &mut mpsc::Receiver<notify::Result<Event>>,
    closed: &mut bool,
) -> Result<Event, Wake> {
    if *closed {
        std::future::pending::<()>().await;
    }
    match rx.recv().await {
        Some(Ok(event)) => Ok(event),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "file watcher error; checking everything");
            Err(Wake::Rescan)
        }
        None => {
            tracing::warn!("the file watcher stopped; only the interval pass remains");
            *closed = true;
            std::future::pending().await
        }
    }
}

/// One look of the stat loop: what changed since the last look, which becomes the baseline.
fn poll_once(
    manifest_path: &Path,
    manifest: &mut (Option<Fingerprint>, Option<Fingerprint>),
    keys: &mut BTreeMap<PathBuf, Option<Fingerprint>>,
) -> Vec<Wake> {
    let mut wakes = Vec::new();
    let now_manifest = Fingerprint::of_link_and_target(manifest_path);
    if now_manifest != *manifest {
        *manifest = now_manifest;
        wakes.push(Wake::Manifest);
    }
    let now_keys: BTreeMap<PathBuf, Option<Fingerprint>> = keys
        .keys()
        .map(|k| (k.clone(), Fingerprint::of_path(k)))
        .collect();
    wakes.extend(changed_paths(keys, &now_keys).into_iter().map(Wake::Drift));
    *keys = now_keys;
    wakes
}

/// A watched folder removed or renamed away leaves a dead watch (and a new folder at that path
/// may even get the same inode number back): forget it, so the next `set_targets` watches the
/// folder that is there then.
fn forget_gone_dirs(
    event: &Event,
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut BTreeMap<PathBuf, DirId>,
) {
    use notify::event::{ModifyKind, RenameMode};
    if !matches!(
        event.kind,
        EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::From | RenameMode::Any))
    ) {
        return;
    }
    for path in &event.paths {
        if watched.remove(path).is_some() {
            // After a removal notify has dropped the watch already; after a rename it has not.
            let _ = watcher.unwatch(path);
            tracing::debug!(dir = %path.display(), "watched folder went away");
        }
    }
}

fn notify_backend() -> notify::Result<Backend> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let overflow = Arc::new(AtomicBool::new(false));
    let flag = overflow.clone();
    // Runs on notify's thread: drop what cannot matter before it wakes the runtime.
    let handler = move |event: notify::Result<Event>| {
        if let Ok(e) = &event
            && !e.need_rescan()
            && (!may_change(&e.kind)
                || (!e.paths.is_empty() && e.paths.iter().all(|p| is_own_temp(p))))
        {
            return;
        }
        if tx.try_send(event).is_err() {
            flag.store(true, Ordering::Relaxed);
        }
    };
    let watcher = notify::RecommendedWatcher::new(handler, notify::Config::default())?;
    Ok(Backend::Notify {
        watcher,
        rx,
        overflow,
        watched: BTreeMap::new(),
        closed: false,
    })
}

fn poll_backend(every: Duration) -> Backend {
    Backend::Poll {
        every,
        next: Instant::now() + every,
        manifest: (None, None),
        keys: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, Flag, ModifyKind, RemoveKind, RenameMode};

    fn targets() -> Targets {
        Targets::new(
            Path::new("/etc/kps-sync/manifest.yaml"),
            [
                PathBuf::from("/etc/kps-sync/..data"),
                PathBuf::from("/etc/kps-sync/..2024_01_01/manifest.yaml"),
            ],
            [
                PathBuf::from("/srv/keys/web.pem"),
                PathBuf::from("/etc/ssh/keys/db.pem"),
            ],
        )
    }

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn watches_the_manifest_folders_and_every_key_folder() {
        let dirs: Vec<PathBuf> = targets().dirs().into_iter().collect();
        assert_eq!(
            dirs,
            [
                "/etc/kps-sync",
                "/etc/kps-sync/..2024_01_01",
                "/etc/ssh/keys",
                "/srv/keys"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn an_editor_rename_over_the_manifest_is_a_manifest_wake() {
        let t = targets();
        let rename = event(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &[
                "/etc/kps-sync/.manifest.yaml.swp",
                "/etc/kps-sync/manifest.yaml",
            ],
        );
        assert_eq!(classify(&rename, &t), vec![Wake::Manifest]);
    }

    #[test]
    fn a_data_symlink_swap_is_a_manifest_wake() {
        let t = targets();
        let swap = event(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            &["/etc/kps-sync/..data"],
        );
        assert_eq!(classify(&swap, &t), vec![Wake::Manifest]);
    }

    #[test]
    fn neighbours_of_the_manifest_wake_nobody() {
        // A log or a swap file next to the manifest must not make the daemon re-read it.
        let t = targets();
        for name in ["daemon.log", ".manifest.yaml.swp", "4913", "manifest.yaml~"] {
            let write = event(
                EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any)),
                &[&format!("/etc/kps-sync/{name}")],
            );
            assert_eq!(classify(&write, &t), vec![], "{name}");
        }
        let moved_away = event(EventKind::Remove(RemoveKind::Folder), &["/etc/kps-sync"]);
        assert_eq!(classify(&moved_away, &t), vec![Wake::Manifest]);
    }

    #[test]
    fn the_resolution_chain_names_every_symlink_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(dir.join("..2024_01_01")).unwrap();
        std::fs::write(dir.join("..2024_01_01/manifest.yaml"), "x").unwrap();
        std::os::unix::fs::symlink("..2024_01_01", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/manifest.yaml", dir.join("manifest.yaml")).unwrap();
        assert_eq!(
            resolution_chain(&dir.join("manifest.yaml")),
            vec![
                dir.join("manifest.yaml"),
                dir.join("..data"),
                dir.join("..2024_01_01/manifest.yaml"),
            ]
        );
        std::fs::write(dir.join("plain.yaml"), "x").unwrap();
        assert_eq!(
            resolution_chain(&dir.join("plain.yaml")),
            vec![dir.join("plain.yaml")]
        );
        // An absolute link and a `..` in a target.
        std::fs::create_dir(dir.join("etc")).unwrap();
        std::os::unix::fs::symlink(dir.join("etc/../plain.yaml"), dir.join("etc/m.yaml")).unwrap();
        assert_eq!(
            resolution_chain(&dir.join("etc/m.yaml")),
            vec![dir.join("etc/m.yaml"), dir.join("plain.yaml")]
        );
        // A loop ends without hanging.
        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        assert!(resolution_chain(&dir.join("loop")).len() <= 42);
    }

    #[test]
    fn a_managed_file_removed_or_written_is_drift_others_are_not() {
        let t = targets();
        let rm = event(EventKind::Remove(RemoveKind::File), &["/srv/keys/web.pem"]);
        assert_eq!(
            classify(&rm, &t),
            vec![Wake::Drift("/srv/keys/web.pem".into())]
        );
        let write = event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/etc/ssh/keys/db.pem"],
        );
        assert_eq!(
            classify(&write, &t),
            vec![Wake::Drift("/etc/ssh/keys/db.pem".into())]
        );
        let chmod = event(
            EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any)),
            &["/srv/keys/web.pem"],
        );
        assert_eq!(classify(&chmod, &t).len(), 1);
        let neighbour = event(
            EventKind::Create(CreateKind::File),
            &["/srv/keys/other.pem"],
        );
        assert_eq!(classify(&neighbour, &t), vec![]);
    }

    #[test]
    fn our_temp_files_and_reads_wake_nobody() {
        let t = targets();
        let temp = event(
            EventKind::Create(CreateKind::File),
            &["/srv/keys/.kps-sync-Ab12Cd.tmp"],
        );
        assert_eq!(classify(&temp, &t), vec![]);
        let temp_in_manifest_dir = event(
            EventKind::Create(CreateKind::File),
            &["/etc/kps-sync/.kps-sync-x.tmp"],
        );
        assert_eq!(classify(&temp_in_manifest_dir, &t), vec![]);
        let open = event(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            &["/srv/keys/web.pem"],
        );
        assert_eq!(classify(&open, &t), vec![]);
        let read_close = event(
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            &["/etc/kps-sync/manifest.yaml"],
        );
        assert_eq!(classify(&read_close, &t), vec![]);
        // Our rename of the temp file onto the key is seen (the pass re-plans: a no-op).
        let ours = event(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &["/srv/keys/.kps-sync-Ab12Cd.tmp", "/srv/keys/web.pem"],
        );
        assert_eq!(
            classify(&ours, &t),
            vec![Wake::Drift("/srv/keys/web.pem".into())]
        );
    }

    #[test]
    fn a_key_folder_removed_is_drift_and_an_overflow_is_a_rescan() {
        let t = targets();
        let gone = event(EventKind::Remove(RemoveKind::Folder), &["/srv/keys"]);
        assert_eq!(classify(&gone, &t), vec![Wake::Drift("/srv/keys".into())]);
        let overflow = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert_eq!(classify(&overflow, &t), vec![Wake::Rescan]);
    }

    #[test]
    fn a_key_next_to_the_manifest_is_told_apart_from_it() {
        let t = Targets::new(
            Path::new("/cfg/manifest.yaml"),
            [],
            [PathBuf::from("/cfg/key.pem")],
        );
        let rm = event(EventKind::Remove(RemoveKind::File), &["/cfg/key.pem"]);
        assert_eq!(classify(&rm, &t), vec![Wake::Drift("/cfg/key.pem".into())]);
        let edit = event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/cfg/manifest.yaml"],
        );
        assert_eq!(classify(&edit, &t), vec![Wake::Manifest]);
    }

    #[test]
    fn changed_paths_sees_removal_creation_and_change_only() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        let c = tmp.path().join("c");
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "1").unwrap();
        let scan = |paths: &[&PathBuf]| -> BTreeMap<PathBuf, Option<Fingerprint>> {
            paths
                .iter()
                .map(|p| ((*p).clone(), Fingerprint::of_path(p)))
                .collect()
        };
        let before = scan(&[&a, &b, &c]);
        assert_eq!(
            changed_paths(&before, &scan(&[&a, &b, &c])),
            Vec::<PathBuf>::new()
        );
        std::fs::remove_file(&a).unwrap();
        std::fs::write(&b, "22").unwrap();
        std::fs::write(&c, "new").unwrap();
        assert_eq!(changed_paths(&before, &scan(&[&a, &b, &c])), vec![a, b, c]);
    }

    #[tokio::test]
    async fn inotify_sees_a_rename_over_a_watched_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let key = dir.join("keys/k.pem");
        std::fs::create_dir(dir.join("keys")).unwrap();
        std::fs::write(&key, "old").unwrap();
        let mut w = Watcher::new(WatchMode::Inotify, Duration::from_secs(1));
        assert!(!w.is_polling());
        w.set_targets(Targets::new(&dir.join("manifest.yaml"), [], [key.clone()]));
        std::fs::write(dir.join("keys/other"), "x").unwrap();
        std::fs::write(dir.join("keys/.kps-sync-1.tmp"), "new").unwrap();
        std::fs::rename(dir.join("keys/.kps-sync-1.tmp"), &key).unwrap();
        let wake = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap();
        assert_eq!(wake, Wake::Drift(key));
    }

    #[tokio::test]
    async fn inotify_rewatches_a_folder_removed_and_made_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let key = dir.join("keys/k.pem");
        std::fs::create_dir(dir.join("keys")).unwrap();
        let mut w = Watcher::new(WatchMode::Inotify, Duration::from_secs(1));
        let targets = Targets::new(&dir.join("manifest.yaml"), [], [key.clone()]);
        w.set_targets(targets.clone());
        std::fs::remove_dir(dir.join("keys")).unwrap();
        std::fs::create_dir(dir.join("keys")).unwrap();
        // Drain what the removal said, then refresh as the daemon does after a pass.
        while tokio::time::timeout(Duration::from_millis(200), w.next())
            .await
            .is_ok()
        {}
        w.set_targets(targets);
        std::fs::write(&key, "k").unwrap();
        let wake = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap();
        assert_eq!(wake, Wake::Drift(key));
    }

    #[tokio::test]
    async fn polling_sees_a_deleted_key_and_a_changed_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let manifest = dir.join("manifest.yaml");
        let key = dir.join("k.pem");
        std::fs::write(&manifest, "a").unwrap();
        std::fs::write(&key, "k").unwrap();
        let mut w = Watcher::new(WatchMode::Poll, Duration::from_millis(20));
        assert!(w.is_polling());
        w.set_targets(Targets::new(&manifest, [], [key.clone()]));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), w.next())
                .await
                .is_err(),
            "nothing changed, nothing to say"
        );
        std::fs::remove_file(&key).unwrap();
        std::fs::write(&manifest, "bb").unwrap();
        let mut got = vec![
            tokio::time::timeout(Duration::from_secs(2), w.next())
                .await
                .unwrap(),
            tokio::time::timeout(Duration::from_secs(2), w.next())
                .await
                .unwrap(),
        ];
        got.sort();
        assert_eq!(got, vec![Wake::Manifest, Wake::Drift(key)]);
    }
}
