"""The prefill role: chunked, prefix-cached prefill of tasks from decode workers, KV pushed into their pools."""
