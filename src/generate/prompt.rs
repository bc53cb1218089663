//! The prompts replies are built from: `prompts/{zh,zh-Hant,en}/*.j2`,
//! rendered with minijinja. `zh-Hant` (Traditional characters, for customers
//! in Taiwan, Hong Kong and Macau) is optional: without it they are answered
//! from `zh`. Every template is compiled and rendered against sample
//! contexts at start, so a missing file, a syntax error or an unknown
//! variable stops the server with the file and line instead of failing a
//! customer's message later.

use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use super::{Error, Message, Role};
use crate::classify::{Language, Script, INTENT_LABELS};

/// The templates every language must have.
pub const TEMPLATES: [&str; 6] = [
    "system", "intents", "user", "clarify", "escalate", "fallback",
];

/// A past turn, as the prompt shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryTurn {
    /// "customer", "bot" or "agent".
    pub author: String,
    pub text: String,
}

/// Everything a template may use.
#[derive(Debug, Clone, Serialize)]
pub struct PromptContext {
    pub message: String,
    pub language: Language,
    /// How a Chinese reply is written (the customer's script).
    pub script: Script,
    pub intent: String,
    pub sentiment: String,
    /// Up to three likely intents, most likely first, in the customer's
    /// language (for clarifying questions).
    pub top_intents: Vec<String>,
    /// The platform's order id, if any.
    pub order_id: String,
    /// A short profile summary; empty for a new customer.
    pub profile: String,
    /// "normal" or "high" (escalations).
    pub priority: String,
    /// Recent turns, oldest first, already cut to the token budget.
    pub history: Vec<HistoryTurn>,
}

impl PromptContext {
    /// A context with sample values, for validation and tests.
    pub fn sample(language: Language, intent: &str) -> Self {
        Self {
            message: "我的快递到哪了".into(),
            language,
            script: Script::Simplified,
            intent: intent.into(),
            sentiment: "neutral".into(),
            top_intents: vec!["order_status".into(), "return_refund".into()],
            order_id: "4512876390123".into(),
            profile: "returning customer, 3 messages, mostly neutral".into(),
            priority: "high".into(),
            history: vec![HistoryTurn {
                author: "customer".into(),
                text: "在吗".into(),
            }],
        }
    }
}

/// Settings the templates see besides the context.
#[derive(Debug, Clone, Serialize)]
pub struct PromptSettings {
    pub shop_name: String,
    pub max_sentences: u32,
}

impl Default for PromptSettings {
    fn default() -> Self {
        Self {
            shop_name: "kefu".into(),
            max_sentences: 3,
        }
    }
}

pub struct Prompts {
    env: Environment<'static>,
    dir: PathBuf,
    settings: PromptSettings,
    /// Whether `zh-Hant/` was there to answer in Traditional characters.
    traditional: bool,
}

/// What a reply is written in: English, or Chinese in one of its scripts.
/// `Prompts::voice` picks it for a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voice {
    Simplified,
    Traditional,
    English,
}

impl Voice {
    /// The template folder the voice's replies come from.
    fn folder(self) -> &'static str {
        match self {
            Voice::Simplified => "zh",
            Voice::Traditional => "zh-Hant",
            Voice::English => "en",
        }
    }
}

/// Human-readable intent names, for prompts and clarifying questions:
/// (intent, Simplified, Traditional, English); anything else reads as `other`.
const INTENT_NAMES: [(&str, &str, &str, &str); 11] = [
    ("greeting", "打招呼", "打招呼", "a greeting"),
    (
        "order_status",
        "订单物流",
        "訂單物流",
        "your order's delivery",
    ),
    (
        "return_refund",
        "退换货和退款",
        "退換貨和退款",
        "a return or refund",
    ),
    ("product_inquiry", "商品信息", "商品資訊", "product details"),
    ("recommendation", "选购推荐", "選購推薦", "a recommendation"),
    ("promotion", "优惠活动", "優惠活動", "discounts and coupons"),
    (
        "payment_invoice",
        "支付和发票",
        "付款和發票",
        "payment or an invoice",
    ),
    ("account", "账号和会员", "帳號和會員", "your account"),
    ("complaint", "投诉", "投訴", "a complaint"),
    ("human_agent", "人工客服", "人工客服", "a human agent"),
    ("other", "其他问题", "其他問題", "something else"),
];

