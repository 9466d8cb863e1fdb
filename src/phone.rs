//! Phone numbers and the accounts they name.
//!
//! [`PhoneNumber`] is an E.164 number that passed the configured [`PhonePolicy`]; it can only be
//! built by [`PhonePolicy::parse`]. [`AccountId`] is Kontalk's account name for a number: the
//! lowercase hex SHA-1 of the E.164 string, so `+15555215554` is
//! `4bdd4f929f3a1062253e4e496bafba0bdfb5db75`, and the account JID is `<id>@<domain>`.

use std::fmt;
use std::str::FromStr;

use phonenumber::Type;
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

/// Longest input we look at: no phone number is longer, and the parser's cost grows with input.
const MAX_INPUT_LEN: usize = 64;

/// A phone number in E.164 form (`+` and digits only), accepted by a [`PhonePolicy`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber {
    e164: String,
    calling_code: u16,
}

impl PhoneNumber {
    /// The E.164 string, such as `+15555215554`.
    pub fn as_str(&self) -> &str {
        &self.e164
    }

    /// The country calling code (`1` for `+15555215554`).
    pub fn calling_code(&self) -> u16 {
        self.calling_code
    }

    /// A number read back from our own store (written there from an accepted number). Not
    /// parsed again: calling codes are prefix-free, so the first one to three digits that are a
    /// calling code are the number's.
    pub(crate) fn from_stored(e164: &str) -> Option<Self> {
        let digits = e164.strip_prefix('+')?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let calling_code = (1..=3)
            .filter_map(|n| digits.get(..n)?.parse::<u16>().ok())
            .find(|code| phonenumber::metadata::DATABASE.by_code(code).is_some())?;
        Some(Self {
            e164: e164.to_owned(),
            calling_code,
        })
    }

    /// The account this number registers.
    pub fn account(&self) -> AccountId {
        AccountId::for_number(self)
    }
}

// Numbers are personal data: `Debug` (which reaches logs by accident) keeps only the country.
impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber(+{}…)", self.calling_code)
    }
}

/// Why a number was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    /// Nothing was given.
    #[error("the phone number is empty")]
    Empty,
    /// The input has characters no phone number has, or is absurdly long.
    #[error(
        "the phone number contains characters other than digits, spaces, dashes, dots, parentheses and a leading + or 00"
    )]
    BadCharacters,
    /// No country calling code: numbers must be international.
    #[error("the phone number must be international: start it with + or 00 and the country code")]
    NotInternational,
    /// libphonenumber could not make a number of it.
    #[error("not a phone number: {0}")]
    Unparseable(String),
    /// Parsed, but no such number can exist in that country.
    #[error("not a valid phone number for its country")]
    Invalid,
    /// A real number of a type this service does not register (premium rate, toll free, ...).
    #[error("numbers of type {0} are not accepted")]
    TypeNotAllowed(String),
}

/// Which numbers are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhonePolicy {
    /// Also accept numbers libphonenumber calls viable but not valid, such as the fictional
    /// `+1 555 521 5554` of the Android emulator. On by default in development mode only.
    pub accept_fictional: bool,
    /// Number types accepted when the number is valid.
    pub allowed_types: Vec<NumberType>,
}

/// libphonenumber's number types, named as in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum NumberType {
    FixedLine,
    Mobile,
    FixedLineOrMobile,
    TollFree,
    PremiumRate,
    SharedCost,
    PersonalNumber,
    Voip,
    Pager,
    Uan,
    Voicemail,
}

impl NumberType {
    fn of(t: Type) -> Option<Self> {
        Some(match t {
            Type::FixedLine => Self::FixedLine,
            Type::Mobile => Self::Mobile,
            Type::FixedLineOrMobile => Self::FixedLineOrMobile,
            Type::TollFree => Self::TollFree,
            Type::PremiumRate => Self::PremiumRate,
            Type::SharedCost => Self::SharedCost,
            Type::PersonalNumber => Self::PersonalNumber,
            Type::Voip => Self::Voip,
            Type::Pager => Self::Pager,
            Type::Uan => Self::Uan,
            Type::Voicemail => Self::Voicemail,
            _ => return None,
        })
    }
}

