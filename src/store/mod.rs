//! kefu's memory in sled: conversations, turns, customer profiles,
//! escalations and agents' label corrections, one tree each. This is the only
//! module that touches sled.
//!
//! Keys are laid out for range scans: a conversation's turns are
//! `conversation_id 0x00 turn_id (big-endian u64)`, so they iterate in order;
//! a profile is `tenant_id 0x00 user_id`, so one tenant's profiles are one
//! range; a customer's conversations are indexed under
//! `tenant_id 0x00 user_id 0x00 conversation_id`; the escalation queue index
//! is `open? priority created_ms id` (see [`queue_key`]), so the queue reads
//! in the order agents work it. Every value is JSON with a format version `v`.
//!
//! Durability: every write that changes more than one tree is one sled
//! transaction. [`Store::append_turn`] returns only once its turn is on disk
//! (see [`Durability`]), so an acknowledged turn survives a crash, SIGKILL
//! included.

mod escalations;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

pub use escalations::{Correction, CorrectionRecord, DeleteCounts, EscalationStatus, Page};

/// The format version written into every stored record.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("conversation {0} does not exist")]
    NoConversation(String),
    #[error("conversation {id} belongs to another customer")]
    WrongOwner { id: String },
    #[error("escalation {0} does not exist")]
    NoEscalation(String),
    /// A request that conflicts with the state of the conversation or
    /// escalation (claimed by someone else, already resolved, ...).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

type TxResult<T> = Result<T, ConflictableTransactionError<Error>>;

fn abort<T>(e: Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// Who wrote a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Author {
    Customer,
    Bot,
    Agent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub v: u32,
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub created_ms: u64,
    /// The last turn id given out; turns start at 1.
    pub last_turn: u64,
    /// Humans hold the conversation: the bot stays silent.
    pub held_by_agent: bool,
    /// Negative customer turns in a row, for the routing policy.
    pub negative_streak: u32,
    /// Clarifying questions in a row, for the routing policy.
    pub clarifications: u32,
    /// The escalation waiting for or held by an agent, if any.
    #[serde(default)]
    pub open_escalation: Option<String>,
    /// Every escalation of this conversation, oldest first.
    #[serde(default)]
    pub escalations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub v: u32,
    pub turn_id: u64,
    pub author: Author,
    /// Masked text (personal data removed before storing).
    pub text: String,
    pub created_ms: u64,
    /// The routing decision of a customer turn, as the API shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_id: String,
    /// For customer turns: P(positive) - P(negative), for sentiment trends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentiment: Option<f32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub v: u32,
    pub tenant_id: String,
    pub user_id: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub message_count: u64,
    /// Exponentially weighted P(positive) - P(negative), in [-1, 1].
    pub sentiment_score: f32,
    pub consecutive_negative: u32,
    pub intent_counts: BTreeMap<String, u64>,
    pub escalation_count: u64,
    pub language: String,
}

/// An escalation: a conversation waiting for, or held by, a human agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Escalation {
    pub v: u32,
    pub id: String,
    pub conversation_id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub status: EscalationStatus,
    /// "normal" or "high".
    pub priority: String,
    /// The decision that escalated, as the API shows it.
    pub decision: serde_json::Value,
    pub created_ms: u64,
    #[serde(default)]
    pub agent_id: String,
    #[serde(default)]
    pub claimed_ms: u64,
    #[serde(default)]
    pub resolved_ms: u64,
    #[serde(default)]
    pub outcome: String,
}

/// What a customer turn tells the profile.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnSignals {
    pub intent: String,
    /// P(positive) - P(negative) of this turn.
    pub sentiment: f32,
    pub negative: bool,
    pub clarified: bool,
    pub language: String,
}

/// An escalation to open together with a turn.
#[derive(Debug, Clone)]
pub struct NewEscalation {
    /// "normal" or "high".
    pub priority: String,
    pub decision: serde_json::Value,
}

