-- Indexes for two look-ups that otherwise scan a table that only grows.
--
-- The payment-code purge (wallet.settlement.purge_payment_codes) deletes codes whose
-- expires_at is past the retention, a bounded batch per pass: with this index each pass reads
-- only the rows it deletes, however many fresh codes the table holds.
CREATE INDEX payment_code_expires_at_idx ON payment_code (expires_at);

-- A refund's view reads its ledger movements by refund_id (wallet.refunds); the settlement's
-- already have ledger_transfer_settlement_idx.
CREATE INDEX ledger_transfer_refund_idx ON ledger_transfer (refund_id) WHERE refund_id IS NOT NULL;
