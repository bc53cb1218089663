//! One customer message's journey:
//! validate -> redact personal data -> classify -> load profile and recent
//! history -> route -> answer (generate, template, or stay silent) -> store.
//!
//! The customer's turn (with its decision and the profile update it causes)
//! is stored in one transaction before the reply is written, so a message is
//! never lost to a failed or slow generator; the reply is stored as a second
//! turn. When the generator fails or misses its deadline after the policy
//! chose to answer, the customer gets the fallback reply from `prompts/`, the
//! conversation is escalated, and the stored decision says so.
//!
//! Everything that happens in a conversation is published on the [`Hub`],
//! which `WatchConversation` and `WatchEscalations` stream from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tracing::Instrument;

use crate::classify::{Classification, Classifier, Language, Script};
use crate::generate::prompt::{bounded_history, HistoryTurn, PromptContext, Prompts, Voice};
use crate::generate::{self, Event, Generator, Sampling};
use crate::redact::redact;
use crate::route::{self, ConversationState, Policy, Route};
use crate::store::{self, Author, Escalation, NewEscalation, NewTurn, Store, Turn, TurnSignals};
use crate::Error;

/// Longest tenant, user, agent or conversation id accepted, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// The clock kefu stamps turns with and computes segments against
/// (milliseconds since the Unix epoch); tests pass a fixed one.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(store::now_ms)
}

/// Checks an id: 1..=128 printable characters.
pub fn validate_id(id: &str, what: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    let chars = id.chars().count();
    if chars > MAX_ID_CHARS {
        return Err(Error::InvalidArgument(format!(
            "{what} is {chars} characters; the limit is {MAX_ID_CHARS}"
        )));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be printable characters without spaces"
        )));
    }
    Ok(())
}

/// Checks one customer text against the configured limit.
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

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::NoConversation(id) => {
                Error::NotFound(format!("conversation {id} does not exist"))
            }
            // Another customer's conversation is reported as missing, so ids
            // cannot be probed across customers.
            store::Error::WrongOwner { id } => {
                Error::NotFound(format!("conversation {id} does not exist"))
            }
            store::Error::NoEscalation(id) => {
                Error::NotFound(format!("escalation {id} does not exist"))
            }
            store::Error::Conflict(m) => Error::FailedPrecondition(m),
            store::Error::Invalid(m) => Error::InvalidArgument(m),
            other => Error::Internal(other.to_string()),
        }
    }
}

/// The routing decision as it is stored with the turn and shown by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnDecision {
    /// "answer", "clarify", "escalate" or "silent".
    pub route: String,
    pub rule: String,
    pub explanation: String,
    pub checks: Vec<StoredCheck>,
    /// "normal" or "high" when escalated.
    #[serde(default)]
    pub priority: Option<String>,
    pub classification: StoredClassification,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCheck {
    pub name: String,
    pub value: f64,
    pub threshold: f64,
    pub fired: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredClassification {
    /// (label, probability), most likely first.
    pub sentiment: Vec<(String, f32)>,
    pub intent: Vec<(String, f32)>,
    pub language: String,
}

impl StoredClassification {
    pub fn from_classification(c: &Classification, language: Language) -> Self {
        let pairs = |s: &[crate::classify::LabelScore]| {
            s.iter()
                .map(|l| (l.label.to_string(), l.probability))
                .collect()
        };
        Self {
            sentiment: pairs(&c.sentiment),
            intent: pairs(&c.intent),
            language: language.code().into(),
        }
    }
}

fn route_name(r: Route) -> &'static str {
    match r {
        Route::Answer => "answer",
        Route::Clarify => "clarify",
        Route::Escalate => "escalate",
        Route::Silent => "silent",
    }
}

