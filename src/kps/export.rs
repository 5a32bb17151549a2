//! Placeholder; filled once the archive module lands.
