//! age recipients: the value type and its one parser, together, so that the manifest (which
//! parses them) and `encrypt` (which uses them) both depend on this and not on each other.
//!
//! Recipients are public keys: their text is safe to print in errors and logs.

/// One parsed age recipient and the line it came from.
#[derive(Clone)]
pub struct Recipient {
    /// The recipient as written (public; safe to print).
    pub text: String,
    pub parsed: ParsedRecipient,
}

#[derive(Clone)]
pub enum ParsedRecipient {
    X25519(age::x25519::Recipient),
    Ssh(age::ssh::Recipient),
}

/// Why a recipient line was refused. The message says what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum RecipientError {
    #[error("not a valid age x25519 recipient ({0})")]
    X25519(&'static str),
    #[error("not a valid SSH public key line ({0})")]
    Ssh(String),
    #[error(
        "expected an age recipient (age1...) or an SSH public key line (ssh-ed25519 ... or \
         ssh-rsa ...)"
    )]
    Unknown,
}

impl ParsedRecipient {
    /// Parse one recipient line: an `age1...` x25519 key, or an `ssh-ed25519` / `ssh-rsa`
    /// public key line (a trailing comment is allowed).
    pub fn parse(text: &str) -> Result<ParsedRecipient, RecipientError> {
        let text = text.trim();
        if text.starts_with("age1") {
            return text
                .parse::<age::x25519::Recipient>()
                .map(ParsedRecipient::X25519)
                .map_err(RecipientError::X25519);
        }
        if text.starts_with("ssh-ed25519 ") || text.starts_with("ssh-rsa ") {
            return text
                .parse::<age::ssh::Recipient>()
                .map(ParsedRecipient::Ssh)
                .map_err(|e| RecipientError::Ssh(format!("{e:?}")));
        }
        Err(RecipientError::Unknown)
    }
}
