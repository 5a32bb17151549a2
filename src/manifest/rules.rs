//! The small rules of the manifest as pure functions: key pair names, file modes, endpoint URLs,
//! path normalization. Each returns what is wrong and what to write instead.

use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use super::raw::RawMode;

/// `.` and `..` removed lexically, so that two spellings of one path compare equal.
pub(super) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Whether `text` is a path `normalize` would leave as it is: no `.` or `..` component, no
/// empty one (`//`, a trailing `/`). Joined to a normal folder, such a path is normal, so the
/// loader skips the component walk for the common case, ten thousand times per manifest.
pub(super) fn is_normal(text: &str) -> bool {
    let rest = text.strip_prefix('/').unwrap_or(text);
    !rest.is_empty() && rest.split('/').all(|c| !matches!(c, "" | "." | ".."))
}

/// `path.starts_with(dir)` for normal paths (see `normalize`), with a byte test first: for
/// normal paths a component prefix is a byte prefix, and most paths fail on the bytes.
pub(super) fn normal_starts_with(path: &Path, dir: &Path) -> bool {
    path.as_os_str()
        .as_encoded_bytes()
        .starts_with(dir.as_os_str().as_encoded_bytes())
        && path.starts_with(dir)
}

/// KPS key pair names: `[A-Za-z0-9_-]{1,255}`.
pub(super) fn valid_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(super) fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 64
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The mode, or why it is refused and what to write instead.
pub(super) fn parse_mode(raw: &RawMode) -> Result<u32, String> {
    const HINT: &str = "use \"0600\" (owner only) or \"0640\" (owner, plus read for the group)";
    let text = match raw {
        RawMode::Number(n) => {
            return Err(format!(
                "`mode: {n}` is a YAML number, which YAML readers disagree about (octal or \
                 decimal): write the mode quoted, e.g. `mode: \"0600\"`"
            ));
        }
        RawMode::Text(t) => t.trim(),
    };
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!(
            "`{}` is not an octal file mode: {HINT}",
            text.escape_debug()
        ));
    }
    let mode = u32::from_str_radix(text, 8).map_err(|e| e.to_string())?;
    let mut wrong = Vec::new();
    if mode & 0o7000 != 0 {
        wrong.push("sets setuid, setgid or sticky");
    }
    if mode & 0o111 != 0 {
        wrong.push("makes it executable");
    }
    if mode & 0o007 != 0 {
        wrong.push("gives access to other users");
    }
    if mode & 0o020 != 0 {
        wrong.push("lets the group write");
    }
    if mode & 0o400 == 0 {
        wrong.push("does not let the owner read it");
    }
    if wrong.is_empty() {
        Ok(mode)
    } else {
        Err(format!(
            "mode {text} {} a private key file: {HINT}",
            join_reasons(&wrong)
        ))
    }
}

