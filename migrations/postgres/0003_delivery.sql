-- The client's language, and what the provider's delivery receipt said about the last message.
ALTER TABLE verifications ADD COLUMN locale TEXT;
ALTER TABLE verifications ADD COLUMN delivery_state TEXT;
ALTER TABLE verifications ADD COLUMN delivery_updated_at BIGINT;

CREATE INDEX verifications_provider_ref ON verifications (provider, provider_ref);
