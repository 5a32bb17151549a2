//! What a pass reads before it plans: the state (with the intent journal folded in), every
//! destination's facts, and the fingerprint of the key held by each file kps-sync did not write
//! (the adoption candidates). From it come the plan, with or without a listing, and the reason
//! the pass must list KPS, if any.
//!
//! Invariants: reads only, calls nothing, reads no credential, and runs on a blocking thread
//! (the state file, the journal, a stat and maybe a hash per destination); a candidate file is
//! read at most [`MAX_CANDIDATE`] bytes, only if it is still the file observed, and the bytes
//! are wiped.

use std::collections::HashMap;
use std::ffi::OsStr;

use rustc_hash::FxHashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::keys;
use crate::kps::Listing;
use crate::manifest::Manifest;
use crate::observe::{self, Observed, ObservedFiles};
use crate::plan::{self, Action, Desired, KeyFacts, Plan};
use crate::state::{self, State, StateError};

/// What a pass reads before it plans: the state, the destinations, and the key held by each
/// file kps-sync did not write.
pub struct Observation {
    pub state: State,
    pub(super) desired: Vec<Desired>,
    pub(super) observed: ObservedFiles,
    /// Adoption candidates: path -> `SHA256:` fingerprint of the key in the file (the private
    /// key at a key path, the public key at a `public_key` path).
    pub(super) found: HashMap<PathBuf, String>,
    /// Some key file among them: only those need a listing to be judged (a public key file
    /// is judged against the state's fingerprint, or with its key file).
    pub(super) key_candidates: bool,
}

/// Largest file read to see whether it holds a key (an RSA 16384 PEM is under 13 KiB).
const MAX_CANDIDATE: u64 = 64 << 10;

impl Observation {
    /// Read the state and look at every destination, on a blocking thread. Reads no
    /// credential, calls nothing.
    pub async fn read(manifest: &Manifest) -> Result<Observation, StateError> {
        let desired: Vec<Desired> = manifest.keys.iter().map(Desired::from).collect();
        let state_dir = manifest.settings.state_dir.clone();
        super::blocking(move || Observation::read_now(&state_dir, desired)).await
    }

    fn read_now(state_dir: &Path, desired: Vec<Desired>) -> Result<Observation, StateError> {
        let mut state = State::load(state_dir)?;
        // Files published just before a crash, not yet in the state: ours (see state::journal).
        state::journal::fold(&mut state, state_dir);
        // By bytes, as `observe::PathMap` keys them: each spelling is looked at.
        let paths: FxHashSet<&OsStr> = desired
            .iter()
            .flat_map(|d| std::iter::once(d.path.as_path()).chain(d.public_key.as_deref()))
            .chain(state.files.values().map(|r| r.path.as_path()))
            .map(Path::as_os_str)
            .collect();
        let (observed, fresh) =
            observe::observe_all(paths.into_iter().map(Path::new), &state.known());
        let backfill = fingerprints_to_backfill(&desired, &state, &observed);
        let (found, key_candidates) = adoption_candidates(&desired, &state, &observed);
        state.remember(&observed, &fresh);
        for (name, fingerprint) in backfill {
            if let Some(rec) = state.files.get_mut(&name) {
                rec.fingerprint = Some(fingerprint);
            }
        }
        Ok(Observation {
            state,
            desired,
            observed,
            found,
            key_candidates,
        })
    }

    /// The plan, with this pass's listing if it has one.
    pub fn plan(&self, manifest: &Manifest, listing: Option<&Listing>) -> Plan {
        let keys = KeyFacts {
            listed: listing.map(|l| {
                l.iter()
                    .map(|(name, info)| (name.clone(), info.fingerprint_sha256()))
                    .collect()
            }),
            found: self.found.clone(),
        };
        plan::plan(
            &self.desired,
            manifest.settings.prune,
            &self.observed,
            &self.state,
            &keys,
        )
    }

    /// Why this pass must list KPS, judged on the plan made without a listing; `None`: it
    /// need not.
    pub fn listing_reason(
        &self,
        manifest: &Manifest,
        unlisted: &Plan,
        forced: bool,
        now: SystemTime,
    ) -> Option<&'static str> {
        if forced {
            return Some("asked for (--check-rotation)");
        }
        if manifest.keys.is_empty() {
            return None;
        }
        if manifest.settings.verify_remote && unlisted.actions.iter().any(Action::needs_export) {
            return Some("keys to export");
        }
        if self.key_candidates {
            return Some("files kps-sync did not write hold keys: adoption");
        }
        // Only a key whose fingerprint is recorded can be seen to rotate.
        let rotatable = self.desired.iter().any(|d| {
            self.state
                .files
                .get(&d.name)
                .is_some_and(|r| r.path == d.path && r.fingerprint.is_some())
        });
        if rotatable
            && self
                .state
                .listing_due(manifest.settings.rotation_check, now)
        {
            return Some("rotation check due");
        }
        None
    }
}

