"""RLlib on text: a causal LM's vocabulary as the action space of RLlib's DQN and PPO (new API stack).

`env.TextGenerationEnv` (one episode = one completion, scored at the end by raylign's reward actors),
`modules.CausalLMQModule` / `modules.CausalLMPolicyModule`, and `runner.run_rllib`, the driver behind
`raylign train dqn` and `raylign train rllib_ppo`. Importing this package imports neither RLlib nor torch;
its modules do.
"""
