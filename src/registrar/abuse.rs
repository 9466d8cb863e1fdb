//! The rules of abuse resistance, as plain values and pure functions: rates and their GCRA
//! arithmetic, the scopes a request is counted under, allow and deny lists, the SMS-pumping
//! verdict, daily caps and costs. The [`Registrar`](super::Registrar) applies them through the
//! store (`guard.rs`), so that every counter is shared by the instances behind one database.
//!
//! Prefixes and countries are E.164 digits (a calling code such as `44`), never
//! libphonenumber's region guess: `+44 7911 123456` is region GG for libphonenumber but the
//! United Kingdom's mobile range for an operator's price list and for a fraudster alike.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use super::error::Refusal;

/// At most `count` events per `per`, with bursts up to `count` (a GCRA bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// `count` per `per`.
    pub const fn new(count: u32, per: Duration) -> Self {
        Self { count, per }
    }

    fn period_ms(&self) -> i64 {
        i64::try_from(self.per.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// Milliseconds one event costs.
    pub fn interval_ms(&self) -> i64 {
        (self.period_ms() / i64::from(self.count.max(1))).max(1)
    }
}

/// A rate that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a rate such as \"5/1h\" (a count, a slash, and a period in s, m, h or d)")]
pub struct BadRate(pub String);

impl FromStr for Rate {
    type Err = BadRate;
    /// `"5/1h"`, `"100/10m"`, `"3/90s"`, `"20/1d"`; a bare unit means one (`"10/h"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadRate(s.to_owned());
        let (count, period) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = period.trim();
        let split = period.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = period.split_at(split);
        let n: u64 = if n.is_empty() {
            1
        } else {
            n.parse().map_err(|_| bad())?
        };
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let secs = n.checked_mul(unit_secs).ok_or_else(bad)?;
        if count == 0 || secs == 0 || secs > 30 * 86_400 {
            return Err(bad());
        }
        Ok(Rate::new(count, Duration::from_secs(secs)))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.per.as_secs();
        let (n, unit) = if s.is_multiple_of(86_400) {
            (s / 86_400, "d")
        } else if s.is_multiple_of(3600) {
            (s / 3600, "h")
        } else if s.is_multiple_of(60) {
            (s / 60, "m")
        } else {
            (s, "s")
        };
        write!(f, "{}/{n}{unit}", self.count)
    }
}

/// What a request is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The client's IP address (IPv6 grouped by network).
    Ip,
    /// The phone number.
    Number,
    /// The first digits of the number.
    Prefix,
    /// The calling code.
    Country,
    /// Everything.
    Global,
}

impl Scope {
    /// Every scope, narrowest first.
    pub const ALL: [Scope; 5] = [
        Scope::Ip,
        Scope::Number,
        Scope::Prefix,
        Scope::Country,
        Scope::Global,
    ];

    /// The name in configuration, keys and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::Number => "number",
            Scope::Prefix => "prefix",
            Scope::Country => "country",
            Scope::Global => "global",
        }
    }
}

/// What is being limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Starting a verification (a message goes out, or `conflict` tells the number is taken).
    Start,
    /// Sending another message for a verification.
    Resend,
    /// Submitting a code.
    Check,
}

impl Action {
    /// The name in configuration and keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Resend => "resend",
            Action::Check => "check",
        }
    }
}

/// The rate per scope of one action (`None`: unlimited in that scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Per client IP (or IPv6 network).
    pub ip: Option<Rate>,
    /// Per phone number.
    pub number: Option<Rate>,
    /// Per number prefix.
    pub prefix: Option<Rate>,
    /// Per calling code.
    pub country: Option<Rate>,
    /// For the whole service.
    pub global: Option<Rate>,
}

impl Limits {
    /// The rate of `scope`.
    pub fn get(&self, scope: Scope) -> Option<Rate> {
        match scope {
            Scope::Ip => self.ip,
            Scope::Number => self.number,
            Scope::Prefix => self.prefix,
            Scope::Country => self.country,
            Scope::Global => self.global,
        }
    }
}

