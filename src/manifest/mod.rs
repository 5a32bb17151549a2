//! The manifest: YAML in, a validated [`Manifest`] out, or an error naming the file, the line
//! and column, and what to write instead.

mod model;

pub use model::*;
