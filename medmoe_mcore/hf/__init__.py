"""`transformers` classes for exported Med-MoE checkpoints (dense or MoE, text-only or
multimodal). The modules here are copied into every export that needs them and named in its
config's `auto_map`, so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` needs nothing else."""

from pathlib import Path

REMOTE_CODE_FILES = tuple(Path(__file__).with_name(n)
                          for n in ("configuration_medmoe.py", "modeling_medmoe.py"))

# HF model type (the authors' names) -> (config class name, model class name)
CLASSES = {
    "llava_phi": ("LlavaPhiConfig", "LlavaPhiForCausalLM"),
    "moe_llava_phi": ("MedMoePhiConfig", "MedMoePhiForCausalLM"),
    "llava_stablelm": ("LlavaStableLmConfig", "LlavaStableLmForCausalLM"),
    "moe_llava_stablelm": ("MedMoeStableLmConfig", "MedMoeStableLmForCausalLM"),
}


def auto_map(model_type: str) -> dict:
    config_name, model_name = CLASSES[model_type]
    return {"AutoConfig": f"configuration_medmoe.{config_name}",
            "AutoModelForCausalLM": f"modeling_medmoe.{model_name}"}


def config_class(model_type: str):
    from medmoe_mcore.hf import configuration_medmoe

    return getattr(configuration_medmoe, CLASSES[model_type][0])


def model_class(model_type: str):
    from medmoe_mcore.hf import modeling_medmoe

    return getattr(modeling_medmoe, CLASSES[model_type][1])