impl Default for PhonePolicy {
    /// The production policy: valid mobile numbers (and the numbers of countries where mobile
    /// and fixed lines cannot be told apart).
    fn default() -> Self {
        Self {
            accept_fictional: false,
            allowed_types: vec![NumberType::Mobile, NumberType::FixedLineOrMobile],
        }
    }
}

impl PhonePolicy {
    /// Parses human input (`+1 555-521-5554`, `0015555215554`, `+1 (555) 521.5554`) into an E.164
    /// number that this policy accepts.
    ///
    /// The validity check of libphonenumber costs milliseconds for some countries: call this
    /// from a blocking-tolerant context on hot paths.
    pub fn parse(&self, input: &str) -> Result<PhoneNumber, PhoneError> {
        let digits = normalise_input(input)?;
        let parsed = phonenumber::parse(None, &digits)
            .map_err(|e| PhoneError::Unparseable(e.to_string()))?;
        // libphonenumber strips extensions and national prefixes it understands; an extension
        // has no place in an account name.
        if parsed.extension().is_some() {
            return Err(PhoneError::BadCharacters);
        }
        let calling_code = parsed.code().value();
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        if parsed.is_valid() {
            let t = parsed.number_type(&phonenumber::metadata::DATABASE);
            match NumberType::of(t) {
                Some(nt) if self.allowed_types.contains(&nt) => {}
                Some(nt) => {
                    return Err(PhoneError::TypeNotAllowed(
                        serde_json::to_value(nt)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                    ));
                }
                None => return Err(PhoneError::Invalid),
            }
        } else if !(self.accept_fictional && phonenumber::is_viable(&e164)) {
            return Err(PhoneError::Invalid);
        }
        Ok(PhoneNumber { e164, calling_code })
    }
}

/// Strips the punctuation people type, turns a leading `00` into `+`, and refuses anything else.
fn normalise_input(input: &str) -> Result<String, PhoneError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(PhoneError::Empty);
    }
    if input.len() > MAX_INPUT_LEN {
        return Err(PhoneError::BadCharacters);
    }
    let mut out = String::with_capacity(input.len());
    for (i, c) in input.chars().enumerate() {
        match c {
            '0'..='9' => out.push(c),
            '+' if i == 0 => out.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' => {}
            _ => return Err(PhoneError::BadCharacters),
        }
    }
    let out = if let Some(rest) = out.strip_prefix("00") {
        format!("+{rest}")
    } else {
        out
    };
    if !out.starts_with('+') {
        return Err(PhoneError::NotInternational);
    }
    if out.len() < 4 {
        return Err(PhoneError::Unparseable("too short".into()));
    }
    Ok(out)
}

/// Kontalk's account name for a number: lowercase hex SHA-1 of the E.164 string.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct AccountId(String);

impl AccountId {
    /// The account of `number`.
    pub fn for_number(number: &PhoneNumber) -> Self {
        Self(hex::encode(Sha1::digest(number.as_str().as_bytes())))
    }

    /// An id read back from our own store (written there by [`AccountId::for_number`]).
    pub(crate) fn for_stored(id: &str) -> Self {
        Self(id.to_owned())
    }

