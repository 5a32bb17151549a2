//! Is it really a private key? A structural check of what KPS handed over, before it is
//! encrypted or written.
//!
//! Accepted: one PEM block labelled `RSA PRIVATE KEY`, `PRIVATE KEY`, `EC PRIVATE KEY`, `DSA
//! PRIVATE KEY` (body: base64 of one DER SEQUENCE) or `OPENSSH PRIVATE KEY` (body: base64 of an
//! unencrypted `openssh-key-v1` blob), with nothing but whitespace around it. This is a check of
//! form, not of cryptographic validity: it catches error pages, public keys, certificates,
//! truncation and passphrase-protected keys, which kps-sync could not check and a service could
//! not use unattended.
//!
//! Invariants: errors never carry any byte of the input (not even a prefix, nor a base64
//! decoder's "invalid byte" detail); decoded key bytes live only in zeroizing buffers.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

const OPENSSH_MAGIC: &[u8] = b"openssh-key-v1\0";

/// The form of an accepted private key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----` (ssh-keygen's default since OpenSSH 7.8).
    OpenSsh,
    /// `-----BEGIN RSA PRIVATE KEY-----`
    Pkcs1Rsa,
    /// `-----BEGIN PRIVATE KEY-----`
    Pkcs8,
    /// `-----BEGIN EC PRIVATE KEY-----`
    Sec1Ec,
    /// `-----BEGIN DSA PRIVATE KEY-----`
    Dsa,
}

impl KeyKind {
    fn from_label(label: &str) -> Option<Self> {
        Some(match label {
            "OPENSSH PRIVATE KEY" => KeyKind::OpenSsh,
            "RSA PRIVATE KEY" => KeyKind::Pkcs1Rsa,
            "PRIVATE KEY" => KeyKind::Pkcs8,
            "EC PRIVATE KEY" => KeyKind::Sec1Ec,
            "DSA PRIVATE KEY" => KeyKind::Dsa,
            _ => return None,
        })
    }

    /// The PEM label, as in `-----BEGIN <label>-----`.
    pub fn label(self) -> &'static str {
        match self {
            KeyKind::OpenSsh => "OPENSSH PRIVATE KEY",
            KeyKind::Pkcs1Rsa => "RSA PRIVATE KEY",
            KeyKind::Pkcs8 => "PRIVATE KEY",
            KeyKind::Sec1Ec => "EC PRIVATE KEY",
            KeyKind::Dsa => "DSA PRIVATE KEY",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::OpenSsh => "OpenSSH private key",
            KeyKind::Pkcs1Rsa => "PKCS#1 RSA private key",
            KeyKind::Pkcs8 => "PKCS#8 private key",
            KeyKind::Sec1Ec => "SEC1 EC private key",
            KeyKind::Dsa => "DSA private key",
        })
    }
}

/// A PEM label that is safe to show: only what real labels are made of, and short. Anything
/// else is shown as a placeholder, since it came from the input.
#[derive(Clone, PartialEq, Eq)]
pub struct Label(String);

