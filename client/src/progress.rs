//! Transfer progress: a bar with bytes, percent, rate and time left on a terminal; nothing at
//! all when stderr is not a terminal or with `-q`, so pipes and logs get no redraws.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Decides whether bars are drawn, and makes them.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// True when bars are drawn.
    enabled: bool,
}

impl Progress {
    /// Bars on when stderr is a terminal and not quiet.
    pub fn new(quiet: bool) -> Self {
        Progress {
            enabled: !quiet && std::io::stderr().is_terminal(),
        }
    }

    /// Whether bars are drawn.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A bar for one file of `total` bytes (hidden when disabled).
    pub fn bar(&self, label: &str, total: u64) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:30!} {bytes:>10}/{total_bytes:<10} {percent:>3}% {binary_bytes_per_sec:>12} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(label.to_string());
        bar
    }
}