impl TurnDecision {
    fn new(d: &route::Decision, c: &Classification, language: Language) -> Self {
        Self {
            route: route_name(d.route).into(),
            rule: d.rule.into(),
            explanation: d.explanation.clone(),
            checks: d
                .checks
                .iter()
                .map(|c| StoredCheck {
                    name: c.name.into(),
                    value: c.value,
                    threshold: c.threshold,
                    fired: c.fired,
                })
                .collect(),
            priority: d.priority.map(|p| {
                match p {
                    route::Priority::High => "high",
                    route::Priority::Normal => "normal",
                }
                .into()
            }),
            classification: StoredClassification::from_classification(c, language),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("decisions serialise")
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        serde_json::from_value(v.clone()).ok()
    }
}

/// Something that happened in a conversation, for watchers.
#[derive(Debug, Clone)]
pub struct ConversationEvent {
    pub conversation_id: String,
    pub turn: Turn,
    pub held_by_agent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscalationEventKind {
    New,
    Claimed,
    Resolved,
}

#[derive(Debug, Clone)]
pub struct EscalationEvent {
    pub kind: EscalationEventKind,
    pub escalation: Escalation,
}

/// Live events: one broadcast channel per watched conversation, one for the
/// escalation queue. Bounded: a watcher that falls behind is told so and
/// can re-read the conversation.
pub struct Hub {
    conversations: Mutex<HashMap<String, broadcast::Sender<ConversationEvent>>>,
    escalations: broadcast::Sender<EscalationEvent>,
}

/// Events a conversation watcher may fall behind by (turns are rare within
/// one conversation; the ring is allocated per watched conversation).
const CONVERSATION_CAPACITY: usize = 32;
/// Events a queue watcher may fall behind by.
const HUB_CAPACITY: usize = 256;

impl Default for Hub {
    fn default() -> Self {
        Self {
            conversations: Mutex::new(HashMap::new()),
            escalations: broadcast::channel(HUB_CAPACITY).0,
        }
    }
}

impl Hub {
    pub fn watch_conversation(&self, id: &str) -> broadcast::Receiver<ConversationEvent> {
        let mut map = self
            .conversations
            .lock()
            .expect("hub lock is never poisoned");
        map.entry(id.to_string())
            .or_insert_with(|| broadcast::channel(CONVERSATION_CAPACITY).0)
            .subscribe()
    }

    /// Called when a conversation watcher goes away: the channel is freed
    /// once nobody watches, so watched-then-quiet conversations hold nothing.
    pub fn release_conversation(&self, id: &str) {
        let mut map = self
            .conversations
            .lock()
            .expect("hub lock is never poisoned");
        if map.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(id);
        }
    }

    /// Conversations with a live channel, for tests and diagnostics.
    pub fn watched_conversations(&self) -> usize {
        self.conversations
            .lock()
            .expect("hub lock is never poisoned")
            .len()
    }

    pub fn publish_turn(&self, conversation: &store::Conversation, turn: &Turn) {
        let mut map = self
            .conversations
            .lock()
            .expect("hub lock is never poisoned");
        if let Some(tx) = map.get(&conversation.id) {
            if tx.receiver_count() == 0 {
                map.remove(&conversation.id);
            } else {
                let _ = tx.send(ConversationEvent {
                    conversation_id: conversation.id.clone(),
                    turn: turn.clone(),
                    held_by_agent: conversation.held_by_agent,
                });
            }
        }
    }

    pub fn watch_escalations(&self) -> broadcast::Receiver<EscalationEvent> {
        self.escalations.subscribe()
    }

    pub fn publish_escalation(&self, kind: EscalationEventKind, escalation: &Escalation) {
        let _ = self.escalations.send(EscalationEvent {
            kind,
            escalation: escalation.clone(),
        });
    }
}

/// How the pipeline answers.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_text_bytes: usize,
    /// Token budget of the history put into the prompt.
    pub history_tokens: usize,
    /// Default sampling; `max_new_tokens` is also the cap for overrides.
    pub sampling: Sampling,
    /// How long a reply may take, start to end.
    pub reply_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_text_bytes: 4000,
            history_tokens: 512,
            sampling: Sampling::default(),
            reply_timeout: Duration::from_secs(30),
        }
    }
}

/// Per-request sampling overrides, clamped to the server's limits.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_new_tokens: Option<u32>,
}

impl Overrides {
    /// The sampling for one reply: the defaults with these overrides,
    /// temperature in [0, 2], top-p in (0, 1], tokens at most the default cap.
    pub fn apply(&self, defaults: &Sampling) -> Result<Sampling, Error> {
        let mut s = defaults.clone();
        if let Some(t) = self.temperature {
            if !t.is_finite() || t < 0.0 {
                return Err(Error::InvalidArgument(format!(
                    "generation.temperature is {t}; it must be 0 (greedy) or more"
                )));
            }
            s.temperature = t.min(2.0);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "generation.top_p is {p}; it must be in (0, 1]"
                )));
            }
            s.top_p = p;
        }
        if let Some(n) = self.max_new_tokens {
            s.max_new_tokens = n.clamp(1, defaults.max_new_tokens);
        }
        Ok(s)
    }
}

