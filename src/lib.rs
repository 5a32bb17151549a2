//! kps-sync: keep SSH private keys held in Huawei Cloud KPS present on a host, as files, exactly
//! where a YAML manifest says, and nowhere else.
//!
//! Data flows one way, one module per step:
//! `manifest` -> `plan` (with `observe` and `state`) -> `kps` (export, `kps::archive` unpacks)
//! -> `keys` (parse, normalise, verify) -> `output` (encrypt, write) -> `state` -> `hooks`.
//! `reconcile` runs one pass over them. ARCHITECTURE.md is the map.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod daemon;
pub mod hooks;
pub mod keys;
pub mod kps;
pub mod manifest;
pub mod metrics;
pub mod observe;
pub mod output;
pub mod plan;
pub mod progress;
pub mod reconcile;
pub mod secret;
pub mod state;
pub mod trust;
