//! The `xferd` command line: parsing, logging setup, and each subcommand.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use xfer_proto::Role;
use xfer_util::read_password;

use crate::accounts::{QuotaSetting, UsersFile};
use crate::config::{Config, DEFAULT_CONFIG_PATH, StorageKind};
use crate::init::{InitOptions, init};
use crate::shared::SharedStore;
use crate::shared::sessions::SharedRegistry;
use crate::shared::users::{UsersObject, UsersRead};

/// xferd: the xfer file-transfer daemon.
#[derive(Debug, Parser)]
#[command(name = "xferd", version, about, long_about = None)]
pub struct Cli {
    /// Config file [default: $XFERD_CONFIG, else /etc/xferd/xferd.toml]
    #[arg(long, global = true, value_name = "FILE", env = "XFERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format for `serve`: readable text, or one JSON object per line for machines
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

pub use crate::logging::LogFormat;

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented config, an empty users file, the storage root and a new key and
    /// self-signed certificate; print the fingerprint clients pin.
    Init {
        /// Address and port to listen on [default: 127.0.0.1:7443]
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Storage root [default: storage, next to the config]
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// State folder for sessions [default: state, next to the config]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Name to put in the certificate (repeatable); localhost, 127.0.0.1 and ::1 are always in
        #[arg(long = "hostname", value_name = "NAME")]
        hostnames: Vec<String>,
        /// Replace an existing config and key
        #[arg(long)]
        force: bool,
    },
    /// Run the daemon in the foreground, logging to stderr.
    Serve {
        /// Listen here instead of the config's address
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
    },
    /// First run in one command: init in ./xferd-data if needed, create the superuser `admin`
    /// with a random password shown once, print how to log in, and serve.
    Quickstart {
        /// Listen here instead of the config's address
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
    },
    /// Manage accounts in the users file.
    #[command(subcommand)]
    User(UserCommand),
    /// List or revoke session tokens (takes effect on the running daemon at once).
    #[command(subcommand)]
    Session(SessionCommand),
    /// Print the fingerprint clients pin (`xfer login --fingerprint`).
    Fingerprint,
    /// Validate config, users file and certificate.
    Check,
    /// Print a shell completion script.
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `xferd man > /usr/local/share/man/man8/xferd.8`.
    Man,
}