/// One customer message as a platform sends it.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    pub tenant_id: String,
    pub user_id: String,
    /// Empty: a new conversation.
    pub conversation_id: String,
    pub text: String,
    pub order_id: String,
    /// e.g. "zh-CN" or "en-US"; empty: detected from the text.
    pub locale: String,
    pub overrides: Overrides,
}

/// The first thing a streaming caller learns: the stored customer turn and
/// the decision.
#[derive(Debug, Clone)]
pub struct Started {
    pub conversation_id: String,
    pub customer_turn_id: u64,
    pub decision: TurnDecision,
}

/// What a streaming caller receives while the reply is written.
#[derive(Debug, Clone)]
pub enum Progress {
    Started(Started),
    Delta(String),
}

/// The finished journey.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub conversation_id: String,
    pub customer_turn_id: u64,
    /// The decision as finally stored (a generator failure turns "answer"
    /// into "escalate").
    pub decision: TurnDecision,
    /// Empty when the bot stayed silent.
    pub reply: String,
    /// 0 when the bot stayed silent.
    pub reply_turn_id: u64,
    pub fallback: bool,
}

pub struct Pipeline {
    pub store: Store,
    pub classifier: Arc<dyn Classifier>,
    /// None: kefu runs without a generator and sends fallback replies.
    pub generator: Option<Arc<dyn Generator>>,
    pub prompts: Arc<Prompts>,
    pub policy: Policy,
    pub settings: Settings,
    pub hub: Arc<Hub>,
    pub clock: Clock,
    /// Bounds concurrent journeys.
    pub permits: Arc<Semaphore>,
}

/// P(positive) - P(negative).
fn polarity(c: &Classification) -> f32 {
    c.sentiment_probability("positive") - c.sentiment_probability("negative")
}

fn profile_summary(p: Option<&store::Profile>, voice: Voice) -> String {
    let Some(p) = p else { return String::new() };
    // (Simplified, Traditional, English), as `Voice` orders them.
    let mood = if p.sentiment_score >= 0.3 {
        ("满意", "滿意", "mostly satisfied")
    } else if p.sentiment_score <= -0.3 {
        ("近期不满", "近期不滿", "recently unhappy")
    } else {
        ("情绪平稳", "情緒平穩", "calm")
    };
    let top = p
        .intent_counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(i, _)| crate::generate::prompt::intent_label(i, voice))
        .unwrap_or_default();
    match voice {
        Voice::Traditional => format!(
            "老顧客，已諮詢{}次，{}，常問「{}」",
            p.message_count, mood.1, top
        ),
        Voice::Simplified => format!(
            "老顾客，已咨询{}次，{}，常问「{}」",
            p.message_count, mood.0, top
        ),
        Voice::English => format!(
            "returning customer, {} messages, {}, often asks about {}",
            p.message_count, mood.2, top
        ),
    }
}

/// How a Chinese reply is written: as the locale says, else as the message
/// is written, else as the customer's latest message that shows it ("好的"
/// after "我的貨到了嗎" is answered in Traditional characters too).
fn script_of(locale: &str, text: &str, history: &[HistoryTurn]) -> Script {
    Script::of_locale(locale)
        .or_else(|| Script::detect(text))
        .or_else(|| {
            history
                .iter()
                .rev()
                .filter(|t| t.author == "customer")
                .find_map(|t| Script::detect(&t.text))
        })
        .unwrap_or(Script::Simplified)
}

fn language_of(locale: &str, text: &str) -> Language {
    let l = locale.to_ascii_lowercase();
    if l.starts_with("zh") {
        Language::Zh
    } else if l.starts_with("en") {
        Language::En
    } else {
        Language::detect(text)
    }
}

