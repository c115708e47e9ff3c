"""A local stand-in for NICE CXone: authentication, segment membership, faults, counters."""
