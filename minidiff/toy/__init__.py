"""The toy world of the bundled model: drawn shapes, their captions, the evaluator and the training stages.

    python -m minidiff.toy.train_vae        # stage 1: the autoencoder
    python -m minidiff.toy.train_unet       # stage 2: tokenizer, text encoder and UNet
    python -m minidiff.toy.train_lcm_lora   # stage 3: the LCM-LoRA, distilled from stage 2
    python -m minidiff.toy.bench            # accuracy of generated images and time per image
"""
