"""Kafka helpers shared by the shells: headers, control records, the contacts follower, admin."""
