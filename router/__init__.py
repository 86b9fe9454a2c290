"""The router: the OpenAI HTTP front, the worker registry, routing, and each request's life across workers."""
