//! Progress of the long commands (`backup`, `restore`, `store copy`) on stderr: a bar on a terminal,
//! otherwise a plain line every few seconds, so that a log file gets lines, not escapes.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain line is written.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Bytes,
    Records,
}

pub struct Progress {
    label: &'static str,
    unit: Unit,
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    said_at: Instant,
}

impl Progress {
    /// Progress in bytes out of `total` (0 while unknown).
    pub fn bytes(label: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label);
            bar
        });
        Progress {
            label,
            unit: Unit::Bytes,
            bar,
            total,
            done: 0,
            said_at: Instant::now(),
        }
    }

    /// Progress in records, their total unknown: a spinner and the count on a terminal.
    pub fn records(label: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) =
                ProgressStyle::with_template("{msg} {spinner} {human_pos} records ({per_sec})")
            {
                bar.set_style(style);
            }
            bar.set_message(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            label,
            unit: Unit::Records,
            bar,
            total: 0,
            done: 0,
            said_at: Instant::now(),
        }
    }

    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    pub fn update(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.said_at.elapsed() >= LINE_EVERY => {
                self.said_at = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    fn line(&self) -> String {
        if self.unit == Unit::Records {
            return format!("{}: {} records", self.label, self.done);
        }
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        if self.total > 0 {
            format!(
                "{}: {:.1} MiB of {:.1} MiB ({}%)",
                self.label,
                mib(self.done),
                mib(self.total),
                self.done.saturating_mul(100) / self.total
            )
        } else {
            format!("{}: {:.1} MiB", self.label, mib(self.done))
        }
    }

    /// Clears the bar (the caller says how it ended).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
