//! AdminService: data protection. Deleting a customer removes every record
//! kefu holds about them, in every tree.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{pb, State};
use crate::pipeline::validate_id;
use crate::Error;

pub struct AdminApi {
    state: Arc<State>,
}

impl AdminApi {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn delete_user_data(
        &self,
        request: Request<pb::DeleteUserDataRequest>,
    ) -> Result<Response<pb::DeleteUserDataResponse>, Status> {
        let req = request.into_inner();
        validate_id(&req.tenant_id, "tenant_id")?;
        validate_id(&req.user_id, "user_id")?;
        let counts = self
            .state
            .store
            .delete_user(&req.tenant_id, &req.user_id)
            .await
            .map_err(Error::from)?;
        tracing::info!(
            tenant_id = %req.tenant_id,
            user_id = %req.user_id,
            conversations = counts.conversations,
            turns = counts.turns,
            escalations = counts.escalations,
            "customer data deleted"
        );
        Ok(Response::new(pb::DeleteUserDataResponse {
            conversations_deleted: counts.conversations,
            turns_deleted: counts.turns,
            escalations_deleted: counts.escalations,
            profile_deleted: counts.profile,
        }))
    }
}
