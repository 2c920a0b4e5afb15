//! The command lines of `rootlesskit` ([`kit`]) and `rootlessctl` ([`ctl`]).
//!
//! Both binaries are thin: they parse flags, build a launcher configuration or an API client
//! and print results the way RootlessKit 1.1.0 prints them. [`kit::command`] and
//! [`ctl::command`] give the clap definitions, from which `cargo xtask docs` renders man pages
//! and shell completions.

pub mod kit;

pub mod ctl;

/// The text of `err` and its causes joined by `": "`, like anyhow's `{:#}`, but leaving out a
/// cause whose text its parent's message already ends with.
///
/// Library errors sometimes show their cause in their own message and also return it as
/// `source()`; printing the whole chain would then say the same thing twice.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {source}")]
    struct Repeats {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let inner = std::io::Error::other("inner");
        let err = anyhow::Error::new(Repeats { source: inner }).context("doing it");
        assert_eq!(error_text(&err), "doing it: outer: inner");
        let plain = anyhow::anyhow!("a").context("b");
        assert_eq!(error_text(&plain), "b: a");
    }
}
