//! Checking a code and completing the registration.
//!
//! A submission is charged against the check limits before its key is parsed; then the code is
//! compared (our own codes are keyed hashes, compared here; a provider's are checked by the
//! provider). A wrong code spends one try. A correct one has its key certified, and then one
//! transaction spends its try, completes the verification, stores the account and counts the
//! completion, so that no other request ever sees a try spent on a correct code that is not done.

use super::abuse;
use super::guard::HOLDER_CHECK_SCOPES;
use super::ports::{CompleteOutcome, Completion, Notice, Requester, VerificationRecord};
use super::{Code, Error, Origin, Registered, Registrar, VerificationId, whole_seconds};
use crate::openpgp::{self, UserKey};

impl Registrar {
    /// Checks `code` for verification `id` (the caller holds the id, as the HTTP client does)
    /// and, when it matches, certifies `key` and stores the account. Submitting the same code and
    /// key again while the verification lives returns the same result.
    pub async fn verify(
        &self,
        id: &VerificationId,
        code: &Code,
        key: UserKey,
        origin: &Origin,
    ) -> Result<Registered, Error> {
        let v = self.live(id).await?;
        self.check_and_complete(v, code, key, Requester::Holder, origin)
            .await
    }

    /// Checks `code` for the pending verification of the account that `key`'s User ID names, as
    /// Kontalk clients do over XMPP (step 2 comes on a new connection, without the verification
    /// id). `requester` (a JID) gets its own budget of tries, so that anyone else's wrong guesses
    /// for the account cannot lock the real client out; the verification's total is capped too.
    pub async fn verify_by_key(
        &self,
        code: &Code,
        key: UserKey,
        origin: &Origin,
    ) -> Result<Registered, Error> {
        let now = self.clock.now();
        let mut found = None;
        for account in openpgp::accounts_named(&key, &self.settings.domain) {
            if let Some(v) = self.store.verification_by_account(&account).await?
                && v.expires_at > now
            {
                found = Some(v);
                break;
            }
        }
        let Some(v) = found else {
            return Err(Error::NotFound);
        };
        // The client that started the verification, asking from the same address (before login,
        // through the Prosody relay) or the same JID (the component), is its holder.
        if !origin.ip_stand_in
            && let Some(client) = self.client_id(origin)
            && v.client.as_deref() == Some(client.as_str())
        {
            return self
                .check_and_complete(v, code, key, Requester::Holder, origin)
                .await;
        }
        // Anyone else: its JID, or before login its address.
        let requester = match (&origin.jid, origin.ip) {
            (Some(jid), _) => format!("jid:{jid}"),
            (None, Some(ip)) => format!(
                "ip:{}",
                abuse::ip_group(ip, self.settings.abuse.ipv6_prefix)
            ),
            (None, None) => "unknown".to_owned(),
        };
        let who = self.secret.pseudonym("requester", &requester);
        self.check_and_complete(v, code, key, Requester::Peer(who), origin)
            .await
    }

