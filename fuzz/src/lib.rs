//! Helpers shared by the fuzz targets.

/// Runs of at least 24 base64 characters on the input's lines that are not armour lines
/// (`-----BEGIN ...-----`): what key material looks like. An error or `Debug` that contains one
/// is showing input text.
pub fn base64_runs(data: &[u8]) -> Vec<&str> {
    let mut runs = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        if line.windows(5).any(|w| w == b"-----") {
            continue;
        }
        for run in line.split(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/'))) {
            // A run of upper-case letters and digits alone may be a PEM label, which errors
            // show on purpose (`keys::Label`); base64 of key material has lower case too.
            if run.len() >= 24 && run.iter().any(u8::is_ascii_lowercase) {
                runs.push(std::str::from_utf8(run).expect("ASCII"));
            }
        }
    }
    runs
}

/// True when `text` has no character a log line must not carry raw (line breaks, escapes).
pub fn one_log_line(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
}

/// Lower-case hex SHA-256, as the canonical request ends.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
