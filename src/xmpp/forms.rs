//! Kontalk's registration forms: parse what clients submit, render what we answer. Pure functions
//! over xmpp-parsers types; the wire format is in `../shared/reference/kontalk-inband-registration.md`.
//!
//! Requests are dispatched on the form's `FORM_TYPE`, never on which fields happen to be present:
//! `jabber:iq:register` starts a verification, `http://kontalk.org/protocol/register#code`
//! submits the code and key, `http://kontalk.org/protocol/register#key` rolls a registered
//! account over to a new key (Kontalk's key rollover, sent by the logged-in user), and
//! `http://kontalk.org/protocol/register#privatekey` uploads the logged-in user's encrypted
//! private key for a new device, which fetches it with an `iq get` holding
//! `<account xmlns='http://kontalk.org/protocol/register#account'>` (see
//! `../shared/reference/kontalk-account-management.md`).

use crate::registrar::{Challenge, Verification};
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};
use xmpp_parsers::ibr::FormQuery;
use xmpp_parsers::minidom::Element;
use xmpp_parsers::ns;

/// A submitted form that cannot be used; the text says why (answered as bad-request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormError(pub String);

fn bad_request(text: &str) -> FormError {
    FormError(text.to_owned())
}

/// FORM_TYPE of step 2 (code and key).
pub const CODE_FORM_TYPE: &str = "http://kontalk.org/protocol/register#code";

/// FORM_TYPE of a key rollover (new key, optional revoked old key).
pub const KEY_FORM_TYPE: &str = "http://kontalk.org/protocol/register#key";

/// FORM_TYPE of a private key upload (and of its answer, with the token).
pub const PRIVATE_KEY_FORM_TYPE: &str = "http://kontalk.org/protocol/register#privatekey";

/// Namespace of the `account` element of a private key retrieval.
pub const ACCOUNT_NS: &str = "http://kontalk.org/protocol/register#account";

/// What a client asked with `iq get` on `jabber:iq:register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// The registration form (or, for a registered account, what it can change).
    Form,
    /// A new device's retrieval of the private key stored under `token`.
    PrivateKey {
        /// The token as sent.
        token: String,
    },
}

/// Parses the payload of an `iq get` on `jabber:iq:register`.
pub fn parse_query(payload: &Element) -> Result<Query, FormError> {
    let Some(account) = payload.get_child("account", ACCOUNT_NS) else {
        return Ok(Query::Form);
    };
    let token = account
        .get_child("privatekey", ACCOUNT_NS)
        .and_then(|p| p.get_child("token", ACCOUNT_NS))
        .map(|t| t.text())
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| bad_request("the account element needs <privatekey><token>"))?;
    Ok(Query::PrivateKey { token })
}

/// What a client submitted with `iq set` on `jabber:iq:register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submission {
    /// Step 1: verify this number.
    Start {
        /// The number as typed.
        phone: String,
        /// Replace an existing account.
        force: bool,
        /// Use another provider.
        fallback: bool,
        /// The challenge wanted.
        challenge: Option<Challenge>,
        /// Terms accepted.
        accept_terms: bool,
    },
    /// Step 2: the code and the key.
    Code {
        /// The code as typed.
        code: String,
        /// base64 of the binary public key, when sent in the form.
        public_key: Option<String>,
    },
    /// Key rollover: the logged-in user's new key, certified by its current key.
    Rollover {
        /// base64 of the new binary public key.
        public_key: String,
        /// base64 of the current key carrying its revocation, when sent.
        revoked: Option<String>,
    },
    /// Private key upload: base64 of the passphrase-protected secret key.
    PrivateKey {
        /// base64 of the binary (or armored) secret key.
        private_key: String,
    },
    /// XEP-0077 `<remove/>`.
    Remove,
}

fn value<'a>(form: &'a DataForm, var: &str) -> Option<&'a str> {
    form.fields
        .iter()
        .find(|f| f.var.as_deref() == Some(var))
        .and_then(|f| f.values.first())
        .map(|v| v.trim())
}

