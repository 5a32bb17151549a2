//! Credential sources.
