//! Why bytes are not a private key kps-sync will write, or why a key is not the one KPS lists.
//!
//! Invariant: no message carries a byte of the key text. A PEM label is shown only when it is
//! made of what real labels are made of ([`Label`]); fingerprints shown are of public keys.

use std::fmt;

/// A PEM label that is safe to show: only what real labels are made of, and short. Anything
/// else is shown as a placeholder, since it came from the input.
#[derive(Clone, PartialEq, Eq)]
pub struct Label(String);

impl Label {
    pub(crate) fn new(text: &str) -> Self {
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

/// What went wrong, and what to do. None of these carries input bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
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
        "not a private key: it is a certificate ({label}); the key pair in KPS is not what the \
         manifest expects"
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
        "not a private key: the PEM label is {label}; kps-sync accepts OPENSSH, RSA, EC and \
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
    /// The armour is fine but the key inside does not parse (truncated, damaged, mislabelled).
    /// `what` is a fixed phrase of ours, never parser output (which could quote the input).
    #[error(
        "the {label} block does not hold a valid key ({what}): the key is damaged; export it again"
    )]
    Damaged { label: Label, what: &'static str },
    #[error(
        "the {label} block holds a {algorithm} key, which kps-sync does not write (OpenSSH loads \
         RSA, ECDSA P-256/P-384/P-521 and Ed25519 keys); manage this key outside kps-sync"
    )]
    Unsupported { label: Label, algorithm: String },
    #[error(
        "the exported private key does not match the {what} KPS lists for this name (KPS lists \
         {listed}; the key's is {ours}); not written, the old file stays. Export again; if it \
         persists, report it to Huawei Cloud support"
    )]
    Mismatch {
        what: &'static str,
        listed: String,
        ours: String,
    },
    #[error("not an OpenSSH public key line ({why}); expected 'TYPE BASE64 [COMMENT]'")]
    BadPublicKey { why: &'static str },
}

impl KeyError {
    /// The failure code kps-sync records for this key: `mismatch` when the key is not the one
    /// KPS lists, `not-a-key` otherwise.
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::Mismatch { .. } => "mismatch",
            _ => "not-a-key",
        }
    }
}
