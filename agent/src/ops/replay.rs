//! `client-request-id`: a caller's retry key. The same id sent again with
//! the same kind of request and the same body gets the first request's
//! result back; the same id with anything else is refused, so a caller is
//! never told that a reimage was accepted when its id belongs to a reboot.

use super::refusal::Refusal;
use crate::store::{Store, Table};
use reimage_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The kinds of request a `client-request-id` can stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RequestKind {
    Reimage,
    Reboot,
    AddTask,
    Prefetch,
}

impl RequestKind {
    fn describe(self) -> &'static str {
        match self {
            RequestKind::Reimage => "a reimage",
            RequestKind::Reboot => "a reboot",
            RequestKind::AddTask => "adding a task",
            RequestKind::Prefetch => "a prefetch",
        }
    }
}

/// What a request id was first used for, as stored under `request:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FirstUse {
    kind: RequestKind,
    /// SHA-256 of the request as the agent understood it (its canonical
    /// JSON), so spelling differences (`taskCompletion`) do not matter.
    body_sha256: String,
    /// The operation or task the request created.
    result_id: String,
}

/// One request and its retry key.
#[derive(Debug, Clone)]
pub struct Replayable<'a> {
    pub client_request_id: &'a str,
    pub kind: RequestKind,
    body_sha256: String,
}

impl<'a> Replayable<'a> {
    /// `request` (the typed body) under `client_request_id`.
    pub fn new<T: Serialize>(
        client_request_id: &'a str,
        kind: RequestKind,
        request: &T,
    ) -> Result<Self, Refusal> {
        let canonical = serde_json::to_vec(request).map_err(|e| {
            Refusal::from(crate::Error::InvalidArgument(format!(
                "encoding the request: {e}"
            )))
        })?;
        Ok(Replayable {
            client_request_id,
            kind,
            body_sha256: hex::encode(Sha256::digest(&canonical)),
        })
    }

    fn key(&self) -> String {
        format!("request:{}", self.client_request_id)
    }

    /// The id of what the first use of this request id created, if it was
    /// the same request; [`ErrorCode::RequestIdConflict`] if it was another.
    pub fn earlier_result(&self, store: &Store) -> Result<Option<String>, Refusal> {
        let Some(first) = store.get::<FirstUse>(Table::RequestIds, &self.key())? else {
            return Ok(None);
        };
        if first.kind != self.kind {
            return Err(Refusal::conflict(
                ErrorCode::RequestIdConflict,
                format!(
                    "client-request-id {} was used for {}; send {} with a new id",
                    self.client_request_id,
                    first.kind.describe(),
                    self.kind.describe()
                ),
            )
            .with_detail("clientRequestId", self.client_request_id));
        }
        if first.body_sha256 != self.body_sha256 {
            return Err(Refusal::conflict(
                ErrorCode::RequestIdConflict,
                format!(
                    "client-request-id {} was used for {} with another body; a retry must send the same body",
                    self.client_request_id,
                    first.kind.describe()
                ),
            )
            .with_detail("clientRequestId", self.client_request_id));
        }
        Ok(Some(first.result_id))
    }

    /// Records that this request created `result_id`.
    pub fn remember(&self, store: &Store, result_id: &str) -> crate::Result<()> {
        store.put(
            Table::RequestIds,
            &self.key(),
            &FirstUse {
                kind: self.kind,
                body_sha256: self.body_sha256.clone(),
                result_id: result_id.to_string(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_protocol::api::{NodeReimageOption, RebootRequest, ReimageRequest};

    fn reimage(option: NodeReimageOption) -> ReimageRequest {
        ReimageRequest {
            node_reimage_option: option,
            ..ReimageRequest::default()
        }
    }

    #[test]
    fn the_same_request_again_gets_the_first_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let first = Replayable::new(
            "c1",
            RequestKind::Reimage,
            &reimage(NodeReimageOption::Terminate),
        )
        .expect("request");
        assert_eq!(first.earlier_result(&store).expect("fresh"), None);
        first.remember(&store, "op-1").expect("remember");
        let again = Replayable::new(
            "c1",
            RequestKind::Reimage,
            &reimage(NodeReimageOption::Terminate),
        )
        .expect("request");
        assert_eq!(
            again.earlier_result(&store).expect("replay"),
            Some("op-1".into())
        );
    }

    #[test]
    fn another_kind_or_body_under_the_same_id_is_a_conflict() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        Replayable::new("c1", RequestKind::Reboot, &RebootRequest::default())
            .expect("request")
            .remember(&store, "op-reboot")
            .expect("remember");
        let reimage_under_it =
            Replayable::new("c1", RequestKind::Reimage, &ReimageRequest::default())
                .expect("request");
        let refusal = reimage_under_it
            .earlier_result(&store)
            .expect_err("conflict");
        assert_eq!(refusal.code, ErrorCode::RequestIdConflict);
        assert!(refusal.message.contains("a reboot"), "{refusal}");

        Replayable::new(
            "c2",
            RequestKind::Reimage,
            &reimage(NodeReimageOption::Requeue),
        )
        .expect("request")
        .remember(&store, "op-2")
        .expect("remember");
        let other_body = Replayable::new(
            "c2",
            RequestKind::Reimage,
            &reimage(NodeReimageOption::Terminate),
        )
        .expect("request");
        let refusal = other_body.earlier_result(&store).expect_err("conflict");
        assert_eq!(refusal.code, ErrorCode::RequestIdConflict);
        assert!(refusal.message.contains("another body"), "{refusal}");
    }
}
