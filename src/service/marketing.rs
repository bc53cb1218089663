//! MarketingService: life-cycle and interest segments over customer
//! profiles. Only profile summaries leave this service, never message text.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{convert, pb, State};
use crate::pipeline::validate_id;
use crate::segment;
use crate::Error;

pub struct MarketingApi {
    state: Arc<State>,
}

impl MarketingApi {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn tenant_filter(tenant_id: &str) -> Result<Option<String>, Error> {
    if tenant_id.is_empty() {
        return Ok(None);
    }
    validate_id(tenant_id, "tenant_id")?;
    Ok(Some(tenant_id.to_string()))
}

#[tonic::async_trait]
impl pb::marketing_service_server::MarketingService for MarketingApi {
    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let tenant = tenant_filter(&request.into_inner().tenant_id)?;
        let state = self.state.clone();
        // One pass over the profiles, off the async runtime.
        let segments = tokio::task::spawn_blocking(move || {
            let now = state.now_ms();
            let names = segment::names();
            let mut sizes = vec![0u64; names.len()];
            for p in state.store.profiles(tenant.as_deref()) {
                let p = p?;
                for (i, name) in names.iter().enumerate() {
                    if state.rules.contains(name, &p, now) {
                        sizes[i] += 1;
                    }
                }
            }
            Ok::<_, Error>(
                names
                    .into_iter()
                    .zip(sizes)
                    .map(|(name, size)| pb::Segment {
                        definition: state.rules.definition(&name).unwrap_or_default(),
                        name,
                        size,
                    })
                    .collect(),
            )
        })
        .await
        .map_err(|e| Error::Internal(format!("segment count panicked: {e}")))??;
        Ok(Response::new(pb::ListSegmentsResponse { segments }))
    }

    async fn export_segment(
        &self,
        request: Request<pb::ExportSegmentRequest>,
    ) -> Result<Response<EventStream<pb::ProfileSummary>>, Status> {
        let req = request.into_inner();
        if self.state.rules.definition(&req.segment).is_none() {
            return Err(Error::InvalidArgument(format!(
                "unknown segment {:?}; ListSegments names them: {}",
                req.segment,
                segment::names().join(", ")
            ))
            .into());
        }
        let tenant = tenant_filter(&req.tenant_id)?;
        // A bounded channel between a blocking scan and the client: memory
        // stays flat however many profiles match, and a slow client slows
        // the scan instead of filling memory.
        let (tx, rx) = mpsc::channel(256);
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let now = state.now_ms();
            let rules = &state.rules;
            let mut sent = 0u64;
            for p in state.store.profiles(tenant.as_deref()) {
                let item = match p {
                    Ok(p) if rules.contains(&req.segment, &p, now) => Ok(pb::ProfileSummary {
                        stage: rules.stage(&p, now).into(),
                        sentiment_score: p.sentiment_score,
                        top_intents: segment::top_intents(&p, 3),
                        last_seen: convert::timestamp(p.last_seen_ms),
                        message_count: p.message_count,
                        suggested_action: rules.suggested_action(&p, now).into(),
                        tenant_id: p.tenant_id,
                        user_id: p.user_id,
                    }),
                    Ok(_) => continue,
                    Err(e) => Err(Status::from(Error::from(e))),
                };
                let end = item.is_err();
                if tx.blocking_send(item).is_err() || end {
                    return;
                }
                sent += 1;
            }
            tracing::info!(segment = %req.segment, profiles = sent, "segment exported");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
