//! age encryption of a key for the manifest's recipients.

use crate::manifest::ParsedRecipient;

/// Parse one recipient line: an `age1...` x25519 key, or an `ssh-ed25519` / `ssh-rsa` public
/// key line (a trailing comment is allowed). The error says what is accepted.
pub fn parse_recipient(text: &str) -> Result<ParsedRecipient, String> {
    let text = text.trim();
    if text.starts_with("age1") {
        return text
            .parse::<age::x25519::Recipient>()
            .map(ParsedRecipient::X25519)
            .map_err(|e| format!("not a valid age x25519 recipient ({e})"));
    }
    if text.starts_with("ssh-ed25519 ") || text.starts_with("ssh-rsa ") {
        return text
            .parse::<age::ssh::Recipient>()
            .map(ParsedRecipient::Ssh)
            .map_err(|e| format!("not a valid SSH public key line ({e:?})"));
    }
    Err("expected an age recipient (age1...) or an SSH public key line (ssh-ed25519 ... or ssh-rsa ...)".into())
}
// STUB
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct EncryptError;
pub fn encrypt(_p: &crate::secret::SecretBytes, _e: &crate::manifest::Encryption) -> Result<crate::secret::SecretBytes, EncryptError> { Err(EncryptError) }
