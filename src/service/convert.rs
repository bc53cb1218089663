//! Conversions from kefu's records to the protobuf messages the API shows.

use prost_types::Timestamp;

use super::pb;
use crate::classify::{Classification, LabelScore};
use crate::pipeline::{StoredClassification, TurnDecision};
use crate::store::{self, Author, EscalationStatus};

pub fn timestamp(ms: u64) -> Option<Timestamp> {
    (ms > 0).then(|| Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
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

pub fn classification(c: &Classification) -> pb::Classification {
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

fn stored_scores(pairs: &[(String, f32)]) -> Vec<pb::LabelScore> {
    pairs
        .iter()
        .map(|(label, probability)| pb::LabelScore {
            label: label.clone(),
            probability: *probability,
        })
        .collect()
}

fn stored_classification(c: &StoredClassification) -> pb::Classification {
    let top = |pairs: &[(String, f32)]| pairs.first().cloned().unwrap_or_default();
    let (sentiment, sentiment_confidence) = top(&c.sentiment);
    let (intent, intent_confidence) = top(&c.intent);
    pb::Classification {
        sentiment,
        sentiment_confidence,
        sentiment_scores: stored_scores(&c.sentiment),
        intent,
        intent_confidence,
        intent_scores: stored_scores(&c.intent),
        language: c.language.clone(),
    }
}

pub fn decision(d: &TurnDecision) -> pb::Decision {
    let route = match d.route.as_str() {
        "answer" => pb::Route::Answer,
        "clarify" => pb::Route::Clarify,
        "escalate" => pb::Route::Escalate,
        "silent" => pb::Route::Silent,
        _ => pb::Route::Unspecified,
    };
    let priority = match d.priority.as_deref() {
        Some("high") => pb::Priority::High,
        Some(_) => pb::Priority::Normal,
        None => pb::Priority::Unspecified,
    };
    pb::Decision {
        route: route as i32,
        rule: d.rule.clone(),
        explanation: d.explanation.clone(),
        checks: d
            .checks
            .iter()
            .map(|c| pb::PolicyCheck {
                name: c.name.clone(),
                value: c.value,
                threshold: c.threshold,
                fired: c.fired,
            })
            .collect(),
        priority: priority as i32,
        classification: Some(stored_classification(&d.classification)),
    }
}

fn json_decision(v: &Option<serde_json::Value>) -> Option<pb::Decision> {
    v.as_ref()
        .and_then(TurnDecision::from_json)
        .map(|d| decision(&d))
}

pub fn turn(t: &store::Turn) -> pb::Turn {
    let author = match t.author {
        Author::Customer => pb::Author::Customer,
        Author::Bot => pb::Author::Bot,
        Author::Agent => pb::Author::Agent,
    };
    pb::Turn {
        turn_id: t.turn_id,
        author: author as i32,
        text: t.text.clone(),
        created_at: timestamp(t.created_ms),
        decision: json_decision(&t.decision),
        agent_id: t.agent_id.clone(),
    }
}

pub fn escalation_status(s: EscalationStatus) -> pb::EscalationStatus {
    match s {
        EscalationStatus::Waiting => pb::EscalationStatus::Waiting,
        EscalationStatus::Claimed => pb::EscalationStatus::Claimed,
        EscalationStatus::Resolved => pb::EscalationStatus::Resolved,
    }
}

/// An escalation with the customer's last messages and sentiment trend.
pub fn escalation(e: &store::Escalation, customer_turns: &[store::Turn]) -> pb::Escalation {
    let recent: Vec<&store::Turn> = customer_turns
        .iter()
        .filter(|t| t.author == Author::Customer)
        .collect();
    let last5 = &recent[recent.len().saturating_sub(5)..];
    pb::Escalation {
        escalation_id: e.id.clone(),
        conversation_id: e.conversation_id.clone(),
        tenant_id: e.tenant_id.clone(),
        user_id: e.user_id.clone(),
        status: escalation_status(e.status) as i32,
        priority: if e.priority == "high" {
            pb::Priority::High
        } else {
            pb::Priority::Normal
        } as i32,
        decision: json_decision(&Some(e.decision.clone())),
        recent_turns: last5.iter().map(|t| turn(t)).collect(),
        sentiment_trend: last5.iter().filter_map(|t| t.sentiment).collect(),
        created_at: timestamp(e.created_ms),
        agent_id: e.agent_id.clone(),
        claimed_at: timestamp(e.claimed_ms),
        resolved_at: timestamp(e.resolved_ms),
        outcome: e.outcome.clone(),
    }
}

pub fn profile(p: &store::Profile) -> pb::CustomerProfile {
    pb::CustomerProfile {
        tenant_id: p.tenant_id.clone(),
        user_id: p.user_id.clone(),
        first_seen: timestamp(p.first_seen_ms),
        last_seen: timestamp(p.last_seen_ms),
        message_count: p.message_count,
        sentiment_score: p.sentiment_score,
        consecutive_negative_turns: p.consecutive_negative,
        intent_counts: p
            .intent_counts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        escalation_count: p.escalation_count,
        language: p.language.clone(),
    }
}
