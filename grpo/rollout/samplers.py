"""The table of samplers: a `rollout_engine` name (for vllm, with its `vllm_mode`) and the class that implements
grpo/rollout/sampler.py's contract, as `module:Class`, imported only when chosen (grpo/rollout/registry.py).
It imports nothing, so the config's fields can read the names they accept from it. A new sampler is its own file
plus one line here."""

SAMPLERS: dict[str, str] = {
    "torch": "grpo.rollout.decoding.torch_sampler:TorchSampler",
    "vllm/colocate": "grpo.rollout.engines.vllm_engine:VLLMEngine",
    "vllm/server": "grpo.rollout.engines.vllm_server:VLLMServer",
}
ROLLOUT_ENGINES = tuple(dict.fromkeys(name.partition("/")[0] for name in SAMPLERS))
VLLM_MODES = tuple(name.partition("/")[2] for name in SAMPLERS if name.startswith("vllm/"))
