//! The manifest loader (`kps_sync::manifest::load_str_isolated`: the whole parse and
//! validation of `load`, from YAML text, without the host's environment or user database).
//! The manifest sits in a folder that does not exist, so relative paths name nothing; absolute
//! paths in the text are looked at as the loader does (strict modes, recipients files).
//!
//! Invariants checked besides "no panic":
//! - loading is deterministic;
//! - a refusal names at least one problem, each at a line and column inside the text;
//! - an accepted manifest keeps the model's promises: keys sorted by unique name, absolute
//!   paths, modes within 0640, a 32-hex project id, an endpoint without a trailing slash.
#![no_main]

use std::path::Path;

use kps_sync::manifest::{ManifestError, load_str_isolated};
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/nonexistent-kps-sync-fuzz/manifest.yaml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = load_str_isolated(text, Path::new(PATH));
    let second = load_str_isolated(text, Path::new(PATH));
    assert_eq!(
        format!("{first:?}"),
        format!("{second:?}"),
        "loading is deterministic"
    );
    match first {
        Ok(m) => {
            assert!(
                m.keys.windows(2).all(|w| w[0].name < w[1].name),
                "sorted, unique"
            );
            for key in &m.keys {
                assert!(key.path.is_absolute(), "{:?}", key.path);
                assert_eq!(key.mode & !0o640, 0, "{:o}", key.mode);
                assert!(!key.name.is_empty());
            }
            assert!(m.settings.state_dir.is_absolute());
            assert_eq!(m.kps.project_id.len(), 32);
            assert!(m.kps.project_id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(!m.kps.endpoint.ends_with('/'), "{}", m.kps.endpoint);
        }
        Err(ManifestError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty());
            let lines = text.lines().count().max(1);
            for p in &problems {
                if let Some(at) = p.location {
                    assert!(at.line >= 1 && at.column >= 1, "{at:?}");
                    assert!(
                        at.line <= lines + 1,
                        "{at:?} past line {lines}: {}",
                        p.message
                    );
                }
            }
        }
        Err(other) => panic!("no file is read for the text itself: {other}"),
    }
});
