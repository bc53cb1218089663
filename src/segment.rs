//! Marketing segments over customer profiles, following the e-commerce
//! customer life cycle (acquisition, retention, growth, win-back). Pure:
//! membership is a function of one profile, the rules and the clock at query
//! time, so `dormant` moves with time without rewriting any profile.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Profile;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Thresholds of the segment rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    /// First contact within this many days: `new`.
    pub new_days: u64,
    /// Last contact within this many days: `active` (unless new or at risk).
    pub active_days: u64,
    /// No contact for this many days: `dormant`.
    pub dormant_days: u64,
    /// Quiet for this many days (but not yet dormant) counts toward `at_risk`.
    pub quiet_days: u64,
    /// Sentiment score at or below which a customer is a `detractor` (and at risk).
    pub detractor_score: f32,
    /// Sentiment score at or above which a customer is a `promoter`.
    pub promoter_score: f32,
    /// Messages needed before promoter/detractor is judged.
    pub min_messages: u64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            new_days: 7,
            active_days: 30,
            dormant_days: 60,
            quiet_days: 30,
            detractor_score: -0.3,
            promoter_score: 0.3,
            min_messages: 2,
        }
    }
}

/// Intents that make an interest segment.
pub const INTEREST_INTENTS: [&str; 3] = ["recommendation", "promotion", "product_inquiry"];

/// Every segment name, in the order ListSegments shows them.
pub fn names() -> Vec<String> {
    let mut out: Vec<String> = [
        "new",
        "active",
        "at_risk",
        "promoter",
        "detractor",
        "dormant",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    out.extend(INTEREST_INTENTS.iter().map(|i| format!("interest:{i}")));
    out
}

impl Rules {
    pub fn dormant_after(&self) -> Duration {
        Duration::from_millis(self.dormant_days * DAY_MS)
    }

    /// The rule of a segment in words, with the thresholds in force.
    pub fn definition(&self, segment: &str) -> Option<String> {
        Some(match segment {
            "new" => format!("first contact within the last {} days", self.new_days),
            "active" => format!(
                "last contact within {} days, past the first {} days, not at risk",
                self.active_days, self.new_days
            ),
            "at_risk" => format!(
                "not dormant, and a sentiment score <= {}, 2+ negative messages in a row, \
                 an escalation in the last {} days, or quiet for {}+ days",
                self.detractor_score, self.active_days, self.quiet_days
            ),
            "promoter" => format!(
                "sentiment score >= {} over {}+ messages",
                self.promoter_score, self.min_messages
            ),
            "detractor" => format!(
                "sentiment score <= {} over {}+ messages",
                self.detractor_score, self.min_messages
            ),
            "dormant" => format!("no contact for {}+ days (win-back)", self.dormant_days),
            other => {
                let intent = other.strip_prefix("interest:")?;
                if !INTEREST_INTENTS.contains(&intent) {
                    return None;
                }
                format!("asked about {intent} at least once")
            }
        })
    }

    /// The life-cycle stage: dormant, at_risk, new or active.
    pub fn stage(&self, p: &Profile, now_ms: u64) -> &'static str {
        let idle = now_ms.saturating_sub(p.last_seen_ms);
        if idle >= self.dormant_days * DAY_MS {
            return "dormant";
        }
        let escalated_recently = p.escalation_count > 0 && idle < self.active_days * DAY_MS;
        if p.sentiment_score <= self.detractor_score
            || p.consecutive_negative >= 2
            || escalated_recently
            || idle >= self.quiet_days * DAY_MS
        {
            return "at_risk";
        }
        if now_ms.saturating_sub(p.first_seen_ms) < self.new_days * DAY_MS {
            return "new";
        }
        "active"
    }

    /// Whether `p` is in `segment` at `now_ms`.
    pub fn contains(&self, segment: &str, p: &Profile, now_ms: u64) -> bool {
        let stage = self.stage(p, now_ms);
        match segment {
            "new" | "active" | "at_risk" | "dormant" => stage == segment,
            "promoter" => {
                p.message_count >= self.min_messages && p.sentiment_score >= self.promoter_score
            }
            "detractor" => {
                p.message_count >= self.min_messages && p.sentiment_score <= self.detractor_score
            }
            other => other
                .strip_prefix("interest:")
                .is_some_and(|i| p.intent_counts.get(i).copied().unwrap_or(0) > 0),
        }
    }

    /// What marketing could do next for this customer.
    pub fn suggested_action(&self, p: &Profile, now_ms: u64) -> &'static str {
        match self.stage(p, now_ms) {
            "dormant" => "win-back coupon",
            "at_risk" => "service recovery: apology and a personal follow-up",
            "new" => "welcome offer on a second order",
            _ if self.contains("promoter", p, now_ms) => "referral invitation",
            _ if p.intent_counts.get("promotion").copied().unwrap_or(0) > 0 => {
                "early access to the next sale"
            }
            _ => "loyalty points reminder",
        }
    }
}

