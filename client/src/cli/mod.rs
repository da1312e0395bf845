//! The `xfer` command line: parsing, and one function per command. Data goes to stdout
//! (listings, whoami, `--json`), progress and status to stderr, every failure as one line.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xfer_proto::{Entry, EntryKind};
use xfer_util::format_time;

use crate::conn::Client;
use crate::context::Ctx;
use crate::error::{ClientError, Result, printable, report};
use crate::transfer::BatchCommand;
use account::{forget, login, logout, shutdown, whoami};
use shell::shell;

pub use crate::error::Reported;
pub use crate::transfer::{DeleteArgs, DownloadArgs, UploadArgs};

mod account;
mod shell;

/// xfer: secure file transfer with an xferd server.
#[derive(Debug, Parser)]
#[command(name = "xfer", version, about, long_about = None)]
pub struct Cli {
    /// Which logged-in server to use [default: the last one logged in to]
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// Folder for pinned keys and session tokens [default: $XFER_CONFIG_DIR, else ~/.config/xfer]
    #[arg(long, global = true, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Local address to connect from (like `ssh -b`)
    #[arg(long, global = true, value_name = "ADDR")]
    pub bind: Option<IpAddr>,
    /// Print data as JSON
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing but errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more about what is happening (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Use the token in this file (from `xfer token create`) instead of a stored session;
    /// needs --server. The XFER_TOKEN environment variable does the same.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The server's key fingerprint (SHA256:..., from `xferd fingerprint`): checked on first
    /// contact by `login`, and with a token for a server not pinned yet
    #[arg(long, global = true, value_name = "FP")]
    pub fingerprint: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check and pin the server's key, then trade the password for a session token.
    Login {
        /// USER@HOST[:PORT] (default port 7443)
        target: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
        /// Trust and pin the key of a server seen for the first time
        #[arg(long)]
        accept_new: bool,
        /// Log in with this private key (from `xfer keygen`, or an OpenSSH ed25519 key)
        #[arg(long, value_name = "FILE", conflicts_with = "password_stdin")]
        key: Option<PathBuf>,
        /// Read the key's passphrase from the first line of standard input
        #[arg(long, requires = "key")]
        passphrase_stdin: bool,
    },
    /// Make an Ed25519 key pair for `xfer login --key`: FILE (0600) and FILE.pub.
    Keygen {
        /// The private key file [default: id_ed25519 in the config folder]
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
        /// Read the passphrase from the first line of standard input (else asked on a
        /// terminal; none without one)
        #[arg(long)]
        passphrase_stdin: bool,
    },
    /// End the session: revoke the token on the server and forget it here.
    Logout,
    /// Show user, role and server of the current session, and the account's usage.
    Whoami,
    /// List files: name, size, modification time, kind.
    #[command(visible_alias = "ls")]
    List {
        /// Remote folder [default: your root]
        remote_dir: Option<String>,
    },
    /// Upload files (folders with -r).
    #[command(visible_alias = "put")]
    Upload(UploadArgs),
    /// Download files (folders with -r).
    #[command(visible_alias = "get")]
    Download(DownloadArgs),
    /// Delete remote files or empty folders.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Rename or move a remote file or folder.
    #[command(visible_alias = "mv")]
    Rename(RenameArgs),
    /// Create a remote folder (and missing parents).
    Mkdir(MkdirArgs),
    /// Stop the daemon (superuser only; asks for the password again).
    Shutdown {
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a server's pinned key and session (after a deliberate key change).
    Forget {
        /// HOST[:PORT]
        server: String,
    },
    /// An interactive session over one connection (the menu of old): list, upload, download,
    /// delete, rename, mkdir, whoami, help, quit. Reads commands from a pipe too, one per line.
    Shell,
    /// Make, list and revoke long-lived tokens for scripts (`xfer token create --help`).
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        command: crate::tokens::TokenCommand,
    },
    /// Print a shell completion script (e.g. `xfer completions bash > /etc/bash_completion.d/xfer`).
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `xfer man > /usr/local/share/man/man1/xfer.1`.
    Man,
}

/// Arguments of `rename`.
#[derive(Debug, clap::Args)]
pub struct RenameArgs {
    /// Existing remote path
    pub from: String,
    /// New remote path (an existing folder: move into it)
    pub to: String,
}

/// Arguments of `mkdir`.
#[derive(Debug, clap::Args)]
pub struct MkdirArgs {
    /// Remote folder
    pub remote_dir: String,
}

/// Parses arguments and runs; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xfer: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Reported(code)) => ExitCode::from(code),
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}

