//! OpenSSH ed25519 key pairs for the fake: generation, the listing's `public_key` and
//! `fingerprint` (`SHA256:` or MD5 form), and reading the public blob back out of a private key
//! text. Other key types and formats (ECDSA, RSA, PKCS#1, PKCS#8, SEC1) come from `ssh-keygen`.
//!
//! Invariant: the listing's public key is always the public blob embedded in the private key
//! the fake serves, so a client can check an export against the listing. Keys are real
//! ed25519 pairs (the public key is derived from the seed), but the seed comes from `fastrand`:
//! fine for a test fake, never for anything else.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use curve25519_dalek::edwards::EdwardsPoint;
use md5::Md5;
use sha2::{Digest, Sha256, Sha512};

use crate::{KeyType, Variations};

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
    /// `ssh-ed25519 <base64 blob>` (the type is the one inside the blob), as the listing
    /// shows it.
    pub fn public_key_line(&self) -> String {
        let mut blob = &self.public_blob[..];
        let key_type = take_string(&mut blob)
            .and_then(|t| std::str::from_utf8(t).ok())
            .unwrap_or(KEY_TYPE);
        format!("{key_type} {}", STANDARD.encode(&self.public_blob))
    }

    /// `SHA256:<unpadded base64>`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(&self.public_blob))
        )
    }

    /// `aa:bb:...`, as `ssh-keygen -l -E md5` prints it (without its `MD5:` prefix).
    pub fn fingerprint_md5(&self) -> String {
        let hex: Vec<String> = Md5::digest(&self.public_blob)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        hex.join(":")
    }

    /// The listing's `public_key` under `v`.
    pub fn listed_public_key(&self, v: &Variations) -> Option<String> {
        (!v.no_listed_public_key).then(|| self.public_key_line())
    }

    /// The listing's `fingerprint` under `v`.
    pub fn listed_fingerprint(&self, v: &Variations) -> String {
        if v.md5_fingerprints {
            self.fingerprint_md5()
        } else {
            self.fingerprint()
        }
    }

    /// Serves `text`, listed with the public key line `public` (`type base64 [comment]`).
    pub fn with_public(text: &str, public: &str) -> KeyPair {
        let b64 = public.split_whitespace().nth(1).unwrap_or_default();
        KeyPair {
            private_key: Some(text.to_string()),
            public_blob: STANDARD
                .decode(b64)
                .expect("a public key line: type base64"),
        }
    }

    /// A fresh pair of `key_type` made by `ssh-keygen` in a scratch folder.
    pub fn generate_with_ssh_keygen(key_type: KeyType, comment: &str) -> KeyPair {
        let args: &[&str] = match key_type {
            KeyType::Ed25519 => &["-t", "ed25519"],
            KeyType::EcdsaP256 => &["-t", "ecdsa", "-b", "256"],
            KeyType::EcdsaP384 => &["-t", "ecdsa", "-b", "384"],
            KeyType::RsaOpenSsh => &["-t", "rsa", "-b", "2048"],
            KeyType::RsaPkcs1 => &["-t", "rsa", "-b", "2048", "-m", "PEM"],
            KeyType::RsaPkcs8 => &["-t", "rsa", "-b", "2048", "-m", "PKCS8"],
            KeyType::EcdsaPkcs8 => &["-t", "ecdsa", "-m", "PKCS8"],
            KeyType::EcdsaSec1 => &["-t", "ecdsa", "-m", "PEM"],
        };
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fake-kps-keygen-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a scratch folder for ssh-keygen");
        let path = dir.join("key");
        let out = std::process::Command::new("ssh-keygen")
            .args(args)
            .args(["-q", "-N", "", "-C", comment, "-f"])
            .arg(&path)
            .output()
            .expect("fake KPS: ssh-keygen must be installed (openssh-client) for add_key_of");
        assert!(
            out.status.success(),
            "ssh-keygen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&path).expect("ssh-keygen wrote the key");
        let public = std::fs::read_to_string(path.with_extension("pub")).expect("and its .pub");
        let _ = std::fs::remove_dir_all(&dir);
        KeyPair::with_public(&text, &public)
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
    fn listing_variations_and_md5() {
        let kp = KeyPair::generate("a");
        let md5 = kp.fingerprint_md5();
        assert_eq!(md5.len(), 47);
        assert!(
            md5.split(':')
                .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        );
        let v = Variations {
            md5_fingerprints: true,
            no_listed_public_key: true,
            ..Variations::default()
        };
        assert_eq!(kp.listed_fingerprint(&v), md5);
        assert_eq!(kp.listed_public_key(&v), None);
        let v = Variations::default();
        assert_eq!(kp.listed_fingerprint(&v), kp.fingerprint());
        assert_eq!(kp.listed_public_key(&v), Some(kp.public_key_line()));
        let other = KeyPair::with_public("text", &format!("{} c", kp.public_key_line()));
        assert_eq!(other.public_blob, kp.public_blob);
    }

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
