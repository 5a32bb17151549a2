//! The `kps-sync` binary: parse the command line, set up logging, call the library, exit.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use kps_sync::cli::commands;

/// Keep SSH private keys from Huawei Cloud KPS on this host, exactly where a manifest says.
#[derive(Parser)]
#[command(name = "kps-sync", version, after_long_help = FILES_AND_EXIT_CODES)]
struct Cli {
    /// Manifest path [default: $KPS_SYNC_MANIFEST, then /etc/kps-sync/manifest.yaml]
    #[arg(short = 'm', long = "manifest", global = true)]
    manifest: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter (error, warn, info, debug, trace); RUST_LOG works too.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The end of `--help` and of the man page.
const FILES_AND_EXIT_CODES: &str = "\
Files:
  /etc/kps-sync/manifest.yaml     the manifest (-m, $KPS_SYNC_MANIFEST)
  /etc/kps-sync/credentials/      secrets, handed to the units as $CREDENTIALS_DIRECTORY/kps_<file>
  /var/lib/kps-sync/              state.json (hashes, never keys) and the lock

Exit codes (reconcile, run, check):
  0  every key in place (check: every key could be exported)
  1  some key could not be brought in place, or KPS could not be reached
  2  the command line or the manifest is invalid: nothing was attempted

Units: kps-sync.service (the daemon), kps-sync-reconcile.timer (a pass every 15 minutes).
Documentation: /usr/share/doc/kps-sync/README.md";

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// One pass, then exit: export what is missing, fix what drifted, run hooks.
    Reconcile {
        /// Wait a random time up to this long first (e.g. 5m), so a fleet spreads its calls.
        #[arg(long, value_parser = humantime::parse_duration)]
        splay: Option<Duration>,
        /// List KPS now to look for rotated keys, whatever settings.rotation_check says.
        #[arg(long)]
        check_rotation: bool,
    },
    /// The daemon: a first pass, then watch and reconcile until SIGTERM.
    Run,
    /// Print what a pass would do; writes nothing, exports nothing.
    Plan {
        /// Exit 0 when nothing is to do, 2 when changes are pending, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Check the manifest and the credentials' presence; touches no network.
    Validate,
    /// What is managed, when each file was written, the last error per key.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Online preflight: one listing proves the credentials, the project and the permission,
    /// then each key is reported present, hosted, frozen or missing. Exports nothing, writes
    /// nothing; exits 0 when every key could be exported, 1 otherwise.
    Check {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script to standard output.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the manual page (roff) to standard output.
    Man,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

fn main() -> ExitCode {
    // Before anything is read: keys and credentials pass through this process's memory.
    let hygiene = no_core_dumps();
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => return completions(shell),
        Command::Man => return man(),
        _ => {}
    }
    let default_level = if matches!(cli.command, Command::Run) {
        "info"
    } else {
        "warn"
    };
    kps_sync::cli::logging::init(
        matches!(cli.log_format, LogFormat::Json),
        cli.log_level.as_deref(),
        default_level,
    );
    // The live progress line: for a person at a terminal, never in a log.
    kps_sync::progress::enable(
        matches!(cli.log_format, LogFormat::Text) && std::io::stderr().is_terminal(),
    );
    if let Err(e) = hygiene {
        tracing::warn!(
            "cannot turn core dumps off ({e}); a crash could write key material to a core file"
        );
    }
    let manifest = cli
        .manifest
        .unwrap_or_else(kps_sync::manifest::default_path);
    let runtime = runtime(matches!(cli.command, Command::Run)).expect("tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Command::Reconcile {
                splay,
                check_rotation,
            } => commands::reconcile(&manifest, splay, check_rotation).await,
            Command::Run => commands::run(&manifest).await,
            Command::Plan { detailed_exitcode } => {
                commands::plan(&manifest, detailed_exitcode).await
            }
            Command::Validate => commands::validate(&manifest),
            Command::Status { json } => commands::status(&manifest, json).await,
            Command::Check { json } => commands::check(&manifest, json).await,
            Command::Completions { .. } | Command::Man => unreachable!("answered above"),
        }
    });
    ExitCode::from(code)
}

/// Every command, the daemon included, runs on this one thread: a pass is I/O-bound and does its
/// file work on blocking threads, so worker threads would only cost memory (each a stack and a
/// malloc arena) and start-up time. The daemon lets an idle blocking thread go after a second
/// rather than tokio's 10 s, so between passes it is down to this thread and notify's.
fn runtime(daemon: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if daemon {
        builder.thread_keep_alive(Duration::from_secs(1));
    }
    builder.enable_all().build()
}

fn completions(shell: Shell) -> ExitCode {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kps-sync", &mut script);
    print_bytes(&script)
}

fn man() -> ExitCode {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .expect("rendering into memory does not fail");
    print_bytes(&page)
}

/// Generated text to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            ExitCode::from(commands::EXIT_FAILED)
        }
    }
}

/// No core file, and no ptrace or `/proc/PID/mem` reading by other processes of the same user:
/// a crash or a debugger must not copy keys out of memory. `RLIMIT_CORE` 0/0 also covers a
/// core pattern piped to a helper (systemd-coredump), which `PR_SET_DUMPABLE` 0 alone stops too;
/// the hard limit makes it irreversible for this process and its hooks.
fn no_core_dumps() -> nix::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    nix::sys::prctl::set_dumpable(false)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).or_else(|e| {
        // A seccomp filter may refuse the call where the unit's LimitCORE=0 already did it.
        match getrlimit(Resource::RLIMIT_CORE)? {
            (0, 0) => Ok(()),
            _ => Err(e),
        }
    })
}
