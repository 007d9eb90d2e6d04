"""Token conventions shared by the data pipeline, the model and conversion (LLaVA's, which the
authors' MoE-LLaVA code keeps): each written here once."""

IGNORE_INDEX = -100  # label of positions without loss (HF / LLaVA)
IMAGE_TOKEN = "<image>"  # the placeholder in prompt text
IMAGE_SENTINEL_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: a placeholder id outside the vocabulary
DEFAULT_SEED = 1234  # Megatron-LM's --seed default (model init, data order, dropout, sampling)
EOS = "<|endoftext|>"  # Phi-2 / StableLM-2 end of text, closing every supervised answer
# The system line of the phi / stablelm conversation templates (stages 2-3, router prompts).
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
