//! The public half of each private key form, read with RustCrypto's parsers: `ssh-key` for
//! `openssh-key-v1`, `pkcs1` for `RSA PRIVATE KEY`, `pkcs8` for `PRIVATE KEY`, `sec1` for
//! `EC PRIVATE KEY`.
//!
//! What is checked: the structure of every form; for OpenSSH keys, that the public section
//! matches the private one (and, for Ed25519, that the public key is the one derived from the
//! seed); Ed25519 PKCS#8 public keys are derived from the seed. RSA and ECDSA public keys are
//! read from the private structure (PKCS#1 carries `n` and `e`; SEC1 carries the public point),
//! not recomputed from the secret numbers.
//!
//! Invariant: parser errors are never shown (they could quote the input); each maps to a fixed
//! phrase of ours.

use pkcs8::ObjectIdentifier;
use pkcs8::der::{Decode, asn1::OctetStringRef};
use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey};
use ssh_key::{Mpint, private::Ed25519PrivateKey, private::KeypairData};
use zeroize::Zeroizing;

use super::KeyKind;
use super::error::{KeyError, Label};

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const SECP521R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");

fn damaged(kind: KeyKind, what: &'static str) -> KeyError {
    KeyError::Damaged {
        label: Label::new(kind.label()),
        what,
    }
}

fn unsupported(kind: KeyKind, algorithm: impl Into<String>) -> KeyError {
    KeyError::Unsupported {
        label: Label::new(kind.label()),
        algorithm: algorithm.into(),
    }
}

/// The public key of the decoded body of a `kind` block.
pub(super) fn public_key(kind: KeyKind, der: &[u8]) -> Result<KeyData, KeyError> {
    match kind {
        KeyKind::OpenSsh => openssh(der),
        KeyKind::Pkcs1Rsa => pkcs1(kind, der),
        KeyKind::Pkcs8 => pkcs8(der),
        KeyKind::Sec1Ec => sec1(kind, der, None),
    }
}

fn openssh(blob: &[u8]) -> Result<KeyData, KeyError> {
    let kind = KeyKind::OpenSsh;
    let key = ssh_key::PrivateKey::from_bytes(blob).or_else(|e| match widen_ecdsa_scalar(blob) {
        Some(wide) => ssh_key::PrivateKey::from_bytes(&wide),
        None => Err(e),
    });
    let key = key.map_err(|e| match e {
        ssh_key::Error::Crypto | ssh_key::Error::PublicKey => damaged(
            kind,
            "its private and public halves do not match, or its check numbers differ",
        ),
        _ => damaged(kind, "not a well-formed openssh-key-v1 key"),
    })?;
    if key.is_encrypted() {
        return Err(KeyError::Encrypted {
            form: "OpenSSH key with a passphrase",
        });
    }
    match key.key_data() {
        KeypairData::Ed25519(_) | KeypairData::Ecdsa(_) | KeypairData::Rsa(_) => {
            Ok(key.public_key().key_data().clone())
        }
        other => {
            // The name comes from the input: shown only when it looks like an algorithm name.
            let name = other.algorithm().map(|a| a.to_string()).ok();
            let shown = name
                .filter(|n| {
                    n.len() <= 64
                        && n.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'@' | b'_')
                        })
                })
                .unwrap_or_else(|| "unknown".into());
            Err(unsupported(kind, shown))
        }
    }
}

fn pkcs1(kind: KeyKind, der: &[u8]) -> Result<KeyData, KeyError> {
    let key = pkcs1::RsaPrivateKey::from_der(der)
        .map_err(|_| damaged(kind, "not a PKCS#1 RSAPrivateKey"))?;
    if key.other_prime_infos.is_some() {
        return Err(unsupported(kind, "multi-prime RSA"));
    }
    let mpint = |bytes: &[u8]| {
        Mpint::from_positive_bytes(bytes).map_err(|_| damaged(kind, "a bad RSA number"))
    };
    Ok(KeyData::Rsa(RsaPublicKey {
        e: mpint(key.public_exponent.as_bytes())?,
        n: mpint(key.modulus.as_bytes())?,
    }))
}

fn pkcs8(der: &[u8]) -> Result<KeyData, KeyError> {
    let kind = KeyKind::Pkcs8;
    let info = pkcs8::PrivateKeyInfo::from_der(der)
        .map_err(|_| damaged(kind, "not a PKCS#8 PrivateKeyInfo"))?;
    let oid = info.algorithm.oid;
    if oid == RSA_ENCRYPTION {
        pkcs1(kind, info.private_key)
    } else if oid == EC_PUBLIC_KEY {
        let curve = info
            .algorithm
            .parameters_oid()
            .map_err(|_| damaged(kind, "an EC key without its named curve"))?;
        sec1(kind, info.private_key, Some(curve))
    } else if oid == ED25519 {
        let seed = OctetStringRef::from_der(info.private_key)
            .map_err(|_| damaged(kind, "an Ed25519 key that is not an OCTET STRING"))?;
        let private = Ed25519PrivateKey::try_from(seed.as_bytes())
            .map_err(|_| damaged(kind, "an Ed25519 seed that is not 32 bytes"))?;
        Ok(KeyData::Ed25519(Ed25519PublicKey::from(&private)))
    } else {
        Err(unsupported(kind, format!("OID {oid}")))
    }
}

