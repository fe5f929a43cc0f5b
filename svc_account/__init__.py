"""svc_account: accounts and statements."""
