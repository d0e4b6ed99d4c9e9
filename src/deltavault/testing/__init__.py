"""Test kit: what the tests and the race trials use to attack and to check deltavault."""