/// The most frequent intents, most frequent first, at most `n`.
pub fn top_intents(p: &Profile, n: usize) -> Vec<String> {
    let mut counts: Vec<(&String, &u64)> = p.intent_counts.iter().collect();
    counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    counts.into_iter().take(n).map(|(i, _)| i.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn profile(first_days_ago: u64, last_days_ago: u64, score: f32, messages: u64) -> Profile {
        Profile {
            first_seen_ms: NOW - first_days_ago * DAY_MS,
            last_seen_ms: NOW - last_days_ago * DAY_MS,
            sentiment_score: score,
            message_count: messages,
            ..Profile::default()
        }
    }

    #[test]
    fn life_cycle_stages() {
        let r = Rules::default();
        assert_eq!(r.stage(&profile(1, 0, 0.0, 1), NOW), "new");
        assert_eq!(r.stage(&profile(40, 2, 0.5, 9), NOW), "active");
        assert_eq!(r.stage(&profile(40, 2, -0.6, 9), NOW), "at_risk");
        assert_eq!(r.stage(&profile(90, 35, 0.2, 9), NOW), "at_risk", "quiet");
        assert_eq!(r.stage(&profile(200, 61, 0.9, 9), NOW), "dormant");
        let mut escalated = profile(40, 1, 0.1, 3);
        escalated.escalation_count = 1;
        assert_eq!(r.stage(&escalated, NOW), "at_risk");
    }

    #[test]
    fn dormancy_follows_the_clock_at_query_time() {
        let r = Rules::default();
        let p = profile(20, 10, 0.5, 4);
        assert!(!r.contains("dormant", &p, NOW));
        assert!(r.contains("dormant", &p, NOW + 50 * DAY_MS));
        assert_eq!(r.suggested_action(&p, NOW + 50 * DAY_MS), "win-back coupon");
    }

    #[test]
    fn promoters_detractors_and_interests() {
        let r = Rules::default();
        let mut p = profile(40, 1, 0.8, 5);
        p.intent_counts.insert("promotion".into(), 2);
        p.intent_counts.insert("order_status".into(), 3);
        assert!(r.contains("promoter", &p, NOW));
        assert!(!r.contains("detractor", &p, NOW));
        assert!(r.contains("interest:promotion", &p, NOW));
        assert!(!r.contains("interest:recommendation", &p, NOW));
        assert_eq!(top_intents(&p, 3), vec!["order_status", "promotion"]);
        assert!(
            !r.contains("promoter", &profile(1, 0, 0.9, 1), NOW),
            "one message is not enough"
        );
        assert!(r.contains("detractor", &profile(9, 0, -0.7, 3), NOW));
        for name in names() {
            assert!(r.definition(&name).is_some(), "{name}");
        }
        assert!(r.definition("interest:weather").is_none());
        assert!(r.definition("vip").is_none());
    }
}
