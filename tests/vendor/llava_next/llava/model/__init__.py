from .language_model.llava_qwen import LlavaQwenForCausalLM, LlavaQwenConfig
from .language_model.llava_qwen3 import LlavaQwen3ForCausalLM, LlavaQwen3Config
