//! The end of a pass's bookkeeping: each declared key's last failure into the state (forgotten
//! once the key is in place), the pass's counts into the state and the report, and the
//! `on_change` hooks of the keys written.
//!
//! Invariants: a key counts once however many files it has (key, public key, old file): failed
//! when any of them failed, not in place when nothing was tried for it (an interrupted pass);
//! hooks run after the state records what was written, once per distinct argv.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::outcome::PassReport;
use super::planned::{Ledger, Planned};
use crate::hooks::HookError;
use crate::manifest::Settings;
use crate::state::{self, ErrorRecord, PassRecord};

impl Ledger {
    /// Remember each declared key's last failure, forget it once the key is in place, and
    /// record the pass. Returns the report without its pass-level fields; the keys' outcomes
    /// move into it.
    pub fn tally(&mut self, managed: usize) -> PassReport {
        let now = state::now_rfc3339();
        let mut failed = 0;
        let mut not_attempted = 0;
        for key in self.keys.iter().filter(|k| k.declared.is_some()) {
            let name = &key.action.key;
            let last_failure = key
                .outcomes
                .iter()
                .rev()
                .find_map(|o| o.result.as_ref().err());
            match last_failure {
                Some(cause) => {
                    failed += 1;
                    let record = ErrorRecord {
                        at: now.clone(),
                        message: cause.record(),
                    };
                    self.state.errors.insert(name.clone(), record);
                }
                None if key.outcomes.is_empty() => not_attempted += 1,
                None => {
                    self.state.errors.remove(name);
                }
            }
        }
        let declared: HashSet<&str> = self
            .keys
            .iter()
            .filter(|k| k.declared.is_some())
            .map(|k| k.action.key.as_str())
            .collect();
        self.state
            .errors
            .retain(|k, _| declared.contains(k.as_str()));
        let in_place = managed - failed - not_attempted;
        self.state.last_pass = Some(PassRecord {
            at: now,
            managed,
            in_place,
            failed,
        });
        // Moved, not copied: nothing after the tally reads a key's outcomes, and 10,000 of
        // them held twice are megabytes.
        let mut outcomes = Vec::with_capacity(self.keys.iter().map(|k| k.outcomes.len()).sum());
        for key in &mut self.keys {
            outcomes.extend(std::mem::take(&mut key.outcomes));
        }
        PassReport {
            outcomes,
            managed,
            in_place,
            failed: failed + not_attempted,
            ..PassReport::default()
        }
    }
}

/// Run the hooks of the keys written in this pass: once per distinct argv, with every written
/// key that shares it in `KPS_SYNC_KEYS`. Returns the failures; stops early on shutdown.
pub(super) async fn run_hooks(
    keys: &[Planned],
    settings: &Settings,
    stopping: impl Fn() -> bool,
) -> Vec<Arc<HookError>> {
    let mut by_argv: BTreeMap<&[String], Vec<&Planned>> = BTreeMap::new();
    for key in keys.iter().filter(|k| k.written) {
        if let Some(declared) = key.declared.as_ref().filter(|d| !d.on_change.is_empty()) {
            by_argv.entry(&declared.on_change).or_default().push(key);
        }
    }
    let mut failures = Vec::new();
    for (argv, keys) in by_argv {
        if stopping() {
            break;
        }
        let names: Vec<&str> = keys.iter().map(|k| k.action.key.as_str()).collect();
        let actions: Vec<&str> = keys.iter().map(|k| k.action.change.word()).collect();
        let ran = crate::hooks::run(
            &names,
            &actions,
            &keys[0].action.path,
            argv,
            settings.hook_timeout,
            &settings.hook_env,
        )
        .await;
        crate::metrics::global().hook_run(ran.is_ok());
        if let Err(e) = ran {
            failures.push(Arc::new(e));
        }
    }
    failures
}
