"""Request limits that the gateway's validation and the core's both enforce. Torch-free, so that
the gateway imports them without loading the model stack."""

MAX_LOGPROBS = 20  # top logprobs a request may ask for (vLLM's default limit)