/// `xferd user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add an account (only an argon2id hash of the password is stored).
    Add {
        /// Account name
        name: String,
        /// Role
        #[arg(long, default_value = "user", value_parser = parse_role)]
        role: Role,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a password; the account's sessions are revoked.
    Passwd {
        /// Account name
        name: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a role; the account's sessions are revoked.
    Role {
        /// Account name
        name: String,
        /// New role
        #[arg(value_parser = parse_role)]
        role: Role,
    },
    /// Delete an account (its files stay on disk).
    Del {
        /// Account name
        name: String,
    },
    /// List accounts, roles, usage and quotas.
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Set an account's quotas (sessions stay; uploads over the new quota are refused, and
    /// running ones stop).
    #[command(arg_required_else_help = true)]
    Quota {
        /// Account name
        name: String,
        /// Bytes the account may store: a size like 10GiB, 500MB or 1048576; `none` for no
        /// limit; `default` for the config's `[quota] default_bytes`
        #[arg(long, value_name = "SIZE|none|default", value_parser = parse_quota_bytes)]
        bytes: Option<QuotaArg>,
        /// Files the account may store; `none` for no limit; `default` for the config's
        /// `[quota] default_files`
        #[arg(long, value_name = "N|none|default", value_parser = parse_quota_files)]
        files: Option<QuotaArg>,
    },
    /// Show an account's usage and quotas.
    Usage {
        /// Account name
        name: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Count the account's files again (local storage: the running daemon takes the new
        /// count at its next look)
        #[arg(long)]
        rescan: bool,
    },
    /// Manage an account's login keys (`xfer login --key`).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Put the accounts of a local users file into the object store (`[storage] kind =
    /// "s3"`), once, when moving to several nodes.
    Import {
        /// The users file to copy
        file: PathBuf,
        /// Replace the accounts the store holds already
        #[arg(long)]
        replace: bool,
    },
}

/// `xferd user key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Let a public key log in as an account: an OpenSSH `ssh-ed25519 AAAA... comment` line
    /// (from `xfer keygen` or `ssh-keygen -t ed25519`).
    #[command(group = clap::ArgGroup::new("source").required(true))]
    Add {
        /// Account name
        name: String,
        /// The public key line (quoted, or as separate words)
        #[arg(group = "source", num_args = 1.., value_name = "PUBKEY")]
        pubkey: Vec<String>,
        /// Read the public key line from this file (e.g. id_ed25519.pub)
        #[arg(long, group = "source", value_name = "F")]
        file: Option<PathBuf>,
    },
    /// List an account's login keys: ID (SHA-256 fingerprint), comment, when added.
    List {
        /// Account name
        name: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove a login key; the account's sessions are revoked.
    Del {
        /// Account name
        name: String,
        /// The key's ID as `key list` shows it (SHA256:..., the prefix optional)
        id: String,
    },
}

/// `xferd session ...`
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// List live sessions and tokens: id, user, source, created, expires, kind (login or
    /// token) and a token's name and scope.
    List {
        /// Only this user's sessions
        #[arg(long)]
        user: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Revoke sessions and tokens by id (as `session list` shows it), by user, or all.
    Revoke {
        /// Session ids (at least 6 characters of one)
        ids: Vec<String>,
        /// Every session of this user
        #[arg(long)]
        user: Option<String>,
        /// Every session
        #[arg(long, conflicts_with_all = ["ids", "user"])]
        all: bool,
    },
    /// Make a key of its own to sign session tokens in s3 mode (`session_key_file`, 32
    /// random bytes, mode 0600) instead of one derived from the TLS key; copy the same file
    /// to every node.
    Keygen {
        /// Replace an existing key (every token signed with it stops working)
        #[arg(long)]
        force: bool,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// A quota as `xferd user quota` takes it: a setting, or back to the config's default.
#[derive(Debug, Clone, Copy)]
pub struct QuotaArg(Option<QuotaSetting>);

/// `--bytes` of `xferd user quota`.
fn parse_quota_bytes(s: &str) -> Result<QuotaArg, String> {
    match s {
        "none" => Ok(QuotaArg(Some(QuotaSetting::Unlimited))),
        "default" => Ok(QuotaArg(None)),
        size => size
            .parse::<bytesize::ByteSize>()
            .map(|b| QuotaArg(Some(QuotaSetting::Limit(b.0))))
            .map_err(|_| {
                format!(
                    "`{size}` is not a size (like 10GiB, 500MB or 1048576), `none` or `default`"
                )
            }),
    }
}

/// `--files` of `xferd user quota`.
fn parse_quota_files(s: &str) -> Result<QuotaArg, String> {
    match s {
        "none" => Ok(QuotaArg(Some(QuotaSetting::Unlimited))),
        "default" => Ok(QuotaArg(None)),
        n => n
            .parse::<u64>()
            .map(|n| QuotaArg(Some(QuotaSetting::Limit(n))))
            .map_err(|_| format!("`{n}` is not a number of files, `none` or `default`")),
    }
}

/// Parses arguments and runs; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every transfer holds one blocking thread for its file I/O, and admission lets up to
    // `max_sessions` (1024 by default) sessions transfer at once: tokio's default of 512 would
    // make the excess wait for a thread until their I/O deadline. Idle threads exit after 10 s.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(4096)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xferd: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xferd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_path(cli: &Option<PathBuf>) -> PathBuf {
    cli.clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// Sets up tracing to stderr (see [`crate::logging`]: client-supplied text is made safe there).
pub fn init_logging(format: LogFormat) {
    crate::logging::init(format);
}

fn load_users_or_empty(path: &Path) -> anyhow::Result<UsersFile> {
    if path.exists() {
        Ok(UsersFile::load(path)?)
    } else {
        Ok(UsersFile::default())
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            listen,
            root,
            state_dir,
            hostnames,
            force,
        } => {
            let config = config_path(&cli.config);
            let report = init(&InitOptions {
                config: config.clone(),
                listen,
                root,
                state_dir,
                hostnames,
                force,
            })?;
            println!("wrote {}", report.config.display());
            println!("fingerprint: {}", report.fingerprint);
            println!(
                "next: xferd --config {} user add NAME --role superuser",
                config.display()
            );
            Ok(())
        }
        Command::Serve { listen } => serve(&config_path(&cli.config), listen, cli.log_format).await,
        Command::Quickstart { listen } => {
            let config = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("xferd-data/xferd.toml"));
            quickstart(&config, listen, cli.log_format).await
        }
        Command::User(cmd) => user_command(&config_path(&cli.config), cmd).await,
        Command::Session(cmd) => session_command(&config_path(&cli.config), cmd).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "xferd", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .section("8")
                .render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Fingerprint => {
            let config = Config::load(&config_path(&cli.config))?;
            println!("{}", crate::tls::fingerprint_of(&config.cert)?);
            Ok(())
        }
        Command::Check => {
            let path = config_path(&cli.config);
            let config = Config::load(&path)?;
            for warning in &config.warnings {
                eprintln!("xferd: warning: {warning}");
            }
            let (_, fp) = crate::tls::server_config(&config.cert, &config.key)?;
            let (users, sessions) = if config.storage.kind == StorageKind::S3 {
                crate::shared::token::SessionKey::for_daemon(
                    &config.session_key_file,
                    &config.key,
                )?;
                let store = SharedStore::from_config(&config)?;
                let users = match UsersObject::new(store.clone()).read(None).await? {
                    UsersRead::Found(users, _) => users,
                    _ => return Err(crate::accounts::AccountError::NoUsersInStore.into()),
                };
                let sessions = SharedRegistry::new(store, &config.sessions)
                    .list()
                    .await?
                    .len();
                (users, sessions)
            } else {
                let users = UsersFile::load(&config.users_file)?;
                if config.root.exists() && !config.root.is_dir() {
                    bail!("storage root `{}` is not a folder", config.root.display());
                }
                let sessions = crate::sessions::check_file(&config.state_dir)
                    .with_context(|| format!("sessions in `{}`", config.state_dir.display()))?;
                (users, sessions)
            };
            if let Some(parent) = config.audit_log.parent()
                && parent != config.state_dir
                && !parent.is_dir()
            {
                bail!(
                    "audit log `{}`: folder `{}` does not exist",
                    config.audit_log.display(),
                    parent.display()
                );
            }
            println!(
                "ok: {} ({} users, {} sessions, listen {}, fingerprint {})",
                path.display(),
                users.users.len(),
                sessions,
                config.listen,
                fp
            );
            Ok(())
        }
    }
}

/// Where `xferd session ...` and `xferd user ...` find sessions: the local journal, or the
/// registry in the object store (s3 mode; the token key is not needed for it).
enum SessionAdmin {
    /// The journal in `state_dir`.
    Local(crate::sessions::SessionStore),
    /// The registry and revocations in the object store.
    Shared(SharedRegistry),
}

impl SessionAdmin {
    fn open(config: &Config) -> anyhow::Result<SessionAdmin> {
        if config.storage.kind == StorageKind::S3 {
            let store = SharedStore::from_config(config)?;
            return Ok(SessionAdmin::Shared(SharedRegistry::new(
                store,
                &config.sessions,
            )));
        }
        crate::sessions::SessionStore::open(&config.state_dir, &config.sessions)
            .map(SessionAdmin::Local)
            .with_context(|| format!("opening sessions in `{}`", config.state_dir.display()))
    }

    /// Where the sessions are, for messages.
    fn place(config: &Config) -> String {
        if config.storage.kind == StorageKind::S3 {
            "the object store".into()
        } else {
            format!("`{}`", config.state_dir.display())
        }
    }

    async fn revoke_matching(
        &self,
        id_prefix: Option<&str>,
        user: Option<&str>,
    ) -> anyhow::Result<usize> {
        Ok(match self {
            SessionAdmin::Local(s) => s.revoke_matching(id_prefix, user).await?,
            SessionAdmin::Shared(r) => r.revoke_matching(id_prefix, user).await?.len(),
        })
    }

    async fn list(&self) -> anyhow::Result<Vec<(String, crate::sessions::SessionRecord)>> {
        Ok(match self {
            SessionAdmin::Local(s) => s.list().await?,
            SessionAdmin::Shared(r) => r.list().await?,
        })
    }
}

/// Revokes every stored session of `name` after a change to the account, so that they are gone
/// from `xferd session list` and from every daemon sharing the sessions at once, not only
/// refused. The account change itself already stands, so a failure here is reported with
/// what to do rather than undoing it.
async fn revoke_sessions_of(config: &Config, name: &str, why: &str) -> anyhow::Result<usize> {
    let result = match SessionAdmin::open(config) {
        Ok(admin) => admin.revoke_matching(None, Some(name)).await,
        Err(e) => Err(e),
    };
    result.with_context(|| {
        format!(
            "{why}, but revoking the sessions of `{name}` in {} failed (they are refused \
             anyway); run `xferd session revoke --user {name}` as the daemon's user",
            SessionAdmin::place(config)
        )
    })
}

/// [`revoke_sessions_of`] where the sessions are refused anyway because the account's
/// generation moved on (or is new): a failure is a warning, not a failed command.
async fn revoke_sessions_or_warn(config: &Config, name: &str, why: &str) {
    if let Err(e) = revoke_sessions_of(config, name, why).await {
        eprintln!("xferd: warning: {e:#}");
    }
}

/// The accounts as `xferd user` edits them: the local users file, or the users object in the
/// object store (s3 mode).
enum UsersAdmin {
    /// The users file.
    Local(PathBuf),
    /// The users object.
    Shared(UsersObject),
}

impl UsersAdmin {
    fn open(config: &Config) -> anyhow::Result<UsersAdmin> {
        if config.storage.kind == StorageKind::S3 {
            return Ok(UsersAdmin::Shared(UsersObject::new(
                SharedStore::from_config(config)?,
            )));
        }
        Ok(UsersAdmin::Local(config.users_file.clone()))
    }

    /// The accounts as they are now.
    async fn read(&self) -> anyhow::Result<UsersFile> {
        match self {
            UsersAdmin::Local(path) => load_users_or_empty(path),
            UsersAdmin::Shared(object) => Ok(match object.read(None).await? {
                UsersRead::Found(users, _) => users,
                _ => UsersFile::default(),
            }),
        }
    }

    /// Reads, changes and writes back the accounts (in the store: again if another writer
    /// came in between).
    async fn edit<T>(
        &self,
        mut change: impl FnMut(&mut UsersFile) -> Result<T, crate::accounts::AccountError>,
    ) -> anyhow::Result<T> {
        match self {
            UsersAdmin::Local(path) => {
                let mut users = load_users_or_empty(path)?;
                let out = change(&mut users)?;
                users.save(path)?;
                Ok(out)
            }
            UsersAdmin::Shared(object) => Ok(object.edit(change).await?),
        }
    }
}

async fn user_command(config_path: &Path, cmd: UserCommand) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let admin = UsersAdmin::open(&config)?;
    match cmd {
        UserCommand::Add {
            name,
            role,
            password_stdin,
        } => {
            // Checked before the prompt (`add` checks again), so a bad or taken name fails
            // before anyone types a password twice.
            crate::accounts::validate_name(&name)?;
            if admin.read().await?.users.contains_key(&name) {
                bail!(
                    "user `{name}` already exists; use `xferd user passwd {name}` to change the password"
                );
            }
            let pw = read_password(password_stdin, &format!("Password for {name}: "), true)?;
            admin.edit(|users| users.add(&name, role, &pw)).await?;
            // Sessions left from an earlier account of this name (one removed by editing the
            // users file) would be refused anyway, since generations never repeat; they go.
            revoke_sessions_or_warn(&config, &name, &format!("added {role} `{name}`")).await;
            println!("added {role} `{name}`");
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            // Before the prompt too, for the same reason.
            if !admin.read().await?.users.contains_key(&name) {
                return Err(crate::accounts::AccountError::NoSuchUser(name).into());
            }
            let pw = read_password(password_stdin, &format!("New password for {name}: "), true)?;
            admin.edit(|users| users.set_password(&name, &pw)).await?;
            revoke_sessions_or_warn(&config, &name, &format!("changed the password of `{name}`"))
                .await;
            println!("password changed for `{name}`; their sessions are revoked");
        }
        UserCommand::Role { name, role } => {
            admin.edit(|users| users.set_role(&name, role)).await?;
            revoke_sessions_or_warn(&config, &name, &format!("made `{name}` {role}")).await;
            println!("`{name}` is now {role}; their sessions are revoked");
        }
        UserCommand::Del { name } => {
            admin.edit(|users| users.remove(&name)).await?;
            // Here the command fails if they cannot be revoked: sessions die with the account.
            let n = revoke_sessions_of(&config, &name, &format!("deleted `{name}`")).await?;
            println!("deleted `{name}` and revoked {n} session(s) (their files stay in storage)");
        }
        UserCommand::List { json } => {
            let users = admin.read().await?;
            let mut list = Vec::new();
            for (name, rec) in &users.users {
                let used = crate::quota::admin_usage(&config, &users, name, false).await?;
                list.push((name, rec, used));
            }
            if json {
                let list: Vec<_> = list
                    .iter()
                    .map(|(n, r, used)| {
                        let mut v = used.to_json(n);
                        v["role"] = serde_json::json!(r.role);
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for (name, rec, used) in &list {
                    println!("{name}\t{}\t{}", rec.role, used.text());
                }
            }
        }
        UserCommand::Quota { name, bytes, files } => {
            admin
                .edit(|users| users.set_quota(&name, bytes.map(|q| q.0), files.map(|q| q.0)))
                .await?;
            let users = admin.read().await?;
            let used = crate::quota::admin_usage(&config, &users, &name, false).await?;
            println!("`{name}`: {}", used.text());
        }
        UserCommand::Usage { name, json, rescan } => {
            let users = admin.read().await?;
            if !users.users.contains_key(&name) {
                return Err(crate::accounts::AccountError::NoSuchUser(name).into());
            }
            let used = crate::quota::admin_usage(&config, &users, &name, rescan).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&used.to_json(&name))?);
            } else {
                println!("{name}: {}", used.text());
            }
        }
        UserCommand::Key(cmd) => key_command(&config, &admin, cmd).await?,
        UserCommand::Import { file, replace } => {
            let UsersAdmin::Shared(object) = &admin else {
                bail!(
                    "`xferd user import` puts a users file into the object store; `{}` uses local storage, whose users file is `{}`",
                    config.path.display(),
                    config.users_file.display()
                );
            };
            let users = UsersFile::load(&file)?;
            let n = object.import(&users, replace).await?;
            println!(
                "imported {n} account(s) from `{}` into the object store",
                file.display()
            );
        }
    }
    Ok(())
}

