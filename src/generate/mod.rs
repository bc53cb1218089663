//! Writing replies: a small [`Generator`] trait (a stream of text deltas, or
//! the whole reply) and its mistral.rs implementation ([`mistral`]), plus the
//! prompt templates the replies are built from ([`prompt`]).
//!
//! This is the only module that touches mistral.rs.

pub mod mistral;
pub mod prompt;

use std::time::Instant;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the generator from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("the generator is busy ({0} replies in progress); retry shortly")]
    Overloaded(usize),
    #[error("the reply missed its deadline")]
    DeadlineExceeded,
    #[error("the generator failed: {0}")]
    Failed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("prompt template {file}: {reason}")]
    Template { file: String, reason: String },
}

/// Who said a message in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// How to sample. `temperature` 0 is greedy, which is repeatable.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: u32,
    /// Generation stops before any of these; they never reach the reply.
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens: 160,
            stop: Vec::new(),
        }
    }
}

/// One reply to write.
#[derive(Debug, Clone)]
pub struct Request {
    pub messages: Vec<Message>,
    pub sampling: Sampling,
    /// When the reply must be finished; past it the stream ends with
    /// `Error::DeadlineExceeded` and generation stops.
    pub deadline: Instant,
}

/// Token counts and speeds of a finished reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens processed per second (prefill).
    pub prompt_tokens_per_second: f64,
    /// Tokens generated per second (decode).
    pub completion_tokens_per_second: f64,
    /// Why generation ended: "stop", "length", "stop_string", ...
    pub finish_reason: String,
}

/// What a reply stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next piece of the reply.
    Delta(String),
    /// The reply is complete.
    Done(Usage),
}

/// Receives a reply as it is generated. Dropping it stops generation.
pub type ReplyStream = mpsc::Receiver<Result<Event, Error>>;

/// Anything that can write a reply: mistral.rs in-process here, an
/// OpenAI-compatible server later.
#[async_trait]
pub trait Generator: Send + Sync {
    /// Starts a reply; fails at once with `Overloaded` when too many are in
    /// progress.
    async fn stream(&self, request: Request) -> Result<ReplyStream, Error>;

    /// Where the model runs, e.g. "cpu" or "cuda:0", for logs and health.
    fn device(&self) -> String;

    /// The whole reply: the stream's deltas joined.
    async fn generate(&self, request: Request) -> Result<(String, Usage), Error> {
        let mut stream = self.stream(request).await?;
        collect(&mut stream).await
    }
}

/// Joins a stream's deltas into the whole reply.
pub async fn collect(stream: &mut ReplyStream) -> Result<(String, Usage), Error> {
    let mut text = String::new();
    while let Some(event) = stream.recv().await {
        match event? {
            Event::Delta(d) => text.push_str(&d),
            Event::Done(usage) => return Ok((text, usage)),
        }
    }
    Err(Error::Failed(
        "the reply stream ended without finishing".into(),
    ))
}

/// Cuts stop strings out of a stream of deltas. Text that could be the start
/// of a stop string is held back until it is clear; once a stop string
/// appears, everything from it on is dropped.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds a delta; returns the text that is safe to emit now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Keep the longest suffix that is a proper prefix of a stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .skip(1)
                    .map(|(i, _)| &s[..i])
                    .filter(|p| self.held.ends_with(*p))
                    .map(str::len)
                    .collect::<Vec<_>>()
            })
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let out = self.held[..split].to_string();
        self.held.drain(..split);
        out
    }

    /// The text still held back when the stream ends without a stop.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            String::new()
        } else {
            std::mem::take(&mut self.held)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out = String::new();
        for d in deltas {
            out.push_str(&f.push(d));
        }
        out.push_str(&f.finish());
        (out, f.stopped())
    }

    #[test]
    fn stop_strings_split_across_deltas_are_cut() {
        assert_eq!(
            run(&["\nUser:"], &["Hello", " there\nUs", "er: hi"]),
            ("Hello there".into(), true)
        );
        assert_eq!(run(&["。"], &["好的", "。谢谢"]), ("好的".into(), true));
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(
            run(&["\nUser:"], &["a\nU", "nless"]),
            ("a\nUnless".into(), false)
        );
        assert_eq!(run(&["END"], &["EN"]), ("EN".into(), false));
    }

    #[test]
    fn no_stops_passes_everything() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }
}
