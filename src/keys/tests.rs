use super::*;
use std::path::Path;
use std::process::Command;

/// A marker that stands in for key material: no error may ever show it.
const MARK: &[u8] = b"SECRETMARK";

fn pem(label: &str, body: &[u8]) -> String {
    let b64 = STANDARD.encode(body);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A DER SEQUENCE of filler holding MARK: the right shape for the armour, not a key.
fn der(len: usize) -> Vec<u8> {
    let mut content = vec![0x02, 0x01, 0x00];
    while content.len() < len {
        content.extend_from_slice(MARK);
    }
    content.truncate(len);
    let mut out = vec![0x30];
    match len {
        0..=0x7F => out.push(len as u8),
        0x80..=0xFF => out.extend_from_slice(&[0x81, len as u8]),
        _ => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
    }
    out.extend_from_slice(&content);
    out
}

fn reject(text: &[u8]) -> KeyError {
    let err = PrivateKey::parse(text).expect_err("must be rejected");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("SECRETMARK"), "{shown}");
    err
}

/// `ssh-keygen`, or `None` (a notice) where it is missing; under CI a missing tool fails.
fn have_ssh_keygen() -> bool {
    let found = Command::new("ssh-keygen").arg("-?").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but ssh-keygen is missing: install openssh-client"
        );
        eprintln!("notice: ssh-keygen not found; skipping the real-key checks");
    }
    found
}

