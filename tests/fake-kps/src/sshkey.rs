//! OpenSSH ed25519 key pairs for the fake: generation, the listing's `public_key` and
//! `fingerprint`, and reading the public blob back out of a private key text.
//!
//! Invariant: the listing's public key is always the public blob embedded in the private key
//! the fake serves, so a client can check an export against the listing. Keys are real
//! ed25519 pairs (the public key is derived from the seed), but the seed comes from `fastrand`:
//! fine for a test fake, never for anything else.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use curve25519_dalek::edwards::EdwardsPoint;
use sha2::{Digest, Sha256, Sha512};

const MAGIC: &[u8] = b"openssh-key-v1\0";
const KEY_TYPE: &str = "ssh-ed25519";

/// What the fake keeps per key pair.
#[derive(Clone)]
pub(crate) struct KeyPair {
    /// The exact text export returns; `None` for keys KPS does not host.
    pub private_key: Option<String>,
    /// The SSH wire-format public blob (`string "ssh-ed25519"`, `string pk`).
    pub public_blob: Vec<u8>,
}

impl KeyPair {
    /// `ssh-ed25519 <base64 blob>`, as the listing shows it.
    pub fn public_key_line(&self) -> String {
        format!("{KEY_TYPE} {}", STANDARD.encode(&self.public_blob))
    }

    /// `SHA256:<unpadded base64>`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(&self.public_blob))
        )
    }

    /// A fresh pair whose private key text carries `comment`.
    pub fn generate(comment: &str) -> KeyPair {
        let mut seed = [0u8; 32];
        seed.iter_mut().for_each(|b| *b = fastrand::u8(..));
        let pk = ed25519_public(&seed);
        let public_blob = public_blob(&pk);
        KeyPair {
            private_key: Some(private_key_text(&seed, &pk, comment)),
            public_blob,
        }
    }

    /// Serves `text` as is; the public blob is read from it when it is an OpenSSH key,
    /// otherwise made up (the listing then matches nothing, as for a foreign key format).
    pub fn from_text(text: &str) -> KeyPair {
        let public_blob = public_blob_of(text).unwrap_or_else(|| {
            let mut pk = [0u8; 32];
            pk.iter_mut().for_each(|b| *b = fastrand::u8(..));
            public_blob(&pk)
        });
        KeyPair {
            private_key: Some(text.to_string()),
            public_blob,
        }
    }

    /// A pair whose private key KPS does not hold.
    pub fn unhosted(comment: &str) -> KeyPair {
        KeyPair {
            private_key: None,
            ..KeyPair::generate(comment)
        }
    }
}

fn ed25519_public(seed: &[u8; 32]) -> [u8; 32] {
    let h = Sha512::digest(seed);
    let mut scalar = [0u8; 32];
    scalar.copy_from_slice(&h[..32]);
    EdwardsPoint::mul_base_clamped(scalar).compress().to_bytes()
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn public_blob(pk: &[u8; 32]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(51);
    put_string(&mut blob, KEY_TYPE.as_bytes());
    put_string(&mut blob, pk);
    blob
}

fn private_key_text(seed: &[u8; 32], pk: &[u8; 32], comment: &str) -> String {
    let check = fastrand::u32(..).to_be_bytes();
    let mut private = Vec::new();
    private.extend_from_slice(&check);
    private.extend_from_slice(&check);
    put_string(&mut private, KEY_TYPE.as_bytes());
    put_string(&mut private, pk);
    let mut secret = Vec::with_capacity(64);
    secret.extend_from_slice(seed);
    secret.extend_from_slice(pk);
    put_string(&mut private, &secret);
    put_string(&mut private, comment.as_bytes());
    // Cipher "none" has a block size of 8; the padding is 1, 2, 3, ...
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }

    let mut body = Vec::new();
    body.extend_from_slice(MAGIC);
    put_string(&mut body, b"none");
    put_string(&mut body, b"none");
    put_string(&mut body, b"");
    body.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut body, &public_blob(pk));
    put_string(&mut body, &private);

    let b64 = STANDARD.encode(&body);
    let mut text = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(70) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    text
}

fn take_string<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let s = data.get(4..4 + len)?;
    *data = &data[4 + len..];
    Some(s)
}

/// The first public blob of an unencrypted or encrypted OpenSSH private key text.
pub(crate) fn public_blob_of(text: &str) -> Option<Vec<u8>> {
    let b64: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "-----BEGIN OPENSSH PRIVATE KEY-----")
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let bytes = STANDARD.decode(b64).ok()?;
    let mut data = bytes.strip_prefix(MAGIC)?;
    take_string(&mut data)?; // cipher
    take_string(&mut data)?; // kdf
    take_string(&mut data)?; // kdf options
    data = data.get(4..)?; // number of keys
    Some(take_string(&mut data)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_well_formed_openssh() {
        let kp = KeyPair::generate("web-prod");
        let text = kp.private_key.clone().unwrap();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(text.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
        assert_eq!(public_blob_of(&text).unwrap(), kp.public_blob);

        let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        let bytes = STANDARD.decode(b64).unwrap();
        let mut data = bytes.strip_prefix(MAGIC).unwrap();
        assert_eq!(take_string(&mut data).unwrap(), b"none");
        assert_eq!(take_string(&mut data).unwrap(), b"none");
        assert_eq!(take_string(&mut data).unwrap(), b"");
        assert_eq!(&data[..4], &1u32.to_be_bytes());
        data = &data[4..];
        let blob = take_string(&mut data).unwrap();
        let mut private = take_string(&mut data).unwrap();
        assert!(data.is_empty());
        assert_eq!(private.len() % 8, 0);
        assert_eq!(&private[..4], &private[4..8], "check ints match");
        private = &private[8..];
        assert_eq!(take_string(&mut private).unwrap(), b"ssh-ed25519");
        let pk = take_string(&mut private).unwrap();
        let sk = take_string(&mut private).unwrap();
        assert_eq!(sk.len(), 64);
        assert_eq!(&sk[32..], pk);
        assert_eq!(blob, public_blob(pk.try_into().unwrap()));
        let seed: [u8; 32] = sk[..32].try_into().unwrap();
        assert_eq!(ed25519_public(&seed), pk);
        assert_eq!(take_string(&mut private).unwrap(), b"web-prod");
        assert!(private.iter().enumerate().all(|(i, b)| *b == i as u8 + 1));
    }

    #[test]
    fn ed25519_matches_rfc8032_test_1() {
        let seed: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            hex::encode(ed25519_public(&seed)),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
    }

    #[test]
    fn listing_fields_derive_from_the_blob() {
        let kp = KeyPair::generate("x");
        let line = kp.public_key_line();
        let (kind, b64) = line.split_once(' ').unwrap();
        assert_eq!(kind, "ssh-ed25519");
        assert_eq!(STANDARD.decode(b64).unwrap(), kp.public_blob);
        let fp = kp.fingerprint();
        assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 43, "{fp}");
    }

    #[test]
    fn foreign_text_gets_a_made_up_blob() {
        let kp = KeyPair::from_text(
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        );
        assert_eq!(kp.public_blob.len(), 51);
        assert!(KeyPair::unhosted("u").private_key.is_none());
    }
}
