"""The client side of the mesh: what the bots, the CLI and the load test all need to reach a server.

- `clients.targets`: where each server listens (default ports, NVIDIA_*_URL overrides);
- `clients.channel`: the channel every client opens, with its options, balanced over replicas;
- `clients.security`: TLS, mutual TLS and the bearer token, from flags or NEMOTRON_TLS_* variables;
- `clients.retry`: which status codes are worth retrying, and the backoff between tries;
- `clients.serving`: start a server on this machine and wait until its health says SERVING.

This is the ground floor: it imports nothing from services/, bots/, loadtest/ or nemotron_speech/,
so all of them can stand on it (tests/test_clients.py checks the rule).
"""
