//! One struct per key of the plan, from the plan to the report: what the manifest declares for
//! the key, what the plan decided for its file (and for its old file when it moved), and what
//! became of each. The pass's filesystem steps work on a [`Ledger`] of them with the state.
//!
//! Invariants: the key and its plan are joined once, here, by the planner's order (one action
//! per declared key, in the manifest's order, then one per record no longer backed); nothing
//! after looks a key up again by name. A record of a key that is still declared (at another
//! path: it moved) travels with that key, so the old file's fate and the new copy's are judged
//! together.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::manifest::{Encryption, KeySpec};
use crate::plan::{Action, Desired, Plan};
use crate::state::State;

use super::outcome::{Cause, Outcome};

/// A key the manifest declares, and what that means on disk: what the pass needs of its
/// declaration, not a copy of it (10,000 copies of every `KeySpec` cost megabytes).
#[derive(Debug)]
pub(super) struct Declared {
    /// Its name, path, mode, owner, group, recipients and public key file.
    pub want: Desired,
    /// age encryption, where declared.
    pub encryption: Option<Encryption>,
    /// The argv to run after the key file changed; empty for none.
    pub on_change: Vec<String>,
}

/// One key of the plan and what became of it.
#[derive(Debug)]
pub(super) struct Planned {
    /// `None` for a recorded file of a key no longer in the manifest (prune, orphan, forget).
    pub declared: Option<Arc<Declared>>,
    /// The key file's action (for a key no longer declared: its recorded file's).
    pub action: Action,
    /// A declared key's recorded file at the path it had before it moved (boxed: rare, and
    /// an `Action` inline in each of 10,000 keys would cost more than the action itself).
    pub moved_from: Option<Box<Action>>,
    /// What became of the key file, its public key file and its old file, in order.
    pub outcomes: Vec<Outcome>,
    /// The key file was exported and written in this pass: its `on_change` runs.
    pub written: bool,
}

impl Planned {
    /// Join the manifest's keys (as the observation made them `Desired`) to the plan.
    pub fn join(specs: &[KeySpec], desired: Vec<Desired>, plan: Plan) -> Vec<Planned> {
        let mut actions = plan.actions.into_iter();
        let mut keys: Vec<Planned> = specs
            .iter()
            .zip(desired)
            .zip(actions.by_ref())
            .map(|((spec, want), action)| {
                debug_assert_eq!((&spec.name, &want.name), (&action.key, &action.key));
                Planned::new(
                    Some(Arc::new(Declared {
                        want,
                        encryption: spec.encryption.clone(),
                        on_change: spec.on_change.clone(),
                    })),
                    action,
                )
            })
            .collect();
        let declared: HashMap<String, usize> = keys
            .iter()
            .enumerate()
            .map(|(at, k)| (k.action.key.clone(), at))
            .collect();
        for action in actions {
            match declared.get(&action.key) {
                Some(&at) => keys[at].moved_from = Some(Box::new(action)),
                None => keys.push(Planned::new(None, action)),
            }
        }
        keys
    }

    fn new(declared: Option<Arc<Declared>>, action: Action) -> Planned {
        Planned {
            declared,
            action,
            moved_from: None,
            outcomes: Vec::new(),
            written: false,
        }
    }

    /// Record what became of the key file (or, for a key no longer declared, its recorded file).
    pub fn report(&mut self, result: Result<(), Cause>) {
        self.report_at(self.action.path.clone(), result);
    }

    /// Record what became of another file of the key (its public key file).
    pub fn report_at(&mut self, path: PathBuf, result: Result<(), Cause>) {
        // Most keys get one outcome: a push's default growth (room for four) would triple the
        // memory the outcomes of a 10,000-key pass hold.
        self.outcomes.reserve_exact(1);
        self.outcomes.push(Outcome {
            key: self.action.key.clone(),
            path,
            change: self.action.change.clone(),
            result,
        });
    }

    /// Record what became of the key's old file (it moved).
    pub fn report_moved(&mut self, result: Result<(), Cause>) {
        let Some(old) = &self.moved_from else {
            return;
        };
        self.outcomes.reserve_exact(1);
        self.outcomes.push(Outcome {
            key: old.key.clone(),
            path: old.path.clone(),
            change: old.change.clone(),
            result,
        });
    }

    /// Did anything of this key fail in this pass?
    pub fn failed(&self) -> bool {
        self.outcomes.iter().any(|o| o.result.is_err())
    }
}

/// What the pass's filesystem steps work on: every planned key, the state, and the key held by
/// each file kps-sync did not write (from the observation). Owned, so that it can be moved to
/// a blocking thread and back.
pub(super) struct Ledger {
    pub keys: Vec<Planned>,
    pub state: State,
    /// Adoption candidates: path -> `SHA256:` fingerprint of the key in the file.
    pub found: HashMap<PathBuf, String>,
    pub state_dir: PathBuf,
}
