"""A small demo workspace for training tests: shards, tokenizer, a random tiny checkpoint."""

from pathlib import Path


def make_workspace(root, samples_per_image: int = 4, held_out: int = 1) -> dict:
    """Needs an initialised process group (the single_rank fixture)."""
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
    from medmoe_mcore.config.model import ModelConfig
    from medmoe_mcore.data.tokenizer import train_bpe
    from medmoe_mcore.demo import dataset
    from medmoe_mcore.models.medmoe import MedMoEModel

    root = Path(root)
    shards = dataset.build(root / "data", samples_per_image=samples_per_image, held_out=held_out,
                        show_progress=False)
    tok = train_bpe(dataset.corpus(root / "data"), root / "tokenizer")
    cfg = ModelConfig(language=medmoe_language("tiny"),
                      vision=vision_flavor("tiny", tok.image_token_id))
    store.save(MedMoEModel(cfg).sharded_state_dict(), root / "init", cfg,
                       extra_dirs={store.TOKENIZER: root / "tokenizer"})
    return {"shards": shards, "tokenizer": root / "tokenizer", "init": root / "init"}