impl Pipeline {
    /// Checks a message, and that the conversation it continues is this
    /// customer's, without changing anything; [`Pipeline::handle`] runs the
    /// same checks first.
    pub fn validate(&self, m: &Inbound) -> Result<(), Error> {
        validate_id(&m.tenant_id, "tenant_id")?;
        validate_id(&m.user_id, "user_id")?;
        if !m.conversation_id.is_empty() {
            validate_id(&m.conversation_id, "conversation_id")?;
        }
        validate_text(&m.text, self.settings.max_text_bytes, "text")?;
        if m.order_id.chars().count() > MAX_ID_CHARS {
            return Err(Error::InvalidArgument(format!(
                "metadata.order_id is longer than {MAX_ID_CHARS} characters"
            )));
        }
        m.overrides.apply(&self.settings.sampling)?;
        if !m.conversation_id.is_empty() {
            self.store
                .owned_conversation(&m.conversation_id, &m.tenant_id, &m.user_id)?;
        }
        Ok(())
    }

    /// Runs one message's journey. `progress`, when given, receives the
    /// decision as soon as the customer's turn is stored, then the reply as
    /// it is written; if its receiver goes away, generation stops and no
    /// reply is stored.
    pub async fn handle(
        &self,
        m: Inbound,
        progress: Option<mpsc::Sender<Progress>>,
    ) -> Result<Outcome, Error> {
        self.validate(&m)?;
        let span = tracing::info_span!(
            "message",
            conversation_id = tracing::field::Empty,
            user_id = %m.user_id,
            intent = tracing::field::Empty,
            route = tracing::field::Empty,
        );
        self.journey(m, progress).instrument(span).await
    }