fn boolean(form: &DataForm, var: &str) -> Result<bool, FormError> {
    match value(form, var) {
        None | Some("") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some("0" | "false") => Ok(false),
        Some(_) => Err(bad_request(&format!(
            "the field {var} must be a boolean (true, false, 1 or 0)"
        ))),
    }
}

fn required<'a>(form: &'a DataForm, var: &str) -> Result<&'a str, FormError> {
    match value(form, var) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(bad_request(&format!("the field {var} is required"))),
    }
}

/// Parses the payload of an `iq set` on `jabber:iq:register`.
pub fn parse_submission(payload: Element) -> Result<Submission, FormError> {
    if payload.get_child("remove", ns::REGISTER).is_some() {
        return Ok(Submission::Remove);
    }
    let query = FormQuery::try_from(payload).map_err(|e| {
        bad_request(&format!(
            "a data form (jabber:x:data) is required in the query: {e}"
        ))
    })?;
    let form = query.form;
    if form.type_ != DataFormType::Submit {
        return Err(bad_request("the data form must be of type submit"));
    }
    match form.form_type() {
        Some(ns::REGISTER) => {
            let challenge = match value(&form, "challenge") {
                None | Some("") => None,
                Some(c) => Some(
                    c.parse::<Challenge>()
                        .map_err(|e| bad_request(&e.to_string()))?,
                ),
            };
            Ok(Submission::Start {
                phone: required(&form, "phone")?.to_owned(),
                force: boolean(&form, "force")?,
                fallback: boolean(&form, "fallback")?,
                challenge,
                accept_terms: boolean(&form, "accept-terms")?,
            })
        }
        Some(CODE_FORM_TYPE) => Ok(Submission::Code {
            code: required(&form, "code")?.to_owned(),
            public_key: value(&form, "publickey")
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
        }),
        Some(KEY_FORM_TYPE) => Ok(Submission::Rollover {
            public_key: required(&form, "publickey")?.to_owned(),
            revoked: value(&form, "revoked")
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
        }),
        Some(PRIVATE_KEY_FORM_TYPE) => Ok(Submission::PrivateKey {
            private_key: required(&form, "privatekey")?.to_owned(),
        }),
        Some(other) => Err(bad_request(&format!("unknown FORM_TYPE {other}"))),
        None => Err(bad_request("the data form has no FORM_TYPE")),
    }
}

fn field(var: &str, type_: FieldType, label: &str) -> Field {
    let mut f = Field::new(var, type_);
    f.label = Some(label.to_owned());
    f
}

fn with_value(mut f: Field, value: impl Into<String>) -> Field {
    f.values.push(value.into());
    f
}

/// The registration form (answer to `iq get`): phone, force, fallback, the challenges the
/// providers can deliver, and the terms when configured.
pub fn registration_form(
    instructions: &str,
    challenges: &[Challenge],
    terms_url: Option<&str>,
) -> FormQuery {
    let mut phone = field("phone", FieldType::TextSingle, "Phone number");
    phone.required = true;
    let mut challenge = field("challenge", FieldType::ListSingle, "Challenge type");
    challenge.options = challenges
        .iter()
        .map(|c| Option_ {
            label: Some(
                match c {
                    Challenge::Pin => "PIN by text message",
                    Challenge::Voice => "PIN by voice call",
                    Challenge::MissedCall => "Missed call",
                }
                .to_owned(),
            ),
            value: c.as_str().to_owned(),
        })
        .collect();
    if let Some(first) = challenges.first() {
        challenge.values.push(first.as_str().to_owned());
    }
    let mut fields = vec![
        phone,
        with_value(
            field("force", FieldType::Boolean, "Force registration"),
            "false",
        ),
        with_value(
            field("fallback", FieldType::Boolean, "Use another provider"),
            "false",
        ),
        challenge,
    ];
    if let Some(url) = terms_url {
        let mut accept = field(
            "accept-terms",
            FieldType::Boolean,
            "Accept the terms of service",
        );
        accept.required = true;
        fields.push(with_value(accept, "false"));
        fields.push(with_value(Field::new("terms", FieldType::Hidden), url));
    }
    FormQuery {
        instructions: Some(instructions.to_owned()),
        form: DataForm::new(DataFormType::Form, ns::REGISTER, fields),
    }
}

