//! The batch-export unpacker (`kps_sync::kps::archive::unpack`) on hostile archives, with and
//! without a KPS listing.
//!
//! Byte 0 steers: bit 0 a listing, bits 1-5 which of the five names are requested, bit 6 the
//! mode, bit 7 small limits. Byte 1 shapes the listing (bits 0-4: which names are listed,
//! bit 5: name 0 listed with another key's public key, bit 6: fingerprints instead of public
//! keys). The rest is either the zip itself (raw mode, so real exports seed it) or, in
//! structured mode, a list of entries that the zip crate writes into a well-formed archive:
//! names that match the requested keys, real keys and public lines, damaged keys, arbitrary
//! bytes; so the matching and checking logic is reached without forging checksums.
//!
//! Invariants checked besides "no panic", within the limits (no blow-up):
//! - a result accounts for every requested name exactly once, as a key or as a gap;
//! - a returned key normalises to itself and matches what the listing says for its name;
//! - an archive holding exactly the requested keys under their names, and nothing else,
//!   unpacks to exactly those keys;
//! - an error is one log line of bounded length and shows no key text.
#![no_main]

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use kps_sync::keys::{PrivateKey, PublicKey};
use kps_sync::kps::KeypairInfo;
use kps_sync::kps::archive::{Limits, Listing, unpack};
use kps_sync_fuzz::one_log_line;
use libfuzzer_sys::fuzz_target;
use zip::CompressionMethod;
use zip::write::SimpleFileOptions;

const NAMES: [&str; 5] = ["web-prod", "db-backup", "deploy-bot", "ci", "legacy"];
/// One real key per name, in the forms KPS may hand over.
const KEYS: [&[u8]; 5] = [
    include_bytes!("../fixtures/ed25519"),
    include_bytes!("../fixtures/ecdsa256"),
    include_bytes!("../fixtures/rsa-pkcs1"),
    include_bytes!("../fixtures/ecdsa384-pkcs8"),
    include_bytes!("../fixtures/ec-sec1"),
];

#[derive(Arbitrary, Debug)]
enum Ext {
    None,
    Pem,
    Key,
    Txt,
    Pub,
}

#[derive(Arbitrary, Debug)]
enum Name {
    Key { index: u8, ext: Ext, folder: bool },
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Content {
    Private(u8),
    Public(u8),
    PrivateCrlf(u8),
    Truncated(u8, u16),
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    name: Name,
    content: Content,
    deflate: bool,
}

fn index(i: u8) -> usize {
    usize::from(i) % NAMES.len()
}

/// Each fixture's public line and SHA-256 fingerprint, parsed once (RSA is slow to parse).
static PUBLIC: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
    KEYS.iter()
        .map(|k| {
            let key = PrivateKey::parse(k).expect("fixture");
            (key.public_openssh(), key.fingerprint_sha256())
        })
        .collect()
});

fn public_line(i: usize) -> String {
    PUBLIC[i].0.clone()
}