    async fn journey(
        &self,
        m: Inbound,
        progress: Option<mpsc::Sender<Progress>>,
    ) -> Result<Outcome, Error> {
        let started = Instant::now();
        let sampling = m.overrides.apply(&self.settings.sampling)?;
        let now = (self.clock)();
        let mut conv = if m.conversation_id.is_empty() {
            Store::new_conversation(&m.tenant_id, &m.user_id, now)
        } else {
            self.store
                .owned_conversation(&m.conversation_id, &m.tenant_id, &m.user_id)?
        };
        let span = tracing::Span::current();
        span.record("conversation_id", conv.id.as_str());

        let (text, masked) = redact(&m.text);
        let (order_id, _) = redact(&m.order_id);
        if masked.total() > 0 {
            tracing::info!(
                phones = masked.phones,
                id_numbers = masked.id_numbers,
                bank_cards = masked.bank_cards,
                emails = masked.emails,
                "personal data masked"
            );
        }
        let classification = self
            .classifier
            .classify(std::slice::from_ref(&text))
            .await?
            .pop()
            .ok_or_else(|| Error::Internal("the classifier returned nothing".into()))?;
        let language = language_of(&m.locale, &text);
        let intent = classification.top_intent().label;
        span.record("intent", intent);

        let profile = self.store.profile(&m.tenant_id, &m.user_id)?;
        let history: Vec<HistoryTurn> = self
            .store
            .turns(&conv.id, Some(40))?
            .into_iter()
            .map(|t| HistoryTurn {
                author: match t.author {
                    Author::Customer => "customer",
                    Author::Bot => "bot",
                    Author::Agent => "agent",
                }
                .into(),
                text: t.text,
            })
            .collect();
        let script = script_of(&m.locale, &text, &history);
        // Whether an agent has taken the open escalation or it still waits
        // in the queue: the explanation tells the two apart.
        let agent_claimed = match conv.open_escalation.as_deref() {
            Some(id) if conv.held_by_agent => self
                .store
                .escalation(id)?
                .is_some_and(|e| e.status == store::EscalationStatus::Claimed),
            _ => false,
        };
        let state = ConversationState {
            held_by_agent: conv.held_by_agent,
            agent_claimed,
            negative_streak: conv.negative_streak,
            clarifications: conv.clarifications,
        };
        let decision = route::decide(
            &self.policy,
            &classification,
            state,
            self.generator.is_some(),
        );
        span.record("route", route_name(decision.route));

        let mut ctx = PromptContext {
            message: text.clone(),
            language,
            script,
            intent: intent.to_string(),
            sentiment: classification.top_sentiment().label.to_string(),
            top_intents: classification
                .intent
                .iter()
                .take(3)
                .filter(|s| s.probability >= 0.1)
                .map(|s| s.label.to_string())
                .collect(),
            order_id,
            profile: profile_summary(profile.as_ref(), self.prompts.voice(language, script)),
            priority: decision
                .priority
                .map_or("normal", |p| match p {
                    route::Priority::High => "high",
                    route::Priority::Normal => "normal",
                })
                .into(),
            history: bounded_history(&history, self.settings.history_tokens),
        };
        if ctx.top_intents.is_empty() {
            ctx.top_intents.push(intent.to_string());
        }

        let stored = TurnDecision::new(&decision, &classification, language);
        let negative =
            classification.sentiment_probability("negative") >= self.policy.negative_turn;
        let signals = TurnSignals {
            intent: intent.to_string(),
            sentiment: polarity(&classification),
            negative,
            clarified: decision.route == Route::Clarify,
            language: language.code().into(),
        };
        // Held conversations whose escalation was resolved without handing
        // back go back into the queue when the customer writes again.
        let escalate = match decision.route {
            Route::Escalate => Some(NewEscalation {
                priority: stored.priority.clone().unwrap_or_else(|| "normal".into()),
                decision: stored.to_json(),
            }),
            Route::Silent if conv.open_escalation.is_none() => Some(NewEscalation {
                priority: "normal".into(),
                decision: stored.to_json(),
            }),
            _ => None,
        };
        let customer_turn = NewTurn {
            escalate,
            ..NewTurn::customer(&text, Some(stored.to_json()), &signals, now)
        };
        let (customer, opened) = self.store.append_turn(&mut conv, customer_turn).await?;
        self.hub.publish_turn(&conv, &customer);
        if let Some(e) = &opened {
            self.hub.publish_escalation(EscalationEventKind::New, e);
        }
        if let Some(tx) = &progress {
            let _ = tx
                .send(Progress::Started(Started {
                    conversation_id: conv.id.clone(),
                    customer_turn_id: customer.turn_id,
                    decision: stored.clone(),
                }))
                .await;
        }

        let mut outcome = Outcome {
            conversation_id: conv.id.clone(),
            customer_turn_id: customer.turn_id,
            decision: stored,
            reply: String::new(),
            reply_turn_id: 0,
            fallback: false,
        };
        let (reply, amended) = match decision.route {
            Route::Silent => {
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "stored for the agent"
                );
                return Ok(outcome);
            }
            Route::Clarify => (self.prompts.clarify(&ctx).map_err(template)?, None),
            Route::Escalate if decision.rule == "generator_unavailable" => {
                outcome.fallback = true;
                (self.prompts.fallback(&ctx).map_err(template)?, None)
            }
            Route::Escalate => (
                self.prompts.escalation_notice(&ctx).map_err(template)?,
                None,
            ),
            Route::Answer => {
                let generator = self
                    .generator
                    .as_ref()
                    .expect("the policy answers only with a generator");
                match self
                    .write_reply(generator.as_ref(), &ctx, sampling, progress.as_ref())
                    .await
                {
                    Ok(Some(reply)) => (reply, None),
                    // The caller went away mid-stream: nothing more to do.
                    Ok(None) => return Ok(outcome),
                    Err(why) => {
                        tracing::warn!(reason = %why, "generator failed; fallback reply");
                        let failed = route::generator_failed(decision.clone(), &why.to_string());
                        let amended = TurnDecision::new(&failed, &classification, language);
                        outcome.fallback = true;
                        outcome.decision = amended.clone();
                        (
                            self.prompts.fallback(&ctx).map_err(template)?,
                            Some(amended),
                        )
                    }
                }
            }
        };
        if decision.route != Route::Answer || amended.is_some() {
            if let Some(tx) = &progress {
                let _ = tx.send(Progress::Delta(reply.clone())).await;
            }
        }
        let mut bot = NewTurn::bot(&reply, (self.clock)());
        if let Some(amended) = &amended {
            bot.escalate = Some(NewEscalation {
                priority: "normal".into(),
                decision: amended.to_json(),
            });
            bot.amend_decision = Some((customer.turn_id, amended.to_json()));
        }
        let (bot_turn, opened) = self.store.append_turn(&mut conv, bot).await?;
        self.hub.publish_turn(&conv, &bot_turn);
        if let Some(e) = &opened {
            self.hub.publish_escalation(EscalationEventKind::New, e);
        }
        outcome.reply = reply;
        outcome.reply_turn_id = bot_turn.turn_id;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            fallback = outcome.fallback,
            "answered"
        );
        Ok(outcome)
    }

    /// Generates the reply, forwarding deltas. Ok(None) when the streaming
    /// caller went away (generation is stopped by dropping the stream).
    async fn write_reply(
        &self,
        generator: &dyn Generator,
        ctx: &PromptContext,
        sampling: Sampling,
        progress: Option<&mpsc::Sender<Progress>>,
    ) -> Result<Option<String>, generate::Error> {
        let request = generate::Request {
            messages: self.prompts.messages(ctx)?,
            sampling,
            deadline: Instant::now() + self.settings.reply_timeout,
        };
        // The generator has its own bound; wait for a slot until the deadline
        // rather than failing a customer who already passed admission.
        let mut stream = loop {
            match generator.stream(request.clone()).await {
                Err(generate::Error::Overloaded(_)) if Instant::now() < request.deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break other?,
            }
        };
        let mut reply = String::new();
        while let Some(event) = stream.recv().await {
            match event? {
                Event::Delta(d) => {
                    if let Some(tx) = progress {
                        if tx.send(Progress::Delta(d.clone())).await.is_err() {
                            return Ok(None);
                        }
                    }
                    reply.push_str(&d);
                }
                Event::Done(_) => {
                    let trimmed = reply.trim();
                    if trimmed.is_empty() {
                        return Err(generate::Error::Failed("the reply was empty".into()));
                    }
                    // Streamed deltas must equal the stored reply, so only
                    // trailing whitespace (never streamed content) is cut.
                    let keep = reply.trim_end().len();
                    reply.truncate(keep);
                    return Ok(Some(reply));
                }
            }
        }
        Err(generate::Error::Failed(
            "the reply stream ended without finishing".into(),
        ))
    }
}

