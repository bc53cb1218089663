//! The error every request path returns. Each layer has its own error type;
//! this one says what kind of failure it is, and `service::status` maps it to
//! a gRPC status in one place.

use crate::classify;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something kefu cannot accept; the message says what
    /// and the limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// An id that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Too much work in flight; retry with backoff.
    #[error("{0}")]
    Overloaded(String),
    /// A model is still loading or has stopped.
    #[error("{0}")]
    Unavailable(String),
    /// The request conflicts with the state of a conversation or an
    /// escalation (claimed by someone else, already resolved, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something kefu should have handled; the detail goes to the log only.
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Classify(#[from] classify::Error),
}
