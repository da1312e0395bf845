//! The account commands: `login`, `logout`, `whoami`, `shutdown` and `forget`, the ones that
//! manage the session and the pin rather than files.

use std::io::{BufRead, IsTerminal, Write};

use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::{ErrorCode, Role};
use xfer_util::read_password;

use crate::addr::ServerAddr;
use crate::conn::{Client, connect_tls};
use crate::context::Ctx;
use crate::error::{ClientError, Result, printable};
use crate::keys::Credential;
use crate::state::StoredSession;

/// Asks on stderr and reads the answer from stdin; only `yes` or `y` is yes.
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

/// `xfer login`: check and pin the server's key (asking on first sight, as ssh does), then
/// trade the password for a session token stored in the state folder.
pub(super) async fn login(
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
            read_password(
                password_stdin,
                &format!("Password for {user}@{key}: "),
                false,
            )?
            .into(),
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

/// `xfer logout`: revoke the session on the server and forget it here (here even if the
/// server cannot be reached).
pub(super) async fn logout(ctx: &Ctx) -> Result<()> {
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

/// `xfer whoami`: the server's view of the current session.
pub(super) async fn whoami(ctx: &Ctx) -> Result<()> {
    let (mut client, key, _) = ctx.connect().await?;
    let account = client.account().await?;
    client.close().await;
    crate::usage::print_whoami(&account, &key, ctx.json);
    Ok(())
}

/// `xfer shutdown`: stop the daemon; the password is asked again so a stolen token cannot.
pub(super) async fn shutdown(ctx: &Ctx, password_stdin: bool) -> Result<()> {
    let (mut client, key, stored) = ctx.connect().await?;
    if stored.role < Role::Superuser {
        // The server decides; this only avoids asking for a password that cannot help.
        tracing::info!("stored role is {}; asking the server anyway", stored.role);
    }
    let password = read_password(
        password_stdin,
        &format!("Password for {}@{key} (to confirm shutdown): ", stored.user),
        false,
    )?;
    client.shutdown(&password).await?;
    ctx.status(format_args!("{key} is shutting down."));
    Ok(())
}

/// `xfer forget`: drop a server's pin and session, after a deliberate key change.
pub(super) fn forget(ctx: &Ctx, server: &str) -> Result<()> {
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
