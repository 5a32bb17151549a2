//! The KPS error-body parser (`KpsError::from_response`) on arbitrary bodies and statuses.
//!
//! Invariants checked besides "no panic":
//! - the message is one log line whatever the body holds (no control character survives);
//! - the code and message are capped (64 and 300 characters before escaping);
//! - parsing is deterministic and the class follows the documented table.
#![no_main]

use kps_sync::kps::{Class, KpsError};
use kps_sync_fuzz::one_log_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    // 100..=599, the statuses an HTTP client can see.
    let status = 100 + u16::from_le_bytes(*head) % 500;
    let err = KpsError::from_response("list", status, body, None);
    let shown = err.to_string();
    assert!(one_log_line(&shown), "{shown:?}");
    // An escaped control character is at most `\u{9f}`: 6 characters for 1.
    if let Some(code) = &err.code {
        assert!(code.chars().count() <= 64 * 6, "{code:?}");
    }
    assert!(err.message.chars().count() <= 300 * 6);
    assert_eq!(err.status, Some(status));

    let again = KpsError::from_response("list", status, body, None);
    assert_eq!(again.to_string(), shown);
    assert_eq!(again.class, err.class);

    let expected = match (status, err.code.as_deref()) {
        (_, Some("KPS.4016" | "KPS.6004")) => Class::NotFound,
        (_, Some("KPS.6005")) => Class::NotHosted,
        (429, _) | (_, Some("APIG.0308" | "APIGW.0308")) => Class::Throttled,
        (401, _) => Class::Unauthorized,
        (500..=599 | 408, _) => Class::Transient,
        _ => Class::Permanent,
    };
    assert_eq!(err.class, expected);
    assert_eq!(
        err.is_retryable(),
        matches!(err.class, Class::Throttled | Class::Transient)
    );
});
