//! Collecting every problem of a configuration file at once, for the site
//! daemon's config and the rendezvous' alike: one line per problem, naming
//! the file and the field at fault, so an operator fixes them all in one go.

use std::fmt;

/// Longest site or peer name.
pub const MAX_NAME_LEN: usize = 32;

/// Every problem found in a configuration, one line each, naming the file
/// and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    problems: Vec<String>,
}

impl ConfigErrors {
    /// The problems, one message each, in file order where possible.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// A single problem of the file `origin`.
    pub fn one(origin: &str, problem: impl fmt::Display) -> Self {
        Self {
            problems: vec![format!("{origin}: {problem}")],
        }
    }

    /// The TOML parser's error for `text` (the file `origin`), with its
    /// line and column.
    pub fn toml(origin: &str, text: &str, e: &toml::de::Error) -> Self {
        let message = e.message().trim().replace('\n', "; ");
        let problem = match e.span() {
            Some(span) => {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                format!("line {line}, column {column}: {message}")
            }
            None => message,
        };
        Self::one(origin, problem)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// The problems found so far in the file `origin`.
#[derive(Debug)]
pub struct Problems<'a> {
    origin: &'a str,
    lines: Vec<String>,
}

impl<'a> Problems<'a> {
    /// None yet.
    pub fn new(origin: &'a str) -> Self {
        Problems {
            origin,
            lines: Vec::new(),
        }
    }

    /// Records that `field` has `problem`.
    pub fn add(&mut self, field: impl fmt::Display, problem: impl fmt::Display) {
        self.lines
            .push(format!("{}: {field}: {problem}", self.origin));
    }

    /// How many problems were recorded.
    pub fn count(&self) -> usize {
        self.lines.len()
    }

    /// `Ok` when nothing was recorded, else all of it.
    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.lines.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors {
                problems: self.lines,
            })
        }
    }

    /// Checks a site or peer name: `[a-z0-9-]{1,32}`. Returns it when
    /// valid; records the problem and returns `None` otherwise.
    pub fn name(&mut self, field: impl fmt::Display, value: Option<String>) -> Option<String> {
        match value {
            None => self.add(
                field,
                "missing; give it a name of 1 to 32 characters from a-z, 0-9 and '-'",
            ),
            Some(name) if valid_name(&name) => return Some(name),
            Some(name) => self.add(
                field,
                format!(
                    "{name:?} is not a valid name; use 1 to 32 characters from a-z, 0-9 and '-'"
                ),
            ),
        }
        None
    }
}

/// Whether `name` is a valid site or peer name.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_kept_with_file_and_field() {
        let mut p = Problems::new("x.toml");
        assert_eq!(
            p.name("site.name", Some("ok-1".into())),
            Some("ok-1".into())
        );
        assert_eq!(p.name("site.name", Some("Not OK".into())), None);
        assert_eq!(p.name("peer[0]: name", None), None);
        assert_eq!(p.name("n", Some("a".repeat(MAX_NAME_LEN + 1))), None);
        assert_eq!(p.count(), 3);
        let errors = p.finish().unwrap_err();
        assert!(errors.problems()[0].starts_with("x.toml: site.name: \"Not OK\""));
        assert!(errors.problems()[1].starts_with("x.toml: peer[0]: name: missing"));
        assert!(Problems::new("y").finish().is_ok());
    }

    #[test]
    fn toml_errors_carry_line_and_column() {
        let text = "a = 1\nb = = 2\n";
        let e = toml::from_str::<toml::Value>(text).unwrap_err();
        let errors = ConfigErrors::toml("c.toml", text, &e);
        assert!(
            errors.problems()[0].starts_with("c.toml: line 2, column "),
            "{errors}"
        );
    }
}