/// Runs a parsed command line; errors are printed here, once.
pub async fn run(cli: Cli) -> std::result::Result<(), Reported> {
    // These need no state folder and no server.
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "xfer", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man => {
            use clap::CommandFactory;
            return clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| report(&ClientError::local("writing the manual page", e)));
        }
        _ => {}
    }
    let ctx = match Ctx::new(
        cli.config_dir.as_deref(),
        cli.server.as_deref(),
        cli.bind,
        cli.json,
        cli.quiet,
        crate::tokens::TokenOptions {
            token_file: cli.token_file.clone(),
            fingerprint: cli.fingerprint.clone(),
        },
    ) {
        Ok(c) => c,
        Err(e) => return Err(report(&e)),
    };
    let fingerprint = cli.fingerprint.clone();
    let result = match cli.command {
        Command::Login {
            target,
            password_stdin,
            accept_new,
            key,
            passphrase_stdin,
        } => {
            let key = key.as_deref().map(|k| (k, passphrase_stdin));
            login(
                &ctx,
                &target,
                password_stdin,
                fingerprint.as_deref(),
                accept_new,
                key,
            )
            .await
        }
        Command::Keygen {
            file,
            passphrase_stdin,
        } => crate::keys::keygen_command(&ctx, ctx.state.path(), file, passphrase_stdin),
        Command::Logout => logout(&ctx).await,
        Command::Whoami => whoami(&ctx).await,
        Command::List { remote_dir } => {
            let dir = remote_dir.as_deref().unwrap_or("");
            one_request(&ctx, async |c| c.list(dir).await)
                .await
                .map(|entries| print_entries(&entries, ctx.json))
        }
        Command::Upload(a) => return BatchCommand::Upload(&a).run_connected(&ctx).await,
        Command::Download(a) => return BatchCommand::Download(&a).run_connected(&ctx).await,
        Command::Delete(a) => return BatchCommand::Delete(&a).run_connected(&ctx).await,
        Command::Rename(a) => one_request(&ctx, async |c| c.rename(&a.from, &a.to).await).await,
        Command::Mkdir(a) => one_request(&ctx, async |c| c.mkdir(&a.remote_dir).await).await,
        Command::Shutdown { password_stdin } => shutdown(&ctx, password_stdin).await,
        Command::Forget { server } => forget(&ctx, &server),
        Command::Shell => return shell(&ctx).await,
        Command::Token { command } => crate::tokens::run(&ctx, command).await,
        Command::Completions { .. } | Command::Man => unreachable!("handled before Ctx"),
    };
    result.map_err(|e| report(&e))
}

/// One listing entry as JSON, borrowed from the entry so that a large listing is written
/// out one object at a time instead of built as a JSON tree first.
#[derive(serde::Serialize)]
struct JsonEntry<'a> {
    name: &'a str,
    size: u64,
    modified: String,
    modified_unix: i64,
    kind: &'static str,
}

fn print_entries(entries: &[Entry], json: bool) {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let _ = out.write_all(b"[");
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                let _ = out.write_all(b",");
            }
            let _ = serde_json::to_writer(
                &mut out,
                &JsonEntry {
                    name: &e.name,
                    size: e.size,
                    modified: format_time(e.modified),
                    modified_unix: e.modified,
                    kind: e.kind.as_str(),
                },
            );
        }
        let _ = out.write_all(b"]\n");
        return;
    }
    for e in entries {
        let when = format_time(e.modified).replace('T', " ").replace('Z', "");
        let name = printable(&e.name);
        let suffix = if e.kind == EntryKind::Dir { "/" } else { "" };
        let _ = writeln!(
            out,
            "{:<5} {:>14}  {when}  {name}{suffix}",
            e.kind.as_str(),
            e.size
        );
    }
}

/// Connects, runs one request over the connection, closes it.
async fn one_request<T>(
    ctx: &Ctx,
    request: impl AsyncFnOnce(&mut Client) -> Result<T>,
) -> Result<T> {
    let (mut client, _, _) = ctx.connect().await?;
    let answer = request(&mut client).await?;
    client.close().await;
    Ok(answer)
}
