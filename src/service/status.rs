//! The one place where kefu's errors become gRPC statuses. Messages for
//! internal failures are generic; the detail goes to the log.

use tonic::Status;

use crate::classify;
use crate::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::Overloaded(m) => Status::resource_exhausted(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal(
                    "kefu failed to handle the request; the error is in the server log",
                )
            }
            Error::Classify(e) => match e {
                classify::Error::Overloaded(_) => Status::resource_exhausted(e.to_string()),
                classify::Error::Unavailable => Status::unavailable(e.to_string()),
                classify::Error::Invalid(ref m) => Status::invalid_argument(m.clone()),
                other => {
                    tracing::error!(error = %other, "classifier error");
                    Status::internal("the classifier failed; the error is in the server log")
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_follow_the_kind_of_failure() {
        let cases = [
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (Error::NotFound("x".into()), Code::NotFound),
            (Error::Overloaded("x".into()), Code::ResourceExhausted),
            (Error::Unavailable("x".into()), Code::Unavailable),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::Internal("secret path".into()), Code::Internal),
            (
                Error::Classify(classify::Error::Overloaded(3)),
                Code::ResourceExhausted,
            ),
            (
                Error::Classify(classify::Error::Unavailable),
                Code::Unavailable,
            ),
            (
                Error::Classify(classify::Error::Tokenizer("secret path /x".into())),
                Code::Internal,
            ),
            (
                Error::Classify(classify::Error::Inference("secret shape".into())),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert!(
                !status.message().contains("secret"),
                "internal details leak"
            );
        }
    }
}
