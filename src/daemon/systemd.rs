//! The systemd notify protocol: one datagram per message to `$NOTIFY_SOCKET`, each a set of
//! `NAME=value` lines (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`). The units use
//! `Type=notify`, so `RELOADING=1` and `MONOTONIC_USEC=` (for `Type=notify-reload`) are not
//! sent: a reload is a SIGHUP the daemon answers with a pass, and `STATUS=` says how it went.
//!
//! Invariants: sending never fails the daemon (systemd may be gone, the socket full): a failure is
//! logged at debug and forgotten. `STATUS=` text is one line, never key material (it is built
//! from counts, key names, error codes and timestamps). Abstract sockets (`@name`) are supported
//! through std's `SocketAddrExt::from_abstract_name`, so no `unsafe` is needed.
//!
//! Why not the `sd-notify` crate (0.5.0, the latest; tried against the same sockets as the tests
//! below): it connects `$NOTIFY_SOCKET` as a path, so an abstract `@name` socket, which
//! sd_notify(3) defines, fails with ENOENT (the test
//! `failed_keys_still_report_ready_and_are_retried` in tests/daemon.rs runs the daemon against
//! one); and its `watchdog_enabled` turns `WATCHDOG_USEC=0` into a zero period, on which
//! `tokio::time::interval` panics. Working around both would leave this module as long as it
//! is, plus a dependency with `unsafe` inside. systemd documents the protocol as stable, and
//! sd_notify(3) ("Notes") gives a dependency-free implementation for programs that do not link
//! libsystemd; the 60 lines below are that, with std alone.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// `READY=1`: the first pass is done; systemd considers the unit started.
pub const READY: &str = "READY=1";
/// `WATCHDOG=1`: the main loop is alive.
pub const WATCHDOG: &str = "WATCHDOG=1";
/// `STOPPING=1`: shutting down on SIGTERM/SIGINT.
pub const STOPPING: &str = "STOPPING=1";

/// A handle on systemd's notify socket.
#[derive(Debug)]
pub struct Notifier {
    /// Unbound: systemd identifies the sender by its credentials, not its address.
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, or `None` when not run by systemd with
    /// `Type=notify` (or the value is unusable, which is logged).
    pub fn from_env() -> Option<Notifier> {
        let spec = std::env::var_os("NOTIFY_SOCKET")?;
        match Notifier::new(&spec) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(
                    socket = %spec.to_string_lossy(),
                    error = %e,
                    "NOTIFY_SOCKET is set but unusable; systemd will not hear READY=1 or the watchdog"
                );
                None
            }
        }
    }

    /// A notifier for `spec`: an absolute path, or `@name` for an abstract socket.
    pub fn new(spec: &OsStr) -> io::Result<Notifier> {
        Ok(Notifier {
            addr: socket_addr(spec)?,
            socket: UnixDatagram::unbound()?,
        })
    }

    /// Send one message (lines `NAME=value`). Errors are logged at debug and otherwise ignored:
    /// the daemon's work does not depend on systemd listening.
    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::debug!(error = %e, "cannot send to NOTIFY_SOCKET");
        }
    }
}

/// Parse `$NOTIFY_SOCKET`: `/path` or `@abstract`. (`vsock:` is for VMs, not supported.)
pub fn socket_addr(spec: &OsStr) -> io::Result<SocketAddr> {
    let bytes = spec.as_bytes();
    match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(Path::new(spec)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET must be an absolute path or start with @ (abstract socket)",
        )),
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// recommends, and only when `WATCHDOG_PID` is unset or names this process (otherwise the
/// variables were inherited from a parent that is the one being watched).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(our_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

/// [`watchdog_interval`] read from this process's environment.
pub fn watchdog_interval_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// `STATUS=text`, with line breaks flattened: a newline would start another assignment.
pub fn status(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={one_line}")
}

/// Several assignments in one datagram (e.g. `READY=1` with the first `STATUS=`), so systemd
/// applies them together.
pub fn join(parts: &[&str]) -> String {
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn watchdog_is_half_the_timeout_and_only_for_us() {
        assert_eq!(
            watchdog_interval(Some("2000000"), None, 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("8"), 7),
            None,
            "another process's watchdog"
        );
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn status_is_one_assignment() {
        assert_eq!(status("a\nb\r\nc"), "STATUS=a b  c");
        assert_eq!(join(&[READY, &status("ok")]), "READY=1\nSTATUS=ok");
    }

    #[test]
    fn rejects_relative_and_empty_socket_names() {
        assert!(socket_addr(OsStr::new("run/notify")).is_err());
        assert!(socket_addr(OsStr::new("")).is_err());
        assert!(socket_addr(OsStr::new("vsock:2:1234")).is_err());
    }

    #[test]
    fn sends_to_a_path_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.send(&join(&[READY, &status("3 managed")]));
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=3 managed");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("kps-sync-test-{}-{}", std::process::id(), fastrand::u64(..));
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.send(WATCHDOG);
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_vanished_socket_is_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let n = Notifier::new(tmp.path().join("gone.sock").as_os_str()).unwrap();
        n.send(READY);
    }
}
