//! The key parser and normaliser (`kps_sync::keys`) on arbitrary bytes, as a zip entry or an
//! export answer would hand them over.
//!
//! Invariants checked besides "no panic":
//! - a parsed key's normalised text parses again to the same kind and public key, and
//!   normalises to itself (a fixed point: a second pass never rewrites a file);
//! - the normalised text is one armoured block, LF only, one trailing newline;
//! - its public line and fingerprints verify against itself, as a listing would;
//! - no error or `Debug` shows a run of the input's base64 body (key material).
#![no_main]

use kps_sync::keys::{PrivateKey, PublicKey, Verified};
use kps_sync_fuzz::base64_runs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match PrivateKey::parse(data) {
        Ok(key) => {
            let text = key.normalised().expose().to_vec();
            assert!(text.starts_with(b"-----BEGIN ") && text.ends_with(b"-----\n"));
            assert!(!text.contains(&b'\r') && !text.ends_with(b"\n\n"));
            let again = PrivateKey::parse(&text).expect("a normalised key parses again");
            assert_eq!(again.kind(), key.kind());
            assert_eq!(again.public(), key.public());
            assert_eq!(
                again.normalised().expose(),
                &text[..],
                "normalising is idempotent"
            );

            let line = key.public_openssh();
            assert_eq!(
                &PublicKey::parse(&line).expect("own public line"),
                key.public()
            );
            assert_eq!(
                key.verify_listed(Some(&line), Some(&key.fingerprint_sha256())),
                Ok(Verified::PublicKey)
            );
            assert_eq!(
                key.verify_listed(None, Some(&format!("MD5:{}", key.fingerprint_md5()))),
                Ok(Verified::Fingerprint)
            );
            let shown = format!("{key:?}");
            for run in base64_runs(&text) {
                assert!(!shown.contains(run), "Debug shows key text: {shown}");
            }
        }
        Err(err) => {
            let shown = format!("{err} {err:?}");
            for run in base64_runs(data) {
                assert!(!shown.contains(run), "an error shows input text: {shown}");
            }
        }
    }
    // The same bytes as a public key line (a `.pub` entry, a listing's `public_key`).
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(public) = PublicKey::parse(text)
    {
        assert_eq!(PublicKey::parse(&public.openssh()).as_ref(), Ok(&public));
        assert_eq!(
            public.matches_fingerprint(&public.fingerprint_sha256()),
            Some(true)
        );
        assert_eq!(
            public.matches_fingerprint(&public.fingerprint_md5()),
            Some(true)
        );
    }
});
