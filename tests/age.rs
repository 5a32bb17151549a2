//! age encryption end to end: written as ciphertext for the recipients, decryptable with the
//! identity, and re-encrypted when the recipients change.

mod common;

use common::*;
use std::io::Read;

fn decrypt(ciphertext: &[u8], identity: &age::x25519::Identity) -> String {
    let decryptor =
        age::Decryptor::new_buffered(age::armor::ArmoredReader::new(ciphertext)).unwrap();
    let mut reader = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .unwrap();
    let mut out = String::new();
    reader.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn encrypts_for_the_recipients_and_re_encrypts_when_they_change() {
    let sb = Sandbox::new();
    sb.fake.add_key("db");
    let first = age::x25519::Identity::generate();
    let second = age::x25519::Identity::generate();
    let manifest = |ids: &[&age::x25519::Identity], armor: bool| {
        let list: Vec<String> = ids
            .iter()
            .map(|i| format!("\"{}\"", i.to_public()))
            .collect();
        sb.manifest(
            "",
            &format!(
                "  db:\n    path: out/db.age\n    armor: {armor}\n    age_recipients: [{}]\n",
                list.join(", ")
            ),
        );
    };
    manifest(&[&first], false);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    let bytes = std::fs::read(sb.path("out/db.age")).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1"), "binary age");
    assert_eq!(decrypt(&bytes, &first), sb.fake.private_key("db").unwrap());
    assert_eq!(mode_of(&sb.path("out/db.age")), 0o600);

    sb.fake.reset_stats();
    assert_eq!(sb.reconcile().code, 0);
    assert_eq!(
        sb.fake.stats().batch_export_calls,
        0,
        "unchanged recipients: nothing to do"
    );

    manifest(&[&first, &second], true);
    let plan = sb.run(&["plan"]);
    assert!(plan.stdout.contains("re-encrypt"), "{plan:?}");
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("re-encrypted"), "{run:?}");
    let bytes = std::fs::read(sb.path("out/db.age")).unwrap();
    assert!(
        bytes.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----"),
        "armored"
    );
    assert_eq!(decrypt(&bytes, &second), sb.fake.private_key("db").unwrap());
    assert_eq!(decrypt(&bytes, &first), sb.fake.private_key("db").unwrap());
}
