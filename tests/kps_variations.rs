//! The real binary against each undocumented variation of KPS the fake can play: `.pub`
//! entries, a stray entry, opaque entry names, CRLF and BOM key text, MD5 fingerprints, and
//! every key type and format. In each, every key lands, `ssh-keygen -y -f FILE` loads it and
//! prints the public key KPS lists, and a fallback to the single export warns exactly once.

mod common;

use std::process::Command;

use common::*;
use fake_kps::{KeyType, Variations};

fn keys_yaml(names: &[String]) -> String {
    names.iter().map(|n| format!("  {n}: out/{n}\n")).collect()
}

/// `n` hosted ed25519 key pairs named `k00`, `k01`, ... and a manifest for them.
fn sandbox(n: usize) -> (Sandbox, Vec<String>) {
    let sb = Sandbox::new();
    let names: Vec<String> = (0..n).map(|i| format!("k{i:02}")).collect();
    for name in &names {
        sb.fake.add_key(name);
    }
    sb.manifest("", &keys_yaml(&names));
    (sb, names)
}

/// The `type base64` head of a public key line.
fn head(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every key is in place as OpenSSH loads it, and it is the key KPS lists.
fn assert_landed(sb: &Sandbox, names: &[String]) {
    for name in names {
        let path = sb.path(&format!("out/{name}"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!bytes.contains(&b'\r'), "{name}: CR written");
        assert!(!bytes.starts_with(b"\xEF\xBB\xBF"), "{name}: BOM written");
        assert!(
            bytes.ends_with(b"-----\n") && !bytes.ends_with(b"\n\n"),
            "{name}: not exactly one trailing newline"
        );
        let out = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("ssh-keygen runs");
        assert!(
            out.status.success(),
            "{name}: ssh-keygen -y cannot load it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = sb.fake.public_key(name).unwrap();
        assert_eq!(
            head(&String::from_utf8_lossy(&out.stdout)),
            head(&listed),
            "{name}: not the key KPS lists"
        );
    }
}

fn fallback_warnings(run: &Run) -> Vec<&str> {
    run.stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("one by one"))
        .collect()
}

/// One pass with `v`; it must succeed, land every key, and take `singles` single exports.
fn pass_with(v: Variations, n: usize, singles: u64) -> (Sandbox, Vec<String>, Run) {
    let (sb, names) = sandbox(n);
    sb.fake.set_variations(v);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{v:?}: {run:?}");
    assert_landed(&sb, &names);
    let stats = sb.fake.stats();
    assert_eq!(stats.single_export_calls, singles, "{v:?}: {stats:?}");
    let warnings = fallback_warnings(&run);
    assert_eq!(
        warnings.len(),
        usize::from(singles > 0),
        "{v:?}: one warning per pass when it falls back, none otherwise: {run:?}"
    );
    (sb, names, run)
}

#[test]
fn pub_entries_check_their_key_and_are_never_written() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let v = Variations {
        pub_entries: true,
        ..Variations::default()
    };
    let (sb, names, _) = pass_with(v, 3, 0);
    let written: Vec<String> = tree(&sb.path("out"));
    assert_eq!(written, names, "only the private keys are written");
}

#[test]
fn a_stray_readme_entry_is_ignored() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let v = Variations {
        stray_entry: true,
        ..Variations::default()
    };
    pass_with(v, 3, 0);
}

#[test]
fn opaque_entry_names_are_matched_by_public_key_in_the_listing() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let v = Variations {
        opaque_names: true,
        pub_entries: true,
        stray_entry: true,
        ..Variations::default()
    };
    let (sb, _, _) = pass_with(v, 12, 0);
    assert_eq!(sb.fake.stats().batch_export_calls, 2);
}

#[test]
fn opaque_entry_names_without_a_listing_fall_back_with_one_warning() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let (sb, names) = sandbox(12);
    sb.fake.set_list_forbidden(true);
    sb.fake.set_variations(Variations {
        opaque_names: true,
        ..Variations::default()
    });
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_landed(&sb, &names);
    let stats = sb.fake.stats();
    assert_eq!(stats.batch_export_calls, 2, "{stats:?}");
    assert_eq!(stats.single_export_calls, 12, "{stats:?}");
    let warnings = fallback_warnings(&run);
    assert_eq!(warnings.len(), 1, "two batches, one warning: {run:?}");
    assert!(
        warnings[0].contains("matching no requested name (12 names)"),
        "{}",
        warnings[0]
    );
    assert!(warnings[0].contains("no KPS listing"), "{}", warnings[0]);
}

#[test]
fn crlf_key_text_is_written_as_openssh_writes_it() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let v = Variations {
        crlf: true,
        ..Variations::default()
    };
    let (sb, names, _) = pass_with(v, 3, 0);
    for name in &names {
        let written = std::fs::read_to_string(sb.path(&format!("out/{name}"))).unwrap();
        assert_eq!(written, sb.fake.private_key(name).unwrap());
    }
}