/// A turn to append.
#[derive(Debug, Clone)]
pub struct NewTurn<'a> {
    pub author: Author,
    pub text: &'a str,
    pub decision: Option<serde_json::Value>,
    /// The agent writing it; empty for customer and bot turns.
    pub agent_id: &'a str,
    /// For customer turns: what to fold into the profile.
    pub signals: Option<&'a TurnSignals>,
    /// Hand the conversation to humans and queue it for agents, unless an
    /// escalation is already open.
    pub escalate: Option<NewEscalation>,
    /// Replace the stored decision of an earlier turn (when the generator
    /// fails after the customer turn was stored with "answer").
    pub amend_decision: Option<(u64, serde_json::Value)>,
    pub now_ms: u64,
}

impl<'a> NewTurn<'a> {
    pub fn customer(
        text: &'a str,
        decision: Option<serde_json::Value>,
        signals: &'a TurnSignals,
        now_ms: u64,
    ) -> Self {
        Self {
            author: Author::Customer,
            text,
            decision,
            agent_id: "",
            signals: Some(signals),
            escalate: None,
            amend_decision: None,
            now_ms,
        }
    }

    pub fn bot(text: &'a str, now_ms: u64) -> Self {
        Self {
            author: Author::Bot,
            text,
            decision: None,
            agent_id: "",
            signals: None,
            escalate: None,
            amend_decision: None,
            now_ms,
        }
    }
}

/// Weight of the newest turn in the running sentiment score.
const SENTIMENT_ALPHA: f32 = 0.3;

pub fn turn_key(conversation: &str, turn: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(conversation.len() + 9);
    k.extend_from_slice(conversation.as_bytes());
    k.push(0);
    k.extend_from_slice(&turn.to_be_bytes());
    k
}

pub fn profile_key(tenant: &str, user: &str) -> Vec<u8> {
    [tenant.as_bytes(), &[0], user.as_bytes()].concat()
}

fn user_conversation_key(tenant: &str, user: &str, conversation: &str) -> Vec<u8> {
    [
        tenant.as_bytes(),
        &[0],
        user.as_bytes(),
        &[0],
        conversation.as_bytes(),
    ]
    .concat()
}

/// The escalation queue index: open entries (waiting or claimed) before
/// resolved ones, high priority before normal, oldest first.
pub fn queue_key(e: &Escalation) -> Vec<u8> {
    let open = u8::from(e.status == EscalationStatus::Resolved);
    let priority = u8::from(e.priority != "high");
    [
        &[open, priority][..],
        &e.created_ms.to_be_bytes(),
        e.id.as_bytes(),
    ]
    .concat()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialise")
}

fn tx_get<T: for<'de> Deserialize<'de>>(
    tree: &TransactionalTree,
    key: &[u8],
) -> TxResult<Option<T>> {
    match tree.get(key)? {
        Some(b) => decode(key, &b)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
        None => Ok(None),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When an acknowledged write is on disk. Either way one task does all the
/// flushing: sled 0.34 runs each `flush_async` on its small I/O thread pool,
/// and dozens of concurrent flushes starve that pool and deadlock it (seen
/// under 64 concurrent clients), so writers never flush on their own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Durability {
    /// Each write waits for the next flush, which starts as soon as the one
    /// in progress ends: writes that arrive during a flush share the next
    /// one (group commit without added delay).
    EveryTurn,
    /// Flushes run at most once per interval: fewer disk syncs under load,
    /// up to one interval of extra latency per write. Still nothing is
    /// acknowledged before it is durable.
    GroupCommit(Duration),
}

/// The views of every tree inside one transaction.
struct Tx<'a> {
    convs: &'a TransactionalTree,
    turns: &'a TransactionalTree,
    profiles: &'a TransactionalTree,
    index: &'a TransactionalTree,
    escalations: &'a TransactionalTree,
    queue: &'a TransactionalTree,
    corrections: &'a TransactionalTree,
}

