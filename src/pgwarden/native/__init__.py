"""The compiled capture trigger (pgwarden_capture.c), built per PostgreSQL major by setup.py."""