/// Allow and deny lists. Empty allow lists allow everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lists {
    /// Calling codes served (digits, e.g. `"39"`); empty: all.
    pub allow_countries: Vec<String>,
    /// Calling codes refused.
    pub deny_countries: Vec<String>,
    /// E.164 prefixes served (digits); empty: all.
    pub allow_prefixes: Vec<String>,
    /// E.164 prefixes refused (digits).
    pub deny_prefixes: Vec<String>,
    /// Client networks refused.
    pub deny_ips: Vec<IpNet>,
    /// Client networks that skip IP throttling (trusted backends).
    pub trusted_ips: Vec<IpNet>,
}

impl Lists {
    /// Whether the number with E.164 `digits` (no `+`) and calling code `country` may be served.
    pub fn check_number(&self, digits: &str, country: &str) -> Result<(), Refusal> {
        let country_listed = |list: &[String]| list.iter().any(|c| c == country);
        let prefix_listed = |list: &[String]| list.iter().any(|p| digits.starts_with(p.as_str()));
        if country_listed(&self.deny_countries)
            || (!self.allow_countries.is_empty() && !country_listed(&self.allow_countries))
        {
            return Err(Refusal::CountryNotServed);
        }
        if prefix_listed(&self.deny_prefixes)
            || (!self.allow_prefixes.is_empty() && !prefix_listed(&self.allow_prefixes))
        {
            return Err(Refusal::PrefixNotServed);
        }
        Ok(())
    }

