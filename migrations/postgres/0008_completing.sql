-- A correct code was found for the verification and its key is being certified (issue 13): a
-- duplicate of that submission arriving meanwhile, even with no tries left, waits for the
-- result instead of being told "locked". Only a correct code within the budget sets it.
ALTER TABLE verifications ADD COLUMN completing_at BIGINT;
