"""svc_notify: emails and the notification log."""
