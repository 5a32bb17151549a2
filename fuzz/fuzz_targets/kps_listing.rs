//! The KPS listing parser and its paging rules (`kps_sync::kps::Pages`) on arbitrary pages.
//! The input is the sequence of page bodies, split at 0xFF (a byte no JSON text holds).
//!
//! Invariants checked besides "no panic":
//! - a marker is asked for at most once (a server cannot make the client page forever);
//! - a complete listing holds every name of every page read, with that page's entry;
//! - the listed fingerprint is `SHA256:` form or absent.
#![no_main]

use std::collections::HashSet;

use kps_sync::kps::Pages;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

#[derive(Deserialize)]
struct NamesOnly {
    keypairs: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    keypair: Name,
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

fuzz_target!(|data: &[u8]| {
    let mut pages = Pages::default();
    let mut asked = HashSet::new();
    let mut names = Vec::new();
    let mut complete = false;
    let mut names_known = true;
    for body in data.split(|&b| b == 0xFF) {
        match pages.take(body) {
            Ok(next) => {
                // Read back the names only: the fields Pages skips are not checked by serde
                // (their UTF-8, their numbers' range), so they are skipped here too. serde_json
                // also reads a struct from an array of its fields, and an item here has fewer
                // fields than the listing's: where the two readings part, only the paging
                // rules are checked.
                match serde_json::from_slice::<NamesOnly>(body) {
                    Ok(page) => names.extend(page.keypairs.into_iter().map(|i| i.keypair.name)),
                    Err(_) => names_known = false,
                }
                match next {
                    Some(marker) => assert!(asked.insert(marker), "a marker asked for twice"),
                    None => {
                        complete = true;
                        break;
                    }
                }
            }
            Err(err) => {
                assert!(kps_sync_fuzz::one_log_line(&err.to_string()));
                return;
            }
        }
    }
    if !complete {
        return;
    }
    let listing = pages.into_listing();
    if !names_known {
        return;
    }
    for name in &names {
        assert!(
            listing.contains_key(name),
            "{name:?} was read but is not listed"
        );
    }
    assert!(listing.len() <= names.len());
    for (name, info) in &listing {
        assert_eq!(&info.name, name);
        let _ = info.is_frozen();
        if let Some(fp) = info.fingerprint_sha256() {
            assert!(fp.starts_with("SHA256:"), "{fp:?}");
        }
    }
});
