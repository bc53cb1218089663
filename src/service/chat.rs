//! ChatService: what chat platforms call. `Classify` is served here; the
//! message pipeline RPCs (SendMessage, StreamMessage, GetConversation,
//! WatchConversation) arrive with the chat-service work and answer
//! UNIMPLEMENTED until then.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb;
use super::State;
use crate::classify::{Classification, LabelScore};
use crate::Error;

pub struct ChatApi {
    state: Arc<State>,
}

impl ChatApi {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// Checks one customer text against the configured limits.
pub fn validate_text(text: &str, max_bytes: usize, what: &str) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    if text.len() > max_bytes {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes; the limit is {max_bytes}",
            text.len()
        )));
    }
    Ok(())
}

fn scores(scores: &[LabelScore]) -> Vec<pb::LabelScore> {
    scores
        .iter()
        .map(|s| pb::LabelScore {
            label: s.label.to_string(),
            probability: s.probability,
        })
        .collect()
}

pub fn to_proto(c: &Classification) -> pb::Classification {
    pb::Classification {
        sentiment: c.top_sentiment().label.to_string(),
        sentiment_confidence: c.top_sentiment().probability,
        sentiment_scores: scores(&c.sentiment),
        intent: c.top_intent().label.to_string(),
        intent_confidence: c.top_intent().probability,
        intent_scores: scores(&c.intent),
        language: c.language.code().to_string(),
    }
}

#[tonic::async_trait]
impl pb::chat_service_server::ChatService for ChatApi {
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
        let models = self.state.models()?;
        let results = models
            .classifier
            .classify(&req.texts)
            .await
            .map_err(Error::from)?;
        tracing::debug!(texts = results.len(), "classified");
        Ok(Response::new(pb::ClassifyResponse {
            results: results.iter().map(to_proto).collect(),
        }))
    }
}