impl Label {
    fn new(text: &str) -> Self {
        let plain = text.len() <= 40
            && text
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ');
        Label(if plain {
            text.to_owned()
        } else {
            "<unrecognised label>".to_owned()
        })
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Why the bytes are not a private key kps-sync will write. Messages say what was found and
/// what to do; none carries input bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyCheckError {
    #[error(
        "not a private key: the content is empty; check the key pair in KPS holds its private key"
    )]
    Empty,
    #[error(
        "not a private key: the content is an HTML page (an error page from a proxy or gateway?); \
         check the network path to the KPS endpoint"
    )]
    Html,
    #[error(
        "not a private key: the content is JSON (an API error passed through?); check the KPS \
         endpoint and report it if it persists"
    )]
    Json,
    #[error(
        "not a private key: it is a public key; KPS holds no private key for this key pair, so \
         create or import the key pair in KPS with its private key hosted"
    )]
    PublicKey,
    #[error(
        "not a private key: it is a certificate ({label}); the key pair in KPS is not what the manifest expects"
    )]
    Certificate { label: Label },
    #[error(
        "the private key is passphrase-protected ({form}): kps-sync cannot write a key it cannot \
         check, and a service could not use it unattended; store the key in KPS without a \
         passphrase (KPS encrypts it at rest; use age_recipients to encrypt the file on disk), \
         or manage this key outside kps-sync"
    )]
    Encrypted { form: &'static str },
    #[error(
        "not a private key: it does not start with a -----BEGIN ...----- line; check the key pair \
         in KPS"
    )]
    NotPem,
    #[error(
        "not a private key: there is text before the -----BEGIN line; kps-sync writes exactly one \
         key, so report what KPS sent"
    )]
    LeadingData,
    #[error(
        "not a private key: the PEM label is {label}; kps-sync accepts OPENSSH, RSA, EC, DSA and \
         PKCS#8 private keys"
    )]
    UnknownLabel { label: Label },
    #[error("the {label} block has no -----END line: the key is truncated; export it again")]
    MissingEnd { label: Label },
    #[error("the -----BEGIN {begin}----- block ends with -----END {end}-----: the key is damaged")]
    MismatchedEnd { begin: Label, end: Label },
    #[error(
        "there is text after the -----END {label}----- line; kps-sync writes exactly one key, so \
         report what KPS sent"
    )]
    TrailingData { label: Label },
    #[error(
        "the {label} block has a header line kps-sync does not accept (only unencrypted keys \
         without headers are written)"
    )]
    UnexpectedHeader { label: Label },
    #[error(
        "the body of the {label} block is not valid base64: the key is damaged; export it again"
    )]
    BadBase64 { label: Label },
    #[error("the {label} block is empty: the key is damaged; export it again")]
    EmptyBody { label: Label },
    #[error(
        "the body of the {label} block is not one DER SEQUENCE: the key is damaged or mislabelled"
    )]
    NotDer { label: Label },
    #[error(
        "the OPENSSH PRIVATE KEY block is not an openssh-key-v1 key: the key is damaged; export it \
         again"
    )]
    NotOpenSsh,
}

/// Check that `bytes` are one unencrypted private key in a form kps-sync accepts.
pub fn check_private_key(bytes: &[u8]) -> Result<KeyKind, KeyCheckError> {
    let (kind, der) = unarmor(bytes)?;
    match kind {
        KeyKind::OpenSsh => {
            let key = OpenSshKey::parse(&der).ok_or(KeyCheckError::NotOpenSsh)?;
            if key.cipher != b"none" || key.kdf != b"none" {
                return Err(KeyCheckError::Encrypted {
                    form: "OpenSSH key with a passphrase",
                });
            }
        }
        _ => {
            if !is_one_der_sequence(&der) {
                return Err(KeyCheckError::NotDer {
                    label: Label::new(kind.label()),
                });
            }
        }
    }
    Ok(kind)
}

/// The public key line (`ssh-ed25519 AAAA...`, no comment) stored in the public section of an
/// `openssh-key-v1` private key, for comparing with the KPS listing. No cryptography: a key
/// whose private half does not match its public section is not detected here. `None` for
/// anything else, PEM forms included.
pub fn openssh_public_key(bytes: &[u8]) -> Option<String> {
    let (kind, der) = unarmor(bytes).ok()?;
    if kind != KeyKind::OpenSsh {
        return None;
    }
    let key = OpenSshKey::parse(&der)?;
    let mut public = Reader(key.public);
    let key_type = std::str::from_utf8(public.string()?).ok()?;
    if key_type.is_empty() || !key_type.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(format!("{key_type} {}", STANDARD.encode(key.public)))
}

