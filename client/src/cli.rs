//! The `xfer` command line: parsing, and one function per command. Data goes to stdout
//! (listings, whoami, `--json`), progress and status to stderr, every failure as one line.

use std::io::{BufRead, IsTerminal, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::{Entry, EntryKind, ErrorCode, Role};

use crate::addr::ServerAddr;
use crate::conn::{Client, connect_tls};
use crate::error::{ClientError, Result, printable};
use crate::keys::Credential;
use crate::progress::Progress;
use crate::shell::ShellInput;
use crate::state::{KnownServers, StateDir, StoredSession};
use crate::transfer::BatchCommand;

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
        /// Expected server key fingerprint (SHA256:...), from `xferd fingerprint`
        #[arg(long, value_name = "FP")]
        fingerprint: Option<String>,
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
    /// Show user, role and server of the current session.
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
    /// Print a shell completion script (e.g. `xfer completions bash > /etc/bash_completion.d/xfer`).
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `xfer man > /usr/local/share/man/man1/xfer.1`.
    Man,
}

/// Arguments of `upload`, shared by the command line and `xfer shell`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// Local files
    #[arg(required = true)]
    pub local: Vec<PathBuf>,
    /// Remote folder to upload into [default: your root]
    #[arg(long, value_name = "REMOTE_DIR")]
    pub to: Option<String>,
    /// Upload folders and everything in them
    #[arg(short, long)]
    pub recursive: bool,
    /// Send every file whole, even if the server kept part of it from an interrupted upload
    #[arg(long)]
    pub no_resume: bool,
}

/// Arguments of `download`, shared by the command line and `xfer shell`.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// Remote files
    #[arg(required = true)]
    pub remote: Vec<String>,
    /// Local folder to download into [default: the current folder]
    #[arg(long, value_name = "LOCAL_DIR")]
    pub to: Option<PathBuf>,
    /// Download folders and everything in them
    #[arg(short, long)]
    pub recursive: bool,
    /// Fetch every file whole, even if a NAME.part from an interrupted download is there
    #[arg(long)]
    pub no_resume: bool,
}

/// Arguments of `delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Remote paths
    #[arg(required = true)]
    pub remote: Vec<String>,
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

/// An error that has already been printed, carrying the exit code.
pub struct Reported(pub u8);

