//! The planner: a pure function of (desired keys, observed files, state, what KPS lists and
//! which keys the files kps-sync did not write hold) to actions. No I/O, no clock: the caller
//! does the listing and reads the keys, and hands them over as values. `reconcile` carries the
//! actions out; `plan` prints them.
//!
//! Invariants:
//! - a file that exists but is not recorded in the state as written by kps-sync is never
//!   overwritten or deleted (`Conflict::NotOurs`); it is adopted (recorded, never rewritten)
//!   only when it holds the very key KPS lists for the name;
//! - `rotate` needs a listing that shows another public key than the one recorded: without a
//!   listing, or without a recorded fingerprint, nothing is exported for rotation;
//! - a symlink or non-regular file at a destination is never followed or replaced;
//! - prune deletes only a file whose bytes are still exactly what kps-sync wrote;
//! - applying a plan and planning again yields nothing pending (property-tested below).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::manifest::KeySpec;
use crate::observe::{FileFacts, Observed, ObservedFiles};
use crate::output::meta::FileMeta;
use crate::state::State;

/// What one managed key must look like on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub name: String,
    pub path: PathBuf,
    pub meta: FileMeta,
    /// Recipients' fingerprint; `None` for a plain key.
    pub recipients: Option<String>,
    /// Where the public half goes (`public_key:`), if anywhere.
    pub public_key: Option<PathBuf>,
}

/// The mode of a public key file: readable by all, as `ssh-keygen` writes it.
pub const PUBLIC_MODE: u32 = 0o644;

impl From<&KeySpec> for Desired {
    fn from(spec: &KeySpec) -> Self {
        Desired {
            name: spec.name.clone(),
            path: spec.path.clone(),
            meta: FileMeta {
                mode: spec.mode,
                uid: spec.owner.as_ref().map(|p| p.id),
                gid: spec.group.as_ref().map(|p| p.id),
            },
            recipients: spec.recipients_fingerprint(),
            public_key: spec.public_key.clone(),
        }
    }
}

/// What the planner knows about keys beyond the disk and the state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFacts {
    /// This pass's KPS listing: name -> `SHA256:` fingerprint of the public key KPS lists
    /// (`None` when it lists none that can be compared). `None` when the pass did not list.
    pub listed: Option<BTreeMap<String, Option<String>>>,
    /// The `SHA256:` fingerprint of the key in each file kps-sync did not write, at a
    /// destination that is not age-encrypted (the adoption candidates): the private key's at a
    /// key path, the public key's at a `public_key` path.
    pub found: HashMap<PathBuf, String>,
}

