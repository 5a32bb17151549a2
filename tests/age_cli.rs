//! The age files kps-sync writes must open with the reference tool operators use: Debian's
//! `age` CLI (`apt-get install age`). CI installs it; a developer machine without it skips
//! with a notice.

mod common;

use std::path::Path;
use std::process::Command;

use kps_sync::manifest::{Encryption, ParsedRecipient, Recipient};
use kps_sync::output::encrypt::encrypt;
use kps_sync::secret::SecretBytes;

const KEY: &[u8] = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";

fn encryption(recipient: &str, armor: bool) -> Encryption {
    Encryption {
        recipients: vec![Recipient {
            text: recipient.to_owned(),
            parsed: ParsedRecipient::parse(recipient).expect("a valid recipient"),
        }],
        armor,
    }
}

/// `age -d -i identity` on our ciphertext, returning the plaintext.
fn age_decrypt(dir: &Path, identity: &Path, ciphertext: &[u8]) -> Vec<u8> {
    let input = dir.join("key.age");
    std::fs::write(&input, ciphertext).unwrap();
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(&input)
        .output()
        .expect("age runs");
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn the_age_cli_decrypts_x25519_output() {
    if !common::have_tool("age", "age") || !common::have_tool("age-keygen", "age") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity.txt");
    let keygen = Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .expect("age-keygen runs");
    assert!(keygen.status.success());
    let public = std::fs::read_to_string(&identity)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("# public key: ").map(str::to_owned))
        .expect("age-keygen writes the public key as a comment");

    for armor in [false, true] {
        let out = encrypt(&SecretBytes::new(KEY.to_vec()), &encryption(&public, armor)).unwrap();
        assert_eq!(age_decrypt(dir.path(), &identity, out.expose()), KEY);
    }
}

#[test]
fn the_age_cli_decrypts_ssh_recipient_output() {
    if !common::have_tool("age", "age") {
        return;
    }
    if !common::have_tool("ssh-keygen", "openssh-client") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, args) in [
        ("id_ed25519", &["-t", "ed25519"][..]),
        ("id_rsa", &["-t", "rsa", "-b", "2048"][..]),
    ] {
        let identity = dir.path().join(file);
        let status = Command::new("ssh-keygen")
            .args(args)
            .args(["-q", "-N", "", "-C", "ops@test", "-f"])
            .arg(&identity)
            .status()
            .unwrap();
        assert!(status.success());
        let public = std::fs::read_to_string(identity.with_extension("pub")).unwrap();
        for armor in [false, true] {
            let out = encrypt(
                &SecretBytes::new(KEY.to_vec()),
                &encryption(public.trim(), armor),
            )
            .unwrap();
            assert_eq!(
                age_decrypt(dir.path(), &identity, out.expose()),
                KEY,
                "{file}"
            );
        }
    }
}