    /// Whether requests from `ip` are refused.
    pub fn ip_denied(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.deny_ips.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` skips IP throttling.
    pub fn ip_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_ips.iter().any(|n| n.contains(&ip))
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, as dual-stack sockets report it) as the
/// IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The unit counted for `ip`: the address for IPv4, its `/prefix` network for IPv6 (one
/// subscriber usually holds a whole /64).
pub fn ip_group(ip: IpAddr, v6_prefix: u8) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match ipnet::Ipv6Net::new(v6, v6_prefix.min(128)) {
            Ok(net) => net.trunc().to_string(),
            Err(_) => v6.to_string(),
        },
    }
}

/// How the traffic of a range is judged: at several levels at once (its calling code, prefixes
/// of the lengths in `levels`, and the `prefix_digits` prefix), and answered in steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Pumping {
    /// Whether the defence is on.
    pub enabled: bool,
    /// How far back messages, numbers, sources and completions are counted.
    pub window: Duration,
    /// Prefix lengths (E.164 digits, calling code included) judged besides the calling code and
    /// the `prefix_digits` prefix, which is the only level ever blocked.
    pub levels: Vec<usize>,
    /// Distinct numbers messaged, asked for by at least as many distinct sources, before a level
    /// is judged: one client messaging many numbers, or many clients one number, is for the
    /// per-client and per-number limits.
    pub min_numbers: u32,
    /// Completed verifications per number below which a level's waits grow.
    pub slow_below: f64,
    /// How much longer the waits between messages are then.
    pub slow_factor: u32,
    /// Completed verifications per number below which a level's texts and voice calls become
    /// missed calls (where a provider can place one), and the `prefix_digits` prefix is blocked
    /// once that has not helped for `block_after`.
    pub min_completion: f64,
    /// How long missed calls are tried on a prefix before it is blocked.
    pub block_after: Duration,
    /// How long a block lasts.
    pub block_for: Duration,
}

impl Default for Pumping {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_secs(6 * 3600),
            levels: vec![5, 6],
            min_numbers: 20,
            slow_below: 0.5,
            slow_factor: 4,
            min_completion: 0.2,
            block_after: Duration::from_secs(3600),
            block_for: Duration::from_secs(86_400),
        }
    }
}

/// What one level's traffic calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Nothing: too little traffic to judge, or enough of it completes.
    Clear,
    /// Longer waits between messages.
    Slow,
    /// Missed calls instead of texts and voice calls; a block if that does not help.
    Call,
}

/// What is in force on a traffic scope for a while (a row of the `blocks` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Missed calls replace texts and voice calls.
    Call,
    /// Nothing is sent.
    Block,
}

impl Measure {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Call => "call",
            Measure::Block => "block",
        }
    }

    /// The measure stored as `name`; an unknown name is a block (fail closed).
    pub fn from_stored(name: &str) -> Self {
        if name == "call" {
            Measure::Call
        } else {
            Measure::Block
        }
    }
}

impl Pumping {
    /// What a level calls for that, within the window, messaged `numbers` distinct numbers for
    /// `sources` distinct clients, of which `completed` completed: judged once both counts reach
    /// `min_numbers`, by completions per number (resends to one number count once).
    pub fn step(&self, numbers: u64, sources: u64, completed: u64) -> Step {
        if !self.enabled || numbers.min(sources) < u64::from(self.min_numbers) {
            return Step::Clear;
        }
        let ratio = completed as f64 / numbers as f64;
        if ratio < self.min_completion {
            Step::Call
        } else if ratio < self.slow_below {
            Step::Slow
        } else {
            Step::Clear
        }
    }
}

/// Hard caps on messages per UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caps {
    /// All messages.
    pub total: Option<u32>,
    /// Messages to any one calling code, unless listed in `countries`.
    pub per_country: Option<u32>,
    /// Caps for particular calling codes.
    pub countries: BTreeMap<String, u32>,
}

impl Caps {
    /// The cap for calling code `country`.
    pub fn for_country(&self, country: &str) -> Option<u32> {
        self.countries.get(country).copied().or(self.per_country)
    }
}

/// The price of one message of a provider to a country.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    /// Provider name.
    pub provider: String,
    /// Calling code; empty for every country without an entry of its own.
    pub country: String,
    /// Price per message (per call for voice and missed calls).
    pub price: f64,
}

/// The price of a message of `provider` to calling code `country`: its own entry, else the
/// provider's entry for every country.
pub fn price(costs: &[Cost], provider: &str, country: &str) -> Option<f64> {
    let of = |c: &str| {
        costs
            .iter()
            .find(|e| e.provider == provider && e.country == c)
            .map(|e| e.price)
    };
    of(country).or_else(|| of(""))
}

/// Every abuse setting.
#[derive(Debug, Clone, PartialEq)]
pub struct AbuseSettings {
    /// Starting verifications.
    pub start: Limits,
    /// Resending.
    pub resend: Limits,
    /// Checking codes.
    pub check: Limits,
    /// Digits of the E.164 number (with the calling code) that make its prefix.
    pub prefix_digits: usize,
    /// IPv6 addresses are counted by networks of this length.
    pub ipv6_prefix: u8,
    /// Serve without limits when the store cannot count (otherwise refuse).
    pub fail_open: bool,
    /// A repeated start by the same client within this time returns the verification.
    pub repeat_window: Duration,
    /// Allow and deny lists.
    pub lists: Lists,
    /// SMS-pumping defence.
    pub pumping: Pumping,
    /// Daily caps.
    pub caps: Caps,
    /// Prices, for the spend report.
    pub costs: Vec<Cost>,
    /// Currency of the prices.
    pub currency: String,
    /// Numbers (E.164) with fixed codes that never reach a provider.
    pub test_numbers: BTreeMap<String, String>,
}

const fn per_hour(n: u32) -> Option<Rate> {
    Some(Rate::new(n, Duration::from_secs(3600)))
}

const fn per_day(n: u32) -> Option<Rate> {
    Some(Rate::new(n, Duration::from_secs(86_400)))
}

impl Default for AbuseSettings {
    fn default() -> Self {
        Self {
            start: Limits {
                ip: per_hour(20),
                // A burst of four, then one per 15 minutes: a stranger's start keeps the number's
                // owner from starting for at most a quarter of an hour.
                number: Some(Rate::new(4, Duration::from_secs(3600))),
                prefix: per_hour(60),
                country: per_hour(2000),
                global: per_hour(20_000),
            },
            resend: Limits {
                ip: per_hour(20),
                number: per_hour(5),
                prefix: per_hour(60),
                country: None,
                global: None,
            },
            check: Limits {
                ip: per_hour(60),
                number: per_day(15),
                prefix: None,
                country: None,
                global: None,
            },
            prefix_digits: 7,
            ipv6_prefix: 64,
            fail_open: false,
            repeat_window: Duration::from_secs(30),
            lists: Lists::default(),
            pumping: Pumping::default(),
            caps: Caps {
                total: Some(20_000),
                per_country: Some(2_000),
                countries: BTreeMap::new(),
            },
            costs: Vec::new(),
            currency: "USD".into(),
            test_numbers: BTreeMap::new(),
        }
    }
}

impl AbuseSettings {
    /// The rates of `action`.
    pub fn limits(&self, action: Action) -> &Limits {
        match action {
            Action::Start => &self.start,
            Action::Resend => &self.resend,
            Action::Check => &self.check,
        }
    }

    /// The traffic scopes of a number with E.164 `digits` and calling code `country`, broadest
    /// first: `country:<code>`, then `prefix:<digits>` for each pumping level longer than the
    /// calling code and shorter than the number, and last the `prefix_digits` prefix (the level a
    /// block applies to).
    pub fn traffic_scopes(&self, digits: &str, country: &str) -> Vec<String> {
        let block_level = self.prefix(digits);
        let mut lengths: Vec<usize> = self
            .pumping
            .levels
            .iter()
            .copied()
            .filter(|&l| l > country.len() && l < digits.len() && l < block_level.len())
            .collect();
        lengths.sort_unstable();
        lengths.dedup();
        let mut scopes = Vec::with_capacity(lengths.len() + 2);
        scopes.push(format!("country:{country}"));
        scopes.extend(lengths.iter().map(|&l| format!("prefix:{}", &digits[..l])));
        scopes.push(format!("prefix:{block_level}"));
        scopes
    }

    /// The prefix of a number with E.164 `digits`.
    pub fn prefix<'a>(&self, digits: &'a str) -> &'a str {
        &digits[..digits.len().min(self.prefix_digits)]
    }
}

/// The ten-minute traffic bucket of Unix time `t`.
pub fn bucket(t: i64) -> i64 {
    t.div_euclid(600)
}

/// The UTC day of Unix time `t`.
pub fn day(t: i64) -> i64 {
    t.div_euclid(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let r: Rate = "5/1h".parse().unwrap();
        assert_eq!(r, Rate::new(5, Duration::from_secs(3600)));
        assert_eq!(r.to_string(), "5/1h");
        assert_eq!(
            "10/h".parse::<Rate>().unwrap().per,
            Duration::from_secs(3600)
        );
        assert_eq!("3/90s".parse::<Rate>().unwrap().to_string(), "3/90s");
        assert_eq!("20/1d".parse::<Rate>().unwrap().to_string(), "20/1d");
        assert_eq!("100/10m".parse::<Rate>().unwrap().to_string(), "100/10m");
        for bad in [
            "", "5", "0/1h", "5/0h", "5/1y", "x/1h", "5/h1", "5/31d", "-1/1h",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn gcra_allows_a_burst_then_one_per_interval() {
        // The bucket's arithmetic (ports::RateBucket::admit), which the SQL adapters repeat in
        // one conditional upsert.
        let r =
            super::super::ports::RateBucket::new("k".into(), Rate::new(3, Duration::from_secs(60)));
        let now = 1_000_000;
        let mut tat = 0;
        for _ in 0..3 {
            tat = r.admit(tat, now).unwrap();
        }
        // The fourth must wait one interval (20 s) from the first.
        assert_eq!(r.admit(tat, now), Err(now + 20_000));
        assert!(r.admit(tat, now + 19_999).is_err());
        tat = r.admit(tat, now + 20_000).unwrap();
        assert!(r.admit(tat, now + 20_000).is_err());
        // A bucket left alone refills completely.
        let mut t = now + 1_000_000;
        for _ in 0..3 {
            tat = r.admit(tat, t).unwrap();
            t += 1;
        }
        assert!(r.admit(tat, t).is_err());
    }

    #[test]
    fn lists_work_on_calling_codes_and_digits() {
        let l = Lists {
            deny_countries: vec!["882".into()],
            deny_prefixes: vec!["447911".into()],
            ..Lists::default()
        };
        assert_eq!(
            l.check_number("88216123456", "882"),
            Err(Refusal::CountryNotServed)
        );
        assert_eq!(
            l.check_number("447911123456", "44"),
            Err(Refusal::PrefixNotServed)
        );
        assert_eq!(l.check_number("447700900123", "44"), Ok(()));
        let only = Lists {
            allow_countries: vec!["39".into()],
            allow_prefixes: vec!["393".into()],
            ..Lists::default()
        };
        assert_eq!(only.check_number("393401234567", "39"), Ok(()));
        assert_eq!(
            only.check_number("390612345678", "39"),
            Err(Refusal::PrefixNotServed)
        );
        assert_eq!(
            only.check_number("4915112345678", "49"),
            Err(Refusal::CountryNotServed)
        );
    }

    #[test]
    fn ips_are_grouped_and_matched() {
        let v6: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(ip_group(v6, 64), "2001:db8:1:2::/64");
        assert_eq!(ip_group(v6, 64), ip_group(other, 64));
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(ip_group(mapped, 64), "203.0.113.7");
        let l = Lists {
            deny_ips: vec!["203.0.113.0/24".parse().unwrap()],
            trusted_ips: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ..Lists::default()
        };
        assert!(l.ip_denied(mapped));
        assert!(!l.ip_denied("198.51.100.1".parse().unwrap()));
        assert!(l.ip_trusted("10.1.2.3".parse().unwrap()));
        assert!(l.ip_trusted(v6));
        assert!(!l.ip_trusted("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn traffic_scopes_go_from_the_country_to_the_blocked_prefix() {
        let a = AbuseSettings::default();
        assert_eq!(
            a.traffic_scopes("447911123456", "44"),
            [
                "country:44",
                "prefix:44791",
                "prefix:447911",
                "prefix:4479111"
            ]
        );
        let a = AbuseSettings {
            prefix_digits: 5,
            pumping: Pumping {
                levels: vec![7, 2, 4, 4, 1],
                ..Pumping::default()
            },
            ..AbuseSettings::default()
        };
        // Levels no longer than the calling code or not shorter than the blocked prefix go.
        assert_eq!(
            a.traffic_scopes("3934712345", "39"),
            ["country:39", "prefix:3934", "prefix:39347"]
        );
    }

    #[test]
    fn pumping_needs_numbers_and_sources_and_steps_by_the_ratio() {
        let p = Pumping::default();
        assert_eq!(p.step(19, 100, 0), Step::Clear, "too few numbers to judge");
        assert_eq!(p.step(100, 19, 0), Step::Clear, "too few sources to judge");
        assert_eq!(p.step(20, 20, 3), Step::Call);
        assert_eq!(p.step(20, 20, 4), Step::Slow);
        assert_eq!(p.step(20, 20, 9), Step::Slow);
        assert_eq!(p.step(20, 20, 10), Step::Clear);
        assert_eq!(p.step(1000, 900, 700), Step::Clear);
        assert_eq!(
            Pumping {
                enabled: false,
                ..p
            }
            .step(1000, 1000, 0),
            Step::Clear
        );
    }

    #[test]
    fn prices_fall_back_to_the_providers_default() {
        let cost = |provider: &str, country: &str, price| Cost {
            provider: provider.into(),
            country: country.into(),
            price,
        };
        let costs = vec![
            cost("t", "", 0.01),
            cost("t", "44", 0.04),
            cost("v", "44", 0.03),
        ];
        assert_eq!(price(&costs, "t", "44"), Some(0.04));
        assert_eq!(price(&costs, "t", "39"), Some(0.01));
        assert_eq!(price(&costs, "v", "44"), Some(0.03));
        assert_eq!(price(&costs, "v", "39"), None);
        let caps = Caps {
            total: None,
            per_country: Some(10),
            countries: [("44".to_owned(), 99)].into(),
        };
        assert_eq!(caps.for_country("44"), Some(99));
        assert_eq!(caps.for_country("39"), Some(10));
    }
}
