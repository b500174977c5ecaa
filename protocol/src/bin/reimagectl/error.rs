//! The one-line error, `<context>: <code>: <message>`, and the exit status.

use reimage_protocol::{ClientError, ErrorCode};
use std::process::ExitCode;

/// A failure of `reimagectl` itself (arguments, files, a rollout that did
/// not succeed), with a stable code like the API's.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: ErrorCode,
    pub message: String,
}

impl CliError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

/// The contexts the binary added, then the typed error's code and message.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in err.chain() {
        if let Some(client) = cause.downcast_ref::<ClientError>() {
            parts.push(format!("{}: {client}", client.code()));
            break;
        }
        if let Some(cli) = cause.downcast_ref::<CliError>() {
            parts.push(format!("{}: {cli}", cli.code));
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}

/// 130 after Ctrl-C, 1 for every other failure.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    let interrupted = err
        .chain()
        .filter_map(|c| c.downcast_ref::<CliError>())
        .any(|e| e.code == ErrorCode::Interrupted);
    if interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use reimage_protocol::api::ErrorBody;

    #[test]
    fn the_line_is_context_code_message() {
        let err: anyhow::Result<()> = Err(ClientError::Api {
            status: 409,
            body: ErrorBody::new(ErrorCode::NodeBeingReimaged, "the node is reimaging"),
        }
        .into());
        let err = err.context("reboot on http://n1:7480").expect_err("error");
        assert_eq!(
            error_line(&err),
            "reboot on http://n1:7480: NodeBeingReimaged: the node is reimaging"
        );
        assert_eq!(exit_code(&err), ExitCode::FAILURE);
        let err = anyhow::Error::from(CliError::new(ErrorCode::Interrupted, "stopped"))
            .context("reimage");
        assert_eq!(error_line(&err), "reimage: Interrupted: stopped");
        assert_eq!(exit_code(&err), ExitCode::from(130));
    }
}