    /// The 40 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The account's JID on `domain`.
    pub fn jid(&self, domain: &str) -> String {
        format!("{}@{}", self.0, domain)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Not 40 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an account id is 40 lowercase hex digits")]
pub struct BadAccountId;

impl FromStr for AccountId {
    type Err = BadAccountId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadAccountId)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_numbers_read_back_as_they_were_accepted() {
        for n in [
            "+15555215554",
            "+393471234567",
            "+447911123456",
            "+8613800138000",
            "+353851234567",
            "+9647701234567",
        ] {
            let accepted = PhonePolicy {
                accept_fictional: true,
                ..PhonePolicy::default()
            }
            .parse(n)
            .unwrap();
            assert_eq!(
                PhoneNumber::from_stored(accepted.as_str()),
                Some(accepted),
                "{n}"
            );
        }
        assert_eq!(PhoneNumber::from_stored("393471234567"), None);
        assert_eq!(PhoneNumber::from_stored("+39 347"), None);
    }

    fn dev() -> PhonePolicy {
        PhonePolicy {
            accept_fictional: true,
            ..PhonePolicy::default()
        }
    }

    #[test]
    fn kontalk_account_id_of_the_emulator_number() {
        let n = dev().parse("+15555215554").unwrap();
        assert_eq!(n.as_str(), "+15555215554");
        assert_eq!(
            n.account().as_str(),
            "4bdd4f929f3a1062253e4e496bafba0bdfb5db75"
        );
        assert_eq!(
            n.account().jid("localhost"),
            "4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost"
        );
        assert_eq!(n.calling_code(), 1);
    }

    #[test]
    fn human_input_normalises_to_e164() {
        for input in [
            "+1 555 521 5554",
            "+1-555-521-5554",
            "001 555 521 5554",
            "0015555215554",
            " +1 (555) 521.5554 ",
        ] {
            assert_eq!(
                dev().parse(input).unwrap().as_str(),
                "+15555215554",
                "{input}"
            );
        }
        assert_eq!(
            PhonePolicy::default()
                .parse("0039 347 123 4567")
                .unwrap()
                .as_str(),
            "+393471234567"
        );
    }

    #[test]
    fn production_policy_refuses_fictional_numbers() {
        assert_eq!(
            PhonePolicy::default().parse("+15555215554"),
            Err(PhoneError::Invalid)
        );
        // A real UK mobile number passes.
        let n = PhonePolicy::default().parse("+447911123456").unwrap();
        assert_eq!(n.calling_code(), 44);
    }

    #[test]
    fn production_policy_refuses_disallowed_types() {
        // Italian premium rate (899) and UK toll free (0800).
        assert!(matches!(
            PhonePolicy::default().parse("+39899123456"),
            Err(PhoneError::TypeNotAllowed(t)) if t == "premium_rate"
        ));
        assert!(matches!(
            PhonePolicy::default().parse("+448001111111"),
            Err(PhoneError::TypeNotAllowed(t)) if t == "toll_free"
        ));
        let fixed = PhonePolicy {
            allowed_types: vec![NumberType::FixedLine],
            ..PhonePolicy::default()
        };
        assert!(fixed.parse("+442079460000").is_ok());
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let p = dev();
        assert_eq!(p.parse(""), Err(PhoneError::Empty));
        assert_eq!(p.parse("   "), Err(PhoneError::Empty));
        assert_eq!(p.parse("5555215554"), Err(PhoneError::NotInternational));
        assert_eq!(p.parse("+1 555 CALL NOW"), Err(PhoneError::BadCharacters));
        assert_eq!(p.parse("+1555+5215554"), Err(PhoneError::BadCharacters));
        assert_eq!(p.parse(&"1".repeat(1000)), Err(PhoneError::BadCharacters));
        assert_eq!(p.parse("+1\u{0}5555215554"), Err(PhoneError::BadCharacters));
        assert!(p.parse("+").is_err());
        assert!(p.parse("+999 1234567").is_err());
        assert!(p.parse("+1 2").is_err());
    }

    #[test]
    fn account_id_parses_only_lowercase_hex() {
        assert!(
            "4bdd4f929f3a1062253e4e496bafba0bdfb5db75"
                .parse::<AccountId>()
                .is_ok()
        );
        assert!(
            "4BDD4F929F3A1062253E4E496BAFBA0BDFB5DB75"
                .parse::<AccountId>()
                .is_err()
        );
        assert!("4bdd".parse::<AccountId>().is_err());
    }

    #[test]
    fn debug_output_hides_the_number() {
        let n = dev().parse("+15555215554").unwrap();
        let s = format!("{n:?}");
        assert!(!s.contains("5215554"), "{s}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text at all: a number or a reason, never a panic; accepted numbers are E.164.
        #[test]
        fn any_text_parses_or_is_refused(input in any::<String>()) {
            for policy in [PhonePolicy::default(), PhonePolicy { accept_fictional: true, ..PhonePolicy::default() }] {
                if let Ok(n) = policy.parse(&input) {
                    prop_assert!(n.as_str().starts_with('+'));
                    prop_assert!(n.as_str()[1..].bytes().all(|b| b.is_ascii_digit()));
                    prop_assert_eq!(n.account().as_str().len(), 40);
                }
            }
        }

        /// Phone-shaped input (digits and the punctuation people type) is handled the same way.
        #[test]
        fn phone_shaped_text_never_panics(input in "[+0-9 ()./-]{0,40}") {
            let _ = PhonePolicy { accept_fictional: true, ..PhonePolicy::default() }.parse(&input);
        }
    }
}
