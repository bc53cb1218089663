//! The routing policy: given what the classifier saw and where the
//! conversation stands, answer, ask a clarifying question, escalate to a
//! person, or stay silent. Pure and deterministic, so every rule is
//! unit-tested; every decision names the rule that fired and the numbers it
//! compared, so agents and customers' platforms can see why.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::classify::Classification;

/// Thresholds, from a TOML file (`--policy`) or the built-in defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// P(intent = human_agent) at or above which the customer is handed to a person.
    pub human_agent_probability: f32,
    /// P(negative) at or above which a complaint escalates with high priority.
    pub angry_complaint_negative: f32,
    /// P(negative) at or above which a turn counts as negative.
    pub negative_turn: f32,
    /// This many negative turns in a row escalate.
    pub negative_streak: u32,
    /// Intent confidence below which the bot asks a clarifying question.
    pub min_intent_confidence: f32,
    /// After this many clarifying questions in a row, escalate instead.
    pub max_clarifications: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            human_agent_probability: 0.5,
            angry_complaint_negative: 0.6,
            negative_turn: 0.6,
            negative_streak: 3,
            min_intent_confidence: 0.4,
            max_clarifications: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the routing policy {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("routing policy: {0}")]
    Invalid(String),
}

impl Policy {
    /// Reads a TOML policy; fields left out keep their defaults, unknown
    /// fields are refused (a typo would otherwise silently keep a default).
    pub fn from_toml_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let policy: Policy = toml::from_str(&text).map_err(|e| Error::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn validate(&self) -> Result<(), Error> {
        for (name, v) in [
            ("human_agent_probability", self.human_agent_probability),
            ("angry_complaint_negative", self.angry_complaint_negative),
            ("negative_turn", self.negative_turn),
            ("min_intent_confidence", self.min_intent_confidence),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::Invalid(format!(
                    "{name} is {v}; it must be a probability in [0, 1]"
                )));
            }
        }
        if self.negative_streak == 0 {
            return Err(Error::Invalid("negative_streak must be at least 1".into()));
        }
        Ok(())
    }
}

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    Answer,
    Clarify,
    Escalate,
    Silent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Normal,
    High,
}

/// One comparison the policy made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub value: f64,
    pub threshold: f64,
    pub fired: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub route: Route,
    /// The rule that fired.
    pub rule: &'static str,
    pub explanation: String,
    pub checks: Vec<Check>,
    pub priority: Option<Priority>,
}

/// Where the conversation stands before this message.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConversationState {
    /// The conversation is escalated: humans answer it from now on.
    pub held_by_agent: bool,
    /// An agent has claimed the escalation; false while it waits in the
    /// queue. Only the explanation differs.
    pub agent_claimed: bool,
    /// Negative customer turns in a row just before this one.
    pub negative_streak: u32,
    /// Clarifying questions in a row just before this one.
    pub clarifications: u32,
}

