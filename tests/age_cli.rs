//! The age files kps-sync writes must open with the reference tool operators use: Debian's
//! `age` CLI (`apt-get install age`). CI installs it; a developer machine without it skips
//! with a notice.

use std::path::Path;
use std::process::{Command, Stdio};

use kps_sync::encrypt::{encrypt, parse_recipient};
use kps_sync::manifest::{Encryption, Recipient};
use kps_sync::secret::SecretBytes;

const KEY: &[u8] = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";

/// True when `tool` runs; otherwise a notice, or a failure under CI where it must be present.
fn have(tool: &str) -> bool {
    if Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} must be installed in CI (apt-get install -y age openssh-client)"
    );
    eprintln!("notice: {tool} not found; skipping the age CLI interoperability test");
    false
}

fn encryption(recipient: &str, armor: bool) -> Encryption {
    Encryption {
        recipients: vec![Recipient {
            text: recipient.to_owned(),
            parsed: parse_recipient(recipient).expect("a valid recipient"),
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
    if !have("age") || !have("age-keygen") {
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
    if !have("age") {
        return;
    }
    if Command::new("ssh-keygen").arg("-?").output().is_err() {
        eprintln!("notice: ssh-keygen not found; skipping the ssh recipient CLI test");
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
