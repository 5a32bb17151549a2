//! PEM armour: read leniently (BOM, CRLF, any line width, blank lines around), write exactly
//! what OpenSSH and OpenSSL write (LF, OpenSSH's 70 or OpenSSL's 64 columns, one trailing
//! newline).
//!
//! Invariant: the base64 body and the decoded bytes live only in zeroizing buffers sized up
//! front, so no reallocation leaves a stray copy behind.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use super::KeyKind;
use super::error::{KeyError, Label};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Find the one PEM block, check its labels, headers and surroundings, and decode its body.
pub(super) fn unarmor(bytes: &[u8]) -> Result<(KeyKind, Zeroizing<Vec<u8>>), KeyError> {
    let text = pem_text(bytes)?;
    let mut lines = text.split('\n').map(str::trim);
    let first = lines.next().unwrap_or_default();
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|rest| rest.strip_suffix("-----"))
        .ok_or(KeyError::NotPem)?;
    let kind = classify_label(label)?;
    let shown = Label::new(label);
    let block = read_block(&mut lines, text.len(), &shown)?;
    if block.encrypted {
        return Err(KeyError::Encrypted {
            form: "legacy PEM encryption, Proc-Type: 4,ENCRYPTED",
        });
    }
    if block.headers {
        return Err(KeyError::UnexpectedHeader { label: shown });
    }
    let Some(end) = block.end else {
        return Err(KeyError::MissingEnd { label: shown });
    };
    if end != label {
        return Err(KeyError::MismatchedEnd {
            begin: shown,
            end: Label::new(end),
        });
    }
    if lines.any(|rest| !rest.is_empty()) {
        return Err(KeyError::TrailingData { label: shown });
    }
    if block.body.is_empty() {
        return Err(KeyError::EmptyBody { label: shown });
    }
    let mut der = Zeroizing::new(Vec::with_capacity(block.body.len() / 4 * 3 + 3));
    STANDARD
        .decode_vec(block.body.as_bytes(), &mut der)
        .map_err(|_| KeyError::BadBase64 { label: shown })?;
    Ok((kind, der))
}

/// The text from the first non-blank byte, if it can be a PEM private key at all; what else it
/// looks like (a web page, JSON, a public key) names the error.
fn pem_text(bytes: &[u8]) -> Result<&str, KeyError> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .ok_or(KeyError::Empty)?;
    let bytes = &bytes[start..];
    match bytes[0] {
        b'<' => return Err(KeyError::Html),
        b'{' | b'[' => return Err(KeyError::Json),
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
            return Err(KeyError::PublicKey);
        }
    }
    // A private key is ASCII; anything else is not one, and must not be echoed.
    let text = std::str::from_utf8(bytes).map_err(|_| KeyError::NotPem)?;
    if text.starts_with("-----BEGIN ") {
        return Ok(text);
    }
    Err(if text.contains("-----BEGIN ") {
        KeyError::LeadingData
    } else if text.contains("<html") || text.contains("<HTML") {
        KeyError::Html
    } else {
        KeyError::NotPem
    })
}

/// What lies between the BEGIN line and the END line.
struct Block<'t> {
    /// The base64 body, whitespace removed.
    body: Zeroizing<String>,
    /// The END line's label (`<malformed>` if the line is cut short).
    end: Option<&'t str>,
    /// RFC 1421 headers were present before the body (only legacy PEM has them).
    headers: bool,
    /// One of them said `Proc-Type: 4,ENCRYPTED`.
    encrypted: bool,
}

/// Read up to and including the END line; `capacity` bounds the body so it never reallocates.
fn read_block<'t>(
    lines: &mut impl Iterator<Item = &'t str>,
    capacity: usize,
    shown: &Label,
) -> Result<Block<'t>, KeyError> {
    let mut block = Block {
        body: Zeroizing::new(String::with_capacity(capacity)),
        end: None,
        headers: false,
        encrypted: false,
    };
    let mut headers_allowed = true;
    for line in lines {
        if let Some(rest) = line.strip_prefix("-----END ") {
            block.end = Some(rest.strip_suffix("-----").unwrap_or("<malformed>"));
            break;
        }
        // RFC 1421 headers (`Proc-Type:`, `DEK-Info:`) come first and only in legacy PEM;
        // base64 never contains ':'.
        if line.contains(':') {
            if !headers_allowed {
                return Err(KeyError::UnexpectedHeader {
                    label: shown.clone(),
                });
            }
            block.headers = true;
            if line.starts_with("Proc-Type:") && line.contains("ENCRYPTED") {
                block.encrypted = true;
            }
            continue;
        }
        if !line.is_empty() {
            headers_allowed = false;
        }
        block
            .body
            .extend(line.chars().filter(|c| !c.is_ascii_whitespace()));
    }
    Ok(block)
}

/// The canonical text of a key: `-----BEGIN label-----`, the body in base64 at the width the
/// format's own tools write, `-----END label-----`, LF line ends, one trailing newline.
pub(super) fn armor(kind: KeyKind, der: &[u8]) -> Zeroizing<Vec<u8>> {
    let width = match kind {
        KeyKind::OpenSsh => 70,
        _ => 64,
    };
    let label = kind.label();
    let b64_len = der.len().div_ceil(3) * 4;
    let mut b64 = Zeroizing::new(vec![0u8; b64_len]);
    let written = STANDARD
        .encode_slice(der, &mut b64[..])
        .expect("the buffer is sized for the encoding");
    let lines = b64_len.div_ceil(width);
    let mut out = Zeroizing::new(Vec::with_capacity(2 * label.len() + 32 + b64_len + lines));
    out.extend_from_slice(b"-----BEGIN ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
    for line in b64[..written].chunks(width) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
    out
}

fn classify_label(label: &str) -> Result<KeyKind, KeyError> {
    if let Some(kind) = KeyKind::from_label(label) {
        return Ok(kind);
    }
    if label == "ENCRYPTED PRIVATE KEY" {
        return Err(KeyError::Encrypted {
            form: "PKCS#8 ENCRYPTED PRIVATE KEY",
        });
    }
    if label.ends_with("PUBLIC KEY") {
        return Err(KeyError::PublicKey);
    }
    if label.contains("CERTIFICATE") || label == "X509 CRL" || label == "PKCS7" {
        return Err(KeyError::Certificate {
            label: Label::new(label),
        });
    }
    Err(KeyError::UnknownLabel {
        label: Label::new(label),
    })
}
