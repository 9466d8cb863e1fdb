//! The core's value types: verification ids and codes, built only by parsing or generation.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

/// Random verification id: 128 bits from the thread-local CSPRNG, as 32 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct VerificationId(String);

impl VerificationId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// An id read back from our own store.
    pub(crate) fn from_stored(id: &str) -> Self {
        Self(id.to_owned())
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VerificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Not a verification id (so certainly no known one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a verification id")]
pub struct BadVerificationId;

impl FromStr for VerificationId {
    type Err = BadVerificationId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadVerificationId)
        }
    }
}

/// Shortest and longest configurable code.
pub const CODE_LENGTHS: std::ops::RangeInclusive<usize> = 4..=10;

/// A verification code: decimal digits only. `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

impl Code {
    /// A fresh code of `len` random digits from the thread-local CSPRNG (ChaCha, seeded by the
    /// operating system).
    pub fn generate(len: usize) -> Self {
        let mut rng = rand::rng();
        Self(
            (0..len)
                .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                .collect(),
        )
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code(<{} digits>)", self.0.len())
    }
}

/// A code with something other than digits, or of no plausible length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the code must be 1 to 16 decimal digits")]
pub struct BadCode;

impl FromStr for Code {
    type Err = BadCode;
    /// Accepts the digits with spaces or dashes between them, as people type codes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits: String = s.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        if (1..=16).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(digits))
        } else {
            Err(BadCode)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_asked_length_and_only_digits() {
        for len in CODE_LENGTHS {
            let c = Code::generate(len);
            assert_eq!(c.as_str().len(), len);
            assert!(c.as_str().bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn codes_are_spread_over_every_digit() {
        // 6000 digits: each of the ten appears (probability of a miss is ~1e-270).
        let mut seen = [0u32; 10];
        for _ in 0..1000 {
            for b in Code::generate(6).as_str().bytes() {
                seen[usize::from(b - b'0')] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 450 && n < 750), "{seen:?}");
        assert_ne!(Code::generate(10), Code::generate(10));
    }

    #[test]
    fn code_parsing() {
        assert_eq!("839 775".parse::<Code>().unwrap().as_str(), "839775");
        assert_eq!("839-775".parse::<Code>().unwrap().as_str(), "839775");
        assert!("83977a".parse::<Code>().is_err());
        assert!("".parse::<Code>().is_err());
        assert!("١٢٣٤".parse::<Code>().is_err(), "non-ASCII digits");
        assert!("1".repeat(17).parse::<Code>().is_err());
        assert_eq!(format!("{:?}", Code::generate(6)), "Code(<6 digits>)");
    }

    #[test]
    fn verification_ids_are_128_bit_hex() {
        let a = VerificationId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert_eq!(a.as_str().parse::<VerificationId>(), Ok(a.clone()));
        assert_ne!(a, VerificationId::generate());
        assert!("../etc/passwd".parse::<VerificationId>().is_err());
        assert!("A".repeat(32).parse::<VerificationId>().is_err());
    }
}
