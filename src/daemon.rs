//! The daemon (`kps-sync run`). A first pass, then reconcile on every trigger until SIGTERM.

use std::path::Path;

/// Placeholder until the daemon issue lands: one pass, like `reconcile`.
pub async fn run(manifest_path: &Path) -> u8 {
    crate::commands::reconcile(manifest_path, None).await
}
