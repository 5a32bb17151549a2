//! One key parser: what KPS hands over becomes a checked private key, its normalised text, its
//! public key and fingerprints. Verification before a write, rotation, adoption, `.pub` output
//! and the batch zip's public-key matching all call this module; nothing else reads key text.
//!
//! API:
//! - [`PrivateKey::parse`]`(&[u8]) -> Result<PrivateKey, KeyError>`: one unencrypted private key
//!   in OpenSSH format (Ed25519, ECDSA, RSA), PEM PKCS#1 RSA, PKCS#8 (RSA, ECDSA, Ed25519) or
//!   SEC1 EC. A UTF-8 BOM, CRLF line ends, any base64 line width and blank lines around the
//!   block are accepted.
//! - [`PrivateKey::normalised`]: the text to write, what `ssh-keygen` itself writes for that
//!   key: the label, base64 at 70 columns (OpenSSH) or 64 (PEM), LF, one trailing newline.
//! - [`PrivateKey::public`] / [`PrivateKey::public_openssh`] (`ssh-ed25519 AAAA...`, no comment),
//!   [`PrivateKey::fingerprint_sha256`] (`SHA256:<base64, no padding>`) and
//!   [`PrivateKey::fingerprint_md5`] (`aa:bb:...`), as `ssh-keygen -l [-E md5]` prints them.
//! - [`PrivateKey::verify_listed`]`(public_key, fingerprint)`: the key must be the one KPS lists,
//!   by its public key line (any comment, any whitespace) and/or its fingerprint (either form,
//!   `MD5:` prefix or none, any case); a mismatch is a [`KeyError::Mismatch`].
//! - [`PublicKey::parse`] and [`public_key_fingerprints`] for a file or listing holding a public
//!   key line.
//!
//! Refused, each with its own error: passphrase-protected keys (all three forms), public keys,
//! certificates, HTML or JSON error pages, truncated or damaged blocks, text around the block,
//! DSA and security-key (`sk-*`) keys.
//!
//! Invariants: key bytes live only in zeroizing buffers (`SecretBytes`, `Zeroizing`) from the
//! input to the normalised text; no error, log line or `Debug` output carries a byte of the
//! input (fingerprints of the public key are shown, being public).

mod der;
mod error;
mod pem;

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use md5::Md5;
use sha2::{Digest, Sha256};
use ssh_key::public::KeyData;

pub use error::{KeyError, Label};

use crate::secret::SecretBytes;

/// The form of an accepted private key, by its PEM label.
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
}

impl KeyKind {
    fn from_label(label: &str) -> Option<Self> {
        Some(match label {
            "OPENSSH PRIVATE KEY" => KeyKind::OpenSsh,
            "RSA PRIVATE KEY" => KeyKind::Pkcs1Rsa,
            "PRIVATE KEY" => KeyKind::Pkcs8,
            "EC PRIVATE KEY" => KeyKind::Sec1Ec,
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
        })
    }
}

/// A public key: the SSH wire-format key data, without a comment.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(KeyData);

impl PublicKey {
    /// Read an OpenSSH public key line: `TYPE BASE64 [COMMENT]`, with any whitespace around or
    /// between (CRLF, tabs, a trailing newline). The type must be the one inside the blob.
    pub fn parse(line: &str) -> Result<PublicKey, KeyError> {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let [key_type, b64, ..] = tokens[..] else {
            return Err(KeyError::BadPublicKey {
                why: "fewer than two fields",
            });
        };
        // Only what names an SSH key type is decoded: the text may be anything (a zip entry
        // that failed to parse as a private key), and a decoded copy of it must not linger.
        if !["ssh-", "ecdsa-", "sk-"]
            .iter()
            .any(|p| key_type.starts_with(p))
        {
            return Err(KeyError::BadPublicKey {
                why: "the first field is not an SSH key type",
            });
        }
        let blob =
            zeroize::Zeroizing::new(STANDARD_NO_PAD.decode(b64.trim_end_matches('=')).map_err(
                |_| KeyError::BadPublicKey {
                    why: "the second field is not base64",
                },
            )?);
        let key = ssh_key::PublicKey::from_bytes(&blob).map_err(|_| KeyError::BadPublicKey {
            why: "the base64 does not hold an SSH public key",
        })?;
        if key.algorithm().as_str() != key_type {
            return Err(KeyError::BadPublicKey {
                why: "the key type does not match the key inside",
            });
        }
        Ok(PublicKey(key.key_data().clone()))
    }