impl KeyFacts {
    /// The fingerprint KPS lists for `name`, if this pass listed and it shows one.
    fn listed(&self, name: &str) -> Option<&str> {
        self.listed.as_ref()?.get(name)?.as_deref()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Missing, never written: export and write.
    Create,
    /// Ours, but gone or changed: export and write again.
    Restore(RestoreReason),
    /// Content is ours and intact; only mode/owner/group differ.
    FixMeta,
    /// Recipients or armor changed: export and encrypt again.
    ReEncrypt,
    /// Ours and intact, but KPS now lists another public key for the name (the key pair was
    /// re-created): export, verify and replace.
    Rotate,
    /// Not written by kps-sync, but it holds the very key KPS lists for the name: record it as
    /// ours without rewriting it; `fix_meta` when its mode/owner/group differ from the
    /// manifest's.
    Adopt { fix_meta: bool },
    /// Ours, intact, and no longer in the manifest (`prune: true`): delete.
    Prune,
    /// In place as declared.
    Keep,
    /// Cannot be put in place without destroying something that is not ours.
    Conflict(ConflictReason),
    /// No longer managed, `prune: false`: left on disk, still recorded.
    Orphan,
    /// A record with nothing of ours left behind it: drop it from the state.
    Forget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreReason {
    Deleted,
    Altered,
    /// The file is ours but holds another key (a key renamed in the manifest).
    Replaced,
    /// Ours and intact, but its public key file must be written and the state does not say
    /// which key the file holds (a record of an older version): both are written anew.
    PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictReason {
    NotOurs,
    Symlink,
    NotRegular,
    Unreadable(String),
}

impl Change {
    /// Does applying this change touch the disk?
    pub fn is_pending(&self) -> bool {
        matches!(
            self,
            Change::Create
                | Change::Restore(_)
                | Change::FixMeta
                | Change::ReEncrypt
                | Change::Rotate
                | Change::Adopt { .. }
                | Change::Prune
        )
    }

    /// Does it need the key from KPS?
    pub fn needs_export(&self) -> bool {
        matches!(
            self,
            Change::Create | Change::Restore(_) | Change::ReEncrypt | Change::Rotate
        )
    }

    /// Short, stable word for output and metrics.
    pub fn word(&self) -> &'static str {
        match self {
            Change::Create => "create",
            Change::Restore(_) => "restore",
            Change::FixMeta => "fix-meta",
            Change::ReEncrypt => "re-encrypt",
            Change::Rotate => "rotate",
            Change::Adopt { .. } => "adopt",
            Change::Prune => "prune",
            Change::Keep => "keep",
            Change::Conflict(_) => "conflict",
            Change::Orphan => "orphan",
            Change::Forget => "forget",
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Restore(RestoreReason::Deleted) => f.write_str("restore (deleted)"),
            Change::Restore(RestoreReason::Altered) => f.write_str("restore (altered)"),
            Change::Restore(RestoreReason::Replaced) => f.write_str("restore (held another key)"),
            Change::Restore(RestoreReason::PublicKey) => {
                f.write_str("restore (to write its public key file)")
            }
            Change::Conflict(r) => write!(f, "conflict: {r}"),
            Change::Rotate => f.write_str("rotate (KPS lists another public key for the name)"),
            Change::Adopt { fix_meta: false } => f.write_str("adopt (holds the key KPS lists)"),
            Change::Adopt { fix_meta: true } => {
                f.write_str("adopt (holds the key KPS lists; mode/owner/group fixed)")
            }
            Change::Orphan => f.write_str("orphan (not in the manifest; prune: false keeps it)"),
            other => f.write_str(other.word()),
        }
    }
}

impl fmt::Display for ConflictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConflictReason::NotOurs => f.write_str(
                "a file kps-sync did not write is there; it is kept. Move it away to let kps-sync manage the path",
            ),
            ConflictReason::Symlink => f.write_str(
                "a symlink is there; kps-sync never writes through one. Remove it or point the manifest at the real path",
            ),
            ConflictReason::NotRegular => f.write_str(
                "something other than a regular file is there; move it away or change the path",
            ),
            ConflictReason::Unreadable(why) => {
                write!(f, "cannot read it ({why}); check the folder's permissions")
            }
        }
    }
}

/// What to do about a key's public key file (`public_key:`), besides the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicChange {
    /// Missing, altered, not as declared, or its key is rewritten: write it from the
    /// exported key (so it needs an export even when the key file is kept).
    Write,
    /// Not written by kps-sync, but it holds the key KPS lists: record it, not rewritten.
    Adopt { fix_meta: bool },
    /// Something kps-sync did not write is there: kept, reported.
    Conflict(ConflictReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The key name (for prune/orphan/forget: the recorded key name).
    pub key: String,
    pub path: PathBuf,
    pub change: Change,
    /// `sha256:<hex>` of the regular file at `path` when planned; `None` when there was none.
    /// The writer checks the file is still so before replacing or deleting it.
    pub seen: Option<String>,
    /// The public key file's change, `None` when there is none to make (or none declared).
    pub public: Option<PublicChange>,
    /// `sha256:<hex>` of the regular file at the public key path when planned.
    pub public_seen: Option<String>,
}

impl Action {
    /// Does applying it touch the disk or the state?
    pub fn is_pending(&self) -> bool {
        self.change.is_pending()
            || matches!(
                self.public,
                Some(PublicChange::Write | PublicChange::Adopt { .. })
            )
    }

    /// Does it need the key from KPS (for the key file, or for its public key file)?
    pub fn needs_export(&self) -> bool {
        self.change.needs_export() || self.public == Some(PublicChange::Write)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
}

impl Plan {
    pub fn pending(&self) -> impl Iterator<Item = &Action> {
        self.actions.iter().filter(|a| a.is_pending())
    }

    pub fn has_pending(&self) -> bool {
        self.pending().next().is_some()
    }

