//! Where `xfer shell` gets its command lines. On a terminal: a line editor (rustyline) with
//! Tab completion and a history kept in `shell_history` in the state folder (0600, at most
//! [`HISTORY_LEN`] entries, lines typed with a leading space left out). From a pipe: plain
//! lines, no prompt, no history, exactly what a script expects.

use std::collections::VecDeque;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Behavior, CompletionType, Config, Context, Editor, Helper};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};

use crate::error::ClientError;
use crate::state::StateDir;

/// History file in the state folder.
pub(crate) const HISTORY_FILE: &str = "shell_history";
/// Most history entries kept, in memory and in the file.
pub(crate) const HISTORY_LEN: usize = 1000;
const PROMPT: &str = "xfer> ";

/// The source of the shell's lines.
pub(crate) struct ShellInput(Input);

enum Input {
    /// Lines from stdin as they come; `prompt` only when rustyline could not take the terminal.
    Plain {
        lines: Lines<BufReader<Stdin>>,
        prompt: bool,
    },
    /// `None` only while the editor is away on the blocking pool, or after it was lost there.
    Terminal(Option<Box<LineEditor>>),
}

impl ShellInput {
    /// A line editor when `interactive` (falling back to a bare prompt if the terminal cannot
    /// be driven), plain lines otherwise. `commands` are the names Tab completes.
    pub(crate) fn new(state: &StateDir, interactive: bool, commands: Vec<String>) -> ShellInput {
        if interactive {
            match LineEditor::new(&state.path().join(HISTORY_FILE), commands) {
                Ok(editor) => return ShellInput(Input::Terminal(Some(Box::new(editor)))),
                Err(e) => eprintln!("xfer: warning: no line editing on this terminal: {e}"),
            }
        }
        ShellInput(Input::Plain {
            lines: BufReader::new(tokio::io::stdin()).lines(),
            prompt: interactive,
        })
    }

    /// The next line, `None` at the end of input (Ctrl-D on a terminal).
    pub(crate) async fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        match &mut self.0 {
            Input::Plain { lines, prompt } => {
                if *prompt {
                    use std::io::Write;
                    eprint!("{PROMPT}");
                    let _ = std::io::stderr().flush();
                }
                lines
                    .next_line()
                    .await
                    .map_err(|e| ClientError::local("reading commands", e))
            }
            Input::Terminal(slot) => {
                let Some(mut editor) = slot.take() else {
                    return Ok(None);
                };
                // rustyline blocks. It is called only once the previous command has finished,
                // so the prompt never competes with progress bars, and off the runtime's only
                // thread so nothing async is starved while the user types.
                let (editor, line) = tokio::task::spawn_blocking(move || {
                    let line = editor.next_line();
                    (editor, line)
                })
                .await
                .map_err(|e| ClientError::local("reading commands", std::io::Error::other(e)))?;
                *slot = Some(editor);
                line
            }
        }
    }
}

/// rustyline with the shell's completion and a private history file.
struct LineEditor {
    editor: Editor<ShellHelper, DefaultHistory>,
    history: PathBuf,
    /// Lines of one accepted entry still to hand out: a paste of several commands arrives as
    /// one multi-line entry, and each line must run on its own, never as one run-on command.
    pending: VecDeque<String>,
    /// Whether the history file was already created private or made so.
    secured: bool,
    /// Whether a history warning was given: one is enough, not one per line.
    warned: bool,
}

impl LineEditor {
    fn new(history: &Path, commands: Vec<String>) -> Result<LineEditor, ReadlineError> {
        let config = Config::builder()
            .max_history_size(HISTORY_LEN)?
            .history_ignore_space(true)
            .history_ignore_dups(true)?
            .completion_type(CompletionType::List)
            // The prompt and the echo go to the terminal itself, as the prompt went to stderr
            // before: `xfer shell > listing` must capture listings, not keystrokes.
            .behavior(Behavior::PreferTerm)
            .build();
        let mut editor = Editor::with_config(config)?;
        editor.set_helper(Some(ShellHelper {
            commands,
            files: FilenameCompleter::new(),
        }));
        let mut warned = false;
        match editor.load_history(history) {
            Ok(()) => {}
            Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                eprintln!(
                    "xfer: warning: cannot read the history `{}`: {e}",
                    history.display()
                );
                warned = true;
            }
        }
        Ok(LineEditor {
            editor,
            history: history.to_path_buf(),
            pending: VecDeque::new(),
            secured: false,
            warned,
        })
    }

    /// Blocks for the next line; Ctrl-C drops the line being typed and prompts again, as bash
    /// does, and Ctrl-D on an empty line ends the input.
    fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Ok(Some(line));
            }
            match self.editor.readline(PROMPT) {
                Ok(entry) => {
                    for line in entry.lines() {
                        self.remember(line);
                        self.pending.push_back(line.to_string());
                    }
                }
                Err(ReadlineError::Interrupted) => {}
                Err(ReadlineError::Eof) => return Ok(None),
                Err(e) => {
                    return Err(ClientError::local(
                        "reading commands",
                        std::io::Error::other(e),
                    ));
                }
            }
        }
    }

    /// Adds `line` to the history and the file at once, so a session killed mid-transfer keeps
    /// what was typed. rustyline leaves out blank lines, repeats and lines starting with a
    /// space (the user's way to keep a line out of the file). A failure costs the history,
    /// never the session.
    fn remember(&mut self, line: &str) {
        if !matches!(self.editor.add_history_entry(line), Ok(true)) {
            return;
        }
        if let Err(e) = self.save() {
            if !self.warned {
                eprintln!(
                    "xfer: warning: cannot save the history `{}`: {e}",
                    self.history.display()
                );
                self.warned = true;
            }
        }
    }

    fn save(&mut self) -> std::io::Result<()> {
        if !self.secured {
            // Private from the first byte, whatever the library or an older file does: the
            // history is a record of what the user did and where.
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.history)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            self.secured = true;
        }
        self.editor
            .append_history(&self.history)
            .map_err(std::io::Error::other)
    }
}

