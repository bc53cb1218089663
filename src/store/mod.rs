//! kefu's memory in sled: conversations, turns and customer profiles, one
//! tree each. This is the only module that touches sled.
//!
//! Keys are laid out for range scans: a conversation's turns are
//! `conversation_id 0x00 turn_id (big-endian u64)`, so they iterate in order;
//! a profile is `tenant_id 0x00 user_id`; a customer's conversations are
//! indexed under `tenant_id 0x00 user_id 0x00 conversation_id`. Every value
//! is JSON with a format version `v`.
//!
//! Durability: [`Store::append_turn`] writes the turn, the conversation and
//! the profile in one transaction, then flushes; when it returns, the turn
//! survives a crash (SIGKILL included).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

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
    pub held_by_agent: bool,
    /// Negative customer turns in a row, for the routing policy.
    pub negative_streak: u32,
    /// Clarifying questions in a row, for the routing policy.
    pub clarifications: u32,
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

/// What a customer turn tells the profile.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnSignals {
    pub intent: String,
    /// P(positive) - P(negative) of this turn.
    pub sentiment: f32,
    pub negative: bool,
    pub clarified: bool,
    pub escalated: bool,
    pub language: String,
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

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialise")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    conversations: sled::Tree,
    turns: sled::Tree,
    profiles: sled::Tree,
    user_conversations: sled::Tree,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::open(dir)?;
        Ok(Self {
            conversations: db.open_tree("conversations")?,
            turns: db.open_tree("turns")?,
            profiles: db.open_tree("profiles")?,
            user_conversations: db.open_tree("user_conversations")?,
            db,
        })
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

    /// Appends a turn to `conversation` (stored if new) and, for customer
    /// turns, folds `signals` into the customer's profile: all in one sled
    /// transaction, flushed before returning. Returns the stored turn.
    pub async fn append_turn(
        &self,
        conversation: &mut Conversation,
        new: NewTurn<'_>,
    ) -> Result<Turn, Error> {
        let NewTurn {
            author,
            text,
            decision,
            agent_id,
            signals,
            now_ms,
        } = new;
        let result = (
            &self.conversations,
            &self.turns,
            &self.profiles,
            &self.user_conversations,
        )
            .transaction(|(convs, turns, profiles, index)| {
                // Re-read inside the transaction: another turn may have landed.
                let mut conv: Conversation = match convs.get(conversation.id.as_bytes())? {
                    Some(b) => decode(conversation.id.as_bytes(), &b)
                        .map_err(ConflictableTransactionError::Abort)?,
                    None => conversation.clone(),
                };
                conv.last_turn += 1;
                let turn = Turn {
                    v: FORMAT_VERSION,
                    turn_id: conv.last_turn,
                    author,
                    text: text.to_string(),
                    created_ms: now_ms,
                    decision: decision.clone(),
                    agent_id: agent_id.to_string(),
                };
                if let Some(s) = signals {
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
                    let key = profile_key(&conv.tenant_id, &conv.user_id);
                    let mut p: Profile = match profiles.get(&key)? {
                        Some(b) => decode(&key, &b).map_err(ConflictableTransactionError::Abort)?,
                        None => Profile {
                            v: FORMAT_VERSION,
                            tenant_id: conv.tenant_id.clone(),
                            user_id: conv.user_id.clone(),
                            first_seen_ms: now_ms,
                            sentiment_score: s.sentiment,
                            ..Profile::default()
                        },
                    };
                    if p.message_count > 0 {
                        p.sentiment_score = (1.0 - SENTIMENT_ALPHA) * p.sentiment_score
                            + SENTIMENT_ALPHA * s.sentiment;
                    }
                    p.last_seen_ms = now_ms;
                    p.message_count += 1;
                    p.consecutive_negative = if s.negative {
                        p.consecutive_negative + 1
                    } else {
                        0
                    };
                    *p.intent_counts.entry(s.intent.clone()).or_default() += 1;
                    if s.escalated {
                        p.escalation_count += 1;
                    }
                    p.language = s.language.clone();
                    profiles.insert(key, encode(&p))?;
                }
                turns.insert(turn_key(&conv.id, turn.turn_id), encode(&turn))?;
                convs.insert(conv.id.as_bytes(), encode(&conv))?;
                index.insert(
                    user_conversation_key(&conv.tenant_id, &conv.user_id, &conv.id),
                    &[],
                )?;
                Ok((conv, turn))
            });
        let (conv, turn) = match result {
            Ok(ok) => ok,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        // Acknowledge only durable turns.
        self.db.flush_async().await?;
        *conversation = conv;
        Ok(turn)
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
            escalated: false,
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
        let t1 = store
            .append_turn(
                &mut conv,
                NewTurn::customer("我的快递到哪了", None, &neg, 1_000),
            )
            .await
            .unwrap();
        let t2 = store
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
}
