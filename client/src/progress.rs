//! Transfer progress: a bar per file with bytes, percent, rate and time left, and an overall
//! bar (files done, bytes, rate, time left) when a command moves several files, drawn together
//! on a terminal; nothing at all when stderr is not a terminal or with `-q`, so pipes and logs
//! get no redraws.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Decides whether bars are drawn, and makes them.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Where bars are drawn; `None` when they are not.
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Bars on when stderr is a terminal and not quiet.
    pub fn new(quiet: bool) -> Self {
        let enabled = !quiet && std::io::stderr().is_terminal();
        Progress {
            multi: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// A bar for one file of `total` bytes (hidden when disabled).
    pub fn bar(&self, label: &str, total: u64) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = multi.add(ProgressBar::new(total));
        bar.set_style(style(
            "{msg:30!} {bytes:>10}/{total_bytes:<10} {percent:>3}% {binary_bytes_per_sec:>12} ETA {eta}",
        ));
        bar.set_message(label.to_string());
        bar
    }

    /// An overall bar for `files` files of `bytes` bytes in all (more may be added as sizes
    /// become known), shown only when there is more than one file.
    pub fn overall(&self, files: u64, bytes: u64) -> ProgressBar {
        match &self.multi {
            Some(multi) if files > 1 => {
                let bar = multi.insert(0, ProgressBar::new(bytes));
                bar.set_style(style(
                    "total: {msg:12} {bytes:>10}/{total_bytes:<10} {wide_bar} {binary_bytes_per_sec:>12} ETA {eta}",
                ));
                bar.set_message(format!("0/{files} files"));
                bar
            }
            _ => ProgressBar::hidden(),
        }
    }
}

/// The style drawn from `template`; a plain bar should the template ever fail to parse, since a
/// transfer must not fail over its decoration.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}
