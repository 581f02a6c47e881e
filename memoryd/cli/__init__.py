"""People's tools: `memoryd serve` and the client commands (chat, sessions) built on the SDK."""