    /// The SSH wire-format blob (what fingerprints hash).
    pub fn blob(&self) -> Vec<u8> {
        ssh_key::PublicKey::from(self.0.clone())
            .to_bytes()
            .expect("encoding a parsed public key into a Vec cannot fail")
    }

    /// `ssh-ed25519 AAAA...`: the algorithm and the blob, no comment.
    pub fn openssh(&self) -> String {
        format!("{} {}", self.algorithm(), STANDARD.encode(self.blob()))
    }

    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, ...
    pub fn algorithm(&self) -> String {
        self.0.algorithm().to_string()
    }

    /// `SHA256:<base64 without padding>`, as `ssh-keygen -l` prints it.
    pub fn fingerprint_sha256(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(self.blob()))
        )
    }

    /// `aa:bb:...` (16 lower-case hex pairs), as `ssh-keygen -l -E md5` prints it without its
    /// `MD5:` prefix, and as older tools and APIs list it.
    pub fn fingerprint_md5(&self) -> String {
        let digest = Md5::digest(self.blob());
        let hex: Vec<String> = digest.iter().map(|b| format!("{b:02x}")).collect();
        hex.join(":")
    }

    /// Whether `listed` is this key's fingerprint, in either form; `None` when `listed` is no
    /// fingerprint kps-sync can read.
    pub fn matches_fingerprint(&self, listed: &str) -> Option<bool> {
        match Fingerprint::parse(listed)? {
            Fingerprint::Sha256(d) => Some(d[..] == Sha256::digest(self.blob())[..]),
            Fingerprint::Md5(d) => Some(d[..] == Md5::digest(self.blob())[..]),
        }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint_sha256())
    }
}

/// Both fingerprints of a public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprints {
    /// `SHA256:<base64 without padding>`
    pub sha256: String,
    /// `aa:bb:...`
    pub md5: String,
}

/// The fingerprints of an OpenSSH public key line (a `.pub` file, a listing's `public_key`).
pub fn public_key_fingerprints(openssh_pub_line: &str) -> Result<Fingerprints, KeyError> {
    let key = PublicKey::parse(openssh_pub_line)?;
    Ok(Fingerprints {
        sha256: key.fingerprint_sha256(),
        md5: key.fingerprint_md5(),
    })
}

/// A fingerprint as KPS might list it.
enum Fingerprint {
    Sha256([u8; 32]),
    Md5([u8; 16]),
}

impl Fingerprint {
    /// `SHA256:b64` (padded or not), `MD5:aa:bb:..`, `aa:bb:..`, `AA:BB:..` or 32 bare hex
    /// digits; a token among others (`2048 SHA256:... name (RSA)`, as `ssh-keygen -l` prints).
    fn parse(text: &str) -> Option<Fingerprint> {
        text.split_whitespace().find_map(Self::parse_token)
    }

    fn parse_token(token: &str) -> Option<Fingerprint> {
        let lower = token.to_ascii_lowercase();
        if lower.starts_with("sha256:") {
            let b64 = token[7..].trim_end_matches('=');
            let bytes = STANDARD_NO_PAD.decode(b64).ok()?;
            return Some(Fingerprint::Sha256(bytes.try_into().ok()?));
        }
        let hex_part = lower.strip_prefix("md5:").unwrap_or(&lower);
        let digits: String = hex_part.chars().filter(|c| *c != ':').collect();
        let colons_ok = !hex_part.contains(':') || hex_part.len() == 47;
        if colons_ok && digits.len() == 32 {
            let bytes = hex::decode(digits).ok()?;
            return Some(Fingerprint::Md5(bytes.try_into().ok()?));
        }
        None
    }
}

/// How [`PrivateKey::verify_listed`] checked the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The listed public key is this key's.
    PublicKey,
    /// No readable public key was listed; the listed fingerprint is this key's.
    Fingerprint,
    /// KPS listed neither a public key nor a fingerprint.
    NotListed,
    /// KPS listed something kps-sync cannot read: nothing was checked (the caller warns).
    Unreadable,
}

