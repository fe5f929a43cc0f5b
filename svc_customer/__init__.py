"""svc_customer: registration, email verification, credentials and sessions."""
