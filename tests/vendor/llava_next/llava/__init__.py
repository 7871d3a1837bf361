# from .model import LlavaLlamaForCausalLM
