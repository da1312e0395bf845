//! `xfer shell`: one connection, many commands. Its grammar (the command line's commands that
//! make sense on an open connection, with shorter help), the loop that runs them, and in
//! [`input`] where the lines come from.

use std::io::IsTerminal;

use clap::{Parser, Subcommand};

use super::{DeleteArgs, DownloadArgs, MkdirArgs, RenameArgs, UploadArgs, print_entries};
use crate::conn::Client;
use crate::context::Ctx;
use crate::error::{ClientError, Reported, Result, printable, report};
use crate::transfer::BatchCommand;
use input::ShellInput;

mod input;

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
pub(super) async fn shell(ctx: &Ctx) -> std::result::Result<(), Reported> {
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
        let cli = crate::cli::Cli::command();
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
