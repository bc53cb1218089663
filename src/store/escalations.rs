//! The agents' side of the store: the escalation queue (claim, reply,
//! resolve), label corrections kept as training data, and deleting all of a
//! customer's data.

use serde::{Deserialize, Serialize};

use super::{
    abort, decode, encode, queue_key, turn_key, tx_get, user_conversation_key, Author,
    Conversation, Error, Escalation, NewTurn, Store, Turn,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscalationStatus {
    Waiting,
    Claimed,
    Resolved,
}

/// A corrected label for one customer turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Correction {
    pub turn_id: u64,
    /// Empty: the intent was right.
    pub intent: String,
    /// Empty: the sentiment was right.
    pub sentiment: String,
}

/// A stored correction: the masked text and the labels an agent gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrectionRecord {
    pub v: u32,
    pub conversation_id: String,
    pub turn_id: u64,
    pub text: String,
    #[serde(default)]
    pub intent: String,
    #[serde(default)]
    pub sentiment: String,
    pub agent_id: String,
    pub created_ms: u64,
}

/// One page of the escalation queue.
#[derive(Debug, Clone)]
pub struct Page {
    pub escalations: Vec<Escalation>,
    /// Where the next page starts; None when this is the last.
    pub next: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeleteCounts {
    pub conversations: u64,
    pub turns: u64,
    pub escalations: u64,
    pub profile: bool,
}

impl Store {
    pub fn escalation(&self, id: &str) -> Result<Option<Escalation>, Error> {
        self.escalations
            .get(id.as_bytes())?
            .map(|b| decode(id.as_bytes(), &b))
            .transpose()
    }