/// The answer to step 1: instructions and a form with the sender id and the challenge.
pub fn started_form(v: &Verification) -> FormQuery {
    let mut fields = vec![
        with_value(
            field("from", FieldType::TextSingle, "Sender ID"),
            v.sender.clone(),
        ),
        with_value(
            field("challenge", FieldType::TextSingle, "Challenge type"),
            v.challenge.as_str(),
        ),
    ];
    if v.can_fallback {
        fields.push(with_value(
            field(
                "can-fallback",
                FieldType::Boolean,
                "Another provider can be used",
            ),
            "true",
        ));
    }
    let time =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    fields.push(with_value(
        field(
            "next-resend-at",
            FieldType::TextSingle,
            "A new code can be asked for from",
        ),
        time(v.next_resend_at),
    ));
    if let Some(call_at) = v.next_call_at {
        fields.push(with_value(
            field(
                "next-call-at",
                FieldType::TextSingle,
                "A call can replace the message from",
            ),
            time(call_at),
        ));
    }
    FormQuery {
        instructions: Some(v.instructions.clone()),
        form: DataForm::new(DataFormType::Form, ns::REGISTER, fields),
    }
}

/// The answer to step 2: the certified key, base64 of the binary key.
pub fn registered_form(public_key_b64: String) -> FormQuery {
    key_form(CODE_FORM_TYPE, public_key_b64)
}

/// The answer to a rollover: the new key with our certification, in the `publickey` field
/// Kontalk's client reads.
pub fn rolled_over_form(public_key_b64: String) -> FormQuery {
    key_form(KEY_FORM_TYPE, public_key_b64)
}

/// The answer to a registered account's `iq get` (XEP-0077 3.2.1: `<registered/>`), with what it
/// can change: its key (the rollover form, whose fields are listed), its private key for a new
/// device (`#privatekey`), and `<remove/>`.
pub fn registered_query(instructions: &str) -> Element {
    let mut public_key = field("publickey", FieldType::TextSingle, "New public key");
    public_key.required = true;
    let revoked = field(
        "revoked",
        FieldType::TextSingle,
        "Current key with its revocation",
    );
    let form = DataForm::new(DataFormType::Form, KEY_FORM_TYPE, vec![public_key, revoked]);
    Element::builder("query", ns::REGISTER)
        .append(Element::builder("registered", ns::REGISTER).build())
        .append(
            Element::builder("instructions", ns::REGISTER)
                .append(instructions)
                .build(),
        )
        .append(Element::from(form))
        .build()
}

/// The answer to a private key upload: the token for the new device.
pub fn private_key_token_form(token: &str) -> FormQuery {
    FormQuery {
        instructions: None,
        form: DataForm::new(
            DataFormType::Form,
            PRIVATE_KEY_FORM_TYPE,
            vec![with_value(
                field("token", FieldType::TextSingle, "Private key token"),
                token,
            )],
        ),
    }
}

/// The answer to a retrieval: the stored private key and the account's public key, both base64
/// of binary OpenPGP, as Kontalk's Android client reads them.
pub fn account_query(private_b64: &str, public_b64: &str) -> Element {
    let text = |name: &str, value: &str| Element::builder(name, ACCOUNT_NS).append(value).build();
    Element::builder("query", ns::REGISTER)
        .append(
            Element::builder("account", ACCOUNT_NS)
                .append(
                    Element::builder("privatekey", ACCOUNT_NS)
                        .append(text("private", private_b64))
                        .append(text("public", public_b64))
                        .build(),
                )
                .build(),
        )
        .build()
}

