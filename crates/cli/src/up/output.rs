//! Every process's lines on one terminal, each prefixed with who wrote it
//! (`todo.1 | …`) in a colour of its own; courier's own lines under
//! `courier`.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;

/// ANSI colours for prefixes, in turn: cyan, yellow, green, magenta, blue,
/// bright red.
const COLOURS: [&str; 6] = ["36", "33", "32", "35", "34", "91"];

/// Who writes the lines of `courier up` itself.
pub const SELF: &str = "courier";

#[derive(Clone)]
pub struct Output {
    shared: Arc<Shared>,
}

struct Shared {
    colour: bool,
    width: usize,
    lock: std::sync::Mutex<()>,
}

/// One writer's prefix, coloured once.
#[derive(Clone)]
pub struct Prefix {
    text: String,
    out: Output,
}

impl Output {
    /// `names`: every prefix that will write, so the bars line up.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Output {
        let width = names
            .into_iter()
            .map(str::len)
            .chain([SELF.len()])
            .max()
            .unwrap_or(0);
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Output {
            shared: Arc::new(Shared {
                colour,
                width,
                lock: std::sync::Mutex::new(()),
            }),
        }
    }

    /// The prefix for `name`, coloured by its position `index`.
    pub fn prefix(&self, name: &str, index: usize) -> Prefix {
        let padded = format!("{name:<width$} |", width = self.shared.width);
        let text = if self.shared.colour {
            format!("\x1b[{}m{padded}\x1b[0m", COLOURS[index % COLOURS.len()])
        } else {
            padded
        };
        Prefix {
            text,
            out: self.clone(),
        }
    }

    /// A line of courier's own.
    pub fn say(&self, line: &str) {
        let padded = format!("{SELF:<width$} |", width = self.shared.width);
        let prefix = if self.shared.colour {
            format!("\x1b[1m{padded}\x1b[0m")
        } else {
            padded
        };
        self.write(&prefix, line);
    }

    fn write(&self, prefix: &str, line: &str) {
        // One lock per line so lines of different processes never mix.
        let _guard = self.shared.lock.lock();
        let mut stdout = std::io::stdout().lock();
        // A closed stdout must not stop the supervisor.
        let _ = writeln!(stdout, "{prefix} {line}");
        let _ = stdout.flush();
    }
}

impl Prefix {
    pub fn line(&self, line: &str) {
        self.out.write(&self.text, line.trim_end_matches('\r'));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_line_up_and_are_plain_without_a_terminal() {
        let out = Output::new(["todo.1", "worker.12"]);
        // Under `cargo test` stdout is captured, not a terminal.
        assert_eq!(out.prefix("todo.1", 0).text, "todo.1    |");
        assert_eq!(out.prefix("worker.12", 3).text, "worker.12 |");
    }
}
