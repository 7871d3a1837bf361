"""Where and in which dtype the model runs: device choice and the CPU's measured bf16/fp32 rates."""