fn template(e: generate::Error) -> Error {
    Error::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_conversation_channel_is_freed_when_its_last_watcher_leaves() {
        let hub = Hub::default();
        let a = hub.watch_conversation("c1");
        let b = hub.watch_conversation("c1");
        assert_eq!(hub.watched_conversations(), 1);
        drop(a);
        hub.release_conversation("c1");
        assert_eq!(hub.watched_conversations(), 1, "b still watches");
        drop(b);
        hub.release_conversation("c1");
        assert_eq!(hub.watched_conversations(), 0);
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("shop-7", "tenant_id").is_ok());
        assert!(validate_id("顾客_1", "user_id").is_ok());
        for bad in ["", "a b", "tab\there", &"x".repeat(129)] {
            assert!(validate_id(bad, "user_id").is_err(), "{bad:?}");
        }
        let err = validate_id(&"x".repeat(200), "user_id")
            .unwrap_err()
            .to_string();
        assert!(err.contains("200") && err.contains("128"), "{err}");
    }

    #[test]
    fn overrides_are_clamped_to_the_server_limits() {
        let defaults = Sampling {
            max_new_tokens: 100,
            ..Sampling::default()
        };
        let s = Overrides {
            temperature: Some(5.0),
            top_p: Some(0.5),
            max_new_tokens: Some(1000),
        }
        .apply(&defaults)
        .unwrap();
        assert_eq!((s.temperature, s.top_p, s.max_new_tokens), (2.0, 0.5, 100));
        assert!(Overrides {
            top_p: Some(0.0),
            ..Overrides::default()
        }
        .apply(&defaults)
        .is_err());
        assert!(Overrides {
            temperature: Some(-1.0),
            ..Overrides::default()
        }
        .apply(&defaults)
        .is_err());
    }

    #[test]
    fn locale_overrides_detection() {
        assert_eq!(language_of("", "where is my parcel"), Language::En);
        assert_eq!(language_of("", "快递到哪了"), Language::Zh);
        assert_eq!(language_of("zh-CN", "ok"), Language::Zh);
        assert_eq!(language_of("en-US", "快递"), Language::En);
    }

    #[test]
    fn script_follows_locale_then_message_then_history() {
        let turn = |author: &str, text: &str| HistoryTurn {
            author: author.into(),
            text: text.into(),
        };
        let history = vec![
            turn("customer", "我的貨到了嗎"),
            turn("bot", "您好，麻烦提供一下订单号"),
        ];
        assert_eq!(script_of("", "好的", &history), Script::Traditional);
        assert_eq!(script_of("", "好的", &[]), Script::Simplified);
        assert_eq!(
            script_of("", "那什么时候发货", &history),
            Script::Simplified
        );
        assert_eq!(script_of("zh-TW", "好的", &[]), Script::Traditional);
        assert_eq!(script_of("zh-CN", "我的貨到了嗎", &[]), Script::Simplified);
    }
}