fn key_form(form_type: &str, public_key_b64: String) -> FormQuery {
    FormQuery {
        instructions: None,
        form: DataForm::new(
            DataFormType::Form,
            form_type,
            vec![with_value(
                field("publickey", FieldType::TextSingle, "Signed public key"),
                public_key_b64,
            )],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use xmpp_parsers::iq::Iq;

    /// The iq as a component receives it (namespace jabber:component:accept), with `query`.
    fn iq(query: &str) -> Iq {
        let xml = format!(
            "<iq xmlns='jabber:component:accept' from='anon@localhost/res' \
             to='register.localhost' id='80zgA-18' type='set'>{query}</iq>"
        );
        Iq::try_from(Element::from_str(&xml).unwrap()).unwrap()
    }

    fn payload(query: &str) -> Element {
        match iq(query) {
            Iq::Set { payload, .. } => payload,
            other => panic!("{other:?}"),
        }
    }

    fn parse(query: &str) -> Result<Submission, FormError> {
        parse_submission(payload(query))
    }

    fn err_text(r: Result<Submission, FormError>) -> String {
        r.unwrap_err().0
    }

    // The three requests of the protocol document, verbatim.
    const STEP1: &str = "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>jabber:iq:register</value></field><field label='Phone number' var='phone' type='text-single'><value>+15555215554</value></field></x></query>";
    const STEP1_FORCE: &str = "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>jabber:iq:register</value></field><field label='Phone number' var='phone' type='text-single'><value>+15555215554</value></field><field label='Force registration' var='force' type='boolean'><value>true</value></field></x></query>";
    const STEP2: &str = "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://kontalk.org/protocol/register#code</value></field><field label='Validation code' var='code' type='text-single'><value>839775</value></field></x></query>";

    #[test]
    fn parses_the_protocol_documents_requests() {
        assert_eq!(
            parse(STEP1).unwrap(),
            Submission::Start {
                phone: "+15555215554".into(),
                force: false,
                fallback: false,
                challenge: None,
                accept_terms: false
            }
        );
        assert!(matches!(
            parse(STEP1_FORCE).unwrap(),
            Submission::Start { force: true, .. }
        ));
        assert_eq!(
            parse(STEP2).unwrap(),
            Submission::Code {
                code: "839775".into(),
                public_key: None
            }
        );
        let with_key = STEP2.replace(
            "</x>",
            "<field var='publickey'><value>AAAA</value></field></x>",
        );
        assert_eq!(
            parse(&with_key).unwrap(),
            Submission::Code {
                code: "839775".into(),
                public_key: Some("AAAA".into())
            }
        );
        let rollover = STEP2
            .replace("register#code", "register#key")
            .replace(
                "<field label='Validation code' var='code' type='text-single'><value>839775</value></field>",
                "<field var='publickey'><value>TkVX</value></field>",
            );
        assert_eq!(
            parse(&rollover).unwrap(),
            Submission::Rollover {
                public_key: "TkVX".into(),
                revoked: None
            }
        );
        let with_revoked = rollover.replace(
            "</x>",
            "<field var='revoked'><value>T0xE</value></field></x>",
        );
        assert_eq!(
            parse(&with_revoked).unwrap(),
            Submission::Rollover {
                public_key: "TkVX".into(),
                revoked: Some("T0xE".into())
            }
        );
        let no_key = STEP2.replace("register#code", "register#key");
        assert_eq!(err_text(parse(&no_key)), "the field publickey is required");
        let remove = "<query xmlns='jabber:iq:register'><remove/></query>";
        assert_eq!(parse(remove).unwrap(), Submission::Remove);
    }

    #[test]
    fn parses_the_account_management_requests() {
        // Upload and retrieval as in kontalk-account-management.md.
        let upload = "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://kontalk.org/protocol/register#privatekey</value></field><field var='privatekey' type='text-single'><value>U0VDUkVU</value></field></x></query>";
        assert_eq!(
            parse(upload).unwrap(),
            Submission::PrivateKey {
                private_key: "U0VDUkVU".into()
            }
        );
        let empty = upload.replace("U0VDUkVU", "");
        assert_eq!(err_text(parse(&empty)), "the field privatekey is required");
        let retrieve = "<query xmlns='jabber:iq:register'><account xmlns='http://kontalk.org/protocol/register#account'><privatekey><token>TOKEN</token></privatekey></account></query>";
        assert_eq!(
            parse_query(&Element::from_str(retrieve).unwrap()).unwrap(),
            Query::PrivateKey {
                token: "TOKEN".into()
            }
        );
        for bad in [
            "<query xmlns='jabber:iq:register'><account xmlns='http://kontalk.org/protocol/register#account'/></query>",
            "<query xmlns='jabber:iq:register'><account xmlns='http://kontalk.org/protocol/register#account'><privatekey><token> </token></privatekey></account></query>",
        ] {
            assert!(
                parse_query(&Element::from_str(bad).unwrap())
                    .unwrap_err()
                    .0
                    .contains("token")
            );
        }
        for plain in [
            "<query xmlns='jabber:iq:register'/>",
            // Another namespace's account element is not a retrieval.
            "<query xmlns='jabber:iq:register'><account xmlns='urn:other'/></query>",
        ] {
            assert_eq!(
                parse_query(&Element::from_str(plain).unwrap()).unwrap(),
                Query::Form
            );
        }
    }

    #[test]
    fn renders_the_account_management_answers() {
        let s = xml(private_key_token_form("0123"));
        assert!(
            s.contains("<value>http://kontalk.org/protocol/register#privatekey</value>"),
            "{s}"
        );
        assert!(s.contains("var='token'><value>0123</value>"), "{s}");
        let s = String::from(&account_query("UFJJ", "UFVC"));
        assert_eq!(
            s,
            "<query xmlns='jabber:iq:register'><account xmlns='http://kontalk.org/protocol/register#account'><privatekey><private>UFJJ</private><public>UFVC</public></privatekey></account></query>"
        );
        let q = registered_query("This account is registered.");
        assert!(q.get_child("registered", ns::REGISTER).is_some());
        assert_eq!(
            q.get_child("instructions", ns::REGISTER).unwrap().text(),
            "This account is registered."
        );
        let form = DataForm::try_from(q.get_child("x", ns::DATA_FORMS).unwrap().clone()).unwrap();
        assert_eq!(form.form_type(), Some(KEY_FORM_TYPE));
        let vars: Vec<_> = form
            .fields
            .iter()
            .filter_map(|f| f.var.as_deref())
            .collect();
        assert!(
            vars.contains(&"publickey") && vars.contains(&"revoked"),
            "{vars:?}"
        );
    }

    #[test]
    fn optional_fields_parse() {
        let q = STEP1.replace(
            "</x>",
            "<field var='challenge'><value>missedcall</value></field>\
             <field var='fallback' type='boolean'><value>1</value></field>\
             <field var='accept-terms' type='boolean'><value>true</value></field></x>",
        );
        assert_eq!(
            parse(&q).unwrap(),
            Submission::Start {
                phone: "+15555215554".into(),
                force: false,
                fallback: true,
                challenge: Some(Challenge::MissedCall),
                accept_terms: true
            }
        );
    }

    #[test]
    fn dispatches_on_form_type_not_on_fields() {
        // A step-1 FORM_TYPE carrying a code field is still step 1 (and misses the phone).
        let q = STEP2.replace(
            "http://kontalk.org/protocol/register#code",
            "jabber:iq:register",
        );
        assert_eq!(err_text(parse(&q)), "the field phone is required");
        // A code FORM_TYPE with a phone is step 2, missing the code.
        let q = STEP1.replace(
            "jabber:iq:register</value>",
            "http://kontalk.org/protocol/register#code</value>",
        );
        assert_eq!(err_text(parse(&q)), "the field code is required");
    }

    #[test]
    fn wrong_forms_get_bad_request_with_the_reason() {
        assert!(err_text(parse("<query xmlns='jabber:iq:register'/>")).contains("data form"));
        assert!(err_text(parse(
            "<query xmlns='jabber:iq:register'><username>x</username><password>y</password></query>"
        ))
        .contains("data form"));
        assert_eq!(
            err_text(parse(&STEP1.replace("type='submit'", "type='form'"))),
            "the data form must be of type submit"
        );
        assert_eq!(
            err_text(parse(
                &STEP1.replace("jabber:iq:register</value>", "urn:other</value>")
            )),
            "unknown FORM_TYPE urn:other"
        );
        assert_eq!(
            err_text(parse(
                "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'><field var='phone'><value>+1</value></field></x></query>"
            )),
            "the data form has no FORM_TYPE"
        );
        let callerid = STEP1.replace(
            "</x>",
            "<field var='challenge'><value>callerid</value></field></x>",
        );
        assert!(err_text(parse(&callerid)).contains("unknown challenge type"));
        let bad_bool = STEP1_FORCE.replace("<value>true</value>", "<value>yes</value>");
        assert!(err_text(parse(&bad_bool)).contains("force must be a boolean"));
        let empty_phone = STEP1.replace("+15555215554", "");
        assert_eq!(err_text(parse(&empty_phone)), "the field phone is required");
        // Options on a text field violate XEP-0004: xmpp-parsers refuses the form.
        let bad_form = STEP1.replace(
            "<value>+15555215554</value>",
            "<option><value>a</value></option><value>+15555215554</value>",
        );
        assert!(err_text(parse(&bad_form)).contains("data form"));
    }

    #[test]
    fn malformed_xml_never_becomes_a_request() {
        for xml in [
            "<iq xmlns='jabber:component:accept' type='set' id='1'><query xmlns='jabber:iq:register'>",
            "<iq xmlns='jabber:component:accept' type='set' id='1'></iq>",
            "<iq xmlns='jabber:client' type='set' id='1'><query xmlns='jabber:iq:register'/></iq>",
            "not xml",
        ] {
            let parsed = Element::from_str(xml).ok().map(Iq::try_from);
            assert!(!matches!(parsed, Some(Ok(_))), "{xml}");
        }
    }

    fn xml(q: FormQuery) -> String {
        String::from(&Element::from(q))
    }

    #[test]
    fn renders_the_registration_form() {
        let q = registration_form(
            "Enter your number",
            &[Challenge::Pin, Challenge::MissedCall],
            Some("https://example.org/terms"),
        );
        let back = FormQuery::try_from(Element::from_str(&xml(q.clone())).unwrap()).unwrap();
        assert_eq!(back.instructions.as_deref(), Some("Enter your number"));
        let f = &back.form;
        assert_eq!(f.type_, DataFormType::Form);
        assert_eq!(f.form_type(), Some(ns::REGISTER));
        let by = |v: &str| {
            f.fields
                .iter()
                .find(|x| x.var.as_deref() == Some(v))
                .unwrap()
        };
        assert_eq!(by("phone").type_, FieldType::TextSingle);
        assert!(by("phone").required);
        assert_eq!(by("force").type_, FieldType::Boolean);
        assert_eq!(by("fallback").type_, FieldType::Boolean);
        let ch = by("challenge");
        assert_eq!(ch.type_, FieldType::ListSingle);
        let values: Vec<_> = ch.options.iter().map(|o| o.value.as_str()).collect();
        assert_eq!(values, ["pin", "missedcall"], "never callerid");
        assert_eq!(by("accept-terms").type_, FieldType::Boolean);
        assert_eq!(by("terms").type_, FieldType::Hidden);
        assert_eq!(by("terms").values, ["https://example.org/terms"]);
        let no_terms = registration_form("i", &[Challenge::Pin], None);
        assert!(!xml(no_terms).contains("accept-terms"));
    }

    #[test]
    fn renders_the_step_answers_as_the_protocol_document_shows() {
        let v = Verification {
            id: crate::registrar::VerificationId::generate(),
            account: "4bdd4f929f3a1062253e4e496bafba0bdfb5db75".parse().unwrap(),
            jid: "4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost".into(),
            challenge: Challenge::Pin,
            sender: "12345".into(),
            instructions: "A SMS with a verification code will be sent.".into(),
            code_length: 6,
            expires_at: chrono::Utc::now(),
            next_resend_at: chrono::Utc::now(),
            attempts_left: 5,
            state: crate::registrar::State::Pending,
            can_fallback: false,
            delivery: None,
            next_call_at: None,
            replayed: false,
        };
        let s = xml(started_form(&v));
        assert!(s.starts_with("<query xmlns='jabber:iq:register'><instructions>A SMS with a verification code will be sent.</instructions><x xmlns='jabber:x:data' type='form'>"), "{s}");
        assert!(
            s.contains(
                "<field type='hidden' var='FORM_TYPE'><value>jabber:iq:register</value></field>"
            ),
            "{s}"
        );
        assert!(
            s.contains("<field label='Sender ID' var='from'><value>12345</value></field>"),
            "{s}"
        );
        assert!(
            s.contains("<field label='Challenge type' var='challenge'><value>pin</value></field>"),
            "{s}"
        );
        assert!(!s.contains("can-fallback"));
        let s = xml(started_form(&Verification {
            can_fallback: true,
            ..v
        }));
        assert!(s.contains("var='can-fallback'><value>true</value>"), "{s}");

        let s = xml(registered_form("S0VZ".into()));
        assert!(
            s.contains("<value>http://kontalk.org/protocol/register#code</value>"),
            "{s}"
        );
        assert!(
            s.contains(
                "<field label='Signed public key' var='publickey'><value>S0VZ</value></field>"
            ),
            "{s}"
        );
        assert!(!s.contains("<instructions>"));

        let s = xml(rolled_over_form("S0VZ".into()));
        assert!(
            s.contains("<value>http://kontalk.org/protocol/register#key</value>"),
            "{s}"
        );
        assert!(s.contains("var='publickey'><value>S0VZ</value>"), "{s}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn escape(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('\'', "&apos;")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Arbitrary field names and values in a register form: a submission or a reason.
        #[test]
        fn arbitrary_forms_are_parsed_or_refused(
            form_type in prop_oneof![Just("jabber:iq:register".to_owned()), Just(CODE_FORM_TYPE.to_owned()), Just(KEY_FORM_TYPE.to_owned()), any::<String>()],
            fields in proptest::collection::vec((any::<String>(), any::<String>()), 0..6),
            x_type in prop_oneof![Just("submit"), Just("form"), Just("result")],
        ) {
            let mut xml = format!(
                "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='{x_type}'>\
                 <field var='FORM_TYPE' type='hidden'><value>{}</value></field>",
                escape(&form_type)
            );
            for (var, value) in &fields {
                xml.push_str(&format!(
                    "<field var='{}'><value>{}</value></field>",
                    escape(var),
                    escape(value)
                ));
            }
            xml.push_str("</x></query>");
            // Strings with characters XML cannot carry do not make an element: nothing to parse.
            if let Ok(element) = Element::from_str(&xml) {
                match parse_submission(element) {
                    Ok(_) | Err(FormError(_)) => {}
                }
            }
        }

        /// Arbitrary text as a whole stanza payload never panics the parsers.
        #[test]
        fn arbitrary_payloads_never_panic(text in any::<String>()) {
            if let Ok(element) = Element::from_str(&text) {
                let _ = parse_submission(element);
            }
        }
    }
}