/// Find the one PEM block, check its labels, headers and surroundings, and decode its body.
fn unarmor(bytes: &[u8]) -> Result<(KeyKind, Zeroizing<Vec<u8>>), KeyCheckError> {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .ok_or(KeyCheckError::Empty)?;
    let bytes = &bytes[start..];
    match bytes[0] {
        b'<' => return Err(KeyCheckError::Html),
        b'{' | b'[' => return Err(KeyCheckError::Json),
        _ => {}
    }
    for public in [
        &b"ssh-"[..],
        b"ecdsa-sha2-",
        b"sk-ssh-",
        b"sk-ecdsa-",
        b"---- BEGIN SSH2 PUBLIC KEY",
    ] {
        if bytes.starts_with(public) {
            return Err(KeyCheckError::PublicKey);
        }
    }
    // A private key is ASCII; anything else is not one, and must not be echoed.
    let text = std::str::from_utf8(bytes).map_err(|_| KeyCheckError::NotPem)?;
    if !text.starts_with("-----BEGIN ") {
        return Err(if text.contains("-----BEGIN ") {
            KeyCheckError::LeadingData
        } else if text.contains("<html") || text.contains("<HTML") {
            KeyCheckError::Html
        } else {
            KeyCheckError::NotPem
        });
    }

    let mut lines = text.split('\n').map(|line| line.trim());
    let first = lines.next().unwrap_or_default();
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|rest| rest.strip_suffix("-----"))
        .ok_or(KeyCheckError::NotPem)?;
    let kind = classify_label(label)?;
    let shown = Label::new(label);

    let mut body = Zeroizing::new(String::with_capacity(text.len()));
    let mut headers_allowed = true;
    let mut proc_type_encrypted = false;
    let mut saw_header = false;
    let mut end = None;
    for line in lines.by_ref() {
        if let Some(rest) = line.strip_prefix("-----END ") {
            end = Some(rest.strip_suffix("-----").unwrap_or("<malformed>"));
            break;
        }
        // RFC 1421 headers (`Proc-Type:`, `DEK-Info:`) come first and only in legacy PEM;
        // base64 never contains ':'.
        if line.contains(':') {
            if !headers_allowed {
                return Err(KeyCheckError::UnexpectedHeader { label: shown });
            }
            saw_header = true;
            if line.starts_with("Proc-Type:") && line.contains("ENCRYPTED") {
                proc_type_encrypted = true;
            }
            continue;
        }
        if !line.trim().is_empty() {
            headers_allowed = false;
        }
        body.extend(line.chars().filter(|c| !c.is_ascii_whitespace()));
    }
    if proc_type_encrypted {
        return Err(KeyCheckError::Encrypted {
            form: "legacy PEM encryption, Proc-Type: 4,ENCRYPTED",
        });
    }
    if saw_header {
        return Err(KeyCheckError::UnexpectedHeader { label: shown });
    }
    let Some(end) = end else {
        return Err(KeyCheckError::MissingEnd { label: shown });
    };
    if end != label {
        return Err(KeyCheckError::MismatchedEnd {
            begin: shown,
            end: Label::new(end),
        });
    }
    if lines.any(|rest| !rest.trim().is_empty()) {
        return Err(KeyCheckError::TrailingData { label: shown });
    }
    if body.is_empty() {
        return Err(KeyCheckError::EmptyBody { label: shown });
    }
    // Decoded into a buffer sized up front, so it never reallocates and leaves a stray copy.
    let mut der = Zeroizing::new(Vec::with_capacity(body.len() / 4 * 3 + 3));
    STANDARD
        .decode_vec(body.as_bytes(), &mut der)
        .map_err(|_| KeyCheckError::BadBase64 { label: shown })?;
    Ok((kind, der))
}

fn classify_label(label: &str) -> Result<KeyKind, KeyCheckError> {
    if let Some(kind) = KeyKind::from_label(label) {
        return Ok(kind);
    }
    if label == "ENCRYPTED PRIVATE KEY" {
        return Err(KeyCheckError::Encrypted {
            form: "PKCS#8 ENCRYPTED PRIVATE KEY",
        });
    }
    if label.ends_with("PUBLIC KEY") {
        return Err(KeyCheckError::PublicKey);
    }
    if label.contains("CERTIFICATE") || label == "X509 CRL" || label == "PKCS7" {
        return Err(KeyCheckError::Certificate {
            label: Label::new(label),
        });
    }
    Err(KeyCheckError::UnknownLabel {
        label: Label::new(label),
    })
}

/// One DER SEQUENCE whose length covers exactly the rest of the input.
fn is_one_der_sequence(der: &[u8]) -> bool {
    let [0x30, first, rest @ ..] = der else {
        return false;
    };
    let (len, body) = match *first {
        short @ 0..=0x7F => (short as usize, rest),
        long @ 0x81..=0x84 => {
            let n = (long & 0x7F) as usize;
            if rest.len() < n || rest[0] == 0 {
                return false;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            // DER uses the short form below 128.
            if len < 0x80 {
                return false;
            }
            (len, &rest[n..])
        }
        _ => return false,
    };
    len == body.len()
}

/// The unencrypted-header part of an `openssh-key-v1` blob (PROTOCOL.key in OpenSSH).
struct OpenSshKey<'a> {
    cipher: &'a [u8],
    kdf: &'a [u8],
    /// The first public key blob (`string keytype, ...`).
    public: &'a [u8],
}