/// Plain keys recorded by an older version, without the fingerprint rotation needs: read it
/// from the file, once, while the file is still the one kps-sync wrote. Key name ->
/// fingerprint.
fn fingerprints_to_backfill(
    desired: &[Desired],
    state: &State,
    observed: &ObservedFiles,
) -> Vec<(String, String)> {
    desired
        .iter()
        .filter(|d| d.recipients.is_none())
        .filter_map(|d| {
            let rec = state.files.get(&d.name)?;
            if rec.path != d.path || rec.fingerprint.is_some() || rec.recipients.is_some() {
                return None;
            }
            match observed.get(&d.path) {
                Some(Observed::Regular(f)) if f.sha256 == rec.sha256 => {
                    Some((d.name.clone(), held_key(&d.path, &rec.sha256)?))
                }
                _ => None,
            }
        })
        .collect()
}

/// The key held by each file kps-sync did not write where a key or its public key belongs
/// (path -> `SHA256:` fingerprint), and whether a key file is among them.
fn adoption_candidates(
    desired: &[Desired],
    state: &State,
    observed: &ObservedFiles,
) -> (HashMap<PathBuf, String>, bool) {
    let ours: FxHashSet<(&Path, &str)> = state
        .files
        .values()
        .map(|r| (r.path.as_path(), r.sha256.as_str()))
        .collect();
    // Plain destinations with no record of ours for the key: a file there may be a copy of
    // the listed key, placed by hand or by another tool.
    let mut found: HashMap<PathBuf, String> = desired
        .iter()
        .filter(|d| d.recipients.is_none())
        .filter(|d| state.files.get(&d.name).is_none_or(|r| r.path != d.path))
        .filter_map(|d| match observed.get(&d.path) {
            Some(Observed::Regular(f))
                if !ours.contains(&(d.path.as_path(), f.sha256.as_str())) =>
            {
                Some((d.path.clone(), held_key(&d.path, &f.sha256)?))
            }
            _ => None,
        })
        .collect();
    let key_candidates = !found.is_empty();
    // Public key files with no record of ours.
    for d in desired {
        let Some(path) = &d.public_key else {
            continue;
        };
        let recorded = state
            .files
            .get(&d.name)
            .and_then(|r| r.public_key.as_ref())
            .is_some_and(|p| &p.path == path);
        if !recorded
            && let Some(Observed::Regular(f)) = observed.get(path)
            && let Some(fp) = held_public_key(path, &f.sha256)
        {
            found.insert(path.clone(), fp);
        }
    }
    (found, key_candidates)
}

/// The `SHA256:` fingerprint of the private key in `path`, if it is one and still the file
/// observed (`sha256`). The bytes read are wiped.
fn held_key(path: &Path, sha256: &str) -> Option<String> {
    let (file, meta) = observe::open_regular(path).ok()?;
    if meta.len() > MAX_CANDIDATE {
        return None;
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.take(MAX_CANDIDATE).read_to_end(&mut bytes).ok()?;
    if observe::sha256_of(&bytes) != sha256 {
        return None;
    }
    keys::PrivateKey::parse(&bytes)
        .ok()
        .map(|key| key.fingerprint_sha256())
}

/// The `SHA256:` fingerprint of the public key line in `path`, if it holds one and is still
/// the file observed (`sha256`).
fn held_public_key(path: &Path, sha256: &str) -> Option<String> {
    const MAX_PUBLIC: u64 = 16 << 10;
    let (file, meta) = observe::open_regular(path).ok()?;
    if meta.len() > MAX_PUBLIC {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_PUBLIC).read_to_end(&mut bytes).ok()?;
    if observe::sha256_of(&bytes) != sha256 {
        return None;
    }
    let text = std::str::from_utf8(&bytes).ok()?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines.next()?;
    // Exactly one key line: a file that holds more (a private key after it) is no public key
    // file, and adopting it would give it mode 0644.
    if lines.next().is_some() {
        return None;
    }
    crate::kps::public_key_fingerprint(line)
}