fn keygen(dir: &Path, file: &str, args: &[&str]) -> Vec<u8> {
    let path = dir.join(file);
    let status = Command::new("ssh-keygen")
        .args(args)
        .args(["-q", "-C", "test", "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success(), "ssh-keygen {args:?}");
    std::fs::read(&path).unwrap()
}

fn keygen_out(args: &[&str], file: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The forms KPS may hand over, made by ssh-keygen: (file, args, kind).
const REAL: [(&str, &[&str], KeyKind); 9] = [
    ("ed", &["-t", "ed25519"], KeyKind::OpenSsh),
    ("ec256", &["-t", "ecdsa", "-b", "256"], KeyKind::OpenSsh),
    ("ec384", &["-t", "ecdsa", "-b", "384"], KeyKind::OpenSsh),
    ("ec521", &["-t", "ecdsa", "-b", "521"], KeyKind::OpenSsh),
    ("rsa", &["-t", "rsa", "-b", "2048"], KeyKind::OpenSsh),
    (
        "rsa1",
        &["-t", "rsa", "-b", "2048", "-m", "PEM"],
        KeyKind::Pkcs1Rsa,
    ),
    (
        "rsa8",
        &["-t", "rsa", "-b", "2048", "-m", "PKCS8"],
        KeyKind::Pkcs8,
    ),
    ("ec8", &["-t", "ecdsa", "-m", "PKCS8"], KeyKind::Pkcs8),
    ("sec1", &["-t", "ecdsa", "-m", "PEM"], KeyKind::Sec1Ec),
];

#[test]
fn real_keys_parse_and_match_ssh_keygen() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, args, kind) in REAL {
        let mut all = args.to_vec();
        all.extend(["-N", ""]);
        let bytes = keygen(dir.path(), file, &all);
        let key = PrivateKey::parse(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(key.kind(), kind, "{file}");
        // What ssh-keygen wrote is already canonical: normalising changes nothing.
        assert_eq!(key.normalised().expose(), &bytes[..], "{file}");

        let path = dir.path().join(file);
        let public = std::fs::read_to_string(dir.path().join(format!("{file}.pub"))).unwrap();
        let head: Vec<&str> = public.split_whitespace().take(2).collect();
        assert_eq!(key.public_openssh(), head.join(" "), "{file}");
        let y = keygen_out(&["-y", "-f"], &path);
        assert_eq!(PublicKey::parse(&y).unwrap(), *key.public(), "{file}");

        let sha = keygen_out(&["-l", "-E", "sha256", "-f"], &path);
        assert!(sha.contains(&key.fingerprint_sha256()), "{file}: {sha}");
        let md5 = keygen_out(&["-l", "-E", "md5", "-f"], &path);
        assert!(
            md5.contains(&format!("MD5:{}", key.fingerprint_md5())),
            "{file}: {md5}"
        );
        let fps = public_key_fingerprints(&public).unwrap();
        assert_eq!(fps.sha256, key.fingerprint_sha256());
        assert_eq!(fps.md5, key.fingerprint_md5());

        // The listing's forms, with the noise a listing may carry.
        assert_eq!(
            key.verify_listed(Some(&format!("  {}\r\n", public.trim())), None),
            Ok(Verified::PublicKey),
            "{file}"
        );
        for fp in [
            sha.as_str(),
            md5.as_str(),
            &key.fingerprint_md5().to_uppercase(),
        ] {
            assert_eq!(
                key.verify_listed(None, Some(fp)),
                Ok(Verified::Fingerprint),
                "{file} {fp}"
            );
        }
        // The .pub file is a public key, never a private one.
        assert_eq!(reject(public.as_bytes()), KeyError::PublicKey);
    }
}

#[test]
fn crlf_bom_and_odd_wrapping_normalise_to_what_ssh_keygen_writes() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, args, _) in [REAL[0], REAL[5], REAL[6], REAL[8]] {
        let mut all = args.to_vec();
        all.extend(["-N", ""]);
        let bytes = keygen(dir.path(), file, &all);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        let first = text.lines().next().unwrap();
        let last = text.lines().last().unwrap();
        let variants = [
            text.replace('\n', "\r\n"),
            format!("\u{feff}{text}"),
            format!("\u{feff}{}", text.replace('\n', "\r\n")),
            text.trim_end().to_string(),
            format!("\n\n{text}\n\n\n"),
            format!("{first}\n{body}\n{last}"),
            format!(
                "{first}\n{}\n{last}\n",
                body.as_bytes()
                    .chunks(76)
                    .map(|c| std::str::from_utf8(c).unwrap())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ];
        for (i, variant) in variants.iter().enumerate() {
            let key = PrivateKey::parse(variant.as_bytes())
                .unwrap_or_else(|e| panic!("{file} variant {i}: {e}"));
            assert_eq!(key.normalised().expose(), &bytes[..], "{file} variant {i}");
        }
    }
}

#[test]
fn a_key_that_is_not_the_listed_one_is_a_mismatch() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = PrivateKey::parse(&keygen(dir.path(), "a", &["-t", "ed25519", "-N", ""])).unwrap();
    let b = PrivateKey::parse(&keygen(dir.path(), "b", &["-t", "ed25519", "-N", ""])).unwrap();
    let err = a
        .verify_listed(Some(&b.public_openssh()), None)
        .unwrap_err();
    assert_eq!(err.code(), "mismatch");
    let shown = err.to_string();
    assert!(shown.contains(&b.fingerprint_sha256()), "{shown}");
    assert!(shown.contains(&a.fingerprint_sha256()), "{shown}");
    assert!(shown.contains("old file stays"), "{shown}");
    for fp in [b.fingerprint_sha256(), b.fingerprint_md5()] {
        let err = a.verify_listed(None, Some(&fp)).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::Mismatch {
                    what: "fingerprint",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    // A right public key with a wrong fingerprint is still a mismatch.
    assert!(
        a.verify_listed(Some(&a.public_openssh()), Some(&b.fingerprint_sha256()))
            .is_err()
    );
    // What cannot be read is not a mismatch, and is reported as unchecked.
    assert_eq!(a.verify_listed(None, None), Ok(Verified::NotListed));
    assert_eq!(
        a.verify_listed(Some(""), Some(" ")),
        Ok(Verified::NotListed)
    );
    assert_eq!(
        a.verify_listed(Some("ssh-ed25519 ???"), Some("sha1:zz")),
        Ok(Verified::Unreadable)
    );
    assert_eq!(
        a.verify_listed(Some("garbage"), Some(&a.fingerprint_sha256())),
        Ok(Verified::Fingerprint)
    );
}

#[test]
fn public_key_lines_must_name_the_key_inside() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = PrivateKey::parse(&keygen(dir.path(), "a", &["-t", "ed25519", "-N", ""])).unwrap();
    let line = key.public_openssh();
    let b64 = line.split(' ').nth(1).unwrap();
    assert!(PublicKey::parse(&format!("ssh-rsa {b64}")).is_err());
    assert!(PublicKey::parse(b64).is_err());
    assert!(PublicKey::parse(&format!("ssh-ed25519 {}", &b64[..20])).is_err());
    assert_eq!(
        PublicKey::parse(&format!("\tssh-ed25519   {b64}  a comment with spaces \n")).unwrap(),
        *key.public()
    );
}

#[test]
fn passphrase_protected_keys_are_refused_in_every_form() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, args) in [
        ("ed", &["-t", "ed25519"][..]),
        ("rsa1", &["-t", "rsa", "-b", "2048", "-m", "PEM"]),
        ("p8", &["-t", "ecdsa", "-m", "PKCS8"]),
    ] {
        let mut all = args.to_vec();
        all.extend(["-N", "pw-for-test"]);
        let err = reject(&keygen(dir.path(), file, &all));
        assert!(matches!(err, KeyError::Encrypted { .. }), "{file}: {err:?}");
        let shown = err.to_string();
        assert!(shown.contains("passphrase"), "{shown}");
        assert!(shown.contains("without a"), "{shown}");
    }
}

