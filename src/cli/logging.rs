//! Logging setup: text or JSON lines on stderr, level from `--log-level`, else `RUST_LOG`, else
//! the command's default.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool, level: Option<&str>, default_level: &str) {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).ok(),
        None => EnvFilter::try_from_default_env().ok(),
    }
    .unwrap_or_else(|| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(false).init();
    }
}