    /// The queue in working order (high priority first, then longest
    /// waiting), keeping entries whose status is in `statuses`, starting
    /// after `after` (a previous page's `next`).
    pub fn list_escalations(
        &self,
        statuses: &[EscalationStatus],
        page_size: usize,
        after: Option<&[u8]>,
    ) -> Result<Page, Error> {
        let range = match after {
            Some(a) => self
                .queue
                .range::<&[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.queue.iter(),
        };
        let mut escalations = Vec::new();
        let mut last = None;
        for item in range {
            let (key, id) = item?;
            let e: Escalation = decode(&id, &self.escalations.get(&id)?.unwrap_or_default())?;
            if !statuses.contains(&e.status) {
                continue;
            }
            if escalations.len() == page_size {
                return Ok(Page {
                    escalations,
                    next: last,
                });
            }
            last = Some(key.to_vec());
            escalations.push(e);
        }
        Ok(Page {
            escalations,
            next: None,
        })
    }

    /// Gives a waiting escalation to `agent_id`. Claiming one's own claim
    /// again is a no-op; someone else's is a conflict naming the holder.
    pub async fn claim(&self, id: &str, agent_id: &str, now_ms: u64) -> Result<Escalation, Error> {
        let e = self.transaction(|tx| {
            let Some(mut e) = tx_get::<Escalation>(tx.escalations, id.as_bytes())? else {
                return abort(Error::NoEscalation(id.into()));
            };
            match e.status {
                EscalationStatus::Claimed if e.agent_id == agent_id => return Ok(e),
                EscalationStatus::Claimed => {
                    return abort(Error::Conflict(format!(
                        "escalation {id} is already claimed by {}",
                        e.agent_id
                    )))
                }
                EscalationStatus::Resolved => {
                    return abort(Error::Conflict(format!(
                        "escalation {id} was resolved by {} ({})",
                        e.agent_id, e.outcome
                    )))
                }
                EscalationStatus::Waiting => {}
            }
            tx.queue.remove(queue_key(&e))?;
            e.status = EscalationStatus::Claimed;
            e.agent_id = agent_id.into();
            e.claimed_ms = now_ms;
            tx.queue.insert(queue_key(&e), e.id.as_bytes())?;
            tx.escalations.insert(e.id.as_bytes(), encode(&e))?;
            Ok(e)
        })?;
        self.durable().await?;
        Ok(e)
    }

    /// The open escalation of a conversation, which `agent_id` must hold.
    fn held_by(&self, conv: &Conversation, agent_id: &str) -> Result<Escalation, Error> {
        let id = conv.open_escalation.as_deref().ok_or_else(|| {
            Error::Conflict(format!(
                "conversation {} has no open escalation; the bot is handling it",
                conv.id
            ))
        })?;
        let e = self
            .escalation(id)?
            .ok_or_else(|| Error::NoEscalation(id.into()))?;
        match e.status {
            EscalationStatus::Claimed if e.agent_id == agent_id => Ok(e),
            EscalationStatus::Claimed => Err(Error::Conflict(format!(
                "escalation {id} is held by {}, not {agent_id}",
                e.agent_id
            ))),
            _ => Err(Error::Conflict(format!(
                "escalation {id} is waiting; claim it before replying"
            ))),
        }
    }

    /// Stores a human agent's reply in a conversation whose escalation the
    /// agent holds.
    pub async fn agent_reply(
        &self,
        conversation_id: &str,
        agent_id: &str,
        text: &str,
        now_ms: u64,
    ) -> Result<(Conversation, Turn), Error> {
        let mut conv = self
            .conversation(conversation_id)?
            .ok_or_else(|| Error::NoConversation(conversation_id.into()))?;
        self.held_by(&conv, agent_id)?;
        let new = NewTurn {
            author: Author::Agent,
            agent_id,
            ..NewTurn::bot(text, now_ms)
        };
        let (turn, _) = self.append_turn(&mut conv, new).await?;
        Ok((conv, turn))
    }

    /// Closes an escalation held by `agent_id`, optionally handing the
    /// conversation back to the bot and keeping label corrections, in one
    /// transaction. Returns the escalation and the conversation after it.
    pub async fn resolve(
        &self,
        id: &str,
        agent_id: &str,
        outcome: &str,
        hand_back: bool,
        corrections: &[Correction],
        now_ms: u64,
    ) -> Result<(Escalation, Conversation), Error> {
        let done = self.transaction(|tx| {
            let Some(mut e) = tx_get::<Escalation>(tx.escalations, id.as_bytes())? else {
                return abort(Error::NoEscalation(id.into()));
            };
            match e.status {
                EscalationStatus::Claimed if e.agent_id == agent_id => {}
                EscalationStatus::Claimed => {
                    return abort(Error::Conflict(format!(
                        "escalation {id} is held by {}, not {agent_id}",
                        e.agent_id
                    )))
                }
                EscalationStatus::Waiting => {
                    return abort(Error::Conflict(format!(
                        "escalation {id} is waiting; claim it before resolving"
                    )))
                }
                EscalationStatus::Resolved => {
                    return abort(Error::Conflict(format!(
                        "escalation {id} is already resolved"
                    )))
                }
            }
            let Some(mut conv) = tx_get::<Conversation>(tx.convs, e.conversation_id.as_bytes())?
            else {
                return abort(Error::NoConversation(e.conversation_id.clone()));
            };
            for c in corrections {
                let Some(turn) = tx_get::<Turn>(tx.turns, &turn_key(&conv.id, c.turn_id))? else {
                    return abort(Error::Invalid(format!(
                        "corrections: turn {} is not in conversation {}",
                        c.turn_id, conv.id
                    )));
                };
                if turn.author != Author::Customer {
                    return abort(Error::Invalid(format!(
                        "corrections: turn {} is not a customer message",
                        c.turn_id
                    )));
                }
                let record = CorrectionRecord {
                    v: super::FORMAT_VERSION,
                    conversation_id: conv.id.clone(),
                    turn_id: c.turn_id,
                    text: turn.text,
                    intent: c.intent.clone(),
                    sentiment: c.sentiment.clone(),
                    agent_id: agent_id.into(),
                    created_ms: now_ms,
                };
                tx.corrections
                    .insert(turn_key(&conv.id, c.turn_id), encode(&record))?;
            }
            tx.queue.remove(queue_key(&e))?;
            e.status = EscalationStatus::Resolved;
            e.resolved_ms = now_ms;
            e.outcome = outcome.into();
            tx.queue.insert(queue_key(&e), e.id.as_bytes())?;
            tx.escalations.insert(e.id.as_bytes(), encode(&e))?;
            if conv.open_escalation.as_deref() == Some(id) {
                conv.open_escalation = None;
            }
            if hand_back {
                conv.held_by_agent = false;
                conv.negative_streak = 0;
                conv.clarifications = 0;
            }
            tx.convs.insert(conv.id.as_bytes(), encode(&conv))?;
            Ok((e, conv))
        })?;
        self.durable().await?;
        Ok(done)
    }

    /// Every label correction agents made, oldest conversation key first.
    pub fn corrections(&self) -> impl Iterator<Item = Result<CorrectionRecord, Error>> {
        self.corrections.iter().map(|item| {
            let (k, v) = item?;
            decode(&k, &v)
        })
    }

    /// Removes everything kept about one customer: conversations, turns,
    /// escalations (and their queue entries), corrections, profile.
    pub async fn delete_user(&self, tenant_id: &str, user_id: &str) -> Result<DeleteCounts, Error> {
        let mut counts = DeleteCounts::default();
        let mut convs = Vec::new();
        let mut turn_keys = Vec::new();
        let mut escalations = Vec::new();
        for id in self.conversations_of(tenant_id, user_id)? {
            let prefix = [id.as_bytes(), &[0]].concat();
            for k in self.turns.scan_prefix(&prefix).keys() {
                turn_keys.push(k?.to_vec());
            }
            if let Some(c) = self.conversation(&id)? {
                for e in &c.escalations {
                    if let Some(e) = self.escalation(e)? {
                        escalations.push(e);
                    }
                }
            }
            convs.push(id);
        }
        let profile = super::profile_key(tenant_id, user_id);
        counts.profile = self.profiles.contains_key(&profile)?;
        counts.conversations = convs.len() as u64;
        counts.turns = turn_keys.len() as u64;
        counts.escalations = escalations.len() as u64;
        self.transaction(|tx| {
            for id in &convs {
                tx.convs.remove(id.as_bytes())?;
                tx.index
                    .remove(user_conversation_key(tenant_id, user_id, id))?;
            }
            for k in &turn_keys {
                tx.turns.remove(k.as_slice())?;
                tx.corrections.remove(k.as_slice())?;
            }
            for e in &escalations {
                tx.escalations.remove(e.id.as_bytes())?;
                tx.queue.remove(queue_key(e))?;
            }
            tx.profiles.remove(profile.as_slice())?;
            Ok(())
        })?;
        self.durable().await?;
        Ok(counts)
    }
}
