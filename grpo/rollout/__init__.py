"""The rollout: G completions per prompt, and every sampler that can draw them. Four concerns, one per place:

the sampling loop and its contract (this folder)
generate.py             `Rollout` (token ids, masks, sampling log-probs, truncation flags), `SamplingSettings`,
                        and `generate`, our sampling loop: each prompt encoded once, G samples decoded together
sampler.py              the `Sampler` protocol (sample, update_weights, gathered, close) and `SamplerBase`
registry.py             which sampler the config names (rollout_engine, vllm_mode), imported only when chosen
step_sampling.py        one training step's samples: the batch of prompts, its rollout, its reward scores
dynamic_sampling.py     DAPO's dynamic sampling: more prompts until the batch has groups that disagree
pipeline.py             async_level: the batches of the next k steps drawn while the trainer learns

decoding/               our decoders and the choice between them
decoding/torch_sampler.py   rollout_engine torch: `generate` as a sampler, the bf16 copy, FSDP's gather
decoding/decoders.py        which decoder runs (`decode_impl`), and transformers' forward as the reference
decoding/static_decode.py   a preallocated KV cache decoded with the model's own layers
decoding/graph_decode.py    fixed shapes, recorded as CUDA graphs on GPU
decoding/packed_decode.py   CPU fp32 with MKL-packed fused weights
decoding/sampling.py        the sampling filters: temperature, top_k, top_p, min_p

engines/                the engines outside the training process
engines/engine.py           what every engine shares: the sampler contract over its sampling, the weights it
                            loads, seeds from our generator, its completions as a `Rollout`
engines/rollout_process.py  rollout_process: our decoder in a process of its own, its faults in one line
engines/weight_channel.py   the weights to that process over a gloo (CPU) or NCCL (GPU) pair group
engines/vllm_engine.py      rollout_engine vllm, vllm_mode colocate: a vLLM engine in the training process
engines/vllm_server.py      vllm_mode server: the trainer's client of `grpo vllm-serve`, its secret and
                            fingerprint checks
engines/vllm_serve.py       the `grpo vllm-serve` command: loopback unless told, a secret on every route
engines/vllm_answers.py     every answer of a vLLM server checked before use

turns/                  several turns per sample
turns/multi_turn.py         turns with tools or an environment; the tokens between turns masked out
turns/tools.py              config.tools: schemas, the call format, calls with a timeout, the built-in calculator
turns/environments.py       config.environment: reset/step classes, the built-in number_guess
turns/user_code.py          user tools and environments in a worker process that a timeout kills and replaces
"""
