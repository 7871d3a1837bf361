"""Where and in which dtype the model runs: device choice and the CPU's measured bf16/fp32 rates; and how Ray is
reached (``ray_connect``: a cluster checked to answer in bounded time, a local instance on the loopback only)."""