#[test]
fn public_keys_and_certificates_are_refused() {
    let public = [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@host\n".to_string(),
        "ecdsa-sha2-nistp256 AAAA\n".into(),
        pem("PUBLIC KEY", &der(100)),
        pem("RSA PUBLIC KEY", &der(100)),
        "---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----\n".into(),
    ];
    for text in public {
        assert_eq!(reject(text.as_bytes()), KeyError::PublicKey, "{text}");
    }
    for label in ["CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CRL"] {
        let err = reject(pem(label, &der(100)).as_bytes());
        assert!(matches!(err, KeyError::Certificate { .. }), "{err:?}");
    }
}

#[test]
fn empty_html_json_and_other_text_are_refused() {
    assert_eq!(reject(b""), KeyError::Empty);
    assert_eq!(reject(b"\xEF\xBB\xBF \r\n\t\n"), KeyError::Empty);
    assert_eq!(
        reject(b"<!DOCTYPE html><html><body>502</body></html>"),
        KeyError::Html
    );
    assert_eq!(reject(b"\n<html>"), KeyError::Html);
    assert_eq!(reject(b"Error: <html>"), KeyError::Html);
    assert_eq!(
        reject(br#"{"error_code":"KPS.0002","error_msg":"x"}"#),
        KeyError::Json
    );
    assert_eq!(reject(b"SECRETMARK plain text"), KeyError::NotPem);
    assert_eq!(reject(&[0xFF, 0xFE, 0x00, 0x30]), KeyError::NotPem);
    assert_eq!(reject(b"PK\x03\x04zip"), KeyError::NotPem);
}

#[test]
fn text_around_the_block_is_refused() {
    let text = pem("PRIVATE KEY", &der(100));
    assert_eq!(
        reject(format!("{text}SECRETMARK").as_bytes()),
        KeyError::TrailingData {
            label: Label::new("PRIVATE KEY")
        }
    );
    let two = format!("{text}{}", pem("CERTIFICATE", &der(50)));
    assert!(matches!(
        reject(two.as_bytes()),
        KeyError::TrailingData { .. }
    ));
    assert_eq!(
        reject(format!("Bag Attributes\n{text}").as_bytes()),
        KeyError::LeadingData
    );
}

#[test]
fn broken_blocks_are_refused() {
    let good = pem("RSA PRIVATE KEY", &der(400));
    let no_end = good.replace("-----END RSA PRIVATE KEY-----\n", "");
    assert!(matches!(
        reject(no_end.as_bytes()),
        KeyError::MissingEnd { .. }
    ));
    let mismatched = good.replace("END RSA", "END EC");
    assert_eq!(
        reject(mismatched.as_bytes()),
        KeyError::MismatchedEnd {
            begin: Label::new("RSA PRIVATE KEY"),
            end: Label::new("EC PRIVATE KEY")
        }
    );
    let bad_b64 = good.replacen("-----\n", "-----\n*", 1);
    assert!(matches!(
        reject(bad_b64.as_bytes()),
        KeyError::BadBase64 { .. }
    ));
    let empty = "-----BEGIN RSA PRIVATE KEY-----\n\n-----END RSA PRIVATE KEY-----\n";
    assert!(matches!(
        reject(empty.as_bytes()),
        KeyError::EmptyBody { .. }
    ));
    let header = good.replacen("-----\n", "-----\nComment: hello\n\n", 1);
    assert!(matches!(
        reject(header.as_bytes()),
        KeyError::UnexpectedHeader { .. }
    ));
    let legacy = good.replacen(
        "-----\n",
        "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n",
        1,
    );
    assert!(matches!(
        reject(legacy.as_bytes()),
        KeyError::Encrypted { .. }
    ));
    for label in ["PGP PRIVATE KEY BLOCK", "DSA PRIVATE KEY"] {
        let unknown = pem(label, &der(100));
        assert!(matches!(
            reject(unknown.as_bytes()),
            KeyError::UnknownLabel { .. }
        ));
    }
    assert!(matches!(
        reject(pem("ENCRYPTED PRIVATE KEY", &der(100)).as_bytes()),
        KeyError::Encrypted { .. }
    ));
}

#[test]
fn bodies_that_are_not_keys_are_damaged_and_never_echoed() {
    for label in [
        "RSA PRIVATE KEY",
        "PRIVATE KEY",
        "EC PRIVATE KEY",
        "OPENSSH PRIVATE KEY",
    ] {
        for body in [der(300), b"SECRETMARK".to_vec(), vec![0x30]] {
            let err = reject(pem(label, &body).as_bytes());
            assert!(matches!(err, KeyError::Damaged { .. }), "{label}: {err:?}");
            let shown = format!("{err} {err:?}");
            let b64 = STANDARD.encode(&body);
            assert!(!shown.contains(&b64[..8.min(b64.len())]), "{shown}");
        }
    }
}

#[test]
fn truncated_real_keys_are_refused() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, args, _) in [REAL[0], REAL[5], REAL[6], REAL[8]] {
        let mut all = args.to_vec();
        all.extend(["-N", ""]);
        let text = String::from_utf8(keygen(dir.path(), file, &all)).unwrap();
        let cut = text.len() / 2;
        let err = reject(&text.as_bytes()[..cut]);
        assert!(
            matches!(err, KeyError::MissingEnd { .. }),
            "{file}: {err:?}"
        );
        // A block whose body lost lines still ends: the parser sees the damage.
        let lines: Vec<&str> = text.lines().collect();
        let shorter = format!(
            "{}\n{}\n",
            lines[..lines.len() / 2].join("\n"),
            lines[lines.len() - 1]
        );
        let err = reject(shorter.as_bytes());
        assert!(
            matches!(err, KeyError::Damaged { .. } | KeyError::BadBase64 { .. }),
            "{file}: {err:?}"
        );
    }
}