/// The flusher's bookkeeping: writers take a ticket after their write and
/// wait until a flush that started after it has finished.
struct Flusher {
    db: sled::Db,
    issued: AtomicU64,
    flushed: tokio::sync::watch::Sender<u64>,
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    conversations: sled::Tree,
    turns: sled::Tree,
    profiles: sled::Tree,
    user_conversations: sled::Tree,
    escalations: sled::Tree,
    queue: sled::Tree,
    corrections: sled::Tree,
    flusher: Option<Arc<Flusher>>,
    /// Serialises flushes of a store opened without a flusher task.
    flush_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// Opens (or creates) the store in `dir` for tools and tests: each
    /// write flushes before returning, one flush at a time.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::open(dir)?;
        Ok(Self {
            conversations: db.open_tree("conversations")?,
            turns: db.open_tree("turns")?,
            profiles: db.open_tree("profiles")?,
            user_conversations: db.open_tree("user_conversations")?,
            escalations: db.open_tree("escalations")?,
            queue: db.open_tree("escalation_queue")?,
            corrections: db.open_tree("corrections")?,
            db,
            flusher: None,
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Opens the store for the server: one flusher task on the current
    /// tokio runtime does every flush; it stops when the last clone of the
    /// store is dropped.
    pub fn open_with(dir: &Path, durability: Durability) -> Result<Self, Error> {
        let mut store = Self::open(dir)?;
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let wake = Arc::new(tokio::sync::Notify::new());
        let flusher = Arc::new(Flusher {
            db: store.db.clone(),
            issued: AtomicU64::new(0),
            flushed: tx,
            wake: wake.clone(),
        });
        // The task holds the flusher (and so the database) only while it
        // flushes: once the last Store clone is gone, sled closes and its
        // file lock is released at once.
        let weak = Arc::downgrade(&flusher);
        let every = match durability {
            Durability::EveryTurn => None,
            Durability::GroupCommit(d) => Some(d.max(Duration::from_millis(1))),
        };
        tokio::spawn(async move {
            loop {
                let pending = match weak.upgrade() {
                    None => return,
                    Some(f) => f.issued.load(Ordering::Acquire) > *f.flushed.borrow(),
                };
                if !pending {
                    // Wait for a writer, and check every second whether
                    // the store is gone.
                    let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
                    continue;
                }
                if let Some(d) = every {
                    tokio::time::sleep(d).await;
                }
                let Some(f) = weak.upgrade() else { return };
                // Everything written before this load is covered by the flush.
                let target = f.issued.load(Ordering::Acquire);
                match f.db.flush_async().await {
                    Ok(_) => {
                        f.flushed.send_replace(target);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store flush failed; retrying");
                        drop(f);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        store.flusher = Some(flusher);
        Ok(store)
    }

    /// Returns once everything written before the call is on disk.
    async fn durable(&self) -> Result<(), Error> {
        match &self.flusher {
            None => {
                let _one_at_a_time = self.flush_lock.lock().await;
                self.db.flush_async().await?;
            }
            Some(f) => {
                let ticket = f.issued.fetch_add(1, Ordering::AcqRel) + 1;
                let mut rx = f.flushed.subscribe();
                f.wake.notify_one();
                rx.wait_for(|done| *done >= ticket)
                    .await
                    .map_err(|_| Error::Invalid("the store is closing".into()))?;
            }
        }
        Ok(())
    }

    fn transaction<R>(&self, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R, Error> {
        let result = (
            &self.conversations,
            &self.turns,
            &self.profiles,
            &self.user_conversations,
            &self.escalations,
            &self.queue,
            &self.corrections,
        )
            .transaction(
                |(convs, turns, profiles, index, escalations, queue, corrections)| {
                    f(&Tx {
                        convs,
                        turns,
                        profiles,
                        index,
                        escalations,
                        queue,
                        corrections,
                    })
                },
            );
        match result {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// A new conversation for a customer; not stored until its first turn.
    pub fn new_conversation(tenant_id: &str, user_id: &str, now_ms: u64) -> Conversation {
        Conversation {
            v: FORMAT_VERSION,
            id: format!("c_{}", uuid::Uuid::new_v4().simple()),
            tenant_id: tenant_id.into(),
            user_id: user_id.into(),
            created_ms: now_ms,
            last_turn: 0,
            held_by_agent: false,
            negative_streak: 0,
            clarifications: 0,
            open_escalation: None,
            escalations: Vec::new(),
        }
    }

    pub fn conversation(&self, id: &str) -> Result<Option<Conversation>, Error> {
        self.conversations
            .get(id.as_bytes())?
            .map(|b| decode(id.as_bytes(), &b))
            .transpose()
    }

    /// The conversation `id` of this customer, or an error saying why not.
    pub fn owned_conversation(
        &self,
        id: &str,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<Conversation, Error> {
        let c = self
            .conversation(id)?
            .ok_or_else(|| Error::NoConversation(id.into()))?;
        if c.tenant_id != tenant_id || c.user_id != user_id {
            return Err(Error::WrongOwner { id: id.into() });
        }
        Ok(c)
    }

    pub fn profile(&self, tenant_id: &str, user_id: &str) -> Result<Option<Profile>, Error> {
        let key = profile_key(tenant_id, user_id);
        self.profiles
            .get(&key)?
            .map(|b| decode(&key, &b))
            .transpose()
    }

    /// Every profile (of one tenant when `tenant_id` is given), read lazily
    /// in key order: memory stays bounded however many there are.
    pub fn profiles(
        &self,
        tenant_id: Option<&str>,
    ) -> impl Iterator<Item = Result<Profile, Error>> + Send + 'static {
        let iter = match tenant_id {
            Some(t) => self.profiles.scan_prefix([t.as_bytes(), &[0]].concat()),
            None => self.profiles.iter(),
        };
        iter.map(|item| {
            let (k, v) = item?;
            decode(&k, &v)
        })
    }

    /// The turns of a conversation, oldest first; `last` keeps only the
    /// most recent ones.
    pub fn turns(&self, conversation: &str, last: Option<usize>) -> Result<Vec<Turn>, Error> {
        let prefix = [conversation.as_bytes(), &[0]].concat();
        let mut out = Vec::new();
        let iter = self.turns.scan_prefix(&prefix);
        match last {
            None => {
                for item in iter {
                    let (k, v) = item?;
                    out.push(decode(&k, &v)?);
                }
            }
            Some(n) => {
                for item in iter.rev().take(n) {
                    let (k, v) = item?;
                    out.push(decode(&k, &v)?);
                }
                out.reverse();
            }
        }
        Ok(out)
    }

    /// Appends a turn to `conversation` (stored if new); for customer turns
    /// folds `signals` into the customer's profile; opens an escalation when
    /// asked. All in one sled transaction, durable before returning.
    /// Returns the stored turn and the escalation it opened, if any.
    pub async fn append_turn(
        &self,
        conversation: &mut Conversation,
        new: NewTurn<'_>,
    ) -> Result<(Turn, Option<Escalation>), Error> {
        let (conv, turn, escalation) = self.transaction(|tx| {
            // Re-read inside the transaction: another turn may have landed.
            let mut conv: Conversation = tx_get(tx.convs, conversation.id.as_bytes())?
                .unwrap_or_else(|| conversation.clone());
            conv.last_turn += 1;
            let turn = Turn {
                v: FORMAT_VERSION,
                turn_id: conv.last_turn,
                author: new.author,
                text: new.text.to_string(),
                created_ms: new.now_ms,
                decision: new.decision.clone(),
                agent_id: new.agent_id.to_string(),
                sentiment: new.signals.map(|s| s.sentiment),
            };
            let key = profile_key(&conv.tenant_id, &conv.user_id);
            let mut profile: Option<Profile> = tx_get(tx.profiles, &key)?;
            if let Some(s) = new.signals {
                conv.negative_streak = if s.negative {
                    conv.negative_streak + 1
                } else {
                    0
                };
                conv.clarifications = if s.clarified {
                    conv.clarifications + 1
                } else {
                    0
                };
                let mut p = profile.take().unwrap_or_else(|| Profile {
                    v: FORMAT_VERSION,
                    tenant_id: conv.tenant_id.clone(),
                    user_id: conv.user_id.clone(),
                    first_seen_ms: new.now_ms,
                    sentiment_score: s.sentiment,
                    ..Profile::default()
                });
                if p.message_count > 0 {
                    p.sentiment_score =
                        (1.0 - SENTIMENT_ALPHA) * p.sentiment_score + SENTIMENT_ALPHA * s.sentiment;
                }
                p.last_seen_ms = new.now_ms;
                p.message_count += 1;
                p.consecutive_negative = if s.negative {
                    p.consecutive_negative + 1
                } else {
                    0
                };
                *p.intent_counts.entry(s.intent.clone()).or_default() += 1;
                p.language = s.language.clone();
                profile = Some(p);
            }
            let mut opened = None;
            if let Some(esc) = new
                .escalate
                .as_ref()
                .filter(|_| conv.open_escalation.is_none())
            {
                let e = Escalation {
                    v: FORMAT_VERSION,
                    id: format!("e_{}", uuid::Uuid::new_v4().simple()),
                    conversation_id: conv.id.clone(),
                    tenant_id: conv.tenant_id.clone(),
                    user_id: conv.user_id.clone(),
                    status: EscalationStatus::Waiting,
                    priority: esc.priority.clone(),
                    decision: esc.decision.clone(),
                    created_ms: new.now_ms,
                    agent_id: String::new(),
                    claimed_ms: 0,
                    resolved_ms: 0,
                    outcome: String::new(),
                };
                tx.escalations.insert(e.id.as_bytes(), encode(&e))?;
                tx.queue.insert(queue_key(&e), e.id.as_bytes())?;
                conv.held_by_agent = true;
                conv.open_escalation = Some(e.id.clone());
                conv.escalations.push(e.id.clone());
                if let Some(p) = profile.as_mut() {
                    p.escalation_count += 1;
                }
                opened = Some(e);
            }
            if let Some((turn_id, decision)) = &new.amend_decision {
                let k = turn_key(&conv.id, *turn_id);
                if let Some(mut earlier) = tx_get::<Turn>(tx.turns, &k)? {
                    earlier.decision = Some(decision.clone());
                    tx.turns.insert(k, encode(&earlier))?;
                }
            }
            if let Some(p) = &profile {
                tx.profiles.insert(key, encode(p))?;
            }
            tx.turns
                .insert(turn_key(&conv.id, turn.turn_id), encode(&turn))?;
            tx.convs.insert(conv.id.as_bytes(), encode(&conv))?;
            tx.index.insert(
                user_conversation_key(&conv.tenant_id, &conv.user_id, &conv.id),
                &[],
            )?;
            Ok((conv, turn, opened))
        })?;
        // Acknowledge only durable turns.
        self.durable().await?;
        *conversation = conv;
        Ok((turn, escalation))
    }

    /// Conversation ids of a customer.
    pub fn conversations_of(&self, tenant_id: &str, user_id: &str) -> Result<Vec<String>, Error> {
        let prefix = [tenant_id.as_bytes(), &[0], user_id.as_bytes(), &[0]].concat();
        self.user_conversations
            .scan_prefix(&prefix)
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[prefix.len()..]).into_owned()))
            .collect()
    }

    /// The number of records in each tree, for tests and diagnostics.
    pub fn tree_sizes(&self) -> Vec<(&'static str, usize)> {
        vec![
            ("conversations", self.conversations.len()),
            ("turns", self.turns.len()),
            ("profiles", self.profiles.len()),
            ("user_conversations", self.user_conversations.len()),
            ("escalations", self.escalations.len()),
            ("escalation_queue", self.queue.len()),
            ("corrections", self.corrections.len()),
        ]
    }

    /// Every key and value in every tree, for tests that prove something
    /// is gone.
    pub fn dump(&self) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for name in self.db.tree_names() {
            let Ok(tree) = self.db.open_tree(&name) else {
                continue;
            };
            let name = String::from_utf8_lossy(&name).into_owned();
            for (k, v) in tree.iter().flatten() {
                out.push((name.clone(), k.to_vec(), v.to_vec()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(intent: &str, sentiment: f32) -> TurnSignals {
        TurnSignals {
            intent: intent.into(),
            sentiment,
            negative: sentiment < -0.2,
            clarified: false,
            language: "zh".into(),
        }
    }

    #[test]
    fn turn_keys_sort_by_conversation_then_turn() {
        let mut keys = vec![
            turn_key("c1", 256),
            turn_key("c1", 2),
            turn_key("c10", 1),
            turn_key("c1", 10),
        ];
        keys.sort();
        assert_eq!(
            keys,
            vec![
                turn_key("c1", 2),
                turn_key("c1", 10),
                turn_key("c1", 256),
                turn_key("c10", 1)
            ]
        );
    }

    #[tokio::test]
    async fn turns_and_profile_are_written_together_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut conv = Store::new_conversation("shop", "u1", 1_000);
        let neg = signals("order_status", -0.8);
        let calm = signals("order_status", 0.0);
        let (t1, _) = store
            .append_turn(
                &mut conv,
                NewTurn::customer("我的快递到哪了", None, &neg, 1_000),
            )
            .await
            .unwrap();
        let (t2, _) = store
            .append_turn(&mut conv, NewTurn::bot("请提供订单号", 1_001))
            .await
            .unwrap();
        store
            .append_turn(
                &mut conv,
                NewTurn::customer("4512876390123", None, &calm, 2_000),
            )
            .await
            .unwrap();
        assert_eq!((t1.turn_id, t2.turn_id), (1, 2));
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let turns = store.turns(&conv.id, None).unwrap();
        assert_eq!(
            turns.iter().map(|t| t.turn_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(turns[1].author, Author::Bot);
        assert_eq!(store.turns(&conv.id, Some(2)).unwrap()[0].turn_id, 2);
        let p = store.profile("shop", "u1").unwrap().unwrap();
        assert_eq!(p.v, FORMAT_VERSION);
        assert_eq!(
            p.message_count, 2,
            "bot turns do not count as customer messages"
        );
        assert_eq!(p.intent_counts["order_status"], 2);
        assert_eq!((p.first_seen_ms, p.last_seen_ms), (1_000, 2_000));
        assert_eq!(p.consecutive_negative, 0);
        assert!((p.sentiment_score - 0.7 * -0.8).abs() < 1e-6);
        let stored = store.conversation(&conv.id).unwrap().unwrap();
        assert_eq!(stored.last_turn, 3);
        assert_eq!(
            store.conversations_of("shop", "u1").unwrap(),
            vec![conv.id.clone()]
        );
        assert!(matches!(
            store.owned_conversation(&conv.id, "shop", "u2"),
            Err(Error::WrongOwner { .. })
        ));
        assert!(matches!(
            store.owned_conversation("c_none", "shop", "u1"),
            Err(Error::NoConversation(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_writers_are_all_acknowledged() {
        // 64 writers at once used to starve sled's I/O pool with as many
        // concurrent flushes; one flusher serves them all.
        for durability in [
            Durability::EveryTurn,
            Durability::GroupCommit(std::time::Duration::from_millis(2)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_with(dir.path(), durability).unwrap();
            let mut tasks = Vec::new();
            for u in 0..64 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let mut conv = Store::new_conversation("shop", &format!("u{u}"), 1);
                    let s = signals("other", 0.0);
                    for i in 0..5 {
                        store
                            .append_turn(
                                &mut conv,
                                NewTurn::customer(&format!("m{i}"), None, &s, 2),
                            )
                            .await
                            .unwrap();
                    }
                    conv.id
                }));
            }
            let done = tokio::time::timeout(std::time::Duration::from_secs(60), async {
                let mut ids = Vec::new();
                for t in tasks {
                    ids.push(t.await.unwrap());
                }
                ids
            })
            .await
            .expect("every writer is acknowledged");
            for id in done {
                assert_eq!(store.turns(&id, None).unwrap().len(), 5);
            }
        }
    }
}
