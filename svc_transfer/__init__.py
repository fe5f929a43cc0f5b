"""svc_transfer: the ledger (transfers, deposits, withdrawals)."""
