//! ChatService: what chat platforms call. Each message runs through
//! [`crate::pipeline`]; this module only admits it (the in-flight bound),
//! converts, and streams.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{convert, pb, State};
use crate::pipeline::{self, Inbound, Outcome, Overrides, Progress};
use crate::Error;

pub use crate::pipeline::validate_text;
pub use convert::classification as to_proto;

pub struct ChatApi {
    state: Arc<State>,
}

impl ChatApi {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn inbound(req: pb::SendMessageRequest) -> Inbound {
    let metadata = req.metadata.unwrap_or_default();
    let generation = req.generation.unwrap_or_default();
    Inbound {
        tenant_id: req.tenant_id,
        user_id: req.user_id,
        conversation_id: req.conversation_id,
        text: req.text,
        order_id: metadata.order_id,
        locale: metadata.locale,
        overrides: Overrides {
            temperature: generation.temperature,
            top_p: generation.top_p,
            max_new_tokens: generation.max_new_tokens,
        },
    }
}

fn busy(limit: usize) -> Error {
    Error::Overloaded(format!(
        "kefu is handling {limit} messages, its limit (--max-inflight); retry with backoff"
    ))
}

fn response(o: Outcome) -> pb::SendMessageResponse {
    pb::SendMessageResponse {
        conversation_id: o.conversation_id,
        customer_turn_id: o.customer_turn_id,
        decision: Some(convert::decision(&o.decision)),
        reply: o.reply,
        reply_turn_id: o.reply_turn_id,
        fallback: o.fallback,
    }
}

fn event(e: pb::stream_message_event::Event) -> pb::StreamMessageEvent {
    pb::StreamMessageEvent { event: Some(e) }
}

impl ChatApi {
    /// Runs one streamed message: forwards progress until the pipeline ends
    /// or the caller goes away (then the pipeline is dropped, which stops
    /// generation).
    async fn run_stream(
        state: Arc<State>,
        m: Inbound,
        _permit: OwnedSemaphorePermit,
        out: mpsc::Sender<Result<pb::StreamMessageEvent, Status>>,
    ) {
        use pb::stream_message_event::Event as E;
        let Ok(pipeline) = state.pipeline() else {
            return;
        };
        let (ptx, mut prx) = mpsc::channel::<Progress>(64);
        let handle = pipeline.handle(m, Some(ptx));
        tokio::pin!(handle);
        let forward = |p: Progress| match p {
            Progress::Started(s) => event(E::Start(pb::StreamStart {
                conversation_id: s.conversation_id,
                customer_turn_id: s.customer_turn_id,
                decision: Some(convert::decision(&s.decision)),
            })),
            Progress::Delta(d) => event(E::Delta(d)),
        };
        let result = loop {
            tokio::select! {
                biased;
                Some(p) = prx.recv() => {
                    if out.send(Ok(forward(p))).await.is_err() {
                        return; // the caller went away
                    }
                }
                result = &mut handle => break result,
            }
        };
        while let Ok(p) = prx.try_recv() {
            if out.send(Ok(forward(p))).await.is_err() {
                return;
            }
        }
        let last = match result {
            Ok(o) => Ok(event(E::End(pb::StreamEnd {
                reply_turn_id: o.reply_turn_id,
                reply: o.reply,
                fallback: o.fallback,
            }))),
            Err(e) => Err(Status::from(e)),
        };
        let _ = out.send(last).await;
    }
}

#[tonic::async_trait]
impl pb::chat_service_server::ChatService for ChatApi {
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let pipeline = self.state.pipeline()?;
        let m = inbound(request.into_inner());
        pipeline.validate(&m)?;
        let _permit = pipeline
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(self.state.max_inflight()))?;
        let outcome = pipeline.handle(m, None).await?;
        Ok(Response::new(response(outcome)))
    }

    async fn stream_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<EventStream<pb::StreamMessageEvent>>, Status> {
        let pipeline = self.state.pipeline()?;
        let m = inbound(request.into_inner());
        pipeline.validate(&m)?;
        let permit = tokio::time::timeout(
            self.state.stream_wait,
            pipeline.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| busy(self.state.max_inflight()))?
        .map_err(|_| Error::Unavailable("kefu is shutting down".into()))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(Self::run_stream(self.state.clone(), m, permit, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let id = request.into_inner().conversation_id;
        pipeline::validate_id(&id, "conversation_id")?;
        let store = &self.state.store;
        let conv = store
            .conversation(&id)
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(format!("conversation {id} does not exist")))?;
        let turns = store.turns(&id, None).map_err(Error::from)?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation_id: conv.id,
            tenant_id: conv.tenant_id,
            user_id: conv.user_id,
            turns: turns.iter().map(convert::turn).collect(),
            held_by_agent: conv.held_by_agent,
        }))
    }

    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let req = request.into_inner();
        let limits = &self.state.limits;
        if req.texts.is_empty() {
            return Err(
                Error::InvalidArgument("texts is empty; send 1 or more texts".into()).into(),
            );
        }
        if req.texts.len() > limits.max_classify_texts {
            return Err(Error::InvalidArgument(format!(
                "{} texts sent; the limit is {} per call",
                req.texts.len(),
                limits.max_classify_texts
            ))
            .into());
        }
        for (i, text) in req.texts.iter().enumerate() {
            validate_text(text, limits.max_text_bytes, &format!("texts[{i}]"))?;
        }
        let pipeline = self.state.pipeline()?;
        let results = pipeline
            .classifier
            .classify(&req.texts)
            .await
            .map_err(Error::from)?;
        tracing::debug!(texts = results.len(), "classified");
        Ok(Response::new(pb::ClassifyResponse {
            results: results.iter().map(convert::classification).collect(),
        }))
    }

    async fn watch_conversation(
        &self,
        request: Request<pb::WatchConversationRequest>,
    ) -> Result<Response<EventStream<pb::ConversationEvent>>, Status> {
        let id = request.into_inner().conversation_id;
        pipeline::validate_id(&id, "conversation_id")?;
        // Subscribe before checking, so nothing stored in between is missed.
        let events = self.state.hub.watch_conversation(&id);
        let exists = self.state.store.conversation(&id).map(|c| c.is_some());
        if !matches!(exists, Ok(true)) {
            drop(events);
            self.state.hub.release_conversation(&id);
            exists.map_err(Error::from)?;
            return Err(Error::NotFound(format!("conversation {id} does not exist")).into());
        }
        let (tx, rx) = mpsc::channel(64);
        let hub = self.state.hub.clone();
        tokio::spawn(async move {
            let turn = |e: crate::pipeline::ConversationEvent| pb::ConversationEvent {
                turn: Some(convert::turn(&e.turn)),
                held_by_agent: e.held_by_agent,
            };
            let catch_up = "read the conversation with GetConversation and watch again";
            super::forward(events, tx, turn, catch_up).await;
            hub.release_conversation(&id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