impl<'a> OpenSshKey<'a> {
    fn parse(blob: &'a [u8]) -> Option<Self> {
        let mut r = Reader(blob.strip_prefix(OPENSSH_MAGIC)?);
        let cipher = r.string()?;
        let kdf = r.string()?;
        let _kdf_options = r.string()?;
        // kps-sync writes one key per file; ssh-keygen never writes more than one.
        if r.u32()? != 1 {
            return None;
        }
        let public = r.string()?;
        let private = r.string()?;
        if public.is_empty() || private.is_empty() || !r.0.is_empty() {
            return None;
        }
        Some(Self {
            cipher,
            kdf,
            public,
        })
    }
}

/// SSH wire-format reader: big-endian u32, and strings prefixed by their u32 length.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        if self.0.len() < len {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }
}

#[cfg(test)]
mod tests {
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

    /// A fake DER SEQUENCE of `len` content bytes (an INTEGER, then filler holding MARK).
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

    fn ssh_string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn public_blob() -> Vec<u8> {
        let mut blob = Vec::new();
        ssh_string(&mut blob, b"ssh-ed25519");
        ssh_string(&mut blob, &[7u8; 32]);
        blob
    }

    fn openssh_blob(cipher: &str, kdf: &str) -> Vec<u8> {
        let mut out = OPENSSH_MAGIC.to_vec();
        ssh_string(&mut out, cipher.as_bytes());
        ssh_string(&mut out, kdf.as_bytes());
        ssh_string(&mut out, b"");
        out.extend_from_slice(&1u32.to_be_bytes());
        ssh_string(&mut out, &public_blob());
        let mut private = vec![1, 2, 3, 4, 1, 2, 3, 4];
        private.extend_from_slice(MARK);
        ssh_string(&mut out, &private);
        out
    }

