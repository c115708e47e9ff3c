"""The mapping engine: assignments, coalescing buffer, flusher, retry policy, poller."""