    async fn check_and_complete(
        &self,
        v: VerificationRecord,
        code: &Code,
        key: UserKey,
        requester: Requester,
        origin: &Origin,
    ) -> Result<Registered, Error> {
        let id = v.id.clone();
        let email = v.account.jid(&self.settings.domain);
        if v.verified_at.is_some() {
            return self.replay(&v, code, &key);
        }
        let now = whole_seconds(self.clock.now());
        let exhausted = match requester {
            Requester::Holder => self.locked(&v),
            Requester::Peer(_) => self.closed_to_others(&v),
        };
        if exhausted {
            return self.duplicate_or_locked(&id, code, &key).await;
        }
        // Tries per client, and others' tries per number across verifications, besides the
        // verification's own budgets; counted before the key is checked, which costs far more.
        // The holder's tries are not counted per number: a stranger's guesses would use them up.
        let scopes: &[abuse::Scope] = match requester {
            Requester::Holder => &HOLDER_CHECK_SCOPES,
            Requester::Peer(_) => &abuse::Scope::ALL,
        };
        self.throttle_scopes(abuse::Action::Check, &v.phone, origin, scopes)
            .await?;
        let limits = self.limits(&v);
        let when = std::time::SystemTime::from(now);
        // Our own code is compared here: a wrong one spends its try at once, a correct one with
        // the completion. A provider's code is checked by the provider, after the try is spent,
        // so that parallel guesses cannot outrun the counter. Either way the key is judged
        // before a try is spent: a bad key says nothing about the code.
        let own_match = v
            .code_hash
            .as_deref()
            .map(|hash| self.secret.code_matches(v.id.as_str(), code.as_str(), hash));
        let (key, certified) = if own_match == Some(true) {
            // Judged and certified in one trip to the crypto pool.
            let (server, email) = (self.server_key.clone(), email.clone());
            self.crypto
                .run(move || {
                    openpgp::check_user_key(&key, &email, when).map(|()| {
                        let certified = server.certify(&key, &email, when);
                        (key, certified)
                    })
                })
                .await??
        } else {
            let key = {
                let email = email.clone();
                self.crypto
                    .run(move || openpgp::check_user_key(&key, &email, when).map(|()| key))
                    .await??
            };
            let spent = self
                .store
                .take_attempt(&v.id, &requester, limits, now)
                .await?;
            let Some(spent) = spent else {
                return self.duplicate_or_locked(&id, code, &key).await;
            };
            if own_match.is_some() || !self.provider_check(&v, code).await? {
                let attempts_left = match requester {
                    Requester::Holder => limits.holder.saturating_sub(spent),
                    Requester::Peer(_) => limits.per_peer.saturating_sub(spent).min(
                        limits
                            .others
                            .saturating_sub(v.total_attempts.saturating_sub(v.attempts) + 1),
                    ),
                };
                tracing::info!(verification = %v.id, attempts_left, "wrong code");
                return Err(Error::WrongCode { attempts_left });
            }
            let (server, email, certifying) = (self.server_key.clone(), email.clone(), key.clone());
            let certified = self
                .crypto
                .run(move || server.certify(&certifying, &email, when))
                .await?;
            (key, certified)
        };
        let certified = certified.map_err(|e| {
            tracing::error!(error = %e, "certification failed");
            Error::Internal
        })?;
        let test = self.is_test_number(v.phone.as_str());
        let completion = Completion {
            id: v.id.clone(),
            account: v.account.clone(),
            attempt: v.code_hash.is_some().then(|| (requester.clone(), limits)),
            fingerprint: certified.fingerprint.clone(),
            public_key: certified.bytes.clone(),
            replace_account: v.force,
            now,
            // Only a forced registration can replace a key, and so need an event.
            notice: if v.force {
                self.notice()
            } else {
                Notice::default()
            },
            counted: (!test).then(|| self.completion_counted(&v.phone, v.created_at)),
        };
        match self.store.complete(&completion).await? {
            CompleteOutcome::Done => {
                if v.force {
                    self.events_waker.notify_waiters();
                }
                tracing::info!(
                    verification = %v.id,
                    account = %v.account,
                    fingerprint = %certified.fingerprint,
                    replaced = v.force,
                    "account registered"
                );
                Ok(Registered {
                    jid: email,
                    account: v.account,
                    fingerprint: certified.fingerprint,
                    public_key: certified.bytes,
                })
            }
            CompleteOutcome::AccountExists => Err(Error::Conflict),
            // A concurrent submission completed it first, or took the last try.
            CompleteOutcome::NotPending | CompleteOutcome::NoTryLeft => {
                self.duplicate_or_locked(&id, code, &key).await
            }
        }
    }

    /// A submission that found no try left: the stored result when the verification is done
    /// (a duplicate of the submission that completed it: the same code and key), else locked.
    async fn duplicate_or_locked(
        &self,
        id: &VerificationId,
        code: &Code,
        key: &UserKey,
    ) -> Result<Registered, Error> {
        let v = self.live(id).await?;
        if v.verified_at.is_some() {
            return self.replay(&v, code, key);
        }
        Err(Error::Locked {
            retry_at: v.expires_at,
        })
    }

    /// Asks the provider of the last delivery whether `code` is right.
    async fn provider_check(&self, v: &VerificationRecord, code: &Code) -> Result<bool, Error> {
        let (Some(name), Some(reference)) = (&v.provider, &v.provider_ref) else {
            tracing::error!(verification = %v.id, "no code hash and no provider reference");
            return Err(Error::Internal);
        };
        let Some(provider) = self.dispatcher.provider(name) else {
            tracing::error!(verification = %v.id, provider = %name, "provider is gone");
            return Err(Error::Internal);
        };
        provider.check(reference, code.as_str()).await.map_err(|e| {
            tracing::warn!(verification = %v.id, error = %e, "provider check failed");
            Error::DeliveryFailed
        })
    }

    /// The stored result of a completed verification, for the same code and key only.
    fn replay(
        &self,
        v: &VerificationRecord,
        code: &Code,
        key: &UserKey,
    ) -> Result<Registered, Error> {
        let same_code = v
            .code_hash
            .as_deref()
            .is_some_and(|h| self.secret.code_matches(v.id.as_str(), code.as_str(), h));
        match (&v.result_fingerprint, &v.result_key) {
            (Some(fpr), Some(bytes)) if same_code && *fpr == key.fingerprint() => Ok(Registered {
                jid: v.account.jid(&self.settings.domain),
                account: v.account.clone(),
                fingerprint: fpr.clone(),
                public_key: bytes.clone(),
            }),
            _ => Err(Error::AlreadyVerified),
        }
    }
}
