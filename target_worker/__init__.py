"""Target worker: the big model; prefill, batched-ready verification with rejection sampling."""