    pub fn conflicts(&self) -> impl Iterator<Item = &Action> {
        self.actions
            .iter()
            .filter(|a| matches!(a.change, Change::Conflict(_)))
    }
}

/// Compute the plan. `observed` must hold every desired path and every recorded path.
///
/// The plan holds one action per desired key, in `desired`'s order, then one per record no
/// longer backed by the manifest (its key gone, or moved to another path), in the state's order.
pub fn plan(
    desired: &[Desired],
    prune: bool,
    observed: &ObservedFiles,
    state: &State,
    keys: &KeyFacts,
) -> Plan {
    let mut actions: Vec<Action> = desired
        .iter()
        .map(|want| plan_declared(want, observed, state, keys))
        .collect();
    let managed_paths: rustc_hash::FxHashSet<&PathBuf> = desired.iter().map(|d| &d.path).collect();
    let managed_names: BTreeMap<&str, &Desired> =
        desired.iter().map(|d| (d.name.as_str(), d)).collect();
    // Records no longer backed by the manifest: the key is gone, or moved to another path.
    for (name, rec) in &state.files {
        let still_here = managed_names
            .get(name.as_str())
            .is_some_and(|d| d.path == rec.path);
        if still_here {
            continue;
        }
        let change = if managed_paths.contains(&rec.path) {
            // Another key is declared on that path now; its own action handles the file.
            Change::Forget
        } else {
            match observed.get(&rec.path).unwrap_or(&Observed::Missing) {
                Observed::Regular(facts) if facts.sha256 == rec.sha256 && prune => Change::Prune,
                Observed::Regular(facts) if facts.sha256 == rec.sha256 => Change::Orphan,
                // Gone, replaced or altered by someone else: not ours to delete any more.
                _ => Change::Forget,
            }
        };
        actions.push(Action {
            key: name.clone(),
            path: rec.path.clone(),
            change,
            seen: seen(observed, &rec.path),
            public: None,
            public_seen: None,
        });
    }
    Plan { actions }
}

/// The action for one declared key: its file's change, and its public key file's.
fn plan_declared(
    want: &Desired,
    observed: &ObservedFiles,
    state: &State,
    keys: &KeyFacts,
) -> Action {
    let mut change = match observed.get(&want.path).unwrap_or(&Observed::Missing) {
        Observed::Symlink => Change::Conflict(ConflictReason::Symlink),
        Observed::NotRegular => Change::Conflict(ConflictReason::NotRegular),
        Observed::Unreadable(why) => Change::Conflict(ConflictReason::Unreadable(why.clone())),
        Observed::Missing => match state.files.get(&want.name) {
            Some(rec) if rec.path == want.path => Change::Restore(RestoreReason::Deleted),
            _ => Change::Create,
        },
        Observed::Regular(facts) => plan_existing(want, facts, state, keys),
    };
    let public_of = |change: &Change| {
        want.public_key
            .as_ref()
            .and_then(|p| plan_public(want, p, change, observed, state, keys))
    };
    let mut public = public_of(&change);
    // Writing the public key file alone needs the key on disk's fingerprint, to check the
    // export is that key; without it, the key is written again too.
    let fingerprint_known = state
        .files
        .get(&want.name)
        .is_some_and(|r| r.fingerprint.is_some());
    if public == Some(PublicChange::Write)
        && matches!(change, Change::Keep | Change::FixMeta)
        && !fingerprint_known
    {
        change = Change::Restore(RestoreReason::PublicKey);
        public = public_of(&change);
    }
    Action {
        key: want.name.clone(),
        path: want.path.clone(),
        change,
        seen: seen(observed, &want.path),
        public,
        public_seen: want.public_key.as_ref().and_then(|p| seen(observed, p)),
    }
}

fn seen(observed: &ObservedFiles, path: &Path) -> Option<String> {
    match observed.get(path) {
        Some(Observed::Regular(facts)) => Some(facts.sha256.clone()),
        _ => None,
    }
}

fn plan_existing(want: &Desired, facts: &FileFacts, state: &State, keys: &KeyFacts) -> Change {
    if let Some(rec) = state.files.get(&want.name).filter(|r| r.path == want.path) {
        if rec.sha256 != facts.sha256 {
            return Change::Restore(RestoreReason::Altered);
        }
        if rec.recipients != want.recipients {
            return Change::ReEncrypt;
        }
        if let (Some(ours), Some(listed)) = (&rec.fingerprint, keys.listed(&want.name))
            && ours != listed
        {
            return Change::Rotate;
        }
        if !meta_matches(&want.meta, facts) {
            return Change::FixMeta;
        }
        return Change::Keep;
    }
    // Written by kps-sync for another key name (a rename in the manifest)?
    let ours = state
        .files
        .values()
        .any(|r| r.path == want.path && r.sha256 == facts.sha256);
    if ours {
        return Change::Restore(RestoreReason::Replaced);
    }
    let held = keys.found.get(&want.path).map(String::as_str);
    match (held, keys.listed(&want.name)) {
        (Some(held), Some(listed)) if want.recipients.is_none() && held == listed => {
            Change::Adopt {
                fix_meta: !meta_matches(&want.meta, facts),
            }
        }
        _ => Change::Conflict(ConflictReason::NotOurs),
    }
}

/// The public key file of `want`, at `path`, given the key file's own change.
fn plan_public(
    want: &Desired,
    path: &PathBuf,
    change: &Change,
    observed: &ObservedFiles,
    state: &State,
    keys: &KeyFacts,
) -> Option<PublicChange> {
    if matches!(
        change,
        Change::Conflict(_) | Change::Forget | Change::Orphan
    ) {
        return None;
    }
    let meta = FileMeta {
        mode: PUBLIC_MODE,
        ..want.meta
    };
    // Ours: recorded with the key, for this key path and this public key path.
    let recorded = state
        .files
        .get(&want.name)
        .filter(|r| r.path == want.path)
        .and_then(|r| r.public_key.as_ref())
        .filter(|p| &p.path == path);
    let rewritten = change.needs_export();
    match observed.get(path).unwrap_or(&Observed::Missing) {
        Observed::Missing => Some(PublicChange::Write),
        Observed::Symlink => Some(PublicChange::Conflict(ConflictReason::Symlink)),
        Observed::NotRegular => Some(PublicChange::Conflict(ConflictReason::NotRegular)),
        Observed::Unreadable(why) => Some(PublicChange::Conflict(ConflictReason::Unreadable(
            why.clone(),
        ))),
        Observed::Regular(facts) => match recorded {
            Some(rec) if rec.sha256 == facts.sha256 && !rewritten && meta_matches(&meta, facts) => {
                None
            }
            Some(_) => Some(PublicChange::Write),
            None => {
                let held = keys.found.get(path).map(String::as_str);
                let expected = match change {
                    // Kept as it is: the key recorded for it.
                    Change::Keep | Change::FixMeta => state
                        .files
                        .get(&want.name)
                        .and_then(|r| r.fingerprint.as_deref()),
                    // Adopted, or exported and checked against the listing: the listed key.
                    _ => keys.listed(&want.name),
                };
                match (held, expected) {
                    (Some(held), Some(expected)) if held == expected => Some(PublicChange::Adopt {
                        fix_meta: !meta_matches(&meta, facts),
                    }),
                    _ => Some(PublicChange::Conflict(ConflictReason::NotOurs)),
                }
            }
        },
    }
}

fn meta_matches(want: &FileMeta, facts: &FileFacts) -> bool {
    facts.mode == want.mode
        && want.uid.is_none_or(|uid| uid == facts.uid)
        && want.gid.is_none_or(|gid| gid == facts.gid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::FileRecord;
    use proptest::prelude::*;

    fn want(name: &str, path: &str) -> Desired {
        Desired {
            name: name.into(),
            path: path.into(),
            meta: FileMeta::PRIVATE,
            recipients: None,
            public_key: None,
        }
    }

    fn facts(sha: &str, mode: u32) -> Observed {
        Observed::Regular(FileFacts {
            mode,
            uid: 0,
            gid: 0,
            sha256: sha.into(),
        })
    }

    fn record(path: &str, sha: &str) -> FileRecord {
        FileRecord {
            path: path.into(),
            sha256: sha.into(),
            written_at: "2026-11-25T00:00:00Z".into(),
            recipients: None,
            fingerprint: None,
            public_key: None,
            stat: None,
        }
    }

    fn none() -> KeyFacts {
        KeyFacts::default()
    }

    fn listing(pairs: &[(&str, &str)]) -> KeyFacts {
        KeyFacts {
            listed: Some(
                pairs
                    .iter()
                    .map(|(n, f)| (n.to_string(), Some(f.to_string())))
                    .collect(),
            ),
            found: HashMap::new(),
        }
    }

    #[test]
    fn a_key_recreated_in_kps_is_rotated_only_with_a_listing() {
        let mut state = State::new();
        let mut rec = record("/k/a", "sha256:1");
        rec.fingerprint = Some("SHA256:old".into());
        state.files.insert("a".into(), rec);
        let obs = ObservedFiles::from_iter([(PathBuf::from("/k/a"), facts("sha256:1", 0o644))]);
        let p = plan(
            &[want("a", "/k/a")],
            false,
            &obs,
            &state,
            &listing(&[("a", "SHA256:new")]),
        );
        assert_eq!(changes(&p), vec![("a", &Change::Rotate)]);
        assert!(p.has_pending() && p.actions[0].change.needs_export());
        // Same key listed: only the mode is fixed.
        let p = plan(
            &[want("a", "/k/a")],
            false,
            &obs,
            &state,
            &listing(&[("a", "SHA256:old")]),
        );
        assert_eq!(changes(&p), vec![("a", &Change::FixMeta)]);
        // No listing this pass, the name not listed, or nothing recorded: no rotation.
        for (facts, recorded) in [
            (none(), true),
            (listing(&[("b", "SHA256:new")]), true),
            (listing(&[("a", "SHA256:new")]), false),
        ] {
            let mut state = state.clone();
            if !recorded {
                state.files.get_mut("a").unwrap().fingerprint = None;
            }
            let p = plan(&[want("a", "/k/a")], false, &obs, &state, &facts);
            assert_eq!(changes(&p), vec![("a", &Change::FixMeta)]);
        }
    }

    #[test]
    fn a_hand_placed_copy_of_the_listed_key_is_adopted_and_anything_else_kept() {
        let obs =
            ObservedFiles::from_iter([(PathBuf::from("/k/a"), facts("sha256:theirs", 0o600))]);
        let mut keys = listing(&[("a", "SHA256:k")]);
        keys.found.insert("/k/a".into(), "SHA256:k".into());
        let p = plan(&[want("a", "/k/a")], false, &obs, &State::new(), &keys);
        assert_eq!(changes(&p), vec![("a", &Change::Adopt { fix_meta: false })]);
        assert!(!p.actions[0].change.needs_export());

        let loose =
            ObservedFiles::from_iter([(PathBuf::from("/k/a"), facts("sha256:theirs", 0o640))]);
        let p = plan(&[want("a", "/k/a")], false, &loose, &State::new(), &keys);
        assert_eq!(changes(&p), vec![("a", &Change::Adopt { fix_meta: true })]);

        let not_ours = Change::Conflict(ConflictReason::NotOurs);
        // Another key, no listing, or an age destination: a conflict, as before.
        let mut other = keys.clone();
        other.found.insert("/k/a".into(), "SHA256:other".into());
        let mut unlisted = keys.clone();
        unlisted.listed = None;
        for facts in [other, unlisted, none()] {
            let p = plan(&[want("a", "/k/a")], false, &obs, &State::new(), &facts);
            assert_eq!(changes(&p), vec![("a", &not_ours)]);
        }
        let mut enc = want("a", "/k/a");
        enc.recipients = Some("sha256:r".into());
        let p = plan(&[enc], false, &obs, &State::new(), &keys);
        assert_eq!(changes(&p), vec![("a", &not_ours)]);
    }

    fn changes(p: &Plan) -> Vec<(&str, &Change)> {
        p.actions
            .iter()
            .map(|a| (a.key.as_str(), &a.change))
            .collect()
    }

    #[test]
    fn missing_file_is_created_and_a_deleted_one_restored() {
        let mut state = State::new();
        let obs = ObservedFiles::default();
        let p = plan(&[want("a", "/k/a")], false, &obs, &state, &none());
        assert_eq!(changes(&p), vec![("a", &Change::Create)]);
        state.files.insert("a".into(), record("/k/a", "sha256:1"));
        let p = plan(&[want("a", "/k/a")], false, &obs, &state, &none());
        assert_eq!(
            changes(&p),
            vec![("a", &Change::Restore(RestoreReason::Deleted))]
        );
    }

    #[test]
    fn a_file_never_written_by_kps_sync_is_kept() {
        let obs =
            ObservedFiles::from_iter([(PathBuf::from("/k/a"), facts("sha256:theirs", 0o600))]);
        let p = plan(&[want("a", "/k/a")], true, &obs, &State::new(), &none());
        assert_eq!(
            changes(&p),
            vec![("a", &Change::Conflict(ConflictReason::NotOurs))]
        );
        assert!(!p.has_pending());
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let obs = ObservedFiles::from_iter([(PathBuf::from("/k/a"), Observed::Symlink)]);
        let mut state = State::new();
        state.files.insert("a".into(), record("/k/a", "sha256:1"));
        let p = plan(&[want("a", "/k/a")], true, &obs, &state, &none());
        assert_eq!(
            changes(&p),
            vec![("a", &Change::Conflict(ConflictReason::Symlink))]
        );
    }

    #[test]
    fn altered_meta_and_recipients() {
        let mut state = State::new();
        state.files.insert("a".into(), record("/k/a", "sha256:1"));
        let obs = ObservedFiles::from_iter([(PathBuf::from("/k/a"), facts("sha256:2", 0o600))]);
        let p = plan(&[want("a", "/k/a")], false, &obs, &state, &none());
        assert_eq!(
            changes(&p),
            vec![("a", &Change::Restore(RestoreReason::Altered))]
        );

        let obs = ObservedFiles::from_iter([(PathBuf::from("/k/a"), facts("sha256:1", 0o644))]);
        let p = plan(&[want("a", "/k/a")], false, &obs, &state, &none());
        assert_eq!(changes(&p), vec![("a", &Change::FixMeta)]);

        let mut enc = want("a", "/k/a");
        enc.recipients = Some("sha256:r".into());
        let p = plan(&[enc], false, &obs, &state, &none());
        assert_eq!(changes(&p), vec![("a", &Change::ReEncrypt)]);
    }

    #[test]
    fn prune_only_deletes_intact_files_of_ours() {
        let mut state = State::new();
        state
            .files
            .insert("gone".into(), record("/k/gone", "sha256:1"));
        state
            .files
            .insert("edited".into(), record("/k/edited", "sha256:1"));
        let obs = ObservedFiles::from_iter([
            (PathBuf::from("/k/gone"), facts("sha256:1", 0o600)),
            (
                PathBuf::from("/k/edited"),
                facts("sha256:someone-else", 0o600),
            ),
        ]);
        let p = plan(&[], true, &obs, &state, &none());
        assert_eq!(
            changes(&p),
            vec![("edited", &Change::Forget), ("gone", &Change::Prune)]
        );
        let p = plan(&[], false, &obs, &state, &none());
        assert_eq!(changes(&p)[1], ("gone", &Change::Orphan));
    }

    #[test]
    fn a_renamed_key_on_the_same_path_replaces_our_file() {
        let mut state = State::new();
        state.files.insert("old".into(), record("/k/a", "sha256:1"));
        let obs = ObservedFiles::from_iter([(PathBuf::from("/k/a"), facts("sha256:1", 0o600))]);
        let p = plan(&[want("new", "/k/a")], true, &obs, &state, &none());
        assert_eq!(
            changes(&p),
            vec![
                ("new", &Change::Restore(RestoreReason::Replaced)),
                ("old", &Change::Forget)
            ]
        );
    }

    /// Carry a plan out the way `reconcile` does, on the in-memory world.
    fn apply(
        plan: &Plan,
        desired: &[Desired],
        obs: &mut ObservedFiles,
        state: &mut State,
        keys: &KeyFacts,
        generation: &mut u32,
    ) {
        for action in &plan.actions {
            let want = desired.iter().find(|d| d.name == action.key);
            match &action.change {
                c if c.needs_export() => {
                    let want = want.unwrap();
                    *generation += 1;
                    let sha = format!("sha256:{}-{generation}", want.name);
                    obs.insert(
                        want.path.clone(),
                        Observed::Regular(FileFacts {
                            mode: want.meta.mode,
                            uid: want.meta.uid.unwrap_or(0),
                            gid: want.meta.gid.unwrap_or(0),
                            sha256: sha.clone(),
                        }),
                    );
                    let mut rec = record("", &sha);
                    rec.path = want.path.clone();
                    rec.recipients = want.recipients.clone();
                    // The export is verified against the listing: what is written is the
                    // listed key.
                    rec.fingerprint = keys.listed(&want.name).map(str::to_owned);
                    state.files.insert(want.name.clone(), rec);
                }
                Change::Adopt { fix_meta } => {
                    let want = want.unwrap();
                    let Some(Observed::Regular(f)) = obs.get_mut(&want.path) else {
                        panic!("adopt without a file");
                    };
                    if *fix_meta {
                        f.mode = want.meta.mode;
                        f.uid = want.meta.uid.unwrap_or(f.uid);
                        f.gid = want.meta.gid.unwrap_or(f.gid);
                    }
                    let mut rec = record("", &f.sha256);
                    rec.path = want.path.clone();
                    rec.fingerprint = keys.found.get(&want.path).cloned();
                    state.files.insert(want.name.clone(), rec);
                }
                Change::FixMeta => {
                    let want = want.unwrap();
                    if let Some(Observed::Regular(f)) = obs.get_mut(&want.path) {
                        f.mode = want.meta.mode;
                        f.uid = want.meta.uid.unwrap_or(f.uid);
                        f.gid = want.meta.gid.unwrap_or(f.gid);
                    }
                }
                Change::Prune => {
                    obs.insert(action.path.clone(), Observed::Missing);
                    state.forget(&action.key, &action.path);
                }
                Change::Forget => state.forget(&action.key, &action.path),
                _ => {}
            }
            let Some(want) = want else { continue };
            let Some(public_path) = &want.public_key else {
                continue;
            };
            match &action.public {
                Some(PublicChange::Write) => {
                    *generation += 1;
                    let sha = format!("sha256:pub-{}-{generation}", want.name);
                    obs.insert(
                        public_path.clone(),
                        Observed::Regular(FileFacts {
                            mode: PUBLIC_MODE,
                            uid: want.meta.uid.unwrap_or(0),
                            gid: want.meta.gid.unwrap_or(0),
                            sha256: sha.clone(),
                        }),
                    );
                    let rec = state
                        .files
                        .get_mut(&want.name)
                        .expect("the key is recorded");
                    rec.public_key = Some(crate::state::PublicRecord {
                        path: public_path.clone(),
                        sha256: sha,
                        stat: None,
                    });
                }
                Some(PublicChange::Adopt { fix_meta }) => {
                    let Some(Observed::Regular(f)) = obs.get_mut(public_path) else {
                        panic!("adopt without a file");
                    };
                    if *fix_meta {
                        f.mode = PUBLIC_MODE;
                        f.uid = want.meta.uid.unwrap_or(f.uid);
                        f.gid = want.meta.gid.unwrap_or(f.gid);
                    }
                    let rec = state
                        .files
                        .get_mut(&want.name)
                        .expect("the key is recorded");
                    rec.public_key = Some(crate::state::PublicRecord {
                        path: public_path.clone(),
                        sha256: f.sha256.clone(),
                        stat: None,
                    });
                }
                _ => {}
            }
        }
    }

    fn arb_observed() -> impl Strategy<Value = Observed> {
        prop_oneof![
            Just(Observed::Missing),
            Just(Observed::Symlink),
            Just(Observed::NotRegular),
            (
                0..3u8,
                prop_oneof![Just(0o600u32), Just(0o644), Just(0o400)],
                0..2u32
            )
                .prop_map(|(h, mode, uid)| Observed::Regular(FileFacts {
                    mode,
                    uid,
                    gid: uid,
                    sha256: format!("sha256:{h}"),
                })),
        ]
    }

    fn arb_world() -> impl Strategy<Value = (Vec<Desired>, bool, ObservedFiles, State, KeyFacts)> {
        let names = ["a", "b", "c", "d"];
        let paths = ["/k/1", "/k/2", "/k/3", "/k/4", "/k/5"];
        (
            proptest::sample::subsequence(names.to_vec(), 0..=4),
            proptest::sample::subsequence(paths.to_vec(), 5),
            proptest::collection::vec(
                (
                    prop_oneof![Just(0o600u32), Just(0o400)],
                    proptest::option::of(0..2u32),
                    proptest::option::of(0..2u8),
                ),
                4,
            ),
            any::<bool>(),
            proptest::collection::vec(arb_observed(), 5),
            proptest::collection::vec(
                proptest::option::of((
                    0..5usize,
                    0..3u8,
                    proptest::option::of(0..2u8),
                    proptest::option::of(0..2u8),
                )),
                4,
            ),
            proptest::option::of(proptest::collection::vec(
                proptest::option::of(proptest::option::of(0..2u8)),
                4,
            )),
            proptest::collection::vec(proptest::option::of(0..2u8), 5),
            // Public key files: declared or not per key; what is at each key path's `.pub`;
            // a record of one per key record; a key found in each.
            proptest::collection::vec(any::<bool>(), 4),
            proptest::collection::vec(arb_observed(), 5),
            proptest::collection::vec(proptest::option::of(0..3u8), 4),
            proptest::collection::vec(proptest::option::of(0..2u8), 5),
        )
            .prop_map(
                move |(
                    names_used,
                    paths,
                    metas,
                    prune,
                    observed,
                    records,
                    listed,
                    found,
                    public,
                    public_observed,
                    public_records,
                    public_found,
                )| {
                    let pub_of = |p: &str| PathBuf::from(format!("{p}.pub"));
                    let desired: Vec<Desired> = names_used
                        .iter()
                        .enumerate()
                        .map(|(i, n)| Desired {
                            name: n.to_string(),
                            path: paths[i].into(),
                            meta: FileMeta {
                                mode: metas[i].0,
                                uid: metas[i].1,
                                gid: metas[i].1,
                            },
                            recipients: metas[i].2.map(|r| format!("sha256:r{r}")),
                            public_key: public[i].then(|| pub_of(paths[i])),
                        })
                        .collect();
                    let mut obs: ObservedFiles = paths
                        .iter()
                        .zip(observed)
                        .map(|(p, o)| (PathBuf::from(p), o))
                        .collect();
                    obs.extend(
                        paths
                            .iter()
                            .zip(public_observed)
                            .map(|(p, o)| (pub_of(p), o)),
                    );
                    let mut state = State::new();
                    for ((name, rec), public) in names.iter().zip(records).zip(public_records) {
                        if let Some((p, h, r, f)) = rec {
                            let mut fr = record(paths[p], &format!("sha256:{h}"));
                            fr.recipients = r.map(|r| format!("sha256:r{r}"));
                            fr.fingerprint = f.map(|f| format!("SHA256:{f}"));
                            fr.public_key = public.map(|h| crate::state::PublicRecord {
                                path: pub_of(paths[p]),
                                sha256: format!("sha256:{h}"),
                                stat: None,
                            });
                            state.files.insert(name.to_string(), fr);
                        }
                    }
                    // Each name: not listed, listed without a usable key, or with one of two.
                    let listed = listed.map(|l| {
                        names
                            .iter()
                            .zip(l)
                            .filter_map(|(n, e)| {
                                e.map(|f| (n.to_string(), f.map(|f| format!("SHA256:{f}"))))
                            })
                            .collect()
                    });
                    let found = paths
                        .iter()
                        .zip(found)
                        .filter_map(|(p, f)| f.map(|f| (PathBuf::from(p), format!("SHA256:{f}"))))
                        .chain(
                            paths
                                .iter()
                                .zip(public_found)
                                .filter_map(|(p, f)| f.map(|f| (pub_of(p), format!("SHA256:{f}")))),
                        )
                        .collect();
                    (desired, prune, obs, state, KeyFacts { listed, found })
                },
            )
    }

    proptest! {
        #[test]
        fn applying_a_plan_then_planning_again_yields_nothing_to_do(
            (desired, prune, mut obs, mut state, keys) in arb_world()
        ) {
            let first = plan(&desired, prune, &obs, &state, &keys);
            let conflicts_before: Vec<_> = first.conflicts().cloned().collect();
            let mut generation = 0;
            apply(&first, &desired, &mut obs, &mut state, &keys, &mut generation);
            let second = plan(&desired, prune, &obs, &state, &keys);
            prop_assert!(!second.has_pending(), "first: {first:?}\nsecond: {second:?}");
            // Nothing that was not ours became ours, and conflicts stay conflicts.
            let conflicts_after: Vec<_> = second.conflicts().cloned().collect();
            prop_assert_eq!(conflicts_before, conflicts_after);
            prop_assert!(second.actions.iter().all(|a| a.change != Change::Forget));
        }

        #[test]
        fn files_not_ours_are_never_touched(
            (desired, prune, obs, state, keys) in arb_world()
        ) {
            let p = plan(&desired, prune, &obs, &state, &keys);
            for action in p.pending() {
                if matches!(action.change, Change::Adopt { .. }) {
                    // Adopted only when the file holds the very key KPS lists.
                    let held = keys.found.get(&action.path);
                    prop_assert!(held.is_some() && held.map(String::as_str) == keys.listed(&action.key));
                    continue;
                }
                if action.public == Some(PublicChange::Write) {
                    let want = desired.iter().find(|d| d.name == action.key).unwrap();
                    let path = want.public_key.as_ref().unwrap();
                    if let Some(Observed::Regular(_)) = obs.get(path) {
                        let ours = state.files.get(&action.key).is_some_and(|r| {
                            r.path == action.path
                                && r.public_key.as_ref().is_some_and(|p| &p.path == path)
                        });
                        prop_assert!(ours, "{action:?} would overwrite a public key file not ours");
                    }
                }
                if !action.change.is_pending() {
                    continue;
                }
                if let Some(Observed::Regular(f)) = obs.get(&action.path) {
                    let ours = state.files.values().any(|r| r.path == action.path && r.sha256 == f.sha256)
                        || state.files.get(&action.key).is_some_and(|r| r.path == action.path);
                    prop_assert!(ours, "{action:?} would touch a file not ours");
                }
            }
        }
    }
}