#[test]
fn hostile_labels_are_not_echoed() {
    let err = reject(b"-----BEGIN \x1b[2J SECRETMARK-----\nAAAA\n-----END x-----\n");
    let shown = err.to_string();
    assert!(
        !shown.contains('\u{1b}'),
        "escape sequences must not reach a log: {shown:?}"
    );
    assert!(shown.contains("<unrecognised label>"), "{shown}");
}

#[test]
fn debug_shows_the_fingerprint_not_the_key() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bytes = keygen(dir.path(), "a", &["-t", "ed25519", "-N", ""]);
    let key = PrivateKey::parse(&bytes).unwrap();
    let shown = format!("{key:?}");
    assert!(shown.contains(&key.fingerprint_sha256()), "{shown}");
    assert!(!shown.contains("BEGIN"), "{shown}");
    let body_line = String::from_utf8(bytes)
        .unwrap()
        .lines()
        .nth(2)
        .unwrap()
        .to_string();
    assert!(!shown.contains(&body_line[..16]), "{shown}");
}

/// ssh-key 0.6 alone refuses an ECDSA key whose private scalar OpenSSH wrote shorter than the
/// curve's width (about one P-521 key in six); kps-sync reads it anyway.
#[test]
fn p521_keys_with_a_short_scalar_are_read() {
    if !have_ssh_keygen() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for i in 0..100 {
        let file = format!("ec521-{i}");
        let bytes = keygen(dir.path(), &file, &["-t", "ecdsa", "-b", "521", "-N", ""]);
        if ssh_key::PrivateKey::from_openssh(&bytes).is_ok() {
            continue;
        }
        let key = PrivateKey::parse(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(key.normalised().expose(), &bytes[..]);
        let y = keygen_out(&["-y", "-f"], &dir.path().join(&file));
        assert_eq!(PublicKey::parse(&y).unwrap(), *key.public());
        return;
    }
    panic!("no P-521 key with a short scalar in 100 tries");
}
