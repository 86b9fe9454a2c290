"""The router: OpenAI HTTP API in front, worker registry, routing and request migration behind."""