fn join_reasons(reasons: &[&str]) -> String {
    match reasons {
        [] => String::new(),
        [one] => format!("{one} on"),
        [init @ .., last] => format!("{} and {last} on", init.join(", ")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HttpRule {
    /// `http://` only to this host itself (tests, a local proxy); https elsewhere.
    LoopbackOnly,
    /// `http://` anywhere (the ECS metadata service speaks plain http on a link-local address).
    Any,
}

/// A base URL: `https://host[:port][/path]`, returned without trailing `/`.
pub(super) fn check_url(text: &str, http: HttpRule) -> Result<String, String> {
    if text.contains('@') {
        // `https://user:password@host`: never echo what may be a password.
        return Err(
            "the endpoint holds `user@` (perhaps with a password, not shown here): write \
                    a plain base URL such as `https://kms.cn-north-4.myhuaweicloud.com` and put \
                    credentials under `auth:`"
                .into(),
        );
    }
    let shown = text.escape_debug();
    let bad = |why: &str| Err(format!("`{shown}` is not a usable endpoint: {why}"));
    let (is_http, rest) = if let Some(rest) = text.strip_prefix("https://") {
        (false, rest)
    } else if let Some(rest) = text.strip_prefix("http://") {
        (true, rest)
    } else {
        return bad("write an https:// URL, e.g. `https://kms.cn-north-4.myhuaweicloud.com`");
    };
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '@' | '\\'))
    {
        return bad("write a plain base URL, without spaces, `?query`, `#fragment` or `user@`");
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        let Some(end) = v6.find(']') else {
            return bad("unclosed `[` in the host");
        };
        let port = &v6[end + 1..];
        if !port.is_empty() && !valid_port(port.strip_prefix(':').unwrap_or("x")) {
            return bad("the port must be a number from 1 to 65535");
        }
        &authority[..end + 2]
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => {
                if !valid_port(port) {
                    return bad("the port must be a number from 1 to 65535");
                }
                host
            }
            None => authority,
        }
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if !host_ok {
        return bad("the host name is missing or has characters a host cannot have");
    }
    if is_http && http == HttpRule::LoopbackOnly && !is_loopback(host) {
        return bad(
            "plain http:// is allowed only to this host (localhost, 127.0.0.1, [::1]); use https://",
        );
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn valid_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host == "[::1]"
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(mode: &str) -> RawMode {
        RawMode::Text(mode.into())
    }

    #[test]
    fn the_four_sensible_modes_pass() {
        for (m, v) in [
            ("0600", 0o600),
            ("0400", 0o400),
            ("0640", 0o640),
            ("440", 0o440),
        ] {
            assert_eq!(parse_mode(&text(m)), Ok(v), "{m}");
        }
    }

    #[test]
    fn every_forbidden_bit_is_refused() {
        // Each bit outside 0o640|0o200 (owner write) on its own, over 0o600.
        for bit in [
            0o7000, 0o4000, 0o2000, 0o1000, 0o100, 0o010, 0o001, 0o020, 0o004, 0o002,
        ] {
            let mode = format!("{:04o}", 0o600 | bit);
            let err = parse_mode(&text(&mode)).unwrap_err();
            assert!(err.contains("\"0600\""), "{mode}: {err}");
        }
    }

    #[test]
    fn numbers_ask_for_quotes() {
        let err = parse_mode(&RawMode::Number("600".into())).unwrap_err();
        assert!(err.contains("mode: \"0600\""), "{err}");
    }

    #[test]
    fn names_follow_kps_rules() {
        assert!(valid_name("web-prod_01"));
        assert!(valid_name(&"a".repeat(255)));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(256)));
        for bad in ["a.b", "a b", "a/b", "é", "a\n"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_password_in_an_endpoint_is_never_echoed() {
        let err = check_url("https://ops:hunter2@kms.example", HttpRule::LoopbackOnly).unwrap_err();
        assert!(!err.contains("hunter2") && err.contains("user@"), "{err}");
    }

    #[test]
    fn urls_keep_path_and_lose_trailing_slashes() {
        assert_eq!(
            check_url("https://kms.x/a/b//", HttpRule::LoopbackOnly),
            Ok("https://kms.x/a/b".into())
        );
        assert_eq!(
            check_url("http://[::1]:8080/", HttpRule::LoopbackOnly),
            Ok("http://[::1]:8080".into())
        );
        assert!(check_url("http://169.254.169.254", HttpRule::LoopbackOnly).is_err());
        assert_eq!(
            check_url("http://169.254.169.254", HttpRule::Any),
            Ok("http://169.254.169.254".into())
        );
        assert!(check_url("https://x:0", HttpRule::Any).is_err());
        assert!(check_url("https://x y", HttpRule::Any).is_err());
    }

    #[test]
    fn is_normal_agrees_with_normalize() {
        for text in [
            "a", "a/b", "/a/b", "a.pem", ".a", "a..b", "...", "a/.b/c", "./a", "a/.", "a/./b",
            "../a", "a/..", "a/../b", "a//b", "a/", "/", "//a", "", "/a/b/",
        ] {
            let joined = Path::new("/m").join(text);
            // "/" is normal but left to `normalize` (it names no file anyway).
            let unchanged = normalize(&joined).as_os_str() == joined.as_os_str();
            assert_eq!(
                is_normal(text),
                !matches!(text, "" | "/") && unchanged,
                "{text:?}"
            );
        }
    }

    #[test]
    fn normal_starts_with_is_starts_with() {
        for (p, d, want) in [
            ("/s/k", "/s", true),
            ("/s", "/s", true),
            ("/sk", "/s", false),
            ("/t/k", "/s", false),
            ("/s/k", "/", true),
        ] {
            assert_eq!(
                normal_starts_with(Path::new(p), Path::new(d)),
                want,
                "{p} {d}"
            );
        }
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c//d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(normalize(Path::new("/../x")), PathBuf::from("/x"));
    }
}
