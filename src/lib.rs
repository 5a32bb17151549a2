//! kps-sync: keep SSH private keys held in Huawei Cloud KPS present on a host, as files, exactly
//! where a YAML manifest says, and nowhere else.
//!
//! Data flows one way, one module per step:
//! `manifest` -> `plan` (with `observe` and `state`) -> `kps` (export) -> `archive` (unpack)
//! -> `encrypt` -> `write` -> `state` -> `hooks`. `reconcile` runs one pass over them; `keys` is
//! the one parser of key text that the archive, the export and the writer call.

#![forbid(unsafe_code)]

pub mod archive;
pub mod auth;
pub mod commands;
pub mod daemon;
pub mod encrypt;
pub mod hooks;
pub mod keys;
pub mod kps;
pub mod logging;
pub mod manifest;
pub mod meta;
pub mod metrics;
pub mod observe;
pub mod plan;
pub mod progress;
pub mod reconcile;
pub mod sdnotify;
pub mod secret;
pub mod state;
pub mod trust;
pub mod watch;
pub mod write;