/// An unencrypted private key, parsed and normalised. `Debug` shows its form and public
/// fingerprint, never the key.
pub struct PrivateKey {
    kind: KeyKind,
    normalised: SecretBytes,
    public: PublicKey,
}

impl PrivateKey {
    /// Parse one private key; see the module documentation for what is accepted.
    pub fn parse(bytes: &[u8]) -> Result<PrivateKey, KeyError> {
        let (kind, der) = pem::unarmor(bytes)?;
        let public = PublicKey(der::public_key(kind, &der)?);
        let normalised = SecretBytes::new(std::mem::take(&mut *pem::armor(kind, &der)));
        Ok(PrivateKey {
            kind,
            normalised,
            public,
        })
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The text to write: what OpenSSH loads and `ssh-keygen` writes (LF, one trailing newline).
    pub fn normalised(&self) -> &SecretBytes {
        &self.normalised
    }

    pub fn into_normalised(self) -> SecretBytes {
        self.normalised
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// `ssh-ed25519 AAAA...`, no comment: the line for a `.pub` file or a listing comparison.
    pub fn public_openssh(&self) -> String {
        self.public.openssh()
    }

    pub fn fingerprint_sha256(&self) -> String {
        self.public.fingerprint_sha256()
    }

    pub fn fingerprint_md5(&self) -> String {
        self.public.fingerprint_md5()
    }

    /// Check this key against what KPS lists for its name: the public key line when it can be
    /// read, and the fingerprint when it can be read. Any mismatch fails; what cannot be read
    /// is not a mismatch (the result says `Unreadable` when nothing could be checked).
    pub fn verify_listed(
        &self,
        public_key: Option<&str>,
        fingerprint: Option<&str>,
    ) -> Result<Verified, KeyError> {
        let mut verified = None;
        let mut unreadable = false;
        if let Some(line) = public_key.filter(|s| !s.trim().is_empty()) {
            match PublicKey::parse(line) {
                Ok(listed) if listed == self.public => verified = Some(Verified::PublicKey),
                Ok(listed) => {
                    return Err(KeyError::Mismatch {
                        what: "public key",
                        listed: listed.fingerprint_sha256(),
                        ours: self.fingerprint_sha256(),
                    });
                }
                Err(_) => unreadable = true,
            }
        }
        if let Some(listed) = fingerprint.filter(|s| !s.trim().is_empty()) {
            match (
                Fingerprint::parse(listed),
                self.public.matches_fingerprint(listed),
            ) {
                (Some(_), Some(true)) => {
                    verified.get_or_insert(Verified::Fingerprint);
                }
                (Some(fp), _) => {
                    let (listed, ours) = match fp {
                        Fingerprint::Sha256(d) => (
                            format!("SHA256:{}", STANDARD_NO_PAD.encode(d)),
                            self.fingerprint_sha256(),
                        ),
                        Fingerprint::Md5(d) => (
                            d.iter()
                                .map(|b| format!("{b:02x}"))
                                .collect::<Vec<_>>()
                                .join(":"),
                            self.fingerprint_md5(),
                        ),
                    };
                    return Err(KeyError::Mismatch {
                        what: "fingerprint",
                        listed,
                        ours,
                    });
                }
                (None, _) => unreadable = true,
            }
        }
        Ok(verified.unwrap_or(if unreadable {
            Verified::Unreadable
        } else {
            Verified::NotListed
        }))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PrivateKey({}, {}, <redacted>)",
            self.kind,
            self.fingerprint_sha256()
        )
    }
}

/// A real Ed25519 private key in OpenSSH format, the same for the same `id`: for tests.
#[cfg(test)]
pub(crate) fn test_key(id: &[u8]) -> String {
    use ssh_key::private::{Ed25519Keypair, KeypairData};
    let seed: [u8; 32] = Sha256::digest(id).into();
    let pair = Ed25519Keypair::from_seed(&seed);
    let key = ssh_key::PrivateKey::new(KeypairData::Ed25519(pair), "test").unwrap();
    key.to_openssh(ssh_key::LineEnding::LF).unwrap().to_string()
}

#[cfg(test)]
mod tests;
