//! The last step of a pass: a checked key becomes a file. `encrypt` turns it into age
//! ciphertext where the manifest asks, `write` puts bytes on disk atomically (mode, owner and
//! group set on the temporary file before its first byte, then a rename), and `meta` is the
//! value both the planner and the writer speak of: mode, owner and group.
//!
//! Invariant: nothing in the crate writes, changes or removes a file outside `write`, except
//! the lock and the intent journal in the trusted state folder (see `write`'s docs).

pub mod encrypt;
pub mod meta;
pub mod write;
