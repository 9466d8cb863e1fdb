//! Message texts per challenge and language. A template may use `{code}`, `{code_spaced}` (the
//! digits separated by commas, for speech) and `{service}`. The client's locale picks the
//! language (`pt-BR`, then `pt`, then English). SMS texts are checked against one GSM-7 segment
//! (160 characters of the GSM 03.38 alphabet): beyond it a text costs more than one message, so
//! start-up warns about templates that cannot fit.

use std::collections::BTreeMap;

use registrar_providers::Challenge;

/// Templates by challenge, then language (lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    by_challenge: BTreeMap<Challenge, BTreeMap<String, String>>,
}

const PLACEHOLDERS: [&str; 3] = ["code", "code_spaced", "service"];

/// The built-in English texts.
pub fn default_template(challenge: Challenge) -> &'static str {
    match challenge {
        Challenge::Pin => "{code} is your {service} verification code.",
        Challenge::Voice => {
            "Your {service} verification code is {code_spaced}. Again: {code_spaced}."
        }
        Challenge::MissedCall => "{service} verification call",
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            by_challenge: Challenge::ALL
                .into_iter()
                .map(|c| {
                    (
                        c,
                        BTreeMap::from([("en".to_owned(), default_template(c).to_owned())]),
                    )
                })
                .collect(),
        }
    }
}

/// How an SMS text is encoded and how many messages it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmsEncoding {
    /// GSM 03.38, 160 septets in one message (153 per part when concatenated).
    Gsm7 {
        /// Messages.
        segments: usize,
    },
    /// UCS-2, 70 characters in one message (67 per part).
    Ucs2 {
        /// Messages.
        segments: usize,
    },
}

const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const GSM7_EXTENDED: &str = "^{}\\[~]|€\u{c}";

/// The encoding and message count of `text` as an SMS.
pub fn sms_encoding(text: &str) -> SmsEncoding {
    let mut septets = 0usize;
    for c in text.chars() {
        if GSM7_BASIC.contains(c) {
            septets += 1;
        } else if GSM7_EXTENDED.contains(c) {
            septets += 2;
        } else {
            let units = text.encode_utf16().count();
            return SmsEncoding::Ucs2 {
                segments: if units <= 70 { 1 } else { units.div_ceil(67) },
            };
        }
    }
    SmsEncoding::Gsm7 {
        segments: if septets <= 160 {
            1
        } else {
            septets.div_ceil(153)
        },
    }
}

fn check_placeholders(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| "an unclosed { in the template".to_owned())?;
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{name}}} (known: {{code}}, {{code_spaced}}, {{service}})"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

impl Templates {
    /// The defaults overlaid with `configured` (challenge -> language -> text). Errors name the
    /// template.
    pub fn new(configured: &BTreeMap<Challenge, BTreeMap<String, String>>) -> Result<Self, String> {
        let mut t = Self::default();
        for (challenge, languages) in configured {
            for (lang, text) in languages {
                let key = format!("templates.{challenge}.{lang}");
                check_placeholders(text).map_err(|e| format!("{key}: {e}"))?;
                if *challenge != Challenge::MissedCall && !text.contains("{code") {
                    return Err(format!(
                        "{key}: the text must contain {{code}} or {{code_spaced}}"
                    ));
                }
                t.by_challenge
                    .entry(*challenge)
                    .or_default()
                    .insert(lang.to_ascii_lowercase(), text.clone());
            }
        }
        Ok(t)
    }

    fn pick(&self, challenge: Challenge, locale: Option<&str>) -> &str {
        let texts = self.by_challenge.get(&challenge);
        let lookup = |lang: &str| texts.and_then(|t| t.get(lang)).map(String::as_str);
        if let Some(locale) = locale {
            let locale = locale.trim().to_ascii_lowercase().replace('_', "-");
            if let Some(t) = lookup(&locale) {
                return t;
            }
            if let Some(t) = locale.split('-').next().and_then(lookup) {
                return t;
            }
        }
        lookup("en").unwrap_or_else(|| default_template(challenge))
    }

    /// The text for `challenge` in `locale` with `code` and `service`.
    pub fn render(
        &self,
        challenge: Challenge,
        locale: Option<&str>,
        code: &str,
        service: &str,
    ) -> String {
        let spaced: Vec<String> = code.chars().map(String::from).collect();
        self.pick(challenge, locale)
            .replace("{code_spaced}", &spaced.join(", "))
            .replace("{code}", code)
            .replace("{service}", service)
    }