impl Entry {
    fn name(&self) -> String {
        match &self.name {
            Name::Key {
                index: i,
                ext,
                folder,
            } => {
                let ext = match ext {
                    Ext::None => "",
                    Ext::Pem => ".pem",
                    Ext::Key => ".key",
                    Ext::Txt => ".txt",
                    Ext::Pub => ".pub",
                };
                let folder = if *folder { "keypairs/" } else { "" };
                format!("{folder}{}{ext}", NAMES[index(*i)])
            }
            Name::Other(s) => s.clone(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match &self.content {
            Content::Private(i) => KEYS[index(*i)].to_vec(),
            Content::Public(i) => format!("{} fuzz\n", public_line(index(*i))).into_bytes(),
            Content::PrivateCrlf(i) => String::from_utf8_lossy(KEYS[index(*i)])
                .replace('\n', "\r\n")
                .into_bytes(),
            Content::Truncated(i, at) => {
                let key = KEYS[index(*i)];
                key[..usize::from(*at) % key.len()].to_vec()
            }
            Content::Bytes(b) => b.clone(),
        }
    }

    /// The private key of the requested name it is named after, and nothing else.
    fn clean(&self, requested: &BTreeSet<usize>) -> Option<usize> {
        match (&self.name, &self.content) {
            (
                Name::Key {
                    index: n,
                    ext: Ext::None | Ext::Pem | Ext::Key | Ext::Txt,
                    ..
                },
                Content::Private(k) | Content::PrivateCrlf(k),
            ) if index(*n) == index(*k) && requested.contains(&index(*n)) => Some(index(*n)),
            _ => None,
        }
    }
}

/// A zip written by the zip crate, or `None` when it refuses the entries (a name twice).
fn build(entries: &[Entry]) -> Option<Vec<u8>> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for entry in entries {
        let method = if entry.deflate {
            CompressionMethod::Deflated
        } else {
            CompressionMethod::Stored
        };
        let options = SimpleFileOptions::default().compression_method(method);
        let name = entry.name();
        if name.ends_with('/') {
            writer.add_directory(name, options).ok()?;
        } else {
            writer.start_file(name, options).ok()?;
            writer.write_all(&entry.bytes()).ok()?;
        }
    }
    Some(writer.finish().ok()?.into_inner())
}

/// Every name a local or central header in `zip` could carry (found by signature, so also in
/// a damaged archive), lossily as text.
fn header_names(zip: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    for at in 0..zip.len().saturating_sub(4) {
        let (len_at, fixed) = match &zip[at..at + 4] {
            b"PK\x03\x04" => (at + 26, 30),
            b"PK\x01\x02" => (at + 28, 46),
            _ => continue,
        };
        let Some(len) = zip.get(len_at..len_at + 2) else {
            continue;
        };
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        if let Some(name) = zip.get(at + fixed..at + fixed + len) {
            names.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    names
}

fn listing(shape: u8) -> Listing {
    let mut listing = Listing::new();
    for (i, name) in NAMES.iter().enumerate() {
        if shape & (1 << i) == 0 {
            continue;
        }
        let key = if i == 0 && shape & 0x20 != 0 { 1 } else { i };
        let (public_key, fingerprint) = if shape & 0x40 != 0 {
            (None, Some(PUBLIC[key].1.clone()))
        } else {
            (Some(public_line(key)), None)
        };
        let info = KeypairInfo {
            name: (*name).to_owned(),
            public_key,
            fingerprint,
            is_key_protection: true,
            frozen_state: None,
        };
        listing.insert((*name).to_owned(), info);
    }
    listing
}

fuzz_target!(|data: &[u8]| {
    let [control, shape, rest @ ..] = data else {
        return;
    };
    let mut wanted: BTreeSet<usize> = (0..NAMES.len())
        .filter(|i| control & (2 << i) != 0)
        .collect();
    if wanted.is_empty() {
        wanted.insert(0);
    }
    let requested: Vec<String> = wanted.iter().map(|&i| NAMES[i].to_owned()).collect();
    let listing = (control & 1 != 0).then(|| listing(*shape));
    let limits = if control & 0x80 != 0 {
        Limits {
            max_zip_bytes: 4096,
            max_entries: 3,
            max_entry_bytes: 2048,
            max_total_bytes: 4096,
        }
    } else {
        Limits::default()
    };

    let mut expected = None;
    let zip = if control & 0x40 != 0 {
        let Ok(entries) = Vec::<Entry>::arbitrary_take_rest(Unstructured::new(rest)) else {
            return;
        };
        let clean: Vec<usize> = entries.iter().filter_map(|e| e.clean(&wanted)).collect();
        let distinct: BTreeSet<usize> = clean.iter().copied().collect();
        if clean.len() == entries.len()
            && distinct.len() == clean.len()
            && listing.is_none()
            && control & 0x80 == 0
        {
            expected = Some(distinct);
        }
        match build(&entries) {
            Some(zip) => zip,
            None => return,
        }
    } else {
        rest.to_vec()
    };

    match unpack(&zip, &requested, listing.as_ref(), &limits) {
        Ok(got) => {
            let gaps: BTreeSet<&str> = got.gaps.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(gaps.len(), got.gaps.len(), "a gap named twice");
            let mut all: Vec<&str> = got.keys.keys().map(String::as_str).collect();
            all.extend(gaps.iter().copied());
            all.sort_unstable();
            let mut want: Vec<&str> = requested.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(all, want, "every requested name once, as a key or a gap");
            for (name, key) in &got.keys {
                let again = PrivateKey::parse(key.normalised().expose()).expect("reparses");
                assert_eq!(again.normalised().expose(), key.normalised().expose());
                let listed = listing.as_ref().and_then(|l| l.get(name));
                if let Some(line) = listed.and_then(|i| i.public_key.as_deref()) {
                    assert_eq!(&PublicKey::parse(line).unwrap(), key.public(), "{name}");
                }
                if let Some(fp) = listed.and_then(|i| i.fingerprint.as_deref()) {
                    assert_eq!(fp, key.fingerprint_sha256(), "{name}");
                }
            }
            if let Some(expected) = expected {
                let names: BTreeSet<usize> = got
                    .keys
                    .keys()
                    .map(|n| NAMES.iter().position(|x| x == n).unwrap())
                    .collect();
                assert_eq!(names, expected, "a clean archive gives exactly its keys");
                for i in expected {
                    assert_eq!(got.keys[NAMES[i]].public_openssh(), PUBLIC[i].0);
                }
            }
        }
        Err(err) => {
            assert!(expected.is_none(), "a clean archive was refused: {err}");
            let shown = err.to_string();
            assert!(one_log_line(&shown), "{shown:?}");
            assert!(shown.len() < 4096, "{} bytes", shown.len());
            // Entry names are shown on purpose (escaped and cut short); key text the archive
            // also used as a name is fair to show, key text only inside an entry is not.
            let names = header_names(&zip);
            for key in KEYS {
                for run in kps_sync_fuzz::base64_runs(key) {
                    let named = names.iter().any(|n| n.contains(run));
                    assert!(
                        named || !shown.contains(run),
                        "an error shows key text: {shown}"
                    );
                }
            }
        }
    }
});
