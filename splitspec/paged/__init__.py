"""Paged KV cache: block manager (pure Python), block pool tensors, paged attention, model runner."""
