//! The command line's side of the library: each subcommand as a function that loads the
//! manifest, builds what it needs, runs the library and turns the result into output and an
//! exit code (`commands`), and the log set-up (`logging`). `main.rs` parses the arguments and
//! calls these; nothing below `cli` knows about exit codes or stdout.

pub mod commands;
pub mod logging;