/// Decides how to route one message. `generator_ready` is false when the
/// generator is not loaded or has failed.
pub fn decide(
    policy: &Policy,
    c: &Classification,
    state: ConversationState,
    generator_ready: bool,
) -> Decision {
    let mut checks = Vec::new();
    let mut check = |name: &'static str, value: f32, threshold: f32, fired: bool| {
        checks.push(Check {
            name,
            value: value as f64,
            threshold: threshold as f64,
            fired,
        });
        fired
    };
    let finish = |route, rule, explanation: String, priority, checks| Decision {
        route,
        rule,
        explanation,
        checks,
        priority,
    };

    if state.held_by_agent {
        let explanation = if state.agent_claimed {
            "a human agent holds this conversation; the message is stored for them"
        } else {
            "the conversation waits in the queue for a human agent; the message is stored for whoever takes it"
        };
        return finish(
            Route::Silent,
            "held_by_agent",
            explanation.into(),
            None,
            checks,
        );
    }
    let human = c.intent_probability("human_agent");
    if check(
        "human_agent_probability",
        human,
        policy.human_agent_probability,
        human >= policy.human_agent_probability,
    ) {
        return finish(
            Route::Escalate,
            "asks_for_human",
            format!(
                "the customer asks for a person (P = {human:.2} >= {:.2})",
                policy.human_agent_probability
            ),
            Some(Priority::Normal),
            checks,
        );
    }
    let negative = c.sentiment_probability("negative");
    let complaint = c.top_intent().label == "complaint";
    if complaint
        && check(
            "complaint_negative_probability",
            negative,
            policy.angry_complaint_negative,
            negative >= policy.angry_complaint_negative,
        )
    {
        return finish(
            Route::Escalate,
            "angry_complaint",
            format!(
                "an angry complaint (P(negative) = {negative:.2} >= {:.2}) goes to a person first",
                policy.angry_complaint_negative
            ),
            Some(Priority::High),
            checks,
        );
    }
    let streak = if negative >= policy.negative_turn {
        state.negative_streak + 1
    } else {
        0
    };
    if check(
        "consecutive_negative_turns",
        streak as f32,
        policy.negative_streak as f32,
        streak >= policy.negative_streak,
    ) {
        return finish(
            Route::Escalate,
            "negative_streak",
            format!(
                "{streak} negative messages in a row (limit {})",
                policy.negative_streak
            ),
            Some(Priority::Normal),
            checks,
        );
    }
    let confidence = c.top_intent().probability;
    if check(
        "intent_confidence",
        confidence,
        policy.min_intent_confidence,
        confidence < policy.min_intent_confidence,
    ) {
        if check(
            "clarifications_in_a_row",
            state.clarifications as f32,
            policy.max_clarifications as f32,
            state.clarifications >= policy.max_clarifications,
        ) {
            return finish(
                Route::Escalate,
                "clarify_limit",
                format!(
                    "still unclear after {} clarifying questions; a person takes over",
                    state.clarifications
                ),
                Some(Priority::Normal),
                checks,
            );
        }
        return finish(
            Route::Clarify,
            "low_confidence",
            format!(
                "unsure what the customer wants (intent confidence {confidence:.2} < {:.2})",
                policy.min_intent_confidence
            ),
            None,
            checks,
        );
    }
    if !generator_ready {
        return finish(
            Route::Escalate,
            "generator_unavailable",
            "the reply generator is unavailable: a fixed reply is sent and a person takes over"
                .into(),
            Some(Priority::Normal),
            checks,
        );
    }
    finish(
        Route::Answer,
        "default_answer",
        format!("the bot answers the {} question", c.top_intent().label),
        None,
        checks,
    )
}

