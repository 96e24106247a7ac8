"""The model: loading and saving it, LoRA adapters, the Unsloth backend, precision, log-probs, reference sync.

loading.py          a causal LM and its tokenizer from a hub id, folder, .gguf file or the embedded SmolLM2; saving
lora.py             our PEFT-compatible LoRA: inject, disable, merge, save and load adapters
unsloth_backend.py  backend: unsloth (FastLanguageModel), the only place that imports unsloth
precision.py        which dtype holds the trained weights and which one computes (config.dtype)
logprobs.py         `CompletionLogprobs`: per-token log-probs of the completion tokens (the training forward)
reference_sync.py   a KL reference that follows the policy (TR-DPO's soft update)
"""