    /// `(template key, encoding)` for every SMS template rendered with the longest code, that
    /// takes more than one message.
    pub fn oversized_sms(&self, service: &str, code_length: usize) -> Vec<(String, SmsEncoding)> {
        let code = "9".repeat(code_length);
        self.by_challenge
            .get(&Challenge::Pin)
            .into_iter()
            .flatten()
            .filter_map(|(lang, _)| {
                let text = self.render(Challenge::Pin, Some(lang), &code, service);
                match sms_encoding(&text) {
                    SmsEncoding::Gsm7 { segments: 1 } | SmsEncoding::Ucs2 { segments: 1 } => None,
                    e => Some((format!("templates.pin.{lang}"), e)),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configured(
        pairs: &[(Challenge, &str, &str)],
    ) -> BTreeMap<Challenge, BTreeMap<String, String>> {
        let mut m: BTreeMap<Challenge, BTreeMap<String, String>> = BTreeMap::new();
        for (c, l, t) in pairs {
            m.entry(*c)
                .or_default()
                .insert(l.to_string(), t.to_string());
        }
        m
    }

    #[test]
    fn picks_the_language_with_fallbacks() {
        let t = Templates::new(&configured(&[
            (Challenge::Pin, "it", "{code} è il tuo codice {service}."),
            (Challenge::Pin, "pt-BR", "{code} é o seu código {service}."),
        ]))
        .unwrap();
        assert_eq!(
            t.render(Challenge::Pin, Some("it"), "123456", "Kontalk"),
            "123456 è il tuo codice Kontalk."
        );
        assert_eq!(
            t.render(Challenge::Pin, Some("it_CH"), "1", "K"),
            "1 è il tuo codice K."
        );
        assert_eq!(
            t.render(Challenge::Pin, Some("pt-br"), "1", "K"),
            "1 é o seu código K."
        );
        assert_eq!(
            t.render(Challenge::Pin, Some("de"), "1", "K"),
            "1 is your K verification code."
        );
        assert_eq!(
            t.render(Challenge::Pin, None, "1", "K"),
            "1 is your K verification code."
        );
        assert_eq!(
            t.render(Challenge::Voice, None, "123", "K"),
            "Your K verification code is 1, 2, 3. Again: 1, 2, 3."
        );
    }

    #[test]
    fn bad_templates_are_refused_by_key() {
        let e = Templates::new(&configured(&[(Challenge::Pin, "en", "{cod} is it")])).unwrap_err();
        assert!(
            e.starts_with("templates.pin.en: unknown placeholder {cod}"),
            "{e}"
        );
        let e =
            Templates::new(&configured(&[(Challenge::Voice, "fr", "pas de code")])).unwrap_err();
        assert!(
            e.contains("templates.voice.fr") && e.contains("{code}"),
            "{e}"
        );
        assert!(Templates::new(&configured(&[(Challenge::Pin, "en", "{code")])).is_err());
        assert!(
            Templates::new(&configured(&[(
                Challenge::MissedCall,
                "en",
                "{service} calls"
            )]))
            .is_ok()
        );
    }

    #[test]
    fn gsm7_segments() {
        assert_eq!(
            sms_encoding("123456 is your Kontalk verification code."),
            SmsEncoding::Gsm7 { segments: 1 }
        );
        assert_eq!(
            sms_encoding(&"a".repeat(160)),
            SmsEncoding::Gsm7 { segments: 1 }
        );
        assert_eq!(
            sms_encoding(&"a".repeat(161)),
            SmsEncoding::Gsm7 { segments: 2 }
        );
        // Extension characters take two septets.
        assert_eq!(
            sms_encoding(&"€".repeat(80)),
            SmsEncoding::Gsm7 { segments: 1 }
        );
        assert_eq!(
            sms_encoding(&"€".repeat(81)),
            SmsEncoding::Gsm7 { segments: 2 }
        );
        assert_eq!(
            sms_encoding("è il tuo codice"),
            SmsEncoding::Gsm7 { segments: 1 }
        );
        assert_eq!(
            sms_encoding("é o seu código"),
            SmsEncoding::Ucs2 { segments: 1 },
            "ó is not GSM-7"
        );
        assert_eq!(
            sms_encoding(&"ж".repeat(71)),
            SmsEncoding::Ucs2 { segments: 2 }
        );
        let t = Templates::default();
        assert!(
            t.oversized_sms("Kontalk", 10).is_empty(),
            "the defaults fit one segment"
        );
        let long = Templates::new(&configured(&[(
            Challenge::Pin,
            "en",
            &format!("{{code}} {}", "x".repeat(160)),
        )]))
        .unwrap();
        assert_eq!(long.oversized_sms("K", 6).len(), 1);
    }
}
