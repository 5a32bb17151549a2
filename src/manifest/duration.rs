//! Durations as people write them in the manifest: `250ms`, `10s`, `5m`, `1h30m`.

use std::time::Duration;

/// Parse a duration with units. A bare number is refused: `300` could mean seconds or
/// milliseconds, so the message asks for the unit.
pub(super) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration: write one like `250ms`, `10s`, `5m` or `1h30m`".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!(
            "`{text}` has no unit: write `{text}s` for seconds (or `ms`, `m`, `h`)"
        ));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is not a duration ({e}): write one like `250ms`, `10s`, `5m` or `1h30m`")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_forms() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn bare_numbers_ask_for_a_unit() {
        let err = parse("300").unwrap_err();
        assert!(err.contains("`300s`"), "{err}");
    }

    #[test]
    fn garbage_is_refused_with_examples() {
        for bad in ["", "soon", "5 parsecs", "-5s"] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("250ms"), "{bad}: {err}");
        }
    }
}