/// Tab completion: command names first, then local paths where a command takes them.
struct ShellHelper {
    commands: Vec<String>,
    files: FilenameCompleter,
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        let words: Vec<&str> = head.split_whitespace().collect();
        let at_new_word = head.is_empty() || head.ends_with(char::is_whitespace);
        if words.is_empty() || (words.len() == 1 && !at_new_word) {
            let word = words.first().copied().unwrap_or("");
            let names = self
                .commands
                .iter()
                .filter(|c| c.starts_with(word))
                .map(|c| Pair {
                    display: c.clone(),
                    replacement: format!("{c} "),
                })
                .collect();
            return Ok((pos - word.len(), names));
        }
        let previous = if at_new_word {
            words.last()
        } else {
            words.get(words.len() - 2)
        };
        let after_to = previous == Some(&"--to");
        // Local paths: what upload sends, and where download puts things; the rest is remote.
        let local = match words[0] {
            "upload" | "put" => !after_to,
            "download" | "get" => after_to,
            _ => false,
        };
        if local {
            self.files.complete(line, pos, ctx)
        } else {
            Ok((pos, Vec::new()))
        }
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

#[cfg(test)]
mod tests {
    use rustyline::history::History;

    use super::*;

    fn helper() -> ShellHelper {
        ShellHelper {
            commands: ["list", "ls", "mkdir", "upload", "put", "quit"]
                .map(String::from)
                .to_vec(),
            files: FilenameCompleter::new(),
        }
    }

    fn complete(h: &ShellHelper, line: &str) -> (usize, Vec<String>) {
        let history = DefaultHistory::new();
        let (start, found) = h
            .complete(line, line.len(), &Context::new(&history))
            .unwrap();
        (start, found.into_iter().map(|p| p.replacement).collect())
    }

    #[test]
    fn command_names_complete_at_the_start_only() {
        let h = helper();
        assert_eq!(complete(&h, "l"), (0, vec!["list ".into(), "ls ".into()]));
        assert_eq!(complete(&h, "  mk"), (2, vec!["mkdir ".into()]));
        assert_eq!(complete(&h, "").1.len(), 6);
        assert_eq!(complete(&h, "ls l"), (4, vec![]));
    }

    #[test]
    fn local_paths_complete_for_upload_and_download_to_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("report.txt"), b"x").unwrap();
        let h = helper();
        let stem = format!("{}/rep", dir.path().display());
        let found = |line: &str| {
            complete(&h, line)
                .1
                .iter()
                .any(|r| r.ends_with("report.txt"))
        };
        assert!(found(&format!("upload {stem}")));
        assert!(found(&format!("put -r {stem}")));
        assert!(!found(&format!("upload a --to {stem}")));
        assert!(found(&format!("get a --to {stem}")));
        assert!(!found(&format!("get {stem}")));
        assert!(!found(&format!("ls {stem}")));
    }

    #[test]
    fn history_is_private_capped_and_skips_lines_with_a_leading_space() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let mut ed = LineEditor::new(&path, Vec::new()).unwrap();
        ed.remember("whoami");
        ed.remember(" upload secret-plans.txt");
        ed.remember("whoami");
        assert!(!ed.warned);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("whoami").count(), 1, "{text}");
        assert!(!text.contains("secret"), "{text}");
        // A fresh editor reads it back; the cap holds across sessions.
        let mut ed = LineEditor::new(&path, Vec::new()).unwrap();
        assert_eq!(ed.editor.history().len(), 1);
        for i in 0..HISTORY_LEN + 5 {
            ed.remember(&format!("ls {i}"));
        }
        let ed = LineEditor::new(&path, Vec::new()).unwrap();
        assert_eq!(ed.editor.history().len(), HISTORY_LEN);
        assert!(!ed.warned);
    }
}