#[test]
fn bom_key_text_is_written_as_openssh_writes_it() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let v = Variations {
        bom: true,
        ..Variations::default()
    };
    let (sb, names, _) = pass_with(v, 3, 0);
    for name in &names {
        let written = std::fs::read_to_string(sb.path(&format!("out/{name}"))).unwrap();
        assert_eq!(written, sb.fake.private_key(name).unwrap());
    }
}

#[test]
fn crlf_and_bom_text_from_the_single_export_is_normalised_too() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let (sb, names) = sandbox(3);
    sb.fake.set_list_forbidden(true);
    sb.fake.set_variations(Variations {
        opaque_names: true,
        crlf: true,
        bom: true,
        ..Variations::default()
    });
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sb.fake.stats().single_export_calls, 3);
    assert_landed(&sb, &names);
}

#[test]
fn md5_fingerprints_alone_verify_and_match_opaque_entries() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let v = Variations {
        md5_fingerprints: true,
        no_listed_public_key: true,
        opaque_names: true,
        ..Variations::default()
    };
    pass_with(v, 4, 0);
}

#[test]
fn every_key_type_and_format_lands_and_openssh_loads_it() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let types = [
        ("ed25519", KeyType::Ed25519),
        ("ecdsa256", KeyType::EcdsaP256),
        ("ecdsa384", KeyType::EcdsaP384),
        ("rsa", KeyType::RsaOpenSsh),
        ("rsa-pkcs1", KeyType::RsaPkcs1),
        ("rsa-pkcs8", KeyType::RsaPkcs8),
        ("ecdsa-pkcs8", KeyType::EcdsaPkcs8),
        ("ecdsa-sec1", KeyType::EcdsaSec1),
    ];
    for v in [
        Variations::default(),
        Variations {
            crlf: true,
            bom: true,
            md5_fingerprints: true,
            ..Variations::default()
        },
    ] {
        let sb = Sandbox::new();
        let names: Vec<String> = types.iter().map(|(n, _)| n.to_string()).collect();
        for (name, key_type) in types {
            sb.fake.add_key_of(name, key_type);
        }
        sb.fake.set_variations(v);
        sb.manifest("", &keys_yaml(&names));
        let run = sb.reconcile();
        assert_eq!(run.code, 0, "{v:?}: {run:?}");
        assert_eq!(sb.fake.stats().single_export_calls, 0, "{v:?}: {run:?}");
        assert_landed(&sb, &names);
        // What ssh-keygen wrote is what kps-sync writes.
        for name in &names {
            let written = std::fs::read_to_string(sb.path(&format!("out/{name}"))).unwrap();
            assert_eq!(written, sb.fake.private_key(name).unwrap(), "{name}");
        }
    }
}

#[test]
fn a_key_other_than_the_listed_one_is_not_written_and_the_old_file_stays() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    for key_type in [KeyType::Ed25519, KeyType::RsaPkcs1, KeyType::EcdsaPkcs8] {
        let sb = Sandbox::new();
        sb.fake.add_key_of("a", key_type);
        sb.fake.add_key("b");
        sb.manifest("", "  a: out/a\n  b: out/b\n");
        assert_eq!(sb.reconcile().code, 0);
        // The file is damaged on disk, and KPS now hands out another private key while it
        // still lists the old public key.
        std::fs::write(sb.path("out/a"), "damaged").unwrap();
        let listed = sb.fake.public_key("a").unwrap();
        let other = fake_kps::FakeKps::start().add_key_of("x", key_type);
        sb.fake.add_key_with_public("a", &other, &listed);
        let run = sb.reconcile();
        assert_eq!(run.code, 1, "{key_type:?}: {run:?}");
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains("key a "))
            .unwrap_or_else(|| panic!("{key_type:?}: no error for a: {run:?}"));
        assert!(line.contains("mismatch"), "{line}");
        assert!(line.contains("old file stays"), "{line}");
        assert_eq!(std::fs::read(sb.path("out/a")).unwrap(), b"damaged");
        assert!(!run.all().contains("BEGIN"), "no key text in any output");
    }
}

#[test]
fn names_missing_from_several_batches_warn_once() {
    if !have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let (sb, names) = sandbox(25);
    sb.fake.set_hostile(Some(fake_kps::Hostile::MissingName));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_landed(&sb, &names);
    let stats = sb.fake.stats();
    assert_eq!(stats.batch_export_calls, 3, "{stats:?}");
    assert_eq!(stats.single_export_calls, 3, "{stats:?}");
    let warnings = fallback_warnings(&run);
    assert_eq!(warnings.len(), 1, "three batches, one warning: {run:?}");
    assert!(
        warnings[0].contains("a name was missing from the batch zip (3 names)"),
        "{}",
        warnings[0]
    );
}
