-- The client's language (resends are worded like the first message), and what the provider's
-- delivery receipt said about the last message, found by the provider's reference.
ALTER TABLE verifications ADD COLUMN locale TEXT;
ALTER TABLE verifications ADD COLUMN delivery_state TEXT;
ALTER TABLE verifications ADD COLUMN delivery_updated_at INTEGER;

CREATE INDEX verifications_provider_ref ON verifications (provider, provider_ref);