/// The one public key line of `file` (blank lines and `#` comments aside).
fn key_line_of(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the public key `{}`", file.display()))?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    match (lines.next(), lines.next()) {
        (Some(line), None) => Ok(line.to_string()),
        (None, _) => bail!("`{}` holds no public key", file.display()),
        (Some(_), Some(_)) => bail!(
            "`{}` holds more than one key; add them one at a time",
            file.display()
        ),
    }
}

async fn key_command(config: &Config, admin: &UsersAdmin, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Add { name, pubkey, file } => {
            let line = match file {
                Some(f) => key_line_of(&f)?,
                None => pubkey.join(" "),
            };
            let id = admin.edit(|users| users.add_key(&name, &line)).await?;
            println!("added key {id} to `{name}`");
        }
        KeyCommand::List { name, json } => {
            let users = admin.read().await?;
            let rec = users
                .users
                .get(&name)
                .ok_or_else(|| crate::accounts::AccountError::NoSuchUser(name.clone()))?;
            let time = |secs: i64| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64),
                )
                .to_string()
            };
            let keys: Vec<_> = rec
                .keys
                .iter()
                .filter_map(|k| Some((crate::keys::LoginKey::parse(&k.key).ok()?, k)))
                .collect();
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|(key, rec)| {
                        serde_json::json!({"id": key.id(), "type": key.public.algorithm().as_str(),
                            "comment": key.public.comment(), "added": time(rec.added), "key": rec.key})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for (key, rec) in &keys {
                    println!(
                        "{}\t{}\t{}\tadded {}",
                        key.id(),
                        key.public.algorithm().as_str(),
                        key.public.comment(),
                        time(rec.added)
                    );
                }
            }
        }
        KeyCommand::Del { name, id } => {
            admin.edit(|users| users.remove_key(&name, &id)).await?;
            revoke_sessions_or_warn(config, &name, &format!("deleted key {id} of `{name}`")).await;
            println!("deleted key {id} of `{name}`; their sessions are revoked");
        }
    }
    Ok(())
}