    fn assert_no_material(err: &KeyCheckError, body: &[u8]) {
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("SECRETMARK"), "{shown}");
        let b64 = STANDARD.encode(body);
        // No run of the base64 body either, not even a short prefix.
        assert!(!shown.contains(&b64[..8.min(b64.len())]), "{shown}");
    }

    fn reject(text: &[u8]) -> KeyCheckError {
        let err = check_private_key(text).expect_err("must be rejected");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("SECRETMARK"), "{shown}");
        err
    }

    #[test]
    fn each_pem_form_is_accepted() {
        for (label, kind) in [
            ("RSA PRIVATE KEY", KeyKind::Pkcs1Rsa),
            ("PRIVATE KEY", KeyKind::Pkcs8),
            ("EC PRIVATE KEY", KeyKind::Sec1Ec),
            ("DSA PRIVATE KEY", KeyKind::Dsa),
        ] {
            for len in [20, 200, 1200] {
                assert_eq!(
                    check_private_key(pem(label, &der(len)).as_bytes()),
                    Ok(kind),
                    "{label} {len}"
                );
            }
        }
    }

    #[test]
    fn openssh_is_accepted_and_its_public_key_read() {
        let text = pem("OPENSSH PRIVATE KEY", &openssh_blob("none", "none"));
        assert_eq!(check_private_key(text.as_bytes()), Ok(KeyKind::OpenSsh));
        assert_eq!(
            openssh_public_key(text.as_bytes()),
            Some(format!("ssh-ed25519 {}", STANDARD.encode(public_blob())))
        );
    }

    #[test]
    fn whitespace_and_crlf_are_tolerated() {
        let text = pem("PRIVATE KEY", &der(300));
        let crlf = format!("\n  {}\r\n\r\n", text.replace('\n', "\r\n"));
        assert_eq!(check_private_key(crlf.as_bytes()), Ok(KeyKind::Pkcs8));
        let one_line = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----",
            STANDARD.encode(der(300))
        );
        assert_eq!(check_private_key(one_line.as_bytes()), Ok(KeyKind::Pkcs8));
        let indented = text.replace('\n', "\n\t ");
        assert_eq!(check_private_key(indented.as_bytes()), Ok(KeyKind::Pkcs8));
    }

    #[test]
    fn encrypted_keys_are_refused_with_what_to_do() {
        let pkcs8 = pem("ENCRYPTED PRIVATE KEY", &der(200));
        let legacy = pem("RSA PRIVATE KEY", &der(200)).replacen(
            "-----\n",
            "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n",
            1,
        );
        let openssh = pem("OPENSSH PRIVATE KEY", &openssh_blob("aes256-ctr", "bcrypt"));
        for text in [pkcs8, legacy, openssh] {
            let err = reject(text.as_bytes());
            assert!(matches!(err, KeyCheckError::Encrypted { .. }), "{err:?}");
            let shown = err.to_string();
            assert!(shown.contains("passphrase"), "{shown}");
            assert!(shown.contains("without a"), "{shown}");
        }
        // The public section of an encrypted OpenSSH key is still readable.
        let openssh = pem("OPENSSH PRIVATE KEY", &openssh_blob("aes256-ctr", "bcrypt"));
        assert!(
            openssh_public_key(openssh.as_bytes())
                .unwrap()
                .starts_with("ssh-ed25519 AAAA")
        );
    }

    #[test]
    fn public_keys_and_certificates_are_refused() {
        let public = [
            format!("ssh-ed25519 {} me@host\n", STANDARD.encode(public_blob())),
            format!("ecdsa-sha2-nistp256 {}\n", STANDARD.encode(public_blob())),
            pem("PUBLIC KEY", &der(100)),
            pem("RSA PUBLIC KEY", &der(100)),
            "---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----\n".into(),
        ];
        for text in public {
            assert_eq!(reject(text.as_bytes()), KeyCheckError::PublicKey, "{text}");
        }
        for label in ["CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CRL"] {
            let err = reject(pem(label, &der(100)).as_bytes());
            assert!(matches!(err, KeyCheckError::Certificate { .. }), "{err:?}");
        }
    }

    #[test]
    fn empty_html_json_and_other_text_are_refused() {
        assert_eq!(reject(b""), KeyCheckError::Empty);
        assert_eq!(reject(b" \r\n\t\n"), KeyCheckError::Empty);
        assert_eq!(
            reject(b"<!DOCTYPE html><html><body>502</body></html>"),
            KeyCheckError::Html
        );
        assert_eq!(reject(b"\n<html>"), KeyCheckError::Html);
        assert_eq!(reject(b"Error: <html>"), KeyCheckError::Html);
        assert_eq!(
            reject(br#"{"error_code":"KPS.0002","error_msg":"x"}"#),
            KeyCheckError::Json
        );
        assert_eq!(reject(b"SECRETMARK plain text"), KeyCheckError::NotPem);
        assert_eq!(reject(&[0xFF, 0xFE, 0x00, 0x30]), KeyCheckError::NotPem);
        assert_eq!(reject(b"PK\x03\x04zip"), KeyCheckError::NotPem);
    }

    #[test]
    fn text_around_the_block_is_refused() {
        let text = pem("PRIVATE KEY", &der(100));
        assert_eq!(
            reject(format!("{text}SECRETMARK").as_bytes()),
            KeyCheckError::TrailingData {
                label: Label::new("PRIVATE KEY")
            }
        );
        let two = format!("{text}{}", pem("CERTIFICATE", &der(50)));
        assert!(matches!(
            reject(two.as_bytes()),
            KeyCheckError::TrailingData { .. }
        ));
        assert_eq!(
            reject(format!("Bag Attributes\n{text}").as_bytes()),
            KeyCheckError::LeadingData
        );
    }

    #[test]
    fn broken_blocks_are_refused() {
        let good = pem("RSA PRIVATE KEY", &der(400));
        let no_end = good.replace("-----END RSA PRIVATE KEY-----\n", "");
        assert!(matches!(
            reject(no_end.as_bytes()),
            KeyCheckError::MissingEnd { .. }
        ));
        let mismatched = good.replace("END RSA", "END EC");
        assert_eq!(
            reject(mismatched.as_bytes()),
            KeyCheckError::MismatchedEnd {
                begin: Label::new("RSA PRIVATE KEY"),
                end: Label::new("EC PRIVATE KEY")
            }
        );
        let bad_b64 = good.replacen("-----\n", "-----\n*", 1);
        assert!(matches!(
            reject(bad_b64.as_bytes()),
            KeyCheckError::BadBase64 { .. }
        ));
        let inner_padding = good.replacen("-----\n", "-----\nAA==\n", 1);
        assert!(matches!(
            reject(inner_padding.as_bytes()),
            KeyCheckError::BadBase64 { .. }
        ));
        let empty = "-----BEGIN RSA PRIVATE KEY-----\n\n-----END RSA PRIVATE KEY-----\n";
        assert!(matches!(
            reject(empty.as_bytes()),
            KeyCheckError::EmptyBody { .. }
        ));
        let header = good.replacen("-----\n", "-----\nComment: hello\n\n", 1);
        assert!(matches!(
            reject(header.as_bytes()),
            KeyCheckError::UnexpectedHeader { .. }
        ));
        let unknown = pem("PGP PRIVATE KEY BLOCK", &der(100));
        assert!(matches!(
            reject(unknown.as_bytes()),
            KeyCheckError::UnknownLabel { .. }
        ));
    }

    #[test]
    fn pem_bodies_must_be_exactly_one_der_sequence() {
        let mut truncated = der(300);
        truncated.truncate(250);
        let mut extra = der(300);
        extra.push(0);
        let mut not_sequence = der(300);
        not_sequence[0] = 0x31;
        let mut non_minimal = vec![0x30, 0x81, 0x05];
        non_minimal.extend_from_slice(&[0x02, 0x01, 0x00, 0x05, 0x00]);
        for body in [
            truncated,
            extra,
            not_sequence,
            non_minimal,
            b"SECRETMARK".to_vec(),
            vec![0x30],
        ] {
            let err = reject(pem("PRIVATE KEY", &body).as_bytes());
            assert!(matches!(err, KeyCheckError::NotDer { .. }), "{err:?}");
            assert_no_material(&err, &body);
        }
    }

    #[test]
    fn openssh_bodies_must_be_openssh_key_v1() {
        let mut truncated = openssh_blob("none", "none");
        truncated.truncate(truncated.len() - 3);
        let mut two_keys = openssh_blob("none", "none");
        let at = OPENSSH_MAGIC.len() + 4 + 4 + 4 + 4 + 4;
        two_keys[at..at + 4].copy_from_slice(&2u32.to_be_bytes());
        for body in [
            der(100),
            truncated,
            two_keys,
            b"openssh-key-v2\0SECRETMARK".to_vec(),
        ] {
            let text = pem("OPENSSH PRIVATE KEY", &body);
            let err = reject(text.as_bytes());
            assert_eq!(err, KeyCheckError::NotOpenSsh);
            assert_no_material(&err, &body);
            assert_eq!(openssh_public_key(text.as_bytes()), None);
        }
        assert_eq!(
            openssh_public_key(pem("PRIVATE KEY", &der(100)).as_bytes()),
            None
        );
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

    fn ssh_keygen(dir: &Path, file: &str, args: &[&str]) -> Option<Vec<u8>> {
        if Command::new("ssh-keygen").arg("-?").output().is_err() {
            eprintln!("notice: ssh-keygen not found; skipping the real-key checks");
            return None;
        }
        let path = dir.join(file);
        let status = Command::new("ssh-keygen")
            .args(args)
            .args(["-q", "-C", "test", "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success(), "ssh-keygen {args:?}");
        Some(std::fs::read(&path).unwrap())
    }

    #[test]
    fn keys_from_ssh_keygen() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[&str], Result<KeyKind, &str>); 7] = [
            ("ed", &["-t", "ed25519", "-N", ""], Ok(KeyKind::OpenSsh)),
            (
                "rsa",
                &["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", ""],
                Ok(KeyKind::Pkcs1Rsa),
            ),
            (
                "p8",
                &["-t", "rsa", "-b", "2048", "-m", "PKCS8", "-N", ""],
                Ok(KeyKind::Pkcs8),
            ),
            (
                "ec",
                &["-t", "ecdsa", "-m", "PEM", "-N", ""],
                Ok(KeyKind::Sec1Ec),
            ),
            (
                "ed-pw",
                &["-t", "ed25519", "-N", "pw-for-test"],
                Err("encrypted"),
            ),
            (
                "rsa-pw",
                &["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "pw-for-test"],
                Err("encrypted"),
            ),
            (
                "p8-pw",
                &["-t", "ecdsa", "-m", "PKCS8", "-N", "pw-for-test"],
                Err("encrypted"),
            ),
        ];
        for (file, args, want) in cases {
            let Some(bytes) = ssh_keygen(dir.path(), file, args) else {
                return;
            };
            let got = check_private_key(&bytes);
            match want {
                Ok(kind) => assert_eq!(got, Ok(kind), "{file}"),
                Err(_) => assert!(
                    matches!(got, Err(KeyCheckError::Encrypted { .. })),
                    "{file}: {got:?}"
                ),
            }
            let public = std::fs::read_to_string(dir.path().join(format!("{file}.pub"))).unwrap();
            assert_eq!(
                check_private_key(public.as_bytes()),
                Err(KeyCheckError::PublicKey)
            );
            if file.starts_with("ed") {
                let line = openssh_public_key(&bytes).expect("public section");
                assert_eq!(
                    public
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" "),
                    line
                );
            }
        }
    }
}
