//! The changes a pass makes without KPS: before the exports, fix-meta, adopt, forget, and the
//! conflicts and held keys to report (which also decides what to export); after them, the
//! public key files to adopt or report, and the prunes. Each runs on a blocking thread, on the
//! pass's [`Ledger`].
//!
//! Invariants: a file is changed only through `write` (which re-checks it is still the file
//! planned); a key moved to a new path keeps its old file until its new copy is in place in
//! this pass, so a failure of any kind never leaves it without a copy on disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::export::Job;
use super::outcome::Cause;
use super::place::display_public;
use super::planned::{Ledger, Planned};
use crate::output::meta::FileMeta;
use crate::output::write;
use crate::plan::{self, Change, PublicChange};
use crate::state::{self, FileRecord, PublicRecord};

impl Ledger {
    /// Carry out every change that needs no export, in plan order, and say what to export.
    /// `held`: keys not to export in this pass, with the failure they keep reporting.
    pub fn apply_local(&mut self, held: &BTreeMap<String, Cause>) -> Vec<Job> {
        let mut jobs = Vec::new();
        for at in 0..self.keys.len() {
            jobs.extend(self.apply_one(at, held));
            if let Some(old) = self.keys[at].moved_from.clone() {
                match old.change {
                    Change::Forget => self.state.forget(&old.key, &old.path),
                    // After the exports: the old file stays until the new one is in place.
                    Change::Prune => continue,
                    _ => {}
                }
                self.keys[at].report_moved(Ok(()));
            }
        }
        jobs
    }

    fn apply_one(&mut self, at: usize, held: &BTreeMap<String, Cause>) -> Option<Job> {
        let change = self.keys[at].action.change.clone();
        let result = match &change {
            c if c.needs_export() => {
                let key = &mut self.keys[at];
                match held.get(&key.action.key) {
                    Some(cause) => key.report(Err(cause.clone())),
                    None => return Some(Job::new(at, key, true, None)),
                }
                return None;
            }
            Change::FixMeta => fix_meta(&self.keys[at]),
            // After the exports: a key moved to a new path keeps its old file until the new
            // one is in place.
            Change::Prune => return None,
            Change::Adopt { fix_meta } => self.adopt(at, *fix_meta),
            Change::Forget => {
                let action = &self.keys[at].action;
                self.state.forget(&action.key, &action.path);
                Ok(())
            }
            Change::Conflict(reason) => Err(Cause::Conflict {
                path: self.keys[at].action.path.clone(),
                reason: reason.clone(),
            }),
            Change::Keep | Change::Orphan => Ok(()),
            _ => unreachable!("needs_export covers the rest"),
        };
        let (result, job) = match result {
            Ok(()) => self.public_only(at),
            failed => (failed, None),
        };
        self.keys[at].report(result);
        job
    }

    /// The key file is kept, but its public key file needs the key: export it, and check it
    /// is still the key on disk before writing its public half.
    fn public_only(&self, at: usize) -> (Result<(), Cause>, Option<Job>) {
        let key = &self.keys[at];
        let Some(declared) = &key.declared else {
            return (Ok(()), None);
        };
        if key.action.public != Some(PublicChange::Write) {
            return (Ok(()), None);
        }
        let recorded = self.state.files.get(&key.action.key);
        match recorded.and_then(|r| r.fingerprint.clone()) {
            Some(expect) => (Ok(()), Some(Job::new(at, key, false, Some(expect)))),
            None => (Err(Cause::PublicUnrecorded(display_public(declared))), None),
        }
    }

    /// Record a file that holds the very key KPS lists as ours, fixing its metadata first
    /// where asked.
    fn adopt(&mut self, at: usize, fix: bool) -> Result<(), Cause> {
        let key = &self.keys[at];
        if fix {
            fix_meta(key)?;
        }
        let path = key.action.path.clone();
        tracing::info!(key = %key.action.key, path = %path.display(), "adopted: the file holds the key KPS lists; recorded as managed, not rewritten");
        let record = FileRecord {
            fingerprint: self.found.get(&path).cloned(),
            path,
            sha256: key.action.seen.clone().unwrap_or_default(),
            written_at: state::now_rfc3339(),
            recipients: None,
            public_key: None,
            stat: None,
        };
        self.state.files.insert(key.action.key.clone(), record);
        Ok(())
    }