async fn session_command(config: &Path, cmd: SessionCommand) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    if let SessionCommand::Keygen { force } = cmd {
        crate::shared::token::SessionKey::generate(&config.session_key_file, force)?;
        println!(
            "wrote {}; copy it (mode 0600) to every node that shares this object store, then restart them: tokens signed before stop working",
            config.session_key_file.display()
        );
        return Ok(());
    }
    let store = SessionAdmin::open(&config)?;
    let time = xfer_util::format_time;
    match cmd {
        SessionCommand::List { user, json } => {
            let list: Vec<_> = store
                .list()
                .await?
                .into_iter()
                .filter(|(_, s)| user.as_deref().is_none_or(|u| s.user == u))
                .collect();
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|(id, s)| {
                        let mut v = serde_json::json!({"id": id, "user": s.user,
                            "source": s.source, "created": time(s.created),
                            "expires": time(s.expires), "kind": s.kind()});
                        if let Some(t) = &s.token {
                            v["name"] = t.name.clone().into();
                            v["read_only"] = t.read_only.into();
                            v["path"] = t.path.clone().into();
                        }
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (id, s) in &list {
                    // A token's name has no control characters (checked at creation).
                    let scope = s.token.as_ref().map_or(String::new(), |t| {
                        format!(
                            " name={} {} path={}",
                            if t.name.is_empty() { "-" } else { &t.name },
                            if t.read_only {
                                "read-only"
                            } else {
                                "read-write"
                            },
                            if t.path.is_empty() { "/" } else { &t.path }
                        )
                    });
                    println!(
                        "{id}\t{}\t{}\tcreated {}\texpires {}\t{}{scope}",
                        s.user,
                        s.source,
                        time(s.created),
                        time(s.expires),
                        s.kind()
                    );
                }
            }
        }
        SessionCommand::Revoke { ids, user, all } => {
            if ids.is_empty() && user.is_none() && !all {
                bail!("name sessions to revoke: IDs, --user NAME or --all");
            }
            let mut n = 0;
            let place = SessionAdmin::place(&config);
            let revoke = async |id: Option<&str>, user: Option<&str>| {
                store
                    .revoke_matching(id, user)
                    .await
                    .with_context(|| format!("recording revocations in {place}"))
            };
            if all {
                n += revoke(Some(""), None).await?;
            }
            for id in &ids {
                if id.len() < 6 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                    bail!(
                        "`{id}` is not a session id (6 or more hex digits from `xferd session list`)"
                    );
                }
                let k = revoke(Some(&id.to_ascii_lowercase()), None).await?;
                if k == 0 {
                    bail!("no session with id `{id}`");
                }
                n += k;
            }
            if let Some(u) = &user {
                n += revoke(None, Some(u)).await?;
            }
            println!("revoked {n} session(s)");
        }
        SessionCommand::Keygen { .. } => {}
    }
    Ok(())
}

