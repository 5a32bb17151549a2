//! The one place a KPS client is built from a manifest: the credentials resolved, the SDK
//! credentials file checked for strict modes, the HTTP client made. Every command and the
//! daemon (at start and on each reload) come here, so none skips the credentials check.

use std::sync::Arc;

use crate::auth::{Auth, AuthError, Source};
use crate::manifest::Manifest;
use crate::trust::{self, Untrusted};

use super::{ClientError, KpsClient, RetryPolicy};

/// Why no client could be built; nothing was sent to KPS. The caller's input is at fault
/// (the manifest, the credentials or their files), so `reconcile` exits 2 for each.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No usable credential source.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The SDK credentials file found through `$HOME` is open to others.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
    /// The HTTP client could not be made (an unreadable or empty `ca_file`).
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// The client for `manifest`, with the credentials from the manifest or the environment.
pub fn client_for(manifest: &Manifest, retry: RetryPolicy) -> Result<KpsClient, SetupError> {
    let env = |name: &str| std::env::var(name).ok();
    let auth = Auth::resolve(&manifest.kps, &env)?;
    trusted_credentials(&auth)?;
    tracing::info!(source = %auth.source(), endpoint = %manifest.kps.endpoint, "using KPS credentials");
    Ok(KpsClient::new(
        &manifest.kps,
        &manifest.settings,
        Arc::new(auth),
        retry,
    )?)
}

/// Strict modes for the SDK credentials file found through `$HOME` (the files the manifest
/// names were checked when it loaded).
pub fn trusted_credentials(auth: &Auth) -> Result<(), Untrusted> {
    match auth.source() {
        Source::CredentialsFile(path) => trust::check(path, trust::Input::Credential),
        _ => Ok(()),
    }
}
