//! age encryption of a key for the manifest's recipients.
//!
//! Invariants: the plaintext is read only through `SecretBytes::expose`, the ciphertext is
//! built in a zeroizing buffer sized up front (so it is not reallocated, leaving stray copies),
//! and errors name recipients by their public text only.

use std::io::Write;

use age::armor::{ArmoredWriter, Format};
use zeroize::Zeroizing;

use crate::manifest::{Encryption, ParsedRecipient};
use crate::secret::SecretBytes;

/// Why a key could not be encrypted. Never carries plaintext or ciphertext.
#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    #[error(
        "no age recipients are configured for this key; list at least one in age_recipients (or \
         age_recipients_file), or remove them to write the plain key"
    )]
    NoRecipients,
    #[error("age refused the recipients {recipients}: {source}; check age_recipients for this key")]
    Recipients {
        recipients: String,
        #[source]
        source: Box<age::EncryptError>,
    },
    #[error("age encryption failed while writing the ciphertext to memory: {0}")]
    Io(#[from] std::io::Error),
}

/// Encrypt `plaintext` to every recipient of `enc`, as binary age or, with `enc.armor`, as
/// ASCII-armored age (`-----BEGIN AGE ENCRYPTED FILE-----`).
pub fn encrypt(plaintext: &SecretBytes, enc: &Encryption) -> Result<SecretBytes, EncryptError> {
    if enc.recipients.is_empty() {
        return Err(EncryptError::NoRecipients);
    }
    let recipients = enc.recipients.iter().map(|r| match &r.parsed {
        ParsedRecipient::X25519(x) => x as &dyn age::Recipient,
        ParsedRecipient::Ssh(s) => s as &dyn age::Recipient,
    });
    let encryptor =
        age::Encryptor::with_recipients(recipients).map_err(|source| EncryptError::Recipients {
            recipients: enc
                .recipients
                .iter()
                .map(|r| r.text.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            source: Box::new(source),
        })?;

    // Header: about 100 bytes per x25519 stanza, up to ~700 for ssh-rsa-4096; payload: 16 bytes
    // of tag per 64 KiB chunk; armor: 4/3 plus line breaks.
    let binary =
        plaintext.len() + 16 * (plaintext.len() / 65536 + 1) + 1024 * (enc.recipients.len() + 1);
    let capacity = if enc.armor {
        binary / 3 * 4 + binary / 32 + 128
    } else {
        binary
    };
    let mut out = Zeroizing::new(Vec::with_capacity(capacity));
    if enc.armor {
        let armored = ArmoredWriter::wrap_output(&mut *out, Format::AsciiArmor)?;
        let mut writer = encryptor.wrap_output(armored)?;
        writer.write_all(plaintext.expose())?;
        writer.finish()?.finish()?;
    } else {
        let mut writer = encryptor.wrap_output(&mut *out)?;
        writer.write_all(plaintext.expose())?;
        writer.finish()?;
    }
    // Moves the allocation; no copy of the ciphertext is left behind.
    Ok(SecretBytes::new(std::mem::take(&mut *out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Recipient;
    use std::io::{BufReader, Read};
    use std::path::Path;
    use std::process::Command;

    const KEY: &[u8] =
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETMARK\n-----END OPENSSH PRIVATE KEY-----\n";

    fn encryption(texts: &[&str], armor: bool) -> Encryption {
        Encryption {
            recipients: texts
                .iter()
                .map(|text| Recipient {
                    text: text.to_string(),
                    parsed: crate::manifest::ParsedRecipient::parse(text).unwrap(),
                })
                .collect(),
            armor,
        }
    }

    fn decrypt(ciphertext: &[u8], identity: &dyn age::Identity) -> Vec<u8> {
        let reader = age::armor::ArmoredReader::new(ciphertext);
        let decryptor = age::Decryptor::new(reader).expect("an age file");
        let mut out = Vec::new();
        decryptor
            .decrypt(std::iter::once(identity))
            .expect("our identity opens it")
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn x25519() -> (age::x25519::Identity, String) {
        let identity = age::x25519::Identity::generate();
        let public = identity.to_public().to_string();
        (identity, public)
    }

    /// An SSH identity from ssh-keygen, or None (with a notice) where it is not installed.
    fn ssh_identity(dir: &Path, args: &[&str]) -> Option<(age::ssh::Identity, String)> {
        if Command::new("ssh-keygen").arg("-?").output().is_err() {
            eprintln!("notice: ssh-keygen not found; skipping the ssh recipient round trip");
            return None;
        }
        let path = dir.join(args[1]);
        let status = Command::new("ssh-keygen")
            .args(args)
            .args(["-q", "-N", "", "-C", "ops@test", "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let file = std::fs::File::open(&path).unwrap();
        let identity = age::ssh::Identity::from_buffer(BufReader::new(file), None).unwrap();
        assert!(matches!(identity, age::ssh::Identity::Unencrypted(_)));
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        Some((identity, public.trim().to_owned()))
    }

    #[test]
    fn x25519_round_trip_binary_and_armored() {
        let (identity, public) = x25519();
        let plain = SecretBytes::new(KEY.to_vec());

        let binary = encrypt(&plain, &encryption(&[&public], false)).unwrap();
        assert!(binary.expose().starts_with(b"age-encryption.org/v1\n"));
        assert!(!binary.expose().windows(10).any(|w| w == b"SECRETMARK"));
        assert_eq!(decrypt(binary.expose(), &identity), KEY);

        let armored = encrypt(&plain, &encryption(&[&public], true)).unwrap();
        assert!(
            armored
                .expose()
                .starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----\n")
        );
        assert!(
            armored
                .expose()
                .ends_with(b"-----END AGE ENCRYPTED FILE-----\n")
        );
        assert!(armored.expose().is_ascii());
        assert_eq!(decrypt(armored.expose(), &identity), KEY);
    }

    #[test]
    fn every_recipient_can_decrypt() {
        let (one, one_public) = x25519();
        let (two, two_public) = x25519();
        let (stranger, _) = x25519();
        let plain = SecretBytes::new(KEY.to_vec());
        let out = encrypt(&plain, &encryption(&[&one_public, &two_public], false)).unwrap();
        assert_eq!(decrypt(out.expose(), &one), KEY);
        assert_eq!(decrypt(out.expose(), &two), KEY);
        let decryptor = age::Decryptor::new(out.expose()).unwrap();
        assert!(
            decryptor
                .decrypt(std::iter::once(&stranger as &dyn age::Identity))
                .is_err()
        );
    }

    #[test]
    fn a_large_plaintext_round_trips() {
        // Several 64 KiB age chunks, to cover the capacity estimate's chunk overhead.
        let (identity, public) = x25519();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for armor in [false, true] {
            let out = encrypt(
                &SecretBytes::new(big.clone()),
                &encryption(&[&public], armor),
            )
            .unwrap();
            assert_eq!(decrypt(out.expose(), &identity), big);
        }
    }

    #[test]
    fn ssh_ed25519_and_rsa_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let Some((ed, ed_public)) = ssh_identity(dir.path(), &["-t", "ed25519"]) else {
            return;
        };
        let Some((rsa, rsa_public)) = ssh_identity(dir.path(), &["-t", "rsa", "-b", "2048"]) else {
            return;
        };
        let (x, x_public) = x25519();
        let plain = SecretBytes::new(KEY.to_vec());
        for armor in [false, true] {
            let out = encrypt(&plain, &encryption(&[&ed_public], armor)).unwrap();
            assert_eq!(decrypt(out.expose(), &ed), KEY);
            let out = encrypt(&plain, &encryption(&[&rsa_public], armor)).unwrap();
            assert_eq!(decrypt(out.expose(), &rsa), KEY);
            let all = [ed_public.as_str(), rsa_public.as_str(), x_public.as_str()];
            let out = encrypt(&plain, &encryption(&all, armor)).unwrap();
            assert_eq!(decrypt(out.expose(), &ed), KEY);
            assert_eq!(decrypt(out.expose(), &rsa), KEY);
            assert_eq!(decrypt(out.expose(), &x), KEY);
        }
    }

    #[test]
    fn no_recipients_is_an_error_that_says_what_to_do() {
        let err = encrypt(
            &SecretBytes::new(KEY.to_vec()),
            &Encryption {
                recipients: vec![],
                armor: false,
            },
        )
        .unwrap_err();
        assert!(matches!(err, EncryptError::NoRecipients));
        assert!(err.to_string().contains("age_recipients"));
    }

    #[test]
    fn the_output_hides_itself_in_debug() {
        let (_, public) = x25519();
        let out = encrypt(
            &SecretBytes::new(KEY.to_vec()),
            &encryption(&[&public], true),
        )
        .unwrap();
        let shown = format!("{out:?}");
        assert!(!shown.contains("AGE ENCRYPTED"), "{shown}");
    }
}