/// `curve` is the PKCS#8 algorithm's named curve, when the key came wrapped in PKCS#8.
fn sec1(kind: KeyKind, der: &[u8], curve: Option<ObjectIdentifier>) -> Result<KeyData, KeyError> {
    let key =
        sec1::EcPrivateKey::from_der(der).map_err(|_| damaged(kind, "not a SEC1 ECPrivateKey"))?;
    let named = key.parameters.and_then(|p| p.named_curve());
    let curve = match (curve, named) {
        (Some(a), Some(b)) if a != b => {
            return Err(damaged(kind, "two different curves named"));
        }
        (Some(c), _) | (None, Some(c)) => c,
        (None, None) => return Err(damaged(kind, "an EC key without its named curve")),
    };
    let scalar_len = match curve {
        c if c == SECP256R1 => 32,
        c if c == SECP384R1 => 48,
        c if c == SECP521R1 => 66,
        other => return Err(unsupported(kind, format!("EC curve {other}"))),
    };
    if key.private_key.len() != scalar_len {
        return Err(damaged(
            kind,
            "a private scalar of the wrong size for its curve",
        ));
    }
    let point = key.public_key.ok_or_else(|| {
        damaged(
            kind,
            "an EC key that does not carry its public point, so kps-sync cannot check it",
        )
    })?;
    // OpenSSH reads only uncompressed points (tag 4).
    if point.first() != Some(&4) {
        return Err(damaged(
            kind,
            "a public point that is not an uncompressed SEC1 point",
        ));
    }
    let public = EcdsaPublicKey::from_sec1_bytes(point).map_err(|_| {
        damaged(
            kind,
            "a public point that is not an uncompressed SEC1 point",
        )
    })?;
    let matches_curve = matches!(
        (&public, scalar_len),
        (EcdsaPublicKey::NistP256(_), 32)
            | (EcdsaPublicKey::NistP384(_), 48)
            | (EcdsaPublicKey::NistP521(_), 66)
    );
    if !matches_curve {
        return Err(damaged(
            kind,
            "a public point that is not on its named curve",
        ));
    }
    Ok(KeyData::Ecdsa(public))
}

/// A reader of the SSH wire format: big-endian u32, and strings prefixed by their u32 length.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        let s = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(s)
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    let len = u32::try_from(s.len()).expect("a key's wire strings are far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
}

/// ssh-key 0.6 reads an ECDSA private scalar only at the curve's full width (32, 48 or 66
/// bytes), but OpenSSH writes it as an mpint, without leading zeros: about one P-521 key in six
/// (and one P-256 or P-384 key in 256) has a shorter one. Such an unencrypted blob is rebuilt
/// with the scalar at full width and the padding redone, for ssh-key to check; what kps-sync
/// writes is still the blob as KPS sent it. `None` when there is nothing to widen.
fn widen_ecdsa_scalar(blob: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    const MAGIC: &[u8] = b"openssh-key-v1\0";
    let mut r = Wire(blob.strip_prefix(MAGIC)?);
    if r.string()? != b"none" {
        return None;
    }
    r.string()?; // kdf
    r.string()?; // kdf options
    r.u32()?; // number of keys (ssh-key checks it)
    let header = blob.len() - r.0.len();
    let public = r.string()?;
    let private = r.string()?;
    let mut p = Wire(private);
    let (check1, check2) = (p.u32()?, p.u32()?);
    let key_type = p.string()?;
    let width = match key_type {
        b"ecdsa-sha2-nistp256" => 32,
        b"ecdsa-sha2-nistp384" => 48,
        b"ecdsa-sha2-nistp521" => 66,
        _ => return None,
    };
    let (curve, point, scalar, comment) = (p.string()?, p.string()?, p.string()?, p.string()?);
    // What follows the comment must be the padding OpenSSH writes, as ssh-key would check.
    let padding_ok = p.0.len() < 8
        && p.0
            .iter()
            .enumerate()
            .all(|(i, b)| usize::from(*b) == i + 1);
    if !padding_ok {
        return None;
    }
    let first = scalar.iter().position(|b| *b != 0).unwrap_or(scalar.len());
    let scalar = &scalar[first..];
    if scalar.len() >= width {
        return None;
    }
    let mut section = Zeroizing::new(Vec::with_capacity(private.len() + width + 8));
    section.extend_from_slice(&check1.to_be_bytes());
    section.extend_from_slice(&check2.to_be_bytes());
    put_string(&mut section, key_type);
    put_string(&mut section, curve);
    put_string(&mut section, point);
    section.extend_from_slice(&(width as u32).to_be_bytes());
    let widened = section.len() + width - scalar.len();
    section.resize(widened, 0);
    section.extend_from_slice(scalar);
    put_string(&mut section, comment);
    // Cipher "none" has a block size of 8; the padding is 1, 2, 3, ...
    let mut pad = 1u8;
    while section.len() % 8 != 0 {
        section.push(pad);
        pad += 1;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(
        header + public.len() + section.len() + 8,
    ));
    out.extend_from_slice(&blob[..header]);
    put_string(&mut out, public);
    put_string(&mut out, &section);
    Some(out)
}