    /// Adopt or report each public key file that needs no export, now that the keys written
    /// in this pass are recorded.
    pub fn public_files(&mut self) {
        for at in 0..self.keys.len() {
            let key = &self.keys[at];
            let (Some(declared), Some(public)) = (&key.declared, &key.action.public) else {
                continue;
            };
            let Some(path) = declared.want.public_key.clone() else {
                continue;
            };
            let result = match public {
                PublicChange::Write => continue,
                PublicChange::Conflict(reason) => Err(Cause::Conflict {
                    path: path.clone(),
                    reason: reason.clone(),
                }),
                PublicChange::Adopt { fix_meta } => {
                    let recorded = self
                        .state
                        .files
                        .get(&key.action.key)
                        .filter(|r| r.path == declared.want.path)
                        .and_then(|r| r.fingerprint.as_ref());
                    if recorded != self.found.get(&path) {
                        // The key was not written (its failure is reported), or is not the one
                        // this file holds: leave the file alone.
                        continue;
                    }
                    self.adopt_public(at, *fix_meta)
                }
            };
            self.keys[at].report_at(path, result);
        }
    }

    fn adopt_public(&mut self, at: usize, fix: bool) -> Result<(), Cause> {
        let key = &self.keys[at];
        let declared = key
            .declared
            .as_ref()
            .expect("only declared keys have public files");
        let path = declared
            .want
            .public_key
            .as_ref()
            .expect("checked by the caller");
        let seen = key.action.public_seen.clone().unwrap_or_default();
        if fix {
            let meta = FileMeta {
                mode: plan::PUBLIC_MODE,
                ..declared.want.meta
            };
            write::fix_meta(path, meta, &seen).map_err(|e| Cause::Write(Arc::new(e)))?;
        }
        if let Some(rec) = self.state.files.get_mut(&key.action.key) {
            tracing::info!(key = %key.action.key, path = %path.display(), "adopted the public key file: it holds the key's public half");
            rec.public_key = Some(PublicRecord {
                path: path.clone(),
                sha256: seen,
                stat: None,
            });
        }
        Ok(())
    }

    /// Delete the files of keys no longer in the manifest (and the old files of moved keys),
    /// each only if it still holds exactly what kps-sync wrote. Any failure of a moved key's
    /// new copy (an export, a conflict in the way, an adoption whose fix failed) keeps the old
    /// one: it may be the only copy on disk.
    pub fn prune(&mut self) {
        for key in &mut self.keys {
            let moved = key.moved_from.is_some();
            let old = key.moved_from.as_deref().unwrap_or(&key.action).clone();
            if old.change != Change::Prune || key.failed() {
                continue;
            }
            let seen = old.seen.as_deref().unwrap_or_default();
            let result = write::remove(&old.path, seen).map_err(|e| Cause::Prune(Arc::new(e)));
            if result.is_ok() {
                tracing::info!(key = %old.key, path = %old.path.display(), "pruned: no longer in the manifest");
                self.state.forget(&old.key, &old.path);
            }
            if moved {
                key.report_moved(result);
            } else {
                key.report(result);
            }
        }
    }
}

/// Set the declared mode, owner and group on a file that is ours and intact.
fn fix_meta(key: &Planned) -> Result<(), Cause> {
    let Some(declared) = &key.declared else {
        return Ok(());
    };
    let seen = key.action.seen.as_deref().unwrap_or_default();
    write::fix_meta(&declared.want.path, declared.want.meta, seen)
        .map_err(|e| Cause::Write(Arc::new(e)))?;
    if key.action.change == Change::FixMeta {
        tracing::info!(key = %key.action.key, path = %key.action.path.display(), "fixed mode/owner/group");
    }
    Ok(())
}