/// The decision when the generator fails or misses its deadline after the
/// policy chose to answer: a fallback reply, and a person takes over.
pub fn generator_failed(mut decision: Decision, why: &str) -> Decision {
    decision.route = Route::Escalate;
    decision.rule = "generator_unavailable";
    decision.explanation =
        format!("the reply generator {why}: a fixed reply is sent and a person takes over");
    decision.priority = Some(Priority::Normal);
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{LabelScore, Language, INTENT_LABELS, SENTIMENT_LABELS};

    fn classification(intent: &str, intent_p: f32, negative: f32) -> Classification {
        let mut intents: Vec<LabelScore> = INTENT_LABELS
            .iter()
            .map(|l| LabelScore {
                label: l,
                probability: if *l == intent {
                    intent_p
                } else {
                    (1.0 - intent_p) / (INTENT_LABELS.len() - 1) as f32
                },
            })
            .collect();
        intents.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        let mut sentiment: Vec<LabelScore> = SENTIMENT_LABELS
            .iter()
            .map(|l| LabelScore {
                label: l,
                probability: match *l {
                    "negative" => negative,
                    "neutral" => 1.0 - negative,
                    _ => 0.0,
                },
            })
            .collect();
        sentiment.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        Classification {
            sentiment,
            intent: intents,
            language: Language::Zh,
        }
    }

    fn route(c: &Classification, state: ConversationState) -> Decision {
        decide(&Policy::default(), c, state, true)
    }

    #[test]
    fn a_clear_question_is_answered() {
        let d = route(
            &classification("order_status", 0.9, 0.1),
            ConversationState::default(),
        );
        assert_eq!((d.route, d.rule), (Route::Answer, "default_answer"));
        assert!(d.checks.iter().all(|c| !c.fired));
    }

    #[test]
    fn asking_for_a_person_escalates() {
        let d = route(
            &classification("human_agent", 0.8, 0.2),
            ConversationState::default(),
        );
        assert_eq!(
            (d.route, d.rule, d.priority),
            (Route::Escalate, "asks_for_human", Some(Priority::Normal))
        );
        assert_eq!(d.checks[0].name, "human_agent_probability");
        assert!(d.checks[0].fired && (d.checks[0].value - 0.8).abs() < 1e-6);
    }

    #[test]
    fn an_angry_complaint_escalates_with_high_priority() {
        let d = route(
            &classification("complaint", 0.9, 0.85),
            ConversationState::default(),
        );
        assert_eq!(
            (d.route, d.rule, d.priority),
            (Route::Escalate, "angry_complaint", Some(Priority::High))
        );
        // A calm complaint is answered.
        let d = route(
            &classification("complaint", 0.9, 0.3),
            ConversationState::default(),
        );
        assert_eq!(d.route, Route::Answer);
    }

    #[test]
    fn the_third_negative_turn_in_a_row_escalates() {
        let c = classification("order_status", 0.9, 0.7);
        let two = ConversationState {
            negative_streak: 1,
            ..Default::default()
        };
        assert_eq!(route(&c, two).route, Route::Answer);
        let three = ConversationState {
            negative_streak: 2,
            ..Default::default()
        };
        let d = route(&c, three);
        assert_eq!((d.route, d.rule), (Route::Escalate, "negative_streak"));
        // A neutral turn breaks the streak.
        let calm = classification("order_status", 0.9, 0.1);
        assert_eq!(route(&calm, three).route, Route::Answer);
    }

    #[test]
    fn low_confidence_asks_then_escalates_after_the_limit() {
        let c = classification("product_inquiry", 0.3, 0.1);
        let d = route(&c, ConversationState::default());
        assert_eq!((d.route, d.rule), (Route::Clarify, "low_confidence"));
        let limit = ConversationState {
            clarifications: 2,
            ..Default::default()
        };
        let d = route(&c, limit);
        assert_eq!((d.route, d.rule), (Route::Escalate, "clarify_limit"));
    }

    #[test]
    fn a_held_conversation_stays_silent() {
        let waiting = ConversationState {
            held_by_agent: true,
            ..Default::default()
        };
        let claimed = ConversationState {
            agent_claimed: true,
            ..waiting
        };
        for (state, says) in [
            (waiting, "waits in the queue"),
            (claimed, "a human agent holds"),
        ] {
            let d = route(&classification("human_agent", 0.9, 0.9), state);
            assert_eq!((d.route, d.rule), (Route::Silent, "held_by_agent"));
            assert!(d.explanation.contains(says), "{}", d.explanation);
        }
    }

    #[test]
    fn without_a_generator_the_bot_falls_back_and_escalates() {
        let c = classification("order_status", 0.9, 0.1);
        let d = decide(&Policy::default(), &c, ConversationState::default(), false);
        assert_eq!(
            (d.route, d.rule),
            (Route::Escalate, "generator_unavailable")
        );
        let answered = route(&c, ConversationState::default());
        let d = generator_failed(answered, "missed its deadline");
        assert_eq!(d.route, Route::Escalate);
        assert!(d.explanation.contains("deadline"));
    }

    #[test]
    fn policy_files_override_defaults_and_refuse_typos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "negative_streak = 2\nmin_intent_confidence = 0.5\n").unwrap();
        let p = Policy::from_toml_file(&path).unwrap();
        assert_eq!(p.negative_streak, 2);
        assert_eq!(p.min_intent_confidence, 0.5);
        assert_eq!(p.max_clarifications, Policy::default().max_clarifications);
        std::fs::write(&path, "negativ_streak = 2\n").unwrap();
        assert!(Policy::from_toml_file(&path)
            .unwrap_err()
            .to_string()
            .contains("negativ_streak"));
        std::fs::write(&path, "negative_turn = 1.5\n").unwrap();
        assert!(Policy::from_toml_file(&path)
            .unwrap_err()
            .to_string()
            .contains("[0, 1]"));
    }
}
