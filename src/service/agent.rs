//! AgentService: human agents work the escalation queue. Claiming hands the
//! conversation to one agent; their replies reach the platform through
//! WatchConversation; resolving can hand it back to the bot and keeps label
//! corrections as training data.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{convert, pb, State};
use crate::classify::{INTENT_LABELS, SENTIMENT_LABELS};
use crate::pipeline::{validate_id, validate_text, EscalationEventKind};
use crate::store::{self, Correction, EscalationStatus};
use crate::Error;

pub struct AgentApi {
    state: Arc<State>,
}

impl AgentApi {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// An escalation with its conversation's recent customer turns.
    fn show(&self, e: &store::Escalation) -> Result<pb::Escalation, Error> {
        let turns = self.state.store.turns(&e.conversation_id, Some(20))?;
        Ok(convert::escalation(e, &turns))
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const MAX_PAGE: u32 = 200;

fn page_token(key: &[u8]) -> String {
    hex::encode(key)
}

fn parse_token(token: &str) -> Result<Option<Vec<u8>>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    hex::decode(token)
        .map(Some)
        .map_err(|_| Error::InvalidArgument("page_token is not one this server gave out".into()))
}

fn check_label(label: &str, known: &[&str], what: &str) -> Result<(), Error> {
    if label.is_empty() || known.contains(&label) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {label:?} is not one of {}",
            known.join(", ")
        )))
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn list_escalations(
        &self,
        request: Request<pb::ListEscalationsRequest>,
    ) -> Result<Response<pb::ListEscalationsResponse>, Status> {
        let req = request.into_inner();
        let statuses: &[EscalationStatus] = match req.status() {
            pb::EscalationStatus::Unspecified => {
                &[EscalationStatus::Waiting, EscalationStatus::Claimed]
            }
            pb::EscalationStatus::Waiting => &[EscalationStatus::Waiting],
            pb::EscalationStatus::Claimed => &[EscalationStatus::Claimed],
            pb::EscalationStatus::Resolved => &[EscalationStatus::Resolved],
        };
        if req.page_size > MAX_PAGE {
            return Err(Error::InvalidArgument(format!(
                "page_size is {}; the limit is {MAX_PAGE}",
                req.page_size
            ))
            .into());
        }
        let size = if req.page_size == 0 {
            50
        } else {
            req.page_size
        } as usize;
        let after = parse_token(&req.page_token)?;
        let page = self
            .state
            .store
            .list_escalations(statuses, size, after.as_deref())
            .map_err(Error::from)?;
        let escalations = page
            .escalations
            .iter()
            .map(|e| self.show(e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ListEscalationsResponse {
            escalations,
            next_page_token: page.next.as_deref().map(page_token).unwrap_or_default(),
        }))
    }

    async fn claim_escalation(
        &self,
        request: Request<pb::ClaimEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        let req = request.into_inner();
        validate_id(&req.escalation_id, "escalation_id")?;
        validate_id(&req.agent_id, "agent_id")?;
        let e = self
            .state
            .store
            .claim(&req.escalation_id, &req.agent_id, self.state.now_ms())
            .await
            .map_err(Error::from)?;
        tracing::info!(
            escalation_id = %e.id,
            conversation_id = %e.conversation_id,
            agent_id = %e.agent_id,
            "escalation claimed"
        );
        self.state
            .hub
            .publish_escalation(EscalationEventKind::Claimed, &e);
        Ok(Response::new(self.show(&e)?))
    }

    async fn post_agent_reply(
        &self,
        request: Request<pb::PostAgentReplyRequest>,
    ) -> Result<Response<pb::PostAgentReplyResponse>, Status> {
        let req = request.into_inner();
        validate_id(&req.conversation_id, "conversation_id")?;
        validate_id(&req.agent_id, "agent_id")?;
        validate_text(&req.text, self.state.limits.max_text_bytes, "text")?;
        // Agents' replies are masked like customers' messages: an agent
        // pasting a phone number must not put it in the store.
        let (text, _) = crate::redact::redact(&req.text);
        let (conv, turn) = self
            .state
            .store
            .agent_reply(
                &req.conversation_id,
                &req.agent_id,
                &text,
                self.state.now_ms(),
            )
            .await
            .map_err(Error::from)?;
        self.state.hub.publish_turn(&conv, &turn);
        Ok(Response::new(pb::PostAgentReplyResponse {
            turn: Some(convert::turn(&turn)),
        }))
    }

    async fn resolve_escalation(
        &self,
        request: Request<pb::ResolveEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        let req = request.into_inner();
        validate_id(&req.escalation_id, "escalation_id")?;
        validate_id(&req.agent_id, "agent_id")?;
        if req.outcome.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "outcome is empty; say what happened, e.g. \"refunded\"".into(),
            )
            .into());
        }
        validate_text(&req.outcome, 1000, "outcome")?;
        let mut corrections = Vec::with_capacity(req.corrections.len());
        for c in &req.corrections {
            check_label(&c.intent, &INTENT_LABELS, "corrections.intent")?;
            check_label(&c.sentiment, &SENTIMENT_LABELS, "corrections.sentiment")?;
            corrections.push(Correction {
                turn_id: c.turn_id,
                intent: c.intent.clone(),
                sentiment: c.sentiment.clone(),
            });
        }
        let (e, _conv) = self
            .state
            .store
            .resolve(
                &req.escalation_id,
                &req.agent_id,
                &req.outcome,
                req.hand_back_to_bot,
                &corrections,
                self.state.now_ms(),
            )
            .await
            .map_err(Error::from)?;
        tracing::info!(
            escalation_id = %e.id,
            conversation_id = %e.conversation_id,
            hand_back = req.hand_back_to_bot,
            corrections = corrections.len(),
            "escalation resolved"
        );
        self.state
            .hub
            .publish_escalation(EscalationEventKind::Resolved, &e);
        Ok(Response::new(self.show(&e)?))
    }

    async fn get_customer_context(
        &self,
        request: Request<pb::GetCustomerContextRequest>,
    ) -> Result<Response<pb::CustomerContext>, Status> {
        let req = request.into_inner();
        validate_id(&req.tenant_id, "tenant_id")?;
        validate_id(&req.user_id, "user_id")?;
        if req.max_turns > 500 {
            return Err(Error::InvalidArgument(format!(
                "max_turns is {}; the limit is 500",
                req.max_turns
            ))
            .into());
        }
        let max_turns = if req.max_turns == 0 {
            50
        } else {
            req.max_turns
        } as usize;
        let store = &self.state.store;
        let profile = store
            .profile(&req.tenant_id, &req.user_id)
            .map_err(Error::from)?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no customer {} in tenant {}",
                    req.user_id, req.tenant_id
                ))
            })?;
        let mut conversations = Vec::new();
        for id in store
            .conversations_of(&req.tenant_id, &req.user_id)
            .map_err(Error::from)?
        {
            if let Some(c) = store.conversation(&id).map_err(Error::from)? {
                conversations.push(c);
            }
        }
        conversations.sort_by_key(|c| std::cmp::Reverse(c.created_ms));
        let mut turns = Vec::new();
        let mut escalations = Vec::new();
        for c in &conversations {
            let recent = store.turns(&c.id, Some(max_turns)).map_err(Error::from)?;
            for id in &c.escalations {
                if let Some(e) = store.escalation(id).map_err(Error::from)? {
                    escalations.push(convert::escalation(&e, &recent));
                }
            }
            turns.extend(recent);
        }
        turns.sort_by_key(|t| t.created_ms);
        let turns = &turns[turns.len().saturating_sub(max_turns)..];
        Ok(Response::new(pb::CustomerContext {
            profile: Some(convert::profile(&profile)),
            conversation_ids: conversations.into_iter().map(|c| c.id).collect(),
            recent_turns: turns.iter().map(convert::turn).collect(),
            escalations,
        }))
    }

    async fn watch_escalations(
        &self,
        _request: Request<pb::WatchEscalationsRequest>,
    ) -> Result<Response<EventStream<pb::EscalationEvent>>, Status> {
        let events = self.state.hub.watch_escalations();
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let event = |ev: crate::pipeline::EscalationEvent| {
                let kind = match ev.kind {
                    EscalationEventKind::New => pb::escalation_event::Kind::New,
                    EscalationEventKind::Claimed => pb::escalation_event::Kind::Claimed,
                    EscalationEventKind::Resolved => pb::escalation_event::Kind::Resolved,
                };
                let turns = state
                    .store
                    .turns(&ev.escalation.conversation_id, Some(20))
                    .unwrap_or_default();
                pb::EscalationEvent {
                    kind: kind as i32,
                    escalation: Some(convert::escalation(&ev.escalation, &turns)),
                }
            };
            super::forward(events, tx, event, "list the queue and watch again").await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
