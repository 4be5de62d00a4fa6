"""Notifications: the distribution registry's event envelopes, posted to configured endpoints."""
