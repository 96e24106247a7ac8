"""Our decoders and the choice between them (`decode_impl`); grpo/rollout/__init__.py lists the modules."""
