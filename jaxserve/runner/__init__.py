"""The device side: step inputs laid out from a plan (`step_inputs`), the compiled programs
(`programs`: one key, one compile path), the program body with its fused decode loop
(`decode_loop`), sampling, penalties and logprobs, and the runner that owns the parameters and
the KV cache (`model_runner`)."""