pub(crate) fn report(e: &ClientError) -> Reported {
    eprintln!("xfer: error: {e}");
    Reported(e.exit_code())
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
    let ctx = match Ctx::new(&cli) {
        Ok(c) => c,
        Err(e) => return Err(report(&e)),
    };
    let result = match cli.command {
        Command::Login {
            target,
            password_stdin,
            fingerprint,
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
        Command::Completions { .. } | Command::Man => unreachable!("handled before Ctx"),
    };
    result.map_err(|e| report(&e))
}

/// What every command needs: the state folder and the global flags.
/// How long [`Ctx::connect_extra`] tries.
const EXTRA_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct Ctx {
    state: StateDir,
    server: Option<String>,
    bind: Option<IpAddr>,
    /// `--json`: print data as JSON.
    pub(crate) json: bool,
    quiet: bool,
    /// Progress bars (drawn only on a terminal).
    pub(crate) progress: Progress,
}

impl Ctx {
    fn new(cli: &Cli) -> Result<Ctx> {
        let dir = match &cli.config_dir {
            Some(d) => d.clone(),
            None => crate::state::default_dir().ok_or_else(|| {
                ClientError::Usage(
                    "cannot find a config folder: set HOME or XFER_CONFIG_DIR, or pass --config-dir".into(),
                )
            })?,
        };
        let server = cli
            .server
            .as_deref()
            .map(|s| ServerAddr::parse(s).map(|a| a.to_string()))
            .transpose()?;
        Ok(Ctx {
            state: StateDir::open(&dir)?,
            server,
            bind: cli.bind,
            json: cli.json,
            quiet: cli.quiet,
            progress: Progress::new(cli.quiet),
        })
    }

    /// Prints a status line on stderr unless `-q`.
    pub(crate) fn status(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// Connects to the selected server with its pin and authenticates with the stored token.
    pub(crate) async fn connect(&self) -> Result<(Client, String, StoredSession)> {
        let (key, stored) = self.state.sessions()?.select(self.server.as_deref())?;
        let client = self.connect_as(&key, &stored).await?;
        Ok((client, key, stored))
    }

    /// Another connection on the same session, for a command that spreads its work over
    /// several: one attempt (a refusal at a server limit is not retried) within
    /// [`EXTRA_CONNECT_WAIT`], and `None` on any failure, since the first connection can do
    /// the work alone.
    pub(crate) async fn connect_extra(&self) -> Option<Client> {
        let (key, stored) = self
            .state
            .sessions()
            .ok()?
            .select(self.server.as_deref())
            .ok()?;
        let server = ServerAddr::parse(&key).ok()?;
        let pin = self.state.known_servers().ok()?.get(&key)?;
        let attempt = async {
            let (tls, seen) = crate::conn::connect_tls_once(&server, Some(pin), self.bind)
                .await
                .ok()?;
            let mut client = Client::greet(tls, server.clone(), seen).await.ok()?;
            client.authenticate(&stored.token).await.ok()?;
            Some(client)
        };
        tokio::time::timeout(EXTRA_CONNECT_WAIT, attempt)
            .await
            .ok()
            .flatten()
    }

    /// [`Ctx::connect`] for a session the caller has already read, so that a command which
    /// also rewrites `sessions.toml` reads it once.
    async fn connect_as(&self, key: &str, stored: &StoredSession) -> Result<Client> {
        let server = ServerAddr::parse(key)?;
        let known = self.state.known_servers()?;
        let pin = known.get(key).ok_or_else(|| {
            ClientError::Other(format!(
                "no pinned key for {key} in `{}` - run `xfer login {}@{key}`",
                self.state.known_servers_path().display(),
                stored.user
            ))
        })?;
        let mut client = Client::connect(&server, pin, self.bind)
            .await
            .inspect_err(|e| self.warn_key_changed(e, &known))?;
        match client.authenticate(&stored.token).await {
            Ok(_) => Ok(client),
            Err(ClientError::Server {
                code: ErrorCode::SessionExpired | ErrorCode::NotAuthenticated,
                ..
            }) => Err(ClientError::Server {
                code: ErrorCode::SessionExpired,
                message: format!(
                    "session for {key} expired or was revoked - run `xfer login {}@{key}`",
                    stored.user
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// The OpenSSH-style warning for a changed key; `known` is the pin file as just read.
    fn warn_key_changed(&self, e: &ClientError, known: &KnownServers) {
        if let ClientError::KeyChanged {
            server,
            pinned,
            seen,
        } = e
        {
            let path = self.state.known_servers_path();
            let line = known
                .line_of(server)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            eprintln!(
                "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
                 @    WARNING: SERVER IDENTIFICATION HAS CHANGED!          @\n\
                 @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
                 IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
                 Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n\
                 It is also possible that the server's key has just been replaced.\n\
                 The key pinned for {server} is\n    {pinned}\n\
                 The server now presents\n    {seen}\n\
                 The pin is in {}{line}. Nothing was sent to the server.\n\
                 If you know the key was replaced on purpose, remove the old pin with:\n    xfer forget {server}",
                path.display()
            );
        }
    }
}

/// Reads a password: first line of stdin with `--password-stdin`, else a no-echo prompt on the
/// terminal, else a clear usage error.
fn read_password(from_stdin: bool, prompt: &str) -> Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| ClientError::local("reading the password from standard input", e))?;
        let pw = line
            .strip_suffix('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .unwrap_or(&line);
        return Ok(pw.to_string());
    }
    if !std::io::stdin().is_terminal() {
        return Err(ClientError::Usage(
            "no terminal to ask for the password on; pass --password-stdin and pipe it in".into(),
        ));
    }
    rpassword::prompt_password(prompt).map_err(|e| ClientError::local("reading the password", e))
}

fn ask_yes_no(question: &str) -> Result<bool> {
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| ClientError::local("reading the answer", e))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "yes" | "y"
    ))
}

async fn login(
    ctx: &Ctx,
    target: &str,
    password_stdin: bool,
    fingerprint: Option<&str>,
    accept_new: bool,
    login_key: Option<(&std::path::Path, bool)>,
) -> Result<()> {
    let (user, server) = ServerAddr::parse_login(target)?;
    let key = server.to_string();
    let expected = fingerprint
        .map(Fingerprint::parse)
        .transpose()
        .map_err(|e| ClientError::Usage(format!("--fingerprint: {e}")))?;
    let mut known = ctx.state.known_servers()?;
    let pinned = known.get(&key);
    // First connection: establish who the server is before anything is sent.
    let (tls, seen) = connect_tls(&server, pinned, ctx.bind)
        .await
        .inspect_err(|e| ctx.warn_key_changed(e, &known))?;
    drop(tls);
    if let Some(expected) = expected
        && expected != seen
    {
        return Err(ClientError::FingerprintMismatch {
            server: key,
            expected,
            seen,
        });
    }
    if pinned.is_none() {
        if expected.is_none() && !accept_new {
            if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
                return Err(ClientError::UnknownServer { server: key, seen });
            }
            eprintln!("The authenticity of server '{key}' can't be established.");
            eprintln!("Its key fingerprint is {seen}.");
            eprintln!("Compare it with the output of `xferd fingerprint` on the server.");
            if !ask_yes_no("Are you sure you want to trust it and continue (yes/no)? ")? {
                return Err(ClientError::NotConfirmed);
            }
        }
        known.set(&key, seen);
        ctx.state.save_known_servers(&known)?;
        ctx.status(format_args!("Pinned {key} with key {seen}."));
    }
    let credential = match login_key {
        Some((file, passphrase_stdin)) => {
            Credential::Key(crate::keys::load(file, passphrase_stdin)?)
        }
        None => Credential::Password(
            read_password(password_stdin, &format!("Password for {user}@{key}: "))?.into(),
        ),
    };
    // Second connection, pinned to the key just checked: prompts may have outlasted the
    // server's login deadline on the first one.
    let mut client = Client::connect(&server, seen, ctx.bind)
        .await
        .inspect_err(|e| ctx.warn_key_changed(e, &known))?;
    let (token, info) = credential.log_in(&mut client, &user).await?;
    client.close().await;
    // The name is the server's text, and it is printed again from this file later (prompts,
    // "run `xfer login USER@...`"): escaped once here, it is safe everywhere after.
    let user = printable(&info.user);
    let mut sessions = ctx.state.sessions()?;
    sessions.servers.insert(
        key.clone(),
        StoredSession {
            user: user.clone(),
            role: info.role,
            token,
            expires: info.expires,
        },
    );
    sessions.current = Some(key.clone());
    sessions.last_user.insert(key.clone(), user.clone());
    ctx.state.save_sessions(&sessions)?;
    ctx.status(format_args!(
        "Logged in to {key} as {user} ({}).",
        info.role
    ));
    Ok(())
}

async fn logout(ctx: &Ctx) -> Result<()> {
    let mut sessions = ctx.state.sessions()?;
    let (key, stored) = sessions.select(ctx.server.as_deref())?;
    let remote = match ctx.connect_as(&key, &stored).await {
        Ok(mut client) => {
            let r = client.logout().await;
            client.close().await;
            r
        }
        Err(ClientError::Server {
            code: ErrorCode::SessionExpired,
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    };
    // `current` stays, so the next command says whom to log in as, and where.
    sessions.servers.remove(&key);
    ctx.state.save_sessions(&sessions)?;
    match remote {
        Ok(()) => {
            ctx.status(format_args!("Logged out of {key}."));
            Ok(())
        }
        Err(e) => Err(ClientError::Other(format!(
            "removed the local session for {key}, but could not revoke it on the server ({e})"
        ))),
    }
}

fn format_time(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn whoami(ctx: &Ctx) -> Result<()> {
    let (mut client, key, _) = ctx.connect().await?;
    let info = client.whoami().await?;
    client.close().await;
    if ctx.json {
        let v = serde_json::json!({
            "user": printable(&info.user),
            "role": info.role,
            "server": key,
            "expires": format_time(info.expires),
        });
        println!("{v}");
    } else {
        println!(
            "{} ({}) on {key}; session expires {}",
            printable(&info.user),
            info.role,
            format_time(info.expires)
        );
    }
    Ok(())
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

async fn shutdown(ctx: &Ctx, password_stdin: bool) -> Result<()> {
    let (mut client, key, stored) = ctx.connect().await?;
    if stored.role < Role::Superuser {
        // The server decides; this only avoids asking for a password that cannot help.
        tracing::info!("stored role is {}; asking the server anyway", stored.role);
    }
    let password = read_password(
        password_stdin,
        &format!("Password for {}@{key} (to confirm shutdown): ", stored.user),
    )?;
    client.shutdown(&password).await?;
    ctx.status(format_args!("{key} is shutting down."));
    Ok(())
}

fn forget(ctx: &Ctx, server: &str) -> Result<()> {
    let key = ServerAddr::parse(server)?.to_string();
    let mut known = ctx.state.known_servers()?;
    let had_pin = known.remove(&key);
    if had_pin {
        ctx.state.save_known_servers(&known)?;
    }
    let mut sessions = ctx.state.sessions()?;
    let had_session = sessions.servers.remove(&key).is_some();
    let had_user = sessions.last_user.remove(&key).is_some();
    if sessions.current.as_deref() == Some(key.as_str()) {
        sessions.current = None;
    }
    if had_session || had_user {
        ctx.state.save_sessions(&sessions)?;
    }
    if !had_pin && !had_session {
        return Err(ClientError::Server {
            code: ErrorCode::NotFound,
            message: format!("{key} is not a known server"),
        });
    }
    ctx.status(format_args!("Forgot the key and session of {key}."));
    Ok(())
}

/// One line of `xfer shell`, parsed with the same machinery as the command line.
#[derive(Debug, Parser)]
#[command(
    about = "Commands of `xfer shell`, one per line",
    no_binary_name = true,
    disable_version_flag = true,
    name = "",
    override_usage = "COMMAND [ARGS]   (help for the list, quit to leave)"
)]
struct ShellLine {
    #[command(subcommand)]
    command: ShellCommand,
}

#[derive(Debug, Subcommand)]
enum ShellCommand {
    /// List a remote folder
    #[command(visible_alias = "ls")]
    List {
        /// Remote folder
        remote_dir: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Upload files (folders with -r)
    #[command(visible_alias = "put")]
    Upload(UploadArgs),
    /// Download files (folders with -r)
    #[command(visible_alias = "get")]
    Download(DownloadArgs),
    /// Delete remote files or empty folders
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Rename or move
    #[command(visible_alias = "mv")]
    Rename(RenameArgs),
    /// Create a folder and missing parents
    Mkdir(MkdirArgs),
    /// Who you are
    Whoami,
    /// Leave the shell
    #[command(visible_alias = "exit")]
    Quit,
}

/// Runs one shell line over the open connection; the error is already printed.
async fn shell_line(
    ctx: &Ctx,
    client: &mut Client,
    cmd: ShellCommand,
) -> std::result::Result<(), Reported> {
    let one = |r: Result<()>| r.map_err(|e| report(&e));
    match cmd {
        ShellCommand::List { remote_dir, json } => {
            let entries = client
                .list(remote_dir.as_deref().unwrap_or(""))
                .await
                .map_err(|e| report(&e))?;
            print_entries(&entries, ctx.json || json);
            Ok(())
        }
        ShellCommand::Upload(a) => BatchCommand::Upload(&a).run(ctx, client).await.finish(),
        ShellCommand::Download(a) => BatchCommand::Download(&a).run(ctx, client).await.finish(),
        ShellCommand::Delete(a) => BatchCommand::Delete(&a).run(ctx, client).await.finish(),
        ShellCommand::Rename(RenameArgs { from, to }) => one(client.rename(&from, &to).await),
        ShellCommand::Mkdir(MkdirArgs { remote_dir }) => one(client.mkdir(&remote_dir).await),
        ShellCommand::Whoami => {
            let info = client.whoami().await.map_err(|e| report(&e))?;
            println!(
                "{} ({}) on {}",
                printable(&info.user),
                info.role,
                client.server
            );
            Ok(())
        }
        ShellCommand::Quit => Ok(()),
    }
}

/// `xfer shell`: one connection, many commands. On a terminal it edits lines with history
/// ([`ShellInput`]); from a pipe it runs each line as a script would. The exit code is the
/// first failure's (0 if none).
async fn shell(ctx: &Ctx) -> std::result::Result<(), Reported> {
    let (mut client, key, _) = ctx.connect().await.map_err(|e| report(&e))?;
    let interactive = std::io::stdin().is_terminal();
    if interactive && !ctx.quiet {
        eprintln!("Connected to {key}. Type `help` for commands, `quit` to leave.");
    }
    let mut input = ShellInput::new(&ctx.state, interactive, shell_command_names());
    let mut first_failure: Option<u8> = None;
    loop {
        let line = match input.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                first_failure.get_or_insert(report(&e).0);
                break;
            }
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(words) = shlex::split(line) else {
            let Reported(code) = report(&ClientError::Usage(format!(
                "unbalanced quotes in `{line}`"
            )));
            first_failure.get_or_insert(code);
            continue;
        };
        let parsed = match ShellLine::try_parse_from(&words) {
            Ok(p) => p,
            Err(e) => {
                let help = matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp
                        | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                );
                let _ = e.print();
                if !help && words.first().map(String::as_str) != Some("help") {
                    first_failure.get_or_insert(2);
                }
                continue;
            }
        };
        if matches!(parsed.command, ShellCommand::Quit) {
            break;
        }
        if let Err(Reported(code)) = shell_line(ctx, &mut client, parsed.command).await {
            first_failure.get_or_insert(code);
            if client_is_gone(code) {
                break;
            }
        }
    }
    client.close().await;
    match first_failure {
        None => Ok(()),
        Some(code) => Err(Reported(code)),
    }
}

/// The shell's command names and aliases, for Tab completion; taken from the parser so the
/// two cannot drift apart.
fn shell_command_names() -> Vec<String> {
    use clap::CommandFactory;
    let mut parser = ShellLine::command();
    parser.build();
    let mut names: Vec<String> = parser
        .get_subcommands()
        .flat_map(|c| std::iter::once(c.get_name()).chain(c.get_visible_aliases()))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Exit codes after which the connection cannot carry more commands.
fn client_is_gone(code: u8) -> bool {
    code == 7 || code == 3
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The shell keeps its own, shorter help lines, so its commands are declared apart from the
    /// command line's (the arguments are shared); what a user types must still be the same.
    #[test]
    fn shell_commands_are_named_and_aliased_as_on_the_command_line() {
        let cli = super::Cli::command();
        let aliases = |c: &clap::Command| {
            c.get_visible_aliases()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        for shell in super::ShellLine::command().get_subcommands() {
            if shell.get_name() == "quit" {
                continue;
            }
            let line = cli
                .find_subcommand(shell.get_name())
                .unwrap_or_else(|| panic!("`{}` is no command of xfer", shell.get_name()));
            assert_eq!(aliases(shell), aliases(line), "{}", shell.get_name());
        }
    }

    #[test]
    fn tab_completion_offers_every_shell_command_and_alias() {
        assert_eq!(
            super::shell_command_names(),
            [
                "delete", "download", "exit", "get", "help", "list", "ls", "mkdir", "mv", "put",
                "quit", "rename", "rm", "upload", "whoami"
            ]
        );
    }
}