/// The name of `intent` in `voice`.
pub fn intent_label(intent: &str, voice: Voice) -> &'static str {
    let other = &INTENT_NAMES[INTENT_NAMES.len() - 1];
    let (_, simplified, traditional, english) = INTENT_NAMES
        .iter()
        .find(|(name, ..)| *name == intent)
        .unwrap_or(other);
    match voice {
        Voice::Simplified => simplified,
        Voice::Traditional => traditional,
        Voice::English => english,
    }
}

fn template_error(file: &str, e: &minijinja::Error) -> Error {
    let mut reason = e.to_string();
    if let Some(line) = e.line() {
        reason = format!("line {line}: {reason}");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::Template {
        file: file.into(),
        reason,
    }
}

impl Prompts {
    /// Loads and validates every template under `dir`.
    pub fn load(dir: &Path, settings: PromptSettings) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        let traditional = dir.join("zh-Hant").is_dir();
        let folders: &[&str] = if traditional {
            &["zh", "zh-Hant", "en"]
        } else {
            &["zh", "en"]
        };
        for lang in folders {
            for name in TEMPLATES {
                let rel = format!("{lang}/{name}.j2");
                let path = dir.join(&rel);
                let source = std::fs::read_to_string(&path).map_err(|e| Error::Template {
                    file: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                env.add_template_owned(rel.clone(), source)
                    .map_err(|e| template_error(&path.display().to_string(), &e))?;
            }
        }
        let prompts = Self {
            env,
            dir: dir.to_path_buf(),
            settings,
            traditional,
        };
        prompts.validate()?;
        Ok(prompts)
    }

    /// Renders every template for every intent in every language and script.
    fn validate(&self) -> Result<(), Error> {
        let voices = [
            (Language::Zh, Script::Simplified),
            (Language::Zh, Script::Traditional),
            (Language::En, Script::Simplified),
        ];
        for (lang, script) in voices {
            for intent in INTENT_LABELS {
                let mut ctx = PromptContext::sample(lang, intent);
                ctx.script = script;
                self.messages(&ctx)?;
                ctx.order_id.clear();
                ctx.profile.clear();
                ctx.top_intents.truncate(1);
                ctx.priority = "normal".into();
                self.messages(&ctx)?;
                for name in ["clarify", "escalate", "fallback"] {
                    let text = self.render(name, &ctx)?;
                    if text.trim().is_empty() {
                        return Err(Error::Template {
                            file: self.path(&ctx, name),
                            reason: format!("renders to nothing for intent {intent}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The voice a customer writing `lang` in `script` is answered in:
    /// Chinese in their script where the templates for it are there,
    /// Simplified otherwise.
    pub fn voice(&self, lang: Language, script: Script) -> Voice {
        match (lang, script) {
            (Language::En, _) => Voice::English,
            (Language::Zh, Script::Traditional) if self.traditional => Voice::Traditional,
            (Language::Zh, _) => Voice::Simplified,
        }
    }

    fn rel(&self, ctx: &PromptContext, name: &str) -> String {
        let voice = self.voice(ctx.language, ctx.script);
        format!("{}/{name}.j2", voice.folder())
    }

    fn path(&self, ctx: &PromptContext, name: &str) -> String {
        self.dir.join(self.rel(ctx, name)).display().to_string()
    }

    fn render(&self, name: &str, ctx: &PromptContext) -> Result<String, Error> {
        let rel = self.rel(ctx, name);
        let template = self
            .env
            .get_template(&rel)
            .map_err(|e| template_error(&self.path(ctx, name), &e))?;
        let voice = self.voice(ctx.language, ctx.script);
        let top: Vec<&str> = ctx
            .top_intents
            .iter()
            .map(|i| intent_label(i, voice))
            .collect();
        template
            .render(minijinja::context! {
                shop_name => &self.settings.shop_name,
                max_sentences => self.settings.max_sentences,
                intent_label => intent_label(&ctx.intent, voice),
                top_intents => top,
                ..minijinja::Value::from_serialize(ctx)
            })
            .map(|s| s.trim().to_string())
            .map_err(|e| template_error(&self.path(ctx, name), &e))
    }

    /// The chat to send to the generator: the system prompt (with the
    /// intent's instructions), the recent history, then the message.
    pub fn messages(&self, ctx: &PromptContext) -> Result<Vec<Message>, Error> {
        let mut out = vec![Message::new(Role::System, self.render("system", ctx)?)];
        for turn in &ctx.history {
            let role = if turn.author == "customer" {
                Role::User
            } else {
                Role::Assistant
            };
            out.push(Message::new(role, turn.text.clone()));
        }
        out.push(Message::new(Role::User, self.render("user", ctx)?));
        Ok(out)
    }

    /// The clarifying question for an unclear message.
    pub fn clarify(&self, ctx: &PromptContext) -> Result<String, Error> {
        self.render("clarify", ctx)
    }

    /// What the customer is told when a person takes over.
    pub fn escalation_notice(&self, ctx: &PromptContext) -> Result<String, Error> {
        self.render("escalate", ctx)
    }

    /// The fixed reply when the generator is unavailable.
    pub fn fallback(&self, ctx: &PromptContext) -> Result<String, Error> {
        self.render("fallback", ctx)
    }
}

/// A rough token count for budgeting history: one per CJK character, one
/// per four other characters.
pub fn approx_tokens(text: &str) -> usize {
    let (mut cjk, mut other) = (0usize, 0usize);
    for c in text.chars() {
        if (c as u32) >= 0x2E80 {
            cjk += 1;
        } else {
            other += 1;
        }
    }
    cjk + other.div_ceil(4)
}

/// The most recent turns that fit in `budget` tokens, oldest first.
pub fn bounded_history(turns: &[HistoryTurn], budget: usize) -> Vec<HistoryTurn> {
    let mut used = 0;
    let mut out: Vec<HistoryTurn> = Vec::new();
    for t in turns.iter().rev() {
        let cost = approx_tokens(&t.text) + 4;
        if used + cost > budget {
            break;
        }
        used += cost;
        out.push(t.clone());
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_prompts() -> Prompts {
        Prompts::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts"),
            PromptSettings::default(),
        )
        .expect("the shipped templates are valid")
    }

    #[test]
    fn every_template_renders_in_both_languages() {
        let p = repo_prompts();
        for lang in [Language::Zh, Language::En] {
            let mut systems = std::collections::HashSet::new();
            for intent in INTENT_LABELS {
                let ctx = PromptContext::sample(lang, intent);
                let msgs = p.messages(&ctx).unwrap();
                assert_eq!(msgs[0].role, Role::System);
                // Each intent brings its own instructions into the system prompt.
                assert!(systems.insert(msgs[0].content.clone()), "{lang:?} {intent}");
                assert_eq!(msgs.last().unwrap().content, ctx.message);
                assert_eq!(msgs.len(), 3, "system, one history turn, the message");
                assert!(!p.clarify(&ctx).unwrap().is_empty());
                assert!(!p.escalation_notice(&ctx).unwrap().is_empty());
                assert!(!p.fallback(&ctx).unwrap().is_empty());
            }
        }
        let zh = PromptContext::sample(Language::Zh, "order_status");
        assert!(p.messages(&zh).unwrap()[0]
            .content
            .contains("4512876390123"));
        assert!(p.clarify(&zh).unwrap().contains("订单物流"));
        let en = PromptContext::sample(Language::En, "complaint");
        assert!(p.escalation_notice(&en).unwrap().contains("priority"));
    }

    #[test]
    fn every_intent_has_a_name_in_each_language_and_script() {
        for (i, intent) in INTENT_LABELS.iter().enumerate() {
            assert_eq!(INTENT_NAMES[i].0, *intent, "in the order of INTENT_LABELS");
        }
        assert_eq!(
            intent_label("no_such_intent", Voice::Traditional),
            "其他問題"
        );
        assert_eq!(intent_label("account", Voice::English), "your account");
    }

    #[test]
    fn traditional_chinese_is_answered_in_traditional_characters() {
        let p = repo_prompts();
        assert_eq!(
            p.voice(Language::Zh, Script::Traditional),
            Voice::Traditional
        );
        let mut ctx = PromptContext::sample(Language::Zh, "order_status");
        ctx.script = Script::Traditional;
        ctx.message = "我的貨到哪了".into();
        let system = &p.messages(&ctx).unwrap()[0].content;
        assert!(system.contains("繁體中文"), "{system}");
        assert!(!system.contains("简体"), "{system}");
        let clarify = p.clarify(&ctx).unwrap();
        assert!(clarify.contains("訂單物流"), "{clarify}");
        for text in [
            clarify,
            p.escalation_notice(&ctx).unwrap(),
            p.fallback(&ctx).unwrap(),
        ] {
            assert_eq!(Script::detect(&text), Some(Script::Traditional), "{text}");
        }
        // English is English whatever the script says.
        let mut en = PromptContext::sample(Language::En, "order_status");
        en.script = Script::Traditional;
        assert!(p.clarify(&en).unwrap().is_ascii());
    }

    #[test]
    fn without_traditional_templates_the_simplified_ones_answer() {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        for lang in ["zh", "en"] {
            std::fs::create_dir_all(dir.path().join(lang)).unwrap();
            for name in TEMPLATES {
                let rel = format!("{lang}/{name}.j2");
                std::fs::copy(src.join(&rel), dir.path().join(&rel)).unwrap();
            }
        }
        let p = Prompts::load(dir.path(), PromptSettings::default()).unwrap();
        assert_eq!(
            p.voice(Language::Zh, Script::Traditional),
            Voice::Simplified
        );
        let mut ctx = PromptContext::sample(Language::Zh, "order_status");
        ctx.script = Script::Traditional;
        assert!(p.clarify(&ctx).unwrap().contains("订单物流"));
    }

    fn broken(file: &str, source: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        for lang in ["zh", "en"] {
            std::fs::create_dir_all(dir.path().join(lang)).unwrap();
            for name in TEMPLATES {
                let rel = format!("{lang}/{name}.j2");
                std::fs::copy(src.join(&rel), dir.path().join(&rel)).unwrap();
            }
        }
        std::fs::write(dir.path().join(file), source).unwrap();
        match Prompts::load(dir.path(), PromptSettings::default()) {
            Ok(_) => panic!("a broken {file} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_broken_template_is_refused_with_file_and_line() {
        let err = broken("en/clarify.j2", "Hello\n{% if %}\n");
        assert!(
            err.contains("en/clarify.j2") && err.contains("line 2"),
            "{err}"
        );
        let err = broken("zh/system.j2", "你好 {{ no_such_variable }}");
        assert!(
            err.contains("zh/system.j2") && err.contains("line 1"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let err = Prompts::load(dir.path(), PromptSettings::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("zh/system.j2"), "{err}");
    }

    #[test]
    fn history_keeps_the_latest_turns_within_budget() {
        let turns: Vec<HistoryTurn> = (0..10)
            .map(|i| HistoryTurn {
                author: "customer".into(),
                text: format!("第{i}条消息内容"),
            })
            .collect();
        let kept = bounded_history(&turns, 30);
        assert!(!kept.is_empty() && kept.len() < 10);
        assert_eq!(kept.last().unwrap().text, "第9条消息内容");
        assert_eq!(approx_tokens("快递到哪"), 4);
        assert_eq!(approx_tokens("where is it"), 3);
    }
}
