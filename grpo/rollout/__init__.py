"""The rollout: G completions per prompt, with every decoder that can draw them.

generate.py         `Rollout` (token ids, masks, sampling log-probs, truncation flags) and `generate`
sampling.py         the sampling filters: temperature, top_k, top_p, min_p
decoders.py         which decoder runs (`decode_impl`), and transformers' forward as the reference decoder
static_decode.py    a preallocated KV cache decoded with the model's own layers
graph_decode.py     fixed shapes, recorded as CUDA graphs on GPU
packed_decode.py    CPU fp32 with MKL-packed fused weights
engine.py           what every rollout engine shares: the sampler of one step's weights, the push
vllm_engine.py      rollout_engine vllm: a vLLM engine that gets the policy's weights after every step
vllm_server.py      vllm_mode server: the trainer's client of `grpo vllm-serve`, its secret and fingerprint checks
vllm_serve.py       the `grpo vllm-serve` command: loopback unless told, a secret on every route
vllm_answers.py     every answer of a vLLM server checked before use
dynamic_sampling.py DAPO's dynamic sampling: more prompts until the batch has groups that disagree
multi_turn.py       several turns per sample with tools or an environment; tokens between turns masked out
tools.py            config.tools: schemas, the call format, calls with a timeout, the built-in calculator
environments.py     config.environment: reset/step classes, the built-in number_guess
user_code.py        user tools and environments in a worker process that a timeout kills and replaces
"""