async fn serve(
    config_path: &Path,
    listen: Option<String>,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    init_logging(log_format);
    let mut config = Config::load(config_path)?;
    if let Some(l) = listen {
        config.listen = l
            .parse()
            .with_context(|| format!("--listen `{l}` is not an ADDRESS:PORT"))?;
    }
    let addr = config.listen;
    let daemon = crate::server::Daemon::load(config).await?;
    daemon.check_storage().await?;
    let listener = crate::server::bind(addr).await?;
    let state = daemon.state().clone();
    spawn_signal_tasks(state.clone());
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    };
    daemon.run(listener, shutdown).await
}

fn spawn_signal_tasks(state: std::sync::Arc<crate::state::State>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut stop = state.shutdown_rx();
    tokio::spawn(async move {
        let _ = stop.wait_for(|v| *v).await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    });
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            // systemd (Type=notify-reload) wants RELOADING=1 with the monotonic time.
            let mut states = vec![sd_notify::NotifyState::Reloading];
            if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                states.push(now);
            }
            let _ = sd_notify::notify(false, &states);
            if let Err(e) = state.reload() {
                tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the previous limits, users and certificate");
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
    });
}

async fn quickstart(
    config_path: &Path,
    listen: Option<String>,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let mut fresh = false;
    if !config_path.exists() {
        let report = init(&InitOptions {
            config: config_path.to_path_buf(),
            listen: listen.clone(),
            ..Default::default()
        })?;
        println!("Created {} and a new certificate.", report.config.display());
        fresh = true;
    }
    let config = Config::load(config_path)?;
    let mut users = load_users_or_empty(&config.users_file)?;
    let mut password = None;
    if users.users.is_empty() {
        let pw = crate::init::random_password();
        users.add("admin", Role::Superuser, &pw)?;
        users.save(&config.users_file)?;
        password = Some(pw);
    }
    let fp = crate::tls::fingerprint_of(&config.cert)?;
    let addr = listen.clone().unwrap_or_else(|| config.listen.to_string());
    let connect = addr
        .replace("0.0.0.0", "127.0.0.1")
        .replace("[::]", "[::1]");
    println!();
    if let Some(pw) = &password {
        println!("Created superuser `admin`. Its password is shown only this once:");
        println!();
        println!("    {pw}");
        println!();
        println!(
            "Change it any time with: xferd --config {} user passwd admin",
            config_path.display()
        );
    } else if !fresh {
        println!(
            "Using existing {} ({} accounts).",
            config_path.display(),
            users.users.len()
        );
    }
    // The quickstart's own superuser if it is there, else any account.
    let user = match users.users.keys().next() {
        Some(other) if !users.users.contains_key("admin") => other.as_str(),
        _ => "admin",
    };
    println!("Log in from another terminal with:");
    println!();
    println!("    xfer login {user}@{connect} --fingerprint {fp}");
    println!();
    println!("or, from this checkout without installing:");
    println!();
    println!("    cargo run --release --bin xfer -- login {user}@{connect} --fingerprint {fp}");
    println!();
    println!("Ctrl-C (or `xfer shutdown` as {user}) stops the daemon.");
    println!();
    serve(config_path, listen, log_format).await
}
