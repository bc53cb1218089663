//! Masks personal data before a message is stored or shown to a model:
//! Chinese mobile numbers, 18-digit resident ID numbers (checksum-verified),
//! bank card numbers (Luhn-verified) and e-mail addresses. Order numbers and
//! other digit runs that fail the checks are left alone, so the bot can still
//! talk about "订单 4512876390123". The trade-off: a 16-19 digit order number
//! that happens to pass the Luhn check (one in ten) is masked as a card.

/// What was masked, for logs and metrics (never the values).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Redactions {
    pub phones: usize,
    pub id_numbers: usize,
    pub bank_cards: usize,
    pub emails: usize,
}

impl Redactions {
    pub fn total(&self) -> usize {
        self.phones + self.id_numbers + self.bank_cards + self.emails
    }
}

/// Checks the ISO 7064 MOD 11-2 check digit of an 18-character ID number
/// (GB 11643-1999).
pub fn valid_resident_id(id: &str) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let b = id.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| (d - b'0') as u32 * w)
        .sum();
    CHECK[(sum % 11) as usize] == b[17].to_ascii_uppercase()
}

/// The Luhn check used by bank cards.
pub fn luhn(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.bytes().rev().enumerate() {
        let mut d = (c - b'0') as u32;
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

fn is_mobile(d: &str) -> bool {
    d.len() == 11 && d.starts_with('1') && matches!(d.as_bytes()[1], b'3'..=b'9')
}

/// Replaces personal data in `text` with placeholders.
pub fn redact(text: &str) -> (String, Redactions) {
    let mut counts = Redactions::default();
    let text = redact_emails(text, &mut counts);
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // A run of digits (an ID may end in X), allowing single spaces or
        // dashes inside, as people type card and phone numbers.
        let start = i;
        let mut digits = String::new();
        let mut end = i;
        while end < chars.len() {
            let c = chars[end];
            if c.is_ascii_digit() {
                digits.push(c);
                end += 1;
            } else if (c == ' ' || c == '-')
                && end + 1 < chars.len()
                && chars[end + 1].is_ascii_digit()
                && !digits.is_empty()
            {
                end += 1;
            } else if (c == 'X' || c == 'x') && digits.len() == 17 {
                digits.push('X');
                end += 1;
                break;
            } else {
                break;
            }
        }
        let compact = digits.as_str();
        let replacement = if compact.len() == 18 && valid_resident_id(compact) {
            counts.id_numbers += 1;
            Some("[身份证号]")
        } else if is_mobile(compact)
            || (compact.len() == 13 && compact.starts_with("86") && is_mobile(&compact[2..]))
        {
            counts.phones += 1;
            Some("[手机号]")
        } else if (16..=19).contains(&compact.len())
            && compact.bytes().all(|b| b.is_ascii_digit())
            && luhn(compact)
        {
            counts.bank_cards += 1;
            Some("[银行卡号]")
        } else {
            None
        };
        match replacement {
            Some(r) => out.push_str(r),
            None => out.extend(&chars[start..end]),
        }
        i = end;
    }
    (out, counts)
}

fn redact_emails(text: &str, counts: &mut Redactions) -> String {
    let is_local = |c: char| c.is_ascii_alphanumeric() || "._%+-".contains(c);
    let is_domain = |c: char| c.is_ascii_alphanumeric() || ".-".contains(c);
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '@' {
            let mut start = i;
            while start > 0 && is_local(chars[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < chars.len() && is_domain(chars[end]) {
                end += 1;
            }
            let domain: String = chars[i + 1..end].iter().collect();
            let domain = domain.trim_end_matches('.');
            if start < i && domain.contains('.') && !domain.starts_with('.') {
                let local_len = i - start;
                let kept = out.chars().count() - local_len;
                out = out.chars().take(kept).collect();
                out.push_str("[邮箱]");
                counts.emails += 1;
                i += 1 + domain.chars().count();
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_id_checksum() {
        // GB 11643-1999's worked example.
        assert!(valid_resident_id("11010519491231002X"));
        assert!(!valid_resident_id("110105194912310021"));
        assert!(!valid_resident_id("1101051949123100"));
    }

    #[test]
    fn masks_personal_data_and_keeps_order_numbers() {
        let (out, n) = redact("手机13812345678，身份证11010519491231002X，卡号6222 0212 3456 7899 012，邮箱 zhang.san@example.com，订单4512876390123");
        assert!(!out.contains("13812345678"), "{out}");
        assert!(!out.contains("11010519491231002X"), "{out}");
        assert!(!out.contains("6222"), "{out}");
        assert!(!out.contains("zhang.san"), "{out}");
        assert!(
            out.contains("订单4512876390123"),
            "order numbers stay: {out}"
        );
        assert_eq!(
            n,
            Redactions {
                phones: 1,
                id_numbers: 1,
                bank_cards: 1,
                emails: 1
            }
        );
        assert_eq!(
            out,
            "手机[手机号]，身份证[身份证号]，卡号[银行卡号]，邮箱 [邮箱]，订单4512876390123"
        );
    }

    #[test]
    fn numbers_that_fail_the_checks_are_left_alone() {
        let (out, n) =
            redact("ID 110105194912310021, card 6222021234567899011, call 12345678901, a@b");
        assert_eq!(n.total(), 0, "{out}");
        assert_eq!(
            out,
            "ID 110105194912310021, card 6222021234567899011, call 12345678901, a@b"
        );
    }

    #[test]
    fn phone_numbers_with_country_code_and_dashes() {
        let (out, n) = redact("call me on 86 138-1234-5678 or 139 1234 5678 please");
        assert_eq!(n.phones, 2, "{out}");
        assert_eq!(out, "call me on [手机号] or [手机号] please");
    }
}
